//! One typed configuration, from (highest precedence first) command-line
//! flags, `KEYBROKER_*` environment variables, an optional TOML file, and
//! defaults. Validated once at start: a server never runs half-configured.
//!
//! Every setting is declared once, in the section of the domain it belongs
//! to (`CacheSettings` in `cache`, `AwsSettings` in `kms::aws`...): one field
//! with its flag, environment variable, default and help. The file uses the
//! same names (the argument ids, `cache_ttl`) and the same parsers: a file
//! value is applied as if it were a flag, to every setting that neither a
//! flag nor the environment gave.

mod file;
mod service;

use std::path::{Path, PathBuf};

use clap::{ArgMatches, Args, Command, FromArgMatches};

pub use self::service::ServerSettings;
use crate::audit::AuditSettings;
use crate::broker::HierarchySettings;
use crate::cache::CacheSettings;
use crate::control::AdminSettings;
use crate::control::watcher::WatcherSettings;
use crate::kms::aws::AwsSettings;
use crate::kms::gcp::GcpSettings;
use crate::net::incoming::ConnectionSettings;
use crate::net::tls::TlsSettings;
use crate::quota::QuotaSettings;
use crate::registry::RegistrySettings;
pub use crate::settings::ConfigError;
use crate::settings::{defaults, invalid};
use crate::telemetry::TelemetrySettings;

/// Largest gRPC message the server decodes. Every legitimate request is far
/// smaller; this bounds what a caller can make the server buffer.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Flags of `keybroker serve` and `check-config`: the config file and every
/// setting.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML config file. Flags and environment variables override its values.
    #[arg(long, env = "KEYBROKER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Config,
}

/// Every setting, one section per concern; each section checks itself in
/// its own `validate()`, and [`Config::validate`] checks what spans them.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerSettings,
    #[command(flatten)]
    pub connections: ConnectionSettings,
    #[command(flatten)]
    pub tls: TlsSettings,
    #[command(flatten)]
    pub cache: CacheSettings,
    #[command(flatten)]
    pub registry: RegistrySettings,
    #[command(flatten)]
    pub control: AdminSettings,
    #[command(flatten)]
    pub watcher: WatcherSettings,
    #[command(flatten)]
    pub aws: AwsSettings,
    #[command(flatten)]
    pub gcp: GcpSettings,
    #[command(flatten)]
    pub vault: crate::kms::vault::VaultSettings,
    #[command(flatten)]
    pub oidc: crate::kms::issuer::IssuerSettings,
    #[command(flatten)]
    pub pkcs11: crate::kms::pkcs11::Pkcs11Settings,
    #[command(flatten)]
    pub azure: crate::kms::azure::AzureSettings,
    #[command(flatten)]
    pub audit: AuditSettings,
    #[command(flatten)]
    pub quota: QuotaSettings,
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
    #[command(flatten)]
    pub hierarchy: HierarchySettings,
    #[command(flatten)]
    pub deletion: crate::lifecycle::DeletionSettings,
    #[command(flatten)]
    pub access_log: crate::access_log::AccessLogSettings,
}

impl Default for Config {
    fn default() -> Self {
        defaults()
    }
}

impl Config {
    /// The configuration `keybroker serve ARGS` would run with (environment
    /// and config file included).
    pub fn load_from<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let command = ServeArgs::augment_args(Command::new("serve").no_binary_name(true));
        let matches = command
            .try_get_matches_from(args)
            .map_err(|e| ConfigError::Flags(e.to_string()))?;
        Self::from_matches(&matches)
    }

    /// The configuration of parsed `serve` flags: the file named by
    /// `--config` fills what neither a flag nor the environment gave.
    pub fn from_matches(matches: &ArgMatches) -> Result<Self, ConfigError> {
        let args =
            ServeArgs::from_arg_matches(matches).map_err(|e| ConfigError::Flags(e.to_string()))?;
        let mut config = args.settings;
        if let Some(path) = &args.config {
            file::overlay(&mut config, path, matches)?;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.connections.validate()?;
        self.tls.validate()?;
        self.cache.validate()?;
        self.registry.validate()?;
        self.watcher.validate()?;
        self.aws.validate()?;
        self.gcp.validate()?;
        self.vault.validate()?;
        self.oidc.validate()?;
        self.pkcs11.validate()?;
        self.azure.validate()?;
        self.audit.validate()?;
        self.deletion.validate()?;
        self.access_log.validate()?;
        if self.server.platform_key.is_some() && self.pkcs11.module.is_none() {
            return invalid(
                "platform_key",
                "names a PKCS#11 key: give pkcs11_module (the HSM's library) and its PIN \
                 (pkcs11_pin_file)",
            );
        }
        let listen = self.server.listen;
        let tls = self.tls.enabled();
        let policy = self.server.authz_policy.is_some();
        if tls && !policy {
            return invalid(
                "authz_policy",
                "is required with TLS: without a policy every caller with a certificate \
                 from the client CA could unwrap every tenant's keys",
            );
        }
        if !listen.ip().is_loopback() && !self.server.insecure_plaintext && !tls {
            return invalid(
                "listen",
                &format!(
                    "{listen} is not a loopback address and TLS is not configured; plaintext gRPC \
                     would expose keys on the network. Listen on 127.0.0.1, or pass \
                     --insecure-plaintext if a trusted proxy terminates TLS"
                ),
            );
        }
        if !listen.ip().is_loopback() && !tls && !policy {
            return invalid(
                "authz_policy",
                &format!(
                    "is required to serve plaintext on {listen}, a non-loopback address: without a \
                     policy every caller on the network could call every method for every \
                     tenant. Give --authz-policy (plaintext callers are 'unauthenticated'), or \
                     listen on 127.0.0.1"
                ),
            );
        }
        Ok(())
    }

    pub fn platform_keyring_path(&self) -> PathBuf {
        self.server.platform_keyring_path()
    }
}

pub fn platform_keyring_path(data_dir: &Path) -> PathBuf {
    data_dir.join("platform-keyring.json")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::kms::gcp::GcpCredentials;

    fn load(args: &[&str]) -> Result<Config, ConfigError> {
        Config::load_from(args.iter().copied())
    }

    fn load_file(text: &str, args: &[&str]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, text).unwrap();
        let path = path.to_str().unwrap().to_owned();
        let mut all = vec!["--config", path.as_str()];
        all.extend_from_slice(args);
        load(&all)
    }

    #[test]
    fn debug_redacts_the_database_password() {
        let config = load(&[
            "--registry",
            "postgres://kb:s3cret@db:5432/kb?sslmode=require&password=other",
        ])
        .unwrap();
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("other"),
            "{shown}"
        );
        assert!(shown.contains("kb:<redacted>@db:5432"), "{shown}");
    }

    #[test]
    fn defaults_validate() {
        let config = load(&[]).unwrap();
        config.validate().unwrap();
        assert_eq!(config.server.listen.port(), 50051);
        assert_eq!(config.cache.ttl, Duration::from_secs(300));
        assert_eq!(config.aws.region, "us-east-1");
        assert_eq!(config.quota.tenant().per_second, 100);
        Config::default().validate().unwrap();
    }

    #[test]
    fn flags_override_file() {
        let config = load_file(
            "cache_ttl = \"2m\"\ncache_tti = \"30s\"\nlisten = \"127.0.0.1:6000\"\n",
            &["--listen", "127.0.0.1:7000"],
        )
        .unwrap();
        assert_eq!(config.server.listen.port(), 7000);
        assert_eq!(config.cache.ttl, Duration::from_secs(120));
        assert_eq!(config.cache.tti, Duration::from_secs(30));
    }

    #[test]
    fn lists_tables_and_booleans_come_from_the_file() {
        let config = load_file(
            "tls_trust_domains = [\"a.example\", \"b.example\"]\n\
             audit_fail_closed = true\n\
             [aws_kms_region_endpoints]\n\"eu-west-1\" = \"http://127.0.0.1:1\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.tls.trust_domains, ["a.example", "b.example"]);
        assert!(config.audit.fail_closed);
        assert_eq!(
            config.aws.kms_region_endpoints,
            [("eu-west-1".to_owned(), "http://127.0.0.1:1".to_owned())]
        );
    }

    #[test]
    fn refuses_plaintext_on_the_network_and_bad_values() {
        let err = load(&["--listen", "0.0.0.0:50051"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--insecure-plaintext"), "{err}");
        // Plaintext on the network without a policy would let every network
        // caller call everything for every tenant.
        let err = load(&["--listen", "0.0.0.0:50051", "--insecure-plaintext"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("authz_policy") && err.contains("every caller on the network"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, "").unwrap();
        load(&[
            "--listen",
            "0.0.0.0:50051",
            "--insecure-plaintext",
            "--authz-policy",
            policy.to_str().unwrap(),
        ])
        .unwrap();

        let err = load_file("cache_ttl = \"soon\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache_ttl"), "{err}");
        let err = load_file("cache_tll = \"1m\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
        let err = load_file("config = \"other.toml\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn connection_settings_load_and_validate() {
        let config = load_file(
            "handshake_timeout = \"2s\"\nidle_timeout = \"1m\"\nmax_connections = 64\n\
             keepalive_interval = \"5s\"\nkeepalive_timeout = \"3s\"\nrecheck_interval = \"2s\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            config.connections,
            ConnectionSettings {
                handshake_timeout: Duration::from_secs(2),
                keepalive_interval: Duration::from_secs(5),
                keepalive_timeout: Duration::from_secs(3),
                idle_timeout: Duration::from_secs(60),
                max_connections: 64,
            }
        );
        assert_eq!(config.watcher.recheck_interval, Duration::from_secs(2));
        assert!(config.connections.effective_max_connections() <= 64);
        let err = load_file("max_connections = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_connections"), "{err}");
    }

    #[test]
    fn gcp_settings_load_and_validate() {
        let config = load_file(
            "gcp_kms_endpoint = \"https://cloudkms.europe-west1.rep.googleapis.com\"\n\
             gcp_credentials = \"anonymous\"\ngcp_attempt_timeout = \"1s\"\n",
            &["--gcp-max-attempts", "5"],
        )
        .unwrap();
        assert_eq!(
            config.gcp.endpoint.as_deref(),
            Some("https://cloudkms.europe-west1.rep.googleapis.com")
        );
        assert_eq!(config.gcp.credentials, GcpCredentials::Anonymous);
        assert_eq!(config.gcp.max_attempts, 5);
        assert_eq!(config.gcp.attempt_timeout, Duration::from_secs(1));
        for (text, setting) in [
            ("gcp_credentials = \"root\"\n", "gcp_credentials"),
            (
                "gcp_kms_endpoint = \"cloudkms.googleapis.com\"\n",
                "gcp_kms_endpoint",
            ),
            ("gcp_max_attempts = 0\n", "gcp_max_attempts"),
            ("gcp_attempt_timeout = \"20s\"\n", "gcp_attempt_timeout"),
        ] {
            let err = load_file(text, &[]).unwrap_err().to_string();
            assert!(err.contains(setting), "{text}: {err}");
        }
    }
}
