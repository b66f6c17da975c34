//! The keys of a tenant as the data plane sees them: bindings, their states
//! and usage, and the [`KeyDirectory`] seam through which the broker learns
//! them. [`PlatformOnly`] serves every tenant with the platform key; the
//! registry's directory is the other implementation.
//!
//! This module depends only on `kms`: the broker, the registry and the
//! control plane all build on it, never the other way round.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use async_trait::async_trait;

use crate::kms::{KeyProvider, ProviderError, ProviderKind};

/// Name of the platform key's binding; reserved in every tenant.
pub const PLATFORM_BINDING: &str = "platform";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Wraps and unwraps served with one binding since the last flush to the
/// registry. Atomics: recorded on every request, flushed periodically.
#[derive(Debug, Default)]
pub struct BindingUsage {
    wraps: AtomicU64,
    unwraps: AtomicU64,
    last_used_ms: AtomicI64,
    /// Last key-state check by the watcher (not usage: never flushed).
    pub last_checked_ms: AtomicI64,
}

/// A snapshot of [`BindingUsage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCounts {
    pub wraps: u64,
    pub unwraps: u64,
    /// Zero when unused since the last flush.
    pub last_used_ms: i64,
}

impl BindingUsage {
    /// One wrap served with the binding.
    pub fn record_wrap(&self) {
        self.record(&self.wraps);
    }

    /// One unwrap served with the binding.
    pub fn record_unwrap(&self) {
        self.record(&self.unwraps);
    }

    fn record(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.last_used_ms.fetch_max(now_ms(), Ordering::Relaxed);
    }

    pub fn peek(&self) -> UsageCounts {
        UsageCounts {
            wraps: self.wraps.load(Ordering::Relaxed),
            unwraps: self.unwraps.load(Ordering::Relaxed),
            last_used_ms: self.last_used_ms.load(Ordering::Relaxed),
        }
    }

    /// Takes the counts, leaving zero (the flush owns them now).
    pub fn take(&self) -> UsageCounts {
        UsageCounts {
            wraps: self.wraps.swap(0, Ordering::Relaxed),
            unwraps: self.unwraps.swap(0, Ordering::Relaxed),
            last_used_ms: self.last_used_ms.swap(0, Ordering::Relaxed),
        }
    }

    /// Puts back counts a failed flush could not write.
    pub fn restore(&self, counts: UsageCounts) {
        self.wraps.fetch_add(counts.wraps, Ordering::Relaxed);
        self.unwraps.fetch_add(counts.unwraps, Ordering::Relaxed);
        self.last_used_ms
            .fetch_max(counts.last_used_ms, Ordering::Relaxed);
    }
}

/// One key able to protect a tenant's DEKs, as the data plane sees it.
#[derive(Debug)]
pub struct Binding {
    pub name: Arc<str>,
    pub provider: Arc<dyn KeyProvider>,
    /// The provider's reference to the key (ARN, resource name, keyring id).
    pub key_reference: String,
    pub state: BindingState,
    /// Why the binding is not active, for people.
    pub state_reason: String,
    /// Shared with the directory, which outlives this snapshot of the binding.
    pub usage: Arc<BindingUsage>,
}

impl Binding {
    /// An active binding with fresh usage counters (the platform key, tests
    /// and benchmarks).
    pub fn active(name: &str, provider: Arc<dyn KeyProvider>, key_reference: &str) -> Self {
        Self {
            name: name.into(),
            provider,
            key_reference: key_reference.to_owned(),
            state: BindingState::Active,
            state_reason: String::new(),
            usage: Arc::default(),
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
}

impl TenantKeys {
    pub fn find(&self, name: &str) -> Option<&Arc<Binding>> {
        if name == PLATFORM_BINDING {
            return Some(&self.platform);
        }
        self.bindings.iter().find(|b| &*b.name == name)
    }

    pub fn uses_platform_key(&self) -> bool {
        Arc::ptr_eq(&self.primary, &self.platform)
    }
}

/// Where the data plane learns a tenant's keys. Implementations answer from
/// memory on the hot path (one call per request).
#[async_trait]
pub trait KeyDirectory: Send + Sync + fmt::Debug {
    async fn tenant_keys(&self, tenant_id: &str) -> Result<Arc<TenantKeys>, DirectoryError>;

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
            }),
        }
    }
}

#[async_trait]
impl KeyDirectory for PlatformOnly {
    async fn tenant_keys(&self, _tenant_id: &str) -> Result<Arc<TenantKeys>, DirectoryError> {
        Ok(Arc::clone(&self.keys))
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
