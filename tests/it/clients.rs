//! The Python and Node examples, against a live server: a Python SDK
//! generated from proto/ with grpcio-tools, and Node's @grpc/grpc-js with
//! @grpc/proto-loader. Both succeed, and both see the same status for the
//! same bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

use keybroker::proto;

use crate::common::{TestServer, admin_client, create_tenant_with, repo_root, test_config};

pub(crate) fn python() -> PathBuf {
    let path = repo_root().join(".tools/venv/bin/python");
    assert!(
        path.exists(),
        "{} is missing: run scripts/test.sh (it installs grpcio-tools into .tools/venv)",
        path.display()
    );
    path
}

fn node_example() -> PathBuf {
    let dir = repo_root().join("examples/node");
    assert!(
        dir.join("node_modules/@grpc/grpc-js").exists(),
        "examples/node has no node_modules: run scripts/test.sh (it runs npm ci there)"
    );
    dir.join("generate_and_unwrap.js")
}

async fn run(mut command: Command) -> Output {
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_node_examples_work_and_agree_on_errors() {
    // The SDK generation the README shows.
    let sdk = tempfile::tempdir().unwrap();
    let mut generate = Command::new(python());
    generate
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(repo_root().join("proto"))
        .arg(format!("--python_out={}", sdk.path().display()))
        .arg(format!("--grpc_python_out={}", sdk.path().display()))
        .arg(repo_root().join("proto/keybroker/v1/broker.proto"))
        .arg(repo_root().join("proto/keybroker/v1/admin.proto"));
    run(generate).await;
    assert!(sdk.path().join("keybroker/v1/broker_pb2_grpc.py").exists());

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let addr = server.addr.to_string();
    // The tenant requires a reason and accepts the one the examples give:
    // they pass only by sending it.
    let mut admin = admin_client(&server).await;
    create_tenant_with(
        &mut admin,
        "acme",
        proto::KeyPolicy::Unspecified,
        proto::KeyHierarchy::TenantKey,
    )
    .await;
    admin
        .set_access_policy(proto::SetAccessPolicyRequest {
            tenant_id: "acme".into(),
            access_policy: Some(proto::AccessPolicy {
                require_reason: true,
                allowed_reasons: vec![proto::AccessReason::CustomerInitiated.into()],
            }),
        })
        .await
        .unwrap();
    let python_example = |extra: &[&str]| {
        let mut c = Command::new(python());
        c.env("PYTHONPATH", sdk.path())
            .arg(repo_root().join("examples/python/generate_and_unwrap.py"))
            .args(["--server", &addr, "--tenant", "acme"])
            .args(extra);
        c
    };
    let node = |extra: &[&str]| {
        let mut c = Command::new("node");
        c.arg(node_example())
            .args(["--server", &addr, "--tenant", "acme"])
            .args(extra);
        c
    };

    let py = json(&run(python_example(&[])).await);
    let js = json(&run(node(&[])).await);
    for (lang, out) in [("python", &py), ("node", &js)] {
        assert_eq!(out["key_binding"], "platform", "{lang}: {out}");
        assert_eq!(out["key_id"], "platform/tenant-key/1", "{lang}: {out}");
        assert_eq!(out["provider"], "PROVIDER_LOCAL", "{lang}: {out}");
        assert_eq!(out["plaintext_bytes"], 32, "{lang}: {out}");
        assert_eq!(
            out["batch_codes"],
            serde_json::json!(["OK", "INVALID_ARGUMENT"]),
            "{lang}: {out}"
        );
    }
    // Two data keys generated and unwrapped by the two clients, for one
    // key provider call: the tenant key version the first one minted
    // (every DEK is sealed under it locally).
    assert_eq!(server.encrypt_calls(), 1);

    let py_bad = json(&run(python_example(&["--bad-input"])).await);
    let js_bad = json(&run(node(&["--bad-input"])).await);
    assert_eq!(py_bad["code"], "INVALID_ARGUMENT", "{py_bad}");
    assert_eq!(py_bad, js_bad, "python and node saw different errors");
    server.stop().await;
}
