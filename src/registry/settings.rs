//! The `registry_*` settings.

use super::*;

/// The `registry*` and `usage_flush_interval` settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RegistrySettings {
    /// Registry database: postgres://USER:PASSWORD@HOST/DB for replicas
    /// [default: SQLite file registry.db in the data dir].
    #[arg(id = "registry", long = "registry", env = "KEYBROKER_REGISTRY")]
    pub url: Option<crate::secret::SecretUrl>,
    /// How long a tenant's keys are served from memory before the registry is
    /// read again; bounds how stale another replica's change can be.
    #[arg(id = "registry_cache_ttl", long = "registry-cache-ttl", env = "KEYBROKER_REGISTRY_CACHE_TTL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub cache_ttl: std::time::Duration,
    /// How long past `registry_cache_ttl` a tenant's keys keep being served
    /// as last read while the registry does not answer (a restart, a
    /// failover). Also the bound on how long a replica cut off from the
    /// registry can miss another replica's DisableKey or DeleteTenant:
    /// keep it short of what a revocation may take (docs/operations.md).
    #[arg(id = "registry_outage_grace", long = "registry-outage-grace", env = "KEYBROKER_REGISTRY_OUTAGE_GRACE", value_parser = humantime::parse_duration, default_value = "2m")]
    pub outage_grace: std::time::Duration,
    /// A registry read on the request path (a tenant's view) gives up after
    /// this long; the caller gets the view as last read within the grace, or
    /// UNAVAILABLE.
    #[arg(id = "registry_read_timeout", long = "registry-read-timeout", env = "KEYBROKER_REGISTRY_READ_TIMEOUT", value_parser = humantime::parse_duration, default_value = "500ms")]
    pub read_timeout: std::time::Duration,
    /// A registry write on the request path (minting a tenant key version,
    /// registering a tenant on its first wrap) gives up after this long and
    /// answers UNAVAILABLE with a retry delay.
    #[arg(id = "registry_write_timeout", long = "registry-write-timeout", env = "KEYBROKER_REGISTRY_WRITE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "2s")]
    pub write_timeout: std::time::Duration,
    /// Connections to the registry, at most.
    #[arg(
        id = "registry_pool_size",
        long = "registry-pool-size",
        env = "KEYBROKER_REGISTRY_POOL_SIZE",
        default_value = "10"
    )]
    pub pool_size: u32,
    /// How long an admin operation waits for a registry connection.
    #[arg(id = "registry_acquire_timeout", long = "registry-acquire-timeout", env = "KEYBROKER_REGISTRY_ACQUIRE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "3s")]
    pub acquire_timeout: std::time::Duration,
    /// PostgreSQL's statement_timeout for every registry connection.
    #[arg(id = "registry_statement_timeout", long = "registry-statement-timeout", env = "KEYBROKER_REGISTRY_STATEMENT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub statement_timeout: std::time::Duration,
    /// How often key usage counters are written to the registry.
    #[arg(id = "usage_flush_interval", long = "usage-flush-interval", env = "KEYBROKER_USAGE_FLUSH_INTERVAL", value_parser = humantime::parse_duration, default_value = "10s")]
    pub usage_flush_interval: std::time::Duration,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl RegistrySettings {
    /// How tenant views are kept (see `views`).
    pub fn views(&self) -> views::ViewSettings {
        views::ViewSettings {
            ttl: self.cache_ttl,
            outage_grace: self.outage_grace,
            read_timeout: self.read_timeout,
            write_timeout: self.write_timeout,
        }
    }

    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        use crate::settings::invalid;
        if self.cache_ttl.is_zero()
            || self.usage_flush_interval.is_zero()
            || self.read_timeout.is_zero()
            || self.write_timeout.is_zero()
            || self.acquire_timeout.is_zero()
            || self.statement_timeout.is_zero()
        {
            return invalid(
                "registry_cache_ttl/usage_flush_interval/registry_*_timeout",
                "must be longer than zero",
            );
        }
        if self.pool_size == 0 {
            return invalid("registry_pool_size", "must be at least 1");
        }
        if let Some(url) = &self.url {
            let url = url.expose();
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
}
