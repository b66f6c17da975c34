//! Caller authentication (mTLS), the authorization policy, the audit log and
//! KMS quota protection, against real servers on 127.0.0.1:0 with a test
//! PKI generated here by rcgen.
//!
//! Over 600 lines on purpose: the test PKI built here is shared by every
//! mTLS, policy, audit and quota test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keybroker::audit::{AuditSettings, AuditTarget};
use keybroker::net::tls::TlsSettings;
use keybroker::proto::key_admin_client::KeyAdminClient;
use keybroker::proto::key_broker_client::KeyBrokerClient;
use keybroker::proto::{self};
use keybroker::quota::{Limit, QuotaSettings};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::common::{SlowKeyring, TestServer, ctx, generate, test_config, unwrap};

const TRUST_DOMAIN: &str = "prod.example";

/// A certificate authority of the test.
pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and key.
pub(crate) struct Pem {
    pub(crate) cert: String,
    pub(crate) key: String,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub(crate) fn issue(&self, sans: &[SanType], expired: bool) -> Pem {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans.to_vec();
        params.distinguished_name.push(DnType::CommonName, "test");
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    pub(crate) fn client(&self, identity: &str) -> Pem {
        self.issue(&[san(identity)], false)
    }
}

fn san(identity: &str) -> SanType {
    if identity.contains("://") {
        SanType::URI(identity.try_into().unwrap())
    } else {
        SanType::DnsName(identity.try_into().unwrap())
    }
}

/// Server files in `dir`: its certificate (localhost, 127.0.0.1) from
/// `server_ca`, and `client_ca_pem` as the client CA bundle.
pub(crate) fn write_server_tls(dir: &Path, server_ca: &Ca, client_ca_pem: &str) -> TlsSettings {
    let server = server_ca.issue(
        &[
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ],
        false,
    );
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    TlsSettings {
        cert: Some(write("server.crt", &server.cert)),
        key: Some(write("server.key", &server.key)),
        client_ca: Some(write("client-ca.crt", client_ca_pem)),
        trust_domains: vec![TRUST_DOMAIN.to_owned()],
        reload_interval: Duration::from_millis(100),
    }
}

pub(crate) fn write_policy(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn tls_channel(
    server: &TestServer,
    server_ca: &Ca,
    client: Option<&Pem>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca.pem()))
        .domain_name("localhost");
    if let Some(pem) = client {
        tls = tls.identity(Identity::from_pem(&pem.cert, &pem.key));
    }
    Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// One DescribeKey through a fresh TLS connection: Ok, or why not.
async fn describe_over_tls(
    server: &TestServer,
    server_ca: &Ca,
    client: Option<&Pem>,
) -> Result<(), String> {
    let channel = tls_channel(server, server_ca, client).await?;
    KeyBrokerClient::new(channel)
        .describe_key(proto::DescribeKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

const ALLOW_ALL_OF_TRUST_DOMAIN: &str = r#"
[[allow]]
identities = ["spiffe://prod.example/*", "dns:billing.internal"]
methods = ["*"]
tenants = ["*"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_accepts_valid_identities_and_rejects_every_bad_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let foreign_ca = Ca::new("foreign CA");
    let mut config = test_config(dir.path());
    config.tls = write_server_tls(dir.path(), &server_ca, &client_ca.pem());
    config.server.authz_policy = Some(write_policy(dir.path(), ALLOW_ALL_OF_TRUST_DOMAIN));
    config.audit = AuditSettings {
        target: AuditTarget::File(dir.path().join("audit.log")),
        ..AuditSettings::default()
    };
    let server = TestServer::start(config).await;

    // Accepted: a SPIFFE ID of the trusted domain, and a DNS identity.
    describe_over_tls(
        &server,
        &server_ca,
        Some(&client_ca.client("spiffe://prod.example/ns/billing/sa/api")),
    )
    .await
    .unwrap();
    describe_over_tls(
        &server,
        &server_ca,
        Some(&client_ca.client("billing.internal")),
    )
    .await
    .unwrap();

    let spiffe = || san("spiffe://prod.example/ns/a/sa/b");
    let rejected_cases: Vec<(&str, Option<Pem>)> = vec![
        ("no client certificate", None),
        (
            "expired certificate",
            Some(client_ca.issue(&[spiffe()], true)),
        ),
        (
            "certificate from a foreign CA",
            Some(foreign_ca.client("spiffe://prod.example/ns/a/sa/b")),
        ),
        (
            "two URI SANs",
            Some(client_ca.issue(&[spiffe(), san("spiffe://prod.example/ns/c/sa/d")], false)),
        ),
        (
            "untrusted SPIFFE trust domain",
            Some(client_ca.client("spiffe://evil.example/ns/a/sa/b")),
        ),
        ("no identity at all", Some(client_ca.issue(&[], false))),
        (
            "a SPIFFE ID with '..' segments (not a SPIFFE ID per the spec)",
            Some(client_ca.client("spiffe://prod.example/ns/billing/../../ops/sa/admin")),
        ),
        (
            "a SPIFFE ID with an empty segment",
            Some(client_ca.client("spiffe://prod.example/ns//sa/admin")),
        ),
        (
            "a DNS SAN spelled like a SPIFFE ID",
            Some(client_ca.issue(
                &[SanType::DnsName(
                    "spiffe://prod.example/ops/sa/admin".try_into().unwrap(),
                )],
                false,
            )),
        ),
    ];
    let mut rejected = 0;
    for (case, pem) in &rejected_cases {
        match describe_over_tls(&server, &server_ca, pem.as_ref()).await {
            Ok(()) => panic!("{case}: accepted"),
            Err(err) => {
                // Refused in the handshake: never a gRPC answer from a handler.
                assert!(!err.contains("PermissionDenied"), "{case}: {err}");
                rejected += 1;
            }
        }
    }
    assert_eq!(rejected, rejected_cases.len());
    // Only the two accepted calls reached a handler.
    assert_eq!(server.audit.written(), 2);
    // Plaintext to a TLS port does not get through either.
    let plain = KeyBrokerClient::connect(server.url()).await;
    let answered = match plain {
        Ok(mut client) => client
            .describe_key(proto::DescribeKeyRequest {
                tenant_id: "acme".into(),
            })
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!answered, "a plaintext client was served on the TLS port");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_client_ca_and_policy_are_picked_up_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let old_ca = Ca::new("client CA 1");
    let new_ca = Ca::new("client CA 2");
    let mut config = test_config(dir.path());
    let tls = write_server_tls(dir.path(), &server_ca, &old_ca.pem());
    let client_ca_path = tls.client_ca.clone().unwrap();
    config.tls = tls;
    config.tls.reload_interval = Duration::from_millis(100);
    let policy_path = write_policy(dir.path(), ALLOW_ALL_OF_TRUST_DOMAIN);
    config.server.authz_policy = Some(policy_path.clone());
    let server = TestServer::start(config).await;
    let caller = new_ca.client("spiffe://prod.example/ns/new/sa/api");
    assert!(
        describe_over_tls(&server, &server_ca, Some(&caller))
            .await
            .is_err()
    );

    // The mesh rotates the CA bundle: old and new CA during the overlap.
    std::fs::write(&client_ca_path, format!("{}{}", old_ca.pem(), new_ca.pem())).unwrap();
    wait_for(|| async {
        describe_over_tls(&server, &server_ca, Some(&caller))
            .await
            .is_ok()
    })
    .await;

    // The policy loses the rule: denied with the identity in the message.
    std::fs::write(
        &policy_path,
        "[[allow]]\nidentities = [\"dns:billing.internal\"]\nmethods = [\"*\"]\ntenants = [\"*\"]\n",
    )
    .unwrap();
    wait_for(|| async {
        describe_over_tls(&server, &server_ca, Some(&caller))
            .await
            .is_err_and(|e| {
                e.contains("PermissionDenied") && e.contains("spiffe://prod.example/ns/new/sa/api")
            })
    })
    .await;
    // A broken edit keeps the last good policy.
    std::fs::write(
        &policy_path,
        "[[allow]]\nidentities = [\"dns:x\"]\nmethods = [\"Typo/*\"]\ntenants = [\"*\"]\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let dns = new_ca.client("billing.internal");
    describe_over_tls(&server, &server_ca, Some(&dns))
        .await
        .unwrap();
    server.stop().await;
}

async fn wait_for<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "condition not reached within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Identities × methods × tenants: exactly the cells the policy grants
/// succeed; every other cell is PERMISSION_DENIED and makes no provider call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_matrix_allows_exactly_the_granted_cells() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let mut config = test_config(dir.path());
    config.tls = write_server_tls(dir.path(), &server_ca, &client_ca.pem());
    config.server.authz_policy = Some(write_policy(
        dir.path(),
        r#"
        [[allow]]
        description = "setup"
        identities = ["spiffe://prod.example/setup"]
        methods = ["*"]
        tenants = ["*"]

        [[allow]]
        description = "billing uses acme's keys"
        identities = ["spiffe://prod.example/ns/billing/*"]
        methods = ["keybroker.v1.KeyBroker/GenerateDataKey", "keybroker.v1.KeyBroker/UnwrapKey"]
        tenants = ["acme"]

        [[allow]]
        description = "reports read globex tenants"
        identities = ["dns:reports.internal"]
        methods = ["keybroker.v1.KeyBroker/UnwrapKey"]
        tenants = ["globex-*"]

        [[allow]]
        description = "operators"
        identities = ["spiffe://prod.example/ops/*"]
        methods = ["keybroker.v1.KeyAdmin/*", "keybroker.v1.KeyBroker/DescribeKey"]
        tenants = ["*"]
        "#,
    ));
    let server = TestServer::start(config).await;
    let setup_pem = client_ca.client("spiffe://prod.example/setup");
    let setup = tls_channel(&server, &server_ca, Some(&setup_pem))
        .await
        .unwrap();
    let tenants = ["acme", "globex-eu"];
    let mut wrapped = BTreeMap::new();
    for tenant in tenants {
        KeyAdminClient::new(setup.clone())
            .create_tenant(proto::CreateTenantRequest {
                tenant_id: tenant.into(),
                key_policy: 0,
                key_hierarchy: proto::KeyHierarchy::Direct.into(),
                newest_import_primary: false,
            })
            .await
            .unwrap();
        let generated = KeyBrokerClient::new(setup.clone())
            .generate_data_key(proto::GenerateDataKeyRequest {
                tenant_id: tenant.into(),
                key_spec: 0,
                context: ctx(&[]),
                justification: None,
            })
            .await
            .unwrap()
            .into_inner();
        wrapped.insert(tenant, generated.wrapped_key);
    }

    let identities = [
        "spiffe://prod.example/ns/billing/sa/api",
        "reports.internal",
        "spiffe://prod.example/ops/alice",
        "spiffe://prod.example/ns/intruder/sa/x",
    ];
    let methods = ["GenerateDataKey", "UnwrapKey", "DescribeKey", "ListKeys"];
    // The expected matrix, written out independently of the policy engine.
    let allowed = |identity: &str, method: &str, tenant: &str| {
        matches!(
            (identity, method, tenant),
            (
                "spiffe://prod.example/ns/billing/sa/api",
                "GenerateDataKey" | "UnwrapKey",
                "acme"
            ) | ("reports.internal", "UnwrapKey", "globex-eu")
                | (
                    "spiffe://prod.example/ops/alice",
                    "DescribeKey" | "ListKeys",
                    _
                )
        )
    };
    let (mut allowed_ok, mut denied_ok) = (0, 0);
    for identity in identities {
        let pem = client_ca.client(identity);
        let channel = tls_channel(&server, &server_ca, Some(&pem)).await.unwrap();
        for method in methods {
            for tenant in tenants {
                let calls_before = server.decrypt_calls() + server.encrypt_calls();
                let result = call(&channel, method, tenant, &wrapped[tenant]).await;
                let calls = server.decrypt_calls() + server.encrypt_calls() - calls_before;
                let cell = format!("{identity} × {method} × {tenant}");
                if allowed(identity, method, tenant) {
                    result.unwrap_or_else(|s| panic!("{cell}: refused: {s:?}"));
                    allowed_ok += 1;
                } else {
                    let status = result.err().unwrap_or_else(|| panic!("{cell}: allowed"));
                    assert_eq!(status.code(), Code::PermissionDenied, "{cell}: {status:?}");
                    assert!(
                        status.message().contains(identity) && status.message().contains(method),
                        "{cell}: {}",
                        status.message()
                    );
                    assert_eq!(calls, 0, "{cell}: a denied call reached the provider");
                    denied_ok += 1;
                }
            }
        }
    }
    assert_eq!((allowed_ok, denied_ok), (7, 25));
    server.stop().await;
}

async fn call(
    channel: &Channel,
    method: &str,
    tenant: &str,
    wrapped: &[u8],
) -> Result<(), tonic::Status> {
    let mut broker = KeyBrokerClient::new(channel.clone());
    let tenant_id = tenant.to_owned();
    match method {
        "GenerateDataKey" => broker
            .generate_data_key(proto::GenerateDataKeyRequest {
                tenant_id,
                key_spec: 0,
                context: ctx(&[]),
                justification: None,
            })
            .await
            .map(|_| ()),
        "UnwrapKey" => broker
            .unwrap_key(proto::UnwrapKeyRequest {
                tenant_id,
                wrapped_key: wrapped.to_vec().into(),
                context: ctx(&[]),
                justification: None,
            })
            .await
            .map(|_| ()),
        "DescribeKey" => broker
            .describe_key(proto::DescribeKeyRequest { tenant_id })
            .await
            .map(|_| ()),
        "ListKeys" => KeyAdminClient::new(channel.clone())
            .list_keys(proto::ListKeysRequest { tenant_id })
            .await
            .map(|_| ()),
        other => panic!("no such method {other}"),
    }
}

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_writes_one_audit_record_without_key_material() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.log");
    let mut config = test_config(dir.path());
    config.audit = AuditSettings {
        target: AuditTarget::File(audit_path.clone()),
        ..AuditSettings::default()
    };
    config.server.authz_policy = Some(write_policy(
        dir.path(),
        "[[allow]]\nidentities=[\"unauthenticated\"]\nmethods=[\"keybroker.v1.KeyBroker/*\"]\ntenants=[\"acme\"]\n",
    ));
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let mut canaries = Vec::new();
    let mut expected_outcomes = Vec::new();

    let mut request = tonic::Request::new(proto::GenerateDataKeyRequest {
        tenant_id: "acme".into(),
        key_spec: 0,
        context: ctx(&[("table", "orders")]),
        justification: None,
    });
    request
        .metadata_mut()
        .insert("x-request-id", "req-canary-1".parse().unwrap());
    let response = client.generate_data_key(request).await.unwrap();
    assert_eq!(
        response.metadata().get("x-request-id").unwrap(),
        "req-canary-1"
    );
    let generated = response.into_inner();
    canaries.push(generated.plaintext.to_vec());
    expected_outcomes.push(("GenerateDataKey", "OK"));
    for i in 0..3 {
        let unwrapped = client
            .unwrap_key(proto::UnwrapKeyRequest {
                tenant_id: "acme".into(),
                wrapped_key: generated.wrapped_key.clone().into(),
                context: ctx(&[("table", "orders")]),
                justification: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(unwrapped.plaintext, generated.plaintext, "unwrap {i}");
        expected_outcomes.push(("UnwrapKey", "OK"));
    }
    let wrapped_plain = vec![0x5a; 32];
    canaries.push(wrapped_plain.clone());
    client
        .wrap_key(proto::WrapKeyRequest {
            tenant_id: "acme".into(),
            plaintext: wrapped_plain,
            context: ctx(&[]),
            justification: None,
        })
        .await
        .unwrap();
    expected_outcomes.push(("WrapKey", "OK"));
    let bad = client
        .unwrap_key(proto::UnwrapKeyRequest {
            tenant_id: "acme".into(),
            wrapped_key: b"not a wrapped key".to_vec().into(),
            context: ctx(&[]),
            justification: None,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    expected_outcomes.push(("UnwrapKey", "INVALID_ARGUMENT"));
    let denied = client
        .describe_key(proto::DescribeKeyRequest {
            tenant_id: "globex".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    expected_outcomes.push(("DescribeKey", "PERMISSION_DENIED"));
    let admin = crate::common::admin_client(&server)
        .await
        .list_keys(proto::ListKeysRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(admin.code(), Code::PermissionDenied);
    expected_outcomes.push(("ListKeys", "PERMISSION_DENIED"));

    let records = audit_lines(&audit_path);
    assert_eq!(records.len(), expected_outcomes.len(), "{records:#?}");
    for (record, (method, outcome)) in records.iter().zip(&expected_outcomes) {
        assert!(
            record["method"].as_str().unwrap().ends_with(method),
            "{record}"
        );
        assert_eq!(record["outcome"], *outcome, "{record}");
        assert_eq!(record["caller"], "unauthenticated");
        assert!(record["time"].as_str().unwrap().ends_with('Z'));
        assert!(record["latency_us"].as_u64().is_some());
        assert!(!record["request_id"].as_str().unwrap().is_empty());
    }
    assert_eq!(records[0]["request_id"], "req-canary-1");
    assert_eq!(records[0]["tenant_id"], "acme");
    assert_eq!(records[0]["key_binding"], "platform");
    assert_eq!(records[0]["provider_calls"], 1);
    // The first unwrap loads (unseals) the DEK, the next two are hits.
    let hits: Vec<_> = records[1..4]
        .iter()
        .map(|r| r["cache_hit"].clone())
        .collect();
    assert_eq!(hits, [false, true, true].map(serde_json::Value::from));
    // Sealed under the tenant key cached at its mint: no provider call.
    assert_eq!(records[1]["provider_calls"], 0);
    assert_eq!(records[2]["provider_calls"], 0);
    assert_eq!(records[1]["wrapped_key_sha256"].as_str().unwrap().len(), 16);
    assert!(records[6]["error"].as_str().unwrap().contains("globex"));
    // A method no rule grants: the denial still names the targeted tenant,
    // in the message and in the record (the body is decoded for it).
    assert_eq!(records[7]["tenant_id"], "acme", "{}", records[7]);
    assert_eq!(records[7]["outcome"], "PERMISSION_DENIED");
    assert!(
        records[7]["error"]
            .as_str()
            .unwrap()
            .contains("for tenant 'acme'"),
        "{}",
        records[7]
    );

    let text = std::fs::read_to_string(&audit_path).unwrap();
    for canary in &canaries {
        for shown in [
            hex::encode(canary),
            base64::engine::general_purpose::STANDARD.encode(canary),
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(canary),
        ] {
            assert!(!text.contains(&shown), "key material in the audit log");
        }
        assert!(
            !text
                .as_bytes()
                .windows(canary.len())
                .any(|w| w == &canary[..])
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_audit_returns_no_key_when_the_record_cannot_be_written() {
    for fail_closed in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        // Every write to /dev/full fails with ENOSPC.
        config.audit = AuditSettings {
            target: AuditTarget::File("/dev/full".into()),
            fail_closed,
            ..AuditSettings::default()
        };
        let server = TestServer::start(config).await;
        let mut client = server.client().await;
        let mut keys_returned = 0;
        for _ in 0..5 {
            match client
                .generate_data_key(proto::GenerateDataKeyRequest {
                    tenant_id: "acme".into(),
                    key_spec: 0,
                    context: ctx(&[]),
                    justification: None,
                })
                .await
            {
                Ok(r) => {
                    assert_eq!(r.into_inner().plaintext.len(), 32);
                    keys_returned += 1;
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable);
                    assert!(status.message().contains("audit"), "{}", status.message());
                }
            }
        }
        assert_eq!(
            keys_returned,
            if fail_closed { 0 } else { 5 },
            "fail_closed={fail_closed}"
        );
        assert_eq!(server.audit.failed(), 5);
        server.stop().await;
    }
}

/// A tenant flooding cold unwraps at 10× its limit gets RESOURCE_EXHAUSTED
/// beyond it, its provider call rate stays at the limit, and another tenant
/// keeps being served (cached and cold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_is_held_to_its_kms_quota_and_others_keep_working() {
    const RATE: u32 = 20;
    const FLOOD_SECS: u64 = 2;
    let dir = tempfile::tempdir().unwrap();
    // A remote-kind provider (local keyring inside) so the quota applies.
    let provider = Arc::new(SlowKeyring::remote(Duration::from_millis(1)));
    // Wrapped keys made by an unlimited server over the same provider.
    let mut unlimited = test_config(dir.path());
    unlimited.quota = QuotaSettings::UNLIMITED;
    let maker = TestServer::start_with_provider(unlimited, provider.clone()).await;
    let mut client = maker.client().await;
    let flood_total = (RATE as u64) * 10 * FLOOD_SECS;
    let mut flood_keys = Vec::new();
    for _ in 0..flood_total {
        flood_keys.push(
            generate(&mut client, "flood", &[])
                .await
                .unwrap()
                .wrapped_key,
        );
    }
    let calm_keys: Vec<_> = futures::future::join_all((0..5).map(|_| {
        let mut c = client.clone();
        async move { generate(&mut c, "calm", &[]).await.unwrap().wrapped_key }
    }))
    .await;
    maker.stop().await;

    let mut limited = test_config(dir.path());
    limited.quota = QuotaSettings::new(
        Limit {
            per_second: RATE,
            burst: RATE,
        },
        Limit::UNLIMITED,
    );
    let server = TestServer::start_with_provider(limited, provider.clone()).await;
    let client = server.client().await;
    // The calm tenant's first key is cached before the flood.
    unwrap(&mut client.clone(), "calm", &[], &calm_keys[0])
        .await
        .unwrap();

    let decrypts_before = provider.decrypts.load(Ordering::SeqCst);
    let started = Instant::now();
    let interval = Duration::from_micros(1_000_000 / u64::from(RATE * 10));
    let mut flood = tokio::task::JoinSet::new();
    for (i, key) in flood_keys.into_iter().enumerate() {
        let mut c = client.clone();
        let at = started + interval * u32::try_from(i).unwrap();
        flood.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            unwrap(&mut c, "flood", &[], &key).await
        });
    }
    // Meanwhile the calm tenant: cached unwraps, and its other cold keys.
    let mut calm_client = client.clone();
    let calm = tokio::spawn(async move {
        let mut served = 0;
        while started.elapsed() < Duration::from_secs(FLOOD_SECS) {
            unwrap(&mut calm_client, "calm", &[], &calm_keys[0])
                .await
                .unwrap();
            served += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for key in &calm_keys[1..] {
            unwrap(&mut calm_client, "calm", &[], key).await.unwrap();
            served += 1;
        }
        served
    });
    let (mut ok, mut exhausted) = (0u64, 0u64);
    while let Some(result) = flood.join_next().await {
        match result.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("tenant 'flood'"),
                    "{}",
                    status.message()
                );
                exhausted += 1;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let calm_served = calm.await.unwrap();
    let flood_decrypts = provider.decrypts.load(Ordering::SeqCst) - decrypts_before - 4;
    // Burst + rate × time, with one token of slack for timing.
    let ceiling = f64::from(RATE) + f64::from(RATE) * elapsed + 1.0;
    assert_eq!(
        ok, flood_decrypts,
        "each admitted cold unwrap is one provider call"
    );
    assert!(
        (flood_decrypts as f64) <= ceiling,
        "{flood_decrypts} provider calls in {elapsed:.2}s exceed the limit ({ceiling:.0})"
    );
    assert!(
        flood_decrypts as f64 >= f64::from(RATE) * FLOOD_SECS as f64 * 0.8,
        "the limit admitted too few calls: {flood_decrypts}"
    );
    assert_eq!(ok + exhausted, flood_total);
    assert!(calm_served >= 10 + 4, "calm tenant served {calm_served}");
    server.stop().await;
}

/// Hit rate of `tenant`'s UnwrapKey records (single and batch items) in
/// `records`.
fn hit_rate(records: &[serde_json::Value], tenant: &str) -> (usize, usize) {
    let mine: Vec<_> = records
        .iter()
        .filter(|r| {
            r["tenant_id"] == tenant
                && r["method"]
                    .as_str()
                    .is_some_and(|m| m.ends_with("UnwrapKey"))
        })
        .collect();
    let hits = mine.iter().filter(|r| r["cache_hit"] == true).count();
    (hits, mine.len())
}

/// One run of the flood below: `steady`'s hits before and during the
/// flood, and the flood's keys served uncached.
async fn flood_run(share: u8) -> ((usize, usize), (usize, usize), u64) {
    const STEADY_KEYS: usize = 100;
    const FLOOD_BATCHES: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let mut config = test_config(dir.path());
    // Room for 1,000 keys; the flood makes 3,000.
    config.cache.max_entries = 1_000;
    config.cache.tenant_share = share;
    config.audit = AuditSettings {
        target: AuditTarget::File(audit.clone()),
        ..AuditSettings::default()
    };
    let server = TestServer::start(config).await;
    let mut broker = server.client().await;
    let c = [("table", "orders")];
    let mut steady = Vec::new();
    for _ in 0..STEADY_KEYS {
        steady.push(
            generate(&mut broker, "steady", &c)
                .await
                .unwrap()
                .wrapped_key,
        );
    }
    let pass = |mut broker: KeyBrokerClient<Channel>, keys: Vec<Vec<u8>>| async move {
        for wrapped in &keys {
            unwrap(&mut broker, "steady", &c, wrapped).await.unwrap();
        }
    };
    // Warm, then the pass measured before the flood.
    pass(broker.clone(), steady.clone()).await;
    let mark = audit_lines(&audit).len();
    pass(broker.clone(), steady.clone()).await;
    let records = audit_lines(&audit);
    let before = hit_rate(&records[mark..], "steady");

    // The flood: 3,000 new keys made and read back in batches, while the
    // steady tenant reads its 100 three times.
    let mark = records.len();
    let stats = Arc::clone(server.broker.cache().stats());
    let over_share = stats.snapshot().over_share;
    let mut flooder = broker.clone();
    // Registered (and its tenant key minted) before the flood: what is
    // measured is the cache, not a registry write under a loaded machine.
    generate(&mut flooder, "flood", &[("table", "orders")])
        .await
        .unwrap();
    let flood = tokio::spawn(async move {
        for _ in 0..FLOOD_BATCHES {
            let items = (0..250)
                .map(|_| crate::common::generate_req("flood", &[("table", "orders")]))
                .collect();
            let made = flooder
                .batch_generate_data_key(proto::BatchGenerateDataKeyRequest { items })
                .await
                .unwrap()
                .into_inner()
                .results;
            let items = made
                .into_iter()
                .map(|r| {
                    crate::common::unwrap_req(
                        "flood",
                        &[("table", "orders")],
                        &r.response
                            .unwrap_or_else(|| panic!("a flood key was not made: {:?}", r.status))
                            .wrapped_key,
                    )
                })
                .collect();
            let read = flooder
                .batch_unwrap_key(proto::BatchUnwrapKeyRequest { items })
                .await
                .unwrap()
                .into_inner()
                .results;
            assert!(read.iter().all(|r| r.response.is_some()));
        }
    });
    for _ in 0..3 {
        pass(broker.clone(), steady.clone()).await;
    }
    flood.await.unwrap();
    let records = audit_lines(&audit);
    let during = hit_rate(&records[mark..], "steady");
    let flood_uncached = stats.snapshot().over_share - over_share;
    server.stop().await;
    (before, during, flood_uncached)
}

/// One tenant reading 3,000 new keys through a cache with room for 1,000
/// does not push another tenant's keys out: with the default per-tenant
/// share (25 %), the steady tenant's hit rate stays 100 % during the flood,
/// and the flood's keys past its share are served uncached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_flood_leaves_the_others_cached() {
    let (before, during, uncached) = flood_run(25).await;
    println!(
        "steady tenant's hits: before {}/{}, during {}/{}; flood keys served uncached: {uncached} of 3000",
        before.0, before.1, during.0, during.1
    );
    assert_eq!(before, (100, 100));
    assert_eq!(
        during,
        (300, 300),
        "the flood evicted the steady tenant's keys"
    );
    assert!(
        uncached > 2_500,
        "the flood past its share is not cached: {uncached}"
    );
}
