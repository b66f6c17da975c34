//! RewrapKey: a wrapped key moved under the tenant's primary key, inside
//! the provider when it can (AWS ReEncrypt), else through the plaintext.

use std::sync::Arc;

use super::*;

impl Broker {
    /// Moves a wrapped key to the tenant's current primary key with the same
    /// context: inside KMS (ReEncrypt) when both keys are AWS keys under one
    /// customer role and region, otherwise by unwrap + wrap.
    pub async fn rewrap(
        &self,
        tenant_id: &TenantId,
        context: &Context,
        wrapped: &[u8],
        reason: Reason,
        shared: Option<&SharedViews>,
    ) -> Result<Rewrapped, BrokerError> {
        envelope::check_size(wrapped)?;
        let keys = self.view(tenant_id, shared).await?;
        ensure_reason(&keys, tenant_id, reason)?;
        let envelope = parse_for(tenant_id, wrapped)?;
        ensure_incarnation(&keys, tenant_id, envelope.incarnation)?;
        ensure_live(&keys, tenant_id)?;
        if seals(&keys) || envelope.tenant_key_version > 0 {
            return self.rewrap_through(keys, tenant_id, context, wrapped).await;
        }
        // A key the tenant is moving away from still reads for RewrapKey.
        let retiring = keys.reencrypt_from.as_deref() == Some(envelope.key_binding.as_str());
        let source = match find_binding(&keys, tenant_id, &envelope.key_binding)? {
            b if retiring && b.state == BindingState::Disabled => b,
            _ => resolve_binding(&keys, tenant_id, &envelope)?,
        };
        let target = &keys.primary;
        let incarnation = keys.life.incarnation;
        // One encryption context for both sides: only when the key was
        // bound to the incarnation it is rewrapped for.
        let same_context = envelope.incarnation == incarnation;
        if same_context && target.provider.reencrypts_from(source.provider.as_ref()) {
            ensure_usable(target, tenant_id)?;
            let bound = context.with_incarnation(incarnation);
            let wrap = WrapContext {
                tenant_id,
                context: &bound,
            };
            self.provider_call(target, tenant_id, &self.calls.reencrypt)?;
            let started = std::time::Instant::now();
            if let Some(result) = target
                .provider
                .reencrypt_from(source.provider.as_ref(), &envelope.ciphertext, wrap)
                .await
            {
                let outcome = result
                    .as_ref()
                    .map_or_else(ProviderError::kind_name, |_| "ok");
                let kind = target.provider.kind().as_str();
                self.metrics
                    .provider_call(kind, "reencrypt", outcome, started.elapsed());
                // ReEncrypt needs both keys; a failure is reported against
                // the target, the binding the call was signed for, and both
                // are described before anything is blamed on either.
                let result = result.map_err(|e| provider_error(target, e));
                let ciphertext = self
                    .reported(tenant_id, &[source, target], true, result)
                    .await?;
                source
                    .usage
                    .record_unwrap(UsedVersion::Provider(&envelope.provider_key_version));
                target
                    .usage
                    .record_wrap(UsedVersion::Provider(&ciphertext.key_version));
                let wrapped = seal(target, tenant_id, incarnation, ciphertext);
                return Ok(Rewrapped {
                    wrapped_key: wrapped.wrapped_key,
                    key: wrapped.key,
                    previous_key: source.info(envelope.provider_key_version),
                });
            }
        }
        let cache_key = CacheKey::new(tenant_id, wrapped, context);
        let plain = self
            .load(&keys, cache_key, source, &envelope, tenant_id, context)
            .await?;
        let wrapped = self
            .wrap_with(
                &keys,
                tenant_id,
                context,
                &SecretBytes::new(plain.plaintext().to_vec()),
            )
            .await?;
        Ok(Rewrapped {
            wrapped_key: wrapped.wrapped_key,
            key: wrapped.key,
            previous_key: source.info(envelope.provider_key_version),
        })
    }

    /// Rewraps by unwrapping (through the cache) and wrapping anew under
    /// the tenant's current hierarchy and primary.
    async fn rewrap_through(
        &self,
        keys: Arc<TenantKeys>,
        tenant_id: &str,
        context: &Context,
        wrapped: &[u8],
    ) -> Result<Rewrapped, BrokerError> {
        let cache_key = CacheKey::new(tenant_id, wrapped, context);
        let plain = self
            .load_wrapped(&keys, cache_key, tenant_id, context, wrapped)
            .await?;
        let previous_key = origin_info(&keys, &plain.origin);
        let plaintext = SecretBytes::new(plain.plaintext().to_vec());
        let (wrapped_key, key) = if seals(&keys) {
            self.seal_dek(keys, tenant_id, context, &plaintext).await?
        } else {
            let w = self
                .wrap_with(&keys, tenant_id, context, &plaintext)
                .await?;
            (w.wrapped_key, w.key)
        };
        Ok(Rewrapped {
            wrapped_key,
            key,
            previous_key,
        })
    }
}
