//! Logs and traces: `tracing` with a fmt layer (text or JSON) and an OpenTelemetry layer.
//! A tracer provider always exists (so spans have ids and `traceparent` propagates); spans are
//! exported over OTLP/gRPC only when an endpoint is configured.

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{
    EnvFilter, Layer, filter::LevelFilter, layer::SubscriberExt, util::SubscriberInitExt,
};

use crate::config::{CommonConfig, LogFormat};

/// The OpenTelemetry layer every WNoDeS process uses. Off: per-span thread id/name (a handler's
/// span is polled on whichever worker thread runs it, so they say nothing), source location
/// (every handler span comes from the same line of the consumer), and busy/idle time (two
/// clock reads at every poll of an instrumented future). Those three were a quarter of a
/// handled message's CPU in `wnodes-bench bus` (docs/benchmarks.md).
pub fn span_layer<S>(
    tracer: opentelemetry_sdk::trace::Tracer,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_location(false)
        .with_tracked_inactivity(false)
}

/// How long a stopping process waits for its last spans to be exported: more than the OTLP
/// exporter's own 10 s per export, so its retries run to their end.
pub const SHUTDOWN_EXPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Keeps the tracer provider; [`Telemetry::shutdown`] flushes it.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

thread_local! {
    /// The ids the next span built on this thread gets ([`start_run_span`]).
    static PRESET_IDS: std::cell::Cell<Option<(opentelemetry::trace::TraceId, opentelemetry::trace::SpanId)>> =
        const { std::cell::Cell::new(None) };
}

/// Random ids, except for the one span [`start_run_span`] builds with its run's ids.
#[derive(Debug, Default)]
struct RunIdGenerator(opentelemetry_sdk::trace::RandomIdGenerator);

impl opentelemetry_sdk::trace::IdGenerator for RunIdGenerator {
    fn new_trace_id(&self) -> opentelemetry::trace::TraceId {
        PRESET_IDS
            .get()
            .map_or_else(|| self.0.new_trace_id(), |(t, _)| t)
    }

    fn new_span_id(&self) -> opentelemetry::trace::SpanId {
        PRESET_IDS
            .get()
            .map_or_else(|| self.0.new_span_id(), |(_, s)| s)
    }
}

/// Starts the root span of a run's trace, `name` with the ids [`wnodes_bus::propagation::run_ids`]
/// derives from `run_key`, in the global tracer provider (a no-op one when telemetry is not
/// set up). The spans made under [`wnodes_bus::propagation::run_context`] are its children,
/// whichever process makes them. Only the job starter's side of a run calls this (once per
/// run); the span ends, and is exported, when dropped or ended.
pub fn start_run_span(run_key: &str, name: &'static str) -> opentelemetry::global::BoxedSpan {
    use opentelemetry::trace::{Tracer, TracerProvider};
    let tracer = opentelemetry::global::tracer_provider().tracer("wnodes-run");
    PRESET_IDS.set(Some(wnodes_bus::propagation::run_ids(run_key)));
    let span = tracer
        .span_builder(name)
        .with_kind(opentelemetry::trace::SpanKind::Internal)
        .with_attributes([KeyValue::new("wnodes.run", run_key.to_owned())])
        .start_with_context(&tracer, &opentelemetry::Context::new());
    PRESET_IDS.set(None);
    span
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter for {endpoint}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

impl Telemetry {
    /// Installs the global subscriber and propagator. Needs a Tokio runtime (the exporter).
    pub fn init(service: &str, common: &CommonConfig) -> Result<Self, TelemetryError> {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let resource = Resource::builder()
            .with_service_name(format!("wnodes-{service}"))
            .with_attributes([
                KeyValue::new("host.name", common.host.clone()),
                KeyValue::new("wnodes.site", common.site.clone()),
            ])
            .build();
        let mut builder = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_id_generator(RunIdGenerator::default());
        if let Some(endpoint) = &common.otlp_endpoint {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|source| TelemetryError::Exporter {
                    endpoint: endpoint.clone(),
                    source,
                })?;
            builder = builder.with_batch_exporter(exporter);
        }
        let provider = builder.build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        let tracer = provider.tracer(format!("wnodes-{service}"));
        let filter = EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(&common.log_level))
            .unwrap_or_else(|_| EnvFilter::new("info"));
        // Spans are traced at INFO whatever the log level: turning logs down must not break
        // the job's trace. The log filter applies to the fmt layer only.
        let otel = span_layer(tracer).with_filter(LevelFilter::INFO);
        let registry = tracing_subscriber::registry().with(otel);
        let res = match common.log_format {
            LogFormat::Json => registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .with_writer(std::io::stderr)
                        .with_filter(filter),
                )
                .try_init(),
            LogFormat::Text => registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        // Colours only on a terminal: log files and collectors get plain text.
                        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                        .with_filter(filter),
                )
                .try_init(),
        };
        res.map_err(|_| TelemetryError::AlreadyInstalled)?;
        Ok(Self { provider })
    }

    /// Exports what is left and stops the exporter. Blocks: call from a blocking thread (the
    /// runtime does). One shutdown, not a flush and then a shutdown: the SDK's flush gives up
    /// after a fixed 5 s while its export (with the exporter's own retries) goes on, and the
    /// shutdown queued behind it then had only its own 5 s. Here the whole export gets
    /// [`SHUTDOWN_EXPORT_TIMEOUT`].
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_EXPORT_TIMEOUT) {
            eprintln!("exporting the last spans failed: {e}");
        }
    }
}
