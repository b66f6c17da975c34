//! The keys of a tenant as the data plane sees them: bindings, their states
//! and usage, and the [`KeyDirectory`] seam through which the broker learns
//! them. [`PlatformOnly`] serves every tenant with the platform key; the
//! registry's directory is the other implementation.
//!
//! This module depends only on `kms`: the broker, the registry and the
//! control plane all build on it, never the other way round.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::kms::{KeyProvider, ProviderError, ProviderKind};

mod usage;
pub use usage::{
    BindingUsage, TENANT_KEY_USAGE, TakenUsage, UsageCounts, UsedVersion, VersionId, version_number,
};

/// Name of the platform key's binding; reserved in every tenant.
pub const PLATFORM_BINDING: &str = "platform";

/// As stored: `ACTIVE`, `DISABLED`, `REVOKED` (`IntoStaticStr`, `FromStr`);
/// as shown in messages: lower case (`Display`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumString)]
#[strum(serialize_all = "SCREAMING_SNAKE_CASE")]
pub enum BindingState {
    Active,
    /// Disabled by an operator of the platform.
    Disabled,
    /// Made unusable by the customer (disabled, deleted, access denied).
    Revoked,
}

impl fmt::Display for BindingState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::Disabled => "disabled",
            Self::Revoked => "revoked",
        })
    }
}

/// One key able to protect a tenant's DEKs, as the data plane sees it.
#[derive(Debug)]
pub struct Binding {
    pub name: Arc<str>,
    /// Which link of the name this is (random per link; 0 for the platform
    /// key): a key unlinked and linked again is another key to the cache.
    pub link_id: i64,
    pub provider: Arc<dyn KeyProvider>,
    /// The provider's reference to the key (ARN, resource name, keyring id).
    pub key_reference: String,
    pub state: BindingState,
    /// Why the binding is not active, for people.
    pub state_reason: String,
    /// Shared with the directory, which outlives this snapshot of the binding.
    pub usage: Arc<BindingUsage>,
    /// Wrapped keys naming an older numbered provider version are refused
    /// (retired versions); 0 when none is retired.
    pub min_decryption_version: u32,
    /// Why this key may not wrap a `direct` tenant's DEKs (its wrap budget,
    /// `kms::budget`), or `None`. LinkKey refuses such a key for a direct
    /// tenant; this stops new wraps under one linked before that rule.
    pub direct_refusal: Option<&'static str>,
}

impl Binding {
    /// An active binding with fresh usage counters (the platform key, tests
    /// and benchmarks).
    pub fn active(name: &str, provider: Arc<dyn KeyProvider>, key_reference: &str) -> Self {
        Self {
            name: name.into(),
            link_id: 0,
            provider,
            key_reference: key_reference.to_owned(),
            state: BindingState::Active,
            state_reason: String::new(),
            usage: Arc::default(),
            min_decryption_version: 0,
            direct_refusal: None,
        }
    }

    pub fn info(&self, key_version: String) -> KeyInfo {
        KeyInfo {
            key_binding: Arc::clone(&self.name),
            provider: self.provider.kind(),
            key_version,
        }
    }
}

/// How a tenant's DEKs are wrapped (DESIGN.md section 4a).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, strum::IntoStaticStr, strum::EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum KeyHierarchy {
    /// Customer key -> versioned tenant key -> DEKs sealed locally.
    #[default]
    TenantKey,
    /// Every DEK wrapped by the primary binding's provider.
    Direct,
}

impl KeyHierarchy {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Context entry naming a tenant key version in its own wrap: the
/// customer's KMS log (AWS encryption context) shows which version loads.
pub const TENANT_KEY_CONTEXT: &str = "keybroker:tenant-key-version";

/// What a tenant key version is bound to when its binding wraps it (the
/// data plane mints and loads with it, a key change re-encrypts with it).
pub fn tenant_key_context(version: u32) -> crate::context::Context {
    crate::context::Context::reserved(&[(TENANT_KEY_CONTEXT, version.to_string())])
}

/// Context entry of a binding's canary (see `registry::key_state`): what a
/// key-state check decrypts to prove keybroker may still use the key.
pub const CANARY_CONTEXT: &str = "keybroker:canary";

/// What a binding's canary is bound to: no caller's wrapped key can be
/// one (callers cannot send reserved entries).
pub fn canary_context() -> crate::context::Context {
    crate::context::Context::reserved(&[(CANARY_CONTEXT, "1".to_owned())])
}

/// One tenant key version as the data plane sees it: stored only wrapped,
/// by the binding that protects it now.
#[derive(Debug)]
pub struct TenantKeyVersion {
    /// 1 and up; the newest seals new DEKs while its binding is primary.
    pub version: u32,
    /// The binding whose key wraps this version (the platform key included).
    pub binding: Arc<Binding>,
    pub provider_key_version: String,
    /// The version's key, wrapped by `binding`.
    pub wrapped: Vec<u8>,
    /// When it was minted (a re-encryption keeps it): its age decides
    /// automatic rotation.
    pub created_at_ms: i64,
    /// The tenant's key epoch it was minted in: only a version of the
    /// current epoch seals new DEKs (a key change starts a new one).
    pub epoch: u64,
}

/// The keys of one tenant at one moment.
#[derive(Debug, Clone)]
pub struct TenantKeys {
    /// Wraps new DEKs: the platform binding when the tenant has no usable
    /// customer key.
    pub primary: Arc<Binding>,
    /// Every customer binding of the tenant (without the platform key).
    pub bindings: Vec<Arc<Binding>>,
    /// Always able to unwrap what it wrapped before a tenant moved to CMEK.
    pub platform: Arc<Binding>,
    pub hierarchy: KeyHierarchy,
    /// Tenant key versions, oldest first (empty for `direct` tenants and
    /// tenants the registry does not know).
    pub versions: Vec<Arc<TenantKeyVersion>>,
    /// A key change moving every version to this binding is under way.
    pub reencrypt_to: Option<String>,
    /// `direct` tenants: a disabled binding RewrapKey may still read.
    pub reencrypt_from: Option<String>,
    /// DEKs sealed under an older tenant key version are refused (retired
    /// versions); 0 when none is retired.
    pub min_tenant_key_version: u32,
    /// Uses per tenant key version (whichever binding protects it).
    pub tenant_key_usage: Arc<BindingUsage>,
    /// Where the tenant is in its life (registered, scheduled for deletion,
    /// which incarnation) and the cache generation of this view.
    pub life: TenantLife,
}

/// A tenant's lifecycle state as one view saw it (DESIGN.md section 4b).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantLife {
    /// Which life of the tenant id this is; wrapped keys carry it. 0: the
    /// tenant has no registry row (or there is no registry).
    pub incarnation: u64,
    /// Wrapped keys issued without an incarnation are accepted.
    pub legacy_deks: bool,
    /// The directory can register the tenant on its first wrap (it is
    /// then served through its own tenant key, so deleting it shreds).
    pub registers_on_wrap: bool,
    /// A scheduled deletion: every data-plane call is refused until then,
    /// and the tenant's keys are destroyed at this time (unix ms).
    pub delete_at_ms: Option<i64>,
    /// The current key epoch (see [`TenantKeyVersion::epoch`]).
    pub epoch: u64,
    /// The number the next tenant key version gets.
    pub next_version: u32,
    /// The DEK cache's generation for this tenant when the view was built:
    /// a cached key loaded under another generation predates a purge and
    /// is never served (see `cache`).
    pub cache_generation: u64,
    /// Which access reasons the customer accepts.
    pub access: crate::access::AccessPolicy,
}

/// Which binding new wraps (tenant key versions, direct DEKs) go under: the
/// target of a key change under way; otherwise the primary when active;
/// the platform key when a keyring tenant's primary was disabled by an
/// operator ("disable all") or there is no primary; otherwise the primary
/// as it is (revoked, or a single_key tenant's disabled key): new wraps
/// then fail, naming why. The registry checks mints against the same rule.
pub fn sealing_binding<'a>(
    reencrypt_to: Option<&'a str>,
    primary: Option<(&'a str, BindingState)>,
    single_key: bool,
) -> &'a str {
    if let Some(target) = reencrypt_to {
        return target;
    }
    match primary {
        Some((name, BindingState::Active)) => name,
        Some((_, BindingState::Disabled)) if !single_key => PLATFORM_BINDING,
        Some((name, _)) => name,
        None => PLATFORM_BINDING,
    }
}

impl TenantKeys {
    /// This view with the binding `name` (link `link_id`) revoked for
    /// `reason`: every reference to it (primary, bindings, the tenant key
    /// versions it protects) points at the revoked copy. What a replica
    /// applies on its own when the registry cannot record a revocation.
    pub fn with_binding_revoked(&self, name: &str, link_id: i64, reason: &str) -> Self {
        let target = |b: &Arc<Binding>| &*b.name == name && b.link_id == link_id;
        let Some(found) = self.bindings.iter().find(|b| target(b)) else {
            return self.clone();
        };
        let revoked = Arc::new(Binding {
            name: Arc::clone(&found.name),
            link_id: found.link_id,
            provider: Arc::clone(&found.provider),
            key_reference: found.key_reference.clone(),
            state: BindingState::Revoked,
            state_reason: reason.to_owned(),
            usage: Arc::clone(&found.usage),
            min_decryption_version: found.min_decryption_version,
            direct_refusal: found.direct_refusal,
        });
        let swap = |b: &Arc<Binding>| {
            if target(b) {
                Arc::clone(&revoked)
            } else {
                Arc::clone(b)
            }
        };
        Self {
            primary: swap(&self.primary),
            bindings: self.bindings.iter().map(swap).collect(),
            versions: self
                .versions
                .iter()
                .map(|v| {
                    if target(&v.binding) {
                        Arc::new(TenantKeyVersion {
                            version: v.version,
                            binding: Arc::clone(&revoked),
                            provider_key_version: v.provider_key_version.clone(),
                            wrapped: v.wrapped.clone(),
                            created_at_ms: v.created_at_ms,
                            epoch: v.epoch,
                        })
                    } else {
                        Arc::clone(v)
                    }
                })
                .collect(),
            ..self.clone()
        }
    }

    pub fn find(&self, name: &str) -> Option<&Arc<Binding>> {
        if name == PLATFORM_BINDING {
            return Some(&self.platform);
        }
        self.bindings.iter().find(|b| &*b.name == name)
    }

    pub fn uses_platform_key(&self) -> bool {
        Arc::ptr_eq(&self.primary, &self.platform)
    }

    pub fn version(&self, version: u32) -> Option<&Arc<TenantKeyVersion>> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// The version new DEKs are sealed under: the newest one, if it was
    /// minted in the current epoch and the primary protects it (otherwise a
    /// new version is minted first).
    pub fn sealing_version(&self) -> Option<&Arc<TenantKeyVersion>> {
        self.versions
            .last()
            .filter(|v| v.epoch == self.life.epoch && v.binding.name == self.primary.name)
    }

    /// The number the next minted version gets: the registry's counter,
    /// never a number a destroyed version had.
    pub fn next_version(&self) -> u32 {
        let newest = self.versions.last().map_or(0, |v| v.version);
        self.life.next_version.max(newest.saturating_add(1))
    }
}

/// A tenant key version, minted by the data plane, to be stored if the
/// tenant is still as the view that planned it saw it.
#[derive(Debug, Clone)]
pub struct NewTenantKey {
    pub tenant_id: String,
    pub version: u32,
    pub binding: String,
    pub provider_key_version: String,
    pub wrapped: Vec<u8>,
    /// The incarnation and key epoch of the view it was planned on.
    pub incarnation: u64,
    pub epoch: u64,
}

/// What became of a minted version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Minted {
    Stored,
    /// The tenant changed since the view (another minter took the number,
    /// a key change began, the key was disabled): reload and plan again.
    Stale,
}

/// Where the data plane learns a tenant's keys. Implementations answer from
/// memory on the hot path (one call per request).
#[async_trait]
pub trait KeyDirectory: Send + Sync + fmt::Debug {
    async fn tenant_keys(&self, tenant_id: &str) -> Result<Arc<TenantKeys>, DirectoryError>;

    /// The tenant's view if it is in memory now, without starting (or
    /// waiting for) a load: the path that must not wait asks this first.
    /// `now`: the caller's clock reading, for the view's TTL.
    fn tenant_keys_in_memory(
        &self,
        _tenant_id: &str,
        _now: std::time::Instant,
    ) -> Option<Arc<TenantKeys>> {
        None
    }

    /// Stores a tenant key version the data plane minted and drops the
    /// tenant's view, so the next read sees it; [`Minted::Stale`] when the
    /// tenant moved on since the view it was planned on.
    async fn mint_tenant_key(&self, key: &NewTenantKey) -> Result<Minted, DirectoryError> {
        Err(DirectoryError::Internal(format!(
            "tenant '{}' cannot keep tenant keys here (no registry)",
            key.tenant_id
        )))
    }

    /// Registers a tenant nobody created on its first wrap
    /// ([`TenantLife::registers_on_wrap`]), so its DEKs are sealed under a
    /// tenant key of its own and deleting it shreds them.
    async fn register_on_wrap(&self, tenant_id: &str) -> Result<(), DirectoryError> {
        Err(DirectoryError::Internal(format!(
            "tenant '{tenant_id}' cannot be registered here (no registry)"
        )))
    }

    /// A live request saw `error` from a binding's provider. The request's
    /// own bytes may have provoked it, so it proves nothing about the key: a
    /// directory that tracks key state describes the binding (no caller
    /// input) and lets that describe decide, revoking only then.
    async fn confirm_failure(
        &self,
        _tenant_id: &str,
        _binding: &str,
        _error: &ProviderError,
    ) -> Confirmation {
        Confirmation::Unknown
    }
}

/// What a describe made after a live request's definitive error found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// The key is unusable: the binding is now revoked.
    Revoked,
    /// The key is usable: the request's own bytes caused the error.
    KeyUsable,
    /// Not known (no describe possible, or it failed): nothing changes.
    Unknown,
}

/// Every tenant uses the platform key (tests, and tenants the registry does
/// not know).
#[derive(Debug)]
pub struct PlatformOnly {
    keys: Arc<TenantKeys>,
}

impl PlatformOnly {
    pub fn new(platform: Arc<Binding>) -> Self {
        Self {
            keys: Arc::new(TenantKeys {
                primary: Arc::clone(&platform),
                bindings: Vec::new(),
                platform,
                hierarchy: KeyHierarchy::Direct,
                versions: Vec::new(),
                reencrypt_to: None,
                reencrypt_from: None,
                min_tenant_key_version: 0,
                tenant_key_usage: Arc::default(),
                life: TenantLife {
                    legacy_deks: true,
                    ..TenantLife::default()
                },
            }),
        }
    }
}

#[async_trait]
impl KeyDirectory for PlatformOnly {
    async fn tenant_keys(&self, _tenant_id: &str) -> Result<Arc<TenantKeys>, DirectoryError> {
        Ok(Arc::clone(&self.keys))
    }

    fn tenant_keys_in_memory(
        &self,
        _tenant_id: &str,
        _now: std::time::Instant,
    ) -> Option<Arc<TenantKeys>> {
        Some(Arc::clone(&self.keys))
    }
}

/// Why a directory could not produce a tenant's keys. Never the caller's
/// fault: the registry behind it failed or holds something unreadable.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DirectoryError {
    /// The registry database could not be reached or failed (retryable).
    #[error("{0}")]
    Unavailable(String),
    /// The registry holds a binding this server cannot use.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Milliseconds since the Unix epoch (the registry's and usage's clock).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Which key protected a DEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub key_binding: Arc<str>,
    pub provider: ProviderKind,
    pub key_version: String,
}
