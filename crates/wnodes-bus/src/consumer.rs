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
use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::{FutureExt, StreamExt, future::Either, stream::FuturesUnordered};
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
    handler::{BatchCtx, BatchItem, Handler, HandlerCtx, HandlerError},
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
    /// Messages in the batches in flight (a batched handler's).
    in_hand: AtomicUsize,
    /// A batched handler's turn at its store: one batch at a time looks its keys up, runs
    /// the handler and commits, while the batch before it publishes its events and acks.
    db_turn: tokio::sync::Mutex<()>,
}

impl<H> Shared<H> {
    fn in_hand(&self) -> usize {
        self.in_hand.load(Ordering::Relaxed)
    }
}

/// Batches a batched handler has in flight at once, each of up to `max_batch` messages:
/// they take turns at the store ([`Shared::db_turn`]), so one publishes and acks while the
/// other looks up, handles and commits.
const BATCHES_IN_FLIGHT: usize = 2;

/// How long a batch waits for more messages once its first is in hand, while the batches
/// in flight go on. Taking only what was already buffered made batches of ~75 messages in
/// the accounting bench (the next pull had not arrived yet); collecting this long, ~250
/// (docs/benchmarks.md). A lone event waits this long more.
const BATCH_LINGER: Duration = Duration::from_millis(1);

/// Publish acks a batch's events may have outstanding.
const PUBLISH_WINDOW: usize = 256;

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
            in_hand: AtomicUsize::new(0),
            db_turn: tokio::sync::Mutex::new(()),
        };
        let durable = shared.spec.durable.as_str();
        let abort_handlers = CancellationToken::new();
        let mut in_flight = FuturesUnordered::new();
        let mut messages = None;
        // Handlers in flight; batches in flight for a batched handler (two: one has the
        // store while the other is collected, or publishes and acks).
        let slots = if H::BATCHED {
            BATCHES_IN_FLIGHT
        } else {
            tuning.max_in_flight
        };
        // Messages in hand. A batched handler's consumer holds up to two batches of
        // max_batch: while one has its turn at the store (lookup, handler, commit), the
        // other is collected, then waits for its turn; once the first has committed, its
        // events are published and its messages acked while the second has the store.
        let hand_limit = if H::BATCHED {
            tuning.max_batch * BATCHES_IN_FLIGHT
        } else {
            tuning.max_in_flight
        };
        // Messages per pull request. A batched handler's consumer asks for two batches' worth,
        // so that the next pull is on its way while a batch is handled and the next batch
        // finds a full one at hand (async-nats sends the next pull when half the last one was
        // taken).
        let pull_batch = if H::BATCHED {
            (tuning.max_batch * 2).clamp(2, 1024)
        } else {
            tuning.max_in_flight.clamp(2, 256)
        };
        tracing::info!(consumer = %durable, filters = ?shared.spec.filter_subjects, "Consumer started.");
        loop {
            if messages.is_none() {
                let pulled = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    () = keep_handling(&mut in_flight) => continue,
                    m = consumer
                        .stream()
                        // At least 2: with pull requests of one message, async-nats 0.51
                        // can count a request's message before the request itself and then
                        // wait for a request the server already served (a 10 s stall until
                        // the missed heartbeats; seen with max_in_flight = 1).
                        .max_messages_per_batch(pull_batch)
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
                next = stream.next(), if in_flight.len() < slots && shared.in_hand() < hand_limit => match next {
                    Some(Ok(msg)) if H::BATCHED => {
                        // Every message already at hand makes the batch, up to max_batch
                        // messages, and up to hand_limit in hand in all batches.
                        let room = tuning.max_batch.min(hand_limit.saturating_sub(shared.in_hand()));
                        let mut batch = vec![msg];
                        let mut broken = false;
                        // Collect while the batches in flight go on, up to BATCH_LINGER.
                        let linger = tokio::time::sleep(BATCH_LINGER);
                        tokio::pin!(linger);
                        while batch.len() < room {
                            let next = tokio::select! {
                                biased;
                                Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
                                m = stream.next() => m,
                                () = &mut linger => break,
                            };
                            match next {
                                Some(Ok(m)) => batch.push(m),
                                Some(Err(e)) => {
                                    tracing::warn!(consumer = %durable, error = %ErrorChain(&e), "Pull stream error.");
                                    broken = needs_new_stream(&e);
                                    break;
                                }
                                None => {
                                    broken = true;
                                    break;
                                }
                            }
                        }
                        if broken {
                            messages = None;
                        }
                        shared.in_hand.fetch_add(batch.len(), Ordering::Relaxed);
                        in_flight.push(Either::Right(process_batch(
                            &shared,
                            batch,
                            abort_handlers.clone(),
                        )));
                    }
                    Some(Ok(msg)) => in_flight.push(Either::Left(process(&shared, msg, abort_handlers.clone()))),
                    Some(Err(e)) => {
                        tracing::warn!(consumer = %durable, error = %ErrorChain(&e), "Pull stream error.");
                        if needs_new_stream(&e) {
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

/// Whether a pull stream error needs a new pull stream: the consumer was recreated, or the
/// server no longer serves the stream's pull requests (no heartbeat for two intervals).
fn needs_new_stream(e: &jetstream::consumer::pull::MessagesError) -> bool {
    use jetstream::consumer::pull::MessagesErrorKind as Kind;
    matches!(e.kind(), Kind::ConsumerDeleted | Kind::MissingHeartbeat)
}

/// Drives the in-flight handlers; never returns (pending once none is left), so it can sit in
/// a `select!` next to whatever the consumer waits for.
async fn keep_handling<F: Future<Output = ()>>(in_flight: &mut FuturesUnordered<F>) {
    while in_flight.next().await.is_some() {}
    std::future::pending::<()>().await;
}

/// The message's stream sequence and delivery count (1 when the server sent none).
fn delivery(msg: &jetstream::Message) -> (u64, u32) {
    match msg.info() {
        Ok(i) => (
            i.stream_sequence,
            u32::try_from(i.delivered).unwrap_or(u32::MAX),
        ),
        Err(_) => (0, 1),
    }
}

async fn process<H: Handler>(
    shared: &Shared<H>,
    msg: jetstream::Message,
    abort: CancellationToken,
) {
    let started = Instant::now();
    let (stream_seq, delivered) = delivery(&msg);
    let span = message_span(shared, &msg, delivered);
    // The whole handling, ack included, runs instrumented: a span is never held entered across
    // an await (handlers share this task, so an entered guard would leak into the others).
    let outcome = settle(shared, msg, stream_seq, delivered, abort)
        .instrument(span)
        .await;
    shared
        .metrics
        .handled(outcome, started.elapsed().as_secs_f64());
}

/// The span of one message's handling, its parent the message's `traceparent`.
fn message_span<H: Handler>(
    shared: &Shared<H>,
    msg: &jetstream::Message,
    delivered: u32,
) -> tracing::Span {
    let durable = shared.spec.durable.as_str();
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
    span
}

/// Decides, then acks, naks or dead-letters. Returns the outcome label for the metrics.
async fn settle<H: Handler>(
    shared: &Shared<H>,
    msg: jetstream::Message,
    stream_seq: u64,
    delivered: u32,
    abort: CancellationToken,
) -> &'static str {
    let (verdict, outcome) = decide(shared, &msg, stream_seq, delivered, abort).await;
    apply(shared, msg, stream_seq, delivered, verdict).await;
    outcome
}

/// Acks, naks or dead-letters the message as `verdict` says.
async fn apply<H: Handler>(
    shared: &Shared<H>,
    msg: jetstream::Message,
    stream_seq: u64,
    delivered: u32,
    verdict: Verdict,
) {
    let durable = shared.spec.durable.as_str();
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

/// What is decided before any handler runs: a body that decodes, attempts left, and no other
/// delivery of the same key in hand. `Err` carries the verdict.
#[allow(clippy::type_complexity)]
fn precheck<'a, H: Handler>(
    shared: &'a Shared<H>,
    msg: &jetstream::Message,
    stream_seq: u64,
    delivered: u32,
) -> Result<(Event, String, KeyGuard<'a>), (Verdict, &'static str)> {
    let span = tracing::Span::current();
    let tuning = &shared.spec.tuning;
    let subject = msg.subject.as_str();
    let dead = |reason, error: String| Err((Verdict::DeadLetter(reason, error), "dead_letter"));
    let event = match Event::decode(msg.payload.clone()) {
        Ok(e) if e.body.is_some() => e,
        Ok(_) => {
            tracing::error!(%subject, stream_seq, "Malformed event: no body; dead-lettering.");
            return dead(
                DeadLetterReason::Malformed,
                "malformed event: no body".into(),
            );
        }
        Err(e) => {
            tracing::error!(%subject, stream_seq, error = %e, "Malformed event payload; dead-lettering.");
            return dead(
                DeadLetterReason::Malformed,
                format!("malformed event payload on {subject}: {e}"),
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
        return dead(DeadLetterReason::NoVerdict, error);
    }
    let key = shared.handler.idempotency_key(&event);
    if !shared.in_progress.lock().insert(key.clone()) {
        // The same key is being handled right now (a duplicate): look again shortly.
        return Err((Verdict::Nak(tuning.backoff_base), "retry"));
    }
    let guard = KeyGuard {
        set: &shared.in_progress,
        key: key.clone(),
    };
    Ok((event, key, guard))
}

async fn decide<H: Handler>(
    shared: &Shared<H>,
    msg: &jetstream::Message,
    stream_seq: u64,
    delivered: u32,
    abort: CancellationToken,
) -> (Verdict, &'static str) {
    let tuning = &shared.spec.tuning;
    let subject = msg.subject.as_str();
    let (event, key, _guard) = match precheck(shared, msg, stream_seq, delivered) {
        Ok(checked) => checked,
        Err(verdict) => return verdict,
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
    let Some(outcome) = run_attempt(shared.handler.handle(&mut ctx, event), tuning, &abort).await
    else {
        tracing::warn!(%key, "Shutdown: nacking the message for immediate redelivery.");
        return (Verdict::Nak(Duration::ZERO), "retry");
    };
    if let Err(failure) = outcome {
        drop(ctx); // rolls back the handler's transaction
        return failed_verdict(tuning, subject, &key, delivered, failure);
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

/// A message in hand: what its verdict is applied to, and its span.
struct Delivered {
    msg: jetstream::Message,
    stream_seq: u64,
    delivered: u32,
    span: tracing::Span,
}

/// One message of a batch, past its precheck.
struct InBatch<'a> {
    d: Delivered,
    guard: KeyGuard<'a>,
}

/// How a batch ended before its verdicts.
enum BatchEnd {
    /// Committed: each message's verdict is its item's.
    Committed,
    /// Rolled back; each message is handled alone ([`Handler::handle`]).
    HandleAlone(String),
    /// Rolled back; every message is nacked with this delay (the store is unreachable, or
    /// shutdown).
    NakAll(Option<Duration>, String),
}

/// A batched handler's batch ([`Handler::handle_batch`]): prechecks and duplicates per
/// message, then one transaction for the effects and keys of the rest, then a verdict per
/// message. A batch that fails as a whole is handled message by message, as without batches.
async fn process_batch<H: Handler>(
    shared: &Shared<H>,
    msgs: Vec<jetstream::Message>,
    abort: CancellationToken,
) {
    let started = Instant::now();
    let count = msgs.len();
    let durable = shared.spec.durable.as_str();
    let tuning = &shared.spec.tuning;
    let mut settled: Vec<((Verdict, &'static str), Delivered)> = Vec::new();
    let mut metas = Vec::with_capacity(msgs.len());
    let mut items = Vec::with_capacity(msgs.len());
    for msg in msgs {
        let (stream_seq, delivered) = delivery(&msg);
        let span = message_span(shared, &msg, delivered);
        let checked = span.in_scope(|| precheck(shared, &msg, stream_seq, delivered));
        let d = Delivered {
            msg,
            stream_seq,
            delivered,
            span,
        };
        match checked {
            Err(verdict) => settled.push((verdict, d)),
            Ok((event, key, guard)) => {
                items.push(BatchItem {
                    key,
                    attempt: delivered,
                    event,
                    failed: None,
                    outbox: Vec::new(),
                });
                metas.push(InBatch { d, guard });
            }
        }
    }
    // The store's turn, unless every message was settled by its precheck.
    let turn = if items.is_empty() {
        None
    } else {
        Some(shared.db_turn.lock().await)
    };
    // Already handled: republish their events and ack.
    let keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
    let handled = if keys.is_empty() {
        Ok(Default::default())
    } else {
        shared.store.lookup_many(durable, &keys).await
    };
    let end = match handled {
        Err(e) => BatchEnd::NakAll(
            None,
            format!("idempotency store lookup failed: {}", ErrorChain(&e)),
        ),
        Ok(done) => {
            let mut i = 0;
            while i < items.len() {
                let Some(outbox) = done.get(&items[i].key) else {
                    i += 1;
                    continue;
                };
                let (item, meta) = (items.remove(i), metas.remove(i));
                let mut verdict = (Verdict::Ack, "duplicate");
                for ev in outbox {
                    if let Err(e) = shared.bus.publish(ev).await {
                        meta.d.span.in_scope(|| tracing::warn!(error = %ErrorChain(&e), "Republishing a handled event failed."));
                        verdict = (Verdict::Nak(tuning.backoff(item.attempt)), "retry");
                        break;
                    }
                }
                settled.push((verdict, meta.d));
            }
            if items.is_empty() {
                BatchEnd::Committed
            } else {
                failpoint::crash_at("before-handler");
                let span = tracing::info_span!(
                    "handle_batch",
                    otel.name = shared.handler.name(),
                    otel.kind = "consumer",
                    messaging.system = "nats",
                    messaging.operation.type = "process",
                    messaging.consumer.group.name = durable,
                    messaging.batch.message_count = items.len(),
                );
                for m in &metas {
                    span.follows_from(&m.d.span);
                }
                shared.metrics.batch(items.len());
                run_batch(shared, &mut items, abort.clone())
                    .instrument(span)
                    .await
            }
        }
    };
    drop(turn);
    match end {
        BatchEnd::Committed => {
            if items.iter().any(|i| !i.is_failed()) {
                failpoint::crash_at("after-commit");
            }
            // Every event the batch staged, pipelined, each in its message's trace; if any
            // is not stored, the batch's messages are retried (their keys are stored with
            // their events: the redelivery republishes them).
            let staged: Vec<(&Event, &tracing::Span)> = items
                .iter()
                .zip(&metas)
                .filter(|(i, _)| i.failed.is_none())
                .flat_map(|(i, m)| i.outbox.iter().map(move |e| (e, &m.d.span)))
                .collect();
            let published = if staged.is_empty() {
                Ok(())
            } else {
                shared
                    .bus
                    .publish_pipelined_in(&staged, PUBLISH_WINDOW)
                    .await
            };
            if let Err(e) = &published {
                tracing::warn!(consumer = %durable, error = %ErrorChain(e), "Publishing the batch's events failed; its messages will be retried.");
            }
            for (item, meta) in items.into_iter().zip(metas) {
                let verdict = match (&published, &item.failed) {
                    (Err(_), None) => (Verdict::Nak(tuning.backoff(item.attempt)), "retry"),
                    _ => meta
                        .d
                        .span
                        .in_scope(|| item_verdict(shared, meta.d.msg.subject.as_str(), item)),
                };
                drop(meta.guard);
                settled.push((verdict, meta.d));
            }
        }
        BatchEnd::NakAll(delay, error) => {
            for meta in metas {
                let delay = delay.unwrap_or_else(|| tuning.backoff(meta.d.delivered));
                meta.d.span.in_scope(
                    || tracing::warn!(%error, retry_in = ?delay, "Batch not handled; will retry."),
                );
                drop(meta.guard);
                settled.push(((Verdict::Nak(delay), "retry"), meta.d));
            }
        }
        BatchEnd::HandleAlone(why) => {
            tracing::warn!(consumer = %durable, messages = metas.len(), %why, "Batch rolled back; handling each message alone.");
            for InBatch { d, guard } in metas {
                drop(guard);
                let outcome = settle(shared, d.msg, d.stream_seq, d.delivered, abort.clone())
                    .instrument(d.span)
                    .await;
                shared
                    .metrics
                    .handled(outcome, started.elapsed().as_secs_f64());
            }
        }
    }
    let acks = settled
        .into_iter()
        .map(|((verdict, outcome), d)| async move {
            apply(shared, d.msg, d.stream_seq, d.delivered, verdict)
                .instrument(d.span)
                .await;
            outcome
        });
    for outcome in futures::future::join_all(acks).await {
        shared
            .metrics
            .handled(outcome, started.elapsed().as_secs_f64());
    }
    shared.in_hand.fetch_sub(count, Ordering::Relaxed);
}

/// Runs the handler on the batch and commits its effects with the keys of every message it
/// did not fail.
async fn run_batch<H: Handler>(
    shared: &Shared<H>,
    items: &mut [BatchItem],
    abort: CancellationToken,
) -> BatchEnd {
    let tuning = &shared.spec.tuning;
    let mut ctx = BatchCtx {
        tx: None,
        store: shared.store.clone(),
    };
    let Some(outcome) =
        run_attempt(shared.handler.handle_batch(&mut ctx, items), tuning, &abort).await
    else {
        return BatchEnd::NakAll(Some(Duration::ZERO), "shutdown".into());
    };
    if let Err(failure) = outcome {
        return BatchEnd::HandleAlone(failure.into_message());
    }
    let ok: Vec<(&str, &[Event])> = items
        .iter()
        .filter(|i| i.failed.is_none())
        .map(|i| (i.key.as_str(), i.outbox.as_slice()))
        .collect();
    if ok.is_empty() {
        return BatchEnd::Committed; // the transaction (if any) rolls back: nothing to keep
    }
    let mut tx = match ctx.tx.take() {
        Some(tx) => tx,
        None => match shared.store.begin().await {
            Ok(tx) => tx,
            Err(e) => return BatchEnd::NakAll(None, ErrorChain(&e).to_string()),
        },
    };
    match shared
        .store
        .record_many_in(&mut tx, &shared.spec.durable, &ok)
        .await
    {
        Ok(true) => match tx.commit().await {
            Ok(()) => BatchEnd::Committed,
            Err(e) => BatchEnd::NakAll(None, format!("commit failed: {}", ErrorChain(&e))),
        },
        // Another consumer of the same store committed one of the keys meanwhile.
        Ok(false) => BatchEnd::HandleAlone("a key of the batch was handled elsewhere".into()),
        Err(e) => BatchEnd::NakAll(None, ErrorChain(&e).to_string()),
    }
}

/// A committed batch item's verdict (its events are published): an ack, or its failure.
fn item_verdict<H: Handler>(
    shared: &Shared<H>,
    subject: &str,
    item: BatchItem,
) -> (Verdict, &'static str) {
    let tuning = &shared.spec.tuning;
    let BatchItem {
        key,
        attempt,
        failed,
        ..
    } = item;
    match failed {
        None => {
            if failpoint::fires("skip-ack") {
                tracing::warn!(%key, "Failpoint skip-ack: withholding the ack.");
                return (Verdict::Nothing, "ok");
            }
            (Verdict::Ack, "ok")
        }
        Some(e) => failed_verdict(tuning, subject, &key, attempt, Failure::from(e)),
    }
}

/// Why an attempt failed, as its dead letter or log would say.
enum Failure {
    /// Never retried.
    Reject(String),
    /// Retried until the attempts are spent (a handler's error, panic or timeout).
    Retry(String),
}

impl Failure {
    fn into_message(self) -> String {
        match self {
            Self::Reject(m) | Self::Retry(m) => m,
        }
    }
}

impl From<HandlerError> for Failure {
    fn from(e: HandlerError) -> Self {
        match e {
            HandlerError::Reject(e) => Self::Reject(ErrorChain(&*e).to_string()),
            HandlerError::Retry(e) => Self::Retry(ErrorChain(&*e).to_string()),
        }
    }
}

/// Runs a handler's attempt (one message's, or a batch's) under the consumer's timeout,
/// catching a panic; `None` when shutdown aborted it first.
async fn run_attempt(
    attempt: impl Future<Output = Result<(), HandlerError>> + Send,
    tuning: &ConsumerTuning,
    abort: &CancellationToken,
) -> Option<Result<(), Failure>> {
    let handled = std::panic::AssertUnwindSafe(Box::pin(attempt)).catch_unwind();
    let result = tokio::select! {
        r = tokio::time::timeout(tuning.handler_timeout, handled) => r,
        _ = abort.cancelled() => return None,
    };
    Some(match result {
        Ok(Ok(r)) => r.map_err(Failure::from),
        Ok(Err(panic)) => Err(Failure::Retry(format!(
            "handler panicked: {}",
            panic_message(&*panic)
        ))),
        Err(_) => Err(Failure::Retry(format!(
            "handler timed out after {:?}",
            tuning.handler_timeout
        ))),
    })
}

/// The verdict on a failed attempt: a rejection is dead-lettered at once; anything else is
/// retried with backoff, and dead-lettered after the last attempt.
fn failed_verdict(
    tuning: &ConsumerTuning,
    subject: &str,
    key: &str,
    attempt: u32,
    failure: Failure,
) -> (Verdict, &'static str) {
    match failure {
        Failure::Reject(error) => {
            tracing::error!(%subject, %key, %error, "Handler rejected the message; dead-lettering.");
            (
                Verdict::DeadLetter(DeadLetterReason::Rejected, error),
                "dead_letter",
            )
        }
        Failure::Retry(error) if attempt >= tuning.max_attempts => {
            tracing::error!(%subject, %key, attempts = attempt, %error, "Handler failed on its last attempt; dead-lettering.");
            (
                Verdict::DeadLetter(DeadLetterReason::Exhausted, error),
                "dead_letter",
            )
        }
        Failure::Retry(error) => {
            let delay = tuning.backoff(attempt);
            tracing::warn!(%subject, %key, %attempt, retry_in = ?delay, %error, "Handler failed; will retry.");
            (Verdict::Nak(delay), "retry")
        }
    }
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}
