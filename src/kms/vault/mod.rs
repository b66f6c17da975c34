//! Customer keys in HashiCorp Vault or OpenBao Transit (`vault-transit`),
//! reached over Vault's HTTP API with plain reqwest (already in the tree for
//! Google's client: no second HTTP stack; `vaultrs` would bring its own).
//!
//! - **Key reference**: the key's API URL,
//!   `https://vault.example.com:8200/v1/<transit mount>/keys/<name>`.
//!   `http://` only on a loopback host (a dev server): Transit answers carry
//!   the plaintext DEK.
//! - **Auth**: AppRole. The role_id is stored with the binding, the
//!   secret_id encrypted under the platform key like imported material.
//!   Tokens are cached per (Vault, mount, role), renewed while renewable,
//!   re-obtained by logging in again when they expire or are refused once.
//! - **Binding**: Transit's `associated_data` (AES-GCM AAD, the
//!   `aes256-gcm96` key type) carries the tenant and context, the same
//!   canonical bytes as every other provider's AAD. We chose AAD over a
//!   derived key's `context`: it works with the customer's existing,
//!   non-derived keys and binds the whole context, not just a derivation
//!   input.
//! - **Versions**: Transit's ciphertext `vault:vN:...` is stored whole; the
//!   envelope's key version is `N`. Rotation in Vault is transparent; a DEK
//!   under an older version than the newest seen gets `rewrap_recommended`.
//!   RewrapKey decrypts and encrypts: Transit's own `rewrap` ignores
//!   `associated_data` (OpenBao 2.7; `vault::` tests check it), so it
//!   cannot move an AAD-bound ciphertext.
//! - **Describe** reads the key: exists, encrypt/decrypt allowed, latest
//!   and min_decryption_version, auto-rotation.
//! - **Batches**: decrypts of one key that arrive together go out as one
//!   `batch_input` call (`KeyLink::decrypt_batch`).

mod errors;
mod reference;
mod session;
mod transit;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

use self::errors::{Call, classify, transport};
pub use self::reference::VaultKeyRef;
use self::session::*;
pub use self::session::{VaultLogin, VaultTarget};
use self::transit::*;
use crate::kms::{
    Ciphertext, KeyDescription, KeyProvider, ProviderError, ProviderKeyState, ProviderKind,
    WrapContext,
};
use crate::secret::SecretBytes;

/// What keybroker's AppRole needs on one Transit key, and nothing more: no
/// key management, no export, no other key.
pub fn policy_hcl(mount: &str, key: &str) -> String {
    format!(
        r#"# keybroker: wrap and unwrap data keys with {mount}/keys/{key}
path "{mount}/encrypt/{key}" {{ capabilities = ["update"] }}
path "{mount}/decrypt/{key}" {{ capabilities = ["update"] }}
# read the key's state and versions (revocation checks, rotation)
path "{mount}/keys/{key}" {{ capabilities = ["read"] }}
"#
    )
}

crate::settings::identity_cache_flags!(
    VaultIdentityCache,
    "vault",
    "VAULT",
    "Vault logins (one per customer AppRole or jwt role)"
);

/// The `vault_*` settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct VaultSettings {
    /// Deadline of one call to a customer's Vault.
    #[arg(id = "vault_request_timeout", long = "vault-request-timeout", env = "KEYBROKER_VAULT_REQUEST_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub request_timeout: Duration,
    /// Attempts per call, first included; only a sealed or standby Vault,
    /// throttling, 5xx and unreachable servers retry.
    #[arg(
        id = "vault_max_attempts",
        long = "vault-max-attempts",
        env = "KEYBROKER_VAULT_MAX_ATTEMPTS",
        default_value = "3"
    )]
    pub max_attempts: u32,
    /// Extra CA certificate (PEM) trusted for customers' Vault servers with
    /// a private CA, besides the system's roots.
    #[arg(
        id = "vault_ca_file",
        long = "vault-ca-file",
        env = "KEYBROKER_VAULT_CA_FILE"
    )]
    pub ca_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub identity: VaultIdentityCache,
    /// Removed: one platform token sent to every customer's Vault let any
    /// customer who pointed a link at a server of their own log in as
    /// keybroker to every other customer's jwt role. keybroker mints a token
    /// per login instead (`oidc_issuer`). Kept only to refuse it by name.
    #[arg(
        id = "vault_jwt_file",
        long = "vault-jwt-file",
        env = "KEYBROKER_VAULT_JWT_FILE",
        hide = true
    )]
    pub jwt_file: Option<std::path::PathBuf>,
}

impl Default for VaultSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl VaultSettings {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        use crate::settings::invalid;
        if self.request_timeout.is_zero() {
            return invalid("vault_request_timeout", "must be longer than zero");
        }
        if self.max_attempts == 0 || self.max_attempts > 10 {
            return invalid("vault_max_attempts", "must be 1 to 10");
        }
        if self.jwt_file.is_some() {
            return invalid(
                "vault_jwt_file",
                "was removed: a shared token sent to every customer's Vault could be replayed against the others. keybroker now mints a token per login; set oidc_issuer and have customers trust its keys (keybroker keyring oidc-keys; docs/providers.md, Vault)",
            );
        }
        self.identity.validate()?;
        Ok(())
    }
}

/// Shared Vault state: the HTTP client and the logins per customer role.
pub struct VaultTransit {
    http: reqwest::Client,
    settings: VaultSettings,
    /// Logins by (Vault address, auth mount, role_id, digest of the
    /// secret_id: a re-linked key with a new secret gets a new login),
    /// bounded and dropped when idle. A binding's provider holds its session.
    sessions: moka::sync::Cache<(String, String, String, [u8; 32]), Arc<VaultSession>>,
    /// AppRole logins made (tests count them).
    pub logins: Arc<AtomicU64>,
    /// Token renewals made (tests count them).
    pub renewals: Arc<AtomicU64>,
    /// Transit encrypt/decrypt/rewrap calls made (tests count them).
    pub transit_calls: Arc<AtomicU64>,
    /// Mints the token of each jwt login (none: jwt links are refused).
    issuer: Option<Arc<super::issuer::Issuer>>,
}

impl fmt::Debug for VaultTransit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultTransit")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl VaultTransit {
    pub fn new(settings: VaultSettings) -> Result<Self, ProviderError> {
        let mut builder = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(3)))
            // A redirect could carry the token elsewhere.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = &settings.ca_file {
            builder = builder.add_root_certificate(super::extra_root_ca("vault_ca_file", path)?);
        }
        let http = builder
            .build()
            .map_err(|e| ProviderError::Internal(format!("cannot build the Vault client: {e}")))?;
        Ok(Self {
            http,
            sessions: settings.identity.get().sync_cache(1),
            settings,
            logins: Arc::default(),
            renewals: Arc::default(),
            transit_calls: Arc::default(),
            issuer: None,
        })
    }

    /// Logs in to jwt roles with tokens `issuer` mints.
    pub fn with_issuer(mut self, issuer: Option<Arc<super::issuer::Issuer>>) -> Self {
        self.issuer = issuer;
        self
    }

    /// The issuer of jwt login tokens, if configured.
    pub fn issuer(&self) -> Option<&Arc<super::issuer::Issuer>> {
        self.issuer.as_ref()
    }

    /// Whether jwt logins are possible (an issuer is configured).
    pub fn has_issuer(&self) -> bool {
        self.issuer.is_some()
    }

    /// A token for one jwt login to the Vault at `audience` as `subject`:
    /// usable there only, by that subject only, for minutes only.
    fn login_token(
        &self,
        audience: &str,
        subject: &str,
    ) -> Result<Zeroizing<String>, ProviderError> {
        let issuer = self.issuer.as_ref().ok_or_else(|| {
            ProviderError::Internal(
                "this Vault key logs in with the jwt auth method, but the server has no oidc_issuer to mint its login tokens".into(),
            )
        })?;
        issuer.mint(audience, subject)
    }

    /// Live Vault logins (metrics: `keybroker_identity_clients`).
    pub fn live_sessions(&self) -> u64 {
        self.sessions.run_pending_tasks();
        self.sessions.entry_count()
    }

    /// The provider for one binding.
    pub fn key(self: &Arc<Self>, target: VaultTarget) -> VaultTransitKey {
        let (role, secret_digest) = target.login.identity();
        let id = (
            target.key.address().to_owned(),
            target.auth_mount.clone(),
            role,
            secret_digest,
        );
        let session = self.sessions.get_with_by_ref(&id, || {
            Arc::new(VaultSession {
                address: id.0.clone(),
                auth_mount: id.1.clone(),
                login: target.login.clone(),
                token: tokio::sync::Mutex::new(None),
            })
        });
        VaultTransitKey {
            link: Arc::new(KeyLink {
                vault: Arc::clone(self),
                target,
                session,
                latest: AtomicU32::new(0),
            }),
            pending: Arc::default(),
        }
    }
}

impl VaultTransit {
    /// One HTTP call. The request body is sent from zeroizing memory
    /// (`Bytes::from_owner`: zeroed when the request is done) and the answer
    /// collected into zeroizing memory: Transit bodies carry plaintext keys.
    async fn post(
        &self,
        url: &str,
        token: Option<&SecretString>,
        body: &impl serde::Serialize,
    ) -> Result<(u16, Zeroizing<Vec<u8>>), reqwest::Error> {
        let mut json = Zeroizing::new(Vec::with_capacity(256));
        // Serializing plain structs and strings cannot fail.
        let _ = serde_json::to_writer(&mut *json, body);
        let mut request = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(bytes::Bytes::from_owner(json));
        if let Some(token) = token {
            request = request.header("X-Vault-Token", token.expose_secret());
        }
        Self::collect(request.send().await?).await
    }

    async fn get(
        &self,
        url: &str,
        token: &SecretString,
    ) -> Result<(u16, Zeroizing<Vec<u8>>), reqwest::Error> {
        let response = self
            .http
            .get(url)
            .header("X-Vault-Token", token.expose_secret())
            .send()
            .await?;
        Self::collect(response).await
    }

    async fn collect(
        mut response: reqwest::Response,
    ) -> Result<(u16, Zeroizing<Vec<u8>>), reqwest::Error> {
        let status = response.status().as_u16();
        let mut body = Zeroizing::new(Vec::new());
        while let Some(chunk) = response.chunk().await? {
            body.extend_from_slice(&chunk);
        }
        Ok((status, body))
    }
}

/// One `vault-transit` binding as a [`KeyProvider`].
pub struct VaultTransitKey {
    link: Arc<KeyLink>,
    /// Cold decrypts gathered for one Transit `batch_input` call. The first
    /// one in an empty queue spawns the sender, which yields once so the
    /// other cold items polled with it (a BatchUnwrapKey's) join; so a
    /// queue that is not empty always has a sender coming. A plain lock: a
    /// push or a take, never held across an await.
    pending: Arc<Mutex<Vec<PendingDecrypt>>>,
}

/// `N` of a Transit ciphertext `vault:vN:...`.
fn ciphertext_version(ciphertext: &str) -> Option<u32> {
    let rest = ciphertext.strip_prefix("vault:v")?;
    let (number, _) = rest.split_once(':')?;
    number.parse().ok().filter(|n| *n > 0)
}

#[async_trait]
impl KeyProvider for VaultTransitKey {
    fn kind(&self) -> ProviderKind {
        ProviderKind::VaultTransit
    }

    async fn encrypt(
        &self,
        plaintext: &SecretBytes,
        wrap: WrapContext<'_>,
    ) -> Result<Ciphertext, ProviderError> {
        let encoded = Zeroizing::new(B64.encode(plaintext.expose()));
        let aad = B64.encode(wrap.aad());
        let body = TransitBody {
            plaintext: Some(&encoded),
            ciphertext: None,
            associated_data: &aad,
        };
        let reply = self
            .link
            .call(Call::Encrypt, &self.link.url("encrypt"), &body)
            .await?;
        self.link.ciphertext_of(&reply, Call::Encrypt)
    }

    async fn decrypt(
        &self,
        key_version: &str,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Result<SecretBytes, ProviderError> {
        let text = self.link.checked_ciphertext(key_version, ciphertext)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let first = {
            let mut pending = self.pending.lock();
            pending.push(PendingDecrypt {
                ciphertext: text.to_owned(),
                aad: B64.encode(wrap.aad()),
                reply,
            });
            pending.len() == 1
        };
        if first {
            // A task of its own: a cancelled caller never strands the queue.
            let (link, pending) = (Arc::clone(&self.link), Arc::clone(&self.pending));
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                let batch = std::mem::take(&mut *pending.lock());
                link.decrypt_batch(batch).await;
            });
        }
        answer.await.unwrap_or_else(|_| {
            Err(ProviderError::Internal(
                "the Transit batch sender stopped".into(),
            ))
        })
    }

    async fn describe(&self) -> Result<KeyDescription, ProviderError> {
        let url = self.link.url("keys");
        let mut relogged = false;
        let (status, body) = loop {
            let token = self
                .link
                .session
                .token(&self.link.vault, self.link.name())
                .await?;
            match self.link.vault.get(&url, &token).await {
                Ok((403, _)) if !relogged => {
                    relogged = true;
                    self.link.session.forget().await;
                }
                Ok(answer) => break answer,
                Err(err) => return Err(transport(Call::Describe, self.link.name(), &err)),
            }
        };
        if status != 200 {
            return Err(classify(
                Call::Describe,
                status,
                &error_text(&body),
                self.link.name(),
            ));
        }
        let key: Data<KeyData> = serde_json::from_slice(&body).map_err(|e| {
            ProviderError::Internal(format!("the Transit key read answered something else: {e}"))
        })?;
        let key = key.data;
        self.link.seen_version(key.latest_version);
        let name = self.link.name();
        let (state, reason) = if key.soft_deleted {
            (
                ProviderKeyState::PendingDeletion,
                format!(
                    "{name} is soft-deleted in the customer's Vault; restore it to use it again"
                ),
            )
        } else if !key.supports_encryption || !key.supports_decryption {
            (
                ProviderKeyState::Disabled,
                format!(
                    "{name} is a {} key, which cannot encrypt and decrypt; use an aes256-gcm96 key",
                    crate::text::Quoted(&key.key_type)
                ),
            )
        } else if !AEAD_TYPES.contains(&key.key_type.as_str()) {
            (
                ProviderKeyState::Disabled,
                format!(
                    "{name} is a {} key; keybroker binds the tenant as AES-GCM associated data: use an aes256-gcm96 key",
                    crate::text::Quoted(&key.key_type)
                ),
            )
        } else {
            (ProviderKeyState::Enabled, String::new())
        };
        if key.deletion_allowed {
            tracing::debug!(key = %name, "the customer's Transit key allows deletion");
        }
        tracing::trace!(key = %name, min_decryption_version = key.min_decryption_version, "described a Transit key");
        Ok(KeyDescription {
            state,
            reason,
            current_version: key.latest_version.to_string(),
            rotation_enabled: Some(key.auto_rotate_period > 0),
            rotation_period: (key.auto_rotate_period > 0)
                .then(|| Duration::from_secs(key.auto_rotate_period)),
            ..KeyDescription::default()
        })
    }

    /// Transit writes only positive versions into `vault:vN:`.
    fn check_version(&self, version: &str) -> Result<(), ProviderError> {
        match version.parse::<u32>() {
            Ok(n) if n > 0 && n.to_string() == version => Ok(()),
            _ => Err(ProviderError::InvalidCiphertext(format!(
                "the wrapped key names Transit key version {}, which Vault never writes",
                crate::text::Quoted(version)
            ))),
        }
    }

    fn current_version(&self) -> Option<String> {
        let latest = self.link.latest.load(Ordering::Relaxed);
        (latest > 0).then(|| latest.to_string())
    }

    fn is_current_version(&self, version: &str) -> Option<bool> {
        let latest = self.link.latest.load(Ordering::Relaxed);
        (latest > 0).then(|| version.parse::<u32>().is_ok_and(|v| v >= latest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciphertext_versions_parse() {
        assert_eq!(ciphertext_version("vault:v1:abc"), Some(1));
        assert_eq!(ciphertext_version("vault:v12:abc"), Some(12));
        for bad in ["vault:v0:abc", "vault:vx:abc", "vault:v1", "v1:abc", ""] {
            assert_eq!(ciphertext_version(bad), None, "{bad:?}");
        }
    }
}
