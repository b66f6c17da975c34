//! How changes reach every replica's memory: applied here at once, and
//! followed from other replicas through PostgreSQL LISTEN/NOTIFY.

use std::sync::Arc;
use std::time::Duration;

use super::FLEET;
use super::directory::{ALL_BINDINGS, RegistryDirectory};

impl RegistryDirectory {
    /// A tenant's keys changed (`binding` names the one, if one): forget the
    /// cached view so the next request reloads it, and drop the DEKs that
    /// binding unwrapped. Every state change goes through here.
    pub async fn changed(&self, tenant_id: &str, binding: Option<&str>) {
        self.apply_change(tenant_id, binding).await;
        if let Err(err) = self.registry.publish_change(tenant_id, binding).await {
            // Other replicas still converge within registry_cache_ttl.
            tracing::warn!(error = %err, tenant = tenant_id, "could not notify other replicas of a key change");
        }
    }

    /// A tenant was scheduled for deletion or destroyed: forget its view and
    /// drop everything of it from the cache, on every replica.
    pub async fn purged(&self, tenant_id: &str) {
        self.changed(tenant_id, Some(ALL_BINDINGS)).await;
    }

    /// Applies a change in this process only (a change another replica
    /// made, or one this process just wrote). Cache purges come first:
    /// they move the tenant's cache generation, which a view built after
    /// the forget below carries, so nothing loaded before is served.
    async fn apply_change(&self, tenant_id: &str, binding: Option<&str>) {
        if tenant_id == FLEET {
            // The platform keyring changed for every tenant.
            self.resync().await;
            return;
        }
        match binding {
            Some(ALL_BINDINGS) => self.cache.purge_tenant(tenant_id).await,
            Some(name) => self.cache.purge_binding(tenant_id, name).await,
            None => {}
        }
        self.views.forget(tenant_id).await;
    }

    /// Follows other replicas' changes through PostgreSQL LISTEN until the
    /// directory is dropped. When the connection is lost, notifications may
    /// be missed: every view is distrusted at once (refreshed before it is
    /// trusted again, served meanwhile only as a stale view is, within the
    /// outage grace), and the listener reconnects with a short backoff. Once
    /// connected again, before any notification is applied, the directory
    /// resynchronises: every view is dropped and every cached key purged
    /// (a missed deletion's plaintext goes too).
    pub fn change_listener(
        self: &Arc<Self>,
        url: String,
    ) -> impl Future<Output = ()> + Send + 'static {
        const FIRST_RETRY: Duration = Duration::from_millis(100);
        const LAST_RETRY: Duration = Duration::from_secs(2);
        let directory = Arc::downgrade(self);
        async move {
            let mut retry = FIRST_RETRY;
            loop {
                let mut listener = match connect_listener(&url).await {
                    Ok(listener) => listener,
                    Err(err) => {
                        tracing::warn!(error = %err, retry_ms = retry.as_millis() as u64, "cannot LISTEN for key changes; retrying");
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(LAST_RETRY);
                        if directory.strong_count() == 0 {
                            return;
                        }
                        continue;
                    }
                };
                retry = FIRST_RETRY;
                let Some(connected) = directory.upgrade() else {
                    return;
                };
                connected.resync().await;
                drop(connected);
                loop {
                    let received = listener.try_recv().await;
                    let Some(directory) = directory.upgrade() else {
                        return;
                    };
                    match received {
                        Ok(Some(n)) => {
                            let (tenant, binding) = super::decode_change(n.payload());
                            directory.apply_change(tenant, binding).await;
                        }
                        Ok(None) | Err(_) => {
                            tracing::warn!(
                                error = ?received.err(),
                                "lost the key-change connection; views are refreshed before they are trusted, and every cached key is purged on reconnect"
                            );
                            directory.views.distrust_all();
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Purges every cached key and distrusts every tenant view (each is
    /// read again before it is trusted): changes (a purge, a deletion) may
    /// have been missed. Views are distrusted rather than dropped, so a
    /// registry that is still flapping leaves them serving within the outage
    /// grace instead of failing every tenant at once.
    async fn resync(&self) {
        self.cache.purge_all().await;
        self.views.distrust_all();
    }
}

async fn connect_listener(url: &str) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen(super::CHANGE_CHANNEL).await?;
    Ok(listener)
}
