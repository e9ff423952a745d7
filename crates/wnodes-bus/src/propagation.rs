//! W3C trace context (`traceparent`/`tracestate`) through the global OpenTelemetry propagator
//! (the service runtime installs `TraceContextPropagator`): the one place that sets a span's
//! parent from a carried context, whatever carries it — NATS headers ([`set_parent_from`]), a
//! persisted map ([`set_parent_from_map`], the launcher's VM rows), gRPC metadata (the bridge
//! passes its extractor to [`set_parent_from_carrier`]) — and that captures the current one
//! ([`inject_current`], [`current_context_map`]).

use std::collections::{BTreeMap, HashMap};

use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Writes propagation fields into a NATS header map.
#[derive(Debug)]
pub struct NatsHeaderInjector<'a>(pub &'a mut async_nats::HeaderMap);

impl Injector for NatsHeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// Reads propagation fields from a NATS header map, case-insensitively (Go writes
/// `Traceparent`).
#[derive(Debug)]
pub struct NatsHeaderExtractor<'a>(pub &'a async_nats::HeaderMap);

impl Extractor for NatsHeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // The W3C names as constants: a `HeaderName` made from a `&str` allocates, and this
        // runs for every delivered message.
        const TRACEPARENT: async_nats::HeaderName =
            async_nats::HeaderName::from_static("traceparent");
        const TRACESTATE: async_nats::HeaderName =
            async_nats::HeaderName::from_static("tracestate");
        let exact = match key {
            "traceparent" => self.0.get(TRACEPARENT),
            "tracestate" => self.0.get(TRACESTATE),
            _ => self.0.get(key),
        };
        exact.map(|v| v.as_str()).or_else(|| {
            self.0
                .iter()
                .find(|(name, _)| AsRef::<str>::as_ref(*name).eq_ignore_ascii_case(key))
                .and_then(|(_, values)| values.first())
                .map(|v| v.as_str())
        })
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// Injects the current span's context into `headers`.
pub fn inject_current(headers: &mut async_nats::HeaderMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut NatsHeaderInjector(headers))
    });
}

/// The trace of a run: its trace id and the id of its root span, both derived from the run key
/// (SHA-256 of `wnodes-run-trace\0<run key>`: bytes 0–15 the trace id, 16–23 the span id).
/// Every process that publishes an event of the run, the host agent, the bridge reading an
/// LRMS record, a Slurm hook, starts from the same context, so one run is one trace whoever
/// sees it first and however often. The root span itself (`wnodes.run`) is exported by the
/// job starter's side (the host agent, `submit`, the bridge's `JobStarted` RPC) through
/// `wnodes_runtime::telemetry::start_run_span`; a run that only LRMS records tell of has no
/// exported root, and a trace viewer shows its top spans' parent as missing.
pub fn run_context(run_key: &str) -> opentelemetry::Context {
    use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceState};
    let (trace, span) = run_ids(run_key);
    let cx = SpanContext::new(
        trace,
        span,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    opentelemetry::Context::new().with_remote_span_context(cx)
}

/// The trace id and root span id of a run (see [`run_context`]).
pub fn run_ids(run_key: &str) -> (opentelemetry::trace::TraceId, opentelemetry::trace::SpanId) {
    use opentelemetry::trace::{SpanId, TraceId};
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"wnodes-run-trace\0");
    h.update(run_key.as_bytes());
    let digest = h.finalize();
    let mut trace = [0u8; 16];
    trace.copy_from_slice(&digest[..16]);
    let mut span = [0u8; 8];
    span.copy_from_slice(&digest[16..24]);
    // An all-zero id is invalid; a digest that starts with 16 (or 8) zero bytes does not occur
    // in practice, but the ids stay valid if it does.
    if trace == [0; 16] {
        trace[15] = 1;
    }
    if span == [0; 8] {
        span[7] = 1;
    }
    (TraceId::from_bytes(trace), SpanId::from_bytes(span))
}

/// The `traceparent` of [`run_context`]: `00-<trace id>-<virtual root span id>-01`.
pub fn run_traceparent(run_key: &str) -> String {
    use opentelemetry::trace::TraceContextExt;
    let cx = run_context(run_key);
    let sc = cx.span().span_context().clone();
    format!("00-{}-{}-01", sc.trace_id(), sc.span_id())
}

/// Makes `span` a child of `parent`; with an empty `parent`, a root span (a new trace). Call
/// right after creating the span, before entering it.
pub fn set_parent(span: &tracing::Span, parent: opentelemetry::Context) {
    if let Err(e) = span.set_parent(parent) {
        tracing::debug!(error = %crate::ErrorChain(&e), "Could not set the span's parent.");
    }
}

/// Makes `span` a child of the context any carrier holds (gRPC metadata, a map, headers).
pub fn set_parent_from_carrier(span: &tracing::Span, carrier: &dyn Extractor) {
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
    set_parent(span, parent);
}

/// Makes `span` a child of the context carried in `headers` (if any).
pub fn set_parent_from(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    if let Some(h) = headers {
        set_parent_from_carrier(span, &NatsHeaderExtractor(h));
    }
}

/// Makes `span` a child of a context persisted as a map (see [`current_context_map`]).
pub fn set_parent_from_map(span: &tracing::Span, trace: &BTreeMap<String, String>) {
    let map: HashMap<String, String> = trace.clone().into_iter().collect();
    set_parent_from_carrier(span, &map);
}

/// The current span's context as a map (`traceparent`, `tracestate`), to persist with work
/// that outlives the message (the launcher's VM rows).
pub fn current_context_map() -> BTreeMap<String, String> {
    let cx = tracing::Span::current().context();
    let mut map: HashMap<String, String> = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut map));
    map.into_iter().collect()
}

/// The trace id of the current span as 32 hex digits (all zeros when there is none).
pub fn current_trace_id() -> String {
    use opentelemetry::trace::TraceContextExt;
    tracing::Span::current()
        .context()
        .span()
        .span_context()
        .trace_id()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_s_trace_ids_derive_from_its_run_key_alone() {
        let (t1, s1) = run_ids("T1/slurm/42/1");
        assert_eq!(run_ids("T1/slurm/42/1"), (t1, s1));
        let (t2, s2) = run_ids("T1/slurm/42/2");
        assert_ne!(t1, t2, "another attempt is another trace");
        assert_ne!(s1, s2);
        let tp = run_traceparent("T1/slurm/42/1");
        assert_eq!(tp, format!("00-{t1}-{s1}-01"));
        assert_eq!(tp.len(), 55);
        use opentelemetry::trace::TraceContextExt;
        let cx = run_context("T1/slurm/42/1");
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!((sc.trace_id(), sc.span_id()), (t1, s1));
    }
}
