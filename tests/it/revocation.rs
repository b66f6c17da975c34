//! Revocation: the customer disables or schedules deletion of their key in
//! (moto's) KMS and keybroker stops serving plaintext within the bound;
//! a definitive error on a live request revokes at once, through one describe
//! of the key (never on the request's word); an outage does not.

use std::time::{Duration, Instant};

use keybroker::proto::key_broker_client::KeyBrokerClient;
use keybroker::proto::{self, key_admin_client::KeyAdminClient};
use tonic::Code;
use tonic::transport::Channel;

use crate::aws_support::{Moto, TENANT, link_request};
use crate::common::{TestServer, admin_client, create_tenant, generate, test_config, unwrap};
use crate::fakes::aws_faults::{Fault, FaultServer};

async fn onboard(admin: &mut KeyAdminClient<Channel>, key_arn: &str) {
    create_tenant(admin, TENANT, proto::KeyPolicy::Unspecified).await;
    admin
        .link_key(link_request("cmk", key_arn, &[], false))
        .await
        .unwrap();
}

async fn key(admin: &mut KeyAdminClient<Channel>) -> proto::KeyBinding {
    admin
        .get_key(proto::GetKeyRequest {
            tenant_id: TENANT.into(),
            name: "cmk".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
}

/// Polls until `done` holds for the unwrap result; returns the delay.
async fn time_until(
    broker: &mut KeyBrokerClient<Channel>,
    wrapped: &[u8],
    limit: Duration,
    done: impl Fn(&Result<Vec<u8>, tonic::Status>) -> bool,
) -> (Duration, Result<Vec<u8>, tonic::Status>) {
    let start = Instant::now();
    loop {
        let result = unwrap(broker, TENANT, &[], wrapped)
            .await
            .map(|r| r.plaintext.to_vec());
        if done(&result) {
            return (start.elapsed(), result);
        }
        assert!(
            start.elapsed() < limit,
            "not observed within {limit:?}: last {result:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn customer_revocation_is_enforced_within_the_bound() {
    let moto = Moto::start();
    let key_arn = moto.create_key("us-east-1", false).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.aws = moto.settings();
    config.aws.max_attempts = 1;
    config.watcher.interval = Duration::from_secs(1);
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    onboard(&mut admin, &key_arn).await;
    let g = generate(&mut broker, TENANT, &[]).await.unwrap();
    assert_eq!(
        unwrap(&mut broker, TENANT, &[], &g.wrapped_key)
            .await
            .map(|r| r.plaintext)
            .unwrap(),
        g.plaintext
    );

    // The watcher's own describe calls are not usage.
    let before = key(&mut admin).await;
    let passes = server.watcher_passes();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let after = key(&mut admin).await;
    assert!(
        server.watcher_passes() > passes,
        "no watcher pass ran during the wait: the check below would prove nothing"
    );
    assert_eq!(
        (before.wrap_count, before.unwrap_count, before.last_use_time),
        (after.wrap_count, after.unwrap_count, after.last_use_time)
    );

    // The customer disables the key: the cached DEK stops being served.
    let kms = moto.kms("us-east-1");
    // moto's key-management calls take bare key ids (real KMS also takes ARNs).
    let key_id = key_arn.rsplit('/').next().unwrap();
    kms.disable_key().key_id(key_id).send().await.unwrap();
    let (delay, result) = time_until(&mut broker, &g.wrapped_key, Duration::from_secs(5), |r| {
        r.is_err()
    })
    .await;
    println!("revocation (DisableKey) observed after {delay:?} with a 1 s watcher interval");
    let err = result.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("'cmk'") && err.message().contains("disabled"),
        "{}",
        err.message()
    );
    assert!(delay <= Duration::from_secs(2), "bound exceeded: {delay:?}");
    let revoked = key(&mut admin).await;
    assert_eq!(revoked.state(), proto::KeyState::Revoked);
    assert!(
        revoked.state_reason.contains("disabled"),
        "{}",
        revoked.state_reason
    );
    let described = broker
        .describe_key(proto::DescribeKeyRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let status = described.bindings.iter().find(|b| b.name == "cmk").unwrap();
    assert_eq!(status.state(), proto::KeyState::Revoked);
    assert!(status.last_check_time.is_some());
    // New wraps fail too: a revoked key is never bypassed.
    let err = broker
        .generate_data_key(proto::GenerateDataKeyRequest {
            tenant_id: TENANT.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Re-enabled: healed on the next check.
    kms.enable_key().key_id(key_id).send().await.unwrap();
    let (delay, result) = time_until(&mut broker, &g.wrapped_key, Duration::from_secs(5), |r| {
        r.is_ok()
    })
    .await;
    println!("re-enable observed after {delay:?}");
    assert_eq!(result.unwrap(), g.plaintext);
    assert_eq!(key(&mut admin).await.state(), proto::KeyState::Active);

    // Scheduled for deletion: revoked the same way.
    kms.schedule_key_deletion()
        .key_id(key_id)
        .pending_window_in_days(7)
        .send()
        .await
        .unwrap();
    let (delay, result) = time_until(&mut broker, &g.wrapped_key, Duration::from_secs(5), |r| {
        r.is_err()
    })
    .await;
    println!("revocation (ScheduleKeyDeletion) observed after {delay:?}");
    assert!(delay <= Duration::from_secs(2), "bound exceeded: {delay:?}");
    let err = result.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("deletion"), "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn a_definitive_error_on_a_live_request_revokes_at_once() {
    let moto = Moto::start();
    let key_arn = moto.create_key("us-east-1", false).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.aws = moto.settings();
    config.watcher.interval = Duration::from_secs(3600);
    let server = TestServer::start(config.clone()).await;
    let mut admin = admin_client(&server).await;
    onboard(&mut admin, &key_arn).await;
    let g = generate(&mut server.client().await, TENANT, &[])
        .await
        .unwrap();
    server.stop().await;

    // Same registry, but KMS now answers DisabledException (real wire
    // format), and DescribeKey, which decides, says disabled too.
    let faults = FaultServer::start().await;
    faults.set(
        "trentservice.decrypt",
        Fault::KmsError(400, "DisabledException"),
    );
    faults.set(
        "trentservice.describekey",
        crate::trust_boundary::described(&key_arn, "Disabled"),
    );
    config.aws.kms_endpoint = Some(faults.url.clone());
    config.aws.sts_endpoint = Some(faults.url.clone());
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    let err = unwrap(&mut broker, TENANT, &[], &g.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let k = key(&mut admin).await;
    assert_eq!(
        k.state(),
        proto::KeyState::Revoked,
        "revoked without waiting for the watcher"
    );
    assert!(k.state_reason.contains("disabled"), "{}", k.state_reason);
    assert!(k.state_reason.contains("EnableKey"), "{}", k.state_reason);
    assert_eq!(
        faults.count("trentservice.describekey"),
        1,
        "revoked by one describe, not by the request"
    );
    // Refused from the registry state now: no further KMS call.
    let err = unwrap(&mut broker, TENANT, &[], &g.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("revoked"), "{}", err.message());
    assert_eq!(faults.count("trentservice.decrypt"), 1);
    server.stop().await;
}

#[tokio::test]
async fn an_outage_is_not_a_revocation() {
    let moto = Moto::start();
    let key_arn = moto.create_key("us-east-1", false).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.aws = moto.settings();
    config.aws.max_attempts = 1;
    config.watcher.interval = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    onboard(&mut admin, &key_arn).await;
    let warm = generate(&mut broker, TENANT, &[]).await.unwrap();
    unwrap(&mut broker, TENANT, &[], &warm.wrapped_key)
        .await
        .map(|r| r.plaintext)
        .unwrap();
    let cold = generate(&mut broker, TENANT, &[]).await.unwrap();

    // KMS (and STS) become unreachable.
    drop(moto);
    let passes = server.watcher_passes();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        server.watcher_passes() > passes,
        "no watcher pass ran during the outage: the checks below would prove nothing"
    );
    assert_eq!(
        unwrap(&mut broker, TENANT, &[], &warm.wrapped_key)
            .await
            .map(|r| r.plaintext)
            .unwrap(),
        warm.plaintext,
        "warm keys keep being served"
    );
    let err = unwrap(&mut broker, TENANT, &[], &cold.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let k = key(&mut admin).await;
    assert_eq!(
        k.state(),
        proto::KeyState::Active,
        "an outage must not revoke: {}",
        k.state_reason
    );
    server.stop().await;
}

/// Two replicas on one PostgreSQL registry. B never checks keys itself and
/// never re-reads the registry on its own (long cache TTL): whatever it
/// learns comes through LISTEN/NOTIFY.
#[tokio::test]
async fn revocation_reaches_every_replica_through_postgres() {
    use sqlx::Connection;
    let moto = Moto::start();
    let key_arn = moto.create_key("us-east-1", false).await;
    let url = crate::common::fresh_postgres_database().await;
    let (a, b, _dirs) = crate::aws_support::replicas_on_postgres(&moto, &url).await;
    let mut admin_a = admin_client(&a).await;
    let mut broker_a = a.client().await;
    let mut broker_b = b.client().await;
    onboard(&mut admin_a, &key_arn).await;
    let g = generate(&mut broker_a, TENANT, &[]).await.unwrap();
    assert_eq!(
        unwrap(&mut broker_b, TENANT, &[], &g.wrapped_key)
            .await
            .map(|r| r.plaintext)
            .unwrap(),
        g.plaintext
    );

    // 1. An operator disables the key on A: B refuses its cached DEK.
    admin_a
        .disable_key(proto::DisableKeyRequest {
            tenant_id: TENANT.into(),
            name: "cmk".into(),
            reason: "incident 42".into(),
            reencrypt_to: "platform".into(),
        })
        .await
        .unwrap();
    let (delay, result) = time_until(&mut broker_b, &g.wrapped_key, Duration::from_secs(1), |r| {
        r.is_err()
    })
    .await;
    println!("operator disable on A enforced by B after {delay:?}");
    assert!(result.unwrap_err().message().contains("incident 42"));
    admin_a
        .enable_key(proto::EnableKeyRequest {
            tenant_id: TENANT.into(),
            name: "cmk".into(),
        })
        .await
        .unwrap();
    let (_, healed) = time_until(&mut broker_b, &g.wrapped_key, Duration::from_secs(1), |r| {
        r.is_ok()
    })
    .await;
    assert_eq!(healed.unwrap(), g.plaintext);

    // 2. The customer disables the key; A's watcher notices; B follows
    // within 1 s of A's revocation.
    let kms = moto.kms("us-east-1");
    let key_id = key_arn.rsplit('/').next().unwrap();
    kms.disable_key().key_id(key_id).send().await.unwrap();
    let start = Instant::now();
    while key(&mut admin_a).await.state() != proto::KeyState::Revoked {
        assert!(start.elapsed() < Duration::from_secs(5), "A never revoked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (delay, _) = time_until(&mut broker_b, &g.wrapped_key, Duration::from_secs(1), |r| {
        r.is_err()
    })
    .await;
    println!("revocation by A's watcher enforced by B after {delay:?}");

    // 3. Kill every LISTEN connection, then heal the key: B reconnects,
    // resynchronises, and serves again.
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    let killed = sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE query ILIKE 'LISTEN%' AND pid <> pg_backend_pid() \
         AND datname = current_database()",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(
        killed.len() >= 2,
        "expected both replicas' listeners, found {}",
        killed.len()
    );
    kms.enable_key().key_id(key_id).send().await.unwrap();
    let (delay, result) = time_until(&mut broker_b, &g.wrapped_key, Duration::from_secs(5), |r| {
        r.is_ok()
    })
    .await;
    println!("after killed LISTEN connections, B served again after {delay:?}");
    assert_eq!(result.unwrap(), g.plaintext);
    a.stop().await;
    b.stop().await;
}

/// Found by the lifecycle model: a key linked as primary while the tenant
/// key versions sat under a key revoked at its provider was stored (and
/// made primary) although the key change to it was refused, so new DEKs
/// went to it with the change never recorded. Now the link is refused
/// whole, and so is every key change away from the revoked key; EnableKey
/// of a revoked key asks the provider first.
#[tokio::test]
async fn a_revoked_key_blocks_take_overs_and_enables_only_when_restored() {
    let moto = Moto::start();
    let key_arn = moto.create_key("us-east-1", false).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.aws = moto.settings();
    config.aws.max_attempts = 1;
    config.watcher.interval = Duration::from_millis(200);
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    crate::common::create_tenant_with(
        &mut admin,
        TENANT,
        proto::KeyPolicy::Unspecified,
        proto::KeyHierarchy::TenantKey,
    )
    .await;
    admin
        .link_key(link_request("cmk", &key_arn, &[], false))
        .await
        .unwrap();
    let g = generate(&mut broker, TENANT, &[]).await.unwrap();
    assert!(
        keybroker::envelope::Envelope::parse(&g.wrapped_key)
            .unwrap()
            .tenant_key_version
            > 0
    );

    let kms = moto.kms("us-east-1");
    let key_id = key_arn.rsplit('/').next().unwrap();
    kms.disable_key().key_id(key_id).send().await.unwrap();
    let started = Instant::now();
    while key(&mut admin).await.state() != proto::KeyState::Revoked {
        assert!(started.elapsed() < Duration::from_secs(5), "never revoked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let material = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
    let err = admin
        .import_key_material(proto::ImportKeyMaterialRequest {
            tenant_id: TENANT.into(),
            name: "mine".into(),
            key_material_base64: material.clone(),
            make_primary: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("'cmk'") && err.message().contains("revoked"),
        "{}",
        err.message()
    );
    let keys = admin
        .list_keys(proto::ListKeysRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1, "the refused link was stored: {keys:?}");
    // Linked without taking over, it is stored; a take-over is refused.
    admin
        .import_key_material(proto::ImportKeyMaterialRequest {
            tenant_id: TENANT.into(),
            name: "mine".into(),
            key_material_base64: material,
            ..Default::default()
        })
        .await
        .unwrap();
    for err in [
        admin
            .set_primary_key(proto::SetPrimaryKeyRequest {
                tenant_id: TENANT.into(),
                name: "mine".into(),
            })
            .await
            .unwrap_err(),
        admin
            .disable_key(proto::DisableKeyRequest {
                tenant_id: TENANT.into(),
                name: "cmk".into(),
                reason: "moving off".into(),
                reencrypt_to: "platform".into(),
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("revoked"), "{}", err.message());
    }
    let shown = admin
        .get_tenant(proto::GetTenantRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert!(
        shown.reencryption.is_none_or(|r| !r.in_progress),
        "a refused change was left in progress"
    );
    assert!(key(&mut admin).await.primary);

    // EnableKey cannot restore what the customer took away...
    let err = admin
        .enable_key(proto::EnableKeyRequest {
            tenant_id: TENANT.into(),
            name: "cmk".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("provider"), "{}", err.message());
    assert_eq!(key(&mut admin).await.state(), proto::KeyState::Revoked);
    let err = unwrap(&mut broker, TENANT, &[], &g.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // ...and restores it at once when the customer has.
    kms.enable_key().key_id(key_id).send().await.unwrap();
    admin
        .enable_key(proto::EnableKeyRequest {
            tenant_id: TENANT.into(),
            name: "cmk".into(),
        })
        .await
        .unwrap();
    assert_eq!(key(&mut admin).await.state(), proto::KeyState::Active);
    assert_eq!(
        unwrap(&mut broker, TENANT, &[], &g.wrapped_key)
            .await
            .unwrap()
            .plaintext,
        g.plaintext
    );
    server.stop().await;
}
