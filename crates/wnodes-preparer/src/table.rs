//! The resource table (`wnodes_resources`, in the service's key store): one row per
//! (kind, VM).
//!
//! ```text
//! pending    known, nothing held yet (the gateway: the spec arrived, network.ready not yet)
//! prepared   the resource is held on the host for the VM
//! released   tombstone: nothing is held; a late request creates nothing and is released again
//! ```
//!
//! Transitions: none → pending / prepared / released (a release before any request writes a
//! tombstone); pending → prepared / released; prepared → prepared (new detail) / released.
//! `released` is final: [`Table::prepare`] refuses it, and releasing it again changes nothing
//! (a redelivery). The state is stored as its name and checked by the schema; the detail is
//! the service's own type as JSON.

use std::{fmt, marker::PhantomData};

use serde::{Serialize, de::DeserializeOwned};
use sqlx::{Sqlite, SqliteConnection, SqlitePool};

use crate::row::{Kind, Released, Row, State};

/// Creates the table (shared by every kind).
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS wnodes_resources (
    kind       TEXT    NOT NULL CHECK (kind IN ('scratch', 'network', 'storage')),
    vm_id      TEXT    NOT NULL,
    run_key    TEXT    NOT NULL,   -- site/lrms/job_id/attempt; empty when unknown
    state      TEXT    NOT NULL CHECK (state IN ('pending', 'prepared', 'released')),
    detail     TEXT    NOT NULL,   -- JSON: the service's own detail type
    created_at INTEGER NOT NULL,   -- unix seconds
    updated_at INTEGER NOT NULL,   -- unix seconds
    PRIMARY KEY (kind, vm_id)
) WITHOUT ROWID";

/// The columns a [`RawRow`] reads, as a literal (sqlx takes only `'static` SQL).
macro_rules! select_rows {
    ($($rest:literal),+) => {
        concat!(
            "SELECT vm_id, run_key, state, detail, created_at, updated_at FROM wnodes_resources ",
            $($rest),+
        )
    };
}

/// A table operation that failed, naming the kind and the VM.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("resource table: cannot {op} ({kind} rows)")]
    Table {
        op: &'static str,
        kind: Kind,
        #[source]
        source: sqlx::Error,
    },
    #[error("resource table: cannot {op} the {kind} row of {vm_id}")]
    Row {
        op: &'static str,
        kind: Kind,
        vm_id: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("resource table: cannot {op} the {kind} detail of {vm_id} as JSON")]
    Detail {
        op: &'static str,
        kind: Kind,
        vm_id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("resource table: the {kind} row of {vm_id} has the unknown state {state:?}")]
    State {
        kind: Kind,
        vm_id: String,
        state: String,
    },
}

type RawRow = (String, String, String, String, i64, i64);

/// An insert of one row (binds: kind, vm_id, run_key, state, detail, created_at, updated_at)
/// followed by its conflict clause, as a literal.
macro_rules! insert_row {
    ($on_conflict:literal) => {
        concat!(
            "INSERT INTO wnodes_resources
                 (kind, vm_id, run_key, state, detail, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?) ",
            $on_conflict
        )
    };
}
pub(crate) use insert_row;

/// The rows of one kind whose detail is a `D`. A `const` per service
/// (`Table::new(Kind::Scratch)`); cheap to copy.
pub struct Table<D> {
    kind: Kind,
    _detail: PhantomData<fn() -> D>,
}

impl<D> fmt::Debug for Table<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table").field("kind", &self.kind).finish()
    }
}

impl<D> Clone for Table<D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D> Copy for Table<D> {}

impl<D: Serialize + DeserializeOwned> Table<D> {
    /// The rows of `kind`.
    pub const fn new(kind: Kind) -> Self {
        Self {
            kind,
            _detail: PhantomData,
        }
    }

    /// The kind of this table's rows.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub(crate) fn table_err(&self, op: &'static str) -> impl FnOnce(sqlx::Error) -> TableError {
        let kind = self.kind;
        move |source| TableError::Table { op, kind, source }
    }

    pub(crate) fn row_err(
        &self,
        op: &'static str,
        vm_id: &str,
    ) -> impl FnOnce(sqlx::Error) -> TableError {
        let (kind, vm_id) = (self.kind, vm_id.to_owned());
        move |source| TableError::Row {
            op,
            kind,
            vm_id,
            source,
        }
    }

    fn encode(&self, vm_id: &str, detail: &D) -> Result<String, TableError> {
        serde_json::to_string(detail).map_err(|source| TableError::Detail {
            op: "encode",
            kind: self.kind,
            vm_id: vm_id.to_owned(),
            source,
        })
    }

    fn decode(&self, raw: RawRow) -> Result<Row<D>, TableError> {
        let (vm_id, run_key, state, detail, created_at, updated_at) = raw;
        let Some(st) = State::parse(&state) else {
            return Err(TableError::State {
                kind: self.kind,
                vm_id,
                state,
            });
        };
        let detail = match serde_json::from_str(&detail) {
            Ok(d) => d,
            Err(source) => {
                return Err(TableError::Detail {
                    op: "decode",
                    kind: self.kind,
                    vm_id,
                    source,
                });
            }
        };
        Ok(Row {
            kind: self.kind,
            vm_id,
            run_key,
            state: st,
            detail,
            created_at,
            updated_at,
        })
    }

    /// Runs `sql` (an [`insert_row!`]) for `row`; returns how many rows it changed.
    pub(crate) async fn insert(
        &self,
        conn: &mut SqliteConnection,
        sql: &'static str,
        op: &'static str,
        row: &Row<&D>,
    ) -> Result<u64, TableError> {
        sqlx::query(sql)
            .bind(self.kind.as_str())
            .bind(&row.vm_id)
            .bind(&row.run_key)
            .bind(row.state.as_str())
            .bind(self.encode(&row.vm_id, row.detail)?)
            .bind(row.created_at)
            .bind(row.updated_at)
            .execute(conn)
            .await
            .map(|r| r.rows_affected())
            .map_err(self.row_err(op, &row.vm_id))
    }

    /// A new row of this kind, created now.
    fn new_row<'d>(&self, vm_id: &str, run_key: &str, state: State, detail: &'d D) -> Row<&'d D> {
        let now = wnodes_proto::time::now_secs();
        Row {
            kind: self.kind,
            vm_id: vm_id.to_owned(),
            run_key: run_key.to_owned(),
            state,
            detail,
            created_at: now,
            updated_at: now,
        }
    }

    /// Creates the table if needed (at start; every kind shares it).
    pub async fn init(&self, pool: &SqlitePool) -> Result<(), TableError> {
        sqlx::query(SCHEMA)
            .execute(pool)
            .await
            .map(drop)
            .map_err(self.table_err("create the table"))
    }

    /// The row of `vm_id`, from a pool or inside a transaction.
    pub async fn get<'c, E>(&self, exec: E, vm_id: &str) -> Result<Option<Row<D>>, TableError>
    where
        E: sqlx::Executor<'c, Database = Sqlite>,
    {
        let raw: Option<RawRow> = sqlx::query_as(select_rows!("WHERE kind = ? AND vm_id = ?"))
            .bind(self.kind.as_str())
            .bind(vm_id)
            .fetch_optional(exec)
            .await
            .map_err(self.row_err("read", vm_id))?;
        raw.map(|r| self.decode(r)).transpose()
    }

    /// Every prepared row, by VM id.
    pub async fn prepared<'c, E>(&self, exec: E) -> Result<Vec<Row<D>>, TableError>
    where
        E: sqlx::Executor<'c, Database = Sqlite>,
    {
        let raw: Vec<RawRow> = sqlx::query_as(select_rows!(
            "WHERE kind = ? AND state = 'prepared' ORDER BY vm_id"
        ))
        .bind(self.kind.as_str())
        .fetch_all(exec)
        .await
        .map_err(self.table_err("read the prepared rows"))?;
        raw.into_iter().map(|r| self.decode(r)).collect()
    }

    /// Records `vm_id` as pending unless it has a row (in any state). True when it wrote one.
    pub async fn pend(
        &self,
        conn: &mut SqliteConnection,
        vm_id: &str,
        run_key: &str,
        detail: &D,
    ) -> Result<bool, TableError> {
        let row = self.new_row(vm_id, run_key, State::Pending, detail);
        let sql = insert_row!("ON CONFLICT (kind, vm_id) DO NOTHING");
        Ok(self.insert(conn, sql, "record pending", &row).await? == 1)
    }

    /// Records the resource of `vm_id` as prepared with `detail` (a pending or prepared row is
    /// updated; its run key and creation time are kept). Never turns a `released` row back:
    /// returns whether the row now says prepared.
    pub async fn prepare(
        &self,
        conn: &mut SqliteConnection,
        vm_id: &str,
        run_key: &str,
        detail: &D,
    ) -> Result<bool, TableError> {
        let row = self.new_row(vm_id, run_key, State::Prepared, detail);
        let sql = insert_row!(
            "ON CONFLICT (kind, vm_id) DO UPDATE SET
                 state = excluded.state, detail = excluded.detail, updated_at = excluded.updated_at
             WHERE wnodes_resources.state <> 'released'"
        );
        Ok(self.insert(conn, sql, "mark prepared", &row).await? == 1)
    }

    /// Marks `vm_id` released. A pending or prepared row keeps its detail (what was held); with
    /// no row, a tombstone with `tombstone` as its detail is written; a released row is left as
    /// it is. Use the handler's transaction, so the read and the write are one step.
    pub async fn release(
        &self,
        conn: &mut SqliteConnection,
        vm_id: &str,
        run_key: &str,
        tombstone: &D,
    ) -> Result<Released<D>, TableError> {
        let now = wnodes_proto::time::now_secs();
        match self.get(&mut *conn, vm_id).await? {
            Some(row) if row.is_released() => Ok(Released::Already(row)),
            Some(row) => {
                sqlx::query(
                    "UPDATE wnodes_resources SET state = 'released', updated_at = ?
                     WHERE kind = ? AND vm_id = ?",
                )
                .bind(now)
                .bind(self.kind.as_str())
                .bind(vm_id)
                .execute(conn)
                .await
                .map_err(self.row_err("mark released", vm_id))?;
                Ok(Released::Now(row))
            }
            None => {
                let row = self.new_row(vm_id, run_key, State::Released, tombstone);
                let sql = insert_row!("");
                self.insert(conn, sql, "write the tombstone of", &row)
                    .await?;
                Ok(Released::Tombstone)
            }
        }
    }

    /// Forgets the row of `vm_id` (a preparation that failed and was undone). A tombstone is
    /// kept. True when a row was removed.
    pub async fn forget(
        &self,
        conn: &mut SqliteConnection,
        vm_id: &str,
    ) -> Result<bool, TableError> {
        let res = sqlx::query(
            "DELETE FROM wnodes_resources WHERE kind = ? AND vm_id = ? AND state <> 'released'",
        )
        .bind(self.kind.as_str())
        .bind(vm_id)
        .execute(conn)
        .await
        .map_err(self.row_err("forget", vm_id))?;
        Ok(res.rows_affected() == 1)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub(crate) struct Vol {
        pub(crate) path: String,
        pub(crate) size: u64,
    }

    pub(crate) const VOLS: Table<Vol> = Table::new(Kind::Scratch);

    pub(crate) fn vol(size: u64) -> Vol {
        Vol {
            path: "/v/vm-a.img".into(),
            size,
        }
    }

    /// A key store in `dir`, with the table: writes go through its one writer connection,
    /// reads through its read pool (as in a service).
    pub(crate) async fn open(dir: &tempfile::TempDir) -> wnodes_bus::KeyStore {
        let store = wnodes_bus::KeyStore::open(&dir.path().join("keys.db"))
            .await
            .unwrap();
        VOLS.init(store.pool()).await.unwrap();
        store
    }

    #[tokio::test]
    async fn prepared_then_released_and_a_tombstone_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let pool = store.read_pool();
        let mut conn = store.pool().acquire().await.unwrap();
        assert!(VOLS.get(&mut *conn, "vm-a").await.unwrap().is_none());
        assert!(
            VOLS.prepare(&mut conn, "vm-a", "k/1", &vol(1))
                .await
                .unwrap()
        );
        // Prepared again (a redelivery, a volume made again): the detail follows, the run
        // key and the creation time stay.
        assert!(
            VOLS.prepare(&mut conn, "vm-a", "k/2", &vol(2))
                .await
                .unwrap()
        );
        let row = VOLS.get(pool, "vm-a").await.unwrap().unwrap();
        assert_eq!(
            (row.state, row.run_key.as_str(), &row.detail),
            (State::Prepared, "k/1", &vol(2))
        );
        assert!(row.created_at > 0 && row.updated_at >= row.created_at);
        assert_eq!(VOLS.prepared(pool).await.unwrap(), vec![row.clone()]);

        let first = VOLS
            .release(&mut conn, "vm-a", "k/1", &vol(0))
            .await
            .unwrap();
        assert_eq!(first, Released::Now(row.clone()));
        let tomb = VOLS.get(pool, "vm-a").await.unwrap().unwrap();
        assert_eq!(tomb.state, State::Released);
        assert_eq!(tomb.detail, vol(2), "the tombstone says what was held");
        // Released twice: nothing changes.
        match VOLS
            .release(&mut conn, "vm-a", "k/1", &vol(9))
            .await
            .unwrap()
        {
            Released::Already(r) => assert_eq!(r, tomb),
            other => panic!("expected Already, got {other:?}"),
        }
        assert_eq!(VOLS.get(pool, "vm-a").await.unwrap().unwrap(), tomb);
        // Ready after released is refused, pending too, and forgetting keeps the tombstone.
        assert!(
            !VOLS
                .prepare(&mut conn, "vm-a", "k/1", &vol(3))
                .await
                .unwrap()
        );
        assert!(!VOLS.pend(&mut conn, "vm-a", "k/1", &vol(3)).await.unwrap());
        assert!(!VOLS.forget(&mut conn, "vm-a").await.unwrap());
        assert_eq!(VOLS.get(pool, "vm-a").await.unwrap().unwrap(), tomb);
        assert!(VOLS.prepared(pool).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn release_before_request_writes_a_tombstone_and_pending_rows_move_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let pool = store.read_pool();
        let mut conn = store.pool().acquire().await.unwrap();
        assert_eq!(
            VOLS.release(&mut conn, "vm-early", "k", &vol(0))
                .await
                .unwrap(),
            Released::Tombstone
        );
        let t = VOLS.get(pool, "vm-early").await.unwrap().unwrap();
        assert_eq!((t.state, t.detail), (State::Released, vol(0)));
        assert!(
            !VOLS
                .prepare(&mut conn, "vm-early", "k", &vol(1))
                .await
                .unwrap()
        );

        assert!(VOLS.pend(&mut conn, "vm-p", "k", &vol(1)).await.unwrap());
        // Pending twice keeps the first.
        assert!(!VOLS.pend(&mut conn, "vm-p", "k", &vol(2)).await.unwrap());
        assert_eq!(
            VOLS.get(pool, "vm-p").await.unwrap().unwrap().state,
            State::Pending
        );
        assert!(VOLS.prepared(pool).await.unwrap().is_empty());
        assert!(VOLS.prepare(&mut conn, "vm-p", "k", &vol(3)).await.unwrap());
        assert_eq!(VOLS.prepared(pool).await.unwrap().len(), 1);
        // A failed preparation is forgotten: no row, so it may be requested again.
        assert!(VOLS.forget(&mut conn, "vm-p").await.unwrap());
        assert!(VOLS.get(pool, "vm-p").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn kinds_do_not_see_each_others_rows_and_rows_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        const NETS: Table<Vol> = Table::new(Kind::Network);
        {
            let store = open(&dir).await;
            let pool = store.read_pool();
            let mut conn = store.pool().acquire().await.unwrap();
            assert!(VOLS.prepare(&mut conn, "vm-a", "k", &vol(1)).await.unwrap());
            assert!(NETS.get(pool, "vm-a").await.unwrap().is_none());
            assert_eq!(
                NETS.release(&mut conn, "vm-a", "k", &vol(0)).await.unwrap(),
                Released::Tombstone
            );
        }
        let store = open(&dir).await;
        let pool = store.read_pool();
        assert!(VOLS.get(pool, "vm-a").await.unwrap().unwrap().is_prepared());
        assert!(NETS.get(pool, "vm-a").await.unwrap().unwrap().is_released());
    }

    #[tokio::test]
    async fn a_detail_of_another_shape_is_an_error_naming_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let pool = store.pool();
        sqlx::query(
            "INSERT INTO wnodes_resources VALUES ('scratch', 'vm-x', '', 'prepared', '{\"p\":1}', 0, 0)",
        )
        .execute(pool)
        .await
        .unwrap();
        let err = VOLS.get(pool, "vm-x").await.unwrap_err();
        assert!(
            matches!(&err, TableError::Detail { vm_id, op: "decode", .. } if vm_id == "vm-x"),
            "{err:?}"
        );
        // The schema refuses a state outside the three.
        assert!(
            sqlx::query(
                "INSERT INTO wnodes_resources VALUES ('scratch', 'vm-y', '', 'serving', '{}', 0, 0)",
            )
            .execute(pool)
            .await
            .is_err()
        );
    }
}
