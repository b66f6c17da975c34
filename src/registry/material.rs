//! What a stored binding needs to reach its key (targets built from a
//! registry record), and local key material sealed under the platform
//! keyring.

use std::sync::Arc;

use super::BindingRecord;
use crate::context::Context;
use crate::envelope::Envelope;
use crate::keys::DirectoryError;
use crate::kms::InvalidIdentifier;
use crate::kms::aws::{AwsKeyTarget, KeyArn, RoleArn};
use crate::kms::azure::{AzureKey, AzureKeyRef, AzureKeyVault};
use crate::kms::gcp::{GcpKeyName, GcpKeyTarget};
use crate::kms::local::LocalKeyring;
use crate::kms::vault::{VaultKeyRef, VaultLogin, VaultTarget};
use crate::kms::{KeyProvider as _, ProviderKind, WrapContext};
use crate::secret::SecretBytes;

/// What an `aws-kms` binding needs to reach its key. Fails only on a record
/// whose identifiers were not validated when linked.
pub fn aws_target(
    record: &BindingRecord,
    external_id: &str,
) -> Result<AwsKeyTarget, InvalidIdentifier> {
    Ok(AwsKeyTarget {
        tenant_id: record.tenant_id.clone(),
        key_arn: KeyArn::parse(&record.key_reference)?,
        role_arn: RoleArn::parse(&record.role_arn)?,
        external_id: external_id.to_owned(),
        replica_regions: record.replica_regions.clone(),
    })
}

/// What a `gcp-kms` binding needs to reach its key.
/// A `vault-transit` binding's target: the key URL and the login (the
/// AppRole's role_id or the jwt role kept in `role_arn`, the auth mount in
/// `service_account`; an AppRole's secret_id given opened, none for jwt).
pub fn vault_target(
    record: &BindingRecord,
    secret_id: Option<secrecy::SecretString>,
) -> Result<VaultTarget, InvalidIdentifier> {
    let role = record.role_arn.clone();
    Ok(VaultTarget {
        key: VaultKeyRef::parse(&record.key_reference)?,
        auth_mount: record.service_account.clone(),
        login: match secret_id {
            Some(secret_id) => VaultLogin::AppRole {
                role_id: role,
                secret_id,
            },
            None => VaultLogin::Jwt {
                role,
                subject: crate::kms::issuer::subject(&record.tenant_id),
            },
        },
    })
}

/// An `azure-kv` binding's key: the reference (its host checked against
/// `azure_vault_domains`) and the customer's Entra tenant, kept in the
/// binding's identity column (`role_arn`).
pub fn azure_key(
    azure: &Arc<AzureKeyVault>,
    record: &BindingRecord,
) -> Result<AzureKey, InvalidIdentifier> {
    let key = AzureKeyRef::parse(&record.key_reference, &azure.settings().vault_domains)?;
    crate::kms::azure::validate_tenant_id(&record.role_arn)?;
    Ok(azure.key(key, record.role_arn.clone()))
}

pub fn gcp_target(record: &BindingRecord) -> Result<GcpKeyTarget, InvalidIdentifier> {
    Ok(GcpKeyTarget {
        key_name: GcpKeyName::parse(&record.key_reference)?,
        service_account: record.service_account.clone(),
    })
}

/// A stored binding this build cannot use (edited by hand, or from a build
/// that validated differently): an internal error, logged with the details.
pub(super) fn unusable(record: &BindingRecord, err: &InvalidIdentifier) -> DirectoryError {
    DirectoryError::Internal(format!(
        "stored key binding '{}' of tenant '{}' is unusable: {err}",
        record.name, record.tenant_id
    ))
}

/// Imported key material is wrapped by the platform keyring under an AAD no
/// data-plane request can produce: `#` is not allowed in tenant ids.
fn material_wrap_context(tenant_id: &str, name: &str) -> Result<(String, Context), DirectoryError> {
    // Key names are validated long before (at most 64 safe characters).
    let context = Context::new(std::collections::BTreeMap::from([(
        "binding".to_owned(),
        name.to_owned(),
    )]))
    .map_err(|e| DirectoryError::Internal(format!("key name '{name}': {e}")))?;
    Ok((format!("#imported/{tenant_id}"), context))
}

/// Bytes of one imported key version.
pub const MATERIAL_VERSION_LEN: usize = 32;

/// The versions of stored key material, oldest first: imported versions are
/// stored as one sealed blob, 32 bytes per version (a key imported once is
/// one version, as before versions existed).
pub fn material_versions(material: &SecretBytes) -> Result<Vec<SecretBytes>, DirectoryError> {
    let bytes = material.expose();
    if bytes.is_empty() || bytes.len() % MATERIAL_VERSION_LEN != 0 {
        return Err(DirectoryError::Internal(format!(
            "stored key material is {} bytes, not a multiple of {MATERIAL_VERSION_LEN}",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks(MATERIAL_VERSION_LEN)
        .map(|c| SecretBytes::new(c.to_vec()))
        .collect())
}

/// Encrypts raw key material under the platform keyring for storage.
pub async fn seal_material(
    platform: &LocalKeyring,
    tenant_id: &str,
    name: &str,
    material: &SecretBytes,
) -> Result<Vec<u8>, DirectoryError> {
    let (aad_tenant, context) = material_wrap_context(tenant_id, name)?;
    let ciphertext = platform
        .encrypt(
            material,
            WrapContext {
                tenant_id: &aad_tenant,
                context: &context,
            },
        )
        .await
        .map_err(|e| DirectoryError::Internal(format!("sealing key material: {e}")))?;
    Ok(Envelope {
        tenant_id: aad_tenant,
        key_binding: name.to_owned(),
        provider: ProviderKind::Local,
        provider_key_version: ciphertext.key_version,
        ciphertext: ciphertext.bytes,
        tenant_key_version: 0,
        incarnation: 0,
    }
    .encode())
}

pub async fn open_material(
    platform: &LocalKeyring,
    tenant_id: &str,
    name: &str,
    sealed: &[u8],
) -> Result<SecretBytes, DirectoryError> {
    let (aad_tenant, context) = material_wrap_context(tenant_id, name)?;
    let envelope = Envelope::parse(sealed)
        .map_err(|e| DirectoryError::Internal(format!("stored key material of '{name}': {e}")))?;
    platform
        .decrypt(
            &envelope.provider_key_version,
            &envelope.ciphertext,
            WrapContext {
                tenant_id: &aad_tenant,
                context: &context,
            },
        )
        .await
        .map_err(|e| {
            DirectoryError::Internal(format!(
                "stored key material of '{name}' does not decrypt under the platform keyring: {e}"
            ))
        })
}
