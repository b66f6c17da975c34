//! Fakes of what cannot run here: Google Cloud KMS and Azure Key Vault (no
//! emulator exists; their fidelity is proven with the vendors' own clients
//! in `gcp.rs` and `azure.rs`), a CONNECT tunnel that serves them under the
//! real host names, and an AWS fault server for the key states and failures
//! moto does not enforce. One style: axum routers on loopback, state behind
//! a mutex, dropped with the test.

pub(crate) mod aws_faults;
pub(crate) mod azure;
pub(crate) mod gcp;
pub(crate) mod tunnel;
