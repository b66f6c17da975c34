//! The `keybroker` binary: `serve`, offline `keyring` commands, and client
//! commands that call a running server. All of it lives in [`keybroker::cli`].

use std::process::ExitCode;

/// mimalloc, not glibc's malloc: a warm batch item is a handful of small
/// allocations, and glibc's cost per allocation and its fragmentation under
/// a cache of millions of small entries were measured (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    keybroker::cli::main().await
}
