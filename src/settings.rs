//! The mechanics every settings section shares, with no dependency on any
//! section: a section is a `clap::Args` struct in its own domain module,
//! its defaults come from its declarations ([`defaults`]), and it checks
//! itself in a `validate()` that fails with [`ConfigError`]. `config`
//! composes the sections; the sections never import `config`.

use std::path::PathBuf;

use clap::{Args, Command, FromArgMatches};

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("invalid setting {setting}: {reason}")]
    Invalid { setting: String, reason: String },
    #[error("{0}")]
    Flags(String),
}

/// `Err(ConfigError::Invalid)` for `setting`.
pub(crate) fn invalid<T>(setting: &str, reason: &str) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid {
        setting: setting.to_owned(),
        reason: reason.to_owned(),
    })
}

/// A provider's cache of per-identity clients (AWS role sessions, Cloud
/// KMS clients, Vault logins, Key Vault credentials): at most `capacity`,
/// each dropped after `idle_timeout` unused, so 100,000 tenants never mean
/// 100,000 live clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityCache {
    pub capacity: u64,
    pub idle_timeout: std::time::Duration,
}

impl IdentityCache {
    /// At least one entry, a non-zero idle timeout.
    pub(crate) fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.capacity == 0 || self.idle_timeout.is_zero() {
            return invalid(
                &format!("{prefix}_identity_cache_capacity/{prefix}_identity_idle_timeout"),
                "must be at least 1 / longer than zero",
            );
        }
        Ok(())
    }

    /// A moka cache with these bounds, `times` as many entries.
    pub fn sync_cache<K, V>(&self, times: u64) -> moka::sync::Cache<K, V>
    where
        K: std::hash::Hash + Eq + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        moka::sync::Cache::builder()
            .max_capacity(self.capacity.saturating_mul(times))
            .time_to_idle(self.idle_timeout)
            .build()
    }

    /// [`sync_cache`](Self::sync_cache) for async loaders.
    pub fn future_cache<K, V>(&self) -> moka::future::Cache<K, V>
    where
        K: std::hash::Hash + Eq + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        moka::future::Cache::builder()
            .max_capacity(self.capacity)
            .time_to_idle(self.idle_timeout)
            .build()
    }
}

/// The flags of one provider's [`IdentityCache`]: clap cannot prefix a
/// flattened struct's flags, so each provider gets its own pair,
/// `<prefix>_identity_cache_capacity` and `<prefix>_identity_idle_timeout`.
macro_rules! identity_cache_flags {
    ($name:ident, $prefix:literal, $env:literal, $what:literal) => {
        #[doc = concat!("`", $prefix, "_identity_cache_capacity` and `", $prefix, "_identity_idle_timeout`.")]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
        pub struct $name {
            #[arg(
                id = concat!($prefix, "_identity_cache_capacity"),
                long = concat!($prefix, "-identity-cache-capacity"),
                env = concat!("KEYBROKER_", $env, "_IDENTITY_CACHE_CAPACITY"),
                help = concat!("Most ", $what, " kept at once; the least recently used beyond it are dropped."),
                default_value = "10000"
            )]
            pub capacity: u64,
            #[arg(
                id = concat!($prefix, "_identity_idle_timeout"),
                long = concat!($prefix, "-identity-idle-timeout"),
                env = concat!("KEYBROKER_", $env, "_IDENTITY_IDLE_TIMEOUT"),
                help = concat!("One of the ", $what, " unused this long is dropped (its next use makes a new one), e.g. 30m."),
                value_parser = humantime::parse_duration,
                default_value = "30m"
            )]
            pub idle_timeout: std::time::Duration,
        }

        impl $name {
            pub fn get(&self) -> $crate::settings::IdentityCache {
                $crate::settings::IdentityCache {
                    capacity: self.capacity,
                    idle_timeout: self.idle_timeout,
                }
            }

            pub(crate) fn validate(&self) -> Result<(), $crate::settings::ConfigError> {
                self.get().validate($prefix)
            }
        }
    };
}
pub(crate) use identity_cache_flags;

/// `command` without environment variables (and without defaults unless
/// `keep_defaults`): what it parses comes from its arguments alone.
pub(crate) fn bare(command: Command, keep_defaults: bool) -> Command {
    command.mut_args(|arg| {
        let arg = arg.env(None::<&'static str>);
        if keep_defaults {
            arg
        } else {
            arg.default_value(None::<&'static str>)
        }
    })
}

/// A section's built-in defaults: its declared default values, without
/// flags or environment.
pub(crate) fn defaults<T: Args + FromArgMatches>() -> T {
    let command = bare(T::augment_args(Command::new("defaults")), true);
    // The defaults are literals in the declarations; config's
    // `defaults_validate` test proves every one parses, so this cannot fail
    // at run time.
    #[allow(clippy::expect_used)]
    let matches = command
        .try_get_matches_from(["defaults"])
        .expect("built-in defaults parse");
    #[allow(clippy::expect_used)]
    T::from_arg_matches(&matches).expect("built-in defaults parse")
}
