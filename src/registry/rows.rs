//! Rows to records and back: the column lists, the readers of tenants,
//! bindings and tenant key versions, and the enum names as stored.

use sqlx::any::AnyRow;
use sqlx::{Any, Row};

use super::{BindingRecord, KeyPolicy, RegistryError, Tenant, TenantKeyRecord};
use crate::keys::{BindingState, KeyHierarchy};
use crate::kms::ProviderKind;

pub(super) const TENANT_COLUMNS: &str = "id, key_policy, external_id, key_hierarchy, reencrypt_to, \
     reencrypt_from, newest_import_primary, created_at, updated_at, incarnation, legacy_deks, \
     implicit, key_epoch, next_key_version, delete_at, reencrypt_then_disable, reencrypt_disable_reason, reencrypt_last, access_policy";

pub(super) const TENANT_KEY_COLUMNS: &str =
    "tenant_id, version, binding, provider_key_version, wrapped, created_at, updated_at, epoch";

pub(super) const BINDING_COLUMNS: &str = "tenant_id, name, description, provider, key_reference, region, \
     role_arn, service_account, replica_regions, key_material, state, state_reason, is_primary, created_at, \
     updated_at, last_used_at, wrap_count, unwrap_count, material_updated_at, link_id, canary, seal_only_from";

pub(super) fn db(err: sqlx::Error) -> RegistryError {
    RegistryError::Database(err.to_string())
}

/// One binding, through the pool or inside a transaction.
pub(super) async fn fetch_binding<'e, E: sqlx::Executor<'e, Database = Any>>(
    exec: E,
    tenant_id: &str,
    name: &str,
) -> Result<Option<BindingRecord>, RegistryError> {
    sqlx::query(&format!(
        "SELECT {BINDING_COLUMNS} FROM key_bindings WHERE tenant_id = $1 AND name = $2"
    ))
    .bind(tenant_id)
    .bind(name)
    .fetch_optional(exec)
    .await
    .map_err(db)?
    .as_ref()
    .map(binding_from_row)
    .transpose()
}

/// One binding that must exist.
pub(super) async fn existing_binding<'e, E: sqlx::Executor<'e, Database = Any>>(
    exec: E,
    tenant_id: &str,
    name: &str,
) -> Result<BindingRecord, RegistryError> {
    fetch_binding(exec, tenant_id, name)
        .await?
        .ok_or_else(|| RegistryError::BindingNotFound {
            tenant_id: tenant_id.to_owned(),
            name: name.to_owned(),
        })
}

/// A tenant's bindings, oldest first.
pub(super) async fn fetch_bindings<'e, E: sqlx::Executor<'e, Database = Any>>(
    exec: E,
    tenant_id: &str,
) -> Result<Vec<BindingRecord>, RegistryError> {
    sqlx::query(&format!(
        "SELECT {BINDING_COLUMNS} FROM key_bindings WHERE tenant_id = $1 ORDER BY created_at, name"
    ))
    .bind(tenant_id)
    .fetch_all(exec)
    .await
    .map_err(db)?
    .iter()
    .map(binding_from_row)
    .collect()
}

pub(super) fn state_str(state: BindingState) -> &'static str {
    state.into()
}

pub(super) fn parse_state(text: &str) -> Result<BindingState, RegistryError> {
    text.parse()
        .map_err(|_| RegistryError::Corrupt(format!("binding state {text:?}")))
}

pub(super) fn parse_provider(text: &str) -> Result<ProviderKind, RegistryError> {
    text.parse()
        .map_err(|_| RegistryError::Corrupt(format!("provider {text:?}")))
}

/// A random link id: a key linked again under the same name is another key
/// to every cache.
pub(super) fn new_link_id() -> Result<i64, RegistryError> {
    let bytes = crate::secret::SecretBytes::random(8)
        .map_err(|_| RegistryError::Database("system random generator failed".into()))?;
    let mut word = [0u8; 8];
    word.copy_from_slice(bytes.expose());
    Ok(i64::from_le_bytes(word) & i64::MAX)
}

pub(super) fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(super) fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(super) fn binding_from_row(row: &AnyRow) -> Result<BindingRecord, RegistryError> {
    let get_s = |col: &str| row.try_get::<String, _>(col).map_err(db);
    let get_i = |col: &str| row.try_get::<i64, _>(col).map_err(db);
    Ok(BindingRecord {
        tenant_id: get_s("tenant_id")?,
        name: get_s("name")?,
        description: get_s("description")?,
        provider: parse_provider(&get_s("provider")?)?,
        key_reference: get_s("key_reference")?,
        region: get_s("region")?,
        role_arn: get_s("role_arn")?,
        service_account: get_s("service_account")?,
        replica_regions: get_s("replica_regions")?
            .split(',')
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect(),
        key_material: row
            .try_get::<Option<Vec<u8>>, _>("key_material")
            .map_err(db)?,
        state: parse_state(&get_s("state")?)?,
        state_reason: get_s("state_reason")?,
        primary: get_i("is_primary")? == 1,
        created_at_ms: get_i("created_at")?,
        updated_at_ms: get_i("updated_at")?,
        last_used_at_ms: row.try_get::<Option<i64>, _>("last_used_at").map_err(db)?,
        material_updated_at_ms: row
            .try_get::<Option<i64>, _>("material_updated_at")
            .map_err(db)?,
        wrap_count: count(get_i("wrap_count")?),
        unwrap_count: count(get_i("unwrap_count")?),
        link_id: get_i("link_id")?,
        canary: row.try_get::<Option<Vec<u8>>, _>("canary").map_err(db)?,
        seal_only_from: row
            .try_get::<Option<i64>, _>("seal_only_from")
            .map_err(db)?
            .map(|v| u32::try_from(v).unwrap_or(u32::MAX)),
    })
}

pub(super) fn parse_hierarchy(text: &str) -> Result<KeyHierarchy, RegistryError> {
    text.parse()
        .map_err(|_| RegistryError::Corrupt(format!("key hierarchy {text:?}")))
}

pub(super) fn tenant_key_from_row(row: &AnyRow) -> Result<TenantKeyRecord, RegistryError> {
    sqlx::FromRow::from_row(row).map_err(db)
}

/// Tenants and bindings are read by hand: their flags are INTEGER columns
/// (sqlx's `Any` driver decodes no bool from one) and their enums and the
/// access policy are text parsed into domain types, which `FromRow` would
/// need a wrapper type for each to do.
pub(super) fn tenant_from_row(row: &AnyRow) -> Result<Tenant, RegistryError> {
    let next: i64 = row.try_get("next_key_version").map_err(db)?;
    Ok(Tenant {
        id: row.try_get("id").map_err(db)?,
        key_policy: KeyPolicy::parse(&row.try_get::<String, _>("key_policy").map_err(db)?)?,
        external_id: row.try_get("external_id").map_err(db)?,
        key_hierarchy: parse_hierarchy(&row.try_get::<String, _>("key_hierarchy").map_err(db)?)?,
        reencrypt_to: row.try_get("reencrypt_to").map_err(db)?,
        reencrypt_from: row.try_get("reencrypt_from").map_err(db)?,
        newest_import_primary: row.try_get::<i64, _>("newest_import_primary").map_err(db)? == 1,
        created_at_ms: row.try_get("created_at").map_err(db)?,
        updated_at_ms: row.try_get("updated_at").map_err(db)?,
        incarnation: count(row.try_get("incarnation").map_err(db)?),
        legacy_deks: row.try_get::<i64, _>("legacy_deks").map_err(db)? == 1,
        implicit: row.try_get::<i64, _>("implicit").map_err(db)? == 1,
        key_epoch: count(row.try_get("key_epoch").map_err(db)?),
        next_key_version: u32::try_from(next)
            .map_err(|_| RegistryError::Corrupt(format!("next tenant key version {next}")))?,
        delete_at_ms: row.try_get("delete_at").map_err(db)?,
        reencrypt_then_disable: row.try_get("reencrypt_then_disable").map_err(db)?,
        reencrypt_disable_reason: row.try_get("reencrypt_disable_reason").map_err(db)?,
        reencrypt_last: row.try_get("reencrypt_last").map_err(db)?,
        access_policy: crate::access::AccessPolicy::from_stored(
            &row.try_get::<String, _>("access_policy").map_err(db)?,
        )
        .map_err(RegistryError::Corrupt)?,
    })
}
