//! [`Bus`]: one NATS connection, the streams, and traced, de-duplicated, retried publishing.

use std::{sync::Arc, time::Duration};

use async_nats::{
    HeaderMap, HeaderName, HeaderValue,
    jetstream::{self, context::PublishAckFuture},
};
use bytes::Bytes;
use prost::Message;
use tokio::time::Instant;
use wnodes_proto::v1::Event;

use crate::{
    config::NatsConfig,
    connect,
    denial::Denials,
    error::BusError,
    event::{EventExt, EventType},
    layout,
    metrics::BusMetrics,
    propagation,
};

/// The W3C trace-context fields of one span, taken once and copied into each message.
#[derive(Debug, Default)]
struct TraceHeaders(Vec<(HeaderName, HeaderValue)>);

impl TraceHeaders {
    /// The current span's `traceparent`/`tracestate` (through the global propagator).
    fn current() -> Self {
        let mut h = HeaderMap::new();
        propagation::inject_current(&mut h);
        Self(
            h.iter()
                .flat_map(|(name, values)| values.iter().map(|v| (name.clone(), v.clone())))
                .collect(),
        )
    }
}

/// The headers of an event: `Nats-Msg-Id` = the event id, and the trace context. Nothing else:
/// the type is in the subject, and the CloudEvents attributes are in the envelope
/// ([`EventExt::cloudevent`]); every header costs the server and each consumer a parse per
/// message (ARCHITECTURE.md, "CloudEvents").
///
/// Published outside any trace (an LRMS record read by the bridge, a replay), an event of a run
/// gets its run's trace ([`propagation::run_traceparent`]), so that every event of one run is
/// in one trace whichever process publishes it.
fn event_headers(event: &Event, trace: &TraceHeaders) -> HeaderMap {
    let mut headers: HeaderMap = trace.0.iter().cloned().collect();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
    if trace.0.is_empty()
        && let Some(run) = &event.run
    {
        let key = crate::event::run_key(run);
        headers.insert("traceparent", propagation::run_traceparent(&key).as_str());
    }
    headers
}

/// How one publish attempt ended, short of an ack.
enum Attempt {
    /// No ack (timeout, disconnect, server error): retried with the same id.
    Failed(Box<dyn std::error::Error + Send + Sync>),
    /// The server's permissions refused it: never retried.
    Refused(String),
}

/// A connection to the event bus; cheap to clone.
#[derive(Debug, Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: NatsConfig,
    source: String,
    metrics: BusMetrics,
    denials: Denials,
}

/// What JetStream answered to a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Stream sequence of the stored message.
    pub sequence: u64,
    /// True when the server dropped it as a duplicate of the same `Nats-Msg-Id`.
    pub duplicate: bool,
}

impl Bus {
    /// Connects. `source` identifies this producer in events (`"<service>@<host>"`).
    pub async fn connect(
        cfg: &NatsConfig,
        source: &str,
        metrics: BusMetrics,
    ) -> Result<Self, BusError> {
        let denials = Denials::default();
        let client =
            connect::connect(cfg, source, Some(metrics.clone()), Some(denials.clone())).await?;
        Ok(Self::with_parts(client, cfg, source, metrics, denials))
    }

    /// Wraps an existing client.
    pub fn from_client(
        client: async_nats::Client,
        cfg: &NatsConfig,
        source: &str,
        metrics: BusMetrics,
    ) -> Self {
        Self::with_parts(client, cfg, source, metrics, Denials::default())
    }

    fn with_parts(
        client: async_nats::Client,
        cfg: &NatsConfig,
        source: &str,
        metrics: BusMetrics,
        denials: Denials,
    ) -> Self {
        let js = jetstream::new(client.clone());
        Self {
            inner: Arc::new(Inner {
                client,
                js,
                cfg: cfg.clone(),
                source: source.to_owned(),
                metrics,
                denials,
            }),
        }
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// `"<service>@<host>"`.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    pub fn config(&self) -> &NatsConfig {
        &self.inner.cfg
    }

    pub fn metrics(&self) -> &BusMetrics {
        &self.inner.metrics
    }

    /// True while the connection is up.
    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Checks that the events and dead-letter streams exist with the settings this process's
    /// `[nats]` section expects ([`layout`]). Never creates or changes them: that is the
    /// operator's `wnodesctl provision`.
    pub async fn check_streams(&self) -> Result<(), BusError> {
        let l = layout::StreamLayout::from(&self.inner.cfg);
        layout::check_stream(&self.inner.js, &layout::events_stream(&l, 0)).await?;
        layout::check_stream(&self.inner.js, &layout::dlq_stream(&l)).await
    }

    /// [`Bus::check_streams`], asked again every 500 ms while the check times out (a NATS
    /// cluster that lost a server answers nothing about a stream until the stream has elected a
    /// new leader; [`layout::is_unanswered`]), for up to `patience`. Any other outcome (the
    /// stream is missing or differs, no JetStream, access refused) returns at once. For a
    /// short-lived client that checks once, such as the job starter; a service's readiness
    /// check asks again anyway.
    pub async fn check_streams_within(&self, patience: Duration) -> Result<(), BusError> {
        let deadline = Instant::now() + patience;
        loop {
            match self.check_streams().await {
                Err(e) if layout::is_unanswered(&e) && Instant::now() < deadline => {
                    tracing::info!(
                        error = %crate::ErrorChain(&e),
                        "The streams are not answering (a NATS server lost?); asking again."
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    }

    /// Sends one publish and waits for its ack, or for the server to refuse it.
    async fn send(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<jetstream::publish::PublishAck, Attempt> {
        let sent = self
            .inner
            .js
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await;
        let ack = match sent {
            Ok(ack) => ack,
            Err(e) => return Err(Attempt::Failed(Box::new(e))),
        };
        tokio::select! {
            res = ack => res.map_err(|e| Attempt::Failed(Box::new(e))),
            refusal = self.inner.denials.refused(subject) => Err(Attempt::Refused(refusal)),
        }
    }

    /// Publishes `event` to its subject with `Nats-Msg-Id` = `event.id` and the current span's
    /// `traceparent`/`tracestate`, and waits for JetStream's ack. Retries (same id, so never
    /// stored twice) until `publish_timeout`.
    pub async fn publish(&self, event: &Event) -> Result<Published, BusError> {
        let trace = TraceHeaders::current();
        self.publish_prepared(event, &trace).await
    }

    /// [`Self::publish`] with the trace headers already taken from the current span. Each
    /// attempt builds the headers from the event (same `Nats-Msg-Id`), so the first attempt
    /// needs no copy of them.
    async fn publish_prepared(
        &self,
        event: &Event,
        trace: &TraceHeaders,
    ) -> Result<Published, BusError> {
        let ty = event.event_type().ok_or(BusError::EmptyEvent)?;
        let subject = event.subject()?;
        let payload = Bytes::from(event.encode_to_vec());
        self.publish_retrying(
            &subject,
            || event_headers(event, trace),
            payload,
            ty.name(),
            || self.inner.metrics.published_type(ty),
        )
        .await
    }

    /// Publishes a pre-built message with retries (same headers, so the same `Nats-Msg-Id`).
    pub async fn publish_raw(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        metric_label: &str,
    ) -> Result<Published, BusError> {
        self.publish_retrying(
            subject,
            || headers.clone(),
            payload,
            metric_label,
            || self.inner.metrics.published(metric_label),
        )
        .await
    }

    /// The retry loop of every publish: the same headers (so the same `Nats-Msg-Id`) each
    /// attempt, backoff doubling to 2 s, until `publish_timeout`; a refusal by the server's
    /// permissions fails at once.
    async fn publish_retrying(
        &self,
        subject: &str,
        headers: impl Fn() -> HeaderMap,
        payload: Bytes,
        metric_label: &str,
        on_published: impl Fn(),
    ) -> Result<Published, BusError> {
        let started = Instant::now();
        let deadline = started + self.inner.cfg.publish_timeout;
        let mut attempts = 0u32;
        let mut delay = Duration::from_millis(50);
        loop {
            attempts += 1;
            match self.send(subject, headers(), payload.clone()).await {
                Ok(ack) => {
                    on_published();
                    return Ok(Published {
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                }
                Err(Attempt::Refused(message)) => {
                    return Err(BusError::PermissionDenied(message));
                }
                Err(Attempt::Failed(source)) if Instant::now() + delay >= deadline => {
                    return Err(BusError::Publish {
                        subject: subject.to_owned(),
                        attempts,
                        elapsed_ms: started.elapsed().as_millis(),
                        source,
                    });
                }
                Err(Attempt::Failed(e)) => {
                    self.inner.metrics.publish_retry(metric_label);
                    tracing::warn!(%subject, attempts, error = %crate::ErrorChain(&*e), "Publish not acknowledged; retrying with the same message id.");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Publishes many events with up to `window` acks outstanding (pipelined): sends a window
    /// of messages, then awaits their acks. An event whose send or ack fails is retried on its
    /// own, with the same `Nats-Msg-Id`, exactly as [`Self::publish`] does. Every event carries
    /// the trace context of the span current at the call.
    pub async fn publish_pipelined(&self, events: &[Event], window: usize) -> Result<(), BusError> {
        let trace = TraceHeaders::current();
        let events: Vec<(&Event, &TraceHeaders)> = events.iter().map(|e| (e, &trace)).collect();
        self.pipeline(&events, window).await
    }

    /// [`Self::publish_pipelined`] with each event in the trace of its own span (a batch's
    /// events, each in its message's trace).
    pub async fn publish_pipelined_in(
        &self,
        events: &[(&Event, &tracing::Span)],
        window: usize,
    ) -> Result<(), BusError> {
        let traces: Vec<TraceHeaders> = events
            .iter()
            .map(|(_, span)| span.in_scope(TraceHeaders::current))
            .collect();
        let events: Vec<(&Event, &TraceHeaders)> = events
            .iter()
            .zip(&traces)
            .map(|((e, _), t)| (*e, t))
            .collect();
        self.pipeline(&events, window).await
    }

    async fn pipeline(
        &self,
        events: &[(&Event, &TraceHeaders)],
        window: usize,
    ) -> Result<(), BusError> {
        let window = window.max(1);
        let mut pending: Vec<(
            &Event,
            &TraceHeaders,
            EventType,
            Result<PublishAckFuture, String>,
        )> = Vec::with_capacity(window.min(events.len()));
        for chunk in events.chunks(window) {
            for &(event, trace) in chunk {
                let ty = event.event_type().ok_or(BusError::EmptyEvent)?;
                let subject = event.subject()?;
                // A failed send is retried (with backoff) when the window's acks are awaited.
                let sent = self
                    .inner
                    .js
                    .publish_with_headers(
                        subject,
                        event_headers(event, trace),
                        Bytes::from(event.encode_to_vec()),
                    )
                    .await
                    .map_err(|e| e.to_string());
                pending.push((event, trace, ty, sent));
            }
            for (event, trace, ty, sent) in pending.drain(..) {
                let acked = match sent {
                    Ok(ack) => ack.await.map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                match acked {
                    Ok(_) => self.inner.metrics.published_type(ty),
                    Err(error) => {
                        // That was the first attempt; the retries keep the same id.
                        self.inner.metrics.publish_retry(ty.name());
                        tracing::warn!(id = %event.id, %error, "Publish not acknowledged; retrying with the same message id.");
                        self.publish_prepared(event, trace).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends a publish without waiting for the ack (for callers that pipeline themselves).
    pub async fn publish_nowait(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PublishAckFuture, BusError> {
        self.inner
            .js
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
            .map_err(|e| BusError::Publish {
                subject: subject.to_owned(),
                attempts: 1,
                elapsed_ms: 0,
                source: Box::new(e),
            })
    }

    /// Flushes buffered client writes (acks included) to the server.
    pub async fn flush(&self) {
        if let Err(e) = self.inner.client.flush().await {
            tracing::warn!(error = %crate::ErrorChain(&e), "Flushing the NATS connection failed.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(run: Option<wnodes_proto::v1::JobRunRef>) -> Event {
        Event {
            id: "job.queued:T1/slurm/42/2".into(),
            run,
            ..Default::default()
        }
    }

    #[test]
    fn an_event_published_outside_a_trace_gets_its_run_s_trace() {
        let run = wnodes_proto::v1::JobRunRef {
            site: "T1".into(),
            lrms: wnodes_proto::v1::Lrms::Slurm as i32,
            job_id: "42".into(),
            run_attempt: 2,
        };
        let h = event_headers(&event(Some(run)), &TraceHeaders::default());
        assert_eq!(
            h.get("traceparent").map(|v| v.as_str().to_owned()),
            Some(propagation::run_traceparent("T1/slurm/42/2"))
        );
        assert_eq!(
            h.get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str()),
            Some("job.queued:T1/slurm/42/2")
        );
        // A current trace wins; an event of no run gets none.
        let given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let trace = TraceHeaders(vec![(
            HeaderName::from_static("traceparent"),
            HeaderValue::from(given),
        )]);
        let h = event_headers(&event(None), &trace);
        assert_eq!(h.get("traceparent").map(|v| v.as_str()), Some(given));
        let h = event_headers(&event(None), &TraceHeaders::default());
        assert!(h.get("traceparent").is_none());
    }
}
