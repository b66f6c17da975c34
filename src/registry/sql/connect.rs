//! Opening a registry (the SQLite file or the PostgreSQL pool, its
//! per-connection settings and the migrations), closing it, and the whole
//! registry's export and restore.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;

use super::{RegistryError, SqlRegistry};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

impl SqlRegistry {
    /// Opens (creating if needed) the SQLite file at `path`, mode 0600.
    pub async fn open_sqlite(path: &Path) -> Result<Self, RegistryError> {
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| RegistryError::Database(format!("{}: {e}", dir.display())))?;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| RegistryError::Database(format!("{}: {e}", path.display())))?;
        }
        Self::connect(&format!("sqlite://{}", path.display())).await
    }

    /// Connects to `url` (`sqlite://...` or `postgres://...`) and applies
    /// migrations.
    pub async fn connect(url: &str) -> Result<Self, RegistryError> {
        Self::connect_with(url, &crate::registry::RegistrySettings::default()).await
    }

    /// [`connect`](Self::connect) with the pool's settings.
    pub async fn connect_with(
        url: &str,
        settings: &crate::registry::RegistrySettings,
    ) -> Result<Self, RegistryError> {
        sqlx::any::install_default_drivers();
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let statement_timeout = format!(
            "SET statement_timeout = {}",
            settings.statement_timeout.as_millis()
        );
        let pool = AnyPoolOptions::new()
            .max_connections(if postgres { settings.pool_size } else { 4 })
            .acquire_timeout(settings.acquire_timeout)
            .after_connect(move |conn, _| {
                let statement_timeout = statement_timeout.clone();
                Box::pin(async move {
                    if postgres {
                        // A statement stuck on a lock or a dying server ends
                        // here, not in a client that waits forever.
                        sqlx::Executor::execute(&mut *conn, statement_timeout.as_str()).await?;
                    } else {
                        // Deleted rows (a shredded tenant's keys) are
                        // overwritten with zeros in the file, not just
                        // unlinked from the tree.
                        sqlx::Executor::execute(&mut *conn, "PRAGMA secure_delete = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(|e| RegistryError::Database(format!("cannot open the registry: {e}")))?;
        let migrations = if postgres {
            &POSTGRES_MIGRATIONS
        } else {
            &SQLITE_MIGRATIONS
        };
        migrations
            .run(&pool)
            .await
            .map_err(|e| RegistryError::Database(format!("registry migration failed: {e}")))?;
        Ok(Self { pool, postgres })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Every tenant, binding and tenant key version as one JSON document
    /// (`registry::backup`).
    pub async fn export(&self) -> Result<serde_json::Value, RegistryError> {
        crate::registry::backup::export(&self.pool, self.postgres).await
    }

    /// Restores an [`export`](Self::export) into this (empty) registry;
    /// the number of rows restored.
    pub async fn restore(&self, document: &serde_json::Value) -> Result<usize, RegistryError> {
        crate::registry::backup::restore(&self.pool, document).await
    }
}
