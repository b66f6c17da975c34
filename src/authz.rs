//! Who may call which method for which tenant: the authorization policy.
//!
//! A TOML file of `[[allow]]` rules, each naming caller identities, gRPC
//! methods and tenants (exact strings, or globs where `*` matches any run of
//! characters), and the access reasons the callers may claim on calls that
//! use a key. A call is allowed when one rule matches all of them; anything
//! else is denied. The file is re-read when it changes; a broken edit keeps
//! the previous policy in force.
//!
//! `reasons` lists [`Reason`] names (`none` for a call that gives no reason,
//! `*` for every reason). A rule without it grants calls without a reason
//! only: claiming a reason is a grant like any other, never a default.
//!
//! ```toml
//! [[allow]]
//! identities = ["spiffe://prod.example/ns/billing/sa/api"]
//! methods = ["keybroker.v1.KeyBroker/*"]
//! tenants = ["acme", "globex-*"]
//! reasons = ["none", "customer_initiated", "platform_operation"]
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use std::time::Duration;

use serde::Deserialize;

use crate::access::Reason;
use crate::reload::FileStamp;

/// Identity of callers on a plaintext (loopback) listener.
pub(crate) const UNAUTHENTICATED: &str = "unauthenticated";

/// Every method the server serves that a policy can grant. Health is not
/// here: probes never need a grant.
pub(crate) const METHODS: &[&str] = &[
    "keybroker.v1.KeyBroker/GenerateDataKey",
    "keybroker.v1.KeyBroker/WrapKey",
    "keybroker.v1.KeyBroker/UnwrapKey",
    "keybroker.v1.KeyBroker/RewrapKey",
    "keybroker.v1.KeyBroker/DescribeKey",
    "keybroker.v1.KeyBroker/BatchGenerateDataKey",
    "keybroker.v1.KeyBroker/BatchUnwrapKey",
    "keybroker.v1.KeyBroker/BatchRewrapKey",
    "keybroker.v1.KeyAdmin/CreateTenant",
    "keybroker.v1.KeyAdmin/GetTenant",
    "keybroker.v1.KeyAdmin/SetTenantPolicy",
    "keybroker.v1.KeyAdmin/SetAccessPolicy",
    "keybroker.v1.KeyAdmin/ListKeyAccess",
    "keybroker.v1.KeyAdmin/LinkKey",
    "keybroker.v1.KeyAdmin/ImportKeyMaterial",
    "keybroker.v1.KeyAdmin/GetImportParameters",
    "keybroker.v1.KeyAdmin/ListKeys",
    "keybroker.v1.KeyAdmin/GetKey",
    "keybroker.v1.KeyAdmin/SetPrimaryKey",
    "keybroker.v1.KeyAdmin/DisableKey",
    "keybroker.v1.KeyAdmin/EnableKey",
    "keybroker.v1.KeyAdmin/UnlinkKey",
    "keybroker.v1.KeyAdmin/UpdateKey",
    "keybroker.v1.KeyAdmin/DeleteTenant",
    "keybroker.v1.KeyAdmin/CancelTenantDeletion",
    "keybroker.v1.KeyAdmin/RetireKeyVersions",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The method a policy grants for `method`: a batch method is granted
/// exactly as its single counterpart, so a policy never has to name both.
pub(crate) fn granted_as(method: &str) -> &str {
    match method {
        "keybroker.v1.KeyBroker/BatchGenerateDataKey" => "keybroker.v1.KeyBroker/GenerateDataKey",
        "keybroker.v1.KeyBroker/BatchUnwrapKey" => "keybroker.v1.KeyBroker/UnwrapKey",
        "keybroker.v1.KeyBroker/BatchRewrapKey" => "keybroker.v1.KeyBroker/RewrapKey",
        other => other,
    }
}

/// An exact string or a glob with `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern(String);

impl Pattern {
    pub(crate) fn matches(&self, text: &str) -> bool {
        glob(self.0.as_bytes(), text.as_bytes())
    }
}

/// `*` matches any run of bytes, everything else itself. Iterative with one
/// backtrack point: linear in practice, no recursion on hostile patterns.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

/// Identity patterns name their kind, as identities do (`tls.rs`): a
/// SPIFFE ID (`spiffe://...`), a DNS name (`dns:api.internal`), plaintext
/// callers (`unauthenticated`), or `*` for every caller. A bare name is
/// refused: it would match no caller, and used to mean a DNS SAN.
fn check_identity_pattern(pattern: &str) -> Result<(), String> {
    if pattern == "*"
        || pattern == UNAUTHENTICATED
        || pattern.starts_with("spiffe://")
        || pattern.starts_with(crate::net::tls::DNS_IDENTITY_PREFIX)
    {
        return Ok(());
    }
    Err(format!(
        "identity {pattern:?} names no kind of identity: write \"spiffe://trust-domain/path\" for a SPIFFE ID, \"dns:{pattern}\" for a certificate's DNS name, or \"unauthenticated\" for plaintext callers"
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    allow: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    /// For people reading the file and the logs.
    #[serde(default)]
    description: String,
    identities: Vec<String>,
    methods: Vec<String>,
    tenants: Vec<String>,
    /// Absent: calls without a reason only.
    reasons: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
struct Rule {
    identities: Vec<Pattern>,
    methods: Vec<Pattern>,
    tenants: Vec<Pattern>,
    /// The reasons callers may claim; `None`: every reason (`*`).
    reasons: Option<Vec<Reason>>,
}

impl Rule {
    fn allows_reason(&self, reason: Reason) -> bool {
        self.reasons.as_ref().is_none_or(|r| r.contains(&reason))
    }

    fn matches_caller(&self, identity: &str, method: &str) -> bool {
        self.identities.iter().any(|p| p.matches(identity))
            && self.methods.iter().any(|p| p.matches(method))
    }

    /// The tenant (when given) and the reason claimed (when one is).
    fn admits(&self, tenant_id: &str, reason: Option<Reason>) -> bool {
        self.tenants.iter().any(|p| p.matches(tenant_id))
            && reason.is_none_or(|reason| self.allows_reason(reason))
    }
}

/// What a rule's `reasons` list grants.
fn parse_reasons(label: &str, names: Option<Vec<String>>) -> Result<Option<Vec<Reason>>, String> {
    let Some(names) = names else {
        return Ok(Some(vec![Reason::NoReason]));
    };
    if names.is_empty() {
        return Err(format!(
            "{label}: reasons must be a non-empty list (\"none\" for calls without a reason, \"*\" for every reason)"
        ));
    }
    if names.iter().any(|n| n == "*") {
        return Ok(None);
    }
    names
        .iter()
        .map(|n| Reason::parse(n).map_err(|why| format!("{label}: {why}")))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The answer to a call's tenant and reason check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    Granted,
    /// No rule grants the method for this tenant.
    TenantDenied,
    /// Some rule grants the method for this tenant, none with this reason.
    ReasonDenied,
}

/// A parsed policy. `Policy::allow_all` exists for plaintext loopback
/// development only (the config refuses it with TLS).
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    rules: Vec<Rule>,
    /// No policy file: every call allowed without matching.
    allow_all: bool,
}

/// A caller allowed to call a method, for the tenant check that follows.
/// Holds the policy it was granted under (a reload mid-call does not change
/// the answer) and allocates nothing per call (one box under a policy of
/// more than 64 rules).
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    policy: Arc<Policy>,
    /// The rules among the first 64 whose identities and methods match the
    /// call (bit i: rule i), found once when the grant is made: the tenant
    /// check matches tenants and reasons only.
    matching: u64,
    /// The caller's identity and method, kept only when the policy has
    /// rules past the 64th (matched in full).
    caller: Option<Box<(Arc<str>, Arc<str>)>>,
}

/// Rules whose caller match a grant remembers ([`Grant::matching`]).
const REMEMBERED: usize = u64::BITS as usize;

impl Grant {
    /// Whether the caller may call the method for `tenant_id`, claiming
    /// `reason` (`None`: the method takes no reason).
    pub(crate) fn allows(&self, tenant_id: &str, reason: Option<Reason>) -> Permit {
        let allows = |reason| self.policy.allow_all || self.admits(tenant_id, reason);
        if allows(reason) {
            Permit::Granted
        } else if reason.is_some() && allows(None) {
            Permit::ReasonDenied
        } else {
            Permit::TenantDenied
        }
    }

    /// Whether a rule matching the caller admits the tenant and reason.
    fn admits(&self, tenant_id: &str, reason: Option<Reason>) -> bool {
        let rules = &self.policy.rules;
        let mut bits = self.matching;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if rules[i].admits(tenant_id, reason) {
                return true;
            }
        }
        self.caller.as_deref().is_some_and(|(identity, method)| {
            rules
                .iter()
                .skip(REMEMBERED)
                .any(|r| r.matches_caller(identity, method) && r.admits(tenant_id, reason))
        })
    }
}

impl Policy {
    pub(crate) fn allow_all() -> Self {
        Self {
            rules: Vec::new(),
            allow_all: true,
        }
    }

    /// Parses and checks a policy: every list non-empty, every method
    /// pattern naming at least one real method (a typo must not silently
    /// grant nothing, or everything).
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut rules = Vec::with_capacity(file.allow.len());
        for (i, rule) in file.allow.into_iter().enumerate() {
            let label = if rule.description.is_empty() {
                format!("allow rule {}", i + 1)
            } else {
                format!("allow rule {} ({})", i + 1, rule.description)
            };
            let list = |field: &str, values: Vec<String>| {
                if values.is_empty() || values.iter().any(String::is_empty) {
                    return Err(format!(
                        "{label}: {field} must be a non-empty list of non-empty strings"
                    ));
                }
                Ok(values.into_iter().map(Pattern).collect::<Vec<_>>())
            };
            let methods = list("methods", rule.methods)?;
            for m in &methods {
                if !METHODS.iter().any(|known| m.matches(known)) {
                    return Err(format!(
                        "{label}: method {:?} matches no method of this server \
                         (methods are like \"keybroker.v1.KeyBroker/UnwrapKey\" or \"keybroker.v1.KeyAdmin/*\")",
                        m.0
                    ));
                }
            }
            let identities = list("identities", rule.identities)?;
            for id in &identities {
                check_identity_pattern(&id.0).map_err(|why| format!("{label}: {why}"))?;
            }
            rules.push(Rule {
                identities,
                methods,
                tenants: list("tenants", rule.tenants)?,
                reasons: parse_reasons(&label, rule.reasons)?,
            });
        }
        Ok(Self {
            rules,
            allow_all: false,
        })
    }

    pub(crate) fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("authorization policy {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("authorization policy {}: {e}", path.display()))
    }

    /// A grant when some rule lets `identity` call `method` (for some
    /// tenant); `None` when none does.
    pub(crate) fn grant(self: &Arc<Self>, identity: Arc<str>, method: Arc<str>) -> Option<Grant> {
        let matching = self
            .rules
            .iter()
            .take(REMEMBERED)
            .enumerate()
            .filter(|(_, r)| r.matches_caller(&identity, &method))
            .fold(0u64, |bits, (i, _)| bits | 1 << i);
        let granted = self.allow_all
            || matching != 0
            || self
                .rules
                .iter()
                .skip(REMEMBERED)
                .any(|r| r.matches_caller(&identity, &method));
        granted.then(|| Grant {
            policy: Arc::clone(self),
            matching,
            caller: (self.rules.len() > REMEMBERED).then(|| Box::new((identity, method))),
        })
    }
}

/// The policy in force, re-read from its file when it changes.
#[derive(Debug)]
pub(crate) struct PolicySource {
    path: Option<PathBuf>,
    /// Read on every call, replaced on reload; calls never wait on file I/O.
    current: RwLock<Arc<Policy>>,
    /// The file as it was when `current` was parsed.
    stamp: Mutex<Option<FileStamp>>,
}

impl PolicySource {
    pub(crate) fn fixed(policy: Policy) -> Arc<Self> {
        Arc::new(Self {
            path: None,
            current: RwLock::new(Arc::new(policy)),
            stamp: Mutex::new(None),
        })
    }

    pub(crate) fn from_file(path: &Path) -> Result<Arc<Self>, String> {
        let stamp = FileStamp::of(&[path]);
        let policy = Policy::load(path)?;
        Ok(Arc::new(Self {
            path: Some(path.to_owned()),
            current: RwLock::new(Arc::new(policy)),
            stamp: Mutex::new(Some(stamp)),
        }))
    }

    pub(crate) fn current(&self) -> Arc<Policy> {
        Arc::clone(&self.current.read())
    }

    /// Re-reads the file if it changed; returns whether a new policy is in
    /// force. A broken file keeps the previous policy (logged).
    pub(crate) fn reload_if_changed(&self) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        let stamp = FileStamp::of(&[path]);
        let mut seen = self.stamp.lock();
        if seen.as_ref() == Some(&stamp) {
            return false;
        }
        match Policy::load(path) {
            Ok(policy) => {
                *seen = Some(stamp);
                *self.current.write() = Arc::new(policy);
                tracing::info!(path = %path.display(), "authorization policy reloaded");
                true
            }
            Err(err) => {
                *seen = Some(stamp);
                tracing::error!(error = %err, "authorization policy changed but is invalid; the previous policy stays in force");
                false
            }
        }
    }

    pub(crate) fn reloader(
        self: &Arc<Self>,
        interval: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        crate::reload::every(interval, self, |source| {
            source.reload_if_changed();
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let p = |s: &str| Pattern(s.into());
        assert!(p("*").matches(""));
        assert!(p("acme").matches("acme"));
        assert!(!p("acme").matches("acme2"));
        assert!(p("acme-*").matches("acme-eu"));
        assert!(!p("acme-*").matches("acm"));
        assert!(p("spiffe://prod/*/sa/api").matches("spiffe://prod/ns/x/sa/api"));
        assert!(!p("spiffe://prod/*/sa/api").matches("spiffe://prod/ns/x/sa/api2"));
        assert!(p("*a*b*").matches("xxaxxbxx"));
        assert!(!p("*a*b").matches("xxaxxbxxc"));
    }

    #[test]
    fn rules_and_validation() {
        let policy = Policy::parse(
            r#"
            [[allow]]
            description = "billing reads keys"
            identities = ["spiffe://prod/billing"]
            methods = ["keybroker.v1.KeyBroker/UnwrapKey"]
            tenants = ["acme", "globex-*"]
            [[allow]]
            identities = ["spiffe://prod/ops/*"]
            methods = ["keybroker.v1.KeyAdmin/*"]
            tenants = ["*"]
            "#,
        )
        .unwrap();
        let policy = Arc::new(policy);
        let unwrap = "keybroker.v1.KeyBroker/UnwrapKey";
        let grant = policy
            .grant("spiffe://prod/billing".into(), unwrap.into())
            .unwrap();
        assert_eq!(grant.allows("acme", None), Permit::Granted);
        assert_eq!(grant.allows("globex-eu", None), Permit::Granted);
        assert_eq!(grant.allows("initech", None), Permit::TenantDenied);
        let grant = |p: &Arc<Policy>, i: &str, m: &str| p.grant(i.into(), m.into());
        assert!(
            grant(
                &policy,
                "spiffe://prod/billing",
                "keybroker.v1.KeyBroker/WrapKey"
            )
            .is_none()
        );
        assert!(grant(&policy, "spiffe://prod/ops/alice", unwrap).is_none());
        assert!(
            grant(
                &policy,
                "spiffe://prod/ops/alice",
                "keybroker.v1.KeyAdmin/LinkKey"
            )
            .unwrap()
            .allows("anyone", None)
                == Permit::Granted
        );
        assert!(grant(&Arc::new(Policy::parse("").unwrap()), "x", unwrap).is_none());

        let typo = Policy::parse(
            "[[allow]]\nidentities=[\"a\"]\nmethods=[\"keybroker.v1.KeyBroker/Unwrap\"]\ntenants=[\"*\"]\n",
        )
        .unwrap_err();
        assert!(typo.contains("matches no method"), "{typo}");
        let empty = Policy::parse("[[allow]]\nidentities=[]\nmethods=[\"*\"]\ntenants=[\"*\"]\n")
            .unwrap_err();
        assert!(
            empty.contains("identities must be a non-empty list"),
            "{empty}"
        );
        let unknown = Policy::parse("[[allow]]\nidentity=[\"a\"]\n").unwrap_err();
        assert!(unknown.contains("unknown field"), "{unknown}");
    }

    /// A grant remembers which of the first 64 rules match its caller and
    /// method; later rules are matched in full. Either way the tenant check
    /// answers as the whole policy does.
    #[test]
    fn a_grant_checks_every_rule_of_a_long_policy() {
        let rule = |identity: &str, tenant: &str| {
            format!(
                "[[allow]]\nidentities = [\"{identity}\"]\nmethods = [\"keybroker.v1.KeyBroker/UnwrapKey\"]\ntenants = [\"{tenant}\"]\n"
            )
        };
        // Rules 0..70 grant other callers; billing is granted tenant t2 by
        // rule 2 and tenant t66 by rule 66 (past the remembered 64).
        let text: String = (0..70)
            .map(|i| match i {
                2 | 66 => rule("spiffe://prod/billing", &format!("t{i}")),
                _ => rule(&format!("spiffe://prod/other-{i}"), &format!("t{i}")),
            })
            .collect();
        let policy = Arc::new(Policy::parse(&text).unwrap());
        let unwrap = "keybroker.v1.KeyBroker/UnwrapKey";
        let grant = policy
            .grant("spiffe://prod/billing".into(), unwrap.into())
            .unwrap();
        assert_eq!(grant.allows("t2", None), Permit::Granted);
        assert_eq!(grant.allows("t66", None), Permit::Granted);
        for tenant in ["t0", "t3", "t65", "t67", "t69"] {
            assert_eq!(grant.allows(tenant, None), Permit::TenantDenied, "{tenant}");
        }
        // Granted by a rule past the 64th only.
        let late = policy
            .grant("spiffe://prod/other-68".into(), unwrap.into())
            .unwrap();
        assert_eq!(late.allows("t68", None), Permit::Granted);
        assert_eq!(late.allows("t2", None), Permit::TenantDenied);
        assert!(
            policy
                .grant("spiffe://prod/nobody".into(), unwrap.into())
                .is_none()
        );
    }

    #[test]
    fn reasons_are_granted_like_methods() {
        let policy = Arc::new(
            Policy::parse(
                r#"
                [[allow]]
                identities = ["spiffe://prod/storage"]
                methods = ["keybroker.v1.KeyBroker/*"]
                tenants = ["*"]
                reasons = ["none", "customer_initiated", "platform_operation"]
                [[allow]]
                identities = ["spiffe://prod/support-tool"]
                methods = ["keybroker.v1.KeyBroker/UnwrapKey"]
                tenants = ["*"]
                reasons = ["customer_support"]
                [[allow]]
                identities = ["spiffe://prod/legacy"]
                methods = ["keybroker.v1.KeyBroker/UnwrapKey"]
                tenants = ["*"]
                [[allow]]
                identities = ["spiffe://prod/migrator"]
                methods = ["keybroker.v1.KeyBroker/*"]
                tenants = ["*"]
                reasons = ["*"]
                "#,
            )
            .unwrap(),
        );
        let unwrap = "keybroker.v1.KeyBroker/UnwrapKey";
        let permit = |identity: &str, reason| {
            policy
                .grant(identity.into(), unwrap.into())
                .map(|g| g.allows("acme", Some(reason)))
        };
        use Permit::*;
        use Reason::*;
        let table = [
            ("spiffe://prod/storage", NoReason, Granted),
            ("spiffe://prod/storage", CustomerInitiated, Granted),
            ("spiffe://prod/storage", PlatformOperation, Granted),
            ("spiffe://prod/storage", CustomerSupport, ReasonDenied),
            ("spiffe://prod/storage", LegalRequest, ReasonDenied),
            ("spiffe://prod/support-tool", CustomerSupport, Granted),
            ("spiffe://prod/support-tool", NoReason, ReasonDenied),
            (
                "spiffe://prod/support-tool",
                CustomerInitiated,
                ReasonDenied,
            ),
            // No `reasons`: calls without a reason only.
            ("spiffe://prod/legacy", NoReason, Granted),
            ("spiffe://prod/legacy", CustomerInitiated, ReasonDenied),
            ("spiffe://prod/migrator", Migration, Granted),
            ("spiffe://prod/migrator", LegalRequest, Granted),
        ];
        for (identity, reason, expected) in table {
            assert_eq!(
                permit(identity, reason),
                Some(expected),
                "{identity} {reason}"
            );
        }
        // Methods that take no reason are not held to `reasons`.
        let describe = policy.grant(
            "spiffe://prod/support-tool".into(),
            "keybroker.v1.KeyBroker/DescribeKey".into(),
        );
        assert!(describe.is_none());
        let bad = Policy::parse(
            "[[allow]]\nidentities=[\"*\"]\nmethods=[\"*\"]\ntenants=[\"*\"]\nreasons=[\"support\"]\n",
        )
        .unwrap_err();
        assert!(
            bad.contains("unknown access reason") && bad.contains("customer_support"),
            "{bad}"
        );
        let empty = Policy::parse(
            "[[allow]]\nidentities=[\"*\"]\nmethods=[\"*\"]\ntenants=[\"*\"]\nreasons=[]\n",
        )
        .unwrap_err();
        assert!(
            empty.contains("reasons must be a non-empty list"),
            "{empty}"
        );
    }
}
