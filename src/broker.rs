//! The data plane, independent of gRPC: generate, wrap, unwrap, rewrap and
//! describe tenant DEKs. The API layer converts messages and maps
//! [`BrokerError`] to status codes; everything that decides lives here.
//!
//! Key resolution goes through [`KeyDirectory`]: which bindings a tenant has,
//! which one is primary. [`PlatformOnly`] serves every tenant with the
//! platform key; the registry is the other implementation.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use async_trait::async_trait;

use crate::cache::{CacheKey, CachedKey, DekCache};
use crate::envelope::{self, Context, Envelope, EnvelopeError};
use crate::kms::{KeyProvider, ProviderError, ProviderKind, WrapContext};
use crate::metrics::Metrics;
use crate::quota::{ProviderQuota, QuotaExceeded, QuotaSettings};
use crate::secret::SecretBytes;

/// Name of the platform key's binding; reserved in every tenant.
pub const PLATFORM_BINDING: &str = "platform";
/// Largest DEK WrapKey accepts (the AWS KMS Encrypt limit).
pub const MAX_PLAINTEXT_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingState {
    Active,
    /// Disabled by an operator of the platform.
    Disabled,
    /// Made unusable by the customer (disabled, deleted, access denied).
    Revoked,
}

impl fmt::Display for BindingState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::Disabled => "disabled",
            Self::Revoked => "revoked",
        })
    }
}

/// Wraps and unwraps served with one binding since the last flush to the
/// registry. Atomics: recorded on every request, flushed periodically.
#[derive(Debug, Default)]
pub struct BindingUsage {
    wraps: AtomicU64,
    unwraps: AtomicU64,
    last_used_ms: AtomicI64,
    /// Last key-state check by the watcher (not usage: never flushed).
    pub last_checked_ms: AtomicI64,
}

/// A snapshot of [`BindingUsage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCounts {
    pub wraps: u64,
    pub unwraps: u64,
    /// Zero when unused since the last flush.
    pub last_used_ms: i64,
}

impl BindingUsage {
    fn record(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.last_used_ms
            .fetch_max(crate::registry::now_ms(), Ordering::Relaxed);
    }

    pub fn peek(&self) -> UsageCounts {
        UsageCounts {
            wraps: self.wraps.load(Ordering::Relaxed),
            unwraps: self.unwraps.load(Ordering::Relaxed),
            last_used_ms: self.last_used_ms.load(Ordering::Relaxed),
        }
    }

    /// Takes the counts, leaving zero (the flush owns them now).
    pub fn take(&self) -> UsageCounts {
        UsageCounts {
            wraps: self.wraps.swap(0, Ordering::Relaxed),
            unwraps: self.unwraps.swap(0, Ordering::Relaxed),
            last_used_ms: self.last_used_ms.swap(0, Ordering::Relaxed),
        }
    }

    /// Puts back counts a failed flush could not write.
    pub fn restore(&self, counts: UsageCounts) {
        self.wraps.fetch_add(counts.wraps, Ordering::Relaxed);
        self.unwraps.fetch_add(counts.unwraps, Ordering::Relaxed);
        self.last_used_ms
            .fetch_max(counts.last_used_ms, Ordering::Relaxed);
    }
}

/// One key able to protect a tenant's DEKs, as the data plane sees it.
#[derive(Debug)]
pub struct Binding {
    pub name: Arc<str>,
    pub provider: Arc<dyn KeyProvider>,
    /// The provider's reference to the key (ARN, resource name, keyring id).
    pub key_reference: String,
    pub state: BindingState,
    /// Why the binding is not active, for people.
    pub state_reason: String,
    /// Shared with the directory, which outlives this snapshot of the binding.
    pub usage: Arc<BindingUsage>,
}

impl Binding {
    /// An active binding with fresh usage counters (the platform key, tests
    /// and benchmarks).
    pub fn active(name: &str, provider: Arc<dyn KeyProvider>, key_reference: &str) -> Self {
        Self {
            name: name.into(),
            provider,
            key_reference: key_reference.to_owned(),
            state: BindingState::Active,
            state_reason: String::new(),
            usage: Arc::default(),
        }
    }

    fn ensure_usable(&self, tenant_id: &str) -> Result<(), BrokerError> {
        match self.state {
            BindingState::Active => Ok(()),
            state => Err(BrokerError::KeyUnusable {
                tenant_id: tenant_id.to_owned(),
                binding: self.name.to_string(),
                state,
                reason: self.state_reason.clone(),
            }),
        }
    }

    fn info(&self, key_version: String) -> KeyInfo {
        KeyInfo {
            key_binding: Arc::clone(&self.name),
            provider: self.provider.kind(),
            key_version,
        }
    }
}

/// The keys of one tenant at one moment.
#[derive(Debug, Clone)]
pub struct TenantKeys {
    /// Wraps new DEKs: the platform binding when the tenant has no usable
    /// customer key.
    pub primary: Arc<Binding>,
    /// Every customer binding of the tenant (without the platform key).
    pub bindings: Vec<Arc<Binding>>,
    /// Always able to unwrap what it wrapped before a tenant moved to CMEK.
    pub platform: Arc<Binding>,
}

impl TenantKeys {
    pub fn find(&self, name: &str) -> Option<&Arc<Binding>> {
        if name == PLATFORM_BINDING {
            return Some(&self.platform);
        }
        self.bindings.iter().find(|b| &*b.name == name)
    }

    pub fn uses_platform_key(&self) -> bool {
        Arc::ptr_eq(&self.primary, &self.platform)
    }
}

/// Where the data plane learns a tenant's keys. Implementations answer from
/// memory on the hot path (one call per request).
#[async_trait]
pub trait KeyDirectory: Send + Sync + fmt::Debug {
    async fn tenant_keys(&self, tenant_id: &str) -> Result<Arc<TenantKeys>, BrokerError>;

    /// A live request saw `error` from a binding's provider. The request's
    /// own bytes may have provoked it, so it proves nothing about the key: a
    /// directory that tracks key state describes the binding (no caller
    /// input) and lets that describe decide, revoking only then.
    async fn confirm_failure(
        &self,
        _tenant_id: &str,
        _binding: &str,
        _error: &ProviderError,
    ) -> Confirmation {
        Confirmation::Unknown
    }
}

/// What a describe made after a live request's definitive error found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// The key is unusable: the binding is now revoked.
    Revoked,
    /// The key is usable: the request's own bytes caused the error.
    KeyUsable,
    /// Not known (no describe possible, or it failed): nothing changes.
    Unknown,
}

/// Every tenant uses the platform key (tests, and tenants the registry does
/// not know).
#[derive(Debug)]
pub struct PlatformOnly {
    keys: Arc<TenantKeys>,
}

impl PlatformOnly {
    pub fn new(platform: Arc<Binding>) -> Self {
        Self {
            keys: Arc::new(TenantKeys {
                primary: Arc::clone(&platform),
                bindings: Vec::new(),
                platform,
            }),
        }
    }
}

#[async_trait]
impl KeyDirectory for PlatformOnly {
    async fn tenant_keys(&self, _tenant_id: &str) -> Result<Arc<TenantKeys>, BrokerError> {
        Ok(Arc::clone(&self.keys))
    }
}

/// Why a data-plane call failed. Mapped to a gRPC status in `api::status`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("the wrapped key was issued for a different tenant than '{tenant_id}'")]
    TenantMismatch { tenant_id: String },
    /// `binding` comes from the caller's wrapped key: shown quoted.
    #[error(
        "tenant '{tenant_id}' has no key binding named {} (it was unlinked, or the wrapped key comes from another deployment)",
        crate::text::Quoted(binding)
    )]
    UnknownBinding { tenant_id: String, binding: String },
    #[error("key binding '{binding}' of tenant '{tenant_id}' is {state}: {reason}")]
    KeyUnusable {
        tenant_id: String,
        binding: String,
        state: BindingState,
        reason: String,
    },
    #[error("key binding '{binding}' ({provider}): {source}")]
    Provider {
        binding: String,
        provider: ProviderKind,
        source: ProviderError,
    },
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Which key protected a DEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub key_binding: Arc<str>,
    pub provider: ProviderKind,
    pub key_version: String,
}

#[derive(Debug)]
pub struct Generated {
    pub plaintext: SecretBytes,
    pub wrapped_key: Vec<u8>,
    pub key: KeyInfo,
}

#[derive(Debug)]
pub struct Wrapped {
    pub wrapped_key: Vec<u8>,
    pub key: KeyInfo,
}

#[derive(Debug)]
pub struct Unwrapped {
    pub key: Arc<CachedKey>,
    pub rewrap_recommended: bool,
}

#[derive(Debug)]
pub struct Rewrapped {
    pub wrapped_key: Vec<u8>,
    pub key: KeyInfo,
    pub previous_key: KeyInfo,
}

#[derive(Debug)]
pub struct BindingStatus {
    pub name: Arc<str>,
    pub provider: ProviderKind,
    pub key_reference: String,
    pub state: BindingState,
    pub state_reason: String,
    pub primary: bool,
    pub current_key_version: String,
    /// Last key-state check by the watcher; `None` if never checked.
    pub last_checked_ms: Option<i64>,
}

#[derive(Debug)]
pub struct Description {
    pub tenant_id: String,
    pub uses_platform_key: bool,
    pub primary: KeyInfo,
    pub bindings: Vec<BindingStatus>,
}

/// Provider calls made by the data plane, by operation. Tests assert on them
/// (zero calls for refused requests, one per cold key); metrics export them.
#[derive(Debug, Default)]
pub struct ProviderCalls {
    /// Encrypt and GenerateDataKey.
    pub encrypt: AtomicU64,
    pub decrypt: AtomicU64,
    /// KMS-side rewraps (AWS ReEncrypt).
    pub reencrypt: AtomicU64,
}

#[derive(Debug)]
pub struct Broker {
    directory: Arc<dyn KeyDirectory>,
    cache: DekCache,
    calls: Arc<ProviderCalls>,
    /// Token buckets in front of every remote provider call.
    quota: ProviderQuota,
    metrics: Arc<Metrics>,
}

impl Broker {
    pub fn new(directory: Arc<dyn KeyDirectory>, cache: DekCache, quota: QuotaSettings) -> Self {
        Self {
            directory,
            cache,
            calls: Arc::default(),
            quota: ProviderQuota::new(quota),
            metrics: Arc::new(Metrics::new(false)),
        }
    }

    /// Records into `metrics` (the server's registry) instead of a private one.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs one provider call, recording its latency and outcome.
    async fn timed<T>(
        &self,
        binding: &Binding,
        operation: &'static str,
        call: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let started = std::time::Instant::now();
        let result = call.await;
        let outcome = result
            .as_ref()
            .map_or_else(ProviderError::kind_name, |_| "ok");
        self.metrics.provider_call(
            binding.provider.kind().as_str(),
            operation,
            outcome,
            started.elapsed(),
        );
        result
    }

    pub fn quota(&self) -> &ProviderQuota {
        &self.quota
    }

    /// Admits one provider call for `tenant_id` (quota) and counts it.
    /// The platform keyring is in-process: nothing to protect, no quota.
    fn provider_call(
        &self,
        binding: &Binding,
        tenant_id: &str,
        counter: &AtomicU64,
    ) -> Result<(), BrokerError> {
        if binding.provider.kind() != ProviderKind::Local {
            self.quota.acquire(tenant_id).inspect_err(|refused| {
                self.metrics.quota_rejection(refused.scope, tenant_id);
            })?;
        }
        counter.fetch_add(1, Ordering::Relaxed);
        crate::audit::note_provider_call();
        Ok(())
    }

    pub fn cache(&self) -> &DekCache {
        &self.cache
    }

    pub fn provider_calls(&self) -> &Arc<ProviderCalls> {
        &self.calls
    }

    pub async fn generate(
        &self,
        tenant_id: &str,
        context: &Context,
        len: usize,
    ) -> Result<Generated, BrokerError> {
        envelope::validate_tenant_id(tenant_id)?;
        let keys = self.directory.tenant_keys(tenant_id).await?;
        let binding = &keys.primary;
        binding.ensure_usable(tenant_id)?;
        self.provider_call(binding, tenant_id, &self.calls.encrypt)?;
        binding.usage.record(&binding.usage.wraps);
        let call = binding.provider.generate_data_key(
            &binding.key_reference,
            len,
            WrapContext { tenant_id, context },
        );
        let result = self
            .timed(binding, "generate_data_key", call)
            .await
            .map_err(|source| provider_error(binding, source));
        let (plaintext, ciphertext) = self.reported(tenant_id, &[binding], false, result).await?;
        let wrapped = seal(binding, tenant_id, ciphertext);
        Ok(Generated {
            plaintext,
            wrapped_key: wrapped.wrapped_key,
            key: wrapped.key,
        })
    }

    pub async fn wrap(
        &self,
        tenant_id: &str,
        context: &Context,
        plaintext: &SecretBytes,
    ) -> Result<Wrapped, BrokerError> {
        envelope::validate_tenant_id(tenant_id)?;
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT_BYTES {
            return Err(BrokerError::InvalidRequest(format!(
                "plaintext must be 1 to {MAX_PLAINTEXT_BYTES} bytes, got {}",
                plaintext.len()
            )));
        }
        let keys = self.directory.tenant_keys(tenant_id).await?;
        self.wrap_with(&keys.primary, tenant_id, context, plaintext)
            .await
    }

    async fn wrap_with(
        &self,
        binding: &Binding,
        tenant_id: &str,
        context: &Context,
        plaintext: &SecretBytes,
    ) -> Result<Wrapped, BrokerError> {
        binding.ensure_usable(tenant_id)?;
        self.provider_call(binding, tenant_id, &self.calls.encrypt)?;
        binding.usage.record(&binding.usage.wraps);
        let call = binding.provider.encrypt(
            &binding.key_reference,
            plaintext,
            WrapContext { tenant_id, context },
        );
        let result = self
            .timed(binding, "encrypt", call)
            .await
            .map_err(|source| provider_error(binding, source));
        let ciphertext = self.reported(tenant_id, &[binding], false, result).await?;
        Ok(seal(binding, tenant_id, ciphertext))
    }

    /// Unwraps through the cache. A hit skips parsing: the cache key pins the
    /// exact bytes, tenant and context that were verified when it was loaded.
    /// The binding's state is checked on every call, hit or miss, so a
    /// disabled or revoked binding serves nothing from cache either.
    pub async fn unwrap(
        &self,
        tenant_id: &str,
        context: &Context,
        wrapped: &[u8],
    ) -> Result<Unwrapped, BrokerError> {
        envelope::validate_tenant_id(tenant_id)?;
        envelope::check_size(wrapped)?;
        let cache_key = CacheKey::new(tenant_id, wrapped, context);
        let keys = self.directory.tenant_keys(tenant_id).await?;
        if let Some(hit) = self.cache.get(&cache_key).await {
            let binding = find_binding(&keys, tenant_id, &hit.origin.key_binding)?;
            binding.ensure_usable(tenant_id)?;
            binding.usage.record(&binding.usage.unwraps);
            return Ok(Unwrapped {
                rewrap_recommended: rewrap_recommended(&keys, &hit),
                key: hit,
            });
        }

        let (envelope, binding) = resolve_wrapped(&keys, tenant_id, wrapped)?;
        let key = self
            .load(cache_key, binding, &envelope, tenant_id, context)
            .await?;
        Ok(Unwrapped {
            rewrap_recommended: rewrap_recommended(&keys, &key),
            key,
        })
    }

    /// The plaintext of a resolved wrapped key: from the cache, or one
    /// provider call shared by every concurrent caller of the same key.
    async fn load(
        &self,
        cache_key: CacheKey,
        binding: &Binding,
        envelope: &Envelope,
        tenant_id: &str,
        context: &Context,
    ) -> Result<Arc<CachedKey>, BrokerError> {
        let load = async {
            self.provider_call(binding, tenant_id, &self.calls.decrypt)?;
            let call = binding.provider.decrypt(
                &binding.key_reference,
                &envelope.provider_key_version,
                &envelope.ciphertext,
                WrapContext { tenant_id, context },
            );
            let plaintext = self
                .timed(binding, "decrypt", call)
                .await
                .map_err(|source| provider_error(binding, source))?;
            let origin = self.cache.origin(
                &binding.name,
                envelope.provider,
                &envelope.provider_key_version,
            );
            Ok::<_, BrokerError>(CachedKey::new(&plaintext, origin))
        };
        let result = self
            .cache
            .get_or_load(cache_key, load)
            .await
            .map_err(|shared| (*shared).clone());
        let key = self.reported(tenant_id, &[binding], true, result).await?;
        binding.usage.record(&binding.usage.unwraps);
        Ok(key)
    }

    /// Moves a wrapped key to the tenant's current primary key with the same
    /// context: inside KMS (ReEncrypt) when both keys are AWS keys under one
    /// customer role and region, otherwise by unwrap + wrap.
    pub async fn rewrap(
        &self,
        tenant_id: &str,
        context: &Context,
        wrapped: &[u8],
    ) -> Result<Rewrapped, BrokerError> {
        envelope::validate_tenant_id(tenant_id)?;
        envelope::check_size(wrapped)?;
        let keys = self.directory.tenant_keys(tenant_id).await?;
        let (envelope, source) = resolve_wrapped(&keys, tenant_id, wrapped)?;
        let target = &keys.primary;
        if let (Some(dst), Some(src)) = (target.provider.aws_key(), source.provider.aws_key()) {
            target.ensure_usable(tenant_id)?;
            let wrap = WrapContext { tenant_id, context };
            if dst.same_session(src) {
                self.provider_call(target, tenant_id, &self.calls.reencrypt)?;
            }
            let started = std::time::Instant::now();
            if let Some(result) = dst.reencrypt_from(src, &envelope.ciphertext, wrap).await {
                let outcome = result
                    .as_ref()
                    .map_or_else(ProviderError::kind_name, |_| "ok");
                let kind = target.provider.kind().as_str();
                self.metrics
                    .provider_call(kind, "reencrypt", outcome, started.elapsed());
                // ReEncrypt needs both keys; a failure is reported against
                // the target, the binding the call was signed for, and both
                // are described before anything is blamed on either.
                let result = result.map_err(|e| provider_error(target, e));
                let ciphertext = self
                    .reported(tenant_id, &[source, target], true, result)
                    .await?;
                source.usage.record(&source.usage.unwraps);
                target.usage.record(&target.usage.wraps);
                let wrapped = seal(target, tenant_id, ciphertext);
                return Ok(Rewrapped {
                    wrapped_key: wrapped.wrapped_key,
                    key: wrapped.key,
                    previous_key: source.info(envelope.provider_key_version),
                });
            }
        }
        let cache_key = CacheKey::new(tenant_id, wrapped, context);
        let plain = self
            .load(cache_key, source, &envelope, tenant_id, context)
            .await?;
        let wrapped = self
            .wrap_with(
                target,
                tenant_id,
                context,
                &SecretBytes::new(plain.plaintext().to_vec()),
            )
            .await?;
        Ok(Rewrapped {
            wrapped_key: wrapped.wrapped_key,
            key: wrapped.key,
            previous_key: source.info(envelope.provider_key_version),
        })
    }

    /// Lets a describe judge a provider error that would mean the key is
    /// unusable (DESIGN.md section 5, "Trust boundary"): the directory
    /// describes each binding the call used, and only that describe may
    /// revoke. When every key turns out usable and the call carried the
    /// caller's ciphertext, the caller's bytes caused the error: it becomes
    /// INVALID_ARGUMENT for this request alone.
    async fn reported<T>(
        &self,
        tenant_id: &str,
        bindings: &[&Binding],
        carries_ciphertext: bool,
        result: Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        let Err(BrokerError::Provider {
            source,
            binding,
            provider,
        }) = &result
        else {
            return result;
        };
        if !source.suggests_revocation() {
            return result;
        }
        let mut all_usable = true;
        for b in bindings {
            let verdict = self
                .directory
                .confirm_failure(tenant_id, &b.name, source)
                .await;
            all_usable &= verdict == Confirmation::KeyUsable;
        }
        if all_usable && carries_ciphertext {
            return Err(BrokerError::Provider {
                binding: binding.clone(),
                provider: *provider,
                source: ProviderError::InvalidCiphertext(format!(
                    "the key provider refused this wrapped key ({source}) although the key itself is usable: the wrapped key was altered, or made under another key, tenant or context"
                )),
            });
        }
        result
    }

    pub async fn describe(&self, tenant_id: &str) -> Result<Description, BrokerError> {
        envelope::validate_tenant_id(tenant_id)?;
        let keys = self.directory.tenant_keys(tenant_id).await?;
        let status = |b: &Arc<Binding>| BindingStatus {
            name: Arc::clone(&b.name),
            provider: b.provider.kind(),
            key_reference: b.key_reference.clone(),
            state: b.state,
            state_reason: b.state_reason.clone(),
            primary: Arc::ptr_eq(b, &keys.primary),
            current_key_version: current_version(b),
            last_checked_ms: Some(b.usage.last_checked_ms.load(Ordering::Relaxed))
                .filter(|ms| *ms > 0),
        };
        let mut bindings: Vec<BindingStatus> = keys.bindings.iter().map(status).collect();
        if keys.uses_platform_key() {
            bindings.insert(0, status(&keys.platform));
        }
        Ok(Description {
            tenant_id: tenant_id.to_owned(),
            uses_platform_key: keys.uses_platform_key(),
            primary: keys.primary.info(current_version(&keys.primary)),
            bindings,
        })
    }
}

/// The envelope of a caller's wrapped key and the binding that can unwrap
/// it. Everything that can refuse the request runs here, before any provider
/// call: a bad or foreign wrapped key costs no KMS quota.
fn resolve_wrapped<'a>(
    keys: &'a TenantKeys,
    tenant_id: &str,
    wrapped: &[u8],
) -> Result<(Envelope, &'a Arc<Binding>), BrokerError> {
    let envelope = Envelope::parse(wrapped)?;
    if envelope.tenant_id != tenant_id {
        return Err(BrokerError::TenantMismatch {
            tenant_id: tenant_id.to_owned(),
        });
    }
    let binding = find_binding(keys, tenant_id, &envelope.key_binding)?;
    if binding.provider.kind() != envelope.provider {
        return Err(BrokerError::InvalidRequest(format!(
            "the wrapped key names provider {} but key binding '{}' uses {}",
            envelope.provider,
            binding.name,
            binding.provider.kind()
        )));
    }
    binding.ensure_usable(tenant_id)?;
    binding
        .provider
        .check_version(&envelope.provider_key_version)
        .map_err(|source| provider_error(binding, source))?;
    Ok((envelope, binding))
}

/// The wrapped key (envelope) for a provider's ciphertext.
fn seal(binding: &Binding, tenant_id: &str, ciphertext: crate::kms::Ciphertext) -> Wrapped {
    let envelope = Envelope {
        tenant_id: tenant_id.to_owned(),
        key_binding: binding.name.to_string(),
        provider: binding.provider.kind(),
        provider_key_version: ciphertext.key_version,
        ciphertext: ciphertext.bytes,
    };
    Wrapped {
        wrapped_key: envelope.encode(),
        key: binding.info(envelope.provider_key_version),
    }
}

fn current_version(binding: &Binding) -> String {
    binding
        .provider
        .current_version(&binding.key_reference)
        .unwrap_or_default()
}

fn find_binding<'a>(
    keys: &'a TenantKeys,
    tenant_id: &str,
    name: &str,
) -> Result<&'a Arc<Binding>, BrokerError> {
    keys.find(name).ok_or_else(|| BrokerError::UnknownBinding {
        tenant_id: tenant_id.to_owned(),
        binding: name.to_owned(),
    })
}

/// True when the key was wrapped under another binding than the primary, or
/// under an older version of the primary where the provider exposes versions.
fn rewrap_recommended(keys: &TenantKeys, key: &CachedKey) -> bool {
    if key.origin.key_binding != keys.primary.name {
        return true;
    }
    match keys
        .primary
        .provider
        .current_version(&keys.primary.key_reference)
    {
        Some(current) => *current != *key.origin.key_version,
        None => false,
    }
}

fn provider_error(binding: &Binding, source: ProviderError) -> BrokerError {
    BrokerError::Provider {
        binding: binding.name.to_string(),
        provider: binding.provider.kind(),
        source,
    }
}
