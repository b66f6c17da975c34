//! Automatic rotation of the platform keyring: a new version once per
//! `platform_keyring_rotation_period`, fleet-wide. Replicas share the
//! keyring file; the registry decides which one rotates (a claim that moves
//! forward once per period), the others pick the new version up with their
//! reloader (or at once, when a wrapped key names it).
//!
//! A keyring mounted read-only (a Kubernetes Secret) cannot be rotated in
//! place: keybroker says so once and the operator rotates it
//! (`keybroker keyring rotate`, then a rollout). Imported key material is
//! never replaced by keybroker: it is the customer's, and like Vault's
//! imported transit keys it rotates when the customer imports a new version.
//! Tenant keys rotate on their own period as DEKs are sealed
//! (`tenant_key_rotation_period`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::keys::now_ms;
use crate::registry::FLEET;
use crate::registry::directory::RegistryDirectory;

/// The registry's name for the platform keyring's rotation claim.
const SUBJECT: &str = "platform-keyring";

#[derive(Debug)]
pub struct PlatformRotation {
    directory: Arc<RegistryDirectory>,
    path: PathBuf,
    period: Duration,
    /// Said once per process: a read-only keyring is due for rotation.
    warned_read_only: AtomicBool,
    /// Rotations this process made (tests, logs).
    rotations: AtomicU64,
}

impl PlatformRotation {
    pub fn new(directory: Arc<RegistryDirectory>, path: PathBuf, period: Duration) -> Self {
        Self {
            directory,
            path,
            period,
            warned_read_only: AtomicBool::new(false),
            rotations: AtomicU64::new(0),
        }
    }

    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }

    /// Rotates if the newest version is older than the period and this
    /// replica wins the claim; the new version's number if it did.
    pub async fn check(&self) -> anyhow::Result<Option<u32>> {
        if self.period.is_zero() {
            return Ok(None);
        }
        let keyring = self.directory.platform_keyring();
        // Another replica may have rotated the shared file already.
        keyring.reload_if_changed()?;
        let period_ms = i64::try_from(self.period.as_millis()).unwrap_or(i64::MAX);
        let created_ms =
            i64::try_from(keyring.newest_created_unix().saturating_mul(1000)).unwrap_or(i64::MAX);
        let now = now_ms();
        if now.saturating_sub(created_ms) < period_ms {
            return Ok(None);
        }
        if std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .is_err()
        {
            if !self.warned_read_only.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    path = %self.path.display(),
                    newest_version = keyring.newest_version(),
                    "the platform keyring is due for rotation but its file is read-only (a mounted Secret?): \
                     run `keybroker keyring rotate` on the Secret's file and roll the replicas out"
                );
            }
            return Ok(None);
        }
        let claimed = self
            .directory
            .registry()
            .claim_rotation(SUBJECT, now.saturating_sub(period_ms), now)
            .await?;
        if !claimed {
            // Another replica rotates (or just did) this period.
            return Ok(None);
        }
        let version = keyring.rotate()?;
        self.rotations.fetch_add(1, Ordering::Relaxed);
        // Views carry no keyring version, but other replicas should reload
        // soon: the notification resynchronises them.
        self.directory.changed(FLEET, None).await;
        tracing::info!(version, "platform keyring rotated automatically");
        Ok(Some(version))
    }

    /// Checks every `interval` while the returned task runs (the server
    /// owns it and aborts it on shutdown).
    pub fn run(self: &Arc<Self>, interval: Duration) -> impl Future<Output = ()> + Send + 'static {
        let rotation = Arc::downgrade(self);
        async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(rotation) = rotation.upgrade() else {
                    return;
                };
                if let Err(err) = rotation.check().await {
                    tracing::warn!(error = %err, "automatic platform keyring rotation failed; will retry");
                }
            }
        }
    }
}
