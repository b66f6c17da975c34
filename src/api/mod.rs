//! gRPC services: message conversion only. Decisions live in the domain
//! modules; errors become `tonic::Status` in exactly one place, [`status`].

mod admin_convert;
pub(crate) mod affinity;
pub(crate) mod auth;
pub(crate) mod call;
pub(crate) mod codec;
pub(crate) mod convert;
pub(crate) mod dispatch;
pub(crate) mod key_admin;
pub(crate) mod key_broker;
pub(crate) mod status;

use std::sync::Arc;

use crate::audit::AuditLog;
use crate::metrics::Metrics;

/// Where every call is recorded: the audit log and the metrics. Shared by
/// the auth layer (denials) and every handler (`call::serve`).
#[derive(Debug)]
pub(crate) struct Observers {
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    /// Server-side deadline of every call and batch item (`request_timeout`),
    /// enforced in `call::run`: a timer only for calls that wait for
    /// something; a call it cuts is audited.
    pub request_timeout: std::time::Duration,
    /// The tenant-affinity header (`affinity_header`), only counted.
    pub affinity_header: tonic::metadata::MetadataKey<tonic::metadata::Ascii>,
}
