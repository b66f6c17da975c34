//! Fakes of what cannot run here: Google Cloud KMS (no emulator exists; its
//! fidelity is proven with Google's own clients in `gcp.rs`) and an AWS
//! fault server for the key states and failures moto does not enforce. One
//! style: axum routers on loopback, state behind a mutex, dropped with the
//! test.

pub(crate) mod aws_faults;
pub(crate) mod gcp;
