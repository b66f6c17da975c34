//! keybroker against its peer: OpenBao Transit is what many platform teams
//! run instead. The same closed-loop generator as `load` drives keybroker's
//! cached UnwrapKey and GenerateDataKey (one HTTP/2 connection) and
//! OpenBao's `transit/decrypt` and `transit/datakey/plaintext` (HTTP/1.1
//! connections, one per task as Vault clients pool them), both servers
//! pinned to core 0 and the client to core 1, rounds alternating; medians
//! and ratios reported. In the production shape (`--shape production`)
//! both serve mTLS from the same CA (OpenBao on a TLS listener that requires
//! a client certificate), both write an audit log to a file (keybroker's
//! fail-closed; OpenBao's `file` audit device, which blocks a request whose
//! record cannot be written), keybroker checks its policy, and the load
//! interleaves 100 tenants (one Transit key each on OpenBao).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use keybroker::proto::key_broker_client::KeyBrokerClient;
use serde_json::json;

use crate::load::{RunResult, measure, median};
use crate::provider_latency::Bao;
use crate::requests::{Target, generate_keys, unwrap_all};
use crate::shape::{Caller, Deployment, Shape};

#[derive(Debug, clap::Args)]
pub(crate) struct PeerArgs {
    /// plaintext, or production (mTLS, audit logs, keybroker's policy, 100
    /// tenants).
    #[arg(long, value_enum, default_value = "plaintext")]
    shape: Shape,
    /// Tenants [default: 1 plaintext, 100 production].
    #[arg(long)]
    tenants: Option<usize>,
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
    /// Distinct wrapped keys / Transit ciphertexts of each tenant cycled
    /// through.
    #[arg(long, default_value = "1000")]
    keys: usize,
    /// The keybroker binary [default: `keybroker` next to this binary].
    #[arg(long)]
    keybroker_bin: Option<PathBuf>,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

const POLICY: &str = r#"path "transit/decrypt/bench*" { capabilities = ["update"] }
path "transit/datakey/plaintext/bench*" { capabilities = ["update"] }
path "transit/encrypt/bench*" { capabilities = ["update"] }
"#;

pub(crate) fn run(args: PeerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rounds >= 1 && args.keys >= 1,
        "rounds and keys must be at least 1"
    );
    let pinned = crate::servers::pin_client(false)?;
    let server_core = pinned.then_some(0);
    let keybroker_bin = crate::servers::keybroker_bin(args.keybroker_bin.clone())?;
    let data_dir = std::env::temp_dir().join(format!("keybroker-peer-{}", std::process::id()));
    std::fs::create_dir_all(&data_dir)?;
    let result = (|| {
        let deployment = Deployment::new(args.shape, &data_dir, args.tenants)?;
        let broker = deployment.spawn_keybroker(&keybroker_bin, server_core, &[])?;
        let tls_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let extra = deployment.bao_config(tls_port);
        let config = data_dir.join("bao-production.hcl");
        if let Some(extra) = &extra {
            std::fs::write(&config, extra)?;
        }
        let bao = Bao::start_with(server_core, extra.is_some().then_some(config.as_path()))?;
        // Requests go to the TLS listener in production.
        let bao_url = match &extra {
            Some(_) => format!("https://127.0.0.1:{tls_port}"),
            None => bao.addr.clone(),
        };
        bao.cli(&["secrets", "enable", "transit"])?;
        for tenant in &deployment.tenants {
            bao.cli(&["write", "-f", &format!("transit/keys/{tenant}")])?;
        }
        let policy = data_dir.join("peer.hcl");
        std::fs::write(&policy, POLICY)?;
        bao.cli(&["policy", "write", "peer", &policy.display().to_string()])?;
        // An application token with a policy, as a platform service would
        // hold (not the root token, which skips policy checks).
        let token = bao.cli(&["token", "create", "-field=token", "-policy=peer"])?;
        let mut report = crate::servers::client_runtime(pinned)?.block_on(drive(
            &args,
            &deployment,
            (broker.child.id(), &broker.addr),
            (bao.child.id(), &bao_url),
            &token,
            pinned,
        ))?;
        if extra.is_some() {
            // Both audit logs were written: the records are what each
            // server paid for on every call.
            let keybroker = crate::servers::audit_records(&data_dir, "audit.log")?;
            let openbao = crate::servers::audit_records(&data_dir, "bao-audit.log")?;
            println!("audit logs: keybroker {keybroker} records, OpenBao {openbao}");
            report["audit_records"] = json!({ "keybroker": keybroker, "openbao": openbao });
        }
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&data_dir);
    result
}

async fn drive(
    args: &PeerArgs,
    deployment: &Deployment,
    (broker_pid, broker_addr): (u32, &str),
    (bao_pid, bao_url): (u32, &str),
    token: &str,
    pinned: bool,
) -> anyhow::Result<serde_json::Value> {
    let channel = deployment.channel(broker_addr, Caller::Service).await?;
    let client = KeyBrokerClient::new(channel);
    let tenants = &deployment.tenants;
    let warm = Arc::new(generate_keys(client.clone(), tenants, args.keys).await?);
    unwrap_all(&client, &warm).await?;
    let http = deployment.http_client()?;
    // Interleaved as keybroker's keys are: the i-th is tenant i % n's.
    let mut decrypts = Vec::with_capacity(args.keys * tenants.len());
    for _ in 0..args.keys {
        for tenant in tenants {
            let dek = keybroker::secret::SecretBytes::random(32)?;
            let body = json!({ "plaintext": base64::engine::general_purpose::STANDARD.encode(dek.expose()) });
            let reply: serde_json::Value = serde_json::from_slice(
                &http
                    .post(format!("{bao_url}/v1/transit/encrypt/{tenant}"))
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
            decrypts.push((
                format!("{bao_url}/v1/transit/decrypt/{tenant}"),
                json!({ "ciphertext": ciphertext }).to_string(),
            ));
        }
    }
    let datakeys = tenants
        .iter()
        .map(|t| {
            (
                format!("{bao_url}/v1/transit/datakey/plaintext/{t}"),
                "{}".to_owned(),
            )
        })
        .collect();
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
                token: Arc::clone(&token),
                requests: Arc::new(decrypts),
            },
            bao_pid,
        ),
        (
            "keybroker GenerateDataKey",
            Target::Generate(client.clone(), Arc::new(tenants.clone())),
            broker_pid,
        ),
        (
            "OpenBao transit/datakey/plaintext",
            Target::Http {
                client: http.clone(),
                token: Arc::clone(&token),
                requests: Arc::new(datakeys),
            },
            bao_pid,
        ),
    ];
    println!(
        "machine: {}  pinned: {pinned}  rounds: {}  duration: {:?}  shape: {}  tenants: {}",
        crate::machine_facts(),
        args.rounds,
        args.duration,
        deployment.shape.name(),
        tenants.len()
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
    let report = json!({
        "machine": crate::machine_facts(),
        "pinned": pinned,
        "shape": deployment.shape.name(),
        "tenants": tenants.len(),
        "levels": levels,
    });
    Ok(report)
}
