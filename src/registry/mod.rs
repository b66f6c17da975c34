//! The tenant key registry: tenants and their key bindings, persisted in
//! SQLite (embedded default) or PostgreSQL (shared by replicas), both through
//! [`sql::SqlRegistry`]. Every change runs in one transaction that first locks
//! the tenant row, so policy checks and writes never race.
//!
//! [`directory::RegistryDirectory`] serves the data plane from memory on top.

pub mod backup;
mod changes;
pub mod directory;
pub mod key_state;
pub mod material;
mod rows;
pub mod sql;
pub mod tenant_tx;
mod usage_flush;
mod versions;
pub mod views;

use std::fmt;

use async_trait::async_trait;

use crate::keys::{BindingState, KeyHierarchy};
use crate::kms::ProviderKind;

/// How many keys a tenant may have.
/// What one describe of a binding found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The key is usable.
    Usable,
    /// The customer made the key unusable; why, and what they can do.
    Revoked(String),
    /// The provider could not answer (throttled, unreachable): no change.
    Outage,
}

/// What applying a verdict changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Revoked,
    Restored,
    Outage,
    Unchanged,
}

/// The `registry*` and `usage_flush_interval` settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RegistrySettings {
    /// Registry database: postgres://USER:PASSWORD@HOST/DB for replicas
    /// [default: SQLite file registry.db in the data dir].
    #[arg(id = "registry", long = "registry", env = "KEYBROKER_REGISTRY")]
    pub url: Option<crate::secret::SecretUrl>,
    /// How long a tenant's keys are served from memory before the registry is
    /// read again; bounds how stale another replica's change can be.
    #[arg(id = "registry_cache_ttl", long = "registry-cache-ttl", env = "KEYBROKER_REGISTRY_CACHE_TTL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub cache_ttl: std::time::Duration,
    /// How long past `registry_cache_ttl` a tenant's keys keep being served
    /// as last read while the registry does not answer (a restart, a
    /// failover). Also the bound on how long a replica cut off from the
    /// registry can miss another replica's DisableKey or DeleteTenant:
    /// keep it short of what a revocation may take (docs/operations.md).
    #[arg(id = "registry_outage_grace", long = "registry-outage-grace", env = "KEYBROKER_REGISTRY_OUTAGE_GRACE", value_parser = humantime::parse_duration, default_value = "2m")]
    pub outage_grace: std::time::Duration,
    /// A registry read on the request path (a tenant's view) gives up after
    /// this long; the caller gets the view as last read within the grace, or
    /// UNAVAILABLE.
    #[arg(id = "registry_read_timeout", long = "registry-read-timeout", env = "KEYBROKER_REGISTRY_READ_TIMEOUT", value_parser = humantime::parse_duration, default_value = "500ms")]
    pub read_timeout: std::time::Duration,
    /// A registry write on the request path (minting a tenant key version,
    /// registering a tenant on its first wrap) gives up after this long and
    /// answers UNAVAILABLE with a retry delay.
    #[arg(id = "registry_write_timeout", long = "registry-write-timeout", env = "KEYBROKER_REGISTRY_WRITE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "2s")]
    pub write_timeout: std::time::Duration,
    /// Connections to the registry, at most.
    #[arg(
        id = "registry_pool_size",
        long = "registry-pool-size",
        env = "KEYBROKER_REGISTRY_POOL_SIZE",
        default_value = "10"
    )]
    pub pool_size: u32,
    /// How long an admin operation waits for a registry connection.
    #[arg(id = "registry_acquire_timeout", long = "registry-acquire-timeout", env = "KEYBROKER_REGISTRY_ACQUIRE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "3s")]
    pub acquire_timeout: std::time::Duration,
    /// PostgreSQL's statement_timeout for every registry connection.
    #[arg(id = "registry_statement_timeout", long = "registry-statement-timeout", env = "KEYBROKER_REGISTRY_STATEMENT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub statement_timeout: std::time::Duration,
    /// How often key usage counters are written to the registry.
    #[arg(id = "usage_flush_interval", long = "usage-flush-interval", env = "KEYBROKER_USAGE_FLUSH_INTERVAL", value_parser = humantime::parse_duration, default_value = "10s")]
    pub usage_flush_interval: std::time::Duration,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl RegistrySettings {
    /// How tenant views are kept (see `views`).
    pub fn views(&self) -> views::ViewSettings {
        views::ViewSettings {
            ttl: self.cache_ttl,
            outage_grace: self.outage_grace,
            read_timeout: self.read_timeout,
            write_timeout: self.write_timeout,
        }
    }

    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        use crate::settings::invalid;
        if self.cache_ttl.is_zero()
            || self.usage_flush_interval.is_zero()
            || self.read_timeout.is_zero()
            || self.write_timeout.is_zero()
            || self.acquire_timeout.is_zero()
            || self.statement_timeout.is_zero()
        {
            return invalid(
                "registry_cache_ttl/usage_flush_interval/registry_*_timeout",
                "must be longer than zero",
            );
        }
        if self.pool_size == 0 {
            return invalid("registry_pool_size", "must be at least 1");
        }
        if let Some(url) = &self.url {
            let url = url.expose();
            if !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("sqlite://"))
            {
                return invalid(
                    "registry",
                    "must be a postgres://, postgresql:// or sqlite:// URL",
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum KeyPolicy {
    /// Any number of keys; one is primary.
    Keyring,
    /// One key for the tenant's life (Pinecone, turbopuffer).
    SingleKey,
}

impl KeyPolicy {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    fn parse(text: &str) -> Result<Self, RegistryError> {
        text.parse()
            .map_err(|_| RegistryError::Corrupt(format!("key policy {text:?}")))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: String,
    pub key_policy: KeyPolicy,
    /// Generated by keybroker, immutable; required by customers' AWS trust
    /// policies.
    pub external_id: String,
    pub key_hierarchy: KeyHierarchy,
    /// The binding a key change moves every tenant key version to, until it
    /// is done (and after: the last target).
    pub reencrypt_to: Option<String>,
    /// `direct` tenants: a disabled key RewrapKey may still read until the
    /// operator finishes moving its DEKs away from it.
    pub reencrypt_from: Option<String>,
    /// Every imported key becomes primary (Cube: the newest key encrypts).
    pub newest_import_primary: bool,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Which life of the tenant id this is (1, then one more per
    /// re-creation after a deletion); wrapped keys carry it.
    pub incarnation: u64,
    /// Wrapped keys without an incarnation (issued before incarnations
    /// existed) are accepted: never once the id was deleted.
    pub legacy_deks: bool,
    /// Created by a first wrap of an unregistered tenant; CreateTenant
    /// adopts it.
    pub implicit: bool,
    /// Bumped by every key change; versions minted in another epoch seal
    /// no new DEKs.
    pub key_epoch: u64,
    /// The number the next tenant key version gets (never reused).
    pub next_key_version: u32,
    /// A scheduled deletion: the tenant's keys are destroyed at this time.
    pub delete_at_ms: Option<i64>,
    /// DisableKey with reencrypt_to: disabled when the key change finishes.
    pub reencrypt_then_disable: Option<String>,
    pub reencrypt_disable_reason: String,
    /// The target of the last key change that finished.
    pub reencrypt_last: Option<String>,
}

impl Tenant {
    /// A tenant as CreateTenant (or a first wrap) makes it.
    pub fn new(id: &str, external_id: String, now_ms: i64) -> Self {
        Self {
            id: id.to_owned(),
            key_policy: KeyPolicy::Keyring,
            external_id,
            key_hierarchy: KeyHierarchy::TenantKey,
            reencrypt_to: None,
            reencrypt_from: None,
            newest_import_primary: false,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            incarnation: 1,
            legacy_deks: true,
            implicit: false,
            key_epoch: 0,
            next_key_version: 1,
            delete_at_ms: None,
            reencrypt_then_disable: None,
            reencrypt_disable_reason: String::new(),
            reencrypt_last: None,
        }
    }
}

/// A stored tenant key version.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantKeyRecord {
    pub tenant_id: String,
    pub version: u32,
    /// The binding whose key wraps it (`platform` for the platform key).
    pub binding: String,
    pub provider_key_version: String,
    pub wrapped: Vec<u8>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// The tenant's key epoch it was minted in.
    pub epoch: u64,
}

impl fmt::Debug for TenantKeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantKeyRecord")
            .field("tenant_id", &self.tenant_id)
            .field("version", &self.version)
            .field("binding", &self.binding)
            .field("wrapped", &format_args!("<{} bytes>", self.wrapped.len()))
            .finish_non_exhaustive()
    }
}

/// A stored key binding.
#[derive(Clone, PartialEq, Eq)]
pub struct BindingRecord {
    pub tenant_id: String,
    pub name: String,
    pub description: String,
    pub provider: ProviderKind,
    pub key_reference: String,
    pub region: String,
    pub role_arn: String,
    pub service_account: String,
    /// AWS multi-Region key replicas, tried when the key's region fails.
    pub replica_regions: Vec<String>,
    /// Imported key material, encrypted under the platform key.
    pub key_material: Option<Vec<u8>>,
    pub state: BindingState,
    pub state_reason: String,
    pub primary: bool,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub last_used_at_ms: Option<i64>,
    /// When the newest version of imported key material was imported.
    pub material_updated_at_ms: Option<i64>,
    pub wrap_count: u64,
    pub unwrap_count: u64,
    /// Random per link: the same name linked again is another key.
    pub link_id: i64,
    /// A value keybroker encrypted under the key (an envelope), decrypted
    /// by every key-state check.
    pub canary: Option<Vec<u8>>,
    /// Imported material: the first version made since wraps are `seal`
    /// only (no legacy-layout wrap under it or later). None: every version
    /// predates the upgrade.
    pub seal_only_from: Option<u32>,
}

impl fmt::Debug for BindingRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BindingRecord")
            .field("tenant_id", &self.tenant_id)
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("key_reference", &self.key_reference)
            .field("state", &self.state)
            .field("primary", &self.primary)
            .field(
                "key_material",
                &self.key_material.as_ref().map(|_| "<encrypted>"),
            )
            .finish_non_exhaustive()
    }
}

impl BindingRecord {
    /// What a new binding will look like once stored (for verification
    /// before the insert).
    pub fn from_new(new: &NewBinding) -> Self {
        Self {
            tenant_id: new.tenant_id.clone(),
            name: new.name.clone(),
            description: new.description.clone(),
            provider: new.provider,
            key_reference: new.key_reference.clone(),
            region: new.region.clone(),
            role_arn: new.role_arn.clone(),
            service_account: new.service_account.clone(),
            replica_regions: new.replica_regions.clone(),
            key_material: new.key_material.clone(),
            state: BindingState::Active,
            state_reason: String::new(),
            primary: new.make_primary,
            created_at_ms: 0,
            updated_at_ms: 0,
            last_used_at_ms: None,
            material_updated_at_ms: None,
            wrap_count: 0,
            unwrap_count: 0,
            link_id: 0,
            canary: new.canary.clone(),
            seal_only_from: Some(1),
        }
    }
}

/// A binding to insert.
#[derive(Clone)]
pub struct NewBinding {
    pub tenant_id: String,
    pub name: String,
    pub description: String,
    pub provider: ProviderKind,
    pub key_reference: String,
    pub region: String,
    pub role_arn: String,
    pub service_account: String,
    pub replica_regions: Vec<String>,
    pub key_material: Option<Vec<u8>>,
    /// Make it primary; the first binding of a tenant (or the first while
    /// none is primary) becomes primary regardless.
    pub make_primary: bool,
    /// The link's verification probe (an envelope), kept as its canary.
    pub canary: Option<Vec<u8>>,
}

impl fmt::Debug for NewBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewBinding")
            .field("tenant_id", &self.tenant_id)
            .field("name", &self.name)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// Usage accumulated in memory since the last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    pub tenant_id: String,
    pub name: String,
    pub wraps: u64,
    pub unwraps: u64,
    pub last_used_at_ms: i64,
    /// The same uses by key version.
    pub versions: Vec<VersionUsageRecord>,
}

/// Tenant id of fleet-wide rows (the platform keyring's retirement and
/// usage): `#` is in no tenant id.
pub const FLEET: &str = "#platform";

/// Uses of one key version (stored, or a delta to add).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionUsageRecord {
    /// A binding, `platform`, or [`crate::keys::TENANT_KEY_USAGE`].
    pub key_name: String,
    pub version: String,
    pub wraps: u64,
    pub unwraps: u64,
    pub last_used_at_ms: i64,
}

/// A minimum decryption version: older versions of the key are retired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retirement {
    /// A binding, `platform`, or [`crate::keys::TENANT_KEY_USAGE`].
    pub key_name: String,
    pub min_version: u32,
    pub updated_at_ms: i64,
}

/// What must hold for an unlink to go ahead.
#[derive(Debug, Clone, Copy)]
pub struct UnlinkGuard {
    /// Refuse if the key was used at or after this time...
    pub not_used_since_ms: i64,
    /// ...unless forced.
    pub force: bool,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error(
        "tenant {} does not exist; create it with CreateTenant first",
        crate::text::Quoted(_0)
    )]
    TenantNotFound(String),
    #[error("tenant {} already exists", crate::text::Quoted(_0))]
    TenantExists(String),
    #[error(
        "tenant {} has no key named {}",
        crate::text::Quoted(tenant_id),
        crate::text::Quoted(name)
    )]
    BindingNotFound { tenant_id: String, name: String },
    #[error(
        "tenant {} already has a key named {}",
        crate::text::Quoted(tenant_id),
        crate::text::Quoted(name)
    )]
    BindingExists { tenant_id: String, name: String },
    /// The request is valid but the tenant's state forbids it.
    #[error("{0}")]
    Refused(String),
    /// The database could not be reached or failed.
    #[error("registry database error: {0}")]
    Database(String),
    /// The database holds something this build cannot read.
    #[error("registry holds an unreadable value: {0}")]
    Corrupt(String),
}

/// The data plane sees a registry failure as its directory failing: the
/// database is unavailable, or it holds something unreadable.
impl From<RegistryError> for crate::keys::DirectoryError {
    fn from(err: RegistryError) -> Self {
        match err {
            RegistryError::Database(_) => Self::Unavailable(err.to_string()),
            // Not found, exists, refused: no directory read produces these.
            _ => Self::Internal(err.to_string()),
        }
    }
}

#[async_trait]
pub trait Registry: Send + Sync + fmt::Debug {
    async fn create_tenant(&self, tenant: &Tenant) -> Result<(), RegistryError>;
    async fn tenant(&self, tenant_id: &str) -> Result<Option<Tenant>, RegistryError>;
    /// Keyring → single_key needs at most one key; single_key → keyring is
    /// refused once the key protected data.
    async fn set_key_policy(
        &self,
        tenant_id: &str,
        policy: KeyPolicy,
        now_ms: i64,
    ) -> Result<Tenant, RegistryError>;
    /// Refused for a single_key tenant that already has a key.
    async fn insert_binding(
        &self,
        binding: &NewBinding,
        now_ms: i64,
    ) -> Result<BindingRecord, RegistryError>;
    async fn bindings(&self, tenant_id: &str) -> Result<Vec<BindingRecord>, RegistryError>;
    /// The tenants (each once) holding a binding of `provider` to
    /// `key_reference`, in any state.
    async fn tenants_linking(
        &self,
        provider: ProviderKind,
        key_reference: &str,
    ) -> Result<Vec<String>, RegistryError>;
    async fn binding(
        &self,
        tenant_id: &str,
        name: &str,
    ) -> Result<Option<BindingRecord>, RegistryError>;
    async fn set_state(
        &self,
        tenant_id: &str,
        name: &str,
        state: BindingState,
        reason: &str,
        now_ms: i64,
    ) -> Result<BindingRecord, RegistryError>;
    async fn add_usage(&self, deltas: &[UsageDelta]) -> Result<(), RegistryError>;
    /// Replaces a binding's canary (`old`: the one it had, or none), if it
    /// is still that link with that canary.
    async fn set_canary(
        &self,
        tenant_id: &str,
        name: &str,
        link_id: i64,
        old: Option<&[u8]>,
        canary: &[u8],
    ) -> Result<(), RegistryError>;
    /// Tells every other replica that a tenant's keys changed (PostgreSQL
    /// NOTIFY). A registry only this process uses has nobody to tell.
    async fn publish_change(
        &self,
        _tenant_id: &str,
        _binding: Option<&str>,
    ) -> Result<(), RegistryError> {
        Ok(())
    }
    /// Claims up to `limit` ACTIVE or REVOKED bindings due for a state
    /// check by `claim.claimer`, with their tenant's external ID, marking
    /// them claimed by it at `claim.now_ms` in the same statement:
    /// concurrent claimers (replicas) never get the same binding.
    async fn claim_checks(
        &self,
        claim: &CheckClaim<'_>,
        limit: usize,
    ) -> Result<Vec<(BindingRecord, String)>, RegistryError>;
    /// Bindings by state (lowercase state name, count), fleet-wide.
    async fn binding_states(&self) -> Result<Vec<(&'static str, u64)>, RegistryError>;
    /// A tenant's key versions, oldest first.
    async fn tenant_keys(&self, tenant_id: &str) -> Result<Vec<TenantKeyRecord>, RegistryError>;
    /// Tenants with a key change recorded: resumed at start.
    async fn tenants_reencrypting(&self) -> Result<Vec<Tenant>, RegistryError>;
    /// Starts a transaction holding the tenant's row lock, with the row as
    /// it is now; `None` when the tenant has no row. Every write of the
    /// tenant-key lifecycle goes through one (`crate::lifecycle`).
    async fn lock_tenant(
        &self,
        tenant_id: &str,
    ) -> Result<Option<tenant_tx::TenantTx>, RegistryError>;
    /// The highest incarnation of `tenant_id` that was deleted, if any.
    async fn tombstone(&self, tenant_id: &str) -> Result<Option<u64>, RegistryError>;
    /// Tenants whose scheduled deletion is due at `now_ms`, oldest first.
    async fn due_deletions(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, RegistryError>;
    /// After rows were destroyed: makes the database drop what it still
    /// keeps of them (SQLite: secure_delete is on, the journal is
    /// checkpointed; PostgreSQL: the tables are vacuumed).
    async fn compact(&self) -> Result<(), RegistryError>;
    async fn set_description(
        &self,
        tenant_id: &str,
        name: &str,
        description: &str,
        now_ms: i64,
    ) -> Result<BindingRecord, RegistryError>;
    /// Flushed uses per key version of a tenant ([`FLEET`]: the platform
    /// keyring's), every key.
    async fn version_usage(
        &self,
        tenant_id: &str,
    ) -> Result<Vec<VersionUsageRecord>, RegistryError>;
    /// A tenant's retirements ([`FLEET`]: the platform keyring's).
    async fn retirements(&self, tenant_id: &str) -> Result<Vec<Retirement>, RegistryError>;
    /// Sets a key's minimum decryption version; 0 clears it.
    async fn set_retirement(
        &self,
        tenant_id: &str,
        key_name: &str,
        min_version: u32,
        now_ms: i64,
    ) -> Result<(), RegistryError>;
    /// Every tenant's key versions wrapped by `binding` (`platform`: what
    /// retiring a platform keyring version must re-wrap first).
    async fn tenant_keys_under(&self, binding: &str)
    -> Result<Vec<TenantKeyRecord>, RegistryError>;
    /// Every binding holding imported key material (sealed by the platform
    /// keyring).
    async fn bindings_with_material(&self) -> Result<Vec<BindingRecord>, RegistryError>;
    /// Replaces a binding's sealed key material if it is still `old`;
    /// `imported_at_ms` records a new version (a re-seal passes `None`), and
    /// `new_version` its number: from it on no legacy-layout wrap exists
    /// (kept if an earlier version already said so).
    async fn replace_key_material(
        &self,
        tenant_id: &str,
        name: &str,
        old: &[u8],
        new: &[u8],
        imported_at_ms: Option<i64>,
        new_version: Option<u32>,
    ) -> Result<bool, RegistryError>;
    /// Claims the automatic rotation of `subject`: `true` for exactly one
    /// caller, and only if its last rotation was before `due_before_ms`.
    async fn claim_rotation(
        &self,
        subject: &str,
        due_before_ms: i64,
        now_ms: i64,
    ) -> Result<bool, RegistryError>;
}

/// PostgreSQL channel carrying key changes between replicas.
pub const CHANGE_CHANNEL: &str = "keybroker_key_changes";

/// `tenant` or `tenant\nbinding` (neither may contain a newline).
/// Which bindings a watcher claims (`Registry::claim_checks`).
#[derive(Debug, Clone, Copy)]
pub struct CheckClaim<'a> {
    /// The claiming replica's id.
    pub claimer: &'a str,
    pub now_ms: i64,
    /// Its own bindings claimed at or before this are due (now minus its
    /// interval).
    pub own_due_before_ms: i64,
    /// Anyone else's (or nobody's) claimed at or before this are taken
    /// over; `i64::MIN` takes none.
    pub others_due_before_ms: i64,
}

pub fn encode_change(tenant_id: &str, binding: Option<&str>) -> String {
    match binding {
        Some(name) => format!("{tenant_id}\n{name}"),
        None => tenant_id.to_owned(),
    }
}

pub fn decode_change(payload: &str) -> (&str, Option<&str>) {
    match payload.split_once('\n') {
        Some((tenant, binding)) => (tenant, Some(binding)),
        None => (payload, None),
    }
}
