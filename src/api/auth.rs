//! The layer every RPC passes before any handler: who is calling (from the
//! connection), may they call this method at all (the policy), and which
//! request id the call is logged under. Denials are answered and audited
//! here, before the request body is even decoded. The tenant part of the
//! policy needs the decoded request: handlers check it first thing, through
//! the [`CallContext`] this layer attaches (see `api::call`).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::Status;

use crate::api::Observers;
use crate::audit::AuditRecord;
use crate::authz::{Grant, PolicySource, UNAUTHENTICATED};
use crate::net::incoming::{ActiveRpc, PeerInfo};

/// Methods served to anyone who can connect: probes carry no identity.
const OPEN_PREFIXES: &[&str] = &["grpc.health.v1.Health/"];

/// Request metadata naming the caller's request id (echoed in the response).
/// A parsed name: looked up on every call, a `&str` was parsed every time.
pub(crate) static REQUEST_ID_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-request-id");

/// What the layer learned about a call, for its handler.
#[derive(Debug, Clone)]
pub(crate) struct CallContext {
    pub identity: Arc<str>,
    pub peer: Option<std::net::SocketAddr>,
    pub method: Arc<str>,
    /// The caller's `x-request-id`, or one made up when the call is audited.
    pub request_id: Option<Arc<str>>,
    /// `None`: no rule grants the method at all. The call still reaches its
    /// handler, which refuses it once the request names its tenant, so the
    /// denial and its audit record say which tenant was targeted.
    pub grant: Option<Grant>,
    pub started: Instant,
}

/// Methods whose requests name a tenant: a method-level denial of these is
/// answered by the handler (see [`CallContext::grant`]).
fn names_tenant(method: &str) -> bool {
    crate::authz::METHODS.contains(&method) && method.starts_with("keybroker.v1.")
}

/// Shared by every connection's copy of the layer.
#[derive(Debug, Clone)]
pub(crate) struct AuthLayer {
    policy: Arc<PolicySource>,
    observers: Arc<Observers>,
}

impl AuthLayer {
    pub(crate) fn new(policy: Arc<PolicySource>, observers: Arc<Observers>) -> Self {
        Self { policy, observers }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

/// The caller's request id when it is short printable ASCII; else a new one
/// when the audit log or a trace will record it, else none (nothing would
/// show it).
fn request_id<B>(request: &http::Request<B>, audited: bool) -> Option<Arc<str>> {
    let given = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()));
    match given {
        Some(id) => Some(id.into()),
        // 128 random bits from the thread's fast generator (seeded per
        // process): unique, and the system CSPRNG cost some 2,300
        // instructions per call for a value that need not be secret.
        None if audited => Some(hex::encode(fastrand::u128(..).to_le_bytes()).into()),
        None => None,
    }
}

/// Shared names, so the hot path allocates no strings per call.
static UNAUTHENTICATED_ID: LazyLock<Arc<str>> = LazyLock::new(|| UNAUTHENTICATED.into());
static METHOD_NAMES: LazyLock<Vec<Arc<str>>> = LazyLock::new(|| {
    crate::authz::METHODS
        .iter()
        .map(|m| Arc::from(*m))
        .collect()
});

fn method_name(path: &str) -> Arc<str> {
    let method = path.trim_start_matches('/');
    METHOD_NAMES
        .iter()
        .find(|m| &***m == method)
        .cloned()
        .unwrap_or_else(|| method.into())
}

/// The method a policy grants for `method` (a batch method as its single
/// counterpart), shared: no allocation per call.
fn granted_method(method: &Arc<str>) -> Arc<str> {
    let granted = crate::authz::granted_as(method);
    if granted == &**method {
        return Arc::clone(method);
    }
    method_name(granted)
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = AuthFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // Counts as activity on the connection until the answer is ready
        // (the idle timeout never closes a connection mid-call).
        let active = request
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.activity.begin());
        let path = request.uri().path();
        if OPEN_PREFIXES
            .iter()
            .any(|p| path.trim_start_matches('/').starts_with(p))
        {
            return AuthFuture::call(inner.call(request), None, active);
        }
        let started = Instant::now();
        let method = method_name(path);
        let peer = request.extensions().get::<PeerInfo>();
        let identity: Arc<str> = peer
            .and_then(|p| p.identity.clone())
            .unwrap_or_else(|| Arc::clone(&UNAUTHENTICATED_ID));
        let remote = peer.and_then(|p| p.remote_addr);
        // A sink's records or a trace show it; the access log alone keeps
        // the caller's id but mints none (an id echoed on every response
        // churns the HPACK table: ~3,800 instructions per call, callgrind).
        let wants_id = self.layer.observers.audit.writes()
            || tracing::enabled!(target: crate::telemetry::RPC_TARGET, tracing::Level::DEBUG);
        let request_id = request_id(&request, wants_id);
        let echo = request_id
            .as_deref()
            .and_then(|id| http::HeaderValue::from_str(id).ok());
        let policy = self.layer.policy.current();
        let grant = policy.grant(Arc::clone(&identity), granted_method(&method));
        if grant.is_none() && !names_tenant(&method) {
            let status = Status::from(AccessError::MethodDenied {
                identity: identity.to_string(),
                method: method.to_string(),
                tenant_id: None,
            });
            let record = AuditRecord {
                time: crate::audit::rfc3339_now(),
                request_id: request_id.as_deref().unwrap_or_default(),
                caller: &identity,
                peer: remote.map(|a| a.to_string()),
                method: &method,
                tenant_id: None,
                key_binding: None,
                key_version: None,
                wrapped_key_sha256: None,
                outcome: crate::metrics::code_name(status.code()),
                error: Some(status.message()),
                latency_us: elapsed_us(started),
                cache_hit: None,
                provider_calls: 0,
                provider_request_id: None,
                reason: None,
                reason_detail: None,
            };
            self.layer
                .observers
                .metrics
                .rpc(&method, status.code(), None, started.elapsed());
            if let Err(err) = self.layer.observers.audit.write(&record) {
                tracing::error!(error = %err, "audit record of a denied call not written");
            }
            tracing::info!(caller = %identity, method = %crate::text::Escaped(&method), request_id = request_id.as_deref().unwrap_or_default(), "call denied by the authorization policy");
            let mut response = status.into_http();
            if let Some(echo) = echo {
                response.headers_mut().insert(&REQUEST_ID_HEADER, echo);
            }
            return AuthFuture::answer(response);
        }
        request.extensions_mut().insert(CallContext {
            identity,
            peer: remote,
            method,
            request_id,
            grant,
            started,
        });
        AuthFuture::call(inner.call(request), echo, active)
    }
}

pin_project_lite::pin_project! {
    /// The answer of [`AuthService`]: the inner call's, with the request id
    /// echoed, or a refusal made before the call. A named future rather
    /// than a boxed block: one allocation and one copy of the inner future
    /// less per RPC.
    pub struct AuthFuture<F> {
        #[pin]
        step: Step<F>,
        echo: Option<http::HeaderValue>,
        // Dropped when the answer is ready: the idle timeout never closes a
        // connection mid-call.
        active: Option<ActiveRpc>,
    }
}

pin_project_lite::pin_project! {
    #[project = StepProj]
    enum Step<F> {
        Call { #[pin] future: F },
        Answer { response: Option<http::Response<tonic::body::Body>> },
    }
}

impl<F> AuthFuture<F> {
    fn call(future: F, echo: Option<http::HeaderValue>, active: Option<ActiveRpc>) -> Self {
        Self {
            step: Step::Call { future },
            echo,
            active,
        }
    }

    fn answer(response: http::Response<tonic::body::Body>) -> Self {
        Self {
            step: Step::Answer {
                response: Some(response),
            },
            echo: None,
            active: None,
        }
    }
}

impl<F, E> Future for AuthFuture<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.step.project() {
            StepProj::Call { future } => match std::task::ready!(future.poll(cx)) {
                Ok(response) => response,
                Err(err) => {
                    this.active.take();
                    return Poll::Ready(Err(err));
                }
            },
            StepProj::Answer { response } => response.take().unwrap_or_else(|| {
                Status::internal("an answer was polled after it completed").into_http()
            }),
        };
        this.active.take();
        if let Some(echo) = this.echo.take() {
            response.headers_mut().insert(&REQUEST_ID_HEADER, echo);
        }
        Poll::Ready(Ok(response))
    }
}

pub(crate) fn elapsed_us(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Why a caller was refused before its request reached the key code.
/// Mapped to a status in `api::status` like every other error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AccessError {
    #[error(
        "caller '{identity}' is not allowed to call {method}{} (no rule of the authorization policy grants it)",
        tenant_id.as_deref().map(|t| format!(" for tenant {}", crate::text::Quoted(t))).unwrap_or_default()
    )]
    MethodDenied {
        identity: String,
        method: String,
        /// The tenant the request named, when it was decoded.
        tenant_id: Option<String>,
    },
    #[error(
        "caller '{identity}' is not allowed to call {method} for tenant {}",
        crate::text::Quoted(tenant_id)
    )]
    TenantDenied {
        identity: String,
        method: String,
        tenant_id: String,
    },
    #[error(
        "caller '{identity}' may call {method} for tenant {} but not claim the access reason {reason} (no rule of the authorization policy lists it in `reasons`)",
        crate::text::Quoted(tenant_id)
    )]
    ReasonDenied {
        identity: String,
        method: String,
        tenant_id: String,
        reason: crate::access::Reason,
    },
    #[error(
        "the audit log cannot be written and audit is fail-closed; no key is returned until it can ({0})"
    )]
    AuditUnavailable(String),
    #[error("the request did not pass the authorization layer")]
    NoContext,
}
