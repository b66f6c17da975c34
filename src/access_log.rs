//! The customer's key access log: who used which of a tenant's keys, why,
//! how, with what outcome, and when. Not the platform's audit log (one line
//! per call, for the operator); this one is the customer's, queried through
//! KeyAdmin.ListKeyAccess and exported as JSON Lines (`kb admin access-log`).
//!
//! Kept at next to no cost on the hot path: each call adds one to a count in
//! memory, per (tenant, minute, caller, reason, key binding and version,
//! operation, outcome), in a sharded map. A background task flushes the counts
//! to the registry every `access_log_flush_interval`, where every replica's
//! counts of a minute meet in one row; a failed flush puts them back, and the
//! last one runs at shutdown. So the counts are exact.
//!
//! Refusals (PERMISSION_DENIED, FAILED_PRECONDITION) and every use whose
//! justification names a record (a detail: the ticket of a support case, the
//! case of a review, the reference of a legal request; those reasons require
//! one) are also kept as individual records, with the request id (the
//! caller's, or one minted for an audit sink or a trace), the detail
//! and the refusal's message: what an incident review reads. Those uses are
//! people's, rare next to the platform's own; every other use is counted. At most
//! [`MAX_EVENTS`] wait for a flush; past that an individual record is
//! dropped (counted, and logged by the next flush; its use is still in the
//! minute's count).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::access::Reason;
use crate::registry::access_log::{AccessRecord, AccessStore};

/// Individual records waiting for a flush, at most.
pub const MAX_EVENTS: usize = 10_000;

/// Distinct minute counts waiting for a flush, at most (a registry outage
/// keeps them in memory). Past this a new combination is not counted until
/// a flush succeeds, and the loss is counted.
pub const MAX_COUNTS: usize = 1_000_000;

/// The `access_log_*` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct AccessLogSettings {
    /// How often the access log's counts are written to the registry.
    #[arg(id = "access_log_flush_interval", long = "access-log-flush-interval", env = "KEYBROKER_ACCESS_LOG_FLUSH_INTERVAL", value_parser = humantime::parse_duration, default_value = "10s")]
    pub flush_interval: Duration,
    /// How long access log rows are kept (then deleted).
    #[arg(id = "access_log_retention", long = "access-log-retention", env = "KEYBROKER_ACCESS_LOG_RETENTION", value_parser = humantime::parse_duration, default_value = "400days")]
    pub retention: Duration,
}

impl Default for AccessLogSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl AccessLogSettings {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        if self.flush_interval.is_zero() || self.retention < Duration::from_secs(3600) {
            return crate::settings::invalid(
                "access_log_flush_interval/access_log_retention",
                "must be longer than zero / at least 1h",
            );
        }
        Ok(())
    }
}

/// What one minute's count counts.
#[derive(Debug, Clone)]
struct CountKey {
    tenant_id: Box<str>,
    minute_ms: i64,
    caller: Box<str>,
    reason: Reason,
    key_binding: Box<str>,
    key_version: Box<str>,
    operation: &'static str,
    outcome: &'static str,
}

/// A count's key as borrowed fields: the hot path looks its count up with
/// the call's own strings and allocates only for a combination the minute
/// has not seen (the map's keys borrow as `dyn Counted`, the standard
/// library's way to look a compound key up by its parts).
type Parts<'a> = (
    &'a str,
    i64,
    &'a str,
    Reason,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
);

trait Counted {
    fn parts(&self) -> Parts<'_>;
}

impl Counted for CountKey {
    fn parts(&self) -> Parts<'_> {
        (
            &self.tenant_id,
            self.minute_ms,
            &self.caller,
            self.reason,
            &self.key_binding,
            &self.key_version,
            self.operation,
            self.outcome,
        )
    }
}

/// A use's count key, borrowed from the call.
struct Borrowed<'a>(Parts<'a>);

impl Counted for Borrowed<'_> {
    fn parts(&self) -> Parts<'_> {
        self.0
    }
}

/// Hashed by the parts that tell most counts apart (tenant, minute,
/// caller, key and version); reason, operation and outcome are left to the
/// comparison, which equal keys need anyway (a hash of fewer parts is
/// still equal for equal keys). Saves hashing four fields on every use.
impl std::hash::Hash for dyn Counted + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (tenant_id, minute_ms, caller, _, key_binding, key_version, _, _) = self.parts();
        (tenant_id, minute_ms, caller, key_binding, key_version).hash(state);
    }
}

impl PartialEq for dyn Counted + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn Counted + '_ {}

/// Hashed and compared by its parts, as `dyn Counted` is: a key found by
/// borrowed parts is the key stored.
impl std::hash::Hash for CountKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self as &dyn Counted).hash(state);
    }
}

impl PartialEq for CountKey {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for CountKey {}

impl<'a> std::borrow::Borrow<dyn Counted + 'a> for CountKey {
    fn borrow(&self) -> &(dyn Counted + 'a) {
        self
    }
}

/// One use of a tenant's key, as the call layer saw it.
#[derive(Debug, Clone, Copy)]
pub struct Use<'a> {
    pub tenant_id: &'a str,
    pub caller: &'a str,
    pub reason: Reason,
    pub reason_detail: &'a str,
    pub key_binding: &'a str,
    pub key_version: &'a str,
    /// The RPC's short name (`UnwrapKey`).
    pub operation: &'static str,
    /// A gRPC code name.
    pub outcome: &'static str,
    pub error: &'a str,
    pub request_id: &'a str,
}

/// The operation a method performs on a key, for the access log: batch
/// items as their single call. `None`: the method uses no key.
pub fn operation(method: &str) -> Option<&'static str> {
    let name = method.strip_prefix("keybroker.v1.KeyBroker/")?;
    let name = name.strip_prefix("Batch").unwrap_or(name);
    ["GenerateDataKey", "WrapKey", "UnwrapKey", "RewrapKey"]
        .into_iter()
        .find(|op| *op == name)
}

#[derive(Debug, Default)]
pub struct AccessLog {
    /// foldhash: keyed per process (what callers name cannot be chosen to
    /// collide), and a few times cheaper than SipHash on the hot path.
    counts: dashmap::DashMap<CountKey, u64, foldhash::fast::RandomState>,
    events: Mutex<Vec<AccessRecord>>,
    /// Individual records (or new counts) that found no room.
    dropped: AtomicU64,
    store: Option<Arc<dyn AccessStore>>,
}

impl AccessLog {
    /// A log kept in `store`; `None`: no registry, nothing is kept.
    pub fn new(store: Option<Arc<dyn AccessStore>>) -> Self {
        Self {
            store,
            ..Self::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.store.is_some()
    }

    /// Counts one use (and keeps it on its own when it is a refusal or the
    /// tenant logs its reason each time).
    pub fn record(&self, u: &Use<'_>) {
        if self.store.is_none() {
            return;
        }
        let now = crate::keys::now_ms();
        let minute_ms = now - now.rem_euclid(60_000);
        let parts = Borrowed((
            u.tenant_id,
            minute_ms,
            u.caller,
            u.reason,
            u.key_binding,
            u.key_version,
            u.operation,
            u.outcome,
        ));
        if let Some(mut count) = self.counts.get_mut(&parts as &dyn Counted) {
            *count += 1;
        } else if self.counts.len() < MAX_COUNTS {
            let key = CountKey {
                tenant_id: u.tenant_id.into(),
                minute_ms,
                caller: u.caller.into(),
                reason: u.reason,
                key_binding: u.key_binding.into(),
                key_version: u.key_version.into(),
                operation: u.operation,
                outcome: u.outcome,
            };
            *self.counts.entry(key).or_insert(0) += 1;
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        let refused = matches!(u.outcome, "PERMISSION_DENIED" | "FAILED_PRECONDITION");
        if refused || !u.reason_detail.is_empty() {
            let mut events = self.events.lock();
            if events.len() >= MAX_EVENTS {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            events.push(AccessRecord {
                tenant_id: u.tenant_id.to_owned(),
                time_ms: now,
                individual: true,
                caller: u.caller.to_owned(),
                reason: u.reason.as_str().to_owned(),
                reason_detail: u.reason_detail.to_owned(),
                key_binding: u.key_binding.to_owned(),
                key_version: u.key_version.to_owned(),
                operation: u.operation.to_owned(),
                outcome: u.outcome.to_owned(),
                error: u.error.to_owned(),
                request_id: u.request_id.to_owned(),
                count: 1,
            });
        }
    }

    /// Uses counted but not yet written to the registry.
    pub fn pending(&self) -> u64 {
        self.counts.iter().map(|e| *e.value()).sum()
    }

    /// Records that found no room (see [`MAX_EVENTS`], [`MAX_COUNTS`]).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes what was counted to the registry. Each count is taken out of
    /// the map on its own (a use counted meanwhile stays for the next
    /// flush); on failure everything taken is put back.
    pub async fn flush(&self) -> Result<(), crate::registry::RegistryError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let keys: Vec<CountKey> = self.counts.iter().map(|e| e.key().clone()).collect();
        let mut taken = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some((key, count)) = self.counts.remove(&key) {
                taken.push((key, count));
            }
        }
        let events = std::mem::take(&mut *self.events.lock());
        if taken.is_empty() && events.is_empty() {
            return Ok(());
        }
        let mut rows: Vec<AccessRecord> = taken
            .iter()
            .map(|(k, count)| AccessRecord {
                tenant_id: k.tenant_id.to_string(),
                time_ms: k.minute_ms,
                individual: false,
                caller: k.caller.to_string(),
                reason: k.reason.as_str().to_owned(),
                reason_detail: String::new(),
                key_binding: k.key_binding.to_string(),
                key_version: k.key_version.to_string(),
                operation: k.operation.to_owned(),
                outcome: k.outcome.to_owned(),
                error: String::new(),
                request_id: String::new(),
                count: *count,
            })
            .collect();
        let counted = rows.len();
        rows.extend(events);
        match store.add_access(&rows).await {
            Ok(()) => Ok(()),
            Err(err) => {
                for (key, count) in taken {
                    *self.counts.entry(key).or_insert(0) += count;
                }
                let mut events = self.events.lock();
                let room = MAX_EVENTS.saturating_sub(events.len());
                let back: Vec<AccessRecord> = rows.drain(counted..).collect();
                let lost = back.len().saturating_sub(room);
                events.extend(back.into_iter().take(room));
                self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
                Err(err)
            }
        }
    }

    /// Flushes every `flush_interval` and deletes rows past `retention`
    /// once an hour, until the returned future is dropped.
    pub fn run(
        self: &Arc<Self>,
        settings: AccessLogSettings,
    ) -> impl Future<Output = ()> + Send + 'static {
        let log = Arc::clone(self);
        async move {
            let Some(store) = log.store.clone() else {
                return;
            };
            let mut pruned_at: Option<std::time::Instant> = None;
            let mut dropped = 0;
            loop {
                tokio::time::sleep(settings.flush_interval).await;
                if let Err(err) = log.flush().await {
                    tracing::warn!(error = %err, pending = log.pending(), "could not write the key access log; kept in memory for the next flush");
                }
                let now_dropped = log.dropped();
                if now_dropped > dropped {
                    tracing::warn!(
                        dropped = now_dropped - dropped,
                        "key access log records found no room (more than 10,000 individual records between flushes, or a million distinct counts during a registry outage); their uses are still counted where a count had room"
                    );
                    dropped = now_dropped;
                }
                if pruned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(3600)) {
                    pruned_at = Some(std::time::Instant::now());
                    let retention =
                        i64::try_from(settings.retention.as_millis()).unwrap_or(i64::MAX);
                    let before = crate::keys::now_ms().saturating_sub(retention);
                    match store.prune_access(before).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(
                            rows = n,
                            "key access log rows past their retention deleted"
                        ),
                        Err(err) => {
                            tracing::warn!(error = %err, "could not prune the key access log")
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RegistryError;
    use crate::registry::access_log::AccessQuery;

    /// A store that keeps rows in memory, or fails.
    #[derive(Debug, Default)]
    struct Memory {
        rows: Mutex<Vec<AccessRecord>>,
        fail: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl AccessStore for Memory {
        async fn add_access(&self, records: &[AccessRecord]) -> Result<(), RegistryError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(RegistryError::Database("down".into()));
            }
            self.rows.lock().extend_from_slice(records);
            Ok(())
        }
        async fn access(&self, _: &AccessQuery) -> Result<Vec<(i64, AccessRecord)>, RegistryError> {
            Ok(Vec::new())
        }
        async fn prune_access(&self, _: i64) -> Result<u64, RegistryError> {
            Ok(0)
        }
    }

    fn a_use<'a>(caller: &'a str, outcome: &'static str, reason: Reason) -> Use<'a> {
        Use {
            tenant_id: "acme",
            caller,
            reason,
            reason_detail: "",
            key_binding: "cmk",
            key_version: "1",
            operation: "UnwrapKey",
            outcome,
            error: "",
            request_id: "r",
        }
    }

    /// A use already counted this minute is found by the call's borrowed
    /// strings (no key built): the stored key and its borrowed parts hash
    /// and compare alike.
    #[test]
    fn a_counted_use_is_found_by_its_borrowed_parts() {
        let log = AccessLog::new(Some(Arc::new(Memory::default()) as _));
        let u = a_use("spiffe://prod/storage", "OK", Reason::CustomerInitiated);
        log.record(&u);
        let stored = log.counts.iter().next().unwrap().key().clone();
        let parts = Borrowed(stored.parts());
        assert_eq!(log.counts.get(&parts as &dyn Counted).map(|c| *c), Some(1));
        let other = Borrowed((
            "acme",
            stored.minute_ms,
            "spiffe://prod/storage",
            Reason::CustomerInitiated,
            "cmk",
            "2",
            "UnwrapKey",
            "OK",
        ));
        assert!(log.counts.get(&other as &dyn Counted).is_none());
        log.record(&u);
        assert_eq!(log.counts.len(), 1);
        assert_eq!(log.pending(), 2);
    }

    #[tokio::test]
    async fn counts_are_exact_through_a_failed_flush() {
        let store = Arc::new(Memory::default());
        let log = AccessLog::new(Some(Arc::clone(&store) as _));
        let caller = "spiffe://prod/storage";
        for _ in 0..1000 {
            log.record(&a_use(caller, "OK", Reason::CustomerInitiated));
        }
        for _ in 0..3 {
            log.record(&a_use(caller, "PERMISSION_DENIED", Reason::Migration));
        }
        assert_eq!(log.pending(), 1003);
        store.fail.store(true, Ordering::SeqCst);
        assert!(log.flush().await.is_err());
        assert_eq!(log.pending(), 1003, "a failed flush loses nothing");
        log.record(&a_use(caller, "OK", Reason::CustomerInitiated));
        store.fail.store(false, Ordering::SeqCst);
        log.flush().await.unwrap();
        assert_eq!(log.pending(), 0);
        let rows = store.rows.lock().clone();
        let counted: u64 = rows.iter().filter(|r| !r.individual).map(|r| r.count).sum();
        assert_eq!(counted, 1004);
        // One row per combination; the refusals on their own as well.
        assert_eq!(rows.iter().filter(|r| !r.individual).count(), 2);
        assert_eq!(rows.iter().filter(|r| r.individual).count(), 3);
        assert_eq!(log.dropped(), 0);
    }

    #[tokio::test]
    async fn concurrent_uses_are_all_counted() {
        let store = Arc::new(Memory::default());
        let log = Arc::new(AccessLog::new(Some(Arc::clone(&store) as _)));
        let caller = "spiffe://prod/storage";
        let mut tasks = Vec::new();
        for t in 0..8 {
            let log = Arc::clone(&log);
            tasks.push(tokio::spawn(async move {
                for i in 0..5000 {
                    log.record(&a_use(caller, "OK", Reason::CustomerInitiated));
                    if (i + t) % 997 == 0 {
                        // Flushes racing the counting.
                        log.flush().await.unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        log.flush().await.unwrap();
        let total: u64 = store.rows.lock().iter().map(|r| r.count).sum();
        assert_eq!(total, 40_000);
    }

    #[test]
    fn operations_are_the_key_methods() {
        for (method, op) in [
            ("keybroker.v1.KeyBroker/UnwrapKey", Some("UnwrapKey")),
            ("keybroker.v1.KeyBroker/BatchUnwrapKey", Some("UnwrapKey")),
            (
                "keybroker.v1.KeyBroker/BatchGenerateDataKey",
                Some("GenerateDataKey"),
            ),
            ("keybroker.v1.KeyBroker/WrapKey", Some("WrapKey")),
            ("keybroker.v1.KeyBroker/RewrapKey", Some("RewrapKey")),
            ("keybroker.v1.KeyBroker/DescribeKey", None),
            ("keybroker.v1.KeyAdmin/GetKey", None),
        ] {
            assert_eq!(operation(method), op, "{method}");
        }
    }

    #[test]
    fn individual_records_are_bounded() {
        let store = Arc::new(Memory::default());
        let log = AccessLog::new(Some(store as _));
        let caller = "c";
        for _ in 0..MAX_EVENTS + 5 {
            log.record(&a_use(caller, "FAILED_PRECONDITION", Reason::NoReason));
        }
        assert_eq!(log.dropped(), 5);
        assert_eq!(log.pending(), (MAX_EVENTS + 5) as u64, "counts stay exact");
    }
}
