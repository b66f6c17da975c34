//! A PostgreSQL server of the test's own (Debian's binaries, a temp dir, a
//! loopback port), to stop, start, restart and promote under the replicas
//! (the shared test server cannot be). As root, the server runs as the
//! `postgres` user (initdb refuses root).

use std::path::PathBuf;
use std::process::Command;

pub(crate) struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub(crate) port: u16,
    pub(crate) url: String,
}

fn root() -> bool {
    rustix::process::geteuid().is_root()
}

impl PgCluster {
    /// An empty cluster directory on a free port (nothing run yet).
    fn new() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|dirs| {
                let mut versions: Vec<PathBuf> =
                    dirs.flatten().map(|d| d.path().join("bin")).collect();
                versions.sort();
                versions.pop()
            })
            .filter(|b| b.join("initdb").exists())
            .unwrap_or_else(|| {
                panic!("PostgreSQL server binaries are missing: apt-get install postgresql (scripts/test.sh does)")
            });
        let dir = tempfile::tempdir().unwrap();
        if root() {
            let status = Command::new("chown")
                .args(["postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown postgres {}", dir.path().display());
        }
        let port = crate::common::free_port();
        Self {
            url: format!("postgres://keybroker@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            port,
        }
    }

    /// A new server, started.
    pub(crate) fn start() -> Self {
        let cluster = Self::new();
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-U",
                "keybroker",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        cluster.up();
        cluster
    }

    /// A streaming replica of `primary` (hot standby), started.
    pub(crate) fn standby_of(primary: &Self) -> Self {
        let cluster = Self::new();
        let port = primary.port.to_string();
        let data = cluster.data();
        cluster.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "keybroker",
                "-D",
                &data,
                "-R",
                "-X",
                "stream",
            ],
        );
        cluster.up();
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// `tool` of the server's version, as the user that owns the cluster.
    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        if root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl(&self, args: &[&str]) {
        let options = format!(
            "-h 127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        let data = self.data();
        let mut all = vec!["-D", &data, "-l", &log, "-o", &options];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all);
    }

    pub(crate) fn up(&self) {
        self.pg_ctl(&["start", "-w", "-t", "60"]);
    }

    /// A fast stop: sessions are cut, the server is gone until `up`.
    pub(crate) fn down(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w"]);
    }

    /// A restart (fast: sessions are cut, as in a failover or an upgrade).
    pub(crate) fn restart(&self) {
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"]);
    }

    /// A standby becomes a primary.
    pub(crate) fn promote(&self) {
        self.pg_ctl(&["promote", "-w"]);
    }

    /// SQL as the superuser, through psql.
    pub(crate) fn sql(&self, statement: &str) {
        let port = self.port.to_string();
        self.run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "keybroker",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-qc",
                statement,
            ],
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "stop"])
            .output();
    }
}
