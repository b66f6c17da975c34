//! Input checks of the control plane: names, descriptions, key material and
//! the fields of a key to link. Provider identifiers are parsed by their
//! provider's own types (`KeyArn`, `RoleArn`, `GcpKeyName`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use secrecy::ExposeSecret as _;

use super::{AdminError, LinkRequest};
use crate::context;
use crate::keys::PLATFORM_BINDING;
use crate::kms::ProviderKind;
use crate::kms::aws::arn::is_region;
use crate::kms::aws::{KeyArn, RoleArn};
use crate::kms::gcp::GcpKeyName;
use crate::kms::gcp::name::check_service_account;
use crate::secret::SecretBytes;

const MAX_NAME_LEN: usize = 64;
const MAX_DESCRIPTION_LEN: usize = 1024;

pub(super) fn validate_tenant(tenant_id: &str) -> Result<(), AdminError> {
    context::validate_tenant_id(tenant_id).map_err(|e| AdminError::InvalidArgument(e.to_string()))
}

/// A name for a new key binding, checked once where the request enters:
/// LinkKey, ImportKeyMaterial and GetImportParameters take this. (Calls
/// that look a binding up take any text: a name that was never valid is
/// simply not found.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingName(String);

impl BindingName {
    pub fn parse(name: String) -> Result<Self, AdminError> {
        validate_name(&name)?;
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for BindingName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for BindingName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn validate_name(name: &str) -> Result<(), AdminError> {
    let bad = |why: &str| {
        Err(AdminError::InvalidArgument(format!(
            "invalid key name {name:?}: {why}"
        )))
    };
    if name.is_empty() {
        return bad("a name is required");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("at most 64 characters");
    }
    if name == PLATFORM_BINDING {
        return bad("`platform` is reserved for the platform key");
    }
    let mut chars = name.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        || !chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return bad("use ASCII letters, digits and ._- , starting with a letter or digit");
    }
    Ok(())
}

pub(super) fn validate_description(text: &str) -> Result<(), AdminError> {
    if text.len() > MAX_DESCRIPTION_LEN || text.chars().any(char::is_control) {
        return Err(AdminError::InvalidArgument(format!(
            "descriptions and reasons are at most {MAX_DESCRIPTION_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

/// Exactly 32 bytes in canonical standard base64.
pub fn decode_key_material(text: &str) -> Result<SecretBytes, AdminError> {
    let bytes = B64.decode(text.as_bytes()).map_err(|_| {
        AdminError::InvalidArgument(
            "key_material_base64 is not canonical standard base64 (A-Z a-z 0-9 + /, = padding, no whitespace)".into(),
        )
    })?;
    check_key_material(SecretBytes::new(bytes))
}

/// Exactly 32 bytes, not all zero: raw material, or unwrapped from an
/// import.
pub(super) fn check_key_material(material: SecretBytes) -> Result<SecretBytes, AdminError> {
    if material.len() != 32 {
        return Err(AdminError::InvalidArgument(format!(
            "key material must be exactly 32 bytes (AES-256), got {}",
            material.len()
        )));
    }
    // Not a key anyone chose: a zeroed buffer exported by mistake.
    if material.expose().iter().all(|b| *b == 0) {
        return Err(AdminError::InvalidArgument(
            "key material is all zero bytes; export the real key (32 random bytes)".into(),
        ));
    }
    Ok(material)
}

/// Replica regions must be regions other than the key's, and the key must be
/// named by key ARN (aliases are per region). Whether a replica really exists
/// is proved at link time by a decrypt in each replica region.
fn check_replica_regions(key_arn: &KeyArn, replicas: &[String]) -> Result<(), AdminError> {
    let region = key_arn.region();
    if replicas.is_empty() {
        return Ok(());
    }
    if !key_arn.is_key() {
        return Err(AdminError::InvalidArgument(
            "replica_regions need a key ARN (key/mrk-...), not an alias: aliases are per region"
                .into(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for r in replicas {
        if !is_region(r) || r == region || !seen.insert(r) {
            return Err(AdminError::InvalidArgument(format!(
                "replica region {r:?} is not a region other than the key's ({region}), or is listed twice"
            )));
        }
    }
    Ok(())
}

/// An AppRole's mount is a path of plain segments; role and secret ids are
/// Vault's (UUIDs by default; any printable ASCII is accepted, at most 256).
fn check_approle(approle: &super::VaultAppRole) -> Result<(), AdminError> {
    check_mount("vault_approle.mount", &approle.mount)?;
    if !plain(&approle.role_id) || !plain(approle.secret_id.expose_secret()) {
        return Err(AdminError::InvalidArgument(
            "vault_approle.role_id and secret_id are required: printable ASCII, at most 256 characters".into(),
        ));
    }
    Ok(())
}

/// Vault's role and secret ids: any printable ASCII, at most 256.
fn plain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic())
}

/// An auth mount is a path of plain segments (empty: the default); `.`
/// and `..` would move the login URL to another path of the Vault.
fn check_mount(field: &str, mount: &str) -> Result<(), AdminError> {
    let ok = mount.is_empty()
        || mount.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    if ok {
        Ok(())
    } else {
        Err(AdminError::InvalidArgument(format!(
            "{field} {} is not an auth mount path",
            crate::text::Quoted(mount)
        )))
    }
}

/// Checks every field of a cloud key to link; the typed identifiers are
/// what the provider will be called with.
pub(super) fn check_link(req: &LinkRequest) -> Result<ProviderKind, AdminError> {
    validate_description(&req.description)?;
    if !req.azure_tenant_id.is_empty() && req.provider != Some(ProviderKind::AzureKeyVault) {
        return Err(AdminError::InvalidArgument(
            "azure_tenant_id is only for PROVIDER_AZURE_KEY_VAULT keys".into(),
        ));
    }
    if (req.vault.is_some() || req.vault_jwt.is_some())
        && req.provider != Some(ProviderKind::VaultTransit)
    {
        return Err(AdminError::InvalidArgument(
            "vault_approle and vault_jwt are only for PROVIDER_VAULT_TRANSIT keys".into(),
        ));
    }
    match req.provider {
        Some(ProviderKind::AwsKms) => {
            let key_arn = KeyArn::parse(&req.key_reference)?;
            RoleArn::parse(&req.role_arn)?;
            if req.region.is_empty() {
                return Err(AdminError::InvalidArgument(
                    "region is required for AWS keys".into(),
                ));
            }
            if req.region != key_arn.region() {
                return Err(AdminError::InvalidArgument(format!(
                    "region {:?} does not match the key ARN's region {:?}",
                    req.region,
                    key_arn.region()
                )));
            }
            check_replica_regions(&key_arn, &req.replica_regions)?;
            Ok(ProviderKind::AwsKms)
        }
        Some(ProviderKind::GcpKms) => {
            GcpKeyName::parse(&req.key_reference)?;
            if !req.service_account.is_empty() {
                check_service_account(&req.service_account)?;
            }
            Ok(ProviderKind::GcpKms)
        }
        Some(ProviderKind::VaultTransit) => {
            crate::kms::vault::VaultKeyRef::parse(&req.key_reference)?;
            if !(req.region.is_empty()
                && req.role_arn.is_empty()
                && req.service_account.is_empty()
                && req.replica_regions.is_empty())
            {
                return Err(AdminError::InvalidArgument(
                    "a Vault key takes key_reference and vault_approle or vault_jwt only (no region, role_arn, service_account or replica_regions)".into(),
                ));
            }
            match (&req.vault, &req.vault_jwt) {
                (Some(approle), None) => check_approle(approle)?,
                (None, Some(jwt)) => {
                    check_mount("vault_jwt.mount", &jwt.mount)?;
                    if !plain(&jwt.role) {
                        return Err(AdminError::InvalidArgument(
                            "vault_jwt.role is required: printable ASCII, at most 256 characters"
                                .into(),
                        ));
                    }
                }
                _ => {
                    return Err(AdminError::InvalidArgument(
                        "a Vault key needs exactly one login: vault_approle (role_id and secret_id of the AppRole the customer made for keybroker) or vault_jwt (a jwt auth role trusting the platform's identity token)".into(),
                    ));
                }
            }
            Ok(ProviderKind::VaultTransit)
        }
        Some(ProviderKind::Pkcs11) => {
            crate::kms::pkcs11::Pkcs11KeyRef::parse(&req.key_reference)?;
            if !(req.region.is_empty()
                && req.role_arn.is_empty()
                && req.service_account.is_empty()
                && req.replica_regions.is_empty())
            {
                return Err(AdminError::InvalidArgument(
                    "a PKCS#11 key takes key_reference only (the module and PIN are the server's)"
                        .into(),
                ));
            }
            Ok(ProviderKind::Pkcs11)
        }
        Some(ProviderKind::AzureKeyVault) => {
            // The reference's host is checked against the server's
            // azure_vault_domains when the provider is built.
            if !(req.region.is_empty()
                && req.role_arn.is_empty()
                && req.service_account.is_empty()
                && req.replica_regions.is_empty())
            {
                return Err(AdminError::InvalidArgument(
                    "an Azure key takes key_reference and azure_tenant_id only (no region, role_arn, service_account or replica_regions)".into(),
                ));
            }
            crate::kms::azure::validate_tenant_id(&req.azure_tenant_id)?;
            Ok(ProviderKind::AzureKeyVault)
        }
        Some(ProviderKind::Local) => Err(AdminError::InvalidArgument(
            "local keys are linked with ImportKeyMaterial".into(),
        )),
        None => Err(AdminError::InvalidArgument(
            "provider is required: PROVIDER_AWS_KMS, PROVIDER_GCP_KMS, PROVIDER_VAULT_TRANSIT, PROVIDER_PKCS11 or PROVIDER_AZURE_KEY_VAULT".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Vault key logs in exactly one way: AppRole or jwt.
    #[test]
    fn vault_keys_take_exactly_one_login() {
        let approle = super::super::VaultAppRole {
            mount: String::new(),
            role_id: "r".into(),
            secret_id: "s".into(),
        };
        let jwt = super::super::VaultJwtRole {
            mount: "jwt".into(),
            role: "keybroker".into(),
        };
        let link = |vault, vault_jwt| LinkRequest {
            provider: Some(ProviderKind::VaultTransit),
            key_reference: "https://vault.example.com/v1/transit/keys/k".into(),
            vault,
            vault_jwt,
            ..request("v")
        };
        assert!(check_link(&link(Some(approle.clone()), None)).is_ok());
        assert!(check_link(&link(None, Some(jwt.clone()))).is_ok());
        assert!(check_link(&link(Some(approle), Some(jwt.clone()))).is_err());
        assert!(check_link(&link(None, None)).is_err());
        let bad_mount = super::super::VaultJwtRole {
            mount: "../sys".into(),
            ..jwt.clone()
        };
        assert!(check_link(&link(None, Some(bad_mount))).is_err());
        let mut dotted = super::super::VaultAppRole {
            mount: "auth/./x".into(),
            role_id: "r".into(),
            secret_id: "s".into(),
        };
        assert!(check_link(&link(Some(dotted.clone()), None)).is_err());
        dotted.mount = "team.a/approle".into();
        assert!(check_link(&link(Some(dotted), None)).is_ok());
        let no_role = super::super::VaultJwtRole {
            role: String::new(),
            ..jwt
        };
        assert!(check_link(&link(None, Some(no_role))).is_err());
    }

    fn request(name: &str) -> LinkRequest {
        LinkRequest::new(
            context::TenantId::parse("acme".into()).unwrap(),
            BindingName::parse(name.into()).unwrap(),
        )
    }

    fn aws_link(key: &str, region: &str, replicas: &[&str]) -> LinkRequest {
        LinkRequest {
            provider: Some(ProviderKind::AwsKms),
            key_reference: key.into(),
            region: region.into(),
            role_arn: "arn:aws:iam::111122223333:role/keybroker-access".into(),
            replica_regions: replicas.iter().map(|r| (*r).to_owned()).collect(),
            ..request("k")
        }
    }

    #[test]
    fn links_are_checked_field_by_field() {
        let mrk = "arn:aws:kms:us-east-1:111122223333:key/mrk-1234";
        assert_eq!(
            check_link(&aws_link(mrk, "us-east-1", &["eu-west-1"])).unwrap(),
            ProviderKind::AwsKms
        );
        for (req, says) in [
            (aws_link(mrk, "eu-west-1", &[]), "does not match"),
            (aws_link(mrk, "", &[]), "region is required"),
            (
                aws_link("key/x", "us-east-1", &[]),
                "invalid AWS KMS key ARN",
            ),
            (aws_link(mrk, "us-east-1", &["us-east-1"]), "replica region"),
            (
                aws_link(mrk, "us-east-1", &["eu-west-1", "eu-west-1"]),
                "listed twice",
            ),
            (
                aws_link(
                    "arn:aws:kms:us-east-1:111122223333:alias/prod",
                    "us-east-1",
                    &["eu-west-1"],
                ),
                "not an alias",
            ),
            (
                LinkRequest {
                    role_arn: "arn:aws:iam::111122223333:user/bob".into(),
                    ..aws_link(mrk, "us-east-1", &[])
                },
                "invalid IAM role ARN",
            ),
            (
                LinkRequest {
                    provider: Some(ProviderKind::GcpKms),
                    key_reference: "projects/p".into(),
                    ..request("k")
                },
                "invalid Cloud KMS key name",
            ),
            (request("k"), "provider is required"),
        ] {
            let err = check_link(&req).unwrap_err();
            assert!(matches!(err, AdminError::InvalidArgument(_)), "{err}");
            assert!(err.to_string().contains(says), "{says}: {err}");
        }
    }

    #[test]
    fn names() {
        for ok in ["k1", "prod-2026.a_b", "A"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "platform", "-x", "a b", "ä", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_material() {
        let ok = B64.encode([7u8; 32]);
        assert_eq!(decode_key_material(&ok).unwrap().len(), 32);
        for bad in [
            B64.encode([7u8; 31]),
            B64.encode([7u8; 33]),
            format!("{ok}\n"),
            ok.replace('=', ""),
            "not base64!".into(),
        ] {
            assert!(decode_key_material(&bad).is_err(), "{bad:?}");
        }
    }
}
