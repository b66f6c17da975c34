//! The gcp-kms provider, through Google's Rust client, against the fake
//! Cloud KMS (`gcp_fake.rs`). What covers what:
//! - the data plane and LinkKey end to end: link with a real round trip,
//!   generate, wrap, unwrap, rewrap, version names in the envelope, AAD;
//! - rotation: new wraps use the new primary, old wrapped keys stay readable,
//!   `rewrap_recommended` and RewrapKey move them;
//! - version states: a disabled or destroyed old version fails only its own
//!   data (binding stays active); a disabled primary revokes the binding and
//!   re-enabling heals it; permission denied; not found; wrong purpose;
//! - integrity: a corrupted response CRC32C or unconfirmed request checksums
//!   are UNAVAILABLE, never a key, never a revocation;
//! - throttling and outages: codes and retry counts;
//! - fidelity: Google's Python client (`google-cloud-kms`, REST transport,
//!   anonymous credentials) drives the fake through the same behaviours.
//!
//! Over 600 lines on purpose: every test shares the fake and its setup, and
//! the list above is the map of what covers what.

use std::time::Duration;

use keybroker::envelope::Envelope;
use keybroker::kms::gcp::{GcpCredentials, GcpSettings};
use keybroker::proto;
use tonic::Code;

use crate::common::{TestServer, admin_client, ctx, generate_req, test_config, unwrap_req};
use crate::fakes::gcp::{
    CloudKmsAdmin, CryptoKeyPurpose, CryptoKeyVersionState, FakeCloudKms, Faults,
};

const TENANT: &str = "acme";

fn settings(fake: &FakeCloudKms) -> GcpSettings {
    GcpSettings {
        endpoint: Some(fake.url.clone()),
        credentials: GcpCredentials::Anonymous,
        max_attempts: 3,
        attempt_timeout: Duration::from_secs(2),
        operation_timeout: Duration::from_secs(5),
        ..GcpSettings::default()
    }
}

struct Env {
    fake: FakeCloudKms,
    kms: CloudKmsAdmin,
    server: TestServer,
    admin: proto::key_admin_client::KeyAdminClient<tonic::transport::Channel>,
    broker: proto::key_broker_client::KeyBrokerClient<tonic::transport::Channel>,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn start(watcher_interval: Duration) -> Self {
        let fake = FakeCloudKms::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        config.gcp = settings(&fake);
        config.watcher.interval = watcher_interval;
        let server = TestServer::start(config).await;
        let mut admin = admin_client(&server).await;
        let broker = server.client().await;
        admin
            .create_tenant(proto::CreateTenantRequest {
                tenant_id: TENANT.into(),
                key_policy: 0,
                key_hierarchy: proto::KeyHierarchy::Direct.into(),
                newest_import_primary: false,
            })
            .await
            .unwrap();
        // The customer labels their keys as onboarding says.
        let kms = CloudKmsAdmin::connect(&fake.url)
            .await
            .owned_by(&crate::common::external_id(&mut admin, TENANT).await);
        Self {
            fake,
            kms,
            server,
            admin,
            broker,
            _dir: dir,
        }
    }

    async fn link(&mut self, name: &str, key: &str) -> Result<proto::KeyBinding, tonic::Status> {
        self.admin
            .link_key(proto::LinkKeyRequest {
                tenant_id: TENANT.into(),
                name: name.into(),
                description: "customer key in Cloud KMS".into(),
                provider: proto::Provider::GcpKms.into(),
                key_reference: key.into(),
                make_primary: true,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().key.unwrap())
    }

    async fn generate(
        &mut self,
        c: &[(&str, &str)],
    ) -> Result<proto::GenerateDataKeyResponse, tonic::Status> {
        self.broker
            .generate_data_key(generate_req(TENANT, c))
            .await
            .map(|r| r.into_inner())
    }

    async fn unwrap(
        &mut self,
        c: &[(&str, &str)],
        wrapped: &[u8],
    ) -> Result<proto::UnwrapKeyResponse, tonic::Status> {
        self.broker
            .unwrap_key(unwrap_req(TENANT, c, wrapped))
            .await
            .map(|r| r.into_inner())
    }

    async fn key_state(&mut self, name: &str) -> (proto::KeyState, String) {
        let key = self
            .admin
            .get_key(proto::GetKeyRequest {
                tenant_id: TENANT.into(),
                name: name.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
        (key.state(), key.state_reason)
    }

    /// Drops the binding's cached DEKs (an operator disable + enable), so
    /// the next unwrap reaches Cloud KMS.
    async fn purge(&mut self, name: &str) {
        self.admin
            .disable_key(proto::DisableKeyRequest {
                tenant_id: TENANT.into(),
                name: name.into(),
                reason: "test purge".into(),
                reencrypt_to: "platform".into(),
            })
            .await
            .unwrap();
        self.admin
            .enable_key(proto::EnableKeyRequest {
                tenant_id: TENANT.into(),
                name: name.into(),
            })
            .await
            .unwrap();
    }

    async fn wait_for_state(&mut self, name: &str, want: proto::KeyState) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (state, reason) = self.key_state(name).await;
            if state == want {
                return reason;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "binding {name} stayed {state:?} ({reason}), expected {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn version_of(wrapped: &[u8]) -> String {
    Envelope::parse(wrapped).unwrap().provider_key_version
}

#[tokio::test]
async fn gcp_kms_flow_and_rotation_through_the_fake() {
    let mut env = Env::start(Duration::from_secs(3600)).await;
    let key = env.kms.create_key("tenant-keys", "acme-cmek").await;

    // LinkKey verifies with a real round trip before storing anything.
    let linked = env.link("gcp-1", &key).await.unwrap();
    assert!(linked.primary);
    assert_eq!(linked.provider(), proto::Provider::GcpKms);
    assert_eq!(linked.key_reference, key);
    assert_eq!(
        env.fake.calls("encrypt"),
        1,
        "link round trip encrypts once"
    );
    assert_eq!(
        env.fake.calls("decrypt"),
        1,
        "link round trip decrypts once"
    );

    let c = [("dataset", "d1")];
    let g = env.generate(&c).await.unwrap();
    assert_eq!(g.plaintext.len(), 32);
    let info = g.key.clone().unwrap();
    assert_eq!(info.key_binding, "gcp-1");
    assert_eq!(info.provider(), proto::Provider::GcpKms);
    let v1 = format!("{key}/cryptoKeyVersions/1");
    assert_eq!(info.provider_key_version, v1);
    assert_eq!(
        version_of(&g.wrapped_key),
        v1,
        "the envelope keeps the version Cloud KMS used"
    );

    // Unwrap: first from Cloud KMS, then from the cache.
    let decrypts = env.fake.calls("decrypt");
    let u = env.unwrap(&c, &g.wrapped_key).await.unwrap();
    assert_eq!(u.plaintext, g.plaintext);
    let u = env.unwrap(&c, &g.wrapped_key).await.unwrap();
    assert_eq!(u.plaintext, g.plaintext);
    assert!(!u.rewrap_recommended);
    assert!(
        env.fake.calls("decrypt") <= decrypts + 1,
        "a cached key costs no Decrypt"
    );

    // The context is AAD: another context does not decrypt.
    let err = env
        .unwrap(&[("dataset", "d2")], &g.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("could not decrypt"),
        "{}",
        err.message()
    );
    assert_eq!(env.key_state("gcp-1").await.0, proto::KeyState::Active);

    // The customer rotates in Cloud KMS: new wraps use version 2 ...
    let v2 = env.kms.rotate(&key).await;
    assert_eq!(v2, format!("{key}/cryptoKeyVersions/2"));
    let g2 = env.generate(&c).await.unwrap();
    assert_eq!(version_of(&g2.wrapped_key), v2);
    // ... old wrapped keys stay readable (from Cloud KMS, not the cache) ...
    env.purge("gcp-1").await;
    let decrypts = env.fake.calls("decrypt");
    let old = env.unwrap(&c, &g.wrapped_key).await.unwrap();
    assert_eq!(old.plaintext, g.plaintext);
    assert_eq!(env.fake.calls("decrypt"), decrypts + 1);
    // ... and are flagged for rewrap, which moves them to version 2.
    assert!(
        old.rewrap_recommended,
        "a version-1 key is behind the primary"
    );
    let fresh = env.unwrap(&c, &g2.wrapped_key).await.unwrap();
    assert!(!fresh.rewrap_recommended);
    let rewrapped = env
        .broker
        .rewrap_key(proto::RewrapKeyRequest {
            tenant_id: TENANT.into(),
            context: ctx(&c),
            wrapped_key: g.wrapped_key.clone(),
            justification: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version_of(&rewrapped.wrapped_key), v2);
    assert_eq!(rewrapped.previous_key.unwrap().provider_key_version, v1);
    let back = env.unwrap(&c, &rewrapped.wrapped_key).await.unwrap();
    assert_eq!(back.plaintext, g.plaintext);

    // WrapKey of caller-supplied bytes, and DescribeKey's current version.
    let wrapped = env
        .broker
        .wrap_key(proto::WrapKeyRequest {
            tenant_id: TENANT.into(),
            context: ctx(&c),
            plaintext: vec![7u8; 32],
            justification: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version_of(&wrapped.wrapped_key), v2);
    let described = env
        .broker
        .describe_key(proto::DescribeKeyRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let binding = described
        .bindings
        .iter()
        .find(|b| b.name == "gcp-1")
        .unwrap();
    assert_eq!(binding.current_key_version, v2);
    assert_eq!(described.primary.unwrap().provider_key_version, v2);
    env.server.stop().await;
}

#[tokio::test]
async fn gcp_link_refuses_what_cannot_work() {
    let mut env = Env::start(Duration::from_secs(3600)).await;
    // A malformed resource name never reaches Cloud KMS.
    let err = env
        .link("bad", "projects/p/keyRings/r/cryptoKeys/k")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("projects/PROJECT/locations/LOCATION"),
        "{}",
        err.message()
    );

    let missing = format!(
        "{}/keyRings/none/cryptoKeys/none",
        crate::fakes::gcp::PARENT
    );
    let err = env.link("missing", &missing).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("does not exist"),
        "{}",
        err.message()
    );

    let signing = env
        .kms
        .create_key_with("tenant-keys", "signing", CryptoKeyPurpose::AsymmetricSign)
        .await;
    let err = env.link("signing", &signing).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("ENCRYPT_DECRYPT"),
        "{}",
        err.message()
    );

    let denied = env.kms.create_key("tenant-keys", "not-granted").await;
    env.kms
        .grant_only(
            &denied,
            &["serviceAccount:someone-else@other.iam.gserviceaccount.com"],
        )
        .await;
    let err = env.link("denied", &denied).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("roles/cloudkms.cryptoKeyEncrypterDecrypter"),
        "the message says which role to grant: {}",
        err.message()
    );

    let disabled = env.kms.create_key("tenant-keys", "disabled").await;
    env.kms
        .set_version_state(
            &format!("{disabled}/cryptoKeyVersions/1"),
            CryptoKeyVersionState::Disabled,
        )
        .await;
    let err = env.link("disabled", &disabled).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("Disabled"), "{}", err.message());

    // The ownership proof: a key without the tenant's label, or labelled for
    // another tenant, is refused after the describe and before any encrypt,
    // with the command that sets the label; the found value is not echoed.
    let encrypts = env.fake.calls("encrypt");
    let unlabelled = CloudKmsAdmin::connect(&env.fake.url)
        .await
        .create_key("tenant-keys", "unlabelled")
        .await;
    let err = env.link("unlabelled", &unlabelled).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let own = crate::common::external_id(&mut env.admin, TENANT).await;
    assert!(
        err.message().contains("keybroker-tenant label is missing")
            && err.message().contains(&format!(
                "gcloud kms keys update unlabelled --keyring tenant-keys --location us-east1 --project customer-project --update-labels keybroker-tenant={own}"
            )),
        "{}",
        err.message()
    );
    let others = CloudKmsAdmin::connect(&env.fake.url)
        .await
        .owned_by("kb-0123456789abcdef0123456789abcdef")
        .create_key("tenant-keys", "someone-elses")
        .await;
    let err = env.link("others", &others).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("names another tenant")
            && !err.message().contains("0123456789abcdef"),
        "{}",
        err.message()
    );
    assert_eq!(
        env.fake.calls("encrypt"),
        encrypts,
        "no wrap before the proof"
    );

    // Nothing was stored.
    let keys = env
        .admin
        .list_keys(proto::ListKeysRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn gcp_version_states_and_access() {
    let mut env = Env::start(Duration::from_millis(200)).await;
    let key = env.kms.create_key("tenant-keys", "acme-states").await;
    env.link("gcp-1", &key).await.unwrap();
    let c = [("dataset", "d1")];
    let under_v1 = env.generate(&c).await.unwrap();
    let v1 = format!("{key}/cryptoKeyVersions/1");
    env.kms.rotate(&key).await;
    let under_v2 = env.generate(&c).await.unwrap();

    // The customer disables the old version: its data is unreadable, but the
    // key (primary v2) works and the binding stays active.
    env.kms
        .set_version_state(&v1, CryptoKeyVersionState::Disabled)
        .await;
    env.purge("gcp-1").await;
    let err = env.unwrap(&c, &under_v1.wrapped_key).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("version"), "{}", err.message());
    assert!(err.message().contains("DISABLED"), "{}", err.message());
    assert_eq!(env.key_state("gcp-1").await.0, proto::KeyState::Active);
    assert_eq!(
        env.unwrap(&c, &under_v2.wrapped_key)
            .await
            .unwrap()
            .plaintext,
        under_v2.plaintext
    );
    env.generate(&c).await.unwrap();

    // Destroyed (scheduled) likewise.
    env.kms.destroy(&v1).await;
    let err = env.unwrap(&c, &under_v1.wrapped_key).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("DESTROY_SCHEDULED"),
        "{}",
        err.message()
    );
    assert_eq!(env.key_state("gcp-1").await.0, proto::KeyState::Active);

    // The customer disables the primary: the key is unusable, the binding is
    // revoked (watcher) and unwraps fail, cached ones included.
    let v2 = format!("{key}/cryptoKeyVersions/2");
    env.kms
        .set_version_state(&v2, CryptoKeyVersionState::Disabled)
        .await;
    let reason = env.wait_for_state("gcp-1", proto::KeyState::Revoked).await;
    assert!(reason.contains("disabled"), "{reason}");
    let err = env.unwrap(&c, &under_v2.wrapped_key).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = env.generate(&c).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Re-enabled: the watcher heals the binding.
    env.kms
        .set_version_state(&v2, CryptoKeyVersionState::Enabled)
        .await;
    env.wait_for_state("gcp-1", proto::KeyState::Active).await;
    assert_eq!(
        env.unwrap(&c, &under_v2.wrapped_key)
            .await
            .unwrap()
            .plaintext,
        under_v2.plaintext
    );

    // Access removed: PERMISSION_DENIED revokes at once on a request.
    // (Purged before: EnableKey confirms the key at the provider.)
    env.purge("gcp-1").await;
    env.kms
        .grant_only(
            &key,
            &["serviceAccount:someone-else@other.iam.gserviceaccount.com"],
        )
        .await;
    let err = env.unwrap(&c, &under_v2.wrapped_key).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("may not use key"),
        "{}",
        err.message()
    );
    assert!(
        err.message()
            .contains("roles/cloudkms.cryptoKeyEncrypterDecrypter"),
        "{}",
        err.message()
    );
    assert_eq!(env.key_state("gcp-1").await.0, proto::KeyState::Revoked);
    env.kms.grant_only(&key, &["allUsers"]).await;
    env.wait_for_state("gcp-1", proto::KeyState::Active).await;
    assert_eq!(
        env.unwrap(&c, &under_v2.wrapped_key)
            .await
            .unwrap()
            .plaintext,
        under_v2.plaintext
    );
    env.server.stop().await;
}

#[tokio::test]
async fn gcp_integrity_throttling_and_outages() {
    let mut env = Env::start(Duration::from_secs(3600)).await;
    let key = env.kms.create_key("tenant-keys", "acme-integrity").await;
    env.link("gcp-1", &key).await.unwrap();
    let c = [("dataset", "d1")];
    let g = env.generate(&c).await.unwrap();
    env.purge("gcp-1").await;

    // A response whose CRC32C does not match: UNAVAILABLE, no key, nothing
    // cached, no revocation.
    env.fake.set_faults(Faults {
        corrupt_response_crc: true,
        ..Faults::default()
    });
    let err = env.unwrap(&c, &g.wrapped_key).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("CRC32C"), "{}", err.message());
    let err = env.generate(&c).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("CRC32C"), "{}", err.message());

    // Request checksums Cloud KMS did not confirm: the same.
    env.fake.set_faults(Faults {
        unverified_request: true,
        ..Faults::default()
    });
    let err = env.generate(&c).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("did not confirm"),
        "{}",
        err.message()
    );
    assert_eq!(env.key_state("gcp-1").await.0, proto::KeyState::Active);

    // Healthy again: the same wrapped key unwraps (the failure was not cached).
    env.fake.set_faults(Faults::default());
    assert_eq!(
        env.unwrap(&c, &g.wrapped_key).await.unwrap().plaintext,
        g.plaintext
    );

    // One 503 is retried inside the call; a lasting outage is UNAVAILABLE
    // after the configured 3 attempts.
    env.purge("gcp-1").await;
    env.fake.set_faults(Faults {
        unavailable_calls: 1,
        ..Faults::default()
    });
    let before = env.fake.calls("decrypt");
    assert_eq!(
        env.unwrap(&c, &g.wrapped_key).await.unwrap().plaintext,
        g.plaintext
    );
    assert_eq!(env.fake.calls("decrypt"), before + 1, "the 503 was retried");
    env.fake.set_faults(Faults {
        unavailable_calls: 100,
        ..Faults::default()
    });
    let err = env.generate(&c).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    env.fake.set_faults(Faults {
        exhausted_calls: 1,
        ..Faults::default()
    });
    let err = env.generate(&c).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("quota"), "{}", err.message());
    assert_eq!(
        env.key_state("gcp-1").await.0,
        proto::KeyState::Active,
        "outages never revoke"
    );
    env.server.stop().await;
}

/// The fake's fidelity: Google's Python client, over its REST transport with
/// anonymous credentials, sees the behaviours the Rust provider relies on.
#[tokio::test]
async fn google_python_client_agrees_with_the_fake() {
    let fake = FakeCloudKms::start().await;
    let report = crate::common::python_fidelity(
        "gcp_fidelity.py",
        "google-cloud-kms",
        vec![fake.url.clone()],
        vec![],
        &[
            "encrypt_names_primary_version",
            "response_crc32c_matches",
            "request_crc32c_verified",
            "decrypt_round_trip",
            "wrong_aad_invalid_argument",
            "bad_request_crc32c_invalid_argument",
            "rotation_keeps_old_versions",
            "disabled_version_failed_precondition",
            "destroyed_version_failed_precondition",
            "disabled_primary_encrypt_failed_precondition",
            "permission_denied",
            "not_found",
            "crypto_key_fields",
            "labels_round_trip",
            "bad_label_invalid_argument",
            "bad_label_invalid_argument_status",
        ],
    )
    .await;
    // A ciphertext made by the Python client decrypts with the Rust client.
    let key = report["key"].as_str().unwrap();
    let ciphertext = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        report["ciphertext"].as_str().unwrap(),
    )
    .unwrap();
    let rust = google_cloud_kms_v1::client::KeyManagementService::builder()
        .with_endpoint(&fake.url)
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .build()
        .await
        .unwrap();
    let plain = rust
        .decrypt()
        .set_name(key)
        .set_ciphertext(ciphertext)
        .set_additional_authenticated_data(bytes::Bytes::from_static(b"python-aad"))
        .send()
        .await
        .unwrap();
    assert_eq!(&plain.plaintext[..], b"made by the python client");
}

/// Per-binding service-account impersonation, end to end in the real binary:
/// keybroker's own identity comes from an ADC file (`authorized_user`, token
/// endpoint on the fake); Google's impersonation code calls
/// `iamcredentials.googleapis.com` (through an HTTPS proxy to the fake, whose
/// certificate the child alone trusts); Cloud KMS calls carry the tenant
/// service account's token, and the fake enforces each key's IAM policy.
#[tokio::test]
async fn gcp_impersonation_isolates_tenants() {
    use crate::fakes::gcp::GoogleApisProxy;
    use crate::process::Process;
    const PLATFORM: &str = "keybroker@platform-project.iam.gserviceaccount.com";
    const ACME_SA: &str = "kb-acme@platform-project.iam.gserviceaccount.com";
    const OTHER_SA: &str = "kb-other@platform-project.iam.gserviceaccount.com";
    const FOREIGN_SA: &str = "not-ours@elsewhere.iam.gserviceaccount.com";

    let fake = FakeCloudKms::start().await;
    let proxy = GoogleApisProxy::start(&fake).await;
    let kms = CloudKmsAdmin::connect(&fake.url).await;
    let key = kms.create_key("tenant-keys", "acme-isolated").await;
    // The customer grants only the tenant's own service account.
    kms.grant_only(&key, &[&format!("serviceAccount:{ACME_SA}")])
        .await;
    fake.allow_impersonation(ACME_SA, &format!("serviceAccount:{PLATFORM}"));
    fake.allow_impersonation(OTHER_SA, &format!("serviceAccount:{PLATFORM}"));

    let dir = tempfile::tempdir().unwrap();
    let adc = dir.path().join("adc.json");
    std::fs::write(
        &adc,
        serde_json::json!({
            "type": "authorized_user",
            "client_id": PLATFORM,
            "client_secret": "test-secret",
            "refresh_token": "test-refresh-token",
            "token_uri": format!("{}/token", fake.url),
        })
        .to_string(),
    )
    .unwrap();
    let ca = dir.path().join("google-ca.pem");
    std::fs::write(&ca, &proxy.ca_pem).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let server = Process::spawn_env(
        &data,
        &[
            "--gcp-kms-endpoint",
            &fake.url,
            "--gcp-credentials",
            "default",
        ],
        &[
            ("GOOGLE_APPLICATION_CREDENTIALS", adc.to_str().unwrap()),
            ("HTTPS_PROXY", &proxy.url),
            ("NO_PROXY", "127.0.0.1,localhost"),
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
            ("SSL_CERT_DIR", dir.path().to_str().unwrap()),
        ],
    );
    let channel = server.channel().await;
    let mut admin = proto::key_admin_client::KeyAdminClient::new(channel.clone());
    let mut broker = proto::key_broker_client::KeyBrokerClient::new(channel);
    admin
        .create_tenant(proto::CreateTenantRequest {
            tenant_id: TENANT.into(),
            key_policy: 0,
            key_hierarchy: proto::KeyHierarchy::Direct.into(),
            newest_import_primary: false,
        })
        .await
        .unwrap();
    kms.label_owner(&key, &crate::common::external_id(&mut admin, TENANT).await)
        .await;
    let link = |name: &str, sa: &str| proto::LinkKeyRequest {
        tenant_id: TENANT.into(),
        name: name.into(),
        provider: proto::Provider::GcpKms.into(),
        key_reference: key.clone(),
        service_account: sa.into(),
        make_primary: true,
        ..Default::default()
    };

    // Refused, with what to fix: keybroker's own identity and another
    // tenant's service account are not granted on the key; a service
    // account keybroker may not impersonate yields no token at all.
    let other_denied = format!("service account {OTHER_SA} may not use key");
    for (name, sa, says) in [
        (
            "as-platform",
            "",
            "keybroker's service account may not use key",
        ),
        ("as-other", OTHER_SA, other_denied.as_str()),
        (
            "as-foreign",
            FOREIGN_SA,
            "roles/iam.serviceAccountTokenCreator",
        ),
    ] {
        let err = admin.link_key(link(name, sa)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{name}: {err:?}");
        assert!(err.message().contains(says), "{name}: {}", err.message());
    }

    // The tenant's own service account works, for link and data plane.
    let linked = admin
        .link_key(link("gcp-1", ACME_SA))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(linked.service_account, ACME_SA);
    let c = [("dataset", "d1")];
    let g = broker
        .generate_data_key(generate_req(TENANT, &c))
        .await
        .unwrap()
        .into_inner();
    assert!(version_of(&g.wrapped_key).starts_with(&key));
    for _ in 0..5 {
        let u = broker
            .unwrap_key(unwrap_req(TENANT, &[("dataset", "other")], &g.wrapped_key))
            .await
            .unwrap_err();
        assert_eq!(
            u.code(),
            Code::InvalidArgument,
            "AAD still binds the context: {u:?}"
        );
    }
    let u = broker
        .unwrap_key(unwrap_req(TENANT, &c, &g.wrapped_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.plaintext, g.plaintext);
    // Impersonated tokens are cached: one per service account, not per call.
    assert!(fake.calls("encrypt") >= 2 && fake.calls("decrypt") >= 7);
    assert_eq!(
        fake.calls("generateAccessToken:kb-acme@platform-project.iam.gserviceaccount.com"),
        1
    );
    drop(server);
}

/// The provider alone: describe maps every version state, reports rotation
/// and protection level; deadlines and destroyed versions classify right.
#[tokio::test]
async fn gcp_provider_describe_and_deadlines() {
    use keybroker::kms::gcp::{GcpKeyName, GcpKeyTarget, GcpKms};
    use keybroker::kms::{KeyProvider, ProviderError, ProviderKeyState, WrapContext};
    use std::sync::Arc;

    let fake = FakeCloudKms::start().await;
    let kms = CloudKmsAdmin::connect(&fake.url).await;
    let key = kms.create_key("tenant-keys", "described").await;
    let provider = Arc::new(GcpKms::new(settings(&fake))).key(GcpKeyTarget {
        key_name: GcpKeyName::parse(&key).unwrap(),
        service_account: String::new(),
    });
    let v1 = format!("{key}/cryptoKeyVersions/1");
    let d = provider.describe().await.unwrap();
    assert_eq!(d.state, ProviderKeyState::Enabled);
    assert_eq!(d.current_version, v1);
    assert_eq!(d.rotation_period, Some(Duration::from_secs(90 * 86_400)));
    assert_eq!(d.rotation_enabled, Some(true));
    assert_eq!(d.protection_level.as_deref(), Some("HSM"));
    assert_eq!(provider.current_version().as_deref(), Some(v1.as_str()));

    let context = keybroker::context::Context::default();
    let wrap = WrapContext {
        tenant_id: TENANT,
        context: &context,
    };
    let probe = keybroker::secret::SecretBytes::new(vec![9u8; 32]);
    let sealed = provider.encrypt(&probe, wrap).await.unwrap();
    assert_eq!(sealed.key_version, v1);

    kms.set_version_state(&v1, CryptoKeyVersionState::Disabled)
        .await;
    assert_eq!(
        provider.describe().await.unwrap().state,
        ProviderKeyState::Disabled
    );
    // The primary itself is disabled: the key is, not just a version.
    let err = provider
        .decrypt(&v1, &sealed.bytes, wrap)
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::KeyDisabled(_)), "{err:?}");
    kms.destroy(&v1).await;
    assert_eq!(
        provider.describe().await.unwrap().state,
        ProviderKeyState::PendingDeletion
    );
    fake.complete_destruction(&v1);
    assert_eq!(
        provider.describe().await.unwrap().state,
        ProviderKeyState::Destroyed
    );
    let err = provider.encrypt(&probe, wrap).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::KeyDisabled(m) if m.contains("DESTROYED")),
        "{err:?}"
    );

    // A Cloud KMS slower than the deadlines: UNAVAILABLE, attempts bounded.
    let slow = FakeCloudKms::start().await;
    CloudKmsAdmin::connect(&slow.url)
        .await
        .create_key("r", "slow")
        .await;
    let slow_key = format!("{}/keyRings/r/cryptoKeys/slow", crate::fakes::gcp::PARENT);
    slow.set_faults(Faults {
        delay: Duration::from_millis(400),
        ..Faults::default()
    });
    let provider = Arc::new(GcpKms::new(GcpSettings {
        attempt_timeout: Duration::from_millis(100),
        operation_timeout: Duration::from_millis(1000),
        ..settings(&slow)
    }))
    .key(GcpKeyTarget {
        key_name: GcpKeyName::parse(&slow_key).unwrap(),
        service_account: String::new(),
    });
    let started = std::time::Instant::now();
    let err = provider.encrypt(&probe, wrap).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Unavailable(m) if m.contains("timeout")),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// One customer's key never serves another tenant. A key another tenant
/// linked is refused before any Cloud KMS call, without naming that tenant;
/// a key of another customer not linked yet is refused by its label (it
/// names the owner's tenant) after the GetCryptoKey and before any
/// Encrypt. Nothing is stored either way.
#[tokio::test]
async fn another_tenants_key_is_refused_without_a_wrap() {
    let mut env = Env::start(Duration::from_secs(3600)).await;
    let linked = env.kms.create_key("tenant-keys", "k-linked").await;
    let unlinked = env.kms.create_key("tenant-keys", "k-unlinked").await;
    env.link("gcp-1", &linked).await.unwrap();
    crate::common::create_tenant(&mut env.admin, "intruder", proto::KeyPolicy::Unspecified).await;
    let calls = |env: &Env| ["get", "encrypt", "decrypt"].map(|m| env.fake.calls(m));
    let steal = |key: &str| proto::LinkKeyRequest {
        tenant_id: "intruder".into(),
        name: "stolen".into(),
        provider: proto::Provider::GcpKms.into(),
        key_reference: key.into(),
        make_primary: true,
        ..Default::default()
    };

    let before = calls(&env);
    let err = env.admin.link_key(steal(&linked)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("is linked by another tenant") && !err.message().contains(TENANT),
        "{}",
        err.message()
    );
    assert_eq!(calls(&env), before, "no Cloud KMS call");

    let err = env.admin.link_key(steal(&unlinked)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("keybroker-tenant label names another tenant"),
        "{}",
        err.message()
    );
    let [gets, encrypts, decrypts] = calls(&env);
    assert_eq!(
        (gets, encrypts, decrypts),
        (before[0] + 1, before[1], before[2]),
        "one GetCryptoKey, no Encrypt or Decrypt"
    );
    crate::common::no_keys(&mut env.admin, "intruder").await;
}
