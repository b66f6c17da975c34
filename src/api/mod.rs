//! gRPC services: message conversion only. Decisions live in the domain
//! modules; errors become `tonic::Status` in exactly one place, [`status`].

pub mod admin;
pub mod auth;
pub mod broker;
pub mod call;
pub mod codec;
pub mod status;
