//! [`Store`]: a consumer's idempotency store, on SQLite ([`KeyStore`], every host service) or
//! on PostgreSQL ([`PgKeyStore`], accounting at a site). The consumer only sees this type.

use std::{collections::HashMap, time::Duration};

use wnodes_proto::v1::Event;

use crate::{
    db::{Pool, Tx},
    error::BusError,
    pg_store::PgKeyStore,
    store::KeyStore,
};

/// A consumer's idempotency store.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(KeyStore),
    Postgres(PgKeyStore),
}

impl From<KeyStore> for Store {
    fn from(s: KeyStore) -> Self {
        Self::Sqlite(s)
    }
}

impl From<PgKeyStore> for Store {
    fn from(s: PgKeyStore) -> Self {
        Self::Postgres(s)
    }
}

impl Store {
    /// The pool that writes: a service's own tables live beside the keys.
    pub fn pool(&self) -> Pool {
        match self {
            Self::Sqlite(s) => Pool::Sqlite(s.pool().clone()),
            Self::Postgres(s) => Pool::Postgres(s.pool().clone()),
        }
    }

    /// `Some(outbox)` when `key` was already handled by `consumer`.
    pub async fn lookup(&self, consumer: &str, key: &str) -> Result<Option<Vec<Event>>, BusError> {
        match self {
            Self::Sqlite(s) => s.lookup(consumer, key).await,
            Self::Postgres(s) => s.lookup(consumer, key).await,
        }
    }

    /// Begins the transaction a handler's effects and its key commit in.
    pub async fn begin(&self) -> Result<Tx, BusError> {
        Ok(match self {
            Self::Sqlite(s) => Tx::Sqlite(s.begin().await?),
            Self::Postgres(s) => Tx::Postgres(s.begin().await?),
        })
    }

    /// Records `key` inside `tx` (begun by [`Store::begin`] on this store). `false` when it was
    /// already there: the caller must roll back.
    pub async fn record_in(
        &self,
        tx: &mut Tx,
        consumer: &str,
        key: &str,
        outbox: &[Event],
    ) -> Result<bool, BusError> {
        match (self, tx) {
            (Self::Sqlite(s), Tx::Sqlite(t)) => s.record_in(t, consumer, key, outbox).await,
            (Self::Postgres(s), Tx::Postgres(t)) => s.record_in(t, consumer, key, outbox).await,
            _ => Err(BusError::Config(
                "a transaction of one database used with the other's store".into(),
            )),
        }
    }

    /// [`Store::lookup`] of many keys at once: the outbox of each key already handled.
    pub async fn lookup_many(
        &self,
        consumer: &str,
        keys: &[&str],
    ) -> Result<HashMap<String, Vec<Event>>, BusError> {
        match self {
            Self::Sqlite(s) => s.lookup_many(consumer, keys).await,
            Self::Postgres(s) => s.lookup_many(consumer, keys).await,
        }
    }

    /// Records every key inside `tx` (begun by [`Store::begin`]). `false` when any was already
    /// there: the caller must roll back.
    pub async fn record_many_in(
        &self,
        tx: &mut Tx,
        consumer: &str,
        keys: &[(&str, &[Event])],
    ) -> Result<bool, BusError> {
        match (self, tx) {
            (Self::Sqlite(s), Tx::Sqlite(t)) => s.record_many_in(t, consumer, keys).await,
            (Self::Postgres(s), Tx::Postgres(t)) => s.record_many_in(t, consumer, keys).await,
            _ => Err(BusError::Config(
                "a transaction of one database used with the other's store".into(),
            )),
        }
    }

    /// Records `key` on its own. `false` when it was already there.
    pub async fn record(
        &self,
        consumer: &str,
        key: &str,
        outbox: &[Event],
    ) -> Result<bool, BusError> {
        match self {
            Self::Sqlite(s) => s.record(consumer, key, outbox).await,
            Self::Postgres(s) => s.record(consumer, key, outbox).await,
        }
    }

    /// Forgets keys handled before `older_than` ago.
    pub async fn prune(&self, older_than: Duration) -> Result<u64, BusError> {
        match self {
            Self::Sqlite(s) => s.prune(older_than).await,
            Self::Postgres(s) => s.prune(older_than).await,
        }
    }
}
