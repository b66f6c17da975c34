//! The wrapped-key format and the canonical encoding of what a wrap binds.
//!
//! A wrapped key is the protobuf serialization of `keybroker.v1.WrappedKey`, so
//! any SDK can inspect it. Parsing is strict: besides a known format version and
//! size caps, the bytes must be exactly what this module would encode for the
//! decoded message, which rejects truncation, trailing or unknown fields and
//! duplicate or reordered fields without a second, hand-written parser.
//!
//! The additional authenticated data (AAD) binds the tenant and the caller's
//! context to the ciphertext: a wrapped key of tenant B never unwraps as tenant
//! A, even under the shared platform key.

use std::collections::{BTreeMap, HashMap};

use prost::Message;

use crate::kms::ProviderKind;
use crate::proto;

/// The only envelope format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest wrapped key accepted. Real ones are under 1 KiB (AWS KMS ciphertext
/// blobs are at most ~6 KiB for 4 KiB plaintexts).
pub const MAX_WRAPPED_KEY_BYTES: usize = 16 * 1024;
/// Tenant ids: 1..=128 of these characters.
pub const MAX_TENANT_ID_LEN: usize = 128;
/// Context limits (see broker.proto).
pub const MAX_CONTEXT_ENTRIES: usize = 64;
pub const MAX_CONTEXT_KEY_LEN: usize = 256;
pub const MAX_CONTEXT_VALUE_LEN: usize = 1024;
pub const MAX_CONTEXT_TOTAL_LEN: usize = 4096;
/// Context keys with this prefix are reserved for keybroker's own entries.
pub const RESERVED_CONTEXT_PREFIX: &str = "keybroker:";

/// Domain separation tag of AAD format 1.
const AAD_TAG: &[u8] = b"keybroker.v1.aad";

/// Why a tenant id, context or wrapped key was refused. Every variant is the
/// caller's input being wrong (INVALID_ARGUMENT).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("wrapped_key is empty")]
    Empty,
    #[error("wrapped_key is {len} bytes; the maximum is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("wrapped_key is not a keybroker wrapped key (not a valid WrappedKey encoding)")]
    Malformed,
    #[error(
        "wrapped_key has an unsupported format version {0}; this server reads version {FORMAT_VERSION}"
    )]
    UnsupportedVersion(u32),
    #[error(
        "wrapped_key is not in canonical form: it was truncated, extended or re-encoded after it was issued"
    )]
    NonCanonical,
    #[error("wrapped_key has no {0}")]
    MissingField(&'static str),
    #[error("invalid tenant_id: {0}")]
    InvalidTenant(String),
    #[error("invalid context: {0}")]
    InvalidContext(String),
}

/// A validated tenant id.
pub fn validate_tenant_id(tenant_id: &str) -> Result<(), EnvelopeError> {
    if tenant_id.is_empty() {
        return Err(EnvelopeError::InvalidTenant("tenant_id is required".into()));
    }
    if tenant_id.len() > MAX_TENANT_ID_LEN {
        return Err(EnvelopeError::InvalidTenant(format!(
            "tenant_id is {} bytes; the maximum is {MAX_TENANT_ID_LEN}",
            tenant_id.len()
        )));
    }
    if let Some(bad) = tenant_id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.:@".contains(*c)))
    {
        return Err(EnvelopeError::InvalidTenant(format!(
            "tenant_id contains {bad:?}; allowed are ASCII letters, digits and -_.:@"
        )));
    }
    Ok(())
}

/// The caller's encryption context, validated and in canonical (sorted) order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context(BTreeMap<String, String>);

impl Context {
    pub fn new(map: HashMap<String, String>) -> Result<Self, EnvelopeError> {
        if map.len() > MAX_CONTEXT_ENTRIES {
            return Err(EnvelopeError::InvalidContext(format!(
                "{} entries; the maximum is {MAX_CONTEXT_ENTRIES}",
                map.len()
            )));
        }
        let mut total = 0usize;
        for (key, value) in &map {
            if key.is_empty() || key.len() > MAX_CONTEXT_KEY_LEN {
                return Err(EnvelopeError::InvalidContext(format!(
                    "keys must be 1 to {MAX_CONTEXT_KEY_LEN} bytes (got {} bytes)",
                    key.len()
                )));
            }
            if key.starts_with(RESERVED_CONTEXT_PREFIX) {
                return Err(EnvelopeError::InvalidContext(format!(
                    "key {key:?} uses the reserved prefix {RESERVED_CONTEXT_PREFIX:?}"
                )));
            }
            if value.len() > MAX_CONTEXT_VALUE_LEN {
                return Err(EnvelopeError::InvalidContext(format!(
                    "the value of {key:?} is {} bytes; the maximum is {MAX_CONTEXT_VALUE_LEN}",
                    value.len()
                )));
            }
            total += key.len() + value.len();
        }
        if total > MAX_CONTEXT_TOTAL_LEN {
            return Err(EnvelopeError::InvalidContext(format!(
                "{total} bytes in all; the maximum is {MAX_CONTEXT_TOTAL_LEN}"
            )));
        }
        Ok(Self(map.into_iter().collect()))
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Feeds the canonical encoding to `out` (AAD, cache key).
    pub fn encode_into(&self, out: &mut dyn FnMut(&[u8])) {
        out(&len32(self.0.len()));
        for (key, value) in &self.0 {
            put_prefixed(out, key.as_bytes());
            put_prefixed(out, value.as_bytes());
        }
    }
}

/// Canonical AAD of a wrap: tag, tenant, then the context entries sorted by
/// key, every field length-prefixed (u32, big-endian), so no two different
/// (tenant, context) pairs encode alike.
pub fn aad(tenant_id: &str, context: &Context) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    let mut push = |bytes: &[u8]| out.extend_from_slice(bytes);
    put_prefixed(&mut push, AAD_TAG);
    put_prefixed(&mut push, tenant_id.as_bytes());
    context.encode_into(&mut push);
    out
}

fn len32(len: usize) -> [u8; 4] {
    // Every length here is capped far below u32::MAX by the validation above.
    u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes()
}

fn put_prefixed(out: &mut dyn FnMut(&[u8]), bytes: &[u8]) {
    out(&len32(bytes.len()));
    out(bytes);
}

/// A parsed, validated wrapped key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub tenant_id: String,
    pub key_binding: String,
    pub provider: ProviderKind,
    pub provider_key_version: String,
    pub ciphertext: Vec<u8>,
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        proto::WrappedKey {
            format_version: FORMAT_VERSION,
            tenant_id: self.tenant_id.clone(),
            key_binding: self.key_binding.clone(),
            provider: proto::Provider::from(self.provider).into(),
            provider_key_version: self.provider_key_version.clone(),
            ciphertext: self.ciphertext.clone(),
        }
        .encode_to_vec()
    }

    /// Strict parse of caller-supplied bytes; never panics.
    pub fn parse(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        check_size(bytes)?;
        let msg = proto::WrappedKey::decode(bytes).map_err(|_| EnvelopeError::Malformed)?;
        if msg.format_version != FORMAT_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(msg.format_version));
        }
        if msg.encoded_len() != bytes.len() || msg.encode_to_vec() != bytes {
            return Err(EnvelopeError::NonCanonical);
        }
        if msg.tenant_id.is_empty() {
            return Err(EnvelopeError::MissingField("tenant_id"));
        }
        if msg.key_binding.is_empty() {
            return Err(EnvelopeError::MissingField("key_binding"));
        }
        if msg.ciphertext.is_empty() {
            return Err(EnvelopeError::MissingField("ciphertext"));
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
        }
    }

    fn ctx(pairs: &[(&str, &str)]) -> Context {
        Context::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap()
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
        msg.format_version = 2;
        assert_eq!(
            Envelope::parse(&msg.encode_to_vec()),
            Err(EnvelopeError::UnsupportedVersion(2))
        );
        assert_eq!(Envelope::parse(&[]), Err(EnvelopeError::Empty));
        let big = vec![0u8; MAX_WRAPPED_KEY_BYTES + 1];
        assert!(matches!(
            Envelope::parse(&big),
            Err(EnvelopeError::TooLarge { .. })
        ));
        assert_eq!(Envelope::parse(&[0xff; 10]), Err(EnvelopeError::Malformed));
    }

    #[test]
    fn aad_is_canonical_and_unambiguous() {
        let a = ctx(&[("b", "2"), ("a", "1")]);
        let b = ctx(&[("a", "1"), ("b", "2")]);
        assert_eq!(aad("t", &a), aad("t", &b));
        assert_eq!(a, b);
        // Moving bytes between fields changes the encoding.
        assert_ne!(
            aad("t", &ctx(&[("ab", "c")])),
            aad("t", &ctx(&[("a", "bc")]))
        );
        assert_ne!(aad("t1", &Context::default()), aad("t", &ctx(&[("1", "")])));
        assert_ne!(aad("acme", &a), aad("acmf", &a));
    }

    #[test]
    fn context_limits() {
        let reserved = HashMap::from([("keybroker:tenant".to_string(), "x".to_string())]);
        assert!(Context::new(reserved).is_err());
        let empty_key = HashMap::from([(String::new(), "x".to_string())]);
        assert!(Context::new(empty_key).is_err());
        let many: HashMap<_, _> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(Context::new(many).is_err());
        let long = HashMap::from([("k".to_string(), "v".repeat(1025))]);
        assert!(Context::new(long).is_err());
    }

    #[test]
    fn tenant_ids() {
        for ok in [
            "acme",
            "3f2b1c9e-0000-4000-8000-000000000000",
            "org:team.a_b@x",
        ] {
            validate_tenant_id(ok).unwrap();
        }
        for bad in ["", "a b", "ä", "x/y", &"a".repeat(129)] {
            assert!(validate_tenant_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}
