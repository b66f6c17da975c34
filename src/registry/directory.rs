//! The data plane's view of the registry: each tenant's keys, built once from
//! the database and kept in memory, so an unwrap never waits on a database
//! round trip. Admin changes in this process invalidate a tenant at once;
//! changes made by other replicas show within `registry_cache_ttl`.
//!
//! Also owns the usage counters of every binding and flushes them to the
//! registry periodically (never per request).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use moka::future::Cache;

use super::material::unusable;
pub use super::material::{
    MATERIAL_VERSION_LEN, aws_target, azure_key, gcp_target, material_versions, open_material,
    seal_material, vault_target,
};
use super::views::{ViewSettings, Views};
use super::{BindingRecord, FLEET, KeyPolicy, Registry};
use crate::cache::DekCache;
use crate::keys::{
    Binding, BindingState, BindingUsage, Confirmation, DirectoryError, KeyHierarchy,
    PLATFORM_BINDING, TENANT_KEY_USAGE, TenantKeyVersion, TenantKeys, TenantLife, sealing_binding,
};
use crate::kms::ProviderError;
use crate::kms::aws::AwsKms;
use crate::kms::azure::AzureKeyVault;
use crate::kms::gcp::GcpKms;
use crate::kms::local::LocalKeyring;
use crate::kms::pkcs11::Pkcs11Hsm;
use crate::kms::vault::VaultTransit;
use crate::kms::{KeyProvider, ProviderKind};

pub(super) type UsageKey = (String, String);

/// A change naming this "binding" purges every cached key of the tenant
/// (`#` is in no binding name).
pub(super) const ALL_BINDINGS: &str = "#all";

#[derive(Debug)]
pub struct RegistryDirectory {
    pub(super) registry: Arc<dyn Registry>,
    pub(super) platform: Arc<Binding>,
    /// Decrypts imported key material stored in the registry.
    platform_keyring: Arc<LocalKeyring>,
    /// Whether legacy-layout wraps under imported material are read.
    legacy_wraps: crate::kms::local::LegacyWraps,
    /// Shared AWS sessions and clients for `aws-kms` bindings.
    aws: Arc<AwsKms>,
    /// Shared Cloud KMS clients for `gcp-kms` bindings.
    gcp: Arc<GcpKms>,
    /// Vault/OpenBao logins for `vault-transit` bindings (absent: the
    /// server was assembled without Vault support).
    vault: Option<Arc<VaultTransit>>,
    /// The platform's PKCS#11 module for `pkcs11` bindings (absent: no
    /// `pkcs11_module` configured).
    pkcs11: Option<Arc<Pkcs11Hsm>>,
    /// Entra credentials and Key Vault clients for `azure-kv` bindings
    /// (absent: the server was assembled without Azure support).
    azure: Option<Arc<AzureKeyVault>>,
    /// The data plane's DEK cache, purged here when a binding changes.
    pub(super) cache: DekCache,
    /// Tenant views: one registry read per tenant per TTL, kept through a
    /// registry outage within a grace (see `views`).
    pub(super) views: Views,
    /// Usage counters by (tenant, binding). They outlive the tenant views,
    /// which are rebuilt on every change. A plain lock: held for a map lookup,
    /// never across an await.
    pub(super) usage: Mutex<HashMap<UsageKey, Arc<BindingUsage>>>,
    /// Verdicts of recent out-of-turn describes by (tenant, binding): moka
    /// runs one describe per binding for all concurrent callers, and the
    /// TTL (`recheck_min_interval`) rate-limits what forged requests can
    /// make the customer's KMS do (see `key_state`).
    verdicts: Cache<UsageKey, super::Verdict>,
    /// Out-of-turn describes made (tests and metrics).
    pub(crate) rechecks: std::sync::atomic::AtomicU64,
}

/// Default of `recheck_min_interval`.
pub const DEFAULT_RECHECK_INTERVAL: Duration = Duration::from_secs(1);

impl RegistryDirectory {
    pub fn new(
        registry: Arc<dyn Registry>,
        platform: Arc<Binding>,
        platform_keyring: Arc<LocalKeyring>,
        aws: Arc<AwsKms>,
        gcp: Arc<GcpKms>,
        cache: DekCache,
        views: ViewSettings,
    ) -> Self {
        Self {
            registry,
            platform,
            platform_keyring,
            aws,
            gcp,
            vault: None,
            pkcs11: None,
            azure: None,
            cache,
            views: Views::new(views),
            usage: Mutex::new(HashMap::new()),
            verdicts: verdict_cache(DEFAULT_RECHECK_INTERVAL),
            legacy_wraps: crate::kms::local::LegacyWraps::default(),
            rechecks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Serve `vault-transit` bindings through `vault`.
    pub fn with_vault(mut self, vault: Arc<VaultTransit>) -> Self {
        self.vault = Some(vault);
        self
    }

    /// Serve `azure-kv` bindings through `azure`.
    pub fn with_azure(mut self, azure: Arc<AzureKeyVault>) -> Self {
        self.azure = Some(azure);
        self
    }

    /// Serve `pkcs11` bindings through `hsm`.
    pub fn with_pkcs11(mut self, hsm: Option<Arc<Pkcs11Hsm>>) -> Self {
        self.pkcs11 = hsm;
        self
    }

    /// Reads or refuses legacy-layout wraps under imported material.
    pub fn with_legacy_wraps(mut self, legacy: crate::kms::local::LegacyWraps) -> Self {
        self.legacy_wraps = legacy;
        self
    }

    /// Reuse a recheck's verdict this long (the rate limit of out-of-turn
    /// describes per binding).
    pub fn with_recheck_interval(mut self, interval: Duration) -> Self {
        self.verdicts = verdict_cache(interval);
        self
    }

    pub(crate) fn verdicts(&self) -> &Cache<UsageKey, super::Verdict> {
        &self.verdicts
    }

    /// Out-of-turn describes made since start.
    pub fn rechecks(&self) -> u64 {
        self.rechecks.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    pub fn platform_keyring(&self) -> &Arc<LocalKeyring> {
        &self.platform_keyring
    }

    pub fn aws(&self) -> &Arc<AwsKms> {
        &self.aws
    }

    pub fn gcp(&self) -> &Arc<GcpKms> {
        &self.gcp
    }

    pub fn pkcs11(&self) -> Result<&Arc<Pkcs11Hsm>, DirectoryError> {
        self.pkcs11.as_ref().ok_or_else(|| {
            DirectoryError::Internal(
                "PKCS#11 keys need the server's pkcs11_module (and its PIN) configured".into(),
            )
        })
    }

    pub fn azure(&self) -> Result<&Arc<AzureKeyVault>, DirectoryError> {
        self.azure.as_ref().ok_or_else(|| {
            DirectoryError::Internal("this server was built without Azure support".into())
        })
    }

    pub fn vault(&self) -> Result<&Arc<VaultTransit>, DirectoryError> {
        self.vault.as_ref().ok_or_else(|| {
            DirectoryError::Internal("this server was built without Vault support".into())
        })
    }

    /// Sets a binding's provider-side state (revoked by the customer, or
    /// usable again) and applies it at once. Never touches a binding an
    /// operator disabled.
    pub async fn set_key_state(
        &self,
        record: &BindingRecord,
        state: BindingState,
        reason: &str,
    ) -> Result<bool, super::RegistryError> {
        let (tenant_id, name) = (record.tenant_id.as_str(), record.name.as_str());
        let unchanged = |current: &BindingRecord| {
            current.link_id != record.link_id
                || current.state == BindingState::Disabled
                || (current.state == state && current.state_reason == reason)
        };
        // Most verdicts change nothing: settled by a plain read, no lock.
        match self.registry.binding(tenant_id, name).await? {
            Some(current) if !unchanged(&current) => {}
            _ => return Ok(false),
        }
        // Under the tenant's lock, and only for the link that was checked:
        // an operator's DisableKey, or an unlink and a new link of the
        // name, committed while the check ran must not be overwritten.
        let Some(mut tx) = self.registry.lock_tenant(tenant_id).await? else {
            return Ok(false);
        };
        let bindings = tx.bindings().await?;
        match bindings.iter().find(|b| b.name == name) {
            Some(current) if !unchanged(current) => {}
            _ => return Ok(false),
        }
        tx.set_state(name, state, reason, crate::keys::now_ms())
            .await?;
        tx.commit().await?;
        self.changed(tenant_id, Some(name)).await;
        match state {
            BindingState::Revoked => {
                tracing::warn!(
                    tenant = tenant_id,
                    binding = name,
                    reason,
                    "key binding revoked by a describe of its key"
                )
            }
            _ => {
                tracing::info!(tenant = tenant_id, binding = name, state = %state, "key binding state changed")
            }
        }
        Ok(true)
    }

    /// Records a watcher check of a binding (for DescribeKey).
    pub fn record_check(&self, tenant_id: &str, name: &str) {
        self.usage_for(tenant_id, name)
            .last_checked_ms
            .store(crate::keys::now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The provider of a stored binding (the watcher describes through it).
    pub async fn provider(
        &self,
        record: &BindingRecord,
        external_id: &str,
    ) -> Result<Arc<dyn KeyProvider>, DirectoryError> {
        self.provider_for(record, external_id).await
    }

    async fn load(&self, tenant_id: &str) -> Result<Arc<TenantKeys>, DirectoryError> {
        // Before any read: a purge after this point makes what this view
        // loads stale, and a purge before it is already counted.
        let cache_generation = self.cache.generation(tenant_id);
        let platform = self.platform_view().await?;
        let Some(tenant) = self.registry.tenant(tenant_id).await? else {
            // Nobody registered it: the platform key serves it, and its
            // first wrap registers it with a tenant key of its own.
            let tombstone = self.registry.tombstone(tenant_id).await?;
            return Ok(Arc::new(TenantKeys {
                primary: Arc::clone(&platform),
                bindings: Vec::new(),
                platform,
                hierarchy: KeyHierarchy::TenantKey,
                versions: Vec::new(),
                reencrypt_to: None,
                reencrypt_from: None,
                min_tenant_key_version: 0,
                tenant_key_usage: Arc::default(),
                life: TenantLife {
                    legacy_deks: tombstone.is_none(),
                    registers_on_wrap: true,
                    next_version: 1,
                    cache_generation,
                    ..TenantLife::default()
                },
            }));
        };
        let retired = self.registry.retirements(tenant_id).await?;
        let min_of = |name: &str| {
            retired
                .iter()
                .find(|r| r.key_name == name)
                .map_or(0, |r| r.min_version)
        };

        let records = self.registry.bindings(tenant_id).await?;
        let mut bindings = Vec::with_capacity(records.len());
        for record in &records {
            bindings.push(Arc::new(Binding {
                name: record.name.as_str().into(),
                link_id: record.link_id,
                provider: self.provider_for(record, &tenant.external_id).await?,
                key_reference: record.key_reference.clone(),
                state: record.state,
                state_reason: record.state_reason.clone(),
                usage: self.usage_for(tenant_id, &record.name),
                min_decryption_version: min_of(&record.name),
                // The canary is a wrap the link made with the key itself.
                direct_refusal: crate::kms::budget::direct_refusal(
                    record.provider,
                    record
                        .canary
                        .as_deref()
                        .and_then(|c| crate::envelope::Envelope::parse(c).ok())
                        .map(|e| e.ciphertext)
                        .as_deref(),
                ),
            }));
        }
        // The same rule the registry checks mints against.
        let sealing = sealing_binding(
            tenant.reencrypt_to.as_deref(),
            records
                .iter()
                .find(|r| r.primary)
                .map(|r| (r.name.as_str(), r.state)),
            tenant.key_policy == KeyPolicy::SingleKey,
        );
        let primary = bindings
            .iter()
            .find(|b| *b.name == *sealing)
            .map_or_else(|| Arc::clone(&platform), Arc::clone);
        // Each version with the binding that protects it now (an unlink
        // destroys the versions of its key in the same transaction).
        let versions = self
            .registry
            .tenant_keys(tenant_id)
            .await?
            .into_iter()
            .filter_map(|record| {
                let binding = if record.binding == PLATFORM_BINDING {
                    Arc::clone(&platform)
                } else {
                    Arc::clone(bindings.iter().find(|b| *b.name == *record.binding)?)
                };
                Some(Arc::new(TenantKeyVersion {
                    version: record.version,
                    binding,
                    provider_key_version: record.provider_key_version,
                    wrapped: record.wrapped,
                    created_at_ms: record.created_at_ms,
                    epoch: record.epoch,
                }))
            })
            .collect();
        Ok(Arc::new(TenantKeys {
            primary,
            bindings,
            platform: Arc::clone(&platform),
            hierarchy: tenant.key_hierarchy,
            versions,
            reencrypt_to: tenant.reencrypt_to,
            reencrypt_from: tenant.reencrypt_from,
            min_tenant_key_version: min_of(TENANT_KEY_USAGE),
            tenant_key_usage: self.usage_for(tenant_id, TENANT_KEY_USAGE),
            life: TenantLife {
                incarnation: tenant.incarnation,
                legacy_deks: tenant.legacy_deks,
                registers_on_wrap: false,
                delete_at_ms: tenant.delete_at_ms,
                epoch: tenant.key_epoch,
                next_version: tenant.next_key_version,
                cache_generation,
                access: tenant.access_policy,
            },
        }))
    }

    /// The platform binding as tenants see it now: with the fleet-wide
    /// minimum decryption version, if any version of the platform keyring
    /// is retired. Its usage counters are the one shared set.
    async fn platform_view(&self) -> Result<Arc<Binding>, DirectoryError> {
        let min = self
            .registry
            .retirements(FLEET)
            .await?
            .into_iter()
            .find(|r| r.key_name == PLATFORM_BINDING)
            .map_or(0, |r| r.min_version);
        if min == 0 {
            return Ok(Arc::clone(&self.platform));
        }
        Ok(Arc::new(Binding {
            name: Arc::clone(&self.platform.name),
            link_id: 0,
            provider: Arc::clone(&self.platform.provider),
            key_reference: self.platform.key_reference.clone(),
            state: self.platform.state,
            state_reason: self.platform.state_reason.clone(),
            usage: Arc::clone(&self.platform.usage),
            min_decryption_version: min,
            direct_refusal: self.platform.direct_refusal,
        }))
    }

    async fn provider_for(
        &self,
        record: &BindingRecord,
        external_id: &str,
    ) -> Result<Arc<dyn KeyProvider>, DirectoryError> {
        match record.provider {
            ProviderKind::Local => {
                let sealed = record.key_material.as_deref().ok_or_else(|| {
                    DirectoryError::Internal(format!(
                        "local key '{}' of tenant '{}' has no key material",
                        record.name, record.tenant_id
                    ))
                })?;
                let material = open_material(
                    &self.platform_keyring,
                    &record.tenant_id,
                    &record.name,
                    sealed,
                )
                .await?;
                let keyring = LocalKeyring::from_imported(
                    &record.key_reference,
                    &material_versions(&material)?,
                    record.seal_only_from,
                )
                .map_err(|e| DirectoryError::Internal(e.to_string()))?;
                keyring.set_legacy_wraps(self.legacy_wraps);
                Ok(Arc::new(keyring))
            }
            ProviderKind::AwsKms => Ok(Arc::new(
                self.aws
                    .key(aws_target(record, external_id).map_err(|e| unusable(record, &e))?),
            )),
            ProviderKind::GcpKms => Ok(Arc::new(
                self.gcp
                    .key(gcp_target(record).map_err(|e| unusable(record, &e))?),
            )),
            ProviderKind::VaultTransit => {
                // A sealed secret_id means AppRole; none, the jwt method.
                let secret = match record.key_material.as_deref() {
                    None => None,
                    Some(sealed) => {
                        let secret = open_material(
                            &self.platform_keyring,
                            &record.tenant_id,
                            &record.name,
                            sealed,
                        )
                        .await?;
                        Some(secrecy::SecretString::from(
                            String::from_utf8(secret.expose().to_vec()).map_err(|_| {
                                DirectoryError::Internal(
                                    "a stored AppRole secret_id is not text".into(),
                                )
                            })?,
                        ))
                    }
                };
                let target = vault_target(record, secret).map_err(|e| unusable(record, &e))?;
                Ok(Arc::new(self.vault()?.key(target)))
            }
            ProviderKind::Pkcs11 => {
                let key = crate::kms::pkcs11::Pkcs11KeyRef::parse(&record.key_reference)
                    .map_err(|e| unusable(record, &e))?;
                Ok(Arc::new(self.pkcs11()?.key(key)))
            }
            ProviderKind::AzureKeyVault => Ok(Arc::new(
                azure_key(self.azure()?, record).map_err(|e| unusable(record, &e))?,
            )),
        }
    }
}

fn verdict_cache(ttl: Duration) -> Cache<UsageKey, super::Verdict> {
    Cache::builder()
        .max_capacity(10_000)
        .time_to_live(ttl.max(Duration::from_millis(1)))
        .build()
}

/// The data plane's side (served through `crate::lifecycle::Lifecycle`).
impl RegistryDirectory {
    /// A live request saw `error` from a binding (see
    /// [`KeyDirectory::confirm_failure`]).
    pub async fn confirm_failure(
        &self,
        tenant_id: &str,
        binding: &str,
        error: &ProviderError,
    ) -> Confirmation {
        if !error.suggests_revocation() {
            return Confirmation::Unknown;
        }
        self.recheck(tenant_id, binding, error).await
    }

    /// The tenant's view: from memory, or one registry read shared by
    /// every concurrent caller; through a registry outage, the view as last
    /// read, within `registry_outage_grace`.
    pub async fn tenant_keys(&self, tenant_id: &str) -> Result<Arc<TenantKeys>, DirectoryError> {
        if let Some(keys) = self.views.fresh_at(tenant_id, std::time::Instant::now()) {
            return Ok(keys);
        }
        // Boxed: the load's future (registry queries) is large, and inline it
        // would be part of every hit's future too.
        Box::pin(self.views.get(tenant_id, || self.load(tenant_id))).await
    }

    /// The tenant's view if a fresh one is in memory now (never a load).
    pub fn tenant_keys_in_memory(
        &self,
        tenant_id: &str,
        now: std::time::Instant,
    ) -> Option<Arc<TenantKeys>> {
        self.views.fresh_at(tenant_id, now)
    }

    /// Runs a registry write of the request path within its deadline
    /// (`registry_write_timeout`).
    pub async fn data_path_write<T, E>(
        &self,
        write: impl Future<Output = Result<T, E>>,
    ) -> Result<T, DirectoryError>
    where
        DirectoryError: From<E>,
    {
        let deadline = self.views.settings().write_timeout;
        match tokio::time::timeout(deadline, write).await {
            Ok(done) => Ok(done?),
            Err(_) => Err(DirectoryError::Unavailable(format!(
                "the key registry did not complete a write within {deadline:?} (registry_write_timeout); retry shortly"
            ))),
        }
    }

    /// Since when the registry has not answered (None: it answers).
    pub fn registry_outage_since(&self) -> Option<std::time::Instant> {
        self.views.outage_since()
    }

    /// Requests answered from views past their TTL because the registry did
    /// not answer.
    pub fn stale_view_serves(&self) -> u64 {
        self.views
            .stale_serves
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Live per-identity clients, for `keybroker_identity_clients`.
impl crate::metrics::RegistrySource for RegistryDirectory {
    fn outage(&self) -> Option<Duration> {
        self.registry_outage_since().map(|since| since.elapsed())
    }

    fn stale_view_serves(&self) -> u64 {
        RegistryDirectory::stale_view_serves(self)
    }
}

impl crate::metrics::IdentitySource for RegistryDirectory {
    fn identity_counts(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("aws_role_sessions", self.aws.live_sessions()),
            ("gcp_clients", self.gcp.live_clients_now()),
            (
                "vault_logins",
                self.vault.as_ref().map_or(0, |v| v.live_sessions()),
            ),
            (
                "azure_tenant_credentials",
                self.azure.as_ref().map_or(0, |a| a.live_credentials()),
            ),
        ]
    }
}
