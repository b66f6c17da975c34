//! Wraps and unwraps served per binding and per key version since the last
//! flush to the registry: "which key protects what". The per-version counts
//! are what retiring a version is guarded by.
//!
//! Recorded on every request, so the hot path is two relaxed atomic adds
//! under one uncontended read lock over a handful of versions: no clock.
//! The time of last use is stamped when the counts are taken (flushed, at
//! most `usage_flush_interval` after the use) or peeked: never earlier than
//! the real use, so guards built on it err on the side of refusing.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::RwLock;

/// Name under which tenant key versions' usage is stored: `#` is in no
/// binding name, so it cannot collide with one.
pub const TENANT_KEY_USAGE: &str = "#tenant-key";

/// The version of a key that served one use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsedVersion<'a> {
    /// A provider's key version as the wrapped key names it (`"3"` for a
    /// local key, a Cloud KMS version name; empty where the provider does
    /// not expose versions, as AWS KMS).
    Provider(&'a str),
    /// A tenant key version that sealed the DEK.
    TenantKey(u32),
}

/// An owned [`UsedVersion`]: the key of a stored usage row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VersionId {
    Provider(Box<str>),
    TenantKey(u32),
}

impl VersionId {
    fn matches(&self, used: UsedVersion<'_>) -> bool {
        match (self, used) {
            (Self::Provider(a), UsedVersion::Provider(b)) => **a == *b,
            (Self::TenantKey(a), UsedVersion::TenantKey(b)) => *a == b,
            _ => false,
        }
    }

    /// The version as the registry stores it.
    pub fn label(&self) -> String {
        match self {
            Self::Provider(v) => v.to_string(),
            Self::TenantKey(v) => v.to_string(),
        }
    }

    /// Its number, where the provider numbers its versions.
    pub fn number(&self) -> Option<u32> {
        match self {
            Self::Provider(v) => version_number(v),
            Self::TenantKey(v) => Some(*v),
        }
    }
}

impl From<UsedVersion<'_>> for VersionId {
    fn from(used: UsedVersion<'_>) -> Self {
        match used {
            UsedVersion::Provider(v) => Self::Provider(v.into()),
            UsedVersion::TenantKey(v) => Self::TenantKey(v),
        }
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Provider(v) if v.is_empty() => f.write_str("(unversioned)"),
            Self::Provider(v) => f.write_str(v),
            Self::TenantKey(v) => write!(f, "tenant-key/{v}"),
        }
    }
}

/// The number of a provider key version: `"3"` (local keys) or the last
/// segment of a Cloud KMS version name (`.../cryptoKeyVersions/3`). `None`
/// where the provider exposes no numbered versions (AWS KMS).
pub fn version_number(version: &str) -> Option<u32> {
    version
        .rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
}

/// A snapshot of one set of counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCounts {
    pub wraps: u64,
    pub unwraps: u64,
    /// Zero when unused since the last flush.
    pub last_used_ms: i64,
}

#[derive(Debug, Default)]
struct Counters {
    wraps: AtomicU64,
    unwraps: AtomicU64,
    /// Only a count a failed flush put back carries its own time here.
    restored_last_used_ms: AtomicI64,
}

impl Counters {
    fn record(&self, wrap: bool) {
        let counter = if wrap { &self.wraps } else { &self.unwraps };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts, stamped with `now` if there are any.
    fn counts(wraps: u64, unwraps: u64, restored: i64, now: i64) -> UsageCounts {
        let used = wraps + unwraps > 0;
        UsageCounts {
            wraps,
            unwraps,
            last_used_ms: if used { now.max(restored) } else { 0 },
        }
    }

    fn peek(&self, now: i64) -> UsageCounts {
        Self::counts(
            self.wraps.load(Ordering::Relaxed),
            self.unwraps.load(Ordering::Relaxed),
            self.restored_last_used_ms.load(Ordering::Relaxed),
            now,
        )
    }

    fn take(&self, now: i64) -> UsageCounts {
        Self::counts(
            self.wraps.swap(0, Ordering::Relaxed),
            self.unwraps.swap(0, Ordering::Relaxed),
            self.restored_last_used_ms.swap(0, Ordering::Relaxed),
            now,
        )
    }

    fn restore(&self, counts: UsageCounts) {
        self.wraps.fetch_add(counts.wraps, Ordering::Relaxed);
        self.unwraps.fetch_add(counts.unwraps, Ordering::Relaxed);
        self.restored_last_used_ms
            .fetch_max(counts.last_used_ms, Ordering::Relaxed);
    }
}

/// Usage of one binding (its totals and per version) since the last flush.
#[derive(Debug, Default)]
pub struct BindingUsage {
    total: Counters,
    /// A handful of versions per binding, scanned linearly. A write lock is
    /// taken only the first time a version is used (per flush period: rows
    /// stay once added), never on the common path.
    versions: RwLock<Vec<(VersionId, Arc<Counters>)>>,
    /// Last key-state check by the watcher (not usage: never flushed).
    pub last_checked_ms: AtomicI64,
}

/// Counts taken from a [`BindingUsage`] by a flush.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TakenUsage {
    pub total: UsageCounts,
    pub versions: Vec<(VersionId, UsageCounts)>,
}

impl TakenUsage {
    pub fn is_empty(&self) -> bool {
        self.total == UsageCounts::default() && self.versions.is_empty()
    }
}

impl BindingUsage {
    /// One wrap served with the binding, under `version`.
    pub fn record_wrap(&self, version: UsedVersion<'_>) {
        self.record(true, version);
    }

    /// One unwrap served with the binding, under `version`.
    pub fn record_unwrap(&self, version: UsedVersion<'_>) {
        self.record(false, version);
    }

    /// A DEK sealed (`wrap`) or opened under a tenant key version this
    /// binding protects: counted in the binding's totals only. The DEK does
    /// not depend on the binding's version (re-wrapping the tenant key moves
    /// it); the tenant key version's own counters say which version it used.
    pub fn record_sealed(&self, wrap: bool) {
        self.total.record(wrap);
    }

    fn record(&self, wrap: bool, version: UsedVersion<'_>) {
        self.total.record(wrap);
        {
            let versions = self.versions.read();
            if let Some((_, counters)) = versions.iter().find(|(id, _)| id.matches(version)) {
                counters.record(wrap);
                return;
            }
        }
        let mut versions = self.versions.write();
        // Another request may have added it between the two locks.
        if let Some((_, counters)) = versions.iter().find(|(id, _)| id.matches(version)) {
            counters.record(wrap);
            return;
        }
        let counters = Arc::new(Counters::default());
        counters.record(wrap);
        versions.push((version.into(), counters));
    }

    /// The totals not yet flushed (last use: now, if any).
    pub fn peek(&self) -> UsageCounts {
        self.total.peek(super::now_ms())
    }

    /// Takes every count, leaving zero (the flush owns them now), stamped
    /// with the time of the take.
    pub fn take(&self) -> TakenUsage {
        let now = super::now_ms();
        let versions = self.versions.read();
        TakenUsage {
            total: self.total.take(now),
            versions: versions
                .iter()
                .map(|(id, c)| (id.clone(), c.take(now)))
                .filter(|(_, c)| *c != UsageCounts::default())
                .collect(),
        }
    }

    /// Puts back counts a failed flush could not write.
    pub fn restore(&self, taken: &TakenUsage) {
        self.total.restore(taken.total);
        let versions = self.versions.read();
        for (id, counts) in &taken.versions {
            if let Some((_, counters)) = versions.iter().find(|(v, _)| v == id) {
                counters.restore(*counts);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_version_and_in_total() {
        let usage = BindingUsage::default();
        usage.record_unwrap(UsedVersion::Provider("1"));
        usage.record_unwrap(UsedVersion::Provider("1"));
        usage.record_wrap(UsedVersion::Provider("2"));
        usage.record_unwrap(UsedVersion::TenantKey(1));
        assert_eq!(usage.peek().unwraps, 3);
        assert_eq!(usage.peek().wraps, 1);
        let taken = usage.take();
        let find = |id: VersionId| {
            taken
                .versions
                .iter()
                .find(|(v, _)| *v == id)
                .map(|(_, c)| (c.wraps, c.unwraps))
        };
        assert_eq!(find(VersionId::Provider("1".into())), Some((0, 2)));
        assert_eq!(find(VersionId::Provider("2".into())), Some((1, 0)));
        // A tenant key version is not the provider version with that number.
        assert_eq!(find(VersionId::TenantKey(1)), Some((0, 1)));
        assert!(usage.take().is_empty(), "a take leaves nothing");
        usage.restore(&taken);
        let again = usage.take();
        assert_eq!(again.total.unwraps, 3, "a failed flush loses nothing");
        assert!(again.total.last_used_ms >= taken.total.last_used_ms);
        assert_eq!(again.versions.len(), taken.versions.len());
    }

    #[test]
    fn version_numbers() {
        assert_eq!(version_number("3"), Some(3));
        assert_eq!(
            version_number("projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/12"),
            Some(12)
        );
        assert_eq!(version_number(""), None);
        assert_eq!(version_number("0"), None);
        assert_eq!(version_number("abc"), None);
    }
}
