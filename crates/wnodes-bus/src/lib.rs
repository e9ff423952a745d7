//! The WNoDeS event bus: every service talks to the others only through this crate.
//!
//! | module | what it holds |
//! |---|---|
//! | [`subject`] | every subject, stream and consumer name; host-name encoding |
//! | [`event`] | event type names, run keys, deterministic event ids (`Nats-Msg-Id`) |
//! | [`config`] | NATS connection, credentials, TLS, stream and consumer settings |
//! | [`connect`] | connecting: credentials, rustls, reconnects |
//! | [`control`] | control requests to one host's service: core NATS request/reply with a stream of answers |
//! | [`roles`] | who publishes and consumes what: the table services, provisioning and permissions share |
//! | [`layout`] | the streams and durable consumers as provisioned, and the check that names each difference |
//! | [`bus`] | [`Bus`]: the stream check, traced and de-duplicated publishing with retries |
//! | [`runs`] | a run's events read back from the stream, and its per-phase timeline |
//! | [`vms`] | the VMs the stream knows of, each in the state of its last `vm.*` event |
//! | [`heartbeat`] | each service's heartbeat in the hosts key-value bucket, and reading them back |
//! | [`denial`] | the server's permission violations, so a refused publish fails at once |
//! | [`consumer`] | durable consumers: spans, idempotency, retries, dead letters, shutdown, batches |
//! | [`handler`] | the [`Handler`] trait, [`HandlerCtx`], and a batch's [`BatchCtx`] and [`BatchItem`] |
//! | [`keys`] | [`Store`]: the consumer's idempotency store, SQLite or PostgreSQL |
//! | [`store`] | [`KeyStore`]: durable idempotency keys and outbox on SQLite (every host service) |
//! | [`pg_store`] | [`PgKeyStore`]: the same on PostgreSQL (a site's accounting) |
//! | [`db`] | one SQL text on either database: [`db::Db`], [`db::Pool`], [`db::Tx`], [`on_db!`], [`on_pool!`] |
//! | [`dlq`] | dead-letter entries: writing and reading back |
//! | [`propagation`] | W3C trace context in NATS headers |
//! | [`metrics`] | Prometheus metrics |
//! | [`fuzzing`] | what the fuzz targets (`fuzz/`) check, shared with the corpus replay test |
//!
//! The flow of one message: [`consumer`] pulls it, opens a span whose parent is the
//! message's `traceparent`, decodes the [`Event`](wnodes_proto::v1::Event) (malformed → dead
//! letter), skips it if the handler's key is in the [`KeyStore`] (republishing the events that
//! handler published), runs the handler, commits the key with the handler's store effects,
//! publishes the handler's events, and acks. A batched handler ([`Handler::BATCHED`]) gets
//! every message at hand at once and commits their effects and keys in one transaction.

pub mod bus;
pub mod config;
pub mod connect;
pub mod consumer;
pub mod control;
pub mod db;
pub mod denial;
pub mod dlq;
pub mod error;
#[cfg(test)]
mod error_rule;
pub mod event;
mod failpoint;
pub mod fuzzing;
pub mod handler;
pub mod heartbeat;
pub mod keys;
pub mod layout;
pub mod metrics;
pub mod pg_store;
pub mod propagation;
pub mod roles;
pub mod runs;
pub mod store;
pub mod subject;
pub mod vms;

pub use bus::{Bus, Published};
pub use config::{ConsumerTuning, NatsConfig, TlsConfig};
pub use consumer::{Consumer, ConsumerSpec};
pub use error::{BusError, ErrorChain};
pub use event::{CloudEventAttributes, EventExt, EventType};
pub use handler::{BatchCtx, BatchItem, Handler, HandlerCtx, HandlerError};
pub use keys::Store;
pub use metrics::BusMetrics;
pub use pg_store::PgKeyStore;
pub use roles::{Role, Scope};
pub use store::KeyStore;
pub use wnodes_proto::v1 as proto;
