//! Findings of the security review and the connection hardening, each
//! through the real `keybroker` binary: fail-closed audit that commits no
//! unaudited change, request text that cannot forge log lines, silent
//! connections that cannot exhaust the server, bodies that are not protobuf,
//! and plaintext on the network refused without a policy.
//!
//! One file, over 600 lines, on purpose: each defense is tested through the
//! real binary with the same process helpers, and they are reviewed together.

use std::process::Command;
use std::time::{Duration, Instant};

use keybroker::proto::{
    self, key_admin_client::KeyAdminClient, key_broker_client::KeyBrokerClient,
};
use tokio::io::AsyncReadExt;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{ctx, random_material};
use crate::process::Process;

async fn admin(process: &Process) -> KeyAdminClient<Channel> {
    KeyAdminClient::new(process.channel().await)
}

fn import(tenant: &str, name: &str, primary: bool) -> proto::ImportKeyMaterialRequest {
    proto::ImportKeyMaterialRequest {
        tenant_id: tenant.into(),
        name: name.into(),
        description: String::new(),
        key_material_base64: random_material(),
        make_primary: primary,
        new_version: false,
        wrapped_key_material: Vec::new(),
        import_token: String::new(),
    }
}

#[tokio::test]
async fn fail_closed_audit_commits_no_change_it_cannot_record() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let audit_arg = audit.to_str().unwrap();
    // A tenant with two keys, k1 primary, audited normally.
    let process = Process::spawn_with(&[], dir.path(), &["--audit-log", audit_arg], &[]);
    let mut a = admin(&process).await;
    a.create_tenant(proto::CreateTenantRequest {
        tenant_id: "acme".into(),
        key_policy: 0,
        key_hierarchy: proto::KeyHierarchy::Direct.into(),
        newest_import_primary: false,
    })
    .await
    .unwrap();
    a.import_key_material(import("acme", "k1", true))
        .await
        .unwrap();
    a.import_key_material(import("acme", "k2", false))
        .await
        .unwrap();
    drop(process);

    // Every write to /dev/full fails: each state-changing call is refused
    // before it commits.
    let process = Process::spawn_with(
        &[],
        dir.path(),
        &["--audit-log", "/dev/full", "--audit-fail-closed"],
        &[],
    );
    let mut a = admin(&process).await;
    let results: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "CreateTenant",
            a.create_tenant(proto::CreateTenantRequest {
                tenant_id: "globex".into(),
                key_policy: 0,
                key_hierarchy: proto::KeyHierarchy::Direct.into(),
                newest_import_primary: false,
            })
            .await
            .map(drop),
        ),
        (
            "SetTenantPolicy",
            a.set_tenant_policy(proto::SetTenantPolicyRequest {
                tenant_id: "acme".into(),
                key_policy: proto::KeyPolicy::SingleKey.into(),
            })
            .await
            .map(drop),
        ),
        (
            "ImportKeyMaterial",
            a.import_key_material(import("acme", "k3", true))
                .await
                .map(drop),
        ),
        (
            "LinkKey",
            a.link_key(proto::LinkKeyRequest {
                tenant_id: "acme".into(),
                name: "aws".into(),
                provider: proto::Provider::AwsKms.into(),
                key_reference: "arn:aws:kms:us-east-1:111122223333:key/k".into(),
                region: "us-east-1".into(),
                role_arn: "arn:aws:iam::111122223333:role/r".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "SetPrimaryKey",
            a.set_primary_key(proto::SetPrimaryKeyRequest {
                tenant_id: "acme".into(),
                name: "k2".into(),
            })
            .await
            .map(drop),
        ),
        (
            "DisableKey",
            a.disable_key(proto::DisableKeyRequest {
                tenant_id: "acme".into(),
                name: "k1".into(),
                reason: "test".into(),
                reencrypt_to: String::new(),
            })
            .await
            .map(drop),
        ),
        (
            "EnableKey",
            a.enable_key(proto::EnableKeyRequest {
                tenant_id: "acme".into(),
                name: "k1".into(),
            })
            .await
            .map(drop),
        ),
        (
            "UnlinkKey",
            a.unlink_key(proto::UnlinkKeyRequest {
                tenant_id: "acme".into(),
                name: "k2".into(),
                force: true,
            })
            .await
            .map(drop),
        ),
    ];
    for (method, result) in results {
        let status = result.expect_err(method);
        assert_eq!(status.code(), Code::Unavailable, "{method}: {status:?}");
        assert!(
            status.message().contains("audit"),
            "{method}: {}",
            status.message()
        );
    }
    drop(process);

    // After a restart nothing of it happened.
    let process = Process::spawn_with(
        &[],
        dir.path(),
        &["--audit-log", audit_arg, "--audit-fail-closed"],
        &[],
    );
    let mut a = admin(&process).await;
    let err = a
        .get_tenant(proto::GetTenantRequest {
            tenant_id: "globex".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "CreateTenant was committed");
    let tenant = a
        .get_tenant(proto::GetTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!(tenant.key_policy(), proto::KeyPolicy::Keyring);
    let keys = a
        .list_keys(proto::ListKeysRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    let summary: Vec<(String, bool, proto::KeyState)> = keys
        .iter()
        .map(|k| (k.name.clone(), k.primary, k.state()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("k1".to_owned(), true, proto::KeyState::Active),
            ("k2".to_owned(), false, proto::KeyState::Active),
        ]
    );

    // With a working sink, a change writes its intent (durably) before it
    // commits, then its outcome.
    a.disable_key(proto::DisableKeyRequest {
        tenant_id: "acme".into(),
        name: "k2".into(),
        reason: "audited".into(),
        reencrypt_to: String::new(),
    })
    .await
    .unwrap();
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["method"] == "keybroker.v1.KeyAdmin/DisableKey")
        .collect();
    let outcomes: Vec<&str> = records
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["INTENT", "OK"]);
    assert_eq!(records[0]["tenant_id"], "acme");
    assert_eq!(records[0]["key_binding"], "k2");
    assert_eq!(records[0]["request_id"], records[1]["request_id"]);
}

/// A string no log line may carry raw: a newline that would start a forged
/// line, ANSI escapes, a carriage return, a bell.
const HOSTILE: &str =
    "evil\n2026-12-01T00:00:00.000000Z  INFO keybroker: forged line\u{1b}[31m\r\u{7}";

async fn send_hostile_requests(channel: Channel) {
    let mut broker = KeyBrokerClient::new(channel.clone());
    let mut admin = KeyAdminClient::new(channel);
    let c = ctx(&[(HOSTILE, HOSTILE), ("table", HOSTILE)]);
    // A genuine key whose envelope then names a hostile binding.
    let good = broker
        .generate_data_key(proto::GenerateDataKeyRequest {
            tenant_id: "acme".into(),
            context: ctx(&[]),
            key_spec: 0,
            justification: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut forged =
        <proto::WrappedKey as prost::Message>::decode(good.wrapped_key.as_slice()).unwrap();
    forged.key_binding = HOSTILE.into();
    forged.provider_key_version = HOSTILE.into();
    let forged = prost::Message::encode_to_vec(&forged);
    for tenant in [HOSTILE, "acme"] {
        let _ = broker
            .generate_data_key(proto::GenerateDataKeyRequest {
                tenant_id: tenant.into(),
                context: c.clone(),
                key_spec: 0,
                justification: None,
            })
            .await;
        let _ = broker
            .wrap_key(proto::WrapKeyRequest {
                tenant_id: tenant.into(),
                context: c.clone(),
                plaintext: vec![1; 32],
                justification: None,
            })
            .await;
        for wrapped in [&forged, &good.wrapped_key] {
            let _ = broker
                .unwrap_key(proto::UnwrapKeyRequest {
                    tenant_id: tenant.into(),
                    context: c.clone(),
                    wrapped_key: wrapped.clone().into(),
                    justification: None,
                })
                .await;
            let _ = broker
                .rewrap_key(proto::RewrapKeyRequest {
                    tenant_id: tenant.into(),
                    context: c.clone(),
                    wrapped_key: wrapped.clone(),
                    justification: None,
                })
                .await;
        }
        let _ = broker
            .describe_key(proto::DescribeKeyRequest {
                tenant_id: tenant.into(),
            })
            .await;
        let _ = admin
            .create_tenant(proto::CreateTenantRequest {
                tenant_id: tenant.into(),
                key_policy: 0,
                key_hierarchy: proto::KeyHierarchy::Direct.into(),
                newest_import_primary: false,
            })
            .await;
        let _ = admin
            .get_tenant(proto::GetTenantRequest {
                tenant_id: tenant.into(),
            })
            .await;
        let _ = admin
            .set_tenant_policy(proto::SetTenantPolicyRequest {
                tenant_id: tenant.into(),
                key_policy: 1,
            })
            .await;
        let _ = admin
            .link_key(proto::LinkKeyRequest {
                tenant_id: tenant.into(),
                name: HOSTILE.into(),
                description: HOSTILE.into(),
                provider: proto::Provider::AwsKms.into(),
                key_reference: HOSTILE.into(),
                region: HOSTILE.into(),
                role_arn: HOSTILE.into(),
                service_account: HOSTILE.into(),
                make_primary: true,
                replica_regions: vec![HOSTILE.into()],
                vault_approle: None,
                azure_tenant_id: String::new(),
                vault_jwt: None,
            })
            .await;
        let _ = admin
            .link_key(proto::LinkKeyRequest {
                tenant_id: tenant.into(),
                name: HOSTILE.into(),
                provider: proto::Provider::VaultTransit.into(),
                key_reference: HOSTILE.into(),
                vault_approle: Some(proto::VaultAppRole {
                    mount: HOSTILE.into(),
                    role_id: HOSTILE.into(),
                    secret_id: HOSTILE.into(),
                }),
                ..Default::default()
            })
            .await;
        let _ = admin
            .link_key(proto::LinkKeyRequest {
                tenant_id: tenant.into(),
                name: "g".into(),
                provider: proto::Provider::GcpKms.into(),
                key_reference: HOSTILE.into(),
                service_account: HOSTILE.into(),
                ..Default::default()
            })
            .await;
        let _ = admin
            .import_key_material(proto::ImportKeyMaterialRequest {
                tenant_id: tenant.into(),
                name: HOSTILE.into(),
                description: HOSTILE.into(),
                key_material_base64: HOSTILE.into(),
                make_primary: false,
                new_version: false,
                wrapped_key_material: Vec::new(),
                import_token: String::new(),
            })
            .await;
        let _ = admin
            .list_keys(proto::ListKeysRequest {
                tenant_id: tenant.into(),
            })
            .await;
        let _ = admin
            .get_key(proto::GetKeyRequest {
                tenant_id: tenant.into(),
                name: HOSTILE.into(),
            })
            .await;
        let _ = admin
            .set_primary_key(proto::SetPrimaryKeyRequest {
                tenant_id: tenant.into(),
                name: HOSTILE.into(),
            })
            .await;
        let _ = admin
            .disable_key(proto::DisableKeyRequest {
                tenant_id: tenant.into(),
                name: HOSTILE.into(),
                reason: HOSTILE.into(),
                reencrypt_to: String::new(),
            })
            .await;
        let _ = admin
            .enable_key(proto::EnableKeyRequest {
                tenant_id: tenant.into(),
                name: HOSTILE.into(),
            })
            .await;
        let _ = admin
            .unlink_key(proto::UnlinkKeyRequest {
                tenant_id: tenant.into(),
                name: HOSTILE.into(),
                force: true,
            })
            .await;
    }
}

#[tokio::test]
async fn request_text_never_forges_a_log_line_or_an_audit_record() {
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit.log");
        // The hostile tenant is denied: its denial is logged inside the RPC
        // span, so both carry the tenant id.
        let policy = dir.path().join("policy.toml");
        std::fs::write(
            &policy,
            "[[allow]]\nidentities = [\"unauthenticated\"]\nmethods = [\"keybroker.v1.KeyBroker/*\", \"keybroker.v1.KeyAdmin/*\"]\ntenants = [\"acme\"]\n",
        )
        .unwrap();
        let process = Process::spawn_with(
            &[],
            dir.path(),
            &[
                "--log-format",
                format,
                "--audit-log",
                audit.to_str().unwrap(),
                "--authz-policy",
                policy.to_str().unwrap(),
            ],
            // Every span and event, the RPC spans' request fields included.
            &[("RUST_LOG", "trace")],
        );
        send_hostile_requests(process.channel().await).await;
        let output = process.output();
        let mut lines = 0;
        for line in output.lines() {
            lines += 1;
            assert!(
                !line.chars().any(|c| c.is_control() && c != '\t'),
                "{format}: raw control character in a log line: {line:?}"
            );
            match format {
                // Every text line starts with its own timestamp: nothing a
                // request carried began a line.
                "text" => assert!(
                    line.len() > 20
                        && line.as_bytes()[..4].iter().all(u8::is_ascii_digit)
                        && !line.starts_with("2026-12-01T00:00:00.000000Z"),
                    "text: a line not written by the logger: {line:?}"
                ),
                _ => {
                    serde_json::from_str::<serde_json::Value>(line)
                        .unwrap_or_else(|e| panic!("json: not a JSON line ({e}): {line:?}"));
                }
            }
        }
        assert!(lines > 20, "{format}: expected a log of the calls");
        // Logged, escaped (and in JSON, that escape escaped once more).
        let shown = if format == "json" {
            r"evil\\n2026"
        } else {
            r"evil\n2026"
        };
        assert!(
            output.contains(shown),
            "{format}: the hostile text was not logged escaped"
        );
        let records = std::fs::read_to_string(&audit).unwrap();
        let mut audited = 0;
        for line in records.lines() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            for field in ["tenant_id", "key_binding", "error", "method", "caller"] {
                if let Some(text) = record[field].as_str() {
                    assert!(
                        !keybroker::text::has_control(text),
                        "{format}: audit {field} holds raw control characters: {text:?}"
                    );
                    assert!(text.len() < 4096, "{format}: audit {field} is unbounded");
                }
            }
            audited += 1;
        }
        assert!(audited >= 30, "{format}: {audited} audit records");
    }
}

#[tokio::test]
async fn silent_connections_cannot_exhaust_the_server() {
    let dir = tempfile::tempdir().unwrap();
    // 256 descriptors: connections are capped at 256 - 128 = 128.
    let process = Process::spawn_with(
        &["sh", "-c", "ulimit -n 256 && exec \"$0\" \"$@\""],
        dir.path(),
        &["--handshake-timeout", "1s", "--idle-timeout", "3s"],
        &[],
    );
    let addr = process.addr().await;
    let url = format!("http://{addr}");
    let mut established = KeyBrokerClient::connect(url.clone()).await.unwrap();
    let describe = proto::DescribeKeyRequest {
        tenant_id: "acme".into(),
    };
    established.describe_key(describe.clone()).await.unwrap();

    // 400 connections that never say a word.
    let mut silent = Vec::new();
    for _ in 0..400 {
        if let Ok(s) = tokio::net::TcpStream::connect(&addr).await {
            silent.push(s);
        }
    }
    assert!(silent.len() >= 300, "only {} connected", silent.len());
    // The established caller is served throughout.
    established.describe_key(describe.clone()).await.unwrap();
    // A new caller is served within the handshake timeout or so: the silent
    // ones are closed, none holds a descriptor forever.
    let started = Instant::now();
    loop {
        let served = match KeyBrokerClient::connect(url.clone()).await {
            Ok(mut c) => c.describe_key(describe.clone()).await.is_ok(),
            Err(_) => false,
        };
        if served {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a new caller was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "new caller served after {:?} under 400 silent connections",
        started.elapsed()
    );
    // Every silent connection is closed by the server within the timeout.
    let deadline = Duration::from_secs(3);
    let mut closed = 0;
    for s in &mut silent {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(deadline, s.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => closed += 1,
            Ok(Ok(_)) => panic!("a silent connection was sent data"),
            Err(_) => {}
        }
    }
    assert_eq!(closed, silent.len(), "silent connections left open");

    // An idle connection is closed after the idle timeout; the client
    // reconnects on its next call.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    established.describe_key(describe).await.unwrap();
    assert!(
        process.output().contains("closing an idle connection"),
        "no idle connection was closed"
    );
    assert!(process.output().contains("connection limit reached"));
}

/// Sends raw bytes as a request body.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let len = bytes::Buf::remaining(buf);
        Ok(Some(bytes::Buf::copy_to_bytes(buf, len).to_vec()))
    }
}

#[tokio::test]
async fn a_body_that_is_not_protobuf_is_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let process = Process::spawn_with(&[], dir.path(), &[], &[]);
    let channel = process.channel().await;
    for method in [
        "/keybroker.v1.KeyBroker/UnwrapKey",
        "/keybroker.v1.KeyAdmin/CreateTenant",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        // A field 1 (string) whose length runs past the end.
        let err = grpc
            .unary(
                tonic::Request::new(vec![0x0a, 0x7f, b'a']),
                http::uri::PathAndQuery::from_static(method),
                RawCodec,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{method}: {err:?}");
        assert!(
            err.message().contains("not a valid protobuf"),
            "{}",
            err.message()
        );
    }
}

#[test]
fn plaintext_on_the_network_needs_a_policy() {
    let dir = tempfile::tempdir().unwrap();
    let check = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_keybroker"))
            .args([
                "check-config",
                "--listen",
                "0.0.0.0:50051",
                "--insecure-plaintext",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let out = check(&[]);
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "accepted: {text}");
    assert!(
        text.contains("authz_policy") && text.contains("every caller on the network"),
        "{text}"
    );
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[allow]]\nidentities = [\"unauthenticated\"]\nmethods = [\"keybroker.v1.KeyBroker/*\"]\ntenants = [\"*\"]\n",
    )
    .unwrap();
    let out = check(&["--authz-policy", policy.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
