//! The helm chart, rendered by the real helm v4 and validated against the
//! Kubernetes 1.35 schemas (PyPI kubernetes-validate, strict): default
//! values, a production shape (3 replicas, PostgreSQL, mTLS), and bad values
//! that must fail with a message a person can act on.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::common::{repo_root, tool};

fn chart() -> PathBuf {
    repo_root().join("helm/keybroker")
}

fn helm(args: &[&str]) -> Output {
    Command::new(tool("helm", "KEYBROKER_TEST_HELM"))
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn production() -> String {
    chart()
        .join("ci/production-values.yaml")
        .to_str()
        .unwrap()
        .to_owned()
}

/// `helm template` with extra args; the rendered manifests.
fn render(extra: &[&str]) -> String {
    let chart = chart();
    let mut args = vec!["template", "kb", chart.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm template {extra:?}:\n{}",
        text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn validate(manifests: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("manifests.yaml");
    std::fs::write(&path, manifests).unwrap();
    let out = Command::new(tool(
        "kubernetes-validate",
        "KEYBROKER_TEST_KUBERNETES_VALIDATE",
    ))
    .args(["--strict", "-k", "1.35.0"])
    .arg(&path)
    .output()
    .unwrap();
    let report = text(&out);
    assert!(out.status.success(), "kubernetes-validate:\n{report}");
    assert!(!report.contains("ERROR"), "{report}");
    let kinds = [
        "Deployment",
        "Service",
        "ConfigMap",
        "ServiceAccount",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ];
    for kind in kinds {
        assert!(
            report
                .to_lowercase()
                .contains(&format!("passed for resource {}/", kind.to_lowercase())),
            "{kind} not validated:\n{report}"
        );
    }
}

#[test]
fn chart_lints_and_renders_valid_manifests_for_default_and_production_values() {
    for extra in [vec![], vec!["-f".to_owned(), production()]] {
        let chart = chart();
        let mut args = vec!["lint", chart.to_str().unwrap()];
        args.extend(extra.iter().map(String::as_str));
        let out = helm(&args);
        assert!(out.status.success(), "helm lint {extra:?}:\n{}", text(&out));
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        validate(&render(&extra));
    }
    let prod = render(&["-f", &production()]);
    for needle in [
        "replicas: 3",
        "kind: HorizontalPodAutoscaler",
        "name: KEYBROKER_REGISTRY",
        "tls_client_ca = \"/etc/keybroker/tls/ca.crt\"",
        "secretName: keybroker-tls",
        "eks.amazonaws.com/role-arn",
        // The headless Service tenant affinity resolves (docs/fleet.md).
        "name: kb-keybroker-headless\n",
        "clusterIP: None",
        "affinity_header = \"x-keybroker-tenant\"",
    ] {
        // The HPA owns the replica count in production: `replicas` is absent.
        if needle == "replicas: 3" {
            assert!(!prod.contains(needle), "replicas set next to an HPA");
            continue;
        }
        assert!(prod.contains(needle), "production render lacks {needle:?}");
    }
}

/// A keyring given as a file becomes a Secret mounted where keybroker reads it.
#[test]
fn keyring_file_becomes_a_mounted_secret() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("platform-keyring.json");
    let out = Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(["keyring", "rotate", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let file_arg = format!("keyring.json={}", keyring.display());
    let rendered = render(&["--set-file", &file_arg]);
    assert!(
        rendered.contains("name: kb-keybroker-keyring"),
        "{rendered}"
    );
    assert!(rendered.contains("platform-keyring.json: "));
    assert!(rendered.contains("mountPath: /var/lib/keybroker/platform-keyring.json"));
    validate(&rendered);
}

#[test]
fn service_monitor_renders_when_enabled() {
    assert!(!render(&[]).contains("kind: ServiceMonitor"));
    let rendered = render(&["--set", "metrics.serviceMonitor.enabled=true"]);
    assert!(rendered.contains("apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor"));
    assert!(rendered.contains("port: metrics"));
}

#[test]
fn pods_are_locked_down_and_probed_over_grpc_health() {
    let rendered = render(&[]);
    for needle in [
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop: [\"ALL\"]",
        "type: RuntimeDefault",
        "livenessProbe:\n            grpc:",
        "readinessProbe:\n            grpc:",
        "service: keybroker.v1.KeyBroker",
        "\"helm.sh/hook\": test",
        "args: [\"health\", \"--server\"",
        "kind: PodDisruptionBudget",
        "kind: NetworkPolicy",
        "memory: 1Gi",
        "cpu: 250m",
    ] {
        assert!(
            rendered.contains(needle),
            "default render lacks {needle:?}:\n{rendered}"
        );
    }
}

/// The config and policy the chart renders are accepted by the real binary.
#[test]
fn rendered_config_and_policy_load_in_keybroker() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("default", vec![]),
        ("production", vec!["-f".to_owned(), production()]),
    ] {
        let mut args = extra.clone();
        args.extend([
            "--show-only".to_owned(),
            "templates/configmap.yaml".to_owned(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let configmap = render(&args);
        let config = block(&configmap, "keybroker.toml");
        let config_path = dir.path().join(format!("{name}.toml"));
        let config = match block_opt(&configmap, "policy.toml") {
            Some(policy) => {
                let policy_path = dir.path().join(format!("{name}-policy.toml"));
                std::fs::write(&policy_path, policy).unwrap();
                config.replace(
                    "/etc/keybroker/policy/policy.toml",
                    policy_path.to_str().unwrap(),
                )
            }
            None => config,
        };
        std::fs::write(&config_path, &config).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_keybroker"))
            .args(["check-config", "--config"])
            .arg(&config_path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}\n{config}", text(&out));
    }
}

/// The literal block `key: |` of a rendered ConfigMap.
fn block_opt(yaml: &str, key: &str) -> Option<String> {
    let header = format!("  {key}: |");
    let mut lines = yaml.lines().skip_while(|l| *l != header);
    lines.next()?;
    let body: Vec<&str> = lines
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| l.strip_prefix("    ").unwrap_or(""))
        .collect();
    Some(body.join("\n") + "\n")
}

fn block(yaml: &str, key: &str) -> String {
    block_opt(yaml, key).unwrap_or_else(|| panic!("no {key} in:\n{yaml}"))
}

#[test]
fn bad_values_fail_with_the_reason() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--set", "replicaCount=3"], "needs a PostgreSQL registry"),
        (
            &[
                "--set",
                "replicaCount=3",
                "--set",
                "registry.postgres.existingSecret=db",
            ],
            "needs keyring.existingSecret or keyring.json",
        ),
        (
            &["--set", "tls.enabled=true", "--set", "authz.policy=x"],
            "tls.enabled needs a TLS Secret",
        ),
        (
            &[
                "--set",
                "tls.enabled=true",
                "--set",
                "tls.existingSecret=s",
                "--set",
                "authz.policy=",
            ],
            "tls.enabled needs authz.policy",
        ),
        // Plaintext on the pod network without a policy: every caller could
        // call everything.
        (
            &["--set", "authz.policy="],
            "plaintext (tls.enabled=false) needs authz.policy",
        ),
        (&["--set", "replicaCount=three"], "replicaCount"),
    ];
    for (extra, reason) in cases {
        let mut args = vec!["template", "kb", chart];
        args.extend_from_slice(extra);
        let out = helm(&args);
        assert!(!out.status.success(), "{extra:?} rendered");
        assert!(text(&out).contains(reason), "{extra:?}: {}", text(&out));
    }
    // The schema refuses unknown keys and malformed values at install time.
    for bad in [["--set", "replicas=3"], ["--set", "cache.ttl=soon"]] {
        let mut args = vec!["template", "kb", chart];
        args.extend_from_slice(&bad);
        let out = helm(&args);
        assert!(!out.status.success(), "{bad:?} rendered");
        assert!(text(&out).contains("schema"), "{bad:?}: {}", text(&out));
    }
}
