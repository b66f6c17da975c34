//! Key Vault and Entra errors into the provider taxonomy: a pure function
//! over what a failure says (HTTP status, Key Vault's error code and inner
//! code, Entra's AADSTS code), with a table test.

use std::time::Duration;

use crate::kms::ProviderError;

/// Which call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Call {
    Wrap,
    Unwrap,
    Describe,
}

/// What a failed call said, read off the SDK's typed error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Failure {
    /// The HTTP status of a Key Vault answer (none: no answer, or a token
    /// failure).
    pub status: Option<u16>,
    /// `error.code` and `error.innererror.code` of Key Vault's body.
    pub code: String,
    pub inner_code: String,
    /// `error.message` (Key Vault), or the credential's error text (Entra).
    pub message: String,
    /// The token request failed (Entra refused or was unreachable).
    pub credential: bool,
    /// The connection failed before an answer.
    pub connection: bool,
    /// `Retry-After` of a 429/503.
    pub retry_after: Option<Duration>,
}

/// Who asked, for messages that say what to do.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scope<'a> {
    pub key: &'a str,
    pub vault: &'a str,
    pub key_name: &'a str,
    pub customer_tenant: &'a str,
    pub client_id: &'a str,
}

/// The admin-consent URL of the platform's application in the customer's
/// tenant.
pub fn consent_url(authority: &str, customer_tenant: &str, client_id: &str) -> String {
    format!(
        "{}/{customer_tenant}/adminconsent?client_id={client_id}",
        authority.trim_end_matches('/')
    )
}

/// Classifies a failure (pure; table test below).
pub(super) fn classify(
    call: Call,
    failure: &Failure,
    scope: &Scope<'_>,
    authority: &str,
) -> ProviderError {
    let said = crate::text::Escaped(&failure.message).to_string();
    let key = scope.key;
    if failure.credential {
        let consent = consent_url(authority, scope.customer_tenant, scope.client_id);
        let text = &failure.message;
        // AADSTS700016: the application is not in the directory (no
        // consent yet, or a wrong tenant id); 65001: consent not granted.
        if text.contains("AADSTS700016") || text.contains("AADSTS65001") {
            return ProviderError::AccessDenied(format!(
                "keybroker's application ({}) is not consented in the customer's Entra tenant {}: an administrator of that tenant must grant consent at {consent} and then assign the key role (Entra said: {said})",
                scope.client_id, scope.customer_tenant
            ));
        }
        // AADSTS90002 / 900023: no such tenant.
        if text.contains("AADSTS90002") || text.contains("AADSTS900023") {
            return ProviderError::AccessDenied(format!(
                "Entra has no tenant {}: check the customer's directory (tenant) id on the key binding (Entra said: {said})",
                scope.customer_tenant
            ));
        }
        // Anything else at the token endpoint is the platform's own
        // credential or reachability (an expired client secret, a network
        // failure): never a reason to revoke a customer's key.
        return ProviderError::Unavailable(format!(
            "could not obtain a token for Entra tenant {} (keybroker's own credential, or Entra unreachable): {said}",
            scope.customer_tenant
        ));
    }
    if failure.connection {
        return ProviderError::Unavailable(format!(
            "Key Vault {} could not be reached: {said}",
            scope.vault
        ));
    }
    let Some(status) = failure.status else {
        return ProviderError::Internal(format!("Key Vault call on {key} failed: {said}"));
    };
    let code = |c: &str| failure.code == c || failure.inner_code == c;
    let lower = failure.message.to_ascii_lowercase();
    match status {
        401 => ProviderError::AccessDenied(format!(
            "Key Vault {} refused keybroker's token for tenant {}: is the vault in that Entra tenant? ({said})",
            scope.vault, scope.customer_tenant
        )),
        403 if code("KeyDisabled") || lower.contains("disabled key") => ProviderError::KeyDisabled(
            format!("{key} is disabled in Key Vault; the customer can enable it again ({said})"),
        ),
        403 if lower.contains("expired") || lower.contains("not yet valid") => {
            ProviderError::KeyDisabled(format!(
                "{key} is outside its activation window (expiry or not-before) in Key Vault; the customer can change the dates ({said})"
            ))
        }
        403 => ProviderError::AccessDenied(format!(
            "keybroker's application ({}) may not use {key}: the customer must assign it the role \"Key Vault Crypto Service Encryption User\" on the key (or grant the access-policy permissions get, wrapKey, unwrapKey) ({said})",
            scope.client_id
        )),
        404 => ProviderError::NotFound(format!(
            "{key} was not found in Key Vault. If it was deleted, the customer can recover it while soft-deleted: az keyvault key recover --{} {} --name {} ({said})",
            // A Managed HSM is named with --hsm-name, a vault --vault-name.
            if key.contains(".managedhsm.") {
                "hsm-name"
            } else {
                "vault-name"
            },
            scope.vault,
            scope.key_name
        )),
        400 if call == Call::Unwrap => ProviderError::InvalidCiphertext(format!(
            "Key Vault could not unwrap with {key}: the wrapped key was altered or belongs to another key ({said})"
        )),
        409 => ProviderError::Unavailable(format!(
            "{key} is being changed in Key Vault (a delete or recover in progress); retry ({said})"
        )),
        429 => ProviderError::Throttled(match failure.retry_after {
            Some(delay) => format!(
                "Key Vault throttled calls on {key}; retry after {} s",
                delay.as_secs().max(1)
            ),
            None => format!("Key Vault throttled calls on {key}; retry shortly"),
        }),
        500..=599 => ProviderError::Unavailable(format!(
            "Key Vault answered {status} for {key}; retry ({said})"
        )),
        _ => ProviderError::Internal(format!(
            "Key Vault answered {status} ({}) for {key}: {said}",
            crate::text::Escaped(&failure.code)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, code: &str, inner: &str, message: &str) -> Failure {
        Failure {
            status: Some(status),
            code: code.into(),
            inner_code: inner.into(),
            message: message.into(),
            ..Failure::default()
        }
    }

    fn entra(message: &str) -> Failure {
        Failure {
            credential: true,
            message: message.into(),
            ..Failure::default()
        }
    }

    /// Real Key Vault and Entra error shapes and what they become.
    #[test]
    fn failures_classify() {
        let scope = Scope {
            key: "https://contoso.vault.azure.net/keys/cmek",
            vault: "contoso",
            key_name: "cmek",
            customer_tenant: "72f988bf-86f1-41af-91ab-2d7cd011db47",
            client_id: "11111111-2222-3333-4444-555555555555",
        };
        let kind = |call, f: &Failure| {
            classify(call, f, &scope, "https://login.microsoftonline.com").kind_name()
        };
        let throttled = Failure {
            retry_after: Some(Duration::from_secs(7)),
            ..http(
                429,
                "Throttled",
                "",
                "Request was not processed because too many requests were received.",
            )
        };
        let table: Vec<(Call, Failure, &str)> = vec![
            (
                Call::Unwrap,
                http(
                    403,
                    "Forbidden",
                    "KeyDisabled",
                    "Operation unwrapKey is not allowed on a disabled key.",
                ),
                "key_disabled",
            ),
            (
                Call::Wrap,
                http(
                    403,
                    "Forbidden",
                    "",
                    "Operation wrapKey is not allowed on a disabled key.",
                ),
                "key_disabled",
            ),
            (
                Call::Wrap,
                http(
                    403,
                    "Forbidden",
                    "",
                    "Operation wrapKey is not allowed on an expired key.",
                ),
                "key_disabled",
            ),
            (
                Call::Describe,
                http(
                    403,
                    "Forbidden",
                    "ForbiddenByRbac",
                    "Caller is not authorized to perform action on resource.",
                ),
                "access_denied",
            ),
            (
                Call::Unwrap,
                http(401, "Unauthorized", "AKV10032", "Invalid issuer."),
                "access_denied",
            ),
            (
                Call::Describe,
                http(
                    404,
                    "KeyNotFound",
                    "",
                    "A key with (name/id) cmek was not found in this key vault.",
                ),
                "not_found",
            ),
            (
                Call::Unwrap,
                http(400, "BadParameter", "", "The parameter is incorrect."),
                "invalid_ciphertext",
            ),
            (
                Call::Wrap,
                http(400, "BadParameter", "", "Unsupported algorithm."),
                "internal",
            ),
            (
                Call::Wrap,
                http(409, "Conflict", "", "Key is currently being deleted."),
                "unavailable",
            ),
            (Call::Unwrap, throttled.clone(), "throttled"),
            (
                Call::Unwrap,
                http(503, "ServiceUnavailable", "", "try later"),
                "unavailable",
            ),
            (
                Call::Describe,
                entra(
                    "AADSTS700016: Application with identifier '1111' was not found in the directory 'Contoso'.",
                ),
                "access_denied",
            ),
            (
                Call::Describe,
                entra(
                    "AADSTS65001: The user or administrator has not consented to use the application.",
                ),
                "access_denied",
            ),
            (
                Call::Describe,
                entra("AADSTS90002: Tenant '72f9' not found."),
                "access_denied",
            ),
            (
                Call::Describe,
                entra("AADSTS7000215: Invalid client secret provided."),
                "unavailable",
            ),
            (
                Call::Unwrap,
                Failure {
                    connection: true,
                    message: "connection refused".into(),
                    ..Failure::default()
                },
                "unavailable",
            ),
        ];
        for (call, failure, want) in &table {
            assert_eq!(kind(*call, failure), *want, "{call:?} {failure:?}");
        }
        let msg = classify(
            Call::Unwrap,
            &throttled,
            &scope,
            "https://login.microsoftonline.com",
        )
        .to_string();
        assert!(msg.contains("retry after 7 s"), "{msg}");
        let msg = classify(
            Call::Describe,
            &table[11].1,
            &scope,
            "https://login.microsoftonline.com",
        )
        .to_string();
        assert!(msg.contains("https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/adminconsent?client_id=11111111-2222-3333-4444-555555555555"), "{msg}");
        let msg = classify(
            Call::Describe,
            &table[5].1,
            &scope,
            "https://login.microsoftonline.com",
        )
        .to_string();
        assert!(
            msg.contains("az keyvault key recover --vault-name contoso --name cmek"),
            "{msg}"
        );
        // A platform credential failure never suggests revocation.
        assert!(!classify(Call::Describe, &table[14].1, &scope, "x").suggests_revocation());
        // A hostile message is escaped, not echoed raw.
        let hostile = http(500, "X", "", "line\nbreak\u{1b}[31m");
        let msg = classify(Call::Wrap, &hostile, &scope, "x").to_string();
        assert!(!crate::text::has_control(&msg), "{msg}");
    }
}
