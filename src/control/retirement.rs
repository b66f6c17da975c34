//! Retiring old key versions (Vault's `min_decryption_version`) and the
//! per-version usage that shows which versions still protect live data.
//!
//! Retiring is a promise that old material stops reading, so it is guarded
//! twice: by usage (a retired version unwrapped within the unlink guard
//! window refuses the retirement unless forced) and by what the registry
//! itself holds under the version (tenant key versions, imported key
//! material), which is re-wrapped under the current version first. DEKs in
//! callers' hands are theirs to move (RewrapKey, `keybroker rewrap`);
//! lowering the minimum again makes them readable.

use std::collections::BTreeSet;

use super::{Admin, AdminError, not_found};
use crate::keys::{
    KeyHierarchy, PLATFORM_BINDING, TENANT_KEY_USAGE, now_ms, tenant_key_context, version_number,
};
use crate::kms::{KeyProvider, ProviderKind, WrapContext};
use crate::registry::directory::{open_material, seal_material};
use crate::registry::{FLEET, TenantKeyRecord, VersionUsageRecord};

/// What a retirement retires versions of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetireTarget {
    /// A key binding of the tenant.
    Key(String),
    /// The tenant's own key versions.
    TenantKey,
    /// The platform keyring, for every tenant.
    PlatformKeyring,
}

/// The outcome of a retirement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retired {
    pub min_version: u32,
    /// Versions now refused, as wrapped keys name them.
    pub retired_versions: Vec<String>,
    /// Registry-held keys re-wrapped under a current version first.
    pub rewrapped: u32,
}

/// Uses of one key version, for GetKey / GetTenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionUsageView {
    pub version: String,
    pub wraps: u64,
    pub unwraps: u64,
    pub last_used_ms: Option<i64>,
    /// Tenant key versions this key version protects now.
    pub tenant_key_versions: u32,
    pub retired: bool,
}

impl Admin {
    /// Sets the minimum decryption version of `target`; see the module doc.
    pub async fn retire_versions(
        &self,
        tenant_id: &str,
        target: RetireTarget,
        min: u32,
        force: bool,
    ) -> Result<Retired, AdminError> {
        let (owner, key_name) = match &target {
            RetireTarget::PlatformKeyring => {
                if !tenant_id.is_empty() && tenant_id != FLEET {
                    return Err(AdminError::InvalidArgument(
                        "the platform keyring is retired for every tenant: leave tenant_id empty"
                            .into(),
                    ));
                }
                (FLEET.to_owned(), PLATFORM_BINDING.to_owned())
            }
            RetireTarget::Key(name) => {
                super::validate_tenant(tenant_id)?;
                (tenant_id.to_owned(), name.clone())
            }
            RetireTarget::TenantKey => {
                super::validate_tenant(tenant_id)?;
                (tenant_id.to_owned(), TENANT_KEY_USAGE.to_owned())
            }
        };
        let newest = self.newest_version(&owner, &target).await?;
        if min > newest {
            return Err(AdminError::InvalidArgument(format!(
                "the newest version is {newest}: the minimum decryption version can be at most {newest} (a newer one would leave nothing to wrap with)"
            )));
        }
        // Exact counts, this replica's included (other replicas flush every
        // usage_flush_interval).
        self.flush_usage().await?;
        let usage = self.registry().version_usage(&owner).await?;
        let retired_in_use: Vec<&VersionUsageRecord> = usage
            .iter()
            .filter(|u| u.key_name == key_name && is_retired(&u.version, min))
            .collect();
        if !force {
            let since = now_ms().saturating_sub(
                i64::try_from(self.settings.unlink_guard_window.as_millis()).unwrap_or(i64::MAX),
            );
            if let Some(recent) = retired_in_use
                .iter()
                .filter(|u| u.last_used_at_ms >= since && u.unwraps + u.wraps > 0)
                .max_by_key(|u| u.last_used_at_ms)
            {
                return Err(AdminError::Refused(format!(
                    "version {} was used {}s ago ({} unwraps counted): retiring it makes those DEKs unreadable. \
                     Rewrap them (RewrapKey, BatchRewrapKey or keybroker rewrap), wait for the unlink guard window, or retire with force",
                    recent.version,
                    (now_ms() - recent.last_used_at_ms).max(0) / 1000,
                    recent.unwraps
                )));
            }
        }
        let rewrapped = match &target {
            RetireTarget::Key(name) => self.rewrap_tenant_keys_of(tenant_id, name, min).await?,
            RetireTarget::PlatformKeyring => self.reseal_platform_held(min).await?,
            RetireTarget::TenantKey => 0,
        };
        self.registry()
            .set_retirement(&owner, &key_name, min, now_ms())
            .await?;
        self.directory.changed(&owner, None).await;
        let mut versions: BTreeSet<(u32, String)> = retired_in_use
            .iter()
            .filter_map(|u| version_number(&u.version).map(|n| (n, u.version.clone())))
            .collect();
        if !matches!(target, RetireTarget::Key(_)) {
            // Numbered by keybroker: every number below the minimum existed.
            versions.extend((1..min).map(|n| (n, n.to_string())));
        }
        tracing::warn!(
            tenant = %owner,
            key = %key_name,
            min_version = min,
            rewrapped,
            force,
            "key versions retired"
        );
        Ok(Retired {
            min_version: min,
            retired_versions: versions.into_iter().map(|(_, v)| v).collect(),
            rewrapped,
        })
    }

    /// The newest version of a target, which a minimum may not exceed.
    async fn newest_version(&self, owner: &str, target: &RetireTarget) -> Result<u32, AdminError> {
        match target {
            RetireTarget::PlatformKeyring => Ok(self.directory.platform_keyring().newest_version()),
            RetireTarget::TenantKey => {
                let tenant = self.tenant(owner).await?;
                if tenant.key_hierarchy != KeyHierarchy::TenantKey {
                    return Err(AdminError::InvalidArgument(format!(
                        "tenant '{owner}' wraps DEKs directly (key_hierarchy direct): it has no tenant key versions to retire"
                    )));
                }
                Ok(self
                    .registry()
                    .tenant_keys(owner)
                    .await?
                    .last()
                    .map_or(0, |v| v.version))
            }
            RetireTarget::Key(name) => {
                let tenant = self.tenant(owner).await?;
                let record = self
                    .registry()
                    .binding(owner, name)
                    .await?
                    .ok_or_else(|| not_found(owner, name))?;
                if record.provider == ProviderKind::AwsKms {
                    return Err(AdminError::InvalidArgument(format!(
                        "key '{name}' is an AWS KMS key: AWS keeps every rotated key material inside the key and exposes no versions to retire. \
                         Rewrap its DEKs to another key and disable or unlink this one instead"
                    )));
                }
                let provider = self
                    .directory
                    .provider(&record, &tenant.external_id)
                    .await?;
                let current = provider
                    .describe()
                    .await
                    .map_err(AdminError::Provider)?
                    .current_version;
                version_number(&current).ok_or_else(|| {
                    AdminError::Internal(format!(
                        "key '{name}' reported no numbered current version"
                    ))
                })
            }
        }
    }

    /// Re-wraps a `tenant_key` tenant's versions that `name` protects under
    /// a retired version, under its current version (one decrypt and one
    /// encrypt per tenant key version, never per DEK).
    pub(super) async fn rewrap_tenant_keys_of(
        &self,
        tenant_id: &str,
        name: &str,
        min: u32,
    ) -> Result<u32, AdminError> {
        let tenant = self.tenant(tenant_id).await?;
        let stale: Vec<TenantKeyRecord> = self
            .registry()
            .tenant_keys(tenant_id)
            .await?
            .into_iter()
            .filter(|v| v.binding == name && is_retired(&v.provider_key_version, min))
            .collect();
        if stale.is_empty() {
            return Ok(0);
        }
        let record = self
            .registry()
            .binding(tenant_id, name)
            .await?
            .ok_or_else(|| not_found(tenant_id, name))?;
        let provider = self
            .directory
            .provider(&record, &tenant.external_id)
            .await?;
        self.rewrap_versions(provider.as_ref(), &stale).await
    }

    async fn rewrap_versions(
        &self,
        provider: &dyn KeyProvider,
        stale: &[TenantKeyRecord],
    ) -> Result<u32, AdminError> {
        let mut moved = 0;
        for version in stale {
            let context = tenant_key_context(version.version);
            let wrap = WrapContext {
                tenant_id: &version.tenant_id,
                context: &context,
            };
            let plaintext = provider
                .decrypt(&version.provider_key_version, &version.wrapped, wrap)
                .await
                .map_err(AdminError::Provider)?;
            let ciphertext = provider
                .encrypt(&plaintext, wrap)
                .await
                .map_err(AdminError::Provider)?;
            let stored = self
                .lifecycle
                .rewrap_version(
                    &version.binding,
                    &TenantKeyRecord {
                        provider_key_version: ciphertext.key_version,
                        wrapped: ciphertext.bytes,
                        updated_at_ms: now_ms(),
                        ..version.clone()
                    },
                )
                .await?;
            moved += u32::from(stored);
        }
        Ok(moved)
    }

    /// Re-seals what the registry keeps under a retired platform keyring
    /// version: tenant key versions the platform key protects and imported
    /// key material. Local AES only: no customer KMS is called.
    async fn reseal_platform_held(&self, min: u32) -> Result<u32, AdminError> {
        let keyring = std::sync::Arc::clone(self.directory.platform_keyring());
        let stale: Vec<TenantKeyRecord> = self
            .registry()
            .tenant_keys_under(PLATFORM_BINDING)
            .await?
            .into_iter()
            .filter(|v| is_retired(&v.provider_key_version, min))
            .collect();
        let mut moved = self.rewrap_versions(keyring.as_ref(), &stale).await?;
        for record in self.registry().bindings_with_material().await? {
            let Some(sealed) = record.key_material.as_deref() else {
                continue;
            };
            let version = crate::envelope::Envelope::parse(sealed)
                .map(|e| e.provider_key_version)
                .map_err(|e| AdminError::Internal(format!("stored key material: {e}")))?;
            if !is_retired(&version, min) {
                continue;
            }
            let material = open_material(&keyring, &record.tenant_id, &record.name, sealed).await?;
            let resealed =
                seal_material(&keyring, &record.tenant_id, &record.name, &material).await?;
            if self
                .registry()
                .replace_key_material(
                    &record.tenant_id,
                    &record.name,
                    sealed,
                    &resealed,
                    None,
                    None,
                )
                .await?
            {
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Uses per version of a key (`#tenant-key` for tenant key versions),
    /// with what each protects and whether it is retired. Flushes first.
    pub async fn version_usage(
        &self,
        tenant_id: &str,
        key_name: &str,
    ) -> Result<(u32, Vec<VersionUsageView>), AdminError> {
        self.flush_usage().await?;
        let registry = self.registry();
        let min = registry
            .retirements(tenant_id)
            .await?
            .into_iter()
            .find(|r| r.key_name == key_name)
            .map_or(0, |r| r.min_version);
        let mut views: Vec<VersionUsageView> = registry
            .version_usage(tenant_id)
            .await?
            .into_iter()
            .filter(|u| u.key_name == key_name)
            .map(|u| VersionUsageView {
                retired: is_retired(&u.version, min),
                version: u.version,
                wraps: u.wraps,
                unwraps: u.unwraps,
                last_used_ms: (u.last_used_at_ms > 0).then_some(u.last_used_at_ms),
                tenant_key_versions: 0,
            })
            .collect();
        if key_name != TENANT_KEY_USAGE && tenant_id != FLEET {
            for record in registry.tenant_keys(tenant_id).await? {
                if record.binding != key_name {
                    continue;
                }
                let at = match views
                    .iter()
                    .position(|v| v.version == record.provider_key_version)
                {
                    Some(at) => at,
                    None => {
                        views.push(VersionUsageView {
                            retired: is_retired(&record.provider_key_version, min),
                            version: record.provider_key_version.clone(),
                            ..VersionUsageView::default()
                        });
                        views.len() - 1
                    }
                };
                views[at].tenant_key_versions += 1;
            }
        }
        // Imported material: every version it has, used or not.
        if tenant_id != FLEET
            && let Some(record) = registry.binding(tenant_id, key_name).await?
            && record.provider == ProviderKind::Local
        {
            let tenant = self.tenant(tenant_id).await?;
            let provider = self
                .directory
                .provider(&record, &tenant.external_id)
                .await?;
            let newest = provider
                .current_version()
                .and_then(|v| version_number(&v))
                .unwrap_or(0);
            for n in 1..=newest {
                let version = n.to_string();
                if !views.iter().any(|v| v.version == version) {
                    views.push(VersionUsageView {
                        retired: n < min,
                        version,
                        ..VersionUsageView::default()
                    });
                }
            }
        }
        views.sort_by_key(|v| (version_number(&v.version), v.version.clone()));
        Ok((min, views))
    }
}

/// Whether `version` is below the minimum (never for an unnumbered one).
fn is_retired(version: &str, min: u32) -> bool {
    version_number(version).is_some_and(|n| n < min)
}
