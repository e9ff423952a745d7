//! Durable consumers: pull, run the handler in a span whose parent is the message's
//! `traceparent`, skip what was handled, commit the key, publish the outbox, ack; retry with
//! backoff; dead-letter what cannot succeed. One consumer per (service, host) durable name.
//!
//! Delivery rules (ARCHITECTURE.md, "Retries and dead letters"):
//! - the server's `max_deliver` is `max_attempts + 2`: the handler gets `max_attempts` tries,
//!   and a delivery past that (the last try crashed or hung past `ack_wait`) is dead-lettered
//!   without running the handler, so the server never gives up silently;
//! - a dead letter is stored (acked by JetStream) before the original is terminated.

use parking_lot::Mutex;
use std::{collections::HashSet, sync::Arc, time::Duration};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use prost::Message;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field};
use wnodes_proto::v1::Event;

use crate::{
    bus::Bus,
    config::ConsumerTuning,
    dlq::{self, DeadLetterReason},
    error::{BusError, ErrorChain},
    failpoint,
    handler::{Handler, HandlerCtx, HandlerError},
    keys::Store,
    layout,
    metrics::ConsumerMetrics,
    subject,
};

/// What to consume.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Durable name ([`subject::durable_name`]).
    pub durable: String,
    /// Subjects to receive (see [`subject::event_filter`], [`subject::host_filter`]).
    pub filter_subjects: Vec<String>,
    pub tuning: ConsumerTuning,
}

impl ConsumerSpec {
    /// The consumer as provisioning makes it ([`layout::durable_consumer`]).
    pub fn expected(&self) -> jetstream::consumer::Config {
        layout::durable_consumer(&self.durable, self.filter_subjects.clone(), &self.tuning, 0)
    }
}

/// A durable consumer bound to a handler. Bind with [`Consumer::bind`] (readiness: the
/// consumer exists on the server as expected), then [`Consumer::run`] until shutdown.
#[derive(Debug)]
pub struct Consumer<H> {
    bus: Bus,
    store: Store,
    spec: ConsumerSpec,
    handler: Arc<H>,
    consumer: PullConsumer,
}

struct Shared<H> {
    bus: Bus,
    store: Store,
    spec: ConsumerSpec,
    handler: Arc<H>,
    in_progress: Mutex<HashSet<String>>,
    metrics: ConsumerMetrics,
}

enum Verdict {
    Ack,
    Nak(Duration),
    DeadLetter(DeadLetterReason, String),
    /// Withhold the ack (failpoint only).
    Nothing,
}

impl<H: Handler> Consumer<H> {
    /// Binds to the durable consumer the operator provisioned, after checking that it has the
    /// settings this service expects ([`layout::check_consumer`]); never creates or changes it.
    pub async fn bind(
        bus: Bus,
        store: impl Into<Store>,
        spec: ConsumerSpec,
        handler: H,
    ) -> Result<Self, BusError> {
        spec.tuning.validate()?;
        subject::validate_token("consumer name", &spec.durable)?;
        let consumer = layout::check_consumer(bus.jetstream(), &spec.expected()).await?;
        Ok(Self {
            bus,
            store: store.into(),
            spec,
            handler: Arc::new(handler),
            consumer,
        })
    }

    /// Runs until `shutdown` is cancelled: then stops pulling, lets in-flight handlers finish
    /// (up to `shutdown_grace`, after which they are nacked for immediate redelivery), returns
    /// buffered messages with a nak, and flushes the acks.
    ///
    /// Up to `max_in_flight` messages are handled concurrently on this task (not a task per
    /// message: the spawn cost as much as the span). Handlers must therefore not block the
    /// thread: blocking calls belong in `spawn_blocking`, long CPU work must yield between
    /// chunks. A handler that panics fails its attempt (retried, then dead-lettered) without
    /// taking the consumer down.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BusError> {
        let Self {
            bus,
            store,
            spec,
            handler,
            consumer,
        } = self;
        let tuning = spec.tuning.clone();
        let durable_name = spec.durable.clone();
        let shared = Shared {
            bus: bus.clone(),
            store,
            spec,
            handler,
            in_progress: Mutex::new(HashSet::new()),
            metrics: bus.metrics().consumer(&durable_name),
        };
        let durable = shared.spec.durable.as_str();
        let abort_handlers = CancellationToken::new();
        let mut in_flight = FuturesUnordered::new();
        let mut messages = None;
        tracing::info!(consumer = %durable, filters = ?shared.spec.filter_subjects, "Consumer started.");
        loop {
            if messages.is_none() {
                let pulled = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    () = keep_handling(&mut in_flight) => continue,
                    m = consumer
                        .stream()
                        .max_messages_per_batch(tuning.max_in_flight.clamp(1, 256))
                        .heartbeat(Duration::from_secs(5))
                        .expires(Duration::from_secs(30))
                        .messages() => m,
                };
                match pulled {
                    Ok(m) => messages = Some(m),
                    Err(e) => {
                        tracing::warn!(consumer = %durable, error = %ErrorChain(&e), "Cannot pull; retrying.");
                        let retry_at = Instant::now() + Duration::from_secs(1);
                        loop {
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                _ = tokio::time::sleep_until(retry_at) => break,
                                () = keep_handling(&mut in_flight) => {}
                            }
                        }
                        continue;
                    }
                }
            }
            let Some(stream) = messages.as_mut() else {
                continue;
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                next = stream.next(), if in_flight.len() < tuning.max_in_flight => match next {
                    Some(Ok(msg)) => in_flight.push(process(&shared, msg, abort_handlers.clone())),
                    Some(Err(e)) => {
                        tracing::warn!(consumer = %durable, error = %ErrorChain(&e), "Pull stream error.");
                        if matches!(
                            e.kind(),
                            jetstream::consumer::pull::MessagesErrorKind::ConsumerDeleted
                        ) {
                            messages = None;
                        }
                    }
                    None => messages = None,
                },
            }
        }
        // Stop pulling: hand back what was already buffered (so it is redelivered at once)
        // while the in-flight handlers finish.
        let hand_back = async {
            if let Some(mut stream) = messages.take() {
                while let Ok(Some(Ok(msg))) =
                    tokio::time::timeout(Duration::from_millis(20), stream.next()).await
                {
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                }
            }
        };
        let drain = tokio::time::timeout(tuning.shutdown_grace, async {
            while in_flight.next().await.is_some() {}
        });
        let ((), drained) = tokio::join!(hand_back, drain);
        if drained.is_err() {
            tracing::warn!(consumer = %durable, "Shutdown grace over; nacking in-flight messages.");
            abort_handlers.cancel();
            while in_flight.next().await.is_some() {}
        }
        bus.flush().await;
        tracing::info!(consumer = %durable, "Consumer stopped.");
        Ok(())
    }
}

/// Drives the in-flight handlers; never returns (pending once none is left), so it can sit in
/// a `select!` next to whatever the consumer waits for.
async fn keep_handling<F: Future<Output = ()>>(in_flight: &mut FuturesUnordered<F>) {
    while in_flight.next().await.is_some() {}
    std::future::pending::<()>().await;
}

async fn process<H: Handler>(
    shared: &Shared<H>,
    msg: jetstream::Message,
    abort: CancellationToken,
) {
    let started = Instant::now();
    let durable = shared.spec.durable.as_str();
    let (stream_seq, delivered) = match msg.info() {
        Ok(i) => (
            i.stream_sequence,
            u32::try_from(i.delivered).unwrap_or(u32::MAX),
        ),
        Err(_) => (0, 1),
    };
    let span = tracing::info_span!(
        "handle",
        otel.name = shared.handler.name(),
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = msg.subject.as_str(),
        messaging.consumer.group.name = durable,
        messaging.message.id = field::Empty,
        wnodes.run = field::Empty,
        wnodes.attempt = delivered,
    );
    crate::propagation::set_parent_from(&span, msg.headers.as_ref());
    // The whole handling, ack included, runs instrumented: a span is never held entered across
    // an await (handlers share this task, so an entered guard would leak into the others).
    let outcome = settle(shared, msg, stream_seq, delivered, abort)
        .instrument(span)
        .await;
    shared
        .metrics
        .handled(outcome, started.elapsed().as_secs_f64());
}

/// Decides, then acks, naks or dead-letters. Returns the outcome label for the metrics.
async fn settle<H: Handler>(
    shared: &Shared<H>,
    msg: jetstream::Message,
    stream_seq: u64,
    delivered: u32,
    abort: CancellationToken,
) -> &'static str {
    let durable = shared.spec.durable.as_str();
    let (verdict, outcome) = decide(shared, &msg, stream_seq, delivered, abort).await;
    let res = match verdict {
        Verdict::Ack => msg.ack().await,
        Verdict::Nak(d) => msg.ack_with(AckKind::Nak(Some(d))).await,
        Verdict::Nothing => Ok(()),
        Verdict::DeadLetter(reason, error) => {
            match dlq::write(
                &shared.bus,
                durable,
                &msg,
                stream_seq,
                delivered,
                reason,
                &error,
            )
            .await
            {
                Ok(()) => {
                    shared.bus.metrics().dead_lettered(durable, reason.as_str());
                    msg.ack_with(AckKind::Term).await
                }
                Err(e) => {
                    tracing::error!(error = %ErrorChain(&e), "Cannot write the dead letter; the message stays for redelivery.");
                    msg.ack_with(AckKind::Nak(Some(shared.spec.tuning.backoff_max)))
                        .await
                }
            }
        }
    };
    if let Err(e) = res {
        tracing::warn!(error = %ErrorChain(&*e), "Cannot send the ack; the message will be redelivered.");
    }
    outcome
}

struct KeyGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    key: String,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

async fn decide<H: Handler>(
    shared: &Shared<H>,
    msg: &jetstream::Message,
    stream_seq: u64,
    delivered: u32,
    abort: CancellationToken,
) -> (Verdict, &'static str) {
    let span = tracing::Span::current();
    let tuning = &shared.spec.tuning;
    let subject = msg.subject.as_str();
    let event = match Event::decode(msg.payload.clone()) {
        Ok(e) if e.body.is_some() => e,
        Ok(_) => {
            tracing::error!(%subject, stream_seq, "Malformed event: no body; dead-lettering.");
            return (
                Verdict::DeadLetter(
                    DeadLetterReason::Malformed,
                    "malformed event: no body".into(),
                ),
                "dead_letter",
            );
        }
        Err(e) => {
            tracing::error!(%subject, stream_seq, error = %e, "Malformed event payload; dead-lettering.");
            return (
                Verdict::DeadLetter(
                    DeadLetterReason::Malformed,
                    format!("malformed event payload on {subject}: {e}"),
                ),
                "dead_letter",
            );
        }
    };
    span.record("messaging.message.id", event.id.as_str());
    span.record(
        "wnodes.run",
        crate::event::EventExt::run_key(&event).as_str(),
    );
    if delivered > tuning.max_attempts {
        let error = format!(
            "no verdict after {} attempts (the handler crashed or hung past ack_wait)",
            tuning.max_attempts
        );
        tracing::error!(%subject, delivered, "{error}; dead-lettering.");
        return (
            Verdict::DeadLetter(DeadLetterReason::NoVerdict, error),
            "dead_letter",
        );
    }
    let key = shared.handler.idempotency_key(&event);
    let _guard = {
        if !shared.in_progress.lock().insert(key.clone()) {
            // The same key is being handled right now (a duplicate): look again shortly.
            return (Verdict::Nak(tuning.backoff_base), "retry");
        }
        KeyGuard {
            set: &shared.in_progress,
            key: key.clone(),
        }
    };
    match shared.store.lookup(&shared.spec.durable, &key).await {
        Ok(Some(outbox)) => {
            tracing::debug!(%key, "Already handled; republishing its events and acking.");
            for ev in &outbox {
                if let Err(e) = shared.bus.publish(ev).await {
                    tracing::warn!(error = %ErrorChain(&e), "Republishing a handled event failed.");
                    return (Verdict::Nak(tuning.backoff(delivered)), "retry");
                }
            }
            return (Verdict::Ack, "duplicate");
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %ErrorChain(&e), "Idempotency store lookup failed.");
            return (Verdict::Nak(tuning.backoff(delivered)), "retry");
        }
    }
    failpoint::crash_at("before-handler");
    let mut ctx = HandlerCtx {
        key: key.clone(),
        subject: msg.subject.clone(),
        attempt: delivered,
        outbox: Vec::new(),
        tx: None,
        store: shared.store.clone(),
    };
    let handled = std::panic::AssertUnwindSafe(Box::pin(shared.handler.handle(&mut ctx, event)))
        .catch_unwind();
    let result = tokio::select! {
        r = tokio::time::timeout(tuning.handler_timeout, handled) => r,
        _ = abort.cancelled() => {
            tracing::warn!(%key, "Shutdown: nacking the message for immediate redelivery.");
            return (Verdict::Nak(Duration::ZERO), "retry");
        }
    };
    let failure = match result {
        Ok(Ok(Ok(()))) => None,
        Ok(Err(panic)) => Some(format!("handler panicked: {}", panic_message(&*panic))),
        Ok(Ok(Err(HandlerError::Reject(e)))) => {
            let error = ErrorChain(&*e).to_string();
            tracing::error!(%subject, %key, %error, "Handler rejected the message; dead-lettering.");
            return (
                Verdict::DeadLetter(DeadLetterReason::Rejected, error),
                "dead_letter",
            );
        }
        Ok(Ok(Err(HandlerError::Retry(e)))) => Some(ErrorChain(&*e).to_string()),
        Err(_) => Some(format!(
            "handler timed out after {:?}",
            tuning.handler_timeout
        )),
    };
    if let Some(error) = failure {
        drop(ctx); // rolls back the handler's transaction
        if delivered >= tuning.max_attempts {
            tracing::error!(%subject, %key, attempts = delivered, %error, "Handler failed on its last attempt; dead-lettering.");
            return (
                Verdict::DeadLetter(DeadLetterReason::Exhausted, error),
                "dead_letter",
            );
        }
        let delay = tuning.backoff(delivered);
        tracing::warn!(%subject, %key, attempt = delivered, retry_in = ?delay, %error, "Handler failed; will retry.");
        return (Verdict::Nak(delay), "retry");
    }
    // Commit the key (with the handler's transaction, if it opened one) and the outbox.
    let outbox = std::mem::take(&mut ctx.outbox);
    let recorded = match ctx.tx.take() {
        Some(mut tx) => match shared
            .store
            .record_in(&mut tx, &shared.spec.durable, &key, &outbox)
            .await
        {
            Ok(true) => tx
                .commit()
                .await
                .map(|()| true)
                .map_err(|e| ErrorChain(&e).to_string()),
            Ok(false) => Ok(false),
            Err(e) => Err(ErrorChain(&e).to_string()),
        },
        None => shared
            .store
            .record(&shared.spec.durable, &key, &outbox)
            .await
            .map_err(|e| ErrorChain(&e).to_string()),
    };
    match recorded {
        Ok(true) => {}
        Ok(false) => return (Verdict::Ack, "duplicate"),
        Err(error) => {
            tracing::warn!(%key, %error, "Cannot record the idempotency key; will retry.");
            return (Verdict::Nak(tuning.backoff(delivered)), "retry");
        }
    }
    failpoint::crash_at("after-commit");
    for ev in &outbox {
        if let Err(e) = shared.bus.publish(ev).await {
            // The key is stored with its outbox: the redelivery republishes it.
            tracing::warn!(error = %ErrorChain(&e), "Publishing the handler's events failed; will retry.");
            return (Verdict::Nak(tuning.backoff(delivered)), "retry");
        }
    }
    if failpoint::fires("skip-ack") {
        tracing::warn!(%key, "Failpoint skip-ack: withholding the ack.");
        return (Verdict::Nothing, "ok");
    }
    (Verdict::Ack, "ok")
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}
