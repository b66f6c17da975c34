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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, error::CredentialsError, future};
use aws_sdk_kms::config::IdentityCache;
use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::operation::RequestId as _;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::KeyState;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;

use super::{
    Ciphertext, KeyDescription, KeyProvider, ProviderError, ProviderKeyState, ProviderKind,
    WrapContext,
};
use crate::secret::SecretBytes;

/// Encryption-context key that carries the tenant id (callers cannot use the
/// `keybroker:` prefix, so it never collides with their entries).
pub const TENANT_CONTEXT_KEY: &str = "keybroker:tenant";

/// AWS settings from the config.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    /// Region of the platform's own STS calls (the key's region is used for
    /// KMS).
    pub region: String,
    /// KMS endpoint for every region (VPC endpoint, FIPS, or moto in tests).
    pub kms_endpoint: Option<String>,
    /// KMS endpoints by region; win over `kms_endpoint`.
    pub kms_region_endpoints: HashMap<String, String>,
    pub sts_endpoint: Option<String>,
    /// Lifetime of assumed-role sessions (900 s to the role's maximum).
    pub session_duration: Duration,
    /// Attempts per call including the first (SDK standard retry mode; only
    /// transient errors are retried).
    pub max_attempts: u32,
    pub connect_timeout: Duration,
    pub attempt_timeout: Duration,
    pub operation_timeout: Duration,
}

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            kms_endpoint: None,
            kms_region_endpoints: HashMap::new(),
            sts_endpoint: None,
            session_duration: Duration::from_secs(3600),
            max_attempts: 3,
            connect_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(8),
        }
    }
}

/// Shared AWS state: platform credentials, role sessions, KMS clients.
pub struct AwsKms {
    base: SdkConfig,
    settings: AwsSettings,
    sts: aws_sdk_sts::Client,
    /// Role sessions by (role ARN, external ID, session name). std Mutex:
    /// held for a map lookup only.
    sessions: Mutex<HashMap<(String, String, String), Arc<RoleSession>>>,
    /// KMS clients by (session identity, region). std Mutex: map lookup only.
    clients: Mutex<HashMap<(usize, String), aws_sdk_kms::Client>>,
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
            settings,
            sessions: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            assume_role_calls: Arc::default(),
        }
    }

    /// The provider for one binding.
    pub fn key(self: &Arc<Self>, target: AwsKeyTarget) -> AwsKmsKey {
        let session_name = session_name(&target.tenant_id);
        let session = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(
                sessions
                    .entry((
                        target.role_arn.clone(),
                        target.external_id.clone(),
                        session_name.clone(),
                    ))
                    .or_insert_with(|| {
                        Arc::new(RoleSession {
                            sts: self.sts.clone(),
                            role_arn: target.role_arn.clone(),
                            external_id: target.external_id.clone(),
                            session_name,
                            duration: self.settings.session_duration,
                            credentials: tokio::sync::Mutex::new(None),
                            calls: Arc::clone(&self.assume_role_calls),
                        })
                    }),
            )
        };
        AwsKmsKey {
            kms: Arc::clone(self),
            target,
            session,
        }
    }

    fn client(&self, session: &Arc<RoleSession>, region: &str) -> aws_sdk_kms::Client {
        let id = Arc::as_ptr(session) as usize;
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry((id, region.to_owned()))
            .or_insert_with(|| {
                let mut config = aws_sdk_kms::config::Builder::from(&self.base)
                    .region(aws_config::Region::new(region.to_owned()))
                    .credentials_provider(SessionCredentials(Arc::clone(session)))
                    // Our session already caches; a second cache would only
                    // hold credentials past our refresh.
                    .identity_cache(IdentityCache::no_cache())
                    .retry_config(retry_config(&self.settings))
                    .timeout_config(timeout_config(&self.settings));
                if let Some(url) = self
                    .settings
                    .kms_region_endpoints
                    .get(region)
                    .or(self.settings.kms_endpoint.as_ref())
                {
                    config = config.endpoint_url(url.clone());
                }
                aws_sdk_kms::Client::from_conf(config.build())
            })
            .clone()
    }
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

/// `kb-<tenant>` in STS's session-name charset, so the customer's CloudTrail
/// shows which tenant used their key.
pub fn session_name(tenant_id: &str) -> String {
    let cleaned: String = tenant_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut name = format!("kb-{cleaned}");
    if name.len() > 64 {
        // Keep it unique: a prefix plus a digest of the full id.
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, tenant_id.as_bytes());
        name = format!("{}-{}", &name[..47], &hex::encode(digest.as_ref())[..16]);
    }
    name
}

/// Assumed-role credentials, refreshed ahead of expiry. The tokio mutex is
/// held across the AssumeRole call on purpose: concurrent callers wait for
/// the one refresh instead of each assuming the role.
struct RoleSession {
    sts: aws_sdk_sts::Client,
    role_arn: String,
    external_id: String,
    session_name: String,
    duration: Duration,
    credentials: tokio::sync::Mutex<Option<Credentials>>,
    calls: Arc<AtomicU64>,
}

impl fmt::Debug for RoleSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoleSession")
            .field("role_arn", &self.role_arn)
            .field("session_name", &self.session_name)
            .finish_non_exhaustive()
    }
}

impl RoleSession {
    /// Refresh when less than this is left (a fifth of the lifetime, at most
    /// five minutes), so no request ever carries expiring credentials.
    fn refresh_margin(&self) -> Duration {
        (self.duration / 5).min(Duration::from_secs(300))
    }

    async fn credentials(&self) -> Result<Credentials, ProviderError> {
        let mut cached = self.credentials.lock().await;
        if let Some(creds) = cached.as_ref() {
            let fresh = creds
                .expiry()
                .is_some_and(|exp| exp > SystemTime::now() + self.refresh_margin());
            if fresh {
                return Ok(creds.clone());
            }
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let out = self
            .sts
            .assume_role()
            .role_arn(&self.role_arn)
            .external_id(&self.external_id)
            .role_session_name(&self.session_name)
            .duration_seconds(i32::try_from(self.duration.as_secs()).unwrap_or(3600))
            .send()
            .await
            .map_err(|e| classify_sts(e, self))?;
        let c = out.credentials().ok_or_else(|| {
            ProviderError::Internal("STS AssumeRole returned no credentials".into())
        })?;
        let expiry = SystemTime::try_from(*c.expiration()).map_err(|_| {
            ProviderError::Internal("STS AssumeRole returned an invalid expiration".into())
        })?;
        let creds = Credentials::new(
            c.access_key_id(),
            c.secret_access_key(),
            Some(c.session_token().to_owned()),
            Some(expiry),
            "keybroker-assume-role",
        );
        *cached = Some(creds.clone());
        Ok(creds)
    }
}

/// Hands the session's cached credentials to the SDK.
#[derive(Debug)]
struct SessionCredentials(Arc<RoleSession>);

impl ProvideCredentials for SessionCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            self.0
                .credentials()
                .await
                .map_err(CredentialsError::provider_error)
        })
    }
}

/// What one binding needs to reach its key.
#[derive(Debug, Clone)]
pub struct AwsKeyTarget {
    pub tenant_id: String,
    /// Key ARN or alias ARN.
    pub key_arn: String,
    pub region: String,
    pub role_arn: String,
    pub external_id: String,
    /// Regions holding replicas of a multi-Region key, tried in order when
    /// the primary region fails transiently.
    pub replica_regions: Vec<String>,
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

    /// The key's ARN in another region (multi-Region keys share their id).
    fn arn_in(&self, region: &str) -> String {
        self.target.key_arn.replacen(
            &format!(":{}:", self.target.region),
            &format!(":{region}:"),
            1,
        )
    }

    /// Same customer role and region: ReEncrypt can move a key between them
    /// without the plaintext leaving KMS.
    pub fn same_session(&self, other: &AwsKmsKey) -> bool {
        Arc::ptr_eq(&self.session, &other.session) && self.target.region == other.target.region
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
            .key_id(self.arn_in(region))
            .ciphertext_blob(Blob::new(ciphertext.to_vec()))
            .set_encryption_context(Some(context.clone()))
            .send()
            .await
            .map_err(|e| classify_kms(e, KmsCall::Decrypt, &self.target, region))?;
        crate::audit::note_provider_request(out.request_id());
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
    pub async fn reencrypt_from(
        &self,
        source: &AwsKmsKey,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Option<Result<Ciphertext, ProviderError>> {
        if !self.same_session(source) {
            return None;
        }
        let region = &self.target.region;
        let result = async {
            self.session.credentials().await?;
            let context = Self::context(&wrap);
            let out = self
                .client(region)
                .re_encrypt()
                .source_key_id(&source.target.key_arn)
                .destination_key_id(&self.target.key_arn)
                .ciphertext_blob(Blob::new(ciphertext.to_vec()))
                .set_source_encryption_context(Some(context.clone()))
                .set_destination_encryption_context(Some(context))
                .send()
                .await
                .map_err(|e| classify_kms(e, KmsCall::ReEncrypt, &self.target, region))?;
            crate::audit::note_provider_request(out.request_id());
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
        _key: &str,
        plaintext: &SecretBytes,
        wrap: WrapContext<'_>,
    ) -> Result<Ciphertext, ProviderError> {
        self.session.credentials().await?;
        let region = &self.target.region;
        let out = self
            .client(region)
            .encrypt()
            .key_id(&self.target.key_arn)
            .plaintext(Blob::new(plaintext.expose().to_vec()))
            .set_encryption_context(Some(Self::context(&wrap)))
            .send()
            .await
            .map_err(|e| classify_kms(e, KmsCall::Encrypt, &self.target, region))?;
        crate::audit::note_provider_request(out.request_id());
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
        _key: &str,
        len: usize,
        wrap: WrapContext<'_>,
    ) -> Result<(SecretBytes, Ciphertext), ProviderError> {
        self.session.credentials().await?;
        let region = &self.target.region;
        let out = self
            .client(region)
            .generate_data_key()
            .key_id(&self.target.key_arn)
            .number_of_bytes(i32::try_from(len).unwrap_or(32))
            .set_encryption_context(Some(Self::context(&wrap)))
            .send()
            .await
            .map_err(|e| classify_kms(e, KmsCall::Encrypt, &self.target, region))?;
        crate::audit::note_provider_request(out.request_id());
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
        _key: &str,
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
            .decrypt_in(&self.target.region, ciphertext, &context)
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
                failed_region = %self.target.region,
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

    async fn describe(&self, _key: &str) -> Result<KeyDescription, ProviderError> {
        self.session.credentials().await?;
        let region = &self.target.region;
        let client = self.client(region);
        let out = client
            .describe_key()
            .key_id(&self.target.key_arn)
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
            _ => state_reason(meta.key_state(), &self.target.key_arn),
        };
        // Rotation status needs kms:GetKeyRotationStatus, which the
        // onboarding policy does not ask for: report it when allowed.
        let rotation_enabled = client
            .get_key_rotation_status()
            .key_id(meta.key_id())
            .send()
            .await
            .ok()
            .map(|r| r.key_rotation_enabled());
        Ok(KeyDescription {
            state,
            reason,
            current_version: String::new(),
            key_manager: meta.key_manager().map(|m| m.as_str().to_owned()),
            multi_region: meta.multi_region(),
            rotation_enabled,
            ..KeyDescription::default()
        })
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

    fn aws_key(&self) -> Option<&AwsKmsKey> {
        Some(self)
    }
}

/// AWS error code and message of a failed call, or how it failed to happen.
fn error_parts<E: ProvideErrorMetadata, R>(
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
enum KmsCall {
    Encrypt,
    Decrypt,
    ReEncrypt,
    Describe,
}

/// Largest ciphertext blob KMS accepts; a longer one is refused before any
/// call (it can only be a forged wrapped key).
const MAX_CIPHERTEXT_BLOB: usize = 6144;

fn classify_kms<E: ProvideErrorMetadata, R>(
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
    let key = &target
        .key_arn
        .replacen(&format!(":{}:", target.region), &format!(":{region}:"), 1);
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
fn state_reason(state: Option<&KeyState>, key: &str) -> String {
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

fn classify_sts<E: ProvideErrorMetadata, R>(
    err: SdkError<E, R>,
    session: &RoleSession,
) -> ProviderError {
    match error_parts(&err) {
        Ok((code, message)) => {
            classify_sts_code(&code, &message, &session.role_arn, &session.external_id)
        }
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

    fn target() -> AwsKeyTarget {
        AwsKeyTarget {
            tenant_id: "acme".into(),
            key_arn: "arn:aws:kms:eu-west-1:111122223333:key/k1".into(),
            region: "eu-west-1".into(),
            role_arn: "arn:aws:iam::111122223333:role/r".into(),
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

    #[test]
    fn session_names_fit_sts() {
        assert_eq!(session_name("acme"), "kb-acme");
        assert_eq!(session_name("org:team"), "kb-org-team");
        let long = session_name(&"x".repeat(128));
        assert_eq!(long.len(), 64);
        assert_ne!(long, session_name(&format!("{}y", "x".repeat(127))));
    }
}
