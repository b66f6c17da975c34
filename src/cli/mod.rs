//! Command line: `serve`, offline keyring maintenance, and client commands so
//! a person can try the service without writing code. Client commands print
//! one JSON object on stdout (bytes as standard base64) and exit non-zero
//! with the gRPC code and message on stderr when the server refuses.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod access_log;
mod admin;
mod admin_key;
mod bulk;
mod client;
mod connection;
mod import;
mod output;
mod serve;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use self::admin::AdminCommand;
use self::client::{KeySpecArg, Target};
use self::connection::ServerArg;
use self::serve::{KeyringCommand, RegistryCommand};
use crate::config::{Config, ServeArgs};

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
    /// Back up or restore the registry: tenants, keys and tenant key
    /// versions (wrapped), which exist nowhere else.
    Registry {
        #[command(subcommand)]
        command: RegistryCommand,
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
    /// Unwrap many wrapped keys (base64, one per line on stdin) in batches
    /// of up to 256; prints one result per line, in order.
    BatchUnwrap {
        #[command(flatten)]
        target: Target,
    },
    /// Generate many data keys in batches of up to 256.
    BatchGenerate {
        #[command(flatten)]
        target: Target,
        /// How many.
        #[arg(long)]
        count: usize,
    },
    /// Move a wrapped key (base64) to the tenant's current primary key.
    ///
    /// Without --wrapped-key: every wrapped key on stdin (one base64 key per
    /// line, optionally a tab and its context as a JSON object), in batches,
    /// into --out (one line per input line; a killed run resumes there).
    Rewrap {
        #[command(flatten)]
        target: Target,
        /// The wrapped key, base64.
        #[arg(long, required_unless_present = "out")]
        wrapped_key: Option<String>,
        /// Bulk mode: where the moved keys go (appended; resumed).
        #[arg(long, conflicts_with = "wrapped_key")]
        out: Option<std::path::PathBuf>,
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
            Ok(config) => serve::serve(config).await,
            Err(err) => Err(err.into()),
        },
        (Command::CheckConfig(_), Some(config)) => {
            config.map_err(Into::into).and_then(serve::check_config)
        }
        (Command::Keyring { command }, _) => serve::keyring(command),
        (Command::Registry { command }, _) => serve::registry(command).await,
        (client, _) => client::run(client).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
