//! The idempotency store on PostgreSQL: the same table as the SQLite [`crate::KeyStore`]
//! (`wnodes_processed`), for a consumer whose effects live in a site's PostgreSQL (accounting's
//! usage records), so that they commit in the same transaction as the message's key.
//!
//! **Acknowledged means durable.** Every connection sets `synchronous_commit = on` (a commit
//! returns after its WAL record is flushed, whatever the server's default), and connecting
//! fails when the server runs with `fsync = off` (where no commit is durable).
//!
//! Several processes may share one database: the table is created under an advisory lock, and
//! two deliveries of one key racing in two processes insert once (`ON CONFLICT DO NOTHING`;
//! the second waits for the first's transaction and reports a duplicate).

use std::{collections::HashMap, str::FromStr, sync::Arc, time::Duration};

use sqlx::{
    Executor as _, PgPool, Postgres, Transaction,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use wnodes_proto::v1::Event;

use crate::{
    error::BusError,
    store::{decode_outbox, encode_outbox, unix_now},
};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS wnodes_processed (
    consumer     TEXT   NOT NULL,
    key          TEXT   NOT NULL,
    processed_at BIGINT NOT NULL,  -- unix seconds
    outbox       BYTEA,            -- length-delimited wnodes.v1.Event messages
    PRIMARY KEY (consumer, key)
)";

const INSERT: &str = "INSERT INTO wnodes_processed (consumer, key, processed_at, outbox)
    VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, key) DO NOTHING";

/// The keys among `$2` that consumer `$1` handled, with their outboxes. Driven by the keys: one
/// primary-key probe per key. A plain join (or `key = ANY($2)`) gets a generic plan, made while
/// the table was small, that reads every key of the consumer once the table has grown (12.8 ms
/// a batch at 100,000 keys, `docs/benchmarks.md`); a correlated subquery with `LIMIT 1` cannot
/// be turned into that join.
const LOOKUP_MANY: &str = "SELECT k.key, p.outbox FROM unnest($2::text[]) AS k(key)
     CROSS JOIN LATERAL (
         SELECT outbox FROM wnodes_processed WHERE consumer = $1 AND key = k.key LIMIT 1
     ) AS p";

/// Arbitrary, fixed: serialises `CREATE TABLE IF NOT EXISTS` between processes (PostgreSQL's
/// is not safe against a concurrent one).
const SCHEMA_LOCK: i64 = 0x776e_6f64_6573_6b65; // "wnodeske"

/// Handle to a PostgreSQL idempotency store; cheap to clone.
#[derive(Debug, Clone)]
pub struct PgKeyStore {
    pool: PgPool,
    /// The URL without its password, for errors and logs.
    display: Arc<str>,
}

/// `postgres://user@host:port/database`: what errors and logs say (never the password).
pub fn redact(opts: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        opts.get_username(),
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or_default()
    )
}

/// A pool of at most `max_connections` whose every connection first runs `session` (e.g.
/// `SET synchronous_commit = on`), waiting up to 30 s for a connection.
pub fn pool_options(max_connections: u32, session: &'static str) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                conn.execute(session).await?;
                Ok(())
            })
        })
}

impl PgKeyStore {
    /// Connects to `url` (`postgres://…` or `postgresql://…`), checks that commits are durable
    /// and creates the key table. `max_connections` bounds the pool (a consumer's in-flight
    /// transactions each hold one).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, BusError> {
        let opts = PgConnectOptions::from_str(url).map_err(|source| BusError::Store {
            path: "(the PostgreSQL URL could not be parsed)".into(),
            source,
        })?;
        let display: Arc<str> = redact(&opts).into();
        let err = |source| BusError::Store {
            path: display.to_string(),
            source,
        };
        let pool = pool_options(max_connections, "SET synchronous_commit = on")
            .connect_with(opts)
            .await
            .map_err(err)?;
        let fsync: String = sqlx::query_scalar("SHOW fsync")
            .fetch_one(&pool)
            .await
            .map_err(err)?;
        if fsync != "on" {
            return Err(BusError::NotDurable {
                store: display.to_string(),
                reason: format!("the server runs with fsync = {fsync}"),
            });
        }
        let mut tx = pool.begin().await.map_err(err)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SCHEMA_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(SCHEMA).execute(&mut *tx).await.map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(Self { pool, display })
    }

    /// The database, for a service's own tables (use [`crate::HandlerCtx::db`] in handlers).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The URL without its password.
    pub fn display(&self) -> &str {
        &self.display
    }

    fn err(&self, source: sqlx::Error) -> BusError {
        BusError::Store {
            path: self.display.to_string(),
            source,
        }
    }

    /// `Some(outbox)` when `key` was already handled by `consumer`.
    pub async fn lookup(&self, consumer: &str, key: &str) -> Result<Option<Vec<Event>>, BusError> {
        let row: Option<(Option<Vec<u8>>,)> =
            sqlx::query_as("SELECT outbox FROM wnodes_processed WHERE consumer = $1 AND key = $2")
                .bind(consumer)
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        Ok(row.map(|(blob,)| blob.as_deref().map(decode_outbox).unwrap_or_default()))
    }

    /// Begins a transaction.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, BusError> {
        self.pool.begin().await.map_err(|e| self.err(e))
    }

    /// Records `key` inside `tx`. `false` when it was already there: the caller must roll back.
    pub async fn record_in(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        consumer: &str,
        key: &str,
        outbox: &[Event],
    ) -> Result<bool, BusError> {
        let res = sqlx::query(INSERT)
            .bind(consumer)
            .bind(key)
            .bind(unix_now())
            .bind((!outbox.is_empty()).then(|| encode_outbox(outbox)))
            .execute(&mut **tx)
            .await
            .map_err(|e| self.err(e))?;
        Ok(res.rows_affected() == 1)
    }

    /// [`PgKeyStore::lookup`] of many keys at once: the outbox of each key already handled.
    pub async fn lookup_many(
        &self,
        consumer: &str,
        keys: &[&str],
    ) -> Result<HashMap<String, Vec<Event>>, BusError> {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        let rows: Vec<(String, Option<Vec<u8>>)> = sqlx::query_as(LOOKUP_MANY)
            .bind(consumer)
            .bind(keys)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|(k, blob)| (k, blob.as_deref().map(decode_outbox).unwrap_or_default()))
            .collect())
    }

    /// Records every key (with its outbox) inside `tx`. `false` when any was already there: the
    /// caller must roll back.
    pub async fn record_many_in(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        consumer: &str,
        keys: &[(&str, &[Event])],
    ) -> Result<bool, BusError> {
        // One array per column, so the statement's text (and plan) is the same for any
        // number of keys.
        let (names, outboxes): (Vec<String>, Vec<Option<Vec<u8>>>) = keys
            .iter()
            .map(|(key, outbox)| {
                (
                    (*key).to_owned(),
                    (!outbox.is_empty()).then(|| encode_outbox(outbox)),
                )
            })
            .unzip();
        let inserted = sqlx::query(
            "INSERT INTO wnodes_processed (consumer, key, processed_at, outbox)
             SELECT $1, k, $2, o FROM unnest($3::text[], $4::bytea[]) AS t(k, o)
             ON CONFLICT (consumer, key) DO NOTHING",
        )
        .bind(consumer)
        .bind(unix_now())
        .bind(names)
        .bind(outboxes)
        .execute(&mut **tx)
        .await
        .map_err(|e| self.err(e))?
        .rows_affected();
        Ok(inserted == keys.len() as u64)
    }

    /// Records `key` in a transaction of its own. `false` when it was already there.
    pub async fn record(
        &self,
        consumer: &str,
        key: &str,
        outbox: &[Event],
    ) -> Result<bool, BusError> {
        let res = sqlx::query(INSERT)
            .bind(consumer)
            .bind(key)
            .bind(unix_now())
            .bind((!outbox.is_empty()).then(|| encode_outbox(outbox)))
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(res.rows_affected() == 1)
    }

    /// Forgets keys handled before `older_than` ago. Returns how many were removed.
    pub async fn prune(&self, older_than: Duration) -> Result<u64, BusError> {
        let cutoff = unix_now() - older_than.as_secs() as i64;
        let res = sqlx::query("DELETE FROM wnodes_processed WHERE processed_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(res.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> PgKeyStore {
        let db = wnodes_testkit::postgres::database().await;
        PgKeyStore::connect(&db.url, 4).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn keys_survive_reconnect_and_duplicates_are_reported() {
        let db = wnodes_testkit::postgres::database().await;
        let ev = Event {
            id: "vm.requested:x".into(),
            ..Default::default()
        };
        {
            let s = PgKeyStore::connect(&db.url, 2).await.unwrap();
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
            s.pool().close().await;
        }
        let s = PgKeyStore::connect(&db.url, 2).await.unwrap();
        assert_eq!(s.lookup("c", "k1").await.unwrap().unwrap(), vec![ev]);
        assert!(s.lookup("c", "k2").await.unwrap().is_none());
        assert!(s.lookup("other", "k1").await.unwrap().is_none());
        assert_eq!(s.prune(Duration::from_secs(3600)).await.unwrap(), 0);
        assert_eq!(
            s.prune(Duration::ZERO).await.unwrap(),
            0,
            "keys of this second stay"
        );
    }

    /// The batch lookup finds exactly the handled keys with their outboxes, and its generic
    /// plan (the one a prepared statement ends up with) probes the primary key per key
    /// instead of reading every key of the consumer.
    #[tokio::test(flavor = "multi_thread")]
    async fn lookup_many_probes_the_key_index_under_a_generic_plan() {
        let s = store().await;
        let ev = Event {
            id: "usage.recorded:r1".into(),
            ..Default::default()
        };
        assert!(
            s.record("c", "k1", std::slice::from_ref(&ev))
                .await
                .unwrap()
        );
        assert!(s.record("c", "k2", &[]).await.unwrap());
        assert!(s.record("other", "k3", &[]).await.unwrap());
        let found = s.lookup_many("c", &["k1", "k2", "k3", "k4"]).await.unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found["k1"], vec![ev]);
        assert!(found["k2"].is_empty());

        let mut c = s.pool().acquire().await.unwrap();
        sqlx::query("SET plan_cache_mode = force_generic_plan")
            .execute(&mut *c)
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "PREPARE lookup_many(text, text[]) AS {LOOKUP_MANY}"
        )))
        .execute(&mut *c)
        .await
        .unwrap();
        let lines: Vec<(String,)> =
            sqlx::query_as("EXPLAIN (COSTS OFF) EXECUTE lookup_many('c', ARRAY['k1'])")
                .fetch_all(&mut *c)
                .await
                .unwrap();
        let plan: Vec<String> = lines.into_iter().map(|(l,)| l).collect();
        assert!(
            plan.iter()
                .any(|l| l.contains("Index Cond: ((consumer = $1) AND (key = k.key))")),
            "the lookup must probe (consumer, key) per key: {plan:#?}"
        );
    }

    /// Two deliveries of one key in two transactions at once: the second waits for the first
    /// and learns it is a duplicate (so it rolls back its effects).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_key_racing_in_two_transactions_is_new_once() {
        let s = store().await;
        let mut a = s.begin().await.unwrap();
        assert!(s.record_in(&mut a, "c", "k", &[]).await.unwrap());
        let second = {
            let s = s.clone();
            tokio::spawn(async move {
                let mut b = s.begin().await.unwrap();
                s.record_in(&mut b, "c", "k", &[]).await.unwrap()
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !second.is_finished(),
            "the second waits for the first's transaction"
        );
        a.commit().await.unwrap();
        assert!(!second.await.unwrap(), "the second is a duplicate");
    }

    /// Acknowledged means durable: every connection commits synchronously, whatever the
    /// server's default.
    #[tokio::test(flavor = "multi_thread")]
    async fn every_connection_commits_synchronously() {
        let db = wnodes_testkit::postgres::database().await;
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
            .await
            .unwrap();
        // A database whose default would lose acknowledged commits on a crash.
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE {} SET synchronous_commit = off",
                db.name
            )))
            .await
            .unwrap();
        let s = PgKeyStore::connect(&db.url, 3).await.unwrap();
        let mut conns = Vec::new();
        for _ in 0..3 {
            let mut c = s.pool().acquire().await.unwrap();
            let v: String = sqlx::query_scalar("SHOW synchronous_commit")
                .fetch_one(&mut *c)
                .await
                .unwrap();
            assert_eq!(v, "on");
            conns.push(c);
        }
    }
}
