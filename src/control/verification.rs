//! Proof that a key works before it is accepted: a describe and a real
//! encrypt/decrypt round trip through the provider.

use super::AdminError;
use crate::context;
use crate::secret::SecretBytes;

pub(super) fn probe_wrap<'a>(
    tenant_id: &'a str,
    context: &'a context::Context,
) -> crate::kms::WrapContext<'a> {
    crate::kms::WrapContext { tenant_id, context }
}

/// A real round trip through the provider before a key is accepted: the key
/// is enabled and customer managed, and a random probe encrypts and decrypts
/// under the tenant's binding (with the canary context, so no caller's
/// wrapped key can ever be one). Returns the probe's ciphertext: the
/// binding's canary, which every key-state check decrypts again.
pub(super) async fn verify_provider(
    provider: &dyn crate::kms::KeyProvider,
    tenant_id: &str,
    owner: Option<&Ownership<'_>>,
) -> Result<crate::kms::Ciphertext, AdminError> {
    use crate::kms::ProviderKeyState;
    let failed = AdminError::Provider;
    let description = provider.describe().await.map_err(failed)?;
    if let Some(owner) = owner {
        owner.check(description.owner_tag.as_deref())?;
    }
    let rotation_enabled = match description.rotation_enabled {
        Some(known) => Some(known),
        None => provider.rotation_enabled().await,
    };
    tracing::info!(
        tenant = tenant_id,
        provider = %provider.kind(),
        state = ?description.state,
        version = %description.current_version,
        rotation_enabled = ?rotation_enabled,
        rotation_period = ?description.rotation_period,
        protection_level = ?description.protection_level,
        "verifying a key to link"
    );
    if description.state != ProviderKeyState::Enabled {
        return Err(AdminError::Verification(format!(
            "the key is {:?}; enable it in the key provider first",
            description.state
        )));
    }
    if description.key_manager.as_deref() == Some("AWS") {
        return Err(AdminError::Verification(
            "AWS-managed keys cannot be shared; create a customer managed key".into(),
        ));
    }
    let probe = SecretBytes::random(32)
        .map_err(|_| AdminError::Internal("system random generator failed".into()))?;
    let context = crate::keys::canary_context();
    let ciphertext = provider
        .encrypt(&probe, probe_wrap(tenant_id, &context))
        .await
        .map_err(failed)?;
    let back = provider
        .decrypt(
            &ciphertext.key_version,
            &ciphertext.bytes,
            probe_wrap(tenant_id, &context),
        )
        .await
        .map_err(failed)?;
    if back != probe {
        return Err(AdminError::Verification(
            "the round trip returned other bytes".into(),
        ));
    }
    Ok(ciphertext)
}

/// What proves a Cloud KMS or Key Vault key is meant for the tenant linking
/// it, as the external ID in a role's trust policy does for AWS: a label or
/// tag on the key, [`crate::kms::OWNER_TAG`] = the tenant's external id,
/// which only someone allowed to change the key can set. Without it, any
/// tenant could link any key that keybroker's identity may use (another
/// customer's), couple its revocations and spend its quota.
pub(super) struct Ownership<'a> {
    pub external_id: &'a str,
    /// "label" (Cloud KMS) or "tag" (Key Vault).
    pub what: &'static str,
    /// The customer's command that sets it.
    pub command: String,
}

impl Ownership<'_> {
    /// Checked after the describe and before any wrap. The value found is
    /// never echoed: it may be another tenant's external id.
    fn check(&self, found: Option<&str>) -> Result<(), AdminError> {
        // Not a secret (anyone who can read the key sees it): a plain compare.
        if found == Some(self.external_id) {
            return Ok(());
        }
        let state = if found.is_some() {
            "names another tenant"
        } else {
            "is missing"
        };
        Err(AdminError::Refused(format!(
            "the key's {} {} {state}: it proves the key's owner meant it for this tenant, so the customer who owns the key sets it to this tenant's external id (GetTenant's onboarding), then links again: {}",
            crate::kms::OWNER_TAG,
            self.what,
            self.command
        )))
    }
}

/// The stored form of a link's canary (`registry::key_state`).
pub(super) fn canary_envelope(
    record: &crate::registry::NewBinding,
    ciphertext: crate::kms::Ciphertext,
) -> Vec<u8> {
    crate::registry::key_state::canary_envelope(
        &record.tenant_id,
        &record.name,
        record.provider,
        ciphertext,
    )
    .encode()
}
