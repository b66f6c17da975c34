//! Key versions in the registry: per-version usage, retirements (minimum
//! decryption versions) and fleet-wide rotation claims. Queries of
//! [`SqlRegistry`] kept beside the rest by domain; the `Registry` impl in
//! `sql.rs` calls them.

use sqlx::{Any, Row, Transaction};

use super::sql::{
    BINDING_COLUMNS, SqlRegistry, TENANT_KEY_COLUMNS, binding_from_row, db, signed,
    tenant_key_from_row,
};
use super::{BindingRecord, RegistryError, Retirement, TenantKeyRecord, VersionUsageRecord};

impl SqlRegistry {
    /// Adds per-version deltas inside the usage flush's transaction. Rows of
    /// a tenant deleted since are not created (the tenant check), except
    /// fleet-wide ones.
    pub(super) async fn add_version_usage(
        tx: &mut Transaction<'static, Any>,
        tenant_id: &str,
        versions: &[VersionUsageRecord],
    ) -> Result<(), RegistryError> {
        for v in versions {
            sqlx::query(
                "INSERT INTO key_version_usage \
                 (tenant_id, key_name, version, wrap_count, unwrap_count, last_used_at) \
                 SELECT $1, $2, $3, $4, $5, $6 \
                 WHERE $1 = '#platform' OR EXISTS (SELECT 1 FROM tenants WHERE id = $1) \
                 ON CONFLICT (tenant_id, key_name, version) DO UPDATE SET \
                 wrap_count = key_version_usage.wrap_count + excluded.wrap_count, \
                 unwrap_count = key_version_usage.unwrap_count + excluded.unwrap_count, \
                 last_used_at = CASE WHEN key_version_usage.last_used_at < excluded.last_used_at \
                                     THEN excluded.last_used_at ELSE key_version_usage.last_used_at END",
            )
            .bind(tenant_id)
            .bind(&v.key_name)
            .bind(&v.version)
            .bind(signed(v.wraps))
            .bind(signed(v.unwraps))
            .bind(v.last_used_at_ms)
            .execute(&mut **tx)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    pub(super) async fn fetch_version_usage(
        &self,
        tenant_id: &str,
    ) -> Result<Vec<VersionUsageRecord>, RegistryError> {
        let rows = sqlx::query(
            "SELECT key_name, version, wrap_count, unwrap_count, last_used_at \
             FROM key_version_usage WHERE tenant_id = $1 ORDER BY key_name, version",
        )
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| {
                Ok(VersionUsageRecord {
                    key_name: row.try_get("key_name").map_err(db)?,
                    version: row.try_get("version").map_err(db)?,
                    wraps: unsigned(row.try_get("wrap_count").map_err(db)?),
                    unwraps: unsigned(row.try_get("unwrap_count").map_err(db)?),
                    last_used_at_ms: row.try_get("last_used_at").map_err(db)?,
                })
            })
            .collect()
    }

    pub(super) async fn fetch_retirements(
        &self,
        tenant_id: &str,
    ) -> Result<Vec<Retirement>, RegistryError> {
        let rows = sqlx::query(
            "SELECT key_name, min_version, updated_at FROM key_retirements \
             WHERE tenant_id = $1 ORDER BY key_name",
        )
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| {
                let min: i64 = row.try_get("min_version").map_err(db)?;
                Ok(Retirement {
                    key_name: row.try_get("key_name").map_err(db)?,
                    min_version: u32::try_from(min).map_err(|_| {
                        RegistryError::Corrupt(format!("minimum decryption version {min}"))
                    })?,
                    updated_at_ms: row.try_get("updated_at").map_err(db)?,
                })
            })
            .collect()
    }

    pub(super) async fn store_retirement(
        &self,
        tenant_id: &str,
        key_name: &str,
        min_version: u32,
        now_ms: i64,
    ) -> Result<(), RegistryError> {
        let query = if min_version == 0 {
            sqlx::query("DELETE FROM key_retirements WHERE tenant_id = $1 AND key_name = $2")
                .bind(tenant_id)
                .bind(key_name)
        } else {
            sqlx::query(
                "INSERT INTO key_retirements (tenant_id, key_name, min_version, updated_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, key_name) DO UPDATE SET \
                 min_version = excluded.min_version, updated_at = excluded.updated_at",
            )
            .bind(tenant_id)
            .bind(key_name)
            .bind(i64::from(min_version))
            .bind(now_ms)
        };
        query.execute(self.pool()).await.map_err(db)?;
        Ok(())
    }

    /// One row moves forward per period: the database serializes the
    /// conditional update, so of replicas racing exactly one sees a row
    /// affected.
    pub(super) async fn try_claim_rotation(
        &self,
        subject: &str,
        due_before_ms: i64,
        now_ms: i64,
    ) -> Result<bool, RegistryError> {
        let done = sqlx::query(
            "INSERT INTO rotations (subject, rotated_at) VALUES ($1, $2) \
             ON CONFLICT (subject) DO UPDATE SET rotated_at = excluded.rotated_at \
             WHERE rotations.rotated_at < $3",
        )
        .bind(subject)
        .bind(now_ms)
        .bind(due_before_ms)
        .execute(self.pool())
        .await
        .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn fetch_tenant_keys_under(
        &self,
        binding: &str,
    ) -> Result<Vec<TenantKeyRecord>, RegistryError> {
        sqlx::query(&format!(
            "SELECT {TENANT_KEY_COLUMNS} FROM tenant_keys WHERE binding = $1 \
             ORDER BY tenant_id, version"
        ))
        .bind(binding)
        .fetch_all(self.pool())
        .await
        .map_err(db)?
        .iter()
        .map(tenant_key_from_row)
        .collect()
    }

    pub(super) async fn fetch_bindings_with_material(
        &self,
    ) -> Result<Vec<BindingRecord>, RegistryError> {
        sqlx::query(&format!(
            "SELECT {BINDING_COLUMNS} FROM key_bindings WHERE key_material IS NOT NULL \
             ORDER BY tenant_id, name"
        ))
        .fetch_all(self.pool())
        .await
        .map_err(db)?
        .iter()
        .map(binding_from_row)
        .collect()
    }

    pub(super) async fn swap_key_material(
        &self,
        tenant_id: &str,
        name: &str,
        old: &[u8],
        new: &[u8],
        imported_at_ms: Option<i64>,
        new_version: Option<u32>,
    ) -> Result<bool, RegistryError> {
        // A version imported now is made by this build: `seal` wraps only,
        // from it on, unless an earlier one already said so.
        let done = sqlx::query(
            "UPDATE key_bindings SET key_material = $1, \
             material_updated_at = COALESCE($2, material_updated_at), \
             seal_only_from = COALESCE(seal_only_from, $6) \
             WHERE tenant_id = $3 AND name = $4 AND key_material = $5",
        )
        .bind(new)
        .bind(imported_at_ms)
        .bind(tenant_id)
        .bind(name)
        .bind(old)
        .bind(new_version.map(i64::from))
        .execute(self.pool())
        .await
        .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }
}

fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}
