//! What one key of each provider can wrap before its security margin is
//! spent, and who could forge a wrap it accepts: the figures behind which
//! keys may wrap a `direct` tenant's DEKs (one wrap per DEK, without bound)
//! and which protect tenant keys only (a few wraps per rotation period).
//!
//! The margin is NIST SP 800-38D's for AES-GCM with random 96-bit nonces:
//! at most 2^32 wraps under one key, so that the chance of a repeated nonce
//! (which leaks the authentication key) stays below 2^-32.

use super::ProviderKind;

/// Wraps under one key before its margin is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Every wrap is under a key of its own (derived or freshly drawn):
    /// no nonce is ever reused at any volume keybroker can reach (2^40 wraps
    /// and more, `crate::seal`'s tests).
    PerWrapKey,
    /// Random 96-bit nonces under one key for the key's whole life.
    NoncesPerKey(u64),
    /// Random 96-bit nonces under one key *version*: the customer's
    /// rotation starts a fresh budget.
    NoncesPerVersion(u64),
}

/// Who can make a wrap the key accepts as genuine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgery {
    /// Only a holder of the secret key (the provider, or keybroker for its
    /// own keys).
    SecretKeyOnly,
    /// Anyone with the public key (an RSA key's wrap of a key of their
    /// choosing).
    PublicKey,
}

/// One provider's wrap, as keybroker uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrapBudget {
    pub budget: Budget,
    pub forgery: Forgery,
    /// Why, for the docs and for refusals.
    pub why: &'static str,
}

/// AES-GCM with random 96-bit nonces under one key (NIST SP 800-38D 8.3):
/// with n wraps the chance of a repeated nonce is about n^2 / 2^97, 2^-33 at
/// n = 2^32; 2^40 wraps (a direct tenant's year at 35,000 wraps/s) would
/// make it 2^-17, and 2^32 take 16 hours at 75,000 wraps/s.
pub const GCM_RANDOM_NONCES: u64 = 1 << 32;

/// The wrap of `kind`'s keys. `rsa`: an Azure RSA key (its wraps are
/// RSA-OAEP of a per-wrap key, which anyone with the public key can make).
pub fn wrap_budget(kind: ProviderKind, rsa: bool) -> WrapBudget {
    match kind {
        ProviderKind::Local => WrapBudget {
            budget: Budget::PerWrapKey,
            forgery: Forgery::SecretKeyOnly,
            why: "AES-256-GCM under a key derived per wrap (HKDF-SHA256, 256-bit salt)",
        },
        ProviderKind::AwsKms => WrapBudget {
            budget: Budget::PerWrapKey,
            forgery: Forgery::SecretKeyOnly,
            why: "AWS KMS derives a data-encryption key per Encrypt call (AWS KMS cryptographic details: HKDF per request)",
        },
        ProviderKind::GcpKms => WrapBudget {
            budget: Budget::PerWrapKey,
            forgery: Forgery::SecretKeyOnly,
            why: "Cloud KMS symmetric keys are used only through Encrypt, which publishes no per-key limit; keybroker adds none",
        },
        ProviderKind::VaultTransit => WrapBudget {
            budget: Budget::NoncesPerVersion(GCM_RANDOM_NONCES),
            forgery: Forgery::SecretKeyOnly,
            why: "Transit aes256-gcm96 seals under the key version itself with a random 96-bit nonce: 2^32 encryptions per version, so a direct tenant's Transit key needs auto_rotate_period",
        },
        ProviderKind::Pkcs11 => WrapBudget {
            budget: Budget::NoncesPerKey(GCM_RANDOM_NONCES),
            forgery: Forgery::SecretKeyOnly,
            why: "each wrap is AES-GCM under the one HSM key with a random 96-bit IV, 2^32 wraps for the key's life",
        },
        ProviderKind::AzureKeyVault if rsa => WrapBudget {
            budget: Budget::PerWrapKey,
            forgery: Forgery::PublicKey,
            why: "a fresh 256-bit key per wrap, RSA-OAEP-256 wrapped: anyone holding the public key can make a wrap it opens",
        },
        ProviderKind::AzureKeyVault => WrapBudget {
            budget: Budget::PerWrapKey,
            forgery: Forgery::SecretKeyOnly,
            why: "a fresh 256-bit key per wrap, A256KW wrapped by the Managed HSM key",
        },
    }
}

impl WrapBudget {
    /// Whether the key may wrap a `direct` tenant's DEKs: one wrap per DEK,
    /// without bound, so a budget for the key's whole life would be spent
    /// (2^32 wraps take 16 hours at 75,000 wraps/s), and a forgeable wrap
    /// would vouch for a DEK of anyone's choosing. A budget per version is
    /// the customer's to renew by rotating (documented, not refused).
    pub fn serves_direct_tenants(&self) -> bool {
        self.forgery == Forgery::SecretKeyOnly && !matches!(self.budget, Budget::NoncesPerKey(_))
    }
}

/// Why a linked key may not wrap a `direct` tenant's DEKs, or `None`.
/// `sample`: a wrap the key made (its canary's ciphertext), which tells a
/// Key Vault RSA key from an AES one.
pub fn direct_refusal(kind: ProviderKind, sample: Option<&[u8]>) -> Option<&'static str> {
    let rsa =
        kind == ProviderKind::AzureKeyVault && sample.is_some_and(super::azure::wraps_with_rsa);
    let budget = wrap_budget(kind, rsa);
    (!budget.serves_direct_tenants()).then_some(budget.why)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys linked before LinkKey refused them for direct tenants wrap no
    /// new DEK of one: PKCS#11 keys (a nonce budget for the key's life)
    /// and Key Vault RSA keys (a wrap anyone with the public key can make),
    /// told apart by a wrap they made (keybroker's Azure layout: format 1,
    /// then the algorithm, 1 RSA-OAEP-256 or 2 A256KW).
    #[test]
    fn keys_that_cannot_wrap_directly_are_known_from_their_link() {
        use ProviderKind::*;
        let (rsa, aes): (&[u8], &[u8]) = (&[1, 1, 0, 32], &[1, 2, 0, 32]);
        let table = [
            (Pkcs11, None, true),
            (AzureKeyVault, Some(rsa), true),
            (AzureKeyVault, Some(aes), false),
            (AzureKeyVault, None, false),
            (AwsKms, None, false),
            (GcpKms, None, false),
            (VaultTransit, None, false),
            (Local, None, false),
        ];
        for (kind, sample, refused) in table {
            let why = direct_refusal(kind, sample);
            assert_eq!(why.is_some(), refused, "{kind}: {why:?}");
        }
        assert!(direct_refusal(Pkcs11, None).unwrap().contains("2^32"));
        assert!(
            direct_refusal(AzureKeyVault, Some(rsa))
                .unwrap()
                .contains("public key")
        );
    }

    /// Every provider's wrap, its budget and who could forge one, and so
    /// whether LinkKey lets it wrap a direct tenant's DEKs.
    #[test]
    fn every_providers_wrap_states_its_budget() {
        use Budget::*;
        use Forgery::*;
        use ProviderKind::*;
        let table = [
            (Local, false, PerWrapKey, SecretKeyOnly, true),
            (AwsKms, false, PerWrapKey, SecretKeyOnly, true),
            (GcpKms, false, PerWrapKey, SecretKeyOnly, true),
            (
                VaultTransit,
                false,
                NoncesPerVersion(1 << 32),
                SecretKeyOnly,
                true,
            ),
            (Pkcs11, false, NoncesPerKey(1 << 32), SecretKeyOnly, false),
            (AzureKeyVault, true, PerWrapKey, PublicKey, false),
            (AzureKeyVault, false, PerWrapKey, SecretKeyOnly, true),
        ];
        for (kind, rsa, budget, forgery, direct) in table {
            let got = wrap_budget(kind, rsa);
            assert_eq!(
                (got.budget, got.forgery, got.serves_direct_tenants()),
                (budget, forgery, direct),
                "{kind} (rsa: {rsa}): {}",
                got.why
            );
            assert!(!got.why.is_empty());
        }
    }
}
