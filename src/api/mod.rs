//! gRPC services: message conversion only. Decisions live in the domain
//! modules; errors become `tonic::Status` in exactly one place, [`status`].

pub mod auth;
pub mod call;
pub mod codec;
pub mod convert;
pub mod key_admin;
pub mod key_broker;
pub mod status;
