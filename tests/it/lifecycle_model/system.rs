//! The system under test: real `keybroker` processes (so a kill is a real
//! SIGKILL), reached through the generated clients: one replica on its
//! data dir's SQLite registry, or two replicas sharing a PostgreSQL server
//! of the test's own (and one platform keyring, as replicas share a
//! Secret), and what the test reads of their registry.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keybroker::proto::key_admin_client::KeyAdminClient;
use keybroker::proto::key_broker_client::KeyBrokerClient;
use keybroker::registry::Registry as _;
use keybroker::registry::sql::SqlRegistry;
use tonic::transport::Channel;

use crate::aws_support::Moto;
use crate::pg_cluster::PgCluster;
use crate::process::Process;

const REGION: &str = "us-east-1";

/// Where the replicas keep their registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Backend {
    Sqlite,
    Postgres,
}

pub(super) struct Replica {
    pub(super) dir: tempfile::TempDir,
    process: Option<Process>,
    pub(super) broker: KeyBrokerClient<Channel>,
    pub(super) admin: KeyAdminClient<Channel>,
}

pub(super) struct System {
    pub(super) replicas: Vec<Replica>,
    postgres: Option<PgCluster>,
    /// The customers' AWS: every replica's KMS and STS.
    moto: Moto,
}

const FLAGS: &[&str] = &[
    "--unlink-guard-window",
    "1ms",
    "--maintenance-interval",
    "200ms",
    "--watcher-interval",
    "300ms",
    "--keyring-reload-interval",
    "100ms",
    "--tenant-key-rotation-period",
    "2s",
    "--registry-cache-ttl",
    "1s",
];

/// How long another replica may serve what a change on one replica ended:
/// NOTIFY in milliseconds, at worst `registry_cache_ttl` (1 s here).
pub(super) const PROPAGATION: Duration = Duration::from_secs(3);

/// How long a change at the provider may go unseen: a watcher pass
/// (300 ms here) and its describe and canary calls.
pub(super) const REVOCATION: Duration = Duration::from_secs(5);

impl System {
    pub(super) async fn start(backend: Backend) -> Self {
        let postgres = (backend == Backend::Postgres).then(PgCluster::start);
        let moto = Moto::start();
        let count = if postgres.is_some() { 2 } else { 1 };
        let mut replicas = Vec::new();
        for i in 0..count {
            let dir = tempfile::tempdir().unwrap();
            if i > 0 {
                std::fs::copy(
                    keybroker::config::platform_keyring_path(replicas_dir(&replicas, 0)),
                    keybroker::config::platform_keyring_path(dir.path()),
                )
                .unwrap();
            }
            let url = postgres.as_ref().map(|p| p.url.clone());
            let (process, broker, admin) = spawn(dir.path(), url.as_deref(), &moto.url).await;
            replicas.push(Replica {
                dir,
                process: Some(process),
                broker,
                admin,
            });
        }
        Self {
            replicas,
            postgres,
            moto,
        }
    }

    /// A new customer key in moto; its ARN.
    pub(super) async fn create_aws_key(&self) -> String {
        self.moto.create_key(REGION, false).await
    }

    /// The customers' side of AWS KMS (to disable and enable their keys).
    pub(super) fn kms(&self) -> aws_sdk_kms::Client {
        self.moto.kms(REGION)
    }

    pub(super) fn broker(&self, replica: usize) -> KeyBrokerClient<Channel> {
        self.replicas[replica % self.replicas.len()].broker.clone()
    }

    pub(super) fn admin(&self, replica: usize) -> KeyAdminClient<Channel> {
        self.replicas[replica % self.replicas.len()].admin.clone()
    }

    fn url(&self) -> Option<String> {
        self.postgres.as_ref().map(|p| p.url.clone())
    }

    /// Stops every replica: gracefully (SIGTERM, drain) or not (SIGKILL).
    pub(super) async fn stop(&mut self, kill: bool) {
        for r in 0..self.replicas.len() {
            self.stop_one(r, kill).await;
        }
    }

    async fn stop_one(&mut self, replica: usize, kill: bool) {
        if let Some(mut process) = self.replicas[replica].process.take() {
            if kill {
                process.kill();
            } else {
                process.signal("TERM");
                let (ok, log) = process.wait(Duration::from_secs(20)).await;
                assert!(ok, "keybroker did not stop cleanly:\n{}", tail(&log));
            }
        }
    }

    /// Restarts one replica (killed, or stopped cleanly).
    pub(super) async fn restart(&mut self, replica: usize, kill: bool) {
        let replica = replica % self.replicas.len();
        self.stop_one(replica, kill).await;
        let url = self.url();
        let (process, broker, admin) = spawn(
            self.replicas[replica].dir.path(),
            url.as_deref(),
            &self.moto.url,
        )
        .await;
        let r = &mut self.replicas[replica];
        r.process = Some(process);
        r.broker = broker;
        r.admin = admin;
    }

    /// PostgreSQL restarted under the replicas (SQLite: nothing to do).
    pub(super) fn restart_registry(&self) {
        if let Some(postgres) = &self.postgres {
            postgres.restart();
        }
    }

    /// Every replica's LISTEN connection cut (what a network blip does).
    pub(super) async fn drop_change_feeds(&self) {
        use sqlx::Connection as _;
        let Some(url) = self.url() else { return };
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }

    /// The servers' logs so far (each replica's newest start).
    pub(super) fn log(&self) -> String {
        self.replicas
            .iter()
            .filter_map(|r| r.process.as_ref().map(Process::output))
            .collect::<Vec<_>>()
            .join("\n----\n")
    }

    pub(super) async fn registry(&self) -> SqlRegistry {
        match self.url() {
            Some(url) => SqlRegistry::connect(&url).await.unwrap(),
            None => SqlRegistry::open_sqlite(&self.replicas[0].dir.path().join("registry.db"))
                .await
                .unwrap(),
        }
    }

    /// `keybroker registry export` into a new file; its path.
    pub(super) fn export(&self, n: usize) -> PathBuf {
        let dir = self.replicas[0].dir.path();
        let out = dir.join(format!("export-{n}.json"));
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"));
        command.args(["registry", "export", "--data-dir"]).arg(dir);
        if let Some(url) = self.url() {
            command.args(["--registry", &url]);
        }
        let status = command.arg("--out").arg(&out).output().unwrap();
        assert!(
            status.status.success(),
            "export failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        out
    }

    /// `keybroker keyring rotate` on the first replica's keyring, copied to
    /// the others (one Secret for all): every replica reloads it.
    pub(super) fn rotate_keyring(&self) {
        let first = self.replicas[0].dir.path();
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
            .args(["keyring", "rotate", "--data-dir"])
            .arg(first)
            .output()
            .unwrap();
        assert!(status.status.success());
        for r in &self.replicas[1..] {
            let to = keybroker::config::platform_keyring_path(r.dir.path());
            let tmp = to.with_extension("copy");
            std::fs::copy(keybroker::config::platform_keyring_path(first), &tmp).unwrap();
            std::fs::rename(tmp, to).unwrap();
        }
    }

    /// Every tenant key version's binding, as stored now.
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

    pub(super) fn moto_url(&self) -> &str {
        &self.moto.url
    }

    /// The first replica's data dir (its keyring is everyone's).
    pub(super) fn keyring_dir(&self) -> &Path {
        self.replicas[0].dir.path()
    }
}

fn replicas_dir(replicas: &[Replica], i: usize) -> &Path {
    replicas[i].dir.path()
}

/// A server restored from `export` (with the keyring of `from`) in a new
/// data dir, on SQLite.
pub(super) async fn restored(
    from: &Path,
    export: &Path,
    moto_url: &str,
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
    let (process, broker, _) = spawn(dir.path(), None, moto_url).await;
    (dir, process, broker)
}

async fn spawn(
    dir: &Path,
    registry: Option<&str>,
    moto: &str,
) -> (Process, KeyBrokerClient<Channel>, KeyAdminClient<Channel>) {
    let mut flags: Vec<&str> = FLAGS.to_vec();
    flags.extend(["--aws-kms-endpoint", moto, "--aws-sts-endpoint", moto]);
    if let Some(url) = registry {
        flags.extend(["--registry", url]);
    }
    let process = Process::spawn_with(
        &[],
        dir,
        &flags,
        &[
            ("RUST_LOG", "info"),
            ("AWS_ACCESS_KEY_ID", "AKIATEST"),
            ("AWS_SECRET_ACCESS_KEY", "test-secret"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
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

/// Retries `call` while a server or the registry is (re)starting
/// (UNAVAILABLE), for at most 15 s.
pub(super) async fn patiently<T, F, Fut>(call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    crate::common::while_unavailable(Duration::from_secs(15), call).await
}
