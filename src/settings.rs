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

/// The bounds of a per-identity client cache (`<prefix>_identity_cache_*`):
/// at least one entry, a non-zero idle timeout.
pub(crate) fn check_identity_cache(
    prefix: &str,
    capacity: u64,
    idle: std::time::Duration,
) -> Result<(), ConfigError> {
    if capacity == 0 || idle.is_zero() {
        return invalid(
            &format!("{prefix}_identity_cache_capacity/{prefix}_identity_idle_timeout"),
            "must be at least 1 / longer than zero",
        );
    }
    Ok(())
}

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
