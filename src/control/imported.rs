//! New versions of imported key material, as Vault's transit
//! `import_version`: the customer rotates their own material; keybroker
//! never invents it (the customer keeps the only other copy, and the
//! promise is that exactly that material protects their data).

use std::sync::Arc;

use super::verification::verify_provider;
use super::{Admin, AdminError, KeyView, not_found};
use super::{BindingName, TenantId};
use crate::keys::{KeyHierarchy, now_ms};
use crate::kms::ProviderKind;
use crate::kms::local::LocalKeyring;
use crate::registry::directory::{material_versions, open_material, seal_material};
use crate::secret::SecretBytes;

impl Admin {
    /// Adds `material_base64` as the newest version of imported key `name`:
    /// it wraps new DEKs from now on; older versions keep unwrapping until
    /// retired (RetireKeyVersions). Tenant key versions the key protects
    /// are re-wrapped under the new version at once (one local wrap each).
    pub async fn import_key_version(
        &self,
        tenant_id: &TenantId,
        name: &BindingName,
        material: SecretBytes,
    ) -> Result<KeyView, AdminError> {
        let tenant = self.live_tenant(tenant_id).await?;
        let record = self
            .registry()
            .binding(tenant_id, name)
            .await?
            .ok_or_else(|| not_found(tenant_id, name))?;
        let (ProviderKind::Local, Some(sealed)) = (record.provider, record.key_material.as_deref())
        else {
            return Err(AdminError::InvalidArgument(format!(
                "key '{name}' is a {} key, not imported material: its new versions are made in the customer's KMS",
                record.provider
            )));
        };
        self.refuse_duplicate_material(tenant_id, &material).await?;
        let probe = LocalKeyring::from_material("verification", std::slice::from_ref(&material))
            .map_err(|e| AdminError::Verification(e.to_string()))?;
        verify_provider(&probe, tenant_id, None).await?;
        let keyring = Arc::clone(self.directory.platform_keyring());
        let existing = open_material(&keyring, tenant_id, name, sealed).await?;
        let newest = u32::try_from(material_versions(&existing)?.len() + 1).unwrap_or(u32::MAX);
        let mut all = Vec::with_capacity(existing.len() + material.len());
        all.extend_from_slice(existing.expose());
        all.extend_from_slice(material.expose());
        let all = SecretBytes::new(all);
        let resealed = seal_material(&keyring, tenant_id, name, &all).await?;
        if !self
            .registry()
            .replace_key_material(
                tenant_id,
                name,
                sealed,
                &resealed,
                Some(now_ms()),
                Some(newest),
            )
            .await?
        {
            return Err(AdminError::Refused(format!(
                "key '{name}' of tenant '{tenant_id}' changed while the new version was imported; retry"
            )));
        }
        self.directory.changed(tenant_id, None).await;
        if tenant.key_hierarchy == KeyHierarchy::TenantKey {
            let moved = self.rewrap_tenant_keys_of(tenant_id, name, newest).await?;
            tracing::info!(
                tenant = tenant_id.as_str(),
                key = name.as_str(),
                moved,
                "tenant key versions re-wrapped under the new imported version"
            );
        }
        tracing::info!(
            tenant = tenant_id.as_str(),
            key = name.as_str(),
            version = newest,
            "imported key material version added"
        );
        self.get_key(tenant_id, name).await
    }
}
