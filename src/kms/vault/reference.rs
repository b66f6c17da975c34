//! A Transit key's reference, validated when built: the key's Vault API URL
//! `https://HOST[:PORT]/v1/<mount>/keys/<name>`.

use std::fmt;

use crate::kms::InvalidIdentifier;

#[derive(Clone, PartialEq, Eq)]
pub struct VaultKeyRef {
    /// `scheme://host[:port]`, no trailing slash.
    address: String,
    /// Transit mount path (may hold slashes: `tenants/acme/transit`).
    mount: String,
    name: String,
    /// `<mount>/keys/<name>`, for messages.
    display: String,
}

impl fmt::Debug for VaultKeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VaultKeyRef({}/v1/{})", self.address, self.display)
    }
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s != "."
        && s != ".."
}

impl VaultKeyRef {
    pub fn parse(reference: &str) -> Result<Self, InvalidIdentifier> {
        let bad = |why: &str| {
            InvalidIdentifier(format!(
                "{} is not a Transit key URL ({why}); expected https://vault.example.com:8200/v1/<transit mount>/keys/<key name>",
                crate::text::Quoted(reference)
            ))
        };
        let (scheme, rest) = reference
            .split_once("://")
            .ok_or_else(|| bad("no scheme"))?;
        let (host, path) = rest.split_once('/').ok_or_else(|| bad("no path"))?;
        if host.is_empty()
            || host.contains('@')
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']'))
        {
            return Err(bad("the host is not a host[:port]"));
        }
        match scheme {
            "https" => {}
            "http" if is_loopback(host) => {}
            "http" => {
                return Err(bad(
                    "plain http is refused except on loopback: Transit answers carry plaintext keys",
                ));
            }
            _ => return Err(bad("the scheme must be https")),
        }
        let path = path
            .strip_prefix("v1/")
            .ok_or_else(|| bad("the path must start with /v1/"))?;
        let (mount, name) = path
            .rsplit_once("/keys/")
            .ok_or_else(|| bad("the path must end with /keys/<key name>"))?;
        if !mount.split('/').all(segment_ok) || !segment_ok(name) {
            return Err(bad(
                "mount and key names are letters, digits, - _ . (the mount may have / between them)",
            ));
        }
        Ok(Self {
            address: format!("{scheme}://{host}"),
            mount: mount.to_owned(),
            name: name.to_owned(),
            display: format!("{mount}/keys/{name}"),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// `<mount>/keys/<name>` as people read it.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// The URL of a Transit operation on this key (`encrypt`, `decrypt`,
    /// `rewrap`, `keys`).
    pub fn operation_url(&self, operation: &str) -> String {
        format!(
            "{}/v1/{}/{operation}/{}",
            self.address, self.mount, self.name
        )
    }
}

fn is_loopback(host: &str) -> bool {
    let name = host
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(name, _)| name);
    name == "localhost"
        || name == "[::1]"
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_say_why_not() {
        let r = VaultKeyRef::parse("https://vault.acme.com:8200/v1/transit/keys/orders").unwrap();
        assert_eq!(r.address(), "https://vault.acme.com:8200");
        assert_eq!(
            r.operation_url("encrypt"),
            "https://vault.acme.com:8200/v1/transit/encrypt/orders"
        );
        assert_eq!(r.display(), "transit/keys/orders");
        let nested =
            VaultKeyRef::parse("http://127.0.0.1:8200/v1/team/a/transit/keys/k-1").unwrap();
        assert_eq!(
            nested.operation_url("keys"),
            "http://127.0.0.1:8200/v1/team/a/transit/keys/k-1"
        );
        for (bad, why) in [
            ("vault.acme.com/v1/transit/keys/k", "no scheme"),
            ("http://vault.acme.com/v1/transit/keys/k", "plain http"),
            (
                "ftp://vault.acme.com/v1/transit/keys/k",
                "scheme must be https",
            ),
            ("https://vault.acme.com/transit/keys/k", "/v1/"),
            ("https://vault.acme.com/v1/transit/k", "/keys/"),
            ("https://vault.acme.com/v1/../keys/k", "letters"),
            ("https://vault.acme.com/v1/transit/keys/k?x=1", "letters"),
            ("https://user@vault.acme.com/v1/transit/keys/k", "host"),
        ] {
            let err = VaultKeyRef::parse(bad).unwrap_err().0;
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
