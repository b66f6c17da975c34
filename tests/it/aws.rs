//! The aws-kms provider. What covers what:
//! - moto (a real KMS + STS emulator): link with a real round trip, generate,
//!   wrap, unwrap, rewrap through ReEncrypt, describe, encryption-context
//!   mismatch, AssumeRole carrying the external ID and session name (moto's
//!   request recorder), one AssumeRole per session, multi-Region fallback.
//! - the fault server (real AWS wire-format errors; moto does not enforce
//!   key states or trust policies): Disabled, PendingDeletion, AccessDenied,
//!   NotFound, IncorrectKey, InvalidCiphertext, Throttling, 5xx, timeouts and
//!   STS denial, with the gRPC code, the message and the attempt count.

use std::sync::Arc;
use std::time::Duration;

use keybroker::envelope::Envelope;
use keybroker::kms::ProviderKind;
use keybroker::kms::aws::{AwsKeyTarget, AwsSettings, KeyArn, RoleArn};
use keybroker::proto;
use prost::Message;
use tonic::Code;

use crate::aws_support::{Moto, ROLE_ARN, TENANT, aws_with, link_request};
use crate::common::{
    TestServer, admin_client, create_tenant, ctx, generate_req, no_keys, test_config, unwrap_req,
};
use crate::fakes::aws_faults::{Fault, FaultServer};

#[tokio::test]
async fn aws_kms_flow_against_moto() {
    let moto = Moto::start();
    let key1 = moto.create_key("us-east-1", false).await;
    let key2 = moto.create_key("us-east-1", false).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.aws = moto.settings();
    let audit_path = dir.path().join("audit.log");
    config.audit.target = keybroker::audit::AuditTarget::File(audit_path.clone());
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    create_tenant(&mut admin, TENANT, proto::KeyPolicy::Unspecified).await;

    let linked = admin
        .link_key(link_request("aws-1", &key1, &[], false))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert!(linked.primary);
    assert_eq!(linked.provider(), proto::Provider::AwsKms);
    assert_eq!(linked.role_arn, ROLE_ARN);

    let c = [("dataset", "d1")];
    let g = broker
        .generate_data_key(generate_req(TENANT, &c))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.plaintext.len(), 32);
    assert_eq!(g.key.as_ref().unwrap().key_binding, "aws-1");
    // The audit record carries the KMS request id (for CloudTrail).
    let audit = std::fs::read_to_string(&audit_path).unwrap();
    let record: serde_json::Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    assert!(
        record["method"]
            .as_str()
            .unwrap()
            .ends_with("GenerateDataKey")
    );
    assert_eq!(record["key_binding"], "aws-1");
    assert_eq!(record["provider_calls"], 1);
    assert!(
        record["provider_request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{record}"
    );
    let envelope = proto::WrappedKey::decode(g.wrapped_key.as_slice()).unwrap();
    assert_eq!(envelope.provider(), proto::Provider::AwsKms);
    let back = broker
        .unwrap_key(unwrap_req(TENANT, &c, &g.wrapped_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext, g.plaintext);

    let mine = vec![9u8; 32];
    let w = broker
        .wrap_key(proto::WrapKeyRequest {
            tenant_id: TENANT.into(),
            context: ctx(&c),
            plaintext: mine.clone(),
            justification: None,
        })
        .await
        .unwrap()
        .into_inner();
    server.broker.cache().purge_all().await;
    let back = broker
        .unwrap_key(unwrap_req(TENANT, &c, &w.wrapped_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext, mine);

    // The encryption context is enforced by KMS itself.
    server.broker.cache().purge_all().await;
    let err = broker
        .unwrap_key(unwrap_req(TENANT, &[("dataset", "d2")], &g.wrapped_key))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Rotation to a second AWS key under the same role: ReEncrypt, the
    // plaintext never leaves KMS.
    admin
        .link_key(link_request("aws-2", &key2, &[], true))
        .await
        .unwrap();
    let decrypts = server.decrypt_calls();
    let moved = broker
        .rewrap_key(proto::RewrapKeyRequest {
            tenant_id: TENANT.into(),
            context: ctx(&c),
            wrapped_key: g.wrapped_key.clone(),
            justification: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.key.unwrap().key_binding, "aws-2");
    assert_eq!(moved.previous_key.unwrap().key_binding, "aws-1");
    assert_eq!(
        server
            .broker
            .provider_calls()
            .reencrypt
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(server.decrypt_calls(), decrypts, "rewrap must not decrypt");
    let back = broker
        .unwrap_key(unwrap_req(TENANT, &c, &moved.wrapped_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext, g.plaintext);
    assert!(!back.rewrap_recommended);

    let described = broker
        .describe_key(proto::DescribeKeyRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!described.uses_platform_key);
    assert_eq!(described.primary.unwrap().key_binding, "aws-2");
    assert_eq!(described.bindings.len(), 2);

    // A key that does not exist is refused at link time, with the reason.
    let missing = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000";
    let err = admin
        .link_key(link_request("ghost", missing, &[], false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("does not exist"),
        "{}",
        err.message()
    );
    server.stop().await;
}

#[tokio::test]
async fn assume_role_carries_external_id_once_per_session() {
    let moto = Moto::start();
    let key = moto.create_key("us-east-1", false).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.aws = moto.settings();
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let broker = server.client().await;
    let external_id = create_tenant(&mut admin, TENANT, proto::KeyPolicy::Unspecified)
        .await
        .onboarding
        .unwrap()
        .aws_external_id;

    moto.start_recording().await;
    admin
        .link_key(link_request("aws-1", &key, &[], false))
        .await
        .unwrap();
    let mut dek = Vec::new();
    for i in 0..10 {
        let c = [("object", i.to_string())];
        let c: Vec<(&str, &str)> = c.iter().map(|(k, v)| (*k, v.as_str())).collect();
        dek.push(
            broker
                .clone()
                .generate_data_key(generate_req(TENANT, &c))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    server.broker.cache().purge_all().await;
    let decrypts = server.decrypt_calls();

    let tasks: Vec<_> = (0..1000)
        .map(|n| {
            let mut broker = broker.clone();
            let i = n % 10;
            let wrapped = dek[i].wrapped_key.clone();
            let expect = dek[i].plaintext.clone();
            tokio::spawn(async move {
                let c = [("object", i.to_string())];
                let c: Vec<(&str, &str)> = c.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let got = broker
                    .unwrap_key(unwrap_req(TENANT, &c, &wrapped))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(got.plaintext, expect);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        server.decrypt_calls() - decrypts,
        10,
        "one KMS Decrypt per cold key"
    );

    let assume_roles: Vec<String> = moto
        .recorded()
        .into_iter()
        .filter(|(_, body)| body.contains("Action=AssumeRole"))
        .map(|(_, body)| body)
        .collect();
    assert_eq!(
        assume_roles.len(),
        1,
        "one AssumeRole per session lifetime: {assume_roles:?}"
    );
    let body = &assume_roles[0];
    assert!(
        body.contains(&format!("ExternalId={external_id}")),
        "{body}"
    );
    assert!(body.contains("RoleSessionName=kb-acme"), "{body}");
    assert!(
        body.contains(
            "RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fcustomer-keybroker-access"
        ),
        "{body}"
    );
    // KMS calls were signed with the assumed session, not the platform's keys.
    let kms_auth: Vec<String> = moto
        .recorded()
        .into_iter()
        .filter(|(h, _)| {
            h.get("x-amz-target")
                .is_some_and(|t| t.starts_with("TrentService."))
        })
        .map(|(h, _)| h.get("authorization").cloned().unwrap_or_default())
        .collect();
    assert!(!kms_auth.is_empty());
    assert!(
        kms_auth.iter().all(|a| !a.contains("AKIATEST")),
        "KMS call signed with platform credentials"
    );
    server.stop().await;
}

const FAULT_KEY: &str =
    "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";

async fn fault_server_setup(fault: &FaultServer) -> TestServer {
    let aws = aws_with(AwsSettings {
        kms_endpoint: Some(fault.url.clone()),
        sts_endpoint: Some(fault.url.clone()),
        max_attempts: 2,
        attempt_timeout: Duration::from_millis(400),
        operation_timeout: Duration::from_secs(2),
        ..AwsSettings::default()
    });
    let key = aws.key(AwsKeyTarget {
        tenant_id: TENANT.into(),
        key_arn: KeyArn::parse(FAULT_KEY).unwrap(),
        role_arn: RoleArn::parse(ROLE_ARN).unwrap(),
        external_id: "kb-fault-test".into(),
        replica_regions: vec![],
    });
    let dir = tempfile::tempdir().unwrap();
    TestServer::start_with_provider(test_config(dir.path()), Arc::new(key)).await
}

fn aws_envelope() -> Vec<u8> {
    Envelope {
        tenant_id: TENANT.into(),
        key_binding: "platform".into(),
        provider: ProviderKind::AwsKms,
        provider_key_version: String::new(),
        ciphertext: vec![7; 120],
        tenant_key_version: 0,
        incarnation: 0,
    }
    .encode()
}

#[tokio::test]
async fn kms_failures_map_to_codes_and_definitive_ones_are_not_retried() {
    let cases: Vec<(Fault, Code, &str, Option<u64>)> = vec![
        (
            Fault::KmsError(400, "DisabledException"),
            Code::FailedPrecondition,
            "is disabled in AWS KMS",
            Some(1),
        ),
        (
            Fault::KmsError(400, "KMSInvalidStateException"),
            Code::FailedPrecondition,
            "pending deletion",
            Some(1),
        ),
        (
            Fault::KmsError(400, "AccessDeniedException"),
            Code::FailedPrecondition,
            "may not use key",
            Some(1),
        ),
        (
            Fault::KmsError(400, "NotFoundException"),
            Code::FailedPrecondition,
            "does not exist",
            Some(1),
        ),
        (
            Fault::KmsError(400, "IncorrectKeyException"),
            Code::InvalidArgument,
            "another KMS key",
            Some(1),
        ),
        (
            Fault::KmsError(400, "InvalidCiphertextException"),
            Code::InvalidArgument,
            "could not decrypt",
            Some(1),
        ),
        // Transient: retried up to max_attempts (2).
        (
            Fault::KmsError(400, "ThrottlingException"),
            Code::ResourceExhausted,
            "throttled",
            Some(2),
        ),
        (
            Fault::KmsError(500, "KMSInternalException"),
            Code::Unavailable,
            "KMSInternalException",
            Some(2),
        ),
        (Fault::Hang, Code::Unavailable, "timeout", None),
    ];
    for (fault, code, needle, attempts) in cases {
        let faults = FaultServer::start().await;
        faults.set("trentservice.decrypt", fault);
        let server = fault_server_setup(&faults).await;
        let mut broker = server.client().await;
        let err = broker
            .unwrap_key(unwrap_req(TENANT, &[], &aws_envelope()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{needle}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
        assert!(
            err.message().contains(FAULT_KEY)
                || code == Code::Unavailable
                || code == Code::InvalidArgument,
            "{}",
            err.message()
        );
        if let Some(n) = attempts {
            assert_eq!(
                faults.count("trentservice.decrypt"),
                n,
                "{needle}: attempts"
            );
        }
        assert_eq!(faults.count("assumerole"), 1, "{needle}: one AssumeRole");
        server.stop().await;
    }

    // GenerateDataKey goes through KMS's own GenerateDataKey.
    let faults = FaultServer::start().await;
    faults.set(
        "trentservice.generatedatakey",
        Fault::KmsError(400, "DisabledException"),
    );
    let server = fault_server_setup(&faults).await;
    let err = server
        .client()
        .await
        .generate_data_key(generate_req(TENANT, &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(faults.count("trentservice.generatedatakey"), 1);
    server.stop().await;
}

#[tokio::test]
async fn sts_denial_names_the_trust_policy_and_external_id() {
    let faults = FaultServer::start().await;
    faults.set("assumerole", Fault::StsDenied);
    let server = fault_server_setup(&faults).await;
    let mut broker = server.client().await;
    let err = broker
        .unwrap_key(unwrap_req(TENANT, &[], &aws_envelope()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("cannot be assumed"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("sts:ExternalId = kb-fault-test"),
        "{}",
        err.message()
    );
    assert_eq!(
        faults.count("assumerole"),
        1,
        "AccessDenied is definitive: no retry"
    );
    assert_eq!(
        faults.count("trentservice.decrypt"),
        0,
        "no KMS call without a session"
    );
    server.stop().await;
}

/// moto cannot play the replica region: it stores key ids in a 36-byte
/// ciphertext header, which truncates the 40-character ids of multi-Region
/// keys (mrk-...), and it refuses to replicate single-Region keys. So the
/// key's own region is a really unreachable endpoint (a closed port) and the
/// replica region is the fault server answering a real Decrypt response.
#[tokio::test]
async fn replica_region_serves_decrypt_when_the_key_region_is_unreachable() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mrk = "arn:aws:kms:us-east-1:123456789012:key/mrk-1234abcd12ab34cd56ef1234567890ab";
    let replica_arn = mrk.replace(":us-east-1:", ":us-west-2:");
    let dek = [42u8; 32];

    let setup = |replica: &FaultServer, primary_url: String| {
        let aws = aws_with(AwsSettings {
            sts_endpoint: Some(replica.url.clone()),
            kms_region_endpoints: [
                ("us-east-1".to_string(), primary_url),
                ("us-west-2".to_string(), replica.url.clone()),
            ]
            .into_iter()
            .collect(),
            max_attempts: 1,
            attempt_timeout: Duration::from_millis(500),
            operation_timeout: Duration::from_secs(1),
            ..AwsSettings::default()
        });
        aws.key(AwsKeyTarget {
            tenant_id: TENANT.into(),
            key_arn: KeyArn::parse(mrk).unwrap(),
            role_arn: RoleArn::parse(ROLE_ARN).unwrap(),
            external_id: "kb-fault-test".into(),
            replica_regions: vec!["us-west-2".into()],
        })
    };

    let replica = FaultServer::start().await;
    replica.set(
        "trentservice.decrypt",
        Fault::KmsOk(format!(
            r#"{{"KeyId":"{replica_arn}","Plaintext":"{}","EncryptionAlgorithm":"SYMMETRIC_DEFAULT"}}"#,
            b64.encode(dek)
        )),
    );
    let key = setup(&replica, format!("http://{closed}"));
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_provider(test_config(dir.path()), Arc::new(key)).await;
    let back = server
        .client()
        .await
        .unwrap_key(unwrap_req(TENANT, &[("dataset", "d1")], &aws_envelope()))
        .await
        .expect("decrypt should be served by the replica region")
        .into_inner();
    assert_eq!(back.plaintext[..], dek[..]);
    assert_eq!(replica.count("trentservice.decrypt"), 1);
    let body: serde_json::Value =
        serde_json::from_str(&replica.last_body("trentservice.decrypt").unwrap()).unwrap();
    assert_eq!(body["KeyId"], replica_arn.as_str(), "replica ARN pinned");
    assert_eq!(body["EncryptionContext"]["keybroker:tenant"], TENANT);
    assert_eq!(body["EncryptionContext"]["dataset"], "d1");
    server.stop().await;

    // A definitive error in the key's region is final: no fallback.
    let primary = FaultServer::start().await;
    primary.set(
        "trentservice.decrypt",
        Fault::KmsError(400, "DisabledException"),
    );
    let replica = FaultServer::start().await;
    let key = setup(&replica, primary.url.clone());
    let server = TestServer::start_with_provider(test_config(dir.path()), Arc::new(key)).await;
    let err = server
        .client()
        .await
        .unwrap_key(unwrap_req(TENANT, &[], &aws_envelope()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(primary.count("trentservice.decrypt"), 1);
    assert_eq!(
        replica.count("trentservice.decrypt"),
        0,
        "no fallback after a definitive error"
    );
    server.stop().await;
}

#[tokio::test]
async fn link_verifies_each_replica_region() {
    // moto holds the key in us-east-1 only: a replica region without the key
    // fails verification with the region named.
    let moto = Moto::start();
    let key = moto.create_key("us-east-1", false).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.aws = moto.settings();
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    create_tenant(&mut admin, TENANT, proto::KeyPolicy::Unspecified).await;
    let err = admin
        .link_key(link_request("k", &key, &["eu-central-1"], false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("replica region eu-central-1"),
        "{}",
        err.message()
    );
    let listed = admin
        .list_keys(proto::ListKeysRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(listed.is_empty(), "a failed verification stores nothing");
    server.stop().await;
}

/// One customer's key never serves another tenant. A key another tenant
/// linked is refused before any STS or KMS call, without naming that
/// tenant; a key of another customer not linked yet is refused by STS: the
/// AssumeRole carries the linking tenant's own external id, never the
/// owner's, so the owner's trust policy (which requires theirs) refuses it,
/// before any KMS call. Nothing is stored either way.
#[tokio::test]
async fn another_tenants_key_is_refused_without_a_kms_call() {
    let moto = Moto::start();
    let key = moto.create_key("us-east-1", false).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.aws = moto.settings();
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    create_tenant(&mut admin, TENANT, proto::KeyPolicy::Unspecified).await;
    let intruder_id = create_tenant(&mut admin, "intruder", proto::KeyPolicy::Unspecified)
        .await
        .onboarding
        .unwrap()
        .aws_external_id;
    admin
        .link_key(link_request("aws-1", &key, &[], true))
        .await
        .unwrap();

    moto.start_recording().await;
    let mut stolen = link_request("stolen", &key, &[], true);
    stolen.tenant_id = "intruder".into();
    let err = admin.link_key(stolen).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("is linked by another tenant") && !err.message().contains(TENANT),
        "{}",
        err.message()
    );
    assert!(
        moto.recorded().is_empty(),
        "no STS or KMS call: {:?}",
        moto.recorded()
    );
    no_keys(&mut admin, "intruder").await;
    server.stop().await;

    // A key of the same customer, not linked yet, through their role.
    let faults = FaultServer::start().await;
    faults.set("assumerole", Fault::StsDenied);
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.aws = AwsSettings {
        kms_endpoint: Some(faults.url.clone()),
        sts_endpoint: Some(faults.url.clone()),
        max_attempts: 1,
        ..AwsSettings::default()
    };
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let intruder_id_here = create_tenant(&mut admin, "intruder", proto::KeyPolicy::Unspecified)
        .await
        .onboarding
        .unwrap()
        .aws_external_id;
    assert_ne!(intruder_id_here, intruder_id, "external ids are per tenant");
    let mut stolen = link_request("stolen", FAULT_KEY, &[], true);
    stolen.tenant_id = "intruder".into();
    let err = admin.link_key(stolen).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(faults.count("assumerole"), 1);
    let body = faults.last_body("assumerole").unwrap();
    assert!(
        body.contains(&format!("ExternalId={intruder_id_here}")),
        "the linking tenant's own external id: {body}"
    );
    for op in ["describekey", "encrypt", "decrypt", "generatedatakey"] {
        assert_eq!(faults.count(&format!("trentservice.{op}")), 0, "{op}");
    }
    no_keys(&mut admin, "intruder").await;
    server.stop().await;
}
