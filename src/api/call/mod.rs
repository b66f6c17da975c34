//! Every handler runs through [`serve`]: the tenant check of the
//! authorization policy, then the handler, then exactly one audit record,
//! whatever the outcome. In fail-closed mode an unwritable record turns the
//! answer into UNAVAILABLE, so no key leaves without a trace.

mod batch;
mod record;

use std::sync::Arc;

use futures::future::Either;
use tonic::{Code, Request, Response, Status};

use crate::access::Reason;
use crate::api::Observers;
use crate::api::affinity::Affinity;
use crate::api::auth::{AccessError, CallContext, elapsed_us};
use crate::audit::{self, AuditLog, AuditRecord, Recorder};
use crate::authz::Permit;
use crate::metrics::code_name;
use crate::proto;
use crate::text::Escaped;

pub(crate) use self::batch::{item_status, serve_batch};
use self::record::*;

/// What a request says about its target, for the policy and the audit log.
pub(crate) trait Scoped {
    fn tenant_id(&self) -> &str;
    /// The key binding an admin request names.
    fn key_binding(&self) -> Option<&str> {
        None
    }
    /// The wrapped key a data-plane request carries.
    fn wrapped_key(&self) -> Option<&[u8]> {
        None
    }
    /// A request that uses a key: its justification's (reason number,
    /// detail), `(0, "")` when it gave none. `None`: the method takes none.
    fn justification(&self) -> Option<(i32, &str)> {
        None
    }
}

fn justification_of(j: Option<&proto::AccessJustification>) -> Option<(i32, &str)> {
    Some(j.map_or((0, ""), |j| (j.reason, j.detail.as_str())))
}

/// What a response says about the key used.
pub(crate) trait Audited {
    /// (binding, provider key version).
    fn key(&self) -> Option<(&str, &str)> {
        None
    }
}

macro_rules! scoped {
    ($($t:ty),* $(,)?) => { $(impl Scoped for $t { fn tenant_id(&self) -> &str { &self.tenant_id } })* };
}
macro_rules! scoped_binding {
    ($($t:ty),* $(,)?) => { $(impl Scoped for $t {
        fn tenant_id(&self) -> &str { &self.tenant_id }
        fn key_binding(&self) -> Option<&str> { Some(&self.name) }
    })* };
}
macro_rules! audited_key {
    ($($t:ty),* $(,)?) => { $(impl Audited for $t {
        fn key(&self) -> Option<(&str, &str)> {
            self.key.as_ref().map(|k| (k.key_binding.as_str(), k.provider_key_version.as_str()))
        }
    })* };
}
macro_rules! audited {
    ($($t:ty),* $(,)?) => { $(impl Audited for $t {})* };
}

/// A refused call: nothing was used.
impl Audited for () {}

macro_rules! scoped_justified {
    ($($t:ty),* $(,)?) => { $(impl Scoped for $t {
        fn tenant_id(&self) -> &str { &self.tenant_id }
        fn justification(&self) -> Option<(i32, &str)> { justification_of(self.justification.as_ref()) }
    })* };
}
macro_rules! scoped_wrapped_justified {
    ($($t:ty),* $(,)?) => { $(impl Scoped for $t {
        fn tenant_id(&self) -> &str { &self.tenant_id }
        fn wrapped_key(&self) -> Option<&[u8]> { Some(&self.wrapped_key) }
        fn justification(&self) -> Option<(i32, &str)> { justification_of(self.justification.as_ref()) }
    })* };
}

scoped_justified!(proto::GenerateDataKeyRequest, proto::WrapKeyRequest);
scoped_wrapped_justified!(proto::UnwrapKeyRequest, proto::RewrapKeyRequest);
scoped!(
    proto::DescribeKeyRequest,
    proto::CreateTenantRequest,
    proto::GetTenantRequest,
    proto::SetTenantPolicyRequest,
    proto::SetAccessPolicyRequest,
    proto::ListKeyAccessRequest,
    proto::ListKeysRequest,
    proto::DeleteTenantRequest,
    proto::CancelTenantDeletionRequest,
);

/// The platform keyring is every tenant's: the policy must grant the method
/// for tenant `#platform` (no tenant id can match it but `*`).
impl Scoped for proto::RetireKeyVersionsRequest {
    fn tenant_id(&self) -> &str {
        if self.target == proto::RetireTarget::PlatformKeyring as i32 {
            crate::registry::FLEET
        } else {
            &self.tenant_id
        }
    }
    fn key_binding(&self) -> Option<&str> {
        (!self.name.is_empty()).then_some(self.name.as_str())
    }
}
scoped_binding!(
    proto::LinkKeyRequest,
    proto::ImportKeyMaterialRequest,
    proto::GetImportParametersRequest,
    proto::GetKeyRequest,
    proto::SetPrimaryKeyRequest,
    proto::DisableKeyRequest,
    proto::EnableKeyRequest,
    proto::UnlinkKeyRequest,
    proto::UpdateKeyRequest,
);
audited_key!(
    proto::GenerateDataKeyResponse,
    proto::WrapKeyResponse,
    proto::UnwrapKeyResponse,
    proto::RewrapKeyResponse,
);
audited!(
    proto::DescribeKeyResponse,
    proto::CreateTenantResponse,
    proto::GetTenantResponse,
    proto::SetTenantPolicyResponse,
    proto::SetAccessPolicyResponse,
    proto::ListKeyAccessResponse,
    proto::LinkKeyResponse,
    proto::ImportKeyMaterialResponse,
    proto::GetImportParametersResponse,
    proto::ListKeysResponse,
    proto::GetKeyResponse,
    proto::SetPrimaryKeyResponse,
    proto::DisableKeyResponse,
    proto::EnableKeyResponse,
    proto::UnlinkKeyResponse,
    proto::UpdateKeyResponse,
    proto::DeleteTenantResponse,
    proto::CancelTenantDeletionResponse,
    proto::RetireKeyVersionsResponse,
);

/// Authorizes the tenant, runs `handler`, writes the audit record and the
/// RPC metrics.
pub(crate) async fn serve<Req, Resp, Fut>(
    observers: &Observers,
    request: Request<Req>,
    handler: impl FnOnce(Req) -> Fut,
) -> Result<Response<Resp>, Status>
where
    Req: Scoped,
    Resp: Audited,
    Fut: Future<Output = Result<Resp, Status>>,
{
    let (started, req) = Started::of(observers, request)?;
    let result = tracing::Instrument::instrument(
        serve_inner(observers, &started.ctx, req, handler),
        started.span.clone(),
    )
    .await;
    started.end(observers, &result);
    result
}

/// What [`serve_now`] did with a call.
pub(crate) enum Served<Resp, Next> {
    Answered(Result<Response<Resp>, Status>),
    Parked(Parked<Next>),
}

/// What [`serve_now`] could not answer without waiting: the call, checked
/// and authorized, and what its handler needs.
pub(crate) struct Parked<Next> {
    started: Started,
    facts: Option<Facts>,
    next: Next,
}

impl<Next> Parked<Next> {
    /// Runs the handler that may wait, under the request deadline, then
    /// writes the audit record and the metrics, as [`serve`] does.
    pub(crate) async fn serve<Resp, Fut>(
        self,
        observers: &Observers,
        handler: impl FnOnce(Next) -> Fut,
    ) -> Result<Response<Resp>, Status>
    where
        Resp: Audited,
        Fut: Future<Output = Result<Resp, Status>>,
    {
        let Self {
            started,
            facts,
            next,
        } = self;
        let result = tracing::Instrument::instrument(
            run(
                &observers.audit,
                &started.ctx,
                observers.request_timeout,
                facts,
                next,
                handler,
            ),
            started.span.clone(),
        )
        .await;
        started.end(observers, &result);
        result
    }
}

/// [`serve`] for a call that can often be answered without waiting (a
/// cached key): `at_once` answers it, or hands it on to be finished with
/// [`Parked::serve`]. An answered call built no future at all: at the hot
/// path's rate, building, moving and polling the nested futures of
/// [`serve`] cost more than the cache lookup.
pub(crate) fn serve_now<Req, Next, Resp>(
    observers: &Observers,
    request: Request<Req>,
    at_once: impl FnOnce(Req) -> Result<Result<Resp, Status>, Next>,
) -> Served<Resp, Next>
where
    Req: Scoped,
    Resp: Audited,
{
    let (started, req) = match Started::of(observers, request) {
        Ok(started) => started,
        Err(status) => return Served::Answered(Err(status)),
    };
    let outcome = started
        .span
        .in_scope(|| answer_at_once(&mut &*observers.audit, &started.ctx, req, at_once));
    match outcome {
        AtOnce::Answered(answer) => {
            started.end(observers, &answer);
            Served::Answered(answer)
        }
        AtOnce::Waits(facts, next) => Served::Parked(Parked {
            started,
            facts,
            next,
        }),
    }
}

/// What [`answer_at_once`] did with one request.
enum AtOnce<Resp, Next> {
    /// Refused, or answered without waiting; audited.
    Answered(Result<Response<Resp>, Status>),
    /// Authorized, for the handler that may wait: what its record will
    /// say, and what `at_once` handed on.
    Waits(Option<Facts>, Next),
}

/// The tenant check, then `at_once`: a refusal or an answer is audited
/// here (its record written, or gathered with its batch's, `out`); a request
/// `at_once` hands on is returned for the waiting path. Shared by single
/// calls ([`serve_now`]) and batch items.
fn answer_at_once<Req, Next, Resp>(
    out: &mut impl Recorder,
    ctx: &CallContext,
    req: Req,
    at_once: impl FnOnce(Req) -> Result<Result<Resp, Status>, Next>,
) -> AtOnce<Resp, Next>
where
    Req: Scoped,
    Resp: Audited,
{
    let facts = match authorize(out, ctx, &req) {
        Ok(facts) => facts,
        Err(denied) => return AtOnce::Answered(Err(denied)),
    };
    match at_once(req) {
        // Nothing was waited for, so no provider was called: no notes.
        Ok(result) => AtOnce::Answered(finish(out, ctx, facts, None, result)),
        Err(next) => AtOnce::Waits(facts, next),
    }
}

/// A call past the authorization layer, for its handler: who calls what
/// (the layer's [`CallContext`]), its metrics label and its span.
struct Started {
    ctx: CallContext,
    /// The tenant label of the RPC metrics, when they carry one.
    tenant_label: Option<String>,
    span: tracing::Span,
}

impl Started {
    /// Takes the request apart; records which tenants its connection
    /// serves (affinity) and opens the call's span.
    fn of<Req: Scoped>(
        observers: &Observers,
        request: Request<Req>,
    ) -> Result<(Self, Req), Status> {
        let (metadata, mut extensions, req) = request.into_parts();
        observers.metrics.affinity(
            Affinity::of(
                &observers.affinity_header,
                &metadata,
                std::iter::once(req.tenant_id()),
            )
            .as_str(),
        );
        let Some(ctx) = extensions.remove::<CallContext>() else {
            // Only possible if the server were assembled without the layer.
            return Err(AccessError::NoContext.into());
        };
        let tenant_label = observers
            .metrics
            .tenant_labels()
            .then(|| req.tenant_id().to_owned());
        // Off unless exported (OTLP) or asked for in RUST_LOG: no cost then.
        let span = tracing::debug_span!(
            target: crate::telemetry::RPC_TARGET,
            "rpc",
            otel.name = %ctx.method,
            rpc.method = %ctx.method,
            caller = %ctx.identity,
            tenant_id = %Escaped(req.tenant_id()),
            request_id = ctx.request_id.as_deref().unwrap_or_default(),
            code = tracing::field::Empty,
        );
        Ok((
            Self {
                ctx,
                tenant_label,
                span,
            },
            req,
        ))
    }

    /// The call's code on its span and in the RPC metrics.
    fn end<T>(&self, observers: &Observers, result: &Result<T, Status>) {
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.span.record("code", code_name(code));
        observers.metrics.rpc(
            &self.ctx.method,
            code,
            self.tenant_label.as_deref(),
            self.ctx.started.elapsed(),
        );
    }
}

/// Runs `call` under the request deadline. A call that completes at its
/// first poll (a cache hit waits for nothing) never arms a timer; one that
/// waits gets the deadline from then on.
async fn within<T>(
    limit: std::time::Duration,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let mut call = std::pin::pin!(call);
    if let Some(done) = futures::FutureExt::now_or_never(call.as_mut()) {
        return done;
    }
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(Status::deadline_exceeded(format!(
            "the call did not finish within the server's request_timeout ({})",
            humantime::format_duration(limit)
        )))
    })
}

async fn serve_inner<Req, Resp, Fut>(
    observers: &Observers,
    ctx: &CallContext,
    req: Req,
    handler: impl FnOnce(Req) -> Fut,
) -> Result<Response<Resp>, Status>
where
    Req: Scoped,
    Resp: Audited,
    Fut: Future<Output = Result<Resp, Status>>,
{
    let audit = &observers.audit;
    let facts = authorize(&mut &**audit, ctx, &req)?;
    run(audit, ctx, observers.request_timeout, facts, req, handler).await
}

/// The tenant check of the authorization policy. A refusal is audited
/// here and returned as the answer; an allowed call gets what its audit
/// record will say about the request (None when audit is off: no digests,
/// no notes, no clocks).
fn authorize(
    out: &mut impl Recorder,
    ctx: &CallContext,
    req: &impl Scoped,
) -> Result<Option<Facts>, Status> {
    let audit = out.log();
    let refused: Option<Status> = match (&ctx.grant, claimed_reason(req)) {
        (_, Err(invalid)) => Some(invalid),
        (None, _) => Some(
            AccessError::MethodDenied {
                identity: ctx.identity.to_string(),
                method: ctx.method.to_string(),
                tenant_id: Some(req.tenant_id().to_owned()),
            }
            .into(),
        ),
        (Some(grant), Ok(reason)) => match grant.allows(req.tenant_id(), reason) {
            Permit::Granted => None,
            Permit::TenantDenied => Some(
                AccessError::TenantDenied {
                    identity: ctx.identity.to_string(),
                    method: ctx.method.to_string(),
                    tenant_id: req.tenant_id().to_owned(),
                }
                .into(),
            ),
            Permit::ReasonDenied => Some(
                AccessError::ReasonDenied {
                    identity: ctx.identity.to_string(),
                    method: ctx.method.to_string(),
                    tenant_id: req.tenant_id().to_owned(),
                    reason: reason.unwrap_or_default(),
                }
                .into(),
            ),
        },
    };
    if let Some(refused) = refused {
        tracing::info!(caller = %ctx.identity, method = %ctx.method, tenant_id = %Escaped(req.tenant_id()), error = %refused.message(), "call refused before it reached a key");
        let facts = audit.enabled().then(|| Facts::of(req, audit.writes()));
        let answer = finish::<()>(out, ctx, facts, None, Err(refused));
        return Err(answer
            .err()
            .unwrap_or_else(|| Status::internal("a denied call was answered")));
    }
    Ok(audit.enabled().then(|| Facts::of(req, audit.writes())))
}

/// The reason a request claims, checked (`None`: its method takes none); a
/// malformed justification is INVALID_ARGUMENT, audited like a refusal.
fn claimed_reason(req: &impl Scoped) -> Result<Option<Reason>, Status> {
    let Some((number, detail)) = req.justification() else {
        return Ok(None);
    };
    // The detail is checked here too: what is refused is refused before
    // any policy or key is consulted, with one message.
    crate::access::check(number, detail)
        .map(Some)
        .map_err(|why| crate::broker::BrokerError::InvalidRequest(why).into())
}

/// Runs an authorized call's handler under the request deadline (`limit`)
/// and writes its audit record (`facts` is None when audit is off): a call
/// cut by the deadline is recorded as such.
async fn run<Req, Resp, Fut>(
    audit: &AuditLog,
    ctx: &CallContext,
    limit: std::time::Duration,
    facts: Option<Facts>,
    req: Req,
    handler: impl FnOnce(Req) -> Fut,
) -> Result<Response<Resp>, Status>
where
    Resp: Audited,
    Fut: Future<Output = Result<Resp, Status>>,
{
    let durable = facts.is_some() && audit.fail_closed() && changes_state(&ctx.method);
    if let Some(facts) = facts.as_ref().filter(|_| durable) {
        // The intent is on disk before anything is committed: a change that
        // cannot be audited is never made.
        if let Err(err) = audit.write_durable(&facts.record(ctx, "INTENT", None, None)) {
            tracing::error!(error = %err, request_id = ctx.request_id.as_deref().unwrap_or_default(), "audit record of an intended change not written; refused");
            return Err(AccessError::AuditUnavailable(err.to_string()).into());
        }
    }
    // The handler's future is the largest part of every call's state and is
    // moved with it: one await point holds it, whichever path this is.
    // Notes (provider calls, request ids) are for records a sink writes.
    let notes = (facts.is_some() && audit.writes()).then(|| Arc::new(audit::CallNotes::default()));
    let call = match &notes {
        Some(notes) => Either::Left(audit::scoped(Arc::clone(notes), handler(req))),
        None => Either::Right(handler(req)),
    };
    let result = within(limit, call).await;
    if let Some(facts) = facts.as_ref().filter(|_| durable) {
        let record = facts.outcome(ctx, notes.as_deref(), &result);
        if let Err(err) = audit.write(&record) {
            // The intent record exists; the caller gets the true answer.
            tracing::error!(error = %err, request_id = record.request_id, "audit record of a change's outcome not written (its intent was)");
        }
        return result.map(Response::new);
    }
    finish(&mut &*audit, ctx, facts, notes.as_deref(), result)
}

#[cfg(test)]
mod tests;
