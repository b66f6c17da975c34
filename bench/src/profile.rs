//! Instructions per request, counted by callgrind: the floor and keybroker
//! (cache-hit UnwrapKey) each run under `valgrind --tool=callgrind`, are
//! warmed up, have their counters zeroed, serve exactly `--requests`
//! requests at `--concurrency` in flight, and are dumped. Instruction counts
//! do not depend on what else the machine is doing, so this figure is
//! stable where wall-clock ratios are not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use keybroker::proto::key_broker_client::KeyBrokerClient;
use serde_json::json;

use crate::pb::floor_client::FloorClient;
use crate::requests::{Target, generate_keys, unwrap_all};
use crate::servers::ServerProcess;
use crate::shape::{Caller, Deployment, Shape};

#[derive(Debug, clap::Args)]
pub(crate) struct ProfileArgs {
    /// plaintext, or production (mTLS on both servers, keybroker with a
    /// policy and a fail-closed audit log file, 100 tenants).
    #[arg(long, value_enum, default_value = "plaintext")]
    shape: Shape,
    /// Tenants whose keys the requests interleave [default: 1 plaintext,
    /// 100 production].
    #[arg(long)]
    tenants: Option<usize>,
    /// Every request gives this access reason (customer_initiated, ...).
    #[arg(long, value_parser = keybroker::access::Reason::parse)]
    reason: Option<keybroker::access::Reason>,
    /// The keybroker binary [default: `keybroker` next to this binary].
    #[arg(long)]
    keybroker_bin: Option<PathBuf>,
    /// Requests counted per server.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Distinct wrapped keys of each tenant the requests cycle through.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Keep the callgrind files here (for callgrind_annotate).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Profile BatchUnwrapKey of this many keys per request instead of
    /// single UnwrapKey (figures are then per key; the floor stays single).
    #[arg(long, default_value_t = 0)]
    batch_size: usize,
    /// Also simulate the caches (callgrind --cache-sim=yes): misses per
    /// request, where instructions alone do not explain the time.
    #[arg(long)]
    cache_sim: bool,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub(crate) fn run(args: ProfileArgs) -> anyhow::Result<()> {
    crate::requests::set_reason(args.reason);
    anyhow::ensure!(args.requests > 0 && args.concurrency > 0 && args.keys > 0);
    anyhow::ensure!(
        Command::new("callgrind_control")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "callgrind_control not found: install valgrind (apt-get install valgrind)"
    );
    let keybroker_bin = match args.keybroker_bin.clone() {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("no parent directory")?
            .join("keybroker"),
    };
    let work = std::env::temp_dir().join(format!("keybroker-profile-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let out_dir = args.out_dir.clone().unwrap_or_else(|| work.clone());
    std::fs::create_dir_all(&out_dir)?;
    let wrapper = |name: &str| {
        let mut argv = vec![
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            format!(
                "--callgrind-out-file={}/{name}.callgrind",
                out_dir.display()
            ),
        ];
        if args.cache_sim {
            argv.push("--cache-sim=yes".to_owned());
        }
        argv
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async {
        let deployment = Deployment::new(args.shape, &work, args.tenants)?;
        let broker = deployment.spawn_keybroker(&keybroker_bin, None, &wrapper("keybroker"))?;
        let channel = deployment.channel(&broker.addr, Caller::Service).await?;
        let client = KeyBrokerClient::new(channel);
        let keys = Arc::new(generate_keys(client.clone(), &deployment.tenants, args.keys).await?);
        unwrap_all(&client, &keys).await?;
        let broker_target = if args.batch_size > 0 {
            Target::Batch {
                client,
                warm: Arc::clone(&keys),
                size: args.batch_size,
            }
        } else {
            Target::Broker {
                client,
                warm: Arc::clone(&keys),
                cold: Arc::default(),
                next_cold: Arc::default(),
                hit_ratio: 1.0,
            }
        };
        let broker_ir =
            count(&broker, &broker_target, &args).await? / args.batch_size.max(1) as u64;
        drop(broker);

        let floor = deployment.spawn_floor(None, &wrapper("floor"))?;
        let channel = deployment.channel(&floor.addr, Caller::Service).await?;
        let floor_target = Target::Floor(FloorClient::new(channel), Arc::clone(&keys));
        let floor_ir = count(&floor, &floor_target, &args).await?;
        Ok::<_, anyhow::Error>((floor_ir, broker_ir))
    });
    let _ = std::fs::remove_dir_all(&work);
    let (floor_ir, broker_ir) = result?;
    let per = |ir: u64| ir as f64 / args.requests as f64;
    println!(
        "callgrind, {} shape, {} requests at {} in flight{}: floor {:.0} instructions/request, keybroker {:.0} (ratio {:.3})",
        args.shape.name(),
        args.requests,
        args.concurrency,
        if args.batch_size > 0 {
            format!(" (keybroker: per key of {}-key batches)", args.batch_size)
        } else {
            String::new()
        },
        per(floor_ir),
        per(broker_ir),
        per(broker_ir) / per(floor_ir)
    );
    if let Some(path) = &args.json {
        let report = json!({
            "machine": crate::machine_facts(),
            "shape": args.shape.name(),
            "requests": args.requests,
            "concurrency": args.concurrency,
            "batch_size": args.batch_size,
            "floor_instructions_per_request": per(floor_ir),
            "keybroker_instructions_per_request": per(broker_ir),
            "ratio": per(broker_ir) / per(floor_ir),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// Zeroes the server's counters, sends exactly `requests` requests, dumps,
/// and returns the instructions the server executed meanwhile.
async fn count(server: &ServerProcess, target: &Target, args: &ProfileArgs) -> anyhow::Result<u64> {
    let pid = server.child.id().to_string();
    // A few requests first: connection setup and first-use paths are not
    // what a request costs in steady state.
    run_requests(
        target,
        args.concurrency,
        (args.requests / 10).clamp(50, 2_000),
    )
    .await?;
    callgrind_control(&["-z", &pid])?;
    run_requests(target, args.concurrency, args.requests).await?;
    callgrind_control(&["-d", &pid])?;
    let out_dir = args.out_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("keybroker-profile-{}", std::process::id()))
    });
    newest_total(&out_dir)
}

async fn run_requests(target: &Target, concurrency: usize, requests: u64) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut target = target.clone();
        let (next, failed) = (Arc::clone(&next), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return;
                }
                if !target.call(i).await {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let failed = failed.load(Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} requests failed");
    Ok(())
}

fn callgrind_control(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("callgrind_control").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "callgrind_control {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The `totals:` of the newest dump in `dir` (callgrind names the dumps
/// `callgrind_control -d` asks for `<file>.<n>`).
fn newest_total(dir: &Path) -> anyhow::Result<u64> {
    let newest = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".callgrind"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .context("no callgrind dump written")?;
    let text = std::fs::read_to_string(newest.path())?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no totals in {}", newest.path().display()))
}
