//! Customer keys in AWS KMS, used through the customer's IAM role, assumed
//! with STS and the tenant's external ID (the flow of Pinecone's and
//! turbopuffer's CMEK pages).
//!
//! [`AwsKms`] is shared by all bindings: the platform's own credentials (the
//! standard AWS chain: env, IRSA web identity, instance profile), one role
//! session per (role, external ID, session name) and one KMS client per
//! (session, region). [`AwsKmsKey`] is one binding's view of it and is the
//! [`KeyProvider`] the data plane sees.
//!
//! Failures are classified here, from the SDK's error types and AWS error
//! codes, into [`ProviderError`] with messages a customer can act on.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_kms::config::IdentityCache;
use aws_sdk_kms::operation::RequestId as _;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::KeyState;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;

pub mod arn;
mod classify;
mod session;
mod settings;

pub use arn::{KeyArn, RoleArn};
pub use session::session_name;
pub use settings::{AwsIdentityCache, AwsSettings};

use self::classify::{KmsCall, MAX_CIPHERTEXT_BLOB, classify_kms, state_reason};
use self::session::{RoleSession, SessionCredentials};
use super::{
    Ciphertext, KeyDescription, KeyProvider, ProviderError, ProviderKeyState, ProviderKind,
    WrapContext,
};
use crate::secret::SecretBytes;

/// Encryption-context key that carries the tenant id (callers cannot use the
/// `keybroker:` prefix, so it never collides with their entries).
pub const TENANT_CONTEXT_KEY: &str = "keybroker:tenant";

/// Shared AWS state: platform credentials, role sessions, KMS clients.
pub struct AwsKms {
    base: SdkConfig,
    settings: AwsSettings,
    sts: aws_sdk_sts::Client,
    /// Role sessions (each with its KMS clients) by (role ARN, external ID,
    /// session name): bounded and dropped when idle
    /// (`aws_identity_cache_*`). A binding's provider holds its session, so
    /// eviction never breaks a call; a session evicted while in use is
    /// replaced on the next tenant-view load, at one AssumeRole.
    sessions: moka::sync::Cache<(RoleArn, String, String), Arc<RoleSession>>,
    /// AssumeRole calls made (metrics; tests assert one per session lifetime).
    pub assume_role_calls: Arc<AtomicU64>,
}

impl fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKms")
            .field("settings", &self.settings)
            .field(
                "assume_role_calls",
                &self.assume_role_calls.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl AwsKms {
    /// Platform credentials from the standard AWS chain.
    pub async fn from_env(settings: AwsSettings) -> Self {
        let base = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(settings.region.clone()))
            .load()
            .await;
        Self::new(base, settings)
    }

    pub fn new(base: SdkConfig, settings: AwsSettings) -> Self {
        // Without an HTTP client in the base config, the SDK builds a new
        // one (TLS config, root store, connection pool: ~120 KB and its own
        // connections) for every client, that is for every customer role
        // session: one shared client keeps per-tenant state small and
        // reuses connections to each KMS endpoint across tenants (SigV4
        // signs each request with the session's own credentials).
        let base = if base.http_client().is_none() {
            base.into_builder()
                .http_client(shared_https_client())
                .build()
        } else {
            base
        };
        let mut sts = aws_sdk_sts::config::Builder::from(&base)
            .region(aws_config::Region::new(settings.region.clone()))
            .retry_config(retry_config(&settings))
            .timeout_config(timeout_config(&settings));
        if let Some(url) = &settings.sts_endpoint {
            sts = sts.endpoint_url(url.clone());
        }
        Self {
            sts: aws_sdk_sts::Client::from_conf(sts.build()),
            base,
            sessions: settings.identity.get().sync_cache(1),
            settings,
            assume_role_calls: Arc::default(),
        }
    }

    /// Live role sessions (metrics: `keybroker_identity_clients`).
    pub fn live_sessions(&self) -> u64 {
        self.sessions.run_pending_tasks();
        self.sessions.entry_count()
    }

    /// The provider for one binding.
    pub fn key(self: &Arc<Self>, target: AwsKeyTarget) -> AwsKmsKey {
        let session_name = session_name(&target.tenant_id);
        let key = (
            target.role_arn.clone(),
            target.external_id.clone(),
            session_name,
        );
        let session = self.sessions.get_with_by_ref(&key, || {
            Arc::new(RoleSession {
                sts: self.sts.clone(),
                role_arn: key.0.clone(),
                external_id: key.1.clone(),
                session_name: key.2.clone(),
                duration: self.settings.session_duration,
                credentials: tokio::sync::Mutex::new(None),
                clients: parking_lot::Mutex::default(),
                calls: Arc::clone(&self.assume_role_calls),
            })
        });
        AwsKmsKey {
            kms: Arc::clone(self),
            target,
            session,
        }
    }

    fn client(&self, session: &Arc<RoleSession>, region: &str) -> aws_sdk_kms::Client {
        let mut clients = session.clients.lock();
        clients
            .entry(region.to_owned())
            .or_insert_with(|| {
                let mut config = aws_sdk_kms::config::Builder::from(&self.base)
                    .region(aws_config::Region::new(region.to_owned()))
                    .credentials_provider(SessionCredentials(Arc::downgrade(session)))
                    // Our session already caches; a second cache would only
                    // hold credentials past our refresh.
                    .identity_cache(IdentityCache::no_cache())
                    .retry_config(retry_config(&self.settings))
                    .timeout_config(timeout_config(&self.settings));
                if let Some(url) = self.settings.kms_endpoint_of(region) {
                    config = config.endpoint_url(url);
                }
                aws_sdk_kms::Client::from_conf(config.build())
            })
            .clone()
    }
}

/// The SDK's default HTTPS client (rustls on aws-lc, proxy from the
/// environment), built once instead of once per client.
fn shared_https_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    use aws_smithy_http_client::{Builder, ConnectorBuilder, proxy::ProxyConfig, tls};
    Builder::new().build_with_connector_fn(|settings, components| {
        let mut connector = ConnectorBuilder::default().tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ));
        connector.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            connector.set_sleep_impl(components.sleep_impl());
        }
        connector.set_proxy_config(Some(ProxyConfig::from_env()));
        connector.build()
    })
}

fn retry_config(settings: &AwsSettings) -> RetryConfig {
    RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1))
}

fn timeout_config(settings: &AwsSettings) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(settings.connect_timeout)
        .operation_attempt_timeout(settings.attempt_timeout)
        .operation_timeout(settings.operation_timeout)
        .build()
}

/// What one binding needs to reach its key.
#[derive(Debug, Clone)]
pub struct AwsKeyTarget {
    pub tenant_id: String,
    /// Key ARN or alias ARN; its region is the binding's region.
    pub key_arn: KeyArn,
    pub role_arn: RoleArn,
    pub external_id: String,
    /// Regions holding replicas of a multi-Region key, tried in order when
    /// the primary region fails transiently.
    pub replica_regions: Vec<String>,
}

impl AwsKeyTarget {
    pub fn region(&self) -> &str {
        self.key_arn.region()
    }
}

/// One AWS binding as a [`KeyProvider`].
#[derive(Debug)]
pub struct AwsKmsKey {
    kms: Arc<AwsKms>,
    target: AwsKeyTarget,
    session: Arc<RoleSession>,
}

impl AwsKmsKey {
    fn client(&self, region: &str) -> aws_sdk_kms::Client {
        self.kms.client(&self.session, region)
    }

    fn context(wrap: &WrapContext<'_>) -> HashMap<String, String> {
        let mut ctx: HashMap<String, String> = wrap
            .context
            .entries()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        ctx.insert(TENANT_CONTEXT_KEY.to_owned(), wrap.tenant_id.to_owned());
        ctx
    }

    /// Same customer role and region: ReEncrypt can move a key between them
    /// without the plaintext leaving KMS.
    pub fn same_session(&self, other: &AwsKmsKey) -> bool {
        self.session.same_identity(&other.session) && self.target.region() == other.target.region()
    }

    async fn decrypt_in(
        &self,
        region: &str,
        ciphertext: &[u8],
        context: &HashMap<String, String>,
    ) -> Result<SecretBytes, ProviderError> {
        let out = self
            .client(region)
            .decrypt()
            // Pinned: KMS refuses a ciphertext of any other key.
            .key_id(self.target.key_arn.in_region(region).to_string())
            .ciphertext_blob(Blob::new(ciphertext.to_vec()))
            .set_encryption_context(Some(context.clone()))
            .send()
            .await
            .map_err(|e| classify_kms(e, KmsCall::Decrypt, &self.target, region))?;
        crate::call_notes::note_provider_request(out.request_id());
        let plaintext = out
            .plaintext
            .ok_or_else(|| ProviderError::Internal("KMS Decrypt returned no plaintext".into()))?;
        Ok(SecretBytes::new(plaintext.into_inner()))
    }

    /// Decrypts `ciphertext` in every replica region: proves at link time
    /// that the fallback regions really hold the key.
    pub async fn check_replicas(
        &self,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Result<(), ProviderError> {
        let context = Self::context(&wrap);
        for region in &self.target.replica_regions {
            self.decrypt_in(region, ciphertext, &context)
                .await
                .map_err(|e| {
                    e.within(&format!(
                        "replica region {region} (replicate the multi-Region key there and allow the role to use it)"
                    ))
                })?;
        }
        Ok(())
    }

    /// ReEncrypt from `source` (same role and region) to this key.
    async fn reencrypt_in_kms(
        &self,
        source: &AwsKmsKey,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Option<Result<Ciphertext, ProviderError>> {
        if !self.same_session(source) {
            return None;
        }
        let region = self.target.region();
        let result = async {
            self.session.credentials().await?;
            let context = Self::context(&wrap);
            let out = self
                .client(region)
                .re_encrypt()
                .source_key_id(source.target.key_arn.to_string())
                .destination_key_id(self.target.key_arn.to_string())
                .ciphertext_blob(Blob::new(ciphertext.to_vec()))
                .set_source_encryption_context(Some(context.clone()))
                .set_destination_encryption_context(Some(context))
                .send()
                .await
                .map_err(|e| classify_kms(e, KmsCall::ReEncrypt, &self.target, region))?;
            crate::call_notes::note_provider_request(out.request_id());
            let blob = out.ciphertext_blob.ok_or_else(|| {
                ProviderError::Internal("KMS ReEncrypt returned no ciphertext".into())
            })?;
            Ok(Ciphertext {
                bytes: blob.into_inner(),
                key_version: String::new(),
            })
        }
        .await;
        Some(result)
    }
}

#[async_trait]
impl KeyProvider for AwsKmsKey {
    fn kind(&self) -> ProviderKind {
        ProviderKind::AwsKms
    }

    async fn encrypt(
        &self,
        plaintext: &SecretBytes,
        wrap: WrapContext<'_>,
    ) -> Result<Ciphertext, ProviderError> {
        self.session.credentials().await?;
        let region = self.target.region();
        let out = self
            .client(region)
            .encrypt()
            .key_id(self.target.key_arn.to_string())
            .plaintext(Blob::new(plaintext.expose().to_vec()))
            .set_encryption_context(Some(Self::context(&wrap)))
            .send()
            .await
            .map_err(|e| classify_kms(e, KmsCall::Encrypt, &self.target, region))?;
        crate::call_notes::note_provider_request(out.request_id());
        let blob = out
            .ciphertext_blob
            .ok_or_else(|| ProviderError::Internal("KMS Encrypt returned no ciphertext".into()))?;
        Ok(Ciphertext {
            bytes: blob.into_inner(),
            key_version: String::new(),
        })
    }

    async fn generate_data_key(
        &self,
        len: usize,
        wrap: WrapContext<'_>,
    ) -> Result<(SecretBytes, Ciphertext), ProviderError> {
        self.session.credentials().await?;
        let region = self.target.region();
        let out = self
            .client(region)
            .generate_data_key()
            .key_id(self.target.key_arn.to_string())
            .number_of_bytes(i32::try_from(len).unwrap_or(32))
            .set_encryption_context(Some(Self::context(&wrap)))
            .send()
            .await
            .map_err(|e| classify_kms(e, KmsCall::Encrypt, &self.target, region))?;
        crate::call_notes::note_provider_request(out.request_id());
        let plaintext = out.plaintext.ok_or_else(|| {
            ProviderError::Internal("KMS GenerateDataKey returned no plaintext".into())
        })?;
        let blob = out.ciphertext_blob.ok_or_else(|| {
            ProviderError::Internal("KMS GenerateDataKey returned no ciphertext".into())
        })?;
        Ok((
            SecretBytes::new(plaintext.into_inner()),
            Ciphertext {
                bytes: blob.into_inner(),
                key_version: String::new(),
            },
        ))
    }

    async fn decrypt(
        &self,
        _key_version: &str,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Result<SecretBytes, ProviderError> {
        if ciphertext.len() > MAX_CIPHERTEXT_BLOB {
            return Err(ProviderError::InvalidCiphertext(format!(
                "the wrapped key's ciphertext is {} bytes; AWS KMS ciphertexts are at most {MAX_CIPHERTEXT_BLOB}",
                ciphertext.len()
            )));
        }
        self.session.credentials().await?;
        let context = Self::context(&wrap);
        let first = self
            .decrypt_in(self.target.region(), ciphertext, &context)
            .await;
        let mut last = match first {
            Err(e) if e.is_transient() => e,
            // Success and definitive errors are final: a disabled or denied
            // key is never retried elsewhere.
            done => return done,
        };
        for region in &self.target.replica_regions {
            tracing::warn!(
                key = %self.target.key_arn,
                failed_region = %self.target.region(),
                replica_region = %region,
                error = %last,
                "KMS region failed; decrypting with the multi-Region replica"
            );
            match self.decrypt_in(region, ciphertext, &context).await {
                Err(e) if e.is_transient() => last = e,
                done => return done,
            }
        }
        Err(last)
    }

    async fn describe(&self) -> Result<KeyDescription, ProviderError> {
        self.session.credentials().await?;
        let region = self.target.region();
        let client = self.client(region);
        let out = client
            .describe_key()
            .key_id(self.target.key_arn.to_string())
            .send()
            .await
            .map_err(|e| classify_kms(e, KmsCall::Describe, &self.target, region))?;
        let meta = out.key_metadata.ok_or_else(|| {
            ProviderError::Internal("KMS DescribeKey returned no metadata".into())
        })?;
        let state = match meta.key_state() {
            Some(KeyState::Enabled) => ProviderKeyState::Enabled,
            Some(KeyState::PendingDeletion | KeyState::PendingReplicaDeletion) => {
                ProviderKeyState::PendingDeletion
            }
            _ => ProviderKeyState::Disabled,
        };
        let reason = match state {
            ProviderKeyState::Enabled => String::new(),
            _ => state_reason(meta.key_state(), &self.target.key_arn.to_string()),
        };
        Ok(KeyDescription {
            state,
            reason,
            current_version: String::new(),
            key_manager: meta.key_manager().map(|m| m.as_str().to_owned()),
            multi_region: meta.multi_region(),
            rotation_enabled: None,
            ..KeyDescription::default()
        })
    }

    /// Needs kms:GetKeyRotationStatus, which the onboarding policy does not
    /// ask for: reported when allowed.
    async fn rotation_enabled(&self) -> Option<bool> {
        self.session.credentials().await.ok()?;
        self.client(self.target.region())
            .get_key_rotation_status()
            .key_id(self.target.key_arn.to_string())
            .send()
            .await
            .ok()
            .map(|r| r.key_rotation_enabled())
    }

    /// AWS ciphertexts carry their key version inside: keybroker writes
    /// none into the wrapped key, so any version there is forged.
    fn check_version(&self, version: &str) -> Result<(), ProviderError> {
        if version.is_empty() {
            return Ok(());
        }
        Err(ProviderError::InvalidCiphertext(format!(
            "the wrapped key names key version {} for an AWS KMS key; keybroker never writes one there",
            crate::text::Quoted(version)
        )))
    }

    /// Keys of one role session in one region: KMS ReEncrypt.
    fn reencrypts_from(&self, source: &dyn KeyProvider) -> bool {
        let source: &dyn std::any::Any = source;
        source
            .downcast_ref::<AwsKmsKey>()
            .is_some_and(|source| self.same_session(source))
    }

    async fn reencrypt_from(
        &self,
        source: &dyn KeyProvider,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Option<Result<Ciphertext, ProviderError>> {
        let source: &dyn std::any::Any = source;
        self.reencrypt_in_kms(source.downcast_ref::<AwsKmsKey>()?, ciphertext, wrap)
            .await
    }
}
