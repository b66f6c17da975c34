//! The system under test: real `keybroker` processes (so a kill is a real
//! SIGKILL) on one data dir's SQLite registry, reached through the
//! generated clients, and what the test reads of their registry.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keybroker::proto::key_admin_client::KeyAdminClient;
use keybroker::proto::key_broker_client::KeyBrokerClient;
use keybroker::registry::Registry as _;
use keybroker::registry::sql::SqlRegistry;
use tonic::transport::Channel;

use crate::process::Process;

/// One replica and the data dir it serves from.
pub(super) struct System {
    pub(super) dir: tempfile::TempDir,
    process: Option<Process>,
    pub(super) broker: KeyBrokerClient<Channel>,
    pub(super) admin: KeyAdminClient<Channel>,
    /// Starts so far (the first included).
    pub(super) starts: u32,
}

const FLAGS: &[&str] = &[
    "--unlink-guard-window",
    "1ms",
    "--maintenance-interval",
    "200ms",
    "--watcher-interval",
    "1h",
    "--keyring-reload-interval",
    "100ms",
    "--tenant-key-rotation-period",
    "0s",
];

impl System {
    pub(super) async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (process, broker, admin) = spawn(dir.path()).await;
        Self {
            dir,
            process: Some(process),
            broker,
            admin,
            starts: 1,
        }
    }

    /// Stops the replica: gracefully (SIGTERM, drain) or not (SIGKILL).
    pub(super) async fn stop(&mut self, kill: bool) {
        if let Some(mut process) = self.process.take() {
            if kill {
                process.kill();
            } else {
                process.signal("TERM");
                let (ok, log) = process.wait(Duration::from_secs(20)).await;
                assert!(ok, "keybroker did not stop cleanly:\n{}", tail(&log));
            }
        }
    }

    pub(super) async fn restart(&mut self, kill: bool) {
        self.stop(kill).await;
        let (process, broker, admin) = spawn(self.dir.path()).await;
        self.process = Some(process);
        self.broker = broker;
        self.admin = admin;
        self.starts += 1;
    }

    /// The server's log so far (the newest start's).
    pub(super) fn log(&self) -> String {
        self.process
            .as_ref()
            .map(Process::output)
            .unwrap_or_default()
    }

    pub(super) async fn registry(&self) -> SqlRegistry {
        SqlRegistry::open_sqlite(&self.dir.path().join("registry.db"))
            .await
            .unwrap()
    }

    /// `keybroker registry export` into a new file; its path.
    pub(super) fn export(&self, n: usize) -> PathBuf {
        let out = self.dir.path().join(format!("export-{n}.json"));
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
            .args(["registry", "export", "--data-dir"])
            .arg(self.dir.path())
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "export failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        out
    }

    /// `keybroker keyring rotate` (the running server reloads it).
    pub(super) fn rotate_keyring(&self) {
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
            .args(["keyring", "rotate", "--data-dir"])
            .arg(self.dir.path())
            .output()
            .unwrap();
        assert!(status.status.success());
    }

    /// Every tenant key version's binding, by tenant, as stored now.
    pub(super) async fn stored_versions(&self, tenant: &str) -> Vec<(u32, String)> {
        let registry = self.registry().await;
        let versions = registry
            .tenant_keys(tenant)
            .await
            .unwrap()
            .into_iter()
            .map(|v| (v.version, v.binding))
            .collect();
        registry.close().await;
        versions
    }
}

/// A server restored from `export` (with the keyring of `from`) in a new
/// data dir.
pub(super) async fn restored(
    from: &Path,
    export: &Path,
) -> (tempfile::TempDir, Process, KeyBrokerClient<Channel>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        keybroker::config::platform_keyring_path(from),
        keybroker::config::platform_keyring_path(dir.path()),
    )
    .unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(["registry", "restore", "--data-dir"])
        .arg(dir.path())
        .arg("--from")
        .arg(export)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let (process, broker, _) = spawn(dir.path()).await;
    (dir, process, broker)
}

async fn spawn(dir: &Path) -> (Process, KeyBrokerClient<Channel>, KeyAdminClient<Channel>) {
    let process = Process::spawn_with(&[], dir, FLAGS, &[("RUST_LOG", "info")]);
    let channel = process.channel().await;
    (
        process,
        KeyBrokerClient::new(channel.clone()),
        KeyAdminClient::new(channel),
    )
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Retries `call` while the server is (re)starting (UNAVAILABLE), for at
/// most 10 s.
pub(super) async fn patiently<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let started = Instant::now();
    loop {
        match call().await {
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && started.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}
