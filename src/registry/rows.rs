//! Rows to records and back: the column lists, the readers of tenants,
//! bindings and tenant key versions, and the enum names as stored.

use sqlx::Any;
use sqlx::any::AnyRow;

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

/// A database error; a value that does not decode is a corrupt registry.
pub(super) fn db(err: sqlx::Error) -> RegistryError {
    match err {
        sqlx::Error::ColumnDecode { .. } => RegistryError::Corrupt(err.to_string()),
        _ => RegistryError::Database(err.to_string()),
    }
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
    sqlx::FromRow::from_row(row).map_err(db)
}

pub(super) fn tenant_key_from_row(row: &AnyRow) -> Result<TenantKeyRecord, RegistryError> {
    sqlx::FromRow::from_row(row).map_err(db)
}

pub(super) fn tenant_from_row(row: &AnyRow) -> Result<Tenant, RegistryError> {
    sqlx::FromRow::from_row(row).map_err(db)
}

// Column types `FromRow` reads through (`#[sqlx(try_from = …)]`): what the
// schema stores in a form sqlx's `Any` driver cannot decode into the field
// directly (it decodes no bool from an INTEGER, no enum from TEXT).

/// A column decoded as it is stored (`T`), for `#[sqlx(try_from = …)]` to
/// convert into the field.
pub(super) struct Stored<T>(T);

impl<T: sqlx::Type<Any>> sqlx::Type<Any> for Stored<T> {
    fn type_info() -> sqlx::any::AnyTypeInfo {
        T::type_info()
    }

    fn compatible(ty: &sqlx::any::AnyTypeInfo) -> bool {
        T::compatible(ty)
    }
}

impl<'r, T: sqlx::Decode<'r, Any>> sqlx::Decode<'r, Any> for Stored<T> {
    fn decode(value: sqlx::any::AnyValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        Ok(Self(T::decode(value)?))
    }
}

/// A flag stored as INTEGER 0/1.
pub(super) type Flag = Stored<i64>;

impl From<Flag> for bool {
    fn from(flag: Flag) -> Self {
        flag.0 == 1
    }
}

/// A list stored as comma-separated TEXT (AWS replica regions).
pub(super) type CommaList = Stored<String>;

impl From<CommaList> for Vec<String> {
    fn from(list: CommaList) -> Self {
        list.0
            .split(',')
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// A key version stored as a nullable BIGINT.
pub(super) type Version = Stored<Option<i64>>;

impl TryFrom<Version> for Option<u32> {
    type Error = String;

    fn try_from(version: Version) -> Result<Self, String> {
        version
            .0
            .map(|v| u32::try_from(v).map_err(|_| format!("key version {v} out of range")))
            .transpose()
    }
}

/// The enums stored by name (`IntoStaticStr`/`FromStr` through strum).
macro_rules! stored_by_name {
    ($($ty:ty => $what:literal),* $(,)?) => {$(
        impl TryFrom<String> for $ty {
            type Error = String;

            fn try_from(text: String) -> Result<Self, String> {
                text.parse().map_err(|_| format!(concat!($what, " {:?}"), text))
            }
        }
    )*};
}

stored_by_name! {
    KeyPolicy => "key policy",
    KeyHierarchy => "key hierarchy",
    BindingState => "binding state",
    ProviderKind => "provider",
}

impl TryFrom<String> for crate::access::AccessPolicy {
    type Error = String;

    /// The JSON `SetAccessPolicy` stored (empty: the default).
    fn try_from(text: String) -> Result<Self, String> {
        Self::from_stored(&text)
    }
}
