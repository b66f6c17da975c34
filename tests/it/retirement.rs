//! Retiring old key versions (issue 17): the minimum decryption version of
//! the tenant key and of the platform keyring, its usage guard, per-version
//! usage in GetTenant / GetKey, and the registry-held keys (tenant key
//! versions, imported material) re-wrapped before a platform version retires.

use std::time::Duration;

use keybroker::proto::key_admin_client::KeyAdminClient;
use keybroker::proto::key_broker_client::KeyBrokerClient;
use keybroker::proto::{self, KeyHierarchy, KeyPolicy, RetireTarget};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{create_tenant_with, generate, rewrap, unwrap};
use crate::hierarchy::{import, start, tenant};

const CTX: &[(&str, &str)] = &[("table", "orders")];

async fn retire(
    admin: &mut KeyAdminClient<Channel>,
    tenant: &str,
    target: RetireTarget,
    name: &str,
    min: u32,
    force: bool,
) -> Result<proto::RetireKeyVersionsResponse, tonic::Status> {
    admin
        .retire_key_versions(proto::RetireKeyVersionsRequest {
            tenant_id: tenant.into(),
            target: target.into(),
            name: name.into(),
            min_decryption_version: min,
            force,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn usage_of(versions: &[proto::KeyVersionUsage], version: &str) -> proto::KeyVersionUsage {
    versions
        .iter()
        .find(|v| v.version == version)
        .cloned()
        .unwrap_or_else(|| panic!("no usage for version {version} in {versions:?}"))
}

fn expect_retired(status: &tonic::Status, version: u32) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let message = status.message();
    assert!(
        message.contains(&format!("version {version}")) && message.contains("retired"),
        "{message}"
    );
    assert!(message.contains("rewrap"), "says how to recover: {message}");
}

/// Tenant key versions: usage per version, the guard, forced retirement,
/// refusal on hit and miss, RewrapKey refused too, and un-retiring.
#[tokio::test]
async fn tenant_key_versions_retire_with_a_usage_guard() {
    let (_dir, server, mut admin, mut broker) = start().await;
    create_tenant_with(
        &mut admin,
        "acme",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    let old = generate(&mut broker, "acme", CTX).await.unwrap();
    assert_eq!(
        old.key.as_ref().unwrap().provider_key_version,
        "tenant-key/1"
    );
    // The first customer key moves version 1 under it and mints version 2.
    import(&mut admin, "acme", "k1", true).await;
    let new = generate(&mut broker, "acme", CTX).await.unwrap();
    assert_eq!(
        new.key.as_ref().unwrap().provider_key_version,
        "tenant-key/2"
    );
    unwrap(&mut broker, "acme", CTX, &old.wrapped_key)
        .await
        .unwrap();
    unwrap(&mut broker, "acme", CTX, &old.wrapped_key)
        .await
        .unwrap();

    let t = tenant(&mut admin, "acme").await;
    assert_eq!(t.min_tenant_key_version, 0);
    let v1 = usage_of(&t.tenant_key_usage, "1");
    assert_eq!((v1.wrap_count, v1.unwrap_count), (1, 2), "{v1:?}");
    assert!(v1.last_use_time.is_some() && !v1.retired);
    assert_eq!(usage_of(&t.tenant_key_usage, "2").wrap_count, 1);

    // Beyond the newest version: nothing would be left to seal with.
    let err = retire(&mut admin, "acme", RetireTarget::TenantKey, "", 3, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Version 1 was used moments ago: the guard refuses.
    let err = retire(&mut admin, "acme", RetireTarget::TenantKey, "", 2, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("version 1 was used"),
        "{}",
        err.message()
    );
    unwrap(&mut broker, "acme", CTX, &old.wrapped_key)
        .await
        .unwrap();

    let done = retire(&mut admin, "acme", RetireTarget::TenantKey, "", 2, true)
        .await
        .unwrap();
    assert_eq!(done.min_decryption_version, 2);
    assert_eq!(done.retired_versions, ["1"]);
    // Cached, yet refused: every hit checks the minimum.
    let err = unwrap(&mut broker, "acme", CTX, &old.wrapped_key)
        .await
        .unwrap_err();
    expect_retired(&err, 1);
    let err = rewrap(&mut broker, "acme", CTX, &old.wrapped_key)
        .await
        .unwrap_err();
    expect_retired(&err, 1);
    // The current version is untouched.
    let back = unwrap(&mut broker, "acme", CTX, &new.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext, new.plaintext);
    let t = tenant(&mut admin, "acme").await;
    assert_eq!(t.min_tenant_key_version, 2);
    assert!(usage_of(&t.tenant_key_usage, "1").retired);
    assert!(!usage_of(&t.tenant_key_usage, "2").retired);

    // Un-retiring reads it again; then it is rewrapped under version 2.
    retire(&mut admin, "acme", RetireTarget::TenantKey, "", 0, false)
        .await
        .unwrap();
    let moved = rewrap(&mut broker, "acme", CTX, &old.wrapped_key)
        .await
        .unwrap();
    assert_eq!(moved.key.unwrap().provider_key_version, "tenant-key/2");
    let back = unwrap(&mut broker, "acme", CTX, &moved.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext, old.plaintext);
    // A direct tenant has no tenant key versions to retire.
    create_tenant_with(
        &mut admin,
        "globex",
        KeyPolicy::Keyring,
        KeyHierarchy::Direct,
    )
    .await;
    let err = retire(&mut admin, "globex", RetireTarget::TenantKey, "", 1, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    server.stop().await;
}

/// The platform keyring, fleet-wide: after a rotation, retiring version 1
/// re-seals what the registry holds under it (the tenant key versions it
/// protects, imported material), refuses DEKs it wrapped directly (from
/// before tenant keys for everyone), and leaves everything else readable.
#[tokio::test]
async fn platform_keyring_versions_retire_after_resealing_what_the_registry_holds() {
    let (dir, server, mut admin, mut broker) = start().await;
    // Under keyring version 1: a DEK it wrapped directly (an old one), a
    // walk-in tenant's tenant key, a registered tenant's, and imported
    // material.
    let (legacy_plain, legacy) =
        crate::common::legacy_platform_dek(dir.path(), "walk-in", CTX).await;
    let walk_in = generate(&mut broker, "walk-in", CTX).await.unwrap();
    assert_eq!(
        walk_in.key.as_ref().unwrap().provider_key_version,
        "tenant-key/1"
    );
    create_tenant_with(
        &mut admin,
        "hier",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    let sealed = generate(&mut broker, "hier", CTX).await.unwrap();
    create_tenant_with(&mut admin, "byok", KeyPolicy::Keyring, KeyHierarchy::Direct).await;
    import(&mut admin, "byok", "own", true).await;
    let byok = generate(&mut broker, "byok", CTX).await.unwrap();

    rotate_platform_keyring(dir.path(), &mut broker).await;
    // A tenant key minted now is wrapped under version 2.
    let walk_in_2 = generate(&mut broker, "walk-in-2", CTX).await.unwrap();
    let back = unwrap(&mut broker, "walk-in", CTX, &legacy).await.unwrap();
    assert_eq!(back.plaintext, legacy_plain);
    assert!(
        back.rewrap_recommended,
        "wrapped directly: a rewrap seals it"
    );

    // Only a caller allowed every tenant may retire it; the tenant is empty.
    let err = retire(
        &mut admin,
        "acme",
        RetireTarget::PlatformKeyring,
        "",
        2,
        true,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = retire(&mut admin, "", RetireTarget::PlatformKeyring, "", 2, false)
        .await
        .unwrap_err();
    assert!(
        err.message().contains("version 1 was used"),
        "{}",
        err.message()
    );
    let done = retire(&mut admin, "", RetireTarget::PlatformKeyring, "", 2, true)
        .await
        .unwrap();
    assert_eq!(done.retired_versions, ["1"]);
    assert_eq!(
        done.rewrapped, 3,
        "two tenant key versions and the imported material"
    );

    let err = unwrap(&mut broker, "walk-in", CTX, &legacy)
        .await
        .unwrap_err();
    expect_retired(&err, 1);
    assert!(err.message().contains("platform key"), "{}", err.message());
    for (tenant, dek) in [
        ("walk-in", &walk_in),
        ("walk-in-2", &walk_in_2),
        ("hier", &sealed),
        ("byok", &byok),
    ] {
        let back = unwrap(&mut broker, tenant, CTX, &dek.wrapped_key)
            .await
            .unwrap();
        assert_eq!(back.plaintext, dek.plaintext, "{tenant}");
    }
    // A new server (empty caches) reads them from the re-sealed registry.
    let config = crate::common::test_config(dir.path());
    server.stop().await;
    let server = crate::common::TestServer::start(config).await;
    let mut broker = server.client().await;
    for (tenant, dek) in [("walk-in", &walk_in), ("hier", &sealed), ("byok", &byok)] {
        let back = unwrap(&mut broker, tenant, CTX, &dek.wrapped_key)
            .await
            .unwrap();
        assert_eq!(back.plaintext, dek.plaintext, "{tenant} after a restart");
    }
    server.stop().await;
}

/// A key binding's versions: imported material has one version (nothing
/// older to retire); the minimum shows in GetKey with per-version usage.
#[tokio::test]
async fn key_versions_show_usage_and_bound_the_minimum() {
    let (_dir, server, mut admin, mut broker) = start().await;
    create_tenant_with(&mut admin, "acme", KeyPolicy::Keyring, KeyHierarchy::Direct).await;
    import(&mut admin, "acme", "own", true).await;
    let dek = generate(&mut broker, "acme", CTX).await.unwrap();
    unwrap(&mut broker, "acme", CTX, &dek.wrapped_key)
        .await
        .unwrap();
    let key = admin
        .get_key(proto::GetKeyRequest {
            tenant_id: "acme".into(),
            name: "own".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let v1 = usage_of(&key.versions, "1");
    assert_eq!((v1.wrap_count, v1.unwrap_count), (1, 1), "{v1:?}");
    assert_eq!(key.min_decryption_version, 0);
    let err = retire(&mut admin, "acme", RetireTarget::Key, "own", 2, true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Retiring below version 1 retires nothing and is allowed.
    let done = retire(&mut admin, "acme", RetireTarget::Key, "own", 1, false)
        .await
        .unwrap();
    assert!(done.retired_versions.is_empty());
    let err = retire(&mut admin, "acme", RetireTarget::Key, "nope", 1, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    server.stop().await;
}

/// `keybroker keyring rotate`, then waits until the server wraps with 2.
async fn rotate_platform_keyring(
    data_dir: &std::path::Path,
    broker: &mut KeyBrokerClient<Channel>,
) {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(["keyring", "rotate", "--data-dir"])
        .arg(data_dir)
        .status()
        .unwrap();
    assert!(status.success());
    for _ in 0..100 {
        let d = broker
            .describe_key(proto::DescribeKeyRequest {
                tenant_id: "walk-in".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if d.primary.unwrap().provider_key_version == "2" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the rotated keyring was not picked up");
}

/// Automatic platform keyring rotation, two replicas sharing one keyring
/// file (one volume) and one PostgreSQL registry. Their periodic checks are
/// held off (a 1 h interval) so the test runs both checks at the same
/// moment, past the period: both see version 1 as due, exactly one wins the
/// registry's claim. The other replica reads DEKs under the new version at
/// once (a wrapped key naming a newer version makes it re-read the file).
#[tokio::test]
async fn platform_keyring_rotates_once_per_period_across_replicas() {
    let url = crate::common::fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = crate::common::test_config(dir.path());
        c.registry.url = Some(url.parse().unwrap());
        c.server.platform_keyring_rotation_period = Duration::from_secs(2);
        c.server.keyring_reload_interval = Duration::from_secs(3600);
        c
    };
    let a = crate::common::TestServer::start(config()).await;
    let b = crate::common::TestServer::start(config()).await;
    let (mut broker_a, broker_b) = (a.client().await, b.client().await);
    let old = generate(&mut broker_a, "walk-in", CTX).await.unwrap();
    let (rotate_a, rotate_b) = (a.rotation.clone().unwrap(), b.rotation.clone().unwrap());
    assert_eq!(rotate_a.check().await.unwrap(), None, "not due yet");
    // Creation times are whole seconds: 3 s is past a 2 s period for sure.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ra, rb) = tokio::join!(rotate_a.check(), rotate_b.check());
    let mut outcomes = [ra.unwrap(), rb.unwrap()];
    outcomes.sort();
    assert_eq!(outcomes, [None, Some(2)], "one rotation fleet-wide");
    assert_eq!(rotate_a.rotations() + rotate_b.rotations(), 1);
    // Not due again within the period, on either replica.
    assert_eq!(rotate_b.check().await.unwrap(), None);
    assert_eq!(rotate_a.check().await.unwrap(), None);
    let path = config().platform_keyring_path();
    let on_disk = keybroker::kms::local::LocalKeyring::open_or_create("platform", &path).unwrap();
    assert_eq!(on_disk.newest_version(), 2);

    let (mut winner, mut other) = if rotate_a.rotations() == 1 {
        (broker_a, broker_b)
    } else {
        (broker_b, broker_a)
    };
    // A tenant key minted now is wrapped under version 2; the other
    // replica, which never re-read the file, loads it at once (a wrap
    // naming a newer version makes it re-read the keyring).
    let new = generate(&mut winner, "walk-in-2", CTX).await.unwrap();
    let registry = keybroker::registry::sql::SqlRegistry::connect(&url)
        .await
        .unwrap();
    use keybroker::registry::Registry as _;
    let versions = registry.tenant_keys("walk-in-2").await.unwrap();
    assert_eq!(versions[0].provider_key_version, "2");
    for (tenant, dek) in [("walk-in", &old), ("walk-in-2", &new)] {
        let back = unwrap(&mut other, tenant, CTX, &dek.wrapped_key)
            .await
            .unwrap();
        assert_eq!(back.plaintext, dek.plaintext);
    }
    a.stop().await;
    b.stop().await;
}

async fn import_version(
    admin: &mut KeyAdminClient<Channel>,
    tenant: &str,
    name: &str,
    material: &str,
) -> Result<proto::KeyBinding, tonic::Status> {
    admin
        .import_key_material(proto::ImportKeyMaterialRequest {
            tenant_id: tenant.into(),
            name: name.into(),
            description: String::new(),
            key_material_base64: material.into(),
            make_primary: false,
            new_version: true,
            wrapped_key_material: Vec::new(),
            import_token: String::new(),
        })
        .await
        .map(|r| r.into_inner().key.unwrap())
}

async fn get_key(
    admin: &mut KeyAdminClient<Channel>,
    tenant: &str,
    name: &str,
) -> proto::KeyBinding {
    admin
        .get_key(proto::GetKeyRequest {
            tenant_id: tenant.into(),
            name: name.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
}

/// Imported material rotates the way the customer rotates it: a new
/// version of the same key (Vault's import_version). New DEKs use it, old
/// ones read with a rewrap recommended, then version 1 retires.
#[tokio::test]
async fn imported_keys_take_new_versions_then_retire_the_old_one() {
    let (_dir, server, mut admin, mut broker) = start().await;
    create_tenant_with(&mut admin, "acme", KeyPolicy::Keyring, KeyHierarchy::Direct).await;
    import(&mut admin, "acme", "own", true).await;
    let old = generate(&mut broker, "acme", CTX).await.unwrap();
    assert_eq!(old.key.as_ref().unwrap().provider_key_version, "1");
    let second = crate::common::random_material();
    let key = import_version(&mut admin, "acme", "own", &second)
        .await
        .unwrap();
    assert!(!key.rotation_due);
    let next = key.next_rotation_time.unwrap().seconds;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(next > now + 364 * 86_400, "due a year after the import");
    // The same material twice is refused; so is a version of a missing key.
    let err = import_version(&mut admin, "acme", "own", &second)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = import_version(
        &mut admin,
        "acme",
        "nope",
        &crate::common::random_material(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let new = generate(&mut broker, "acme", CTX).await.unwrap();
    assert_eq!(new.key.as_ref().unwrap().provider_key_version, "2");
    let back = unwrap(&mut broker, "acme", CTX, &old.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext, old.plaintext);
    assert!(back.rewrap_recommended);
    let key = get_key(&mut admin, "acme", "own").await;
    assert_eq!(usage_of(&key.versions, "1").unwrap_count, 1);
    assert_eq!(usage_of(&key.versions, "2").wrap_count, 1);

    let err = retire(&mut admin, "acme", RetireTarget::Key, "own", 2, false)
        .await
        .unwrap_err();
    assert!(
        err.message().contains("version 1 was used"),
        "{}",
        err.message()
    );
    let moved = rewrap(&mut broker, "acme", CTX, &old.wrapped_key)
        .await
        .unwrap();
    assert_eq!(moved.key.unwrap().provider_key_version, "2");
    let done = retire(&mut admin, "acme", RetireTarget::Key, "own", 2, true)
        .await
        .unwrap();
    assert_eq!(done.retired_versions, ["1"]);
    expect_retired(
        &unwrap(&mut broker, "acme", CTX, &old.wrapped_key)
            .await
            .unwrap_err(),
        1,
    );
    for dek in [&moved.wrapped_key, &new.wrapped_key] {
        unwrap(&mut broker, "acme", CTX, dek).await.unwrap();
    }
    let key = get_key(&mut admin, "acme", "own").await;
    assert_eq!(key.min_decryption_version, 2);
    assert!(usage_of(&key.versions, "1").retired);

    // A tenant_key tenant: its tenant key versions move to the new version
    // at once (GetKey shows what each version protects).
    create_tenant_with(
        &mut admin,
        "hier",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    import(&mut admin, "hier", "own", true).await;
    let sealed = generate(&mut broker, "hier", CTX).await.unwrap();
    let before = get_key(&mut admin, "hier", "own").await;
    let protected = usage_of(&before.versions, "1").tenant_key_versions;
    assert!(protected >= 1, "{before:?}");
    import_version(&mut admin, "hier", "own", &crate::common::random_material())
        .await
        .unwrap();
    let after = get_key(&mut admin, "hier", "own").await;
    assert_eq!(
        usage_of(&after.versions, "2").tenant_key_versions,
        protected
    );
    assert_eq!(usage_of(&after.versions, "1").tenant_key_versions, 0);
    // Its DEKs depend on tenant key versions, which moved: nothing uses
    // version 1 any more, so no force is needed.
    retire(&mut admin, "hier", RetireTarget::Key, "own", 2, false)
        .await
        .unwrap();
    let back = unwrap(&mut broker, "hier", CTX, &sealed.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext, sealed.plaintext);
    server.stop().await;
}

/// Past `imported_key_rotation_period`, imported keys are reported due.
#[tokio::test]
async fn imported_keys_are_reported_due_for_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::common::test_config(dir.path());
    config.control.imported_key_rotation_period = Duration::from_millis(1);
    let server = crate::common::TestServer::start(config).await;
    let mut admin = crate::common::admin_client(&server).await;
    create_tenant_with(&mut admin, "acme", KeyPolicy::Keyring, KeyHierarchy::Direct).await;
    import(&mut admin, "acme", "own", true).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(get_key(&mut admin, "acme", "own").await.rotation_due);
    server.stop().await;
}
