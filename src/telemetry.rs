//! Logs and traces. Logs go to stderr (text or JSON; `RUST_LOG` filters).
//! Every RPC runs in a span (target `keybroker::rpc`) carrying the method,
//! caller, tenant and request id; with `otlp_endpoint` set, those spans are
//! exported over OTLP/gRPC to a collector. The spans are at DEBUG level and
//! the log filter is per layer, so without OTLP (and without
//! `RUST_LOG=keybroker::rpc=debug`) no layer wants them and they cost nothing.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are written: for people, or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logs, traces and metrics: the `log_format`, `otlp_endpoint` and
/// `metrics_*` settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct TelemetrySettings {
    /// Log format.
    #[arg(
        id = "log_format",
        long = "log-format",
        env = "KEYBROKER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Export a span per RPC over OTLP/gRPC to this collector, e.g.
    /// http://otel-collector:4317 [default: off].
    #[arg(
        id = "otlp_endpoint",
        long = "otlp-endpoint",
        env = "KEYBROKER_OTLP_ENDPOINT"
    )]
    pub otlp_endpoint: Option<String>,
    /// Serve Prometheus metrics on this address (`/metrics`), e.g.
    /// 0.0.0.0:9090 [default: off].
    #[arg(
        id = "metrics_listen",
        long = "metrics-listen",
        env = "KEYBROKER_METRICS_LISTEN"
    )]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Add a tenant label to RPC metrics (one series per tenant: only for
    /// small deployments).
    #[arg(
        id = "metrics_tenant_labels",
        long = "metrics-tenant-labels",
        env = "KEYBROKER_METRICS_TENANT_LABELS",
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true"
    )]
    pub metrics_tenant_labels: bool,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

/// Target of the per-RPC spans.
pub const RPC_TARGET: &str = "keybroker::rpc";

/// Flushes exported spans when dropped.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still buffered; call before exit.
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(err) = provider.shutdown() {
                tracing::warn!(error = %err, "could not flush trace spans");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Installs the global subscriber. Must run inside the Tokio runtime (the
/// OTLP exporter is a tonic client).
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // The log filter applies to the log layer only: it must not decide for
    // the span exporter.
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr)
                    .with_filter(filter()),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(filter()),
            ),
        ),
    };
    let mut telemetry = Telemetry::default();
    let otel = match otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder_empty()
                        .with_service_name("keybroker")
                        .build(),
                )
                .build();
            let tracer = provider.tracer("keybroker");
            telemetry.provider = Some(provider);
            // Only keybroker's own spans leave the process, whatever RUST_LOG
            // turns on for the logs (h2 at trace is thousands of spans).
            let only_ours = tracing_subscriber::filter::Targets::new()
                .with_target("keybroker", tracing::Level::DEBUG);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(only_ours),
            )
        }
        None => None,
    };
    let _ = tracing_subscriber::registry()
        .with(text)
        .with(json)
        .with(otel)
        .try_init();
    Ok(telemetry)
}
