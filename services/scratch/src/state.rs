//! The scratch service's rows in the preparers' resource table ([`wnodes_preparer::Table`],
//! kind `scratch`, next to the bus's idempotency keys): which volume a VM has and whether it was
//! released.
//!
//! A row is `prepared` once a complete volume exists for the VM, `released` once the VM
//! stopped or failed (the file is gone). A `released` row is also a tombstone: a
//! `vm.requested` arriving after it creates nothing.

use serde::{Deserialize, Serialize};
use sqlx::{Sqlite, SqliteConnection, SqlitePool};
use wnodes_preparer::{Kind, Released, Row, State, Table, TableError};

pub use wnodes_preparer::State as VolumeState;

/// What a row keeps about the volume (the row's JSON detail).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub path: String,
    pub size_bytes: u64,
}

/// One VM's row.
pub type VolumeRow = Row<Volume>;

/// The scratch rows.
pub const TABLE: Table<Volume> = Table::new(Kind::Scratch);

/// The table of earlier versions, migrated once by [`init`].
const OLD_TABLE: &str = "scratch_volumes";

/// Creates the table and migrates the rows of an earlier version's `scratch_volumes` (at
/// start).
pub async fn init(pool: &SqlitePool) -> Result<(), TableError> {
    TABLE.init(pool).await?;
    TABLE
        .migrate(
            pool,
            OLD_TABLE,
            "SELECT vm_id, run_key, path, size_bytes, state, updated_at FROM scratch_volumes",
            |(vm_id, run_key, path, size, state, at): (
                String,
                String,
                String,
                i64,
                String,
                i64,
            )| {
                Some(Row {
                    kind: Kind::Scratch,
                    vm_id,
                    run_key,
                    // The old schema allowed these two only.
                    state: if state == "released" {
                        State::Released
                    } else {
                        State::Prepared
                    },
                    detail: Volume {
                        path,
                        size_bytes: u64::try_from(size).unwrap_or_default(),
                    },
                    created_at: at,
                    updated_at: at,
                })
            },
        )
        .await
        .map(drop)
}

/// The row of `vm_id` (from a pool, or inside a handler's transaction).
pub async fn get<'c, E>(exec: E, vm_id: &str) -> Result<Option<VolumeRow>, TableError>
where
    E: sqlx::Executor<'c, Database = Sqlite>,
{
    TABLE.get(exec, vm_id).await
}

/// Records a complete volume. Never turns a `released` row back into `prepared`; returns
/// whether the row now says `prepared`.
pub async fn mark_prepared(
    conn: &mut SqliteConnection,
    vm_id: &str,
    run_key: &str,
    path: &str,
    size_bytes: u64,
) -> Result<bool, TableError> {
    let volume = Volume {
        path: path.to_owned(),
        size_bytes,
    };
    TABLE.prepare(conn, vm_id, run_key, &volume).await
}

/// The detail of a tombstone written when no row existed: the path that would have held it.
pub fn tombstone(path: &str) -> Volume {
    Volume {
        path: path.to_owned(),
        size_bytes: 0,
    }
}

/// Marks the VM's volume released (a tombstone naming `path` when there was no row).
pub async fn mark_released(
    conn: &mut SqliteConnection,
    vm_id: &str,
    run_key: &str,
    path: &str,
) -> Result<Released<Volume>, TableError> {
    TABLE.release(conn, vm_id, run_key, &tombstone(path)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written by the previous version (its own table) is read after the upgrade.
    #[tokio::test]
    async fn rows_of_the_old_table_are_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = wnodes_bus::KeyStore::open(&dir.path().join("keys.db"))
            .await
            .unwrap();
        let pool = store.pool();
        // The previous version's schema, verbatim.
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS scratch_volumes (
                vm_id      TEXT    NOT NULL PRIMARY KEY,
                run_key    TEXT    NOT NULL,
                path       TEXT    NOT NULL,
                size_bytes INTEGER NOT NULL,
                state      TEXT    NOT NULL CHECK (state IN ('prepared', 'released')),
                updated_at INTEGER NOT NULL
            ) WITHOUT ROWID",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO scratch_volumes VALUES
                ('vm-a', 'T1/slurm/a/1', '/v/vm-a.img', 4096, 'prepared', 11),
                ('vm-b', 'T1/slurm/b/1', '/v/vm-b.img', 0, 'released', 12)",
        )
        .execute(pool)
        .await
        .unwrap();
        init(pool).await.unwrap();
        let a = get(pool, "vm-a").await.unwrap().unwrap();
        assert_eq!(
            (a.state, a.run_key.as_str(), a.updated_at),
            (VolumeState::Prepared, "T1/slurm/a/1", 11)
        );
        assert_eq!(
            a.detail,
            Volume {
                path: "/v/vm-a.img".into(),
                size_bytes: 4096
            }
        );
        assert_eq!(
            get(pool, "vm-b").await.unwrap().unwrap().state,
            VolumeState::Released
        );
        // The tombstone holds after the migration.
        let mut conn = pool.acquire().await.unwrap();
        assert!(
            !mark_prepared(&mut conn, "vm-b", "T1/slurm/b/1", "/v/vm-b.img", 1)
                .await
                .unwrap()
        );
        drop(conn);
        // Started again: the old table is gone, the rows stay.
        init(pool).await.unwrap();
        let gone: Option<(String,)> =
            sqlx::query_as("SELECT name FROM sqlite_master WHERE name = 'scratch_volumes'")
                .fetch_optional(pool)
                .await
                .unwrap();
        assert!(gone.is_none());
        assert_eq!(get(pool, "vm-a").await.unwrap().unwrap(), a);
    }
}
