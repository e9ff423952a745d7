//! [`Bus`]: one NATS connection, the streams, and traced, de-duplicated, retried publishing.

use std::{sync::Arc, time::Duration};

use async_nats::{
    HeaderMap, HeaderName, HeaderValue,
    jetstream::{self, context::PublishAckFuture, stream},
};
use bytes::Bytes;
use prost::Message;
use tokio::time::Instant;
use wnodes_proto::v1::Event;

use crate::{
    config::NatsConfig,
    connect,
    error::BusError,
    event::{EventExt, EventType},
    metrics::BusMetrics,
    propagation, subject,
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
fn event_headers(event: &Event, trace: &TraceHeaders) -> HeaderMap {
    let mut headers: HeaderMap = trace.0.iter().cloned().collect();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
    headers
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
        let client = connect::connect(cfg, source, Some(metrics.clone())).await?;
        Ok(Self::from_client(client, cfg, source, metrics))
    }

    /// Wraps an existing client.
    pub fn from_client(
        client: async_nats::Client,
        cfg: &NatsConfig,
        source: &str,
        metrics: BusMetrics,
    ) -> Self {
        let js = jetstream::new(client.clone());
        Self {
            inner: Arc::new(Inner {
                client,
                js,
                cfg: cfg.clone(),
                source: source.to_owned(),
                metrics,
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

    /// Creates or updates the events and dead-letter streams (idempotent; run at every start).
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        let cfg = &self.inner.cfg;
        let events = stream::Config {
            name: subject::EVENTS_STREAM.into(),
            description: Some("WNoDeS job and VM lifecycle events".into()),
            subjects: vec![subject::EVENTS_SUBJECTS.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: cfg.stream_replicas,
            duplicate_window: cfg.duplicate_window,
            max_age: cfg.events_max_age,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        };
        let dlq = stream::Config {
            name: subject::DLQ_STREAM.into(),
            description: Some("WNoDeS dead letters: messages a consumer gave up on".into()),
            subjects: vec![subject::DLQ_SUBJECTS.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: cfg.stream_replicas,
            duplicate_window: cfg.duplicate_window,
            max_age: cfg.dlq_max_age,
            allow_direct: true,
            ..Default::default()
        };
        for config in [events, dlq] {
            let name = config.name.clone();
            self.inner
                .js
                .create_or_update_stream(config)
                .await
                .map_err(|e| BusError::Stream {
                    stream: name,
                    source: Box::new(e),
                })?;
        }
        Ok(())
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
        let started = Instant::now();
        let deadline = started + self.inner.cfg.publish_timeout;
        let mut attempts = 0u32;
        let mut delay = Duration::from_millis(50);
        loop {
            attempts += 1;
            let sent = self
                .inner
                .js
                .publish_with_headers(
                    subject.clone(),
                    event_headers(event, trace),
                    payload.clone(),
                )
                .await;
            let res = match sent {
                Ok(ack) => ack
                    .await
                    .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) }),
                Err(e) => Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
            };
            match res {
                Ok(ack) => {
                    self.inner.metrics.published_type(ty);
                    return Ok(Published {
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                }
                Err(source) if Instant::now() + delay >= deadline => {
                    return Err(BusError::Publish {
                        subject,
                        attempts,
                        elapsed_ms: started.elapsed().as_millis(),
                        source,
                    });
                }
                Err(e) => {
                    self.inner.metrics.publish_retry(ty.name());
                    tracing::warn!(%subject, attempts, error = %crate::ErrorChain(&*e), "Publish not acknowledged; retrying with the same message id.");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Publishes a pre-built message with retries (same headers, so the same `Nats-Msg-Id`).
    pub async fn publish_raw(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        metric_label: &str,
    ) -> Result<Published, BusError> {
        let started = Instant::now();
        let deadline = started + self.inner.cfg.publish_timeout;
        let mut attempts = 0u32;
        let mut delay = Duration::from_millis(50);
        loop {
            attempts += 1;
            let res = match self
                .inner
                .js
                .publish_with_headers(subject.to_owned(), headers.clone(), payload.clone())
                .await
            {
                Ok(ack) => ack
                    .await
                    .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) }),
                Err(e) => Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
            };
            match res {
                Ok(ack) => {
                    self.inner.metrics.published(metric_label);
                    return Ok(Published {
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                }
                Err(source) if Instant::now() + delay >= deadline => {
                    return Err(BusError::Publish {
                        subject: subject.to_owned(),
                        attempts,
                        elapsed_ms: started.elapsed().as_millis(),
                        source,
                    });
                }
                Err(e) => {
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
        let window = window.max(1);
        let trace = TraceHeaders::current();
        let mut pending: Vec<(&Event, EventType, Result<PublishAckFuture, String>)> =
            Vec::with_capacity(window.min(events.len()));
        for chunk in events.chunks(window) {
            for event in chunk {
                let ty = event.event_type().ok_or(BusError::EmptyEvent)?;
                let subject = event.subject()?;
                // A failed send is retried (with backoff) when the window's acks are awaited.
                let sent = self
                    .inner
                    .js
                    .publish_with_headers(
                        subject,
                        event_headers(event, &trace),
                        Bytes::from(event.encode_to_vec()),
                    )
                    .await
                    .map_err(|e| e.to_string());
                pending.push((event, ty, sent));
            }
            for (event, ty, sent) in pending.drain(..) {
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
                        self.publish_prepared(event, &trace).await?;
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
