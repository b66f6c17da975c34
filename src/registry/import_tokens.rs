//! Import tokens (`import_tokens`): the sealed one-time RSA key of each
//! GetImportParameters, redeemed at most once by any replica.

use async_trait::async_trait;
use sqlx::Row as _;

use super::RegistryError;
use super::sql::{SqlRegistry, db};

/// One token as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportTokenRecord {
    pub token: String,
    pub tenant_id: String,
    pub name: String,
    /// A `Wrapping` name.
    pub wrapping: String,
    /// The RSA private key (PKCS#8), sealed under the platform keyring.
    pub sealed_key: Vec<u8>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

/// What redeeming a token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeemed {
    /// Yours, now used.
    Taken(ImportTokenRecord),
    Unknown,
    /// Expired at this time (unix ms).
    Expired(i64),
    /// Used at this time (unix ms).
    Used(i64),
}

#[async_trait]
pub trait ImportTokenStore: Send + Sync + std::fmt::Debug {
    /// Stores a new token (and deletes tokens expired a day ago).
    async fn insert_import_token(&self, token: &ImportTokenRecord) -> Result<(), RegistryError>;
    /// Marks the token used, if it is unused and unexpired at `now_ms`:
    /// exactly one caller ever gets [`Redeemed::Taken`].
    async fn redeem_import_token(
        &self,
        token: &str,
        now_ms: i64,
    ) -> Result<Redeemed, RegistryError>;
}

#[async_trait]
impl ImportTokenStore for SqlRegistry {
    async fn insert_import_token(&self, t: &ImportTokenRecord) -> Result<(), RegistryError> {
        sqlx::query("DELETE FROM import_tokens WHERE expires_at < $1")
            .bind(t.created_at_ms - 24 * 3600 * 1000)
            .execute(self.pool())
            .await
            .map_err(db)?;
        sqlx::query(
            "INSERT INTO import_tokens (token, tenant_id, name, wrapping, sealed_key, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&t.token)
        .bind(&t.tenant_id)
        .bind(&t.name)
        .bind(&t.wrapping)
        .bind(&t.sealed_key)
        .bind(t.created_at_ms)
        .bind(t.expires_at_ms)
        .execute(self.pool())
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn redeem_import_token(
        &self,
        token: &str,
        now_ms: i64,
    ) -> Result<Redeemed, RegistryError> {
        let taken = sqlx::query(
            "UPDATE import_tokens SET used_at = $1 WHERE token = $2 AND used_at IS NULL AND expires_at > $1",
        )
        .bind(now_ms)
        .bind(token)
        .execute(self.pool())
        .await
        .map_err(db)?;
        let row = sqlx::query(
            "SELECT token, tenant_id, name, wrapping, sealed_key, created_at, expires_at, used_at \
             FROM import_tokens WHERE token = $1",
        )
        .bind(token)
        .fetch_optional(self.pool())
        .await
        .map_err(db)?;
        let Some(row) = row else {
            return Ok(Redeemed::Unknown);
        };
        let record = ImportTokenRecord {
            token: row.try_get("token").map_err(db)?,
            tenant_id: row.try_get("tenant_id").map_err(db)?,
            name: row.try_get("name").map_err(db)?,
            wrapping: row.try_get("wrapping").map_err(db)?,
            sealed_key: row.try_get("sealed_key").map_err(db)?,
            created_at_ms: row.try_get("created_at").map_err(db)?,
            expires_at_ms: row.try_get("expires_at").map_err(db)?,
        };
        let used_at: Option<i64> = row.try_get("used_at").map_err(db)?;
        Ok(if taken.rows_affected() == 1 {
            Redeemed::Taken(record)
        } else if let Some(at) = used_at {
            Redeemed::Used(at)
        } else {
            Redeemed::Expired(record.expires_at_ms)
        })
    }
}
