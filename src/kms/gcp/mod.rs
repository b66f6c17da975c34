//! Customer keys in Google Cloud KMS, through Google's own Rust client
//! (`google-cloud-kms-v1`, REST transport) and `google-cloud-auth`
//! (the flow of turbopuffer's CMEK page: the customer grants a service
//! account `roles/cloudkms.cryptoKeyEncrypterDecrypter` on their CryptoKey).
//!
//! [`GcpKms`] is shared by all bindings: keybroker's own credentials
//! (Application Default Credentials: Workload Identity on GKE) and one client
//! per identity used. A binding may name a service account to impersonate, so
//! each tenant's keys can be granted to a service account of its own.
//! [`GcpKmsKey`] is one binding's view and the [`KeyProvider`] the data plane
//! sees.
//!
//! Every Encrypt and Decrypt carries CRC32C checksums of what it sends and
//! checks the ones Cloud KMS returns: a corrupted request or response is an
//! error (never a wrong key). Failures are classified here, from the status
//! Google returns, into [`ProviderError`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use google_cloud_auth::credentials::{Credentials, anonymous, impersonated};
use google_cloud_gax::error::Error as GaxError;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::exponential_backoff::ExponentialBackoffBuilder;
use google_cloud_gax::options::RequestOptionsBuilder as _;
use google_cloud_gax::retry_policy::{Aip194Strict, RetryPolicyExt};
use google_cloud_kms_v1::client::KeyManagementService;
use google_cloud_kms_v1::model::crypto_key::CryptoKeyPurpose;
use google_cloud_kms_v1::model::crypto_key_version::CryptoKeyVersionState;

mod errors;
pub mod name;

pub use name::GcpKeyName;

use self::errors::{classify_status, classify_transport};
use super::{
    Ciphertext, KeyDescription, KeyProvider, ProviderError, ProviderKeyState, ProviderKind,
    WrapContext,
};
use crate::secret::SecretBytes;

/// The role customers grant on their key (or the tenant's service account).
pub const ENCRYPTER_DECRYPTER_ROLE: &str = "roles/cloudkms.cryptoKeyEncrypterDecrypter";

/// Where keybroker's own Google identity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GcpCredentials {
    /// Application Default Credentials: Workload Identity / the metadata
    /// server, or `GOOGLE_APPLICATION_CREDENTIALS`.
    #[default]
    ApplicationDefault,
    /// No credentials at all: only for emulators and tests.
    Anonymous,
}

impl std::str::FromStr for GcpCredentials {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "default" | "adc" => Ok(Self::ApplicationDefault),
            "anonymous" => Ok(Self::Anonymous),
            other => Err(format!(
                "unknown GCP credentials {other:?}: use `default` (Application Default Credentials) or `anonymous` (emulators only)"
            )),
        }
    }
}

crate::settings::identity_cache_flags!(
    GcpIdentityCache,
    "gcp",
    "GCP",
    "Cloud KMS clients (one per impersonated service account)"
);

/// The `gcp_*` settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct GcpSettings {
    /// Cloud KMS endpoint (regional, Private Service Connect, or an emulator)
    /// [default: https://cloudkms.googleapis.com].
    #[arg(
        id = "gcp_kms_endpoint",
        long = "gcp-kms-endpoint",
        env = "KEYBROKER_GCP_KMS_ENDPOINT"
    )]
    pub endpoint: Option<String>,
    /// keybroker's Google identity: `default` (Application Default
    /// Credentials: Workload Identity, GOOGLE_APPLICATION_CREDENTIALS) or
    /// `anonymous` (emulators only).
    #[arg(
        id = "gcp_credentials",
        long = "gcp-credentials",
        env = "KEYBROKER_GCP_CREDENTIALS",
        default_value = "default"
    )]
    pub credentials: GcpCredentials,
    /// Attempts per Cloud KMS call, first included; only transient errors
    /// retry.
    #[arg(
        id = "gcp_max_attempts",
        long = "gcp-max-attempts",
        env = "KEYBROKER_GCP_MAX_ATTEMPTS",
        default_value = "3"
    )]
    pub max_attempts: u32,
    /// Deadline of one Cloud KMS call attempt.
    #[arg(id = "gcp_attempt_timeout", long = "gcp-attempt-timeout", env = "KEYBROKER_GCP_ATTEMPT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "3s")]
    pub attempt_timeout: Duration,
    /// Deadline of one Cloud KMS call, retries included.
    #[arg(id = "gcp_operation_timeout", long = "gcp-operation-timeout", env = "KEYBROKER_GCP_OPERATION_TIMEOUT", value_parser = humantime::parse_duration, default_value = "8s")]
    pub operation_timeout: Duration,
    #[command(flatten)]
    pub identity: GcpIdentityCache,
}

impl Default for GcpSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl GcpSettings {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        use crate::settings::invalid;
        if self.max_attempts == 0 || self.max_attempts > 10 {
            return invalid("gcp_max_attempts", "must be 1 to 10");
        }
        self.identity.validate()?;
        if self.attempt_timeout > self.operation_timeout {
            return invalid(
                "gcp_attempt_timeout",
                "must not be longer than gcp_operation_timeout",
            );
        }
        if let Some(url) = &self.endpoint
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return invalid("gcp_kms_endpoint", "must be an http:// or https:// URL");
        }
        Ok(())
    }
}

/// Shared GCP state: clients per identity and the primary versions seen.
pub struct GcpKms {
    settings: GcpSettings,
    /// Clients by impersonated service account (`""`: keybroker's own
    /// identity), bounded and dropped when idle (`gcp_identity_cache_*`).
    /// moka builds a client once for concurrent first uses.
    clients: moka::future::Cache<String, KeyManagementService>,
    /// The primary version last reported per CryptoKey (by Encrypt or a
    /// describe), so `rewrap_recommended` needs no call. It outlives the
    /// tenant views, which are rebuilt on every change; bounded like the
    /// clients (a forgotten entry only means no recommendation until the
    /// next Encrypt or describe).
    primaries: moka::sync::Cache<String, String>,
}

impl fmt::Debug for GcpKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcpKms")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl GcpKms {
    pub fn new(settings: GcpSettings) -> Self {
        Self {
            clients: settings.identity.get().future_cache(),
            primaries: settings.identity.get().sync_cache(4),
            settings,
        }
    }

    /// Live Cloud KMS clients (metrics: `keybroker_identity_clients`), as
    /// of moka's last maintenance (it runs on every few cache operations).
    pub fn live_clients_now(&self) -> u64 {
        self.clients.entry_count()
    }

    /// The provider for one binding.
    pub fn key(self: &Arc<Self>, target: GcpKeyTarget) -> GcpKmsKey {
        GcpKmsKey {
            kms: Arc::clone(self),
            target,
        }
    }

    async fn client(&self, service_account: &str) -> Result<KeyManagementService, ProviderError> {
        self.clients
            .try_get_with_by_ref(service_account, self.build_client(service_account))
            .await
            .map_err(|e| (*e).clone())
    }

    async fn build_client(
        &self,
        service_account: &str,
    ) -> Result<KeyManagementService, ProviderError> {
        let credentials = self.credentials(service_account)?;
        let retry = Aip194Strict
            .with_attempt_limit(self.settings.max_attempts.max(1))
            .with_time_limit(self.settings.operation_timeout);
        let backoff = ExponentialBackoffBuilder::new()
            .with_initial_delay(Duration::from_millis(50))
            .with_maximum_delay(Duration::from_secs(1))
            .clamp();
        let mut builder = KeyManagementService::builder()
            .with_credentials(credentials)
            .with_retry_policy(retry)
            .with_backoff_policy(backoff)
            .with_attempt_timeout(self.settings.attempt_timeout);
        if let Some(endpoint) = &self.settings.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let client = builder.build().await.map_err(|e| {
            ProviderError::Internal(format!("cannot create the Cloud KMS client: {e}"))
        })?;
        Ok(client)
    }

    fn credentials(&self, service_account: &str) -> Result<Credentials, ProviderError> {
        let source = match self.settings.credentials {
            GcpCredentials::Anonymous => anonymous::Builder::new().build(),
            GcpCredentials::ApplicationDefault => google_cloud_auth::credentials::Builder::default()
                .build()
                .map_err(|e| {
                    ProviderError::Internal(format!(
                        "no Google credentials for keybroker (use Workload Identity, or set GOOGLE_APPLICATION_CREDENTIALS): {e}"
                    ))
                })?,
        };
        if service_account.is_empty() {
            return Ok(source);
        }
        impersonated::Builder::from_source_credentials(source)
            .with_target_principal(service_account)
            .build()
            .map_err(|e| {
                ProviderError::Internal(format!(
                    "cannot set up impersonation of service account {service_account}: {e}"
                ))
            })
    }

    fn note_primary(&self, key: &str, version: &str) {
        if self.primaries.get(key).as_deref() != Some(version) {
            self.primaries.insert(key.to_owned(), version.to_owned());
        }
    }

    fn primary(&self, key: &str) -> Option<String> {
        self.primaries.get(key)
    }
}

/// What one binding needs to reach its key.
#[derive(Debug, Clone)]
pub struct GcpKeyTarget {
    pub key_name: GcpKeyName,
    /// Service account to impersonate; empty: keybroker's own identity.
    pub service_account: String,
}

/// One GCP binding as a [`KeyProvider`].
#[derive(Debug)]
pub struct GcpKmsKey {
    kms: Arc<GcpKms>,
    target: GcpKeyTarget,
}

/// Which call failed, for classification and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Call {
    Encrypt,
    Decrypt,
    Describe,
}

impl GcpKmsKey {
    async fn client(&self) -> Result<KeyManagementService, ProviderError> {
        self.kms.client(&self.target.service_account).await
    }

    /// Who calls Cloud KMS, for messages.
    fn principal(&self) -> String {
        if self.target.service_account.is_empty() {
            "keybroker's service account".to_owned()
        } else {
            format!("service account {}", self.target.service_account)
        }
    }

    fn integrity_error(&self, call: Call, what: &str) -> ProviderError {
        ProviderError::Unavailable(format!(
            "Cloud KMS {call:?} of key {}: {what}; the data was corrupted in transit and was not used, retry",
            self.target.key_name
        ))
    }

    /// A FAILED_PRECONDITION on Decrypt may concern one old version only:
    /// the key itself is usable if its primary is enabled, and the binding
    /// must not be revoked for it.
    async fn precondition(&self, call: Call, message: &str) -> ProviderError {
        let key = self.target.key_name.as_str();
        if call == Call::Decrypt
            && let Ok(description) = self.describe().await
            && description.state == ProviderKeyState::Enabled
        {
            return ProviderError::VersionDisabled(format!(
                "the version of key {key} that wrapped this key cannot be used ({message}); the customer can enable that version (or restore it, if its destruction is scheduled) in Cloud KMS to read data wrapped under it"
            ));
        }
        classify_status(
            Code::FailedPrecondition,
            message,
            call,
            key,
            &self.principal(),
        )
    }

    async fn classify(&self, err: GaxError, call: Call) -> ProviderError {
        let Some(status) = err.status() else {
            return classify_transport(&err, self);
        };
        if status.code == Code::FailedPrecondition {
            return self.precondition(call, &status.message).await;
        }
        classify_status(
            status.code,
            &status.message,
            call,
            self.target.key_name.as_str(),
            &self.principal(),
        )
    }
}

/// CRC32C (Castagnoli), the checksum Cloud KMS uses for data integrity.
pub fn crc32c(data: &[u8]) -> i64 {
    const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    i64::from(CRC32C.checksum(data))
}

fn state_of(state: &CryptoKeyVersionState) -> ProviderKeyState {
    match state {
        CryptoKeyVersionState::Enabled => ProviderKeyState::Enabled,
        CryptoKeyVersionState::DestroyScheduled => ProviderKeyState::PendingDeletion,
        CryptoKeyVersionState::Destroyed => ProviderKeyState::Destroyed,
        // Disabled, pending generation or import, failed imports: not usable.
        _ => ProviderKeyState::Disabled,
    }
}

#[async_trait]
impl KeyProvider for GcpKmsKey {
    fn kind(&self) -> ProviderKind {
        ProviderKind::GcpKms
    }

    async fn encrypt(
        &self,
        plaintext: &SecretBytes,
        wrap: WrapContext<'_>,
    ) -> Result<Ciphertext, ProviderError> {
        let aad = wrap.aad();
        let key = self.target.key_name.as_str();
        let result = self
            .client()
            .await?
            .encrypt()
            .set_name(key)
            .set_plaintext(Bytes::copy_from_slice(plaintext.expose()))
            .set_plaintext_crc32c(crc32c(plaintext.expose()))
            .set_additional_authenticated_data_crc32c(crc32c(&aad))
            .set_additional_authenticated_data(aad)
            // A repeated Encrypt only makes another valid ciphertext.
            .with_idempotency(true)
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e) => return Err(self.classify(e, Call::Encrypt).await),
        };
        if !out.verified_plaintext_crc32c || !out.verified_additional_authenticated_data_crc32c {
            return Err(self.integrity_error(
                Call::Encrypt,
                "Cloud KMS did not confirm the request's CRC32C checksums",
            ));
        }
        if out.ciphertext_crc32c != Some(crc32c(&out.ciphertext)) {
            return Err(
                self.integrity_error(Call::Encrypt, "the ciphertext failed its CRC32C check")
            );
        }
        let version_prefix = format!("{key}/cryptoKeyVersions/");
        if !out.name.starts_with(&version_prefix) {
            return Err(ProviderError::Internal(format!(
                "Cloud KMS Encrypt answered for {:?}, not a version of key {key}",
                out.name
            )));
        }
        self.kms.note_primary(key, &out.name);
        Ok(Ciphertext {
            bytes: out.ciphertext.to_vec(),
            key_version: out.name,
        })
    }

    async fn decrypt(
        &self,
        _key_version: &str,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Result<SecretBytes, ProviderError> {
        let aad = wrap.aad();
        let result = self
            .client()
            .await?
            .decrypt()
            // The ciphertext names its version; Cloud KMS picks it.
            .set_name(self.target.key_name.as_str())
            .set_ciphertext_crc32c(crc32c(ciphertext))
            .set_ciphertext(Bytes::copy_from_slice(ciphertext))
            .set_additional_authenticated_data_crc32c(crc32c(&aad))
            .set_additional_authenticated_data(aad)
            .with_idempotency(true)
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e) => return Err(self.classify(e, Call::Decrypt).await),
        };
        let plaintext = SecretBytes::new(out.plaintext.to_vec());
        // Wipe the client's copy where we hold the only reference (the
        // response body buffers inside the HTTP stack are out of reach).
        if let Ok(mut copy) = out.plaintext.try_into_mut() {
            zeroize::Zeroize::zeroize(copy.as_mut());
        }
        if out.plaintext_crc32c != Some(crc32c(plaintext.expose())) {
            return Err(
                self.integrity_error(Call::Decrypt, "the plaintext failed its CRC32C check")
            );
        }
        Ok(plaintext)
    }

    async fn describe(&self) -> Result<KeyDescription, ProviderError> {
        let key_name = self.target.key_name.as_str();
        let result = self
            .client()
            .await?
            .get_crypto_key()
            .set_name(key_name)
            .send()
            .await;
        let key = match result {
            Ok(key) => key,
            Err(e) => return Err(Box::pin(self.classify(e, Call::Describe)).await),
        };
        if key.purpose != CryptoKeyPurpose::EncryptDecrypt {
            return Err(ProviderError::KeyDisabled(format!(
                "key {key_name} has purpose {}; keybroker needs a symmetric ENCRYPT_DECRYPT key",
                key.purpose.name().unwrap_or("unknown")
            )));
        }
        let rotation_period = key
            .rotation_period()
            .and_then(|d| u64::try_from(d.seconds()).ok())
            .map(Duration::from_secs);
        let owner_tag = key.labels.get(super::OWNER_TAG).cloned();
        let Some(primary) = key.primary else {
            return Ok(KeyDescription {
                state: ProviderKeyState::Disabled,
                reason: format!(
                    "key {key_name} has no primary version; the customer can make an enabled version primary in Cloud KMS"
                ),
                owner_tag,
                ..KeyDescription::default()
            });
        };
        let state = state_of(&primary.state);
        let reason = version_reason(state, &primary.name);
        if state == ProviderKeyState::Enabled {
            self.kms.note_primary(key_name, &primary.name);
        }
        Ok(KeyDescription {
            state,
            reason,
            current_version: primary.name,
            key_manager: None,
            multi_region: None,
            rotation_enabled: Some(rotation_period.is_some()),
            rotation_period,
            protection_level: primary.protection_level.name().map(str::to_owned),
            owner_tag,
        })
    }

    fn current_version(&self) -> Option<String> {
        self.kms.primary(self.target.key_name.as_str())
    }

    /// keybroker writes the full name of the version Cloud KMS encrypted
    /// with; anything else in a wrapped key is forged.
    fn check_version(&self, version: &str) -> Result<(), ProviderError> {
        let number = version
            .strip_prefix(self.target.key_name.as_str())
            .and_then(|rest| rest.strip_prefix("/cryptoKeyVersions/"));
        match number {
            Some(n) if !n.is_empty() && n.len() <= 10 && n.bytes().all(|b| b.is_ascii_digit()) => {
                Ok(())
            }
            _ => Err(ProviderError::InvalidCiphertext(format!(
                "the wrapped key names key version {}, which is not a version of key {}",
                crate::text::Quoted(version),
                self.target.key_name
            ))),
        }
    }
}

/// What describe says about a primary version that is not enabled, and what
/// the customer can do.
pub(super) fn version_reason(state: ProviderKeyState, version: &str) -> String {
    match state {
        ProviderKeyState::Enabled => String::new(),
        ProviderKeyState::Disabled => format!(
            "the primary version {version} is disabled in Cloud KMS; the customer can enable it (or make an enabled version primary) to restore access"
        ),
        ProviderKeyState::PendingDeletion => format!(
            "the primary version {version} is scheduled for destruction in Cloud KMS; the customer can restore it (RestoreCryptoKeyVersion) and then enable it to restore access"
        ),
        ProviderKeyState::Destroyed => format!(
            "the primary version {version} was destroyed in Cloud KMS; it cannot be recovered: make another enabled version primary for new data"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        // The check value of CRC-32C (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn forged_versions_are_refused_before_any_call() {
        let kms = Arc::new(GcpKms::new(GcpSettings::default()));
        let key = kms.key(GcpKeyTarget {
            key_name: GcpKeyName::parse("projects/p/locations/l/keyRings/r/cryptoKeys/k").unwrap(),
            service_account: String::new(),
        });
        key.check_version("projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/3")
            .unwrap();
        for forged in [
            "",
            "3",
            "projects/p/locations/l/keyRings/r/cryptoKeys/other/cryptoKeyVersions/3",
            "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/",
            "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/3\n",
            "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/12345678901",
        ] {
            let err = key.check_version(forged).unwrap_err();
            assert!(
                matches!(err, ProviderError::InvalidCiphertext(_)),
                "{forged:?}"
            );
            assert!(!crate::text::has_control(&err.to_string()), "{err}");
        }
    }

    #[test]
    fn credentials_parse() {
        assert_eq!(
            "default".parse::<GcpCredentials>(),
            Ok(GcpCredentials::ApplicationDefault)
        );
        assert_eq!(
            "anonymous".parse::<GcpCredentials>(),
            Ok(GcpCredentials::Anonymous)
        );
        assert!("root".parse::<GcpCredentials>().is_err());
    }
}
