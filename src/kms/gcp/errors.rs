//! Cloud KMS failures into the provider taxonomy: a pure function from a
//! Google status (and the call it answered) to a [`ProviderError`],
//! table-tested, with whether a caller's bytes can provoke each one written
//! beside it.

use google_cloud_gax::error::Error as GaxError;
use google_cloud_gax::error::rpc::Code;

use super::{Call, ENCRYPTER_DECRYPTER_ROLE, GcpKmsKey};
use crate::kms::ProviderError;

/// The taxonomy of a Cloud KMS status; a pure function, table-tested. A
/// FAILED_PRECONDITION on Decrypt is refined by a describe first
/// ([`GcpKmsKey::precondition`]). Whether a caller's bytes can provoke each
/// one (DESIGN.md section 5):
///
/// | status | kind | caller bytes can cause it | may revoke |
/// | --- | --- | --- | --- |
/// | `PERMISSION_DENIED` | AccessDenied | not known to; treated as possible | only through the describe it triggers |
/// | `NOT_FOUND` | NotFound | not known to; treated as possible | only through the describe it triggers |
/// | `FAILED_PRECONDITION`, primary not enabled | KeyDisabled | no | only through the describe it triggers |
/// | `FAILED_PRECONDITION`, an old version (Decrypt) | VersionDisabled | yes (a ciphertext naming that version) | no |
/// | `INVALID_ARGUMENT` on Decrypt | InvalidCiphertext | yes | no |
/// | checksum `INVALID_ARGUMENT` | Unavailable | no (corruption in transit) | no |
/// | `RESOURCE_EXHAUSTED` | Throttled | yes, by volume (quota buckets first) | no |
/// | `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`, `ABORTED`, `UNAUTHENTICATED` | Unavailable | no | no |
/// | anything else | Internal | no | no |
pub(super) fn classify_status(
    code: Code,
    message: &str,
    call: Call,
    key: &str,
    principal: &str,
) -> ProviderError {
    match code {
        Code::PermissionDenied => ProviderError::AccessDenied(format!(
            "{principal} may not use key {key}: the customer must grant it {ENCRYPTER_DECRYPTER_ROLE} on the key ({message})"
        )),
        Code::NotFound => ProviderError::NotFound(format!(
            "key {key} does not exist (deleted, or a wrong resource name) ({message})"
        )),
        Code::FailedPrecondition => ProviderError::KeyDisabled(format!(
            "key {key} cannot be used in its current state ({message}); the customer can enable its primary version (or restore it if destruction is scheduled) in Cloud KMS"
        )),
        Code::InvalidArgument if mentions_checksum(message) => ProviderError::Unavailable(format!(
            "Cloud KMS {call:?} of key {key}: Cloud KMS found a checksum mismatch in the request ({message}); the data was corrupted in transit and was not used, retry"
        )),
        Code::InvalidArgument if call == Call::Decrypt => {
            ProviderError::InvalidCiphertext(format!(
                "Cloud KMS could not decrypt: the context or tenant differs from the wrap, the wrapped key was altered, or it belongs to another key than {key} ({message})"
            ))
        }
        Code::ResourceExhausted => ProviderError::Throttled(format!(
            "Cloud KMS quota exhausted for key {key} ({message})"
        )),
        Code::Unavailable | Code::DeadlineExceeded | Code::Internal | Code::Aborted => {
            ProviderError::Unavailable(format!("Cloud KMS {code:?}: {message}"))
        }
        Code::Unauthenticated => ProviderError::Unavailable(format!(
            "Cloud KMS rejected keybroker's credentials ({message}); check its Google identity (Workload Identity, GOOGLE_APPLICATION_CREDENTIALS)"
        )),
        other => ProviderError::Internal(format!("Cloud KMS {other:?} on key {key}: {message}")),
    }
}

/// Failures without a Google status: no answer, or no credentials.
pub(super) fn classify_transport(err: &GaxError, key: &GcpKmsKey) -> ProviderError {
    if err.is_timeout() || err.is_exhausted() {
        return ProviderError::Unavailable(
            "Cloud KMS: no answer within the configured timeout".into(),
        );
    }
    if err.is_authentication() {
        let transient = std::error::Error::source(err)
            .and_then(|s| s.downcast_ref::<google_cloud_gax::error::CredentialsError>())
            .is_some_and(|c| c.is_transient());
        let why = if key.target.service_account.is_empty() {
            "keybroker could not obtain Google credentials (Workload Identity, GOOGLE_APPLICATION_CREDENTIALS)".to_owned()
        } else {
            format!(
                "keybroker could not impersonate service account {} (grant keybroker's identity roles/iam.serviceAccountTokenCreator on it)",
                key.target.service_account
            )
        };
        return if transient {
            ProviderError::Unavailable(format!("{why}: {err}"))
        } else {
            ProviderError::Internal(format!("{why}: {err}"))
        };
    }
    if err.is_connect() || err.is_io() || err.is_transport() {
        return ProviderError::Unavailable("Cloud KMS: the endpoint cannot be reached".into());
    }
    if err.is_deserialization() {
        return ProviderError::Unavailable("Cloud KMS answered with an unreadable response".into());
    }
    if let Some(code) = err.http_status_code() {
        return match code {
            429 => ProviderError::Throttled("Cloud KMS throttled the request".into()),
            500..=599 => ProviderError::Unavailable(format!("Cloud KMS answered HTTP {code}")),
            _ => ProviderError::Internal(format!("Cloud KMS answered HTTP {code}")),
        };
    }
    ProviderError::Internal(format!("Cloud KMS call failed: {err}"))
}

fn mentions_checksum(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("checksum") || lower.contains("crc32c")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::ProviderKeyState;
    use crate::kms::gcp::version_reason;

    /// Cloud KMS status in, taxonomy out, and whether it may lead to a
    /// revocation (only ever through the describe it triggers).
    #[test]
    fn statuses_classify() {
        let key = "projects/p/locations/l/keyRings/r/cryptoKeys/k";
        let table: &[(Code, &str, Call, &str, bool, &str)] = &[
            (
                Code::PermissionDenied,
                "",
                Call::Decrypt,
                "access_denied",
                true,
                ENCRYPTER_DECRYPTER_ROLE,
            ),
            (
                Code::NotFound,
                "",
                Call::Encrypt,
                "not_found",
                true,
                "does not exist",
            ),
            (
                Code::FailedPrecondition,
                "",
                Call::Encrypt,
                "key_disabled",
                true,
                "enable its primary version",
            ),
            (
                Code::InvalidArgument,
                "bad",
                Call::Decrypt,
                "invalid_ciphertext",
                false,
                "altered",
            ),
            (
                Code::InvalidArgument,
                "CRC32C mismatch",
                Call::Decrypt,
                "unavailable",
                false,
                "corrupted in transit",
            ),
            (
                Code::InvalidArgument,
                "bad",
                Call::Encrypt,
                "internal",
                false,
                "bad",
            ),
            (
                Code::ResourceExhausted,
                "",
                Call::Decrypt,
                "throttled",
                false,
                "quota",
            ),
            (
                Code::Unavailable,
                "",
                Call::Decrypt,
                "unavailable",
                false,
                "Unavailable",
            ),
            (
                Code::DeadlineExceeded,
                "",
                Call::Describe,
                "unavailable",
                false,
                "DeadlineExceeded",
            ),
            (
                Code::Unauthenticated,
                "",
                Call::Decrypt,
                "unavailable",
                false,
                "credentials",
            ),
            (
                Code::OutOfRange,
                "",
                Call::Decrypt,
                "internal",
                false,
                "OutOfRange",
            ),
        ];
        for (code, message, call, kind, may_revoke, says) in table {
            let err = classify_status(*code, message, *call, key, "service account x");
            assert_eq!(err.kind_name(), *kind, "{code:?} on {call:?}: {err}");
            assert_eq!(err.suggests_revocation(), *may_revoke, "{code:?}");
            assert!(err.to_string().contains(says), "{code:?}: {err}");
        }
        for (state, says) in [
            (ProviderKeyState::Disabled, "enable it"),
            (ProviderKeyState::PendingDeletion, "RestoreCryptoKeyVersion"),
            (ProviderKeyState::Destroyed, "cannot be recovered"),
        ] {
            assert!(version_reason(state, "v").contains(says), "{state:?}");
        }
        assert!(version_reason(ProviderKeyState::Enabled, "v").is_empty());
    }
}
