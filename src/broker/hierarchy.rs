//! The `tenant_key` hierarchy on the data plane (DESIGN.md section 4a):
//! customer key -> versioned tenant key -> DEKs sealed locally.
//!
//! A tenant key version is 32 random bytes, stored only wrapped by the
//! binding that protects it (the primary when it was minted). Its plaintext
//! is cached like a DEK, under the wrapped bytes it was loaded from, so one
//! provider call serves every DEK of that version until the cache lets it
//! go, and concurrent cold loads share that call. DEKs are sealed with the
//! `seal` construction under the version's key, their AAD binding tenant,
//! version and context. A new version is minted when the newest one is not
//! protected by the primary (first use, or after a key change).

use std::sync::Arc;

use crate::cache::{CacheKey, CachedKey};
use crate::context::{self, Context};
use crate::envelope::Envelope;
use crate::keys::{
    Binding, DirectoryError, KeyInfo, Minted, NewTenantKey, TenantKeyVersion, TenantKeys,
    UsedVersion, tenant_key_context,
};
use crate::kms::{ProviderError, WrapContext};
use crate::seal::{SealError, SealingKey};
use crate::secret::SecretBytes;

use super::checks::{ensure_current, ensure_live, ensure_usable, freshness, provider_error};
use super::{Broker, BrokerError};

/// Bytes of a tenant key version.
const TENANT_KEY_LEN: usize = 32;

/// How many times a wrap plans a mint again after the tenant moved on
/// (another minter took the number, a key change began): each is a fresh
/// read of the registry, so only a storm of control-plane changes exhausts
/// them, and that answers UNAVAILABLE (retry), never INTERNAL.
const MINT_ATTEMPTS: usize = 8;

/// `KeyInfo.provider_key_version` of a DEK sealed under a tenant key.
pub fn version_label(version: u32) -> String {
    const PREFIX: &str = "tenant-key/";
    // Without the formatter: every cache hit of a sealed DEK names its
    // version.
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(version);
    let mut label = String::with_capacity(PREFIX.len() + digits.len());
    label.push_str(PREFIX);
    label.push_str(digits);
    label
}

/// What a DEK is sealed under: a tenant key version, its key, the binding
/// that wrapped it when it was chosen (or minted), and the view it was
/// chosen in.
pub(super) struct Sealing {
    keys: Arc<TenantKeys>,
    version: u32,
    binding: Arc<Binding>,
    key: Arc<CachedKey>,
}

impl Broker {
    /// The version new DEKs are sealed under and its key, minting one when
    /// the tenant has none of the current epoch under its sealing key (a
    /// first wrap, a key change, rotation). The registry stores a mint only
    /// if the tenant is still as the view saw it (`crate::lifecycle`).
    pub(super) async fn sealing_key(
        &self,
        mut keys: Arc<TenantKeys>,
        tenant_id: &str,
    ) -> Result<Sealing, BrokerError> {
        let mut lock = None;
        for _ in 0..MINT_ATTEMPTS {
            ensure_live(&keys, tenant_id)?;
            if keys.life.registers_on_wrap {
                // A tenant nobody registered: it gets a row and a tenant key
                // of its own, so deleting it shreds what it sealed.
                self.directory.register_on_wrap(tenant_id).await?;
                keys = self.directory.tenant_keys(tenant_id).await?;
                continue;
            }
            ensure_usable(&keys.primary, tenant_id)?;
            if let Some(version) = self.current_sealing_version(&keys) {
                let key = self.tenant_key(&keys, tenant_id, version).await?;
                return Ok(Sealing {
                    version: version.version,
                    binding: Arc::clone(&version.binding),
                    keys,
                    key,
                });
            }
            if lock.is_none() {
                // One mint per tenant at a time in this process: concurrent
                // first requests wait for it instead of each calling the
                // customer's KMS; then look again.
                let mutex = self
                    .minting
                    .get_with(tenant_id.to_owned(), async { Arc::default() })
                    .await;
                lock = Some(mutex.lock_owned().await);
                keys = self.directory.tenant_keys(tenant_id).await?;
                continue;
            }
            if let Some((version, key)) = self.mint(&keys, tenant_id).await? {
                // Reported as minted: a concurrent forced unlink may have
                // destroyed it since, which the view reloaded now would hide.
                return Ok(Sealing {
                    version,
                    binding: Arc::clone(&keys.primary),
                    keys,
                    key,
                });
            }
            // The tenant moved on since this view: plan again on a fresh one.
            keys = self.directory.tenant_keys(tenant_id).await?;
        }
        Err(BrokerError::Directory(DirectoryError::Unavailable(
            format!(
                "tenant '{tenant_id}': its keys kept changing while a tenant key version was minted ({MINT_ATTEMPTS} attempts); retry"
            ),
        )))
    }

    /// The version to seal under: the newest one of the current epoch under
    /// the sealing key, unless it is due for rotation. Every replica plans
    /// the registry's next number, and the registry keeps only the first:
    /// one new version per period fleet-wide.
    fn current_sealing_version<'k>(
        &self,
        keys: &'k TenantKeys,
    ) -> Option<&'k Arc<TenantKeyVersion>> {
        keys.sealing_version()
            .filter(|v| match self.tenant_key_rotation {
                Some(period) => {
                    let age_ms = crate::keys::now_ms().saturating_sub(v.created_at_ms);
                    u128::try_from(age_ms).unwrap_or(0) < period.as_millis()
                }
                None => true,
            })
    }

    /// A new version wrapped by the sealing key: one provider call. `None`
    /// when the registry refused it as planned on a stale view.
    async fn mint(
        &self,
        keys: &TenantKeys,
        tenant_id: &str,
    ) -> Result<Option<(u32, Arc<CachedKey>)>, BrokerError> {
        let binding = &keys.primary;
        let version = keys.next_version();
        let plaintext = SecretBytes::random(TENANT_KEY_LEN)
            .map_err(|_| BrokerError::Internal("system random generator failed".into()))?;
        let context = tenant_key_context(version);
        self.provider_call(binding, tenant_id, &self.calls.encrypt)?;
        let call = binding.provider.encrypt(
            &plaintext,
            WrapContext {
                tenant_id,
                context: &context,
            },
        );
        let result = self
            .timed(binding, "encrypt", call)
            .await
            .map_err(|source| provider_error(binding, source));
        let ciphertext = self.reported(tenant_id, &[binding], false, result).await?;
        let minted = self
            .directory
            .mint_tenant_key(&NewTenantKey {
                tenant_id: tenant_id.to_owned(),
                version,
                binding: binding.name.to_string(),
                provider_key_version: ciphertext.key_version.clone(),
                wrapped: ciphertext.bytes.clone(),
                incarnation: keys.life.incarnation,
                epoch: keys.life.epoch,
            })
            .await?;
        if minted == Minted::Stale {
            return Ok(None);
        }
        // Cached under the bytes it was stored as: no provider call to load
        // what was just made.
        let origin = self.cache.origin(
            &binding.name,
            binding.provider.kind(),
            &ciphertext.key_version,
            0,
        );
        let fresh = freshness(keys);
        let key = CachedKey::new(&plaintext, origin, fresh);
        self.cache
            .insert(
                CacheKey::new(tenant_id, &ciphertext.bytes, &context),
                fresh,
                Arc::clone(&key),
            )
            .await;
        Ok(Some((version, key)))
    }

    /// A tenant key version's plaintext: cached, or one provider call shared
    /// by every concurrent caller. The wrapped bytes come from the registry,
    /// never from a caller.
    pub(super) async fn tenant_key(
        &self,
        keys: &TenantKeys,
        tenant_id: &str,
        version: &TenantKeyVersion,
    ) -> Result<Arc<CachedKey>, BrokerError> {
        let binding = &version.binding;
        ensure_usable(binding, tenant_id)?;
        ensure_current(binding, tenant_id, &version.provider_key_version)?;
        let context = tenant_key_context(version.version);
        let cache_key = CacheKey::new(tenant_id, &version.wrapped, &context);
        let fresh = freshness(keys);
        if let Some(hit) = self.cache.get(cache_key.clone(), fresh) {
            return Ok(hit);
        }
        let load = async {
            self.provider_call(binding, tenant_id, &self.calls.decrypt)?;
            let call = binding.provider.decrypt(
                &version.provider_key_version,
                &version.wrapped,
                WrapContext {
                    tenant_id,
                    context: &context,
                },
            );
            let plaintext = self
                .timed(binding, "decrypt", call)
                .await
                .map_err(|source| provider_error(binding, source))?;
            let origin = self.cache.origin_of_link(
                &binding.name,
                binding.link_id,
                binding.provider.kind(),
                &version.provider_key_version,
                0,
            );
            Ok::<_, BrokerError>(CachedKey::new(&plaintext, origin, fresh))
        };
        let result = self
            .cache
            .get_or_load(cache_key, fresh, load)
            .await
            .map_err(|shared| (*shared).clone());
        self.reported(tenant_id, &[binding], false, result).await
    }

    /// Seals `plaintext` under the tenant's sealing version: the wrapped key
    /// (format 2) and what protects it.
    pub(super) async fn seal_dek(
        &self,
        keys: Arc<TenantKeys>,
        tenant_id: &str,
        context: &Context,
        plaintext: &SecretBytes,
    ) -> Result<(Vec<u8>, KeyInfo), BrokerError> {
        let Sealing {
            keys,
            version,
            binding,
            key,
        } = self.sealing_key(keys, tenant_id).await?;
        let sealing = SealingKey::new(key.plaintext())
            .ok_or_else(|| BrokerError::Internal("a tenant key is not 32 bytes".into()))?;
        let incarnation = keys.life.incarnation;
        let sealed = sealing
            .seal(
                plaintext.expose(),
                &context::sealed_aad(tenant_id, incarnation, version, context),
            )
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        binding.usage.record_sealed(true);
        keys.tenant_key_usage
            .record_wrap(UsedVersion::TenantKey(version));
        let envelope = Envelope {
            tenant_id: tenant_id.to_owned(),
            key_binding: String::new(),
            provider: binding.provider.kind(),
            provider_key_version: String::new(),
            ciphertext: sealed,
            tenant_key_version: version,
            incarnation,
        };
        Ok((envelope.encode(), binding.info(version_label(version))))
    }

    /// Opens a sealed DEK (format 2) through the DEK cache.
    pub(super) async fn open_dek(
        &self,
        keys: &TenantKeys,
        cache_key: CacheKey,
        envelope: &Envelope,
        tenant_id: &str,
        context: &Context,
    ) -> Result<(Arc<CachedKey>, Arc<Binding>), BrokerError> {
        let version = sealed_version(keys, tenant_id, envelope.tenant_key_version)?;
        let binding = Arc::clone(&version.binding);
        ensure_usable(&binding, tenant_id)?;
        let fresh = freshness(keys);
        let load = async {
            crate::call_notes::note_dek_load();
            let key = self.tenant_key(keys, tenant_id, version).await?;
            let sealing = SealingKey::new(key.plaintext())
                .ok_or_else(|| BrokerError::Internal("a tenant key is not 32 bytes".into()))?;
            let aad =
                context::sealed_aad(tenant_id, envelope.incarnation, version.version, context);
            let plaintext = sealing
                .open(&envelope.ciphertext, &aad)
                .map_err(|e| match e {
                    SealError::Open => provider_error(
                        &binding,
                        ProviderError::InvalidCiphertext(
                            "the sealed key does not open: the context or tenant differs from the wrap, or the wrapped key was altered".into(),
                        ),
                    ),
                    SealError::Random => BrokerError::Internal(e.to_string()),
                })?;
            let origin =
                self.cache
                    .origin(&binding.name, binding.provider.kind(), "", version.version);
            Ok::<_, BrokerError>(CachedKey::new(&plaintext, origin, fresh))
        };
        let key = self
            .cache
            .get_or_load(cache_key, fresh, load)
            .await
            .map_err(|shared| (*shared).clone())?;
        binding.usage.record_sealed(false);
        keys.tenant_key_usage
            .record_unwrap(UsedVersion::TenantKey(envelope.tenant_key_version));
        Ok((key, binding))
    }
}

/// The version a sealed DEK names; a version the tenant does not have is the
/// caller's problem (a forged wrapped key, or a tenant deleted since).
pub(super) fn sealed_version<'a>(
    keys: &'a TenantKeys,
    tenant_id: &str,
    version: u32,
) -> Result<&'a Arc<TenantKeyVersion>, BrokerError> {
    if version < keys.min_tenant_key_version {
        return Err(BrokerError::VersionRetired {
            tenant_id: tenant_id.to_owned(),
            key: "the tenant key".to_owned(),
            version,
            min: keys.min_tenant_key_version,
        });
    }
    keys.version(version)
        .ok_or_else(|| BrokerError::UnknownTenantKey {
            tenant_id: tenant_id.to_owned(),
            version,
        })
}

/// The tenant key hierarchy's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct HierarchySettings {
    /// Mint a new tenant key version for new DEKs when the newest is older
    /// than this (one per period across every replica); older versions keep
    /// decrypting, and UnwrapKey recommends rewrapping their DEKs. 0s never
    /// rotates.
    #[arg(
        id = "tenant_key_rotation_period",
        long = "tenant-key-rotation-period",
        env = "KEYBROKER_TENANT_KEY_ROTATION_PERIOD",
        value_parser = humantime::parse_duration,
        default_value = "90days"
    )]
    pub tenant_key_rotation_period: std::time::Duration,
}

impl Default for HierarchySettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_labels_name_the_version() {
        assert_eq!(super::version_label(1), "tenant-key/1");
        assert_eq!(super::version_label(u32::MAX), "tenant-key/4294967295");
    }
}
