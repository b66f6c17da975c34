//! The DEK cache: unwrapped keys in memory so KMS latency and quota are paid
//! once per wrapped key per TTL, not once per read (DESIGN.md section 4).
//!
//! A moka cache (TTL, TTI, a byte bound by weight, single-flight loads)
//! keyed by one BLAKE3 digest of (tenant, wrapped key bytes, canonical
//! context) and the tenant view's freshness: an entry exists only if
//! exactly those bytes were parsed, matched to that tenant and decrypted
//! under that context, which is what lets a hit skip parsing. Values are
//! `Arc`s, so a hit copies a pointer, not key bytes. Tenant keys (the
//! hierarchy's middle layer) live here too, under their own context.

mod entry;
mod key;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::Duration;

pub use entry::{CachedKey, Freshness, KeyOrigin, plaintext_bytes};
pub use key::CacheKey;
use key::{DigestHasher, tenant_tag};
use moka::notification::RemovalCause;

use crate::kms::ProviderKind;

/// The weight of a cached key of 32 bytes or fewer, in bytes: what one
/// entry adds to the process (the key and value moka holds, the entry's
/// allocation, moka's bookkeeping), as measured by `keybroker-bench memory`
/// (457 to 505 bytes, BENCHMARKS.md), rounded up. Longer keys weigh their
/// extra bytes too.
const ENTRY_WEIGHT: u64 = 512;

fn weight(value: &CachedKey) -> u32 {
    let extra = value.plaintext().len().saturating_sub(entry::INLINE) as u64;
    u32::try_from(ENTRY_WEIGHT + extra).unwrap_or(u32::MAX)
}

/// `64MiB`, `512KiB`, `1GB` or a plain number of bytes.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size: use e.g. 64MiB, 512KiB or 1000000"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit '{other}': use B, KiB, MiB, GiB, KB, MB or GB"
            ));
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("'{text}' is too large"))
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
    /// Most bytes of unwrapped keys (and their bookkeeping) held in memory,
    /// e.g. 64MiB: the bound for keys larger than 32 bytes.
    #[arg(
        id = "cache_max_bytes",
        long = "cache-max-bytes",
        env = "KEYBROKER_CACHE_MAX_BYTES",
        value_parser = parse_bytes,
        default_value = "64MiB"
    )]
    pub max_bytes: u64,
    /// The share of the cache one tenant may fill, in percent: past it, a
    /// tenant's further keys are served without being cached, so one tenant
    /// unwrapping many keys cannot push the others' keys out.
    #[arg(
        id = "cache_tenant_share",
        long = "cache-tenant-share",
        env = "KEYBROKER_CACHE_TENANT_SHARE",
        value_parser = clap::value_parser!(u8).range(1..=100),
        default_value = "25"
    )]
    pub tenant_share: u8,
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
        if self.max_bytes < ENTRY_WEIGHT {
            return invalid(
                "cache_max_bytes",
                &format!("must hold one key at least ({ENTRY_WEIGHT} bytes)"),
            );
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
    /// Keys served without being cached: their tenant held its share.
    pub over_share: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStatsSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub load_failures: u64,
    pub evictions: u64,
    pub over_share: u64,
}

impl CacheStats {
    pub fn snapshot(&self) -> CacheStatsSnapshot {
        CacheStatsSnapshot {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            load_failures: self.load_failures.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            over_share: self.over_share.load(Ordering::Relaxed),
        }
    }
}

#[derive(Clone)]
pub struct DekCache {
    inner: Arc<Inner>,
}

struct Inner {
    entries: moka::future::Cache<CacheKey, Arc<CachedKey>, DigestHasher>,
    stats: Arc<CacheStats>,
    /// Interned origins; taken on the miss path only. Entries no cached key
    /// uses any more are dropped when the set doubles.
    origins: Mutex<Origins>,
    /// Purge generations (see [`Freshness`]): a tenant's is `global` plus
    /// its own count. Read when a tenant view is built, never on a hit.
    generations: Mutex<Generations>,
    /// Weight each tenant (by tag) holds, and the most it may: added when a
    /// key is loaded or inserted, taken off when moka lets it go.
    shares: Arc<Shares>,
}

#[derive(Debug, Default)]
struct Shares {
    held: Mutex<HashMap<u64, u64>>,
    limit: u64,
}

impl Shares {
    fn full(&self, tag: u64) -> bool {
        let held = self.held.lock();
        held.get(&tag).is_some_and(|held| *held >= self.limit)
    }

    fn add(&self, tag: u64, weight: u32) {
        let mut held = self.held.lock();
        *held.entry(tag).or_default() += u64::from(weight);
    }

    fn release(&self, tag: u64, weight: u32) {
        let mut held = self.held.lock();
        if let Some(now) = held.get_mut(&tag) {
            *now = now.saturating_sub(u64::from(weight));
            if *now == 0 {
                held.remove(&tag);
            }
        }
    }
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
        let stats = Arc::new(CacheStats::default());
        // Both bounds as one weight: `max_entries` keys of 32 bytes, or
        // `max_bytes`, whichever is less.
        let capacity = settings
            .max_bytes
            .min(settings.max_entries.saturating_mul(ENTRY_WEIGHT));
        let shares = Arc::new(Shares {
            held: Mutex::default(),
            limit: (capacity / 100)
                .saturating_mul(u64::from(settings.tenant_share))
                .max(ENTRY_WEIGHT),
        });
        let (counted, released) = (Arc::clone(&stats), Arc::clone(&shares));
        let entries = moka::future::Cache::builder()
            .max_capacity(capacity)
            .weigher(|_, value: &Arc<CachedKey>| weight(value))
            .time_to_live(settings.ttl)
            .time_to_idle(settings.tti)
            .eviction_listener(move |key: Arc<CacheKey>, value: Arc<CachedKey>, cause| {
                released.release(key.tenant_tag, weight(&value));
                if matches!(cause, RemovalCause::Expired | RemovalCause::Size) {
                    counted.evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build_with_hasher(DigestHasher::random());
        Self {
            inner: Arc::new(Inner {
                entries,
                stats,
                origins: Mutex::default(),
                generations: Mutex::default(),
                shares,
            }),
        }
    }

    /// The tenant's purge generation now: stamped on the keys loaded under
    /// a view built after this call.
    pub fn generation(&self, tenant_id: &str) -> u64 {
        let generations = self.inner.generations.lock();
        generations.global
            + generations
                .by_tenant
                .get(&tenant_tag(tenant_id))
                .copied()
                .unwrap_or(0)
    }

    /// Moves a tenant's generation on (before its entries are removed, so a
    /// load racing the purge lands under a key no later view looks up).
    fn bump(&self, tenant_id: Option<&str>) {
        let mut generations = self.inner.generations.lock();
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
        let mut origins = self.inner.origins.lock();
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

    /// The key cached under `key` for the view `fresh`, if any; counts a
    /// hit. A miss is counted by [`get_or_load`](Self::get_or_load), which
    /// callers use next. Never waits: moka's lookup only records the read
    /// (its maintenance runs behind a lock it only tries), and a lookup that
    /// could not finish at once is a miss.
    pub fn get(&self, key: CacheKey, fresh: Freshness) -> Option<Arc<CachedKey>> {
        let key = key.under(fresh);
        let found = futures::FutureExt::now_or_never(self.inner.entries.get(&key)).flatten();
        if found.is_some() {
            self.inner.stats.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// The cached key, or the result of `load` stored under `key` for the
    /// view `fresh`. Concurrent callers for the same key and view share one
    /// `load` (moka's `try_get_with`; a cancelled loader hands over to a
    /// waiter); a failed load is not cached, so the next request tries
    /// again. A tenant holding its share is served `load`'s key uncached.
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
        let key = key.under(fresh);
        let stats = &self.inner.stats;
        if let Some(found) = self.inner.entries.get(&key).await {
            stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(found);
        }
        let tag = key.tenant_tag;
        if self.inner.shares.full(tag) {
            stats.over_share.fetch_add(1, Ordering::Relaxed);
            stats.misses.fetch_add(1, Ordering::Relaxed);
            return load.await.map_err(|err| {
                stats.load_failures.fetch_add(1, Ordering::Relaxed);
                Arc::new(err)
            });
        }
        let loaded = std::sync::atomic::AtomicBool::new(false);
        let result = self
            .inner
            .entries
            .try_get_with(key, async {
                let value = load.await?;
                // Counted before moka holds it: its listener takes the same
                // weight off when it lets the entry go.
                self.inner.shares.add(tag, weight(&value));
                loaded.store(true, Ordering::Relaxed);
                Ok(value)
            })
            .await;
        // A load that lands after a purge of its tenant stays under its
        // old freshness: served to the views that predate the purge (as the
        // callers that asked before it were), never to a later one, and
        // freed by its TTI.
        let loaded = loaded.load(Ordering::Relaxed);
        let counter = match (&result, loaded) {
            (Ok(_), true) => &stats.misses,
            (Ok(_), false) => &stats.hits,
            (Err(_), _) => &stats.load_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    /// Stores a key the caller just made (a minted tenant key) for the view
    /// `fresh`: no lookup happened, so neither a hit nor a miss is counted.
    pub async fn insert(&self, key: CacheKey, fresh: Freshness, value: Arc<CachedKey>) {
        let key = key.under(fresh);
        if self.inner.shares.full(key.tenant_tag) {
            return;
        }
        self.inner.shares.add(key.tenant_tag, weight(&value));
        self.inner.entries.insert(key, value).await;
    }

    /// Drops every entry of a tenant at once (their plaintext is zeroized
    /// as soon as no answer in flight still holds it); a load of the tenant
    /// under way lands under a key no later view looks up.
    pub async fn purge_tenant(&self, tenant_id: &str) {
        self.bump(Some(tenant_id));
        let tag = tenant_tag(tenant_id);
        self.remove_if(|k, _| k.tenant_tag == tag).await;
    }

    /// Drops every entry unwrapped with one key binding of a tenant; every
    /// load of the tenant under way lands stale.
    pub async fn purge_binding(&self, tenant_id: &str, binding: &str) {
        self.bump(Some(tenant_id));
        let tag = tenant_tag(tenant_id);
        self.remove_if(|k, v| k.tenant_tag == tag && &*v.origin.key_binding == binding)
            .await;
    }

    /// Drops everything; every load under way lands stale.
    pub async fn purge_all(&self) {
        self.bump(None);
        self.remove_if(|_, _| true).await;
    }

    /// Removes what `purge` selects now, not at moka's next maintenance:
    /// a purge is a revocation or a deletion, and the plaintext goes with
    /// it. A scan of the cache; purges are admin events, not requests.
    async fn remove_if(&self, purge: impl Fn(&CacheKey, &CachedKey) -> bool) {
        let doomed: Vec<Arc<CacheKey>> = self
            .inner
            .entries
            .iter()
            .filter(|(key, value)| purge(key, value))
            .map(|(key, _)| key)
            .collect();
        for key in doomed {
            self.inner.entries.invalidate(&*key).await;
        }
        // moka's pending removals still hold the values until it applies
        // them.
        self.inner.entries.run_pending_tasks().await;
    }

    /// Entries held (as of moka's last maintenance).
    pub fn entry_count(&self) -> u64 {
        self.inner.entries.entry_count()
    }

    /// Bytes held by weight (as of moka's last maintenance).
    pub fn weighted_size(&self) -> u64 {
        self.inner.entries.weighted_size()
    }

    /// Runs moka's maintenance now: frees expired and purged entries (the
    /// server calls it on a timer, the metrics scrape before counting).
    pub async fn run_pending_tasks(&self) {
        self.inner.entries.run_pending_tasks().await;
    }
}

#[async_trait::async_trait]
impl crate::metrics::CacheSource for DekCache {
    fn counts(&self) -> [u64; 5] {
        let s = self.stats().snapshot();
        [s.hits, s.misses, s.load_failures, s.evictions, s.over_share]
    }

    fn entries(&self) -> u64 {
        self.entry_count()
    }

    async fn settle(&self) {
        self.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests;
