//! The audit record of a call: what the request said, what came of it, and
//! the intent record a state-changing call writes first.

use super::*;

/// Admin methods that change what the registry holds.
pub(super) const STATE_CHANGING: &[&str] = &[
    "CreateTenant",
    "SetTenantPolicy",
    "SetAccessPolicy",
    "LinkKey",
    "ImportKeyMaterial",
    "GetImportParameters",
    "SetPrimaryKey",
    "DisableKey",
    "EnableKey",
    "UnlinkKey",
    "UpdateKey",
    "DeleteTenant",
    "CancelTenantDeletion",
    "RetireKeyVersions",
];

pub(super) fn changes_state(method: &str) -> bool {
    method
        .strip_prefix("keybroker.v1.KeyAdmin/")
        .is_some_and(|m| STATE_CHANGING.contains(&m))
}

/// What the audit record says about the request, taken before the handler
/// consumes it.
pub(super) struct Facts {
    pub(super) tenant_id: String,
    pub(super) requested_binding: Option<String>,
    pub(super) wrapped_key_sha256: Option<String>,
    pub(super) reason: Option<Reason>,
    pub(super) reason_detail: Option<String>,
}

/// Request text as the audit log keeps it: as given when short and free of
/// control characters, else escaped and cut (JSON escapes it anyway; this
/// also bounds what a caller can make each record hold).
pub(super) fn kept(text: &str) -> String {
    if text.len() <= crate::text::MAX_SHOWN_CHARS && !crate::text::has_control(text) {
        text.to_owned()
    } else {
        Escaped(text).to_string()
    }
}

impl Facts {
    /// `digest`: the wrapped key's digest is computed (records go to a
    /// sink; the access log alone does not need it).
    pub(super) fn of(req: &impl Scoped, digest: bool) -> Self {
        let justification = req.justification();
        Self {
            // An unknown reason number is refused before any record is
            // written with it; `none` stands for it here.
            reason: justification.map(|(n, _)| Reason::from_proto(n).unwrap_or_default()),
            reason_detail: justification
                .map(|(_, d)| d)
                .filter(|d| !d.is_empty())
                .map(kept),
            tenant_id: kept(req.tenant_id()),
            requested_binding: req.key_binding().map(kept),
            wrapped_key_sha256: req
                .wrapped_key()
                .filter(|w| digest && !w.is_empty())
                .map(|w| {
                    hex::encode(
                        &aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, w).as_ref()[..8],
                    )
                }),
        }
    }
}

impl Facts {
    /// Counts the call in the tenant's access log (a call that takes a
    /// reason), from what the audit record would say.
    pub(super) fn count_use<Resp: Audited>(
        &self,
        audit: &AuditLog,
        ctx: &CallContext,
        result: &Result<Resp, Status>,
    ) {
        let Some(reason) = self.reason else {
            return;
        };
        let (outcome, error) = match result {
            Ok(_) => (Code::Ok, ""),
            Err(status) => (status.code(), status.message()),
        };
        let (key_binding, key_version) = result
            .as_ref()
            .ok()
            .and_then(Audited::key)
            .unwrap_or((self.requested_binding.as_deref().unwrap_or_default(), ""));
        audit.count_use(
            &ctx.method,
            &crate::access_log::Use {
                tenant_id: &self.tenant_id,
                caller: &ctx.identity,
                reason,
                reason_detail: self.reason_detail.as_deref().unwrap_or_default(),
                key_binding,
                key_version,
                operation: "",
                outcome: code_name(outcome),
                error,
                request_id: ctx.request_id.as_deref().unwrap_or_default(),
            },
        );
    }

    /// The record of a call with this outcome.
    pub(super) fn record<'a>(
        &'a self,
        ctx: &'a CallContext,
        outcome: &'static str,
        error: Option<&'a str>,
        notes: Option<&audit::CallNotes>,
    ) -> AuditRecord<'a> {
        AuditRecord {
            time: audit::rfc3339_now(),
            request_id: ctx.request_id.as_deref().unwrap_or_default(),
            caller: &ctx.identity,
            peer: ctx.peer.map(|a| a.to_string()),
            method: &ctx.method,
            tenant_id: Some(&self.tenant_id),
            key_binding: self.requested_binding.as_deref(),
            key_version: None,
            wrapped_key_sha256: self.wrapped_key_sha256.clone(),
            outcome,
            error,
            latency_us: elapsed_us(ctx.started),
            cache_hit: None,
            provider_calls: notes.map_or(0, audit::CallNotes::provider_calls),
            provider_request_id: notes.and_then(audit::CallNotes::provider_request_id),
            reason: self.reason.map(Reason::as_str),
            reason_detail: self.reason_detail.as_deref(),
        }
    }

    /// The record of a finished call.
    pub(super) fn outcome<'a, Resp: Audited>(
        &'a self,
        ctx: &'a CallContext,
        notes: Option<&audit::CallNotes>,
        result: &'a Result<Resp, Status>,
    ) -> AuditRecord<'a> {
        let (code, error) = match result {
            Ok(_) => (Code::Ok, None),
            Err(status) => (status.code(), Some(status.message())),
        };
        let mut record = self.record(ctx, code_name(code), error, notes);
        let key = result.as_ref().ok().and_then(Audited::key);
        if let Some((binding, version)) = key {
            record.key_binding = Some(binding);
            record.key_version = Some(version).filter(|v| !v.is_empty());
        }
        // Batch items too: their records have the fields of the single call.
        let unwraps = [
            "/UnwrapKey",
            "/RewrapKey",
            "/BatchUnwrapKey",
            "/BatchRewrapKey",
        ]
        .iter()
        .any(|m| ctx.method.ends_with(m));
        record.cache_hit =
            (unwraps && code == Code::Ok).then_some(notes.is_none_or(|n| n.dek_loads() == 0));
        record
    }
}

/// Writes (or gathers, `out`) the record of a finished call (none when
/// `facts` is None: audit off); in fail-closed mode an unwritable record
/// replaces the answer with UNAVAILABLE.
pub(super) fn finish<Resp: Audited>(
    out: &mut impl Recorder,
    ctx: &CallContext,
    facts: Option<Facts>,
    notes: Option<&audit::CallNotes>,
    result: Result<Resp, Status>,
) -> Result<Response<Resp>, Status> {
    let Some(facts) = facts else {
        return result.map(Response::new);
    };
    let audit = out.log();
    if !audit.writes() {
        // The access log alone: no record is built (no clock formatted, no
        // peer address written out), only the use counted.
        facts.count_use(audit, ctx, &result);
        return result.map(Response::new);
    }
    let fail_closed = audit.fail_closed();
    let record = facts.outcome(ctx, notes, &result);
    if let Err(err) = out.put(&record) {
        tracing::error!(error = %err, request_id = record.request_id, "audit record not written");
        if fail_closed {
            return Err(AccessError::AuditUnavailable(err.to_string()).into());
        }
    }
    result.map(Response::new)
}
