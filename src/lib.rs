//! keybroker: a gRPC service that hands platform services data encryption
//! keys protected by each tenant's customer-managed key. See DESIGN.md.
//!
//! The module map, arrows pointing one way (api -> broker -> keys/cache ->
//! kms). Public modules are what the binary, the tests and the benchmarks
//! build on; the rest is private to the crate (`unreachable_pub` is on).

// --- the data plane ------------------------------------------------------
/// Access justifications: why a key is used, and which reasons a tenant
/// accepts.
pub mod access;
/// The customer's key access log: per-minute counts and individual records,
/// flushed to the registry.
pub mod access_log;
/// The data plane: generate, wrap, unwrap, rewrap, describe. No gRPC.
pub mod broker;
/// Unwrapped keys in memory, with single-flight loads.
pub mod cache;
/// Tenant ids, encryption contexts and their AAD encoding.
pub mod context;
/// The wrapped-key format.
pub mod envelope;
/// Bindings, their states and usage; the `KeyDirectory` seam.
pub mod keys;
/// Key providers: the `KeyProvider` trait, local keyrings, AWS KMS, Cloud KMS.
pub mod kms;
/// Per-tenant and global limits on provider calls.
pub mod quota;
/// Plaintext-holding types that zeroize and never print.
pub mod seal;
pub mod secret;
/// Wrapped key import: one-time RSA keys, RSA-OAEP and RSA-AES key wrap.
pub mod wrapping;

// --- the control plane ---------------------------------------------------
/// Tenants and their keys: validation, onboarding, verification; the watcher.
pub mod control;
/// The tenant-key lifecycle: mint, re-encrypt, orphan, schedule and shred;
/// the only writer of tenant key versions.
pub mod lifecycle;
/// Tenants and bindings stored in SQLite or PostgreSQL; the registry's
/// views of them.
pub mod registry;

// --- the service -----------------------------------------------------------
/// gRPC services, the auth layer and the one error -> status map.
mod api;
/// Audit records, one per call.
pub mod audit;
/// The authorization policy.
mod authz;
pub mod call_notes;
/// The command line (`keybroker serve`, client and admin commands).
pub mod cli;
/// One typed configuration, composed of the domains' sections.
pub mod config;
/// Core dumps and ptrace off before any key is loaded.
mod hardening;
/// Prometheus metrics.
mod metrics;
/// Listeners, connection limits, TLS and caller identity.
pub mod net;
/// Periodic reload of files (keyring, policy, TLS material).
mod reload;
/// Assembles and runs the server.
pub mod server;
/// What every settings section shares (defaults, errors).
mod settings;
/// Logs and traces.
pub mod telemetry;
/// Caller text made safe to show: quoted, escaped, capped.
pub mod text;

/// Entry points for the cargo-fuzz targets (`fuzz/`).
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;

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

    /// The secret_id never reaches a log line, even through `{:?}`.
    impl std::fmt::Debug for VaultAppRole {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("VaultAppRole")
                .field("mount", &self.mount)
                .field("role_id", &self.role_id)
                .field("secret_id", &"<redacted>")
                .finish()
        }
    }

    /// The key material never reaches a log line, even through `{:?}`.
    impl std::fmt::Debug for ImportKeyMaterialRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ImportKeyMaterialRequest")
                .field("tenant_id", &self.tenant_id)
                .field("name", &self.name)
                .field("key_material_base64", &"<redacted>")
                .finish_non_exhaustive()
        }
    }
}
