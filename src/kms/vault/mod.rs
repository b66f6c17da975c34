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

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use zeroize::Zeroizing;

use self::errors::{Call, classify, transport};
pub use self::reference::VaultKeyRef;
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

/// What one binding needs to reach its key.
#[derive(Clone, Debug)]
pub struct VaultTarget {
    pub key: VaultKeyRef,
    /// Auth mount path (`approle` or `jwt` by default).
    pub auth_mount: String,
    pub login: VaultLogin,
}

/// How keybroker logs in to a customer's Vault.
#[derive(Clone)]
pub enum VaultLogin {
    /// An AppRole: its role_id, and the secret_id sealed with the binding.
    AppRole {
        role_id: String,
        secret_id: Arc<Zeroizing<String>>,
    },
    /// A role of the jwt auth method that trusts keybroker's issuer:
    /// nothing secret per binding. `subject` is the tenant's
    /// (`keybroker:tenant:<id>`), what the role's `bound_subject` names.
    Jwt { role: String, subject: String },
}

impl fmt::Debug for VaultLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AppRole { role_id, .. } => f
                .debug_struct("AppRole")
                .field("role_id", role_id)
                .field("secret_id", &"<redacted>")
                .finish(),
            Self::Jwt { role, subject } => f
                .debug_struct("Jwt")
                .field("role", role)
                .field("subject", subject)
                .finish(),
        }
    }
}

impl VaultLogin {
    /// The session key of this login: the role, and a digest of the secret
    /// (a re-linked key with a new secret gets a new login).
    fn identity(&self) -> (String, [u8; 32]) {
        let (role, secret) = match self {
            Self::AppRole { role_id, secret_id } => {
                (format!("approle:{role_id}"), secret_id.as_bytes())
            }
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
struct Token {
    value: Zeroizing<String>,
    renew_at: Instant,
    expires_at: Instant,
    renewable: bool,
}

/// One customer role's login. The tokio mutex is held across the login on
/// purpose: concurrent callers wait for one login instead of each logging in.
struct VaultSession {
    address: String,
    auth_mount: String,
    login: VaultLogin,
    token: tokio::sync::Mutex<Option<Token>>,
}

#[derive(Deserialize)]
struct Auth {
    client_token: Zeroizing<String>,
    lease_duration: u64,
    renewable: bool,
}

#[derive(Deserialize)]
struct AuthReply {
    auth: Auth,
}

/// The body of a login: AppRole's, or the jwt method's.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum LoginBody<'a> {
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
struct TransitBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ciphertext: Option<&'a str>,
    associated_data: &'a str,
}

#[derive(Deserialize)]
struct ErrorReply {
    #[serde(default)]
    errors: Vec<String>,
}

impl VaultSession {
    /// A valid token: the cached one, renewed or re-obtained when due.
    async fn token(
        &self,
        vault: &VaultTransit,
        key: &str,
    ) -> Result<Zeroizing<String>, ProviderError> {
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
                secret_id: secret_id.as_str(),
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
    fn fresh(auth: Auth) -> Token {
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
    async fn forget(&self) {
        *self.token.lock().await = None;
    }
}

/// Vault's `errors` strings, escaped (they come from the customer's
/// server) and joined.
fn error_text(body: &[u8]) -> String {
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

impl VaultTransit {
    /// One HTTP call. The request body is sent from zeroizing memory
    /// (`Bytes::from_owner`: zeroed when the request is done) and the answer
    /// collected into zeroizing memory: Transit bodies carry plaintext keys.
    async fn post(
        &self,
        url: &str,
        token: Option<&Zeroizing<String>>,
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
            request = request.header("X-Vault-Token", token.as_str());
        }
        Self::collect(request.send().await?).await
    }

    async fn get(
        &self,
        url: &str,
        token: &Zeroizing<String>,
    ) -> Result<(u16, Zeroizing<Vec<u8>>), reqwest::Error> {
        let response = self
            .http
            .get(url)
            .header("X-Vault-Token", token.as_str())
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

/// What every call on one binding's key needs, shared with the batch
/// sender task.
struct KeyLink {
    vault: Arc<VaultTransit>,
    target: VaultTarget,
    session: Arc<VaultSession>,
    /// The newest key version seen (encrypt answers, describes); 0 unknown.
    latest: AtomicU32,
}

/// One decrypt waiting in the batch queue.
struct PendingDecrypt {
    ciphertext: String,
    aad: String,
    reply: tokio::sync::oneshot::Sender<Result<SecretBytes, ProviderError>>,
}

impl fmt::Debug for VaultTransitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultTransitKey")
            .field("target", &self.link.target)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Data<T> {
    data: T,
}

#[derive(Deserialize)]
struct EncryptData {
    ciphertext: String,
}

#[derive(Deserialize)]
struct DecryptData {
    plaintext: Zeroizing<String>,
}

#[derive(Deserialize)]
struct KeyData {
    #[serde(default)]
    latest_version: u32,
    #[serde(default)]
    min_decryption_version: u32,
    #[serde(default)]
    supports_encryption: bool,
    #[serde(default)]
    supports_decryption: bool,
    #[serde(default)]
    deletion_allowed: bool,
    #[serde(default)]
    soft_deleted: bool,
    #[serde(default)]
    auto_rotate_period: u64,
    #[serde(rename = "type", default)]
    key_type: String,
}

/// Key types whose encrypt/decrypt take `associated_data`.
const AEAD_TYPES: [&str; 3] = ["aes256-gcm96", "aes128-gcm96", "chacha20-poly1305"];

impl KeyLink {
    fn url(&self, operation: &str) -> String {
        self.target.key.operation_url(operation)
    }

    fn name(&self) -> &str {
        self.target.key.display()
    }

    /// POST with the session's token; transient failures are retried
    /// (`vault_max_attempts`, 50 ms doubling).
    async fn call(
        &self,
        call: Call,
        url: &str,
        body: &impl serde::Serialize,
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        use backon::Retryable as _;
        let policy = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_factor(2.0)
            .with_max_times(self.vault.settings.max_attempts.max(1) as usize - 1);
        (|| self.attempt(call, url, body))
            .retry(policy)
            .when(ProviderError::is_transient)
            .await
    }

    /// One attempt: a refused token is dropped and the call made once more
    /// after a new login (a second refusal is the policy's answer).
    async fn attempt(
        &self,
        call: Call,
        url: &str,
        body: &impl serde::Serialize,
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let mut relogged = false;
        loop {
            let token = self.session.token(&self.vault, self.name()).await?;
            if matches!(call, Call::Encrypt | Call::Decrypt) {
                self.vault.transit_calls.fetch_add(1, Ordering::Relaxed);
            }
            return match self.vault.post(url, Some(&token), body).await {
                Ok((200, reply)) => Ok(reply),
                Ok((403, _)) if !relogged => {
                    relogged = true;
                    self.session.forget().await;
                    continue;
                }
                Ok((status, reply)) => {
                    Err(classify(call, status, &error_text(&reply), self.name()))
                }
                Err(err) => Err(transport(call, self.name(), &err)),
            };
        }
    }

    /// The caller's ciphertext, checked against the envelope's version
    /// before the customer's Vault sees anything.
    fn checked_ciphertext<'a>(
        &self,
        key_version: &str,
        ciphertext: &'a [u8],
    ) -> Result<&'a str, ProviderError> {
        let text = std::str::from_utf8(ciphertext).ok();
        match text.and_then(|t| Some((t, ciphertext_version(t)?))) {
            Some((text, v)) if v.to_string() == key_version => Ok(text),
            _ => Err(ProviderError::InvalidCiphertext(format!(
                "the wrapped key does not hold a Transit ciphertext of version {} of {}",
                crate::text::Quoted(key_version),
                self.name()
            ))),
        }
    }

    fn ciphertext_of(&self, reply: &[u8], call: Call) -> Result<Ciphertext, ProviderError> {
        let reply: Data<EncryptData> = serde_json::from_slice(reply).map_err(|e| {
            ProviderError::Internal(format!("{call:?} answered something else: {e}"))
        })?;
        let version = ciphertext_version(&reply.data.ciphertext).ok_or_else(|| {
            ProviderError::Internal(format!("{call:?} returned no vault:vN: ciphertext"))
        })?;
        self.seen_version(version);
        Ok(Ciphertext {
            bytes: reply.data.ciphertext.into_bytes(),
            key_version: version.to_string(),
        })
    }

    /// Sends queued decrypts: one alone as a plain decrypt, more as one
    /// `batch_input` call; each caller gets its own item's answer.
    async fn decrypt_batch(&self, batch: Vec<PendingDecrypt>) {
        #[derive(serde::Serialize)]
        struct Item<'a> {
            ciphertext: &'a str,
            associated_data: &'a str,
        }
        #[derive(serde::Serialize)]
        struct Batch<'a> {
            batch_input: Vec<Item<'a>>,
            /// 200 when only some items fail (Vault answers 400 otherwise);
            /// when all fail it still answers 400, and every item fails.
            partial_failure_response_code: u16,
        }
        #[derive(Deserialize)]
        struct BatchData {
            batch_results: Vec<BatchResult>,
        }
        #[derive(Deserialize)]
        struct BatchResult {
            #[serde(default)]
            plaintext: Option<Zeroizing<String>>,
            #[serde(default)]
            error: String,
        }
        let url = self.url("decrypt");
        let answers: Vec<Result<Zeroizing<String>, ProviderError>> = if let [one] = batch.as_slice()
        {
            let body = TransitBody {
                plaintext: None,
                ciphertext: Some(&one.ciphertext),
                associated_data: &one.aad,
            };
            vec![
                self.call(Call::Decrypt, &url, &body)
                    .await
                    .and_then(|reply| {
                        serde_json::from_slice::<Data<DecryptData>>(&reply)
                            .map(|d| d.data.plaintext)
                            .map_err(|e| {
                                ProviderError::Internal(format!(
                                    "Transit decrypt answered something else: {e}"
                                ))
                            })
                    }),
            ]
        } else {
            let body = Batch {
                batch_input: batch
                    .iter()
                    .map(|p| Item {
                        ciphertext: &p.ciphertext,
                        associated_data: &p.aad,
                    })
                    .collect(),
                partial_failure_response_code: 200,
            };
            match self
                .call(Call::Decrypt, &url, &body)
                .await
                .and_then(|reply| {
                    serde_json::from_slice::<Data<BatchData>>(&reply).map_err(|e| {
                        ProviderError::Internal(format!(
                            "Transit batch decrypt answered something else: {e}"
                        ))
                    })
                }) {
                Ok(data) if data.data.batch_results.len() == batch.len() => data
                    .data
                    .batch_results
                    .into_iter()
                    .map(|r| match r.plaintext {
                        Some(p) if r.error.is_empty() => Ok(p),
                        _ => Err(classify(
                            Call::Decrypt,
                            400,
                            &crate::text::Escaped(&r.error).to_string(),
                            self.name(),
                        )),
                    })
                    .collect(),
                Ok(_) => batch
                    .iter()
                    .map(|_| {
                        Err(ProviderError::Internal(
                            "Transit batch decrypt answered a different number of items".into(),
                        ))
                    })
                    .collect(),
                Err(err) => batch.iter().map(|_| Err(err.clone())).collect(),
            }
        };
        for (pending, answer) in batch.into_iter().zip(answers) {
            let plaintext = answer.and_then(|text| {
                let mut plaintext = Zeroizing::new(Vec::with_capacity(48));
                B64.decode_vec(text.as_bytes(), &mut plaintext)
                    .map_err(|_| {
                        ProviderError::Internal("Transit decrypt returned bad base64".into())
                    })?;
                Ok(SecretBytes::new(std::mem::take(&mut *plaintext)))
            });
            // A caller that went away no longer needs its key.
            let _ = pending.reply.send(plaintext);
        }
    }

    fn seen_version(&self, version: u32) {
        self.latest.fetch_max(version, Ordering::Relaxed);
    }
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
