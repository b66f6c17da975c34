//! Key providers: where customer and platform keys live. The data plane talks
//! to every provider through [`KeyProvider`] and never knows which one it has.
//! Each provider classifies its own failures into [`ProviderError`] at this
//! boundary, so the API layer maps one small taxonomy to gRPC codes.

pub mod aws;
pub mod azure;
pub mod budget;
pub mod gcp;
pub mod issuer;
pub mod local;
pub mod pkcs11;
pub mod vault;

use std::fmt;

use async_trait::async_trait;

use crate::context::{self, Context};
use crate::secret::SecretBytes;

/// An extra CA certificate (PEM) for a provider's HTTPS client, read from
/// the file the setting `setting` names.
pub(crate) fn extra_root_ca(
    setting: &str,
    path: &std::path::Path,
) -> Result<reqwest::Certificate, ProviderError> {
    let fail = |e: &dyn fmt::Display| {
        ProviderError::Internal(format!("{setting} {}: {e}", path.display()))
    };
    let pem = std::fs::read(path).map_err(|e| fail(&e))?;
    reqwest::Certificate::from_pem(&pem).map_err(|e| fail(&e))
}

/// Which kind of key store a binding uses; its name as stored and shown
/// (`aws-kms`...).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    strum::IntoStaticStr,
    strum::EnumString,
    strum::Display,
    strum::EnumIter,
)]
#[strum(serialize_all = "kebab-case")]
pub enum ProviderKind {
    Local,
    AwsKms,
    GcpKms,
    VaultTransit,
    Pkcs11,
    #[strum(serialize = "azure-kv")]
    AzureKeyVault,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// What a wrap binds besides the key: the tenant and the caller's context.
/// Providers turn it into their native form (AWS encryption context, AAD).
#[derive(Debug, Clone, Copy)]
pub struct WrapContext<'a> {
    pub tenant_id: &'a str,
    pub context: &'a Context,
}

impl WrapContext<'_> {
    /// Canonical AAD bytes for providers that take AAD (local, GCP).
    pub fn aad(&self) -> Vec<u8> {
        context::aad(self.tenant_id, self.context)
    }
}

/// A provider's ciphertext and the key version that produced it.
#[derive(Debug, Clone)]
pub struct Ciphertext {
    pub bytes: Vec<u8>,
    /// Empty where the provider does not expose versions.
    pub key_version: String,
}

/// Provider-side state of a key, from a describe call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProviderKeyState {
    #[default]
    Enabled,
    Disabled,
    PendingDeletion,
    Destroyed,
}

#[derive(Debug, Clone, Default)]
pub struct KeyDescription {
    pub state: ProviderKeyState,
    /// When the key is not usable: why, and what the customer can do about
    /// it (enable the key, cancel its deletion...). Empty when enabled.
    pub reason: String,
    /// The version new wraps use, where the provider exposes one.
    pub current_version: String,
    /// AWS: `CUSTOMER` or `AWS`.
    pub key_manager: Option<String>,
    /// AWS: a multi-Region key.
    pub multi_region: Option<bool>,
    /// Automatic rotation, where the provider says (and lets us ask).
    pub rotation_enabled: Option<bool>,
    /// GCP: the CryptoKey's automatic rotation period.
    pub rotation_period: Option<std::time::Duration>,
    /// GCP: SOFTWARE, HSM, EXTERNAL... of the primary version.
    pub protection_level: Option<String>,
    /// GCP and Azure: the key's [`OWNER_TAG`] label or tag, which proves at
    /// link time that the customer who owns the key meant it for this tenant.
    pub owner_tag: Option<String>,
}

/// The label (Cloud KMS) or tag (Key Vault) a customer puts on their key,
/// set to the tenant's external id, to prove the key is meant for that
/// tenant: only someone allowed to change the key can set it.
pub const OWNER_TAG: &str = "keybroker-tenant";

/// A key identifier (ARN, resource name, service account) that is not well
/// formed: the message says what was expected.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidIdentifier(pub String);

/// The failure taxonomy every provider maps its errors into. Messages are
/// safe to show a customer: they never contain key material.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProviderError {
    /// The platform may not use the key (IAM, key policy, trust policy).
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// The key exists but is disabled, pending deletion or destroyed.
    #[error("key disabled: {0}")]
    KeyDisabled(String),
    /// One version of the key is unusable (disabled or destroyed) while the
    /// key itself is: data wrapped under that version cannot be read, but
    /// the binding stays usable (GCP exposes versions).
    #[error("key version disabled: {0}")]
    VersionDisabled(String),
    /// The key (or key version) does not exist.
    #[error("key not found: {0}")]
    NotFound(String),
    /// The ciphertext does not decrypt: tampered, wrong key or wrong context.
    #[error("invalid ciphertext: {0}")]
    InvalidCiphertext(String),
    /// The provider refused for rate: retry later.
    #[error("throttled: {0}")]
    Throttled(String),
    /// The provider could not be reached or answered with a server error.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a bug or a broken deployment.
    #[error("internal: {0}")]
    Internal(String),
}

impl ProviderError {
    /// A throttle or an outage: retried, never a change of key state.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Throttled(_) | Self::Unavailable(_))
    }

    /// Errors that would mean the customer made the key unusable (access
    /// denied, key disabled or gone). Seen on a live request they are not
    /// proof: the request's bytes (a forged wrapped key, a context a key
    /// policy refuses) can provoke them. So they only trigger a describe of
    /// the binding, which uses no caller input, and only that describe may
    /// revoke (DESIGN.md section 5, "Trust boundary"). Seen on a describe,
    /// they revoke.
    pub fn suggests_revocation(&self) -> bool {
        matches!(
            self,
            Self::AccessDenied(_) | Self::KeyDisabled(_) | Self::NotFound(_)
        )
    }

    /// A short name of the kind, for metric labels.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::AccessDenied(_) => "access_denied",
            Self::KeyDisabled(_) => "key_disabled",
            Self::VersionDisabled(_) => "version_disabled",
            Self::NotFound(_) => "not_found",
            Self::InvalidCiphertext(_) => "invalid_ciphertext",
            Self::Throttled(_) => "throttled",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// The same failure, its message prefixed with where it happened.
    pub fn within(self, place: &str) -> Self {
        let wrap = |m: String| format!("{place}: {m}");
        match self {
            Self::AccessDenied(m) => Self::AccessDenied(wrap(m)),
            Self::KeyDisabled(m) => Self::KeyDisabled(wrap(m)),
            Self::VersionDisabled(m) => Self::VersionDisabled(wrap(m)),
            Self::NotFound(m) => Self::NotFound(wrap(m)),
            Self::InvalidCiphertext(m) => Self::InvalidCiphertext(wrap(m)),
            Self::Throttled(m) => Self::Throttled(wrap(m)),
            Self::Unavailable(m) => Self::Unavailable(wrap(m)),
            Self::Internal(m) => Self::Internal(wrap(m)),
        }
    }
}

/// One key store. Implementations are cheap to share (`Arc<dyn KeyProvider>`)
/// and safe to call concurrently.
#[async_trait]
pub trait KeyProvider: Send + Sync + fmt::Debug + std::any::Any {
    fn kind(&self) -> ProviderKind;

    /// Encrypts `plaintext` under the newest version of this provider's key.
    async fn encrypt(
        &self,
        plaintext: &SecretBytes,
        wrap: WrapContext<'_>,
    ) -> Result<Ciphertext, ProviderError>;

    /// A fresh random DEK of `len` bytes and its ciphertext. Providers with a
    /// native call (KMS GenerateDataKey) override this.
    async fn generate_data_key(
        &self,
        len: usize,
        wrap: WrapContext<'_>,
    ) -> Result<(SecretBytes, Ciphertext), ProviderError> {
        let plaintext = SecretBytes::random(len)
            .map_err(|_| ProviderError::Internal("system random generator failed".into()))?;
        let ciphertext = self.encrypt(&plaintext, wrap).await?;
        Ok((plaintext, ciphertext))
    }

    /// Decrypts a ciphertext this provider produced.
    async fn decrypt(
        &self,
        key_version: &str,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Result<SecretBytes, ProviderError>;

    /// Reports the key's state and current version: one provider call, as
    /// the watcher makes it for every binding every interval.
    async fn describe(&self) -> Result<KeyDescription, ProviderError>;

    /// Whether the provider rotates the key itself, where that takes a call
    /// of its own (AWS GetKeyRotationStatus). Asked only when a key is
    /// linked: the watcher's state check does not need it. `None`: unknown
    /// or not allowed.
    async fn rotation_enabled(&self) -> Option<bool> {
        None
    }

    /// Refuses, before any provider call, a key version this provider could
    /// never have written into a wrapped key (the caller's bytes name it):
    /// `InvalidCiphertext`, which is the caller's problem alone.
    fn check_version(&self, _version: &str) -> Result<(), ProviderError> {
        Ok(())
    }

    /// The version new wraps use, when known without a provider call. Drives
    /// `rewrap_recommended` on the hot path; `None` where versions are hidden.
    fn current_version(&self) -> Option<String> {
        None
    }

    /// Whether `version` is the one new wraps use (`None`: not known). The
    /// hot path asks this on every unwrap, so providers answer it without
    /// allocating where they can.
    fn is_current_version(&self, version: &str) -> Option<bool> {
        self.current_version().map(|current| current == version)
    }

    /// Whether this key can take a ciphertext of `source` over inside the
    /// provider ([`reencrypt_from`](Self::reencrypt_from)), so a rewrap
    /// costs one call and the plaintext never leaves the provider.
    fn reencrypts_from(&self, _source: &dyn KeyProvider) -> bool {
        false
    }

    /// `source`'s `ciphertext` moved under this key inside the provider
    /// (AWS KMS ReEncrypt); `None` when [`reencrypts_from`] says no.
    ///
    /// [`reencrypts_from`]: Self::reencrypts_from
    async fn reencrypt_from(
        &self,
        _source: &dyn KeyProvider,
        _ciphertext: &[u8],
        _wrap: WrapContext<'_>,
    ) -> Option<Result<Ciphertext, ProviderError>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::ProviderKind;

    /// The names are stored in every registry row: they never change.
    #[test]
    fn provider_names_as_stored() {
        use strum::IntoEnumIterator as _;
        let names: Vec<&str> = ProviderKind::iter().map(ProviderKind::as_str).collect();
        assert_eq!(
            names,
            [
                "local",
                "aws-kms",
                "gcp-kms",
                "vault-transit",
                "pkcs11",
                "azure-kv"
            ]
        );
        for kind in ProviderKind::iter() {
            assert_eq!(kind.as_str().parse::<ProviderKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
        }
        assert!("azure-key-vault".parse::<ProviderKind>().is_err());
    }
}
