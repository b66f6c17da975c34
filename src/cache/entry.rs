//! A cached key: the unwrapped bytes (zeroized on drop, redacted in Debug)
//! and what protected them.

use std::fmt;
use std::sync::Arc;

pub use super::key::Freshness;
use crate::kms::ProviderKind;
use crate::secret::SecretBytes;

/// What protected a cached key. One shared instance per (binding,
/// provider, version): a million entries of one binding hold one origin.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct KeyOrigin {
    pub key_binding: Arc<str>,
    /// The link of `key_binding` that unwrapped it (a key unlinked and
    /// linked again under the same name is another key); 0 for the
    /// platform key and sealed DEKs.
    pub link_id: i64,
    pub provider: ProviderKind,
    pub key_version: Box<str>,
    /// The tenant key version that sealed a DEK (0: wrapped directly by
    /// `key_binding`). Its protecting binding is looked up on every hit:
    /// a key change may have moved it since.
    pub tenant_key_version: u32,
}

/// Keys up to this many bytes (every DEK keybroker generates) are stored
/// inside the entry; longer wrapped plaintexts go to the heap.
pub(super) const INLINE: usize = 32;

/// An unwrapped DEK and what protected it. Zeroized on drop. Built in place
/// inside its `Arc` ([`CachedKey::new`]) so the key bytes are never copied
/// through the stack.
pub struct CachedKey {
    inline: [u8; INLINE],
    len: u8,
    heap: Option<Box<[u8]>>,
    pub origin: Arc<KeyOrigin>,
    /// The tenant's cache generation and incarnation it was loaded under.
    pub fresh: Freshness,
}

impl CachedKey {
    pub fn new(plaintext: &SecretBytes, origin: Arc<KeyOrigin>, fresh: Freshness) -> Arc<Self> {
        let bytes = plaintext.expose();
        let small = bytes.len() <= INLINE;
        let mut key = Arc::new(Self {
            inline: [0; INLINE],
            len: 0,
            heap: (!small).then(|| bytes.to_vec().into_boxed_slice()),
            origin,
            fresh,
        });
        if small {
            // Unique right after creation: the bytes go straight to the heap.
            if let Some(entry) = Arc::get_mut(&mut key) {
                entry.inline[..bytes.len()].copy_from_slice(bytes);
                entry.len = bytes.len() as u8;
            }
        }
        key
    }

    pub fn plaintext(&self) -> &[u8] {
        match &self.heap {
            Some(heap) => heap,
            None => &self.inline[..usize::from(self.len)],
        }
    }
}

/// A cached key's plaintext as `Bytes`, without a copy: an answer's bytes
/// are the entry's own, zeroized when the last holder (cache or answer)
/// drops it.
pub fn plaintext_bytes(key: Arc<CachedKey>) -> bytes::Bytes {
    bytes::Bytes::from_owner(SharedPlaintext(key))
}

struct SharedPlaintext(Arc<CachedKey>);

impl AsRef<[u8]> for SharedPlaintext {
    fn as_ref(&self) -> &[u8] {
        self.0.plaintext()
    }
}

impl Drop for CachedKey {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        self.inline.zeroize();
        if let Some(heap) = &mut self.heap {
            heap.zeroize();
        }
    }
}

impl fmt::Debug for CachedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedKey")
            .field(
                "plaintext",
                &format_args!("<redacted {} bytes>", self.plaintext().len()),
            )
            .field("origin", &self.origin)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(version: &str) -> Arc<KeyOrigin> {
        Arc::new(KeyOrigin {
            key_binding: "b".into(),
            link_id: 0,
            provider: ProviderKind::Local,
            key_version: version.into(),
            tenant_key_version: 0,
        })
    }

    #[test]
    fn keys_of_any_length_round_trip_and_debug_hides_them() {
        for len in [1, 16, 32, 33, 4096] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
            let key = CachedKey::new(
                &SecretBytes::new(bytes.clone()),
                origin("1"),
                Freshness::default(),
            );
            assert_eq!(key.plaintext(), bytes.as_slice(), "len {len}");
            let shown = format!("{key:?}");
            assert!(
                shown.contains(&format!("<redacted {len} bytes>")),
                "{shown}"
            );
            assert!(!shown.contains("1, 2, 3"), "{shown}");
        }
    }

    #[test]
    fn an_answer_shares_the_entry_bytes() {
        let key = CachedKey::new(
            &SecretBytes::new(vec![7; 32]),
            origin("1"),
            Freshness::default(),
        );
        let bytes = plaintext_bytes(Arc::clone(&key));
        assert_eq!(bytes.as_ref().as_ptr(), key.plaintext().as_ptr());
        assert_eq!(Arc::strong_count(&key), 2);
        drop(bytes);
        assert_eq!(Arc::strong_count(&key), 1);
    }
}
