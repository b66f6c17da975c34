//! AWS failures into the provider taxonomy: pure functions from an error
//! code (and the call it answered) to a [`ProviderError`], table-tested,
//! with whether a caller's bytes can provoke each one written beside it.

use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::types::KeyState;
use aws_smithy_runtime_api::client::result::SdkError;

use super::AwsKeyTarget;
use crate::kms::ProviderError;

/// AWS error code and message of a failed call, or how it failed to happen.
pub(super) fn error_parts<E: ProvideErrorMetadata, R>(
    err: &SdkError<E, R>,
) -> Result<(String, String), ProviderError> {
    match err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            Ok((
                e.code().unwrap_or("Unknown").to_owned(),
                e.message().unwrap_or_default().to_owned(),
            ))
        }
        SdkError::TimeoutError(_) => Err(ProviderError::Unavailable(
            "no answer within the configured timeout".into(),
        )),
        SdkError::DispatchFailure(d) if d.is_timeout() => Err(ProviderError::Unavailable(
            "no answer within the configured timeout".into(),
        )),
        SdkError::DispatchFailure(d) if d.is_user() => Err(ProviderError::Internal(format!(
            "request could not be sent: {d:?}"
        ))),
        SdkError::DispatchFailure(_) => Err(ProviderError::Unavailable(
            "the endpoint cannot be reached".into(),
        )),
        SdkError::ResponseError(_) => Err(ProviderError::Unavailable(
            "the endpoint answered with an unreadable response".into(),
        )),
        SdkError::ConstructionFailure(_) => {
            Err(ProviderError::Internal("request could not be built".into()))
        }
        _ => Err(ProviderError::Internal("unexpected SDK error".into())),
    }
}

/// Which KMS operation failed: the same code means different things on a
/// Decrypt (whose ciphertext is the caller's) and elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KmsCall {
    Encrypt,
    Decrypt,
    ReEncrypt,
    Describe,
}

/// Largest ciphertext blob KMS accepts; a longer one is refused before any
/// call (it can only be a forged wrapped key).
pub(super) const MAX_CIPHERTEXT_BLOB: usize = 6144;

pub(super) fn classify_kms<E: ProvideErrorMetadata, R>(
    err: SdkError<E, R>,
    call: KmsCall,
    target: &AwsKeyTarget,
    region: &str,
) -> ProviderError {
    match error_parts(&err) {
        Ok((code, message)) => classify_kms_code(&code, &message, call, target, region),
        Err(ProviderError::Unavailable(why)) => {
            ProviderError::Unavailable(format!("AWS KMS in {region}: {why}"))
        }
        Err(other) => other,
    }
}

/// The taxonomy of an AWS KMS error code; a pure function, table-tested.
/// Whether a caller's bytes can provoke each one (DESIGN.md section 5):
///
/// | code | kind | caller bytes can cause it | may revoke |
/// | --- | --- | --- | --- |
/// | `AccessDeniedException` | AccessDenied | yes: a key policy condition on the encryption context, a ciphertext of another account's key (moto answers it to any tampered ciphertext) | only through the describe it triggers |
/// | `DisabledException`, `KMSInvalidStateException`, `InvalidKeyUsageException` | KeyDisabled | no (the key is the binding's) | only through the describe it triggers |
/// | `NotFoundException` | NotFound | no | only through the describe it triggers |
/// | `IncorrectKeyException`, `InvalidCiphertextException` | InvalidCiphertext | yes | no |
/// | `ValidationException`, `InvalidParameter*` on Decrypt | InvalidCiphertext | yes | no |
/// | throttling codes | Throttled | yes, by volume (the KMS quota buckets stop it first) | no |
/// | `KMSInternalException`, 5xx, timeouts, credential errors | Unavailable | no | no |
/// | anything else | Internal | no | no |
fn classify_kms_code(
    code: &str,
    message: &str,
    call: KmsCall,
    target: &AwsKeyTarget,
    region: &str,
) -> ProviderError {
    // The ARN actually called: replicas share the key id, not the region.
    let key = target.key_arn.in_region(region);
    match code {
        "AccessDeniedException" => ProviderError::AccessDenied(format!(
            "role {} may not use key {key}: the key policy must allow it kms:Encrypt, kms:Decrypt, kms:ReEncrypt*, kms:GenerateDataKey* and kms:DescribeKey, and the role's trust policy must keep allowing the platform principal with its sts:ExternalId ({message})",
            target.role_arn
        )),
        "DisabledException" => ProviderError::KeyDisabled(format!(
            "key {key} is disabled in AWS KMS; the customer can enable it (EnableKey) to restore access"
        )),
        "KMSInvalidStateException" if message.to_ascii_lowercase().contains("pending deletion") => {
            ProviderError::KeyDisabled(format!(
                "key {key} is scheduled for deletion in AWS KMS; the customer can cancel the deletion (CancelKeyDeletion) and enable the key (EnableKey) to restore access"
            ))
        }
        "KMSInvalidStateException" => ProviderError::KeyDisabled(format!(
            "key {key} cannot be used in its current state ({message}); if it is pending deletion, cancel the deletion (CancelKeyDeletion) and enable the key (EnableKey); if it awaits key material, import it"
        )),
        "NotFoundException" => ProviderError::NotFound(format!(
            "key {key} does not exist in {region} (deleted, or a wrong ARN); link an existing key"
        )),
        "InvalidKeyUsageException" => ProviderError::KeyDisabled(format!(
            "key {key} cannot encrypt and decrypt: it must be a symmetric ENCRYPT_DECRYPT key"
        )),
        "IncorrectKeyException" => ProviderError::InvalidCiphertext(format!(
            "the wrapped key was encrypted under another KMS key than {key}"
        )),
        "InvalidCiphertextException" => ProviderError::InvalidCiphertext(
            "KMS could not decrypt: the context or tenant differs from the wrap, or the wrapped key was altered".into(),
        ),
        "ValidationException" | "InvalidParameterException" | "InvalidParameterValue"
            if matches!(call, KmsCall::Decrypt | KmsCall::ReEncrypt) =>
        {
            ProviderError::InvalidCiphertext(format!(
                "KMS refused the wrapped key's ciphertext as malformed ({code})"
            ))
        }
        "ThrottlingException" | "LimitExceededException" | "TooManyRequestsException" => {
            ProviderError::Throttled(format!("AWS KMS in {region} throttled the request for key {key}"))
        }
        "KMSInternalException" | "DependencyTimeoutException" | "KeyUnavailableException"
        | "InternalFailure" | "ServiceUnavailable" => {
            ProviderError::Unavailable(format!("AWS KMS in {region}: {code}"))
        }
        "UnrecognizedClientException" | "InvalidSignatureException" | "ExpiredTokenException" => {
            ProviderError::Unavailable(format!(
                "AWS KMS rejected keybroker's session credentials ({code}); they are refreshed on the next call"
            ))
        }
        _ => ProviderError::Internal(format!("AWS KMS {code} on {call:?}: {message}")),
    }
}

/// What describe says about a key that is not enabled, and what the
/// customer can do.
pub(super) fn state_reason(state: Option<&KeyState>, key: &str) -> String {
    match state {
        Some(KeyState::Disabled) => format!(
            "key {key} is disabled in AWS KMS; the customer can enable it (EnableKey) to restore access"
        ),
        Some(KeyState::PendingDeletion | KeyState::PendingReplicaDeletion) => format!(
            "key {key} is scheduled for deletion in AWS KMS; the customer can cancel the deletion (CancelKeyDeletion) and enable the key (EnableKey) to restore access"
        ),
        Some(KeyState::PendingImport) => format!(
            "key {key} has no key material; the customer must import it (ImportKeyMaterial)"
        ),
        Some(KeyState::Unavailable) => format!(
            "key {key} is unavailable: its custom key store is disconnected; the customer can reconnect it"
        ),
        other => format!(
            "key {key} is not usable in state {}",
            other.map_or("unknown", KeyState::as_str)
        ),
    }
}

pub(super) fn classify_sts<E: ProvideErrorMetadata, R>(
    err: SdkError<E, R>,
    role_arn: &str,
    external_id: &str,
) -> ProviderError {
    match error_parts(&err) {
        Ok((code, message)) => classify_sts_code(&code, &message, role_arn, external_id),
        Err(ProviderError::Unavailable(why)) => {
            ProviderError::Unavailable(format!("AWS STS: {why}"))
        }
        Err(other) => other,
    }
}

/// The taxonomy of an STS AssumeRole error. No caller bytes reach
/// AssumeRole (role, external ID and session name come from the registry),
/// yet a denial still only revokes through a describe, like every other.
fn classify_sts_code(
    code: &str,
    message: &str,
    role_arn: &str,
    external_id: &str,
) -> ProviderError {
    match code {
        "AccessDenied" | "AccessDeniedException" => ProviderError::AccessDenied(format!(
            "role {role_arn} cannot be assumed: the customer's trust policy must allow the platform principal the action sts:AssumeRole with the condition sts:ExternalId = {external_id} ({message})"
        )),
        "RegionDisabledException" => ProviderError::AccessDenied(format!(
            "role {role_arn} cannot be assumed: STS is not activated in the account's region; the customer can activate it in IAM account settings ({message})"
        )),
        "Throttling" | "ThrottlingException" => {
            ProviderError::Throttled("AWS STS throttled AssumeRole".into())
        }
        "InvalidClientTokenId" | "SignatureDoesNotMatch" | "ExpiredToken" => {
            ProviderError::Unavailable(format!(
                "AWS STS rejected the platform's own credentials ({code}): check keybroker's AWS identity (IRSA, instance profile)"
            ))
        }
        _ => ProviderError::Internal(format!("AWS STS {code}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::aws::arn::{KeyArn, RoleArn};

    fn target() -> AwsKeyTarget {
        AwsKeyTarget {
            tenant_id: "acme".into(),
            key_arn: KeyArn::parse("arn:aws:kms:eu-west-1:111122223333:key/k1").unwrap(),
            role_arn: RoleArn::parse("arn:aws:iam::111122223333:role/r").unwrap(),
            external_id: "kb-x".into(),
            replica_regions: vec![],
        }
    }

    /// AWS error in, taxonomy out, and whether it may lead to a revocation
    /// (only ever through the describe it triggers; see the table on
    /// `classify_kms_code`).
    #[test]
    fn kms_errors_classify() {
        use KmsCall::*;
        let table: &[(&str, &str, KmsCall, &str, bool, &str)] = &[
            (
                "AccessDeniedException",
                "",
                Decrypt,
                "access_denied",
                true,
                "kms:Decrypt",
            ),
            (
                "AccessDeniedException",
                "",
                Encrypt,
                "access_denied",
                true,
                "sts:ExternalId",
            ),
            (
                "DisabledException",
                "",
                Decrypt,
                "key_disabled",
                true,
                "EnableKey",
            ),
            (
                "KMSInvalidStateException",
                "arn:... is pending deletion.",
                Decrypt,
                "key_disabled",
                true,
                "CancelKeyDeletion",
            ),
            (
                "KMSInvalidStateException",
                "pending import",
                Encrypt,
                "key_disabled",
                true,
                "import",
            ),
            (
                "NotFoundException",
                "",
                Describe,
                "not_found",
                true,
                "does not exist",
            ),
            (
                "InvalidKeyUsageException",
                "",
                Encrypt,
                "key_disabled",
                true,
                "symmetric",
            ),
            (
                "IncorrectKeyException",
                "",
                Decrypt,
                "invalid_ciphertext",
                false,
                "another KMS key",
            ),
            (
                "InvalidCiphertextException",
                "",
                Decrypt,
                "invalid_ciphertext",
                false,
                "altered",
            ),
            (
                "ValidationException",
                "",
                Decrypt,
                "invalid_ciphertext",
                false,
                "malformed",
            ),
            (
                "ValidationException",
                "",
                Encrypt,
                "internal",
                false,
                "ValidationException",
            ),
            (
                "ThrottlingException",
                "",
                Decrypt,
                "throttled",
                false,
                "throttled",
            ),
            (
                "LimitExceededException",
                "",
                Encrypt,
                "throttled",
                false,
                "throttled",
            ),
            (
                "KMSInternalException",
                "",
                Decrypt,
                "unavailable",
                false,
                "KMSInternalException",
            ),
            (
                "KeyUnavailableException",
                "",
                Decrypt,
                "unavailable",
                false,
                "eu-west-1",
            ),
            (
                "ExpiredTokenException",
                "",
                Decrypt,
                "unavailable",
                false,
                "refreshed",
            ),
            (
                "SomethingNew",
                "odd",
                Decrypt,
                "internal",
                false,
                "SomethingNew",
            ),
        ];
        for (code, message, call, kind, may_revoke, says) in table {
            let err = classify_kms_code(code, message, *call, &target(), "eu-west-1");
            assert_eq!(err.kind_name(), *kind, "{code} on {call:?}: {err}");
            assert_eq!(err.suggests_revocation(), *may_revoke, "{code}: {err}");
            assert!(err.to_string().contains(says), "{code}: {err}");
        }
        // A replica region's error names the ARN in that region.
        let err = classify_kms_code("NotFoundException", "", Decrypt, &target(), "us-east-1");
        assert!(err.to_string().contains("arn:aws:kms:us-east-1:"), "{err}");
    }

    #[test]
    fn sts_errors_classify() {
        let table: &[(&str, &str, bool, &str)] = &[
            (
                "AccessDenied",
                "access_denied",
                true,
                "sts:ExternalId = kb-x",
            ),
            ("RegionDisabledException", "access_denied", true, "activate"),
            ("Throttling", "throttled", false, "AssumeRole"),
            (
                "ExpiredToken",
                "unavailable",
                false,
                "platform's own credentials",
            ),
            ("Odd", "internal", false, "Odd"),
        ];
        for (code, kind, may_revoke, says) in table {
            let err = classify_sts_code(code, "m", "arn:aws:iam::1:role/r", "kb-x");
            assert_eq!(err.kind_name(), *kind, "{code}: {err}");
            assert_eq!(err.suggests_revocation(), *may_revoke, "{code}");
            assert!(err.to_string().contains(says), "{code}: {err}");
        }
    }

    #[test]
    fn describe_reasons_say_what_to_do() {
        let key = "arn:k";
        for (state, says) in [
            (KeyState::Disabled, "EnableKey"),
            (KeyState::PendingDeletion, "CancelKeyDeletion"),
            (KeyState::PendingImport, "ImportKeyMaterial"),
            (KeyState::Unavailable, "reconnect"),
        ] {
            let reason = state_reason(Some(&state), key);
            assert!(reason.contains(says), "{state:?}: {reason}");
        }
    }
}
