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
mod key;
mod reference;
mod settings;

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
use secrecy::ExposeSecret as _;

pub use self::errors::consent_url;
use self::errors::{Call, Failure, Scope, classify};
pub use self::key::AzureKey;
pub use self::reference::{AzureKeyRef, validate_tenant_id};
pub use self::settings::{AzureIdentityCache, AzureSettings};
use crate::kms::{
    Ciphertext, KeyDescription, KeyProvider, ProviderError, ProviderKeyState, ProviderKind,
    WrapContext,
};
use crate::seal::SealingKey;
use crate::secret::SecretBytes;

/// The built-in role a customer assigns to keybroker's application on the
/// key: get, wrapKey and unwrapKey, nothing more.
pub const KEY_ROLE: &str = "Key Vault Crypto Service Encryption User";

/// How keybroker proves it is the platform's application.
#[derive(Clone)]
enum AppCredential {
    Secret(secrecy::SecretString),
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
            (Some(path), _) => Some(AppCredential::Secret(secrecy::SecretString::from(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        ProviderError::Internal(format!(
                            "azure_client_secret_file {}: {e}",
                            path.display()
                        ))
                    })?
                    .trim()
                    .to_owned(),
            ))),
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
                Secret::new(secret.expose_secret().to_owned()),
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
    crate::call_notes::note_provider_request(id.as_deref());
    response
}

/// The version at the end of a `kid` (`.../keys/<name>/<version>`).
fn version_of(kid: &str) -> String {
    kid.rsplit('/').next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests;
