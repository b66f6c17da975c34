//! keybroker: a gRPC service that hands platform services data encryption
//! keys protected by each tenant's customer-managed key. See DESIGN.md.

pub mod api;
pub mod audit;
pub mod authz;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod config;
pub mod context;
pub mod control;
pub mod envelope;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod hardening;
pub mod keys;
pub mod kms;
pub mod metrics;
pub mod net;
pub mod quota;
pub mod registry;
pub mod reload;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod text;

/// Generated from `proto/keybroker/v1/*.proto`.
#[allow(
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
pub mod proto {
    tonic::include_proto!("keybroker.v1");

    /// Encoded descriptors of the public protos, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("keybroker_descriptor");
}
