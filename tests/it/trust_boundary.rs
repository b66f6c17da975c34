//! The trust boundary of live revocation (DESIGN.md section 5): no request a
//! caller can make changes a binding's state. Forged wrapped keys are the
//! caller's problem alone; only a describe of the key, which uses no caller
//! bytes, revokes.
//!
//! Which test covers what:
//! - `forged_wrapped_keys_never_change_key_state`: a property test over all
//!   four kinds of key (platform keyring, imported material, AWS KMS on
//!   moto, Cloud KMS on the fake). moto answers AccessDenied to tampered
//!   ciphertexts, so the AWS part also proves that a live AccessDenied whose
//!   describe finds the key enabled revokes nothing.
//! - `a_live_definitive_error_revokes_only_through_one_describe`: the AWS
//!   fault server (key states moto does not enforce) answers
//!   DisabledException; the key is revoked after exactly one DescribeKey,
//!   and a DisabledException while DescribeKey says Enabled revokes nothing.
//! - `request_text_is_escaped_in_messages`: control characters in a wrapped
//!   key's binding name and version come back escaped.

use std::collections::HashMap;
use std::time::Duration;

use keybroker::kms::gcp::{GcpCredentials, GcpSettings};
use keybroker::proto::{
    self, key_admin_client::KeyAdminClient, key_broker_client::KeyBrokerClient,
};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

use crate::aws_support::{Moto, ROLE_ARN, link_request};
use crate::common::{
    TestServer, admin_client, generate_req, random_material, test_config, unwrap_req,
};
use crate::fakes::aws_faults::{Fault, FaultServer};
use crate::fakes::gcp::{CloudKmsAdmin, FakeCloudKms};

const TENANT: &str = "acme";
const BINDINGS: [&str; 3] = ["imported", "gcp", "aws"];

/// splitmix64: a deterministic stream, so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One forged variant of a genuine wrapped key.
fn forge(rng: &mut Rng, genuine: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut msg = proto::WrappedKey::decode(genuine).unwrap();
    let other = proto::WrappedKey::decode(others[rng.below(others.len())].as_slice()).unwrap();
    match rng.below(12) {
        0 => msg.tenant_id = ["globex", "acme2", "ACME", "acme\n"][rng.below(4)].into(),
        1 => {
            msg.key_binding = [
                "platform",
                "imported",
                "gcp",
                "aws",
                "gone",
                "aws\u{1b}[31m",
            ][rng.below(6)]
            .into()
        }
        2 => msg.provider = 1 + rng.below(3) as i32,
        3 => {
            msg.provider_key_version = [
                "",
                "1",
                "2",
                "9",
                "4294967296",
                "x",
                "1\n",
                other.provider_key_version.as_str(),
            ][rng.below(8)]
            .into()
        }
        4 => msg.ciphertext = other.ciphertext.clone(),
        5 => {
            let len = 1 + rng.below(300);
            msg.ciphertext = rng.bytes(len);
        }
        6 => {
            let i = rng.below(msg.ciphertext.len());
            msg.ciphertext[i] ^= 1 << rng.below(8);
        }
        7 => {
            let keep = rng.below(msg.ciphertext.len()).max(1);
            msg.ciphertext.truncate(keep);
        }
        8 => {
            let n = 1 + rng.below(16);
            msg.ciphertext.extend(rng.bytes(n));
        }
        9 => {
            // Everything from another key but the binding name.
            let name = msg.key_binding.clone();
            msg = other.clone();
            msg.key_binding = name;
        }
        10 => msg.ciphertext = rng.bytes(7000),
        _ => {
            // A bit flip anywhere in the encoding (often not even parseable).
            let mut bytes = msg.encode_to_vec();
            let i = rng.below(bytes.len());
            bytes[i] ^= 1 << rng.below(8);
            return bytes;
        }
    }
    msg.encode_to_vec()
}

async fn key_states(admin: &mut KeyAdminClient<Channel>) -> HashMap<String, proto::KeyState> {
    admin
        .list_keys(proto::ListKeysRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| (k.name.clone(), k.state()))
        .collect()
}

#[tokio::test]
async fn forged_wrapped_keys_never_change_key_state() {
    let moto = Moto::start();
    let key_arn = moto.create_key("us-east-1", false).await;
    let fake = FakeCloudKms::start().await;
    let gcp_customer = CloudKmsAdmin::connect(&fake.url).await;
    let gcp_key = gcp_customer.create_key("tenant-keys", "acme").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.aws = moto.settings();
    config.aws.max_attempts = 1;
    config.gcp = GcpSettings {
        endpoint: Some(fake.url.clone()),
        credentials: GcpCredentials::Anonymous,
        max_attempts: 1,
        attempt_timeout: Duration::from_secs(2),
        operation_timeout: Duration::from_secs(5),
        ..GcpSettings::default()
    };
    // Only rechecks can change state in this test: no watcher pass.
    config.watcher.interval = Duration::from_secs(3600);
    config.quota = keybroker::quota::QuotaSettings::UNLIMITED;
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker: KeyBrokerClient<Channel> = server.client().await;

    // Genuine keys under every kind of key: the platform key first (before
    // the tenant exists), then each customer key as primary in turn.
    let mut genuine = Vec::new();
    let c = [("table", "orders")];
    genuine.push(
        broker
            .generate_data_key(generate_req(TENANT, &c))
            .await
            .unwrap()
            .into_inner(),
    );
    crate::common::create_tenant(&mut admin, TENANT, proto::KeyPolicy::Unspecified).await;
    admin
        .import_key_material(proto::ImportKeyMaterialRequest {
            tenant_id: TENANT.into(),
            name: "imported".into(),
            description: String::new(),
            key_material_base64: random_material(),
            make_primary: true,
            new_version: false,
            wrapped_key_material: Vec::new(),
            import_token: String::new(),
        })
        .await
        .unwrap();
    genuine.push(
        broker
            .generate_data_key(generate_req(TENANT, &c))
            .await
            .unwrap()
            .into_inner(),
    );
    gcp_customer
        .label_owner(
            &gcp_key,
            &crate::common::external_id(&mut admin, TENANT).await,
        )
        .await;
    admin
        .link_key(proto::LinkKeyRequest {
            tenant_id: TENANT.into(),
            name: "gcp".into(),
            provider: proto::Provider::GcpKms.into(),
            key_reference: gcp_key.clone(),
            make_primary: true,
            ..Default::default()
        })
        .await
        .unwrap();
    genuine.push(
        broker
            .generate_data_key(generate_req(TENANT, &c))
            .await
            .unwrap()
            .into_inner(),
    );
    admin
        .link_key(link_request("aws", &key_arn, &[], true))
        .await
        .unwrap();
    assert_eq!(link_request("aws", &key_arn, &[], true).role_arn, ROLE_ARN);
    genuine.push(
        broker
            .generate_data_key(generate_req(TENANT, &c))
            .await
            .unwrap()
            .into_inner(),
    );
    // Another tenant's key, for foreign ciphertexts.
    let foreign = broker
        .generate_data_key(generate_req("globex", &c))
        .await
        .unwrap()
        .into_inner();
    let mut others: Vec<Vec<u8>> = genuine.iter().map(|g| g.wrapped_key.clone()).collect();
    others.push(foreign.wrapped_key.clone());

    let before = key_states(&mut admin).await;
    assert_eq!(before.len(), BINDINGS.len());
    assert!(
        before.values().all(|s| *s == proto::KeyState::Active),
        "{before:?}"
    );

    // The property: whatever sequence of forged requests a caller sends,
    // no binding changes state and each request fails on its own.
    let mut rng = Rng(0x6b65_7962_726f_6b65);
    let mut codes: HashMap<Code, u32> = HashMap::new();
    let started = std::time::Instant::now();
    for round in 0..240 {
        let g = &genuine[round % genuine.len()];
        let forged = forge(&mut rng, &g.wrapped_key, &others);
        let context = if rng.below(8) == 0 {
            vec![("table", "other")]
        } else {
            c.to_vec()
        };
        let result = if rng.below(4) == 0 {
            broker
                .rewrap_key(proto::RewrapKeyRequest {
                    tenant_id: TENANT.into(),
                    context: crate::common::ctx(&context),
                    wrapped_key: forged.clone(),
                    justification: None,
                })
                .await
                .map(|_| ())
        } else {
            broker
                .unwrap_key(unwrap_req(TENANT, &context, &forged))
                .await
                .map(|_| ())
        };
        let Err(status) = result else {
            // A forgery that re-encodes a genuine key exactly unwraps; that
            // is no forgery. Anything else must fail.
            assert!(others.contains(&forged), "forged key {round} unwrapped");
            continue;
        };
        assert!(
            matches!(
                status.code(),
                Code::InvalidArgument | Code::PermissionDenied | Code::NotFound
            ),
            "round {round}: {:?} {}",
            status.code(),
            status.message()
        );
        assert!(
            !keybroker::text::has_control(status.message()),
            "raw control character in {:?}",
            status.message()
        );
        *codes.entry(status.code()).or_default() += 1;
    }
    println!("forged requests answered: {codes:?}");
    assert!(codes.len() == 3, "all three refusals seen: {codes:?}");

    let after = key_states(&mut admin).await;
    assert_eq!(before, after, "a caller changed key state");
    // Every genuine key still unwraps (from the providers: none was
    // unwrapped before) and new keys are still made.
    for g in &genuine {
        let u = broker
            .unwrap_key(unwrap_req(TENANT, &c, &g.wrapped_key))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(u.plaintext, g.plaintext);
    }
    broker
        .generate_data_key(generate_req(TENANT, &c))
        .await
        .unwrap();
    // What the forgeries cost the customers' KMS in describes: at most one
    // per binding per recheck interval (1 s).
    let rechecks = server.directory.as_ref().unwrap().rechecks();
    let bound = (started.elapsed().as_secs() + 1) * BINDINGS.len() as u64;
    println!("{rechecks} out-of-turn describes for the forged requests (bound {bound})");
    assert!(
        rechecks >= 1,
        "moto's AccessDenied to tampered ciphertexts was rechecked"
    );
    assert!(rechecks <= bound, "{rechecks} rechecks > {bound}");
    server.stop().await;
}

/// DescribeKey's answer for a key in `state`, in KMS's JSON.
pub(crate) fn described(key_arn: &str, state: &str) -> Fault {
    Fault::KmsOk(format!(
        r#"{{"KeyMetadata":{{"KeyId":"k1","Arn":"{key_arn}","KeyState":"{state}","Enabled":{},"KeyManager":"CUSTOMER","KeyUsage":"ENCRYPT_DECRYPT"}}}}"#,
        state == "Enabled"
    ))
}

#[tokio::test]
async fn a_live_definitive_error_revokes_only_through_one_describe() {
    let moto = Moto::start();
    let key_arn = moto.create_key("us-east-1", false).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.aws = moto.settings();
    config.watcher.interval = Duration::from_secs(3600);
    let server = TestServer::start(config.clone()).await;
    let mut admin = admin_client(&server).await;
    crate::common::create_tenant(&mut admin, TENANT, proto::KeyPolicy::Unspecified).await;
    admin
        .link_key(link_request("aws", &key_arn, &[], true))
        .await
        .unwrap();
    let broker = server.client().await;
    let c = [("table", "t")];
    let keys: Vec<_> = futures::future::join_all((0..3).map(|_| {
        let mut b = broker.clone();
        async move {
            b.generate_data_key(generate_req(TENANT, &c))
                .await
                .unwrap()
                .into_inner()
        }
    }))
    .await;
    server.stop().await;

    // KMS now answers DisabledException to Decrypt, but DescribeKey says the
    // key is enabled: the error cannot be trusted, nothing is revoked, and
    // the request alone fails as the caller's problem.
    let faults = FaultServer::start().await;
    faults.set(
        "trentservice.decrypt",
        Fault::KmsError(400, "DisabledException"),
    );
    faults.set("trentservice.describekey", described(&key_arn, "Enabled"));
    // keybroker's own canary still decrypts: only the caller's bytes fail.
    faults.serve_canary(&key_arn);
    config.aws.kms_endpoint = Some(faults.url.clone());
    config.aws.sts_endpoint = Some(faults.url.clone());
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    let err = broker
        .unwrap_key(unwrap_req(TENANT, &c, &keys[0].wrapped_key))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("although the key itself is usable"),
        "{}",
        err.message()
    );
    assert_eq!(faults.count("trentservice.describekey"), 1);
    assert_eq!(key_states(&mut admin).await["aws"], proto::KeyState::Active);

    // Now DescribeKey agrees: pending deletion. The next live error (after
    // the recheck interval) revokes, through exactly one more describe, and
    // the message says what the customer can do.
    faults.set(
        "trentservice.describekey",
        described(&key_arn, "PendingDeletion"),
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Concurrent cold unwraps of different keys share one describe.
    let results = futures::future::join_all(keys[1..].iter().map(|k| {
        let mut b = broker.clone();
        let w = k.wrapped_key.clone();
        async move { b.unwrap_key(unwrap_req(TENANT, &c, &w)).await }
    }))
    .await;
    for r in results {
        let err = r.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    }
    assert_eq!(
        faults.count("trentservice.describekey"),
        2,
        "one describe per recheck"
    );
    let key = admin
        .get_key(proto::GetKeyRequest {
            tenant_id: TENANT.into(),
            name: "aws".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(key.state(), proto::KeyState::Revoked);
    assert!(
        key.state_reason.contains("CancelKeyDeletion") && key.state_reason.contains("EnableKey"),
        "{}",
        key.state_reason
    );
    // Refused from the registry state now, with no further KMS call.
    let decrypts = faults.count("trentservice.decrypt");
    let err = broker
        .unwrap_key(unwrap_req(TENANT, &c, &keys[0].wrapped_key))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("revoked"), "{}", err.message());
    assert_eq!(faults.count("trentservice.decrypt"), decrypts);
    server.stop().await;
}

#[tokio::test]
async fn request_text_is_escaped_in_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut broker = server.client().await;
    let g = broker
        .generate_data_key(generate_req(TENANT, &[]))
        .await
        .unwrap()
        .into_inner();
    let mut msg = proto::WrappedKey::decode(g.wrapped_key.as_slice()).unwrap();
    // A direct wrap (format 3) naming a binding of its own.
    msg.format_version = 3;
    msg.tenant_key_version = 0;
    msg.provider = proto::Provider::Local.into();
    msg.key_binding = "k\n2026-12-01T00:00:00Z ERROR forged\u{1b}[2J".into();
    let err = broker
        .unwrap_key(unwrap_req(TENANT, &[], &msg.encode_to_vec()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message()
            .contains(r"'k\n2026-12-01T00:00:00Z ERROR forged\u{1b}[2J'"),
        "{}",
        err.message()
    );
    msg.key_binding = "platform".into();
    msg.provider_key_version = "1\r\n\u{7}".into();
    let err = broker
        .unwrap_key(unwrap_req(TENANT, &[], &msg.encode_to_vec()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains(r"'1\r\n\u{7}'"), "{}", err.message());
    assert!(!keybroker::text::has_control(err.message()));
    // No provider call for either: both were refused on their bytes.
    assert_eq!(server.decrypt_calls(), 0);
    server.stop().await;
}
