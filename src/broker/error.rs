//! What a data-plane call can fail with.

use crate::context::ContextError;
use crate::envelope::EnvelopeError;
use crate::keys::{BindingState, DirectoryError};
use crate::kms::{ProviderError, ProviderKind};
use crate::quota::QuotaExceeded;

/// Why a data-plane call failed. Mapped to a gRPC status in `api::status`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("the wrapped key was issued for a different tenant than '{tenant_id}'")]
    TenantMismatch { tenant_id: String },
    /// `binding` comes from the caller's wrapped key: shown quoted.
    #[error(
        "tenant '{tenant_id}' has no key binding named {} (it was unlinked, or the wrapped key comes from another deployment)",
        crate::text::Quoted(binding)
    )]
    UnknownBinding { tenant_id: String, binding: String },
    #[error(
        "tenant '{tenant_id}' has no tenant key version {version} (it was destroyed with the key that protected it or with the tenant, or the wrapped key comes from another deployment)"
    )]
    UnknownTenantKey { tenant_id: String, version: u32 },
    /// The wrapped key names an incarnation of the tenant id that is not
    /// the current one: a deleted tenant's, or another deployment's.
    #[error(
        "the wrapped key was issued for {} of tenant '{tenant_id}', which was deleted: its keys are destroyed (or the wrapped key comes from another deployment)",
        match incarnation { 0 => "an earlier life".to_owned(), n => format!("incarnation {n}") }
    )]
    IncarnationGone { tenant_id: String, incarnation: u64 },
    /// DeleteTenant scheduled the tenant's keys for destruction.
    #[error(
        "tenant '{tenant_id}' is scheduled for deletion at {}: its keys are destroyed then and serve nothing until; to keep its data, cancel the deletion before that time (KeyAdmin.CancelTenantDeletion, or keybroker admin tenant cancel-deletion)",
        crate::text::rfc3339(*delete_at_ms)
    )]
    TenantDeleting {
        tenant_id: String,
        delete_at_ms: i64,
    },
    /// The tenant's access policy refuses the call's reason (or its lack of
    /// one). Nothing in it comes from the caller unchecked: the reason is
    /// one of the enum's names.
    #[error(
        "tenant '{tenant_id}' does not accept access for reason {reason}: its access policy {policy} (the customer sets it with SetAccessPolicy; give a reason it accepts)"
    )]
    ReasonRefused {
        tenant_id: String,
        reason: crate::access::Reason,
        policy: String,
    },
    /// A wrapped key under a version older than its key's minimum
    /// decryption version. Nothing in it comes from the caller unchecked:
    /// the key is a binding the tenant has, the version a number.
    #[error(
        "the wrapped key is protected by {key} version {version} of tenant '{tenant_id}', which is retired (minimum decryption version {min}); to read it again, lower the minimum (RetireKeyVersions / keybroker admin retire-versions) and rewrap it with RewrapKey or keybroker rewrap before retiring"
    )]
    VersionRetired {
        tenant_id: String,
        /// "key 'name'", "the tenant key" or "the platform key".
        key: String,
        version: u32,
        min: u32,
    },
    #[error("key binding '{binding}' of tenant '{tenant_id}' is {state}: {reason}")]
    KeyUnusable {
        tenant_id: String,
        binding: String,
        state: BindingState,
        reason: String,
    },
    /// A direct tenant's primary key may not wrap DEKs directly (linked
    /// before LinkKey refused such keys for direct tenants).
    #[error(
        "key binding '{binding}' of tenant '{tenant_id}' protects tenant keys only and wraps no DEK directly: {why}; for new DEKs, link a key that serves direct tenants (AWS KMS, Cloud KMS, Vault Transit or a Managed HSM AES key) and make it primary (SetPrimaryKey, or DisableKey with reencrypt_to); DEKs already wrapped by this key stay readable"
    )]
    DirectWrapRefused {
        tenant_id: String,
        binding: String,
        why: &'static str,
    },
    #[error("key binding '{binding}' ({provider}): {source}")]
    Provider {
        binding: String,
        provider: ProviderKind,
        source: ProviderError,
    },
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error("internal error: {0}")]
    Internal(String),
}
