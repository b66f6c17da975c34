//! Key-state revalidation (DESIGN.md section 5). Every interval, each ACTIVE
//! or REVOKED binding is described through its provider (for AWS: through
//! the customer's role). A key the customer disabled, scheduled for deletion,
//! destroyed, or stopped sharing becomes REVOKED at once: its DEKs leave the
//! cache and unwraps fail FAILED_PRECONDITION with the reason. A key usable
//! again becomes ACTIVE on the next check. An outage (throttling, timeouts,
//! 5xx) changes nothing: cached DEKs keep being served until their TTL.
//!
//! The bound "revoked → no plaintext served" is the interval (plus up to 10%
//! jitter) plus one describe call; a live request that sees a definitive
//! error asks for an out-of-turn describe sooner (`registry::key_state`),
//! and the describe, never the request, decides.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::keys::BindingState;
use crate::metrics::{CheckCounts, KeyStateSource};
use crate::registry::directory::RegistryDirectory;
use crate::registry::{Applied, Verdict};

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

#[derive(Debug)]
pub struct Watcher {
    directory: Arc<RegistryDirectory>,
    settings: WatcherSettings,
    /// Cumulative results and the binding states of the last pass; written
    /// once per pass, read by metrics scrapes.
    totals: std::sync::Mutex<(CheckCounts, Vec<(&'static str, u64)>)>,
    /// Passes completed (tests wait for one instead of trusting a sleep).
    passes: std::sync::atomic::AtomicU64,
}

impl Watcher {
    pub fn new(directory: Arc<RegistryDirectory>, settings: WatcherSettings) -> Self {
        Self {
            directory,
            settings,
            totals: std::sync::Mutex::default(),
            passes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Passes completed since start.
    pub fn passes(&self) -> u64 {
        self.passes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Checks every watched binding once.
    pub async fn pass(&self) -> PassSummary {
        let bindings = match self.directory.registry().bindings_to_watch().await {
            Ok(b) => b,
            Err(err) => {
                tracing::warn!(error = %err, "watcher could not list key bindings; will retry");
                return PassSummary::default();
            }
        };
        // Each result is applied as soon as its check completes: a
        // revocation never waits for the rest of the pass.
        let total = bindings.len();
        let (summary, revoked_now) = futures::stream::iter(bindings)
            .map(|(record, external_id)| async move {
                let verdict = self.directory.check_binding(&record, &external_id).await;
                let revoked = match &verdict {
                    Verdict::Usable => false,
                    Verdict::Revoked(_) => true,
                    Verdict::Outage => record.state == BindingState::Revoked,
                };
                (
                    self.directory.apply_verdict(&record, &verdict).await,
                    revoked,
                )
            })
            .buffer_unordered(self.settings.concurrency.max(1))
            .fold(
                (PassSummary::default(), 0u64),
                |(mut summary, mut revoked), (result, is_revoked)| async move {
                    summary.checked += 1;
                    revoked += u64::from(is_revoked);
                    match result {
                        Applied::Revoked => summary.revoked += 1,
                        Applied::Restored => summary.restored += 1,
                        Applied::Outage => summary.outages += 1,
                        Applied::Unchanged => {}
                    }
                    (summary, revoked)
                },
            )
            .await;
        if let Ok(mut totals) = self.totals.lock() {
            let t = &mut totals.0;
            t.revoked += summary.revoked as u64;
            t.restored += summary.restored as u64;
            t.outages += summary.outages as u64;
            t.ok += (summary.checked - summary.revoked - summary.restored - summary.outages) as u64;
            totals.1 = vec![
                ("active", total as u64 - revoked_now),
                ("revoked", revoked_now),
            ];
        }
        self.passes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        summary
    }

    /// Runs a pass every interval (±10% jitter, so replicas do not check in
    /// lockstep) until the watcher is dropped.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let watcher = Arc::downgrade(self);
        let interval = self.settings.interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(jittered(interval)).await;
                let Some(watcher) = watcher.upgrade() else {
                    return;
                };
                let summary = watcher.pass().await;
                if summary.revoked + summary.restored + summary.outages > 0 {
                    tracing::info!(?summary, "key-state watcher pass");
                }
            }
        })
    }
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
        self.totals.lock().map(|t| t.0).unwrap_or_default()
    }

    fn bindings_by_state(&self) -> Vec<(&'static str, u64)> {
        self.totals.lock().map(|t| t.1.clone()).unwrap_or_default()
    }
}
