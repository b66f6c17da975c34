//! Tests of `cache/mod.rs`.

use super::*;
use crate::context::Context;
use crate::secret::SecretBytes;
use std::sync::atomic::AtomicUsize;

fn origin(binding: &str) -> Arc<KeyOrigin> {
    Arc::new(KeyOrigin {
        key_binding: binding.into(),
        link_id: 0,
        provider: ProviderKind::Local,
        key_version: "1".into(),
        tenant_key_version: 0,
    })
}

fn value(binding: &str) -> Arc<CachedKey> {
    CachedKey::new(
        &SecretBytes::new(vec![1; 32]),
        origin(binding),
        Freshness::default(),
    )
}

fn settings(ttl_ms: u64) -> CacheSettings {
    CacheSettings {
        ttl: Duration::from_millis(ttl_ms),
        tti: Duration::from_millis(ttl_ms),
        ..CacheSettings::default()
    }
}

const FRESH: Freshness = Freshness {
    generation: 0,
    incarnation: 0,
};

async fn load_as(cache: &DekCache, key: &CacheKey, plaintext: Vec<u8>) -> Arc<CachedKey> {
    cache
        .get_or_load::<(), _>(key.clone(), FRESH, async {
            Ok(CachedKey::new(
                &SecretBytes::new(plaintext),
                origin("b"),
                FRESH,
            ))
        })
        .await
        .unwrap()
}

#[test]
fn sizes_parse_with_units_and_bad_ones_say_how() {
    assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
    assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
    assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
    assert_eq!(parse_bytes("4096"), Ok(4096));
    assert!(parse_bytes("lots").unwrap_err().contains("64MiB"));
    assert!(parse_bytes("5 parsecs").unwrap_err().contains("unit"));
    assert!(
        parse_bytes("99999999999999GiB")
            .unwrap_err()
            .contains("too large")
    );
    let small = CacheSettings {
        max_bytes: 10,
        ..CacheSettings::default()
    };
    assert!(small.validate().is_err());
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
                    .get_or_load::<(), _>(key, FRESH, async {
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

/// The single-flight bug of the hand-written cache (a13fc42) as a test:
/// a loader cancelled mid-load must hand over to a waiter, which loads
/// and is answered, and leave nothing behind that blocks later loads.
#[tokio::test]
async fn a_cancelled_load_hands_over_to_a_waiter() {
    let cache = DekCache::new(settings(60_000));
    let key = CacheKey::new("t", &[3; 32], &Context::default());
    let alone = cache.get_or_load::<(), _>(key.clone(), FRESH, std::future::pending());
    assert!(
        tokio::time::timeout(Duration::from_millis(20), alone)
            .await
            .is_err()
    );
    let (c, k) = (cache.clone(), key.clone());
    let stuck = tokio::spawn(async move {
        c.get_or_load::<(), _>(k, FRESH, std::future::pending())
            .await
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (c, k) = (cache.clone(), key.clone());
    let waiter = tokio::spawn(async move {
        c.get_or_load::<(), _>(k, FRESH, async { Ok(value("platform")) })
            .await
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    stuck.abort();
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter was left waiting on a cancelled load")
        .unwrap()
        .unwrap();
    assert_eq!(got.plaintext(), [1; 32].as_slice());
    assert!(cache.get(key, FRESH).is_some());
    assert_eq!(cache.stats().snapshot().misses, 1);
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
                origin("b"),
                before,
            ))
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    cache.purge_tenant("t").await;
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
                origin("b"),
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
                origin("b"),
                reborn,
            ))
        })
        .await
        .unwrap();
    assert_eq!(got.plaintext(), [3; 32].as_slice());
    // Other tenants' generations did not move.
    assert_eq!(cache.generation("u"), 0);
    cache.purge_all().await;
    assert_eq!(cache.generation("u"), 1);
}

#[tokio::test]
async fn failures_are_not_cached() {
    let cache = DekCache::new(settings(60_000));
    let key = CacheKey::new("t", &[1; 32], &Context::default());
    let err = cache
        .get_or_load(key.clone(), FRESH, async {
            Err::<Arc<CachedKey>, _>("down")
        })
        .await;
    assert!(err.is_err());
    assert!(cache.get(key.clone(), FRESH).is_none());
    load_as(&cache, &key, vec![1; 32]).await;
    assert!(cache.get(key, FRESH).is_some());
    assert_eq!(cache.stats().snapshot().load_failures, 1);
}

#[tokio::test]
async fn purge_by_tenant_and_binding_frees_the_entries() {
    let cache = DekCache::new(settings(60_000));
    let a1 = CacheKey::new("a", &[1; 32], &Context::default());
    let a2 = CacheKey::new("a", &[2; 32], &Context::default());
    let b1 = CacheKey::new("b", &[1; 32], &Context::default());
    let mut held = Vec::new();
    for (k, binding) in [(&a1, "k1"), (&a2, "k2"), (&b1, "k1")] {
        let got = cache
            .get_or_load::<(), _>(k.clone(), FRESH, async { Ok(value(binding)) })
            .await
            .unwrap();
        held.push(Arc::downgrade(&got));
    }
    let fresh = |t: &str| Freshness {
        generation: cache.generation(t),
        incarnation: 0,
    };
    cache.purge_binding("a", "k1").await;
    // a1's plaintext is gone from memory, not merely out of reach.
    assert!(held[0].upgrade().is_none(), "a purged key is still held");
    assert!(held[1].upgrade().is_some());
    assert!(cache.get(b1.clone(), fresh("b")).is_some());
    cache.purge_tenant("a").await;
    assert!(held[1].upgrade().is_none());
    assert!(cache.get(b1, fresh("b")).is_some());
    assert_eq!(cache.entry_count(), 1);
}

#[tokio::test]
async fn entries_expire_after_ttl() {
    let cache = DekCache::new(settings(200));
    let key = CacheKey::new("t", &[1; 32], &Context::default());
    load_as(&cache, &key, vec![1; 32]).await;
    assert!(cache.get(key.clone(), FRESH).is_some());
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(cache.get(key, FRESH).is_none());
    cache.run_pending_tasks().await;
    assert_eq!(cache.stats().snapshot().evictions, 1);
    assert_eq!(cache.entry_count(), 0);
}

/// 4 KiB keys are bounded by bytes, not by the entry count.
#[tokio::test]
async fn large_keys_are_bounded_by_bytes() {
    let cache = DekCache::new(CacheSettings {
        max_bytes: 1 << 20,
        tenant_share: 100,
        ..settings(60_000)
    });
    for n in 0..1000u32 {
        let key = CacheKey::new("t", &n.to_be_bytes(), &Context::default());
        load_as(&cache, &key, vec![9; 4096]).await;
    }
    cache.run_pending_tasks().await;
    assert!(
        cache.weighted_size() <= 1 << 20,
        "{}",
        cache.weighted_size()
    );
    // About 1 MiB / (4 KiB + bookkeeping), never the 1,000 loaded.
    assert!(cache.entry_count() <= 256, "{}", cache.entry_count());
}

/// One tenant unwrapping many distinct keys fills its share, then is
/// served uncached: another tenant's keys stay cached.
#[tokio::test]
async fn one_tenant_cannot_push_the_others_out() {
    let cache = DekCache::new(CacheSettings {
        max_entries: 1000,
        tenant_share: 25,
        ..settings(60_000)
    });
    let quiet: Vec<_> = (0..100u32)
        .map(|n| CacheKey::new("quiet", &n.to_be_bytes(), &Context::default()))
        .collect();
    for key in &quiet {
        load_as(&cache, key, vec![1; 32]).await;
    }
    for n in 0..20_000u32 {
        let key = CacheKey::new("flood", &n.to_be_bytes(), &Context::default());
        load_as(&cache, &key, vec![2; 32]).await;
        if n % 1000 == 0 {
            cache.run_pending_tasks().await;
        }
    }
    cache.run_pending_tasks().await;
    let kept = quiet
        .iter()
        .filter(|k| cache.get((*k).clone(), FRESH).is_some())
        .count();
    assert_eq!(kept, quiet.len(), "the flood evicted another tenant's keys");
    let s = cache.stats().snapshot();
    assert!(s.over_share > 19_000, "{s:?}");
    assert!(
        cache.entry_count() <= 100 + 250 + 1,
        "{}",
        cache.entry_count()
    );
}
