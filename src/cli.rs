//! Command line: `serve`, offline keyring maintenance, and client commands so
//! a person can try the service without writing code. Client commands print
//! one JSON object on stdout (bytes as standard base64) and exit non-zero
//! with the gRPC code and message on stderr when the server refuses.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::config::{self, Config, ServeArgs};
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
    Serve(Box<ServeArgs>),
    /// Load and validate the configuration (and the authorization policy it
    /// names) without serving; exits non-zero with the reason.
    CheckConfig(Box<ServeArgs>),
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
    /// Check the server's health (grpc.health.v1); exits non-zero unless
    /// SERVING. For probes and `helm test`.
    Health {
        #[command(flatten)]
        server: ServerArg,
        /// Service to check ("" = the whole server).
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Control plane: tenants and their customer keys.
    Admin {
        #[command(flatten)]
        server: ServerArg,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Tenants.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Customer keys of a tenant.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PolicyArg {
    Keyring,
    SingleKey,
}

impl From<PolicyArg> for proto::KeyPolicy {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::Keyring => Self::Keyring,
            PolicyArg::SingleKey => Self::SingleKey,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CloudProviderArg {
    AwsKms,
    GcpKms,
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Create a tenant; prints its external ID and onboarding material.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long, value_enum, default_value = "keyring")]
        policy: PolicyArg,
    },
    /// Show a tenant and its onboarding material.
    Get {
        #[arg(long)]
        tenant: String,
    },
    /// Change a tenant's key policy.
    SetPolicy {
        #[arg(long)]
        tenant: String,
        #[arg(long, value_enum)]
        policy: PolicyArg,
    },
}

#[derive(Debug, clap::Args)]
struct KeyName {
    #[arg(long)]
    tenant: String,
    /// Key binding name.
    #[arg(long)]
    name: String,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Link a key in AWS KMS or Google Cloud KMS (verified before it is accepted).
    Link {
        #[command(flatten)]
        key: KeyName,
        #[arg(long, value_enum)]
        provider: CloudProviderArg,
        /// Key ARN / alias ARN, or CryptoKey resource name.
        #[arg(long)]
        key_reference: String,
        #[arg(long, default_value = "")]
        region: String,
        #[arg(long, default_value = "")]
        role_arn: String,
        #[arg(long, default_value = "")]
        service_account: String,
        /// AWS multi-Region key replica region, repeatable.
        #[arg(long = "replica-region")]
        replica_regions: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Make it the primary key.
        #[arg(long)]
        primary: bool,
    },
    /// Import raw AES-256 key material (32 bytes, base64) as a local key.
    Import {
        #[command(flatten)]
        key: KeyName,
        /// File holding the base64 key material (`-` for stdin). Not a flag
        /// value: command lines are visible to other users of the machine.
        #[arg(long)]
        material_file: PathBuf,
        #[arg(long, default_value = "")]
        description: String,
        /// Make it the primary key.
        #[arg(long)]
        primary: bool,
    },
    /// List a tenant's keys.
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Show one key with live usage counters.
    Get(KeyName),
    /// Make a key the primary (it wraps every new DEK).
    SetPrimary(KeyName),
    /// Disable a key: it unwraps nothing until enabled.
    Disable {
        #[command(flatten)]
        key: KeyName,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Enable a disabled key.
    Enable(KeyName),
    /// Remove a key from the tenant.
    Unlink {
        #[command(flatten)]
        key: KeyName,
        /// Even if it was used recently (what it wrapped becomes unreadable).
        #[arg(long)]
        force: bool,
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
    /// CA certificate (PEM) that issued the server's certificate; makes the
    /// connection TLS (use an https:// --server).
    #[arg(long, env = "KEYBROKER_CLIENT_CA")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS: the caller identity.
    #[arg(long, env = "KEYBROKER_CLIENT_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "KEYBROKER_CLIENT_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Name to verify in the server certificate [default: the host of --server].
    #[arg(long, env = "KEYBROKER_SERVER_NAME")]
    server_name: Option<String>,
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
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    // `serve` and `check-config` need to know which settings the flags and
    // the environment gave, so the config file fills only the others.
    let settings = matches
        .subcommand()
        .filter(|(name, _)| matches!(*name, "serve" | "check-config"))
        .map(|(_, sub)| Config::from_matches(sub));
    let result = match (cli.command, settings) {
        (Command::Serve(_), Some(config)) => match config {
            Ok(config) => serve(config).await,
            Err(err) => Err(err.into()),
        },
        (Command::CheckConfig(_), Some(config)) => {
            config.map_err(Into::into).and_then(check_config)
        }
        (Command::Keyring { command }, _) => keyring(command),
        (client, _) => run_client(client).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let mut telemetry = crate::telemetry::init(
        config.telemetry.log_format,
        config.telemetry.otlp_endpoint.as_deref(),
    )?;
    if config.server.allow_core_dumps {
        tracing::warn!(
            "--allow-core-dumps: a core file of this process would contain unwrapped keys"
        );
    } else {
        // Before any key is loaded.
        let hardening = crate::hardening::harden()
            .map_err(|e| anyhow::anyhow!("cannot disable core dumps ({e}); refusing to hold keys in a dumpable process (--allow-core-dumps overrides, for debugging)"))?;
        tracing::info!(
            core_dumps_disabled = hardening.core_dumps_disabled,
            not_dumpable = hardening.not_dumpable,
            "process hardened"
        );
    }
    tracing::info!(config = ?config, "starting keybroker");
    let listen = config.server.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let metrics_listen = config.telemetry.metrics_listen;
    let health_listen = config.server.health_listen;
    let mut server = Server::build(config).await?;
    if let Some(addr) = health_listen {
        let health = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for health checks on {addr}: {e}"))?;
        tracing::info!(addr = %health.local_addr()?, "health listening");
        server = server.with_health_listener(health);
    }
    if let Some(addr) = metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
        let bound = metrics_listener.local_addr()?;
        let metrics = std::sync::Arc::clone(server.metrics());
        tokio::spawn(async move {
            if let Err(err) =
                crate::metrics::serve(metrics, metrics_listener, shutdown_signal()).await
            {
                tracing::error!(error = %err, "metrics endpoint failed");
            }
        });
        tracing::info!(addr = %bound, "metrics listening");
    }
    let served = server.run(listener, shutdown_signal()).await;
    telemetry.shutdown();
    served
}

fn check_config(config: Config) -> anyhow::Result<()> {
    if let Some(path) = &config.server.authz_policy {
        let policy = crate::authz::Policy::load(path).map_err(anyhow::Error::msg)?;
        drop(policy);
    }
    println!(
        "{}",
        json!({ "ok": true, "listen": config.server.listen.to_string(), "tls": config.tls.enabled() })
    );
    Ok(())
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

async fn channel(server: &ServerArg) -> anyhow::Result<Channel> {
    let mut endpoint = Channel::from_shared(server.server.clone())
        .map_err(|e| anyhow::anyhow!("invalid --server {:?}: {e}", server.server))?;
    if server.ca.is_some() || server.cert.is_some() {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &server.ca {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&server.cert, &server.key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        if let Some(name) = &server.server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", server.server))
}

async fn connect(server: &ServerArg) -> anyhow::Result<KeyBrokerClient<Channel>> {
    Ok(KeyBrokerClient::new(channel(server).await?))
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
        Command::Health { server, service } => {
            let mut client =
                tonic_health::pb::health_client::HealthClient::new(channel(&server).await?);
            let status = client
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.clone(),
                })
                .await?
                .into_inner()
                .status();
            let serving = status == tonic_health::pb::health_check_response::ServingStatus::Serving;
            anyhow::ensure!(serving, "service {service:?} is {}", status.as_str_name());
            json!({ "service": service, "status": status.as_str_name() })
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
        Command::Admin { server, command } => run_admin(&server, command).await?,
        Command::Serve(_) | Command::CheckConfig(_) | Command::Keyring { .. } => {
            anyhow::bail!("not a client command")
        }
    };
    println!("{output}");
    Ok(())
}

fn timestamp_json(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.map_or(Value::Null, |t| {
        json!(t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
    })
}

fn tenant_json(tenant: Option<&proto::Tenant>) -> Value {
    tenant.map_or(Value::Null, |t| {
        let o = t.onboarding.clone().unwrap_or_default();
        json!({
            "tenant_id": t.tenant_id,
            "key_policy": t.key_policy().as_str_name(),
            "create_time_ms": timestamp_json(t.create_time.as_ref()),
            "onboarding": {
                "aws_external_id": o.aws_external_id,
                "aws_trust_policy_json": o.aws_trust_policy_json,
                "aws_key_policy_statement_json": o.aws_key_policy_statement_json,
                "gcp_service_account": o.gcp_service_account,
                "gcp_role": o.gcp_role,
            },
        })
    })
}

fn binding_json(key: &proto::KeyBinding) -> Value {
    json!({
        "tenant_id": key.tenant_id,
        "name": key.name,
        "description": key.description,
        "provider": key.provider().as_str_name(),
        "key_reference": key.key_reference,
        "region": key.region,
        "role_arn": key.role_arn,
        "service_account": key.service_account,
        "state": key.state().as_str_name(),
        "state_reason": key.state_reason,
        "primary": key.primary,
        "create_time_ms": timestamp_json(key.create_time.as_ref()),
        "last_use_time_ms": timestamp_json(key.last_use_time.as_ref()),
        "wrap_count": key.wrap_count,
        "unwrap_count": key.unwrap_count,
        "replica_regions": key.replica_regions,
    })
}

fn one_key(key: Option<&proto::KeyBinding>) -> Value {
    key.map_or(Value::Null, binding_json)
}

fn read_material(path: &std::path::Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    use std::io::Read;
    let mut text = zeroize::Zeroizing::new(String::new());
    if path.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        std::fs::File::open(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            .read_to_string(&mut text)?;
    }
    // A trailing newline from `echo` or an editor is not part of the key.
    let trimmed = zeroize::Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned());
    Ok(trimmed)
}

async fn run_admin(server: &ServerArg, command: AdminCommand) -> anyhow::Result<Value> {
    let mut client = proto::key_admin_client::KeyAdminClient::new(channel(server).await?);
    let value = match command {
        AdminCommand::Tenant { command } => match command {
            TenantCommand::Create { tenant, policy } => {
                let resp = client
                    .create_tenant(proto::CreateTenantRequest {
                        tenant_id: tenant,
                        key_policy: proto::KeyPolicy::from(policy).into(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                tenant_json(resp.tenant.as_ref())
            }
            TenantCommand::Get { tenant } => {
                let resp = client
                    .get_tenant(proto::GetTenantRequest { tenant_id: tenant })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                tenant_json(resp.tenant.as_ref())
            }
            TenantCommand::SetPolicy { tenant, policy } => {
                let resp = client
                    .set_tenant_policy(proto::SetTenantPolicyRequest {
                        tenant_id: tenant,
                        key_policy: proto::KeyPolicy::from(policy).into(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                tenant_json(resp.tenant.as_ref())
            }
        },
        AdminCommand::Key { command } => match command {
            KeyCommand::Link {
                key,
                provider,
                key_reference,
                region,
                role_arn,
                service_account,
                replica_regions,
                description,
                primary,
            } => {
                let resp = client
                    .link_key(proto::LinkKeyRequest {
                        tenant_id: key.tenant,
                        name: key.name,
                        description,
                        provider: match provider {
                            CloudProviderArg::AwsKms => proto::Provider::AwsKms,
                            CloudProviderArg::GcpKms => proto::Provider::GcpKms,
                        }
                        .into(),
                        key_reference,
                        region,
                        role_arn,
                        service_account,
                        make_primary: primary,
                        replica_regions,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                one_key(resp.key.as_ref())
            }
            KeyCommand::Import {
                key,
                material_file,
                description,
                primary,
            } => {
                let material = read_material(&material_file)?;
                let resp = client
                    .import_key_material(proto::ImportKeyMaterialRequest {
                        tenant_id: key.tenant,
                        name: key.name,
                        description,
                        key_material_base64: material.to_string(),
                        make_primary: primary,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                one_key(resp.key.as_ref())
            }
            KeyCommand::List { tenant } => {
                let resp = client
                    .list_keys(proto::ListKeysRequest { tenant_id: tenant })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                json!({ "keys": resp.keys.iter().map(binding_json).collect::<Vec<_>>() })
            }
            KeyCommand::Get(key) => {
                let resp = client
                    .get_key(proto::GetKeyRequest {
                        tenant_id: key.tenant,
                        name: key.name,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                one_key(resp.key.as_ref())
            }
            KeyCommand::SetPrimary(key) => {
                let resp = client
                    .set_primary_key(proto::SetPrimaryKeyRequest {
                        tenant_id: key.tenant,
                        name: key.name,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                one_key(resp.key.as_ref())
            }
            KeyCommand::Disable { key, reason } => {
                let resp = client
                    .disable_key(proto::DisableKeyRequest {
                        tenant_id: key.tenant,
                        name: key.name,
                        reason,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                one_key(resp.key.as_ref())
            }
            KeyCommand::Enable(key) => {
                let resp = client
                    .enable_key(proto::EnableKeyRequest {
                        tenant_id: key.tenant,
                        name: key.name,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                one_key(resp.key.as_ref())
            }
            KeyCommand::Unlink { key, force } => {
                client
                    .unlink_key(proto::UnlinkKeyRequest {
                        tenant_id: key.tenant.clone(),
                        name: key.name.clone(),
                        force,
                    })
                    .await
                    .map_err(status_error)?;
                json!({ "unlinked": { "tenant_id": key.tenant, "name": key.name } })
            }
        },
    };
    Ok(value)
}
