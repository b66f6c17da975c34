//! keybroker against its peer: OpenBao Transit is what many platform teams
//! run instead. The same closed-loop generator as `load` drives keybroker's
//! cached UnwrapKey and GenerateDataKey (one HTTP/2 connection) and
//! OpenBao's `transit/decrypt` and `transit/datakey/plaintext` (HTTP/1.1
//! connections, one per task as Vault clients pool them), both servers
//! pinned to core 0 and the client to core 1, rounds alternating; medians
//! and ratios reported.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use keybroker::proto::key_broker_client::KeyBrokerClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::load::{RunResult, Target, generate_keys, measure, median, spawn_keybroker, unwrap_all};
use crate::provider_latency::Bao;

#[derive(Debug, clap::Args)]
pub(crate) struct PeerArgs {
    /// Requests in flight.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Measured seconds per run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    duration: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Rounds per concurrency (runs alternate within a round).
    #[arg(long, default_value = "3")]
    rounds: usize,
    /// Distinct wrapped keys / Transit ciphertexts cycled through.
    #[arg(long, default_value = "1000")]
    keys: usize,
    /// The keybroker binary [default: `keybroker` next to this binary].
    #[arg(long)]
    keybroker_bin: Option<PathBuf>,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

const POLICY: &str = r#"path "transit/decrypt/bench" { capabilities = ["update"] }
path "transit/datakey/plaintext/bench" { capabilities = ["update"] }
path "transit/encrypt/bench" { capabilities = ["update"] }
"#;

pub(crate) fn run(args: PeerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rounds >= 1 && args.keys >= 1,
        "rounds and keys must be at least 1"
    );
    let pinned = crate::load::pin_client(false)?;
    let server_core = pinned.then_some(0);
    let keybroker_bin = crate::load::keybroker_bin(args.keybroker_bin.clone())?;
    let data_dir = std::env::temp_dir().join(format!("keybroker-peer-{}", std::process::id()));
    std::fs::create_dir_all(&data_dir)?;
    let result = (|| {
        let broker = spawn_keybroker(&keybroker_bin, &data_dir, server_core, &[])?;
        let bao = Bao::start(server_core)?;
        bao.cli(&["secrets", "enable", "transit"])?;
        bao.cli(&["write", "-f", "transit/keys/bench"])?;
        let policy = data_dir.join("peer.hcl");
        std::fs::write(&policy, POLICY)?;
        bao.cli(&["policy", "write", "peer", &policy.display().to_string()])?;
        // An application token with a policy, as a platform service would
        // hold (not the root token, which skips policy checks).
        let token = bao.cli(&["token", "create", "-field=token", "-policy=peer"])?;
        crate::load::client_runtime(pinned)?.block_on(drive(
            &args,
            broker.child.id(),
            &broker.addr,
            &bao,
            &token,
            pinned,
        ))
    })();
    let _ = std::fs::remove_dir_all(&data_dir);
    result
}

async fn drive(
    args: &PeerArgs,
    broker_pid: u32,
    broker_addr: &str,
    bao: &Bao,
    token: &str,
    pinned: bool,
) -> anyhow::Result<()> {
    let channel = Channel::from_shared(format!("http://{broker_addr}"))?
        .connect()
        .await?;
    let mut client = KeyBrokerClient::new(channel);
    let warm = Arc::new(generate_keys(client.clone(), args.keys).await?);
    unwrap_all(&mut client, &warm).await?;
    let http = reqwest::Client::builder().build()?;
    let mut ciphertexts = Vec::with_capacity(args.keys);
    for _ in 0..args.keys {
        let dek = keybroker::secret::SecretBytes::random(32)?;
        let body =
            json!({ "plaintext": base64::engine::general_purpose::STANDARD.encode(dek.expose()) });
        let reply: serde_json::Value = serde_json::from_slice(
            &http
                .post(format!("{}/v1/transit/encrypt/bench", bao.addr))
                .header("X-Vault-Token", token)
                .body(body.to_string())
                .send()
                .await?
                .bytes()
                .await?,
        )?;
        let ciphertext = reply["data"]["ciphertext"]
            .as_str()
            .context("Transit encrypt returned no ciphertext")?;
        ciphertexts.push(json!({ "ciphertext": ciphertext }).to_string());
    }
    let token: Arc<str> = token.into();
    let targets = [
        (
            "keybroker UnwrapKey (cached)",
            Target::Broker {
                client: client.clone(),
                warm: Arc::clone(&warm),
                cold: Arc::default(),
                next_cold: Arc::default(),
                hit_ratio: 1.0,
            },
            broker_pid,
        ),
        (
            "OpenBao transit/decrypt",
            Target::Http {
                client: http.clone(),
                url: format!("{}/v1/transit/decrypt/bench", bao.addr).into(),
                token: Arc::clone(&token),
                bodies: Arc::new(ciphertexts),
            },
            bao.child.id(),
        ),
        (
            "keybroker GenerateDataKey",
            Target::Generate(client.clone()),
            broker_pid,
        ),
        (
            "OpenBao transit/datakey/plaintext",
            Target::Http {
                client: http.clone(),
                url: format!("{}/v1/transit/datakey/plaintext/bench", bao.addr).into(),
                token: Arc::clone(&token),
                bodies: Arc::new(vec!["{}".to_owned()]),
            },
            bao.child.id(),
        ),
    ];
    println!(
        "machine: {}  pinned: {pinned}  rounds: {}  duration: {:?}",
        crate::machine_facts(),
        args.rounds,
        args.duration
    );
    let mut levels = Vec::new();
    for &concurrency in &args.concurrency {
        let mut runs: Vec<Vec<RunResult>> = vec![Vec::new(); targets.len()];
        for _ in 0..args.rounds {
            for (i, (_, target, pid)) in targets.iter().enumerate() {
                runs[i].push(measure(target, *pid, concurrency, args.warmup, args.duration).await?);
            }
        }
        let summary: Vec<serde_json::Value> = targets
            .iter()
            .zip(&runs)
            .map(|((name, _, _), r)| {
                let m = |f: fn(&RunResult) -> f64| median(r.iter().map(f).collect());
                json!({
                    "name": name,
                    "rps": m(RunResult::rps),
                    "p50_us": m(|x| x.quantile_us(0.5)),
                    "p99_us": m(|x| x.quantile_us(0.99)),
                    "server_cpu_us_per_request": m(RunResult::cpu_us_per_request),
                    "errors": r.iter().map(|x| x.json()["errors"].as_u64().unwrap_or(0)).sum::<u64>(),
                    "rounds": r.iter().map(RunResult::json).collect::<Vec<_>>(),
                })
            })
            .collect();
        for s in &summary {
            println!(
                "in flight {concurrency:>3} {:<36} {:>9.0} req/s  p50 {:>8.1}us  p99 {:>8.1}us  {:>6.1} server-cpu-us/req  errors {}",
                s["name"].as_str().unwrap_or_default(),
                s["rps"].as_f64().unwrap_or(0.0),
                s["p50_us"].as_f64().unwrap_or(0.0),
                s["p99_us"].as_f64().unwrap_or(0.0),
                s["server_cpu_us_per_request"].as_f64().unwrap_or(0.0),
                s["errors"],
            );
        }
        let ratio = |a: usize, b: usize, key: &str| {
            summary[a][key].as_f64().unwrap_or(0.0)
                / summary[b][key].as_f64().unwrap_or(1.0).max(1e-9)
        };
        let ratios = json!({
            "unwrap_throughput": ratio(0, 1, "rps"),
            "unwrap_p50": ratio(0, 1, "p50_us"),
            "unwrap_p99": ratio(0, 1, "p99_us"),
            "unwrap_cpu_per_request": ratio(0, 1, "server_cpu_us_per_request"),
            "generate_throughput": ratio(2, 3, "rps"),
            "generate_p50": ratio(2, 3, "p50_us"),
            "generate_p99": ratio(2, 3, "p99_us"),
            "generate_cpu_per_request": ratio(2, 3, "server_cpu_us_per_request"),
        });
        println!("in flight {concurrency:>3} keybroker / OpenBao: {ratios}");
        levels.push(json!({ "concurrency": concurrency, "runs": summary, "ratios": ratios }));
    }
    let report = json!({ "machine": crate::machine_facts(), "pinned": pinned, "levels": levels });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}
