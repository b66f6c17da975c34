//! The hit path's copy of the tenant views. Every data-plane request looks
//! up its tenant's view; moka's lookup also records the read for its
//! eviction policy (a channel push per get), which at one lookup per RPC was
//! a measurable share of a cached unwrap. This map is a read lock and a
//! probe. moka stays the source (single-flight loads, capacity); a view
//! enters here only right after a load, with the same TTL, so nothing
//! lives here longer than it would in moka.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::keys::TenantKeys;

/// Views kept at most (moka's capacity for the same views).
const CAPACITY: usize = 100_000;

#[derive(Debug)]
pub(super) struct ViewMemo {
    /// Read-locked on every request, write-locked on loads and changes.
    views: RwLock<HashMap<Box<str>, Memo>>,
    ttl: Duration,
}

#[derive(Debug)]
struct Memo {
    keys: Arc<TenantKeys>,
    expires: Instant,
}

impl ViewMemo {
    pub(super) fn new(ttl: Duration) -> Self {
        Self {
            views: RwLock::default(),
            ttl,
        }
    }

    /// [`get_at`](Self::get_at) now.
    #[cfg(test)]
    pub(super) fn get(&self, tenant_id: &str) -> Option<Arc<TenantKeys>> {
        self.get_at(tenant_id, Instant::now())
    }

    /// The tenant's view, if one was loaded within the TTL before `now`
    /// (the caller's clock reading) and not changed since.
    pub(super) fn get_at(&self, tenant_id: &str, now: Instant) -> Option<Arc<TenantKeys>> {
        let views = self.views.read().unwrap_or_else(|p| p.into_inner());
        let memo = views.get(tenant_id)?;
        (now < memo.expires).then(|| Arc::clone(&memo.keys))
    }

    /// Keeps a view just loaded, unless a change was applied since the load
    /// began (`generation` moved from `loaded_at`): changes bump the
    /// generation before they forget views, and this check runs under the
    /// same lock, so a view that predates a change never lands here.
    pub(super) fn put(
        &self,
        tenant_id: &str,
        keys: &Arc<TenantKeys>,
        generation: &AtomicU64,
        loaded_at: u64,
    ) {
        let mut views = self.views.write().unwrap_or_else(|p| p.into_inner());
        if generation.load(Ordering::SeqCst) != loaded_at {
            return;
        }
        let now = Instant::now();
        if views.len() >= CAPACITY {
            views.retain(|_, memo| now < memo.expires);
            if views.len() >= CAPACITY {
                views.clear();
            }
        }
        views.insert(
            tenant_id.into(),
            Memo {
                keys: Arc::clone(keys),
                expires: now + self.ttl,
            },
        );
    }

    pub(super) fn forget(&self, tenant_id: &str) {
        self.views
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant_id);
    }

    pub(super) fn forget_all(&self) {
        self.views
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
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

    #[test]
    fn a_view_loaded_across_a_change_is_not_kept() {
        let memo = ViewMemo::new(Duration::from_secs(60));
        let generation = AtomicU64::new(7);
        let view = keys();
        // The load began at 6; a change (7) came before it landed.
        memo.put("acme", &view, &generation, 6);
        assert!(memo.get("acme").is_none());
        memo.put("acme", &view, &generation, 7);
        assert!(Arc::ptr_eq(&memo.get("acme").unwrap(), &view));
        assert!(memo.get("other").is_none());
        memo.forget("acme");
        assert!(memo.get("acme").is_none());
        memo.put("acme", &view, &generation, 7);
        memo.forget_all();
        assert!(memo.get("acme").is_none());
    }

    #[test]
    fn a_view_is_kept_no_longer_than_the_ttl() {
        let memo = ViewMemo::new(Duration::from_millis(50));
        let generation = AtomicU64::new(0);
        memo.put("acme", &keys(), &generation, 0);
        assert!(memo.get("acme").is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert!(memo.get("acme").is_none());
    }
}
