//! KeyAdmin and the data plane together, one test per flow of the products
//! in shared/seeds/, plus bad input and restarts on SQLite and PostgreSQL.
//!
//! Over 600 lines on purpose: one flow per seed product, each short, sharing
//! the same onboarding helpers.

use std::time::Duration;

use keybroker::config::Config;
use keybroker::proto::{self, key_admin_client::KeyAdminClient};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{
    TestServer, admin_client, create_tenant, create_tenant_with, ctx, fresh_postgres_database,
    generate, random_material, test_config, unwrap,
};

type Admin = KeyAdminClient<Channel>;
type Broker = proto::key_broker_client::KeyBrokerClient<Channel>;

/// The context every DEK of these tests is bound to.
const D1: &[(&str, &str)] = &[("dataset", "d1")];

async fn import(
    admin: &mut Admin,
    tenant: &str,
    name: &str,
    material: &str,
    make_primary: bool,
) -> Result<proto::KeyBinding, tonic::Status> {
    admin
        .import_key_material(proto::ImportKeyMaterialRequest {
            tenant_id: tenant.into(),
            name: name.into(),
            description: format!("{name} of {tenant}"),
            key_material_base64: material.into(),
            make_primary,
            new_version: false,
            wrapped_key_material: Vec::new(),
            import_token: String::new(),
        })
        .await
        .map(|r| r.into_inner().key.unwrap())
}

async fn rewrap(broker: &mut Broker, tenant: &str, wrapped: &[u8]) -> proto::RewrapKeyResponse {
    broker
        .rewrap_key(proto::RewrapKeyRequest {
            tenant_id: tenant.into(),
            context: ctx(&[("dataset", "d1")]),
            wrapped_key: wrapped.to_vec(),
            justification: None,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn keys(admin: &mut Admin, tenant: &str) -> Vec<proto::KeyBinding> {
    admin
        .list_keys(proto::ListKeysRequest {
            tenant_id: tenant.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys
}

async fn unlink(
    admin: &mut Admin,
    tenant: &str,
    name: &str,
    force: bool,
) -> Result<(), tonic::Status> {
    admin
        .unlink_key(proto::UnlinkKeyRequest {
            tenant_id: tenant.into(),
            name: name.into(),
            force,
        })
        .await
        .map(|_| ())
}

async fn start(config: Config) -> (TestServer, Admin, Broker) {
    let server = TestServer::start(config).await;
    let admin = admin_client(&server).await;
    let broker = server.client().await;
    (server, admin, broker)
}

#[tokio::test]
async fn onboarding_material_names_the_external_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.control.aws_platform_principal = Some("arn:aws:iam::999988887777:role/keybroker".into());
    config.control.gcp_service_account = Some("keybroker@platform.iam.gserviceaccount.com".into());
    let (server, mut admin, _) = start(config).await;
    let t = create_tenant(&mut admin, "acme", proto::KeyPolicy::Unspecified).await;
    assert_eq!(t.key_policy(), proto::KeyPolicy::Keyring);
    let o = t.onboarding.unwrap();
    assert!(o.aws_external_id.starts_with("kb-") && o.aws_external_id.len() == 35);
    let trust: serde_json::Value = serde_json::from_str(&o.aws_trust_policy_json).unwrap();
    let stmt = &trust["Statement"][0];
    assert_eq!(stmt["Action"], "sts:AssumeRole");
    assert_eq!(
        stmt["Principal"]["AWS"],
        "arn:aws:iam::999988887777:role/keybroker"
    );
    assert_eq!(
        stmt["Condition"]["StringEquals"]["sts:ExternalId"],
        o.aws_external_id
    );
    let key_stmt: serde_json::Value =
        serde_json::from_str(&o.aws_key_policy_statement_json).unwrap();
    for action in [
        "kms:Encrypt",
        "kms:Decrypt",
        "kms:ReEncrypt*",
        "kms:GenerateDataKey*",
        "kms:DescribeKey",
    ] {
        assert!(
            key_stmt["Action"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == action),
            "{action}"
        );
    }
    assert_eq!(
        o.gcp_service_account,
        "keybroker@platform.iam.gserviceaccount.com"
    );
    assert_eq!(o.gcp_role, "roles/cloudkms.cryptoKeyEncrypterDecrypter");

    // Immutable and unique: GetTenant returns the same id; another tenant
    // gets another.
    let again = admin
        .get_tenant(proto::GetTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!(again.onboarding.unwrap().aws_external_id, o.aws_external_id);
    let other = create_tenant(&mut admin, "globex", proto::KeyPolicy::Keyring).await;
    assert_ne!(other.onboarding.unwrap().aws_external_id, o.aws_external_id);
    server.stop().await;
}

/// Pinecone: one key per project, cannot change; deletable only when
/// nothing uses it.
#[tokio::test]
async fn pinecone_single_key_flow() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut admin, mut broker) = start(test_config(dir.path())).await;
    create_tenant(&mut admin, "pine", proto::KeyPolicy::SingleKey).await;
    let key = import(&mut admin, "pine", "project-key", &random_material(), false)
        .await
        .unwrap();
    assert!(key.primary);

    let g = generate(&mut broker, "pine", D1).await.unwrap();
    assert_eq!(g.key.unwrap().key_binding, "project-key");

    let err = import(&mut admin, "pine", "replacement", &random_material(), true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("can never be replaced"),
        "{}",
        err.message()
    );

    // In use: unlink refused, saying when it would go through.
    let err = unlink(&mut admin, "pine", "project-key", false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("used 0s ago"), "{}", err.message());
    let err = admin
        .set_tenant_policy(proto::SetTenantPolicyRequest {
            tenant_id: "pine".into(),
            key_policy: proto::KeyPolicy::Keyring.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Disabling the single key makes new wraps fail rather than silently
    // fall back to the platform key.
    admin
        .disable_key(proto::DisableKeyRequest {
            tenant_id: "pine".into(),
            name: "project-key".into(),
            reason: "customer offboarding".into(),
            reencrypt_to: String::new(),
        })
        .await
        .unwrap();
    let err = generate(&mut broker, "pine", D1).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("customer offboarding"),
        "{}",
        err.message()
    );
    let err = unwrap(&mut broker, "pine", D1, &g.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(keys(&mut admin, "pine").await.len(), 1);
    server.stop().await;
}

/// Pinecone's "Delete a key": once nothing used the project's key for the
/// unlink guard window (the indexes are deleted), it unlinks without force,
/// and what it protected is destroyed with it.
#[tokio::test]
async fn pinecone_deletes_a_key_nothing_uses() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.control.unlink_guard_window = Duration::from_millis(300);
    let (server, mut admin, mut broker) = start(config).await;
    create_tenant_with(
        &mut admin,
        "pine",
        proto::KeyPolicy::SingleKey,
        proto::KeyHierarchy::TenantKey,
    )
    .await;
    import(&mut admin, "pine", "project-key", &random_material(), false)
        .await
        .unwrap();
    // A key that never sealed anything unlinks at once (a typo fixed).
    let spare = create_tenant(&mut admin, "pine-2", proto::KeyPolicy::SingleKey).await;
    assert_eq!(spare.tenant_id, "pine-2");
    import(&mut admin, "pine-2", "typo", &random_material(), false)
        .await
        .unwrap();
    unlink(&mut admin, "pine-2", "typo", false).await.unwrap();
    let g = generate(&mut broker, "pine", D1).await.unwrap();
    let err = unlink(&mut admin, "pine", "project-key", false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let unlinked = admin
        .unlink_key(proto::UnlinkKeyRequest {
            tenant_id: "pine".into(),
            name: "project-key".into(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unlinked.tenant_key_versions_destroyed, 1);
    let err = unwrap(&mut broker, "pine", D1, &g.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(keys(&mut admin, "pine").await.is_empty());
    server.stop().await;
}

/// turbopuffer: the key given on first write is fixed afterwards; the key
/// protects what was written and nothing moves it.
#[tokio::test]
async fn turbopuffer_key_fixed_at_first_use() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.control.unlink_guard_window = Duration::from_millis(1);
    let (server, mut admin, mut broker) = start(config).await;
    create_tenant(&mut admin, "ns-1", proto::KeyPolicy::SingleKey).await;

    // Before first use the key may still be swapped out.
    import(&mut admin, "ns-1", "draft", &random_material(), false)
        .await
        .unwrap();
    unlink(&mut admin, "ns-1", "draft", false).await.unwrap();
    import(&mut admin, "ns-1", "cmek", &random_material(), false)
        .await
        .unwrap();

    let g = generate(&mut broker, "ns-1", D1).await.unwrap();
    assert_eq!(g.key.as_ref().unwrap().key_binding, "cmek");
    tokio::time::sleep(Duration::from_millis(20)).await;
    // After first write: fixed; no other key replaces it.
    let err = import(&mut admin, "ns-1", "other", &random_material(), true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let back = unwrap(&mut broker, "ns-1", D1, &g.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext, g.plaintext);
    assert!(!back.rewrap_recommended);
    server.stop().await;
}

/// Pulumi: several keys, a default key, switch the default, rewrap and
/// disable the old key, disable all → platform key.
#[tokio::test]
async fn pulumi_keyring_flow() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.control.unlink_guard_window = Duration::from_millis(1);
    let (server, mut admin, mut broker) = start(config).await;
    create_tenant(&mut admin, "org", proto::KeyPolicy::Keyring).await;

    // No key yet: the platform key serves the tenant.
    let platform_dek = generate(&mut broker, "org", D1).await.unwrap();
    assert_eq!(platform_dek.key.as_ref().unwrap().key_binding, "platform");

    import(&mut admin, "org", "cmk-a", &random_material(), false)
        .await
        .unwrap();
    import(&mut admin, "org", "cmk-b", &random_material(), false)
        .await
        .unwrap();
    let a_dek = generate(&mut broker, "org", D1).await.unwrap();
    assert_eq!(
        a_dek.key.as_ref().unwrap().key_binding,
        "cmk-a",
        "first key is the default"
    );

    // The platform-wrapped key still reads, flagged for rewrap.
    let back = unwrap(&mut broker, "org", D1, &platform_dek.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext, platform_dek.plaintext);
    assert!(back.rewrap_recommended);

    // Switch the default to cmk-b.
    let b = admin
        .set_primary_key(proto::SetPrimaryKeyRequest {
            tenant_id: "org".into(),
            name: "cmk-b".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert!(b.primary);
    let listed = keys(&mut admin, "org").await;
    assert_eq!(listed.iter().filter(|k| k.primary).count(), 1);
    let b_dek = generate(&mut broker, "org", D1).await.unwrap();
    assert_eq!(b_dek.key.as_ref().unwrap().key_binding, "cmk-b");

    // Disable cmk-a after rewrapping its data keys under cmk-b.
    let a_back = unwrap(&mut broker, "org", D1, &a_dek.wrapped_key)
        .await
        .unwrap();
    assert!(a_back.rewrap_recommended);
    let moved = rewrap(&mut broker, "org", &a_dek.wrapped_key).await;
    assert_eq!(moved.key.as_ref().unwrap().key_binding, "cmk-b");
    assert_eq!(moved.previous_key.as_ref().unwrap().key_binding, "cmk-a");
    admin
        .disable_key(proto::DisableKeyRequest {
            tenant_id: "org".into(),
            name: "cmk-a".into(),
            reason: String::new(),
            reencrypt_to: String::new(),
        })
        .await
        .unwrap();
    // Disabled: unwraps nothing, even what was cached a moment ago.
    let err = unwrap(&mut broker, "org", D1, &a_dek.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("cmk-a") && err.message().contains("disabled"),
        "{}",
        err.message()
    );
    // The rewrapped copy reads under cmk-b.
    let moved_back = unwrap(&mut broker, "org", D1, &moved.wrapped_key)
        .await
        .unwrap();
    assert_eq!(moved_back.plaintext, a_dek.plaintext);
    assert!(!moved_back.rewrap_recommended);

    // Disable all: new wraps fall back to the platform key, which describe
    // reports.
    admin
        .disable_key(proto::DisableKeyRequest {
            tenant_id: "org".into(),
            name: "cmk-b".into(),
            reason: "disable all".into(),
            reencrypt_to: "platform".into(),
        })
        .await
        .unwrap();
    let fallback = generate(&mut broker, "org", D1).await.unwrap();
    assert_eq!(fallback.key.unwrap().key_binding, "platform");
    let described = broker
        .describe_key(proto::DescribeKeyRequest {
            tenant_id: "org".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(described.uses_platform_key);
    let states: Vec<(String, proto::KeyState)> = described
        .bindings
        .iter()
        .map(|b| (b.name.clone(), b.state()))
        .collect();
    assert!(
        states.contains(&("cmk-a".into(), proto::KeyState::Disabled)),
        "{states:?}"
    );
    assert!(
        states.contains(&("cmk-b".into(), proto::KeyState::Disabled)),
        "{states:?}"
    );

    // Enable brings cmk-b back as the default.
    admin
        .enable_key(proto::EnableKeyRequest {
            tenant_id: "org".into(),
            name: "cmk-b".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        generate(&mut broker, "org", D1)
            .await
            .unwrap()
            .key
            .unwrap()
            .key_binding,
        "cmk-b"
    );
    server.stop().await;
}

/// Cube: raw AES-256 key material; newest key encrypts, all keys decrypt;
/// rotate = add a key + rebuild (rewrap); drop the old key afterwards.
#[tokio::test]
async fn cube_imported_keys_flow() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.control.unlink_guard_window = Duration::from_millis(300);
    config.registry.usage_flush_interval = Duration::from_millis(100);
    let (server, mut admin, mut broker) = start(config).await;
    create_tenant(&mut admin, "cube", proto::KeyPolicy::Keyring).await;

    import(&mut admin, "cube", "k-2026-01", &random_material(), true)
        .await
        .unwrap();
    let old: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(generate(&mut broker, "cube", D1).await.unwrap());
        }
        v
    };
    // Rotate: the newest key encrypts.
    import(&mut admin, "cube", "k-2026-02", &random_material(), true)
        .await
        .unwrap();
    let new = generate(&mut broker, "cube", D1).await.unwrap();
    assert_eq!(new.key.unwrap().key_binding, "k-2026-02");
    // All keys decrypt; which key protects what is visible.
    for g in &old {
        let back = unwrap(&mut broker, "cube", D1, &g.wrapped_key)
            .await
            .unwrap();
        assert_eq!(back.plaintext, g.plaintext);
        assert_eq!(back.key.unwrap().key_binding, "k-2026-01");
        assert!(back.rewrap_recommended);
    }
    let k1 = admin
        .get_key(proto::GetKeyRequest {
            tenant_id: "cube".into(),
            name: "k-2026-01".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(
        (k1.wrap_count, k1.unwrap_count),
        (3, 3),
        "live usage counters"
    );
    assert!(k1.last_use_time.is_some());

    // Dropping the old key while in use is refused.
    let err = unlink(&mut admin, "cube", "k-2026-01", false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("force"), "{}", err.message());

    // Rebuild: rewrap everything, then the old key can go.
    let rebuilt: Vec<_> = {
        let mut v = Vec::new();
        for g in &old {
            v.push(rewrap(&mut broker, "cube", &g.wrapped_key).await);
        }
        v
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    unlink(&mut admin, "cube", "k-2026-01", false)
        .await
        .unwrap();
    for (g, r) in old.iter().zip(&rebuilt) {
        let back = unwrap(&mut broker, "cube", D1, &r.wrapped_key)
            .await
            .unwrap();
        assert_eq!(back.plaintext, g.plaintext);
        // A key wrapped under the dropped key no longer resolves.
        let err = unwrap(&mut broker, "cube", D1, &g.wrapped_key)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }
    assert_eq!(keys(&mut admin, "cube").await.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn bad_admin_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut admin, _) = start(test_config(dir.path())).await;
    create_tenant(&mut admin, "acme", proto::KeyPolicy::Keyring).await;
    import(&mut admin, "acme", "k1", &random_material(), false)
        .await
        .unwrap();
    let before = keys(&mut admin, "acme").await;

    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let material_cases = [
        (b64.encode([1u8; 31]), "31 bytes"),
        (b64.encode([1u8; 33]), "33 bytes"),
        (String::new(), "empty"),
        ("!!!not-base64!!!".to_string(), "not base64"),
        (format!(" {}", random_material()), "whitespace"),
    ];
    for (material, why) in material_cases {
        let err = import(&mut admin, "acme", "k2", &material, false)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{why}: {err:?}");
    }
    for (name, why) in [
        ("", "empty name"),
        ("platform", "reserved"),
        ("a/b", "bad chars"),
    ] {
        let err = import(&mut admin, "acme", name, &random_material(), false)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{why}: {err:?}");
    }
    let err = import(&mut admin, "acme", "k1", &random_material(), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = import(&mut admin, "nobody", "k1", &random_material(), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("CreateTenant"), "{}", err.message());

    let err = admin
        .create_tenant(proto::CreateTenantRequest {
            tenant_id: "acme".into(),
            key_policy: 0,
            key_hierarchy: proto::KeyHierarchy::Direct.into(),
            newest_import_primary: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    for (tenant, policy) in [("", 0), ("bad tenant", 0), ("fine", 7)] {
        let err = admin
            .create_tenant(proto::CreateTenantRequest {
                tenant_id: tenant.into(),
                key_policy: policy,
                key_hierarchy: proto::KeyHierarchy::Direct.into(),
                newest_import_primary: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{tenant:?}/{policy}");
    }

    // Cloud keys: malformed references are INVALID_ARGUMENT.
    let link =
        |provider: proto::Provider, key: &str, region: &str, role: &str| proto::LinkKeyRequest {
            tenant_id: "acme".into(),
            name: "cloud".into(),
            description: String::new(),
            provider: provider.into(),
            key_reference: key.into(),
            region: region.into(),
            role_arn: role.into(),
            service_account: String::new(),
            make_primary: false,
            replica_regions: Vec::new(),
            vault_approle: None,
            azure_tenant_id: String::new(),
            vault_jwt: None,
        };
    let good_role = "arn:aws:iam::111122223333:role/keybroker";
    let good_arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    for req in [
        link(
            proto::Provider::AwsKms,
            "arn:aws:kms:us-east-1:123:key/x",
            "us-east-1",
            good_role,
        ),
        link(
            proto::Provider::AwsKms,
            "not-an-arn",
            "us-east-1",
            good_role,
        ),
        link(proto::Provider::AwsKms, good_arn, "eu-west-1", good_role),
        link(
            proto::Provider::AwsKms,
            good_arn,
            "us-east-1",
            "arn:aws:iam::111122223333:user/x",
        ),
        link(
            proto::Provider::GcpKms,
            "projects/p/locations/l/keyRings/r",
            "",
            "",
        ),
        link(
            proto::Provider::Unspecified,
            good_arn,
            "us-east-1",
            good_role,
        ),
        link(proto::Provider::Local, "x", "", ""),
        // Replicas: by key ARN (aliases are per region), in other regions.
        proto::LinkKeyRequest {
            replica_regions: vec!["us-west-2".into()],
            ..link(
                proto::Provider::AwsKms,
                "arn:aws:kms:us-east-1:111122223333:alias/prod",
                "us-east-1",
                good_role,
            )
        },
        proto::LinkKeyRequest {
            replica_regions: vec!["us-east-1".into()],
            ..link(
                proto::Provider::AwsKms,
                "arn:aws:kms:us-east-1:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab",
                "us-east-1",
                good_role,
            )
        },
    ] {
        let err = admin.link_key(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err:?}");
    }
    // Missing keys and tenants.
    let err = admin
        .get_key(proto::GetKeyRequest {
            tenant_id: "acme".into(),
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    for err in [
        admin
            .set_primary_key(proto::SetPrimaryKeyRequest {
                tenant_id: "acme".into(),
                name: "nope".into(),
            })
            .await
            .unwrap_err(),
        admin
            .disable_key(proto::DisableKeyRequest {
                tenant_id: "acme".into(),
                name: "nope".into(),
                reason: String::new(),
                reencrypt_to: String::new(),
            })
            .await
            .unwrap_err(),
        admin
            .list_keys(proto::ListKeysRequest {
                tenant_id: "nobody".into(),
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }

    // Read back: nothing changed.
    let after = keys(&mut admin, "acme").await;
    assert_eq!(before, after);
    server.stop().await;
}

async fn restart_keeps_everything(config: Config) {
    let (server, mut admin, mut broker) = start(config.clone()).await;
    create_tenant(&mut admin, "acme", proto::KeyPolicy::Keyring).await;
    let platform_dek = generate(&mut broker, "acme", D1).await.unwrap();
    import(&mut admin, "acme", "k1", &random_material(), false)
        .await
        .unwrap();
    let k1_dek = generate(&mut broker, "acme", D1).await.unwrap();
    import(&mut admin, "acme", "k2", &random_material(), true)
        .await
        .unwrap();
    let k2_dek = generate(&mut broker, "acme", D1).await.unwrap();
    create_tenant(&mut admin, "pine", proto::KeyPolicy::SingleKey).await;
    import(&mut admin, "pine", "only", &random_material(), false)
        .await
        .unwrap();
    let before = keys(&mut admin, "acme").await;
    server.stop().await;

    let (server, mut admin, mut broker) = start(config).await;
    let after = keys(&mut admin, "acme").await;
    assert_eq!(after.len(), 2);
    for (a, b) in before.iter().zip(&after) {
        assert_eq!((&a.name, a.primary, a.state), (&b.name, b.primary, b.state));
    }
    // Usage written at shutdown survived.
    assert!(after.iter().find(|k| k.name == "k1").unwrap().wrap_count >= 1);
    // A DEK from the tenant's days on the platform key was sealed under a
    // tenant key version, which each new primary took over (k1, then k2);
    // the direct tenant's DEKs stay with the key that wrapped them.
    for (g, binding) in [(&platform_dek, "k2"), (&k1_dek, "k1"), (&k2_dek, "k2")] {
        let back = unwrap(&mut broker, "acme", D1, &g.wrapped_key)
            .await
            .unwrap();
        assert_eq!(back.plaintext, g.plaintext);
        assert_eq!(back.key.unwrap().key_binding, binding);
    }
    assert_eq!(
        generate(&mut broker, "acme", D1)
            .await
            .unwrap()
            .key
            .unwrap()
            .key_binding,
        "k2"
    );
    let err = import(&mut admin, "pine", "second", &random_material(), false)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "policy survived the restart"
    );
    server.stop().await;
}

#[tokio::test]
async fn restart_on_sqlite_keeps_bindings_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    restart_keeps_everything(test_config(dir.path())).await;
}

#[tokio::test]
async fn restart_on_postgres_keeps_bindings_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.registry.url = Some(fresh_postgres_database().await.parse().unwrap());
    restart_keeps_everything(config).await;
}

#[tokio::test]
async fn two_servers_share_one_postgres_registry() {
    // Replicas: a key imported through one is usable through the other once
    // its tenant view expires (registry_cache_ttl).
    let url = fresh_postgres_database().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // Both replicas need the same platform keyring (a shared Secret in k8s).
    let mut configs: Vec<Config> = dirs.iter().map(|d| test_config(d.path())).collect();
    for c in &mut configs {
        c.registry.url = Some(url.parse().unwrap());
        c.registry.cache_ttl = Duration::from_millis(200);
    }
    let (a, mut admin_a, mut broker_a) = start(configs[0].clone()).await;
    std::fs::copy(
        configs[0].platform_keyring_path(),
        configs[1].platform_keyring_path(),
    )
    .unwrap();
    let (b, _, mut broker_b) = start(configs[1].clone()).await;
    create_tenant(&mut admin_a, "acme", proto::KeyPolicy::Keyring).await;
    // Replica b caches acme's (empty) view now.
    assert_eq!(
        generate(&mut broker_b, "acme", D1)
            .await
            .unwrap()
            .key
            .unwrap()
            .key_binding,
        "platform"
    );
    import(&mut admin_a, "acme", "k1", &random_material(), false)
        .await
        .unwrap();
    let g = generate(&mut broker_a, "acme", D1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let back = unwrap(&mut broker_b, "acme", D1, &g.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext, g.plaintext);
    assert_eq!(
        generate(&mut broker_b, "acme", D1)
            .await
            .unwrap()
            .key
            .unwrap()
            .key_binding,
        "k1"
    );
    a.stop().await;
    b.stop().await;
}
