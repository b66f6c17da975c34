//! Logging in to a customer's Vault (AppRole, or jwt with a token keybroker
//! mints) and keeping the session's token per tenant.

use super::*;

/// What one binding needs to reach its key.
#[derive(Clone, Debug)]
pub struct VaultTarget {
    pub key: VaultKeyRef,
    /// Auth mount path (`approle` or `jwt` by default).
    pub auth_mount: String,
    pub login: VaultLogin,
}

/// How keybroker logs in to a customer's Vault.
#[derive(Clone, Debug)]
pub enum VaultLogin {
    /// An AppRole: its role_id, and the secret_id sealed with the binding.
    AppRole {
        role_id: String,
        secret_id: SecretString,
    },
    /// A role of the jwt auth method that trusts keybroker's issuer:
    /// nothing secret per binding. `subject` is the tenant's
    /// (`keybroker:tenant:<id>`), what the role's `bound_subject` names.
    Jwt { role: String, subject: String },
}

impl VaultLogin {
    /// The session key of this login: the role, and a digest of the secret
    /// (a re-linked key with a new secret gets a new login).
    pub(super) fn identity(&self) -> (String, [u8; 32]) {
        let (role, secret) = match self {
            Self::AppRole { role_id, secret_id } => (
                format!("approle:{role_id}"),
                secret_id.expose_secret().as_bytes(),
            ),
            // Per tenant: two tenants naming one role log in apart, each
            // with its own subject.
            Self::Jwt { role, subject } => (format!("jwt:{role}:{subject}"), &b""[..]),
        };
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        (role, out)
    }
}

/// A Vault token and when to renew it.
pub(super) struct Token {
    pub(super) value: SecretString,
    pub(super) renew_at: Instant,
    pub(super) expires_at: Instant,
    pub(super) renewable: bool,
}

/// One customer role's login. The tokio mutex is held across the login on
/// purpose: concurrent callers wait for one login instead of each logging in.
pub(super) struct VaultSession {
    pub(super) address: String,
    pub(super) auth_mount: String,
    pub(super) login: VaultLogin,
    pub(super) token: tokio::sync::Mutex<Option<Token>>,
}

#[derive(Deserialize)]
pub(super) struct Auth {
    pub(super) client_token: SecretString,
    pub(super) lease_duration: u64,
    pub(super) renewable: bool,
}

#[derive(Deserialize)]
pub(super) struct AuthReply {
    pub(super) auth: Auth,
}

/// The body of a login: AppRole's, or the jwt method's.
#[derive(serde::Serialize)]
#[serde(untagged)]
pub(super) enum LoginBody<'a> {
    AppRole {
        role_id: &'a str,
        secret_id: &'a str,
    },
    Jwt {
        role: &'a str,
        jwt: &'a str,
    },
}

/// A Transit encrypt or decrypt request; `text` is the base64 plaintext or
/// the ciphertext.
#[derive(serde::Serialize)]
pub(super) struct TransitBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) plaintext: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) ciphertext: Option<&'a str>,
    pub(super) associated_data: &'a str,
}

#[derive(Deserialize)]
pub(super) struct ErrorReply {
    #[serde(default)]
    pub(super) errors: Vec<String>,
}

impl VaultSession {
    /// A valid token: the cached one, renewed or re-obtained when due.
    pub(super) async fn token(
        &self,
        vault: &VaultTransit,
        key: &str,
    ) -> Result<SecretString, ProviderError> {
        let mut slot = self.token.lock().await;
        let now = Instant::now();
        if let Some(token) = slot.as_ref() {
            if now < token.renew_at {
                return Ok(token.value.clone());
            }
            if token.renewable && now < token.expires_at {
                vault.renewals.fetch_add(1, Ordering::Relaxed);
                let renewed = vault
                    .post(
                        &format!("{}/v1/auth/token/renew-self", self.address),
                        Some(&token.value),
                        &serde_json::Map::new(),
                    )
                    .await;
                if let Ok((200, body)) = renewed
                    && let Ok(reply) = serde_json::from_slice::<AuthReply>(&body)
                {
                    let token = Self::fresh(reply.auth);
                    let value = token.value.clone();
                    *slot = Some(token);
                    return Ok(value);
                }
                // Not renewable after all (max TTL reached): log in again.
            }
        }
        vault.logins.fetch_add(1, Ordering::Relaxed);
        let jwt;
        let body = match &self.login {
            VaultLogin::AppRole { role_id, secret_id } => LoginBody::AppRole {
                role_id,
                secret_id: secret_id.expose_secret(),
            },
            VaultLogin::Jwt { role, subject } => {
                jwt = vault.login_token(&self.address, subject)?;
                LoginBody::Jwt {
                    role,
                    jwt: jwt.as_str(),
                }
            }
        };
        let url = format!("{}/v1/auth/{}/login", self.address, self.auth_mount);
        let (status, reply) = vault
            .post(&url, None, &body)
            .await
            .map_err(|e| transport(Call::Login, key, &e))?;
        if status != 200 {
            return Err(classify(Call::Login, status, &error_text(&reply), key));
        }
        let reply: AuthReply = serde_json::from_slice(&reply).map_err(|e| {
            ProviderError::Internal(format!("the Vault login answer is not Vault's: {e}"))
        })?;
        let token = Self::fresh(reply.auth);
        let value = token.value.clone();
        *slot = Some(token);
        Ok(value)
    }

    /// Renew at two thirds of the lease; a lease of 0 never expires.
    pub(super) fn fresh(auth: Auth) -> Token {
        let now = Instant::now();
        let lease = if auth.lease_duration == 0 {
            Duration::from_secs(365 * 24 * 3600)
        } else {
            Duration::from_secs(auth.lease_duration)
        };
        Token {
            value: auth.client_token,
            renew_at: now + lease * 2 / 3,
            expires_at: now + lease,
            renewable: auth.renewable,
        }
    }

    /// Drops a token Vault refused, so the next call logs in again.
    pub(super) async fn forget(&self) {
        *self.token.lock().await = None;
    }
}

/// Vault's `errors` strings, escaped (they come from the customer's
/// server) and joined.
pub(super) fn error_text(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorReply>(body)
        .map(|r| {
            r.errors
                .iter()
                .map(|e| crate::text::Escaped(e).to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}
