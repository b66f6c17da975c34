//! Smoke runs of `keybroker-bench` (debug build, seconds): it works, and
//! KMS-call accounting is exact. Never a timing threshold: speed is judged
//! from release runs side by side with the floor (BENCHMARKS.md).

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keybroker-bench"))
}

/// The server binary, built beside the bench by `cargo build --workspace`
/// (and by `cargo nextest run --workspace`, which scripts/test.sh runs).
fn keybroker_bin() -> std::path::PathBuf {
    let path =
        std::path::Path::new(env!("CARGO_BIN_EXE_keybroker-bench")).with_file_name("keybroker");
    assert!(
        path.exists(),
        "{} is missing: build the workspace (cargo build --workspace) before these tests",
        path.display()
    );
    path
}

/// Runs `keybroker-bench` with `args` plus `--json FILE` (off the async
/// runtime), asserts it succeeded, and returns the JSON report.
async fn report(args: Vec<String>) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report.json");
    let output = tokio::task::spawn_blocking({
        let out = out.clone();
        move || {
            bench()
                .args(&args)
                .arg("--json")
                .arg(&out)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounting_is_exact() {
    let report = report(strings(&[
        "accounting",
        "--keys",
        "20",
        "--latency",
        "25ms",
    ]))
    .await;
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 8);
    for r in results {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["provider_calls"], r["expected_calls"], "{r}");
    }
    // 1000 concurrent unwraps of one cold key: one provider call, all served.
    assert_eq!(results[2]["provider_calls"], 1);
    assert_eq!(results[2]["succeeded"], 1000);
    // The tenant key hierarchy: 100 tenants x 20 DEKs generated and
    // unwrapped cold cost 100 customer-KMS calls (direct: 4000).
    assert_eq!(results[7]["provider_calls"], 100);
    assert_eq!(results[7]["direct_calls"], 4000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_and_memory_runs_complete() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("load.json");
    let output = tokio::task::spawn_blocking({
        let out = out.clone();
        move || {
            bench()
                .args([
                    "load",
                    "--concurrency",
                    "1,4",
                    "--duration",
                    "400ms",
                    "--warmup",
                    "100ms",
                ])
                .args([
                    "--rounds",
                    "1",
                    "--keys",
                    "20",
                    "--keybroker-bin",
                    keybroker_bin().to_str().unwrap(),
                    "--batch-size",
                    "10",
                    "--reason",
                    "customer_initiated",
                    "--shape",
                    "plaintext,production",
                    "--tenants",
                    "3",
                ])
                .arg("--json")
                .arg(&out)
                .arg("--plot")
                .arg(out.with_extension("svg"))
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let shapes = report["shapes"].as_array().unwrap();
    assert_eq!(shapes[0]["shape"], "plaintext");
    assert_eq!(shapes[1]["shape"], "production");
    for shape in shapes {
        // 3 tenants of 20 keys each.
        assert_eq!(shape["tenants"], 3);
        assert_eq!(shape["keys"], 60);
        let levels = shape["levels"].as_array().unwrap();
        assert_eq!(levels.len(), 2);
        for level in levels {
            assert_eq!(level["errors"], 0);
            for side in ["floor", "keybroker", "keybroker_batch"] {
                let run = &level[side][0];
                assert!(run["requests"].as_u64().unwrap() > 0, "{side}: {run}");
                assert!(run["p99_us"].as_f64().unwrap() >= run["p50_us"].as_f64().unwrap());
            }
            // Every batch request carried 10 keys, all unwrapped (errors 0).
            assert_eq!(level["keybroker_batch"][0]["deks_per_request"], 10);
            assert!(level["batch_over_single_deks_per_s"].as_f64().unwrap() > 0.0);
            assert!(level["median_ratios"]["p50"].as_f64().unwrap() > 0.0);
        }
        // Every key use the run made (60 generated, 60 warmed, every
        // single call and batch item measured) is in the tenants' key
        // access logs, read by an operator the policy lets read them.
        let made = shape["access_log"]["uses_made"].as_u64().unwrap();
        assert!(made > 120, "{}", shape["access_log"]);
        assert_eq!(shape["access_log"]["uses_counted"].as_u64(), Some(made));
    }
    // The production keybroker wrote an audit record of every key use
    // (each batch item has its own), and of the operator's access-log reads.
    let uses = shapes[1]["access_log"]["uses_made"].as_u64().unwrap();
    assert!(shapes[1]["audit_records"].as_u64().unwrap() > uses);
    assert!(shapes[0].get("audit_records").is_none());
    assert!(report["machine"]["nproc"].as_u64().unwrap() >= 1);
    let svg = std::fs::read_to_string(out.with_extension("svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("BatchUnwrapKey (10 keys/request)"));

    let output = tokio::task::spawn_blocking(|| {
        bench()
            .args(["memory", "--entries", "3000"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8(output.stdout).unwrap();
    let result: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(result["entries"], 3000);
}

/// Cold start from moto, small: exact customer-KMS and STS calls for both
/// hierarchies (the command itself fails on a wrong count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_counts_kms_calls_exactly() {
    let report = report(strings(&["cold-start", "--tenants", "3", "--keys", "12"])).await;
    let results = report["results"].as_array().unwrap();
    assert_eq!(results[0]["hierarchy"], "direct");
    assert_eq!(results[0]["single_decrypts"], 36);
    assert_eq!(results[0]["batch_decrypts"], 36);
    assert_eq!(results[1]["hierarchy"], "tenant_key");
    assert_eq!(results[1]["single_decrypts"], 3);
    assert_eq!(results[1]["batch_decrypts"], 3);
    for r in results {
        assert_eq!(r["single_assume_role"], 3);
        assert_eq!(r["batch_assume_role"], 3);
    }
}

/// Idle identities (moto), small: the session cache keeps at most its
/// capacity whatever the tenant count, and every identity assumed its role
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_stay_bounded() {
    let report = report(strings(&[
        "identities",
        "--count",
        "60",
        "--capacity",
        "1000,20",
    ]))
    .await;
    let results = report["results"].as_array().unwrap();
    assert_eq!(
        results[0]["live_sessions"], 160,
        "60 + 100 warm-up, all kept"
    );
    assert_eq!(results[1]["live_sessions"], 20, "capacity 20");
    for r in results {
        assert_eq!(r["assume_role_calls"], 160);
        assert!(r["bytes_per_identity_made"].as_f64().unwrap() >= 0.0);
    }
}

/// Provider call latency, small: the local keyring, Vault/OpenBao Transit
/// (a dev server of its own) and SoftHSM (a token of its own) all answer
/// and are reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_latency_runs() {
    let report = report(strings(&["provider-latency", "--calls", "20"])).await;
    let results = report["results"].as_array().unwrap();
    assert_eq!(results[0]["provider"], "local");
    assert_eq!(results[1]["provider"], "vault-transit");
    assert_eq!(results[2]["provider"], "pkcs11");
    for r in results {
        assert_eq!(r["calls"], 20);
        assert!(r["p50_us"].as_f64().unwrap() > 0.0);
    }
}

/// keybroker vs OpenBao Transit, tiny, in the production shape (mTLS on
/// both, audit logs, 2 tenants): every run answers without errors and the
/// ratios are reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_runs_against_openbao() {
    let report = report(strings(&[
        "peer",
        "--concurrency",
        "2",
        "--rounds",
        "1",
        "--duration",
        "300ms",
        "--warmup",
        "100ms",
        "--keys",
        "20",
        "--keybroker-bin",
        keybroker_bin().to_str().unwrap(),
        "--shape",
        "production",
        "--tenants",
        "2",
    ]))
    .await;
    assert_eq!(report["shape"], "production");
    assert_eq!(report["tenants"], 2);
    let level = &report["levels"][0];
    assert_eq!(level["concurrency"], 2);
    for run in level["runs"].as_array().unwrap() {
        assert_eq!(run["errors"], 0, "{run}");
        assert!(run["rps"].as_f64().unwrap() > 0.0, "{run}");
    }
    assert!(level["ratios"]["unwrap_throughput"].as_f64().unwrap() > 0.0);
    // Both wrote their audit logs: at least one record per measured call
    // and per key set up (2 tenants x 20 keys).
    for server in ["keybroker", "openbao"] {
        let records = report["audit_records"][server].as_u64().unwrap();
        assert!(records >= 40, "{server}: {records}");
    }
}
