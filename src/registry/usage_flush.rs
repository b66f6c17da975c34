//! Key usage counters: kept in memory per (tenant, binding), written to the
//! registry on a timer, put back when a write fails.

use std::sync::Arc;
use std::time::Duration;

use super::directory::RegistryDirectory;
use super::{FLEET, UsageDelta, VersionUsageRecord};
use crate::keys::{
    BindingUsage, PLATFORM_BINDING, TENANT_KEY_USAGE, TakenUsage, UsageCounts, VersionId,
};

impl RegistryDirectory {
    pub(super) fn usage_for(&self, tenant_id: &str, name: &str) -> Arc<BindingUsage> {
        let mut map = self.usage.lock();
        Arc::clone(
            map.entry((tenant_id.to_owned(), name.to_owned()))
                .or_default(),
        )
    }

    /// Usage not yet flushed to the registry.
    pub fn pending_usage(&self, tenant_id: &str, name: &str) -> UsageCounts {
        let map = self.usage.lock();
        map.get(&(tenant_id.to_owned(), name.to_owned()))
            .map(|u| u.peek())
            .unwrap_or_default()
    }

    pub fn forget_usage(&self, tenant_id: &str, name: &str) {
        let mut map = self.usage.lock();
        map.remove(&(tenant_id.to_owned(), name.to_owned()));
    }

    /// Writes accumulated usage to the registry. On failure the counts are
    /// put back for the next flush, so none are lost. The platform binding
    /// is one for every tenant: its uses are stored fleet-wide.
    /// Usage counts not yet written to the registry: (wraps, unwraps).
    pub fn unflushed_usage(&self) -> (u64, u64) {
        let map = self.usage.lock();
        map.values()
            .chain(std::iter::once(&self.platform.usage))
            .map(|usage| usage.peek())
            .fold((0, 0), |(w, u), c| (w + c.wraps, u + c.unwraps))
    }

    pub async fn flush_usage(&self) -> Result<(), super::RegistryError> {
        let mut sources: Vec<(String, String, Arc<BindingUsage>)> = {
            let map = self.usage.lock();
            map.iter()
                .map(|((tenant_id, name), usage)| {
                    (tenant_id.clone(), name.clone(), Arc::clone(usage))
                })
                .collect()
        };
        sources.push((
            FLEET.to_owned(),
            PLATFORM_BINDING.to_owned(),
            Arc::clone(&self.platform.usage),
        ));
        let taken: Vec<(Arc<BindingUsage>, TakenUsage, UsageDelta)> = sources
            .into_iter()
            .filter_map(|(tenant_id, name, usage)| {
                let counts = usage.take();
                (!counts.is_empty()).then(|| {
                    let delta = UsageDelta {
                        versions: version_records(&name, &counts.versions),
                        tenant_id,
                        name,
                        wraps: counts.total.wraps,
                        unwraps: counts.total.unwraps,
                        last_used_at_ms: counts.total.last_used_ms,
                    };
                    (usage, counts, delta)
                })
            })
            .collect();
        let deltas: Vec<UsageDelta> = taken.iter().map(|(_, _, d)| d.clone()).collect();
        if let Err(err) = self.registry.add_usage(&deltas).await {
            for (usage, counts, _) in taken {
                usage.restore(&counts);
            }
            return Err(err);
        }
        Ok(())
    }

    /// Flushes usage every `interval` until the directory is dropped.
    pub fn usage_flusher(
        self: &Arc<Self>,
        interval: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let directory = Arc::downgrade(self);
        async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(directory) = directory.upgrade() else {
                    return;
                };
                if let Err(err) = directory.flush_usage().await {
                    tracing::warn!(error = %err, "could not flush key usage counters; will retry");
                }
            }
        }
    }
}

/// Stored rows of one binding's per-version uses. Tenant key versions are
/// stored under their own name, whichever binding protects them.
fn version_records(name: &str, versions: &[(VersionId, UsageCounts)]) -> Vec<VersionUsageRecord> {
    versions
        .iter()
        .map(|(id, counts)| VersionUsageRecord {
            key_name: match id {
                VersionId::TenantKey(_) => TENANT_KEY_USAGE.to_owned(),
                VersionId::Provider(_) => name.to_owned(),
            },
            version: id.label(),
            wraps: counts.wraps,
            unwraps: counts.unwraps,
            last_used_at_ms: counts.last_used_ms,
        })
        .collect()
}
