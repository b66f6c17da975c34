//! A registry outage costs admin operations, not data: two replicas on a
//! PostgreSQL server of their own, which the test stops under load and
//! starts again (issue: the data plane outlives its registry).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use keybroker::proto;

use crate::common::{TestServer, admin_client, create_tenant, generate, test_config, unwrap};

/// A PostgreSQL server on a loopback port, in a temp dir, owned by the test:
/// stopped and started at will (the shared test server is not).
struct OwnPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl OwnPostgres {
    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|dirs| {
                dirs.filter_map(Result::ok)
                    .map(|d| d.path().join("bin"))
                    .filter(|b| b.join("initdb").exists())
                    .max()
            })
            .expect(
                "PostgreSQL server binaries are missing: apt-get install postgresql (scripts/test.sh installs it)",
            );
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = Self { bin, dir, port };
        if is_root() {
            Command::new("chown")
                .args(["-R", "postgres"])
                .arg(pg.dir.path())
                .status()
                .unwrap();
        }
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                path(&data),
                "-U",
                "keybroker",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        pg.up();
        pg
    }

    fn url(&self) -> String {
        format!("postgres://keybroker@127.0.0.1:{}/postgres", self.port)
    }

    fn up(&self) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("server.log");
        let options = format!(
            "-h 127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            path(self.dir.path())
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                path(&data),
                "-l",
                path(&log),
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        );
    }

    fn down(&self) {
        let data = self.dir.path().join("data");
        self.run("pg_ctl", &["-D", path(&data), "-m", "fast", "-w", "stop"]);
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let status = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
        } else {
            Command::new(&program)
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
        }
        .unwrap();
        assert!(status.success(), "{tool} {args:?} failed");
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new(if is_root() { "runuser" } else { "true" })
            .args(if is_root() {
                vec!["-u", "postgres", "--"]
            } else {
                vec![]
            })
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", path(&data), "-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// initdb refuses to run as root: the server then runs as `postgres`.
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

async fn registry_health(server: &TestServer) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: keybroker::server::REGISTRY_HEALTH.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_are_served_through_a_registry_outage_and_changes_flow_after_it() {
    let pg = OwnPostgres::start();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let config = |dir: &std::path::Path| {
        let mut c = test_config(dir);
        c.registry.url = Some(pg.url().parse().unwrap());
        c.registry.cache_ttl = Duration::from_millis(500);
        c.registry.read_timeout = Duration::from_millis(300);
        c
    };
    let config_a = config(dirs[0].path());
    let a = TestServer::start(config_a.clone()).await;
    std::fs::copy(
        config_a.platform_keyring_path(),
        config(dirs[1].path()).platform_keyring_path(),
    )
    .unwrap();
    let b = TestServer::start(config(dirs[1].path())).await;
    let mut admin = admin_client(&a).await;
    create_tenant(&mut admin, "acme", proto::KeyPolicy::Keyring).await;
    let ctx = [("table", "orders")];
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let dek = generate(&mut ca, "acme", &ctx).await.unwrap();
    for c in [&mut ca, &mut cb] {
        assert_eq!(
            unwrap(c, "acme", &ctx, &dek.wrapped_key)
                .await
                .unwrap()
                .plaintext,
            dek.plaintext
        );
    }
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(registry_health(&a).await, serving);

    // The registry goes away for 5 s: ten view TTLs.
    pg.down();
    let outage = Instant::now();
    let (mut calls, mut slowest) = (0, Duration::ZERO);
    let mut made = Vec::new();
    while outage.elapsed() < Duration::from_secs(5) {
        for c in [&mut ca, &mut cb] {
            let started = Instant::now();
            let got = unwrap(c, "acme", &ctx, &dek.wrapped_key).await;
            slowest = slowest.max(started.elapsed());
            assert_eq!(
                got.expect("a cached key during the outage").plaintext,
                dek.plaintext
            );
            calls += 1;
        }
        // New DEKs under the cached tenant key keep being made.
        made.push(
            generate(&mut ca, "acme", &ctx)
                .await
                .expect("GenerateDataKey during the outage"),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("outage: {calls} cached unwraps, slowest {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "a cached unwrap waited {slowest:?} on the registry"
    );
    assert_eq!(
        registry_health(&a).await,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32,
        "health does not report the registry outage"
    );
    assert!(a.directory.as_ref().unwrap().stale_view_serves() > 0);
    // An admin change cannot be committed meanwhile: refused, promptly.
    let started = Instant::now();
    let refused = admin
        .create_tenant(proto::CreateTenantRequest {
            tenant_id: "during".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    // The registry is back: DEKs made during the outage read on the other
    // replica, and an admin change reaches both replicas.
    pg.up();
    let back = Instant::now();
    for d in &made {
        let got = unwrap(&mut cb, "acme", &ctx, &d.wrapped_key).await.unwrap();
        assert_eq!(got.plaintext, d.plaintext);
    }
    // Until the change feed is back, a change may reach B by the TTL only:
    // wait for A to answer admin calls, then schedule the deletion.
    loop {
        let deleted = admin
            .delete_tenant(proto::DeleteTenantRequest {
                tenant_id: "acme".into(),
                force: false,
                restore_window: Some(Default::default()),
            })
            .await;
        match deleted {
            Ok(_) => break,
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && back.elapsed() < Duration::from_secs(20) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("DeleteTenant after the outage: {s:?}"),
        }
    }
    let changed = Instant::now();
    for c in [&mut ca, &mut cb] {
        loop {
            if unwrap(c, "acme", &ctx, &dek.wrapped_key).await.is_err() {
                break;
            }
            assert!(
                changed.elapsed() < Duration::from_secs(3),
                "a replica still serves a tenant scheduled for deletion"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!(
        "registry back to admin change: {:?}; change to seen on both replicas: {:?}",
        changed - back,
        changed.elapsed()
    );
    assert_eq!(registry_health(&b).await, serving);
    a.stop().await;
    b.stop().await;
}
