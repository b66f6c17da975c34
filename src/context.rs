//! The caller's side of a wrap: the tenant id and the encryption context, and
//! their canonical encoding as additional authenticated data (AAD).
//!
//! The AAD binds the tenant and the caller's context to the ciphertext: a
//! wrapped key of tenant B never unwraps as tenant A, even under the shared
//! platform key. Providers pass it to their AEAD or KMS as is.

use std::collections::BTreeMap;

/// Tenant ids: 1..=128 of these characters.
pub const MAX_TENANT_ID_LEN: usize = 128;
/// Context limits (see broker.proto).
pub const MAX_CONTEXT_ENTRIES: usize = 64;
pub const MAX_CONTEXT_KEY_LEN: usize = 256;
pub const MAX_CONTEXT_VALUE_LEN: usize = 1024;
pub const MAX_CONTEXT_TOTAL_LEN: usize = 4096;
/// Context keys with this prefix are reserved for keybroker's own entries.
pub const RESERVED_CONTEXT_PREFIX: &str = "keybroker:";

/// Context entry binding a direct wrap to the tenant's incarnation (in the
/// customer's KMS log, the AWS encryption context shows it).
pub const INCARNATION_CONTEXT: &str = "keybroker:tenant-incarnation";

/// Domain separation tag of AAD format 1.
const AAD_TAG: &[u8] = b"keybroker.v1.aad";

/// Why a tenant id or context was refused: the caller's input is wrong
/// (INVALID_ARGUMENT).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ContextError {
    #[error("invalid tenant_id: {0}")]
    InvalidTenant(String),
    #[error("invalid context: {0}")]
    InvalidContext(String),
}

/// A tenant id, checked once where it enters (the API): the data plane's
/// entry points take this, not a `&str`, so none of them checks it again.
/// Holds the request's own string (no copy).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(id: String) -> Result<Self, ContextError> {
        validate_tenant_id(&id)?;
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for TenantId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `tenant_id` is a tenant id (see [`TenantId`]).
pub fn validate_tenant_id(tenant_id: &str) -> Result<(), ContextError> {
    if tenant_id.is_empty() {
        return Err(ContextError::InvalidTenant("tenant_id is required".into()));
    }
    if tenant_id.len() > MAX_TENANT_ID_LEN {
        return Err(ContextError::InvalidTenant(format!(
            "tenant_id is {} bytes; the maximum is {MAX_TENANT_ID_LEN}",
            tenant_id.len()
        )));
    }
    // Bytes, not chars: every allowed character is ASCII, and the first
    // byte that is not allowed starts the character to name.
    let allowed =
        |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@');
    if let Some(bad) = tenant_id
        .bytes()
        .position(|b| !allowed(&b))
        .and_then(|at| tenant_id[at..].chars().next())
    {
        return Err(ContextError::InvalidTenant(format!(
            "tenant_id contains {bad:?}; allowed are ASCII letters, digits and -_.:@"
        )));
    }
    Ok(())
}

/// The caller's encryption context, validated and in canonical (sorted) order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context(BTreeMap<String, String>);

impl Context {
    pub fn new(map: BTreeMap<String, String>) -> Result<Self, ContextError> {
        if map.len() > MAX_CONTEXT_ENTRIES {
            return Err(ContextError::InvalidContext(format!(
                "{} entries; the maximum is {MAX_CONTEXT_ENTRIES}",
                map.len()
            )));
        }
        let mut total = 0usize;
        for (key, value) in &map {
            if key.is_empty() || key.len() > MAX_CONTEXT_KEY_LEN {
                return Err(ContextError::InvalidContext(format!(
                    "keys must be 1 to {MAX_CONTEXT_KEY_LEN} bytes (got {} bytes)",
                    key.len()
                )));
            }
            if key.starts_with(RESERVED_CONTEXT_PREFIX) {
                return Err(ContextError::InvalidContext(format!(
                    "key {key:?} uses the reserved prefix {RESERVED_CONTEXT_PREFIX:?}"
                )));
            }
            if value.len() > MAX_CONTEXT_VALUE_LEN {
                return Err(ContextError::InvalidContext(format!(
                    "the value of {key:?} is {} bytes; the maximum is {MAX_CONTEXT_VALUE_LEN}",
                    value.len()
                )));
            }
            total += key.len() + value.len();
        }
        if total > MAX_CONTEXT_TOTAL_LEN {
            return Err(ContextError::InvalidContext(format!(
                "{total} bytes in all; the maximum is {MAX_CONTEXT_TOTAL_LEN}"
            )));
        }
        Ok(Self(map))
    }

    /// A context of keybroker's own entries (reserved prefix allowed):
    /// never built from caller input.
    pub(crate) fn reserved(entries: &[(&str, String)]) -> Self {
        Self(
            entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        )
    }

    /// This context bound to a tenant incarnation (a reserved entry) for a
    /// direct wrap; itself for incarnation 0 (keys from before incarnations).
    pub fn with_incarnation(&self, incarnation: u64) -> std::borrow::Cow<'_, Self> {
        if incarnation == 0 {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut bound = self.clone();
        bound
            .0
            .insert(INCARNATION_CONTEXT.to_owned(), incarnation.to_string());
        std::borrow::Cow::Owned(bound)
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Feeds the canonical encoding to `out` (AAD, cache key).
    /// Generic, not `dyn`: inlined into the cache key's hash on the hot
    /// path, where an indirect call per field cost more than the copies.
    pub fn encode_into(&self, out: &mut impl FnMut(&[u8])) {
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

/// Domain separation tag of the AAD of a DEK sealed under a tenant key.
const SEALED_AAD_TAG: &[u8] = b"keybroker.v2.dek";
/// The same, with the tenant's incarnation bound in.
const SEALED_AAD_TAG_INCARNATION: &[u8] = b"keybroker.v3.dek";

/// Canonical AAD of a DEK sealed under tenant key `version`: tag, tenant,
/// version, then the context entries, as in [`aad`]. A sealed DEK opens only
/// for its tenant, its context and the version that sealed it.
/// With an incarnation (every key sealed since they exist) it is bound in
/// too, under another tag; 0 is the layout of keys sealed before.
pub fn sealed_aad(tenant_id: &str, incarnation: u64, version: u32, context: &Context) -> Vec<u8> {
    let mut out = Vec::with_capacity(80);
    let mut push = |bytes: &[u8]| out.extend_from_slice(bytes);
    if incarnation == 0 {
        put_prefixed(&mut push, SEALED_AAD_TAG);
        put_prefixed(&mut push, tenant_id.as_bytes());
    } else {
        put_prefixed(&mut push, SEALED_AAD_TAG_INCARNATION);
        put_prefixed(&mut push, tenant_id.as_bytes());
        push(&incarnation.to_be_bytes());
    }
    push(&version.to_be_bytes());
    context.encode_into(&mut push);
    out
}

fn len32(len: usize) -> [u8; 4] {
    // Every length here is capped far below u32::MAX by the validation above.
    u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes()
}

fn put_prefixed(out: &mut impl FnMut(&[u8]), bytes: &[u8]) {
    out(&len32(bytes.len()));
    out(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> Context {
        Context::new(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
        .unwrap()
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
        let reserved = BTreeMap::from([("keybroker:tenant".to_string(), "x".to_string())]);
        assert!(Context::new(reserved).is_err());
        let empty_key = BTreeMap::from([(String::new(), "x".to_string())]);
        assert!(Context::new(empty_key).is_err());
        let many: BTreeMap<_, _> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(Context::new(many).is_err());
        let long = BTreeMap::from([("k".to_string(), "v".repeat(1025))]);
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
        // The message names the first character refused, multi-byte too.
        for (bad, named) in [("acmeäb", "'ä'"), ("a b", "' '"), ("x/y", "'/'")] {
            let err = validate_tenant_id(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("contains {named}")), "{err}");
        }
    }

    #[test]
    fn sealed_aad_binds_the_version_and_differs_from_direct() {
        let c = ctx(&[("a", "1")]);
        for incarnation in [0, 1] {
            let sealed = |t: &str, v: u32| sealed_aad(t, incarnation, v, &c);
            assert_ne!(sealed("t", 1), sealed("t", 2));
            assert_ne!(sealed("t", 1), sealed("u", 1));
            assert_ne!(sealed("t", 1), aad("t", &c));
            assert_eq!(sealed("t", 1), sealed("t", 1));
        }
        // Incarnations differ, and none encodes like a key from before them.
        assert_ne!(sealed_aad("t", 1, 1, &c), sealed_aad("t", 2, 1, &c));
        assert_ne!(sealed_aad("t", 0, 1, &c), sealed_aad("t", 1, 1, &c));
    }

    #[test]
    fn an_incarnation_is_a_reserved_entry_of_a_direct_wrap() {
        let c = ctx(&[("a", "1")]);
        assert_eq!(*c.with_incarnation(0), c);
        let bound = c.with_incarnation(7);
        assert_eq!(
            bound.entries().collect::<Vec<_>>(),
            vec![("a", "1"), (INCARNATION_CONTEXT, "7")]
        );
        // No caller can send the entry itself.
        assert!(Context::new([(INCARNATION_CONTEXT.to_owned(), "7".to_owned())].into()).is_err());
    }
}
