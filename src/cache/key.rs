//! The DEK cache's key: one BLAKE3 digest of (tenant, wrapped key bytes,
//! canonical context) and the tenant view it is valid for, hashed into
//! moka's map by a seeded multiply of eight digest bytes.

use std::fmt;
use std::hash::{BuildHasher, Hasher};

use crate::context::Context;

/// What a cached key is valid for: the tenant's cache generation (bumped
/// by every purge of the tenant, so a load that began before a purge is
/// never served after it) and incarnation (a tenant id deleted and created
/// again is another tenant). Part of the [`CacheKey`]: a hit is served only
/// to a view with both equal ([`crate::keys::TenantLife`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Freshness {
    pub generation: u64,
    pub incarnation: u64,
}

/// 56 bytes inline, no heap: memory per cached key matters at a million
/// entries. `digest` is one BLAKE3 hash over the length-prefixed tenant,
/// wrapped key bytes and canonical context, so it pins all three (a
/// collision-resistant hash: bytes that hash alike would be served the
/// other's key without being parsed). BLAKE3 rather than SHA-256: on a
/// CPU without SHA extensions (many Xeons) SHA-256 of a wrapped key cost
/// more than the rest of a cache hit.
/// `tenant_tag` only selects entries for a tenant purge: a collision purges
/// a few extra entries (a cache miss), never serves a wrong key.
/// `fresh` is the tenant view the entry was loaded under: a purge moves the
/// tenant's generation, so every key loaded before it (or for another
/// incarnation of the tenant id) is out of reach at once, whatever moka
/// still holds; the purge then frees them.
#[derive(Clone, PartialEq, Eq)]
pub struct CacheKey {
    digest: [u8; 32],
    pub(super) tenant_tag: u64,
    pub(super) fresh: Freshness,
}

/// The digest is a cryptographic hash already: eight of its bytes are as
/// good a hash as all of them (the cache's hasher mixes in a secret seed).
impl std::hash::Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.digest[..8]);
        state.write_u64(u64::from_le_bytes(word));
    }
}

impl CacheKey {
    pub fn new(tenant_id: &str, wrapped_key: &[u8], context: &Context) -> Self {
        let mut hash = BufferedBlake3::default();
        for part in [tenant_id.as_bytes(), wrapped_key] {
            hash.update(&(part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        context.encode_into(&mut |bytes| hash.update(bytes));
        Self {
            digest: hash.finish(),
            tenant_tag: tenant_tag(tenant_id),
            fresh: Freshness::default(),
        }
    }

    /// This key as looked up or loaded under the view `fresh`.
    pub fn under(mut self, fresh: Freshness) -> Self {
        self.fresh = fresh;
        self
    }
}

/// BLAKE3 of many small parts in one call when they fit in a stack buffer
/// (every cache key of a DEK keybroker issues): fed part by part, the
/// hasher's per-call bookkeeping cost a third of the hash. Longer input
/// streams through the hasher; the digest is the same either way.
struct BufferedBlake3 {
    buf: [u8; 512],
    len: usize,
    /// Set once the input outgrew `buf`.
    stream: Option<Box<blake3::Hasher>>,
}

impl Default for BufferedBlake3 {
    fn default() -> Self {
        Self {
            buf: [0; 512],
            len: 0,
            stream: None,
        }
    }
}

impl BufferedBlake3 {
    /// One copy per part, the overflow out of line. Not inlined: nine
    /// inlined copies cost as many instructions per request and more code
    /// lines, which every request fetches anew (the request path is larger
    /// than the L1 i-cache).
    #[inline(never)]
    fn update(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        match self.buf.get_mut(self.len..end) {
            Some(room) => {
                room.copy_from_slice(bytes);
                self.len = end;
            }
            None => self.spill(bytes),
        }
    }

    /// The input outgrew `buf`: what was buffered and `bytes` go to the
    /// streaming hasher.
    #[cold]
    #[inline(never)]
    fn spill(&mut self, bytes: &[u8]) {
        let stream = self.stream.get_or_insert_with(Box::default);
        stream.update(&self.buf[..self.len]);
        stream.update(bytes);
        self.len = 0;
    }

    /// By reference: the buffer is not moved (copied) to be hashed.
    fn finish(&mut self) -> [u8; 32] {
        let digest = match self.stream.take() {
            None => blake3::hash(&self.buf[..self.len]),
            Some(mut stream) => {
                stream.update(&self.buf[..self.len]);
                stream.finalize()
            }
        };
        *digest.as_bytes()
    }
}

/// A 64-bit tag of a tenant id, for purges and the per-tenant share: the
/// tenant's bytes folded through the cache's seeded multiply (a random seed per process, so no
/// tenant id can be chosen to share another's tag).
pub(super) fn tenant_tag(tenant_id: &str) -> u64 {
    static SEED: std::sync::LazyLock<DigestHasher> = std::sync::LazyLock::new(DigestHasher::random);
    let mut hasher = SEED.build_hasher();
    hasher.write(tenant_id.as_bytes());
    hasher.write_u64(tenant_id.len() as u64);
    hasher.finish()
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CacheKey({}, {:?})",
            hex::encode(&self.digest[..6]),
            self.fresh
        )
    }
}

/// Hashes a [`CacheKey`] from its digest (already a cryptographic hash)
/// mixed with a per-process random seed, so which keys share a bucket
/// cannot be chosen by whoever picks the wrapped bytes (moka's map and
/// the tenant tags use it). Eight bytes and a
/// multiply instead of SipHash over 40 bytes.
#[derive(Clone)]
pub(crate) struct DigestHasher {
    seed: u64,
}

impl DigestHasher {
    pub(crate) fn random() -> Self {
        Self {
            seed: std::hash::RandomState::new().hash_one(0x6b65_7962_726f_6b65_u64) | 1,
        }
    }
}

impl BuildHasher for DigestHasher {
    type Hasher = SeededHasher;
    fn build_hasher(&self) -> SeededHasher {
        SeededHasher {
            seed: self.seed,
            state: 0,
        }
    }
}

pub(crate) struct SeededHasher {
    seed: u64,
    state: u64,
}

impl Hasher for SeededHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only reached through a derived Hash; CacheKey writes a u64.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        // A folded 128-bit multiply (as foldhash and wyhash do): every bit
        // of the result depends on every bit of the word and of the seed.
        let product = u128::from(self.state ^ word ^ self.seed)
            * u128::from(self.seed.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15);
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_blake3_is_blake3_of_the_concatenation() {
        let input: Vec<u8> = (0..3000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        // Part sizes below, at and across the buffer, and one part larger
        // than it: every path of `update`.
        for parts in [
            vec![0, 1, 31, 64],
            vec![511, 1],
            vec![512],
            vec![500, 20, 1000],
            vec![2999, 1],
            vec![100; 30],
        ] {
            let total: usize = parts.iter().sum();
            let mut hash = BufferedBlake3::default();
            let mut at = 0;
            for part in &parts {
                hash.update(&input[at..at + part]);
                at += part;
            }
            assert_eq!(
                hash.finish(),
                *blake3::hash(&input[..total]).as_bytes(),
                "parts {parts:?}"
            );
        }
    }

    #[test]
    fn cache_key_pins_tenant_bytes_context_and_view() {
        let ctx = |k: &str, v: &str| Context::new([(k.to_owned(), v.to_owned())].into()).unwrap();
        let base = CacheKey::new("acme", b"wrapped", &ctx("a", "1"));
        assert_eq!(base, CacheKey::new("acme", b"wrapped", &ctx("a", "1")));
        assert_ne!(base, CacheKey::new("acmf", b"wrapped", &ctx("a", "1")));
        assert_ne!(base, CacheKey::new("acme", b"wrappee", &ctx("a", "1")));
        assert_ne!(base, CacheKey::new("acme", b"wrapped", &ctx("a", "2")));
        // Bytes moved across the tenant/key boundary hash differently.
        assert_ne!(
            CacheKey::new("ab", b"c", &Context::default()),
            CacheKey::new("a", b"bc", &Context::default())
        );
        let later = Freshness {
            generation: 1,
            incarnation: 0,
        };
        assert_ne!(base.clone().under(later), base);
        assert_eq!(base.clone().under(later), base.under(later));
    }

    #[test]
    fn the_bucket_hash_depends_on_the_seed() {
        let (a, b) = (DigestHasher::random(), DigestHasher::random());
        let k = CacheKey::new("t", b"k", &Context::default());
        assert_eq!(a.hash_one(&k), a.hash_one(&k));
        assert_ne!(a.hash_one(&k), b.hash_one(&k));
    }
}
