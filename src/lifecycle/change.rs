//! Key changes: every tenant key version protected by another key is
//! re-encrypted under the target (one decrypt and one encrypt per version,
//! never per DEK); the first wrap after the change mints a fresh version
//! under it, since the change starts a new key epoch.
//!
//! Three transactions, each under the tenant's lock:
//! 1. **begin** records the target (and a new primary, and the key to
//!    disable when done) and bumps the epoch. From then on the sealing rule
//!    names the target, so a mint planned under the old key is refused.
//! 2. **move**, per version: a compare-and-set on the binding that wrapped
//!    it, and only while this change is the one recorded. Its old wrapping
//!    stays until the new one is stored.
//! 3. **finish** re-reads every version and clears the record only when
//!    none is left under another key; then disables what DisableKey named.
//!
//! A crash anywhere leaves the record; the server resumes it at start and
//! every [`super::DeletionSettings::maintenance_interval`] (a change nobody
//! moved for a minute), and a later key change of the tenant finishes it
//! first. Two drivers of one change (replicas) are safe: the moves are
//! compare-and-sets.

use super::{Lifecycle, LifecycleError};
use crate::keys::{BindingState, KeyHierarchy, PLATFORM_BINDING, now_ms, tenant_key_context};
use crate::kms::WrapContext;
use crate::registry::{RegistryError, Tenant, TenantKeyRecord};

/// Rounds of move-then-finish before a change gives up for now (versions
/// appearing under other keys meanwhile: another controller at work).
const ROUNDS: usize = 5;

/// A change not moved for this long is resumed by any replica.
const STALLED_MS: i64 = 60_000;

/// A key change to start.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// The binding every version moves to (`platform` for the platform key).
    pub target: String,
    /// Make the target the primary in the same transaction (a change to
    /// the platform key keeps the primary, which DisableKey turns off: a
    /// keyring tenant's disabled primary wraps with the platform key, and
    /// enabling it again makes it the default again).
    pub make_primary: bool,
    /// Disable this key, with this reason, when the change finishes
    /// (DisableKey with reencrypt_to).
    pub then_disable: Option<(String, String)>,
}

/// A tenant's key versions and any key change moving them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeStatus {
    /// The binding versions move to (`platform` for the platform key), or
    /// moved to in the last change; empty when none ever ran.
    pub target: String,
    /// Versions already under the target (all of them when none is under
    /// way).
    pub versions_done: u32,
    pub versions_total: u32,
    pub in_progress: bool,
}

enum Begun {
    Started,
    /// Another change is recorded: it must finish first.
    Busy(String),
}

enum Finished {
    Done,
    /// Versions still under another key: move them, then finish again.
    Left,
}

impl Lifecycle {
    /// The key-change status of a tenant.
    pub async fn change_status(&self, tenant: &Tenant) -> Result<ChangeStatus, LifecycleError> {
        let versions = self.registry().tenant_keys(&tenant.id).await?;
        let total = u32::try_from(versions.len()).unwrap_or(u32::MAX);
        let count = |target: &str| {
            u32::try_from(versions.iter().filter(|v| v.binding == target).count())
                .unwrap_or(u32::MAX)
        };
        Ok(match (&tenant.reencrypt_to, &tenant.reencrypt_from) {
            (Some(target), _) => ChangeStatus {
                target: target.clone(),
                versions_done: count(target),
                versions_total: total,
                in_progress: true,
            },
            // A `direct` tenant's DEKs moving off a disabled key: the
            // callers' to rewrap (RewrapKey) until the operator finishes.
            (None, Some(_)) => ChangeStatus {
                target: tenant.reencrypt_last.clone().unwrap_or_default(),
                versions_done: total,
                versions_total: total,
                in_progress: true,
            },
            (None, None) => ChangeStatus {
                target: tenant.reencrypt_last.clone().unwrap_or_default(),
                versions_done: total,
                versions_total: total,
                in_progress: false,
            },
        })
    }

    /// Starts `change` (first finishing one under way to another target)
    /// and drives it to the end.
    pub async fn change_key(
        &self,
        tenant_id: &str,
        change: &Change,
    ) -> Result<ChangeStatus, LifecycleError> {
        for _ in 0..ROUNDS {
            match self.begin(tenant_id, change).await? {
                Begun::Started => return self.drive(tenant_id, &change.target).await,
                Begun::Busy(current) => {
                    // Two at once could leave a version under neither.
                    self.drive(tenant_id, &current).await.map_err(|e| {
                        RegistryError::Refused(format!(
                            "a key change of tenant '{tenant_id}' to '{current}' is not finished ({e}); it must finish before another starts"
                        ))
                    })?;
                }
            }
        }
        Err(RegistryError::Database(format!(
            "tenant '{tenant_id}': other key changes kept starting; retry"
        ))
        .into())
    }

    async fn begin(&self, tenant_id: &str, change: &Change) -> Result<Begun, LifecycleError> {
        let mut tx = self
            .registry()
            .lock_tenant(tenant_id)
            .await?
            .ok_or_else(|| RegistryError::TenantNotFound(tenant_id.to_owned()))?;
        refuse_if_deleting(tx.tenant())?;
        if let Some(current) = &tx.tenant().reencrypt_to
            && *current != change.target
        {
            return Ok(Begun::Busy(current.clone()));
        }
        let bindings = tx.bindings().await?;
        if change.target != PLATFORM_BINDING {
            let target = bindings
                .iter()
                .find(|b| b.name == change.target)
                .ok_or_else(|| RegistryError::BindingNotFound {
                    tenant_id: tenant_id.to_owned(),
                    name: change.target.clone(),
                })?;
            if target.state != BindingState::Active {
                return Err(RegistryError::Refused(format!(
                    "key '{}' of tenant '{tenant_id}' is {}; only an active key can take over (enable it first)",
                    target.name, target.state
                ))
                .into());
            }
        }
        refuse_revoked_sources(tenant_id, &bindings, &tx.versions().await?, &change.target)?;
        let now = now_ms();
        if change.make_primary {
            tx.set_primary(Some(&change.target), now).await?;
        }
        let t = tx.tenant_mut();
        if let Some((name, reason)) = &change.then_disable {
            t.reencrypt_then_disable = Some(name.clone());
            t.reencrypt_disable_reason = reason.clone();
        }
        if t.reencrypt_to.is_none() {
            // A new epoch: no version minted before seals new DEKs, and a
            // mint planned before this moment is refused.
            t.key_epoch = t.key_epoch.saturating_add(1);
        }
        t.reencrypt_to = Some(change.target.clone());
        tx.write_tenant(now).await?;
        tx.commit().await?;
        self.directory.changed(tenant_id, None).await;
        Ok(Begun::Started)
    }

    /// Whether a change to a key about to be linked as `target` could
    /// begin now: checked before the link is stored, so a link that would
    /// leave the tenant half changed is refused whole. (`begin` checks
    /// again under the lock.)
    pub async fn check_can_take_over(
        &self,
        tenant_id: &str,
        target: &str,
        bindings: &[crate::registry::BindingRecord],
    ) -> Result<(), LifecycleError> {
        let versions = self.registry().tenant_keys(tenant_id).await?;
        refuse_revoked_sources(tenant_id, bindings, &versions, target)?;
        Ok(())
    }

    /// Moves every version to `target` and finishes the change recorded
    /// for it (a no-op when none is).
    async fn drive(&self, tenant_id: &str, target: &str) -> Result<ChangeStatus, LifecycleError> {
        for _ in 0..ROUNDS {
            let tenant = self
                .registry()
                .tenant(tenant_id)
                .await?
                .ok_or_else(|| RegistryError::TenantNotFound(tenant_id.to_owned()))?;
            if tenant.reencrypt_to.as_deref() != Some(target) {
                return self.change_status(&tenant).await;
            }
            let moved = self.move_all(&tenant, target).await?;
            match self.finish(tenant_id, target).await? {
                Finished::Done => {
                    tracing::info!(tenant = tenant_id, target, moved, "key change finished");
                    let tenant = self
                        .registry()
                        .tenant(tenant_id)
                        .await?
                        .ok_or_else(|| RegistryError::TenantNotFound(tenant_id.to_owned()))?;
                    return self.change_status(&tenant).await;
                }
                Finished::Left => {}
            }
        }
        Err(RegistryError::Database(format!(
            "tenant '{tenant_id}': the key change to '{target}' found versions under other keys {ROUNDS} times; it resumes later"
        ))
        .into())
    }

    /// One pass over the versions not under `target`.
    async fn move_all(&self, tenant: &Tenant, target: &str) -> Result<usize, LifecycleError> {
        let to = self.provider_named(tenant, target).await?;
        let versions = self.registry().tenant_keys(&tenant.id).await?;
        let mut moved = 0;
        for version in versions.iter().filter(|v| v.binding != target) {
            let from = match self.provider_named(tenant, &version.binding).await {
                Ok(p) => p,
                // Unlinked (with its versions) since the list was read.
                Err(LifecycleError::Registry(RegistryError::BindingNotFound { .. })) => continue,
                Err(e) => return Err(e),
            };
            let context = tenant_key_context(version.version);
            let wrap = WrapContext {
                tenant_id: &tenant.id,
                context: &context,
            };
            let plaintext = from
                .decrypt(&version.provider_key_version, &version.wrapped, wrap)
                .await
                .map_err(LifecycleError::Provider)?;
            let ciphertext = to
                .encrypt(&plaintext, wrap)
                .await
                .map_err(LifecycleError::Provider)?;
            let record = TenantKeyRecord {
                binding: target.to_owned(),
                provider_key_version: ciphertext.key_version,
                wrapped: ciphertext.bytes,
                updated_at_ms: now_ms(),
                ..version.clone()
            };
            if self.move_version(&version.binding, &record).await? {
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Moves one version to the recorded target, if it is still under
    /// `from` and that change is still the one recorded.
    async fn move_version(
        &self,
        from: &str,
        key: &TenantKeyRecord,
    ) -> Result<bool, LifecycleError> {
        let Some(mut tx) = self.registry().lock_tenant(&key.tenant_id).await? else {
            return Ok(false);
        };
        if tx.tenant().reencrypt_to.as_deref() != Some(key.binding.as_str()) {
            return Ok(false);
        }
        let moved = tx.rewrap_version(from, key).await?;
        // Progress is visible (and a stalled change tells apart).
        tx.write_tenant(now_ms()).await?;
        tx.commit().await?;
        self.directory.changed(&key.tenant_id, None).await;
        Ok(moved)
    }

    async fn finish(&self, tenant_id: &str, target: &str) -> Result<Finished, LifecycleError> {
        let Some(mut tx) = self.registry().lock_tenant(tenant_id).await? else {
            return Ok(Finished::Done);
        };
        if tx.tenant().reencrypt_to.as_deref() != Some(target) {
            return Ok(Finished::Done);
        }
        if tx.versions().await?.iter().any(|v| v.binding != target) {
            return Ok(Finished::Left);
        }
        let now = now_ms();
        let disable = tx.tenant_mut().reencrypt_then_disable.take();
        let reason = std::mem::take(&mut tx.tenant_mut().reencrypt_disable_reason);
        if let Some(name) = &disable
            && tx.bindings().await?.iter().any(|b| b.name == *name)
        {
            tx.set_state(name, BindingState::Disabled, &reason, now)
                .await?;
            if tx.tenant().key_hierarchy == KeyHierarchy::Direct {
                // Its directly wrapped DEKs are the callers' to move:
                // RewrapKey still reads it until the operator is done.
                tx.tenant_mut().reencrypt_from = Some(name.clone());
            }
        }
        let t = tx.tenant_mut();
        t.reencrypt_to = None;
        t.reencrypt_last = Some(target.to_owned());
        tx.write_tenant(now).await?;
        tx.commit().await?;
        self.directory.changed(tenant_id, disable.as_deref()).await;
        Ok(Finished::Done)
    }

    /// Finishes key changes a crash interrupted: all of them (at start), or
    /// those nobody moved for a minute (`stalled_only`, periodically).
    pub async fn resume_key_changes(&self, stalled_only: bool) -> Result<usize, LifecycleError> {
        let pending = self.registry().tenants_reencrypting().await?;
        let mut finished = 0;
        let stale_before = now_ms().saturating_sub(STALLED_MS);
        for tenant in pending {
            if stalled_only && tenant.updated_at_ms > stale_before {
                continue;
            }
            let Some(target) = tenant.reencrypt_to.clone() else {
                continue;
            };
            match self.drive(&tenant.id, &target).await {
                Ok(_) => finished += 1,
                Err(err) => tracing::warn!(
                    tenant = %tenant.id,
                    error = %err,
                    "could not finish a key change; it resumes later"
                ),
            }
        }
        Ok(finished)
    }

    /// Records that a `direct` tenant's DEKs are off the key RewrapKey
    /// still read: it refuses RewrapKey too from now on.
    pub async fn finish_direct_move(&self, tenant_id: &str) -> Result<(), LifecycleError> {
        let Some(mut tx) = self.registry().lock_tenant(tenant_id).await? else {
            return Err(RegistryError::TenantNotFound(tenant_id.to_owned()).into());
        };
        let from = tx.tenant_mut().reencrypt_from.take();
        if from.is_some() {
            tx.write_tenant(now_ms()).await?;
            tx.commit().await?;
            self.directory.changed(tenant_id, from.as_deref()).await;
        }
        Ok(())
    }
}

/// Refuses a change to a tenant whose deletion is scheduled.
pub fn refuse_if_deleting(tenant: &Tenant) -> Result<(), LifecycleError> {
    match tenant.delete_at_ms {
        Some(at) => Err(RegistryError::Refused(format!(
            "tenant '{}' is scheduled for deletion at {}; cancel it first (CancelTenantDeletion)",
            tenant.id,
            crate::text::rfc3339(at)
        ))
        .into()),
        None => Ok(()),
    }
}

/// A version under a key revoked at its provider cannot be read to move:
/// a change would stall half done until the customer restores the key,
/// with new DEKs already going to the target.
fn refuse_revoked_sources(
    tenant_id: &str,
    bindings: &[crate::registry::BindingRecord],
    versions: &[TenantKeyRecord],
    target: &str,
) -> Result<(), RegistryError> {
    match bindings.iter().find(|b| {
        b.state == BindingState::Revoked
            && b.name != target
            && versions.iter().any(|v| v.binding == b.name)
    }) {
        Some(revoked) => Err(RegistryError::Refused(format!(
            "key '{}' of tenant '{tenant_id}' is revoked at its provider ({}); the tenant key versions it wraps cannot move to another key until the customer restores keybroker's access to it",
            revoked.name, revoked.state_reason
        ))),
        None => Ok(()),
    }
}
