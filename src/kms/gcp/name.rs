//! Cloud KMS identifiers, validated when built: a CryptoKey resource name
//! and a service account to impersonate.

use std::fmt;

use crate::kms::InvalidIdentifier;

/// `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct GcpKeyName(String);

impl GcpKeyName {
    pub fn parse(name: &str) -> Result<Self, InvalidIdentifier> {
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
        };
        let parts: Vec<&str> = name.split('/').collect();
        let ok = matches!(
            parts[..],
            ["projects", project, "locations", location, "keyRings", ring, "cryptoKeys", key]
                if [project, location, ring, key].iter().all(|s| segment_ok(s))
        );
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(InvalidIdentifier(format!(
                "invalid Cloud KMS key name {name:?}: expected projects/PROJECT/locations/LOCATION/keyRings/RING/cryptoKeys/KEY"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `gcloud` command that sets a label on this key.
    pub fn label_command(&self, label: &str, value: &str) -> String {
        let parts: Vec<&str> = self.0.split('/').collect();
        format!(
            "gcloud kms keys update {} --keyring {} --location {} --project {} --update-labels {label}={value}",
            parts[7], parts[5], parts[3], parts[1]
        )
    }
}

impl fmt::Display for GcpKeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for GcpKeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GcpKeyName({})", self.0)
    }
}

/// `NAME@PROJECT.iam.gserviceaccount.com`.
pub fn check_service_account(email: &str) -> Result<(), InvalidIdentifier> {
    let ok = email.ends_with(".iam.gserviceaccount.com")
        && email.split('@').count() == 2
        && email.len() <= 254
        && !email.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(InvalidIdentifier(format!(
            "invalid service account {email:?}: expected NAME@PROJECT.iam.gserviceaccount.com"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names() {
        let name = "projects/p1/locations/global/keyRings/r/cryptoKeys/k";
        assert_eq!(GcpKeyName::parse(name).unwrap().as_str(), name);
        for bad in [
            "projects/p1/locations/global/keyRings/r",
            "projects//locations/global/keyRings/r/cryptoKeys/k",
            "projects/p1/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
            "projects/p1/locations/global/keyRings/r/cryptoKeys/k\n",
            "organizations/p1/locations/global/keyRings/r/cryptoKeys/k",
        ] {
            assert!(GcpKeyName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn service_accounts() {
        check_service_account("kb-acme@my-project.iam.gserviceaccount.com").unwrap();
        for bad in [
            "kb-acme@gmail.com",
            "a@b@c.iam.gserviceaccount.com",
            "kb\n@p.iam.gserviceaccount.com",
        ] {
            assert!(check_service_account(bad).is_err(), "{bad:?}");
        }
    }
}
