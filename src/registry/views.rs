//! Tenant views in memory: one moka cache, kept through a registry outage.
//!
//! A view is fresh for `registry_cache_ttl` after its load began. Past that
//! it is refreshed by one caller per tenant (with a deadline well under a
//! second), while the others keep the view they have. When the refresh fails
//! because the registry does not answer, the view keeps serving
//! (stale-while-error) until `registry_cache_ttl + registry_outage_grace`
//! after its load: while the registry is down no admin change can be
//! committed, and a replica cut off from a registry that others still reach
//! misses their changes for at most that long (docs/operations.md). A change
//! this replica applies (its own, or one the change feed brings) drops the
//! view at once: it is never served stale.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use crate::keys::{DirectoryError, TenantKeys};

/// Views kept at most.
const CAPACITY: u64 = 100_000;

/// After a refresh failed, the next try comes no sooner than this (or the
/// TTL, if shorter).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How views are kept and refreshed (from the `registry_*` settings).
#[derive(Debug, Clone, Copy)]
pub struct ViewSettings {
    /// Fresh this long after a load began.
    pub ttl: Duration,
    /// Served this much longer while the registry does not answer.
    pub outage_grace: Duration,
    /// A view load on the request path gives up after this long.
    pub read_timeout: Duration,
    /// A registry write on the request path (minting a tenant key version,
    /// registering a tenant on its first wrap) gives up after this long.
    pub write_timeout: Duration,
}

#[derive(Debug)]
struct View {
    keys: Arc<TenantKeys>,
    /// The change generation the load began at.
    generation: u64,
    /// When the load began: freshness and grace count from here.
    loaded: Instant,
}

pub(super) struct Views {
    /// Keyed by tenant id through foldhash, seeded per process: a few times
    /// cheaper than SipHash on every request, and colliding ids cannot be
    /// worked out ahead of time (ids are checked text, at most 128 bytes;
    /// at most `CAPACITY` views).
    map: moka::future::Cache<String, Arc<View>, foldhash::fast::RandomState>,
    settings: ViewSettings,
    /// Bumped by every applied change. A view loaded across a change may
    /// predate it; moka does not cancel in-flight loads on invalidate, so a
    /// view whose load began before the current generation is dropped right
    /// after it lands.
    generation: AtomicU64,
    /// Views whose load began before this generation are refreshed before
    /// they are trusted (the change feed was lost: changes may have been
    /// missed), and meanwhile serve only as stale views do.
    trusted_from: AtomicU64,
    /// Tenants whose stale view one caller is refreshing now.
    refreshing: Mutex<HashSet<Box<str>>>,
    /// After a failed refresh: no caller of the tenant tries again before
    /// this (each try would wait out the read deadline); until then its view
    /// serves as is. Emptied as refreshes succeed.
    retry_at: Mutex<HashMap<Box<str>, Instant>>,
    /// Since when refreshes fail for want of a registry (None: they work).
    outage: Mutex<Option<Instant>>,
    /// Requests answered from a view past its TTL because the registry did
    /// not answer.
    pub(super) stale_serves: AtomicU64,
}

impl std::fmt::Debug for Views {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Views")
            .field("entries", &self.map.entry_count())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Views {
    pub(super) fn new(settings: ViewSettings) -> Self {
        Self {
            map: moka::future::Cache::builder()
                .max_capacity(CAPACITY)
                .build_with_hasher(foldhash::fast::RandomState::default()),
            settings,
            generation: AtomicU64::new(0),
            trusted_from: AtomicU64::new(0),
            refreshing: Mutex::default(),
            retry_at: Mutex::default(),
            outage: Mutex::default(),
            stale_serves: AtomicU64::new(0),
        }
    }

    fn fresh(&self, view: &View, now: Instant) -> bool {
        now < view.loaded + self.settings.ttl
            && view.generation >= self.trusted_from.load(Ordering::SeqCst)
    }

    /// The tenant's view if a fresh one is in memory (never a load, never a
    /// wait: moka's lookup only records the read).
    pub(super) fn fresh_at(&self, tenant_id: &str, now: Instant) -> Option<Arc<TenantKeys>> {
        let view = futures::FutureExt::now_or_never(self.map.get(tenant_id)).flatten()?;
        self.fresh(&view, now).then(|| Arc::clone(&view.keys))
    }

    /// The tenant's view: fresh from memory; else refreshed by this caller
    /// (or, while another caller refreshes it, the stale one); else loaded by
    /// one caller for all. `load` reads the registry.
    pub(super) async fn get<F, Fut>(
        &self,
        tenant_id: &str,
        load: F,
    ) -> Result<Arc<TenantKeys>, DirectoryError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Arc<TenantKeys>, DirectoryError>>,
    {
        let now = Instant::now();
        let found = self.map.get(tenant_id).await;
        match found {
            Some(view) if self.fresh(&view, now) => Ok(Arc::clone(&view.keys)),
            Some(stale) if now < stale.loaded + self.settings.ttl + self.settings.outage_grace => {
                self.refresh(tenant_id, stale, load).await
            }
            Some(_) => {
                // Past its grace: never served again; loaded as if new.
                self.map.invalidate(tenant_id).await;
                self.load_new(tenant_id, load).await
            }
            None => self.load_new(tenant_id, load).await,
        }
    }

    /// A view past its TTL: refreshed by the first caller, the others keep
    /// it meanwhile; kept through a failed refresh (the registry did not
    /// answer) within its grace.
    async fn refresh<F, Fut>(
        &self,
        tenant_id: &str,
        stale: Arc<View>,
        load: F,
    ) -> Result<Arc<TenantKeys>, DirectoryError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Arc<TenantKeys>, DirectoryError>>,
    {
        if self.backing_off(tenant_id) {
            self.stale_serves.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::clone(&stale.keys));
        }
        let Some(_claim) = Claim::take(self, tenant_id) else {
            return Ok(Arc::clone(&stale.keys));
        };
        match self.load_timed(load).await {
            Ok(view) => {
                self.map
                    .insert(tenant_id.to_owned(), Arc::clone(&view))
                    .await;
                self.drop_if_changed(tenant_id, &view).await;
                Ok(Arc::clone(&view.keys))
            }
            Err(DirectoryError::Unavailable(why)) => {
                self.stale_serves.fetch_add(1, Ordering::Relaxed);
                let since = *self.outage.lock().get_or_insert_with(Instant::now);
                tracing::warn!(
                    tenant = tenant_id,
                    error = %why,
                    outage_seconds = since.elapsed().as_secs(),
                    "the registry did not answer; serving the tenant's keys as last read"
                );
                let retry_at = Instant::now() + self.settings.ttl.min(RETRY_AFTER);
                self.retry_at.lock().insert(tenant_id.into(), retry_at);
                Ok(Arc::clone(&stale.keys))
            }
            Err(err) => Err(err),
        }
    }

    /// No usable view: one load for every concurrent caller.
    async fn load_new<F, Fut>(
        &self,
        tenant_id: &str,
        load: F,
    ) -> Result<Arc<TenantKeys>, DirectoryError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Arc<TenantKeys>, DirectoryError>>,
    {
        let view = self
            .map
            .try_get_with_by_ref(tenant_id, self.load_timed(load))
            .await
            .map_err(|shared| (*shared).clone())?;
        self.drop_if_changed(tenant_id, &view).await;
        Ok(Arc::clone(&view.keys))
    }

    /// One registry read of a view, within the read deadline.
    async fn load_timed<F, Fut>(&self, load: F) -> Result<Arc<View>, DirectoryError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Arc<TenantKeys>, DirectoryError>>,
    {
        let generation = self.generation.load(Ordering::SeqCst);
        let loaded = Instant::now();
        let keys = tokio::time::timeout(self.settings.read_timeout, load())
            .await
            .map_err(|_| {
                DirectoryError::Unavailable(format!(
                    "the key registry did not answer within {:?} (registry_read_timeout); retry shortly",
                    self.settings.read_timeout
                ))
            })??;
        // The registry answered: whatever outage there was is over.
        self.outage.lock().take();
        Ok(Arc::new(View {
            keys,
            generation,
            loaded,
        }))
    }

    /// A view loaded across a change is served to the callers that waited
    /// for it only.
    async fn drop_if_changed(&self, tenant_id: &str, view: &View) {
        if self.generation.load(Ordering::SeqCst) != view.generation {
            self.map.invalidate(tenant_id).await;
        }
    }

    fn backing_off(&self, tenant_id: &str) -> bool {
        let retry_at = self.retry_at.lock();
        retry_at
            .get(tenant_id)
            .is_some_and(|at| Instant::now() < *at)
    }

    /// A change to the tenant was applied: its view goes (after the
    /// generation moves, so a load under way lands stale).
    pub(super) async fn forget(&self, tenant_id: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.map.invalidate(tenant_id).await;
    }

    /// Changes may have been missed (the change feed was lost): every view
    /// is refreshed before it is trusted, and until then serves as a stale
    /// view does — through an outage within its grace.
    pub(super) fn distrust_all(&self) {
        let next = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.trusted_from.store(next, Ordering::SeqCst);
    }

    /// The tenant's view in memory, fresh or not (never a load).
    pub(super) fn peek(&self, tenant_id: &str) -> Option<Arc<TenantKeys>> {
        futures::FutureExt::now_or_never(self.map.get(tenant_id))
            .flatten()
            .map(|view| Arc::clone(&view.keys))
    }

    /// Every view in memory (the watcher's work list while the registry
    /// does not answer).
    pub(super) fn all(&self) -> Vec<(Arc<String>, Arc<TenantKeys>)> {
        self.map
            .iter()
            .map(|(tenant, view)| (tenant, Arc::clone(&view.keys)))
            .collect()
    }

    /// Replaces the tenant's view `seen` by `changed` (same load time and
    /// generation), unless the view was replaced or dropped meanwhile.
    pub(super) async fn amend(&self, tenant_id: &str, seen: &Arc<TenantKeys>, changed: TenantKeys) {
        let changed = Arc::new(changed);
        self.map
            .entry_by_ref(tenant_id)
            .and_compute_with(|entry| {
                let op = match entry {
                    Some(entry) if Arc::ptr_eq(&entry.value().keys, seen) => {
                        let view = entry.into_value();
                        moka::ops::compute::Op::Put(Arc::new(View {
                            keys: changed,
                            generation: view.generation,
                            loaded: view.loaded,
                        }))
                    }
                    _ => moka::ops::compute::Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }

    pub(super) fn settings(&self) -> &ViewSettings {
        &self.settings
    }

    /// Since when the registry has not answered a refresh (None: it has
    /// answered the last one).
    pub(super) fn outage_since(&self) -> Option<Instant> {
        *self.outage.lock()
    }
}

/// One refresher per tenant: held while it refreshes, released on drop (a
/// cancelled refresher lets the next caller refresh).
struct Claim<'a> {
    views: &'a Views,
    tenant_id: &'a str,
}

impl<'a> Claim<'a> {
    fn take(views: &'a Views, tenant_id: &'a str) -> Option<Self> {
        let mut refreshing = views.refreshing.lock();
        // Lazily: a Claim built and dropped here would release another's.
        refreshing
            .insert(tenant_id.into())
            .then(|| Self { views, tenant_id })
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.views.refreshing.lock().remove(self.tenant_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Binding, KeyDirectory as _, PLATFORM_BINDING, PlatformOnly};
    use crate::kms::local::LocalKeyring;
    use crate::secret::SecretBytes;

    fn keys() -> Arc<TenantKeys> {
        let keyring =
            LocalKeyring::from_material("platform", &[SecretBytes::random(32).unwrap()]).unwrap();
        let binding = Arc::new(Binding::active(PLATFORM_BINDING, Arc::new(keyring), "t"));
        PlatformOnly::new(binding)
            .tenant_keys_in_memory("t", Instant::now())
            .unwrap()
    }

    fn views(ttl_ms: u64, grace_ms: u64) -> Views {
        Views::new(ViewSettings {
            ttl: Duration::from_millis(ttl_ms),
            outage_grace: Duration::from_millis(grace_ms),
            read_timeout: Duration::from_millis(100),
            write_timeout: Duration::from_millis(100),
        })
    }

    fn down() -> Result<Arc<TenantKeys>, DirectoryError> {
        Err(DirectoryError::Unavailable("registry down".into()))
    }

    #[tokio::test]
    async fn a_view_is_fresh_for_the_ttl_then_refreshed() {
        let views = views(50, 0);
        let first = keys();
        let got = views
            .get("acme", || async { Ok(Arc::clone(&first)) })
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&got, &first));
        assert!(views.fresh_at("acme", Instant::now()).is_some());
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(views.fresh_at("acme", Instant::now()).is_none());
        let second = keys();
        let got = views
            .get("acme", || async { Ok(Arc::clone(&second)) })
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&got, &second));
    }

    #[tokio::test]
    async fn a_stale_view_serves_through_an_outage_within_its_grace_only() {
        let views = views(50, 300);
        let first = keys();
        views
            .get("acme", || async { Ok(Arc::clone(&first)) })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        // The registry is down: the view as last read, and the outage shows.
        let got = views.get("acme", || async { down() }).await.unwrap();
        assert!(Arc::ptr_eq(&got, &first));
        assert!(views.outage_since().is_some());
        assert_eq!(views.stale_serves.load(Ordering::Relaxed), 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        // A registry that hangs is cut off at the read deadline.
        let started = Instant::now();
        let got = views.get("acme", std::future::pending).await.unwrap();
        assert!(Arc::ptr_eq(&got, &first));
        assert!(started.elapsed() < Duration::from_millis(300));
        // Past TTL + grace: refused, not served.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let err = views.get("acme", || async { down() }).await.unwrap_err();
        assert!(matches!(err, DirectoryError::Unavailable(_)), "{err:?}");
        // A new tenant has nothing to serve during the outage.
        assert!(views.get("new", || async { down() }).await.is_err());
        // The registry answers again: the outage is over.
        views.get("acme", || async { Ok(keys()) }).await.unwrap();
        assert!(views.outage_since().is_none());
    }

    #[tokio::test]
    async fn one_caller_refreshes_while_the_others_keep_the_stale_view() {
        let views = Arc::new(views(30, 60_000));
        let first = keys();
        views
            .get("acme", || async { Ok(Arc::clone(&first)) })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let refresher = {
            let views = Arc::clone(&views);
            tokio::spawn(async move {
                views
                    .get("acme", || async {
                        let _ = released.await;
                        Ok(keys())
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Meanwhile: the stale view at once, and no second load.
        let got = views
            .get("acme", || async { panic!("a second refresh ran") })
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&got, &first));
        release.send(()).unwrap();
        let fresh = refresher.await.unwrap().unwrap();
        assert!(!Arc::ptr_eq(&fresh, &first));
    }

    #[tokio::test]
    async fn a_changed_tenant_is_never_served_stale() {
        let views = views(30, 60_000);
        views.get("acme", || async { Ok(keys()) }).await.unwrap();
        views.forget("acme").await;
        assert!(views.get("acme", || async { down() }).await.is_err());
        // A view loaded across a change is not kept.
        let (views, first) = (self::views(60_000, 60_000), keys());
        let got = views
            .get("acme", || async {
                views.forget("acme").await;
                Ok(Arc::clone(&first))
            })
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&got, &first));
        assert!(views.fresh_at("acme", Instant::now()).is_none());
    }

    #[tokio::test]
    async fn distrusted_views_are_refreshed_before_they_are_trusted() {
        let views = views(200, 60_000);
        let first = keys();
        views
            .get("acme", || async { Ok(Arc::clone(&first)) })
            .await
            .unwrap();
        views.distrust_all();
        assert!(views.fresh_at("acme", Instant::now()).is_none());
        // Registry down: served as a stale view.
        let got = views.get("acme", || async { down() }).await.unwrap();
        assert!(Arc::ptr_eq(&got, &first));
        // Registry back (and the retry backoff, here the TTL, past):
        // refreshed and trusted again.
        tokio::time::sleep(Duration::from_millis(220)).await;
        let second = keys();
        let got = views
            .get("acme", || async { Ok(Arc::clone(&second)) })
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&got, &second));
        assert!(views.fresh_at("acme", Instant::now()).is_some());
    }
}
