//! The handler API. Idempotency is the easy path: a handler names its key (by default the
//! event id), the consumer skips keys already handled, effects in the store commit with the key,
//! and events the handler publishes are recorded with it (and republished on a redelivery).
//!
//! ```text
//! effects in the key store       ctx.tx() ... committed together with the key: exactly once
//! effects outside (files, taps)  check host state by ctx.key() before making them
//! events to publish              ctx.publish(ev): sent after the key commits; replayed on redelivery
//! ```

use std::future::Future;

use sqlx::SqliteConnection;
use wnodes_proto::v1::Event;

use crate::{
    db::{Db, Tx},
    error::BusError,
    keys::Store,
    store::KeyStore,
};

/// Why a handler did not finish a message.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Transient: try again later (with backoff); dead-lettered after the last attempt.
    #[error("the handler failed (transient)")]
    Retry(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Permanent: the message can never succeed; dead-lettered at once.
    #[error("the handler rejected the message (permanent)")]
    Reject(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl HandlerError {
    /// A transient failure.
    pub fn retry(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Retry(e.into())
    }

    /// A permanent failure.
    pub fn reject(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Reject(e.into())
    }
}

impl From<BusError> for HandlerError {
    fn from(e: BusError) -> Self {
        Self::Retry(Box::new(e))
    }
}

/// What a handler sees of the delivery, and where it stages its effects.
#[derive(Debug)]
pub struct HandlerCtx {
    pub(crate) key: String,
    pub(crate) subject: async_nats::Subject,
    pub(crate) attempt: u32,
    pub(crate) outbox: Vec<Event>,
    pub(crate) tx: Option<Tx>,
    pub(crate) store: Store,
}

impl HandlerCtx {
    /// The idempotency key of this message: name host resources after it.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The subject the message arrived on.
    pub fn subject(&self) -> &str {
        self.subject.as_str()
    }

    /// 1-based delivery attempt.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Stages an event; it is published after the key commits, never before.
    pub fn publish(&mut self, event: Event) {
        self.outbox.push(event);
    }

    /// The store transaction the key will commit in: write effects that must happen exactly
    /// once here. Opened on first use (`BEGIN IMMEDIATE`); do slow work before, not after.
    ///
    /// For a consumer whose store is SQLite (every host service); [`HandlerCtx::db`] works on
    /// either.
    pub async fn tx(&mut self) -> Result<&mut SqliteConnection, BusError> {
        match self.db().await? {
            Db::Sqlite(c) => Ok(c),
            Db::Postgres(_) => Err(BusError::Config(
                "this consumer's store is PostgreSQL: the handler must use HandlerCtx::db".into(),
            )),
        }
    }

    /// The store transaction the key will commit in, on whichever database the consumer's
    /// store is ([`crate::db`]: one SQL text for both). Opened on first use.
    pub async fn db(&mut self) -> Result<Db<'_>, BusError> {
        if self.tx.is_none() {
            self.tx = Some(self.store.begin().await?);
        }
        match self.tx.as_mut() {
            Some(tx) => Ok(tx.db()),
            None => Err(BusError::Config("transaction vanished".into())),
        }
    }

    /// The consumer's store, for reads outside the transaction.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The consumer's store when it is SQLite (every host service's).
    pub fn sqlite_store(&self) -> Result<&KeyStore, BusError> {
        match &self.store {
            Store::Sqlite(s) => Ok(s),
            Store::Postgres(_) => Err(BusError::Config(
                "this consumer's store is PostgreSQL, not SQLite".into(),
            )),
        }
    }
}

/// One message of a batch ([`Handler::handle_batch`]): its event, and the verdict the handler
/// gives it.
#[derive(Debug)]
pub struct BatchItem {
    pub(crate) key: String,
    pub(crate) attempt: u32,
    pub(crate) event: Event,
    pub(crate) failed: Option<HandlerError>,
    pub(crate) outbox: Vec<Event>,
}

impl BatchItem {
    /// An item outside a consumer: a handler whose [`Handler::handle`] runs its batch code on
    /// one message builds one from its [`HandlerCtx`], then takes back the failure and the
    /// events ([`BatchItem::into_outcome`]).
    pub fn new(key: impl Into<String>, attempt: u32, event: Event) -> Self {
        Self {
            key: key.into(),
            attempt,
            event,
            failed: None,
            outbox: Vec::new(),
        }
    }

    /// What the handler made of it: its events to publish, or its failure.
    pub fn into_outcome(self) -> Result<Vec<Event>, HandlerError> {
        match self.failed {
            Some(e) => Err(e),
            None => Ok(self.outbox),
        }
    }

    /// The message's idempotency key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// 1-based delivery attempt.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// Fails this message alone (retried or dead-lettered as [`HandlerError`] says); the
    /// others of the batch go on. Only before any of its effects were written: what was
    /// written commits with the batch.
    pub fn fail(&mut self, error: HandlerError) {
        self.failed = Some(error);
    }

    /// Whether [`BatchItem::fail`] was called.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Stages an event for this message; published after the batch commits.
    pub fn publish(&mut self, event: Event) {
        self.outbox.push(event);
    }
}

/// The transaction a batch's effects and all its keys commit in.
#[derive(Debug)]
pub struct BatchCtx {
    pub(crate) tx: Option<Tx>,
    pub(crate) store: Store,
}

impl BatchCtx {
    /// The batch's transaction ([`crate::db`]); opened on first use.
    pub async fn db(&mut self) -> Result<Db<'_>, BusError> {
        if self.tx.is_none() {
            self.tx = Some(self.store.begin().await?);
        }
        match self.tx.as_mut() {
            Some(tx) => Ok(tx.db()),
            None => Err(BusError::Config("transaction vanished".into())),
        }
    }
}

/// A message handler run by a durable consumer.
///
/// A handler may also take messages in batches ([`Handler::BATCHED`],
/// [`Handler::handle_batch`]): the consumer hands it every message it has at hand (up to
/// `[consumer] max_batch`; two batches in hand take turns at the store), and the effects of
/// the whole batch commit in one transaction with all its keys, one commit (and one `fsync`)
/// for the lot. Set-based statements make that the fast path
/// of a store-bound consumer (accounting). [`Handler::handle`] stays the path of record: when a
/// batch fails as a whole, it rolls back and every message of it is handled alone.
pub trait Handler: Send + Sync + 'static {
    /// Whether the consumer hands this handler batches ([`Handler::handle_batch`]).
    const BATCHED: bool = false;

    /// Span name for each message, e.g. `"launcher.job_started"`.
    fn name(&self) -> &'static str;

    /// The idempotency key. Default: the event id (deterministic, so a republished event with
    /// another `Nats-Msg-Id` still has the same key).
    fn idempotency_key(&self, event: &Event) -> String {
        event.id.clone()
    }

    /// Handles one event.
    fn handle(
        &self,
        ctx: &mut HandlerCtx,
        event: Event,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Handles a batch in one transaction ([`BatchCtx::db`]), which commits with every key of
    /// the batch. Per message: [`BatchItem::fail`] it *before* writing any of its effects, or
    /// write them and leave it to succeed. An `Err` rolls the whole batch back; each message is
    /// then handled alone by [`Handler::handle`]. Only called when [`Handler::BATCHED`].
    fn handle_batch(
        &self,
        batch: &mut BatchCtx,
        items: &mut [BatchItem],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = (batch, items);
        async { Err(HandlerError::retry("this handler takes no batches")) }
    }
}
