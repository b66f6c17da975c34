//! The `keybroker` binary: `serve`, offline `keyring` commands, and client
//! commands that call a running server. All of it lives in [`keybroker::cli`].

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    keybroker::cli::main().await
}
