//! An in-process OTLP/gRPC trace collector.
//!
//! Built on `opentelemetry-proto`'s generated `TraceServiceServer`, served by tonic on a listener
//! we bind ourselves (`127.0.0.1:0` by default), so the port is ours. Point an OTLP/gRPC exporter
//! at [`OtlpCollector::endpoint`] and inspect what arrived with [`OtlpCollector::spans`] or
//! [`OtlpCollector::wait_for`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

/// One span as received by the collector, flattened for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectedSpan {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// 16 lowercase hex digits, `""` for a root span.
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// The `service.name` resource attribute (`""` if absent).
    pub service_name: String,
    /// Every span attribute, values in string form (arrays as `[a, b]`, maps as `{k=v, ..}`,
    /// bytes as hex).
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct Shared {
    spans: Mutex<Vec<CollectedSpan>>,
    arrived: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<CollectedSpan>> {
        self.spans.lock()
    }
}

/// An OTLP/gRPC trace collector running on the current Tokio runtime; stops on drop.
#[derive(Debug)]
pub struct OtlpCollector {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl OtlpCollector {
    /// Start on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0").await
    }

    /// Start on a specific address, e.g. `start_on("10.1.2.3:0")` inside a network namespace.
    pub async fn start_on(addr: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the OTLP collector on {addr}"))?;
        let addr = listener
            .local_addr()
            .context("reading the OTLP collector's address")?;
        let shared = Arc::new(Shared::default());
        let service = TraceServiceServer::new(Collector {
            shared: shared.clone(),
        });
        let (tx, rx) = oneshot::channel::<()>();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            let res = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            if let Err(err) = res {
                tracing::warn!(%err, "OTLP test collector stopped with an error");
            }
        });
        Ok(OtlpCollector {
            addr,
            shared,
            shutdown: Some(tx),
            task,
        })
    }

    /// `http://IP:PORT` — the value for an OTLP/gRPC exporter's endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the collector listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.shared.lock().clone()
    }

    /// Wait until `pred(&all_spans)` is true; on timeout the error names `what` and lists the
    /// spans seen.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[CollectedSpan]) -> bool,
    ) -> anyhow::Result<Vec<CollectedSpan>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before checking, so an export between the check and the wait
            // is not missed.
            let notified = self.shared.arrived.notified();
            let spans = self.spans();
            if pred(&spans) {
                return Ok(spans);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let spans = self.spans();
                if pred(&spans) {
                    return Ok(spans);
                }
                let mut listing = String::new();
                for s in &spans {
                    let _ = writeln!(
                        listing,
                        "  {} [{}] trace={} span={} parent={} {:?}",
                        s.name,
                        s.service_name,
                        s.trace_id,
                        s.span_id,
                        if s.parent_span_id.is_empty() {
                            "-"
                        } else {
                            &s.parent_span_id
                        },
                        s.attributes
                    );
                }
                bail!(
                    "timed out after {timeout:?} waiting for {what}; {} span(s) seen:\n{listing}",
                    spans.len()
                );
            }
        }
    }
}

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

#[derive(Debug, Clone)]
struct Collector {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = flatten(request.into_inner());
        if !spans.is_empty() {
            self.shared.lock().extend(spans);
            self.shared.arrived.notify_waiters();
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn flatten(req: ExportTraceServiceRequest) -> Vec<CollectedSpan> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let service_name = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .map(|kv| value_string(kv.value.as_ref()))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                out.push(CollectedSpan {
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    name: span.name,
                    service_name: service_name.clone(),
                    attributes: attributes(&span.attributes),
                });
            }
        }
    }
    out
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_string(kv.value.as_ref())))
        .collect()
}

fn value_string(v: Option<&AnyValue>) -> String {
    use any_value::Value;
    match v.and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => hex::encode(b),
        Some(Value::StringValueStrindex(i)) => format!("strindex:{i}"),
        Some(Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(|v| value_string(Some(v))).collect();
            format!("[{}]", items.join(", "))
        }
        Some(Value::KvlistValue(kv)) => {
            let items: Vec<String> = kv
                .values
                .iter()
                .map(|kv| format!("{}={}", kv.key, value_string(kv.value.as_ref())))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
    }
}

/// The trace id a job starter prints as `"(trace <32 hex>)"` in `text`.
pub fn trace_id_in(text: &str) -> Option<String> {
    let id = text.split("(trace ").nth(1)?.get(..32)?;
    id.chars()
        .all(|c| c.is_ascii_hexdigit())
        .then(|| id.to_owned())
}

/// Spans of `trace_id` by service name.
pub fn spans_by_service(spans: &[CollectedSpan], trace_id: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in spans.iter().filter(|s| s.trace_id == trace_id) {
        *m.entry(s.service_name.clone()).or_insert(0) += 1;
    }
    m
}

/// The spans of `trace_id`, checked to be one trace: a single root, and every other span's
/// parent inside it.
///
/// # Panics
/// When the spans of `trace_id` are not one tree.
pub fn one_trace<'a>(spans: &'a [CollectedSpan], trace_id: &str) -> Vec<&'a CollectedSpan> {
    let trace: Vec<&CollectedSpan> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let ids: std::collections::BTreeSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<_> = trace
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root span: {roots:#?}");
    for s in &trace {
        assert!(
            s.parent_span_id.is_empty() || ids.contains(s.parent_span_id.as_str()),
            "span {} ({}) has a parent outside the trace: {}",
            s.name,
            s.service_name,
            s.parent_span_id
        );
    }
    trace
}
