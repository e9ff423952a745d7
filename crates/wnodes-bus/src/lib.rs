//! The WNoDeS event bus: every service talks to the others only through this crate.
//!
//! | module | what it holds |
//! |---|---|
//! | [`subject`] | every subject, stream and consumer name; host-name encoding |
//! | [`event`] | event type names, run keys, deterministic event ids (`Nats-Msg-Id`) |
//! | [`config`] | NATS connection, credentials, TLS, stream and consumer settings |
//! | [`connect`] | connecting: credentials, rustls, reconnects |
//! | [`bus`] | [`Bus`]: streams, traced and de-duplicated publishing with retries |
//! | [`consumer`] | durable consumers: spans, idempotency, retries, dead letters, shutdown |
//! | [`handler`] | the [`Handler`] trait and [`HandlerCtx`] |
//! | [`store`] | [`KeyStore`]: durable idempotency keys and outbox (SQLite) |
//! | [`dlq`] | dead-letter entries: writing and reading back |
//! | [`propagation`] | W3C trace context in NATS headers |
//! | [`metrics`] | Prometheus metrics |
//!
//! The flow of one message: [`consumer`] pulls it, opens a span whose parent is the
//! message's `traceparent`, decodes the [`Event`](wnodes_proto::v1::Event) (malformed → dead
//! letter), skips it if the handler's key is in the [`KeyStore`] (republishing the events that
//! handler published), runs the handler, commits the key with the handler's store effects,
//! publishes the handler's events, and acks.

pub mod bus;
pub mod config;
pub mod connect;
pub mod consumer;
pub mod dlq;
pub mod error;
#[cfg(test)]
mod error_rule;
pub mod event;
mod failpoint;
pub mod handler;
pub mod metrics;
pub mod propagation;
pub mod store;
pub mod subject;

pub use bus::{Bus, Published};
pub use config::{ConsumerTuning, NatsConfig, TlsConfig};
pub use consumer::{Consumer, ConsumerSpec};
pub use error::{BusError, ErrorChain};
pub use event::{CloudEventAttributes, EventExt, EventType};
pub use handler::{Handler, HandlerCtx, HandlerError};
pub use metrics::BusMetrics;
pub use store::KeyStore;
pub use wnodes_proto::v1 as proto;
