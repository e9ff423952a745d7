//! A test's own [`Bus`] client on a [`NatsServer`](crate::NatsServer), and reading events and
//! consumers back from the stream.
//!
//! ```ignore
//! let bus = wnodes_testkit::bus::connect(&nats.admin(), "test@local").await?;
//! let bus = BusClient::new(&nats.identity(&roles::BRIDGE, "ce01").await?).name("bridge@ce01").connect().await?;
//! ```

use std::time::Duration;

use prost::Message;
use wnodes_bus::{Bus, BusError, BusMetrics, EventExt, NatsConfig, proto, subject};

use crate::wait_until;

/// How to connect a test's bus: the server and identity, the client name, and whether to
/// check the event streams (on by default; [`NatsServer::start`](crate::NatsServer::start)
/// provisions them).
#[derive(Debug, Clone)]
pub struct BusClient {
    config: NatsConfig,
    name: String,
    streams: bool,
}

impl BusClient {
    /// A client with these connection settings ([`NatsServer::admin`](crate::NatsServer::admin),
    /// [`NatsServer::identity`](crate::NatsServer::identity)), named `test@local`.
    pub fn new(config: &NatsConfig) -> Self {
        Self {
            config: config.clone(),
            name: "test@local".into(),
            streams: true,
        }
    }

    /// [`Self::new`], taking the settings.
    pub fn from_config(config: NatsConfig) -> Self {
        Self::new(&config)
    }

    /// The client's name (`"<service>@<host>"`: the bus names its connection after it).
    #[must_use]
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// The rest of the connection settings (TLS, timeouts); the URL stays, and so do the
    /// credentials unless `config` has its own.
    #[must_use]
    pub fn config(mut self, config: NatsConfig) -> Self {
        let creds_file = config.creds_file.clone().or(self.config.creds_file.take());
        self.config = NatsConfig {
            url: std::mem::take(&mut self.config.url),
            creds_file,
            ..config
        };
        self
    }

    /// Connect only: do not check the streams.
    #[must_use]
    pub fn without_streams(mut self) -> Self {
        self.streams = false;
        self
    }

    /// Connects (installing the TLS crypto provider first) and checks the streams unless told
    /// not to.
    ///
    /// # Errors
    /// When the connection or the streams cannot be made.
    pub async fn connect(self) -> Result<Bus, BusError> {
        wnodes_bus::connect::install_crypto_provider();
        let bus = Bus::connect(&self.config, &self.name, BusMetrics::unregistered()).await?;
        if self.streams {
            bus.check_streams().await?;
        }
        Ok(bus)
    }
}

/// A bus client named `name` with `config` (usually [`NatsServer::admin`](crate::NatsServer::admin)),
/// the event streams checked.
///
/// # Errors
/// When the connection fails or the streams are not provisioned.
pub async fn connect(config: &NatsConfig, name: &str) -> Result<Bus, BusError> {
    BusClient::new(config).name(name).connect().await
}

/// Events on a core-NATS subscription, decoded.
#[derive(Debug)]
pub struct EventSub(async_nats::Subscriber);

/// Subscribes `bus` to `subject` (`"wnodes.evt.>"`, `"wnodes.evt.*.image.>"`, ...) and flushes,
/// so that every event published after this returns is seen.
///
/// # Errors
/// When the subscription or the flush fails.
pub async fn subscribe(bus: &Bus, subject: &str) -> anyhow::Result<EventSub> {
    let sub = bus.client().subscribe(subject.to_owned()).await?;
    bus.client().flush().await?;
    Ok(EventSub(sub))
}

impl EventSub {
    /// The next event, within `within`.
    ///
    /// # Errors
    /// When none comes in time, the subscription ends, or the payload is not an event.
    pub async fn next(&mut self, within: Duration) -> anyhow::Result<proto::Event> {
        use futures::StreamExt;
        let msg = tokio::time::timeout(within, self.0.next())
            .await
            .map_err(|_| anyhow::anyhow!("no event within {within:?}"))?
            .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
        Ok(proto::Event::decode(msg.payload)?)
    }
}

/// The last event of `event_type` published on `host`, with its `traceparent` header (empty
/// when there is none); `None` when there is no such event yet.
pub async fn last_event_traced(
    bus: &Bus,
    host: &str,
    event_type: &str,
) -> Option<(proto::Event, String)> {
    let stream = bus
        .jetstream()
        .get_stream(subject::EVENTS_STREAM)
        .await
        .ok()?;
    let subj = subject::event_subject(host, event_type).ok()?;
    let msg = stream.get_last_raw_message_by_subject(&subj).await.ok()?;
    let traceparent = msg
        .headers
        .get("traceparent")
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    Some((
        proto::Event::decode(msg.payload.as_ref()).ok()?,
        traceparent,
    ))
}

/// The last event of `event_type` published on `host`.
pub async fn last_event(bus: &Bus, host: &str, event_type: &str) -> Option<proto::Event> {
    last_event_traced(bus, host, event_type)
        .await
        .map(|(e, _)| e)
}

/// Waits (up to `timeout`) until the last event of `event_type` on `host` is one of `run`.
///
/// # Errors
/// When none shows up in time.
pub async fn wait_event(
    bus: &Bus,
    host: &str,
    event_type: &str,
    run: &proto::JobRunRef,
    timeout: Duration,
) -> anyhow::Result<proto::Event> {
    let key = wnodes_bus::event::run_key(run);
    wait_until(timeout, &format!("{event_type} for {key}"), || async {
        last_event(bus, host, event_type)
            .await
            .filter(|e| e.run_key() == key)
    })
    .await
}

/// How many messages the event stream holds.
///
/// # Errors
/// When the stream cannot be read.
pub async fn stored_events(bus: &Bus) -> anyhow::Result<u64> {
    let mut stream = bus.jetstream().get_stream(subject::EVENTS_STREAM).await?;
    Ok(stream.info().await?.state.messages)
}

/// The messages stored in the event stream under a subject filter, from its start.
pub struct StoredMessages(async_nats::jetstream::consumer::pull::Ordered);

impl std::fmt::Debug for StoredMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredMessages")
    }
}

/// Reads the messages stored under `filter` (`"wnodes.evt.*.vm.stopped"`, ...) with an
/// ordered consumer, from the start of the stream.
///
/// # Errors
/// When the stream or the consumer cannot be made.
pub async fn stored_messages(bus: &Bus, filter: &str) -> anyhow::Result<StoredMessages> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    let stream = bus.jetstream().get_stream(subject::EVENTS_STREAM).await?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: filter.into(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    Ok(StoredMessages(consumer.messages().await?))
}

impl StoredMessages {
    /// The next message, or `None` when none comes within `within`.
    ///
    /// # Errors
    /// When the consumer fails or ends.
    pub async fn next(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<Option<async_nats::jetstream::Message>> {
        use futures::StreamExt;
        match tokio::time::timeout(within, self.0.next()).await {
            Err(_) => Ok(None),
            Ok(None) => anyhow::bail!("the ordered consumer ended"),
            Ok(Some(m)) => Ok(Some(m.map_err(|e| anyhow::anyhow!("{e}"))?)),
        }
    }

    /// The next message decoded as an event, or `None` when none comes within `within`.
    ///
    /// # Errors
    /// When the consumer fails or ends, or the payload is not an event.
    pub async fn next_event(&mut self, within: Duration) -> anyhow::Result<Option<proto::Event>> {
        match self.next(within).await? {
            Some(m) => Ok(Some(proto::Event::decode(m.payload.clone())?)),
            None => Ok(None),
        }
    }
}

/// The state of a durable consumer of the event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerState {
    /// Delivered, not acknowledged yet.
    pub ack_pending: usize,
    /// Delivered more than once.
    pub redelivered: usize,
    /// Not delivered yet.
    pub pending: u64,
    /// Every delivery, redeliveries included (the last consumer sequence).
    pub deliveries: u64,
}

/// The state of the durable consumer `durable` of the event stream.
///
/// # Errors
/// When the stream or the consumer cannot be read.
pub async fn consumer_state(
    js: &async_nats::jetstream::Context,
    durable: &str,
) -> anyhow::Result<ConsumerState> {
    let stream = js.get_stream(subject::EVENTS_STREAM).await?;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(durable)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let info = consumer.info().await?;
    Ok(ConsumerState {
        ack_pending: info.num_ack_pending,
        redelivered: info.num_redelivered,
        pending: info.num_pending,
        deliveries: info.delivered.consumer_sequence,
    })
}

/// The next message of durable `durable` on the events stream, pulled as `bus`'s identity (not
/// acknowledged: the caller acks, or leaves it pending). Waits up to 2 s.
///
/// # Errors
/// When the durable cannot be read or pulled, or has nothing within 2 s.
pub async fn pull_one(bus: &Bus, durable: &str) -> anyhow::Result<async_nats::jetstream::Message> {
    use futures::StreamExt;
    let consumer = bus
        .jetstream()
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            durable,
            subject::EVENTS_STREAM,
        )
        .await?;
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(2))
        .messages()
        .await?;
    batch
        .next()
        .await
        .ok_or_else(|| anyhow::anyhow!("no message for {durable} within 2 s"))?
        .map_err(|e| anyhow::anyhow!("pulling from {durable}: {e}"))
}

/// Waits up to `within` until `durable` has taken and acknowledged everything in the event
/// stream for it (nothing pending, nothing awaiting an ack).
///
/// # Errors
/// When it has not caught up within `within`.
pub async fn wait_caught_up(bus: &Bus, durable: &str, within: Duration) -> anyhow::Result<()> {
    wait_until(within, &format!("{durable} to catch up"), || async {
        let s = consumer_state(bus.jetstream(), durable).await.ok()?;
        (s.pending == 0 && s.ack_pending == 0).then_some(())
    })
    .await
}

/// Publishes `event` again under the message id `msg_id`, so that JetStream stores it again
/// whatever its de-duplication window (a producer's late retry, a redrive). Returns whether
/// the server still took it for a duplicate.
///
/// # Errors
/// When the publish is not acknowledged.
pub async fn publish_again(bus: &Bus, event: &proto::Event, msg_id: &str) -> anyhow::Result<bool> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
    let ty = event
        .event_type()
        .ok_or_else(|| anyhow::anyhow!("event {} has no body", event.id))?;
    let published = bus
        .publish_raw(
            &event.subject()?,
            headers,
            bytes::Bytes::from(event.encode_to_vec()),
            ty.name(),
        )
        .await?;
    Ok(published.duplicate)
}
