//! Unlinking a key, in one transaction with what it leaves behind: the
//! tenant key versions it wraps are destroyed with it (nothing is left that
//! no binding can open), and a key change toward it is abandoned.
//!
//! The guards follow the seeds: a key nothing used for the unlink guard
//! window unlinks without force (Pinecone deletes a project's key once no
//! index uses it, Cube drops keys). A keyring tenant's key that protects
//! versions which sealed DEKs is refused until they are moved to another
//! key (they would be destroyed); a single_key tenant has nowhere to move
//! them, so its key unlinks once unused for the window, destroying them.

use super::{Lifecycle, LifecycleError};
use crate::keys::{KeyHierarchy, now_ms};
use crate::registry::{KeyPolicy, RegistryError, UnlinkGuard};

/// What an unlink destroyed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unlinked {
    /// Tenant key versions the key wrapped (and every DEK sealed under them).
    pub versions_destroyed: u64,
}

impl Lifecycle {
    /// Unlinks key `name` of `tenant_id` (see the module doc). Usage must be
    /// flushed first: the guard reads the registry's counters.
    pub async fn unlink(
        &self,
        tenant_id: &str,
        name: &str,
        guard: UnlinkGuard,
    ) -> Result<Unlinked, LifecycleError> {
        let mut tx = self
            .registry()
            .lock_tenant(tenant_id)
            .await?
            .ok_or_else(|| RegistryError::TenantNotFound(tenant_id.to_owned()))?;
        super::change::refuse_if_deleting(tx.tenant())?;
        let bindings = tx.bindings().await?;
        let binding = bindings.iter().find(|b| b.name == name).ok_or_else(|| {
            RegistryError::BindingNotFound {
                tenant_id: tenant_id.to_owned(),
                name: name.to_owned(),
            }
        })?;
        let versions = tx.versions().await?;
        let under = versions.iter().filter(|v| v.binding == name).count();
        if !guard.force {
            let last_use = [
                binding.last_used_at_ms,
                tx.last_use_of_versions_under(name).await?,
            ]
            .into_iter()
            .flatten()
            .max();
            if let Some(last) = last_use.filter(|l| *l >= guard.not_used_since_ms) {
                let window_ms = now_ms().saturating_sub(guard.not_used_since_ms);
                return Err(RegistryError::Refused(format!(
                    "key '{name}' of tenant '{tenant_id}' was used {}s ago; what it protects would become unreadable. \
                     Move it first (DisableKey with reencrypt_to, or SetPrimaryKey of another key; RewrapKey for DEKs it wraps directly), \
                     then unlink after {} without use, or unlink with force to destroy it now",
                    (now_ms() - last).max(0) / 1000,
                    crate::text::rfc3339(last.saturating_add(window_ms)),
                ))
                .into());
            }
            let sealed = tx.seals_under(name).await?;
            if tx.tenant().key_policy == KeyPolicy::Keyring && sealed > 0 {
                return Err(RegistryError::Refused(format!(
                    "key '{name}' of tenant '{tenant_id}' protects {under} tenant key version(s) that sealed {sealed} DEK(s); \
                     unlinking would destroy them. Move them to another key first (DisableKey with reencrypt_to, or \
                     SetPrimaryKey of another key), or unlink with force to destroy them"
                ))
                .into());
            }
        }
        let destroyed = tx.delete_versions_under(name).await?;
        tx.delete_binding(name).await?;
        let t = tx.tenant_mut();
        // A change toward this key can never finish now; one away from it
        // lost what it was moving.
        if t.reencrypt_to.as_deref() == Some(name) {
            t.reencrypt_to = None;
            t.reencrypt_then_disable = None;
            t.reencrypt_disable_reason.clear();
        }
        if t.reencrypt_then_disable.as_deref() == Some(name) {
            t.reencrypt_then_disable = None;
            t.reencrypt_disable_reason.clear();
        }
        if t.reencrypt_from.as_deref() == Some(name) && t.key_hierarchy == KeyHierarchy::Direct {
            t.reencrypt_from = None;
        }
        tx.write_tenant(now_ms()).await?;
        tx.commit().await?;
        self.directory.changed(tenant_id, Some(name)).await;
        self.directory.forget_usage(tenant_id, name);
        if destroyed > 0 {
            tracing::warn!(
                tenant = tenant_id,
                key = name,
                versions = destroyed,
                force = guard.force,
                "key unlinked; the tenant key versions it wrapped are destroyed"
            );
        }
        Ok(Unlinked {
            versions_destroyed: destroyed,
        })
    }
}
