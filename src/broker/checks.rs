//! The checks every data-plane path shares, as pure functions of a
//! tenant's view: is the tenant live, is this its incarnation, which
//! binding a wrapped key names, what a new wrapped key looks like.

use std::sync::Arc;

use super::*;

/// Whether new DEKs of the tenant are sealed under a tenant key: always
/// under the `tenant_key` hierarchy, and under `direct` when the platform
/// key would wrap them (a tenant with no usable customer key) and the
/// tenant can have tenant keys, so deleting it shreds them. A directory
/// without a registry (incarnation 0, not registering) wraps directly.
pub(super) fn seals(keys: &TenantKeys) -> bool {
    keys.hierarchy == KeyHierarchy::TenantKey
        || (keys.uses_platform_key() && (keys.life.incarnation != 0 || keys.life.registers_on_wrap))
}

/// What the tenant's cached keys must have been loaded under.
pub(super) fn freshness(keys: &TenantKeys) -> crate::cache::Freshness {
    crate::cache::Freshness {
        generation: keys.life.cache_generation,
        incarnation: keys.life.incarnation,
    }
}

/// Refuses every call for a tenant whose deletion is scheduled.
/// The tenant's access policy accepts the call's reason: checked with the
/// view, before any cache read or provider call.
pub(super) fn ensure_reason(
    keys: &TenantKeys,
    tenant_id: &str,
    reason: Reason,
) -> Result<(), BrokerError> {
    if keys.life.access.allows(reason) {
        return Ok(());
    }
    Err(BrokerError::ReasonRefused {
        tenant_id: tenant_id.to_owned(),
        reason,
        policy: keys.life.access.to_string(),
    })
}

pub(super) fn ensure_live(keys: &TenantKeys, tenant_id: &str) -> Result<(), BrokerError> {
    match keys.life.delete_at_ms {
        None => Ok(()),
        Some(delete_at_ms) => Err(BrokerError::TenantDeleting {
            tenant_id: tenant_id.to_owned(),
            delete_at_ms,
        }),
    }
}

/// Refuses a wrapped key of another incarnation of the tenant id; one from
/// before incarnations (0) only while the id was never deleted.
pub(super) fn ensure_incarnation(
    keys: &TenantKeys,
    tenant_id: &str,
    incarnation: u64,
) -> Result<(), BrokerError> {
    let current = match incarnation {
        0 => keys.life.legacy_deks,
        n => n == keys.life.incarnation,
    };
    if current {
        return Ok(());
    }
    Err(BrokerError::IncarnationGone {
        tenant_id: tenant_id.to_owned(),
        incarnation,
    })
}

/// Refuses a binding that is not active, naming its state and reason.
pub(super) fn ensure_usable(binding: &Binding, tenant_id: &str) -> Result<(), BrokerError> {
    match binding.state {
        BindingState::Active => Ok(()),
        state => Err(BrokerError::KeyUnusable {
            tenant_id: tenant_id.to_owned(),
            binding: binding.name.to_string(),
            state,
            reason: binding.state_reason.clone(),
        }),
    }
}

/// A direct wrap by `binding`: refused, before any provider call, for a
/// key whose wrap budget cannot serve one wrap per DEK.
pub(super) fn ensure_wraps_directly(binding: &Binding, tenant_id: &str) -> Result<(), BrokerError> {
    match binding.direct_refusal {
        None => Ok(()),
        Some(why) => Err(BrokerError::DirectWrapRefused {
            tenant_id: tenant_id.to_owned(),
            binding: binding.name.to_string(),
            why,
        }),
    }
}

pub(super) fn parse_for(tenant_id: &str, wrapped: &[u8]) -> Result<Envelope, BrokerError> {
    let envelope = Envelope::parse(wrapped)?;
    if envelope.tenant_id != tenant_id {
        return Err(BrokerError::TenantMismatch {
            tenant_id: tenant_id.to_owned(),
        });
    }
    Ok(envelope)
}

/// The binding a directly wrapped key (format 1) names, checked.
pub(super) fn resolve_binding<'a>(
    keys: &'a TenantKeys,
    tenant_id: &str,
    envelope: &Envelope,
) -> Result<&'a Arc<Binding>, BrokerError> {
    let binding = find_binding(keys, tenant_id, &envelope.key_binding)?;
    if binding.provider.kind() != envelope.provider {
        return Err(BrokerError::InvalidRequest(format!(
            "the wrapped key names provider {} but key binding '{}' uses {}",
            envelope.provider,
            binding.name,
            binding.provider.kind()
        )));
    }
    ensure_usable(binding, tenant_id)?;
    binding
        .provider
        .check_version(&envelope.provider_key_version)
        .map_err(|source| provider_error(binding, source))?;
    ensure_current(binding, tenant_id, &envelope.provider_key_version)?;
    Ok(binding)
}

/// Refuses a wrapped key under a retired version of `binding`. Free when
/// nothing is retired (the common case, checked first on the hot path).
pub(super) fn ensure_current(
    binding: &Binding,
    tenant_id: &str,
    version: &str,
) -> Result<(), BrokerError> {
    let min = binding.min_decryption_version;
    if min == 0 {
        return Ok(());
    }
    match crate::keys::version_number(version) {
        Some(number) if number < min => Err(BrokerError::VersionRetired {
            tenant_id: tenant_id.to_owned(),
            key: if &*binding.name == PLATFORM_BINDING {
                "the platform key".to_owned()
            } else {
                format!("key '{}'", binding.name)
            },
            version: number,
            min,
        }),
        _ => Ok(()),
    }
}

/// What protected a cached key, as `KeyInfo`.
pub(super) fn origin_info(keys: &TenantKeys, origin: &crate::cache::KeyOrigin) -> KeyInfo {
    match origin.tenant_key_version {
        0 => KeyInfo {
            key_binding: Arc::clone(&origin.key_binding),
            provider: origin.provider,
            // `String::from`, not `to_string`: no formatter on the hot path.
            key_version: String::from(&*origin.key_version),
        },
        v => {
            let binding = keys
                .version(v)
                .map_or(Arc::clone(&origin.key_binding), |tk| {
                    Arc::clone(&tk.binding.name)
                });
            KeyInfo {
                key_binding: binding,
                provider: origin.provider,
                key_version: version_label(v),
            }
        }
    }
}

/// The wrapped key (envelope) for a provider's ciphertext.
pub(super) fn seal(
    binding: &Binding,
    tenant_id: &str,
    incarnation: u64,
    ciphertext: crate::kms::Ciphertext,
) -> Wrapped {
    let envelope = Envelope {
        tenant_id: tenant_id.to_owned(),
        key_binding: binding.name.to_string(),
        provider: binding.provider.kind(),
        provider_key_version: ciphertext.key_version,
        ciphertext: ciphertext.bytes,
        tenant_key_version: 0,
        incarnation,
    };
    Wrapped {
        wrapped_key: envelope.encode(),
        key: binding.info(envelope.provider_key_version),
    }
}

pub(super) fn current_version(binding: &Binding) -> String {
    binding.provider.current_version().unwrap_or_default()
}

pub(super) fn find_binding<'a>(
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
pub(super) fn rewrap_recommended(keys: &TenantKeys, key: &CachedKey) -> bool {
    if seals(keys) {
        // Sealed under another version than new DEKs are (or will be, when
        // a key change started a new epoch), or wrapped directly: a rewrap
        // seals it under the current one. No KMS call is needed to tell.
        return match key.origin.tenant_key_version {
            0 => true,
            v => keys.sealing_version().is_none_or(|s| s.version != v),
        };
    }
    if key.origin.tenant_key_version > 0 {
        return true;
    }
    if key.origin.key_binding != keys.primary.name {
        return true;
    }
    keys.primary
        .provider
        .is_current_version(&key.origin.key_version)
        .is_some_and(|current| !current)
}

pub(super) fn provider_error(binding: &Binding, source: ProviderError) -> BrokerError {
    BrokerError::Provider {
        binding: binding.name.to_string(),
        provider: binding.provider.kind(),
        source,
    }
}
