//! The `keybroker` binary: `serve`, offline `keyring` commands, and client
//! commands that call a running server. All of it lives in [`keybroker::cli`].

use std::process::ExitCode;

/// mimalloc, not glibc's malloc: a warm batch item is a handful of small
/// allocations, and glibc's cost per allocation and its fragmentation under
/// a cache of millions of small entries were measured (BENCHMARKS.md).
/// Every block is zeroed when freed: keybroker zeroizes the buffers it owns,
/// and this wipes the ones it does not (a response's encode buffer, the
/// HTTP/2 and TLS layers', the cloud SDKs') once they are freed.
#[global_allocator]
static ALLOCATOR: keybroker::secret::ZeroOnFree = keybroker::secret::ZERO_ON_FREE;

#[tokio::main]
async fn main() -> ExitCode {
    keybroker::cli::main().await
}
