//! The `server` section: where keybroker listens, where it keeps its data,
//! how long requests and shutdowns may take.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use humantime::parse_duration;

use crate::settings::{ConfigError, invalid};

#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ServerSettings {
    /// Address to listen on.
    #[arg(
        id = "listen",
        long = "listen",
        env = "KEYBROKER_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,
    /// Directory for the platform keyring and the registry.
    #[arg(
        id = "data_dir",
        long = "data-dir",
        env = "KEYBROKER_DATA_DIR",
        default_value = "./data"
    )]
    pub data_dir: PathBuf,
    /// Allow plaintext gRPC on a non-loopback address (only behind a trusted
    /// proxy or mesh that terminates TLS).
    #[arg(
        id = "insecure_plaintext",
        long = "insecure-plaintext",
        env = "KEYBROKER_INSECURE_PLAINTEXT",
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true"
    )]
    pub insecure_plaintext: bool,
    /// Deadline of every RPC on the server side.
    #[arg(id = "request_timeout", long = "request-timeout", env = "KEYBROKER_REQUEST_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub request_timeout: Duration,
    /// After SIGTERM, keep serving this long with health NOT_SERVING so load
    /// balancers drain, then finish in-flight RPCs and exit.
    #[arg(id = "shutdown_grace", long = "shutdown-grace", env = "KEYBROKER_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "0s")]
    pub shutdown_grace: Duration,
    /// After the grace period, how long in-flight RPCs and open connections
    /// may take to finish before the server exits anyway.
    #[arg(id = "shutdown_drain_timeout", long = "shutdown-drain-timeout", env = "KEYBROKER_SHUTDOWN_DRAIN_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub shutdown_drain_timeout: Duration,
    /// How often the platform keyring file is checked for rotation.
    #[arg(id = "keyring_reload_interval", long = "keyring-reload-interval", env = "KEYBROKER_KEYRING_RELOAD_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub keyring_reload_interval: Duration,
    /// Add a new platform keyring version when the newest is older than this
    /// (checked every keyring_reload_interval; one rotation per period across
    /// replicas, through the registry). Old versions keep decrypting. Only
    /// for a keyring file every replica reads (one node, or one shared
    /// volume): replicas holding copies would not see each other's new
    /// version. A read-only keyring (mounted Secret) is reported due, not
    /// rotated. 0s (the default) never rotates.
    #[arg(id = "platform_keyring_rotation_period", long = "platform-keyring-rotation-period", env = "KEYBROKER_PLATFORM_KEYRING_ROTATION_PERIOD", value_parser = parse_duration, default_value = "0s")]
    pub platform_keyring_rotation_period: Duration,
    /// Wrapped keys of the legacy local layout (platform key and imported
    /// material, written before the per-wrap-key construction): `predating`
    /// reads them under key versions made before the upgrade to per-wrap
    /// keys only (a version made since cannot have any), `accept` under
    /// every version (both counted in keybroker_legacy_local_unwraps_total);
    /// `refuse` answers FAILED_PRECONDITION naming this setting.
    #[arg(
        id = "legacy_local_wraps",
        long = "legacy-local-wraps",
        env = "KEYBROKER_LEGACY_LOCAL_WRAPS",
        value_enum,
        default_value = "predating"
    )]
    pub legacy_local_wraps: crate::kms::local::LegacyWraps,
    /// Seal the platform keyring under an AES key in the HSM
    /// (`pkcs11:token=<label>;object=<label>`, with pkcs11_module and its
    /// PIN): the keyring file then holds its versions only sealed by that
    /// key, which never leaves the token. An existing plain keyring is moved
    /// with `keybroker keyring seal` [default: a plain keyring file].
    #[arg(
        id = "platform_key",
        long = "platform-key",
        env = "KEYBROKER_PLATFORM_KEY"
    )]
    pub platform_key: Option<String>,
    /// Authorization policy file (TOML); required with TLS. Without it, a
    /// plaintext loopback server allows every call.
    #[arg(
        id = "authz_policy",
        long = "authz-policy",
        env = "KEYBROKER_AUTHZ_POLICY"
    )]
    pub authz_policy: Option<PathBuf>,
    /// Serve plaintext gRPC health checks (only) on this address, for
    /// kubelet probes when the main port is mTLS [default: off].
    #[arg(
        id = "health_listen",
        long = "health-listen",
        env = "KEYBROKER_HEALTH_LISTEN"
    )]
    pub health_listen: Option<SocketAddr>,
    /// Debugging only: leave core dumps and ptrace attach enabled (a core
    /// file would contain unwrapped keys).
    #[arg(
        id = "allow_core_dumps",
        long = "allow-core-dumps",
        env = "KEYBROKER_ALLOW_CORE_DUMPS",
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true"
    )]
    pub allow_core_dumps: bool,
    /// The request header that carries the tenant for tenant affinity: a
    /// gRPC client's `ring_hash` policy hashes it to pick the replica, so a
    /// tenant's cold keys are loaded by one replica, not all (docs/fleet.md).
    /// Affinity is an optimisation: a call is served the same on
    /// any replica; `keybroker_affinity_header_total` counts calls whose
    /// header is absent or names another tenant.
    #[arg(
        id = "affinity_header",
        long = "affinity-header",
        env = "KEYBROKER_AFFINITY_HEADER",
        default_value = crate::api::affinity::DEFAULT_HEADER
    )]
    pub affinity_header: String,
}

impl Default for ServerSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl ServerSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.request_timeout.is_zero() {
            return invalid("request_timeout", "must be longer than zero");
        }
        if self.keyring_reload_interval.is_zero() {
            return invalid("keyring_reload_interval", "must be longer than zero");
        }
        if let Err(reason) = crate::api::affinity::parse_header(&self.affinity_header) {
            return invalid("affinity_header", &reason);
        }
        if let Some(key) = &self.platform_key
            && let Err(e) = crate::kms::pkcs11::Pkcs11KeyRef::parse(key)
        {
            return invalid("platform_key", &e.to_string());
        }
        Ok(())
    }

    pub fn platform_keyring_path(&self) -> PathBuf {
        super::platform_keyring_path(&self.data_dir)
    }
}
