//! The TOML config file: its keys are the settings' argument ids
//! (`cache_ttl`), its values go through the same parsers as the flags.

use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Command, FromArgMatches};

use super::Config;
use crate::settings::{ConfigError, bare};

/// Applies the file at `path` to `config`: every setting it names that
/// neither a flag nor the environment gave (per `given`).
pub(super) fn overlay(
    config: &mut Config,
    path: &Path,
    given: &ArgMatches,
) -> Result<(), ConfigError> {
    let fail = |reason: String| ConfigError::File {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
    let mut command = bare(Config::augment_args(Command::new("file")), false);
    command.build();
    let mut flags = vec!["file".to_owned()];
    for (key, value) in &table {
        let Some(arg) = command.get_arguments().find(|a| a.get_id() == key.as_str()) else {
            return Err(fail(format!(
                "unknown field `{}`: settings are named like the flags of `keybroker serve`, with _ for - (e.g. cache_ttl)",
                crate::text::Escaped(key)
            )));
        };
        let values = texts(value).ok_or_else(|| {
            fail(format!(
                "{key}: expected a string, number, boolean, or a list or table of them"
            ))
        })?;
        let Some(long) = arg.get_long() else {
            return Err(fail(format!("{key} cannot be set in the file")));
        };
        let key_flags: Vec<String> = values.iter().map(|v| format!("--{long}={v}")).collect();
        // Parsed alone first, by the flag's own parser, so the error names
        // the setting the file got wrong.
        command
            .clone()
            .try_get_matches_from(std::iter::once("file".to_owned()).chain(key_flags.clone()))
            .map_err(|e| fail(format!("{key}: {}", clap_reason(&e))))?;
        let given_elsewhere = matches!(
            given.value_source(key),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if given_elsewhere {
            continue;
        }
        flags.extend(key_flags);
    }
    let matches = command
        .try_get_matches_from(flags)
        .map_err(|e| fail(clap_reason(&e)))?;
    config
        .update_from_arg_matches(&matches)
        .map_err(|e| fail(clap_reason(&e)))
}

/// A TOML value as flag values: scalars as themselves, arrays as repeated
/// values, tables as `KEY=VALUE` pairs (per-region endpoints).
fn texts(value: &toml::Value) -> Option<Vec<String>> {
    fn scalar(value: &toml::Value) -> Option<String> {
        match value {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            toml::Value::Datetime(d) => Some(d.to_string()),
            toml::Value::Array(_) | toml::Value::Table(_) => None,
        }
    }
    match value {
        toml::Value::Array(items) => items.iter().map(scalar).collect(),
        toml::Value::Table(table) => table
            .iter()
            .map(|(k, v)| scalar(v).map(|v| format!("{k}={v}")))
            .collect(),
        other => scalar(other).map(|s| vec![s]),
    }
}

/// The first line of a clap error, without its `error: ` prefix.
fn clap_reason(err: &clap::Error) -> String {
    let text = err.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}
