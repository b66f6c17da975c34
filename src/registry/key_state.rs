//! A binding's provider-side state, decided by a describe call and nothing
//! else (DESIGN.md section 5, "Trust boundary").
//!
//! Two paths lead here: the watcher's periodic pass, and live requests. A
//! live request that sees "access denied", "disabled" or "not found" from a
//! provider has not proven anything: its own bytes (a forged wrapped key, a
//! context a key policy refuses) can provoke those answers. So it asks for
//! an out-of-turn describe of the binding, which uses no caller input, and
//! only that describe may revoke. Rechecks are coalesced (one describe in
//! flight per binding) and rate-limited (a verdict is reused for
//! `recheck_min_interval`), so a flood of forged requests costs the
//! customer's KMS at most one describe per binding per interval.

use crate::envelope::Envelope;
use std::sync::Arc;

use crate::keys::{BindingState, Confirmation, canary_context};
use crate::kms::{
    KeyDescription, KeyProvider, ProviderError, ProviderKeyState, ProviderKind, WrapContext,
};
use crate::registry::directory::RegistryDirectory;
use crate::registry::{Applied, BindingRecord, Verdict};
use crate::secret::SecretBytes;
use crate::text::Escaped;

/// What a describe alone says of a key: usable (the canary is still to
/// check), revoked and why, or nothing while the provider cannot answer.
fn described(
    result: Result<KeyDescription, ProviderError>,
    (tenant, binding): (&str, &str),
    key_reference: &str,
    provider: ProviderKind,
) -> Verdict {
    match result {
        Ok(d) if d.state == ProviderKeyState::Enabled => Verdict::Usable,
        Ok(d) if !d.reason.is_empty() => Verdict::Revoked(d.reason),
        Ok(d) => Verdict::Revoked(format!(
            "key {key_reference} in {provider} is {:?}",
            d.state
        )),
        Err(err) if err.suggests_revocation() => Verdict::Revoked(err.to_string()),
        Err(err) if err.is_transient() => {
            tracing::warn!(error = %err, tenant = %tenant, binding = %binding, "key check failed transiently; state unchanged");
            Verdict::Outage
        }
        Err(err) => {
            tracing::error!(error = %err, tenant = %tenant, binding = %binding, "key check failed; state unchanged");
            Verdict::Outage
        }
    }
}

impl RegistryDirectory {
    /// Describes a stored binding through its provider (for AWS: through the
    /// customer's role), then decrypts its canary: the describe sees a key
    /// disabled, scheduled for deletion or gone, the canary sees keybroker's
    /// permission to decrypt removed while the key itself is fine (a
    /// policy edited to drop decrypt), which is what the data plane needs.
    /// Two calls per check, no caller bytes in either. A check is not usage:
    /// nothing is recorded against the binding's counters.
    pub async fn check_binding(&self, record: &BindingRecord, external_id: &str) -> Verdict {
        let provider = match self.provider(record, external_id).await {
            Ok(p) => p,
            Err(err) => {
                tracing::error!(error = %err, tenant = %record.tenant_id, binding = %record.name, "cannot build the provider of a binding");
                return Verdict::Outage;
            }
        };
        let result = provider.describe().await;
        self.record_check(&record.tenant_id, &record.name);
        let names = (record.tenant_id.as_str(), record.name.as_str());
        match described(result, names, &record.key_reference, record.provider) {
            Verdict::Usable => self.check_canary(record, provider.as_ref()).await,
            verdict => verdict,
        }
    }

    /// Decrypts the binding's canary. One is made (and stored) first for a
    /// binding linked before canaries existed, and again when the provider
    /// key version the stored one was made under is disabled or destroyed
    /// (a version's state is not the key's: DEKs under it say so alone).
    async fn check_canary(&self, record: &BindingRecord, provider: &dyn KeyProvider) -> Verdict {
        if record.provider == ProviderKind::Local {
            // Material keybroker holds: no customer side to lose.
            return Verdict::Usable;
        }
        let stored = match record.canary.as_deref().map(Envelope::parse).transpose() {
            Ok(stored) => stored,
            Err(err) => {
                tracing::error!(error = %err, tenant = %record.tenant_id, binding = %record.name, "a stored canary is unreadable; making another");
                None
            }
        };
        if let Some(canary) = stored {
            match decrypt_canary(record, provider, &canary).await {
                Err(ProviderError::VersionDisabled(_)) => {}
                Err(err) => return canary_verdict(record, "decrypt", &err),
                Ok(()) => return Verdict::Usable,
            }
        }
        let plaintext = match SecretBytes::random(32) {
            Ok(p) => p,
            Err(_) => return Verdict::Outage,
        };
        let context = canary_context();
        let wrap = WrapContext {
            tenant_id: &record.tenant_id,
            context: &context,
        };
        let canary = match provider.encrypt(&plaintext, wrap).await {
            Ok(ciphertext) => {
                canary_envelope(&record.tenant_id, &record.name, record.provider, ciphertext)
            }
            Err(err) => return canary_verdict(record, "encrypt", &err),
        };
        if let Err(err) = decrypt_canary(record, provider, &canary).await {
            return canary_verdict(record, "decrypt", &err);
        }
        if let Err(err) = self
            .data_path_write(self.registry().set_canary(
                &record.tenant_id,
                &record.name,
                record.link_id,
                record.canary.as_deref(),
                &canary.encode(),
            ))
            .await
        {
            tracing::warn!(error = %err, "could not store a binding's canary; made again next check");
        }
        Verdict::Usable
    }

    /// The watcher's pass while the registry does not answer (it cannot
    /// claim bindings or record a verdict): every customer key this replica
    /// serves from memory is described, and one found revoked is applied
    /// here, in memory: its cached keys purged and the tenant's view amended,
    /// so the data plane refuses it at once. The registry learns it from the
    /// first pass after it answers again. Returns (checked, revoked).
    pub async fn check_in_memory(&self, concurrency: usize) -> (usize, usize) {
        use futures::StreamExt as _;
        let mut seen = std::collections::HashSet::new();
        let mut work = Vec::new();
        for (tenant, keys) in self.views.all() {
            for binding in &keys.bindings {
                let customer = binding.provider.kind() != ProviderKind::Local;
                if customer
                    && binding.state == BindingState::Active
                    && seen.insert((Arc::clone(&tenant), Arc::clone(&binding.name)))
                {
                    work.push((Arc::clone(&tenant), Arc::clone(&keys), Arc::clone(binding)));
                }
            }
        }
        let checked = work.len();
        let revoked = futures::stream::iter(work)
            .map(|(tenant, keys, binding)| async move {
                let result = binding.provider.describe().await;
                let kind = binding.provider.kind();
                let names = (tenant.as_str(), &*binding.name);
                let Verdict::Revoked(verdict) =
                    described(result, names, &binding.key_reference, kind)
                else {
                    return false;
                };
                self.revoke_in_view(&tenant, &keys, &binding.name, binding.link_id, &verdict)
                    .await;
                true
            })
            .buffer_unordered(concurrency.max(1))
            .filter(|revoked| std::future::ready(*revoked))
            .count()
            .await;
        (checked, revoked)
    }

    /// A revocation this replica cannot record (the registry does not
    /// answer), applied here: the binding's cached keys purged and the
    /// tenant's view amended, so the data plane refuses it at once. The
    /// registry learns it from the first check after it answers again.
    async fn revoke_in_view(
        &self,
        tenant: &str,
        keys: &Arc<crate::keys::TenantKeys>,
        binding: &str,
        link_id: i64,
        reason: &str,
    ) {
        tracing::warn!(
            tenant = %Escaped(tenant),
            binding = %Escaped(binding),
            reason = %reason,
            "a key was revoked at its provider while the registry does not answer: applied on this replica now, recorded when the registry answers"
        );
        self.cache.purge_binding(tenant, binding).await;
        let changed = keys.with_binding_revoked(binding, link_id, reason);
        self.views.amend(tenant, keys, changed).await;
    }

    /// Records a verdict as the binding's state (never touching a binding
    /// an operator disabled) and applies it on every replica. Within the
    /// data path's write deadline: a registry that stops answering mid-pass
    /// must not hold the watcher (and the next revocation) for its pool's
    /// acquire timeout. A revocation that cannot be recorded is applied on
    /// this replica meanwhile.
    pub async fn apply_verdict(&self, record: &BindingRecord, verdict: &Verdict) -> Applied {
        let (state, reason) = match verdict {
            Verdict::Usable => (BindingState::Active, ""),
            Verdict::Revoked(reason) => (BindingState::Revoked, reason.as_str()),
            Verdict::Outage => return Applied::Outage,
        };
        match self
            .data_path_write(self.set_key_state(record, state, reason))
            .await
        {
            Ok(true) if state == BindingState::Revoked => Applied::Revoked,
            Ok(true) => Applied::Restored,
            Ok(false) => Applied::Unchanged,
            Err(err) => {
                tracing::error!(error = %err, tenant = %record.tenant_id, binding = %record.name, "could not record key state");
                if state != BindingState::Revoked {
                    return Applied::Unchanged;
                }
                let tenant = record.tenant_id.as_str();
                let Some(keys) = self.views.peek(tenant) else {
                    // Nothing of the tenant in memory: nothing to serve.
                    return Applied::Unchanged;
                };
                self.revoke_in_view(tenant, &keys, &record.name, record.link_id, reason)
                    .await;
                Applied::Revoked
            }
        }
    }

    /// The out-of-turn check a live request's definitive error asks for:
    /// one describe shared by every concurrent caller, its verdict reused
    /// for `recheck_min_interval`, applied like a watcher check.
    pub(crate) async fn recheck(
        &self,
        tenant_id: &str,
        binding: &str,
        seen: &ProviderError,
    ) -> Confirmation {
        let key = (tenant_id.to_owned(), binding.to_owned());
        let verdict = self
            .verdicts()
            .get_with(key, async {
                self.rechecks
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    tenant = %Escaped(tenant_id),
                    binding = %Escaped(binding),
                    error = %seen,
                    "a live request saw a definitive provider error; describing the key"
                );
                let stored = match self.registry().tenant(tenant_id).await {
                    Ok(Some(tenant)) => self
                        .registry()
                        .binding(tenant_id, binding)
                        .await
                        .map(|b| b.map(|b| (b, tenant.external_id))),
                    Ok(None) => Ok(None),
                    Err(err) => Err(err),
                };
                match stored {
                    Ok(Some((record, external_id))) => {
                        let verdict = self.check_binding(&record, &external_id).await;
                        self.apply_verdict(&record, &verdict).await;
                        verdict
                    }
                    // The platform key, or a binding unlinked meanwhile:
                    // nothing a describe could revoke.
                    Ok(None) => Verdict::Outage,
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot read a binding to recheck it");
                        Verdict::Outage
                    }
                }
            })
            .await;
        match verdict {
            Verdict::Usable => Confirmation::KeyUsable,
            Verdict::Revoked(_) => Confirmation::Revoked,
            Verdict::Outage => Confirmation::Unknown,
        }
    }
}

/// The stored form of a binding's canary: its ciphertext in an envelope
/// naming the key version that wrapped it (made at link, or here).
pub(crate) fn canary_envelope(
    tenant_id: &str,
    name: &str,
    provider: ProviderKind,
    ciphertext: crate::kms::Ciphertext,
) -> Envelope {
    Envelope {
        tenant_id: tenant_id.to_owned(),
        key_binding: name.to_owned(),
        provider,
        provider_key_version: ciphertext.key_version,
        ciphertext: ciphertext.bytes,
        tenant_key_version: 0,
        incarnation: 0,
    }
}

async fn decrypt_canary(
    record: &BindingRecord,
    provider: &dyn KeyProvider,
    canary: &Envelope,
) -> Result<(), ProviderError> {
    let context = canary_context();
    provider
        .decrypt(
            &canary.provider_key_version,
            &canary.ciphertext,
            WrapContext {
                tenant_id: &record.tenant_id,
                context: &context,
            },
        )
        .await
        .map(drop)
}

/// What a failed canary round trip says about a key that describes as
/// usable: its permission was taken (or the key replaced under its name);
/// an outage changes nothing.
fn canary_verdict(record: &BindingRecord, operation: &str, err: &ProviderError) -> Verdict {
    if err.is_transient() {
        tracing::warn!(error = %err, tenant = %record.tenant_id, binding = %record.name, "canary check failed transiently; state unchanged");
        return Verdict::Outage;
    }
    match err {
        ProviderError::AccessDenied(_)
        | ProviderError::KeyDisabled(_)
        | ProviderError::VersionDisabled(_)
        | ProviderError::NotFound(_) => Verdict::Revoked(format!(
            "the key is enabled, but keybroker may no longer {operation} with it ({err}); restore keybroker's {operation} permission on the key"
        )),
        ProviderError::InvalidCiphertext(_) => Verdict::Revoked(format!(
            "the key no longer decrypts what keybroker encrypted under it ({err}): it was replaced or its material changed; link the original key again"
        )),
        _ => {
            tracing::error!(error = %err, tenant = %record.tenant_id, binding = %record.name, "canary check failed; state unchanged");
            Verdict::Outage
        }
    }
}
