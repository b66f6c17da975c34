//! The real `keybroker` binary: logs never carry key material, SIGTERM drains.
//!
//! Over 600 lines on purpose: every test here drives the release-like binary
//! through the same spawn/wait helpers; splitting would scatter them.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use keybroker::proto;
use keybroker::proto::key_broker_client::KeyBrokerClient;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::ctx;

pub(crate) struct Process {
    child: Child,
    /// Server output goes to a file, not a pipe: an unread pipe fills up and
    /// blocks a chatty server.
    log: std::path::PathBuf,
}

/// A failed test must not leave its server running.
impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    pub(crate) fn spawn(data_dir: &std::path::Path, extra: &[&str]) -> Self {
        Self::spawn_under(&[], data_dir, extra)
    }

    /// Spawns through `prefix` (a command that execs the rest, like prlimit).
    fn spawn_under(prefix: &[&str], data_dir: &std::path::Path, extra: &[&str]) -> Self {
        Self::spawn_with(prefix, data_dir, extra, &[])
    }

    /// Spawns with extra environment variables.
    pub(crate) fn spawn_env(
        data_dir: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_with(&[], data_dir, extra, env)
    }

    pub(crate) fn spawn_with(
        prefix: &[&str],
        data_dir: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        // Port 0: the server reports the port it got in its log, so
        // parallel tests never race for a port.
        Self::spawn_at(prefix, "127.0.0.1:0", data_dir, extra, env)
    }

    /// Spawns listening on `listen` (a loopback address, port 0 usually).
    pub(crate) fn spawn_at(
        prefix: &[&str],
        listen: &str,
        data_dir: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = data_dir.join(format!("server-{n}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut command = match prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(env!("CARGO_BIN_EXE_keybroker"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_keybroker")),
        };
        let child = command
            .arg("serve")
            .args(["--listen", listen])
            .args(
                (!extra.contains(&"--log-format"))
                    .then_some(["--log-format", "json"])
                    .into_iter()
                    .flatten(),
            )
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "trace")
            .envs(env.iter().copied())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap();
        Self { child, log }
    }

    /// Everything the server printed so far.
    pub(crate) fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address from the server's "keybroker listening" log line (JSON
    /// or text format).
    pub(crate) async fn addr(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            for line in text.lines() {
                if let Some(rest) = line
                    .contains("keybroker listening")
                    .then(|| line.split("addr=").nth(1))
                    .flatten()
                {
                    return rest.split_whitespace().next().unwrap().to_owned();
                }
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if entry["fields"]["message"] == "keybroker listening" {
                    return entry["fields"]["addr"].as_str().unwrap().to_owned();
                }
            }
            assert!(Instant::now() < deadline, "server did not start:\n{text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) async fn channel(&self) -> Channel {
        let url = format!("http://{}", self.addr().await);
        Channel::from_shared(url).unwrap().connect().await.unwrap()
    }

    /// SIGKILL: no drain, no goodbye (a crashed replica).
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for exit; returns (success, stdout + stderr). Async: the test's
    /// own client connections must keep running to see the server's GOAWAY.
    pub(crate) async fn wait(mut self, timeout: Duration) -> (bool, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("server did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        (
            status.success(),
            std::fs::read_to_string(&self.log).unwrap(),
        )
    }
}

async fn health(channel: Channel) -> Result<ServingStatus, tonic::Status> {
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "keybroker.v1.KeyBroker".into(),
        })
        .await?;
    Ok(resp.into_inner().status())
}

#[tokio::test]
async fn canary_key_never_reaches_the_logs_or_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    // Audit records go to stdout, into the same captured output as the logs.
    let process = Process::spawn(dir.path(), &["--audit-log", "stdout"]);
    let channel = process.channel().await;
    let mut client = KeyBrokerClient::new(channel.clone());
    let canary: Vec<u8> = b"CANARY-3f9a1c-do-not-log-me-0123".to_vec();
    let c = ctx(&[("table", "secrets")]);

    let wrapped = client
        .wrap_key(proto::WrapKeyRequest {
            tenant_id: "acme".into(),
            context: c.clone(),
            plaintext: canary.clone(),
            justification: None,
        })
        .await
        .unwrap()
        .into_inner()
        .wrapped_key;
    for _ in 0..2 {
        let back = client
            .unwrap_key(proto::UnwrapKeyRequest {
                tenant_id: "acme".into(),
                context: c.clone(),
                wrapped_key: wrapped.clone().into(),
                justification: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(back.plaintext, canary);
    }
    // Error paths with the canary in the request.
    let errors = [
        client
            .wrap_key(proto::WrapKeyRequest {
                tenant_id: "bad tenant".into(),
                context: c.clone(),
                plaintext: canary.clone(),
                justification: None,
            })
            .await
            .unwrap_err(),
        client
            .unwrap_key(proto::UnwrapKeyRequest {
                tenant_id: "acme".into(),
                context: ctx(&[("table", "other")]),
                wrapped_key: wrapped.clone().into(),
                justification: None,
            })
            .await
            .unwrap_err(),
        client
            .unwrap_key(proto::UnwrapKeyRequest {
                tenant_id: "acme".into(),
                context: c.clone(),
                wrapped_key: canary.clone().into(),
                justification: None,
            })
            .await
            .unwrap_err(),
    ];
    // Customer key material through the admin path: imported, used, and
    // re-imported under the same name (an error that must not echo it).
    let material: Vec<u8> = b"MATERIAL-77c1e0-do-not-log-0123!".to_vec();
    let material_b64 = base64::engine::general_purpose::STANDARD.encode(&material);
    let mut admin = proto::key_admin_client::KeyAdminClient::new(channel.clone());
    admin
        .create_tenant(proto::CreateTenantRequest {
            tenant_id: "cmek".into(),
            key_policy: 0,
            key_hierarchy: proto::KeyHierarchy::Direct.into(),
            newest_import_primary: false,
        })
        .await
        .unwrap();
    let import = proto::ImportKeyMaterialRequest {
        tenant_id: "cmek".into(),
        name: "k1".into(),
        description: String::new(),
        key_material_base64: material_b64.clone(),
        make_primary: true,
        new_version: false,
        wrapped_key_material: Vec::new(),
        import_token: String::new(),
    };
    admin.import_key_material(import.clone()).await.unwrap();
    let dup = admin.import_key_material(import).await.unwrap_err();
    let g = client
        .generate_data_key(proto::GenerateDataKeyRequest {
            tenant_id: "cmek".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.key.unwrap().key_binding, "k1");

    process.signal("TERM");
    let (ok, logs) = process.wait(Duration::from_secs(20)).await;
    assert!(ok, "server exited with failure:\n{logs}");
    for needle in [
        material_b64.clone(),
        hex::encode(&material),
        String::from_utf8(material).unwrap(),
    ] {
        assert!(
            !logs.contains(&needle),
            "key material found in logs as {needle}"
        );
        assert!(!dup.message().contains(&needle));
    }
    assert!(
        logs.contains("keybroker listening"),
        "logs were not captured:\n{logs}"
    );
    // One audit record per call: wrap, 2 unwraps, 3 refused, create tenant,
    // 2 imports, generate.
    let audit: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("outcome").is_some())
        .collect();
    assert_eq!(audit.len(), 10, "{audit:#?}");
    assert_eq!(
        audit.iter().filter(|r| r["outcome"] == "OK").count(),
        6,
        "{audit:#?}"
    );

    let b64 = base64::engine::general_purpose::STANDARD;
    let needles = [
        String::from_utf8(canary.clone()).unwrap(),
        hex::encode(&canary),
        hex::encode_upper(&canary),
        b64.encode(&canary),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&canary),
        format!("{:?}", canary),
    ];
    for needle in &needles {
        assert!(
            !logs.contains(needle.as_str()),
            "canary found in logs as {needle}"
        );
        for err in &errors {
            assert!(
                !err.message().contains(needle.as_str()),
                "canary in error {err:?}"
            );
        }
    }
}

/// `/proc/<pid>/limits`'s "Max core file size" soft and hard values.
fn core_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = line["Max core file size".len()..]
        .split_whitespace()
        .collect();
    (fields[0].to_owned(), fields[1].to_owned())
}

#[tokio::test]
async fn core_dumps_are_disabled_unless_explicitly_allowed() {
    let dir = tempfile::tempdir().unwrap();
    // Started with unlimited core dumps, as a debugging shell might.
    let prlimit = ["prlimit", "--core=unlimited:unlimited", "--"];
    let hardened = Process::spawn_under(&prlimit, dir.path(), &[]);
    hardened.addr().await;
    assert_eq!(core_limit(hardened.child.id()), ("0".into(), "0".into()));
    let log = std::fs::read_to_string(&hardened.log).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("process hardened"))
        .unwrap_or_else(|| panic!("no hardening log line:\n{log}"));
    let entry: serde_json::Value = serde_json::from_str(line).unwrap();
    // Read back from the kernel by the server (PR_GET_DUMPABLE).
    assert_eq!(entry["fields"]["core_dumps_disabled"], true);
    assert_eq!(entry["fields"]["not_dumpable"], true);
    hardened.signal("TERM");
    assert!(hardened.wait(Duration::from_secs(20)).await.0);

    let dir = tempfile::tempdir().unwrap();
    let debug = Process::spawn_under(&prlimit, dir.path(), &["--allow-core-dumps"]);
    debug.addr().await;
    assert_eq!(
        core_limit(debug.child.id()),
        ("unlimited".into(), "unlimited".into())
    );
    debug.signal("TERM");
    let (ok, log) = debug.wait(Duration::from_secs(20)).await;
    assert!(ok);
    assert!(log.contains("allow-core-dumps"), "{log}");
}

#[tokio::test]
async fn sigterm_turns_health_off_then_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let process = Process::spawn(dir.path(), &["--shutdown-grace", "1500ms"]);
    let channel = process.channel().await;
    assert_eq!(
        health(channel.clone()).await.unwrap(),
        ServingStatus::Serving
    );
    let mut client = KeyBrokerClient::new(channel.clone());
    let generated = client
        .generate_data_key(proto::GenerateDataKeyRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let sent = Instant::now();
    process.signal("TERM");
    // During the grace period: NOT_SERVING, yet RPCs are still answered.
    let mut saw_not_serving = false;
    while sent.elapsed() < Duration::from_millis(1000) {
        if health(channel.clone()).await.unwrap() == ServingStatus::NotServing {
            saw_not_serving = true;
            let back = client
                .unwrap_key(proto::UnwrapKeyRequest {
                    tenant_id: "acme".into(),
                    context: Default::default(),
                    wrapped_key: generated.wrapped_key.clone().into(),
                    justification: None,
                })
                .await
                .expect("RPC during the shutdown grace period failed");
            assert_eq!(back.into_inner().plaintext, generated.plaintext);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        saw_not_serving,
        "health never turned NOT_SERVING after SIGTERM"
    );
    drop(client);
    drop(channel);
    let (ok, logs) = process.wait(Duration::from_secs(20)).await;
    assert!(ok, "server exited with failure:\n{logs}");
    assert!(
        sent.elapsed() >= Duration::from_millis(1500),
        "exited before the grace period"
    );
    assert!(logs.contains("keybroker stopped"), "{logs}");
}

/// A SIGTERM the moment "listening" is logged is handled, not the default
/// action: the handlers are installed before the listener opens (they were
/// installed at the serve loop's first poll, and a loaded machine killed
/// such a process outright). Repeated, as the window was narrow.
#[tokio::test]
async fn a_sigterm_right_after_listening_still_drains() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let process = Process::spawn(dir.path(), &[]);
        process.addr().await;
        process.signal("TERM");
        let (ok, logs) = process.wait(Duration::from_secs(20)).await;
        assert!(ok, "round {round}: not a clean exit:\n{logs}");
        assert!(logs.contains("keybroker stopped"), "round {round}:\n{logs}");
    }
}

#[tokio::test]
async fn refuses_to_start_on_a_world_readable_keyring() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("platform-keyring.json");
    // First start creates the keyring; then loosen its mode.
    let process = Process::spawn(dir.path(), &[]);
    process.channel().await;
    process.signal("TERM");
    assert!(process.wait(Duration::from_secs(20)).await.0);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, logs) = Process::spawn(dir.path(), &[])
        .wait(Duration::from_secs(20))
        .await;
    assert!(!ok);
    assert!(logs.contains("chmod 600"), "{logs}");
}

/// The binary's TLS flags and the CLI's client TLS flags, end to end.
#[tokio::test]
async fn binary_serves_mtls_and_the_cli_authenticates_with_a_client_certificate() {
    use crate::security::{Ca, write_policy, write_server_tls};
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let tls = write_server_tls(dir.path(), &server_ca, &client_ca.pem());
    let policy = write_policy(
        dir.path(),
        "[[allow]]\nidentities = [\"spiffe://prod.example/cli\"]\nmethods = [\"keybroker.v1.KeyBroker/*\"]\ntenants = [\"acme\"]\n",
    );
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let process = Process::spawn(
        dir.path(),
        &[
            "--tls-cert",
            &path(tls.cert.as_ref().unwrap()),
            "--tls-key",
            &path(tls.key.as_ref().unwrap()),
            "--tls-client-ca",
            &path(tls.client_ca.as_ref().unwrap()),
            "--tls-trust-domain",
            "prod.example",
            "--authz-policy",
            &path(&policy),
            "--health-listen",
            "127.0.0.1:0",
            "--handshake-timeout",
            "1s",
        ],
    );
    let url = format!("https://{}", process.addr().await);
    // Probes use the plaintext health-only port, no certificate needed.
    let log = std::fs::read_to_string(&process.log).unwrap();
    let health_addr = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "health listening")
        .and_then(|v| v["fields"]["addr"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no health address in:\n{log}"));
    let health_url = format!("http://{health_addr}");
    let health = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_keybroker"))
            .args([
                "health",
                "--server",
                &health_url,
                "--service",
                "keybroker.v1.KeyBroker",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    assert!(String::from_utf8_lossy(&health.stdout).contains("SERVING"));
    // Only health there: the data plane is not reachable in plaintext.
    let plain = KeyBrokerClient::connect(format!("http://{health_addr}"))
        .await
        .unwrap()
        .describe_key(proto::DescribeKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(plain.code(), tonic::Code::Unimplemented, "{plain:?}");
    // The probe port has the connection limits too: silent connections
    // past its 256 slots are closed at accept, and the held ones go when
    // the handshake timeout (1 s here) ends; a probe then answers.
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(tokio::net::TcpStream::connect(&health_addr).await.unwrap());
    }
    let mut excess = silent.pop().unwrap();
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut excess, &mut byte),
    )
    .await
    .expect("an excess connection to the probe port stayed open");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let probe = HealthClient::new(
        Channel::from_shared(format!("http://{health_addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .check(HealthCheckRequest {
        service: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(probe.into_inner().status(), ServingStatus::Serving);
    drop(silent);
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        path(&p)
    };
    let ca = write("server-ca.pem", &server_ca.pem());
    let cli = client_ca.client("spiffe://prod.example/cli");
    let (cert, key) = (write("cli.crt", &cli.cert), write("cli.key", &cli.key));
    let run = |extra: &[&str], tenant: &str| {
        let url = url.clone();
        let ca = ca.clone();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let tenant = tenant.to_owned();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_keybroker"))
                .args([
                    "generate",
                    "--server",
                    &url,
                    "--ca",
                    &ca,
                    "--server-name",
                    "localhost",
                ])
                .args(&extra)
                .args(["--tenant", &tenant])
                .output()
                .unwrap()
        })
    };
    let ok = run(&["--cert", &cert, "--key", &key], "acme")
        .await
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(out["key"]["key_binding"], "platform", "{out}");
    let other_tenant = run(&["--cert", &cert, "--key", &key], "globex")
        .await
        .unwrap();
    assert!(!other_tenant.status.success());
    let stderr = String::from_utf8_lossy(&other_tenant.stderr);
    assert!(
        stderr.contains("PermissionDenied") || stderr.contains("PERMISSION_DENIED"),
        "{stderr}"
    );
    let anonymous = run(&[], "acme").await.unwrap();
    assert!(
        !anonymous.status.success(),
        "served without a client certificate"
    );
    process.signal("TERM");
    assert!(process.wait(Duration::from_secs(20)).await.0);
}

/// `GET /metrics` over a plain TCP socket: the exposition text.
async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// The value of the sample `name{labels}` (labels as printed).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[tokio::test]
async fn metrics_endpoint_counts_a_known_sequence_of_calls() {
    let dir = tempfile::tempdir().unwrap();
    let process = Process::spawn(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let mut client = KeyBrokerClient::new(process.channel().await);
    let generated = client
        .generate_data_key(proto::GenerateDataKeyRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        client
            .unwrap_key(proto::UnwrapKeyRequest {
                tenant_id: "acme".into(),
                wrapped_key: generated.wrapped_key.clone().into(),
                context: Default::default(),
                justification: None,
            })
            .await
            .unwrap();
    }
    let bad = client
        .unwrap_key(proto::UnwrapKeyRequest {
            tenant_id: "acme".into(),
            wrapped_key: b"garbage".to_vec().into(),
            context: Default::default(),
            justification: None,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    // The affinity header: counted, never required or trusted.
    for header in ["acme", "globex"] {
        let mut request = tonic::Request::new(proto::UnwrapKeyRequest {
            tenant_id: "acme".into(),
            wrapped_key: generated.wrapped_key.clone().into(),
            context: Default::default(),
            justification: None,
        });
        request
            .metadata_mut()
            .insert("x-keybroker-tenant", header.parse().unwrap());
        client.unwrap_key(request).await.unwrap();
    }
    // The CLI sends it on every call.
    let server = format!("http://{}", process.addr().await);
    let cli = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_keybroker"))
            .args(["describe", "--server", &server, "--tenant", "acme"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );

    let log = std::fs::read_to_string(&process.log).unwrap();
    let addr = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "metrics listening")
        .and_then(|v| v["fields"]["addr"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no metrics address in:\n{log}"));
    let text = scrape(&addr).await;
    let rpc = |method: &str, code: &str| {
        sample(
            &text,
            &format!(
                "keybroker_rpc_requests_total{{method=\"keybroker.v1.KeyBroker/{method}\",code=\"{code}\",tenant=\"\"}}"
            ),
        )
    };
    assert_eq!(rpc("GenerateDataKey", "OK"), 1.0);
    assert_eq!(rpc("UnwrapKey", "OK"), 4.0);
    let affinity = |name: &str| {
        sample(
            &text,
            &format!("keybroker_affinity_header_total{{name=\"{name}\"}}"),
        )
    };
    assert_eq!(affinity("absent"), 4.0);
    assert_eq!(affinity("matched"), 2.0);
    assert_eq!(affinity("other_tenant"), 1.0);
    assert_eq!(
        sample(
            &text,
            "keybroker_identity_clients{name=\"aws_role_sessions\"}"
        ),
        0.0
    );
    assert_eq!(rpc("UnwrapKey", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(
        sample(&text, "keybroker_cache_events_total{name=\"miss\"}"),
        1.0
    );
    // Three cached DEKs, and the tenant key (cached at its mint) that
    // opened the first one; the entries are that DEK and that tenant key.
    assert_eq!(
        sample(&text, "keybroker_cache_events_total{name=\"hit\"}"),
        4.0
    );
    assert_eq!(sample(&text, "keybroker_cache_entries"), 2.0);
    let provider = |op: &str| {
        sample(
            &text,
            &format!(
                "keybroker_provider_calls_total{{provider=\"local\",operation=\"{op}\",outcome=\"ok\"}}"
            ),
        )
    };
    // One provider call: the platform key wrapping the tenant key version
    // the first GenerateDataKey minted. DEKs are sealed and opened under it.
    assert_eq!(provider("encrypt"), 1.0);
    assert!(!text.contains("operation=\"decrypt\""), "{text}");
    assert_eq!(
        sample(
            &text,
            "keybroker_rpc_duration_seconds_count{method=\"keybroker.v1.KeyBroker/UnwrapKey\"}"
        ),
        5.0
    );
    assert!(!text.contains("acme"), "no tenant ids in labels by default");
    process.signal("TERM");
    assert!(process.wait(Duration::from_secs(20)).await.0);
}

/// Exported spans: name and attributes.
type Spans = Vec<(String, std::collections::HashMap<String, String>)>;

/// A fake OTLP collector: keeps every exported span's name and attributes.
#[derive(Default, Clone)]
struct Collector {
    spans: std::sync::Arc<std::sync::Mutex<Spans>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let attributes = span
                        .attributes
                        .iter()
                        .map(|kv| {
                            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(Value::StringValue(s)) => s.clone(),
                                other => format!("{other:?}"),
                            };
                            (kv.key.clone(), value)
                        })
                        .collect();
                    spans.push((span.name, attributes));
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_spans_are_exported_over_otlp_with_the_request_id() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let process = Process::spawn(dir.path(), &["--otlp-endpoint", &endpoint]);
    // Logs at trace (Process::spawn) must not flood the export: only
    // keybroker's spans are exported.
    let mut client = KeyBrokerClient::new(process.channel().await);
    let mut request = tonic::Request::new(proto::GenerateDataKeyRequest {
        tenant_id: "acme".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "trace-me-42".parse().unwrap());
    client.generate_data_key(request).await.unwrap();
    // Shutdown flushes the batch.
    process.signal("TERM");
    let (ok, logs) = process.wait(Duration::from_secs(20)).await;
    assert!(ok, "{logs}");
    let spans = collector.spans.lock().unwrap().clone();
    let h2_exported = spans
        .iter()
        .any(|(_, attrs)| attrs.get("target").is_some_and(|t| t.starts_with("h2")));
    assert!(!h2_exported, "h2's own spans were exported: {spans:?}");
    let rpc = spans
        .iter()
        .find(|(_, attrs)| attrs.get("request_id").map(String::as_str) == Some("trace-me-42"))
        .unwrap_or_else(|| panic!("no span with the request id among {spans:?}"));
    assert_eq!(rpc.0, "keybroker.v1.KeyBroker/GenerateDataKey");
    assert_eq!(rpc.1["tenant_id"], "acme");
    assert_eq!(rpc.1["code"], "OK");
    assert_eq!(rpc.1["caller"], "unauthenticated");
}

/// Where `needle` occurs in the writable memory of process `pid` (its heap,
/// stacks and anonymous mappings), read through /proc/PID/mem.
fn memory_holds(pid: u32, needle: &[u8]) -> usize {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let finder = memchr::memmem::Finder::new(needle);
    let mut found = 0;
    let mut chunk = vec![0u8; 1 << 20];
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        // Overlapping reads, so a needle across two chunks is seen.
        let mut at = start;
        while at < end {
            let len = usize::try_from((end - at).min(chunk.len() as u64)).unwrap();
            if mem.seek(SeekFrom::Start(at)).is_err() || mem.read_exact(&mut chunk[..len]).is_err()
            {
                break;
            }
            found += finder.find_iter(&chunk[..len]).count();
            if at + len as u64 >= end {
                break;
            }
            at += (len - needle.len()) as u64;
        }
    }
    found
}

/// A plaintext key the server handled but does not keep (a WrapKey
/// request's DEK, and the same DEK answered by an UnwrapKey that did not
/// cache it) is nowhere in the server's memory once the connection that
/// carried it closed: keybroker's own buffers are zeroized, and every other
/// one that held it (the request's decode buffer, the response's encode
/// buffer, hyper's and h2's connection buffers) is zeroed when freed by the
/// process allocator (`keybroker::secret::ZeroOnFree`). The tenant's id,
/// which the server does keep, is found by the same scan.
#[tokio::test]
async fn a_plaintext_it_does_not_keep_is_gone_from_memory_after_use() {
    let dir = tempfile::tempdir().unwrap();
    // A tenant may hold one cached key (1% of 100 entries, at least one):
    // after GenerateDataKey's, the unwrap below is served uncached.
    let process = Process::spawn(
        dir.path(),
        &[
            "--allow-core-dumps",
            "--cache-max-entries",
            "100",
            "--cache-tenant-share",
            "1",
        ],
    );
    let tenant = "zero-on-free-7f3a9c";
    let plaintext: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0xC5).collect();
    let c = ctx(&[("table", "secrets")]);
    {
        let channel = process.channel().await;
        let mut client = KeyBrokerClient::new(channel);
        let other = client
            .generate_data_key(crate::common::generate_req(tenant, &[("table", "x")]))
            .await
            .unwrap()
            .into_inner();
        crate::common::unwrap(&mut client, tenant, &[("table", "x")], &other.wrapped_key)
            .await
            .unwrap();
        let wrapped = client
            .wrap_key(proto::WrapKeyRequest {
                tenant_id: tenant.into(),
                context: c.clone(),
                plaintext: plaintext.clone(),
                justification: None,
            })
            .await
            .unwrap()
            .into_inner()
            .wrapped_key;
        for _ in 0..3 {
            let back = client
                .unwrap_key(proto::UnwrapKeyRequest {
                    tenant_id: tenant.into(),
                    context: c.clone(),
                    wrapped_key: wrapped.clone().into(),
                    justification: None,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(back.plaintext, plaintext);
        }
    }
    // The connection is closed; the server frees its buffers as it notices.
    let pid = process.pid();
    let started = Instant::now();
    let mut left = usize::MAX;
    while started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        left = memory_holds(pid, &plaintext);
        if left == 0 {
            break;
        }
    }
    assert_eq!(left, 0, "the plaintext is still in the server's memory");
    assert!(
        memory_holds(pid, tenant.as_bytes()) > 0,
        "the scan reads the server's memory"
    );
}
