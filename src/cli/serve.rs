//! `serve`, `check-config`, and offline maintenance: the keyring, registry
//! backups.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Subcommand;
use serde_json::{Value, json};

use crate::config::{self, Config};
use crate::kms::local::{KeyringSeal, LocalKeyring, reseal_keyring_file, rotate_keyring_file};
use crate::kms::pkcs11::Pkcs11Hsm;
use crate::registry::sql::SqlRegistry;
use crate::server::{Server, shutdown_signal};

#[derive(Debug, Subcommand)]
pub(super) enum KeyringCommand {
    /// Add a new key version; it encrypts from now on, old versions still decrypt.
    Rotate(KeyringArgs),
    /// List key versions (never key material).
    List(KeyringArgs),
    /// Seal every version under the HSM key --platform-key names (from a
    /// plain file, or from --from-platform-key): the keyring stays the
    /// same, so every wrapped key stays readable. Then serve with the same
    /// --platform-key.
    Seal {
        #[command(flatten)]
        keyring: KeyringArgs,
        /// The HSM key the file is sealed under now [default: a plain file].
        #[arg(long)]
        from_platform_key: Option<String>,
    },
    /// Move a keyring sealed under --platform-key back to a plain file.
    Unseal(KeyringArgs),
    /// Print the public keys keybroker signs customers' Vault login tokens
    /// with (one per keyring version): a JWK Set for a Vault's `jwks_url`
    /// or `jwks_pairs`, and PEM for `jwt_validation_pubkeys` (a Vault that
    /// cannot reach keybroker's metrics listener).
    OidcKeys {
        #[command(flatten)]
        keyring: KeyringArgs,
        /// The server's oidc_issuer.
        #[arg(long, env = "KEYBROKER_OIDC_ISSUER")]
        issuer: String,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum RegistryCommand {
    /// Write every tenant, key and tenant key version (all still wrapped) to
    /// a file (mode 0600).
    Export {
        #[command(flatten)]
        registry: RegistryArg,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore an export into an empty registry (all rows or none).
    Restore {
        #[command(flatten)]
        registry: RegistryArg,
        /// The export to read.
        #[arg(long)]
        from: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub(super) struct RegistryArg {
    /// Data directory of the server (its SQLite registry).
    #[arg(long, env = "KEYBROKER_DATA_DIR", default_value = "./data")]
    pub(super) data_dir: PathBuf,
    /// Registry database URL, when not the SQLite file in the data dir.
    #[arg(long, env = "KEYBROKER_REGISTRY")]
    pub(super) registry: Option<crate::secret::SecretUrl>,
}

impl RegistryArg {
    async fn open(&self) -> anyhow::Result<SqlRegistry> {
        Ok(match &self.registry {
            Some(url) => SqlRegistry::connect(url.expose()).await?,
            None => SqlRegistry::open_sqlite(&self.data_dir.join("registry.db")).await?,
        })
    }
}

pub(super) async fn registry(command: RegistryCommand) -> anyhow::Result<()> {
    match command {
        RegistryCommand::Export { registry, out } => {
            let document = registry.open().await?.export().await?;
            write_durably(&out, serde_json::to_string_pretty(&document)?.as_bytes())?;
            let count = |t: &str| document["tables"][t].as_array().map_or(0, Vec::len);
            println!(
                "{}",
                json!({ "exported": out, "tenants": count("tenants"), "key_bindings": count("key_bindings"), "tenant_keys": count("tenant_keys") })
            );
        }
        RegistryCommand::Restore { registry, from } => {
            let text = std::fs::read_to_string(&from)
                .map_err(|e| anyhow::anyhow!("{}: {e}", from.display()))?;
            let document: Value = serde_json::from_str(&text)?;
            let rows = registry.open().await?.restore(&document).await?;
            println!("{}", json!({ "restored": from, "rows": rows }));
        }
    }
    Ok(())
}

/// Writes a new 0600 file and makes it durable: the data, then its
/// directory entry (a backup that vanishes in a crash is no backup).
fn write_durably(out: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.sync_all()?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[derive(Debug, clap::Args)]
pub(super) struct KeyringArgs {
    /// Data directory of the server.
    #[arg(long, env = "KEYBROKER_DATA_DIR", default_value = "./data")]
    pub(super) data_dir: PathBuf,
    /// The HSM key the keyring is (to be) sealed under, as `serve
    /// --platform-key`.
    #[arg(long, env = "KEYBROKER_PLATFORM_KEY")]
    pub(super) platform_key: Option<String>,
    #[command(flatten)]
    pub(super) pkcs11: crate::kms::pkcs11::Pkcs11Settings,
}

impl KeyringArgs {
    fn path(&self) -> PathBuf {
        config::platform_keyring_path(&self.data_dir)
    }

    /// The HSM (when a module is given) and the seal `platform_key` names.
    fn seal(&self, platform_key: Option<&str>) -> anyhow::Result<Option<Arc<dyn KeyringSeal>>> {
        if platform_key.is_none() {
            return Ok(None);
        }
        let hsm = Pkcs11Hsm::from_settings(&self.pkcs11)?.map(Arc::new);
        Ok(crate::kms::pkcs11::platform_seal(
            hsm.as_ref(),
            platform_key,
        )?)
    }
}

pub(super) async fn serve(config: Config) -> anyhow::Result<()> {
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
    let metrics_listen = config.telemetry.metrics_listen;
    let health_listen = config.server.health_listen;
    // The registry opens first: a replica that cannot open it exits without
    // ever accepting a connection it could not answer.
    let mut server = Server::build(config).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
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
        let metrics = Arc::clone(server.metrics());
        let more = server
            .issuer()
            .map(crate::kms::issuer::Issuer::routes)
            .unwrap_or_default();
        let stop = shutdown_signal();
        tokio::spawn(async move {
            if let Err(err) = crate::metrics::serve(metrics, more, metrics_listener, stop).await {
                tracing::error!(error = %err, "metrics endpoint failed");
            }
        });
        tracing::info!(addr = %bound, "metrics listening");
    }
    let served = server.run(listener, shutdown_signal()).await;
    telemetry.shutdown();
    served
}

pub(super) fn check_config(config: Config) -> anyhow::Result<()> {
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

pub(super) fn keyring(command: KeyringCommand) -> anyhow::Result<()> {
    match command {
        KeyringCommand::Rotate(args) => {
            let path = args.path();
            let seal = args.seal(args.platform_key.as_deref())?;
            let version = rotate_keyring_file(&path, seal.as_deref())?;
            println!("{}", json!({ "keyring": path, "new_version": version }));
        }
        KeyringCommand::List(args) => {
            let path = args.path();
            let seal = args.seal(args.platform_key.as_deref())?;
            let ring = LocalKeyring::open_or_create_sealed("platform", &path, seal.clone())?;
            let versions: Vec<Value> = ring
                .version_list()
                .into_iter()
                .map(|(v, created)| json!({ "version": v, "created_unix": created }))
                .collect();
            let sealed_by = seal.map(|s| s.name());
            println!(
                "{}",
                json!({ "keyring": path, "sealed_by": sealed_by, "versions": versions })
            );
        }
        KeyringCommand::Seal {
            keyring,
            from_platform_key,
        } => {
            let Some(to) = keyring.platform_key.as_deref() else {
                anyhow::bail!(
                    "give --platform-key pkcs11:token=<label>;object=<label>: the HSM key to seal the keyring under"
                );
            };
            let path = keyring.path();
            let from = keyring.seal(from_platform_key.as_deref())?;
            let to = keyring.seal(Some(to))?;
            let versions = reseal_keyring_file(&path, from.as_deref(), to.as_deref())?;
            let sealed_by = to.map(|s| s.name());
            println!(
                "{}",
                json!({ "keyring": path, "sealed_by": sealed_by, "versions": versions })
            );
        }
        KeyringCommand::OidcKeys { keyring, issuer } => {
            let settings = crate::kms::issuer::IssuerSettings {
                issuer: Some(issuer),
                ..Default::default()
            };
            settings.validate()?;
            let path = keyring.path();
            let seal = keyring.seal(keyring.platform_key.as_deref())?;
            let ring = Arc::new(LocalKeyring::open_or_create_sealed(
                "platform", &path, seal,
            )?);
            let issuer = crate::kms::issuer::Issuer::from_settings(&settings, ring)
                .ok_or_else(|| anyhow::anyhow!("give --issuer"))?;
            println!(
                "{}",
                json!({
                    "issuer": issuer.issuer(),
                    "jwks_uri": issuer.jwks_url(),
                    "jwks": issuer.jwks()?,
                    "jwt_validation_pubkeys": issuer.public_pems()?,
                })
            );
        }
        KeyringCommand::Unseal(args) => {
            let Some(from) = args.platform_key.as_deref() else {
                anyhow::bail!("give --platform-key: the HSM key the keyring is sealed under now");
            };
            let path = args.path();
            let from = args.seal(Some(from))?;
            let versions = reseal_keyring_file(&path, from.as_deref(), None)?;
            println!(
                "{}",
                json!({ "keyring": path, "sealed_by": null, "versions": versions })
            );
        }
    }
    Ok(())
}
