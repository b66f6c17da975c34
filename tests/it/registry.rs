//! The same registry suite against both backends: SQLite (a file in a temp
//! dir) and PostgreSQL (the real server scripts/test.sh starts).

use keybroker::keys::{BindingState, KeyHierarchy};
use keybroker::kms::ProviderKind;
use keybroker::registry::sql::SqlRegistry;
use keybroker::registry::{
    CheckClaim, FLEET, KeyPolicy, NewBinding, Registry, RegistryError, Tenant, TenantKeyRecord,
    UsageDelta, VersionUsageRecord,
};

use crate::common::fresh_postgres_database;

fn tenant(id: &str, policy: KeyPolicy) -> Tenant {
    let mut tenant = Tenant::new(id, format!("kb-ext-{id}"), 1_000);
    tenant.key_policy = policy;
    tenant
}

/// Makes `name` the tenant's only primary, in one locked transaction.
async fn set_primary(registry: &dyn Registry, tenant_id: &str, name: &str, now_ms: i64) {
    let mut tx = registry.lock_tenant(tenant_id).await.unwrap().unwrap();
    tx.set_primary(Some(name), now_ms).await.unwrap();
    tx.commit().await.unwrap();
}

/// Removes a binding row (the lifecycle's unlink decides when; here only
/// what the row does).
async fn delete_binding(registry: &dyn Registry, tenant_id: &str, name: &str) {
    let mut tx = registry.lock_tenant(tenant_id).await.unwrap().unwrap();
    tx.delete_binding(name).await.unwrap();
    tx.commit().await.unwrap();
}

fn binding(tenant_id: &str, name: &str, make_primary: bool) -> NewBinding {
    NewBinding {
        tenant_id: tenant_id.into(),
        name: name.into(),
        description: format!("key {name}"),
        provider: ProviderKind::Local,
        key_reference: format!("local:{tenant_id}/{name}"),
        region: String::new(),
        role_arn: String::new(),
        service_account: String::new(),
        replica_regions: vec!["eu-west-1".into(), "us-west-2".into()],
        key_material: Some(vec![1, 2, 3]),
        make_primary,
        canary: None,
    }
}

async fn suite(registry: &dyn Registry) {
    // Tenants.
    registry
        .create_tenant(&tenant("acme", KeyPolicy::Keyring))
        .await
        .unwrap();
    assert_eq!(
        registry
            .create_tenant(&tenant("acme", KeyPolicy::Keyring))
            .await,
        Err(RegistryError::TenantExists("acme".into()))
    );
    let got = registry.tenant("acme").await.unwrap().unwrap();
    assert_eq!(got.external_id, "kb-ext-acme");
    assert_eq!(got.key_policy, KeyPolicy::Keyring);
    assert!(registry.tenant("nobody").await.unwrap().is_none());
    // External ids are unique across tenants.
    let mut clash = tenant("other", KeyPolicy::Keyring);
    clash.external_id = "kb-ext-acme".into();
    assert!(registry.create_tenant(&clash).await.is_err());
    assert!(registry.tenant("other").await.unwrap().is_none());

    // Bindings: the first becomes primary, later ones only when asked.
    let k1 = registry
        .insert_binding(&binding("acme", "k1", false), 2_000)
        .await
        .unwrap();
    assert!(k1.primary);
    assert_eq!(k1.state, BindingState::Active);
    assert_eq!(k1.key_material.as_deref(), Some(&[1u8, 2, 3][..]));
    assert_eq!(k1.replica_regions, vec!["eu-west-1", "us-west-2"]);
    let k2 = registry
        .insert_binding(&binding("acme", "k2", false), 3_000)
        .await
        .unwrap();
    assert!(!k2.primary);
    assert_eq!(
        registry
            .insert_binding(&binding("acme", "k2", false), 3_000)
            .await,
        Err(RegistryError::BindingExists {
            tenant_id: "acme".into(),
            name: "k2".into()
        })
    );
    assert_eq!(
        registry
            .insert_binding(&binding("ghost", "k", false), 3_000)
            .await,
        Err(RegistryError::TenantNotFound("ghost".into()))
    );
    let k3 = registry
        .insert_binding(&binding("acme", "k3", true), 4_000)
        .await
        .unwrap();
    assert!(k3.primary);
    let primaries: Vec<String> = registry
        .bindings("acme")
        .await
        .unwrap()
        .into_iter()
        .filter(|b| b.primary)
        .map(|b| b.name)
        .collect();
    assert_eq!(primaries, vec!["k3".to_string()]);

    // Primary moves, and stays one.
    set_primary(registry, "acme", "k1", 5_000).await;
    registry
        .set_state("acme", "k2", BindingState::Disabled, "ops", 6_000)
        .await
        .unwrap();
    let k2 = registry.binding("acme", "k2").await.unwrap().unwrap();
    assert_eq!(
        (k2.state, k2.state_reason.as_str()),
        (BindingState::Disabled, "ops")
    );
    let all = registry.bindings("acme").await.unwrap();
    assert_eq!(all.iter().filter(|b| b.primary).count(), 1);
    assert!(all.iter().find(|b| b.name == "k1").unwrap().primary);

    // Usage accumulates; last use only moves forward.
    let delta = |wraps, unwraps, at| UsageDelta {
        tenant_id: "acme".into(),
        name: "k1".into(),
        wraps,
        unwraps,
        last_used_at_ms: at,
        versions: vec![VersionUsageRecord {
            key_name: "k1".into(),
            version: "1".into(),
            wraps,
            unwraps,
            last_used_at_ms: at,
        }],
    };
    registry.add_usage(&[delta(2, 5, 9_000)]).await.unwrap();
    registry.add_usage(&[delta(1, 1, 8_000)]).await.unwrap();
    let k1 = registry.binding("acme", "k1").await.unwrap().unwrap();
    assert_eq!(
        (k1.wrap_count, k1.unwrap_count, k1.last_used_at_ms),
        (3, 6, Some(9_000))
    );
    // The same per version; a tenant that does not exist gets no rows.
    let v1 = registry.version_usage("acme").await.unwrap();
    assert_eq!(v1.len(), 1);
    assert_eq!(
        (v1[0].wraps, v1[0].unwraps, v1[0].last_used_at_ms),
        (3, 6, 9_000)
    );
    let mut ghost = delta(1, 1, 1);
    ghost.tenant_id = "ghost".into();
    registry.add_usage(&[ghost]).await.unwrap();
    assert!(registry.version_usage("ghost").await.unwrap().is_empty());

    // Retirements: set, replace, clear; fleet rows beside tenants'.
    registry.set_retirement("acme", "k1", 2, 10).await.unwrap();
    registry.set_retirement("acme", "k1", 3, 11).await.unwrap();
    registry
        .set_retirement(FLEET, "platform", 2, 12)
        .await
        .unwrap();
    let r = registry.retirements("acme").await.unwrap();
    assert_eq!((r.len(), r[0].min_version, r[0].updated_at_ms), (1, 3, 11));
    assert_eq!(registry.retirements(FLEET).await.unwrap()[0].min_version, 2);
    registry.set_retirement("acme", "k1", 0, 13).await.unwrap();
    assert!(registry.retirements("acme").await.unwrap().is_empty());

    // Rotation claims: once per period, whoever asks.
    assert!(
        registry
            .claim_rotation("platform-keyring", 0, 1_000)
            .await
            .unwrap()
    );
    assert!(
        !registry
            .claim_rotation("platform-keyring", 1_000, 1_500)
            .await
            .unwrap()
    );
    assert!(
        registry
            .claim_rotation("platform-keyring", 1_001, 2_000)
            .await
            .unwrap()
    );
    assert!(
        !registry
            .claim_rotation("platform-keyring", 1_001, 2_000)
            .await
            .unwrap()
    );

    // Unlinking removes the row, its retirements and per-version usage.
    delete_binding(registry, "acme", "k3").await;
    delete_binding(registry, "acme", "k1").await;
    assert!(registry.binding("acme", "k1").await.unwrap().is_none());
    assert!(
        registry
            .version_usage("acme")
            .await
            .unwrap()
            .iter()
            .all(|u| u.key_name != "k1")
    );
    delete_binding(registry, "acme", "k2").await;

    // single_key: one key, never replaced; once used, the policy is fixed.
    registry
        .create_tenant(&tenant("pine", KeyPolicy::SingleKey))
        .await
        .unwrap();
    registry
        .insert_binding(&binding("pine", "only", false), 1)
        .await
        .unwrap();
    assert!(matches!(
        registry
            .insert_binding(&binding("pine", "second", true), 2)
            .await,
        Err(RegistryError::Refused(_))
    ));
    registry
        .add_usage(&[UsageDelta {
            tenant_id: "pine".into(),
            name: "only".into(),
            wraps: 1,
            unwraps: 0,
            last_used_at_ms: 1,
            versions: Vec::new(),
        }])
        .await
        .unwrap();
    assert!(matches!(
        registry.set_key_policy("pine", KeyPolicy::Keyring, 3).await,
        Err(RegistryError::Refused(_))
    ));
    assert_eq!(registry.bindings("pine").await.unwrap().len(), 1);

    // keyring → single_key only with at most one key.
    registry
        .create_tenant(&tenant("multi", KeyPolicy::Keyring))
        .await
        .unwrap();
    registry
        .insert_binding(&binding("multi", "a", false), 1)
        .await
        .unwrap();
    registry
        .insert_binding(&binding("multi", "b", false), 2)
        .await
        .unwrap();
    assert!(matches!(
        registry
            .set_key_policy("multi", KeyPolicy::SingleKey, 3)
            .await,
        Err(RegistryError::Refused(_))
    ));
    delete_binding(registry, "multi", "b").await;
    let t = registry
        .set_key_policy("multi", KeyPolicy::SingleKey, 4)
        .await
        .unwrap();
    assert_eq!(t.key_policy, KeyPolicy::SingleKey);

    tenant_key_suite(registry).await;
}

fn version(tenant_id: &str, version: u32, binding: &str) -> TenantKeyRecord {
    TenantKeyRecord {
        tenant_id: tenant_id.into(),
        version,
        binding: binding.into(),
        provider_key_version: "1".into(),
        wrapped: vec![u8::try_from(version).unwrap(); 80],
        created_at_ms: 10,
        updated_at_ms: 10,
        epoch: 0,
    }
}

/// Tenant key versions under the tenant's lock: stored, moved only from
/// the binding they are under, destroyed by binding; the tenant's lifecycle
/// columns written as edited; a shredded tenant leaves a tombstone, and the
/// id created again is the next incarnation, refusing keys without one.
async fn tenant_key_suite(registry: &dyn Registry) {
    registry
        .create_tenant(&tenant("hier", KeyPolicy::Keyring))
        .await
        .unwrap();
    let got = registry.tenant("hier").await.unwrap().unwrap();
    assert_eq!(got.key_hierarchy, KeyHierarchy::TenantKey);
    assert_eq!((got.incarnation, got.legacy_deks), (1, true));
    assert_eq!((got.reencrypt_to, got.next_key_version), (None, 1));
    assert!(registry.lock_tenant("nobody").await.unwrap().is_none());
    registry
        .insert_binding(&binding("hier", "cmk", true), 20)
        .await
        .unwrap();
    let mut tx = registry.lock_tenant("hier").await.unwrap().unwrap();
    tx.insert_version(&version("hier", 1, "platform"))
        .await
        .unwrap();
    tx.insert_version(&version("hier", 2, "cmk")).await.unwrap();
    let t = tx.tenant_mut();
    t.next_key_version = 3;
    t.key_epoch = 4;
    t.reencrypt_to = Some("cmk".into());
    t.delete_at_ms = Some(99);
    tx.write_tenant(30).await.unwrap();
    tx.commit().await.unwrap();
    let got = registry.tenant("hier").await.unwrap().unwrap();
    assert_eq!(
        (got.next_key_version, got.key_epoch, got.delete_at_ms),
        (3, 4, Some(99))
    );
    assert_eq!(
        registry
            .tenants_reencrypting()
            .await
            .unwrap()
            .iter()
            .map(|t| t.id.as_str())
            .collect::<Vec<_>>(),
        ["hier"]
    );
    assert_eq!(
        registry.due_deletions(98, 10).await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(registry.due_deletions(99, 10).await.unwrap(), ["hier"]);
    assert_eq!(
        registry.tenant_keys("hier").await.unwrap(),
        vec![version("hier", 1, "platform"), version("hier", 2, "cmk")]
    );
    // Nothing a dropped transaction did stays.
    let mut tx = registry.lock_tenant("hier").await.unwrap().unwrap();
    tx.insert_version(&version("hier", 3, "cmk")).await.unwrap();
    drop(tx);
    assert_eq!(registry.tenant_keys("hier").await.unwrap().len(), 2);

    // A move is a compare-and-set on the binding the version is under.
    let mut moved = version("hier", 1, "cmk");
    moved.wrapped = vec![0xAB; 90];
    moved.updated_at_ms = 30;
    let mut tx = registry.lock_tenant("hier").await.unwrap().unwrap();
    assert!(!tx.rewrap_version("cmk", &moved).await.unwrap());
    assert!(tx.rewrap_version("platform", &moved).await.unwrap());
    assert!(!tx.rewrap_version("platform", &moved).await.unwrap());
    tx.commit().await.unwrap();
    assert_eq!(registry.tenant_keys("hier").await.unwrap()[0], moved);
    let updated = registry
        .set_description("hier", "cmk", "renamed", 50)
        .await
        .unwrap();
    assert_eq!(updated.description, "renamed");

    // Usage of the versions a binding wraps (what an unlink is guarded by).
    registry
        .add_usage(&[UsageDelta {
            tenant_id: "hier".into(),
            name: "cmk".into(),
            wraps: 1,
            unwraps: 0,
            last_used_at_ms: 1_000,
            versions: vec![VersionUsageRecord {
                key_name: keybroker::keys::TENANT_KEY_USAGE.into(),
                version: "2".into(),
                wraps: 5,
                unwraps: 1,
                last_used_at_ms: 1_500,
            }],
        }])
        .await
        .unwrap();
    let mut tx = registry.lock_tenant("hier").await.unwrap().unwrap();
    assert_eq!(
        tx.last_use_of_versions_under("cmk").await.unwrap(),
        Some(1_500)
    );
    assert_eq!(tx.seals_under("cmk").await.unwrap(), 5);
    assert_eq!(
        tx.last_use_of_versions_under("platform").await.unwrap(),
        None
    );
    assert_eq!(tx.delete_versions_under("cmk").await.unwrap(), 2);
    drop(tx);

    // Shredding: every row goes, a tombstone stays; the id comes back as
    // the next incarnation, refusing wrapped keys without one.
    let mut tx = registry.lock_tenant("hier").await.unwrap().unwrap();
    tx.shred(2_000).await.unwrap();
    tx.commit().await.unwrap();
    registry.compact().await.unwrap();
    assert!(registry.tenant("hier").await.unwrap().is_none());
    assert!(registry.tenant_keys("hier").await.unwrap().is_empty());
    assert!(registry.bindings("hier").await.unwrap().is_empty());
    assert!(registry.version_usage("hier").await.unwrap().is_empty());
    assert_eq!(registry.tombstone("hier").await.unwrap(), Some(1));
    assert_eq!(registry.tombstone("acme").await.unwrap(), None);
    registry
        .create_tenant(&tenant("hier", KeyPolicy::Keyring))
        .await
        .unwrap();
    let again = registry.tenant("hier").await.unwrap().unwrap();
    assert_eq!((again.incarnation, again.legacy_deks), (2, false));
    assert!(registry.tenant_keys("hier").await.unwrap().is_empty());
}

/// An export restores into an empty registry of the same backend, row for
/// row; a non-empty one refuses it.
async fn backup_round_trip(from: &SqlRegistry, into: &SqlRegistry) {
    let document = from.export().await.unwrap();
    let rows = into.restore(&document).await.unwrap();
    assert!(rows > 0);
    assert_eq!(into.export().await.unwrap(), document);
    for id in ["acme", "pine", "hier"] {
        assert_eq!(
            into.tenant(id).await.unwrap(),
            from.tenant(id).await.unwrap()
        );
        assert_eq!(
            into.bindings(id).await.unwrap(),
            from.bindings(id).await.unwrap()
        );
        assert_eq!(
            into.tenant_keys(id).await.unwrap(),
            from.tenant_keys(id).await.unwrap()
        );
    }
    assert!(matches!(
        into.restore(&document).await,
        Err(RegistryError::Refused(_))
    ));
}

#[tokio::test]
async fn registry_suite_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let registry = SqlRegistry::open_sqlite(&path).await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the registry file holds wrapped key material");
    suite(&registry).await;
    let copy = SqlRegistry::open_sqlite(&dir.path().join("restored.db"))
        .await
        .unwrap();
    backup_round_trip(&registry, &copy).await;
    // Migrations are idempotent: reopening keeps everything.
    registry.close().await;
    let reopened = SqlRegistry::open_sqlite(&path).await.unwrap();
    assert!(reopened.tenant("acme").await.unwrap().is_some());
}

#[tokio::test]
async fn registry_suite_postgres() {
    let url = fresh_postgres_database().await;
    let registry = SqlRegistry::connect(&url).await.unwrap();
    suite(&registry).await;
    let copy = SqlRegistry::connect(&fresh_postgres_database().await)
        .await
        .unwrap();
    backup_round_trip(&registry, &copy).await;
    registry.close().await;
    let reopened = SqlRegistry::connect(&url).await.unwrap();
    assert!(reopened.tenant("pine").await.unwrap().is_some());
}

#[tokio::test]
async fn concurrent_primary_changes_keep_one_primary() {
    for url in [None, Some(fresh_postgres_database().await)] {
        let dir = tempfile::tempdir().unwrap();
        let registry = match &url {
            Some(url) => SqlRegistry::connect(url).await.unwrap(),
            None => SqlRegistry::open_sqlite(&dir.path().join("r.db"))
                .await
                .unwrap(),
        };
        registry
            .create_tenant(&tenant("race", KeyPolicy::Keyring))
            .await
            .unwrap();
        for i in 0..4 {
            registry
                .insert_binding(&binding("race", &format!("k{i}"), false), i)
                .await
                .unwrap();
        }
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let registry = registry.clone();
                tokio::spawn(async move {
                    // SQLite may report a busy database under contention.
                    let Ok(Some(mut tx)) = registry.lock_tenant("race").await else {
                        return;
                    };
                    let name = format!("k{}", i % 4);
                    if tx.set_primary(Some(&name), 100 + i).await.is_ok() {
                        let _ = tx.commit().await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let primaries = registry
            .bindings("race")
            .await
            .unwrap()
            .into_iter()
            .filter(|b| b.primary)
            .count();
        assert_eq!(primaries, 1, "backend {url:?}");
    }
}

/// One watcher pass per fleet: replicas claiming at the same moment get
/// disjoint bindings, every due binding is claimed once, claims come due
/// again at the time they named (a dead claimer's bindings are taken over),
/// and DISABLED bindings are never claimed.
#[tokio::test]
async fn watch_claims_are_disjoint_and_come_due_again() {
    for url in [None, Some(fresh_postgres_database().await)] {
        let dir = tempfile::tempdir().unwrap();
        let registry = match &url {
            Some(url) => SqlRegistry::connect(url).await.unwrap(),
            None => SqlRegistry::open_sqlite(&dir.path().join("r.db"))
                .await
                .unwrap(),
        };
        for t in 0..10 {
            let id = format!("t{t}");
            registry
                .create_tenant(&tenant(&id, KeyPolicy::Keyring))
                .await
                .unwrap();
            for k in 0..30 {
                registry
                    .insert_binding(&binding(&id, &format!("k{k}"), false), 1)
                    .await
                    .unwrap();
            }
        }
        registry
            .set_state("t0", "k0", BindingState::Disabled, "operator", 2)
            .await
            .unwrap();
        // Three replicas claim at once, each in batches of 40 (interval
        // 30 s): every due binding once, none twice.
        let claim = |claimer: &'static str, now: i64, others: bool| CheckClaim {
            claimer,
            now_ms: now,
            own_due_before_ms: now - 30_000,
            others_due_before_ms: if others { now - 37_500 } else { i64::MIN },
        };
        let now = 100_000;
        let claimers: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .map(|id| {
                let registry = registry.clone();
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let batch = registry
                            .claim_checks(&claim(id, now, true), 40)
                            .await
                            .unwrap();
                        if batch.is_empty() {
                            return (id, mine);
                        }
                        mine.extend(batch.into_iter().map(|(b, ext)| {
                            assert_eq!(ext, format!("kb-ext-{}", b.tenant_id));
                            (b.tenant_id, b.name)
                        }));
                    }
                })
            })
            .collect();
        let mut owned = std::collections::HashMap::new();
        let mut all = Vec::new();
        for c in claimers {
            let (id, mine) = c.await.unwrap();
            owned.insert(id, mine.len());
            all.extend(mine);
        }
        let distinct: std::collections::HashSet<_> = all.iter().cloned().collect();
        assert_eq!(all.len(), 299, "backend {url:?}: every due binding once");
        assert_eq!(distinct.len(), 299, "backend {url:?}: no binding twice");
        assert!(!distinct.contains(&("t0".to_owned(), "k0".to_owned())));
        // Nothing is due before an interval has passed.
        for id in ["a", "b", "c"] {
            let early = registry
                .claim_checks(&claim(id, now + 29_999, true), 1000)
                .await
                .unwrap();
            assert!(early.is_empty(), "backend {url:?}");
        }
        // Then each claimer's own bindings are due to it, not to the others
        // (sticky), until a quarter interval later.
        let later = now + 30_000;
        let a = registry
            .claim_checks(&claim("a", later, false), 1000)
            .await
            .unwrap();
        assert_eq!(a.len(), owned["a"], "backend {url:?}");
        let b = registry
            .claim_checks(&claim("b", later + 7_499, true), 1000)
            .await
            .unwrap();
        assert_eq!(b.len(), owned["b"], "backend {url:?}: only b's own");
        // c died: its bindings go to whoever claims 1.25 intervals on.
        let taken = registry
            .claim_checks(&claim("b", now + 37_500, true), 1000)
            .await
            .unwrap();
        assert_eq!(taken.len(), owned["c"], "backend {url:?}");
        let counts = registry.binding_states().await.unwrap();
        assert!(counts.contains(&("active", 299)), "{counts:?}");
        assert!(counts.contains(&("disabled", 1)), "{counts:?}");
    }
}
