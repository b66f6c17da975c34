//! Wrapped key import (BYOK): key material encrypted to a one-time RSA
//! public key before it leaves the customer, so nothing between them and
//! keybroker (an API gateway, a support tool, a log) ever sees it. The two
//! wrappings AWS KMS and Cloud KMS offer, with the same bytes on the wire:
//!
//! - `RSAES_OAEP_SHA_256`: the material, RSA-OAEP encrypted (SHA-256, MGF1
//!   with SHA-256, no label).
//! - `RSA_AES_KEY_WRAP_SHA_256` (PKCS#11 `CKM_RSA_AES_KEY_WRAP`): an
//!   ephemeral AES-256 key RSA-OAEP encrypted as above, followed by the
//!   material wrapped under it with AES key wrap with padding (RFC 5649).
//!
//! The private key is generated here, kept sealed (see
//! `control::import_wrap`) and used once. Built on aws-lc-rs; the
//! `openssl` commands in docs/keys.md produce the same bytes.

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrapPadded as _};
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, OaepPublicEncryptingKey,
    PrivateDecryptingKey, PublicEncryptingKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::secret::SecretBytes;

/// How material is wrapped to the public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumString)]
pub enum Wrapping {
    #[strum(serialize = "RSAES_OAEP_SHA_256")]
    RsaesOaepSha256,
    #[strum(serialize = "RSA_AES_KEY_WRAP_SHA_256")]
    RsaAesKeyWrapSha256,
}

impl Wrapping {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why wrapped material was refused; each says what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WrapError {
    #[error(
        "the wrapped material does not decrypt with this import token's key under {0}: wrap it to the public key returned with the token, with that algorithm (RSA-OAEP with SHA-256 and MGF1-SHA-256, no label)"
    )]
    Undecryptable(&'static str),
    #[error(
        "the wrapped material is {got} bytes; {algorithm} with an RSA-{bits} key makes {expected}: {hint}"
    )]
    Length {
        algorithm: &'static str,
        bits: usize,
        got: usize,
        expected: String,
        hint: &'static str,
    },
    #[error("the system random generator or the RSA implementation failed")]
    Internal,
}

/// A fresh RSA key pair for one import.
pub struct ImportKey {
    private: PrivateDecryptingKey,
}

impl std::fmt::Debug for ImportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImportKey(..)")
    }
}

impl ImportKey {
    pub fn generate(bits: usize) -> Result<Self, WrapError> {
        let size = match bits {
            3072 => KeySize::Rsa3072,
            4096 => KeySize::Rsa4096,
            _ => return Err(WrapError::Internal),
        };
        PrivateDecryptingKey::generate(size)
            .map(|private| Self { private })
            .map_err(|_| WrapError::Internal)
    }

    /// The private key as PKCS#8 DER, to be sealed for storage.
    pub fn to_pkcs8(&self) -> Result<SecretBytes, WrapError> {
        self.private
            .as_der()
            .map(|der| SecretBytes::new(der.as_ref().to_vec()))
            .map_err(|_| WrapError::Internal)
    }

    pub fn from_pkcs8(der: &SecretBytes) -> Result<Self, WrapError> {
        PrivateDecryptingKey::from_pkcs8(der.expose())
            .map(|private| Self { private })
            .map_err(|_| WrapError::Internal)
    }

    pub fn bits(&self) -> usize {
        self.private.key_size_bits()
    }

    /// The public key, SubjectPublicKeyInfo in PEM (what `openssl pkeyutl
    /// -pubin` reads).
    pub fn public_pem(&self) -> Result<String, WrapError> {
        let der = self
            .private
            .public_key()
            .as_der()
            .map_err(|_| WrapError::Internal)?;
        Ok(pem("PUBLIC KEY", der.as_ref()))
    }

    /// The material inside `wrapped`.
    pub fn unwrap(&self, wrapping: Wrapping, wrapped: &[u8]) -> Result<SecretBytes, WrapError> {
        let modulus = self.private.key_size_bytes();
        let oaep =
            OaepPrivateDecryptingKey::new(self.private.clone()).map_err(|_| WrapError::Internal)?;
        let mut out = zeroize::Zeroizing::new(vec![0u8; modulus]);
        let length = |expected: String, hint| WrapError::Length {
            algorithm: wrapping.as_str(),
            bits: self.bits(),
            got: wrapped.len(),
            expected,
            hint,
        };
        match wrapping {
            Wrapping::RsaesOaepSha256 => {
                if wrapped.len() != modulus {
                    return Err(length(
                        format!("{modulus}"),
                        "send the RSA ciphertext as raw bytes, not base64 or hex",
                    ));
                }
                let material = oaep
                    .decrypt(&OAEP_SHA256_MGF1SHA256, wrapped, &mut out, None)
                    .map_err(|_| WrapError::Undecryptable(wrapping.as_str()))?;
                Ok(SecretBytes::new(material.to_vec()))
            }
            Wrapping::RsaAesKeyWrapSha256 => {
                // 32 bytes of material wrap to 40 with RFC 5649.
                if wrapped.len() <= modulus + 8 {
                    return Err(length(
                        format!("{modulus} + 40 (for 32 bytes of material)"),
                        "the RSA-encrypted AES key, then the material wrapped with AES-KWP (openssl enc -id-aes256-wrap-pad)",
                    ));
                }
                let (rsa_part, kwp_part) = wrapped.split_at(modulus);
                let ephemeral = oaep
                    .decrypt(&OAEP_SHA256_MGF1SHA256, rsa_part, &mut out, None)
                    .map_err(|_| WrapError::Undecryptable(wrapping.as_str()))?;
                if ephemeral.len() != 32 {
                    return Err(WrapError::Undecryptable(wrapping.as_str()));
                }
                let kek = AesKek::new(&AES_256, ephemeral).map_err(|_| WrapError::Internal)?;
                let mut material = zeroize::Zeroizing::new(vec![0u8; kwp_part.len()]);
                let opened = kek
                    .unwrap_with_padding(kwp_part, &mut material)
                    .map_err(|_| WrapError::Undecryptable(wrapping.as_str()))?;
                Ok(SecretBytes::new(opened.to_vec()))
            }
        }
    }
}

/// Wraps `material` to a PEM public key (the CLI's side of an import).
pub fn wrap(public_pem: &str, wrapping: Wrapping, material: &[u8]) -> Result<Vec<u8>, String> {
    let der = unpem(public_pem).ok_or("the public key is not a PEM \"PUBLIC KEY\"")?;
    let public = PublicEncryptingKey::from_der(&der)
        .map_err(|e| format!("the public key is not an RSA key: {e}"))?;
    let oaep = OaepPublicEncryptingKey::new(public).map_err(|_| "not an RSA key")?;
    let encrypt = |plaintext: &[u8]| {
        let mut out = vec![0u8; oaep.ciphertext_size()];
        oaep.encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, None)
            .map(|c| c.to_vec())
            .map_err(|_| "RSA-OAEP encryption failed".to_owned())
    };
    match wrapping {
        Wrapping::RsaesOaepSha256 => encrypt(material),
        Wrapping::RsaAesKeyWrapSha256 => {
            let ephemeral = SecretBytes::random(32).map_err(|_| "no random bytes")?;
            let mut wrapped = encrypt(ephemeral.expose())?;
            let kek = AesKek::new(&AES_256, ephemeral.expose()).map_err(|_| "AES key")?;
            let mut kwp = vec![0u8; material.len() + 16];
            let kwp = kek
                .wrap_with_padding(material, &mut kwp)
                .map_err(|_| "AES key wrap failed")?;
            wrapped.extend_from_slice(kwp);
            Ok(wrapped)
        }
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = B64.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(line).unwrap_or_default());
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

fn unpem(text: &str) -> Option<Vec<u8>> {
    let body = text
        .trim()
        .strip_prefix("-----BEGIN PUBLIC KEY-----")?
        .strip_suffix("-----END PUBLIC KEY-----")?;
    let joined: String = body.split_whitespace().collect();
    B64.decode(joined).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_wrappings_round_trip_and_refuse_what_is_not_theirs() {
        let key = ImportKey::generate(3072).unwrap();
        assert_eq!(key.bits(), 3072);
        let pem = key.public_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        let material = [7u8; 32];
        for wrapping in [Wrapping::RsaesOaepSha256, Wrapping::RsaAesKeyWrapSha256] {
            let wrapped = wrap(&pem, wrapping, &material).unwrap();
            let opened = key.unwrap(wrapping, &wrapped).unwrap();
            assert_eq!(opened.expose(), &material);
            // Through a stored (PKCS#8) copy of the key too.
            let again = ImportKey::from_pkcs8(&key.to_pkcs8().unwrap()).unwrap();
            assert_eq!(
                again.unwrap(wrapping, &wrapped).unwrap().expose(),
                &material
            );
            // Another key's wrap, a flipped bit, the other algorithm.
            let other = ImportKey::generate(3072).unwrap();
            let foreign = wrap(&other.public_pem().unwrap(), wrapping, &material).unwrap();
            assert_eq!(
                key.unwrap(wrapping, &foreign).unwrap_err(),
                WrapError::Undecryptable(wrapping.as_str())
            );
            let mut flipped = wrapped.clone();
            *flipped.last_mut().unwrap() ^= 1;
            assert!(key.unwrap(wrapping, &flipped).is_err());
            let swapped = match wrapping {
                Wrapping::RsaesOaepSha256 => Wrapping::RsaAesKeyWrapSha256,
                Wrapping::RsaAesKeyWrapSha256 => Wrapping::RsaesOaepSha256,
            };
            assert!(key.unwrap(swapped, &wrapped).is_err());
        }
        let short = key.unwrap(Wrapping::RsaesOaepSha256, &[1; 10]).unwrap_err();
        assert!(short.to_string().contains("is 10 bytes"), "{short}");
    }

    #[test]
    fn names_are_the_vendors() {
        assert_eq!(Wrapping::RsaesOaepSha256.as_str(), "RSAES_OAEP_SHA_256");
        assert_eq!(
            Wrapping::RsaAesKeyWrapSha256.as_str(),
            "RSA_AES_KEY_WRAP_SHA_256"
        );
    }
}
