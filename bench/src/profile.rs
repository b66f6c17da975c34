//! Instructions per request, counted by callgrind: the floor and keybroker
//! (cache-hit UnwrapKey) each run under `valgrind --tool=callgrind`, are
//! warmed up, have their counters zeroed, serve exactly `--requests`
//! requests at `--concurrency` in flight, and are dumped. Instruction counts
//! do not depend on what else the machine is doing, so this figure is
//! stable where wall-clock ratios are not.

use std::collections::BTreeMap;
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
        let broker_counts = count(&broker, &broker_target, &args, &out_dir).await?;
        drop(broker);

        let floor = deployment.spawn_floor(None, &wrapper("floor"))?;
        let channel = deployment.channel(&floor.addr, Caller::Service).await?;
        let floor_target = Target::Floor(FloorClient::new(channel), Arc::clone(&keys));
        let floor_counts = count(&floor, &floor_target, &args, &out_dir).await?;
        Ok::<_, anyhow::Error>((floor_counts, broker_counts))
    });
    let _ = std::fs::remove_dir_all(&work);
    let (floor, broker) = result?;
    // Per request; per key of a batch for keybroker.
    let floor = floor.per(args.requests);
    let broker = broker.per(args.requests * args.batch_size.max(1) as u64);
    let (floor_ir, broker_ir) = (floor.get("Ir"), broker.get("Ir"));
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
        floor_ir,
        broker_ir,
        broker_ir / floor_ir
    );
    if args.cache_sim {
        // callgrind's model: first-level caches and the last level, no L2.
        println!("  per request (callgrind --cache-sim):");
        for (event, what) in CACHE_EVENTS {
            println!(
                "  {what:<26} floor {:>8.1}  keybroker {:>8.1}  (ratio {:.3})",
                floor.get(event),
                broker.get(event),
                broker.get(event) / floor.get(event)
            );
        }
    }
    if let Some(path) = &args.json {
        let report = json!({
            "machine": crate::machine_facts(),
            "shape": args.shape.name(),
            "requests": args.requests,
            "concurrency": args.concurrency,
            "batch_size": args.batch_size,
            "floor_instructions_per_request": floor_ir,
            "keybroker_instructions_per_request": broker_ir,
            "ratio": broker_ir / floor_ir,
            // Every event callgrind counted (with --cache-sim, the misses).
            "floor_per_request": floor.0,
            "keybroker_per_request": broker.0,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// The misses `--cache-sim` adds that are printed: the first level's.
/// callgrind's last level is the whole L3 (hundreds of MiB here), which a
/// steady request all but never misses, so a ratio of its near-zero counts
/// would be noise; the JSON keeps them with every other event.
const CACHE_EVENTS: [(&str, &str); 3] = [
    ("I1mr", "L1 instruction misses"),
    ("D1mr", "L1 data read misses"),
    ("D1mw", "L1 data write misses"),
];

/// What callgrind counted over one dump, by event name (`Ir`, and with
/// `--cache-sim` the misses: `I1mr`, `D1mr`, `D1mw`, ...).
#[derive(Debug)]
struct Counts(BTreeMap<String, f64>);

impl Counts {
    /// From a dump: its `events:` line names the columns of its
    /// `summary:` (or `totals:`) line; callgrind leaves out trailing zeros.
    fn parse(dump: &str) -> anyhow::Result<Self> {
        let line = |prefixes: &[&str]| {
            dump.lines()
                .find_map(|l| prefixes.iter().find_map(|p| l.strip_prefix(p)))
        };
        let events = line(&["events:"]).context("no events line")?;
        let totals = line(&["summary:", "totals:"]).context("no totals line")?;
        let mut values = totals.split_whitespace();
        let counts = events
            .split_whitespace()
            .map(|event| {
                let value = match values.next() {
                    Some(v) => v
                        .parse::<u64>()
                        .with_context(|| format!("{event} = {v:?}"))?,
                    None => 0,
                };
                Ok((event.to_owned(), value as f64))
            })
            .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
        anyhow::ensure!(counts.contains_key("Ir"), "no instruction count (Ir)");
        Ok(Self(counts))
    }

    fn get(&self, event: &str) -> f64 {
        self.0.get(event).copied().unwrap_or(0.0)
    }

    /// Each count divided by `n`.
    fn per(self, n: u64) -> Self {
        Self(self.0.into_iter().map(|(k, v)| (k, v / n as f64)).collect())
    }
}

/// Zeroes the server's counters, sends exactly `requests` requests, dumps
/// into `out_dir`, and returns what the server counted meanwhile.
async fn count(
    server: &ServerProcess,
    target: &Target,
    args: &ProfileArgs,
    out_dir: &Path,
) -> anyhow::Result<Counts> {
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
    newest_counts(out_dir)
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

/// The counts of the newest dump in `dir` (callgrind names the dumps
/// `callgrind_control -d` asks for `<file>.<n>`).
fn newest_counts(dir: &Path) -> anyhow::Result<Counts> {
    let newest = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".callgrind"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .context("no callgrind dump written")?;
    let text = std::fs::read_to_string(newest.path())?;
    Counts::parse(&text).with_context(|| format!("reading {}", newest.path().display()))
}

#[cfg(test)]
mod tests {
    use super::Counts;

    #[test]
    fn counts_are_read_by_event_name_with_trailing_zeros_left_out() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\npositions: line\n\
                    events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw\n\
                    summary: 1000 300 200 40 12 6\n\nfn=main\n1 5\ntotals: 9 9 9\n";
        let counts = Counts::parse(dump).expect("parsed");
        assert_eq!(counts.get("Ir"), 1000.0);
        assert_eq!(counts.get("I1mr"), 40.0);
        assert_eq!(counts.get("D1mw"), 6.0);
        assert_eq!(counts.get("DLmw"), 0.0);
        let per = counts.per(4);
        assert_eq!((per.get("Ir"), per.get("D1mr")), (250.0, 3.0));
    }

    #[test]
    fn a_dump_without_cache_simulation_has_instructions_only() {
        let counts = Counts::parse("events: Ir\ntotals: 42\n").expect("parsed");
        assert_eq!(counts.get("Ir"), 42.0);
        assert_eq!(counts.get("D1mr"), 0.0);
    }

    #[test]
    fn a_damaged_dump_is_an_error_not_a_zero() {
        assert!(Counts::parse("totals: 42\n").is_err());
        assert!(Counts::parse("events: Ir\n").is_err());
        assert!(Counts::parse("events: Ir\nsummary: many\n").is_err());
        assert!(Counts::parse("events: Dr Dw\nsummary: 5 6\n").is_err());
    }
}
