//! The data plane, independent of gRPC: generate, wrap, unwrap, rewrap and
//! describe tenant DEKs. The API layer converts messages and maps
//! [`BrokerError`] to status codes; everything that decides lives here.
//!
//! Key resolution goes through [`KeyDirectory`] (in `keys`): which bindings a
//! tenant has, which one is primary.
//!
//! One job past 600 lines: the single-key calls and their cache path
//! (tenant views, hits, cold loads) read as one flow; the checks, errors,
//! the tenant-key hierarchy, RewrapKey and DescribeKey have their own files.

mod checks;
mod describe;
mod error;
mod hierarchy;
mod rewrap;

use self::checks::*;
pub use self::describe::{BindingStatus, Description};
pub use self::error::BrokerError;
pub use self::hierarchy::{HierarchySettings, version_label};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::access::Reason;
use crate::cache::{CacheKey, CachedKey, DekCache};
use crate::context::{Context, TenantId};
use crate::envelope::{self, Envelope};
use crate::keys::{
    Binding, BindingState, Confirmation, KeyDirectory, KeyHierarchy, KeyInfo, PLATFORM_BINDING,
    TenantKeys, UsedVersion,
};
use crate::kms::{ProviderError, ProviderKind, WrapContext};
use crate::metrics::Metrics;
use crate::quota::{ProviderQuota, QuotaSettings};
use crate::secret::SecretBytes;

/// Largest DEK WrapKey accepts (the AWS KMS Encrypt limit).
pub const MAX_PLAINTEXT_BYTES: usize = 4096;

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
    /// What protects the key now (for a sealed DEK: its tenant key
    /// version's binding, which a key change may have moved).
    pub info: KeyInfo,
    pub rewrap_recommended: bool,
}

#[derive(Debug)]
pub struct Rewrapped {
    pub wrapped_key: Vec<u8>,
    pub key: KeyInfo,
    pub previous_key: KeyInfo,
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

/// The tenant views the items of one batch RPC share, so a batch of one
/// tenant looks the tenant up once rather than once per item. It holds the
/// last view looked up: batches usually name one tenant, and a batch that
/// interleaves tenants falls back to the directory's own cache. Every item
/// still sees a view no older than its batch.
#[derive(Debug, Default)]
pub struct SharedViews {
    /// (tenant id, view). A lock, not a cell: items of one batch run in one
    /// task, so it is never contended; it is held for a string compare.
    last: parking_lot::Mutex<Option<(Box<str>, Arc<TenantKeys>)>>,
}

impl SharedViews {
    fn get(&self, tenant_id: &str) -> Option<Arc<TenantKeys>> {
        let last = self.last.lock();
        last.as_ref()
            .filter(|(id, _)| **id == *tenant_id)
            .map(|(_, keys)| Arc::clone(keys))
    }

    fn put(&self, tenant_id: &str, keys: &Arc<TenantKeys>) {
        let mut last = self.last.lock();
        *last = Some((tenant_id.into(), Arc::clone(keys)));
    }
}

/// What [`Broker::unwrap_cached`] learned before it stopped: the cache key,
/// when it got as far as computing one (validated, not cached).
#[derive(Debug)]
pub struct Miss(Option<CacheKey>);

#[derive(Debug)]
pub struct Broker {
    directory: Arc<dyn KeyDirectory>,
    cache: DekCache,
    calls: Arc<ProviderCalls>,
    /// Token buckets in front of every remote provider call.
    quota: ProviderQuota,
    metrics: Arc<Metrics>,
    /// One tenant key mint per tenant at a time (the lock of each tenant
    /// minting now; idle entries expire).
    minting: moka::future::Cache<String, Arc<tokio::sync::Mutex<()>>>,
    /// A tenant key version older than this seals no new DEKs: a new one is
    /// minted (None: never).
    tenant_key_rotation: Option<std::time::Duration>,
}

impl Broker {
    pub fn new(directory: Arc<dyn KeyDirectory>, cache: DekCache, quota: QuotaSettings) -> Self {
        Self {
            directory,
            cache,
            calls: Arc::default(),
            quota: ProviderQuota::new(quota),
            metrics: Arc::new(Metrics::new(false, &[])),
            minting: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(std::time::Duration::from_secs(60))
                .build(),
            tenant_key_rotation: None,
        }
    }

    /// Rotates tenant keys: a version older than `period` seals no new
    /// DEKs (zero: never rotate).
    pub fn with_tenant_key_rotation(mut self, period: std::time::Duration) -> Self {
        self.tenant_key_rotation = (!period.is_zero()).then_some(period);
        self
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
                let global = refused.scope == crate::quota::QuotaScope::Global;
                self.metrics.quota_rejection(global, tenant_id);
            })?;
        }
        counter.fetch_add(1, Ordering::Relaxed);
        crate::call_notes::note_provider_call();
        Ok(())
    }

    pub fn cache(&self) -> &DekCache {
        &self.cache
    }

    /// The tenant's view: from `shared` when a batch item before this one
    /// looked it up, else from the directory.
    async fn view(
        &self,
        tenant_id: &str,
        shared: Option<&SharedViews>,
    ) -> Result<Arc<TenantKeys>, BrokerError> {
        if let Some(keys) = self.view_in_memory(tenant_id, shared, std::time::Instant::now()) {
            return Ok(keys);
        }
        let keys = self.directory.tenant_keys(tenant_id).await?;
        if let Some(shared) = shared {
            shared.put(tenant_id, &keys);
        }
        Ok(keys)
    }

    /// The tenant's view if it is at hand: in `shared`, or in the
    /// directory's memory. Never a registry load (no future to await).
    fn view_in_memory(
        &self,
        tenant_id: &str,
        shared: Option<&SharedViews>,
        now: std::time::Instant,
    ) -> Option<Arc<TenantKeys>> {
        if let Some(keys) = shared.and_then(|s| s.get(tenant_id)) {
            return Some(keys);
        }
        let keys = self.directory.tenant_keys_in_memory(tenant_id, now)?;
        if let Some(shared) = shared {
            shared.put(tenant_id, &keys);
        }
        Some(keys)
    }

    pub fn provider_calls(&self) -> &Arc<ProviderCalls> {
        &self.calls
    }

    pub async fn generate(
        &self,
        tenant_id: &TenantId,
        context: &Context,
        len: usize,
        reason: Reason,
        shared: Option<&SharedViews>,
    ) -> Result<Generated, BrokerError> {
        let keys = self.view(tenant_id, shared).await?;
        ensure_reason(&keys, tenant_id, reason)?;
        ensure_live(&keys, tenant_id)?;
        if seals(&keys) {
            let plaintext = SecretBytes::random(len)
                .map_err(|_| BrokerError::Internal("system random generator failed".into()))?;
            let (wrapped_key, key) = self.seal_dek(keys, tenant_id, context, &plaintext).await?;
            return Ok(Generated {
                plaintext,
                wrapped_key,
                key,
            });
        }
        let binding = &keys.primary;
        ensure_usable(binding, tenant_id)?;
        ensure_wraps_directly(binding, tenant_id)?;
        self.provider_call(binding, tenant_id, &self.calls.encrypt)?;
        let incarnation = keys.life.incarnation;
        let bound = context.with_incarnation(incarnation);
        let call = binding.provider.generate_data_key(
            len,
            WrapContext {
                tenant_id,
                context: &bound,
            },
        );
        let result = self
            .timed(binding, "generate_data_key", call)
            .await
            .map_err(|source| provider_error(binding, source));
        let (plaintext, ciphertext) = self.reported(tenant_id, &[binding], false, result).await?;
        binding
            .usage
            .record_wrap(UsedVersion::Provider(&ciphertext.key_version));
        let wrapped = seal(binding, tenant_id, incarnation, ciphertext);
        Ok(Generated {
            plaintext,
            wrapped_key: wrapped.wrapped_key,
            key: wrapped.key,
        })
    }

    pub async fn wrap(
        &self,
        tenant_id: &TenantId,
        context: &Context,
        plaintext: &SecretBytes,
        reason: Reason,
    ) -> Result<Wrapped, BrokerError> {
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT_BYTES {
            return Err(BrokerError::InvalidRequest(format!(
                "plaintext must be 1 to {MAX_PLAINTEXT_BYTES} bytes, got {}",
                plaintext.len()
            )));
        }
        let keys = self.directory.tenant_keys(tenant_id).await?;
        ensure_reason(&keys, tenant_id, reason)?;
        ensure_live(&keys, tenant_id)?;
        if seals(&keys) {
            let (wrapped_key, key) = self.seal_dek(keys, tenant_id, context, plaintext).await?;
            return Ok(Wrapped { wrapped_key, key });
        }
        self.wrap_with(&keys, tenant_id, context, plaintext).await
    }

    /// A direct wrap by the tenant's primary, bound to its incarnation.
    async fn wrap_with(
        &self,
        keys: &TenantKeys,
        tenant_id: &str,
        context: &Context,
        plaintext: &SecretBytes,
    ) -> Result<Wrapped, BrokerError> {
        let binding = &keys.primary;
        ensure_usable(binding, tenant_id)?;
        ensure_wraps_directly(binding, tenant_id)?;
        self.provider_call(binding, tenant_id, &self.calls.encrypt)?;
        let incarnation = keys.life.incarnation;
        let bound = context.with_incarnation(incarnation);
        let call = binding.provider.encrypt(
            plaintext,
            WrapContext {
                tenant_id,
                context: &bound,
            },
        );
        let result = self
            .timed(binding, "encrypt", call)
            .await
            .map_err(|source| provider_error(binding, source));
        let ciphertext = self.reported(tenant_id, &[binding], false, result).await?;
        binding
            .usage
            .record_wrap(UsedVersion::Provider(&ciphertext.key_version));
        Ok(seal(binding, tenant_id, incarnation, ciphertext))
    }

    /// Unwraps through the cache. A hit skips parsing: the cache key pins the
    /// exact bytes, tenant and context that were verified when it was loaded.
    /// The binding's state is checked on every call, hit or miss, so a
    /// disabled or revoked binding serves nothing from cache either.
    pub async fn unwrap(
        &self,
        tenant_id: &TenantId,
        context: &Context,
        wrapped: &[u8],
        reason: Reason,
        shared: Option<&SharedViews>,
    ) -> Result<Unwrapped, BrokerError> {
        envelope::check_size(wrapped)?;
        let cache_key = CacheKey::new(tenant_id, wrapped, context);
        let keys = self.view(tenant_id, shared).await?;
        ensure_reason(&keys, tenant_id, reason)?;
        if let Some(hit) = self.cache.get(cache_key.clone(), freshness(&keys))
            && let Some(served) = self.serve_hit(&keys, tenant_id, hit)
        {
            return served;
        }
        self.unwrap_cold(&keys, cache_key, tenant_id, context, wrapped)
            .await
    }

    /// A key not in the cache: parsed, checked and loaded (one provider
    /// call shared by every concurrent caller of the same key).
    async fn unwrap_cold(
        &self,
        keys: &TenantKeys,
        cache_key: CacheKey,
        tenant_id: &str,
        context: &Context,
        wrapped: &[u8],
    ) -> Result<Unwrapped, BrokerError> {
        // Boxed: the cold path's future (provider SDK calls included) is
        // kilobytes; inline, every hit would carry and move it.
        let key = Box::pin(self.load_wrapped(keys, cache_key, tenant_id, context, wrapped)).await?;
        Ok(Unwrapped {
            rewrap_recommended: rewrap_recommended(keys, &key),
            info: origin_info(keys, &key.origin),
            key,
        })
    }

    /// [`Broker::unwrap`] after [`Broker::unwrap_cached`] found no cached
    /// key: what it already did (validation, the cache key) is not done
    /// again.
    pub async fn unwrap_missed(
        &self,
        tenant_id: &TenantId,
        context: &Context,
        wrapped: &[u8],
        reason: Reason,
        miss: Miss,
        shared: Option<&SharedViews>,
    ) -> Result<Unwrapped, BrokerError> {
        let Miss(Some(cache_key)) = miss else {
            // The tenant's view was not in memory: nothing was looked up.
            return self
                .unwrap(tenant_id, context, wrapped, reason, shared)
                .await;
        };
        let keys = self.view(tenant_id, shared).await?;
        // Again: this view may be newer than the one the miss was seen with.
        ensure_reason(&keys, tenant_id, reason)?;
        self.unwrap_cold(&keys, cache_key, tenant_id, context, wrapped)
            .await
    }

    /// [`Broker::unwrap`] when it can answer without waiting: a cached key
    /// of a tenant whose view is at hand, or a request refused before any
    /// lookup. A [`Miss`] otherwise: finish with [`Broker::unwrap_missed`].
    /// UnwrapKey answers its cached keys through this, a batch with no
    /// future per item.
    pub fn unwrap_cached(
        &self,
        tenant_id: &TenantId,
        context: &Context,
        wrapped: &[u8],
        reason: Reason,
        shared: Option<&SharedViews>,
    ) -> Result<Result<Unwrapped, BrokerError>, Miss> {
        if let Err(err) = envelope::check_size(wrapped) {
            return Ok(Err(err.into()));
        }
        // Never a registry load here: a load polled once and dropped would
        // be cancelled (a query cut off) for every item of a cold batch.
        // One clock reading serves both lookups (view TTL, cache TTL/TTI).
        let now = std::time::Instant::now();
        let keys = self
            .view_in_memory(tenant_id, shared, now)
            .ok_or(Miss(None))?;
        if let Err(refused) = ensure_reason(&keys, tenant_id, reason) {
            return Ok(Err(refused));
        }
        let cache_key = CacheKey::new(tenant_id, wrapped, context);
        match self
            .cache
            .get(cache_key.clone(), freshness(&keys))
            .and_then(|hit| self.serve_hit(&keys, tenant_id, hit))
        {
            Some(served) => Ok(served),
            None => Err(Miss(Some(cache_key))),
        }
    }

    /// A cached key, if its key may serve it now: the tenant's state, the
    /// binding's state and retired versions are checked on every hit.
    /// `None`: the entry is stale (loaded before a purge, for another
    /// incarnation or another link of the name) and is loaded anew.
    fn serve_hit(
        &self,
        keys: &TenantKeys,
        tenant_id: &str,
        hit: Arc<CachedKey>,
    ) -> Option<Result<Unwrapped, BrokerError>> {
        if hit.fresh != freshness(keys) {
            return None;
        }
        Some(self.serve_fresh(keys, tenant_id, hit))
    }

    fn serve_fresh(
        &self,
        keys: &TenantKeys,
        tenant_id: &str,
        hit: Arc<CachedKey>,
    ) -> Result<Unwrapped, BrokerError> {
        ensure_live(keys, tenant_id)?;
        match hit.origin.tenant_key_version {
            0 => {
                let binding = find_binding(keys, tenant_id, &hit.origin.key_binding)?;
                if binding.link_id != hit.origin.link_id {
                    // Another key under the same name: what this one
                    // unwrapped is not the tenant's any more.
                    return Err(BrokerError::UnknownBinding {
                        tenant_id: tenant_id.to_owned(),
                        binding: hit.origin.key_binding.to_string(),
                    });
                }
                ensure_current(binding, tenant_id, &hit.origin.key_version)?;
                ensure_usable(binding, tenant_id)?;
                binding
                    .usage
                    .record_unwrap(UsedVersion::Provider(&hit.origin.key_version));
            }
            v => {
                // Protected *now* by its tenant key version's binding,
                // which a key change may have moved.
                let binding = &hierarchy::sealed_version(keys, tenant_id, v)?.binding;
                ensure_usable(binding, tenant_id)?;
                binding.usage.record_sealed(false);
                keys.tenant_key_usage
                    .record_unwrap(UsedVersion::TenantKey(v));
            }
        }
        Ok(Unwrapped {
            rewrap_recommended: rewrap_recommended(keys, &hit),
            info: origin_info(keys, &hit.origin),
            key: hit,
        })
    }

    /// A caller's wrapped key of either format, parsed and checked before
    /// any provider call, then loaded through the cache.
    async fn load_wrapped(
        &self,
        keys: &TenantKeys,
        cache_key: CacheKey,
        tenant_id: &str,
        context: &Context,
        wrapped: &[u8],
    ) -> Result<Arc<CachedKey>, BrokerError> {
        let envelope = parse_for(tenant_id, wrapped)?;
        // A key of a deleted life is gone whatever this life's state is.
        ensure_incarnation(keys, tenant_id, envelope.incarnation)?;
        ensure_live(keys, tenant_id)?;
        if envelope.tenant_key_version > 0 {
            let (key, _) = self
                .open_dek(keys, cache_key, &envelope, tenant_id, context)
                .await?;
            return Ok(key);
        }
        let binding = resolve_binding(keys, tenant_id, &envelope)?;
        if keys.hierarchy == KeyHierarchy::TenantKey && &*binding.name != PLATFORM_BINDING {
            // keybroker never wraps such a tenant's DEKs directly under a
            // customer key; one claiming so is made by someone else (with
            // an RSA key's public half, say), and is not opened.
            return Err(BrokerError::InvalidRequest(format!(
                "tenant '{tenant_id}' wraps its DEKs under its tenant key; a wrapped key sealed directly under key '{}' was not made by keybroker",
                binding.name
            )));
        }
        self.load(keys, cache_key, binding, &envelope, tenant_id, context)
            .await
    }

    /// The plaintext of a resolved wrapped key: from the cache, or one
    /// provider call shared by every concurrent caller of the same key.
    async fn load(
        &self,
        keys: &TenantKeys,
        cache_key: CacheKey,
        binding: &Binding,
        envelope: &Envelope,
        tenant_id: &str,
        context: &Context,
    ) -> Result<Arc<CachedKey>, BrokerError> {
        let fresh = freshness(keys);
        let load = async {
            crate::call_notes::note_dek_load();
            self.provider_call(binding, tenant_id, &self.calls.decrypt)?;
            let bound = context.with_incarnation(envelope.incarnation);
            let call = binding.provider.decrypt(
                &envelope.provider_key_version,
                &envelope.ciphertext,
                WrapContext {
                    tenant_id,
                    context: &bound,
                },
            );
            let plaintext = self
                .timed(binding, "decrypt", call)
                .await
                .map_err(|source| provider_error(binding, source))?;
            let origin = self.cache.origin_of_link(
                &binding.name,
                binding.link_id,
                envelope.provider,
                &envelope.provider_key_version,
                0,
            );
            Ok::<_, BrokerError>(CachedKey::new(&plaintext, origin, fresh))
        };
        let result = self
            .cache
            .get_or_load(cache_key, fresh, load)
            .await
            .map_err(|shared| (*shared).clone());
        let key = self.reported(tenant_id, &[binding], true, result).await?;
        binding
            .usage
            .record_unwrap(UsedVersion::Provider(&envelope.provider_key_version));
        Ok(key)
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
}
