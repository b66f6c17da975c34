//! Command line: `serve`, offline keyring maintenance, and client commands so
//! a person can try the service without writing code. Client commands print
//! one JSON object on stdout (bytes as standard base64) and exit non-zero
//! with the gRPC code and message on stderr when the server refuses.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::config::{self, Config, LogFormat, ServeArgs};
use crate::kms::local::{LocalKeyring, rotate_keyring_file};
use crate::proto::{self, key_broker_client::KeyBrokerClient};
use crate::server::{Server, shutdown_signal};

#[derive(Debug, Parser)]
#[command(
    name = "keybroker",
    version,
    about = "Customer-managed encryption keys for every service of the platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve(ServeArgs),
    /// Maintain the local platform keyring file (offline; a running server
    /// picks up changes within its keyring reload interval).
    Keyring {
        #[command(subcommand)]
        command: KeyringCommand,
    },
    /// Generate a data key for a tenant.
    Generate {
        #[command(flatten)]
        target: Target,
        /// Key length.
        #[arg(long, value_enum, default_value = "aes-256")]
        key_spec: KeySpecArg,
    },
    /// Wrap a data key (base64) for a tenant.
    Wrap {
        #[command(flatten)]
        target: Target,
        /// The data key, base64.
        #[arg(long)]
        plaintext: String,
    },
    /// Unwrap a wrapped key (base64).
    Unwrap {
        #[command(flatten)]
        target: Target,
        /// The wrapped key, base64.
        #[arg(long)]
        wrapped_key: String,
    },
    /// Move a wrapped key (base64) to the tenant's current primary key.
    Rewrap {
        #[command(flatten)]
        target: Target,
        /// The wrapped key, base64.
        #[arg(long)]
        wrapped_key: String,
    },
    /// Show which keys protect a tenant's data.
    Describe {
        #[command(flatten)]
        server: ServerArg,
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Debug, Subcommand)]
enum KeyringCommand {
    /// Add a new key version; it encrypts from now on, old versions still decrypt.
    Rotate(DataDirArg),
    /// List key versions (never key material).
    List(DataDirArg),
}

#[derive(Debug, clap::Args)]
struct DataDirArg {
    /// Data directory of the server.
    #[arg(long, env = "KEYBROKER_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ServerArg {
    /// Server address.
    #[arg(
        long,
        env = "KEYBROKER_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
}

#[derive(Debug, clap::Args)]
struct Target {
    #[command(flatten)]
    server: ServerArg,
    /// Tenant id.
    #[arg(long)]
    tenant: String,
    /// Encryption context entry, repeatable: --context table=orders.
    #[arg(long = "context", value_parser = parse_context_entry)]
    context: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KeySpecArg {
    #[value(name = "aes-256")]
    Aes256,
    #[value(name = "aes-128")]
    Aes128,
}

fn parse_context_entry(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}

/// Runs the command line; the process exit code.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Keyring { command } => keyring(command),
        client => run_client(client).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(&args)?;
    init_logging(config.log_format);
    tracing::info!(config = ?config, "starting keybroker");
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    Server::build(config)
        .await?
        .run(listener, shutdown_signal())
        .await
}

/// Logs go to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn keyring(command: KeyringCommand) -> anyhow::Result<()> {
    match command {
        KeyringCommand::Rotate(dir) => {
            let path = config::platform_keyring_path(&dir.data_dir);
            let version = rotate_keyring_file(&path)?;
            println!("{}", json!({ "keyring": path, "new_version": version }));
        }
        KeyringCommand::List(dir) => {
            let path = config::platform_keyring_path(&dir.data_dir);
            let ring = LocalKeyring::open_or_create("platform", &path)?;
            let versions: Vec<Value> = ring
                .version_list()
                .into_iter()
                .map(|(v, created)| json!({ "version": v, "created_unix": created }))
                .collect();
            println!("{}", json!({ "keyring": path, "versions": versions }));
        }
    }
    Ok(())
}

async fn connect(server: &ServerArg) -> anyhow::Result<KeyBrokerClient<Channel>> {
    let channel = Channel::from_shared(server.server.clone())
        .map_err(|e| anyhow::anyhow!("invalid --server {:?}: {e}", server.server))?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", server.server))?;
    Ok(KeyBrokerClient::new(channel))
}

fn decode_b64(flag: &str, text: &str) -> anyhow::Result<Vec<u8>> {
    B64.decode(text.trim())
        .map_err(|e| anyhow::anyhow!("--{flag} is not valid base64: {e}"))
}

fn key_json(key: Option<&proto::KeyInfo>) -> Value {
    key.map_or(Value::Null, |k| {
        json!({
            "key_binding": k.key_binding,
            "provider": k.provider().as_str_name(),
            "provider_key_version": k.provider_key_version,
        })
    })
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

async fn run_client(command: Command) -> anyhow::Result<()> {
    let output = match command {
        Command::Generate { target, key_spec } => {
            let mut client = connect(&target.server).await?;
            let resp = client
                .generate_data_key(proto::GenerateDataKeyRequest {
                    tenant_id: target.tenant,
                    context: target.context.into_iter().collect(),
                    key_spec: match key_spec {
                        KeySpecArg::Aes256 => proto::KeySpec::Aes256,
                        KeySpecArg::Aes128 => proto::KeySpec::Aes128,
                    }
                    .into(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            json!({
                "plaintext": B64.encode(&resp.plaintext),
                "wrapped_key": B64.encode(&resp.wrapped_key),
                "key": key_json(resp.key.as_ref()),
            })
        }
        Command::Wrap { target, plaintext } => {
            let plaintext = zeroize::Zeroizing::new(decode_b64("plaintext", &plaintext)?);
            let mut client = connect(&target.server).await?;
            let resp = client
                .wrap_key(proto::WrapKeyRequest {
                    tenant_id: target.tenant,
                    context: target.context.into_iter().collect(),
                    plaintext: plaintext.to_vec(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            json!({
                "wrapped_key": B64.encode(&resp.wrapped_key),
                "key": key_json(resp.key.as_ref()),
            })
        }
        Command::Unwrap {
            target,
            wrapped_key,
        } => {
            let wrapped_key = decode_b64("wrapped-key", &wrapped_key)?;
            let mut client = connect(&target.server).await?;
            let resp = client
                .unwrap_key(proto::UnwrapKeyRequest {
                    tenant_id: target.tenant,
                    context: target.context.into_iter().collect(),
                    wrapped_key,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            json!({
                "plaintext": B64.encode(&resp.plaintext),
                "key": key_json(resp.key.as_ref()),
                "rewrap_recommended": resp.rewrap_recommended,
            })
        }
        Command::Rewrap {
            target,
            wrapped_key,
        } => {
            let wrapped_key = decode_b64("wrapped-key", &wrapped_key)?;
            let mut client = connect(&target.server).await?;
            let resp = client
                .rewrap_key(proto::RewrapKeyRequest {
                    tenant_id: target.tenant,
                    context: target.context.into_iter().collect(),
                    wrapped_key,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            json!({
                "wrapped_key": B64.encode(&resp.wrapped_key),
                "key": key_json(resp.key.as_ref()),
                "previous_key": key_json(resp.previous_key.as_ref()),
            })
        }
        Command::Describe { server, tenant } => {
            let mut client = connect(&server).await?;
            let resp = client
                .describe_key(proto::DescribeKeyRequest { tenant_id: tenant })
                .await
                .map_err(status_error)?
                .into_inner();
            let bindings: Vec<Value> = resp
                .bindings
                .iter()
                .map(|b| {
                    json!({
                        "name": b.name,
                        "provider": b.provider().as_str_name(),
                        "key_reference": b.key_reference,
                        "state": b.state().as_str_name(),
                        "state_reason": b.state_reason,
                        "primary": b.primary,
                        "current_key_version": b.current_key_version,
                    })
                })
                .collect();
            json!({
                "tenant_id": resp.tenant_id,
                "uses_platform_key": resp.uses_platform_key,
                "primary": key_json(resp.primary.as_ref()),
                "bindings": bindings,
            })
        }
        Command::Serve(_) | Command::Keyring { .. } => {
            anyhow::bail!("not a client command")
        }
    };
    println!("{output}");
    Ok(())
}
