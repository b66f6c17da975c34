//! Export and restore of a registry: the tenants, their bindings and their
//! tenant key versions, row by row, as one JSON document.
//!
//! The registry holds what nothing else holds (tenant keys exist only here,
//! wrapped), so losing it loses every DEK sealed under them. An export is
//! safe to store like any backup of wrapped keys: every tenant key version
//! and imported key material in it is still encrypted by a customer key or
//! the platform key. Restoring it brings a lost registry back; it also
//! brings back tenants deleted since the export (crypto-shredding is only
//! as final as the oldest backup kept).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};
use sqlx::{Any, AnyPool, Row, Transaction};

use super::RegistryError;

/// Format marker of an export document.
pub const FORMAT: &str = "keybroker-registry-export-v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    OptText,
    Int,
    OptInt,
    Blob,
    OptBlob,
}

/// Every table and column an export carries, in restore order.
const TABLES: &[(&str, &[(&str, Kind)])] = &[
    (
        "tenants",
        &[
            ("id", Kind::Text),
            ("key_policy", Kind::Text),
            ("external_id", Kind::Text),
            ("key_hierarchy", Kind::Text),
            ("reencrypt_to", Kind::OptText),
            ("reencrypt_from", Kind::OptText),
            ("newest_import_primary", Kind::Int),
            ("created_at", Kind::Int),
            ("updated_at", Kind::Int),
            ("incarnation", Kind::Int),
            ("legacy_deks", Kind::Int),
            ("implicit", Kind::Int),
            ("key_epoch", Kind::Int),
            ("next_key_version", Kind::Int),
            ("delete_at", Kind::OptInt),
            ("reencrypt_then_disable", Kind::OptText),
            ("reencrypt_disable_reason", Kind::Text),
            ("reencrypt_last", Kind::OptText),
            ("access_policy", Kind::Text),
        ],
    ),
    (
        "key_bindings",
        &[
            ("tenant_id", Kind::Text),
            ("name", Kind::Text),
            ("description", Kind::Text),
            ("provider", Kind::Text),
            ("key_reference", Kind::Text),
            ("region", Kind::Text),
            ("role_arn", Kind::Text),
            ("service_account", Kind::Text),
            ("replica_regions", Kind::Text),
            ("key_material", Kind::OptBlob),
            ("state", Kind::Text),
            ("state_reason", Kind::Text),
            ("is_primary", Kind::Int),
            ("created_at", Kind::Int),
            ("updated_at", Kind::Int),
            ("last_used_at", Kind::OptInt),
            ("wrap_count", Kind::Int),
            ("unwrap_count", Kind::Int),
            ("material_updated_at", Kind::OptInt),
            ("link_id", Kind::Int),
            ("canary", Kind::OptBlob),
            ("seal_only_from", Kind::OptInt),
        ],
    ),
    (
        "tenant_keys",
        &[
            ("tenant_id", Kind::Text),
            ("version", Kind::Int),
            ("binding", Kind::Text),
            ("provider_key_version", Kind::Text),
            ("wrapped", Kind::Blob),
            ("created_at", Kind::Int),
            ("updated_at", Kind::Int),
            ("epoch", Kind::Int),
        ],
    ),
    (
        "key_retirements",
        &[
            ("tenant_id", Kind::Text),
            ("key_name", Kind::Text),
            ("min_version", Kind::Int),
            ("updated_at", Kind::Int),
        ],
    ),
    (
        "key_version_usage",
        &[
            ("tenant_id", Kind::Text),
            ("key_name", Kind::Text),
            ("version", Kind::Text),
            ("wrap_count", Kind::Int),
            ("unwrap_count", Kind::Int),
            ("last_used_at", Kind::Int),
        ],
    ),
    (
        "rotations",
        &[("subject", Kind::Text), ("rotated_at", Kind::Int)],
    ),
    (
        "deleted_tenants",
        &[
            ("id", Kind::Text),
            ("incarnation", Kind::Int),
            ("deleted_at", Kind::Int),
        ],
    ),
];

/// Tables an export from a build before them does not have: restored empty.
const ADDED_LATER: [&str; 4] = [
    "key_retirements",
    "key_version_usage",
    "rotations",
    "deleted_tenants",
];

/// Columns an export from a build before them does not have, and the value
/// they get (what the migration that added them gives existing rows; a
/// restored tenant's next version number is fixed up after the rows).
const COLUMNS_ADDED_LATER: &[(&str, &str, i64)] = &[
    ("tenants", "incarnation", 1),
    ("tenants", "legacy_deks", 1),
    ("tenants", "implicit", 0),
    ("tenants", "key_epoch", 0),
    ("tenants", "next_key_version", 1),
    ("key_bindings", "link_id", 0),
    ("tenant_keys", "epoch", 0),
];

/// Nullable or text columns added later: absent means NULL or empty.
const OPTIONAL_ADDED_LATER: &[&str] = &[
    "delete_at",
    "reencrypt_then_disable",
    "reencrypt_disable_reason",
    "reencrypt_last",
    "canary",
    "seal_only_from",
    "access_policy",
];

fn db(err: sqlx::Error) -> RegistryError {
    RegistryError::Database(err.to_string())
}

fn value_of(row: &sqlx::any::AnyRow, column: &str, kind: Kind) -> Result<Value, RegistryError> {
    Ok(match kind {
        Kind::Text => json!(row.try_get::<String, _>(column).map_err(db)?),
        Kind::OptText => json!(row.try_get::<Option<String>, _>(column).map_err(db)?),
        Kind::Int => json!(row.try_get::<i64, _>(column).map_err(db)?),
        Kind::OptInt => json!(row.try_get::<Option<i64>, _>(column).map_err(db)?),
        Kind::Blob => json!(B64.encode(row.try_get::<Vec<u8>, _>(column).map_err(db)?)),
        Kind::OptBlob => json!(
            row.try_get::<Option<Vec<u8>>, _>(column)
                .map_err(db)?
                .map(|b| B64.encode(b))
        ),
    })
}

/// Every row of every table, as one document: one read-only transaction,
/// so the tables agree with each other (a key change or a deletion running
/// meanwhile is in it entirely or not at all).
pub(super) async fn export(pool: &AnyPool, postgres: bool) -> Result<Value, RegistryError> {
    let mut tx: Transaction<'static, Any> = if postgres {
        pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(db)?
    } else {
        // A read transaction: every SELECT in it sees one snapshot.
        pool.begin_with("BEGIN DEFERRED").await.map_err(db)?
    };
    let mut tables = Map::new();
    for (table, columns) in TABLES {
        let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
        let rows = sqlx::query(&format!(
            "SELECT {} FROM {table} ORDER BY {}",
            names.join(", "),
            names[0]
        ))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut object = Map::new();
            for (name, kind) in *columns {
                object.insert((*name).to_owned(), value_of(row, name, *kind)?);
            }
            out.push(Value::Object(object));
        }
        tables.insert((*table).to_owned(), Value::Array(out));
    }
    tx.commit().await.map_err(db)?;
    Ok(json!({ "format": FORMAT, "tables": tables }))
}

/// Restores `document` into an empty registry, in one transaction: either
/// every row is back, or nothing changed.
pub(super) async fn restore(pool: &AnyPool, document: &Value) -> Result<usize, RegistryError> {
    let corrupt = |why: String| RegistryError::Corrupt(format!("registry export: {why}"));
    if document["format"] != FORMAT {
        return Err(corrupt(format!("not a {FORMAT} document")));
    }
    let mut tx: Transaction<'static, Any> = pool.begin().await.map_err(db)?;
    let existing: i64 = sqlx::query("SELECT COUNT(*) FROM tenants")
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?
        .try_get(0)
        .map_err(db)?;
    if existing > 0 {
        return Err(RegistryError::Refused(format!(
            "the registry already holds {existing} tenant(s); restore into an empty registry"
        )));
    }
    let mut restored = 0;
    for (table, columns) in TABLES {
        let rows = match document["tables"][table].as_array() {
            Some(rows) => rows,
            None if ADDED_LATER.contains(table) => continue,
            None => return Err(corrupt(format!("no table {table}"))),
        };
        let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
        let placeholders: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            names.join(", "),
            placeholders.join(", ")
        );
        for row in rows {
            let mut query = sqlx::query(&sql);
            for (name, kind) in *columns {
                let added = COLUMNS_ADDED_LATER
                    .iter()
                    .find(|(t, c, _)| t == table && c == name)
                    .map(|(_, _, default)| json!(default));
                let v = match (&row[name], added) {
                    (Value::Null, Some(default)) => default,
                    (Value::Null, None)
                        if OPTIONAL_ADDED_LATER.contains(name) && *kind == Kind::Text =>
                    {
                        json!("")
                    }
                    (v, _) => v.clone(),
                };
                let v = &v;
                let bad = || corrupt(format!("{table}.{name} is {v}"));
                query = match kind {
                    Kind::Text => query.bind(v.as_str().ok_or_else(bad)?.to_owned()),
                    Kind::OptText => query.bind(v.as_str().map(str::to_owned)),
                    Kind::Int => query.bind(v.as_i64().ok_or_else(bad)?),
                    Kind::OptInt => query.bind(v.as_i64()),
                    Kind::Blob => {
                        let text = v.as_str().ok_or_else(bad)?;
                        query.bind(B64.decode(text).map_err(|_| bad())?)
                    }
                    Kind::OptBlob => match v.as_str() {
                        Some(text) => query.bind(Some(B64.decode(text).map_err(|_| bad())?)),
                        None => query.bind(None::<Vec<u8>>),
                    },
                };
            }
            query.execute(&mut *tx).await.map_err(db)?;
            restored += 1;
        }
    }
    // An export from before version counters: each tenant's next number is
    // past its newest version.
    sqlx::query(
        "UPDATE tenants SET next_key_version = COALESCE((SELECT MAX(version) FROM tenant_keys \
         WHERE tenant_keys.tenant_id = tenants.id), 0) + 1 \
         WHERE next_key_version <= COALESCE((SELECT MAX(version) FROM tenant_keys \
         WHERE tenant_keys.tenant_id = tenants.id), 0)",
    )
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(restored)
}
