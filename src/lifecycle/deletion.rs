//! Deleting a tenant: scheduled, then shredded (DESIGN.md section 4b.2).
//!
//! DeleteTenant records when the tenant's keys are destroyed (the restore
//! window, `deletion_window`, default 7 days, as KMS ScheduleKeyDeletion's
//! and Atlassian's restore windows do; a call may ask for 0, meaning now).
//! Until then every data-plane call for the tenant is refused, naming the
//! time and CancelTenantDeletion, which makes it as it was. At the end,
//! [`Lifecycle::shred`] deletes every row of the tenant in one transaction
//! and leaves a tombstone of its incarnation: a re-created id is a new
//! incarnation, and no wrapped key of an earlier one unwraps (those sealed
//! under its tenant keys cannot: the keys are gone; older wrapped keys
//! without an incarnation are refused by the tombstone). Then the database
//! drops what it kept of the rows (SQLite `secure_delete` zeroes them in
//! the file; PostgreSQL `VACUUM FULL` rewrites the tables): what remains is
//! in the operator's WAL archives and backups, which they must bound.

use std::sync::Arc;
use std::time::Duration;

use super::{Lifecycle, LifecycleError};
use crate::keys::now_ms;
use crate::registry::{RegistryError, Tenant, UnlinkGuard};

/// How many due deletions one maintenance pass shreds.
const SHRED_BATCH: usize = 100;

/// The `deletion_*` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct DeletionSettings {
    /// How long a deleted tenant can be restored (CancelTenantDeletion)
    /// before its keys are destroyed; DeleteTenant may ask for another
    /// window, 0 for at once.
    #[arg(id = "deletion_window", long = "deletion-window", env = "KEYBROKER_DELETION_WINDOW", value_parser = humantime::parse_duration, default_value = "7days")]
    pub window: Duration,
    /// How often each replica shreds the deletions that came due and resumes
    /// key changes a crashed replica left: the time from a window's end to
    /// its rows gone is at most this.
    #[arg(id = "maintenance_interval", long = "maintenance-interval", env = "KEYBROKER_MAINTENANCE_INTERVAL", value_parser = humantime::parse_duration, default_value = "1m")]
    pub maintenance_interval: Duration,
}

impl Default for DeletionSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl DeletionSettings {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        if self.maintenance_interval.is_zero() {
            return crate::settings::invalid("maintenance_interval", "must be longer than zero");
        }
        Ok(())
    }
}

/// A scheduled (or done) deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    /// When the tenant's keys are (or were) destroyed, unix ms.
    pub delete_at_ms: i64,
    /// The window was 0: the tenant is gone already.
    pub shredded: bool,
}

impl Lifecycle {
    /// Schedules the deletion of `tenant_id` in `window`; usage must be
    /// flushed first (the guard reads it). Scheduling again keeps the
    /// earlier time unless the new one is sooner.
    pub async fn schedule_deletion(
        &self,
        tenant_id: &str,
        window: Duration,
        guard: UnlinkGuard,
    ) -> Result<Scheduled, LifecycleError> {
        let mut tx = self
            .registry()
            .lock_tenant(tenant_id)
            .await?
            .ok_or_else(|| RegistryError::TenantNotFound(tenant_id.to_owned()))?;
        if !guard.force && tx.tenant().delete_at_ms.is_none() {
            for binding in tx.bindings().await? {
                if let Some(last) = binding.last_used_at_ms
                    && last >= guard.not_used_since_ms
                {
                    return Err(RegistryError::Refused(format!(
                        "tenant '{tenant_id}' used its key '{}' {}s ago; deleting it makes every DEK of the tenant unreadable. \
                         Wait for the unlink guard window, or delete with force",
                        binding.name,
                        (now_ms() - last).max(0) / 1000
                    ))
                    .into());
                }
            }
        }
        let now = now_ms();
        let at = now.saturating_add(i64::try_from(window.as_millis()).unwrap_or(i64::MAX));
        let at = tx
            .tenant()
            .delete_at_ms
            .map_or(at, |earlier| earlier.min(at));
        tx.tenant_mut().delete_at_ms = Some(at);
        tx.write_tenant(now).await?;
        tx.commit().await?;
        // Refused from now on: nothing of the tenant stays in memory.
        self.directory.purged(tenant_id).await;
        tracing::warn!(
            tenant = tenant_id,
            delete_at = %crate::text::rfc3339(at),
            "tenant deletion scheduled; every data-plane call for it is refused until then, and its keys are destroyed then"
        );
        let shredded = at <= now && self.shred(tenant_id).await?;
        Ok(Scheduled {
            delete_at_ms: at,
            shredded,
        })
    }

    /// Cancels a scheduled deletion: the tenant serves as before.
    pub async fn cancel_deletion(&self, tenant_id: &str) -> Result<Tenant, LifecycleError> {
        let mut tx = self.registry().lock_tenant(tenant_id).await?.ok_or_else(|| {
            RegistryError::TenantNotFound(format!(
                "{tenant_id} (if it was deleted, its keys are destroyed: a deletion is cancelled only before its time)"
            ))
        })?;
        if tx.tenant().delete_at_ms.is_none() {
            return Err(RegistryError::Refused(format!(
                "tenant '{tenant_id}' has no deletion scheduled"
            ))
            .into());
        }
        tx.tenant_mut().delete_at_ms = None;
        tx.write_tenant(now_ms()).await?;
        let tenant = tx.tenant().clone();
        tx.commit().await?;
        self.directory.changed(tenant_id, None).await;
        tracing::info!(tenant = tenant_id, "tenant deletion cancelled");
        Ok(tenant)
    }

    /// Destroys a tenant whose deletion is due: `false` when it is not (not
    /// scheduled, cancelled, or later).
    pub async fn shred(&self, tenant_id: &str) -> Result<bool, LifecycleError> {
        let Some(mut tx) = self.registry().lock_tenant(tenant_id).await? else {
            return Ok(false);
        };
        let now = now_ms();
        if tx.tenant().delete_at_ms.is_none_or(|at| at > now) {
            return Ok(false);
        }
        let bindings = tx.bindings().await?;
        let incarnation = tx.tenant().incarnation;
        tx.shred(now).await?;
        tx.commit().await?;
        for binding in &bindings {
            self.directory.forget_usage(tenant_id, &binding.name);
        }
        self.directory
            .forget_usage(tenant_id, crate::keys::TENANT_KEY_USAGE);
        self.directory.purged(tenant_id).await;
        self.registry().compact().await?;
        tracing::warn!(
            tenant = tenant_id,
            incarnation,
            "tenant shredded: its keys and key versions are destroyed"
        );
        Ok(true)
    }

    /// Shreds every deletion that came due; how many.
    pub async fn shred_due(&self) -> Result<usize, LifecycleError> {
        let mut done = 0;
        for tenant_id in self.registry().due_deletions(now_ms(), SHRED_BATCH).await? {
            if self.shred(&tenant_id).await? {
                done += 1;
            }
        }
        Ok(done)
    }
}

/// The lifecycle's periodic work on every replica: shred due deletions,
/// resume stalled key changes. Stops when the lifecycle is dropped.
#[derive(Debug)]
pub struct Shredder;

impl Shredder {
    pub fn run(
        lifecycle: &Arc<Lifecycle>,
        interval: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let lifecycle = Arc::downgrade(lifecycle);
        async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(lifecycle) = lifecycle.upgrade() else {
                    return;
                };
                match lifecycle.shred_due().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(tenants = n, "scheduled tenant deletions done"),
                    Err(err) => {
                        tracing::warn!(error = %err, "could not shred due tenant deletions; will retry")
                    }
                }
                if let Err(err) = lifecycle.resume_key_changes(true).await {
                    tracing::warn!(error = %err, "could not resume stalled key changes; will retry");
                }
            }
        }
    }
}
