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
) -> Result<crate::kms::Ciphertext, AdminError> {
    use crate::kms::ProviderKeyState;
    let failed = AdminError::Provider;
    let description = provider.describe().await.map_err(failed)?;
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
