//! The key access log's table (`key_access`): per-minute counts that every
//! replica's flush adds to, individual records, reads by time range with
//! filters and a page token, and pruning by age.

use async_trait::async_trait;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::RegistryError;
use super::rows::{count, signed};
use super::sql::SqlRegistry;
use super::sql::db;

/// One row: a minute's count of identical uses, or one use on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    pub tenant_id: String,
    /// Unix ms: the minute's start for a count, the use's time for an
    /// individual record.
    pub time_ms: i64,
    pub individual: bool,
    pub caller: String,
    /// An access reason's name (`customer_support`).
    pub reason: String,
    pub reason_detail: String,
    /// Empty when no key was reached (a refusal before any key).
    pub key_binding: String,
    pub key_version: String,
    /// The RPC's short name (`UnwrapKey`; batch items as their single call).
    pub operation: String,
    /// A gRPC code name (`OK`, `PERMISSION_DENIED`).
    pub outcome: String,
    /// Individual records: the refusal's message.
    pub error: String,
    pub request_id: String,
    pub count: u64,
}

/// What a read selects: one tenant, a time range, optional exact filters.
#[derive(Debug, Clone, Default)]
pub struct AccessQuery {
    pub tenant_id: String,
    /// Inclusive, unix ms.
    pub from_ms: i64,
    /// Exclusive, unix ms.
    pub to_ms: i64,
    pub caller: Option<String>,
    pub reason: Option<String>,
    pub key_binding: Option<String>,
    pub operation: Option<String>,
    pub outcome: Option<String>,
    pub individual_only: bool,
    /// Rows after this (time_ms, id), in (time_ms, id) order.
    pub after: Option<(i64, i64)>,
    pub limit: u32,
}

/// Where the access log is kept.
#[async_trait]
pub trait AccessStore: Send + Sync + std::fmt::Debug {
    /// Adds counts to their minutes' rows (created as needed) and inserts
    /// individual records, in one transaction.
    async fn add_access(&self, records: &[AccessRecord]) -> Result<(), RegistryError>;
    /// Rows in (time, id) order, each with its id (for the next page).
    async fn access(&self, query: &AccessQuery) -> Result<Vec<(i64, AccessRecord)>, RegistryError>;
    /// Deletes rows older than `before_ms`; how many.
    async fn prune_access(&self, before_ms: i64) -> Result<u64, RegistryError>;
}

const COLUMNS: &str = "tenant_id, time_ms, individual, caller, reason, reason_detail, key_binding, \
     key_version, operation, outcome, error, request_id, count";

fn record_from_row(row: &AnyRow) -> Result<(i64, AccessRecord), RegistryError> {
    Ok((
        row.try_get("id").map_err(db)?,
        AccessRecord {
            tenant_id: row.try_get("tenant_id").map_err(db)?,
            time_ms: row.try_get("time_ms").map_err(db)?,
            individual: row.try_get::<i64, _>("individual").map_err(db)? == 1,
            caller: row.try_get("caller").map_err(db)?,
            reason: row.try_get("reason").map_err(db)?,
            reason_detail: row.try_get("reason_detail").map_err(db)?,
            key_binding: row.try_get("key_binding").map_err(db)?,
            key_version: row.try_get("key_version").map_err(db)?,
            operation: row.try_get("operation").map_err(db)?,
            outcome: row.try_get("outcome").map_err(db)?,
            error: row.try_get("error").map_err(db)?,
            request_id: row.try_get("request_id").map_err(db)?,
            count: count(row.try_get("count").map_err(db)?),
        },
    ))
}

#[async_trait]
impl AccessStore for SqlRegistry {
    async fn add_access(&self, records: &[AccessRecord]) -> Result<(), RegistryError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        for r in records {
            // A count meets the other replicas' counts of its minute in one
            // row; an individual record is a row of its own.
            let sql = if r.individual {
                format!(
                    "INSERT INTO key_access ({COLUMNS}) VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
                )
            } else {
                format!(
                    "INSERT INTO key_access ({COLUMNS}) VALUES ($1, $2, 0, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                     ON CONFLICT (tenant_id, time_ms, caller, reason, key_binding, key_version, operation, outcome) \
                     WHERE individual = 0 DO UPDATE SET count = key_access.count + excluded.count"
                )
            };
            sqlx::query(&sql)
                .bind(&r.tenant_id)
                .bind(r.time_ms)
                .bind(&r.caller)
                .bind(&r.reason)
                .bind(&r.reason_detail)
                .bind(&r.key_binding)
                .bind(&r.key_version)
                .bind(&r.operation)
                .bind(&r.outcome)
                .bind(&r.error)
                .bind(&r.request_id)
                .bind(signed(r.count))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn access(&self, q: &AccessQuery) -> Result<Vec<(i64, AccessRecord)>, RegistryError> {
        // Every filter is a bound parameter; an unset one matches all.
        let (after_time, after_id) = q.after.unwrap_or((i64::MIN, i64::MIN));
        let sql = format!(
            "SELECT id, {COLUMNS} FROM key_access WHERE tenant_id = $1 \
             AND time_ms >= $2 AND time_ms < $3 \
             AND (time_ms > $4 OR (time_ms = $4 AND id > $5)) \
             AND ($6 = '' OR caller = $6) AND ($7 = '' OR reason = $7) \
             AND ($8 = '' OR key_binding = $8) AND ($9 = '' OR operation = $9) \
             AND ($10 = '' OR outcome = $10) AND ($11 = 0 OR individual = 1) \
             ORDER BY time_ms, id LIMIT $12"
        );
        let filter = |f: &Option<String>| f.clone().unwrap_or_default();
        let rows = sqlx::query(&sql)
            .bind(&q.tenant_id)
            .bind(q.from_ms)
            .bind(q.to_ms)
            .bind(after_time)
            .bind(after_id)
            .bind(filter(&q.caller))
            .bind(filter(&q.reason))
            .bind(filter(&q.key_binding))
            .bind(filter(&q.operation))
            .bind(filter(&q.outcome))
            .bind(i64::from(q.individual_only))
            .bind(i64::from(q.limit))
            .fetch_all(self.pool())
            .await
            .map_err(db)?;
        rows.iter().map(record_from_row).collect()
    }

    async fn prune_access(&self, before_ms: i64) -> Result<u64, RegistryError> {
        let done = sqlx::query("DELETE FROM key_access WHERE time_ms < $1")
            .bind(before_ms)
            .execute(self.pool())
            .await
            .map_err(db)?;
        Ok(done.rows_affected())
    }
}
