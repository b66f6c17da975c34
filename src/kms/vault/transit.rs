//! One binding's link to its Transit key: the calls (encrypt, decrypt with
//! batching of concurrent decrypts, the key read) and their answers.

use super::*;

/// What every call on one binding's key needs, shared with the batch
/// sender task.
pub(super) struct KeyLink {
    pub(super) vault: Arc<VaultTransit>,
    pub(super) target: VaultTarget,
    pub(super) session: Arc<VaultSession>,
    /// The newest key version seen (encrypt answers, describes); 0 unknown.
    pub(super) latest: AtomicU32,
}

/// One decrypt waiting in the batch queue.
pub(super) struct PendingDecrypt {
    pub(super) ciphertext: String,
    pub(super) aad: String,
    pub(super) reply: tokio::sync::oneshot::Sender<Result<SecretBytes, ProviderError>>,
}

impl fmt::Debug for VaultTransitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultTransitKey")
            .field("target", &self.link.target)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
pub(super) struct Data<T> {
    pub(super) data: T,
}

#[derive(Deserialize)]
pub(super) struct EncryptData {
    pub(super) ciphertext: String,
}

#[derive(Deserialize)]
pub(super) struct DecryptData {
    pub(super) plaintext: Zeroizing<String>,
}

#[derive(Deserialize)]
pub(super) struct KeyData {
    #[serde(default)]
    pub(super) latest_version: u32,
    #[serde(default)]
    pub(super) min_decryption_version: u32,
    #[serde(default)]
    pub(super) supports_encryption: bool,
    #[serde(default)]
    pub(super) supports_decryption: bool,
    #[serde(default)]
    pub(super) deletion_allowed: bool,
    #[serde(default)]
    pub(super) soft_deleted: bool,
    #[serde(default)]
    pub(super) auto_rotate_period: u64,
    #[serde(rename = "type", default)]
    pub(super) key_type: String,
}

/// Key types whose encrypt/decrypt take `associated_data`.
pub(super) const AEAD_TYPES: [&str; 3] = ["aes256-gcm96", "aes128-gcm96", "chacha20-poly1305"];

impl KeyLink {
    pub(super) fn url(&self, operation: &str) -> String {
        self.target.key.operation_url(operation)
    }

    pub(super) fn name(&self) -> &str {
        self.target.key.display()
    }

    /// POST with the session's token; transient failures are retried
    /// (`vault_max_attempts`, 50 ms doubling).
    pub(super) async fn call(
        &self,
        call: Call,
        url: &str,
        body: &impl serde::Serialize,
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        use backon::Retryable as _;
        let policy = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_factor(2.0)
            .with_max_times(self.vault.settings.max_attempts.max(1) as usize - 1);
        (|| self.attempt(call, url, body))
            .retry(policy)
            .when(ProviderError::is_transient)
            .await
    }

    /// One attempt: a refused token is dropped and the call made once more
    /// after a new login (a second refusal is the policy's answer).
    pub(super) async fn attempt(
        &self,
        call: Call,
        url: &str,
        body: &impl serde::Serialize,
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let mut relogged = false;
        loop {
            let token = self.session.token(&self.vault, self.name()).await?;
            if matches!(call, Call::Encrypt | Call::Decrypt) {
                self.vault.transit_calls.fetch_add(1, Ordering::Relaxed);
            }
            return match self.vault.post(url, Some(&token), body).await {
                Ok((200, reply)) => Ok(reply),
                Ok((403, _)) if !relogged => {
                    relogged = true;
                    self.session.forget().await;
                    continue;
                }
                Ok((status, reply)) => {
                    Err(classify(call, status, &error_text(&reply), self.name()))
                }
                Err(err) => Err(transport(call, self.name(), &err)),
            };
        }
    }

    /// The caller's ciphertext, checked against the envelope's version
    /// before the customer's Vault sees anything.
    pub(super) fn checked_ciphertext<'a>(
        &self,
        key_version: &str,
        ciphertext: &'a [u8],
    ) -> Result<&'a str, ProviderError> {
        let text = std::str::from_utf8(ciphertext).ok();
        match text.and_then(|t| Some((t, ciphertext_version(t)?))) {
            Some((text, v)) if v.to_string() == key_version => Ok(text),
            _ => Err(ProviderError::InvalidCiphertext(format!(
                "the wrapped key does not hold a Transit ciphertext of version {} of {}",
                crate::text::Quoted(key_version),
                self.name()
            ))),
        }
    }

    pub(super) fn ciphertext_of(
        &self,
        reply: &[u8],
        call: Call,
    ) -> Result<Ciphertext, ProviderError> {
        let reply: Data<EncryptData> = serde_json::from_slice(reply).map_err(|e| {
            ProviderError::Internal(format!("{call:?} answered something else: {e}"))
        })?;
        let version = ciphertext_version(&reply.data.ciphertext).ok_or_else(|| {
            ProviderError::Internal(format!("{call:?} returned no vault:vN: ciphertext"))
        })?;
        self.seen_version(version);
        Ok(Ciphertext {
            bytes: reply.data.ciphertext.into_bytes(),
            key_version: version.to_string(),
        })
    }

    /// Sends queued decrypts: one alone as a plain decrypt, more as one
    /// `batch_input` call; each caller gets its own item's answer.
    pub(super) async fn decrypt_batch(&self, batch: Vec<PendingDecrypt>) {
        #[derive(serde::Serialize)]
        struct Item<'a> {
            ciphertext: &'a str,
            associated_data: &'a str,
        }
        #[derive(serde::Serialize)]
        struct Batch<'a> {
            batch_input: Vec<Item<'a>>,
            /// 200 when only some items fail (Vault answers 400 otherwise);
            /// when all fail it still answers 400, and every item fails.
            partial_failure_response_code: u16,
        }
        #[derive(Deserialize)]
        struct BatchData {
            batch_results: Vec<BatchResult>,
        }
        #[derive(Deserialize)]
        struct BatchResult {
            #[serde(default)]
            plaintext: Option<Zeroizing<String>>,
            #[serde(default)]
            error: String,
        }
        let url = self.url("decrypt");
        let answers: Vec<Result<Zeroizing<String>, ProviderError>> = if let [one] = batch.as_slice()
        {
            let body = TransitBody {
                plaintext: None,
                ciphertext: Some(&one.ciphertext),
                associated_data: &one.aad,
            };
            vec![
                self.call(Call::Decrypt, &url, &body)
                    .await
                    .and_then(|reply| {
                        serde_json::from_slice::<Data<DecryptData>>(&reply)
                            .map(|d| d.data.plaintext)
                            .map_err(|e| {
                                ProviderError::Internal(format!(
                                    "Transit decrypt answered something else: {e}"
                                ))
                            })
                    }),
            ]
        } else {
            let body = Batch {
                batch_input: batch
                    .iter()
                    .map(|p| Item {
                        ciphertext: &p.ciphertext,
                        associated_data: &p.aad,
                    })
                    .collect(),
                partial_failure_response_code: 200,
            };
            match self
                .call(Call::Decrypt, &url, &body)
                .await
                .and_then(|reply| {
                    serde_json::from_slice::<Data<BatchData>>(&reply).map_err(|e| {
                        ProviderError::Internal(format!(
                            "Transit batch decrypt answered something else: {e}"
                        ))
                    })
                }) {
                Ok(data) if data.data.batch_results.len() == batch.len() => data
                    .data
                    .batch_results
                    .into_iter()
                    .map(|r| match r.plaintext {
                        Some(p) if r.error.is_empty() => Ok(p),
                        _ => Err(classify(
                            Call::Decrypt,
                            400,
                            &crate::text::Escaped(&r.error).to_string(),
                            self.name(),
                        )),
                    })
                    .collect(),
                Ok(_) => batch
                    .iter()
                    .map(|_| {
                        Err(ProviderError::Internal(
                            "Transit batch decrypt answered a different number of items".into(),
                        ))
                    })
                    .collect(),
                Err(err) => batch.iter().map(|_| Err(err.clone())).collect(),
            }
        };
        for (pending, answer) in batch.into_iter().zip(answers) {
            let plaintext = answer.and_then(|text| {
                let mut plaintext = Zeroizing::new(Vec::with_capacity(48));
                B64.decode_vec(text.as_bytes(), &mut plaintext)
                    .map_err(|_| {
                        ProviderError::Internal("Transit decrypt returned bad base64".into())
                    })?;
                Ok(SecretBytes::new(std::mem::take(&mut *plaintext)))
            });
            // A caller that went away no longer needs its key.
            let _ = pending.reply.send(plaintext);
        }
    }

    pub(super) fn seen_version(&self, version: u32) {
        self.latest.fetch_max(version, Ordering::Relaxed);
    }
}
