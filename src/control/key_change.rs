//! Key changes under the `tenant_key` hierarchy: every tenant key version
//! protected by another key is re-encrypted under the target (one decrypt
//! and one encrypt per version, never per DEK), then a fresh version is
//! minted under it for new DEKs.
//!
//! Resumable: the target is recorded on the tenant before the first version
//! moves, each version moves in its own compare-and-set (under its old
//! binding, or not at all), and the record is cleared only when every
//! version is under the target. A crash anywhere leaves the target recorded;
//! the server resumes it at start (and any later key change of the tenant
//! finishes it first). No version is ever lost: its old wrapping stays in
//! place until its new one is stored.

use std::sync::Arc;

use super::{Admin, AdminError};
use crate::keys::{KeyHierarchy, PLATFORM_BINDING, now_ms, tenant_key_context};
use crate::kms::{KeyProvider, WrapContext};
use crate::registry::{Tenant, TenantKeyRecord};
use crate::secret::SecretBytes;

/// A tenant's key versions and any key change moving them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reencryption {
    /// The binding versions move to (`platform` for the platform key);
    /// empty when none is under way.
    pub target: String,
    /// Versions already under the target (all of them when none is under way).
    pub versions_done: u32,
    pub versions_total: u32,
    pub in_progress: bool,
}

impl Admin {
    /// The key-change status of a tenant.
    pub async fn reencryption(&self, tenant: &Tenant) -> Result<Reencryption, AdminError> {
        let versions = self.registry().tenant_keys(&tenant.id).await?;
        let total = u32::try_from(versions.len()).unwrap_or(u32::MAX);
        Ok(match &tenant.reencrypt_to {
            Some(target) => Reencryption {
                target: target.clone(),
                versions_done: u32::try_from(
                    versions.iter().filter(|v| v.binding == *target).count(),
                )
                .unwrap_or(u32::MAX),
                versions_total: total,
                in_progress: true,
            },
            None => Reencryption {
                target: String::new(),
                versions_done: total,
                versions_total: total,
                in_progress: false,
            },
        })
    }

    /// Starts (or continues) moving every version of a `tenant_key` tenant
    /// to `target`, and finishes it. Refused while another key change of
    /// the tenant cannot finish.
    pub(super) async fn change_key(
        &self,
        tenant_id: &str,
        target: &str,
    ) -> Result<Reencryption, AdminError> {
        let tenant = self.tenant(tenant_id).await?;
        if tenant.key_hierarchy != KeyHierarchy::TenantKey {
            return self.reencryption(&tenant).await;
        }
        if let Some(current) = &tenant.reencrypt_to
            && current != target
        {
            // Finish the change under way first: two at once could leave a
            // version under neither target.
            self.reencrypt(tenant_id).await.map_err(|e| {
                AdminError::Refused(format!(
                    "a key change of tenant '{tenant_id}' to '{current}' is not finished ({e}); it must finish before another starts"
                ))
            })?;
        }
        self.registry()
            .set_reencrypt_to(tenant_id, Some(target), now_ms())
            .await?;
        self.reencrypt(tenant_id).await
    }

    /// Moves every version not under the recorded target, mints a version
    /// under the target, and clears the record. A no-op without a record.
    pub async fn reencrypt(&self, tenant_id: &str) -> Result<Reencryption, AdminError> {
        let tenant = self.tenant(tenant_id).await?;
        let Some(target) = tenant.reencrypt_to.clone() else {
            return self.reencryption(&tenant).await;
        };
        if tenant.key_hierarchy != KeyHierarchy::TenantKey {
            // A direct tenant's DEKs are the callers' to move (RewrapKey).
            return self.reencryption(&tenant).await;
        }
        let to = self.provider_named(&tenant, &target).await?;
        let versions = self.registry().tenant_keys(tenant_id).await?;
        let mut moved = 0usize;
        for version in versions.iter().filter(|v| v.binding != target) {
            let from = self.provider_named(&tenant, &version.binding).await?;
            let context = tenant_key_context(version.version);
            let wrap = WrapContext {
                tenant_id,
                context: &context,
            };
            let plaintext = from
                .decrypt(&version.provider_key_version, &version.wrapped, wrap)
                .await
                .map_err(AdminError::Provider)?;
            let ciphertext = to
                .encrypt(&plaintext, wrap)
                .await
                .map_err(AdminError::Provider)?;
            let now = now_ms();
            let stored = self
                .registry()
                .rewrap_tenant_key(
                    tenant_id,
                    version.version,
                    &version.binding,
                    &TenantKeyRecord {
                        tenant_id: tenant_id.to_owned(),
                        version: version.version,
                        binding: target.clone(),
                        provider_key_version: ciphertext.key_version,
                        wrapped: ciphertext.bytes,
                        created_at_ms: version.created_at_ms,
                        updated_at_ms: now,
                    },
                )
                .await?;
            moved += usize::from(stored);
        }
        // New DEKs get a version minted under the target: DEKs sealed from
        // now on never depended on the old key.
        let next = versions.last().map_or(1, |v| v.version.saturating_add(1));
        let plaintext = SecretBytes::random(32)
            .map_err(|_| AdminError::Internal("system random generator failed".into()))?;
        let context = tenant_key_context(next);
        let ciphertext = to
            .encrypt(
                &plaintext,
                WrapContext {
                    tenant_id,
                    context: &context,
                },
            )
            .await
            .map_err(AdminError::Provider)?;
        let now = now_ms();
        self.registry()
            .insert_tenant_key(&TenantKeyRecord {
                tenant_id: tenant_id.to_owned(),
                version: next,
                binding: target.clone(),
                provider_key_version: ciphertext.key_version,
                wrapped: ciphertext.bytes,
                created_at_ms: now,
                updated_at_ms: now,
            })
            .await?;
        let tenant = self
            .registry()
            .set_reencrypt_to(tenant_id, None, now_ms())
            .await?;
        self.directory.changed(tenant_id, None).await;
        tracing::info!(
            tenant = tenant_id,
            target = %target,
            moved,
            minted = next,
            "tenant key versions re-encrypted"
        );
        self.reencryption(&tenant).await
    }

    /// Finishes every key change a crash interrupted (at start).
    pub async fn resume_key_changes(&self) -> Result<usize, AdminError> {
        let pending = self.registry().tenants_reencrypting().await?;
        let mut finished = 0;
        for tenant in pending {
            match self.reencrypt(&tenant.id).await {
                Ok(_) => finished += 1,
                Err(err) => tracing::warn!(
                    tenant = %tenant.id,
                    error = %err,
                    "could not finish a key change; it resumes at the next start or key change"
                ),
            }
        }
        Ok(finished)
    }

    /// The provider of a binding of `tenant` by name (`platform` included).
    async fn provider_named(
        &self,
        tenant: &Tenant,
        name: &str,
    ) -> Result<Arc<dyn KeyProvider>, AdminError> {
        if name == PLATFORM_BINDING {
            return Ok(Arc::clone(self.directory.platform_keyring()) as Arc<dyn KeyProvider>);
        }
        let record = self
            .registry()
            .binding(&tenant.id, name)
            .await?
            .ok_or_else(|| super::not_found(&tenant.id, name))?;
        Ok(self
            .directory
            .provider(&record, &tenant.external_id)
            .await?)
    }
}
