//! Cold start against AWS KMS (moto): `tenants` tenants, each with its own
//! customer key, hold `keys` wrapped DEKs each. A fresh keybroker process
//! (empty caches) unwraps all of them, once through single UnwrapKey RPCs
//! (64 in flight) and once through BatchUnwrapKey (one batch per tenant,
//! 4 in flight), for both key hierarchies. Reported: wall time of each and
//! the exact customer-KMS Decrypt and STS AssumeRole calls, which are
//! checked (a wrong count fails the command): one Decrypt per distinct cold
//! key for `direct`, one per tenant key version for `tenant_key`, one
//! AssumeRole per tenant.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context as _;
use keybroker::config::Config;
use keybroker::proto::key_admin_client::KeyAdminClient;
use keybroker::proto::key_broker_client::KeyBrokerClient;
use keybroker::proto::{self, KeyHierarchy, KeyPolicy};
use keybroker::server::Server;
use serde_json::json;
use tonic::transport::Channel;

#[derive(Debug, clap::Args)]
pub(crate) struct ColdStartArgs {
    /// A running moto server [default: one started from .tools/venv].
    #[arg(long)]
    moto_url: Option<String>,
    #[arg(long, default_value_t = 100)]
    tenants: usize,
    /// Wrapped DEKs per tenant (at most 256: one batch per tenant).
    #[arg(long, default_value_t = 100)]
    keys: usize,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/customer-keybroker-access";
/// Customer roles numbered per tenant (`identities`).
pub(crate) const ROLE_ARN_PREFIX: &str = "arn:aws:iam::123456789012:role/customer-keybroker-";
const REGION: &str = "us-east-1";

/// moto from the repository's `.tools/venv`, stopped on drop.
pub(crate) struct Moto {
    child: Child,
    pub(crate) url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn start_moto() -> anyhow::Result<Moto> {
    use std::io::BufRead as _;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".tools/venv/bin/python");
    anyhow::ensure!(
        python.exists(),
        "moto is not installed: run scripts/test.sh once (it installs moto[server] into .tools/venv), or pass --moto-url"
    );
    let mut child = Command::new(python)
        .arg(root.join("tests/support/moto_server.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let port: u16 = line
        .trim()
        .parse()
        .context("moto did not report its port")?;
    Ok(Moto {
        child,
        url: format!("http://127.0.0.1:{port}"),
    })
}

pub(crate) fn sdk_config() -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(
                aws_credential_types::Credentials::new("AKIABENCH", "bench", None, None, "bench"),
            ),
        )
        .build()
}

/// keybroker in this process on 127.0.0.1:0, stopped on drop.
struct Running {
    server_broker: Arc<keybroker::broker::Broker>,
    assume_role_calls: Arc<std::sync::atomic::AtomicU64>,
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start(data_dir: &std::path::Path, moto: &str) -> anyhow::Result<Self> {
        let mut config = Config::default();
        config.server.data_dir = data_dir.to_owned();
        config.server.listen = "127.0.0.1:0".parse()?;
        config.aws.kms_endpoint = Some(moto.to_owned());
        config.aws.sts_endpoint = Some(moto.to_owned());
        config.cache.max_entries = 1_000_000;
        // moto is one Python process: 4 batches of 100 cold keys open 400
        // connections and queue 400 Decrypts behind each other for seconds,
        // past the default connect and attempt timeouts, where AWS KMS
        // answers each in milliseconds. The bench measures calls and time,
        // not moto's queue: generous limits.
        config.aws.connect_timeout = std::time::Duration::from_secs(30);
        config.aws.attempt_timeout = std::time::Duration::from_secs(30);
        config.aws.operation_timeout = std::time::Duration::from_secs(60);
        let server = Server::build_with(config, Some(sdk_config())).await?;
        let server_broker = Arc::clone(server.broker());
        let assume_role_calls = Arc::clone(
            &server
                .admin()
                .context("no control plane")?
                .directory()
                .aws()
                .assume_role_calls,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = format!("http://{}", listener.local_addr()?);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(listener, async {
            let _ = rx.await;
        }));
        Ok(Self {
            server_broker,
            assume_role_calls,
            addr,
            stop: Some(tx),
            task,
        })
    }

    fn decrypts(&self) -> u64 {
        self.server_broker
            .provider_calls()
            .decrypt
            .load(Ordering::SeqCst)
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.addr.clone())?.connect().await?)
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }
}

fn context() -> std::collections::BTreeMap<String, String> {
    [("table".to_owned(), "cold".to_owned())].into()
}

fn tenant(i: usize) -> String {
    format!("cold-{i:03}")
}

pub(crate) fn run(args: ColdStartArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.tenants >= 1 && (1..=256).contains(&args.keys),
        "tenants >= 1 and keys 1..=256"
    );
    let started_moto = match &args.moto_url {
        Some(_) => None,
        None => Some(start_moto()?),
    };
    let moto = args
        .moto_url
        .clone()
        .or_else(|| started_moto.as_ref().map(|m| m.url.clone()))
        .context("no moto")?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    for hierarchy in [KeyHierarchy::Direct, KeyHierarchy::TenantKey] {
        rows.push(runtime.block_on(measure(&args, &moto, hierarchy))?);
    }
    println!(
        "cold start: {} tenants x {} DEKs, fresh process each run, AWS KMS = moto",
        args.tenants, args.keys
    );
    for row in &rows {
        println!(
            "{:>10}: single {:>7.2}s  batch {:>7.2}s  (batch/single time {:.3})  KMS Decrypt single {} batch {}  STS AssumeRole single {} batch {}",
            row["hierarchy"].as_str().unwrap_or_default(),
            row["single_s"].as_f64().unwrap_or_default(),
            row["batch_s"].as_f64().unwrap_or_default(),
            row["batch_over_single_time"].as_f64().unwrap_or_default(),
            row["single_decrypts"],
            row["batch_decrypts"],
            row["single_assume_role"],
            row["batch_assume_role"],
        );
    }
    if let Some(path) = &args.json {
        let report = json!({
            "machine": crate::machine_facts(),
            "tenants": args.tenants,
            "keys_per_tenant": args.keys,
            "results": rows,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    drop(started_moto);
    Ok(())
}

async fn measure(
    args: &ColdStartArgs,
    moto: &str,
    hierarchy: KeyHierarchy,
) -> anyhow::Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!(
        "keybroker-cold-{}-{}",
        std::process::id(),
        hierarchy.as_str_name()
    ));
    std::fs::create_dir_all(&dir)?;
    let wrapped = prepare(args, moto, &dir, hierarchy).await?;

    // Single RPCs, 64 in flight, from an empty cache.
    let server = Running::start(&dir, moto).await?;
    let broker = KeyBrokerClient::new(server.channel().await?);
    let started = Instant::now();
    let items: Vec<(String, Vec<u8>)> = wrapped
        .iter()
        .enumerate()
        .flat_map(|(t, keys)| keys.iter().map(move |k| (tenant(t), k.clone())))
        .collect();
    let items = Arc::new(items);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (items, next, mut broker) = (Arc::clone(&items), Arc::clone(&next), broker.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((tenant_id, key)) = items.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                broker
                    .unwrap_key(proto::UnwrapKeyRequest {
                        tenant_id: tenant_id.clone(),
                        wrapped_key: key.clone().into(),
                        context: context(),
                        justification: None,
                    })
                    .await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let single = started.elapsed();
    let (single_decrypts, single_sts) = (
        server.decrypts(),
        server.assume_role_calls.load(Ordering::SeqCst),
    );
    server.stop().await?;

    // Batches (one per tenant), 4 in flight, from an empty cache.
    let server = Running::start(&dir, moto).await?;
    let broker = KeyBrokerClient::new(server.channel().await?);
    let started = Instant::now();
    let wrapped = Arc::new(wrapped);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (wrapped, next, mut broker) = (Arc::clone(&wrapped), Arc::clone(&next), broker.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let t = next.fetch_add(1, Ordering::Relaxed);
                let Some(keys) = wrapped.get(t) else {
                    return Ok::<_, anyhow::Error>(());
                };
                let response = broker
                    .batch_unwrap_key(proto::BatchUnwrapKeyRequest {
                        items: keys
                            .iter()
                            .map(|k| proto::UnwrapKeyRequest {
                                tenant_id: tenant(t),
                                wrapped_key: k.clone().into(),
                                context: context(),
                                justification: None,
                            })
                            .collect(),
                    })
                    .await?
                    .into_inner();
                let failures: Vec<_> = response
                    .results
                    .iter()
                    .filter_map(|r| r.status.as_ref().filter(|s| s.code != 0))
                    .collect();
                anyhow::ensure!(
                    failures.is_empty(),
                    "{} items of a batch failed, the first: code {}, {}",
                    failures.len(),
                    failures[0].code,
                    failures[0].message
                );
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let batch = started.elapsed();
    let (batch_decrypts, batch_sts) = (
        server.decrypts(),
        server.assume_role_calls.load(Ordering::SeqCst),
    );
    server.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);

    let deks = (args.tenants * args.keys) as u64;
    let expected = match hierarchy {
        KeyHierarchy::TenantKey => args.tenants as u64,
        _ => deks,
    };
    for (mode, decrypts, sts) in [
        ("single", single_decrypts, single_sts),
        ("batch", batch_decrypts, batch_sts),
    ] {
        anyhow::ensure!(
            decrypts == expected,
            "{}/{mode}: {decrypts} KMS Decrypt calls, expected exactly {expected}",
            hierarchy.as_str_name()
        );
        anyhow::ensure!(
            sts == args.tenants as u64,
            "{}/{mode}: {sts} AssumeRole calls, expected one per tenant ({})",
            hierarchy.as_str_name(),
            args.tenants
        );
    }
    Ok(json!({
        "hierarchy": match hierarchy { KeyHierarchy::TenantKey => "tenant_key", _ => "direct" },
        "deks": deks,
        "single_s": single.as_secs_f64(),
        "batch_s": batch.as_secs_f64(),
        "batch_over_single_time": batch.as_secs_f64() / single.as_secs_f64(),
        "single_decrypts": single_decrypts,
        "batch_decrypts": batch_decrypts,
        "expected_decrypts": expected,
        "single_assume_role": single_sts,
        "batch_assume_role": batch_sts,
    }))
}

/// Tenants with one moto key each and their wrapped DEKs (generated in
/// batches by a process that is then stopped).
async fn prepare(
    args: &ColdStartArgs,
    moto: &str,
    dir: &std::path::Path,
    hierarchy: KeyHierarchy,
) -> anyhow::Result<Vec<Vec<Vec<u8>>>> {
    let kms = aws_sdk_kms::Client::from_conf(
        aws_sdk_kms::config::Builder::from(&sdk_config())
            .endpoint_url(moto)
            .build(),
    );
    let server = Running::start(dir, moto).await?;
    let channel = server.channel().await?;
    let mut admin = KeyAdminClient::new(channel.clone());
    let mut broker = KeyBrokerClient::new(channel);
    let mut wrapped = Vec::with_capacity(args.tenants);
    for t in 0..args.tenants {
        let key_arn = kms
            .create_key()
            .send()
            .await?
            .key_metadata
            .and_then(|m| m.arn)
            .context("moto returned no key ARN")?;
        admin
            .create_tenant(proto::CreateTenantRequest {
                tenant_id: tenant(t),
                key_policy: KeyPolicy::Keyring.into(),
                key_hierarchy: hierarchy.into(),
                newest_import_primary: false,
            })
            .await?;
        admin
            .link_key(proto::LinkKeyRequest {
                tenant_id: tenant(t),
                name: "cmk".into(),
                description: String::new(),
                provider: proto::Provider::AwsKms.into(),
                key_reference: key_arn,
                region: REGION.into(),
                role_arn: ROLE_ARN.into(),
                service_account: String::new(),
                make_primary: true,
                replica_regions: Vec::new(),
                vault_approle: None,
                azure_tenant_id: String::new(),
                vault_jwt: None,
            })
            .await?;
        let generated = broker
            .batch_generate_data_key(proto::BatchGenerateDataKeyRequest {
                items: (0..args.keys)
                    .map(|_| proto::GenerateDataKeyRequest {
                        tenant_id: tenant(t),
                        key_spec: 0,
                        context: context(),
                        justification: None,
                    })
                    .collect(),
            })
            .await?
            .into_inner();
        wrapped.push(
            generated
                .results
                .into_iter()
                .map(|r| {
                    r.response
                        .map(|g| g.wrapped_key)
                        .context("a generate failed")
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
        );
    }
    server.stop().await?;
    Ok(wrapped)
}
