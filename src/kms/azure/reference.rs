//! An Azure Key Vault key reference: the key's versionless identifier,
//! `https://<vault>.vault.azure.net/keys/<name>` (or a Managed HSM's
//! `https://<hsm>.managedhsm.azure.net/keys/<name>`), validated when built.
//!
//! The host is checked against `azure_vault_domains`: keybroker sends a
//! bearer token for the customer's tenant to this host, so a reference may
//! only name a Key Vault endpoint (a caller naming any other host would
//! receive a token).

use std::fmt;

use crate::kms::InvalidIdentifier;

/// A versionless key in one vault.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AzureKeyRef {
    /// `https://host[:port]`, no trailing slash.
    pub vault_url: String,
    /// The key's name (1-127 letters, digits and dashes).
    pub name: String,
}

impl AzureKeyRef {
    /// Parses `reference`, accepting only hosts in (or under) `domains`.
    pub fn parse(reference: &str, domains: &[String]) -> Result<Self, InvalidIdentifier> {
        let bad = |why: &str| {
            InvalidIdentifier(format!(
                "{} is not an Azure Key Vault key: {why}; expected https://<vault>.vault.azure.net/keys/<key name> (versionless)",
                crate::text::Quoted(reference)
            ))
        };
        let url = reqwest::Url::parse(reference).map_err(|_| bad("not a URL"))?;
        if url.scheme() != "https" {
            return Err(bad("Key Vault is reached over https only"));
        }
        if !url.username().is_empty()
            || url.password().is_some()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(bad("no user, query or fragment"));
        }
        let host = url
            .host_str()
            .ok_or_else(|| bad("no host"))?
            .to_ascii_lowercase();
        let allowed = domains.iter().any(|domain| {
            let domain = domain.trim_start_matches('.').to_ascii_lowercase();
            host == domain || host.ends_with(&format!(".{domain}"))
        });
        if !allowed {
            return Err(bad(&format!(
                "the host is not a Key Vault endpoint (allowed: {})",
                domains.join(", ")
            )));
        }
        let segments: Vec<&str> = url.path().trim_end_matches('/').split('/').collect();
        let name = match segments.as_slice() {
            ["", "keys", name] => *name,
            ["", "keys", _, _] => {
                return Err(bad(
                    "name the key without a version: keybroker follows the key's rotation and records the version of every wrap",
                ));
            }
            _ => return Err(bad("the path must be /keys/<key name>")),
        };
        if name.is_empty()
            || name.len() > 127
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad("a key name is 1-127 letters, digits and dashes"));
        }
        let vault_url = match url.port() {
            Some(port) => format!("https://{host}:{port}"),
            None => format!("https://{host}"),
        };
        Ok(Self {
            vault_url,
            name: name.to_owned(),
        })
    }

    /// The vault's short name (the first label of its host), for messages
    /// and `az` commands.
    pub fn vault_name(&self) -> &str {
        let host = self.vault_url.trim_start_matches("https://");
        host.split(['.', ':']).next().unwrap_or(host)
    }

    /// The `az` command that sets a tag on this key (a Managed HSM is named
    /// with `--hsm-name`, a vault with `--vault-name`).
    pub fn tag_command(&self, tag: &str, value: &str) -> String {
        let flag = if self.vault_url.contains(".managedhsm.") {
            "hsm-name"
        } else {
            "vault-name"
        };
        format!(
            "az keyvault key set-attributes --{flag} {} --name {} --tags {tag}={value}",
            self.vault_name(),
            self.name
        )
    }
}

impl fmt::Display for AzureKeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/keys/{}", self.vault_url, self.name)
    }
}

/// An Entra tenant id: a GUID (the customer's directory), checked so it
/// can go into a token URL.
pub fn validate_tenant_id(tenant: &str) -> Result<(), InvalidIdentifier> {
    let groups: Vec<&str> = tenant.split('-').collect();
    let shape = [8, 4, 4, 4, 12];
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip(shape)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(InvalidIdentifier(format!(
            "{} is not an Entra tenant id: expected the customer's directory (tenant) id, a GUID such as 72f988bf-86f1-41af-91ab-2d7cd011db47",
            crate::text::Quoted(tenant)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains() -> Vec<String> {
        vec!["vault.azure.net".into(), "managedhsm.azure.net".into()]
    }

    #[test]
    fn references_parse() {
        let key =
            AzureKeyRef::parse("https://contoso.vault.azure.net/keys/cmek-1", &domains()).unwrap();
        assert_eq!(key.vault_url, "https://contoso.vault.azure.net");
        assert_eq!(key.name, "cmek-1");
        assert_eq!(key.vault_name(), "contoso");
        assert_eq!(
            key.to_string(),
            "https://contoso.vault.azure.net/keys/cmek-1"
        );
        let hsm =
            AzureKeyRef::parse("https://HSM1.managedhsm.azure.net/keys/k/", &domains()).unwrap();
        assert_eq!(hsm.vault_url, "https://hsm1.managedhsm.azure.net");

        for bad in [
            "http://contoso.vault.azure.net/keys/k",
            "https://evil.example.com/keys/k",
            "https://vault.azure.net.evil.com/keys/k",
            "https://contoso.vault.azure.net/keys/k/0123456789abcdef",
            "https://contoso.vault.azure.net/secrets/k",
            "https://contoso.vault.azure.net/keys/k?x=1",
            "https://u:p@contoso.vault.azure.net/keys/k",
            "https://contoso.vault.azure.net/keys/bad_name",
            "https://contoso.vault.azure.net/keys/",
            "not a url\n",
        ] {
            let err = AzureKeyRef::parse(bad, &domains()).unwrap_err();
            assert!(!crate::text::has_control(&err.0), "{err}");
        }
    }

    #[test]
    fn tenant_ids_are_guids() {
        assert!(validate_tenant_id("72f988bf-86f1-41af-91ab-2d7cd011db47").is_ok());
        for bad in [
            "",
            "contoso.onmicrosoft.com",
            "72f988bf-86f1-41af-91ab",
            "../x",
        ] {
            assert!(validate_tenant_id(bad).is_err(), "{bad}");
        }
    }
}
