//! The DEK cache: unwrapped keys in memory so KMS latency and quota are paid
//! once per wrapped key per TTL, not once per read (DESIGN.md section 4).
//!
//! Keyed by one BLAKE3 digest of (tenant, wrapped key bytes, canonical
//! context): an entry exists only if exactly those bytes were parsed, matched
//! to that tenant and decrypted under that context, which is what lets a hit
//! skip parsing. Values are `Arc`s, so a hit copies a pointer, not key bytes.

mod table;

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use table::{Removed, Table};

use crate::context::Context;
use crate::kms::ProviderKind;
use crate::secret::SecretBytes;

/// 40 bytes inline, no heap: memory per cached key matters at a million
/// entries. `digest` is one BLAKE3 hash over the length-prefixed tenant,
/// wrapped key bytes and canonical context, so it pins all three (a
/// collision-resistant hash: bytes that hash alike would be served the
/// other's key without being parsed). BLAKE3 rather than SHA-256: on a
/// CPU without SHA extensions (many Xeons) SHA-256 of a wrapped key cost
/// more than the rest of a cache hit.
/// `tenant_tag` only selects entries for a tenant purge: a collision purges
/// a few extra entries (a cache miss), never serves a wrong key.
#[derive(Clone, PartialEq, Eq)]
pub struct CacheKey {
    digest: [u8; 32],
    tenant_tag: u64,
}

/// The digest is a cryptographic hash already: eight of its bytes are as
/// good a hash as all forty (the table mixes in a secret seed).
impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
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
        }
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

/// A 64-bit tag of a tenant id, for purges: the tenant's bytes folded
/// through the table's seeded multiply (a random seed per process, so no
/// tenant id can be chosen to share another's tag).
fn tenant_tag(tenant_id: &str) -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    static SEED: std::sync::LazyLock<table::DigestHasher> =
        std::sync::LazyLock::new(table::DigestHasher::random);
    let mut hasher = SEED.build_hasher();
    hasher.write(tenant_id.as_bytes());
    hasher.write_u64(tenant_id.len() as u64);
    hasher.finish()
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", hex::encode(&self.digest[..6]))
    }
}

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
const INLINE: usize = 32;

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

/// What a cached key is valid for: the tenant's cache generation (bumped
/// by every purge of the tenant, so a load that began before a purge is
/// never served after it) and incarnation (a tenant id deleted and created
/// again is another tenant). A hit is served only when both equal the
/// current view's ([`crate::keys::TenantLife`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Freshness {
    pub generation: u64,
    pub incarnation: u64,
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

/// The `cache_*` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct CacheSettings {
    /// Most unwrapped keys held in memory.
    #[arg(
        id = "cache_max_entries",
        long = "cache-max-entries",
        env = "KEYBROKER_CACHE_MAX_ENTRIES",
        default_value = "100000"
    )]
    pub max_entries: u64,
    /// How long an unwrapped key is served from memory, e.g. 5m (lifetime of
    /// an entry since its unwrap).
    #[arg(id = "cache_ttl", long = "cache-ttl", env = "KEYBROKER_CACHE_TTL", value_parser = humantime::parse_duration, default_value = "5m")]
    pub ttl: Duration,
    /// Drop an unwrapped key unused for this long, e.g. 1m.
    #[arg(id = "cache_tti", long = "cache-tti", env = "KEYBROKER_CACHE_TTI", value_parser = humantime::parse_duration, default_value = "1m")]
    pub tti: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl CacheSettings {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        use crate::settings::invalid;
        if self.max_entries == 0 {
            return invalid("cache_max_entries", "must be at least 1");
        }
        if self.ttl.is_zero() || self.tti.is_zero() {
            return invalid("cache_ttl/cache_tti", "must be longer than zero");
        }
        if self.tti > self.ttl {
            return invalid(
                "cache_tti",
                "must not be longer than cache_ttl (an entry never outlives its TTL)",
            );
        }
        Ok(())
    }
}

/// Counters, readable in-process (and exported as metrics).
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub load_failures: AtomicU64,
    /// Entries dropped for size or age (not explicit purges).
    pub evictions: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStatsSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub load_failures: u64,
    pub evictions: u64,
}

impl CacheStats {
    pub fn snapshot(&self) -> CacheStatsSnapshot {
        CacheStatsSnapshot {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            load_failures: self.load_failures.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

#[derive(Clone)]
pub struct DekCache {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Table,
    stats: Arc<CacheStats>,
    /// Loads under way, one per key: later callers of the same key wait
    /// for the first one's answer instead of calling the provider again.
    /// Held only to look up or remove a flight, never across an await.
    flights: Mutex<HashMap<CacheKey, Arc<Flight>>>,
    /// Interned origins; taken on the miss path only. Entries no cached key
    /// uses any more are dropped when the set doubles.
    origins: Mutex<Origins>,
    /// Purge generations (see [`Freshness`]): a tenant's is `global` plus
    /// its own count. Read when a tenant view is built, never on a hit.
    generations: Mutex<Generations>,
}

#[derive(Debug, Default)]
struct Generations {
    /// Bumped by a purge of everything (and when `by_tenant` is reset).
    global: u64,
    /// Purges per tenant tag (a shared tag costs a miss, never a wrong key).
    by_tenant: HashMap<u64, u64>,
}

/// Tenants whose purges are counted one by one; past this the counts are
/// folded into the global generation (every entry then reloads once).
const GENERATION_TENANTS: usize = 1_000_000;

/// One load and its outcome, for the callers that waited on it. The
/// loader holds the lock while it loads; a loader that is cancelled
/// leaves `None`, and the next waiter loads instead.
type Flight = tokio::sync::Mutex<Option<Result<Arc<CachedKey>, SharedError>>>;
type SharedError = Arc<dyn Any + Send + Sync>;

#[derive(Debug, Default)]
struct Origins {
    set: std::collections::HashSet<Arc<KeyOrigin>>,
    /// Size after the last sweep.
    swept_at: usize,
}

impl fmt::Debug for DekCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DekCache")
            .field("entries", &self.entry_count())
            .field("stats", &self.inner.stats.snapshot())
            .finish()
    }
}

impl DekCache {
    pub fn new(settings: CacheSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                entries: Table::new(settings.max_entries, settings.ttl, settings.tti),
                stats: Arc::default(),
                flights: Mutex::default(),
                origins: Mutex::default(),
                generations: Mutex::default(),
            }),
        }
    }

    /// The tenant's purge generation now: stamped on the keys loaded under
    /// a view built after this call.
    pub fn generation(&self, tenant_id: &str) -> u64 {
        let generations = self
            .inner
            .generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        generations.global
            + generations
                .by_tenant
                .get(&tenant_tag(tenant_id))
                .copied()
                .unwrap_or(0)
    }

    /// Moves a tenant's generation on (before its entries are removed, so a
    /// load racing the purge lands stale).
    fn bump(&self, tenant_id: Option<&str>) {
        let mut generations = self
            .inner
            .generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match tenant_id {
            Some(tenant_id) => {
                if generations.by_tenant.len() >= GENERATION_TENANTS {
                    // Sums stay increasing: the global moves past them all.
                    let most = generations.by_tenant.values().copied().max().unwrap_or(0);
                    generations.global += most + 1;
                    generations.by_tenant.clear();
                }
                *generations
                    .by_tenant
                    .entry(tenant_tag(tenant_id))
                    .or_default() += 1;
            }
            None => generations.global += 1,
        }
    }

    /// The shared origin for (binding, provider, version, tenant key
    /// version).
    pub fn origin(
        &self,
        key_binding: &Arc<str>,
        provider: ProviderKind,
        key_version: &str,
        tenant_key_version: u32,
    ) -> Arc<KeyOrigin> {
        self.origin_of_link(key_binding, 0, provider, key_version, tenant_key_version)
    }

    /// [`origin`](Self::origin) of a customer key's link `link_id`.
    pub fn origin_of_link(
        &self,
        key_binding: &Arc<str>,
        link_id: i64,
        provider: ProviderKind,
        key_version: &str,
        tenant_key_version: u32,
    ) -> Arc<KeyOrigin> {
        let origin = KeyOrigin {
            key_binding: Arc::clone(key_binding),
            link_id,
            provider,
            key_version: key_version.into(),
            tenant_key_version,
        };
        let Ok(mut origins) = self.inner.origins.lock() else {
            return Arc::new(origin);
        };
        if let Some(found) = origins.set.get(&origin) {
            return Arc::clone(found);
        }
        if origins.set.len() >= 2 * origins.swept_at.max(64) {
            origins.set.retain(|o| Arc::strong_count(o) > 1);
            origins.swept_at = origins.set.len();
        }
        let origin = Arc::new(origin);
        origins.set.insert(Arc::clone(&origin));
        origin
    }

    pub fn stats(&self) -> &Arc<CacheStats> {
        &self.inner.stats
    }

    /// The cached key, if present; counts a hit. A miss is counted by
    /// [`get_or_load`](Self::get_or_load), which callers use next.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<CachedKey>> {
        self.get_at(key, std::time::Instant::now())
    }

    /// [`get`](Self::get) at `now`, a clock reading the caller took anyway
    /// (the hot path reads the clock once per lookup, not once per table).
    pub fn get_at(&self, key: &CacheKey, now: std::time::Instant) -> Option<Arc<CachedKey>> {
        let found = self.inner.entries.get(key, now);
        if found.is_some() {
            self.inner.stats.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// The cached key, or the result of `load` stored under `key`. Concurrent
    /// callers for the same key share one `load`; a failed load is not cached,
    /// so the next request tries again.
    /// Only an entry loaded under `fresh` counts: a stale one (from before
    /// a purge, or another incarnation) is replaced.
    pub async fn get_or_load<E, F>(
        &self,
        key: CacheKey,
        fresh: Freshness,
        load: F,
    ) -> Result<Arc<CachedKey>, Arc<E>>
    where
        F: Future<Output = Result<Arc<CachedKey>, E>>,
        E: Send + Sync + 'static,
    {
        let stats = &self.inner.stats;
        let now = std::time::Instant::now();
        if let Some(found) = self
            .inner
            .entries
            .get(&key, now)
            .filter(|f| f.fresh == fresh)
        {
            stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(found);
        }
        let flight = match self.inner.flights.lock() {
            Ok(mut flights) => Arc::clone(flights.entry(key.clone()).or_default()),
            // Poisoned only by a panic elsewhere: load alone.
            Err(_) => Arc::default(),
        };
        // Before the wait: a caller cancelled while waiting must not leave
        // a flight behind either.
        let landing = Landing {
            cache: self,
            key: &key,
            flight: &flight,
        };
        let mut outcome = flight.lock().await;
        match outcome.as_ref() {
            Some(Ok(found)) if found.fresh == fresh => {
                stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Arc::clone(found));
            }
            // Loaded under another view (before a purge, or after one we
            // have not seen): ours is loaded anew.
            Some(Ok(_)) => {}
            Some(Err(shared)) => {
                // The same key failed for the caller we waited on: the
                // same answer (a waiter with another error type loads).
                if let Ok(err) = Arc::clone(shared).downcast::<E>() {
                    stats.load_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(err);
                }
            }
            None => {
                // First here, or the loader before us was cancelled; a
                // flight may also have landed between our lookup and now.
                if let Some(found) = self
                    .inner
                    .entries
                    .get(&key, std::time::Instant::now())
                    .filter(|f| f.fresh == fresh)
                {
                    stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(found);
                }
            }
        }
        let loaded = load.await;
        match &loaded {
            Ok(value) => {
                let removed = self.inner.entries.insert(key.clone(), Arc::clone(value));
                self.count_removed(removed);
                stats.misses.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                stats.load_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        let loaded = loaded.map_err(Arc::new);
        *outcome = Some(match &loaded {
            Ok(value) => Ok(Arc::clone(value)),
            Err(err) => Err(Arc::clone(err) as SharedError),
        });
        landing.landed();
        loaded
    }

    /// Stores a key the caller just made (a minted tenant key): no lookup
    /// happened, so neither a hit nor a miss is counted.
    pub fn insert(&self, key: CacheKey, value: Arc<CachedKey>) {
        let removed = self.inner.entries.insert(key, value);
        self.count_removed(removed);
    }

    fn count_removed(&self, removed: Removed) {
        if removed.total() > 0 {
            self.inner
                .stats
                .evictions
                .fetch_add(removed.total(), Ordering::Relaxed);
        }
    }

    /// Drops every entry of a tenant, at once (their plaintext is zeroized
    /// as soon as no answer in flight still holds it); a load of the tenant
    /// under way lands stale.
    pub fn purge_tenant(&self, tenant_id: &str) {
        self.bump(Some(tenant_id));
        let tag = tenant_tag(tenant_id);
        self.inner.entries.purge(|k, _| k.tenant_tag == tag);
    }

    /// Drops every entry unwrapped with one key binding of a tenant; every
    /// load of the tenant under way lands stale.
    pub fn purge_binding(&self, tenant_id: &str, binding: &str) {
        self.bump(Some(tenant_id));
        let tag = tenant_tag(tenant_id);
        self.inner
            .entries
            .purge(|k, v| k.tenant_tag == tag && &*v.origin.key_binding == binding);
    }

    /// Drops everything; every load under way lands stale.
    pub fn purge_all(&self) {
        self.bump(None);
        self.inner.entries.purge(|_, _| true);
    }

    /// Entries held (expired ones not yet swept included).
    pub fn entry_count(&self) -> u64 {
        self.inner.entries.len()
    }

    /// Frees expired entries now (the server calls it on a timer, the
    /// metrics scrape before counting).
    pub fn run_pending_tasks(&self) {
        let expired = self.inner.entries.sweep();
        self.count_removed(Removed {
            expired,
            evicted: 0,
        });
    }
}

/// Removes a flight from the map when its loader is done with it: landed,
/// or cancelled with nobody waiting (a waiter left behind loads, then
/// removes it).
struct Landing<'a> {
    cache: &'a DekCache,
    key: &'a CacheKey,
    flight: &'a Arc<Flight>,
}

impl Landing<'_> {
    fn landed(&self) {
        self.remove(true);
    }

    fn remove(&self, always: bool) {
        if let Ok(mut flights) = self.cache.inner.flights.lock() {
            // Clones are taken only under this lock: the count is exact.
            let ours = flights
                .get(self.key)
                .is_some_and(|f| Arc::ptr_eq(f, self.flight));
            if ours && (always || Arc::strong_count(self.flight) <= 2) {
                flights.remove(self.key);
            }
        }
    }
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        self.remove(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

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

    fn value(binding: &str) -> Arc<CachedKey> {
        let origin = Arc::new(KeyOrigin {
            key_binding: binding.into(),
            link_id: 0,
            provider: ProviderKind::Local,
            key_version: "1".into(),
            tenant_key_version: 0,
        });
        CachedKey::new(&SecretBytes::new(vec![1; 32]), origin, Freshness::default())
    }

    #[test]
    fn keys_of_any_length_round_trip_and_debug_hides_them() {
        let origin = |v: &str| {
            Arc::new(KeyOrigin {
                key_binding: "b".into(),
                link_id: 0,
                provider: ProviderKind::Local,
                key_version: v.into(),
                tenant_key_version: 0,
            })
        };
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
    fn cache_key_pins_tenant_bytes_and_context() {
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
    }

    #[test]
    fn origins_are_shared_per_binding_and_version() {
        let cache = DekCache::new(settings(1000));
        let binding: Arc<str> = "k1".into();
        let a = cache.origin(&binding, ProviderKind::Local, "1", 0);
        let b = cache.origin(&binding, ProviderKind::Local, "1", 0);
        let c = cache.origin(&binding, ProviderKind::Local, "2", 0);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }

    fn settings(ttl_ms: u64) -> CacheSettings {
        CacheSettings {
            max_entries: 1000,
            ttl: Duration::from_millis(ttl_ms),
            tti: Duration::from_millis(ttl_ms),
        }
    }

    #[tokio::test]
    async fn concurrent_misses_load_once() {
        let cache = DekCache::new(settings(60_000));
        let loads = Arc::new(AtomicUsize::new(0));
        let key = CacheKey::new("t", &[1; 32], &Context::default());
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, loads, key) = (cache.clone(), loads.clone(), key.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_load::<(), _>(key, Freshness::default(), async {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok(value("platform"))
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        let s = cache.stats().snapshot();
        assert_eq!((s.misses, s.hits), (1, 49));
    }

    #[tokio::test]
    async fn a_cancelled_load_hands_over_and_leaves_no_flight() {
        let cache = DekCache::new(settings(60_000));
        let key = CacheKey::new("t", &[3; 32], &Context::default());
        let flights = |cache: &DekCache| cache.inner.flights.lock().unwrap().len();
        // Cancelled with nobody waiting: nothing left behind.
        let alone =
            cache.get_or_load::<(), _>(key.clone(), Freshness::default(), std::future::pending());
        assert!(
            tokio::time::timeout(Duration::from_millis(20), alone)
                .await
                .is_err()
        );
        assert_eq!(flights(&cache), 0);
        // Cancelled with a waiter: the waiter loads, then the flight goes.
        let (c, k) = (cache.clone(), key.clone());
        let stuck = tokio::spawn(async move {
            c.get_or_load::<(), _>(k, Freshness::default(), std::future::pending())
                .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (c, k) = (cache.clone(), key.clone());
        let waiter = tokio::spawn(async move {
            c.get_or_load::<(), _>(k, Freshness::default(), async { Ok(value("platform")) })
                .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(flights(&cache), 1);
        stuck.abort();
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(got.plaintext(), [1; 32].as_slice());
        assert_eq!(flights(&cache), 0);
        assert!(cache.get(&key).is_some());
        assert_eq!(cache.stats().snapshot().misses, 1);
        // Loader and waiter both cancelled: nothing left behind.
        let key = CacheKey::new("t", &[4; 32], &Context::default());
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let (c, k) = (cache.clone(), key.clone());
                tokio::spawn(async move {
                    c.get_or_load::<(), _>(k, Freshness::default(), std::future::pending())
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(flights(&cache), 1);
        for task in tasks {
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled());
        }
        assert_eq!(flights(&cache), 0);
    }

    /// A load under way when its tenant is purged lands, for the callers
    /// that asked before the purge, but is never served to a view built
    /// after it: the purge moved the generation.
    #[tokio::test]
    async fn a_load_that_began_before_a_purge_is_not_served_after_it() {
        let cache = DekCache::new(settings(60_000));
        let key = CacheKey::new("t", &[5; 32], &Context::default());
        let before = Freshness {
            generation: cache.generation("t"),
            incarnation: 1,
        };
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (c, k) = (cache.clone(), key.clone());
        let loading = tokio::spawn(async move {
            c.get_or_load::<(), _>(k, before, async {
                let _ = released.await;
                Ok(CachedKey::new(
                    &SecretBytes::new(vec![1; 32]),
                    origin(),
                    before,
                ))
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        cache.purge_tenant("t");
        release.send(()).unwrap();
        assert!(loading.await.unwrap().is_ok());
        let after = Freshness {
            generation: cache.generation("t"),
            incarnation: 1,
        };
        assert_ne!(after, before);
        let loads = AtomicUsize::new(0);
        cache
            .get_or_load::<(), _>(key.clone(), after, async {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(CachedKey::new(
                    &SecretBytes::new(vec![2; 32]),
                    origin(),
                    after,
                ))
            })
            .await
            .unwrap();
        assert_eq!(
            loads.load(Ordering::SeqCst),
            1,
            "the stale entry was served"
        );
        // Another incarnation of the tenant is another tenant to the cache.
        let reborn = Freshness {
            incarnation: 2,
            ..after
        };
        let got = cache
            .get_or_load::<(), _>(key, reborn, async {
                Ok(CachedKey::new(
                    &SecretBytes::new(vec![3; 32]),
                    origin(),
                    reborn,
                ))
            })
            .await
            .unwrap();
        assert_eq!(got.plaintext(), [3; 32].as_slice());
        // Other tenants' generations did not move.
        assert_eq!(cache.generation("u"), 0);
        cache.purge_all();
        assert_eq!(cache.generation("u"), 1);
    }

    fn origin() -> Arc<KeyOrigin> {
        Arc::new(KeyOrigin {
            key_binding: "b".into(),
            link_id: 0,
            provider: ProviderKind::Local,
            key_version: "1".into(),
            tenant_key_version: 0,
        })
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let cache = DekCache::new(settings(60_000));
        let key = CacheKey::new("t", &[1; 32], &Context::default());
        let err = cache
            .get_or_load(key.clone(), Freshness::default(), async {
                Err::<Arc<CachedKey>, _>("down")
            })
            .await;
        assert!(err.is_err());
        assert!(cache.get(&key).is_none());
        cache
            .get_or_load::<(), _>(key.clone(), Freshness::default(), async {
                Ok(value("platform"))
            })
            .await
            .unwrap();
        assert!(cache.get(&key).is_some());
        assert_eq!(cache.stats().snapshot().load_failures, 1);
    }

    #[tokio::test]
    async fn purge_by_tenant_and_binding() {
        let cache = DekCache::new(settings(60_000));
        let a1 = CacheKey::new("a", &[1; 32], &Context::default());
        let a2 = CacheKey::new("a", &[2; 32], &Context::default());
        let b1 = CacheKey::new("b", &[1; 32], &Context::default());
        for (k, binding) in [(&a1, "k1"), (&a2, "k2"), (&b1, "k1")] {
            cache
                .get_or_load::<(), _>(k.clone(), Freshness::default(), async {
                    Ok(value(binding))
                })
                .await
                .unwrap();
        }
        cache.purge_binding("a", "k1");
        assert!(cache.get(&a1).is_none());
        assert!(cache.get(&a2).is_some());
        assert!(cache.get(&b1).is_some());
        cache.purge_tenant("a");
        assert!(cache.get(&a2).is_none());
        assert!(cache.get(&b1).is_some());
    }

    #[tokio::test]
    async fn entries_expire_after_ttl() {
        let cache = DekCache::new(settings(200));
        let key = CacheKey::new("t", &[1; 32], &Context::default());
        cache
            .get_or_load::<(), _>(key.clone(), Freshness::default(), async {
                Ok(value("platform"))
            })
            .await
            .unwrap();
        assert!(cache.get(&key).is_some());
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(cache.get(&key).is_none());
        cache.run_pending_tasks();
        assert_eq!(cache.stats().snapshot().evictions, 1);
    }

    #[test]
    fn debug_hides_plaintext() {
        let shown = format!("{:?}", value("platform"));
        assert!(shown.contains("redacted"), "{shown}");
        assert!(!shown.contains("[1, 1"), "{shown}");
    }
}
