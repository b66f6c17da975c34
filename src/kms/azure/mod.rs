//! Customer keys in Azure Key Vault or Managed HSM (`azure-kv`), through
//! Microsoft's `azure_security_keyvault_keys` and `azure_identity` (on the
//! same reqwest/rustls stack as our other clients: one shared HTTPS client).
//!
//! - **Identity**: keybroker is the platform's multi-tenant Entra
//!   application (`azure_client_id`) and authenticates *in the customer's
//!   Entra tenant*, whose id the binding stores: the Azure counterpart of
//!   AssumeRole with an external ID. A client secret
//!   (`azure_client_secret_file`) or, in production, a federated client
//!   assertion (`azure_federated_token_file`, workload identity). One
//!   credential per customer tenant and one Key Vault client per (tenant,
//!   vault), bounded and evicted when idle.
//! - **Wrap**: RSA `wrapKey` binds no AAD, so the tenant and context are
//!   bound by an AEAD layer of our own: Key Vault wraps a fresh 256-bit key
//!   K (`RSA-OAEP-256` for RSA keys, `A256KW` for Managed HSM AES keys), and
//!   K seals the DEK with AES-256-GCM (the `seal` construction) under the
//!   canonical (tenant, context) AAD. One Key Vault call per wrap or unwrap,
//!   as with the other providers; a DEK of tenant B never opens as tenant A.
//!   With the `tenant_key` hierarchy only tenant keys take this path.
//! - **Versions**: the version in `wrapKey`'s `kid` is kept in the envelope
//!   and named on `unwrapKey`; rotation inside Key Vault is transparent and
//!   older versions get `rewrap_recommended`.
//! - **Describe**: enabled, `exp`/`nbf`, allowed operations, key type; a
//!   soft-deleted key answers 404 (message: how to recover it); a vault
//!   without purge protection is warned about once per key.
//! - **Throttling**: a 429/503 with `Retry-After` up to
//!   `azure_max_retry_delay` is retried after that delay (up to
//!   `azure_max_attempts`); a longer one is RESOURCE_EXHAUSTED at once,
//!   naming the delay.

mod errors;
mod reference;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::{
    ClientMethodOptions, ClientOptions, RequestContent, RetryOptions, Transport,
};
use azure_identity::{
    ClientAssertion, ClientAssertionCredential, ClientAssertionCredentialOptions,
    ClientSecretCredential, ClientSecretCredentialOptions,
};
use azure_security_keyvault_keys::models::{EncryptionAlgorithm, KeyOperationParameters, KeyType};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use zeroize::Zeroizing;

pub use self::errors::consent_url;
use self::errors::{Call, Failure, Scope, classify};
pub use self::reference::{AzureKeyRef, validate_tenant_id};
use crate::kms::{
    Ciphertext, KeyDescription, KeyProvider, ProviderError, ProviderKeyState, ProviderKind,
    WrapContext,
};
use crate::seal::SealingKey;
use crate::secret::SecretBytes;

/// The built-in role a customer assigns to keybroker's application on the
/// key: get, wrapKey and unwrapKey, nothing more.
pub const KEY_ROLE: &str = "Key Vault Crypto Service Encryption User";

const DEFAULT_DOMAINS: &str = "vault.azure.net,managedhsm.azure.net,vault.azure.cn,managedhsm.azure.cn,vault.usgovcloudapi.net,managedhsm.usgovcloudapi.net";

crate::settings::identity_cache_flags!(
    AzureIdentityCache,
    "azure",
    "AZURE",
    "customer tenants' credentials (with their Key Vault clients)"
);

/// The `azure_*` settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct AzureSettings {
    /// The platform's multi-tenant Entra application (client) id that
    /// customers consent to. Unset: no Azure keys.
    #[arg(
        id = "azure_client_id",
        long = "azure-client-id",
        env = "KEYBROKER_AZURE_CLIENT_ID"
    )]
    pub client_id: Option<String>,
    /// File holding the application's client secret.
    #[arg(
        id = "azure_client_secret_file",
        long = "azure-client-secret-file",
        env = "KEYBROKER_AZURE_CLIENT_SECRET_FILE"
    )]
    pub client_secret_file: Option<std::path::PathBuf>,
    /// File holding a federated client assertion (a workload identity
    /// token, re-read for every token request), instead of a secret.
    #[arg(
        id = "azure_federated_token_file",
        long = "azure-federated-token-file",
        env = "KEYBROKER_AZURE_FEDERATED_TOKEN_FILE"
    )]
    pub federated_token_file: Option<std::path::PathBuf>,
    /// The Entra authority.
    #[arg(
        id = "azure_authority_host",
        long = "azure-authority-host",
        env = "KEYBROKER_AZURE_AUTHORITY_HOST",
        default_value = "https://login.microsoftonline.com"
    )]
    pub authority_host: String,
    /// Hosts a key reference may name (the host or a subdomain): keybroker
    /// sends the customer tenant's token there.
    #[arg(
        id = "azure_vault_domains",
        long = "azure-vault-domains",
        env = "KEYBROKER_AZURE_VAULT_DOMAINS",
        value_delimiter = ',',
        default_value = DEFAULT_DOMAINS
    )]
    pub vault_domains: Vec<String>,
    /// Extra CA certificate (PEM) trusted for Key Vault and Entra, besides
    /// the system's roots (a private endpoint's proxy; the tests' fake).
    #[arg(
        id = "azure_ca_file",
        long = "azure-ca-file",
        env = "KEYBROKER_AZURE_CA_FILE"
    )]
    pub ca_file: Option<std::path::PathBuf>,
    /// HTTPS proxy (an egress proxy) for Entra and Key Vault traffic
    /// [default: HTTPS_PROXY, if set].
    #[arg(
        id = "azure_proxy",
        long = "azure-proxy",
        env = "KEYBROKER_AZURE_PROXY"
    )]
    pub proxy: Option<String>,
    /// Deadline of one Key Vault or Entra request.
    #[arg(id = "azure_request_timeout", long = "azure-request-timeout", env = "KEYBROKER_AZURE_REQUEST_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub request_timeout: Duration,
    /// Attempts per call, the first included (throttling and 5xx retry).
    #[arg(
        id = "azure_max_attempts",
        long = "azure-max-attempts",
        env = "KEYBROKER_AZURE_MAX_ATTEMPTS",
        default_value = "3"
    )]
    pub max_attempts: u32,
    /// The longest `Retry-After` waited for; a longer one fails the call at
    /// once with RESOURCE_EXHAUSTED naming the delay.
    #[arg(id = "azure_max_retry_delay", long = "azure-max-retry-delay", env = "KEYBROKER_AZURE_MAX_RETRY_DELAY", value_parser = humantime::parse_duration, default_value = "2s")]
    pub max_retry_delay: Duration,
    #[command(flatten)]
    pub identity: AzureIdentityCache,
}

impl Default for AzureSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl AzureSettings {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        use crate::settings::invalid;
        if self.max_attempts == 0 || self.max_attempts > 10 {
            return invalid("azure_max_attempts", "must be 1 to 10");
        }
        if self.request_timeout.is_zero() {
            return invalid("azure_request_timeout", "must be longer than zero");
        }
        if !self.authority_host.starts_with("https://") {
            return invalid("azure_authority_host", "must be an https:// URL");
        }
        if self.vault_domains.iter().any(|d| d.trim().is_empty()) {
            return invalid("azure_vault_domains", "must not hold an empty domain");
        }
        if self.client_id.is_some()
            && self.client_secret_file.is_some() == self.federated_token_file.is_some()
        {
            return invalid(
                "azure_client_id",
                "needs exactly one of azure_client_secret_file and azure_federated_token_file",
            );
        }
        self.identity.validate()?;
        Ok(())
    }
}

/// How keybroker proves it is the platform's application.
#[derive(Clone)]
enum AppCredential {
    Secret(Arc<Zeroizing<String>>),
    Federated(std::path::PathBuf),
}

/// A federated token file, read for every token request (the platform
/// rotates it).
#[derive(Debug, Clone)]
struct TokenFile(std::path::PathBuf);

#[async_trait]
impl ClientAssertion for TokenFile {
    async fn secret(
        &self,
        _options: Option<ClientMethodOptions<'_>>,
    ) -> azure_core::Result<String> {
        tokio::fs::read_to_string(&self.0)
            .await
            .map(|t| t.trim().to_owned())
            .map_err(|e| {
                azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Credential,
                    format!("azure_federated_token_file {}: {e}", self.0.display()),
                )
            })
    }
}

/// Shared Azure state: the HTTPS client, credentials per customer tenant,
/// Key Vault clients per (tenant, vault).
pub struct AzureKeyVault {
    settings: AzureSettings,
    app: Option<AppCredential>,
    /// One HTTPS client for every credential and Key Vault client.
    http: reqwest::Client,
    /// Credentials by customer tenant (each caches its tokens), bounded
    /// and dropped when idle.
    credentials: moka::sync::Cache<String, Arc<dyn TokenCredential>>,
    /// Key Vault clients by (customer tenant, vault URL).
    clients: moka::sync::Cache<(String, String), Arc<KeyClient>>,
    /// Key type learned per key (RSA or AES), so a wrap needs no describe.
    kinds: moka::sync::Cache<String, Algorithm>,
    /// The current version last seen per key (wrap or describe), for
    /// `rewrap_recommended` without a call.
    currents: moka::sync::Cache<String, String>,
    /// Keys already warned about (no purge protection): once per key.
    warned: moka::sync::Cache<String, ()>,
    /// wrapKey/unwrapKey calls made (tests count them).
    pub calls: Arc<AtomicU64>,
    /// Describe (get key) calls made.
    pub describes: Arc<AtomicU64>,
}

impl fmt::Debug for AzureKeyVault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureKeyVault")
            .field("client_id", &self.settings.client_id)
            .finish_non_exhaustive()
    }
}

/// The key-wrapping algorithm for a key type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    RsaOaep256,
    A256Kw,
}

impl Algorithm {
    fn id(self) -> u8 {
        match self {
            Self::RsaOaep256 => 1,
            Self::A256Kw => 2,
        }
    }

    fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Self::RsaOaep256),
            2 => Some(Self::A256Kw),
            _ => None,
        }
    }

    fn sdk(self) -> EncryptionAlgorithm {
        match self {
            Self::RsaOaep256 => EncryptionAlgorithm::RsaOaep256,
            Self::A256Kw => EncryptionAlgorithm::A256Kw,
        }
    }

    fn for_key(kty: &KeyType) -> Option<Self> {
        match kty {
            KeyType::Rsa | KeyType::RsaHsm => Some(Self::RsaOaep256),
            KeyType::Oct | KeyType::OctHsm => Some(Self::A256Kw),
            _ => None,
        }
    }
}

/// Whether `ciphertext` (ours) wraps its per-wrap key with RSA: anyone
/// holding the public key can make such a wrap, so it authenticates
/// nothing, and RSA keys protect tenant key versions only (the registry,
/// not a caller, supplies those).
pub fn wraps_with_rsa(ciphertext: &[u8]) -> bool {
    matches!(ciphertext, [FORMAT, alg, ..] if Algorithm::from_id(*alg) == Some(Algorithm::RsaOaep256))
}

/// Layout of our ciphertext: format byte, algorithm byte, length of the
/// wrapped K (u16, big-endian), the wrapped K, then the DEK sealed under K.
const FORMAT: u8 = 1;
const KEK_LEN: usize = 32;

impl AzureKeyVault {
    /// Reads the application's secret (if any) and builds the HTTPS client.
    pub fn new(settings: AzureSettings) -> Result<Self, ProviderError> {
        let app = match (&settings.client_secret_file, &settings.federated_token_file) {
            (Some(path), _) => Some(AppCredential::Secret(Arc::new(Zeroizing::new(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        ProviderError::Internal(format!(
                            "azure_client_secret_file {}: {e}",
                            path.display()
                        ))
                    })?
                    .trim()
                    .to_owned(),
            )))),
            (None, Some(path)) => Some(AppCredential::Federated(path.clone())),
            (None, None) => None,
        };
        let mut builder = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .https_only(true)
            // A redirect would re-send a wrapKey body (the per-wrap key) to
            // another host; Key Vault and Entra never redirect these calls.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(proxy) = &settings.proxy {
            let proxy = reqwest::Proxy::https(proxy)
                .map_err(|e| ProviderError::Internal(format!("azure_proxy: {e}")))?;
            builder = builder.proxy(proxy);
        }
        if let Some(path) = &settings.ca_file {
            builder = builder.add_root_certificate(super::extra_root_ca("azure_ca_file", path)?);
        }
        let http = builder.build().map_err(|e| {
            ProviderError::Internal(format!("cannot build the Azure HTTPS client: {e}"))
        })?;
        let identity = settings.identity.get();
        Ok(Self {
            credentials: identity.sync_cache(1),
            clients: identity.sync_cache(1),
            kinds: identity.sync_cache(4),
            currents: identity.sync_cache(4),
            warned: identity.sync_cache(4),
            settings,
            app,
            http,
            calls: Arc::default(),
            describes: Arc::default(),
        })
    }

    pub fn settings(&self) -> &AzureSettings {
        &self.settings
    }

    /// Live customer-tenant credentials (metrics).
    pub fn live_credentials(&self) -> u64 {
        self.credentials.run_pending_tasks();
        self.credentials.entry_count()
    }

    /// The provider for one binding.
    pub fn key(self: &Arc<Self>, key: AzureKeyRef, customer_tenant: String) -> AzureKey {
        AzureKey {
            kv: Arc::clone(self),
            name: key.to_string(),
            key,
            customer_tenant,
        }
    }

    fn client_options(&self) -> ClientOptions {
        let mut cloud = azure_core::cloud::CustomConfiguration::default();
        cloud.authority_host = self
            .settings
            .authority_host
            .trim_end_matches('/')
            .to_owned();
        ClientOptions {
            transport: Some(Transport::new(Arc::new(self.http.clone()))),
            // Retries are ours: Retry-After is honoured up to a bound.
            retry: RetryOptions::none(),
            cloud: Some(Arc::new(cloud.into())),
            ..ClientOptions::default()
        }
    }

    fn client_id(&self) -> Result<&str, ProviderError> {
        self.settings.client_id.as_deref().ok_or_else(|| {
            ProviderError::Internal(
                "Azure Key Vault keys need the server's azure_client_id and its credential (azure_client_secret_file or azure_federated_token_file)".into(),
            )
        })
    }

    fn credential(&self, customer_tenant: &str) -> Result<Arc<dyn TokenCredential>, ProviderError> {
        if let Some(found) = self.credentials.get(customer_tenant) {
            return Ok(found);
        }
        let client_id = self.client_id()?.to_owned();
        let build_error = |e: azure_core::Error| {
            ProviderError::Internal(format!(
                "cannot set up the Entra credential for tenant {customer_tenant}: {e}"
            ))
        };
        let credential: Arc<dyn TokenCredential> = match &self.app {
            Some(AppCredential::Secret(secret)) => ClientSecretCredential::new(
                customer_tenant,
                client_id,
                Secret::new(secret.as_str().to_owned()),
                Some(ClientSecretCredentialOptions {
                    client_options: self.client_options(),
                }),
            )
            .map_err(build_error)?,
            Some(AppCredential::Federated(path)) => ClientAssertionCredential::new(
                customer_tenant.to_owned(),
                client_id,
                TokenFile(path.clone()),
                Some(ClientAssertionCredentialOptions {
                    client_options: self.client_options(),
                }),
            )
            .map_err(build_error)?,
            // Settings validation requires a proof with a client id.
            None => {
                return Err(ProviderError::Internal(
                    "azure_client_id needs azure_client_secret_file or azure_federated_token_file"
                        .into(),
                ));
            }
        };
        self.credentials
            .insert(customer_tenant.to_owned(), Arc::clone(&credential));
        Ok(credential)
    }

    fn client(
        &self,
        customer_tenant: &str,
        vault_url: &str,
    ) -> Result<Arc<KeyClient>, ProviderError> {
        let id = (customer_tenant.to_owned(), vault_url.to_owned());
        if let Some(found) = self.clients.get(&id) {
            return Ok(found);
        }
        let credential = self.credential(customer_tenant)?;
        let client = KeyClient::new(
            vault_url,
            credential,
            Some(KeyClientOptions {
                client_options: self.client_options(),
                ..KeyClientOptions::default()
            }),
        )
        .map_err(|e| {
            ProviderError::Internal(format!(
                "cannot create the Key Vault client for {vault_url}: {e}"
            ))
        })?;
        let client = Arc::new(client);
        self.clients.insert(id, Arc::clone(&client));
        Ok(client)
    }
}

/// A cache of at most `capacity` entries, each dropped after `idle` unused.
/// What a failed SDK call said.
fn failure(err: &azure_core::Error) -> Failure {
    use azure_core::error::ErrorKind;
    match err.kind() {
        ErrorKind::HttpResponse {
            status,
            error_code,
            raw_response,
        } => {
            let mut failure = Failure {
                status: Some(u16::from(*status)),
                code: error_code.clone().unwrap_or_default(),
                message: err.to_string(),
                ..Failure::default()
            };
            if let Some(raw) = raw_response {
                if let Ok(body) = raw.body().json::<serde_json::Value>() {
                    let error = &body["error"];
                    if let Some(code) = error["code"].as_str() {
                        failure.code = code.to_owned();
                    }
                    if let Some(message) = error["message"].as_str() {
                        failure.message = message.to_owned();
                    }
                    if let Some(inner) = error["innererror"]["code"].as_str() {
                        failure.inner_code = inner.to_owned();
                    }
                }
                failure.retry_after = raw
                    .headers()
                    .get_optional_str(&azure_core::http::headers::HeaderName::from_static(
                        "retry-after",
                    ))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
            }
            failure
        }
        ErrorKind::Credential => Failure {
            credential: true,
            message: err.to_string(),
            ..Failure::default()
        },
        ErrorKind::Connection | ErrorKind::Io => Failure {
            connection: true,
            message: err.to_string(),
            ..Failure::default()
        },
        _ => Failure {
            message: err.to_string(),
            ..Failure::default()
        },
    }
}

/// Notes Key Vault's request id (`x-ms-request-id`) for the call's audit
/// record, so a customer can find the call in their vault's logs.
fn noted<T>(response: azure_core::http::Response<T>) -> azure_core::http::Response<T> {
    let id = response.headers().get_optional_string(
        &azure_core::http::headers::HeaderName::from_static("x-ms-request-id"),
    );
    crate::audit::note_provider_request(id.as_deref());
    response
}

/// The version at the end of a `kid` (`.../keys/<name>/<version>`).
fn version_of(kid: &str) -> String {
    kid.rsplit('/').next().unwrap_or_default().to_owned()
}

/// One Azure binding as a [`KeyProvider`].
pub struct AzureKey {
    kv: Arc<AzureKeyVault>,
    key: AzureKeyRef,
    /// The customer's Entra tenant (directory) id.
    customer_tenant: String,
    /// The key's URL, for messages.
    name: String,
}

impl fmt::Debug for AzureKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureKey")
            .field("key", &self.name)
            .field("customer_tenant", &self.customer_tenant)
            .finish()
    }
}

impl AzureKey {
    /// The key this provider uses.
    pub fn reference(&self) -> &AzureKeyRef {
        &self.key
    }

    fn classify(&self, call: Call, err: &azure_core::Error) -> ProviderError {
        let scope = Scope {
            key: &self.name,
            vault: self.key.vault_name(),
            key_name: &self.key.name,
            customer_tenant: &self.customer_tenant,
            client_id: self.kv.settings.client_id.as_deref().unwrap_or_default(),
        };
        classify(
            call,
            &failure(err),
            &scope,
            &self.kv.settings.authority_host,
        )
    }

    /// Runs `op` with the bounded retries: throttling and outages are
    /// retried, honouring `Retry-After` up to `azure_max_retry_delay`.
    async fn with_retries<T, F, Fut>(&self, call: Call, op: F) -> Result<T, ProviderError>
    where
        F: Fn(Arc<KeyClient>) -> Fut,
        Fut: Future<Output = azure_core::Result<T>>,
    {
        use backon::Retryable as _;
        let client = self.kv.client(&self.customer_tenant, &self.key.vault_url)?;
        let settings = &self.kv.settings;
        let policy = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_factor(2.0)
            .with_max_times(settings.max_attempts.max(1) as usize - 1);
        (|| async {
            op(Arc::clone(&client))
                .await
                .map_err(|err| (self.classify(call, &err), failure(&err).retry_after))
        })
        .retry(policy)
        .when(|(classified, _)| classified.is_transient())
        // Key Vault's Retry-After replaces the backoff's delay (never its
        // count of attempts); one longer than `azure_max_retry_delay` fails
        // the call at once.
        .adjust(|(_, retry_after), backoff| match (*retry_after, backoff) {
            (_, None) => None,
            (Some(delay), Some(_)) if delay > settings.max_retry_delay => None,
            (Some(delay), Some(_)) => Some(delay),
            (None, backoff) => backoff,
        })
        .await
        .map_err(|(classified, _)| classified)
    }

    /// Key Vault's unwrapKey of `wrapped` with RSA-OAEP-256 under
    /// `version`: the raw operation, without keybroker's AEAD layer (the
    /// fidelity test reads with it what Microsoft's Python SDK wrapped).
    pub async fn unwrap_raw(
        &self,
        version: &str,
        wrapped: &[u8],
    ) -> Result<SecretBytes, ProviderError> {
        self.check_version(version)?;
        self.unwrap_key(Algorithm::RsaOaep256, version, wrapped)
            .await
    }

    async fn unwrap_key(
        &self,
        alg: Algorithm,
        version: &str,
        wrapped: &[u8],
    ) -> Result<SecretBytes, ProviderError> {
        self.kv.calls.fetch_add(1, Ordering::Relaxed);
        let name = self.key.name.clone();
        let result = self
            .with_retries(Call::Unwrap, |client| {
                let (name, version) = (name.clone(), version.to_owned());
                let params = KeyOperationParameters {
                    algorithm: Some(alg.sdk()),
                    value: Some(wrapped.to_vec()),
                    ..KeyOperationParameters::default()
                };
                async move {
                    let body: RequestContent<KeyOperationParameters> = params.try_into()?;
                    noted(client.unwrap_key(&name, &version, body, None).await?).into_model()
                }
            })
            .await?;
        Ok(SecretBytes::new(result.result.unwrap_or_default()))
    }

    /// The wrapping algorithm of this key: known from a describe, else one
    /// get-key call (once per key per process).
    async fn algorithm(&self) -> Result<Algorithm, ProviderError> {
        if let Some(alg) = self.kv.kinds.get(&self.name) {
            return Ok(alg);
        }
        self.describe().await?;
        self.kv.kinds.get(&self.name).ok_or_else(|| {
            ProviderError::KeyDisabled(format!(
                "{} is neither an RSA nor an AES key; keybroker wraps with RSA-OAEP-256 or A256KW",
                self.name
            ))
        })
    }
}

#[async_trait]
impl KeyProvider for AzureKey {
    fn kind(&self) -> ProviderKind {
        ProviderKind::AzureKeyVault
    }

    async fn encrypt(
        &self,
        plaintext: &SecretBytes,
        wrap: WrapContext<'_>,
    ) -> Result<Ciphertext, ProviderError> {
        let alg = self.algorithm().await?;
        let kek = SecretBytes::random(KEK_LEN)
            .map_err(|_| ProviderError::Internal("system random generator failed".into()))?;
        let sealing = SealingKey::new(kek.expose())
            .ok_or_else(|| ProviderError::Internal("key sealing setup failed".into()))?;
        let sealed = sealing
            .seal(plaintext.expose(), &wrap.aad())
            .map_err(|e| ProviderError::Internal(e.to_string()))?;
        self.kv.calls.fetch_add(1, Ordering::Relaxed);
        let name = self.key.name.clone();
        let result = self
            .with_retries(Call::Wrap, |client| {
                let name = name.clone();
                let params = KeyOperationParameters {
                    algorithm: Some(alg.sdk()),
                    value: Some(kek.expose().to_vec()),
                    ..KeyOperationParameters::default()
                };
                async move {
                    let body: RequestContent<KeyOperationParameters> = params.try_into()?;
                    noted(client.wrap_key(&name, body, None).await?).into_model()
                }
            })
            .await?;
        let wrapped = result.result.unwrap_or_default();
        let version = version_of(result.kid.as_deref().unwrap_or_default());
        if wrapped.is_empty() || version.is_empty() || wrapped.len() > usize::from(u16::MAX) {
            return Err(ProviderError::Internal(format!(
                "Key Vault's wrapKey answer for {} holds no wrapped key or key version",
                self.name
            )));
        }
        if self.kv.currents.get(&self.name).as_deref() != Some(version.as_str()) {
            self.kv.currents.insert(self.name.clone(), version.clone());
        }
        let mut bytes = Vec::with_capacity(4 + wrapped.len() + sealed.len());
        bytes.push(FORMAT);
        bytes.push(alg.id());
        bytes.extend_from_slice(
            &u16::try_from(wrapped.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        bytes.extend_from_slice(&wrapped);
        bytes.extend_from_slice(&sealed);
        Ok(Ciphertext {
            bytes,
            key_version: version,
        })
    }

    async fn decrypt(
        &self,
        key_version: &str,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Result<SecretBytes, ProviderError> {
        self.check_version(key_version)?;
        let invalid = |why: &str| ProviderError::InvalidCiphertext(format!("{}: {why}", self.name));
        let [format, alg, hi, lo, rest @ ..] = ciphertext else {
            return Err(invalid("the wrapped key is too short"));
        };
        let alg = Algorithm::from_id(*alg)
            .filter(|_| *format == FORMAT)
            .ok_or_else(|| invalid("unknown wrapped key layout"))?;
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        if rest.len() <= len {
            return Err(invalid("the wrapped key is truncated"));
        }
        let (wrapped, sealed) = rest.split_at(len);
        let kek = self.unwrap_key(alg, key_version, wrapped).await?;
        let sealing = SealingKey::new(kek.expose())
            .ok_or_else(|| invalid("Key Vault unwrapped a key of the wrong length"))?;
        sealing.open(sealed, &wrap.aad()).map_err(|_| {
            invalid("authentication failed: the context or tenant differs from the wrap, or the wrapped key was altered")
        })
    }

    async fn describe(&self) -> Result<KeyDescription, ProviderError> {
        self.kv.describes.fetch_add(1, Ordering::Relaxed);
        let name = self.key.name.clone();
        let key = self
            .with_retries(Call::Describe, |client| {
                let name = name.clone();
                async move { noted(client.get_key(&name, None).await?).into_model() }
            })
            .await?;
        let owner_tag = key
            .tags
            .as_ref()
            .and_then(|tags| tags.get(crate::kms::OWNER_TAG))
            .cloned();
        let jwk = key.key.unwrap_or_default();
        let attributes = key.attributes.unwrap_or_default();
        let version = version_of(jwk.kid.as_deref().unwrap_or_default());
        if !version.is_empty()
            && self.kv.currents.get(&self.name).as_deref() != Some(version.as_str())
        {
            self.kv.currents.insert(self.name.clone(), version.clone());
        }
        let alg = jwk.kty.as_ref().and_then(Algorithm::for_key);
        if let Some(alg) = alg {
            self.kv.kinds.insert(self.name.clone(), alg);
        }
        let recovery = attributes
            .recovery_level
            .as_ref()
            .map(|l| format!("{l:?}"))
            .unwrap_or_default();
        if recovery.contains("Purgeable") && self.kv.warned.get(&self.name).is_none() {
            self.kv.warned.insert(self.name.clone(), ());
            tracing::warn!(key = %self.name, recovery_level = %recovery, "the customer's vault has no purge protection: a deleted key can be purged at once and every DEK under it lost; ask the customer to enable purge protection");
        }
        let now = azure_core::time::OffsetDateTime::now_utc();
        let ops = jwk.key_ops.unwrap_or_default();
        let disabled = |reason: String| KeyDescription {
            state: ProviderKeyState::Disabled,
            reason,
            current_version: version.clone(),
            owner_tag: owner_tag.clone(),
            ..KeyDescription::default()
        };
        if attributes.enabled == Some(false) {
            return Ok(disabled(format!(
                "{} is disabled in Key Vault; the customer can enable it again",
                self.name
            )));
        }
        if attributes.expires.is_some_and(|exp| exp <= now) {
            return Ok(disabled(format!(
                "{} expired in Key Vault (exp); the customer can extend its expiry date",
                self.name
            )));
        }
        if attributes.not_before.is_some_and(|nbf| nbf > now) {
            return Ok(disabled(format!(
                "{} is not yet valid in Key Vault (nbf)",
                self.name
            )));
        }
        if alg.is_none() {
            return Ok(disabled(format!(
                "{} is a {:?} key; keybroker needs an RSA key (RSA-OAEP-256) or a Managed HSM AES key (A256KW)",
                self.name, jwk.kty
            )));
        }
        let allows = |op: &str| ops.iter().any(|o| o == op);
        let usable = ops.is_empty() || (allows("wrapKey") && allows("unwrapKey"));
        if !usable {
            return Ok(disabled(format!(
                "{} does not allow wrapKey and unwrapKey (key_ops: {}); the customer can allow them",
                self.name,
                ops.join(", ")
            )));
        }
        Ok(KeyDescription {
            current_version: version,
            protection_level: jwk.kty.as_ref().map(|k| {
                if matches!(k, KeyType::RsaHsm | KeyType::OctHsm) {
                    "HSM"
                } else {
                    "SOFTWARE"
                }
                .to_owned()
            }),
            owner_tag,
            ..KeyDescription::default()
        })
    }

    fn current_version(&self) -> Option<String> {
        self.kv.currents.get(&self.name)
    }

    fn is_current_version(&self, version: &str) -> Option<bool> {
        self.kv
            .currents
            .get(&self.name)
            .map(|current| current == version)
    }

    /// A version is 32 hex characters (Key Vault's); anything else is forged.
    fn check_version(&self, version: &str) -> Result<(), ProviderError> {
        if version.len() == 32 && version.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(())
        } else {
            Err(ProviderError::InvalidCiphertext(format!(
                "the wrapped key names Key Vault key version {}, which is not a version of {}",
                crate::text::Quoted(version),
                self.name
            )))
        }
    }
}

#[cfg(test)]
mod tests;
