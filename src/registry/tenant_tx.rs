//! One tenant's rows under its lock, in one transaction: what the
//! tenant-key lifecycle (`crate::lifecycle`) reads and writes. Decisions are
//! the lifecycle's; this file only knows SQL. Dropping a [`TenantTx`]
//! without [`commit`](TenantTx::commit) rolls everything back.

use sqlx::{Any, Row, Transaction};

use super::rows::{
    BINDING_COLUMNS, TENANT_COLUMNS, TENANT_KEY_COLUMNS, binding_from_row, db, tenant_from_row,
    tenant_key_from_row,
};
use super::{BindingRecord, RegistryError, Tenant, TenantKeyRecord};
use crate::keys::{BindingState, TENANT_KEY_USAGE};

/// A tenant's row, locked, with the transaction that holds the lock.
#[derive(Debug)]
pub struct TenantTx {
    tx: Transaction<'static, Any>,
    tenant: Tenant,
}

impl TenantTx {
    /// Locks `tenant_id`'s row inside `tx` (PostgreSQL: the row lock of an
    /// UPDATE; SQLite: the write lock `BEGIN IMMEDIATE` took) and reads it.
    pub(super) async fn lock(
        mut tx: Transaction<'static, Any>,
        tenant_id: &str,
    ) -> Result<Option<Self>, RegistryError> {
        let locked = sqlx::query("UPDATE tenants SET updated_at = updated_at WHERE id = $1")
            .bind(tenant_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if locked.rows_affected() == 0 {
            return Ok(None);
        }
        let row = sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1"
        ))
        .bind(tenant_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let tenant = tenant_from_row(&row)?;
        Ok(Some(Self { tx, tenant }))
    }

    /// The row as locked, with the edits made through
    /// [`tenant_mut`](Self::tenant_mut) so far.
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// Edit the row; [`write_tenant`](Self::write_tenant) stores it.
    pub fn tenant_mut(&mut self) -> &mut Tenant {
        &mut self.tenant
    }

    /// Stores every column the lifecycle may change.
    pub async fn write_tenant(&mut self, now_ms: i64) -> Result<(), RegistryError> {
        let t = &self.tenant;
        sqlx::query(
            "UPDATE tenants SET key_policy = $1, key_hierarchy = $2, reencrypt_to = $3, \
             reencrypt_from = $4, newest_import_primary = $5, implicit = $6, key_epoch = $7, \
             next_key_version = $8, delete_at = $9, reencrypt_then_disable = $10, \
             reencrypt_disable_reason = $11, reencrypt_last = $12, updated_at = $13 WHERE id = $14",
        )
        .bind(t.key_policy.as_str())
        .bind(t.key_hierarchy.as_str())
        .bind(t.reencrypt_to.clone())
        .bind(t.reencrypt_from.clone())
        .bind(i64::from(t.newest_import_primary))
        .bind(i64::from(t.implicit))
        .bind(signed(t.key_epoch))
        .bind(i64::from(t.next_key_version))
        .bind(t.delete_at_ms)
        .bind(t.reencrypt_then_disable.clone())
        .bind(&t.reencrypt_disable_reason)
        .bind(t.reencrypt_last.clone())
        .bind(now_ms)
        .bind(&t.id)
        .execute(&mut *self.tx)
        .await
        .map_err(db)?;
        self.tenant.updated_at_ms = now_ms;
        Ok(())
    }

    pub async fn bindings(&mut self) -> Result<Vec<BindingRecord>, RegistryError> {
        sqlx::query(&format!(
            "SELECT {BINDING_COLUMNS} FROM key_bindings WHERE tenant_id = $1 ORDER BY created_at, name"
        ))
        .bind(&self.tenant.id)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db)?
        .iter()
        .map(binding_from_row)
        .collect()
    }

    /// The tenant's key versions, oldest first.
    pub async fn versions(&mut self) -> Result<Vec<TenantKeyRecord>, RegistryError> {
        sqlx::query(&format!(
            "SELECT {TENANT_KEY_COLUMNS} FROM tenant_keys WHERE tenant_id = $1 ORDER BY version"
        ))
        .bind(&self.tenant.id)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db)?
        .iter()
        .map(tenant_key_from_row)
        .collect()
    }

    /// Stores a new version. The caller checked its number against
    /// `next_key_version` under this lock and moves the counter past it.
    pub async fn insert_version(&mut self, key: &TenantKeyRecord) -> Result<(), RegistryError> {
        sqlx::query(&format!(
            "INSERT INTO tenant_keys ({TENANT_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&self.tenant.id)
        .bind(i64::from(key.version))
        .bind(&key.binding)
        .bind(&key.provider_key_version)
        .bind(&key.wrapped)
        .bind(key.created_at_ms)
        .bind(key.updated_at_ms)
        .bind(signed(key.epoch))
        .execute(&mut *self.tx)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Moves one version from binding `from` to `key.binding` with its new
    /// wrapping; `false` when it is no longer under `from`.
    pub async fn rewrap_version(
        &mut self,
        from: &str,
        key: &TenantKeyRecord,
    ) -> Result<bool, RegistryError> {
        let moved = sqlx::query(
            "UPDATE tenant_keys SET binding = $1, provider_key_version = $2, wrapped = $3, \
             updated_at = $4 WHERE tenant_id = $5 AND version = $6 AND binding = $7",
        )
        .bind(&key.binding)
        .bind(&key.provider_key_version)
        .bind(&key.wrapped)
        .bind(key.updated_at_ms)
        .bind(&self.tenant.id)
        .bind(i64::from(key.version))
        .bind(from)
        .execute(&mut *self.tx)
        .await
        .map_err(db)?;
        Ok(moved.rows_affected() == 1)
    }

    /// Destroys every version wrapped by `binding`; how many.
    pub async fn delete_versions_under(&mut self, binding: &str) -> Result<u64, RegistryError> {
        let done = sqlx::query("DELETE FROM tenant_keys WHERE tenant_id = $1 AND binding = $2")
            .bind(&self.tenant.id)
            .bind(binding)
            .execute(&mut *self.tx)
            .await
            .map_err(db)?;
        Ok(done.rows_affected())
    }

    /// Destroys the versions numbered below `min`; how many.
    pub async fn delete_versions_below(&mut self, min: u32) -> Result<u64, RegistryError> {
        let done = sqlx::query("DELETE FROM tenant_keys WHERE tenant_id = $1 AND version < $2")
            .bind(&self.tenant.id)
            .bind(i64::from(min))
            .execute(&mut *self.tx)
            .await
            .map_err(db)?;
        Ok(done.rows_affected())
    }

    /// Makes `name` the only primary (`None`: no primary).
    pub async fn set_primary(
        &mut self,
        name: Option<&str>,
        now_ms: i64,
    ) -> Result<(), RegistryError> {
        // Two statements: SQLite checks the one-primary index row by row.
        sqlx::query("UPDATE key_bindings SET is_primary = 0 WHERE tenant_id = $1")
            .bind(&self.tenant.id)
            .execute(&mut *self.tx)
            .await
            .map_err(db)?;
        if let Some(name) = name {
            sqlx::query(
                "UPDATE key_bindings SET is_primary = 1, updated_at = $1 \
                 WHERE tenant_id = $2 AND name = $3",
            )
            .bind(now_ms)
            .bind(&self.tenant.id)
            .bind(name)
            .execute(&mut *self.tx)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    pub async fn set_state(
        &mut self,
        name: &str,
        state: BindingState,
        reason: &str,
        now_ms: i64,
    ) -> Result<(), RegistryError> {
        sqlx::query(
            "UPDATE key_bindings SET state = $1, state_reason = $2, updated_at = $3 \
             WHERE tenant_id = $4 AND name = $5",
        )
        .bind(super::rows::state_str(state))
        .bind(reason)
        .bind(now_ms)
        .bind(&self.tenant.id)
        .bind(name)
        .execute(&mut *self.tx)
        .await
        .map_err(db)?;
        Ok(())
    }

    pub async fn delete_binding(&mut self, name: &str) -> Result<(), RegistryError> {
        for table in ["key_bindings", "key_retirements", "key_version_usage"] {
            let column = if table == "key_bindings" {
                "name"
            } else {
                "key_name"
            };
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE tenant_id = $1 AND {column} = $2"
            ))
            .bind(&self.tenant.id)
            .bind(name)
            .execute(&mut *self.tx)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    /// The last use (unix ms) of any tenant key version wrapped by
    /// `binding` now, from the flushed per-version usage.
    pub async fn last_use_of_versions_under(
        &mut self,
        binding: &str,
    ) -> Result<Option<i64>, RegistryError> {
        let row = sqlx::query(
            "SELECT MAX(u.last_used_at) FROM key_version_usage u \
             JOIN tenant_keys k ON k.tenant_id = u.tenant_id \
                 AND u.version = CAST(k.version AS TEXT) \
             WHERE u.tenant_id = $1 AND u.key_name = $2 AND k.binding = $3 \
                 AND u.wrap_count + u.unwrap_count > 0",
        )
        .bind(&self.tenant.id)
        .bind(TENANT_KEY_USAGE)
        .bind(binding)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db)?;
        row.try_get::<Option<i64>, _>(0).map_err(db)
    }

    /// DEKs ever sealed under the versions wrapped by `binding` now.
    pub async fn seals_under(&mut self, binding: &str) -> Result<u64, RegistryError> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(u.wrap_count), 0) AS BIGINT) FROM key_version_usage u \
             JOIN tenant_keys k ON k.tenant_id = u.tenant_id \
                 AND u.version = CAST(k.version AS TEXT) \
             WHERE u.tenant_id = $1 AND u.key_name = $2 AND k.binding = $3",
        )
        .bind(&self.tenant.id)
        .bind(TENANT_KEY_USAGE)
        .bind(binding)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db)?;
        Ok(u64::try_from(row.try_get::<i64, _>(0).map_err(db)?).unwrap_or(0))
    }

    /// Destroys the tenant: a tombstone for its incarnation, then every row
    /// it has (tenant key versions first).
    pub async fn shred(&mut self, now_ms: i64) -> Result<(), RegistryError> {
        sqlx::query(
            "INSERT INTO deleted_tenants (id, incarnation, deleted_at) VALUES ($1, $2, $3)",
        )
        .bind(&self.tenant.id)
        .bind(signed(self.tenant.incarnation))
        .bind(now_ms)
        .execute(&mut *self.tx)
        .await
        .map_err(db)?;
        for table in [
            "tenant_keys",
            "key_bindings",
            "key_version_usage",
            "key_retirements",
        ] {
            sqlx::query(&format!("DELETE FROM {table} WHERE tenant_id = $1"))
                .bind(&self.tenant.id)
                .execute(&mut *self.tx)
                .await
                .map_err(db)?;
        }
        sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(&self.tenant.id)
            .execute(&mut *self.tx)
            .await
            .map_err(db)?;
        Ok(())
    }

    pub async fn commit(self) -> Result<(), RegistryError> {
        self.tx.commit().await.map_err(db)
    }
}

fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
