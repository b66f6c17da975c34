//! Closed-loop load: N requests in flight on one HTTP/2 connection, each
//! sent as soon as the previous one returned. keybroker (cache-hit
//! UnwrapKey) and the floor run alternately, several rounds, and the report
//! compares medians of the rounds, so drift on a shared machine hits both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use keybroker::proto::key_broker_client::KeyBrokerClient;
use keybroker::proto::{GenerateDataKeyRequest, UnwrapKeyRequest};
use serde_json::json;
use tonic::transport::Channel;

use crate::pb::GetRequest;
use crate::pb::floor_client::FloorClient;

#[derive(Debug, clap::Args)]
pub(crate) struct LoadArgs {
    /// Every request gives this access reason (customer_initiated, ...).
    #[arg(long, value_parser = keybroker::access::Reason::parse)]
    reason: Option<keybroker::access::Reason>,
    /// The keybroker binary [default: `keybroker` next to this binary].
    #[arg(long)]
    keybroker_bin: Option<PathBuf>,
    /// Requests in flight, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Measured time of each run.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Unmeasured time before each run.
    #[arg(long, default_value = "1s", value_parser = crate::parse_duration)]
    warmup: Duration,
    /// Floor/keybroker pairs per concurrency (alternating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Distinct wrapped keys the load cycles through.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Share of keybroker requests that hit the cache; the rest unwrap keys
    /// never seen before (a pool generated up front).
    #[arg(long, default_value_t = 1.0)]
    hit_ratio: f64,
    /// Items of each BatchUnwrapKey run beside the single UnwrapKey runs
    /// (all cached); 0 skips the batch runs.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Draw the latency percentiles of the highest concurrency (floor,
    /// keybroker single and batch) into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Do not pin the servers and the client to different cores.
    #[arg(long)]
    no_pin: bool,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

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
    fn since(self, before: Self) -> Self {
        Self {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }

    fn total(self) -> u64 {
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
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if let Some(core) = pin_core {
        argv.extend(["taskset".into(), "-c".into(), core.to_string().into()]);
    }
    argv.extend(wrapper.iter().map(Into::into));
    argv.push(program.into());
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

pub(crate) fn spawn_keybroker(
    bin: &Path,
    data_dir: &Path,
    pin: Option<usize>,
    wrapper: &[String],
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

pub(crate) fn spawn_floor(pin: Option<usize>, wrapper: &[String]) -> anyhow::Result<ServerProcess> {
    use std::io::BufRead as _;
    let me = std::env::current_exe()?;
    let mut child = command(&me, pin, wrapper)
        .arg("floor-server")
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

/// One measured run.
#[derive(Debug, Clone)]
pub(crate) struct RunResult {
    histogram: Histogram<u64>,
    /// DEKs each request carries (1, or the batch size).
    deks_per_request: u64,
    requests: u64,
    errors: u64,
    seconds: f64,
    cpu: CpuTicks,
}

impl RunResult {
    pub(crate) fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn deks_per_s(&self) -> f64 {
        self.rps() * self.deks_per_request as f64
    }

    pub(crate) fn quantile_us(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64 / 1000.0
    }

    /// Server CPU microseconds per request.
    pub(crate) fn cpu_us_per_request(&self) -> f64 {
        self.us_per_request(self.cpu.total())
    }

    /// The user-space part of [`Self::cpu_us_per_request`].
    fn user_us_per_request(&self) -> f64 {
        self.us_per_request(self.cpu.user)
    }

    /// The kernel part of [`Self::cpu_us_per_request`].
    fn system_us_per_request(&self) -> f64 {
        self.us_per_request(self.cpu.system)
    }

    fn us_per_request(&self, ticks: u64) -> f64 {
        let ticks_per_s = rustix::param::clock_ticks_per_second() as f64;
        ticks as f64 / ticks_per_s * 1e6 / self.requests.max(1) as f64
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        json!({
            "requests": self.requests,
            "errors": self.errors,
            "rps": self.rps(),
            "deks_per_request": self.deks_per_request,
            "deks_per_s": self.deks_per_s(),
            "p50_us": self.quantile_us(0.5),
            "p90_us": self.quantile_us(0.9),
            "p99_us": self.quantile_us(0.99),
            "p999_us": self.quantile_us(0.999),
            "server_cpu_us_per_request": self.cpu_us_per_request(),
            "server_user_us_per_request": self.user_us_per_request(),
            "server_system_us_per_request": self.system_us_per_request(),
        })
    }
}

/// Key uses this process made whose answer came back (each
/// GenerateDataKey and UnwrapKey, each batch item): what the server's key
/// access log must count, exactly.
static KEY_USES: AtomicU64 = AtomicU64::new(0);

fn used(n: u64) {
    KEY_USES.fetch_add(n, Ordering::Relaxed);
}

/// The uses of tenant `bench`'s keys its key access log counts, once it
/// counts `expected` (the log is flushed every second) or 10 s passed.
async fn access_log_total(channel: &Channel, expected: u64) -> anyhow::Result<u64> {
    let mut admin = keybroker::proto::key_admin_client::KeyAdminClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (mut total, mut page_token) = (0u64, String::new());
        loop {
            let page = admin
                .list_key_access(keybroker::proto::ListKeyAccessRequest {
                    tenant_id: "bench".into(),
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            total += page.records.iter().map(|r| r.count).sum::<u64>();
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        if total == expected || Instant::now() > deadline {
            return Ok(total);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `n` wrapped keys of tenant `bench`, generated one by one.
pub(crate) async fn generate_keys(
    mut client: KeyBrokerClient<Channel>,
    n: usize,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut keys = Vec::with_capacity(n);
    for _ in 0..n {
        let reply = client.generate_data_key(generate_request()).await;
        used(1);
        keys.push(reply?.into_inner().wrapped_key);
    }
    Ok(keys)
}

/// The access reason every request of this process gives (`--reason`).
static REASON: std::sync::OnceLock<keybroker::access::Reason> = std::sync::OnceLock::new();

/// Every request gives `reason` from now on (once per process).
pub(crate) fn set_reason(reason: Option<keybroker::access::Reason>) {
    if let Some(reason) = reason {
        let _ = REASON.set(reason);
    }
}

fn justification() -> Option<keybroker::proto::AccessJustification> {
    REASON.get().map(|r| keybroker::proto::AccessJustification {
        reason: r.to_proto(),
        detail: String::new(),
    })
}

/// Unwraps every key once, so the measured runs are all cache hits.
pub(crate) async fn unwrap_all(
    client: &mut KeyBrokerClient<Channel>,
    keys: &[Vec<u8>],
) -> anyhow::Result<()> {
    for key in keys {
        let reply = client.unwrap_key(unwrap_request(key)).await;
        used(1);
        reply?;
    }
    Ok(())
}

/// What one request of a run sends.
#[derive(Clone)]
pub(crate) enum Target {
    Floor(FloorClient<Channel>, Arc<Vec<Vec<u8>>>),
    Broker {
        client: KeyBrokerClient<Channel>,
        warm: Arc<Vec<Vec<u8>>>,
        cold: Arc<Vec<Vec<u8>>>,
        next_cold: Arc<AtomicU64>,
        hit_ratio: f64,
    },
    /// BatchUnwrapKey of `size` cached keys per request.
    Batch {
        client: KeyBrokerClient<Channel>,
        warm: Arc<Vec<Vec<u8>>>,
        size: usize,
    },
    /// GenerateDataKey for tenant `bench`.
    Generate(KeyBrokerClient<Channel>),
    /// An OpenBao Transit call over HTTP/1.1: POST `url` with one of
    /// `bodies` (cycled), as Vault clients do (`peer`).
    Http {
        client: reqwest::Client,
        url: Arc<str>,
        token: Arc<str>,
        bodies: Arc<Vec<String>>,
    },
}

/// A GenerateDataKey of tenant `bench`, with this process's reason.
fn generate_request() -> GenerateDataKeyRequest {
    GenerateDataKeyRequest {
        tenant_id: "bench".into(),
        key_spec: 0,
        context: context(),
        justification: justification(),
    }
}

/// An UnwrapKey of tenant `bench`'s `key`, with this process's reason.
fn unwrap_request(key: &[u8]) -> UnwrapKeyRequest {
    UnwrapKeyRequest {
        tenant_id: "bench".into(),
        wrapped_key: key.to_vec().into(),
        context: context(),
        justification: justification(),
    }
}

pub(crate) fn context() -> std::collections::BTreeMap<String, String> {
    [("table".to_owned(), "bench".to_owned())].into()
}

impl Target {
    fn deks_per_request(&self) -> u64 {
        match self {
            Self::Batch { size, .. } => *size as u64,
            _ => 1,
        }
    }

    pub(crate) async fn call(&mut self, i: u64) -> bool {
        match self {
            Self::Batch { client, warm, size } => {
                let start = (i as usize * *size) % warm.len();
                let items = (0..*size)
                    .map(|k| unwrap_request(&warm[(start + k) % warm.len()]))
                    .collect();
                let reply = client
                    .batch_unwrap_key(keybroker::proto::BatchUnwrapKeyRequest { items })
                    .await;
                used(*size as u64);
                reply.is_ok_and(|r| {
                    r.get_ref().results.len() == *size
                        && r.get_ref().results.iter().all(|item| {
                            item.response
                                .as_ref()
                                .is_some_and(|u| u.plaintext.len() == 32)
                        })
                })
            }
            Self::Generate(client) => {
                let reply = client.generate_data_key(generate_request()).await;
                used(1);
                reply.is_ok_and(|r| r.get_ref().plaintext.len() == 32)
            }
            Self::Http {
                client,
                url,
                token,
                bodies,
            } => {
                let body = bodies[i as usize % bodies.len()].clone();
                match client
                    .post(&**url)
                    .header("X-Vault-Token", &**token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
            Self::Floor(client, keys) => {
                let key = &keys[i as usize % keys.len()];
                client
                    .get(GetRequest {
                        tenant_id: "bench".into(),
                        key: key.clone(),
                        context: context(),
                    })
                    .await
                    .is_ok_and(|r| r.get_ref().value.len() == 32)
            }
            Self::Broker {
                client,
                warm,
                cold,
                next_cold,
                hit_ratio,
            } => {
                // A fixed pseudo-random pattern (golden-ratio sequence).
                let cold_pick = *hit_ratio < 1.0
                    && ((i as f64 * 0.618_033_988_75).fract() >= *hit_ratio)
                    && !cold.is_empty();
                let key = if cold_pick {
                    let n = next_cold.fetch_add(1, Ordering::Relaxed) as usize;
                    &cold[n % cold.len()]
                } else {
                    &warm[i as usize % warm.len()]
                };
                let reply = client.unwrap_key(unwrap_request(key)).await;
                used(1);
                reply.is_ok_and(|r| r.get_ref().plaintext.len() == 32)
            }
        }
    }
}

pub(crate) async fn measure(
    target: &Target,
    server_pid: u32,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<RunResult> {
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let mut target = target.clone();
        let measuring = Arc::clone(&measuring);
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (mut requests, mut errors) = (0u64, 0u64);
            let mut i = t as u64 * 7919;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let ok = target.call(i).await;
                i += 1;
                if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    histogram.saturating_record(ns.max(1));
                    requests += 1;
                    errors += u64::from(!ok);
                }
            }
            Ok::<_, anyhow::Error>((histogram, requests, errors))
        }));
    }
    tokio::time::sleep(warmup).await;
    let cpu_before = cpu_ticks(server_pid)?;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = cpu_ticks(server_pid)?;
    let mut result = RunResult {
        histogram: Histogram::new_with_bounds(1, 60_000_000_000, 3)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        deks_per_request: target.deks_per_request(),
        requests: 0,
        errors: 0,
        seconds,
        cpu: cpu_after.since(cpu_before),
    };
    for task in tasks {
        let (h, requests, errors) = task.await??;
        result
            .histogram
            .add(&h)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        result.requests += requests;
        result.errors += errors;
    }
    Ok(result)
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub(crate) fn run(args: LoadArgs) -> anyhow::Result<()> {
    set_reason(args.reason);
    anyhow::ensure!(
        args.rounds >= 1 && args.keys >= 1,
        "rounds and keys must be at least 1"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.hit_ratio),
        "hit ratio is a share, 0 to 1"
    );
    let pinned = pin_client(args.no_pin)?;
    let server_core = pinned.then_some(0);
    let keybroker_bin = keybroker_bin(args.keybroker_bin.clone())?;
    let data_dir = std::env::temp_dir().join(format!("keybroker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&data_dir)?;
    let result = (|| {
        let broker = spawn_keybroker(&keybroker_bin, &data_dir, server_core, &[])?;
        let floor = spawn_floor(server_core, &[])?;
        client_runtime(pinned)?.block_on(drive(&args, &broker, &floor, pinned))
    })();
    let _ = std::fs::remove_dir_all(&data_dir);
    result
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

async fn drive(
    args: &LoadArgs,
    broker: &ServerProcess,
    floor: &ServerProcess,
    pinned: bool,
) -> anyhow::Result<()> {
    let broker_channel = Channel::from_shared(format!("http://{}", broker.addr))?
        .connect()
        .await?;
    let floor_channel = Channel::from_shared(format!("http://{}", floor.addr))?
        .connect()
        .await?;
    let mut client = KeyBrokerClient::new(broker_channel.clone());
    let warm = Arc::new(generate_keys(client.clone(), args.keys).await?);
    unwrap_all(&mut client, &warm).await?;
    let cold_needed = if args.hit_ratio < 1.0 { 50_000 } else { 0 };
    let cold = Arc::new(generate_keys(client.clone(), cold_needed).await?);
    let broker_target = Target::Broker {
        client,
        warm: Arc::clone(&warm),
        cold,
        next_cold: Arc::default(),
        hit_ratio: args.hit_ratio,
    };
    let batch_target = (args.batch_size > 0).then(|| Target::Batch {
        client: KeyBrokerClient::new(broker_channel.clone()),
        warm: Arc::clone(&warm),
        size: args.batch_size,
    });
    let floor_target = Target::Floor(FloorClient::new(floor_channel), Arc::clone(&warm));

    println!(
        "machine: {}  pinned: {pinned}  rounds: {}  duration: {:?}  hit ratio: {}",
        crate::machine_facts(),
        args.rounds,
        args.duration,
        args.hit_ratio
    );
    let mut levels = Vec::new();
    let mut last_level = None;
    for &concurrency in &args.concurrency {
        let mut floors = Vec::new();
        let mut brokers = Vec::new();
        let mut batches = Vec::new();
        for _ in 0..args.rounds {
            floors.push(
                measure(
                    &floor_target,
                    floor.child.id(),
                    concurrency,
                    args.warmup,
                    args.duration,
                )
                .await?,
            );
            brokers.push(
                measure(
                    &broker_target,
                    broker.child.id(),
                    concurrency,
                    args.warmup,
                    args.duration,
                )
                .await?,
            );
            if let Some(batch_target) = &batch_target {
                batches.push(
                    measure(
                        batch_target,
                        broker.child.id(),
                        concurrency,
                        args.warmup,
                        args.duration,
                    )
                    .await?,
                );
            }
        }
        let med = |runs: &[RunResult], f: &dyn Fn(&RunResult) -> f64| {
            median(runs.iter().map(f).collect())
        };
        let p50 = |r: &RunResult| r.quantile_us(0.5);
        let p99 = |r: &RunResult| r.quantile_us(0.99);
        let rps = |r: &RunResult| r.rps();
        let cpu = |r: &RunResult| r.cpu_us_per_request();
        let user = |r: &RunResult| r.user_us_per_request();
        let system = |r: &RunResult| r.system_us_per_request();
        let ratio = |f: &dyn Fn(&RunResult) -> f64| med(&brokers, f) / med(&floors, f);
        let (p50_ratio, p99_ratio, rps_ratio, cpu_ratio) =
            (ratio(&p50), ratio(&p99), ratio(&rps), ratio(&cpu));
        let (user_ratio, system_ratio) = (ratio(&user), ratio(&system));
        let errors: u64 = brokers
            .iter()
            .chain(&floors)
            .chain(&batches)
            .map(|r| r.errors)
            .sum();
        let p90 = |r: &RunResult| r.quantile_us(0.9);
        let p999 = |r: &RunResult| r.quantile_us(0.999);
        for (name, runs) in [("floor", &floors), ("keybroker", &brokers)] {
            println!(
                "in flight {concurrency:>3} {name:>9}: p50 {:>7.1}us p90 {:>7.1}us p99 {:>7.1}us p999 {:>7.1}us {:>8.0} req/s {:>6.1} server-cpu-us/req (user {:.1}, kernel {:.1})",
                med(runs, &p50),
                med(runs, &p90),
                med(runs, &p99),
                med(runs, &p999),
                med(runs, &rps),
                med(runs, &cpu),
                med(runs, &user),
                med(runs, &system),
            );
        }
        println!(
            "in flight {concurrency:>3}    ratios: p50 {p50_ratio:.3} p99 {p99_ratio:.3} throughput {rps_ratio:.3} server-cpu/req {cpu_ratio:.3} (user {user_ratio:.3}, kernel {system_ratio:.3}) (errors {errors})"
        );
        let deks = |r: &RunResult| r.deks_per_s();
        let batch_ratio =
            (!batches.is_empty()).then(|| med(&batches, &deks) / med(&brokers, &deks));
        if let Some(ratio) = batch_ratio {
            println!(
                "in flight {concurrency:>3}     batch: p50 {:>7.1}us p99 {:>7.1}us per {}-key batch, {:>9.0} DEKs/s vs single {:>8.0} DEKs/s: {ratio:.2}x; server CPU per DEK {:.2}us vs {:.2}us single ({:.2}x)",
                med(&batches, &p50),
                med(&batches, &p99),
                args.batch_size,
                med(&batches, &deks),
                med(&brokers, &deks),
                med(&batches, &cpu) / args.batch_size as f64,
                med(&brokers, &cpu),
                med(&brokers, &cpu) / (med(&batches, &cpu) / args.batch_size as f64),
            );
        }
        last_level = Some((
            concurrency,
            floors.clone(),
            brokers.clone(),
            batches.clone(),
        ));
        levels.push(json!({
            "concurrency": concurrency,
            "floor": floors.iter().map(RunResult::json).collect::<Vec<_>>(),
            "keybroker": brokers.iter().map(RunResult::json).collect::<Vec<_>>(),
            "keybroker_batch": batches.iter().map(RunResult::json).collect::<Vec<_>>(),
            "batch_over_single_deks_per_s": batch_ratio,
            "median_ratios": {
                "p50": p50_ratio, "p99": p99_ratio, "rps": rps_ratio, "server_cpu_per_request": cpu_ratio,
                "server_user_cpu_per_request": user_ratio,
                "server_kernel_cpu_per_request": system_ratio,
            },
            "errors": errors,
        }));
    }
    // Every use this run made is in the tenant's key access log, exactly.
    let made = KEY_USES.load(Ordering::SeqCst);
    let counted = access_log_total(&broker_channel, made).await?;
    println!("access log: {counted} key uses counted of {made} made");
    let report = json!({
        "machine": crate::machine_facts(),
        "pinned": pinned,
        "access_log": { "uses_made": made, "uses_counted": counted },
        "rounds": args.rounds,
        "duration_s": args.duration.as_secs_f64(),
        "warmup_s": args.warmup.as_secs_f64(),
        "keys": args.keys,
        "hit_ratio": args.hit_ratio,
        "levels": levels,
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if let (Some(path), Some((concurrency, floors, brokers, batches))) = (&args.plot, last_level) {
        let merged = |runs: &[RunResult]| -> anyhow::Result<Option<Histogram<u64>>> {
            let mut iter = runs.iter();
            let Some(first) = iter.next() else {
                return Ok(None);
            };
            let mut h = first.histogram.clone();
            for r in iter {
                h.add(&r.histogram).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            Ok(Some(h))
        };
        let mut curves = Vec::new();
        for (name, runs) in [
            ("floor (1 key/request)".to_owned(), &floors),
            ("keybroker UnwrapKey (1 key/request)".to_owned(), &brokers),
            (
                format!(
                    "keybroker BatchUnwrapKey ({} keys/request)",
                    args.batch_size
                ),
                &batches,
            ),
        ] {
            if let Some(h) = merged(runs)? {
                curves.push((name, h));
            }
        }
        crate::plot::latency_percentiles(
            path,
            &format!(
                "Latency percentiles, {concurrency} requests in flight, all cached ({})",
                crate::machine_facts()["cpu_model"]
                    .as_str()
                    .unwrap_or("unknown CPU")
            ),
            &curves,
        )?;
        println!("plot: {}", path.display());
    }
    let total_errors: u64 = report["levels"].as_array().map_or(0, |l| {
        l.iter().map(|v| v["errors"].as_u64().unwrap_or(0)).sum()
    });
    anyhow::ensure!(total_errors == 0, "{total_errors} requests failed");
    anyhow::ensure!(
        counted == made,
        "the key access log counts {counted} uses, but this run made {made}"
    );
    Ok(())
}
