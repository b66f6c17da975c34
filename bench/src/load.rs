//! Closed-loop load: N requests in flight on one HTTP/2 connection, each
//! sent as soon as the previous one returned. keybroker (cache-hit
//! UnwrapKey) and the floor run alternately, several rounds, with a floor
//! run on both sides of every keybroker run. The report compares medians of
//! the rounds, and each keybroker run with the floor runs around it (paired
//! ratios: drift on a shared machine cancels out).
//! Each shape (`--shape`, `shape.rs`) gets its own pair of servers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use keybroker::proto::key_broker_client::KeyBrokerClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::pb::floor_client::FloorClient;
use crate::requests::{Target, generate_keys, reset_uses, set_reason, unwrap_all, uses_made};
use crate::servers::{
    CpuTicks, ServerProcess, audit_records, client_runtime, cpu_ticks, keybroker_bin, pin_client,
};
use crate::shape::{Caller, Deployment, Shape};

#[derive(Debug, clap::Args)]
pub(crate) struct LoadArgs {
    /// The shapes to measure, one after the other, each against its own
    /// floor: plaintext (one tenant, no TLS, policy or audit sink) and/or
    /// production (mTLS on both servers, keybroker with a policy and a
    /// fail-closed audit log file, 100 tenants).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "plaintext")]
    shape: Vec<Shape>,
    /// Tenants whose keys the load interleaves [default: 1 plaintext, 100
    /// production].
    #[arg(long)]
    tenants: Option<usize>,
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
    /// keybroker runs per concurrency, each between two floor runs.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Distinct wrapped keys of each tenant the load cycles through.
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

/// The uses of the `tenants`' keys their key access logs count, once they
/// count `expected` (the log is flushed every second) or 10 s passed.
async fn access_log_total(
    channel: &Channel,
    tenants: &[Arc<str>],
    expected: u64,
) -> anyhow::Result<u64> {
    let mut admin = keybroker::proto::key_admin_client::KeyAdminClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut total = 0u64;
        for tenant in tenants {
            let mut page_token = String::new();
            loop {
                let page = admin
                    .list_key_access(keybroker::proto::ListKeyAccessRequest {
                        tenant_id: tenant.to_string(),
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
        }
        if total == expected || Instant::now() > deadline {
            return Ok(total);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
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

/// Each keybroker run against the floor runs just before and after it
/// (their mean), summarised by median and quartiles. On a shared machine
/// whose speed drifts over seconds, pairs neighbours in time; the ratio of
/// medians compares runs minutes apart.
#[derive(Debug, Clone, Copy)]
struct Paired {
    median: f64,
    q1: f64,
    q3: f64,
}

impl Paired {
    /// `floors` has one run more than `brokers`: floor, keybroker, floor, ...
    fn of(floors: &[RunResult], brokers: &[RunResult], f: &dyn Fn(&RunResult) -> f64) -> Self {
        let values = |runs: &[RunResult]| runs.iter().map(f).collect::<Vec<_>>();
        Self::of_values(&values(floors), &values(brokers))
    }

    fn of_values(floors: &[f64], brokers: &[f64]) -> Self {
        let ratios: Vec<f64> = brokers
            .iter()
            .zip(floors.windows(2))
            .map(|(broker, around)| broker / ((around[0] + around[1]) / 2.0))
            .collect();
        Self {
            median: median(ratios.clone()),
            q1: quantile(ratios.clone(), 0.25),
            q3: quantile(ratios, 0.75),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({ "median": self.median, "q1": self.q1, "q3": self.q3 })
    }
}

impl std::fmt::Display for Paired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.3} (quartiles {:.3}-{:.3})",
            self.median, self.q1, self.q3
        )
    }
}

/// The `q` quantile of `values`, interpolated between neighbours.
fn quantile(mut values: Vec<f64>, q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let Some(last) = values.len().checked_sub(1) else {
        return f64::NAN;
    };
    let at = q.clamp(0.0, 1.0) * last as f64;
    let (low, high) = (at.floor() as usize, at.ceil() as usize);
    values[low] + (values[high] - values[low]) * (at - low as f64)
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
    let runtime = client_runtime(pinned)?;
    println!(
        "machine: {}  pinned: {pinned}  rounds: {}  duration: {:?}  hit ratio: {}",
        crate::machine_facts(),
        args.rounds,
        args.duration,
        args.hit_ratio
    );
    let mut shapes = Vec::new();
    let mut plotted = None;
    for &shape in &args.shape {
        let data_dir = std::env::temp_dir().join(format!(
            "keybroker-bench-{}-{}",
            std::process::id(),
            shape.name()
        ));
        std::fs::create_dir_all(&data_dir)?;
        let result = (|| {
            let deployment = Deployment::new(shape, &data_dir, args.tenants)?;
            let broker = deployment.spawn_keybroker(&keybroker_bin, server_core, &[])?;
            let floor = deployment.spawn_floor(server_core, &[])?;
            let measured = runtime.block_on(drive(&args, &deployment, &broker, &floor))?;
            let audit_records = audit_records(&data_dir, "audit.log")?;
            Ok::<_, anyhow::Error>((measured, audit_records))
        })();
        let _ = std::fs::remove_dir_all(&data_dir);
        let ((mut report, last_level), audit_records) = result?;
        if shape == Shape::Production {
            println!("audit log: {audit_records} records written");
            report["audit_records"] = audit_records.into();
        }
        shapes.push(report);
        plotted = last_level.or(plotted);
    }
    let report = json!({
        "machine": crate::machine_facts(),
        "pinned": pinned,
        "rounds": args.rounds,
        "duration_s": args.duration.as_secs_f64(),
        "warmup_s": args.warmup.as_secs_f64(),
        "keys_per_tenant": args.keys,
        "hit_ratio": args.hit_ratio,
        "shapes": shapes,
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if let (Some(path), Some(level)) = (&args.plot, plotted) {
        plot(path, args.batch_size, &level)?;
    }
    for shape in &shapes {
        let errors: u64 = shape["levels"].as_array().map_or(0, |l| {
            l.iter().map(|v| v["errors"].as_u64().unwrap_or(0)).sum()
        });
        let name = &shape["shape"];
        anyhow::ensure!(errors == 0, "{name}: {errors} requests failed");
        let (made, counted) = (
            &shape["access_log"]["uses_made"],
            &shape["access_log"]["uses_counted"],
        );
        anyhow::ensure!(
            counted == made,
            "{name}: the key access log counts {counted} uses, but this run made {made}"
        );
    }
    Ok(())
}

/// The runs of the highest concurrency, for the plot.
type Level = (usize, Vec<RunResult>, Vec<RunResult>, Vec<RunResult>);

/// One shape's runs: its report and its highest concurrency's runs.
async fn drive(
    args: &LoadArgs,
    deployment: &Deployment,
    broker: &ServerProcess,
    floor: &ServerProcess,
) -> anyhow::Result<(serde_json::Value, Option<Level>)> {
    reset_uses();
    let broker_channel = deployment.channel(&broker.addr, Caller::Service).await?;
    let floor_channel = deployment.channel(&floor.addr, Caller::Service).await?;
    let client = KeyBrokerClient::new(broker_channel.clone());
    let tenants = &deployment.tenants;
    let warm = Arc::new(generate_keys(client.clone(), tenants, args.keys).await?);
    unwrap_all(&client, &warm).await?;
    let cold_needed = if args.hit_ratio < 1.0 {
        50_000_usize.div_ceil(tenants.len())
    } else {
        0
    };
    let cold = Arc::new(generate_keys(client.clone(), tenants, cold_needed).await?);
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

    let shape = deployment.shape.name();
    println!(
        "shape: {shape}  tenants: {}  keys: {}",
        tenants.len(),
        warm.len()
    );
    let mut levels = Vec::new();
    let mut last_level = None;
    for &concurrency in &args.concurrency {
        let mut floors = Vec::new();
        let mut brokers = Vec::new();
        let mut batches = Vec::new();
        let run = |target, pid| measure(target, pid, concurrency, args.warmup, args.duration);
        let (floor_pid, broker_pid) = (floor.child.id(), broker.child.id());
        // floor, then per round keybroker, batch and floor again: every
        // keybroker run has a floor run on each side (drift between them
        // cancels out in the paired ratios below).
        floors.push(run(&floor_target, floor_pid).await?);
        for _ in 0..args.rounds {
            brokers.push(run(&broker_target, broker_pid).await?);
            if let Some(batch_target) = &batch_target {
                batches.push(run(batch_target, broker_pid).await?);
            }
            floors.push(run(&floor_target, floor_pid).await?);
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
        let paired_rps = Paired::of(&floors, &brokers, &rps);
        let paired_cpu = Paired::of(&floors, &brokers, &cpu);
        println!(
            "in flight {concurrency:>3}    paired: throughput {paired_rps} server-cpu/req {paired_cpu} ({} pairs)",
            brokers.len()
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
            "paired_ratios": {
                "rps": paired_rps.json(),
                "server_cpu_per_request": paired_cpu.json(),
                "server_user_cpu_per_request": Paired::of(&floors, &brokers, &user).json(),
                "server_kernel_cpu_per_request": Paired::of(&floors, &brokers, &system).json(),
            },
            "errors": errors,
        }));
    }
    // Every use this run made is in the tenants' key access logs, exactly.
    let made = uses_made();
    let operator = deployment.channel(&broker.addr, Caller::Operator).await?;
    let counted = access_log_total(&operator, tenants, made).await?;
    println!("access log: {counted} key uses counted of {made} made");
    let report = json!({
        "shape": shape,
        "tenants": tenants.len(),
        "keys": warm.len(),
        "access_log": { "uses_made": made, "uses_counted": counted },
        "levels": levels,
    });
    Ok((report, last_level))
}

/// Latency percentiles of the floor, single and batch calls of `level`.
fn plot(path: &Path, batch_size: usize, level: &Level) -> anyhow::Result<()> {
    let (concurrency, floors, brokers, batches) = level;
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
        ("floor (1 key/request)".to_owned(), floors),
        ("keybroker UnwrapKey (1 key/request)".to_owned(), brokers),
        (
            format!("keybroker BatchUnwrapKey ({batch_size} keys/request)"),
            batches,
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Paired, quantile};

    #[test]
    fn quantiles_interpolate_between_neighbours() {
        let v = vec![4.0, 1.0, 3.0, 2.0];
        assert!((quantile(v.clone(), 0.0) - 1.0).abs() < 1e-12);
        assert!((quantile(v.clone(), 0.5) - 2.5).abs() < 1e-12);
        assert!((quantile(v.clone(), 0.25) - 1.75).abs() < 1e-12);
        assert!((quantile(v, 1.0) - 4.0).abs() < 1e-12);
        assert!(quantile(Vec::new(), 0.5).is_nan());
    }

    #[test]
    fn each_run_is_paired_with_the_floor_runs_around_it() {
        // The machine slows down steadily: the floor goes 100, 80, 60, 40,
        // the broker runs between them at 0.9 of the floor's speed then.
        let floors = [100.0, 80.0, 60.0, 40.0];
        let brokers = [81.0, 63.0, 45.0];
        let paired = Paired::of_values(&floors, &brokers);
        assert!((paired.median - 0.9).abs() < 1e-12, "{paired:?}");
        assert!((paired.q1 - 0.9).abs() < 1e-12 && (paired.q3 - 0.9).abs() < 1e-12);
        // A step: the run across it is compared with the mean of its sides.
        let paired = Paired::of_values(&[100.0, 100.0, 50.0, 50.0], &[90.0, 67.5, 45.0]);
        assert!((paired.median - 0.9).abs() < 1e-12, "{paired:?}");
        assert!((paired.q1 - 0.9).abs() < 1e-12 && (paired.q3 - 0.9).abs() < 1e-12);
    }
}
