//! The durable idempotency store: which (consumer, key) pairs were handled, and the events
//! their handlers published (the outbox), in a local SQLite database.
//!
//! A handler's effects that live in the same database commit in the same transaction as its
//! key ([`crate::HandlerCtx::tx`]), so they happen exactly once. Keys of handlers that did
//! not open a transaction are written by a group committer: a thread of its own with a
//! synchronous SQLite connection, committing every key that arrived while it was busy in one
//! transaction. (Through sqlx, each statement is a round trip to sqlx's worker thread; those
//! thread switches, not SQLite, were most of the cost of a key: docs/benchmarks.md.)
//!
//! Services keep their own tables in the same file ([`KeyStore::pool`]).
//!
//! **Acknowledged means durable.** Both connections run WAL with `synchronous=FULL`: a commit
//! returns only after the WAL is on disk, and the consumer acks a message only after its key
//! (and the handler's effects) committed, so nothing a service acknowledged can vanish on power
//! loss. (`NORMAL` would let the last commits before a power cut roll back after the server had
//! already dropped the acked messages.) The cost is one `fsync` per commit, shared by every key
//! of a group commit: `docs/benchmarks.md`, "Acknowledged means durable".

use parking_lot::Mutex;
use std::{
    collections::{HashMap, HashSet},
    path::Path,
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use sha2::Digest;

use prost::Message;
use sqlx::{
    QueryBuilder, Sqlite, SqlitePool, Transaction,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use std::sync::mpsc;

use tokio::sync::oneshot;
use wnodes_proto::v1::Event;

use crate::error::BusError;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS wnodes_processed (
    consumer     TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    processed_at INTEGER NOT NULL,  -- unix seconds
    outbox       BLOB,              -- length-delimited wnodes.v1.Event messages
    PRIMARY KEY (consumer, key)
) WITHOUT ROWID";

const INSERT: &str = "INSERT OR IGNORE INTO wnodes_processed (consumer, key, processed_at, outbox) VALUES (?, ?, ?, ?)";

/// Keys per statement of the many-key calls (4 binds each, far below SQLite's and PostgreSQL's
/// limits on bound parameters).
pub(crate) const BIND_CHUNK: usize = 500;

struct CommitReq {
    consumer: String,
    key: String,
    outbox: Vec<u8>,
    done: oneshot::Sender<Result<bool, Arc<rusqlite::Error>>>,
}

/// Most keys one group commit takes.
const MAX_BATCH: usize = 1024;

/// How long the committer keeps collecting after the first key of a batch. A commit costs
/// ~40 µs however few keys it carries (locks, WAL frames of every page it touched), and every
/// key sent to a committer blocked on the channel costs a futex wake: without this pause a busy
/// consumer committed ~7 keys at a time (docs/benchmarks.md). Each key waits at most this long
/// more; a job's events are seconds apart.
const LINGER: Duration = Duration::from_micros(500);

/// Handle to the store; cheap to clone.
#[derive(Debug, Clone)]
pub struct KeyStore {
    read: SqlitePool,
    write: SqlitePool,
    /// Unbounded, so that `record` never blocks a runtime thread; what waits in it is bounded
    /// by the consumers' in-flight limits (each request's handler awaits its answer).
    committer: mpsc::Sender<CommitReq>,
    path: Arc<str>,
    /// 64-bit hashes of every stored (consumer, key): a key whose hash is absent was certainly
    /// never handled, so the common case (a new message) needs no database read. A hash hit
    /// (handled, or a collision) is confirmed in the database. 8 bytes per key in memory.
    seen: Arc<Mutex<HashSet<u64>>>,
}

fn key_hash(consumer: &str, key: &str) -> u64 {
    let digest = sha2::Sha256::new()
        .chain_update(consumer.as_bytes())
        .chain_update([0u8])
        .chain_update(key.as_bytes())
        .finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(b)
}

impl std::fmt::Debug for CommitReq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitReq").field("key", &self.key).finish()
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Encodes events as the outbox blob.
pub(crate) fn encode_outbox(events: &[Event]) -> Vec<u8> {
    let mut buf = Vec::new();
    for e in events {
        // Encoding into a Vec cannot run out of space.
        let _ = e.encode_length_delimited(&mut buf);
    }
    buf
}

pub(crate) fn decode_outbox(mut blob: &[u8]) -> Vec<Event> {
    let mut out = Vec::new();
    while !blob.is_empty() {
        match Event::decode_length_delimited(&mut blob) {
            Ok(e) => out.push(e),
            Err(_) => break,
        }
    }
    out
}

impl KeyStore {
    /// Opens (creating if needed) the store at `path`: WAL journal, `synchronous=FULL`.
    pub async fn open(path: &Path) -> Result<Self, BusError> {
        let display = path.display().to_string();
        let err = |source| BusError::Store {
            path: display.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(sqlx::Error::Io(e)))?;
        }
        let opts = SqliteConnectOptions::from_str("sqlite:")
            .map_err(err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await
            .map_err(err)?;
        sqlx::query(SCHEMA).execute(&write).await.map_err(err)?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(err)?;
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT consumer, key FROM wnodes_processed")
                .fetch_all(&read)
                .await
                .map_err(err)?;
        let seen: HashSet<u64> = rows.iter().map(|(c, k)| key_hash(c, k)).collect();
        let seen = Arc::new(Mutex::new(seen));
        let (tx, rx) = mpsc::channel();
        let conn = committer_connection(path).map_err(|e| BusError::KeyCommit {
            path: display.clone(),
            source: Arc::new(e),
        })?;
        let committer_seen = seen.clone();
        std::thread::Builder::new()
            .name("wnodes-keys".into())
            .spawn(move || group_committer(conn, rx, committer_seen))
            .map_err(|e| err(sqlx::Error::Io(e)))?;
        Ok(Self {
            read,
            write,
            committer: tx,
            path: display.into(),
            seen,
        })
    }

    /// The database, for a service's own tables (use [`crate::HandlerCtx::tx`] inside handlers).
    pub fn pool(&self) -> &SqlitePool {
        &self.write
    }

    /// A connection pool for reads only.
    pub fn read_pool(&self) -> &SqlitePool {
        &self.read
    }

    fn err(&self, source: sqlx::Error) -> BusError {
        BusError::Store {
            path: self.path.to_string(),
            source,
        }
    }

    /// `Some(outbox)` when `key` was already handled by `consumer`.
    pub async fn lookup(&self, consumer: &str, key: &str) -> Result<Option<Vec<Event>>, BusError> {
        let maybe = self.seen.lock().contains(&key_hash(consumer, key));
        if !maybe {
            return Ok(None);
        }
        let row: Option<(Option<Vec<u8>>,)> =
            sqlx::query_as("SELECT outbox FROM wnodes_processed WHERE consumer = ? AND key = ?")
                .bind(consumer)
                .bind(key)
                .fetch_optional(&self.read)
                .await
                .map_err(|e| self.err(e))?;
        Ok(row.map(|(blob,)| blob.as_deref().map(decode_outbox).unwrap_or_default()))
    }

    /// Begins a write transaction (`BEGIN IMMEDIATE`, so it never fails half-way on a lock
    /// upgrade).
    pub async fn begin(&self) -> Result<Transaction<'static, Sqlite>, BusError> {
        self.write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err(e))
    }

    /// Records `key` inside `tx` (the handler's own transaction). `false` when it was already
    /// there (a concurrent duplicate): the caller must roll back.
    pub async fn record_in(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        consumer: &str,
        key: &str,
        outbox: &[Event],
    ) -> Result<bool, BusError> {
        let res = sqlx::query(INSERT)
            .bind(consumer)
            .bind(key)
            .bind(unix_now())
            .bind(encode_outbox(outbox))
            .execute(&mut **tx)
            .await
            .map_err(|e| self.err(e))?;
        // A hash in the set only means "maybe handled" (confirmed in the database), so adding
        // it before the commit is safe even if the transaction rolls back.
        self.seen.lock().insert(key_hash(consumer, key));
        Ok(res.rows_affected() == 1)
    }

    /// [`KeyStore::lookup`] of many keys at once: the outbox of each key already handled.
    pub async fn lookup_many(
        &self,
        consumer: &str,
        keys: &[&str],
    ) -> Result<HashMap<String, Vec<Event>>, BusError> {
        let maybe: Vec<&str> = {
            let seen = self.seen.lock();
            keys.iter()
                .copied()
                .filter(|k| seen.contains(&key_hash(consumer, k)))
                .collect()
        };
        let mut found = HashMap::new();
        for chunk in maybe.chunks(BIND_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "SELECT key, outbox FROM wnodes_processed WHERE consumer = ",
            );
            q.push_bind(consumer).push(" AND key IN (");
            let mut list = q.separated(", ");
            for k in chunk {
                list.push_bind(*k);
            }
            list.push_unseparated(")");
            let rows: Vec<(String, Option<Vec<u8>>)> = q
                .build_query_as()
                .fetch_all(&self.read)
                .await
                .map_err(|e| self.err(e))?;
            found.extend(
                rows.into_iter()
                    .map(|(k, blob)| (k, blob.as_deref().map(decode_outbox).unwrap_or_default())),
            );
        }
        Ok(found)
    }

    /// Records every key (with its outbox) inside `tx`. `false` when any was already there (a
    /// concurrent duplicate): the caller must roll back.
    pub async fn record_many_in(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        consumer: &str,
        keys: &[(&str, &[Event])],
    ) -> Result<bool, BusError> {
        let now = unix_now();
        let mut inserted = 0;
        for chunk in keys.chunks(BIND_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT OR IGNORE INTO wnodes_processed (consumer, key, processed_at, outbox) ",
            );
            q.push_values(chunk, |mut row, (key, outbox)| {
                row.push_bind(consumer)
                    .push_bind(*key)
                    .push_bind(now)
                    .push_bind(encode_outbox(outbox));
            });
            inserted += q
                .build()
                .execute(&mut **tx)
                .await
                .map_err(|e| self.err(e))?
                .rows_affected();
        }
        // As in record_in: a hash only means "maybe handled".
        let mut seen = self.seen.lock();
        for (key, _) in keys {
            seen.insert(key_hash(consumer, key));
        }
        Ok(inserted == keys.len() as u64)
    }

    /// Records `key` through the group committer. `false` when it was already there.
    pub async fn record(
        &self,
        consumer: &str,
        key: &str,
        outbox: &[Event],
    ) -> Result<bool, BusError> {
        let (done, rx) = oneshot::channel();
        let req = CommitReq {
            consumer: consumer.to_owned(),
            key: key.to_owned(),
            outbox: encode_outbox(outbox),
            done,
        };
        let closed = || self.err(sqlx::Error::PoolClosed);
        self.committer.send(req).map_err(|_| closed())?;
        rx.await
            .map_err(|_| closed())?
            .map_err(|source| BusError::KeyCommit {
                path: self.path.to_string(),
                source,
            })
    }

    /// Forgets keys handled before `older_than` ago. Returns how many were removed.
    pub async fn prune(&self, older_than: Duration) -> Result<u64, BusError> {
        let cutoff = unix_now() - older_than.as_secs() as i64;
        let res = sqlx::query("DELETE FROM wnodes_processed WHERE processed_at < ?")
            .bind(cutoff)
            .execute(&self.write)
            .await
            .map_err(|e| self.err(e))?;
        Ok(res.rows_affected())
    }
}

/// The committer's own connection (the schema exists: [`KeyStore::open`] created it).
fn committer_connection(path: &Path) -> Result<rusqlite::Connection, rusqlite::Error> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

/// Runs on its own thread until every [`KeyStore`] handle is dropped: takes every request
/// that is waiting (up to [`MAX_BATCH`]), inserts them in one transaction, answers each.
fn group_committer(
    mut conn: rusqlite::Connection,
    rx: mpsc::Receiver<CommitReq>,
    seen: Arc<Mutex<HashSet<u64>>>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        // Sleep rather than wait on the channel: a sender wakes a thread blocked in `recv`
        // (a futex call per key), not a sleeping one.
        std::thread::sleep(LINGER);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // Before the commit: a hash in the set only means "maybe handled" (a lookup then
        // reads the database), so it may be there early, never late.
        seen.lock()
            .extend(batch.iter().map(|r| key_hash(&r.consumer, &r.key)));
        match commit_batch(&mut conn, &batch) {
            Ok(inserted) => {
                for (r, ins) in batch.drain(..).zip(inserted) {
                    let _ = r.done.send(Ok(ins));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for r in batch.drain(..) {
                    let _ = r.done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Inserts a batch in one transaction; per request, whether its key was new (a key twice in
/// one batch is new the first time only).
fn commit_batch(
    conn: &mut rusqlite::Connection,
    batch: &[CommitReq],
) -> Result<Vec<bool>, rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let now = unix_now();
    let mut inserted = Vec::with_capacity(batch.len());
    {
        let mut insert = tx.prepare_cached(INSERT)?;
        for r in batch {
            let outbox = (!r.outbox.is_empty()).then_some(r.outbox.as_slice());
            let n = insert.execute(rusqlite::params![r.consumer, r.key, now, outbox])?;
            inserted.push(n == 1);
        }
    }
    tx.commit()?;
    Ok(inserted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn keys_survive_reopen_and_duplicates_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let ev = Event {
            id: "vm.requested:x".into(),
            ..Default::default()
        };
        {
            let s = KeyStore::open(&path).await.unwrap();
            assert!(s.lookup("c", "k1").await.unwrap().is_none());
            assert!(
                s.record("c", "k1", std::slice::from_ref(&ev))
                    .await
                    .unwrap()
            );
            assert!(!s.record("c", "k1", &[]).await.unwrap());
            let mut tx = s.begin().await.unwrap();
            assert!(s.record_in(&mut tx, "c", "k2", &[]).await.unwrap());
            drop(tx); // rolled back
        }
        let s = KeyStore::open(&path).await.unwrap();
        assert_eq!(s.lookup("c", "k1").await.unwrap().unwrap(), vec![ev]);
        assert!(s.lookup("c", "k2").await.unwrap().is_none());
        assert!(s.lookup("other", "k1").await.unwrap().is_none());
        assert_eq!(s.prune(Duration::from_secs(3600)).await.unwrap(), 0);
    }

    /// Acknowledged means durable: every connection that commits keys or a handler's effects
    /// runs WAL with synchronous=FULL (2), so a commit is on disk before the message is acked.
    #[tokio::test(flavor = "multi_thread")]
    async fn every_committing_connection_is_wal_and_synchronous_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let s = KeyStore::open(&path).await.unwrap();
        let mut tx = s.begin().await.unwrap();
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(sync, 2, "handler transactions");
        drop(tx);
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(s.pool())
            .await
            .unwrap();
        assert_eq!(sync, 2, "the service's pool");
        let conn = committer_connection(&path).unwrap();
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "the group committer");
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    /// The group committer (its own connection) and handlers' transactions (the sqlx pool)
    /// write the same file: they must wait for each other, never fail or lose a key.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_committer_and_handler_transactions_share_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let s = KeyStore::open(&path).await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..300 {
            let s = s.clone();
            tasks.spawn(async move { s.record("group", &format!("k{i}"), &[]).await });
        }
        for i in 0..20 {
            let s = s.clone();
            tasks.spawn(async move {
                let mut tx = s.begin().await?;
                let new = s.record_in(&mut tx, "tx", &format!("t{i}"), &[]).await?;
                // Hold the write lock a while, so group commits have to wait for it.
                tokio::time::sleep(Duration::from_millis(5)).await;
                tx.commit().await.map_err(|e| s.err(e))?;
                Ok(new)
            });
        }
        while let Some(r) = tasks.join_next().await {
            assert!(r.unwrap().unwrap(), "every key is new and stored");
        }
        drop(s);
        let s = KeyStore::open(&path).await.unwrap();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT consumer, COUNT(*) FROM wnodes_processed GROUP BY consumer ORDER BY consumer",
        )
        .fetch_all(s.read_pool())
        .await
        .unwrap();
        assert_eq!(rows, vec![("group".into(), 300), ("tx".into(), 20)]);
        assert!(s.lookup("group", "k299").await.unwrap().is_some());
        assert!(s.lookup("tx", "t19").await.unwrap().is_some());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_key_twice_in_one_group_commit_is_new_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = KeyStore::open(&dir.path().join("keys.db")).await.unwrap();
        assert!(s.record("c", "old", &[]).await.unwrap());
        // Sent together, so the committer usually takes them as one batch (and either way each
        // key must be reported new exactly once).
        let (a, b, old, new) = tokio::join!(
            s.record("c", "k", &[]),
            s.record("c", "k", &[]),
            s.record("c", "old", &[]),
            s.record("c", "new", &[]),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(a ^ b, "exactly one of the two records of k is new: {a} {b}");
        assert!(!old.unwrap());
        assert!(new.unwrap());
    }
}
