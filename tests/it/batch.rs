//! The batch RPCs: every item answered on its own (one bad item never fails
//! the others), authorized and audited per item, cold keys loaded once per
//! distinct key, and the batch limits.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keybroker::audit::{AuditSettings, AuditTarget};
use keybroker::proto::key_broker_client::KeyBrokerClient;
use keybroker::proto::{self, KeyHierarchy, KeyPolicy};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use crate::common::{
    SlowKeyring, TestServer, admin_client, create_tenant_with, ctx, generate, generate_req,
    test_config, unwrap_req,
};
use crate::hierarchy::import;

const CTX: &[(&str, &str)] = &[("object", "o1")];

/// Runs the keybroker binary with `args` and `stdin`; its JSON output.
pub(crate) async fn cli_json(args: Vec<String>, stdin: String) -> serde_json::Value {
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    })
    .await
    .unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

async fn batch_unwrap(
    broker: &mut KeyBrokerClient<Channel>,
    items: Vec<proto::UnwrapKeyRequest>,
) -> Result<Vec<proto::BatchUnwrapKeyResult>, tonic::Status> {
    broker
        .batch_unwrap_key(proto::BatchUnwrapKeyRequest { items })
        .await
        .map(|r| r.into_inner().results)
}

fn code(result: &proto::BatchUnwrapKeyResult) -> Code {
    Code::from(result.status.as_ref().unwrap().code)
}

/// A batch mixing good keys, a forged key, another tenant's key and a key of
/// an unknown binding: each item gets the answer its single call would.
#[tokio::test]
async fn every_item_answers_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    create_tenant_with(
        &mut admin,
        "acme",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    create_tenant_with(
        &mut admin,
        "globex",
        KeyPolicy::Keyring,
        KeyHierarchy::Direct,
    )
    .await;
    import(&mut admin, "globex", "cmk", true).await;
    let good: Vec<_> = futures::future::join_all((0..3).map(|_| {
        let mut b = broker.clone();
        async move { generate(&mut b, "acme", CTX).await.unwrap() }
    }))
    .await;
    let mut forged = good[0].wrapped_key.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let foreign = generate(&mut broker, "globex", CTX).await.unwrap();
    // A direct key of globex naming a binding it does not have.
    let unknown = {
        use prost::Message as _;
        let mut m = proto::WrappedKey::decode(foreign.wrapped_key.as_slice()).unwrap();
        m.key_binding = "gone".into();
        m.encode_to_vec()
    };
    let items = vec![
        unwrap_req("acme", CTX, &good[0].wrapped_key),
        unwrap_req("acme", CTX, &forged),
        unwrap_req("acme", CTX, &foreign.wrapped_key),
        unwrap_req("globex", CTX, &unknown),
        unwrap_req("acme", CTX, &good[1].wrapped_key),
        unwrap_req("globex", CTX, &foreign.wrapped_key),
        unwrap_req("acme", &[("object", "other")], &good[2].wrapped_key),
    ];
    let results = batch_unwrap(&mut broker, items).await.unwrap();
    let codes: Vec<Code> = results.iter().map(code).collect();
    assert_eq!(
        codes,
        [
            Code::Ok,
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::NotFound,
            Code::Ok,
            Code::Ok,
            Code::InvalidArgument,
        ]
    );
    assert_eq!(
        results[0].response.as_ref().unwrap().plaintext,
        good[0].plaintext
    );
    assert_eq!(
        results[4].response.as_ref().unwrap().plaintext,
        good[1].plaintext
    );
    assert_eq!(
        results[5].response.as_ref().unwrap().plaintext,
        foreign.plaintext
    );
    for r in results.iter().filter(|r| code(r) != Code::Ok) {
        assert!(r.response.is_none());
        // The per-item status carries the single call's ErrorInfo.
        let status = r.status.as_ref().unwrap();
        let tonic_status = tonic::Status::with_details(
            Code::from(status.code),
            status.message.clone(),
            prost::Message::encode_to_vec(status).into(),
        );
        let info = tonic_status.get_details_error_info().unwrap();
        assert_eq!(info.domain, "keybroker.v1");
        assert!(!info.reason.is_empty());
    }

    // Generate and rewrap batches answer per item too.
    let generated = broker
        .batch_generate_data_key(proto::BatchGenerateDataKeyRequest {
            items: vec![generate_req("acme", CTX), generate_req("bad tenant", CTX)],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        Code::from(generated[0].status.as_ref().unwrap().code),
        Code::Ok
    );
    assert_eq!(
        Code::from(generated[1].status.as_ref().unwrap().code),
        Code::InvalidArgument
    );
    let fresh = generated[0].response.clone().unwrap();
    let rewrapped = broker
        .batch_rewrap_key(proto::BatchRewrapKeyRequest {
            items: vec![proto::RewrapKeyRequest {
                tenant_id: "acme".into(),
                context: ctx(CTX),
                wrapped_key: fresh.wrapped_key.clone(),
                justification: None,
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let moved = rewrapped[0].response.clone().unwrap();
    let back = batch_unwrap(
        &mut broker,
        vec![unwrap_req("acme", CTX, &moved.wrapped_key)],
    )
    .await
    .unwrap();
    assert_eq!(
        back[0].response.as_ref().unwrap().plaintext,
        fresh.plaintext
    );
    server.stop().await;
}

/// An empty batch and one over the item limit are refused whole, naming the
/// limit; a batch over the message size limit too.
#[tokio::test]
async fn batch_limits() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut broker = server.client().await;
    let g = generate(&mut broker, "acme", CTX).await.unwrap();
    let err = batch_unwrap(&mut broker, vec![]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let items = vec![unwrap_req("acme", CTX, &g.wrapped_key); 257];
    let err = batch_unwrap(&mut broker, items).await.unwrap_err();
    // 257 small items fit in 64 KiB: the item limit answers.
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("256"), "{}", err.message());
    let items = vec![unwrap_req("acme", CTX, &g.wrapped_key); 256];
    let results = batch_unwrap(&mut broker, items).await.unwrap();
    assert!(results.iter().all(|r| code(r) == Code::Ok));
    let big = vec![unwrap_req("acme", &[("pad", &"x".repeat(1000))], &g.wrapped_key); 100];
    let err = batch_unwrap(&mut broker, big).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "over 64 KiB: {err:?}");
    server.stop().await;
}

/// Items naming one cold key share one provider call; distinct cold keys
/// load concurrently, one call each.
#[tokio::test]
async fn cold_items_load_once_per_distinct_key() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(SlowKeyring::new(Duration::from_millis(30)));
    let server = TestServer::start_with_provider(test_config(dir.path()), provider.clone()).await;
    let mut broker = server.client().await;
    let keys: Vec<_> = futures::future::join_all((0..5).map(|_| {
        let mut b = broker.clone();
        async move { generate(&mut b, "acme", CTX).await.unwrap() }
    }))
    .await;
    let before = provider.decrypts.load(Ordering::SeqCst);
    let items: Vec<_> = (0..100)
        .map(|i| unwrap_req("acme", CTX, &keys[i % 5].wrapped_key))
        .collect();
    let started = std::time::Instant::now();
    let results = batch_unwrap(&mut broker, items).await.unwrap();
    let elapsed = started.elapsed();
    assert!(results.iter().all(|r| code(r) == Code::Ok));
    assert_eq!(provider.decrypts.load(Ordering::SeqCst) - before, 5);
    // Concurrent: five 30 ms loads in well under five times 30 ms.
    println!("100 items of 5 cold keys (30 ms each) in {elapsed:?}");
    server.stop().await;
}

/// Authorization and audit are per item: a policy granting UnwrapKey for
/// acme only lets acme's items through (the batch method is granted as its
/// single counterpart), and every item leaves one audit record.
#[tokio::test]
async fn items_are_authorized_and_audited_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[allow]]\nidentities = [\"unauthenticated\"]\nmethods = [\"keybroker.v1.KeyBroker/UnwrapKey\", \"keybroker.v1.KeyBroker/GenerateDataKey\"]\ntenants = [\"acme\"]\n",
    )
    .unwrap();
    config.server.authz_policy = Some(policy);
    let audit = dir.path().join("audit.log");
    config.audit = AuditSettings {
        target: AuditTarget::File(audit.clone()),
        ..AuditSettings::default()
    };
    let server = TestServer::start(config).await;
    let mut broker = server.client().await;
    let g = generate(&mut broker, "acme", CTX).await.unwrap();
    // acme, globex (not granted), acme: the answers and the records the
    // batch added to the audit log.
    let mut run_batch = async || {
        let lines_before = std::fs::read_to_string(&audit).unwrap().lines().count();
        let items = ["acme", "globex", "acme"].map(|t| unwrap_req(t, CTX, &g.wrapped_key));
        let results = batch_unwrap(&mut broker, items.into()).await.unwrap();
        let codes: Vec<Code> = results.iter().map(code).collect();
        assert_eq!(codes, [Code::Ok, Code::PermissionDenied, Code::Ok]);
        let text = std::fs::read_to_string(&audit).unwrap();
        let records: Vec<serde_json::Value> = text
            .lines()
            .skip(lines_before)
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(records.len(), 3, "one record per item:\n{text}");
        records
    };
    let records = run_batch().await;
    let tenants: Vec<&str> = records
        .iter()
        .map(|r| r["tenant_id"].as_str().unwrap())
        .collect();
    assert_eq!(tenants.iter().filter(|t| **t == "acme").count(), 2);
    assert_eq!(tenants.iter().filter(|t| **t == "globex").count(), 1);
    for r in &records {
        assert_eq!(r["method"], "keybroker.v1.KeyBroker/BatchUnwrapKey");
    }
    // The same batch again, its key now cached: the items answered at once
    // (no future per item) are authorized and audited like the others.
    let cached = run_batch().await;
    let first_digest = &records[0]["wrapped_key_sha256"];
    assert!(first_digest.is_string());
    for (r, (tenant, outcome)) in cached.iter().zip([
        ("acme", "OK"),
        ("globex", "PERMISSION_DENIED"),
        ("acme", "OK"),
    ]) {
        assert_eq!(r["tenant_id"], tenant, "{r}");
        assert_eq!(r["outcome"], outcome, "{r}");
        assert_eq!(&r["wrapped_key_sha256"], first_digest, "{r}");
        if outcome == "OK" {
            assert_eq!(r["cache_hit"], true, "{r}");
            assert_eq!(r["provider_calls"], 0, "{r}");
            assert_eq!(r["key_binding"], "platform", "{r}");
        }
    }
    // RewrapKey is not granted, so neither is its batch.
    let denied = broker
        .batch_rewrap_key(proto::BatchRewrapKeyRequest {
            items: vec![proto::RewrapKeyRequest {
                tenant_id: "acme".into(),
                context: ctx(CTX),
                wrapped_key: g.wrapped_key.clone(),
                justification: None,
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        Code::from(denied[0].status.as_ref().unwrap().code),
        Code::PermissionDenied
    );
    server.stop().await;
}

/// A batch's cached items have their records written together (one write
/// for the batch): when that write fails in fail-closed mode, no item
/// returns a key, as no single call would; every record counts as failed.
#[tokio::test]
async fn a_batch_whose_records_cannot_be_written_returns_no_key_when_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    // Keys made by a server without an audit sink, over the same keyring.
    let maker = TestServer::start(test_config(dir.path())).await;
    let mut broker = maker.client().await;
    let mut wrapped = Vec::new();
    for _ in 0..3 {
        wrapped.push(
            generate(&mut broker, "acme", CTX)
                .await
                .unwrap()
                .wrapped_key,
        );
    }
    maker.stop().await;
    let mut config = test_config(dir.path());
    // Every write to /dev/full fails with ENOSPC.
    config.audit = AuditSettings {
        target: AuditTarget::File("/dev/full".into()),
        fail_closed: true,
        ..AuditSettings::default()
    };
    let server = TestServer::start(config).await;
    let mut broker = server.client().await;
    let items = || wrapped.iter().map(|w| unwrap_req("acme", CTX, w)).collect();
    // Cold, then cached (answered at once, the records gathered): both
    // batches answer UNAVAILABLE for every item.
    let hits = || server.broker.cache().stats().hits.load(Ordering::Relaxed);
    let mut hits_before = 0;
    for (round, failed) in [("cold", 3), ("cached", 6)] {
        hits_before = hits();
        let results = batch_unwrap(&mut broker, items()).await.unwrap();
        for r in &results {
            assert_eq!(code(r), Code::Unavailable, "{round}: {r:?}");
            assert!(r.response.is_none(), "{round}: a key without its record");
            let message = &r.status.as_ref().unwrap().message;
            assert!(message.contains("audit"), "{round}: {message}");
        }
        assert_eq!(server.audit.failed(), failed, "{round}");
    }
    // The keys were loaded by the cold batch: the second one's were cached.
    assert_eq!(hits() - hits_before, 3);
    server.stop().await;
}

/// The CLI: `batch-generate` makes keys in batches of 256, `batch-unwrap`
/// reads wrapped keys from stdin and answers one result per line, a bad line
/// answering its own error.
#[tokio::test]
async fn the_cli_batches() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let url = server.url();
    let generated = cli_json(
        strings(&[
            "batch-generate",
            "--server",
            &url,
            "--tenant",
            "acme",
            "--count",
            "300",
        ]),
        String::new(),
    )
    .await;
    let generated = generated["results"].as_array().unwrap().clone();
    assert_eq!(generated.len(), 300);
    let mut lines: Vec<String> = generated
        .iter()
        .map(|g| g["wrapped_key"].as_str().unwrap().to_owned())
        .collect();
    lines.insert(1, "AAAA".into());
    let unwrapped = cli_json(
        strings(&["batch-unwrap", "--server", &url, "--tenant", "acme"]),
        lines.join("\n"),
    )
    .await;
    let results = unwrapped["results"].as_array().unwrap();
    assert_eq!(results.len(), 301);
    assert_eq!(results[0]["plaintext"], generated[0]["plaintext"]);
    assert_eq!(results[1]["error"]["code"], "InvalidArgument");
    assert_eq!(results[300]["plaintext"], generated[299]["plaintext"]);
    server.stop().await;
}

/// The bulk rewrap (`keybroker rewrap --out FILE < keys`): after a key
/// change every old key moves, a bad line reports its own error, a run
/// killed part-way resumes from its output, and a finished run moves
/// nothing. For a `tenant_key` tenant and for a tenant on the platform
/// keyring after a rotation.
#[tokio::test]
async fn bulk_rewrap_moves_everything_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    create_tenant_with(
        &mut admin,
        "acme",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    let make = |tenant: &'static str| {
        let mut b = broker.clone();
        async move {
            let mut keys = Vec::new();
            for _ in 0..2 {
                let r = b
                    .batch_generate_data_key(proto::BatchGenerateDataKeyRequest {
                        items: vec![generate_req(tenant, CTX); 150],
                    })
                    .await
                    .unwrap()
                    .into_inner();
                keys.extend(r.results.into_iter().map(|r| r.response.unwrap()));
            }
            keys
        }
    };
    let acme = make("acme").await;
    let plat = make("plat").await;
    // Key changes: acme gets its first CMK (a new tenant key version);
    // the platform keyring rotates.
    import(&mut admin, "acme", "cmk", true).await;
    let rotated = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(["keyring", "rotate", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(rotated.status.success());
    tokio::time::sleep(Duration::from_millis(400)).await; // keyring reload: 100 ms

    let url = server.url();
    let cli = |tenant: &str, stdin: String, out: std::path::PathBuf| {
        let mut args = strings(&[
            "rewrap",
            "--server",
            &url,
            "--tenant",
            tenant,
            "--context",
            "object=o1",
            "--out",
        ]);
        args.push(out.to_str().unwrap().to_owned());
        cli_json(args, stdin)
    };
    use base64::Engine as _;
    let b64 = |k: &proto::GenerateDataKeyResponse| {
        base64::engine::general_purpose::STANDARD.encode(&k.wrapped_key)
    };
    // acme's key change started a new tenant key epoch: every DEK moves.
    // plat's DEKs are sealed under its tenant key, which the rotation did
    // not touch (retiring the old keyring version re-wraps the tenant key,
    // never a DEK): they are current already.
    for (tenant, keys, moves) in [("acme", &acme, true), ("plat", &plat, false)] {
        let moved = |n: u64| if moves { n } else { 0 };
        let current = |n: u64| if moves { 0 } else { n };
        let mut lines: Vec<String> = keys.iter().map(b64).collect();
        lines.insert(7, "not base64!".into());
        let out = dir.path().join(format!("{tenant}.out"));
        // A first run that stopped after 100 lines (as if killed then).
        let first = cli(tenant, lines[..100].join("\n"), out.clone()).await;
        assert_eq!(first["moved"], moved(99), "{first}");
        assert_eq!(first["already_current"], current(99), "{first}");
        assert_eq!(first["failed"]["InvalidArgument"], 1, "{first}");
        // The full run resumes after them.
        let summary = cli(tenant, lines.join("\n"), out.clone()).await;
        assert_eq!(summary["skipped_already_done"], 100, "{summary}");
        assert_eq!(summary["moved"], moved(201), "{summary}");
        assert_eq!(summary["failed"], serde_json::json!({}), "{summary}");
        let written: Vec<String> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(written.len(), lines.len());
        assert!(
            written[7].contains("error InvalidArgument"),
            "{}",
            written[7]
        );
        let moved: Vec<&String> = written
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 7)
            .map(|(_, l)| l)
            .collect();
        // Every moved key opens to its DEK and is current.
        for (line, original) in moved.iter().zip(keys.iter()) {
            let wrapped = base64::engine::general_purpose::STANDARD
                .decode(line)
                .unwrap();
            let back = crate::common::unwrap(&mut broker, tenant, CTX, &wrapped)
                .await
                .unwrap();
            assert_eq!(back.plaintext, original.plaintext);
            assert!(!back.rewrap_recommended, "{tenant}: still not current");
        }
        // Done already: a third run over the moved keys finds them current.
        let again = cli(
            tenant,
            moved
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            dir.path().join(format!("{tenant}.again")),
        )
        .await;
        assert_eq!(again["moved"], 0, "{again}");
        assert_eq!(again["already_current"], 300, "{again}");
    }
    server.stop().await;
}

/// Cached items are answered without a future per item, and still pass
/// every check a single call makes: a disabled key refuses its cached DEKs
/// in a batch at once (a direct and a tenant-key tenant, interleaved, so the
/// batch's shared tenant view switches tenants) without a provider call,
/// and enabling it serves them again.
#[tokio::test]
async fn cached_items_obey_the_key_state() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    for (tenant, hierarchy) in [
        ("acme", KeyHierarchy::TenantKey),
        ("globex", KeyHierarchy::Direct),
    ] {
        create_tenant_with(&mut admin, tenant, KeyPolicy::SingleKey, hierarchy).await;
        import(&mut admin, tenant, "cmk", true).await;
    }
    let mut items = Vec::new();
    for i in 0..40 {
        let tenant = if i % 3 == 0 { "globex" } else { "acme" };
        let g = generate(&mut broker, tenant, CTX).await.unwrap();
        items.push(unwrap_req(tenant, CTX, &g.wrapped_key));
    }
    let ok = |results: &[proto::BatchUnwrapKeyResult]| {
        results.iter().filter(|r| code(r) == Code::Ok).count()
    };
    // Cold, then warm: every item answers both times.
    assert_eq!(
        ok(&batch_unwrap(&mut broker, items.clone()).await.unwrap()),
        40
    );
    let hits = server.broker.cache().stats().hits.load(Ordering::SeqCst);
    let warm = batch_unwrap(&mut broker, items.clone()).await.unwrap();
    assert_eq!(ok(&warm), 40);
    assert_eq!(
        server.broker.cache().stats().hits.load(Ordering::SeqCst) - hits,
        40,
        "all 40 from the cache"
    );
    let calls = server.decrypt_calls();

    admin
        .disable_key(proto::DisableKeyRequest {
            tenant_id: "globex".into(),
            name: "cmk".into(),
            reason: "customer offboarding".into(),
            reencrypt_to: String::new(),
        })
        .await
        .unwrap();
    let results = batch_unwrap(&mut broker, items.clone()).await.unwrap();
    for (i, r) in results.iter().enumerate() {
        if i % 3 == 0 {
            assert_eq!(code(r), Code::FailedPrecondition, "item {i}: {r:?}");
            let message = &r.status.as_ref().unwrap().message;
            assert!(message.contains("customer offboarding"), "{message}");
            assert!(r.response.is_none());
        } else {
            assert_eq!(code(r), Code::Ok, "item {i}: {r:?}");
        }
    }
    assert_eq!(
        server.decrypt_calls(),
        calls,
        "refused without a provider call"
    );
    admin
        .enable_key(proto::EnableKeyRequest {
            tenant_id: "globex".into(),
            name: "cmk".into(),
        })
        .await
        .unwrap();
    assert_eq!(ok(&batch_unwrap(&mut broker, items).await.unwrap()), 40);
    // Disabling dropped globex's cached keys: each is loaded once again;
    // acme's stayed cached.
    assert_eq!(server.decrypt_calls(), calls + 14);
    server.stop().await;
}
