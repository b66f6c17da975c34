//! Key-state revalidation (DESIGN.md section 5). Every interval, each ACTIVE
//! or REVOKED binding is described through its provider (for AWS: through
//! the customer's role). A key the customer disabled, scheduled for deletion,
//! destroyed, or stopped sharing becomes REVOKED at once: its DEKs leave the
//! cache and unwraps fail FAILED_PRECONDITION with the reason. A key usable
//! again becomes ACTIVE on the next check. An outage (throttling, timeouts,
//! 5xx) changes nothing: cached DEKs keep being served until their TTL.
//!
//! One pass per fleet: replicas claim due bindings through the registry
//! (`claim_checks`), so each binding is described about once per interval
//! whatever the replica count, and a verdict reaches the other replicas as
//! a registry change (PostgreSQL NOTIFY; `registry_cache_ttl` at worst).
//!
//! The bound "revoked → no plaintext served" is the interval plus one tick
//! (a tenth of it, see [`Watcher::tick`]) plus one describe call; the
//! bindings of a replica that died are taken over 1.25 intervals after its
//! last claim (once: 1.25 intervals plus a tick plus a describe). A live request that sees a
//! definitive error asks for an out-of-turn describe sooner
//! (`registry::key_state`), and the describe, never the request, decides.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::metrics::{CheckCounts, KeyStateSource};
use crate::registry::directory::RegistryDirectory;
use crate::registry::{Applied, CheckClaim};

/// The `watcher_*` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct WatcherSettings {
    /// How often every customer key's state is checked with its provider:
    /// the revocation bound is about this plus one describe call.
    #[arg(id = "watcher_interval", long = "watcher-interval", env = "KEYBROKER_WATCHER_INTERVAL", value_parser = humantime::parse_duration, default_value = "30s")]
    pub interval: Duration,
    /// Key-state checks in flight at once, so thousands of bindings never
    /// burst a KMS quota.
    #[arg(
        id = "watcher_concurrency",
        long = "watcher-concurrency",
        env = "KEYBROKER_WATCHER_CONCURRENCY",
        default_value = "16"
    )]
    pub concurrency: usize,
    /// At most one out-of-turn describe of a key per this interval, however
    /// many live requests see "disabled" or "access denied"
    /// (`registry::key_state`).
    #[arg(id = "recheck_interval", long = "recheck-interval", env = "KEYBROKER_RECHECK_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub recheck_interval: Duration,
}

impl Default for WatcherSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl WatcherSettings {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        if self.recheck_interval.is_zero() {
            return crate::settings::invalid(
                "recheck_interval",
                "must be longer than zero (it rate-limits describes that requests trigger)",
            );
        }
        if self.interval.is_zero() || self.concurrency == 0 {
            return crate::settings::invalid(
                "watcher_interval/watcher_concurrency",
                "must be longer than zero / at least 1",
            );
        }
        Ok(())
    }
}

/// What one pass found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassSummary {
    pub checked: usize,
    pub revoked: usize,
    pub restored: usize,
    /// Checks that failed transiently (no state change).
    pub outages: usize,
}

impl PassSummary {
    fn add(&mut self, other: PassSummary) {
        self.checked += other.checked;
        self.revoked += other.revoked;
        self.restored += other.restored;
        self.outages += other.outages;
    }
}

#[derive(Debug)]
pub struct Watcher {
    directory: Arc<RegistryDirectory>,
    settings: WatcherSettings,
    /// Cumulative results of this replica's checks, and the fleet's
    /// bindings by state (counted at most once per interval); written per
    /// pass, read by metrics scrapes.
    totals: parking_lot::Mutex<(CheckCounts, Vec<(&'static str, u64)>)>,
    /// Passes that checked something (tests wait for one instead of
    /// trusting a sleep).
    passes: std::sync::atomic::AtomicU64,
    /// When the bindings-by-state gauge was last counted. A plain lock: read
    /// and set, never held across an await.
    counted_at: parking_lot::Mutex<Option<std::time::Instant>>,
    /// This process's id in watcher claims (random per start).
    replica_id: String,
    /// The last claim failed: the registry does not answer.
    registry_down: std::sync::atomic::AtomicBool,
}

/// Bindings claimed per registry round trip; a tick claims again until
/// fewer come back, so a backlog drains in one tick.
const CLAIM_BATCH: usize = 256;

impl Watcher {
    pub fn new(directory: Arc<RegistryDirectory>, settings: WatcherSettings) -> Self {
        Self {
            directory,
            settings,
            totals: parking_lot::Mutex::default(),
            passes: std::sync::atomic::AtomicU64::new(0),
            counted_at: parking_lot::Mutex::new(None),
            replica_id: replica_id(),
            registry_down: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Passes that checked at least one binding since start.
    pub fn passes(&self) -> u64 {
        self.passes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How often a replica looks for due bindings: a tenth of the interval
    /// (50 ms to 5 s). A binding is checked at most this late, so the
    /// revocation bound is the interval plus this plus one describe call.
    pub fn tick(&self) -> Duration {
        (self.settings.interval / 10).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// Checks every binding due now, fleet-wide. Bindings are claimed
    /// through the registry: this replica's own once an interval has passed
    /// since it last claimed them, anyone else's (a dead replica's, or new
    /// ones) a quarter interval after that. Sticky claims keep each binding
    /// with one replica, so its AWS role session stays warm there instead of
    /// on every replica.
    pub async fn pass(&self) -> PassSummary {
        let interval_ms = i64::try_from(self.settings.interval.as_millis()).unwrap_or(i64::MAX);
        let mut summary = PassSummary::default();
        let mut first = true;
        let mut registry_answered = true;
        // The registry did not answer last pass: the keys served from memory
        // are checked first, not after the claim's write deadline.
        let mut checked_in_memory = false;
        if self
            .registry_down
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.check_from_memory(&mut summary).await;
            checked_in_memory = true;
        }
        loop {
            let now = crate::keys::now_ms();
            // Others' bindings in the first round only: a replica takes at
            // most one batch of them per tick, so orphans spread over the
            // replicas that tick meanwhile.
            let claim = CheckClaim {
                claimer: &self.replica_id,
                now_ms: now,
                own_due_before_ms: now.saturating_sub(interval_ms),
                others_due_before_ms: if first {
                    now.saturating_sub(interval_ms.saturating_add(interval_ms / 4))
                } else {
                    i64::MIN
                },
            };
            first = false;
            // Within the data path's write deadline: a registry that does not
            // answer must not delay the checks from memory below.
            let claimed = match self
                .directory
                .data_path_write(self.directory.registry().claim_checks(&claim, CLAIM_BATCH))
                .await
            {
                Ok(b) => b,
                Err(err) => {
                    tracing::warn!(error = %err, "watcher could not claim key bindings to check; checking the keys this replica serves from memory");
                    registry_answered = false;
                    self.registry_down
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    if !checked_in_memory {
                        self.check_from_memory(&mut summary).await;
                    }
                    break;
                }
            };
            self.registry_down
                .store(false, std::sync::atomic::Ordering::Relaxed);
            let full = claimed.len() == CLAIM_BATCH;
            summary.add(self.check_all(claimed).await);
            if !full {
                break;
            }
        }
        {
            let mut totals = self.totals.lock();
            let t = &mut totals.0;
            t.revoked += summary.revoked as u64;
            t.restored += summary.restored as u64;
            t.outages += summary.outages as u64;
            t.ok += summary
                .checked
                .saturating_sub(summary.revoked + summary.restored + summary.outages)
                as u64;
        }
        if summary.checked > 0 {
            self.passes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        // Not while the registry does not answer: waiting for its pool
        // would hold the next checks from memory back by seconds.
        if registry_answered {
            self.count_states().await;
        }
        summary
    }

    /// The keys this replica serves, described from memory while the
    /// registry cannot hand out claims.
    async fn check_from_memory(&self, summary: &mut PassSummary) {
        let (checked, revoked) = self
            .directory
            .check_in_memory(self.settings.concurrency)
            .await;
        summary.checked += checked;
        summary.revoked += revoked;
    }

    /// Checks claimed bindings, `watcher_concurrency` at a time. Each result
    /// is applied as soon as its check completes: a revocation never waits
    /// for the rest.
    async fn check_all(
        &self,
        bindings: Vec<(crate::registry::BindingRecord, String)>,
    ) -> PassSummary {
        futures::stream::iter(bindings)
            .map(|(record, external_id)| async move {
                let verdict = self.directory.check_binding(&record, &external_id).await;
                self.directory.apply_verdict(&record, &verdict).await
            })
            .buffer_unordered(self.settings.concurrency.max(1))
            .fold(PassSummary::default(), |mut summary, applied| async move {
                summary.checked += 1;
                match applied {
                    Applied::Revoked => summary.revoked += 1,
                    Applied::Restored => summary.restored += 1,
                    Applied::Outage => summary.outages += 1,
                    Applied::Unchanged => {}
                }
                summary
            })
            .await
    }

    /// Refreshes the fleet-wide bindings-by-state gauge, at most once per
    /// interval (one grouped count in the registry).
    async fn count_states(&self) {
        let due = self
            .counted_at
            .lock()
            .is_none_or(|at| at.elapsed() >= self.settings.interval);
        if !due {
            return;
        }
        let counted = self
            .directory
            .data_path_write(self.directory.registry().binding_states())
            .await;
        match counted {
            Ok(counts) => {
                self.totals.lock().1 = counts;
                *self.counted_at.lock() = Some(std::time::Instant::now());
            }
            Err(err) => tracing::warn!(error = %err, "could not count key bindings by state"),
        }
    }

    /// Looks for due bindings every [`tick`](Self::tick) (±10% jitter)
    /// until the watcher is dropped.
    pub fn run(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let watcher = Arc::downgrade(self);
        let tick = self.tick();
        async move {
            loop {
                tokio::time::sleep(jittered(tick)).await;
                let Some(watcher) = watcher.upgrade() else {
                    return;
                };
                let summary = watcher.pass().await;
                if summary.revoked + summary.restored + summary.outages > 0 {
                    tracing::info!(?summary, "key-state watcher pass");
                }
            }
        }
    }
}

fn replica_id() -> String {
    let mut bytes = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    hex::encode(bytes)
}

fn jittered(interval: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = aws_lc_rs::rand::fill(&mut byte);
    // 90% .. 110% of the interval.
    interval.mul_f64(0.9 + f64::from(byte[0]) / 255.0 * 0.2)
}

/// Metrics read the watcher's results through this, at scrape time.
impl KeyStateSource for Watcher {
    fn check_totals(&self) -> CheckCounts {
        self.totals.lock().0
    }

    fn bindings_by_state(&self) -> Vec<(&'static str, u64)> {
        self.totals.lock().1.clone()
    }
}
