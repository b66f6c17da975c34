//! [`Registry`] over SQLite or PostgreSQL through sqlx's `Any` driver: one set
//! of queries (`$N` placeholders work in both), one migration directory per
//! dialect for the DDL differences. One job: the trait's queries (rows are
//! read in `rows.rs`; the pool is opened, migrated and closed in
//! `sql/connect.rs`).

use async_trait::async_trait;
use sqlx::{Any, AnyPool, Row, Transaction};

use super::{
    BindingRecord, KeyPolicy, NewBinding, Registry, RegistryError, Retirement, Tenant,
    TenantKeyRecord, UsageDelta, VersionUsageRecord,
};
use crate::keys::BindingState;
use crate::kms::ProviderKind;

pub(super) use super::rows::*;

mod connect;

#[derive(Debug, Clone)]
pub struct SqlRegistry {
    pool: AnyPool,
    /// Shared by replicas: changes are broadcast with NOTIFY.
    postgres: bool,
}

impl SqlRegistry {
    /// A write transaction. SQLite: `BEGIN IMMEDIATE`, so the write lock is
    /// taken (waiting out `busy_timeout`) at the start, never by upgrading a
    /// read lock mid-transaction, which SQLite refuses at once with
    /// "database is locked" when another connection is writing.
    pub(super) async fn begin(&self) -> Result<Transaction<'static, Any>, RegistryError> {
        if self.postgres {
            self.pool.begin().await.map_err(db)
        } else {
            self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)
        }
    }

    pub(super) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Starts a transaction holding the tenant's row lock (an UPDATE takes
    /// it in PostgreSQL; in SQLite the first write takes the database lock).
    async fn lock_row(
        &self,
        tenant_id: &str,
        now_ms: i64,
    ) -> Result<(Transaction<'static, Any>, KeyPolicy), RegistryError> {
        let mut tx = self.begin().await?;
        let locked = sqlx::query("UPDATE tenants SET updated_at = $1 WHERE id = $2")
            .bind(now_ms)
            .bind(tenant_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if locked.rows_affected() == 0 {
            return Err(RegistryError::TenantNotFound(tenant_id.to_owned()));
        }
        let policy: String = sqlx::query("SELECT key_policy FROM tenants WHERE id = $1")
            .bind(tenant_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?
            .try_get(0)
            .map_err(db)?;
        Ok((tx, KeyPolicy::parse(&policy)?))
    }
}

#[async_trait]
impl Registry for SqlRegistry {
    async fn create_tenant(&self, tenant: &Tenant) -> Result<(), RegistryError> {
        let mut tx = self.begin().await?;
        let exists = sqlx::query("SELECT 1 FROM tenants WHERE id = $1")
            .bind(&tenant.id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        if exists.is_some() {
            return Err(RegistryError::TenantExists(tenant.id.clone()));
        }
        // A re-created id is a new incarnation, and nothing issued for an
        // earlier one (wrapped keys without an incarnation included) reads.
        let deleted: Option<i64> =
            sqlx::query("SELECT MAX(incarnation) FROM deleted_tenants WHERE id = $1")
                .bind(&tenant.id)
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?
                .try_get(0)
                .map_err(db)?;
        sqlx::query(
            "INSERT INTO tenants (id, key_policy, external_id, key_hierarchy, newest_import_primary, \
             created_at, updated_at, incarnation, legacy_deks, implicit) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&tenant.id)
        .bind(tenant.key_policy.as_str())
        .bind(&tenant.external_id)
        .bind(tenant.key_hierarchy.as_str())
        .bind(i64::from(tenant.newest_import_primary))
        .bind(tenant.created_at_ms)
        .bind(tenant.updated_at_ms)
        .bind(deleted.map_or(1, |d| d.saturating_add(1)))
        .bind(i64::from(deleted.is_none()))
        .bind(i64::from(tenant.implicit))
        .execute(&mut *tx)
        .await
        .map_err(|e| match &e {
            // Two creators racing for the same id: the loser sees this.
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                RegistryError::TenantExists(tenant.id.clone())
            }
            _ => db(e),
        })?;
        tx.commit().await.map_err(db)
    }

    async fn tenant(&self, tenant_id: &str) -> Result<Option<Tenant>, RegistryError> {
        sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1"
        ))
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?
        .as_ref()
        .map(tenant_from_row)
        .transpose()
    }

    async fn set_key_policy(
        &self,
        tenant_id: &str,
        policy: KeyPolicy,
        now_ms: i64,
    ) -> Result<Tenant, RegistryError> {
        let (mut tx, current) = self.lock_row(tenant_id, now_ms).await?;
        let bindings = fetch_bindings(&mut *tx, tenant_id).await?;
        match (current, policy) {
            (KeyPolicy::Keyring, KeyPolicy::SingleKey) if bindings.len() > 1 => {
                return Err(RegistryError::Refused(format!(
                    "tenant '{tenant_id}' has {} keys; single_key allows one: unlink the others first",
                    bindings.len()
                )));
            }
            (KeyPolicy::SingleKey, KeyPolicy::Keyring)
                if bindings.iter().any(|b| b.wrap_count + b.unwrap_count > 0) =>
            {
                return Err(RegistryError::Refused(format!(
                    "tenant '{tenant_id}' is single_key and its key already protects data; the policy is fixed"
                )));
            }
            _ => {}
        }
        sqlx::query("UPDATE tenants SET key_policy = $1 WHERE id = $2")
            .bind(policy.as_str())
            .bind(tenant_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        self.tenant(tenant_id)
            .await?
            .ok_or_else(|| RegistryError::TenantNotFound(tenant_id.to_owned()))
    }

    async fn set_access_policy(
        &self,
        tenant_id: &str,
        policy: &crate::access::AccessPolicy,
        now_ms: i64,
    ) -> Result<Tenant, RegistryError> {
        let (mut tx, _) = self.lock_row(tenant_id, now_ms).await?;
        sqlx::query("UPDATE tenants SET access_policy = $1 WHERE id = $2")
            .bind(policy.to_stored())
            .bind(tenant_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        self.tenant(tenant_id)
            .await?
            .ok_or_else(|| RegistryError::TenantNotFound(tenant_id.to_owned()))
    }

    async fn insert_binding(
        &self,
        b: &NewBinding,
        now_ms: i64,
    ) -> Result<BindingRecord, RegistryError> {
        let (mut tx, policy) = self.lock_row(&b.tenant_id, now_ms).await?;
        let existing = fetch_bindings(&mut *tx, &b.tenant_id).await?;
        if existing.iter().any(|e| e.name == b.name) {
            return Err(RegistryError::BindingExists {
                tenant_id: b.tenant_id.clone(),
                name: b.name.clone(),
            });
        }
        if policy == KeyPolicy::SingleKey {
            if let Some(first) = existing.first() {
                return Err(RegistryError::Refused(format!(
                    "tenant '{}' has policy single_key and its key '{}' can never be replaced",
                    b.tenant_id, first.name
                )));
            }
        }
        let primary = b.make_primary || !existing.iter().any(|e| e.primary);
        if primary {
            sqlx::query("UPDATE key_bindings SET is_primary = 0 WHERE tenant_id = $1")
                .bind(&b.tenant_id)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        sqlx::query(
            "INSERT INTO key_bindings (tenant_id, name, description, provider, key_reference, \
             region, role_arn, service_account, key_material, state, state_reason, is_primary, \
             created_at, updated_at, replica_regions, material_updated_at, link_id, canary, \
             seal_only_from) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'ACTIVE', '', $10, $11, $11, $12, $13, $14, $15, 1)",
        )
        .bind(&b.tenant_id)
        .bind(&b.name)
        .bind(&b.description)
        .bind(b.provider.as_str())
        .bind(&b.key_reference)
        .bind(&b.region)
        .bind(&b.role_arn)
        .bind(&b.service_account)
        .bind(b.key_material.clone())
        .bind(i64::from(primary))
        .bind(now_ms)
        .bind(b.replica_regions.join(","))
        .bind(b.key_material.as_ref().map(|_| now_ms))
        .bind(new_link_id()?)
        .bind(b.canary.clone())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let record = existing_binding(&mut *tx, &b.tenant_id, &b.name).await?;
        tx.commit().await.map_err(db)?;
        Ok(record)
    }

    async fn bindings(&self, tenant_id: &str) -> Result<Vec<BindingRecord>, RegistryError> {
        fetch_bindings(&self.pool, tenant_id).await
    }

    async fn binding(
        &self,
        tenant_id: &str,
        name: &str,
    ) -> Result<Option<BindingRecord>, RegistryError> {
        fetch_binding(&self.pool, tenant_id, name).await
    }

    async fn tenants_linking(
        &self,
        provider: ProviderKind,
        key_reference: &str,
    ) -> Result<Vec<String>, RegistryError> {
        sqlx::query_scalar(
            "SELECT DISTINCT tenant_id FROM key_bindings \
             WHERE provider = $1 AND key_reference = $2 ORDER BY tenant_id",
        )
        .bind(provider.as_str())
        .bind(key_reference)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    async fn set_state(
        &self,
        tenant_id: &str,
        name: &str,
        state: BindingState,
        reason: &str,
        now_ms: i64,
    ) -> Result<BindingRecord, RegistryError> {
        let (mut tx, _) = self.lock_row(tenant_id, now_ms).await?;
        existing_binding(&mut *tx, tenant_id, name).await?;
        sqlx::query(
            "UPDATE key_bindings SET state = $1, state_reason = $2, updated_at = $3 \
             WHERE tenant_id = $4 AND name = $5",
        )
        .bind(state_str(state))
        .bind(reason)
        .bind(now_ms)
        .bind(tenant_id)
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let record = existing_binding(&mut *tx, tenant_id, name).await?;
        tx.commit().await.map_err(db)?;
        Ok(record)
    }

    async fn publish_change(
        &self,
        tenant_id: &str,
        binding: Option<&str>,
    ) -> Result<(), RegistryError> {
        if !self.postgres {
            return Ok(());
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(super::CHANGE_CHANNEL)
            .bind(super::encode_change(tenant_id, binding))
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn claim_checks(
        &self,
        claim: &super::CheckClaim<'_>,
        limit: usize,
    ) -> Result<Vec<(BindingRecord, String)>, RegistryError> {
        // SKIP LOCKED: a replica claiming at the same moment takes the next
        // rows instead of waiting for these. SQLite has one writer at a time
        // and no row locks.
        let lock = if self.postgres {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let rows = sqlx::query(&format!(
            "UPDATE key_bindings SET check_claimed_at = $1, check_claimed_by = $2 \
             WHERE (tenant_id, name) IN ( \
                 SELECT tenant_id, name FROM key_bindings \
                 WHERE state IN ('ACTIVE', 'REVOKED') \
                   AND ((check_claimed_by = $2 AND check_claimed_at <= $3) \
                     OR (check_claimed_by <> $2 AND check_claimed_at <= $4)) \
                 ORDER BY check_claimed_at, tenant_id, name LIMIT $5{lock}) \
             RETURNING {BINDING_COLUMNS}, \
                 (SELECT t.external_id FROM tenants t WHERE t.id = key_bindings.tenant_id) \
                 AS tenant_external_id"
        ))
        .bind(claim.now_ms)
        .bind(claim.claimer)
        .bind(claim.own_due_before_ms)
        .bind(claim.others_due_before_ms)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut claimed = rows
            .iter()
            .map(|row| {
                let external_id: String = row.try_get("tenant_external_id").map_err(db)?;
                Ok((binding_from_row(row)?, external_id))
            })
            .collect::<Result<Vec<_>, RegistryError>>()?;
        claimed.sort_by(|a, b| (&a.0.tenant_id, &a.0.name).cmp(&(&b.0.tenant_id, &b.0.name)));
        Ok(claimed)
    }

    async fn binding_states(&self) -> Result<Vec<(&'static str, u64)>, RegistryError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM key_bindings GROUP BY state")
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        let mut counts = Vec::new();
        for row in &rows {
            let state: String = row.try_get("state").map_err(db)?;
            let n: i64 = row.try_get("n").map_err(db)?;
            let name = match parse_state(&state)? {
                BindingState::Active => "active",
                BindingState::Disabled => "disabled",
                BindingState::Revoked => "revoked",
            };
            counts.push((name, u64::try_from(n).unwrap_or(0)));
        }
        Ok(counts)
    }

    async fn add_usage(&self, deltas: &[UsageDelta]) -> Result<(), RegistryError> {
        if deltas.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        for d in deltas {
            // A binding unlinked since is simply not updated.
            sqlx::query(
                "UPDATE key_bindings SET wrap_count = wrap_count + $1, \
                 unwrap_count = unwrap_count + $2, \
                 last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < $3 \
                                     THEN $3 ELSE last_used_at END \
                 WHERE tenant_id = $4 AND name = $5",
            )
            .bind(signed(d.wraps))
            .bind(signed(d.unwraps))
            .bind(d.last_used_at_ms)
            .bind(&d.tenant_id)
            .bind(&d.name)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            Self::add_version_usage(&mut tx, &d.tenant_id, &d.versions).await?;
        }
        tx.commit().await.map_err(db)
    }

    async fn set_canary(
        &self,
        tenant_id: &str,
        name: &str,
        link_id: i64,
        old: Option<&[u8]>,
        canary: &[u8],
    ) -> Result<(), RegistryError> {
        sqlx::query(
            "UPDATE key_bindings SET canary = $1 WHERE tenant_id = $2 AND name = $3 \
             AND link_id = $4 AND ((canary IS NULL AND $5 IS NULL) OR canary = $5)",
        )
        .bind(canary)
        .bind(tenant_id)
        .bind(name)
        .bind(link_id)
        .bind(old)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn tenant_keys(&self, tenant_id: &str) -> Result<Vec<TenantKeyRecord>, RegistryError> {
        sqlx::query(&format!(
            "SELECT {TENANT_KEY_COLUMNS} FROM tenant_keys WHERE tenant_id = $1 ORDER BY version"
        ))
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(tenant_key_from_row)
        .collect()
    }

    async fn tenants_reencrypting(&self) -> Result<Vec<Tenant>, RegistryError> {
        sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE reencrypt_to IS NOT NULL ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(tenant_from_row)
        .collect()
    }

    async fn lock_tenant(
        &self,
        tenant_id: &str,
    ) -> Result<Option<super::tenant_tx::TenantTx>, RegistryError> {
        super::tenant_tx::TenantTx::lock(self.begin().await?, tenant_id).await
    }

    async fn tombstone(&self, tenant_id: &str) -> Result<Option<u64>, RegistryError> {
        let max: Option<i64> =
            sqlx::query("SELECT MAX(incarnation) FROM deleted_tenants WHERE id = $1")
                .bind(tenant_id)
                .fetch_one(&self.pool)
                .await
                .map_err(db)?
                .try_get(0)
                .map_err(db)?;
        Ok(max.map(count))
    }

    async fn due_deletions(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, RegistryError> {
        sqlx::query(
            "SELECT id FROM tenants WHERE delete_at IS NOT NULL AND delete_at <= $1 \
             ORDER BY delete_at, id LIMIT $2",
        )
        .bind(now_ms)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(|row| row.try_get::<String, _>(0).map_err(db))
        .collect()
    }

    async fn compact(&self) -> Result<(), RegistryError> {
        if self.postgres {
            // VACUUM cannot run in a transaction; FULL rewrites each table
            // into new files, so a dead row's bytes leave the old one with it.
            for table in ["tenant_keys", "key_bindings"] {
                sqlx::query(&format!("VACUUM FULL {table}"))
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
            }
        } else {
            // secure_delete zeroed the rows in place; a write-ahead log (if
            // an operator turned one on) is copied back and truncated.
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await
                .map_err(db)?;
        }
        Ok(())
    }

    async fn set_description(
        &self,
        tenant_id: &str,
        name: &str,
        description: &str,
        now_ms: i64,
    ) -> Result<BindingRecord, RegistryError> {
        let (mut tx, _) = self.lock_row(tenant_id, now_ms).await?;
        existing_binding(&mut *tx, tenant_id, name).await?;
        sqlx::query(
            "UPDATE key_bindings SET description = $1, updated_at = $2 \
             WHERE tenant_id = $3 AND name = $4",
        )
        .bind(description)
        .bind(now_ms)
        .bind(tenant_id)
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let record = existing_binding(&mut *tx, tenant_id, name).await?;
        tx.commit().await.map_err(db)?;
        Ok(record)
    }

    async fn version_usage(
        &self,
        tenant_id: &str,
    ) -> Result<Vec<VersionUsageRecord>, RegistryError> {
        self.fetch_version_usage(tenant_id).await
    }

    async fn retirements(&self, tenant_id: &str) -> Result<Vec<Retirement>, RegistryError> {
        self.fetch_retirements(tenant_id).await
    }

    async fn set_retirement(
        &self,
        tenant_id: &str,
        key_name: &str,
        min_version: u32,
        now_ms: i64,
    ) -> Result<(), RegistryError> {
        self.store_retirement(tenant_id, key_name, min_version, now_ms)
            .await
    }

    async fn claim_rotation(
        &self,
        subject: &str,
        due_before_ms: i64,
        now_ms: i64,
    ) -> Result<bool, RegistryError> {
        self.try_claim_rotation(subject, due_before_ms, now_ms)
            .await
    }

    async fn tenant_keys_under(
        &self,
        binding: &str,
    ) -> Result<Vec<TenantKeyRecord>, RegistryError> {
        self.fetch_tenant_keys_under(binding).await
    }

    async fn bindings_with_material(&self) -> Result<Vec<BindingRecord>, RegistryError> {
        self.fetch_bindings_with_material().await
    }

    async fn replace_key_material(
        &self,
        tenant_id: &str,
        name: &str,
        old: &[u8],
        new: &[u8],
        imported_at_ms: Option<i64>,
        new_version: Option<u32>,
    ) -> Result<bool, RegistryError> {
        self.swap_key_material(tenant_id, name, old, new, imported_at_ms, new_version)
            .await
    }
}
