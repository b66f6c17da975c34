//! The tenant-key lifecycle (DESIGN.md sections 4a and 4b): the one module
//! that writes tenant key versions and the tenant columns that decide them.
//! Every transition is one registry transaction holding the tenant's lock,
//! and checks what it relies on inside it:
//!
//! - **mint** ([`Lifecycle::mint`]): a version the data plane made is stored
//!   only if the tenant is still as the view that planned it saw it (same
//!   incarnation and key epoch, the number is the registry's next, and the
//!   sealing rule, [`crate::keys::sealing_binding`], still names the binding
//!   that wrapped it, active). So nothing is minted under a key a change is
//!   moving away from, and no number is ever used twice.
//! - **re-encrypt** (`change`): a key change is recorded (target, new
//!   epoch) before anything moves, each version moves by compare-and-set,
//!   and it is marked done only by a transaction that finds no version left
//!   behind; a crash resumes it.
//! - **orphan** (`unlink`): unlinking a key destroys the versions it wraps in
//!   the same transaction; nothing is left that no binding can open.
//! - **shred** (`deletion`): DeleteTenant schedules; at the end of the
//!   restore window the tenant's rows go for good, a tombstone keeps its
//!   incarnation, and the database is compacted so the bytes are gone.
//!
//! The data plane reaches this module through [`KeyDirectory`], which
//! [`Lifecycle`] implements on top of the registry's views.

mod change;
mod deletion;
mod unlink;

use std::sync::Arc;

use async_trait::async_trait;

pub use self::change::{Change, ChangeStatus, refuse_if_deleting};
pub use self::deletion::{DeletionSettings, Scheduled, Shredder};
pub use self::unlink::Unlinked;
use crate::keys::{
    BindingState, Confirmation, DirectoryError, KeyDirectory, Minted, NewTenantKey,
    PLATFORM_BINDING, TenantKeys, now_ms, sealing_binding,
};
use crate::kms::{KeyProvider, ProviderError};
use crate::registry::directory::RegistryDirectory;
use crate::registry::{BindingRecord, KeyPolicy, Registry, RegistryError, Tenant, TenantKeyRecord};
use crate::secret::SecretBytes;

/// Why a lifecycle transition failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LifecycleError {
    /// The registry refused (not found, exists, refused by policy) or failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// A key provider failed while re-encrypting tenant key versions.
    #[error("{0}")]
    Provider(ProviderError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<LifecycleError> for DirectoryError {
    fn from(err: LifecycleError) -> Self {
        match err {
            LifecycleError::Directory(e) => e,
            LifecycleError::Registry(e) => e.into(),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// The tenant-key state machine over the registry and its views.
#[derive(Debug)]
pub struct Lifecycle {
    directory: Arc<RegistryDirectory>,
}

impl Lifecycle {
    pub fn new(directory: Arc<RegistryDirectory>) -> Self {
        Self { directory }
    }

    pub fn directory(&self) -> &Arc<RegistryDirectory> {
        &self.directory
    }

    fn registry(&self) -> &Arc<dyn Registry> {
        self.directory.registry()
    }

    /// Creates a tenant, or adopts the one a first wrap registered
    /// implicitly (its key versions, and so its DEKs, stay).
    pub async fn create_tenant(
        &self,
        tenant_id: &str,
        policy: KeyPolicy,
        hierarchy: crate::keys::KeyHierarchy,
        newest_import_primary: bool,
    ) -> Result<Tenant, LifecycleError> {
        if let Some(mut tx) = self.registry().lock_tenant(tenant_id).await? {
            let existing = tx.tenant();
            if let Some(at) = existing.delete_at_ms {
                return Err(RegistryError::Refused(format!(
                    "tenant '{tenant_id}' is scheduled for deletion at {}; cancel it (CancelTenantDeletion) to keep it, or wait until then to create it anew",
                    crate::text::rfc3339(at)
                ))
                .into());
            }
            if !existing.implicit {
                return Err(RegistryError::TenantExists(tenant_id.to_owned()).into());
            }
            let t = tx.tenant_mut();
            t.implicit = false;
            t.key_policy = policy;
            t.key_hierarchy = hierarchy;
            t.newest_import_primary = newest_import_primary;
            tx.write_tenant(now_ms()).await?;
            let tenant = tx.tenant().clone();
            tx.commit().await?;
            self.directory.changed(tenant_id, None).await;
            return Ok(tenant);
        }
        let mut tenant = Tenant::new(tenant_id, new_external_id()?, now_ms());
        tenant.key_policy = policy;
        tenant.key_hierarchy = hierarchy;
        tenant.newest_import_primary = newest_import_primary;
        self.registry().create_tenant(&tenant).await?;
        self.directory.changed(tenant_id, None).await;
        Ok(self
            .registry()
            .tenant(tenant_id)
            .await?
            .ok_or_else(|| RegistryError::TenantNotFound(tenant_id.to_owned()))?)
    }

    /// A tenant nobody created, registered by its first wrap: served by the
    /// platform key through a tenant key of its own. Racing replicas create
    /// it once.
    pub async fn register_on_wrap(&self, tenant_id: &str) -> Result<(), LifecycleError> {
        let mut tenant = Tenant::new(tenant_id, new_external_id()?, now_ms());
        tenant.implicit = true;
        match self.registry().create_tenant(&tenant).await {
            Ok(()) => {
                tracing::info!(
                    tenant = %crate::text::Escaped(tenant_id),
                    "registered a tenant on its first wrap (platform key, own tenant key)"
                );
            }
            Err(RegistryError::TenantExists(_)) => {}
            Err(err) => return Err(err.into()),
        }
        self.directory.changed(tenant_id, None).await;
        Ok(())
    }

    /// Stores a version the data plane minted, if the tenant is still as
    /// planned (see the module doc); the view is stale either way.
    pub async fn mint(&self, key: &NewTenantKey) -> Result<Minted, LifecycleError> {
        let outcome = self.try_mint(key).await;
        self.directory.changed(&key.tenant_id, None).await;
        outcome
    }

    async fn try_mint(&self, key: &NewTenantKey) -> Result<Minted, LifecycleError> {
        let Some(mut tx) = self.registry().lock_tenant(&key.tenant_id).await? else {
            return Ok(Minted::Stale);
        };
        let t = tx.tenant();
        if t.incarnation != key.incarnation
            || t.delete_at_ms.is_some()
            || t.key_epoch != key.epoch
            || t.next_key_version != key.version
        {
            return Ok(Minted::Stale);
        }
        let bindings = tx.bindings().await?;
        if sealing_target(tx.tenant(), &bindings) != Some(key.binding.as_str()) {
            return Ok(Minted::Stale);
        }
        let now = now_ms();
        let epoch = tx.tenant().key_epoch;
        tx.insert_version(&TenantKeyRecord {
            tenant_id: key.tenant_id.clone(),
            version: key.version,
            binding: key.binding.clone(),
            provider_key_version: key.provider_key_version.clone(),
            wrapped: key.wrapped.clone(),
            created_at_ms: now,
            updated_at_ms: now,
            epoch,
        })
        .await?;
        tx.tenant_mut().next_key_version = key.version.saturating_add(1);
        tx.write_tenant(now).await?;
        tx.commit().await?;
        tracing::info!(
            tenant = %key.tenant_id,
            version = key.version,
            binding = %key.binding,
            "minted a tenant key version"
        );
        Ok(Minted::Stored)
    }

    /// Replaces one version's wrapping by another under the same or a new
    /// binding, if it is still wrapped by `from` (retiring a provider key
    /// version re-wraps under its current one); `false` when it moved.
    pub async fn rewrap_version(
        &self,
        from: &str,
        key: &TenantKeyRecord,
    ) -> Result<bool, LifecycleError> {
        let Some(mut tx) = self.registry().lock_tenant(&key.tenant_id).await? else {
            return Ok(false);
        };
        let moved = tx.rewrap_version(from, key).await?;
        tx.commit().await?;
        if moved {
            self.directory.changed(&key.tenant_id, None).await;
        }
        Ok(moved)
    }

    /// The provider of a binding of `tenant` by name (`platform` included).
    pub(crate) async fn provider_named(
        &self,
        tenant: &Tenant,
        name: &str,
    ) -> Result<Arc<dyn KeyProvider>, LifecycleError> {
        if name == PLATFORM_BINDING {
            return Ok(Arc::clone(self.directory.platform_keyring()) as Arc<dyn KeyProvider>);
        }
        let record = self
            .registry()
            .binding(&tenant.id, name)
            .await?
            .ok_or_else(|| RegistryError::BindingNotFound {
                tenant_id: tenant.id.clone(),
                name: name.to_owned(),
            })?;
        Ok(self
            .directory
            .provider(&record, &tenant.external_id)
            .await?)
    }
}

/// The binding new versions must be wrapped by now, if it can wrap:
/// [`sealing_binding`] over the stored rows, `None` when that binding is
/// not active (revoked, or a single_key tenant's disabled key).
pub(crate) fn sealing_target<'a>(
    tenant: &'a Tenant,
    bindings: &'a [BindingRecord],
) -> Option<&'a str> {
    let primary = bindings.iter().find(|b| b.primary);
    let name = sealing_binding(
        tenant.reencrypt_to.as_deref(),
        primary.map(|b| (b.name.as_str(), b.state)),
        tenant.key_policy == KeyPolicy::SingleKey,
    );
    if name == PLATFORM_BINDING {
        return Some(name);
    }
    bindings
        .iter()
        .find(|b| b.name == name && b.state == BindingState::Active)
        .map(|b| b.name.as_str())
}

/// A fresh external ID for a tenant's AWS trust policy.
pub fn new_external_id() -> Result<String, LifecycleError> {
    let bytes = SecretBytes::random(16)
        .map_err(|_| LifecycleError::Internal("system random generator failed".into()))?;
    Ok(format!("kb-{}", hex::encode(bytes.expose())))
}

#[async_trait]
impl KeyDirectory for Lifecycle {
    async fn tenant_keys(&self, tenant_id: &str) -> Result<Arc<TenantKeys>, DirectoryError> {
        self.directory.tenant_keys(tenant_id).await
    }

    fn tenant_keys_in_memory(
        &self,
        tenant_id: &str,
        now: std::time::Instant,
    ) -> Option<Arc<TenantKeys>> {
        self.directory.tenant_keys_in_memory(tenant_id, now)
    }

    async fn mint_tenant_key(&self, key: &NewTenantKey) -> Result<Minted, DirectoryError> {
        self.directory.data_path_write(self.mint(key)).await
    }

    async fn register_on_wrap(&self, tenant_id: &str) -> Result<(), DirectoryError> {
        self.directory
            .data_path_write(Lifecycle::register_on_wrap(self, tenant_id))
            .await
    }

    async fn confirm_failure(
        &self,
        tenant_id: &str,
        binding: &str,
        error: &ProviderError,
    ) -> Confirmation {
        self.directory
            .confirm_failure(tenant_id, binding, error)
            .await
    }
}
