//! The wrapped-key format.
//!
//! A wrapped key is the protobuf serialization of `keybroker.v1.WrappedKey`, so
//! any SDK can inspect it. Parsing is strict: besides a known format version and
//! size caps, the bytes must be exactly what this module would encode for the
//! decoded message, which rejects truncation, trailing or unknown fields and
//! duplicate or reordered fields without a second, hand-written parser.
//!
//! What a wrap binds (tenant, context) is in `context`.

use prost::Message;

use crate::kms::ProviderKind;
use crate::proto;

/// The wrapped-key format names providers by the wire enum.
impl From<ProviderKind> for proto::Provider {
    fn from(kind: ProviderKind) -> Self {
        match kind {
            ProviderKind::Local => Self::Local,
            ProviderKind::AwsKms => Self::AwsKms,
            ProviderKind::GcpKms => Self::GcpKms,
            ProviderKind::VaultTransit => Self::VaultTransit,
            ProviderKind::Pkcs11 => Self::Pkcs11,
            ProviderKind::AzureKeyVault => Self::AzureKeyVault,
        }
    }
}

impl TryFrom<proto::Provider> for ProviderKind {
    type Error = ();
    fn try_from(p: proto::Provider) -> Result<Self, ()> {
        match p {
            proto::Provider::Local => Ok(Self::Local),
            proto::Provider::AwsKms => Ok(Self::AwsKms),
            proto::Provider::GcpKms => Ok(Self::GcpKms),
            proto::Provider::VaultTransit => Ok(Self::VaultTransit),
            proto::Provider::Pkcs11 => Ok(Self::Pkcs11),
            proto::Provider::AzureKeyVault => Ok(Self::AzureKeyVault),
            proto::Provider::Unspecified => Err(()),
        }
    }
}

/// Format of a DEK wrapped directly by a key binding's provider, from
/// before incarnations (read, never written).
pub const FORMAT_VERSION: u32 = 1;
/// Format of a DEK sealed locally under a tenant key version, from before
/// incarnations (read, never written).
pub const FORMAT_TENANT_KEY: u32 = 2;
/// Format 1 bound to the tenant's incarnation (required, nonzero).
pub const FORMAT_DIRECT_BOUND: u32 = 3;
/// Format 2 bound to the tenant's incarnation (required, nonzero). A
/// format of its own rather than an optional field: a key cut just before
/// the incarnation must not parse as one from before incarnations.
pub const FORMAT_SEALED_BOUND: u32 = 4;
/// Largest wrapped key accepted. Real ones are under 1 KiB (AWS KMS ciphertext
/// blobs are at most ~6 KiB for 4 KiB plaintexts).
pub const MAX_WRAPPED_KEY_BYTES: usize = 16 * 1024;

/// Why a wrapped key was refused. Every variant is the caller's input being
/// wrong (INVALID_ARGUMENT).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("wrapped_key is empty")]
    Empty,
    #[error("wrapped_key is {len} bytes; the maximum is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("wrapped_key is not a keybroker wrapped key (not a valid WrappedKey encoding)")]
    Malformed,
    #[error(
        "wrapped_key has an unsupported format version {0}; this server reads versions {FORMAT_VERSION} to {FORMAT_SEALED_BOUND}"
    )]
    UnsupportedVersion(u32),
    #[error(
        "wrapped_key is not in canonical form: it was truncated, extended or re-encoded after it was issued"
    )]
    NonCanonical,
    #[error("wrapped_key has no {0}")]
    MissingField(&'static str),
}

/// A parsed, validated wrapped key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub tenant_id: String,
    pub key_binding: String,
    pub provider: ProviderKind,
    pub provider_key_version: String,
    pub ciphertext: Vec<u8>,
    /// Format 2: the tenant key version that sealed the DEK; 0 in format 1,
    /// where `key_binding` and `provider` name the wrapping key instead.
    pub tenant_key_version: u32,
    /// The tenant's incarnation the key was issued for (bound into the
    /// AAD); 0 in keys from before incarnations.
    pub incarnation: u64,
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        let bound = self.incarnation != 0;
        if self.tenant_key_version > 0 {
            return proto::WrappedKey {
                format_version: if bound {
                    FORMAT_SEALED_BOUND
                } else {
                    FORMAT_TENANT_KEY
                },
                tenant_id: self.tenant_id.clone(),
                ciphertext: self.ciphertext.clone(),
                tenant_key_version: self.tenant_key_version,
                tenant_incarnation: self.incarnation,
                ..proto::WrappedKey::default()
            }
            .encode_to_vec();
        }
        proto::WrappedKey {
            format_version: if bound {
                FORMAT_DIRECT_BOUND
            } else {
                FORMAT_VERSION
            },
            tenant_id: self.tenant_id.clone(),
            key_binding: self.key_binding.clone(),
            provider: proto::Provider::from(self.provider).into(),
            provider_key_version: self.provider_key_version.clone(),
            ciphertext: self.ciphertext.clone(),
            tenant_key_version: 0,
            tenant_incarnation: self.incarnation,
        }
        .encode_to_vec()
    }

    /// Strict parse of caller-supplied bytes; never panics.
    pub fn parse(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        check_size(bytes)?;
        let msg = proto::WrappedKey::decode(bytes).map_err(|_| EnvelopeError::Malformed)?;
        let (sealed, bound) = match msg.format_version {
            FORMAT_VERSION => (false, false),
            FORMAT_TENANT_KEY => (true, false),
            FORMAT_DIRECT_BOUND => (false, true),
            FORMAT_SEALED_BOUND => (true, true),
            other => return Err(EnvelopeError::UnsupportedVersion(other)),
        };
        if msg.encoded_len() != bytes.len() || msg.encode_to_vec() != bytes {
            return Err(EnvelopeError::NonCanonical);
        }
        if msg.tenant_id.is_empty() {
            return Err(EnvelopeError::MissingField("tenant_id"));
        }
        if msg.ciphertext.is_empty() {
            return Err(EnvelopeError::MissingField("ciphertext"));
        }
        match (bound, msg.tenant_incarnation) {
            (true, 0) => return Err(EnvelopeError::MissingField("tenant_incarnation")),
            (false, n) if n != 0 => return Err(EnvelopeError::Malformed),
            _ => {}
        }
        if sealed {
            // Exactly the fields format 2 writes: nothing a reader could
            // mistake for the protecting key.
            if msg.tenant_key_version == 0 {
                return Err(EnvelopeError::MissingField("tenant_key_version"));
            }
            if !msg.key_binding.is_empty()
                || msg.provider != 0
                || !msg.provider_key_version.is_empty()
            {
                return Err(EnvelopeError::Malformed);
            }
            return Ok(Self {
                tenant_id: msg.tenant_id,
                key_binding: String::new(),
                provider: ProviderKind::Local,
                provider_key_version: String::new(),
                ciphertext: msg.ciphertext,
                tenant_key_version: msg.tenant_key_version,
                incarnation: msg.tenant_incarnation,
            });
        }
        if msg.tenant_key_version != 0 {
            return Err(EnvelopeError::Malformed);
        }
        if msg.key_binding.is_empty() {
            return Err(EnvelopeError::MissingField("key_binding"));
        }
        let provider = proto::Provider::try_from(msg.provider)
            .ok()
            .and_then(|p| ProviderKind::try_from(p).ok())
            .ok_or(EnvelopeError::MissingField("known provider"))?;
        Ok(Self {
            tenant_id: msg.tenant_id,
            key_binding: msg.key_binding,
            provider,
            provider_key_version: msg.provider_key_version,
            ciphertext: msg.ciphertext,
            tenant_key_version: 0,
            incarnation: msg.tenant_incarnation,
        })
    }
}

/// Size checks shared by the parser and the cache fast path.
pub fn check_size(bytes: &[u8]) -> Result<(), EnvelopeError> {
    if bytes.is_empty() {
        return Err(EnvelopeError::Empty);
    }
    if bytes.len() > MAX_WRAPPED_KEY_BYTES {
        return Err(EnvelopeError::TooLarge {
            len: bytes.len(),
            max: MAX_WRAPPED_KEY_BYTES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            tenant_id: "acme".into(),
            key_binding: "platform".into(),
            provider: ProviderKind::Local,
            provider_key_version: "3".into(),
            ciphertext: vec![7; 60],
            tenant_key_version: 0,
            incarnation: 0,
        }
    }

    fn sealed() -> Envelope {
        Envelope {
            tenant_id: "acme".into(),
            key_binding: String::new(),
            provider: ProviderKind::Local,
            provider_key_version: String::new(),
            ciphertext: vec![9; 96],
            tenant_key_version: 4,
            incarnation: 3,
        }
    }

    #[test]
    fn tenant_key_format_round_trips_and_is_strict() {
        let env = sealed();
        let bytes = env.encode();
        assert_eq!(Envelope::parse(&bytes).unwrap(), env);
        let msg = proto::WrappedKey::decode(bytes.as_slice()).unwrap();
        assert_eq!(msg.format_version, FORMAT_SEALED_BOUND);
        // Format 2 naming a binding, provider or version, or no tenant key
        // version; format 1 naming a tenant key version: all refused.
        let mut bad = msg.clone();
        bad.key_binding = "platform".into();
        assert_eq!(
            Envelope::parse(&bad.encode_to_vec()),
            Err(EnvelopeError::Malformed)
        );
        let mut bad = msg.clone();
        bad.provider = proto::Provider::AwsKms.into();
        assert_eq!(
            Envelope::parse(&bad.encode_to_vec()),
            Err(EnvelopeError::Malformed)
        );
        let mut bad = msg.clone();
        bad.tenant_key_version = 0;
        assert_eq!(
            Envelope::parse(&bad.encode_to_vec()),
            Err(EnvelopeError::MissingField("tenant_key_version"))
        );
        let mut bad = proto::WrappedKey::decode(sample().encode().as_slice()).unwrap();
        bad.tenant_key_version = 2;
        assert_eq!(
            Envelope::parse(&bad.encode_to_vec()),
            Err(EnvelopeError::Malformed)
        );
        for len in 0..bytes.len() {
            assert!(Envelope::parse(&bytes[..len]).is_err());
        }
        // A bound format needs its incarnation; a legacy one has none.
        let mut bad = msg.clone();
        bad.tenant_incarnation = 0;
        assert_eq!(
            Envelope::parse(&bad.encode_to_vec()),
            Err(EnvelopeError::MissingField("tenant_incarnation"))
        );
        let mut bad = msg.clone();
        bad.format_version = FORMAT_TENANT_KEY;
        assert_eq!(
            Envelope::parse(&bad.encode_to_vec()),
            Err(EnvelopeError::Malformed)
        );
        // Keys from before incarnations still read as what they were.
        let legacy = Envelope {
            incarnation: 0,
            ..sealed()
        };
        let bytes = legacy.encode();
        assert_eq!(
            proto::WrappedKey::decode(bytes.as_slice())
                .unwrap()
                .format_version,
            FORMAT_TENANT_KEY
        );
        assert_eq!(Envelope::parse(&bytes).unwrap(), legacy);
        let direct = Envelope {
            incarnation: 9,
            ..sample()
        };
        let bytes = direct.encode();
        assert_eq!(
            proto::WrappedKey::decode(bytes.as_slice())
                .unwrap()
                .format_version,
            FORMAT_DIRECT_BOUND
        );
        assert_eq!(Envelope::parse(&bytes).unwrap(), direct);
        for len in 0..bytes.len() {
            assert!(Envelope::parse(&bytes[..len]).is_err());
        }
    }

    #[test]
    fn round_trip() {
        let env = sample();
        assert_eq!(Envelope::parse(&env.encode()).unwrap(), env);
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(
                Envelope::parse(&bytes[..len]).is_err(),
                "prefix of {len} bytes accepted"
            );
        }
    }

    #[test]
    fn trailing_and_unknown_fields_are_refused() {
        let mut bytes = sample().encode();
        // Field 15, varint 1: valid protobuf, unknown to us.
        bytes.extend_from_slice(&[0x78, 0x01]);
        assert_eq!(Envelope::parse(&bytes), Err(EnvelopeError::NonCanonical));
        // The same field twice: protobuf takes the last one; we refuse.
        let mut twice = sample().encode();
        twice.extend_from_slice(&[0x12, 0x01, b'x']);
        assert_eq!(Envelope::parse(&twice), Err(EnvelopeError::NonCanonical));
    }

    #[test]
    fn unknown_version_empty_oversized() {
        let mut msg = proto::WrappedKey::decode(sample().encode().as_slice()).unwrap();
        msg.format_version = 5;
        assert_eq!(
            Envelope::parse(&msg.encode_to_vec()),
            Err(EnvelopeError::UnsupportedVersion(5))
        );
        assert_eq!(Envelope::parse(&[]), Err(EnvelopeError::Empty));
        let big = vec![0u8; MAX_WRAPPED_KEY_BYTES + 1];
        assert!(matches!(
            Envelope::parse(&big),
            Err(EnvelopeError::TooLarge { .. })
        ));
        assert_eq!(Envelope::parse(&[0xff; 10]), Err(EnvelopeError::Malformed));
    }
}
