//! Prometheus metrics of the bus (published through the service runtime's `/metrics`).
//! Label values are bounded: consumer names, event types and fixed outcome names only.

use std::sync::{Arc, OnceLock};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::event::EventType;

type Labels = Vec<(&'static str, String)>;

/// `published` counters resolved once per event type (a counter handle shares its value with
/// the family's entry), so a publish does not build a label set.
#[derive(Debug, Default)]
struct PublishedByType([OnceLock<Counter>; EventType::ALL.len()]);

/// The per-message metrics of one consumer, resolved once when the consumer starts.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerMetrics {
    ok: Counter,
    duplicate: Counter,
    retry: Counter,
    dead_letter: Counter,
    seconds: Histogram,
    batches: Counter,
    batched: Counter,
}

impl ConsumerMetrics {
    /// A batch of `messages` handed to a batched handler.
    pub(crate) fn batch(&self, messages: usize) {
        self.batches.inc();
        self.batched.inc_by(messages as u64);
    }

    pub(crate) fn handled(&self, outcome: &'static str, seconds: f64) {
        match outcome {
            "ok" => &self.ok,
            "duplicate" => &self.duplicate,
            "retry" => &self.retry,
            _ => &self.dead_letter,
        }
        .inc();
        self.seconds.observe(seconds);
    }
}

/// Handles to the bus's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct BusMetrics {
    published: Family<Labels, Counter>,
    publish_retries: Family<Labels, Counter>,
    handled: Family<Labels, Counter>,
    dead_lettered: Family<Labels, Counter>,
    handle_seconds: Family<Labels, Histogram>,
    batches: Family<Labels, Counter>,
    batched: Family<Labels, Counter>,
    connected: Gauge,
    disconnects: Counter,
    published_by_type: Arc<PublishedByType>,
}

fn histogram() -> Histogram {
    Histogram::new([0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0])
}

impl BusMetrics {
    /// Registers the metrics under `wnodes_bus_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::unregistered();
        let r = registry.sub_registry_with_prefix("wnodes_bus");
        r.register(
            "published",
            "Events published and acknowledged by JetStream",
            m.published.clone(),
        );
        r.register(
            "publish_retries",
            "Publish attempts retried (no ack, disconnected)",
            m.publish_retries.clone(),
        );
        r.register(
            "handled",
            "Messages handled, by consumer and outcome (ok, duplicate, retry, dead_letter)",
            m.handled.clone(),
        );
        r.register(
            "dead_lettered",
            "Messages written to the dead-letter stream, by consumer and reason",
            m.dead_lettered.clone(),
        );
        r.register(
            "handle_seconds",
            "Handler time per message",
            m.handle_seconds.clone(),
        );
        r.register(
            "batches",
            "Batches handed to a batched handler, by consumer",
            m.batches.clone(),
        );
        r.register(
            "batched_messages",
            "Messages in those batches, by consumer (divided by batches: the mean batch size)",
            m.batched.clone(),
        );
        r.register(
            "connected",
            "1 while the NATS connection is up",
            m.connected.clone(),
        );
        r.register(
            "disconnects",
            "NATS disconnections seen",
            m.disconnects.clone(),
        );
        m
    }

    /// Metrics that are counted but not exported (tests, benchmarks).
    pub fn unregistered() -> Self {
        Self {
            published: Family::default(),
            publish_retries: Family::default(),
            handled: Family::default(),
            dead_lettered: Family::default(),
            handle_seconds: Family::new_with_constructor(histogram),
            batches: Family::default(),
            batched: Family::default(),
            connected: Gauge::default(),
            disconnects: Counter::default(),
            published_by_type: Arc::default(),
        }
    }

    pub(crate) fn published(&self, event_type: &str) {
        self.published
            .get_or_create(&vec![("event_type", event_type.to_owned())])
            .inc();
    }

    /// [`Self::published`] for an event type, without a label lookup after the first.
    pub(crate) fn published_type(&self, ty: EventType) {
        self.published_by_type.0[ty as usize]
            .get_or_init(|| {
                self.published
                    .get_or_create(&vec![("event_type", ty.name().to_owned())])
                    .clone()
            })
            .inc();
    }

    /// The counters of `consumer`, resolved once (the consumer keeps them).
    pub(crate) fn consumer(&self, consumer: &str) -> ConsumerMetrics {
        let handled = |outcome: &str| {
            self.handled
                .get_or_create(&vec![
                    ("consumer", consumer.to_owned()),
                    ("outcome", outcome.to_owned()),
                ])
                .clone()
        };
        ConsumerMetrics {
            ok: handled("ok"),
            duplicate: handled("duplicate"),
            retry: handled("retry"),
            dead_letter: handled("dead_letter"),
            seconds: self
                .handle_seconds
                .get_or_create(&vec![("consumer", consumer.to_owned())])
                .clone(),
            batches: self
                .batches
                .get_or_create(&vec![("consumer", consumer.to_owned())])
                .clone(),
            batched: self
                .batched
                .get_or_create(&vec![("consumer", consumer.to_owned())])
                .clone(),
        }
    }

    /// Batches handed to `consumer`'s batched handler, and the messages in them (for tests
    /// and status output).
    pub fn batch_counts(&self, consumer: &str) -> (u64, u64) {
        let labels = vec![("consumer", consumer.to_owned())];
        (
            self.batches.get_or_create(&labels).get(),
            self.batched.get_or_create(&labels).get(),
        )
    }

    pub(crate) fn publish_retry(&self, event_type: &str) {
        self.publish_retries
            .get_or_create(&vec![("event_type", event_type.to_owned())])
            .inc();
    }

    pub(crate) fn dead_lettered(&self, consumer: &str, reason: &'static str) {
        self.dead_lettered
            .get_or_create(&vec![
                ("consumer", consumer.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    pub(crate) fn connection_event(&self, ev: &async_nats::Event) {
        match ev {
            async_nats::Event::Connected => {
                self.connected.set(1);
            }
            async_nats::Event::Disconnected => {
                self.connected.set(0);
                self.disconnects.inc();
            }
            _ => {}
        }
    }

    /// Count of messages handled by `consumer` with `outcome` (for tests and status output).
    pub fn handled_count(&self, consumer: &str, outcome: &'static str) -> u64 {
        let labels = vec![
            ("consumer", consumer.to_owned()),
            ("outcome", outcome.to_owned()),
        ];
        self.handled.get_or_create(&labels).get()
    }
}
