//! Prometheus metrics, served on their own HTTP port (`/metrics`), apart
//! from gRPC so scrapers need no client certificate. No tenant ids in
//! labels unless `metrics_tenant_labels` asks for them: a platform has many
//! tenants, and label cardinality is memory in every Prometheus.
//!
//! One job past 600 lines: the registry of every metric and its HTTP
//! endpoint; the domains answer through the traits defined here.

use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
    /// Empty unless tenant labels are enabled.
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
    operation: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderOpLabels {
    provider: String,
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabels {
    name: String,
}

/// The `name` labels of `keybroker_affinity_header_total`: what
/// `api::affinity` classifies a call's header as.
pub(crate) const AFFINITY_NAMES: [&str; 3] = ["matched", "absent", "other_tenant"];
/// Values kept elsewhere as plain atomics (cache, STS, audit, watcher),
/// copied into the registry at scrape time. Each domain answers through a
/// trait defined here and implemented next to its counters, so this module
/// knows no domain.
#[derive(Debug, Default)]
pub struct Sources {
    pub cache: Option<Arc<dyn CacheSource>>,
    pub assume_role_calls: Option<Arc<std::sync::atomic::AtomicU64>>,
    pub audit: Option<Arc<dyn AuditSource>>,
    pub key_states: Option<Arc<dyn KeyStateSource>>,
    pub identities: Option<Arc<dyn IdentitySource>>,
    /// The platform keyring: the state of its HSM seal, legacy unwraps.
    pub platform_keyring: Option<Arc<dyn KeyringSource>>,
    pub registry: Option<Arc<dyn RegistrySource>>,
}

/// The DEK cache's counters, read at scrape time.
#[async_trait::async_trait]
pub trait CacheSource: Send + Sync + std::fmt::Debug {
    /// hits, misses, load failures, evictions, served over share.
    fn counts(&self) -> [u64; 5];
    fn entries(&self) -> u64;
    /// Runs pending maintenance so the entry count is current.
    async fn settle(&self);
}

/// Audit records written and failed, read at scrape time.
pub trait AuditSource: Send + Sync + std::fmt::Debug {
    fn written(&self) -> u64;
    fn failed(&self) -> u64;
}

/// The local keyrings' state, read at scrape time.
pub trait KeyringSource: Send + Sync + std::fmt::Debug {
    /// Whether the platform keyring's HSM seal answered its last check
    /// (None: not sealed).
    fn seal_usable(&self) -> Option<bool>;
    /// Wrapped keys of the legacy local layout read since start.
    fn legacy_unwraps(&self) -> u64;
}

/// The registry's health as the data plane sees it, read at scrape time.
pub trait RegistrySource: Send + Sync + std::fmt::Debug {
    /// How long the registry has not answered (None: it answers).
    fn outage(&self) -> Option<Duration>;
    /// Requests answered from tenant views as last read, for want of a
    /// registry.
    fn stale_view_serves(&self) -> u64;
}

/// Sizes of the per-identity client caches, read at scrape time.
pub trait IdentitySource: Send + Sync + std::fmt::Debug {
    /// (cache name, live entries).
    fn identity_counts(&self) -> Vec<(&'static str, u64)>;
}

/// Results of key-state checks, kept by whoever checks (the watcher) and
/// read at scrape time. A trait, so metrics need not know the watcher.
pub trait KeyStateSource: Send + Sync + std::fmt::Debug {
    /// Checks so far by result: ok, revoked, restored, outage.
    fn check_totals(&self) -> CheckCounts;
    /// Customer bindings by state name, as of the last pass.
    fn bindings_by_state(&self) -> Vec<(&'static str, u64)>;
}

/// Key-state checks so far, by result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckCounts {
    pub ok: u64,
    pub revoked: u64,
    pub restored: u64,
    pub outages: u64,
}

/// Counters already exported, so a scrape adds only what is new.
#[derive(Debug, Default)]
struct Exported {
    values: std::collections::HashMap<&'static str, u64>,
}

pub struct Metrics {
    tenant_labels: bool,
    /// Encoding needs the registry; registration happens once, at build.
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: Family<MethodLabels, Histogram>,
    provider_calls: Family<ProviderLabels, Counter>,
    provider_duration: Family<ProviderOpLabels, Histogram>,
    quota_rejections: Family<NameLabels, Counter>,
    cache_events: Family<NameLabels, Counter>,
    cache_entries: Gauge,
    sts_assume_role: Counter,
    legacy_local_unwraps: Counter,
    audit_records: Family<NameLabels, Counter>,
    watcher_checks: Family<NameLabels, Counter>,
    bindings: Family<NameLabels, Gauge>,
    /// Calls by how their affinity header matched, indexed like
    /// `Affinity::ALL`: handles made once, so the hot path only increments.
    affinity: [Counter; 3],
    /// Live per-customer-identity clients (AWS role sessions, GCP
    /// impersonated clients), read at scrape.
    identities: Family<NameLabels, Gauge>,
    registry_outage: Gauge<f64, std::sync::atomic::AtomicU64>,
    stale_view_serves: Counter,
    platform_key_seal: Gauge,
    /// Per (method, code) counter and per-method histogram handles of the
    /// known methods, made on first use: the hot path neither allocates
    /// labels nor takes the family's lock.
    rpc_handles: Vec<RpcHandles>,
    /// The methods `rpc_handles` are indexed by.
    methods: &'static [&'static str],
    /// Filled once the server is assembled; read at scrape.
    sources: Mutex<Sources>,
    exported: Mutex<Exported>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("tenant_labels", &self.tenant_labels)
            .finish_non_exhaustive()
    }
}

/// Handles of one known method.
struct RpcHandles {
    by_code: [std::sync::OnceLock<Counter>; 17],
    duration: std::sync::OnceLock<Histogram>,
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~13 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

impl Metrics {
    /// `methods`: the RPCs whose counters and histograms are made once and
    /// reached by index on the hot path (the authorization policy's list).
    pub fn new(tenant_labels: bool, methods: &'static [&'static str]) -> Self {
        let mut registry = Registry::with_prefix("keybroker");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rpc_requests",
            "RPCs by method and gRPC code",
            rpc_requests.clone(),
        );
        let rpc_duration = Family::<MethodLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "rpc_duration_seconds",
            "RPC latency by method",
            rpc_duration.clone(),
        );
        let provider_calls = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "provider_calls",
            "Key provider (KMS, keyring) calls by provider, operation and outcome",
            provider_calls.clone(),
        );
        let provider_duration = Family::<ProviderOpLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "provider_call_duration_seconds",
            "Key provider call latency",
            provider_duration.clone(),
        );
        let quota_rejections = Family::<NameLabels, Counter>::default();
        registry.register(
            "quota_rejections",
            "Provider calls refused by the KMS quota (name = tenant or global)",
            quota_rejections.clone(),
        );
        let cache_events = Family::<NameLabels, Counter>::default();
        registry.register(
            "cache_events",
            "DEK cache hits, misses, load failures, evictions and keys served uncached because their tenant held its share (over_share)",
            cache_events.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "cache_entries",
            "Unwrapped keys held in memory",
            cache_entries.clone(),
        );
        let sts_assume_role = Counter::default();
        registry.register(
            "sts_assume_role",
            "STS AssumeRole calls",
            sts_assume_role.clone(),
        );
        let legacy_local_unwraps = Counter::default();
        registry.register(
            "legacy_local_unwraps",
            "Wrapped keys of the legacy local layout read (zero for long: legacy_local_wraps can be refuse)",
            legacy_local_unwraps.clone(),
        );
        let audit_records = Family::<NameLabels, Counter>::default();
        registry.register(
            "audit_records",
            "Audit records written and lost (name = written or failed)",
            audit_records.clone(),
        );
        let watcher_checks = Family::<NameLabels, Counter>::default();
        registry.register(
            "watcher_checks",
            "Key-state checks by result (ok, revoked, restored, outage)",
            watcher_checks.clone(),
        );
        let bindings = Family::<NameLabels, Gauge>::default();
        registry.register(
            "key_bindings",
            "Customer key bindings by state, as of the watcher's last pass",
            bindings.clone(),
        );
        let affinity_family = Family::<NameLabels, Counter>::default();
        registry.register(
            "affinity_header",
            "Calls by their tenant-affinity header: matched, absent, other_tenant",
            affinity_family.clone(),
        );
        let affinity = AFFINITY_NAMES.map(|name| {
            affinity_family
                .get_or_create(&NameLabels {
                    name: name.to_owned(),
                })
                .clone()
        });
        let identities = Family::<NameLabels, Gauge>::default();
        registry.register(
            "identity_clients",
            "Live clients per customer identity (bounded, evicted when idle)",
            identities.clone(),
        );
        let registry_outage = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "registry_outage_seconds",
            "How long the key registry has not answered a tenant view refresh (0: it answers); while above 0, tenants are served from their views as last read, for up to registry_cache_ttl + registry_outage_grace",
            registry_outage.clone(),
        );
        let stale_view_serves = Counter::default();
        registry.register(
            "registry_stale_view_serves",
            "Refreshes that failed for want of a registry and served the tenant view as last read",
            stale_view_serves.clone(),
        );
        let platform_key_seal = Gauge::default();
        registry.register(
            "platform_key_seal_usable",
            "0 when the HSM key sealing the platform keyring is not usable (this replica serves from memory, but none could start); 1 otherwise, and for an unsealed keyring",
            platform_key_seal.clone(),
        );
        Self {
            tenant_labels,
            registry,
            affinity,
            identities,
            registry_outage,
            stale_view_serves,
            platform_key_seal,
            rpc_requests,
            rpc_duration,
            provider_calls,
            provider_duration,
            quota_rejections,
            cache_events,
            cache_entries,
            sts_assume_role,
            legacy_local_unwraps,
            audit_records,
            watcher_checks,
            bindings,
            methods,
            rpc_handles: methods
                .iter()
                .map(|_| RpcHandles {
                    by_code: Default::default(),
                    duration: std::sync::OnceLock::new(),
                })
                .collect(),
            sources: Mutex::default(),
            exported: Mutex::default(),
        }
    }

    pub fn tenant_labels(&self) -> bool {
        self.tenant_labels
    }

    pub fn set_sources(&self, sources: Sources) {
        *self.sources.lock() = sources;
    }

    pub fn rpc(&self, method: &str, code: tonic::Code, tenant_id: Option<&str>, elapsed: Duration) {
        let known = self.methods.iter().position(|m| *m == method);
        if let (Some(index), false) = (known, self.tenant_labels) {
            let handles = &self.rpc_handles[index];
            let slot = usize::try_from(code as i32).unwrap_or(0).min(16);
            handles.by_code[slot]
                .get_or_init(|| self.rpc_counter(method, code, String::new()))
                .inc();
            handles
                .duration
                .get_or_init(|| {
                    self.rpc_duration
                        .get_or_create(&MethodLabels {
                            method: method.to_owned(),
                        })
                        .clone()
                })
                .observe(elapsed.as_secs_f64());
            return;
        }
        let tenant = match (self.tenant_labels, tenant_id) {
            (true, Some(t)) => t.to_owned(),
            _ => String::new(),
        };
        self.rpc_counter(method, code, tenant).inc();
        self.rpc_duration
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    fn rpc_counter(&self, method: &str, code: tonic::Code, tenant: String) -> Counter {
        self.rpc_requests
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: code_name(code).to_owned(),
                tenant,
            })
            .clone()
    }

    /// Counts a call by how its affinity header matched (one of
    /// [`AFFINITY_NAMES`]; the API layer classifies).
    pub(crate) fn affinity(&self, name: &str) {
        if let Some(index) = AFFINITY_NAMES.iter().position(|n| *n == name) {
            self.affinity[index].inc();
        }
    }

    pub fn provider_call(&self, provider: &str, operation: &str, outcome: &str, elapsed: Duration) {
        self.provider_calls
            .get_or_create(&ProviderLabels {
                provider: provider.to_owned(),
                operation: operation.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.provider_duration
            .get_or_create(&ProviderOpLabels {
                provider: provider.to_owned(),
                operation: operation.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// A KMS call refused by the server's quota (`global`) or the tenant's.
    pub fn quota_rejection(&self, global: bool, tenant_id: &str) {
        let name = match global {
            true => "global".to_owned(),
            false if self.tenant_labels => format!("tenant:{tenant_id}"),
            false => "tenant".to_owned(),
        };
        self.quota_rejections
            .get_or_create(&NameLabels { name })
            .inc();
    }

    /// Adds to `counter` what `total` gained since the last scrape.
    fn sync(&self, exported: &mut Exported, key: &'static str, total: u64, counter: &Counter) {
        let last = exported.values.insert(key, total).unwrap_or(0);
        counter.inc_by(total.saturating_sub(last));
    }

    /// [`encode`](Self::encode) after the cache's pending maintenance, so the
    /// entry count is current (moka counts lazily).
    pub async fn scrape(&self) -> Result<String, std::fmt::Error> {
        let cache = self.sources.lock().cache.clone();
        if let Some(cache) = cache {
            cache.settle().await;
        }
        self.encode()
    }

    /// The text exposition, after copying in the atomics kept elsewhere.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        {
            let (sources, mut exported) = (self.sources.lock(), self.exported.lock());
            let named = |family: &Family<NameLabels, Counter>, name: &str| {
                family
                    .get_or_create(&NameLabels {
                        name: name.to_owned(),
                    })
                    .clone()
            };
            if let Some(cache) = &sources.cache {
                let names = ["hit", "miss", "load_failure", "eviction", "over_share"];
                for (key, value) in names.into_iter().zip(cache.counts()) {
                    self.sync(&mut exported, key, value, &named(&self.cache_events, key));
                }
                self.cache_entries
                    .set(i64::try_from(cache.entries()).unwrap_or(i64::MAX));
            }
            if let Some(registry) = &sources.registry {
                self.sync(
                    &mut exported,
                    "stale_view_serves",
                    registry.stale_view_serves(),
                    &self.stale_view_serves,
                );
            }
            if let Some(calls) = &sources.assume_role_calls {
                self.sync(
                    &mut exported,
                    "sts",
                    calls.load(Ordering::Relaxed),
                    &self.sts_assume_role,
                );
            }
            if let Some(keyring) = &sources.platform_keyring {
                self.sync(
                    &mut exported,
                    "legacy_local_unwraps",
                    keyring.legacy_unwraps(),
                    &self.legacy_local_unwraps,
                );
            }
            if let Some(audit) = &sources.audit {
                self.sync(
                    &mut exported,
                    "audit_written",
                    audit.written(),
                    &named(&self.audit_records, "written"),
                );
                self.sync(
                    &mut exported,
                    "audit_failed",
                    audit.failed(),
                    &named(&self.audit_records, "failed"),
                );
            }
            if let Some(key_states) = &sources.key_states {
                let totals = key_states.check_totals();
                for (key, name, value) in [
                    ("w_ok", "ok", totals.ok),
                    ("w_revoked", "revoked", totals.revoked),
                    ("w_restored", "restored", totals.restored),
                    ("w_outage", "outage", totals.outages),
                ] {
                    self.sync(
                        &mut exported,
                        key,
                        value,
                        &named(&self.watcher_checks, name),
                    );
                }
                for (state, count) in key_states.bindings_by_state() {
                    self.bindings
                        .get_or_create(&NameLabels {
                            name: state.to_owned(),
                        })
                        .set(i64::try_from(count).unwrap_or(i64::MAX));
                }
            }
        }
        {
            let sources = self.sources.lock();
            let usable = sources
                .platform_keyring
                .as_ref()
                .and_then(|k| k.seal_usable())
                .unwrap_or(true);
            self.platform_key_seal.set(i64::from(usable));
            if let Some(registry) = &sources.registry {
                self.registry_outage
                    .set(registry.outage().map_or(0.0, |d| d.as_secs_f64()));
            }
            if let Some(identities) = &sources.identities {
                for (name, count) in identities.identity_counts() {
                    self.identities
                        .get_or_create(&NameLabels {
                            name: name.to_owned(),
                        })
                        .set(i64::try_from(count).unwrap_or(i64::MAX));
                }
            }
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// The canonical name of a gRPC code, as grpcurl and every gRPC library print it.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` (and `more`: the issuer's keys) on `listener`
/// until `shutdown` resolves.
pub(crate) async fn serve(
    metrics: Arc<Metrics>,
    more: axum::Router,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                match metrics.scrape().await {
                    Ok(text) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    ),
                    Err(_) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [(header::CONTENT_TYPE, "text/plain")],
                        "metrics encoding failed".to_owned(),
                    ),
                }
            }
        }),
    );
    axum::serve(listener, app.merge(more))
        .with_graceful_shutdown(shutdown)
        .await
}
