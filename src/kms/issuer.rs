//! keybroker as an OpenID Connect issuer for customers' Vaults (DESIGN.md
//! section 5, "Trust boundary").
//!
//! A Vault jwt login used to send one platform token to whichever Vault a
//! LinkKey named: a customer pointing a binding at a server of their own
//! collected it, and logged in as keybroker to every other customer's jwt
//! role. Now every login carries a token minted for it alone: `aud` is the
//! Vault being logged in to, `sub` is the tenant, and it is valid for a
//! couple of minutes. A token a customer's server receives opens nothing
//! but that customer's own role, and only until it expires.
//!
//! The ES256 signing keys are derived from the platform keyring's
//! versions (HKDF under a label of their own), so replicas sharing the
//! keyring sign alike, the keys are as protected as the keyring (sealed by
//! the HSM when one is configured), and a keyring rotation rotates them with
//! overlap: the JWKS lists one key per keyring version, the newest signs.
//! Nothing new to store, back up or distribute.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use zeroize::Zeroizing;

use super::ProviderError;
use super::local::LocalKeyring;

/// What the signing keys are derived under: a label of their own keeps
/// them independent of every other use of the keyring.
const LABEL: &[u8] = b"keybroker oidc ES256 signing key v1";

/// The order of the P-256 group: a scalar must be in 1..N.
const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// The subject keybroker claims when logging in for `tenant_id`: what the
/// customer's role binds (`bound_subject`).
pub fn subject(tenant_id: &str) -> String {
    format!("keybroker:tenant:{tenant_id}")
}

/// The `oidc_*` settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct IssuerSettings {
    /// The issuer (`iss`) of the tokens keybroker mints for customers'
    /// Vault jwt logins, e.g. https://keybroker-oidc.platform.example; its
    /// discovery document and JWKS are served on the metrics listener
    /// (`/.well-known/openid-configuration`, `/.well-known/jwks.json`), and
    /// `keybroker oidc keys` prints them. Required to link Vault keys with
    /// the jwt auth method.
    #[arg(
        id = "oidc_issuer",
        long = "oidc-issuer",
        env = "KEYBROKER_OIDC_ISSUER"
    )]
    pub issuer: Option<String>,
    /// How long a minted login token is valid: its one use is the login
    /// that follows at once, so a replayed one is soon worthless.
    #[arg(id = "oidc_token_lifetime", long = "oidc-token-lifetime", env = "KEYBROKER_OIDC_TOKEN_LIFETIME", value_parser = humantime::parse_duration, default_value = "2m")]
    pub token_lifetime: Duration,
}

impl Default for IssuerSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl IssuerSettings {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        use crate::settings::invalid;
        if self.token_lifetime < Duration::from_secs(1)
            || self.token_lifetime > Duration::from_secs(3600)
        {
            return invalid("oidc_token_lifetime", "must be 1s to 1h");
        }
        if let Some(issuer) = &self.issuer
            && let Err(why) = check_issuer(issuer)
        {
            return invalid("oidc_issuer", &why);
        }
        Ok(())
    }
}

/// An issuer is an https URL without query, fragment or trailing slash
/// (plain http on loopback only, for tests): Vault compares it byte for
/// byte with the token's `iss` and the discovery document's.
fn check_issuer(issuer: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(issuer).map_err(|e| format!("{issuer:?} is not a URL: {e}"))?;
    let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"))
        || url.host_str().is_some_and(|h| h.starts_with("127."));
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => return Err(format!("{issuer:?} must be an https URL")),
    }
    if url.query().is_some() || url.fragment().is_some() || issuer.ends_with('/') {
        return Err(format!(
            "{issuer:?} must have no query, fragment or trailing slash"
        ));
    }
    Ok(())
}

/// One signing key: a keyring version's.
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Jwk,
    public_der: Vec<u8>,
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: String,
}

/// Mints login tokens and publishes their keys.
pub struct Issuer {
    issuer: String,
    lifetime: Duration,
    keyring: Arc<LocalKeyring>,
    /// Tokens minted (tests and metrics count them).
    pub minted: AtomicU64,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.issuer)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// The issuer the settings name, signing with `keyring`'s keys; `None`
    /// when no issuer is configured.
    pub fn from_settings(settings: &IssuerSettings, keyring: Arc<LocalKeyring>) -> Option<Self> {
        Some(Self {
            issuer: settings.issuer.clone()?,
            lifetime: settings.token_lifetime,
            keyring,
            minted: AtomicU64::new(0),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Where the keys are published, as the discovery document says.
    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.issuer)
    }

    /// Every version's key, oldest first.
    fn keys(&self) -> Result<Vec<SigningKey>, ProviderError> {
        self.keyring
            .derived_keys(LABEL)
            .into_iter()
            .map(|(_, seed)| signing_key(&seed))
            .collect()
    }

    /// A token for one login to the Vault at `audience` as `subject`,
    /// signed by the newest key.
    pub fn mint(&self, audience: &str, subject: &str) -> Result<Zeroizing<String>, ProviderError> {
        let keys = self.keys()?;
        let key = keys.last().ok_or_else(|| {
            ProviderError::Internal("the platform keyring has no versions".into())
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| ProviderError::Internal("the clock is before 1970".into()))?
            .as_secs();
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti)
            .map_err(|_| ProviderError::Internal("the system random generator failed".into()))?;
        let claims = Claims {
            iss: &self.issuer,
            sub: subject,
            aud: audience,
            iat: now,
            nbf: now.saturating_sub(5),
            exp: now + self.lifetime.as_secs().max(1),
            jti: hex::encode(jti),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding)
            .map_err(|e| ProviderError::Internal(format!("cannot sign a login token: {e}")))?;
        self.minted.fetch_add(1, Ordering::Relaxed);
        Ok(Zeroizing::new(token))
    }

    /// The public keys as a JWK Set (what `jwks_url` serves).
    pub fn jwks(&self) -> Result<JwkSet, ProviderError> {
        Ok(JwkSet {
            keys: self.keys()?.into_iter().map(|k| k.jwk).collect(),
        })
    }

    /// The public keys as PEM (what `jwt_validation_pubkeys` takes).
    pub fn public_pems(&self) -> Result<Vec<String>, ProviderError> {
        Ok(self
            .keys()?
            .iter()
            .map(|k| {
                let b64 = base64::engine::general_purpose::STANDARD.encode(&k.public_der);
                let lines: Vec<&str> = b64
                    .as_bytes()
                    .chunks(64)
                    .filter_map(|c| std::str::from_utf8(c).ok())
                    .collect();
                format!(
                    "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                    lines.join("\n")
                )
            })
            .collect())
    }

    /// The OpenID discovery document (what `oidc_discovery_url` reads).
    pub fn discovery(&self) -> serde_json::Value {
        serde_json::json!({
            "issuer": self.issuer,
            "jwks_uri": self.jwks_url(),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    }

    /// The discovery document and the JWKS, for the metrics listener.
    pub fn routes(self: &Arc<Self>) -> axum::Router {
        use axum::http::{StatusCode, header};
        let json = |value: Result<serde_json::Value, ProviderError>| match value {
            Ok(v) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                v.to_string(),
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot publish the token signing keys");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain")],
                    "the signing keys are unavailable".to_owned(),
                )
            }
        };
        let discovery = Arc::clone(self);
        let jwks = Arc::clone(self);
        axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || {
                    let discovery = Arc::clone(&discovery);
                    async move { json(Ok(discovery.discovery())) }
                }),
            )
            .route(
                "/.well-known/jwks.json",
                axum::routing::get(move || {
                    let jwks = Arc::clone(&jwks);
                    async move {
                        json(jwks.jwks().and_then(|set| {
                            serde_json::to_value(set)
                                .map_err(|e| ProviderError::Internal(e.to_string()))
                        }))
                    }
                }),
            )
    }
}

/// The ES256 key of one keyring version: its derived seed as a P-256
/// scalar (re-hashed in the ~2^-32 case it is not below the group order).
fn signing_key(seed: &[u8; 32]) -> Result<SigningKey, ProviderError> {
    let mut scalar = Zeroizing::new(*seed);
    while scalar.iter().all(|b| *b == 0) || scalar.as_slice() >= P256_ORDER.as_slice() {
        let next = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, scalar.as_slice());
        scalar.copy_from_slice(next.as_ref());
    }
    // RFC 5915 ECPrivateKey { version 1, privateKey, [0] prime256v1 }.
    let mut der = Zeroizing::new(Vec::with_capacity(51));
    der.extend_from_slice(&[0x30, 0x31, 0x02, 0x01, 0x01, 0x04, 0x20]);
    der.extend_from_slice(scalar.as_slice());
    der.extend_from_slice(&[
        0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ]);
    let internal = |what: &str| ProviderError::Internal(format!("token signing key: {what}"));
    let pair = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
        .map_err(|_| internal("not a P-256 key"))?;
    let pkcs8 = pair.to_pkcs8v1().map_err(|_| internal("cannot encode"))?;
    let pkcs8 = Zeroizing::new(pkcs8.as_ref().to_vec());
    let encoding = EncodingKey::from_ec_der(&pkcs8);
    let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256)
        .map_err(|e| internal(&e.to_string()))?;
    let kid = jwk
        .thumbprint(ThumbprintHash::SHA256)
        .map_err(|e| internal(&e.to_string()))?;
    jwk.common.key_id = Some(kid.clone());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    let public_der = pair
        .public_key()
        .as_der()
        .map_err(|_| internal("cannot encode the public key"))?
        .as_ref()
        .to_vec();
    Ok(SigningKey {
        kid,
        encoding,
        jwk,
        public_der,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers_are_https_urls_without_trailing_slash() {
        for ok in [
            "https://keybroker-oidc.platform.example",
            "https://a.example/oidc",
            "http://127.0.0.1:9090",
        ] {
            assert!(check_issuer(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://a.example",
            "https://a.example/",
            "https://a.example?x=1",
            "not a url",
        ] {
            assert!(check_issuer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_seed_makes_one_key_and_every_seed_a_valid_one() {
        let a = signing_key(&[7u8; 32]).unwrap();
        let b = signing_key(&[7u8; 32]).unwrap();
        assert_eq!(a.kid, b.kid, "replicas sharing a keyring sign alike");
        assert_ne!(a.kid, signing_key(&[8u8; 32]).unwrap().kid);
        // Out of range: re-hashed into a valid scalar, not refused.
        signing_key(&[0xff; 32]).unwrap();
        signing_key(&[0u8; 32]).unwrap();
    }

    /// A keyring rotation rotates the signing key with overlap: every
    /// version's key is published, the newest signs.
    #[test]
    fn the_newest_keyring_version_signs_and_every_one_is_published() {
        use crate::secret::SecretBytes;
        let one = vec![SecretBytes::new(vec![1u8; 32])];
        let two = vec![
            SecretBytes::new(vec![1u8; 32]),
            SecretBytes::new(vec![2u8; 32]),
        ];
        let issuer = |material: &[SecretBytes]| {
            Issuer::from_settings(
                &IssuerSettings {
                    issuer: Some("https://kb.example".into()),
                    token_lifetime: Duration::from_secs(60),
                },
                Arc::new(LocalKeyring::from_material("platform", material).unwrap()),
            )
            .unwrap()
        };
        let (before, after) = (issuer(&one), issuer(&two));
        let kid = |set: &JwkSet, i: usize| set.keys[i].common.key_id.clone().unwrap();
        let (old, new) = (before.jwks().unwrap(), after.jwks().unwrap());
        assert_eq!(new.keys.len(), 2);
        assert_eq!(kid(&old, 0), kid(&new, 0), "the old key stays published");
        let token = after
            .mint("https://vault.example:8200", "keybroker:tenant:a")
            .unwrap();
        let header = jsonwebtoken::decode_header(token.as_str()).unwrap();
        assert_eq!(header.kid.unwrap(), kid(&new, 1));
        assert_eq!(header.alg, Algorithm::ES256);
    }
}
