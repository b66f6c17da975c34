//! The tenant-key lifecycle, one regression test per defect the issue and
//! the model-based test (`lifecycle_model`) found: a key change racing
//! wraps, a forced unlink, deletion that shreds with a restore window, a
//! re-created tenant id, a relinked key name, a lost change feed.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keybroker::proto::key_admin_client::KeyAdminClient;
use keybroker::proto::key_broker_client::KeyBrokerClient;
use keybroker::proto::{self, KeyHierarchy, KeyPolicy};
use keybroker::registry::Registry as _;
use keybroker::registry::sql::SqlRegistry;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{
    TestServer, admin_client, create_tenant_with, generate, legacy_platform_dek, test_config,
    unwrap,
};
use crate::hierarchy::{all_readable, disable, import};

const CTX: &[(&str, &str)] = &[("table", "orders")];

async fn delete(
    admin: &mut KeyAdminClient<Channel>,
    tenant: &str,
    window: Option<Duration>,
) -> proto::DeleteTenantResponse {
    admin
        .delete_tenant(proto::DeleteTenantRequest {
            tenant_id: tenant.into(),
            force: true,
            restore_window: window.map(|w| w.try_into().unwrap()),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn unlink(
    admin: &mut KeyAdminClient<Channel>,
    tenant: &str,
    name: &str,
    force: bool,
) -> Result<proto::UnlinkKeyResponse, tonic::Status> {
    admin
        .unlink_key(proto::UnlinkKeyRequest {
            tenant_id: tenant.into(),
            name: name.into(),
            force,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// (binding, provider key version) of each of a tenant's key versions.
async fn versions_in(registry: &SqlRegistry, tenant: &str) -> Vec<(u32, String)> {
    registry
        .tenant_keys(tenant)
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.version, v.binding))
        .collect()
}

/// `DisableKey(A, reencrypt_to=platform)` while clients keep generating
/// DEKs: no tenant key version may be minted under A after the change moved
/// the others (it was, in 2 of 4 rounds: A disabled, those DEKs lost). Every
/// DEK acknowledged before, during and after stays readable, warm and cold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_racing_wraps_mints_nothing_under_the_old_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut admin = admin_client(&server).await;
    let broker = server.client().await;
    let registry = SqlRegistry::open_sqlite(&dir.path().join("registry.db"))
        .await
        .unwrap();
    for round in 0..4 {
        let tenant = format!("race-{round}");
        create_tenant_with(
            &mut admin,
            &tenant,
            KeyPolicy::Keyring,
            KeyHierarchy::TenantKey,
        )
        .await;
        import(&mut admin, &tenant, "a", true).await;
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let (mut broker, stop, tenant) =
                    (broker.clone(), Arc::clone(&stop), tenant.clone());
                tokio::spawn(async move {
                    let mut acked = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        if let Ok(g) = generate(&mut broker, &tenant, CTX).await {
                            acked.push(g);
                        }
                    }
                    acked
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(30)).await;
        disable(&mut admin, &tenant, "a", "platform").await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        stop.store(true, Ordering::SeqCst);
        let mut deks = Vec::new();
        for w in writers {
            deks.extend(w.await.unwrap());
        }
        assert!(deks.len() > 10, "round {round}: {} DEKs", deks.len());
        let versions = versions_in(&registry, &tenant).await;
        assert!(
            versions.iter().all(|(_, b)| b == "platform"),
            "round {round}: a version under the disabled key: {versions:?}"
        );
        let mut broker = broker.clone();
        all_readable(&mut broker, &tenant, &deks).await;
        server.broker.cache().purge_all().await;
        all_readable(&mut broker, &tenant, &deks).await;
    }
    server.stop().await;
}

/// A forced unlink of the key that wraps the newest tenant key version
/// destroys the versions it wrapped in the same step: the tenant keeps
/// working (it used to answer every GenerateDataKey INTERNAL, and leave the
/// next key change in progress forever).
#[tokio::test]
async fn a_forced_unlink_leaves_a_tenant_that_works() {
    let (_dir, server, mut admin, mut broker) = crate::hierarchy::start().await;
    create_tenant_with(
        &mut admin,
        "brick",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    import(&mut admin, "brick", "a", true).await;
    let old = generate(&mut broker, "brick", CTX).await.unwrap();
    let err = unlink(&mut admin, "brick", "a", false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("force"), "{}", err.message());
    let done = unlink(&mut admin, "brick", "a", true).await.unwrap();
    assert_eq!(done.tenant_key_versions_destroyed, 1);
    let err = unwrap(&mut broker, "brick", CTX, &old.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // New wraps work (the platform key, a fresh version number), and key
    // changes start and finish.
    let g = generate(&mut broker, "brick", CTX).await.unwrap();
    assert_eq!(g.key.as_ref().unwrap().provider_key_version, "tenant-key/2");
    import(&mut admin, "brick", "b", false).await;
    admin
        .set_primary_key(proto::SetPrimaryKeyRequest {
            tenant_id: "brick".into(),
            name: "b".into(),
        })
        .await
        .unwrap();
    let t = crate::hierarchy::tenant(&mut admin, "brick").await;
    assert!(!t.reencryption.unwrap().in_progress);
    import(&mut admin, "brick", "c", false).await;
    disable(&mut admin, "brick", "b", "c").await.unwrap();
    let g2 = generate(&mut broker, "brick", CTX).await.unwrap();
    assert_eq!(g2.key.as_ref().unwrap().key_binding, "c");
    all_readable(&mut broker, "brick", &[g, g2]).await;
    server.stop().await;
}

/// Every file under `dir` (recursively), and which of `secrets` it holds.
fn files_holding(dir: &Path, secrets: &[Vec<u8>]) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            for (i, secret) in secrets.iter().enumerate() {
                if bytes.windows(secret.len()).any(|w| w == secret.as_slice()) {
                    found.push((path.display().to_string(), i));
                }
            }
        }
    }
    found
}

/// What the registry holds of a tenant that nothing else holds: its tenant
/// key versions' wrapped bytes and its keys' sealed material.
async fn secrets_of(registry: &SqlRegistry, tenant: &str) -> Vec<Vec<u8>> {
    let mut secrets: Vec<Vec<u8>> = registry
        .tenant_keys(tenant)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.wrapped)
        .collect();
    secrets.extend(
        registry
            .bindings(tenant)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|b| b.key_material),
    );
    secrets
}

/// DeleteTenant schedules: every data-plane call is refused until the
/// restore window ends, naming the time and the cancel call; cancelling
/// restores everything. At the end the rows are destroyed for real (a byte
/// scan of the data dir finds none of the wrapped keys), no DEK ever issued
/// for the id unwraps again (those from before it was created, and from
/// before incarnations, included), and the id created again is a new
/// incarnation.
#[tokio::test]
async fn deletion_waits_out_its_window_then_shreds_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.deletion.maintenance_interval = Duration::from_millis(100);
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;

    // Before CreateTenant: a DEK from before incarnations, one sealed under
    // the tenant key its first wrap registered.
    let (legacy_plain, legacy) = legacy_platform_dek(dir.path(), "gone", CTX).await;
    let early = generate(&mut broker, "gone", CTX).await.unwrap();
    let created = create_tenant_with(
        &mut admin,
        "gone",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    assert_eq!(
        (created.incarnation, created.implicit),
        (1, false),
        "adopted"
    );
    let registry = SqlRegistry::open_sqlite(&dir.path().join("registry.db"))
        .await
        .unwrap();
    let mut secrets = secrets_of(&registry, "gone").await;
    import(&mut admin, "gone", "cmk", true).await;
    let late = generate(&mut broker, "gone", CTX).await.unwrap();
    secrets.extend(secrets_of(&registry, "gone").await);
    let deks = [early, late];
    all_readable(&mut broker, "gone", &deks).await;
    assert_eq!(
        unwrap(&mut broker, "gone", CTX, &legacy)
            .await
            .unwrap()
            .plaintext,
        legacy_plain
    );

    // Scheduled with the server's window: refused everywhere, cached or
    // not, and mutations too; shown in GetTenant.
    let scheduled = delete(&mut admin, "gone", None).await;
    assert!(!scheduled.deleted);
    let at = scheduled.delete_time.unwrap().seconds;
    let week = 7 * 24 * 3600;
    assert!(
        (at - keybroker::keys::now_ms() / 1000 - week).abs() < 60,
        "{at}"
    );
    let refusals = [
        unwrap(&mut broker, "gone", CTX, &deks[0].wrapped_key)
            .await
            .unwrap_err(),
        unwrap(&mut broker, "gone", CTX, &legacy).await.unwrap_err(),
        generate(&mut broker, "gone", CTX).await.unwrap_err(),
        broker
            .describe_key(proto::DescribeKeyRequest {
                tenant_id: "gone".into(),
            })
            .await
            .unwrap_err(),
    ];
    for err in refusals {
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(
            err.message().contains("CancelTenantDeletion")
                && err.message().contains(&keybroker::text::rfc3339(at * 1000)),
            "{}",
            err.message()
        );
    }
    let err = admin
        .import_key_material(proto::ImportKeyMaterialRequest {
            tenant_id: "gone".into(),
            name: "more".into(),
            key_material_base64: crate::common::random_material(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let shown = crate::hierarchy::tenant(&mut admin, "gone").await;
    assert_eq!(shown.delete_time.unwrap().seconds, at);

    // Cancelled: as it was.
    admin
        .cancel_tenant_deletion(proto::CancelTenantDeletionRequest {
            tenant_id: "gone".into(),
        })
        .await
        .unwrap();
    all_readable(&mut broker, "gone", &deks).await;

    // A one-second window: shredded by the maintenance task once it ends.
    let scheduled = delete(&mut admin, "gone", Some(Duration::from_secs(1))).await;
    let window_end = scheduled.delete_time.unwrap();
    let window_end_ms = window_end.seconds * 1000 + i64::from(window_end.nanos / 1_000_000);
    loop {
        let got = admin
            .get_tenant(proto::GetTenantRequest {
                tenant_id: "gone".into(),
            })
            .await;
        if matches!(&got, Err(s) if s.code() == Code::NotFound) {
            break;
        }
        assert!(
            keybroker::keys::now_ms() < window_end_ms + 5_000,
            "not shredded 5 s after its window"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "window end -> rows gone: {} ms (maintenance interval 100 ms)",
        keybroker::keys::now_ms() - window_end_ms
    );
    registry.close().await;
    let found = files_holding(dir.path(), &secrets);
    assert!(found.is_empty(), "shredded bytes still on disk: {found:?}");
    println!(
        "byte scan of the data dir after the shred: 0 of {} wrapped keys found",
        secrets.len()
    );
    let gone = |err: tonic::Status| {
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    };
    for g in &deks {
        gone(
            unwrap(&mut broker, "gone", CTX, &g.wrapped_key)
                .await
                .unwrap_err(),
        );
    }
    gone(unwrap(&mut broker, "gone", CTX, &legacy).await.unwrap_err());
    let err = admin
        .cancel_tenant_deletion(proto::CancelTenantDeletionRequest {
            tenant_id: "gone".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // The id again: the next incarnation, nothing of the last one reads.
    let again = create_tenant_with(
        &mut admin,
        "gone",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    assert_eq!(again.incarnation, 2);
    let fresh = generate(&mut broker, "gone", CTX).await.unwrap();
    all_readable(&mut broker, "gone", std::slice::from_ref(&fresh)).await;
    for g in &deks {
        gone(
            unwrap(&mut broker, "gone", CTX, &g.wrapped_key)
                .await
                .unwrap_err(),
        );
    }
    gone(unwrap(&mut broker, "gone", CTX, &legacy).await.unwrap_err());
    server.stop().await;
}

/// The same shred on PostgreSQL: the rows deleted and the tables rewritten
/// (VACUUM FULL), so the database's files hold none of the wrapped keys.
/// The write-ahead log still does until PostgreSQL recycles it, and
/// backups keep what they copied: docs/operations.md states the retention
/// an operator must bound.
#[tokio::test]
async fn deletion_shreds_on_postgres() {
    use sqlx::{Connection as _, Row as _};
    let url = crate::common::fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.registry.url = Some(url.parse().unwrap());
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    create_tenant_with(
        &mut admin,
        "pg-gone",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    generate(&mut broker, "pg-gone", CTX).await.unwrap();
    import(&mut admin, "pg-gone", "cmk", true).await;
    let g = generate(&mut broker, "pg-gone", CTX).await.unwrap();
    let registry = SqlRegistry::connect(&url).await.unwrap();
    let secrets = secrets_of(&registry, "pg-gone").await;
    assert_eq!(secrets.len(), 3, "two versions and the key material");
    let scheduled = delete(&mut admin, "pg-gone", Some(Duration::ZERO)).await;
    assert!(scheduled.deleted);
    let err = unwrap(&mut broker, "pg-gone", CTX, &g.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    let data_dir: String = sqlx::query("SELECT current_setting('data_directory')")
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get(0);
    let database: String = sqlx::query(
        "SELECT 'base/' || oid::text FROM pg_database WHERE datname = current_database()",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap()
    .get(0);
    let found = files_holding(&Path::new(&data_dir).join(&database), &secrets);
    assert!(
        found.is_empty(),
        "shredded bytes still in the database: {found:?}"
    );
    let in_wal = files_holding(&Path::new(&data_dir).join("pg_wal"), &secrets).len();
    println!(
        "PostgreSQL after the shred: 0 of {} wrapped keys in the database files; {in_wal} hits in pg_wal (kept until recycled)",
        secrets.len()
    );
    server.stop().await;
}

/// A key unlinked and linked again under the same name is another key: a
/// DEK the first one wrapped is never served from the cache under the
/// second (the cache checks the link, not the name).
#[tokio::test]
async fn a_relinked_key_name_serves_nothing_of_the_old_key() {
    let (_dir, server, mut admin, mut broker) = crate::hierarchy::start().await;
    create_tenant_with(
        &mut admin,
        "relink",
        KeyPolicy::Keyring,
        KeyHierarchy::Direct,
    )
    .await;
    import(&mut admin, "relink", "k", true).await;
    let g = generate(&mut broker, "relink", CTX).await.unwrap();
    unwrap(&mut broker, "relink", CTX, &g.wrapped_key)
        .await
        .unwrap();
    unlink(&mut admin, "relink", "k", true).await.unwrap();
    import(&mut admin, "relink", "k", true).await;
    let err = unwrap(&mut broker, "relink", CTX, &g.wrapped_key)
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::InvalidArgument | Code::NotFound),
        "{err:?}"
    );
    server.stop().await;
}

/// A replica that lost its change feed (its LISTEN connection killed) while
/// a change it was never told of was committed purges every cached key and
/// view, so the change is honoured at once, not at the cache's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_change_feed_purges_the_cache() {
    use sqlx::Connection as _;
    let url = crate::common::fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.registry.url = Some(url.parse().unwrap());
    config.registry.cache_ttl = Duration::from_secs(3600);
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker: KeyBrokerClient<Channel> = server.client().await;
    create_tenant_with(&mut admin, "feed", KeyPolicy::Keyring, KeyHierarchy::Direct).await;
    import(&mut admin, "feed", "k", true).await;
    let g = generate(&mut broker, "feed", CTX).await.unwrap();
    unwrap(&mut broker, "feed", CTX, &g.wrapped_key)
        .await
        .unwrap();
    // The replica's own notifications (of the import) come back through
    // its feed: let them land before the feed is tested (generously: on
    // a loaded machine one landing after the change below would reload
    // the view, and the premise "nothing told this replica" would not hold).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // An operator's change made behind the feed's back (no NOTIFY).
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("UPDATE key_bindings SET state = 'DISABLED', state_reason = 'behind the feed' WHERE tenant_id = 'feed'")
        .execute(&mut conn)
        .await
        .unwrap();
    // Still served from the cache: nothing told this replica.
    unwrap(&mut broker, "feed", CTX, &g.wrapped_key)
        .await
        .unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE query LIKE 'LISTEN%' AND datname = current_database()",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let started = Instant::now();
    loop {
        match unwrap(&mut broker, "feed", CTX, &g.wrapped_key).await {
            Err(err) if err.code() == Code::FailedPrecondition => break,
            other => assert!(
                started.elapsed() < Duration::from_secs(5),
                "still served 5 s after the feed was lost: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "change feed lost -> resynchronised after {:?}",
        started.elapsed()
    );
    server.stop().await;
}

/// Found by the model: a key change of a `direct` tenant interrupted by a
/// crash was never resumed at start (only `tenant_key` tenants were), so
/// the tenant stayed mid-change for good.
#[tokio::test]
async fn an_interrupted_key_change_of_a_direct_tenant_resumes_at_start() {
    let (dir, server, mut admin, mut broker) = crate::hierarchy::start().await;
    // Sealed on the platform key first (no customer key yet), then a key.
    create_tenant_with(&mut admin, "mid", KeyPolicy::Keyring, KeyHierarchy::Direct).await;
    let sealed = generate(&mut broker, "mid", CTX).await.unwrap();
    import(&mut admin, "mid", "a", true).await;
    import(&mut admin, "mid", "b", false).await;
    let direct = generate(&mut broker, "mid", CTX).await.unwrap();
    server.stop().await;

    // What a crash right after the key change to b began leaves behind.
    let registry = SqlRegistry::open_sqlite(&dir.path().join("registry.db"))
        .await
        .unwrap();
    let mut tx = registry.lock_tenant("mid").await.unwrap().unwrap();
    let now = keybroker::keys::now_ms();
    tx.set_primary(Some("b"), now).await.unwrap();
    tx.tenant_mut().reencrypt_to = Some("b".into());
    tx.tenant_mut().key_epoch += 1;
    tx.write_tenant(now).await.unwrap();
    tx.commit().await.unwrap();
    registry.close().await;

    let server = TestServer::start(test_config(dir.path())).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    let started = Instant::now();
    while crate::hierarchy::tenant(&mut admin, "mid")
        .await
        .reencryption
        .unwrap()
        .in_progress
    {
        assert!(started.elapsed() < Duration::from_secs(10), "not resumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let registry = SqlRegistry::open_sqlite(&dir.path().join("registry.db"))
        .await
        .unwrap();
    assert_eq!(versions_in(&registry, "mid").await, [(1, "b".to_owned())]);
    all_readable(&mut broker, "mid", &[sealed, direct]).await;
    server.stop().await;
}

/// Found by the model: a DEK of a deleted life of a tenant id answered
/// "scheduled for deletion, cancel it" when the id's next life was
/// scheduled for deletion; cancelling could never bring it back. It is
/// gone (NOT_FOUND), whatever the current life's state.
#[tokio::test]
async fn a_dek_of_a_deleted_life_is_gone_whatever_the_next_life_does() {
    let (_dir, server, mut admin, mut broker) = crate::hierarchy::start().await;
    let first = generate(&mut broker, "lives", CTX).await.unwrap();
    delete(&mut admin, "lives", Some(Duration::ZERO)).await;
    let second = generate(&mut broker, "lives", CTX).await.unwrap();
    delete(&mut admin, "lives", None).await;
    let err = unwrap(&mut broker, "lives", CTX, &first.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = unwrap(&mut broker, "lives", CTX, &second.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    server.stop().await;
}

/// Found by the model's soak: `DisableKey(kc, reencrypt_to=platform)` of a
/// key that was not the primary moved every version to the platform key
/// but left the primary in place, so the next wrap minted under it again:
/// a tenant split between two keys for nothing. Back to the platform key is
/// the primary's change to make: refused for another key, saying which.
#[tokio::test]
async fn only_the_primary_takes_a_tenant_back_to_the_platform_key() {
    let (dir, server, mut admin, mut broker) = crate::hierarchy::start().await;
    create_tenant_with(
        &mut admin,
        "split",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    import(&mut admin, "split", "kb", true).await;
    import(&mut admin, "split", "kc", false).await;
    let before = generate(&mut broker, "split", CTX).await.unwrap();
    let err = disable(&mut admin, "split", "kc", "platform")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("'kb'"), "{}", err.message());
    disable(&mut admin, "split", "kc", "").await.unwrap();
    disable(&mut admin, "split", "kb", "platform")
        .await
        .unwrap();
    let after = generate(&mut broker, "split", CTX).await.unwrap();
    assert_eq!(after.key.as_ref().unwrap().key_binding, "platform");
    let registry = SqlRegistry::open_sqlite(&dir.path().join("registry.db"))
        .await
        .unwrap();
    assert_eq!(
        versions_in(&registry, "split").await,
        [(1, "platform".to_owned()), (2, "platform".to_owned())]
    );
    all_readable(&mut broker, "split", &[before, after]).await;
    server.stop().await;
}
