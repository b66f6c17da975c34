//! `keybroker-bench`: keybroker measured against a gRPC floor in the same
//! run, KMS-call accounting, and memory per cached key. BENCHMARKS.md has
//! the commands and the latest figures.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod accounting;
mod cold_start;
mod floor;
mod identities;
mod load;
mod memory;
mod peer;
mod plot;
mod profile;
mod provider_latency;
mod requests;
mod servers;
mod shape;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The floor and the load client run on mimalloc, as keybroker does, but
/// without keybroker's zero-on-free (`secret::ZeroOnFree`): the floor is
/// the bare stack, and what wiping costs keybroker is counted as
/// keybroker's. A floor that wiped too would mostly measure tonic's default
/// 8 KiB codec buffers, wiped on every call (73,411 instructions per request
/// against keybroker's 64,241 when tried; BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Generated from `benches/floor.proto`.
#[allow(
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    unreachable_pub
)]
mod pb {
    tonic::include_proto!("keybroker.bench");
}

#[derive(Debug, Parser)]
#[command(
    name = "keybroker-bench",
    about = "keybroker benchmarks (see BENCHMARKS.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Cache-hit UnwrapKey against the floor server, alternating runs.
    Load(load::LoadArgs),
    /// The floor server (spawned by `load`; prints its address).
    FloorServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// mTLS as keybroker serves it (the production shape).
        #[command(flatten)]
        tls: keybroker::net::tls::TlsSettings,
    },
    /// Counts provider calls under concurrent cold unwraps.
    Accounting(accounting::AccountingArgs),
    /// Instructions per request (callgrind), floor and keybroker.
    Profile(profile::ProfileArgs),
    /// Cold start from AWS KMS (moto): batches vs single RPCs, KMS calls.
    ColdStart(cold_start::ColdStartArgs),
    /// Resident bytes per cached key, a fresh process per size.
    Memory {
        /// Cache sizes to measure.
        #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
        entries: Vec<usize>,
        /// Write the results here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Resident bytes per idle tenant identity (AWS role session + KMS
    /// client) and the bound the session cache keeps (moto).
    Identities(identities::IdentitiesArgs),
    /// Latency of one provider unwrap call: local keyring vs Vault/OpenBao
    /// Transit over loopback (what a cold key costs with each).
    ProviderLatency(provider_latency::ProviderLatencyArgs),
    /// keybroker vs OpenBao Transit (its peer): cached UnwrapKey vs
    /// transit/decrypt, GenerateDataKey vs transit/datakey, pinned cores.
    Peer(peer::PeerArgs),
    /// One provider-latency measurement (spawned by `provider-latency`).
    ProviderLatencyChild {
        #[arg(long)]
        calls: usize,
        #[arg(long)]
        softhsm_dir: PathBuf,
    },
    /// One identities measurement (spawned by `identities`).
    IdentitiesChild {
        #[arg(long)]
        count: usize,
        #[arg(long)]
        capacity: u64,
        #[arg(long)]
        moto_url: String,
    },
    /// One memory measurement (spawned by `memory`).
    MemoryChild {
        #[arg(long)]
        entries: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    nproc();
    let result = match cli.command {
        Command::Load(args) => load::run(args),
        Command::FloorServer { listen, tls } => floor::serve(listen, tls),
        Command::Accounting(args) => accounting::run(args),
        Command::Profile(args) => profile::run(args),
        Command::ColdStart(args) => cold_start::run(args),
        Command::Memory { entries, json } => memory::run(&entries, json.as_deref()),
        Command::MemoryChild { entries } => memory::child(entries),
        Command::Identities(args) => identities::run(args),
        Command::ProviderLatency(args) => provider_latency::run(args),
        Command::Peer(args) => peer::run(args),
        Command::ProviderLatencyChild { calls, softhsm_dir } => {
            provider_latency::child(calls, &softhsm_dir)
        }
        Command::IdentitiesChild {
            count,
            capacity,
            moto_url,
        } => identities::child(count, capacity, &moto_url),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("keybroker-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// CPUs of the machine, read before any pinning narrows what
/// `available_parallelism` reports.
static NPROC: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

pub(crate) fn nproc() -> usize {
    *NPROC.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Facts about the machine a result was measured on.
pub(crate) fn machine_facts() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    serde_json::json!({
        "nproc": nproc(),
        "cpu_model": cpu,
        "rustc": rustc,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| e.to_string())
}
