//! One typed configuration, from (highest precedence first) command-line
//! flags, `KEYBROKER_*` environment variables, an optional TOML file, and
//! defaults. Validated once at start: a server never runs half-configured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::audit::AuditSettings;
use crate::cache::CacheSettings;
use crate::incoming::ConnectionSettings;
use crate::kms::aws::AwsSettings;
use crate::kms::gcp::{GcpCredentials, GcpSettings};
use crate::quota::{Limit, QuotaSettings};
use crate::tls::TlsSettings;
use crate::watcher::WatcherSettings;

/// Largest gRPC message the server decodes. Every legitimate request is far
/// smaller; this bounds what a caller can make the server buffer.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Flags of `keybroker serve`. Every one may also come from the environment
/// or the config file; unset means "not given here".
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file. Flags and environment variables override its values.
    #[arg(long, env = "KEYBROKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051].
    #[arg(long, env = "KEYBROKER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the platform keyring and the registry [default: ./data].
    #[arg(long, env = "KEYBROKER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Allow plaintext gRPC on a non-loopback address (only behind a trusted
    /// proxy or mesh that terminates TLS).
    #[arg(long, env = "KEYBROKER_INSECURE_PLAINTEXT", num_args = 0..=1, default_missing_value = "true")]
    pub insecure_plaintext: Option<bool>,
    /// Most unwrapped keys held in memory [default: 100000].
    #[arg(long, env = "KEYBROKER_CACHE_MAX_ENTRIES")]
    pub cache_max_entries: Option<u64>,
    /// How long an unwrapped key is served from memory, e.g. 5m [default: 5m].
    #[arg(long, env = "KEYBROKER_CACHE_TTL", value_parser = humantime::parse_duration)]
    pub cache_ttl: Option<Duration>,
    /// Drop an unwrapped key unused for this long, e.g. 1m [default: 1m].
    #[arg(long, env = "KEYBROKER_CACHE_TTI", value_parser = humantime::parse_duration)]
    pub cache_tti: Option<Duration>,
    /// Deadline of every RPC on the server side [default: 10s].
    #[arg(long, env = "KEYBROKER_REQUEST_TIMEOUT", value_parser = humantime::parse_duration)]
    pub request_timeout: Option<Duration>,
    /// After SIGTERM, keep serving this long with health NOT_SERVING so load
    /// balancers drain, then finish in-flight RPCs and exit [default: 0s].
    #[arg(long, env = "KEYBROKER_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// After the grace period, how long in-flight RPCs and open connections
    /// may take to finish before the server exits anyway [default: 30s].
    #[arg(long, env = "KEYBROKER_SHUTDOWN_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub shutdown_drain_timeout: Option<Duration>,
    /// How often the platform keyring file is checked for rotation [default: 5s].
    #[arg(long, env = "KEYBROKER_KEYRING_RELOAD_INTERVAL", value_parser = humantime::parse_duration)]
    pub keyring_reload_interval: Option<Duration>,
    /// Log format [default: text].
    #[arg(long, env = "KEYBROKER_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Registry database: postgres://USER:PASSWORD@HOST/DB for replicas
    /// [default: SQLite file registry.db in the data dir].
    #[arg(long, env = "KEYBROKER_REGISTRY")]
    pub registry: Option<String>,
    /// How long a tenant's keys are served from memory before the registry is
    /// read again; bounds how stale another replica's change can be [default: 5s].
    #[arg(long, env = "KEYBROKER_REGISTRY_CACHE_TTL", value_parser = humantime::parse_duration)]
    pub registry_cache_ttl: Option<Duration>,
    /// How often key usage counters are written to the registry [default: 10s].
    #[arg(long, env = "KEYBROKER_USAGE_FLUSH_INTERVAL", value_parser = humantime::parse_duration)]
    pub usage_flush_interval: Option<Duration>,
    /// UnlinkKey is refused for a key used within this window unless forced
    /// [default: 24h].
    #[arg(long, env = "KEYBROKER_UNLINK_GUARD_WINDOW", value_parser = humantime::parse_duration)]
    pub unlink_guard_window: Option<Duration>,
    /// ARN of the platform's AWS identity that customers' trust policies name.
    #[arg(long, env = "KEYBROKER_AWS_PLATFORM_PRINCIPAL")]
    pub aws_platform_principal: Option<String>,
    /// The platform's GCP service account customers grant on their keys.
    #[arg(long, env = "KEYBROKER_GCP_SERVICE_ACCOUNT")]
    pub gcp_service_account: Option<String>,
    /// How often every customer key's state is checked with its provider:
    /// the revocation bound is about this plus one describe call [default: 30s].
    #[arg(long, env = "KEYBROKER_WATCHER_INTERVAL", value_parser = humantime::parse_duration)]
    pub watcher_interval: Option<Duration>,
    /// Key-state checks in flight at once [default: 16].
    #[arg(long, env = "KEYBROKER_WATCHER_CONCURRENCY")]
    pub watcher_concurrency: Option<usize>,
    /// At most one out-of-turn describe of a key per this interval, however
    /// many live requests see "disabled" or "access denied" [default: 1s].
    #[arg(long, env = "KEYBROKER_RECHECK_INTERVAL", value_parser = humantime::parse_duration)]
    pub recheck_interval: Option<Duration>,
    /// A client must finish its TLS handshake and send the HTTP/2 preface
    /// within this [default: 10s].
    #[arg(long, env = "KEYBROKER_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// Send an HTTP/2 PING after this long without frames [default: 60s].
    #[arg(long, env = "KEYBROKER_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Option<Duration>,
    /// Close the connection when a PING is unanswered this long [default: 20s].
    #[arg(long, env = "KEYBROKER_KEEPALIVE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Option<Duration>,
    /// Close a connection with no RPC in flight for this long [default: 10m].
    #[arg(long, env = "KEYBROKER_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Client connections open at once, further ones are closed at accept;
    /// also capped by the file descriptor limit minus 128 [default: 10000].
    #[arg(long, env = "KEYBROKER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Region of the platform's own STS calls [default: us-east-1].
    #[arg(long, env = "KEYBROKER_AWS_REGION")]
    pub aws_region: Option<String>,
    /// AWS KMS endpoint for every region (VPC or FIPS endpoint).
    #[arg(long, env = "KEYBROKER_AWS_KMS_ENDPOINT")]
    pub aws_kms_endpoint: Option<String>,
    /// AWS KMS endpoint of one region, repeatable: --aws-kms-region-endpoint us-east-1=https://...
    #[arg(long = "aws-kms-region-endpoint", value_parser = parse_region_endpoint)]
    pub aws_kms_region_endpoints: Vec<(String, String)>,
    /// AWS STS endpoint.
    #[arg(long, env = "KEYBROKER_AWS_STS_ENDPOINT")]
    pub aws_sts_endpoint: Option<String>,
    /// Lifetime of assumed customer-role sessions [default: 1h].
    #[arg(long, env = "KEYBROKER_AWS_SESSION_DURATION", value_parser = humantime::parse_duration)]
    pub aws_session_duration: Option<Duration>,
    /// Attempts per AWS call, first included; only transient errors retry [default: 3].
    #[arg(long, env = "KEYBROKER_AWS_MAX_ATTEMPTS")]
    pub aws_max_attempts: Option<u32>,
    /// Deadline of one AWS call attempt [default: 3s].
    #[arg(long, env = "KEYBROKER_AWS_ATTEMPT_TIMEOUT", value_parser = humantime::parse_duration)]
    pub aws_attempt_timeout: Option<Duration>,
    /// Deadline of one AWS call, retries included [default: 8s].
    #[arg(long, env = "KEYBROKER_AWS_OPERATION_TIMEOUT", value_parser = humantime::parse_duration)]
    pub aws_operation_timeout: Option<Duration>,
    /// Cloud KMS endpoint (regional, Private Service Connect, or an emulator)
    /// [default: https://cloudkms.googleapis.com].
    #[arg(long, env = "KEYBROKER_GCP_KMS_ENDPOINT")]
    pub gcp_kms_endpoint: Option<String>,
    /// keybroker's Google identity: `default` (Application Default
    /// Credentials: Workload Identity, GOOGLE_APPLICATION_CREDENTIALS) or
    /// `anonymous` (emulators only) [default: default].
    #[arg(long, env = "KEYBROKER_GCP_CREDENTIALS")]
    pub gcp_credentials: Option<String>,
    /// Attempts per Cloud KMS call, first included; only transient errors
    /// retry [default: 3].
    #[arg(long, env = "KEYBROKER_GCP_MAX_ATTEMPTS")]
    pub gcp_max_attempts: Option<u32>,
    /// Deadline of one Cloud KMS call attempt [default: 3s].
    #[arg(long, env = "KEYBROKER_GCP_ATTEMPT_TIMEOUT", value_parser = humantime::parse_duration)]
    pub gcp_attempt_timeout: Option<Duration>,
    /// Deadline of one Cloud KMS call, retries included [default: 8s].
    #[arg(long, env = "KEYBROKER_GCP_OPERATION_TIMEOUT", value_parser = humantime::parse_duration)]
    pub gcp_operation_timeout: Option<Duration>,
    /// Server certificate chain (PEM). With --tls-key and --tls-client-ca,
    /// serves mTLS: every caller presents a certificate from that CA.
    #[arg(long, env = "KEYBROKER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "KEYBROKER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that issue caller certificates.
    #[arg(long, env = "KEYBROKER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// SPIFFE trust domain whose IDs are accepted, repeatable [default: any
    /// the client CA issues for].
    #[arg(
        long = "tls-trust-domain",
        env = "KEYBROKER_TLS_TRUST_DOMAINS",
        value_delimiter = ','
    )]
    pub tls_trust_domains: Vec<String>,
    /// Authorization policy file (TOML); required with TLS. Without it, a
    /// plaintext loopback server allows every call.
    #[arg(long, env = "KEYBROKER_AUTHZ_POLICY")]
    pub authz_policy: Option<PathBuf>,
    /// How often TLS files and the policy are checked for changes [default: 10s].
    #[arg(long, env = "KEYBROKER_RELOAD_INTERVAL", value_parser = humantime::parse_duration)]
    pub reload_interval: Option<Duration>,
    /// Audit log: off, stdout, or a file path [default: off].
    #[arg(long, env = "KEYBROKER_AUDIT_LOG")]
    pub audit_log: Option<String>,
    /// Rotate the audit file past this size in bytes [default: 104857600].
    #[arg(long, env = "KEYBROKER_AUDIT_MAX_BYTES")]
    pub audit_max_bytes: Option<u64>,
    /// Rotated audit files kept [default: 5].
    #[arg(long, env = "KEYBROKER_AUDIT_MAX_FILES")]
    pub audit_max_files: Option<u32>,
    /// Refuse a call (UNAVAILABLE, no key returned) when its audit record
    /// cannot be written.
    #[arg(long, env = "KEYBROKER_AUDIT_FAIL_CLOSED", num_args = 0..=1, default_missing_value = "true")]
    pub audit_fail_closed: Option<bool>,
    /// KMS calls per second one tenant may cause; 0 = unlimited [default: 100].
    #[arg(long, env = "KEYBROKER_QUOTA_TENANT_RATE")]
    pub quota_tenant_rate: Option<u32>,
    /// Burst of a tenant's KMS calls [default: 200].
    #[arg(long, env = "KEYBROKER_QUOTA_TENANT_BURST")]
    pub quota_tenant_burst: Option<u32>,
    /// KMS calls per second of the whole server; 0 = unlimited [default: 2000].
    #[arg(long, env = "KEYBROKER_QUOTA_GLOBAL_RATE")]
    pub quota_global_rate: Option<u32>,
    /// Burst of the server's KMS calls [default: 4000].
    #[arg(long, env = "KEYBROKER_QUOTA_GLOBAL_BURST")]
    pub quota_global_burst: Option<u32>,
    /// Serve plaintext gRPC health checks (only) on this address, for
    /// kubelet probes when the main port is mTLS [default: off].
    #[arg(long, env = "KEYBROKER_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Export a span per RPC over OTLP/gRPC to this collector, e.g.
    /// http://otel-collector:4317 [default: off].
    #[arg(long, env = "KEYBROKER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Serve Prometheus metrics on this address (`/metrics`), e.g. 0.0.0.0:9090
    /// [default: off].
    #[arg(long, env = "KEYBROKER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Add a tenant label to RPC metrics (one series per tenant: only for
    /// small deployments).
    #[arg(long, env = "KEYBROKER_METRICS_TENANT_LABELS", num_args = 0..=1, default_missing_value = "true")]
    pub metrics_tenant_labels: Option<bool>,
    /// Debugging only: leave core dumps and ptrace attach enabled (a core
    /// file would contain unwrapped keys).
    #[arg(long, env = "KEYBROKER_ALLOW_CORE_DUMPS", num_args = 0..=1, default_missing_value = "true")]
    pub allow_core_dumps: Option<bool>,
}

fn parse_region_endpoint(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(r, u)| (r.to_owned(), u.to_owned()))
        .ok_or_else(|| format!("{text:?} is not REGION=URL"))
}

/// The config file: the same settings as the flags, durations as "5m".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    insecure_plaintext: Option<bool>,
    cache_max_entries: Option<u64>,
    cache_ttl: Option<String>,
    cache_tti: Option<String>,
    request_timeout: Option<String>,
    shutdown_grace: Option<String>,
    shutdown_drain_timeout: Option<String>,
    keyring_reload_interval: Option<String>,
    log_format: Option<LogFormat>,
    registry: Option<String>,
    registry_cache_ttl: Option<String>,
    usage_flush_interval: Option<String>,
    unlink_guard_window: Option<String>,
    aws_platform_principal: Option<String>,
    gcp_service_account: Option<String>,
    watcher_interval: Option<String>,
    watcher_concurrency: Option<usize>,
    recheck_interval: Option<String>,
    handshake_timeout: Option<String>,
    keepalive_interval: Option<String>,
    keepalive_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<usize>,
    aws_region: Option<String>,
    aws_kms_endpoint: Option<String>,
    #[serde(default)]
    aws_kms_region_endpoints: std::collections::HashMap<String, String>,
    aws_sts_endpoint: Option<String>,
    aws_session_duration: Option<String>,
    aws_max_attempts: Option<u32>,
    aws_attempt_timeout: Option<String>,
    aws_operation_timeout: Option<String>,
    gcp_kms_endpoint: Option<String>,
    gcp_credentials: Option<String>,
    gcp_max_attempts: Option<u32>,
    gcp_attempt_timeout: Option<String>,
    gcp_operation_timeout: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    #[serde(default)]
    tls_trust_domains: Vec<String>,
    authz_policy: Option<PathBuf>,
    reload_interval: Option<String>,
    audit_log: Option<String>,
    audit_max_bytes: Option<u64>,
    audit_max_files: Option<u32>,
    audit_fail_closed: Option<bool>,
    quota_tenant_rate: Option<u32>,
    quota_tenant_burst: Option<u32>,
    quota_global_rate: Option<u32>,
    quota_global_burst: Option<u32>,
    allow_core_dumps: Option<bool>,
    metrics_listen: Option<SocketAddr>,
    metrics_tenant_labels: Option<bool>,
    health_listen: Option<SocketAddr>,
    otlp_endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("invalid setting {setting}: {reason}")]
    Invalid {
        setting: &'static str,
        reason: String,
    },
}

#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub insecure_plaintext: bool,
    pub cache: CacheSettings,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub shutdown_drain_timeout: Duration,
    pub keyring_reload_interval: Duration,
    pub log_format: LogFormat,
    /// Database URL; `None` is the SQLite file in the data dir. May hold a
    /// password: `Debug` redacts it.
    pub registry: Option<String>,
    pub registry_cache_ttl: Duration,
    pub usage_flush_interval: Duration,
    pub unlink_guard_window: Duration,
    pub aws_platform_principal: Option<String>,
    pub gcp_service_account: Option<String>,
    pub watcher: WatcherSettings,
    /// Client connection limits and timeouts.
    pub connections: ConnectionSettings,
    pub aws: AwsSettings,
    pub gcp: GcpSettings,
    /// mTLS on the listener; `None` is plaintext (loopback only, unless
    /// `insecure_plaintext`).
    pub tls: Option<TlsSettings>,
    /// `None` allows every call: plaintext development servers only.
    pub authz_policy: Option<PathBuf>,
    /// How often TLS files and the policy are checked for changes.
    pub reload_interval: Duration,
    pub audit: AuditSettings,
    pub quota: QuotaSettings,
    pub allow_core_dumps: bool,
    /// OTLP/gRPC collector for RPC spans; `None` exports nothing.
    pub otlp_endpoint: Option<String>,
    /// Plaintext health-only gRPC endpoint for probes.
    pub health_listen: Option<SocketAddr>,
    /// Prometheus endpoint; `None` serves no metrics.
    pub metrics_listen: Option<SocketAddr>,
    pub metrics_tenant_labels: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("insecure_plaintext", &self.insecure_plaintext)
            .field("cache", &self.cache)
            .field("request_timeout", &self.request_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("shutdown_drain_timeout", &self.shutdown_drain_timeout)
            .field("keyring_reload_interval", &self.keyring_reload_interval)
            .field("log_format", &self.log_format)
            .field("registry", &self.registry.as_deref().map(redact_url))
            .field("registry_cache_ttl", &self.registry_cache_ttl)
            .field("usage_flush_interval", &self.usage_flush_interval)
            .field("unlink_guard_window", &self.unlink_guard_window)
            .field("aws_platform_principal", &self.aws_platform_principal)
            .field("gcp_service_account", &self.gcp_service_account)
            .field("watcher", &self.watcher)
            .field("connections", &self.connections)
            .field("aws", &self.aws)
            .field("gcp", &self.gcp)
            .field("tls", &self.tls)
            .field("authz_policy", &self.authz_policy)
            .field("reload_interval", &self.reload_interval)
            .field("audit", &self.audit)
            .field("quota", &self.quota)
            .field("allow_core_dumps", &self.allow_core_dumps)
            .field("health_listen", &self.health_listen)
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("metrics_listen", &self.metrics_listen)
            .field("metrics_tenant_labels", &self.metrics_tenant_labels)
            .finish()
    }
}

/// `scheme://user:secret@host/db` → `scheme://user:<redacted>@host/db`; also
/// redacts `password=` query parameters.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                out = format!("{scheme}://{user}:<redacted>@{host}");
            }
        }
    }
    if let Some(i) = out.find("password=") {
        let end = out[i..].find('&').map_or(out.len(), |j| i + j);
        out.replace_range(i + "password=".len()..end, "<redacted>");
    }
    out
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("./data"),
            insecure_plaintext: false,
            cache: CacheSettings {
                max_entries: 100_000,
                ttl: Duration::from_secs(300),
                tti: Duration::from_secs(60),
            },
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::ZERO,
            shutdown_drain_timeout: Duration::from_secs(30),
            keyring_reload_interval: Duration::from_secs(5),
            log_format: LogFormat::Text,
            registry: None,
            registry_cache_ttl: Duration::from_secs(5),
            usage_flush_interval: Duration::from_secs(10),
            unlink_guard_window: Duration::from_secs(24 * 3600),
            aws_platform_principal: None,
            gcp_service_account: None,
            watcher: WatcherSettings {
                interval: Duration::from_secs(30),
                concurrency: 16,
                recheck_interval: crate::registry::directory::DEFAULT_RECHECK_INTERVAL,
            },
            connections: ConnectionSettings::default(),
            aws: AwsSettings::default(),
            gcp: GcpSettings::default(),
            tls: None,
            authz_policy: None,
            reload_interval: Duration::from_secs(10),
            audit: AuditSettings::default(),
            quota: QuotaSettings::default(),
            allow_core_dumps: false,
            health_listen: None,
            otlp_endpoint: None,
            metrics_listen: None,
            metrics_tenant_labels: false,
        }
    }
}

impl Config {
    /// Defaults, overlaid by the file, then by flags and environment.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let d = Self::default();
        let duration =
            |setting, flag: Option<Duration>, file: &Option<String>, default| match (flag, file) {
                (Some(v), _) => Ok(v),
                (None, Some(text)) => {
                    humantime::parse_duration(text).map_err(|e| ConfigError::Invalid {
                        setting,
                        reason: format!("{text:?}: {e} (use e.g. \"30s\", \"5m\")"),
                    })
                }
                (None, None) => Ok(default),
            };
        let config = Self {
            listen: args.listen.or(file.listen).unwrap_or(d.listen),
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir.clone())
                .unwrap_or(d.data_dir),
            insecure_plaintext: args
                .insecure_plaintext
                .or(file.insecure_plaintext)
                .unwrap_or(d.insecure_plaintext),
            cache: CacheSettings {
                max_entries: args
                    .cache_max_entries
                    .or(file.cache_max_entries)
                    .unwrap_or(d.cache.max_entries),
                ttl: duration("cache_ttl", args.cache_ttl, &file.cache_ttl, d.cache.ttl)?,
                tti: duration("cache_tti", args.cache_tti, &file.cache_tti, d.cache.tti)?,
            },
            request_timeout: duration(
                "request_timeout",
                args.request_timeout,
                &file.request_timeout,
                d.request_timeout,
            )?,
            shutdown_grace: duration(
                "shutdown_grace",
                args.shutdown_grace,
                &file.shutdown_grace,
                d.shutdown_grace,
            )?,
            shutdown_drain_timeout: duration(
                "shutdown_drain_timeout",
                args.shutdown_drain_timeout,
                &file.shutdown_drain_timeout,
                d.shutdown_drain_timeout,
            )?,
            keyring_reload_interval: duration(
                "keyring_reload_interval",
                args.keyring_reload_interval,
                &file.keyring_reload_interval,
                d.keyring_reload_interval,
            )?,
            log_format: args.log_format.or(file.log_format).unwrap_or(d.log_format),
            registry: args.registry.clone().or(file.registry.clone()),
            registry_cache_ttl: duration(
                "registry_cache_ttl",
                args.registry_cache_ttl,
                &file.registry_cache_ttl,
                d.registry_cache_ttl,
            )?,
            usage_flush_interval: duration(
                "usage_flush_interval",
                args.usage_flush_interval,
                &file.usage_flush_interval,
                d.usage_flush_interval,
            )?,
            unlink_guard_window: duration(
                "unlink_guard_window",
                args.unlink_guard_window,
                &file.unlink_guard_window,
                d.unlink_guard_window,
            )?,
            aws_platform_principal: args
                .aws_platform_principal
                .clone()
                .or(file.aws_platform_principal.clone()),
            gcp_service_account: args
                .gcp_service_account
                .clone()
                .or(file.gcp_service_account.clone()),
            watcher: WatcherSettings {
                interval: duration(
                    "watcher_interval",
                    args.watcher_interval,
                    &file.watcher_interval,
                    d.watcher.interval,
                )?,
                concurrency: args
                    .watcher_concurrency
                    .or(file.watcher_concurrency)
                    .unwrap_or(d.watcher.concurrency),
                recheck_interval: duration(
                    "recheck_interval",
                    args.recheck_interval,
                    &file.recheck_interval,
                    d.watcher.recheck_interval,
                )?,
            },
            connections: ConnectionSettings {
                handshake_timeout: duration(
                    "handshake_timeout",
                    args.handshake_timeout,
                    &file.handshake_timeout,
                    d.connections.handshake_timeout,
                )?,
                keepalive_interval: duration(
                    "keepalive_interval",
                    args.keepalive_interval,
                    &file.keepalive_interval,
                    d.connections.keepalive_interval,
                )?,
                keepalive_timeout: duration(
                    "keepalive_timeout",
                    args.keepalive_timeout,
                    &file.keepalive_timeout,
                    d.connections.keepalive_timeout,
                )?,
                idle_timeout: duration(
                    "idle_timeout",
                    args.idle_timeout,
                    &file.idle_timeout,
                    d.connections.idle_timeout,
                )?,
                max_connections: args
                    .max_connections
                    .or(file.max_connections)
                    .unwrap_or(d.connections.max_connections),
            },
            aws: AwsSettings {
                region: args
                    .aws_region
                    .clone()
                    .or(file.aws_region.clone())
                    .unwrap_or(d.aws.region),
                kms_endpoint: args
                    .aws_kms_endpoint
                    .clone()
                    .or(file.aws_kms_endpoint.clone()),
                kms_region_endpoints: file
                    .aws_kms_region_endpoints
                    .clone()
                    .into_iter()
                    .chain(args.aws_kms_region_endpoints.iter().cloned())
                    .collect(),
                sts_endpoint: args
                    .aws_sts_endpoint
                    .clone()
                    .or(file.aws_sts_endpoint.clone()),
                session_duration: duration(
                    "aws_session_duration",
                    args.aws_session_duration,
                    &file.aws_session_duration,
                    d.aws.session_duration,
                )?,
                max_attempts: args
                    .aws_max_attempts
                    .or(file.aws_max_attempts)
                    .unwrap_or(d.aws.max_attempts),
                connect_timeout: d.aws.connect_timeout,
                attempt_timeout: duration(
                    "aws_attempt_timeout",
                    args.aws_attempt_timeout,
                    &file.aws_attempt_timeout,
                    d.aws.attempt_timeout,
                )?,
                operation_timeout: duration(
                    "aws_operation_timeout",
                    args.aws_operation_timeout,
                    &file.aws_operation_timeout,
                    d.aws.operation_timeout,
                )?,
            },
            gcp: GcpSettings {
                endpoint: args
                    .gcp_kms_endpoint
                    .clone()
                    .or(file.gcp_kms_endpoint.clone()),
                credentials: match args
                    .gcp_credentials
                    .as_ref()
                    .or(file.gcp_credentials.as_ref())
                {
                    Some(text) => text.parse().map_err(|reason| ConfigError::Invalid {
                        setting: "gcp_credentials",
                        reason,
                    })?,
                    None => GcpCredentials::default(),
                },
                max_attempts: args
                    .gcp_max_attempts
                    .or(file.gcp_max_attempts)
                    .unwrap_or(d.gcp.max_attempts),
                attempt_timeout: duration(
                    "gcp_attempt_timeout",
                    args.gcp_attempt_timeout,
                    &file.gcp_attempt_timeout,
                    d.gcp.attempt_timeout,
                )?,
                operation_timeout: duration(
                    "gcp_operation_timeout",
                    args.gcp_operation_timeout,
                    &file.gcp_operation_timeout,
                    d.gcp.operation_timeout,
                )?,
            },
            reload_interval: duration(
                "reload_interval",
                args.reload_interval,
                &file.reload_interval,
                d.reload_interval,
            )?,
            tls: None,
            authz_policy: args.authz_policy.clone().or(file.authz_policy.clone()),
            audit: AuditSettings {
                target: match args.audit_log.as_ref().or(file.audit_log.as_ref()) {
                    Some(text) => text.parse().map_err(|reason| ConfigError::Invalid {
                        setting: "audit_log",
                        reason,
                    })?,
                    None => d.audit.target.clone(),
                },
                max_bytes: args
                    .audit_max_bytes
                    .or(file.audit_max_bytes)
                    .unwrap_or(d.audit.max_bytes),
                max_files: args
                    .audit_max_files
                    .or(file.audit_max_files)
                    .unwrap_or(d.audit.max_files),
                fail_closed: args
                    .audit_fail_closed
                    .or(file.audit_fail_closed)
                    .unwrap_or(d.audit.fail_closed),
            },
            quota: QuotaSettings {
                tenant: Limit {
                    per_second: args
                        .quota_tenant_rate
                        .or(file.quota_tenant_rate)
                        .unwrap_or(d.quota.tenant.per_second),
                    burst: args
                        .quota_tenant_burst
                        .or(file.quota_tenant_burst)
                        .unwrap_or(d.quota.tenant.burst),
                },
                global: Limit {
                    per_second: args
                        .quota_global_rate
                        .or(file.quota_global_rate)
                        .unwrap_or(d.quota.global.per_second),
                    burst: args
                        .quota_global_burst
                        .or(file.quota_global_burst)
                        .unwrap_or(d.quota.global.burst),
                },
            },
            allow_core_dumps: args
                .allow_core_dumps
                .or(file.allow_core_dumps)
                .unwrap_or(d.allow_core_dumps),
            health_listen: args.health_listen.or(file.health_listen),
            otlp_endpoint: args.otlp_endpoint.clone().or(file.otlp_endpoint.clone()),
            metrics_listen: args.metrics_listen.or(file.metrics_listen),
            metrics_tenant_labels: args
                .metrics_tenant_labels
                .or(file.metrics_tenant_labels)
                .unwrap_or(d.metrics_tenant_labels),
        };
        let tls_files = (
            args.tls_cert.clone().or(file.tls_cert.clone()),
            args.tls_key.clone().or(file.tls_key.clone()),
            args.tls_client_ca.clone().or(file.tls_client_ca.clone()),
        );
        let mut config = config;
        config.tls = match tls_files {
            (Some(cert), Some(key), Some(client_ca)) => Some(TlsSettings {
                cert,
                key,
                client_ca,
                trust_domains: if args.tls_trust_domains.is_empty() {
                    file.tls_trust_domains.clone()
                } else {
                    args.tls_trust_domains.clone()
                },
                reload_interval: config.reload_interval,
            }),
            (None, None, None) => None,
            _ => {
                return Err(ConfigError::Invalid {
                    setting: "tls_cert/tls_key/tls_client_ca",
                    reason: "give all three (mTLS) or none (plaintext on loopback)".into(),
                });
            }
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting, reason: &str| {
            Err(ConfigError::Invalid {
                setting,
                reason: reason.to_owned(),
            })
        };
        if self.tls.is_some() && self.authz_policy.is_none() {
            return invalid(
                "authz_policy",
                "is required with TLS: without a policy every caller with a certificate \
                 from the client CA could unwrap every tenant's keys",
            );
        }
        if self.reload_interval.is_zero() {
            return invalid("reload_interval", "must be longer than zero");
        }
        if self.audit.max_bytes < 4096 {
            return invalid("audit_max_bytes", "must be at least 4096");
        }
        if !self.listen.ip().is_loopback() && !self.insecure_plaintext && self.tls.is_none() {
            return invalid(
                "listen",
                &format!(
                    "{} is not a loopback address and TLS is not configured; plaintext gRPC \
                     would expose keys on the network. Listen on 127.0.0.1, or pass \
                     --insecure-plaintext if a trusted proxy terminates TLS",
                    self.listen
                ),
            );
        }
        if !self.listen.ip().is_loopback() && self.tls.is_none() && self.authz_policy.is_none() {
            return invalid(
                "authz_policy",
                &format!(
                    "is required to serve plaintext on {}, a non-loopback address: without a \
                     policy every caller on the network could call every method for every \
                     tenant. Give --authz-policy (plaintext callers are 'unauthenticated'), or \
                     listen on 127.0.0.1",
                    self.listen
                ),
            );
        }
        if self.cache.max_entries == 0 {
            return invalid("cache_max_entries", "must be at least 1");
        }
        if self.cache.ttl.is_zero() || self.cache.tti.is_zero() {
            return invalid("cache_ttl/cache_tti", "must be longer than zero");
        }
        if self.cache.tti > self.cache.ttl {
            return invalid(
                "cache_tti",
                "must not be longer than cache_ttl (an entry never outlives its TTL)",
            );
        }
        if self.request_timeout.is_zero() {
            return invalid("request_timeout", "must be longer than zero");
        }
        if self.keyring_reload_interval.is_zero() {
            return invalid("keyring_reload_interval", "must be longer than zero");
        }
        if self.registry_cache_ttl.is_zero() || self.usage_flush_interval.is_zero() {
            return invalid(
                "registry_cache_ttl/usage_flush_interval",
                "must be longer than zero",
            );
        }
        let c = &self.connections;
        if c.handshake_timeout.is_zero()
            || c.keepalive_interval.is_zero()
            || c.keepalive_timeout.is_zero()
            || c.idle_timeout.is_zero()
        {
            return invalid(
                "handshake_timeout/keepalive_interval/keepalive_timeout/idle_timeout",
                "must be longer than zero",
            );
        }
        if c.max_connections == 0 {
            return invalid("max_connections", "must be at least 1");
        }
        if self.watcher.recheck_interval.is_zero() {
            return invalid(
                "recheck_interval",
                "must be longer than zero (it rate-limits describes that requests trigger)",
            );
        }
        if self.watcher.interval.is_zero() || self.watcher.concurrency == 0 {
            return invalid(
                "watcher_interval/watcher_concurrency",
                "must be longer than zero / at least 1",
            );
        }
        let session = self.aws.session_duration.as_secs();
        if !(900..=43_200).contains(&session) {
            return invalid(
                "aws_session_duration",
                "must be between 15m and 12h (the limits of STS AssumeRole)",
            );
        }
        if self.aws.max_attempts == 0 || self.aws.max_attempts > 10 {
            return invalid("aws_max_attempts", "must be 1 to 10");
        }
        if self.aws.attempt_timeout > self.aws.operation_timeout {
            return invalid(
                "aws_attempt_timeout",
                "must not be longer than aws_operation_timeout",
            );
        }
        if self.gcp.max_attempts == 0 || self.gcp.max_attempts > 10 {
            return invalid("gcp_max_attempts", "must be 1 to 10");
        }
        if self.gcp.attempt_timeout > self.gcp.operation_timeout {
            return invalid(
                "gcp_attempt_timeout",
                "must not be longer than gcp_operation_timeout",
            );
        }
        if let Some(url) = &self.gcp.endpoint
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return invalid("gcp_kms_endpoint", "must be an http:// or https:// URL");
        }
        if let Some(url) = &self.registry {
            if !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("sqlite://"))
            {
                return invalid(
                    "registry",
                    "must be a postgres://, postgresql:// or sqlite:// URL",
                );
            }
        }
        Ok(())
    }

    pub fn platform_keyring_path(&self) -> PathBuf {
        platform_keyring_path(&self.data_dir)
    }
}

pub fn platform_keyring_path(data_dir: &Path) -> PathBuf {
    data_dir.join("platform-keyring.json")
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_database_password() {
        let config = Config {
            registry: Some("postgres://kb:s3cret@db:5432/kb?sslmode=require&password=other".into()),
            ..Config::default()
        };
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("other"),
            "{shown}"
        );
        assert!(shown.contains("kb:<redacted>@db:5432"), "{shown}");
    }

    #[test]
    fn defaults_validate() {
        Config::load(&ServeArgs::default()).unwrap();
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "cache_ttl = \"2m\"\ncache_tti = \"30s\"\nlisten = \"127.0.0.1:6000\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            ..Default::default()
        };
        let config = Config::load(&args).unwrap();
        assert_eq!(config.listen.port(), 7000);
        assert_eq!(config.cache.ttl, Duration::from_secs(120));
        assert_eq!(config.cache.tti, Duration::from_secs(30));
    }

    #[test]
    fn refuses_plaintext_on_the_network_and_bad_values() {
        let mut args = ServeArgs {
            listen: Some("0.0.0.0:50051".parse().unwrap()),
            ..Default::default()
        };
        let err = Config::load(&args).unwrap_err().to_string();
        assert!(err.contains("--insecure-plaintext"), "{err}");
        // Plaintext on the network without a policy would let every network
        // caller call everything for every tenant.
        args.insecure_plaintext = Some(true);
        let err = Config::load(&args).unwrap_err().to_string();
        assert!(
            err.contains("authz_policy") && err.contains("every caller on the network"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, "").unwrap();
        args.authz_policy = Some(policy);
        Config::load(&args).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, "cache_ttl = \"soon\"\n").unwrap();
        let err = Config::load(&ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("cache_ttl"), "{err}");
        std::fs::write(&path, "cache_tll = \"1m\"\n").unwrap();
        let err = Config::load(&ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn connection_settings_load_and_validate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "handshake_timeout = \"2s\"\nidle_timeout = \"1m\"\nmax_connections = 64\n\
             keepalive_interval = \"5s\"\nkeepalive_timeout = \"3s\"\nrecheck_interval = \"2s\"\n",
        )
        .unwrap();
        let config = Config::load(&ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
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
        std::fs::write(&path, "max_connections = 0\n").unwrap();
        let err = Config::load(&ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_connections"), "{err}");
    }

    #[test]
    fn gcp_settings_load_and_validate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "gcp_kms_endpoint = \"https://cloudkms.europe-west1.rep.googleapis.com\"\n\
             gcp_credentials = \"anonymous\"\ngcp_attempt_timeout = \"1s\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            gcp_max_attempts: Some(5),
            ..Default::default()
        };
        let config = Config::load(&args).unwrap();
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
            std::fs::write(&path, text).unwrap();
            let err = Config::load(&ServeArgs {
                config: Some(path.clone()),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(setting), "{text}: {err}");
        }
    }
}
