//! The per-VM rows in the service's own table of the store (`scratch_volumes`), next to the
//! bus's idempotency keys: which volume a VM has and whether it was released.
//!
//! A row is `prepared` once a complete volume exists for the VM, `released` once the VM
//! stopped or failed (the file is gone). A `released` row is also a tombstone: a
//! `vm.requested` arriving after it creates nothing.

use sqlx::{SqliteConnection, SqlitePool};

/// Creates the table if needed.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS scratch_volumes (
    vm_id      TEXT    NOT NULL PRIMARY KEY,
    run_key    TEXT    NOT NULL,
    path       TEXT    NOT NULL,
    size_bytes INTEGER NOT NULL,
    state      TEXT    NOT NULL CHECK (state IN ('prepared', 'released')),
    updated_at INTEGER NOT NULL   -- unix seconds
) WITHOUT ROWID";

/// A volume's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    Prepared,
    Released,
}

/// One VM's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRow {
    pub vm_id: String,
    pub path: String,
    pub size_bytes: u64,
    pub state: VolumeState,
}

/// A store operation that failed, naming the VM.
#[derive(Debug, thiserror::Error)]
#[error("scratch state store: cannot {op} the row of {vm_id}")]
pub struct StateError {
    pub op: &'static str,
    pub vm_id: String,
    #[source]
    pub source: sqlx::Error,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// Creates the table (at start).
pub async fn init(pool: &SqlitePool) -> Result<(), StateError> {
    sqlx::query(SCHEMA)
        .execute(pool)
        .await
        .map(drop)
        .map_err(|source| StateError {
            op: "create the table for",
            vm_id: "every VM".into(),
            source,
        })
}

type RawRow = (String, String, i64, String);

fn from_raw((vm_id, path, size, state): RawRow) -> VolumeRow {
    VolumeRow {
        vm_id,
        path,
        size_bytes: u64::try_from(size).unwrap_or_default(),
        state: if state == "released" {
            VolumeState::Released
        } else {
            VolumeState::Prepared
        },
    }
}

const SELECT: &str = "SELECT vm_id, path, size_bytes, state FROM scratch_volumes WHERE vm_id = ?";

/// The row of `vm_id` (from a pool: outside a handler's transaction).
pub async fn get(pool: &SqlitePool, vm_id: &str) -> Result<Option<VolumeRow>, StateError> {
    sqlx::query_as::<_, RawRow>(SELECT)
        .bind(vm_id)
        .fetch_optional(pool)
        .await
        .map(|r| r.map(from_raw))
        .map_err(|source| StateError {
            op: "read",
            vm_id: vm_id.into(),
            source,
        })
}

/// The row of `vm_id`, inside a transaction.
pub async fn get_in(
    conn: &mut SqliteConnection,
    vm_id: &str,
) -> Result<Option<VolumeRow>, StateError> {
    sqlx::query_as::<_, RawRow>(SELECT)
        .bind(vm_id)
        .fetch_optional(conn)
        .await
        .map(|r| r.map(from_raw))
        .map_err(|source| StateError {
            op: "read",
            vm_id: vm_id.into(),
            source,
        })
}

/// Records a complete volume. Never turns a `released` row back into `prepared`; returns
/// whether the row now says `prepared`.
pub async fn mark_prepared(
    conn: &mut SqliteConnection,
    vm_id: &str,
    run_key: &str,
    path: &str,
    size_bytes: u64,
) -> Result<bool, StateError> {
    let err = |source| StateError {
        op: "mark prepared",
        vm_id: vm_id.into(),
        source,
    };
    let res = sqlx::query(
        "INSERT INTO scratch_volumes (vm_id, run_key, path, size_bytes, state, updated_at)
         VALUES (?, ?, ?, ?, 'prepared', ?)
         ON CONFLICT (vm_id) DO UPDATE SET
             path = excluded.path, size_bytes = excluded.size_bytes,
             state = 'prepared', updated_at = excluded.updated_at
         WHERE scratch_volumes.state <> 'released'",
    )
    .bind(vm_id)
    .bind(run_key)
    .bind(path)
    .bind(i64::try_from(size_bytes).unwrap_or(i64::MAX))
    .bind(unix_now())
    .execute(&mut *conn)
    .await
    .map_err(err)?;
    Ok(res.rows_affected() == 1)
}

/// Marks the VM's volume released (inserting a tombstone when there was no row).
pub async fn mark_released(
    conn: &mut SqliteConnection,
    vm_id: &str,
    run_key: &str,
    path: &str,
) -> Result<(), StateError> {
    sqlx::query(
        "INSERT INTO scratch_volumes (vm_id, run_key, path, size_bytes, state, updated_at)
         VALUES (?, ?, ?, 0, 'released', ?)
         ON CONFLICT (vm_id) DO UPDATE SET state = 'released', updated_at = excluded.updated_at",
    )
    .bind(vm_id)
    .bind(run_key)
    .bind(path)
    .bind(unix_now())
    .execute(conn)
    .await
    .map(drop)
    .map_err(|source| StateError {
        op: "mark released",
        vm_id: vm_id.into(),
        source,
    })
}
