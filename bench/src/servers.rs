//! The processes a benchmark runs: keybroker and the floor (spawned,
//! pinned, killed on drop), their CPU time from `/proc`, and where the
//! client runs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// A server process (keybroker or floor), killed on drop.
pub(crate) struct ServerProcess {
    pub(crate) child: Child,
    pub(crate) addr: String,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time a process has used, in clock ticks: user space (keybroker's
/// own code and its libraries) and kernel (socket reads and writes), kept
/// apart because only the first is what callgrind counts.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuTicks {
    pub(crate) user: u64,
    pub(crate) system: u64,
}

impl CpuTicks {
    pub(crate) fn since(self, before: Self) -> Self {
        Self {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }

    pub(crate) fn total(self) -> u64 {
        self.user + self.system
    }
}

/// utime and stime of process `pid`.
pub(crate) fn cpu_ticks(pid: u32) -> anyhow::Result<CpuTicks> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name: state is field 3,
    // utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(CpuTicks {
        user: fields.get(11).context("no utime")?.parse()?,
        system: fields.get(12).context("no stime")?.parse()?,
    })
}

/// `program`, pinned to a core and/or run under `wrapper` (valgrind).
pub(crate) fn command(program: &Path, pin_core: Option<usize>, wrapper: &[String]) -> Command {
    let mut argv: Vec<OsString> = Vec::new();
    if let Some(core) = pin_core {
        argv.extend(["taskset".into(), "-c".into(), core.to_string().into()]);
    }
    argv.extend(wrapper.iter().map(Into::into));
    argv.push(program.into());
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

/// keybroker on an ephemeral port of 127.0.0.1, with `extra` flags (the
/// shape's).
pub(crate) fn spawn_keybroker(
    bin: &Path,
    data_dir: &Path,
    pin: Option<usize>,
    wrapper: &[String],
    extra: &[OsString],
) -> anyhow::Result<ServerProcess> {
    let log = data_dir.join("keybroker.log");
    let out = std::fs::File::create(&log)?;
    let child = command(bin, pin, wrapper)
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "--cache-max-entries",
            "1000000",
            "--cache-ttl",
            "1h",
            "--cache-tti",
            "1h",
            // The access log's counts reach the registry within a second,
            // where `load` checks them against the uses it made.
            "--access-log-flush-interval",
            "1s",
        ])
        .args(extra)
        // Under valgrind every registry call is some 50 times slower: the
        // production defaults would time the first wraps of 100 tenants out.
        .args(if wrapper.is_empty() {
            &[][..]
        } else {
            &[
                "--registry-read-timeout",
                "60s",
                "--registry-write-timeout",
                "60s",
                "--registry-acquire-timeout",
                "60s",
            ][..]
        })
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut process = ServerProcess {
        child,
        addr: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(if wrapper.is_empty() { 30 } else { 300 });
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(addr) = text.lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["fields"]["message"] == "keybroker listening")
                .then(|| v["fields"]["addr"].as_str().map(str::to_owned))?
        }) {
            process.addr = addr;
            return Ok(process);
        }
        if let Some(status) = process.child.try_wait()? {
            anyhow::bail!("keybroker exited ({status}):\n{text}");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "keybroker did not start:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The floor server, with `extra` flags (the shape's TLS files).
pub(crate) fn spawn_floor(
    pin: Option<usize>,
    wrapper: &[String],
    extra: &[OsString],
) -> anyhow::Result<ServerProcess> {
    use std::io::BufRead as _;
    let me = std::env::current_exe()?;
    let mut child = command(&me, pin, wrapper)
        .arg("floor-server")
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .strip_prefix("listening ")
        .context("floor server did not start")?
        .trim()
        .to_owned();
    Ok(ServerProcess { child, addr })
}

/// Lines of the audit log files in `dir` named `name` (and its
/// rotations, `name.1` …).
pub(crate) fn audit_records(dir: &Path, name: &str) -> anyhow::Result<u64> {
    let mut records = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(name) {
            let text = std::fs::read(entry.path())?;
            records += text.iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    Ok(records)
}

/// With two cores or more (and taskset), pins this process to core 1;
/// servers go to core 0. Whether it pinned.
pub(crate) fn pin_client(no_pin: bool) -> anyhow::Result<bool> {
    let pinned = !no_pin && crate::nproc() >= 2 && which("taskset");
    if pinned {
        let mut set = rustix::thread::CpuSet::new();
        set.set(1);
        rustix::thread::sched_setaffinity(None, &set).context("pinning the client to core 1")?;
    }
    Ok(pinned)
}

/// The load client's runtime: one worker thread when pinned to its core.
pub(crate) fn client_runtime(pinned: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(if pinned {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Runtime::new()?
    })
}

/// The keybroker binary: `given`, or the one next to this binary.
pub(crate) fn keybroker_bin(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(path) => Ok(path),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("no parent directory")?
            .join("keybroker")),
    }
}

fn which(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
