//! The DEK cache: unwrapped keys in memory so KMS latency and quota are paid
//! once per wrapped key per TTL, not once per read (DESIGN.md section 4).
//!
//! Keyed by (tenant, SHA-256 of the wrapped key bytes, SHA-256 of the canonical
//! context): an entry exists only if exactly those bytes were parsed, matched
//! to that tenant and decrypted under that context, which is what lets a hit
//! skip parsing. Values are `Arc`s, so a hit copies a pointer, not key bytes.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::future::Cache;
use moka::notification::RemovalCause;

use crate::kms::ProviderKind;
use crate::secret::SecretBytes;

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    tenant_id: Box<str>,
    wrapped_digest: [u8; 32],
    context_digest: [u8; 32],
}

impl CacheKey {
    pub fn new(tenant_id: &str, wrapped_digest: [u8; 32], context_digest: [u8; 32]) -> Self {
        Self {
            tenant_id: tenant_id.into(),
            wrapped_digest,
            context_digest,
        }
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Digest prefixes only: enough to correlate, nothing to replay.
        write!(
            f,
            "CacheKey({}, {})",
            self.tenant_id,
            hex::encode(&self.wrapped_digest[..4])
        )
    }
}

/// An unwrapped DEK and what protected it.
pub struct CachedKey {
    pub plaintext: SecretBytes,
    pub key_binding: Arc<str>,
    pub provider: ProviderKind,
    pub key_version: Box<str>,
}

impl fmt::Debug for CachedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedKey")
            .field("plaintext", &self.plaintext)
            .field("key_binding", &self.key_binding)
            .field("provider", &self.provider)
            .field("key_version", &self.key_version)
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub max_entries: u64,
    /// Lifetime of an entry since its unwrap.
    pub ttl: Duration,
    /// An entry unused this long is dropped before its TTL.
    pub tti: Duration,
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
    entries: Cache<CacheKey, Arc<CachedKey>>,
    stats: Arc<CacheStats>,
}

impl fmt::Debug for DekCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DekCache")
            .field("entries", &self.entries.entry_count())
            .field("stats", &self.stats.snapshot())
            .finish()
    }
}

impl DekCache {
    pub fn new(settings: CacheSettings) -> Self {
        let stats = Arc::new(CacheStats::default());
        let listener_stats = Arc::clone(&stats);
        let entries = Cache::builder()
            .max_capacity(settings.max_entries)
            .time_to_live(settings.ttl)
            .time_to_idle(settings.tti)
            .support_invalidation_closures()
            .eviction_listener(move |_key, _value, cause| {
                if matches!(cause, RemovalCause::Expired | RemovalCause::Size) {
                    listener_stats.evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Self { entries, stats }
    }

    pub fn stats(&self) -> &Arc<CacheStats> {
        &self.stats
    }

    /// The cached key, if present; counts a hit. A miss is counted by
    /// [`get_or_load`](Self::get_or_load), which callers use next.
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<CachedKey>> {
        let found = self.entries.get(key).await;
        if found.is_some() {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// The cached key, or the result of `load` stored under `key`. Concurrent
    /// callers for the same key share one `load`; a failed load is not cached,
    /// so the next request tries again.
    pub async fn get_or_load<E, F>(&self, key: CacheKey, load: F) -> Result<Arc<CachedKey>, Arc<E>>
    where
        F: Future<Output = Result<Arc<CachedKey>, E>>,
        E: Send + Sync + 'static,
    {
        let entry = self.entries.entry(key).or_try_insert_with(load).await;
        match &entry {
            Ok(e) if e.is_fresh() => self.stats.misses.fetch_add(1, Ordering::Relaxed),
            Ok(_) => self.stats.hits.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.load_failures.fetch_add(1, Ordering::Relaxed),
        };
        entry.map(|e| e.into_value())
    }

    /// Drops every entry of a tenant. Takes effect at once for readers (moka
    /// checks pending invalidations on every lookup); memory is freed lazily.
    pub fn purge_tenant(&self, tenant_id: &str) {
        let tenant: Box<str> = tenant_id.into();
        self.invalidate(move |k, _| k.tenant_id == tenant);
    }

    /// Drops every entry unwrapped with one key binding of a tenant.
    pub fn purge_binding(&self, tenant_id: &str, binding: &str) {
        let tenant: Box<str> = tenant_id.into();
        let binding: Arc<str> = binding.into();
        self.invalidate(move |k, v| k.tenant_id == tenant && v.key_binding == binding);
    }

    pub fn purge_all(&self) {
        self.entries.invalidate_all();
    }

    fn invalidate(
        &self,
        predicate: impl Fn(&CacheKey, &Arc<CachedKey>) -> bool + Send + Sync + 'static,
    ) {
        if let Err(err) = self.entries.invalidate_entries_if(predicate) {
            // Only possible without `support_invalidation_closures`, set above.
            // Fail safe: drop everything rather than keep a purged key.
            tracing::error!(error = %err, "cache predicate purge failed; purging all entries");
            self.entries.invalidate_all();
        }
    }

    /// Approximate entry count (moka counts lazily).
    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Applies pending maintenance (expiry, purges) now: for tests and metrics.
    pub async fn run_pending_tasks(&self) {
        self.entries.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn value(binding: &str) -> Arc<CachedKey> {
        Arc::new(CachedKey {
            plaintext: SecretBytes::new(vec![1; 32]),
            key_binding: binding.into(),
            provider: ProviderKind::Local,
            key_version: "1".into(),
        })
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
        let key = CacheKey::new("t", [1; 32], [2; 32]);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, loads, key) = (cache.clone(), loads.clone(), key.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_load::<(), _>(key, async {
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
    async fn failures_are_not_cached() {
        let cache = DekCache::new(settings(60_000));
        let key = CacheKey::new("t", [1; 32], [2; 32]);
        let err = cache
            .get_or_load(key.clone(), async { Err::<Arc<CachedKey>, _>("down") })
            .await;
        assert!(err.is_err());
        assert!(cache.get(&key).await.is_none());
        cache
            .get_or_load::<(), _>(key.clone(), async { Ok(value("platform")) })
            .await
            .unwrap();
        assert!(cache.get(&key).await.is_some());
        assert_eq!(cache.stats().snapshot().load_failures, 1);
    }

    #[tokio::test]
    async fn purge_by_tenant_and_binding() {
        let cache = DekCache::new(settings(60_000));
        let a1 = CacheKey::new("a", [1; 32], [0; 32]);
        let a2 = CacheKey::new("a", [2; 32], [0; 32]);
        let b1 = CacheKey::new("b", [1; 32], [0; 32]);
        for (k, binding) in [(&a1, "k1"), (&a2, "k2"), (&b1, "k1")] {
            cache
                .get_or_load::<(), _>(k.clone(), async { Ok(value(binding)) })
                .await
                .unwrap();
        }
        cache.purge_binding("a", "k1");
        assert!(cache.get(&a1).await.is_none());
        assert!(cache.get(&a2).await.is_some());
        assert!(cache.get(&b1).await.is_some());
        cache.purge_tenant("a");
        assert!(cache.get(&a2).await.is_none());
        assert!(cache.get(&b1).await.is_some());
    }

    #[tokio::test]
    async fn entries_expire_after_ttl() {
        let cache = DekCache::new(settings(200));
        let key = CacheKey::new("t", [1; 32], [2; 32]);
        cache
            .get_or_load::<(), _>(key.clone(), async { Ok(value("platform")) })
            .await
            .unwrap();
        assert!(cache.get(&key).await.is_some());
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(cache.get(&key).await.is_none());
        cache.run_pending_tasks().await;
        assert_eq!(cache.stats().snapshot().evictions, 1);
    }

    #[test]
    fn debug_hides_plaintext() {
        let shown = format!("{:?}", value("platform"));
        assert!(shown.contains("redacted"), "{shown}");
        assert!(!shown.contains("[1, 1"), "{shown}");
    }
}
