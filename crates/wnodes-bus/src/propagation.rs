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
