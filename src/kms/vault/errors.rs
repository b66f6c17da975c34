//! Vault / OpenBao answers classified into [`ProviderError`]: a pure
//! function of the HTTP status and Vault's `errors` strings, with a table
//! test (the shape of aws-encryption-provider's `ParseError`).

use crate::kms::ProviderError;

/// Which call failed, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Call {
    Login,
    Encrypt,
    Decrypt,
    Describe,
}

impl Call {
    fn as_str(self) -> &'static str {
        match self {
            Self::Login => "Vault login",
            Self::Encrypt => "Transit encrypt",
            Self::Decrypt => "Transit decrypt",
            Self::Describe => "Transit key read",
        }
    }
}

/// Classifies a non-2xx answer. `errors` are Vault's messages (already
/// escaped for display by the caller); `key` names the key for people.
pub(super) fn classify(call: Call, status: u16, errors: &str, key: &str) -> ProviderError {
    let what = call.as_str();
    let lower = errors.to_ascii_lowercase();
    match status {
        400 if lower.contains("message authentication failed")
            || lower.contains("invalid ciphertext")
            || lower.contains("invalid version")
            || lower.contains("version is too new")
            || lower.contains("unable to decode") =>
        {
            ProviderError::InvalidCiphertext(format!(
                "{what} refused the wrapped key for {key}: {errors}"
            ))
        }
        400 if lower.contains("key not found") || lower.contains("no existing key") => {
            ProviderError::NotFound(format!(
                "{key} does not exist in the customer's Vault (deleted?): {errors}"
            ))
        }
        400 if lower.contains("disallowed by policy (too old)") => {
            ProviderError::VersionDisabled(format!(
                "{key}: the customer raised min_decryption_version past this wrapped key's version: {errors}"
            ))
        }
        400 if call == Call::Login => ProviderError::AccessDenied(format!(
            "{what} failed for {key}: {errors}; check the AppRole role_id and secret_id given to keybroker, or the jwt role's bound issuer, subject and audience"
        )),
        401 | 403 => ProviderError::AccessDenied(format!(
            "{what} on {key} was denied: {errors}; the customer's Vault policy must grant keybroker's role the Transit encrypt/decrypt/rewrap paths and read on the key (docs/providers.md, \"A customer key in Vault or OpenBao\")"
        )),
        404 => ProviderError::NotFound(format!(
            "{key} does not exist in the customer's Vault (deleted, or the mount path is wrong)"
        )),
        412 | 429 => ProviderError::Throttled(format!(
            "{what} on {key} was rate limited by the customer's Vault: {errors}"
        )),
        503 => ProviderError::Unavailable(format!(
            "the customer's Vault is sealed or on standby ({what} on {key}): {errors}"
        )),
        500..=599 => ProviderError::Unavailable(format!(
            "{what} on {key} failed with HTTP {status}: {errors}"
        )),
        _ => ProviderError::Internal(format!(
            "{what} on {key}: unexpected HTTP {status}: {errors}"
        )),
    }
}

/// A transport failure (connect, TLS, timeout): the customer's Vault is
/// unreachable, never a key state.
pub(super) fn transport(call: Call, key: &str, err: &reqwest::Error) -> ProviderError {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    ProviderError::Unavailable(format!(
        "{} on {key} {kind}: the customer's Vault is unreachable ({err})",
        call.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_errors_classify() {
        let key = "transit/keys/acme";
        let cases: &[(Call, u16, &str, &str)] = &[
            (
                Call::Decrypt,
                400,
                "cipher: message authentication failed",
                "invalid_ciphertext",
            ),
            (
                Call::Decrypt,
                400,
                "invalid ciphertext: version is too new",
                "invalid_ciphertext",
            ),
            (Call::Decrypt, 400, "encryption key not found", "not_found"),
            (
                Call::Decrypt,
                400,
                "ciphertext or signature version is disallowed by policy (too old)",
                "version_disabled",
            ),
            (
                Call::Login,
                400,
                "invalid role or secret ID",
                "access_denied",
            ),
            (Call::Describe, 403, "permission denied", "access_denied"),
            (Call::Encrypt, 401, "", "access_denied"),
            (Call::Describe, 404, "", "not_found"),
            (Call::Encrypt, 429, "rate limit quota exceeded", "throttled"),
            (
                Call::Encrypt,
                412,
                "required index state not present",
                "throttled",
            ),
            (Call::Decrypt, 503, "Vault is sealed", "unavailable"),
            (Call::Decrypt, 502, "", "unavailable"),
            (Call::Encrypt, 500, "internal error", "unavailable"),
            (Call::Encrypt, 400, "something new", "internal"),
            (Call::Encrypt, 418, "", "internal"),
        ];
        for (call, status, errors, want) in cases {
            let got = classify(*call, *status, errors, key);
            assert_eq!(
                got.kind_name(),
                *want,
                "{call:?} {status} {errors:?} -> {got}"
            );
            assert!(got.to_string().contains(key), "{got}");
        }
        // Only definitive answers may trigger a revocation check.
        assert!(classify(Call::Describe, 403, "", key).suggests_revocation());
        assert!(classify(Call::Describe, 404, "", key).suggests_revocation());
        assert!(!classify(Call::Describe, 503, "", key).suggests_revocation());
        assert!(classify(Call::Describe, 503, "", key).is_transient());
    }
}
