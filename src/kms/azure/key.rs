//! One binding's Key Vault key: our AEAD layer over wrapKey/unwrapKey,
//! describe, versions and the bounded retries.

use super::*;

/// One Azure binding as a [`KeyProvider`].
pub struct AzureKey {
    pub(super) kv: Arc<AzureKeyVault>,
    pub(super) key: AzureKeyRef,
    /// The customer's Entra tenant (directory) id.
    pub(super) customer_tenant: String,
    /// The key's URL, for messages.
    pub(super) name: String,
}

impl fmt::Debug for AzureKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureKey")
            .field("key", &self.name)
            .field("customer_tenant", &self.customer_tenant)
            .finish()
    }
}

impl AzureKey {
    /// The key this provider uses.
    pub fn reference(&self) -> &AzureKeyRef {
        &self.key
    }

    pub(super) fn classify(&self, call: Call, err: &azure_core::Error) -> ProviderError {
        let scope = Scope {
            key: &self.name,
            vault: self.key.vault_name(),
            key_name: &self.key.name,
            customer_tenant: &self.customer_tenant,
            client_id: self.kv.settings.client_id.as_deref().unwrap_or_default(),
        };
        classify(
            call,
            &failure(err),
            &scope,
            &self.kv.settings.authority_host,
        )
    }

    /// Runs `op` with the bounded retries: throttling and outages are
    /// retried, honouring `Retry-After` up to `azure_max_retry_delay`.
    pub(super) async fn with_retries<T, F, Fut>(
        &self,
        call: Call,
        op: F,
    ) -> Result<T, ProviderError>
    where
        F: Fn(Arc<KeyClient>) -> Fut,
        Fut: Future<Output = azure_core::Result<T>>,
    {
        use backon::Retryable as _;
        let client = self.kv.client(&self.customer_tenant, &self.key.vault_url)?;
        let settings = &self.kv.settings;
        let policy = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_factor(2.0)
            .with_max_times(settings.max_attempts.max(1) as usize - 1);
        (|| async {
            op(Arc::clone(&client))
                .await
                .map_err(|err| (self.classify(call, &err), failure(&err).retry_after))
        })
        .retry(policy)
        .when(|(classified, _)| classified.is_transient())
        // Key Vault's Retry-After replaces the backoff's delay (never its
        // count of attempts); one longer than `azure_max_retry_delay` fails
        // the call at once.
        .adjust(|(_, retry_after), backoff| match (*retry_after, backoff) {
            (_, None) => None,
            (Some(delay), Some(_)) if delay > settings.max_retry_delay => None,
            (Some(delay), Some(_)) => Some(delay),
            (None, backoff) => backoff,
        })
        .await
        .map_err(|(classified, _)| classified)
    }

    /// Key Vault's unwrapKey of `wrapped` with RSA-OAEP-256 under
    /// `version`: the raw operation, without keybroker's AEAD layer (the
    /// fidelity test reads with it what Microsoft's Python SDK wrapped).
    pub async fn unwrap_raw(
        &self,
        version: &str,
        wrapped: &[u8],
    ) -> Result<SecretBytes, ProviderError> {
        self.check_version(version)?;
        self.unwrap_key(Algorithm::RsaOaep256, version, wrapped)
            .await
    }

    pub(super) async fn unwrap_key(
        &self,
        alg: Algorithm,
        version: &str,
        wrapped: &[u8],
    ) -> Result<SecretBytes, ProviderError> {
        self.kv.calls.fetch_add(1, Ordering::Relaxed);
        let name = self.key.name.clone();
        let result = self
            .with_retries(Call::Unwrap, |client| {
                let (name, version) = (name.clone(), version.to_owned());
                let params = KeyOperationParameters {
                    algorithm: Some(alg.sdk()),
                    value: Some(wrapped.to_vec()),
                    ..KeyOperationParameters::default()
                };
                async move {
                    let body: RequestContent<KeyOperationParameters> = params.try_into()?;
                    noted(client.unwrap_key(&name, &version, body, None).await?).into_model()
                }
            })
            .await?;
        Ok(SecretBytes::new(result.result.unwrap_or_default()))
    }

    /// The wrapping algorithm of this key: known from a describe, else one
    /// get-key call (once per key per process).
    pub(super) async fn algorithm(&self) -> Result<Algorithm, ProviderError> {
        if let Some(alg) = self.kv.kinds.get(&self.name) {
            return Ok(alg);
        }
        self.describe().await?;
        self.kv.kinds.get(&self.name).ok_or_else(|| {
            ProviderError::KeyDisabled(format!(
                "{} is neither an RSA nor an AES key; keybroker wraps with RSA-OAEP-256 or A256KW",
                self.name
            ))
        })
    }
}

#[async_trait]
impl KeyProvider for AzureKey {
    fn kind(&self) -> ProviderKind {
        ProviderKind::AzureKeyVault
    }

    async fn encrypt(
        &self,
        plaintext: &SecretBytes,
        wrap: WrapContext<'_>,
    ) -> Result<Ciphertext, ProviderError> {
        let alg = self.algorithm().await?;
        let kek = SecretBytes::random(KEK_LEN)
            .map_err(|_| ProviderError::Internal("system random generator failed".into()))?;
        let sealing = SealingKey::new(kek.expose())
            .ok_or_else(|| ProviderError::Internal("key sealing setup failed".into()))?;
        let sealed = sealing
            .seal(plaintext.expose(), &wrap.aad())
            .map_err(|e| ProviderError::Internal(e.to_string()))?;
        self.kv.calls.fetch_add(1, Ordering::Relaxed);
        let name = self.key.name.clone();
        let result = self
            .with_retries(Call::Wrap, |client| {
                let name = name.clone();
                let params = KeyOperationParameters {
                    algorithm: Some(alg.sdk()),
                    value: Some(kek.expose().to_vec()),
                    ..KeyOperationParameters::default()
                };
                async move {
                    let body: RequestContent<KeyOperationParameters> = params.try_into()?;
                    noted(client.wrap_key(&name, body, None).await?).into_model()
                }
            })
            .await?;
        let wrapped = result.result.unwrap_or_default();
        let version = version_of(result.kid.as_deref().unwrap_or_default());
        if wrapped.is_empty() || version.is_empty() || wrapped.len() > usize::from(u16::MAX) {
            return Err(ProviderError::Internal(format!(
                "Key Vault's wrapKey answer for {} holds no wrapped key or key version",
                self.name
            )));
        }
        if self.kv.currents.get(&self.name).as_deref() != Some(version.as_str()) {
            self.kv.currents.insert(self.name.clone(), version.clone());
        }
        let mut bytes = Vec::with_capacity(4 + wrapped.len() + sealed.len());
        bytes.push(FORMAT);
        bytes.push(alg.id());
        bytes.extend_from_slice(
            &u16::try_from(wrapped.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        bytes.extend_from_slice(&wrapped);
        bytes.extend_from_slice(&sealed);
        Ok(Ciphertext {
            bytes,
            key_version: version,
        })
    }

    async fn decrypt(
        &self,
        key_version: &str,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Result<SecretBytes, ProviderError> {
        self.check_version(key_version)?;
        let invalid = |why: &str| ProviderError::InvalidCiphertext(format!("{}: {why}", self.name));
        let [format, alg, hi, lo, rest @ ..] = ciphertext else {
            return Err(invalid("the wrapped key is too short"));
        };
        let alg = Algorithm::from_id(*alg)
            .filter(|_| *format == FORMAT)
            .ok_or_else(|| invalid("unknown wrapped key layout"))?;
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        if rest.len() <= len {
            return Err(invalid("the wrapped key is truncated"));
        }
        let (wrapped, sealed) = rest.split_at(len);
        let kek = self.unwrap_key(alg, key_version, wrapped).await?;
        let sealing = SealingKey::new(kek.expose())
            .ok_or_else(|| invalid("Key Vault unwrapped a key of the wrong length"))?;
        sealing.open(sealed, &wrap.aad()).map_err(|_| {
            invalid("authentication failed: the context or tenant differs from the wrap, or the wrapped key was altered")
        })
    }

    async fn describe(&self) -> Result<KeyDescription, ProviderError> {
        self.kv.describes.fetch_add(1, Ordering::Relaxed);
        let name = self.key.name.clone();
        let key = self
            .with_retries(Call::Describe, |client| {
                let name = name.clone();
                async move { noted(client.get_key(&name, None).await?).into_model() }
            })
            .await?;
        let owner_tag = key
            .tags
            .as_ref()
            .and_then(|tags| tags.get(crate::kms::OWNER_TAG))
            .cloned();
        let jwk = key.key.unwrap_or_default();
        let attributes = key.attributes.unwrap_or_default();
        let version = version_of(jwk.kid.as_deref().unwrap_or_default());
        if !version.is_empty()
            && self.kv.currents.get(&self.name).as_deref() != Some(version.as_str())
        {
            self.kv.currents.insert(self.name.clone(), version.clone());
        }
        let alg = jwk.kty.as_ref().and_then(Algorithm::for_key);
        if let Some(alg) = alg {
            self.kv.kinds.insert(self.name.clone(), alg);
        }
        let recovery = attributes
            .recovery_level
            .as_ref()
            .map(|l| format!("{l:?}"))
            .unwrap_or_default();
        if recovery.contains("Purgeable") && self.kv.warned.get(&self.name).is_none() {
            self.kv.warned.insert(self.name.clone(), ());
            tracing::warn!(key = %self.name, recovery_level = %recovery, "the customer's vault has no purge protection: a deleted key can be purged at once and every DEK under it lost; ask the customer to enable purge protection");
        }
        let now = azure_core::time::OffsetDateTime::now_utc();
        let ops = jwk.key_ops.unwrap_or_default();
        let disabled = |reason: String| KeyDescription {
            state: ProviderKeyState::Disabled,
            reason,
            current_version: version.clone(),
            owner_tag: owner_tag.clone(),
            ..KeyDescription::default()
        };
        if attributes.enabled == Some(false) {
            return Ok(disabled(format!(
                "{} is disabled in Key Vault; the customer can enable it again",
                self.name
            )));
        }
        if attributes.expires.is_some_and(|exp| exp <= now) {
            return Ok(disabled(format!(
                "{} expired in Key Vault (exp); the customer can extend its expiry date",
                self.name
            )));
        }
        if attributes.not_before.is_some_and(|nbf| nbf > now) {
            return Ok(disabled(format!(
                "{} is not yet valid in Key Vault (nbf)",
                self.name
            )));
        }
        if alg.is_none() {
            return Ok(disabled(format!(
                "{} is a {:?} key; keybroker needs an RSA key (RSA-OAEP-256) or a Managed HSM AES key (A256KW)",
                self.name, jwk.kty
            )));
        }
        let allows = |op: &str| ops.iter().any(|o| o == op);
        let usable = ops.is_empty() || (allows("wrapKey") && allows("unwrapKey"));
        if !usable {
            return Ok(disabled(format!(
                "{} does not allow wrapKey and unwrapKey (key_ops: {}); the customer can allow them",
                self.name,
                ops.join(", ")
            )));
        }
        Ok(KeyDescription {
            current_version: version,
            protection_level: jwk.kty.as_ref().map(|k| {
                if matches!(k, KeyType::RsaHsm | KeyType::OctHsm) {
                    "HSM"
                } else {
                    "SOFTWARE"
                }
                .to_owned()
            }),
            owner_tag,
            ..KeyDescription::default()
        })
    }

    fn current_version(&self) -> Option<String> {
        self.kv.currents.get(&self.name)
    }

    fn is_current_version(&self, version: &str) -> Option<bool> {
        self.kv
            .currents
            .get(&self.name)
            .map(|current| current == version)
    }

    /// A version is 32 hex characters (Key Vault's); anything else is forged.
    fn check_version(&self, version: &str) -> Result<(), ProviderError> {
        if version.len() == 32 && version.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(())
        } else {
            Err(ProviderError::InvalidCiphertext(format!(
                "the wrapped key names Key Vault key version {}, which is not a version of {}",
                crate::text::Quoted(version),
                self.name
            )))
        }
    }
}
