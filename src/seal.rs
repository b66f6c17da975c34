//! How keybroker encrypts with keys it holds itself (the platform keyring,
//! imported key material, tenant keys): AES-256-GCM under a key derived
//! for each wrap.
//!
//! Plain AES-GCM with random 96-bit nonces is safe for about 2^32 wraps per
//! key (NIST SP 800-38D, section 8.3): past that, the chance that two wraps
//! share a nonce, and so leak the authentication key, exceeds 2^-32. At the
//! ~75,000 GenerateDataKey/s one replica serves, 2^32 wraps take 16 hours;
//! nothing would count them. So every wrap here draws a 256-bit salt,
//! derives a one-time AES-256 key from the long-term key with HKDF-SHA256
//! (RFC 5869) and that salt, and seals with it under a random 96-bit nonce.
//! A (key, nonce) pair then repeats only if two wraps draw the same salt
//! *and* nonce: after 2^40 wraps under one key, at most 2^-271 (the limits
//! are computed in this module's tests).
//!
//! Layout: `MAGIC (4) || salt (32) || nonce (12) || ciphertext || tag (16)`.
//! The magic tells this construction from the legacy one (`nonce ||
//! ciphertext || tag` under the long-term key), which stays readable.

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
use zeroize::Zeroizing;

use crate::secret::SecretBytes;

/// Marks a sealed blob of this construction ("kbs" and version 1).
pub const MAGIC: [u8; 4] = *b"kbs\x01";
/// Bytes of the per-wrap HKDF salt.
pub const SALT_LEN: usize = 32;
/// AES-GCM tag bytes.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed blob adds to its plaintext.
pub const OVERHEAD: usize = MAGIC.len() + SALT_LEN + NONCE_LEN + TAG_LEN;
/// HKDF `info`: binds derived keys to this construction and its purpose.
const INFO: &[u8] = b"keybroker seal v1: AES-256-GCM wrap key";

/// Why a blob did not open: always the input (altered bytes, another key,
/// another AAD), or a failing system random generator when sealing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("authentication failed: the bytes, the key or the bound context differ from the wrap")]
    Open,
    #[error("the system random generator failed")]
    Random,
}

/// A long-term 256-bit key. Zeroized on drop, never printed.
pub struct SealingKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingKey(<redacted>)")
    }
}

impl SealingKey {
    /// `None` unless `material` is exactly 32 bytes.
    pub fn new(material: &[u8]) -> Option<Self> {
        let bytes: [u8; 32] = material.try_into().ok()?;
        Some(Self(Zeroizing::new(bytes)))
    }

    /// A key for another purpose, derived from this one under `label`
    /// (HKDF-SHA256; a label per purpose keeps the keys independent): the
    /// seed of keybroker's token signing keys, for one.
    pub fn derive_subkey(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        struct Len32;
        impl aws_lc_rs::hkdf::KeyType for Len32 {
            fn len(&self) -> usize {
                32
            }
        }
        let prk = Salt::new(HKDF_SHA256, b"keybroker derived keys v1").extract(self.0.as_slice());
        let info = [label];
        let mut out = Zeroizing::new([0u8; 32]);
        // 32 bytes are far below HKDF-SHA256's limit: expand cannot fail.
        if let Ok(okm) = prk.expand(&info, Len32) {
            let _ = okm.fill(out.as_mut_slice());
        }
        out
    }

    /// The one-time key of the wrap that drew `salt`. HKDF-SHA256 can
    /// expand up to 8160 bytes, so the 32 asked here never fail; the error
    /// is only passed on.
    fn derive(&self, salt: &[u8], failure: SealError) -> Result<LessSafeKey, SealError> {
        let prk = Salt::new(HKDF_SHA256, salt).extract(self.0.as_slice());
        let info = [INFO];
        let okm = prk.expand(&info, &AES_256_GCM).map_err(|_| failure)?;
        Ok(LessSafeKey::new(UnboundKey::from(okm)))
    }

    /// Seals `plaintext`, binding `aad`.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut header = [0u8; SALT_LEN + NONCE_LEN];
        aws_lc_rs::rand::fill(&mut header).map_err(|_| SealError::Random)?;
        let (salt, nonce) = header.split_at(SALT_LEN);
        let key = self.derive(salt, SealError::Random)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Random)?;
        // Sealed in a zeroizing buffer sized for the tag: no reallocation
        // leaves a plaintext copy behind.
        let mut body = Zeroizing::new(Vec::with_capacity(plaintext.len() + TAG_LEN));
        body.extend_from_slice(plaintext);
        key.seal_in_place_append_tag(nonce, Aad::from(aad), &mut *body)
            .map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&header);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens a blob [`seal`](Self::seal) made with this key and `aad`.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<SecretBytes, SealError> {
        if sealed.len() < OVERHEAD || !is_sealed(sealed) {
            return Err(SealError::Open);
        }
        let rest = &sealed[MAGIC.len()..];
        let (salt, rest) = rest.split_at(SALT_LEN);
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let key = self.derive(salt, SealError::Open)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut buf = Zeroizing::new(body.to_vec());
        let len = key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| SealError::Open)?
            .len();
        buf.truncate(len);
        Ok(SecretBytes::new(std::mem::take(&mut *buf)))
    }
}

/// Whether `blob` claims to be of this construction. A legacy blob starts
/// with a random nonce, so it may also carry the magic (once in 2^32):
/// callers try this construction first and the legacy one when it fails.
pub fn is_sealed(blob: &[u8]) -> bool {
    blob.starts_with(&MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SealingKey {
        SealingKey::new(&[7u8; 32]).unwrap()
    }

    /// log2 of the birthday bound: the chance that any two of 2^`wraps_log2`
    /// uniformly random values of `bits` bits collide is at most
    /// n^2 / 2^(bits+1).
    fn collision_log2(wraps_log2: f64, bits: f64) -> f64 {
        2.0 * wraps_log2 - (bits + 1.0)
    }

    #[test]
    fn limits_of_the_construction() {
        // Plain AES-GCM with random 96-bit nonces: NIST's limit of 2^32
        // wraps per key keeps a nonce repeat under 2^-32 ...
        assert!(collision_log2(32.0, 96.0) <= -32.0);
        // ... and 2^40 wraps (a few weeks of one busy replica) break it.
        assert!(collision_log2(40.0, 96.0) > -32.0);
        // Here a key and nonce repeat only if salt and nonce both repeat:
        // 2^40 wraps under one key stay far below 2^-32, and so does 2^64.
        let bits = (SALT_LEN * 8 + NONCE_LEN * 8) as f64;
        assert!(collision_log2(40.0, bits) <= -271.0);
        assert!(collision_log2(64.0, bits) <= -32.0);
        assert_eq!(OVERHEAD, 64);
    }

    #[test]
    fn seals_open_only_with_key_and_aad() {
        let sealed = key().seal(b"dek bytes", b"aad").unwrap();
        assert!(is_sealed(&sealed));
        assert_eq!(sealed.len(), OVERHEAD + 9);
        assert_eq!(key().open(&sealed, b"aad").unwrap().expose(), b"dek bytes");
        assert_eq!(key().open(&sealed, b"other"), Err(SealError::Open));
        let other = SealingKey::new(&[8u8; 32]).unwrap();
        assert_eq!(other.open(&sealed, b"aad"), Err(SealError::Open));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(key().open(&bad, b"aad").is_err(), "flipped byte {i} opened");
        }
        for len in 0..sealed.len() {
            assert!(key().open(&sealed[..len], b"aad").is_err());
        }
    }

    #[test]
    fn every_wrap_draws_its_own_salt_and_nonce() {
        let k = key();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let sealed = k.seal(b"same", b"same").unwrap();
            assert!(seen.insert(sealed[MAGIC.len()..MAGIC.len() + SALT_LEN + NONCE_LEN].to_vec()));
        }
        assert!(SealingKey::new(&[0u8; 31]).is_none());
        assert_eq!(format!("{k:?}"), "SealingKey(<redacted>)");
    }
}
