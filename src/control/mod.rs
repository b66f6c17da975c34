//! The control plane, independent of gRPC: tenants, linking and importing
//! customer keys, primary selection, disable/enable, unlink. Validates input,
//! applies it to the registry, and keeps the data plane's view current
//! (through `RegistryDirectory::changed`: view invalidation, DEK purges).
//!
//! One job past 600 lines: `Admin` and the per-tenant operations that are a
//! few lines each (tenant, policy, primary, disable/enable, unlink,
//! delete); linking, imports, key changes, retirement and the watcher have
//! their own files.

pub mod access_log;
pub mod import_wrap;
mod imported;
mod key_change;
mod link;
mod onboarding;
mod retirement;
pub mod rotation;
mod validation;
mod verification;
pub mod watcher;

use std::sync::Arc;
use std::time::Duration;

pub use self::key_change::Reencryption;
pub use self::onboarding::Onboarding;
pub use self::retirement::{RetireTarget, Retired, VersionUsageView};
pub use self::validation::{BindingName, decode_key_material, validate_name};
use self::validation::{validate_description, validate_tenant};
use self::verification::{Ownership, canary_envelope, probe_wrap, verify_provider};
pub use crate::context::TenantId;
use crate::keys::canary_context;
use crate::keys::{BindingState, DirectoryError, KeyHierarchy, UsageCounts, now_ms};
use crate::kms::{InvalidIdentifier, ProviderError, ProviderKind};
use crate::lifecycle::{Lifecycle, LifecycleError, Scheduled};
use crate::registry::directory::{RegistryDirectory, seal_material};
use crate::registry::{BindingRecord, KeyPolicy, NewBinding, RegistryError, Tenant, UnlinkGuard};
use crate::secret::SecretBytes;

/// Why a control-plane call failed. Mapped to a gRPC status in `api::status`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// The provider could not verify the key: what the customer must fix.
    #[error("key verification failed: {0}")]
    Verification(String),
    /// The provider failed while verifying: keeps its kind, so an outage is
    /// UNAVAILABLE (retry) and a refusal is what the customer must fix.
    #[error("key verification failed: {0}")]
    Provider(ProviderError),
    /// Valid, but the tenant's state forbids it now (a key change under
    /// way, a primary disabled without a re-encryption target).
    #[error("{0}")]
    Refused(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<LifecycleError> for AdminError {
    fn from(err: LifecycleError) -> Self {
        match err {
            LifecycleError::Registry(e) => Self::Registry(e),
            LifecycleError::Directory(e) => Self::Directory(e),
            LifecycleError::Provider(e) => Self::Provider(e),
            LifecycleError::Internal(e) => Self::Internal(e),
        }
    }
}

impl From<InvalidIdentifier> for AdminError {
    fn from(err: InvalidIdentifier) -> Self {
        Self::InvalidArgument(err.0)
    }
}

/// The control plane's settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct AdminSettings {
    /// ARN of the platform's AWS identity that customers' trust policies name.
    #[arg(
        id = "aws_platform_principal",
        long = "aws-platform-principal",
        env = "KEYBROKER_AWS_PLATFORM_PRINCIPAL"
    )]
    pub aws_platform_principal: Option<String>,
    /// The platform's GCP service account customers grant on their keys.
    #[arg(
        id = "gcp_service_account",
        long = "gcp-service-account",
        env = "KEYBROKER_GCP_SERVICE_ACCOUNT"
    )]
    pub gcp_service_account: Option<String>,
    /// UnlinkKey is refused for a key used within this window unless forced.
    #[arg(id = "unlink_guard_window", long = "unlink-guard-window", env = "KEYBROKER_UNLINK_GUARD_WINDOW", value_parser = humantime::parse_duration, default_value = "24h")]
    pub unlink_guard_window: Duration,
    /// Imported key material whose newest version is older than this is
    /// reported due for rotation (GetKey, ListKeys, a log line): keybroker
    /// never replaces a customer's material itself; the customer imports a
    /// new version (ImportKeyMaterial with new_version). 0s never reminds.
    #[arg(id = "imported_key_rotation_period", long = "imported-key-rotation-period", env = "KEYBROKER_IMPORTED_KEY_ROTATION_PERIOD", value_parser = humantime::parse_duration, default_value = "365days")]
    pub imported_key_rotation_period: Duration,
    /// How long an import token (GetImportParameters) can be redeemed.
    #[arg(id = "import_token_ttl", long = "import-token-ttl", env = "KEYBROKER_IMPORT_TOKEN_TTL", value_parser = humantime::parse_duration, default_value = "24h")]
    pub import_token_ttl: Duration,
}

impl Default for AdminSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

/// A binding with its live usage (stored counts plus unflushed ones).
#[derive(Debug, Clone)]
pub struct KeyView {
    pub record: BindingRecord,
    /// Filled by GetKey and ListKeys (0 and empty elsewhere).
    pub min_decryption_version: u32,
    pub versions: Vec<VersionUsageView>,
    /// Imported material: when its newest version is due for rotation
    /// (`imported_key_rotation_period` after it was imported).
    pub next_rotation_ms: Option<i64>,
}

impl KeyView {
    pub fn rotation_due(&self) -> bool {
        self.next_rotation_ms.is_some_and(|at| at <= now_ms())
    }
}

/// Fields of a key to link or import, as given by the caller.
#[derive(Debug, Clone)]
pub struct LinkRequest {
    pub tenant_id: TenantId,
    pub name: BindingName,
    pub description: String,
    pub provider: Option<ProviderKind>,
    pub key_reference: String,
    pub region: String,
    pub role_arn: String,
    pub service_account: String,
    pub replica_regions: Vec<String>,
    pub make_primary: bool,
    /// Vault/OpenBao: the AppRole keybroker logs in with.
    pub vault: Option<VaultAppRole>,
    /// Vault/OpenBao, instead: a jwt auth role trusting the platform's
    /// identity token.
    pub vault_jwt: Option<VaultJwtRole>,
    /// Azure: the customer's Entra tenant id (stored in the binding's
    /// identity column, as AWS keeps its role there).
    pub azure_tenant_id: String,
}

impl LinkRequest {
    /// A request for `name` of `tenant_id`, every other field empty.
    pub fn new(tenant_id: TenantId, name: BindingName) -> Self {
        Self {
            tenant_id,
            name,
            description: String::new(),
            provider: None,
            key_reference: String::new(),
            region: String::new(),
            role_arn: String::new(),
            service_account: String::new(),
            replica_regions: Vec::new(),
            make_primary: false,
            vault: None,
            vault_jwt: None,
            azure_tenant_id: String::new(),
        }
    }
}

/// An AppRole in a customer's Vault; the secret_id is zeroized and never
/// printed.
#[derive(Clone, Debug)]
pub struct VaultAppRole {
    pub mount: String,
    pub role_id: String,
    pub secret_id: secrecy::SecretString,
}

/// A role of the jwt auth method in a customer's Vault.
#[derive(Clone, Debug, Default)]
pub struct VaultJwtRole {
    pub mount: String,
    pub role: String,
}

#[derive(Debug)]
pub struct Admin {
    lifecycle: Arc<Lifecycle>,
    directory: Arc<RegistryDirectory>,
    settings: AdminSettings,
    /// The restore window of DeleteTenant when a call names none.
    deletion_window: Duration,
}

impl Admin {
    pub fn new(
        lifecycle: Arc<Lifecycle>,
        settings: AdminSettings,
        deletion_window: Duration,
    ) -> Self {
        Self {
            directory: Arc::clone(lifecycle.directory()),
            lifecycle,
            settings,
            deletion_window,
        }
    }

    /// The tenant-key lifecycle (tests drive it directly).
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    fn registry(&self) -> &Arc<dyn crate::registry::Registry> {
        self.directory.registry()
    }

    /// The data plane's view of the registry (tests count its rechecks).
    pub fn directory(&self) -> &Arc<RegistryDirectory> {
        &self.directory
    }

    pub async fn create_tenant(
        &self,
        tenant_id: &TenantId,
        policy: Option<KeyPolicy>,
        hierarchy: Option<KeyHierarchy>,
        newest_import_primary: bool,
    ) -> Result<Tenant, AdminError> {
        Ok(self
            .lifecycle
            .create_tenant(
                tenant_id,
                policy.unwrap_or(KeyPolicy::Keyring),
                hierarchy.unwrap_or_default(),
                newest_import_primary,
            )
            .await?)
    }

    /// The tenant, refused while its deletion is scheduled: nothing about
    /// its keys changes during the restore window (cancel it first).
    pub(crate) async fn live_tenant(&self, tenant_id: &str) -> Result<Tenant, AdminError> {
        let tenant = self.tenant(tenant_id).await?;
        crate::lifecycle::refuse_if_deleting(&tenant)?;
        Ok(tenant)
    }

    /// The tenant of an id already checked (a [`TenantId`], or one the
    /// registry holds).
    pub async fn tenant(&self, tenant_id: &str) -> Result<Tenant, AdminError> {
        self.registry()
            .tenant(tenant_id)
            .await?
            .ok_or_else(|| RegistryError::TenantNotFound(tenant_id.to_owned()).into())
    }

    pub async fn set_policy(
        &self,
        tenant_id: &TenantId,
        policy: KeyPolicy,
    ) -> Result<Tenant, AdminError> {
        self.live_tenant(tenant_id).await?;
        // Usage decides whether single_key → keyring is allowed.
        self.flush_usage().await?;
        let tenant = self
            .registry()
            .set_key_policy(tenant_id, policy, now_ms())
            .await?;
        self.directory.changed(tenant_id, None).await;
        Ok(tenant)
    }

    /// Replaces the tenant's access policy; every replica applies it within
    /// the revocation bound (the change feed, or the view TTL at worst).
    pub async fn set_access_policy(
        &self,
        tenant_id: &TenantId,
        policy: &crate::access::AccessPolicy,
    ) -> Result<Tenant, AdminError> {
        self.live_tenant(tenant_id).await?;
        let tenant = self
            .registry()
            .set_access_policy(tenant_id, policy, now_ms())
            .await?;
        self.directory.changed(tenant_id, None).await;
        tracing::info!(tenant = tenant_id.as_str(), policy = %policy, "tenant access policy set");
        Ok(tenant)
    }

    pub fn onboarding(&self, tenant: &Tenant) -> Onboarding {
        let azure = self.directory.azure().ok().map(|a| a.settings());
        let vault = self.directory.vault().ok();
        let issuer = vault.as_ref().and_then(|v| v.issuer()).map(|i| i.as_ref());
        onboarding::onboarding(&self.settings, azure, issuer, tenant)
    }

    pub async fn list_keys(&self, tenant_id: &TenantId) -> Result<Vec<KeyView>, AdminError> {
        self.tenant(tenant_id).await?;
        // Counts read after a flush are exact; later uses are added by `view`.
        self.flush_usage().await?;
        let mut views = Vec::new();
        for record in self.registry().bindings(tenant_id).await? {
            views.push(self.with_versions(self.view(record)).await?);
        }
        Ok(views)
    }

    /// Adds the key's minimum decryption version and per-version usage.
    async fn with_versions(&self, mut view: KeyView) -> Result<KeyView, AdminError> {
        let (min, versions) = self
            .version_usage(&view.record.tenant_id, &view.record.name)
            .await?;
        view.min_decryption_version = min;
        view.versions = versions;
        Ok(view)
    }

    pub async fn get_key(&self, tenant_id: &TenantId, name: &str) -> Result<KeyView, AdminError> {
        self.flush_usage().await?;
        let record = self
            .registry()
            .binding(tenant_id, name)
            .await?
            .ok_or_else(|| not_found(tenant_id, name))?;
        self.with_versions(self.view(record)).await
    }

    pub async fn set_primary(
        &self,
        tenant_id: &TenantId,
        name: &str,
    ) -> Result<KeyView, AdminError> {
        // Makes it primary and moves tenant key versions, never DEKs.
        self.change_key(tenant_id, name, None).await?;
        let record = self
            .registry()
            .binding(tenant_id, name)
            .await?
            .ok_or_else(|| not_found(tenant_id, name))?;
        Ok(self.view(record))
    }

    pub async fn disable_key(
        &self,
        tenant_id: &TenantId,
        name: &str,
        reason: &str,
        reencrypt_to: Option<&str>,
    ) -> Result<KeyView, AdminError> {
        validate_description(reason)?;
        let reason = if reason.is_empty() {
            "disabled by an operator"
        } else {
            reason
        };
        let tenant = self.live_tenant(tenant_id).await?;
        let record = self
            .registry()
            .binding(tenant_id, name)
            .await?
            .ok_or_else(|| not_found(tenant_id, name))?;
        match reencrypt_to {
            Some(target) if target == name => {
                return Err(AdminError::InvalidArgument(format!(
                    "reencrypt_to names the key being disabled ('{name}'); name another key or `platform`"
                )));
            }
            Some(target) => {
                if target != crate::keys::PLATFORM_BINDING {
                    validate_name(target)?;
                } else if !record.primary
                    && let Some(primary) = self
                        .registry()
                        .bindings(tenant_id)
                        .await?
                        .into_iter()
                        .find(|b| b.primary && b.state == BindingState::Active)
                {
                    // Back to the platform key is a change of the key new
                    // wraps go under: that is the primary's to make.
                    return Err(AdminError::Refused(format!(
                        "reencrypt_to `platform` moves tenant '{tenant_id}' back to the platform key, but key '{name}' is not \
                         its primary ('{}' is): disable '{}' with reencrypt_to `platform` for that, or disable '{name}' without reencrypt_to",
                        primary.name, primary.name
                    )));
                }
                let reason = match tenant.key_hierarchy {
                    KeyHierarchy::TenantKey => reason.to_owned(),
                    // The DEKs it wrapped directly are the callers': until
                    // the operator says they are moved, RewrapKey still
                    // reads this key.
                    KeyHierarchy::Direct => format!(
                        "{reason}; being re-encrypted to '{target}': RewrapKey still reads it until DisableKey is repeated without reencrypt_to"
                    ),
                };
                // Disabled by the transaction that finishes the change, so
                // nothing it protects is refused while it moves.
                self.change_key(tenant_id, target, Some((name.to_owned(), reason)))
                    .await?;
                let record = self
                    .registry()
                    .binding(tenant_id, name)
                    .await?
                    .ok_or_else(|| not_found(tenant_id, name))?;
                return Ok(self.view(record));
            }
            // A direct tenant's move away from this key is finished: it
            // now refuses RewrapKey too.
            None if tenant.reencrypt_from.as_deref() == Some(name) => {
                self.lifecycle.finish_direct_move(tenant_id).await?;
            }
            // Keyring tenants would fall back to the platform key when their
            // primary is disabled: never silently. (A single_key tenant's
            // new wraps fail instead, which is what disabling it means.)
            None if record.primary
                && record.state == BindingState::Active
                && tenant.key_policy == KeyPolicy::Keyring =>
            {
                return Err(AdminError::Refused(format!(
                    "key '{name}' is the primary key of tenant '{tenant_id}'; disabling it would silently move new \
                     wraps elsewhere. Give reencrypt_to: the key (or `platform`) that takes over"
                )));
            }
            None => {}
        }
        let record = self
            .registry()
            .set_state(tenant_id, name, BindingState::Disabled, reason, now_ms())
            .await?;
        self.directory.changed(tenant_id, Some(name)).await;
        Ok(self.view(record))
    }

    /// Clears a `direct` tenant's record of a key its DEKs were moving away
    /// from.
    async fn finish_direct_move(&self, tenant_id: &str) -> Result<(), AdminError> {
        Ok(self.lifecycle.finish_direct_move(tenant_id).await?)
    }

    pub async fn enable_key(
        &self,
        tenant_id: &TenantId,
        name: &str,
    ) -> Result<KeyView, AdminError> {
        let tenant = self.live_tenant(tenant_id).await?;
        let current = self
            .registry()
            .binding(tenant_id, name)
            .await?
            .ok_or_else(|| RegistryError::BindingNotFound {
                tenant_id: tenant_id.to_string(),
                name: name.to_owned(),
            })?;
        if current.state == BindingState::Revoked
            || (current.state == BindingState::Disabled && current.provider != ProviderKind::Local)
        {
            // Confirmed at the provider first: a key the customer took
            // away there (or whose decrypt right they removed) would
            // otherwise be served from caches until the watcher's next
            // pass, and only a check may restore a revoked one.
            match self
                .directory
                .check_binding(&current, &tenant.external_id)
                .await
            {
                crate::registry::Verdict::Usable => {}
                crate::registry::Verdict::Revoked(reason) => {
                    return Err(AdminError::Refused(format!(
                        "key '{name}' of tenant '{tenant_id}' is unusable at its provider ({reason}); the customer restores keybroker's access there (enable the key, grant decrypt), then EnableKey again; keybroker also restores a revoked key at its next check"
                    )));
                }
                crate::registry::Verdict::Outage => {
                    return Err(AdminError::Provider(ProviderError::Unavailable(format!(
                        "could not reach the provider of key '{name}' to confirm it is usable; retry"
                    ))));
                }
            }
        }
        if tenant.reencrypt_from.as_deref() == Some(name) {
            self.finish_direct_move(tenant_id).await?;
        }
        let record = self
            .registry()
            .set_state(tenant_id, name, BindingState::Active, "", now_ms())
            .await?;
        self.directory.changed(tenant_id, None).await;
        Ok(self.view(record))
    }

    /// Unlinks a key; the tenant key versions it wraps are destroyed with
    /// it (`crate::lifecycle`'s unlink says when that is refused).
    pub async fn unlink_key(
        &self,
        tenant_id: &TenantId,
        name: &str,
        force: bool,
    ) -> Result<crate::lifecycle::Unlinked, AdminError> {
        // The guard must see every use, including those not flushed yet.
        self.flush_usage().await?;
        Ok(self
            .lifecycle
            .unlink(tenant_id, name, self.guard(force))
            .await?)
    }

    /// Refuse what was used within the unlink guard window, unless forced.
    fn guard(&self, force: bool) -> UnlinkGuard {
        let window =
            i64::try_from(self.settings.unlink_guard_window.as_millis()).unwrap_or(i64::MAX);
        UnlinkGuard {
            not_used_since_ms: now_ms().saturating_sub(window),
            force,
        }
    }

    /// Changes a key's description (Kong: keys are renamed and described
    /// after the fact).
    pub async fn update_key(
        &self,
        tenant_id: &TenantId,
        name: &str,
        description: &str,
    ) -> Result<KeyView, AdminError> {
        validate_description(description)?;
        self.live_tenant(tenant_id).await?;
        let record = self
            .registry()
            .set_description(tenant_id, name, description, now_ms())
            .await?;
        self.directory.changed(tenant_id, None).await;
        Ok(self.view(record))
    }

    /// Schedules the deletion of a tenant: refused on every replica from
    /// now on, its keys destroyed when `window` (the server's
    /// `deletion_window` when `None`; zero: now) is over, unless cancelled.
    pub async fn delete_tenant(
        &self,
        tenant_id: &TenantId,
        force: bool,
        window: Option<Duration>,
    ) -> Result<Scheduled, AdminError> {
        // The guard must see every use, including those not flushed yet.
        self.flush_usage().await?;
        Ok(self
            .lifecycle
            .schedule_deletion(
                tenant_id,
                window.unwrap_or(self.deletion_window),
                self.guard(force),
            )
            .await?)
    }

    /// Cancels a scheduled deletion (before its time).
    pub async fn cancel_deletion(&self, tenant_id: &TenantId) -> Result<Tenant, AdminError> {
        Ok(self.lifecycle.cancel_deletion(tenant_id).await?)
    }

    pub async fn flush_usage(&self) -> Result<(), AdminError> {
        Ok(self.directory.flush_usage().await?)
    }

    /// Adds unflushed usage to the stored counts.
    fn view(&self, mut record: BindingRecord) -> KeyView {
        let pending: UsageCounts = self
            .directory
            .pending_usage(&record.tenant_id, &record.name);
        record.wrap_count += pending.wraps;
        record.unwrap_count += pending.unwraps;
        if pending.last_used_ms > 0 {
            record.last_used_at_ms = Some(
                record
                    .last_used_at_ms
                    .map_or(pending.last_used_ms, |l| l.max(pending.last_used_ms)),
            );
        }
        let period = i64::try_from(self.settings.imported_key_rotation_period.as_millis())
            .unwrap_or(i64::MAX);
        // Only imported key material rotates by import; a Vault binding's
        // sealed AppRole secret_id is not key material.
        let next_rotation_ms = record
            .material_updated_at_ms
            .filter(|_| period > 0 && record.provider == ProviderKind::Local)
            .map(|at| at.saturating_add(period));
        KeyView {
            record,
            min_decryption_version: 0,
            versions: Vec::new(),
            next_rotation_ms,
        }
    }
}

fn not_found(tenant_id: &str, name: &str) -> AdminError {
    RegistryError::BindingNotFound {
        tenant_id: tenant_id.to_owned(),
        name: name.to_owned(),
    }
    .into()
}
