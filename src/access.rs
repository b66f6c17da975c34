//! Access justifications: why a data-plane call uses a tenant's key.
//!
//! Every GenerateDataKey, WrapKey, UnwrapKey and RewrapKey (single or batch
//! item) may carry a [`Reason`] and a short detail (a ticket or case id).
//! Two policies decide whether it is accepted, in this order:
//!
//! 1. The platform's authorization policy (`authz.rs`): which caller
//!    identities may *claim* which reasons. A storage service cannot claim a
//!    support case; only the support tool can. So a reason is a fact the
//!    platform enforces, not a caller's word.
//! 2. The customer's [`AccessPolicy`], per tenant: which reasons it accepts,
//!    and whether a call without one is refused. Checked with the tenant's
//!    view, before any cache read or provider call.
//!
//! Both refusals are PERMISSION_DENIED, audited with the reason.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a key is used. The numbers are the proto enum's (`AccessReason`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::EnumString,
    strum::EnumIter,
    strum::FromRepr,
    Default,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Reason {
    /// The call gave no reason.
    #[strum(serialize = "none")]
    #[serde(rename = "none")]
    #[default]
    NoReason = 0,
    /// The tenant's own users, API or integrations acting on its data.
    CustomerInitiated = 1,
    /// Automated platform processing on the tenant's behalf that no user
    /// started: compaction, indexing, backup, replication.
    PlatformOperation = 2,
    /// A support case the customer opened (detail: the ticket id).
    CustomerSupport = 3,
    /// The platform's staff on their own initiative: abuse, fraud, a
    /// security incident (detail: the case id).
    PlatformReview = 4,
    /// A third party's legal request: a subpoena, a court order (detail:
    /// the reference).
    LegalRequest = 5,
    /// Data moved between stores, regions or keys: a re-encryption, a
    /// restore into a new store.
    Migration = 6,
}

/// Longest detail a call may give, in bytes.
pub const MAX_DETAIL_BYTES: usize = 256;

impl Reason {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// From the proto enum's number; `None` for a number this server does
    /// not know.
    pub fn from_proto(value: i32) -> Option<Self> {
        u8::try_from(value).ok().and_then(Self::from_repr)
    }

    pub fn to_proto(self) -> i32 {
        i32::from(self as u8)
    }

    /// Reasons a person must tie to a record the customer can ask about.
    pub fn needs_detail(self) -> bool {
        matches!(
            self,
            Self::CustomerSupport | Self::PlatformReview | Self::LegalRequest
        )
    }

    /// Every reason, `none` first.
    pub fn all() -> impl Iterator<Item = Self> {
        <Self as strum::IntoEnumIterator>::iter()
    }

    /// The reason a name in a policy file or on the command line means
    /// (`customer_support`, or the proto name `ACCESS_REASON_CUSTOMER_SUPPORT`).
    pub fn parse(name: &str) -> Result<Self, String> {
        let lower = name.to_ascii_lowercase();
        let short = lower.strip_prefix("access_reason_").unwrap_or(&lower);
        let short = if short == "unspecified" {
            "none"
        } else {
            short
        };
        short.parse().map_err(|_| {
            format!(
                "unknown access reason {}; the reasons are {}",
                crate::text::Quoted(name),
                Self::all().map(Self::as_str).collect::<Vec<_>>().join(", ")
            )
        })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks a request's justification (reason number, detail): a known
/// reason, a bounded printable detail, present where the reason needs one.
pub fn check(reason: i32, detail: &str) -> Result<Reason, String> {
    let Some(reason) = Reason::from_proto(reason) else {
        return Err(format!(
            "justification.reason {reason} is not an AccessReason this server knows; the reasons are {}",
            Reason::all()
                .map(Reason::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    if detail.len() > MAX_DETAIL_BYTES {
        return Err(format!(
            "justification.detail is {} bytes; at most {MAX_DETAIL_BYTES} (a ticket or case id)",
            detail.len()
        ));
    }
    if detail.chars().any(char::is_control) {
        return Err("justification.detail must not contain control characters".into());
    }
    if reason == Reason::NoReason && !detail.is_empty() {
        return Err("justification.detail without a reason: set justification.reason".into());
    }
    if reason.needs_detail() && detail.trim().is_empty() {
        return Err(format!(
            "justification reason {reason} needs a detail: the ticket, case or request id the customer can ask about"
        ));
    }
    Ok(reason)
}

/// A tenant's (the customer's) access policy: which reasons it accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessPolicy {
    /// A call without a reason is refused.
    #[serde(default)]
    pub require_reason: bool,
    /// The reasons accepted; empty: every reason.
    #[serde(default)]
    pub allowed: Vec<Reason>,
}

impl AccessPolicy {
    /// A policy as given (sorted, without duplicates); `none` in `allowed`
    /// is refused: `require_reason` says whether a call needs one.
    pub fn new(require_reason: bool, mut allowed: Vec<Reason>) -> Result<Self, String> {
        if allowed.contains(&Reason::NoReason) {
            return Err(
                "allowed_reasons lists no reason (ACCESS_REASON_UNSPECIFIED); whether a call may come without one is require_reason"
                    .into(),
            );
        }
        allowed.sort_unstable();
        allowed.dedup();
        Ok(Self {
            require_reason,
            allowed,
        })
    }

    /// Whether a call with this reason is accepted.
    pub fn allows(&self, reason: Reason) -> bool {
        match reason {
            Reason::NoReason => !self.require_reason,
            reason => self.allowed.is_empty() || self.allowed.contains(&reason),
        }
    }

    /// The policy's stored form: empty for the default (every reason, none
    /// required), else JSON.
    pub fn to_stored(&self) -> String {
        if *self == Self::default() {
            return String::new();
        }
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_stored(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_str(text).map_err(|e| format!("access policy {text:?}: {e}"))
    }
}

impl fmt::Display for AccessPolicy {
    /// For messages: "requires a reason; accepts customer_initiated, migration".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.require_reason {
            "requires a reason; accepts "
        } else {
            "a reason is optional; accepts "
        })?;
        if self.allowed.is_empty() {
            return f.write_str("every reason");
        }
        let names: Vec<&str> = self.allowed.iter().map(|r| r.as_str()).collect();
        f.write_str(&names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_numbers_and_names_never_change() {
        let table = [
            (0, "none"),
            (1, "customer_initiated"),
            (2, "platform_operation"),
            (3, "customer_support"),
            (4, "platform_review"),
            (5, "legal_request"),
            (6, "migration"),
        ];
        assert_eq!(Reason::all().count(), table.len());
        for (number, name) in table {
            let reason = Reason::from_proto(number).unwrap();
            assert_eq!(reason.as_str(), name);
            assert_eq!(reason.to_proto(), number);
            assert_eq!(Reason::parse(name), Ok(reason));
        }
        assert_eq!(
            Reason::parse("ACCESS_REASON_LEGAL_REQUEST"),
            Ok(Reason::LegalRequest)
        );
        assert_eq!(Reason::from_proto(7), None);
        assert_eq!(Reason::from_proto(-1), None);
        assert!(
            Reason::parse("support")
                .unwrap_err()
                .contains("customer_support")
        );
    }

    #[test]
    fn justifications_are_checked() {
        let ok = |r: Reason, d: &str| check(r.to_proto(), d);
        assert!(ok(Reason::NoReason, "").is_ok());
        assert!(ok(Reason::CustomerInitiated, "").is_ok());
        assert!(
            ok(Reason::CustomerSupport, "")
                .unwrap_err()
                .contains("needs a detail")
        );
        assert!(ok(Reason::CustomerSupport, "  ").is_err());
        assert!(ok(Reason::CustomerSupport, "TICKET-42").is_ok());
        assert!(
            ok(Reason::NoReason, "x")
                .unwrap_err()
                .contains("without a reason")
        );
        assert!(ok(Reason::Migration, "a\nb").is_err());
        assert!(ok(Reason::Migration, &"x".repeat(MAX_DETAIL_BYTES)).is_ok());
        assert!(ok(Reason::Migration, &"x".repeat(MAX_DETAIL_BYTES + 1)).is_err());
        assert!(check(99, "").is_err());
    }

    #[test]
    fn policies_allow_exactly_what_they_say() {
        let all = AccessPolicy::default();
        assert!(Reason::all().all(|r| all.allows(r)));
        let strict =
            AccessPolicy::new(true, vec![Reason::Migration, Reason::CustomerInitiated]).unwrap();
        for reason in Reason::all() {
            let expected = matches!(reason, Reason::Migration | Reason::CustomerInitiated);
            assert_eq!(strict.allows(reason), expected, "{reason}");
        }
        let optional = AccessPolicy::new(false, vec![Reason::CustomerInitiated]).unwrap();
        assert!(optional.allows(Reason::NoReason));
        assert!(!optional.allows(Reason::LegalRequest));
        assert!(AccessPolicy::new(false, vec![Reason::NoReason]).is_err());
        assert_eq!(
            strict.to_string(),
            "requires a reason; accepts customer_initiated, migration"
        );
    }

    #[test]
    fn stored_form_round_trips() {
        assert_eq!(AccessPolicy::default().to_stored(), "");
        let p = AccessPolicy::new(true, vec![Reason::LegalRequest]).unwrap();
        let stored = p.to_stored();
        assert_eq!(
            stored,
            r#"{"require_reason":true,"allowed":["legal_request"]}"#
        );
        assert_eq!(AccessPolicy::from_stored(&stored), Ok(p));
        assert_eq!(AccessPolicy::from_stored(""), Ok(AccessPolicy::default()));
        assert!(AccessPolicy::from_stored(r#"{"allowed":["nope"]}"#).is_err());
    }
}
