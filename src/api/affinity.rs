//! Tenant affinity (docs/fleet.md). Clients send the tenant in a request
//! header; a gRPC `ring_hash` load-balancing policy hashes that header, so
//! every call of a tenant lands on one replica and its cold keys cost one
//! KMS call fleet-wide, not one per replica. The server never relies on it:
//! a call is served the same wherever it lands. It only counts how calls
//! arrive, so an operator sees clients that do not send the header (their
//! calls scatter) or send another tenant's id (a client bug).

use tonic::metadata::{Ascii, MetadataKey, MetadataMap};

/// Default header name; the shipped clients and service configs use it.
pub(crate) const DEFAULT_HEADER: &str = "x-keybroker-tenant";

/// How a call's affinity header relates to the tenants it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Affinity {
    /// The header names the call's tenant (every item's, in a batch).
    Matched,
    /// No header: a ring-hash client would have picked a replica at random.
    Absent,
    /// The header names another tenant, or a batch mixes tenants.
    OtherTenant,
}

impl Affinity {
    #[cfg(test)]
    const ALL: [Affinity; 3] = [Self::Matched, Self::Absent, Self::OtherTenant];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Matched => "matched",
            Self::Absent => "absent",
            Self::OtherTenant => "other_tenant",
        }
    }

    /// Compares the header in `metadata` with the tenants of the call.
    pub(crate) fn of<'a>(
        header: &MetadataKey<Ascii>,
        metadata: &MetadataMap,
        mut tenants: impl Iterator<Item = &'a str>,
    ) -> Self {
        match metadata.get(header) {
            None => Self::Absent,
            Some(value) => {
                let value = value.as_bytes();
                if tenants.all(|t| t.as_bytes() == value) {
                    Self::Matched
                } else {
                    Self::OtherTenant
                }
            }
        }
    }
}

/// The configured header as a metadata key, parsed once (the hot path only
/// looks it up).
pub(crate) fn header_key(name: &str) -> Result<MetadataKey<Ascii>, String> {
    parse_header(name)?;
    MetadataKey::from_bytes(name.as_bytes()).map_err(|e| e.to_string())
}

/// Checks a configured header name: lowercase ASCII as HTTP/2 sends it, and
/// not one gRPC or HTTP/2 reserves.
pub(crate) fn parse_header(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        });
    if !valid {
        return Err(format!(
            "{:?} is not a lowercase header name (letters, digits, - _ .)",
            crate::text::Escaped(name)
        ));
    }
    if name.starts_with("grpc-") || name.ends_with("-bin") {
        return Err(format!(
            "{name:?} is reserved by gRPC (grpc-*) or binary (-bin); use e.g. {DEFAULT_HEADER}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_are_checked() {
        assert!(parse_header(DEFAULT_HEADER).is_ok());
        for bad in [
            "",
            "X-Tenant",
            "tenant id",
            "grpc-tenant",
            "tenant-bin",
            ":authority",
        ] {
            assert!(parse_header(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn affinity_is_classified() {
        let key = header_key(DEFAULT_HEADER).unwrap();
        let mut md = MetadataMap::new();
        assert_eq!(Affinity::of(&key, &md, ["a"].into_iter()), Affinity::Absent);
        md.insert(DEFAULT_HEADER, "acme".parse().unwrap());
        assert_eq!(
            Affinity::of(&key, &md, ["acme"].into_iter()),
            Affinity::Matched
        );
        assert_eq!(
            Affinity::of(&key, &md, ["acme", "acme"].into_iter()),
            Affinity::Matched
        );
        assert_eq!(
            Affinity::of(&key, &md, ["acme", "globex"].into_iter()),
            Affinity::OtherTenant
        );
        assert_eq!(
            Affinity::of(&header_key("x-other").unwrap(), &md, ["acme"].into_iter()),
            Affinity::Absent
        );
    }

    #[test]
    fn metrics_count_every_outcome_by_name() {
        let names: Vec<&str> = Affinity::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(names, crate::metrics::AFFINITY_NAMES);
    }
}
