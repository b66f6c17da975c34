//! The `pkcs11_*` settings and what names a key in a token.

use super::*;

/// The `pkcs11_*` settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Pkcs11Settings {
    /// The PKCS#11 module (shared library) of the platform's HSM; the only
    /// one keybroker loads. Unset: no PKCS#11 keys.
    #[arg(
        id = "pkcs11_module",
        long = "pkcs11-module",
        env = "KEYBROKER_PKCS11_MODULE"
    )]
    pub module: Option<PathBuf>,
    /// File holding the token user PIN (mode 0600). Never a flag value,
    /// never an environment variable.
    #[arg(
        id = "pkcs11_pin_file",
        long = "pkcs11-pin-file",
        env = "KEYBROKER_PKCS11_PIN_FILE"
    )]
    pub pin_file: Option<PathBuf>,
    /// The object labels a tenant may link: those starting with this,
    /// `{tenant}` replaced by the tenant id. The PIN unlocks every object
    /// on the token, so a label outside the tenant's namespace (another
    /// tenant's key, the platform's) is refused before the HSM is asked.
    #[arg(
        id = "pkcs11_tenant_label_prefix",
        long = "pkcs11-tenant-label-prefix",
        env = "KEYBROKER_PKCS11_TENANT_LABEL_PREFIX",
        default_value = "{tenant}."
    )]
    pub tenant_label_prefix: String,
    /// Logged-in sessions per token, the most calls in flight on it.
    #[arg(
        id = "pkcs11_sessions",
        long = "pkcs11-sessions",
        env = "KEYBROKER_PKCS11_SESSIONS",
        default_value = "4"
    )]
    pub sessions: usize,
}

impl Default for Pkcs11Settings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl Pkcs11Settings {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        if self.sessions == 0 || self.sessions > 256 {
            return crate::settings::invalid("pkcs11_sessions", "must be 1 to 256");
        }
        if !self.tenant_label_prefix.contains("{tenant}") {
            return crate::settings::invalid(
                "pkcs11_tenant_label_prefix",
                "must contain {tenant}: without it every tenant could link every object the PIN unlocks",
            );
        }
        Ok(())
    }
}

/// A key object on a token: `pkcs11:token=<label>;object=<label>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11KeyRef {
    pub token: String,
    pub object: String,
}

impl Pkcs11KeyRef {
    pub fn parse(reference: &str) -> Result<Self, InvalidIdentifier> {
        let bad = || {
            InvalidIdentifier(format!(
                "{} is not a PKCS#11 key reference; expected pkcs11:token=<token label>;object=<key label> (labels: letters, digits, space - _ . : @)",
                crate::text::Quoted(reference)
            ))
        };
        let rest = reference.strip_prefix("pkcs11:").ok_or_else(bad)?;
        let (mut token, mut object) = (None, None);
        for part in rest.split(';') {
            match part.split_once('=') {
                Some(("token", v)) if token.is_none() => token = Some(v),
                Some(("object", v)) if object.is_none() => object = Some(v),
                _ => return Err(bad()),
            }
        }
        // Token labels are 32 bytes by the standard; object labels are
        // free, and hold a tenant id (`:` and `@` included) and a name.
        let label_ok = |s: &str, max: usize| {
            !s.is_empty()
                && s.len() <= max
                && s.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(b, b' ' | b'-' | b'_' | b'.' | b':' | b'@')
                })
        };
        match (token, object) {
            (Some(t), Some(o)) if label_ok(t, 32) && label_ok(o, 160) => Ok(Self {
                token: t.to_owned(),
                object: o.to_owned(),
            }),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Pkcs11KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pkcs11:token={};object={}", self.token, self.object)
    }
}

impl Pkcs11KeyRef {
    /// Whether `tenant_id` may link this object: its label is in the
    /// tenant's namespace, and it is not the key that seals the platform
    /// keyring (`platform_key`). A pure function: no HSM call.
    pub fn check_owner(
        &self,
        tenant_id: &str,
        prefix_template: &str,
        platform_key: Option<&str>,
    ) -> Result<(), String> {
        if platform_key
            .and_then(|p| Self::parse(p).ok())
            .is_some_and(|p| p.token == self.token && p.object == self.object)
        {
            return Err(format!(
                "{self} is the key that seals the platform keyring; no tenant may link it"
            ));
        }
        let prefix = prefix_template.replace("{tenant}", tenant_id);
        if !self.object.starts_with(&prefix) {
            return Err(format!(
                "object '{}' is outside tenant '{tenant_id}''s namespace on the HSM: its label must start with '{prefix}' (pkcs11_tenant_label_prefix); the platform labels each tenant's keys so that no tenant can link another's",
                self.object
            ));
        }
        Ok(())
    }
}
