//! The one place where domain errors become gRPC statuses. Every status
//! carries a message a person can act on and a `google.rpc.ErrorInfo` whose
//! `reason` programs can branch on. Internal details never reach the caller:
//! they are logged here with the full error chain.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::api::auth::AccessError;
use crate::broker::BrokerError;
use crate::context::ContextError;
use crate::control::AdminError;
use crate::keys::DirectoryError;
use crate::kms::ProviderError;
use crate::registry::RegistryError;

/// `ErrorInfo.domain` of every keybroker error.
pub(crate) const ERROR_DOMAIN: &str = "keybroker.v1";

impl From<BrokerError> for Status {
    fn from(err: BrokerError) -> Self {
        let (code, reason) = classify(&err);
        let mut metadata = HashMap::new();
        match &err {
            BrokerError::KeyUnusable { binding, .. }
            | BrokerError::DirectWrapRefused { binding, .. }
            | BrokerError::UnknownBinding { binding, .. }
            | BrokerError::Provider { binding, .. } => {
                metadata.insert("key_binding".to_owned(), binding.clone());
            }
            _ => {}
        }
        let retry_after = match &err {
            BrokerError::Quota(quota) => Some(quota.retry_after),
            // A registry outage usually passes within seconds: a second is
            // the view refresh backoff, so a retry sooner finds nothing new.
            BrokerError::Directory(DirectoryError::Unavailable(_)) => {
                Some(std::time::Duration::from_secs(1))
            }
            _ => None,
        };
        if let Some(retry_after) = retry_after {
            let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
            details.set_retry_info(Some(retry_after));
            return Status::with_error_details(code, err.to_string(), details);
        }
        status(code, reason, &err, metadata)
    }
}

impl From<AccessError> for Status {
    fn from(err: AccessError) -> Self {
        let (code, reason) = match &err {
            AccessError::MethodDenied { .. } | AccessError::TenantDenied { .. } => {
                (Code::PermissionDenied, "CALLER_NOT_AUTHORIZED")
            }
            AccessError::ReasonDenied { .. } => (Code::PermissionDenied, "REASON_NOT_GRANTED"),
            AccessError::AuditUnavailable(_) => (Code::Unavailable, "AUDIT_UNAVAILABLE"),
            AccessError::NoContext => (Code::Internal, "INTERNAL"),
        };
        status(code, reason, &err, HashMap::new())
    }
}

impl From<AdminError> for Status {
    fn from(err: AdminError) -> Self {
        let (code, reason) = match &err {
            AdminError::InvalidArgument(_) => (Code::InvalidArgument, "INVALID_REQUEST"),
            AdminError::Registry(e) => classify_registry(e),
            AdminError::Directory(e) => classify_directory(e),
            AdminError::Verification(_) => (Code::FailedPrecondition, "KEY_VERIFICATION_FAILED"),
            AdminError::Refused(_) => (Code::FailedPrecondition, "REFUSED"),
            AdminError::Provider(e) => match e {
                ProviderError::Unavailable(_) => (Code::Unavailable, "PROVIDER_UNAVAILABLE"),
                ProviderError::Throttled(_) => (Code::ResourceExhausted, "PROVIDER_THROTTLED"),
                // Everything else (denied, disabled, a service account that
                // cannot be impersonated) is for the customer to fix, and
                // the message says what.
                _ => (Code::FailedPrecondition, "KEY_VERIFICATION_FAILED"),
            },
            AdminError::Internal(_) => (Code::Internal, "INTERNAL"),
        };
        status(code, reason, &err, HashMap::new())
    }
}

fn status(
    code: Code,
    reason: &str,
    err: &dyn std::error::Error,
    metadata: HashMap<String, String>,
) -> Status {
    let message = match code {
        Code::Internal => {
            tracing::error!(error = %err, "internal error");
            "internal error; the keybroker server log has the details".to_owned()
        }
        _ => err.to_string(),
    };
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

fn classify_registry(err: &RegistryError) -> (Code, &'static str) {
    match err {
        RegistryError::TenantNotFound(_) => (Code::NotFound, "TENANT_NOT_FOUND"),
        RegistryError::BindingNotFound { .. } => (Code::NotFound, "KEY_BINDING_NOT_FOUND"),
        RegistryError::TenantExists(_) => (Code::AlreadyExists, "TENANT_EXISTS"),
        RegistryError::BindingExists { .. } => (Code::AlreadyExists, "KEY_BINDING_EXISTS"),
        RegistryError::Refused(_) => (Code::FailedPrecondition, "REFUSED_BY_POLICY"),
        RegistryError::Database(_) => (Code::Unavailable, "REGISTRY_UNAVAILABLE"),
        RegistryError::Corrupt(_) => (Code::Internal, "INTERNAL"),
    }
}

fn classify_directory(err: &DirectoryError) -> (Code, &'static str) {
    match err {
        DirectoryError::Unavailable(_) => (Code::Unavailable, "REGISTRY_UNAVAILABLE"),
        DirectoryError::Internal(_) => (Code::Internal, "INTERNAL"),
    }
}

/// gRPC code and machine-readable reason of each error.
fn classify(err: &BrokerError) -> (Code, &'static str) {
    match err {
        BrokerError::InvalidRequest(_) => (Code::InvalidArgument, "INVALID_REQUEST"),
        BrokerError::Envelope(_) => (Code::InvalidArgument, "INVALID_WRAPPED_KEY"),
        BrokerError::Context(e) => match e {
            ContextError::InvalidTenant(_) => (Code::InvalidArgument, "INVALID_TENANT_ID"),
            ContextError::InvalidContext(_) => (Code::InvalidArgument, "INVALID_CONTEXT"),
        },
        BrokerError::TenantMismatch { .. } => (Code::PermissionDenied, "TENANT_MISMATCH"),
        BrokerError::UnknownBinding { .. } => (Code::NotFound, "KEY_BINDING_NOT_FOUND"),
        BrokerError::UnknownTenantKey { .. } => (Code::NotFound, "TENANT_KEY_NOT_FOUND"),
        BrokerError::IncarnationGone { .. } => (Code::NotFound, "TENANT_DELETED"),
        BrokerError::ReasonRefused { .. } => (Code::PermissionDenied, "ACCESS_REASON_REFUSED"),
        BrokerError::TenantDeleting { .. } => {
            (Code::FailedPrecondition, "TENANT_DELETION_SCHEDULED")
        }
        BrokerError::VersionRetired { .. } => (Code::FailedPrecondition, "KEY_VERSION_RETIRED"),
        BrokerError::DirectWrapRefused { .. } => {
            (Code::FailedPrecondition, "KEY_CANNOT_WRAP_DIRECTLY")
        }
        BrokerError::KeyUnusable { state, .. } => match state {
            crate::keys::BindingState::Revoked => (Code::FailedPrecondition, "KEY_REVOKED"),
            _ => (Code::FailedPrecondition, "KEY_DISABLED"),
        },
        BrokerError::Provider { source, .. } => match source {
            // A wrong context and a tampered wrapped key are the same failure
            // to an AEAD: both are the caller's input, hence INVALID_ARGUMENT.
            ProviderError::InvalidCiphertext(_) => (Code::InvalidArgument, "DECRYPTION_FAILED"),
            ProviderError::AccessDenied(_) => (Code::FailedPrecondition, "KEY_ACCESS_DENIED"),
            ProviderError::KeyDisabled(_) => (Code::FailedPrecondition, "KEY_DISABLED_IN_PROVIDER"),
            ProviderError::VersionDisabled(_) => {
                (Code::FailedPrecondition, "KEY_VERSION_DISABLED_IN_PROVIDER")
            }
            ProviderError::NotFound(_) => (Code::FailedPrecondition, "KEY_NOT_FOUND_IN_PROVIDER"),
            ProviderError::Throttled(_) => (Code::ResourceExhausted, "PROVIDER_THROTTLED"),
            ProviderError::Unavailable(_) => (Code::Unavailable, "PROVIDER_UNAVAILABLE"),
            ProviderError::Internal(_) => (Code::Internal, "INTERNAL"),
        },
        BrokerError::Quota(_) => (Code::ResourceExhausted, "KMS_QUOTA_EXCEEDED"),
        BrokerError::Directory(e) => classify_directory(e),
        BrokerError::Internal(_) => (Code::Internal, "INTERNAL"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_stay_in_the_log() {
        let status = Status::from(BrokerError::Internal("db password=hunter2".into()));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("hunter2"));
    }

    #[test]
    fn a_registry_outage_says_when_to_retry() {
        let status = Status::from(BrokerError::Directory(DirectoryError::Unavailable(
            "registry down".into(),
        )));
        assert_eq!(status.code(), Code::Unavailable);
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(std::time::Duration::from_secs(1)));
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            "REGISTRY_UNAVAILABLE"
        );
    }

    #[test]
    fn reasons_are_attached() {
        let status = Status::from(BrokerError::TenantMismatch {
            tenant_id: "a".into(),
        });
        assert_eq!(status.code(), Code::PermissionDenied);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "TENANT_MISMATCH");
        assert_eq!(info.domain, ERROR_DOMAIN);
    }
}
