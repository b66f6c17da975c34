//! Entry points shared by the `cargo fuzz` targets in `fuzz/` and by the
//! unit test that replays their seed corpus on every test run. Built only
//! for tests and with the `fuzzing` feature.

use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use tonic::Request;

use crate::api::auth::CallContext;
use crate::api::key_admin::KeyAdminApi;
use crate::api::key_broker::KeyBrokerApi;
use crate::audit::AuditLog;
use crate::authz::Policy;
use crate::config::Config;
use crate::envelope::Envelope;
use crate::proto::{self, key_admin_server::KeyAdmin, key_broker_server::KeyBroker};
use crate::server::Server;

/// Parses `data` as a wrapped key. Whatever parses must re-encode to the
/// same bytes: the envelope is canonical, so two encodings of one key can't
/// both be accepted.
pub fn envelope(data: &[u8]) {
    if let Ok(envelope) = Envelope::parse(data) {
        assert_eq!(envelope.encode(), data, "accepted a non-canonical envelope");
    }
}

/// A whole server (SQLite registry, platform keyring, no network) whose
/// handlers are called directly with decoded requests.
#[derive(Debug)]
pub struct RequestHarness {
    runtime: tokio::runtime::Runtime,
    broker: KeyBrokerApi,
    admin: KeyAdminApi,
    /// Kept for the harness's lifetime; removed on drop.
    data_dir: std::path::PathBuf,
}

impl Drop for RequestHarness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Every request type, selected by the first input byte.
const KINDS: u8 = 16;

impl RequestHarness {
    pub fn new() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let data_dir = std::env::temp_dir().join(format!(
            "keybroker-fuzz-{}-{}",
            std::process::id(),
            hex::encode(crate::secret::SecretBytes::random(6)?.expose())
        ));
        std::fs::create_dir_all(&data_dir)?;
        let mut config = Config::default();
        config.server.data_dir = data_dir.clone();
        // Any AWS call fails at once (nothing listens on port 9 of loopback).
        config.aws.kms_endpoint = Some("http://127.0.0.1:9".into());
        config.aws.sts_endpoint = Some("http://127.0.0.1:9".into());
        config.aws.max_attempts = 1;
        let aws = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(
                    aws_credential_types::Credentials::new("AKIAFUZZ", "fuzz", None, None, "fuzz"),
                ),
            )
            .build();
        let server = runtime.block_on(Server::build_with(config, Some(aws)))?;
        let observers = Arc::new(crate::api::Observers {
            audit: Arc::new(AuditLog::disabled()),
            metrics: Arc::clone(server.metrics()),
            request_timeout: std::time::Duration::from_secs(10),
            affinity_header: crate::api::affinity::header_key(crate::api::affinity::DEFAULT_HEADER)
                .map_err(|e| anyhow::anyhow!(e))?,
        });
        let admin = server
            .admin()
            .ok_or_else(|| anyhow::anyhow!("server without admin"))?;
        Ok(Self {
            broker: KeyBrokerApi::new(Arc::clone(server.broker()), Arc::clone(&observers)),
            admin: KeyAdminApi::new(Arc::clone(admin), observers),
            runtime,
            data_dir,
        })
    }

    /// Decodes `data[1..]` as the request type `data[0]` selects and, if it
    /// decodes, hands it to its handler. Any outcome but a panic is fine;
    /// returns the status code, or `None` if the bytes did not decode.
    pub fn handle(&self, data: &[u8]) -> Option<tonic::Code> {
        let (kind, body) = data.split_first()?;
        self.runtime.block_on(self.dispatch(kind % KINDS, body))
    }

    async fn dispatch(&self, kind: u8, body: &[u8]) -> Option<tonic::Code> {
        macro_rules! call {
            ($api:expr, $method:ident, $msg:ty, $name:literal) => {{
                let message = <$msg>::decode(body).ok()?;
                Some(match $api.$method(request(message, $name)).await {
                    Ok(_) => tonic::Code::Ok,
                    Err(status) => status.code(),
                })
            }};
        }
        let broker = &self.broker;
        let admin = &self.admin;
        match kind {
            0 => call!(
                broker,
                generate_data_key,
                proto::GenerateDataKeyRequest,
                "keybroker.v1.KeyBroker/GenerateDataKey"
            ),
            1 => call!(
                broker,
                wrap_key,
                proto::WrapKeyRequest,
                "keybroker.v1.KeyBroker/WrapKey"
            ),
            2 => call!(
                broker,
                unwrap_key,
                proto::UnwrapKeyRequest,
                "keybroker.v1.KeyBroker/UnwrapKey"
            ),
            3 => call!(
                broker,
                rewrap_key,
                proto::RewrapKeyRequest,
                "keybroker.v1.KeyBroker/RewrapKey"
            ),
            4 => call!(
                broker,
                describe_key,
                proto::DescribeKeyRequest,
                "keybroker.v1.KeyBroker/DescribeKey"
            ),
            5 => call!(
                admin,
                create_tenant,
                proto::CreateTenantRequest,
                "keybroker.v1.KeyAdmin/CreateTenant"
            ),
            6 => call!(
                admin,
                get_tenant,
                proto::GetTenantRequest,
                "keybroker.v1.KeyAdmin/GetTenant"
            ),
            7 => call!(
                admin,
                set_tenant_policy,
                proto::SetTenantPolicyRequest,
                "keybroker.v1.KeyAdmin/SetTenantPolicy"
            ),
            8 => call!(
                admin,
                link_key,
                proto::LinkKeyRequest,
                "keybroker.v1.KeyAdmin/LinkKey"
            ),
            9 => call!(
                admin,
                import_key_material,
                proto::ImportKeyMaterialRequest,
                "keybroker.v1.KeyAdmin/ImportKeyMaterial"
            ),
            10 => call!(
                admin,
                list_keys,
                proto::ListKeysRequest,
                "keybroker.v1.KeyAdmin/ListKeys"
            ),
            11 => call!(
                admin,
                get_key,
                proto::GetKeyRequest,
                "keybroker.v1.KeyAdmin/GetKey"
            ),
            12 => call!(
                admin,
                set_primary_key,
                proto::SetPrimaryKeyRequest,
                "keybroker.v1.KeyAdmin/SetPrimaryKey"
            ),
            13 => call!(
                admin,
                disable_key,
                proto::DisableKeyRequest,
                "keybroker.v1.KeyAdmin/DisableKey"
            ),
            14 => call!(
                admin,
                enable_key,
                proto::EnableKeyRequest,
                "keybroker.v1.KeyAdmin/EnableKey"
            ),
            _ => call!(
                admin,
                unlink_key,
                proto::UnlinkKeyRequest,
                "keybroker.v1.KeyAdmin/UnlinkKey"
            ),
        }
    }
}

/// A request as the authorization layer would pass it on (allow-all grant).
fn request<T>(message: T, method: &str) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(grant) = Arc::new(Policy::allow_all()).grant("fuzz".into(), method.into()) {
        request.extensions_mut().insert(CallContext {
            identity: "fuzz".into(),
            peer: None,
            method: method.into(),
            request_id: None,
            grant: Some(grant),
            started: Instant::now(),
        });
    }
    request
}

/// A well-formed wrapped key of the platform binding (fake ciphertext).
fn sample_wrapped_key() -> proto::WrappedKey {
    proto::WrappedKey {
        format_version: 1,
        tenant_id: "acme".into(),
        key_binding: "platform".into(),
        provider: proto::Provider::Local.into(),
        provider_key_version: "1".into(),
        ciphertext: vec![7; 60],
        tenant_key_version: 0,
        tenant_incarnation: 0,
    }
}

/// Seed inputs for the request target: one well-formed message of each
/// kind, plus inputs that reach deeper paths (a real wrapped key).
pub fn request_seeds() -> Vec<Vec<u8>> {
    fn seed(kind: u8, message: impl Message) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend(message.encode_to_vec());
        out
    }
    let wrapped = sample_wrapped_key().encode_to_vec();
    let context = [("table".to_owned(), "orders".to_owned())].into();
    vec![
        seed(
            0,
            proto::GenerateDataKeyRequest {
                tenant_id: "acme".into(),
                key_spec: 1,
                context: Default::default(),
                justification: None,
            },
        ),
        seed(
            1,
            proto::WrapKeyRequest {
                tenant_id: "acme".into(),
                plaintext: vec![1; 32],
                context,
                justification: None,
            },
        ),
        seed(
            2,
            proto::UnwrapKeyRequest {
                tenant_id: "acme".into(),
                wrapped_key: wrapped.clone().into(),
                context: Default::default(),
                justification: None,
            },
        ),
        seed(
            3,
            proto::RewrapKeyRequest {
                tenant_id: "acme".into(),
                wrapped_key: wrapped,
                context: Default::default(),
                justification: None,
            },
        ),
        seed(
            4,
            proto::DescribeKeyRequest {
                tenant_id: "acme".into(),
            },
        ),
        seed(
            5,
            proto::CreateTenantRequest {
                tenant_id: "acme".into(),
                key_policy: 1,
                key_hierarchy: 0,
                newest_import_primary: false,
            },
        ),
        seed(
            6,
            proto::GetTenantRequest {
                tenant_id: "acme".into(),
            },
        ),
        seed(
            7,
            proto::SetTenantPolicyRequest {
                tenant_id: "acme".into(),
                key_policy: 2,
            },
        ),
        seed(
            8,
            proto::LinkKeyRequest {
                tenant_id: "acme".into(),
                name: "k1".into(),
                provider: proto::Provider::AwsKms.into(),
                key_reference:
                    "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                        .into(),
                region: "us-east-1".into(),
                role_arn: "arn:aws:iam::123456789012:role/kb".into(),
                ..Default::default()
            },
        ),
        seed(
            9,
            proto::ImportKeyMaterialRequest {
                tenant_id: "acme".into(),
                name: "imported".into(),
                key_material_base64: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
                make_primary: true,
                ..Default::default()
            },
        ),
        seed(
            10,
            proto::ListKeysRequest {
                tenant_id: "acme".into(),
            },
        ),
        seed(
            11,
            proto::GetKeyRequest {
                tenant_id: "acme".into(),
                name: "imported".into(),
            },
        ),
        seed(
            12,
            proto::SetPrimaryKeyRequest {
                tenant_id: "acme".into(),
                name: "imported".into(),
            },
        ),
        seed(
            13,
            proto::DisableKeyRequest {
                tenant_id: "acme".into(),
                name: "imported".into(),
                reason: "fuzz".into(),
                // The primary of a tenant_key tenant: its tenant keys move
                // to the platform key first.
                reencrypt_to: "platform".into(),
            },
        ),
        seed(
            14,
            proto::EnableKeyRequest {
                tenant_id: "acme".into(),
                name: "imported".into(),
            },
        ),
        seed(
            15,
            proto::UnlinkKeyRequest {
                tenant_id: "acme".into(),
                name: "imported".into(),
                force: true,
            },
        ),
    ]
}

/// Seed inputs for the envelope target.
pub fn envelope_seeds() -> Vec<Vec<u8>> {
    let base = sample_wrapped_key();
    let mut aws = base.clone();
    aws.provider = proto::Provider::AwsKms.into();
    aws.key_binding = "k1".into();
    aws.provider_key_version = String::new();
    vec![
        base.encode_to_vec(),
        aws.encode_to_vec(),
        Vec::new(),
        vec![0x08, 0x02],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz targets' code paths on every test run: the seeds, then
    /// deterministic mutations of them (truncations and byte flips).
    #[test]
    fn fuzz_entry_points_survive_seeds_and_mutations() {
        let mutate = |seeds: Vec<Vec<u8>>| {
            let mut inputs = Vec::new();
            for seed in seeds {
                for cut in 0..seed.len() {
                    inputs.push(seed[..cut].to_vec());
                }
                for i in 0..seed.len() {
                    let mut flipped = seed.clone();
                    flipped[i] ^= 0x5a;
                    inputs.push(flipped);
                }
                inputs.push(seed);
            }
            inputs
        };
        for input in mutate(envelope_seeds()) {
            envelope(&input);
        }
        let harness = RequestHarness::new().unwrap();
        // The seeds in order: a tenant, an imported key that becomes
        // primary, its lifecycle; AWS linking fails (no network) cleanly.
        let codes: Vec<_> = request_seeds().iter().map(|s| harness.handle(s)).collect();
        use tonic::Code::*;
        let expected = [
            Ok,
            Ok,
            InvalidArgument,
            InvalidArgument,
            Ok,
            Ok,
            Ok,
            Ok,
            // LinkKey of an AWS key whose KMS cannot be reached: an outage,
            // retryable, not a verdict on the key.
            Unavailable,
            Ok,
            Ok,
            Ok,
            Ok,
            Ok,
            Ok,
            Ok,
        ];
        assert_eq!(codes, expected.map(Some));
        let inputs = mutate(request_seeds());
        assert!(inputs.len() > 1000);
        for input in &inputs {
            harness.handle(input);
        }
    }

    /// The committed seed corpus (`fuzz/seeds/`) is what the seed functions
    /// make. `KEYBROKER_WRITE_FUZZ_SEEDS=1` rewrites it.
    #[test]
    fn committed_seed_corpus_is_current() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        let write = std::env::var_os("KEYBROKER_WRITE_FUZZ_SEEDS").is_some();
        for (target, seeds) in [
            ("envelope_parse", envelope_seeds()),
            ("request_handling", request_seeds()),
        ] {
            let dir = root.join(target);
            for (i, seed) in seeds.iter().enumerate() {
                let path = dir.join(format!("seed-{i:02}"));
                if write {
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(&path, seed).unwrap();
                } else {
                    let committed = std::fs::read(&path).unwrap_or_else(|e| {
                        panic!(
                            "{}: {e}; run KEYBROKER_WRITE_FUZZ_SEEDS=1 cargo test --lib fuzzing",
                            path.display()
                        )
                    });
                    assert_eq!(&committed, seed, "{} is stale", path.display());
                }
            }
        }
    }
}
