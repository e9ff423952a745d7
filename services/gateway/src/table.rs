//! The gateway's table (`gateway_vms`, in the service's key store): one row per VM, keyed by
//! `vm_id`.
//!
//! ```text
//! requested  the spec is known (exports, owner); no listener yet
//! serving    storage.ready was published; a listener runs on bind:port (port 0: no exports)
//! released   tombstone: the port is free; a late vm.requested / network.ready is released
//! ```

use prost::Message;
use sqlx::{SqliteConnection, SqlitePool};
use wnodes_bus::proto;

/// Creates the table.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS gateway_vms (
    vm_id      TEXT PRIMARY KEY,
    state      TEXT NOT NULL,      -- 'requested' | 'serving' | 'released'
    spec       BLOB,               -- wnodes.v1.VmSpec
    ready      BLOB,               -- the wnodes.v1.StorageReady published (serving)
    bind       TEXT,               -- listener address (serving, with exports)
    port       INTEGER,            -- listener port (serving, with exports)
    updated_at INTEGER NOT NULL    -- unix seconds
)";

pub const REQUESTED: &str = "requested";
pub const SERVING: &str = "serving";
pub const RELEASED: &str = "released";

/// One row, decoded.
#[derive(Debug, Clone)]
pub struct Row {
    pub vm_id: String,
    pub state: String,
    pub spec: Option<proto::VmSpec>,
    pub ready: Option<proto::StorageReady>,
    pub bind: Option<String>,
    pub port: Option<u16>,
}

type RawRow = (
    String,
    String,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<String>,
    Option<i64>,
);

fn decode(r: RawRow) -> Row {
    Row {
        vm_id: r.0,
        state: r.1,
        spec: r.2.and_then(|b| proto::VmSpec::decode(b.as_slice()).ok()),
        ready: r
            .3
            .and_then(|b| proto::StorageReady::decode(b.as_slice()).ok()),
        bind: r.4,
        port: r.5.and_then(|p| u16::try_from(p).ok()),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The row of `vm_id`.
pub async fn get(conn: &mut SqliteConnection, vm_id: &str) -> Result<Option<Row>, sqlx::Error> {
    let r: Option<RawRow> = sqlx::query_as(
        "SELECT vm_id, state, spec, ready, bind, port FROM gateway_vms WHERE vm_id = ?",
    )
    .bind(vm_id)
    .fetch_optional(conn)
    .await?;
    Ok(r.map(decode))
}

/// Every serving row (to re-open listeners at start).
pub async fn serving(pool: &SqlitePool) -> Result<Vec<Row>, sqlx::Error> {
    let rows: Vec<RawRow> = sqlx::query_as(
        "SELECT vm_id, state, spec, ready, bind, port FROM gateway_vms WHERE state = ?",
    )
    .bind(SERVING)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(decode).collect())
}

/// Ports held by serving rows other than `vm_id`'s.
pub async fn ports_in_use(
    conn: &mut SqliteConnection,
    vm_id: &str,
) -> Result<Vec<u16>, sqlx::Error> {
    let rows: Vec<(i64,)> = sqlx::query_as(
        "SELECT port FROM gateway_vms WHERE state = ? AND vm_id != ? AND port IS NOT NULL",
    )
    .bind(SERVING)
    .bind(vm_id)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(p,)| u16::try_from(p).ok())
        .collect())
}

/// Records the spec of a requested VM (keeps an existing row as it is).
pub async fn remember(
    conn: &mut SqliteConnection,
    spec: &proto::VmSpec,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO gateway_vms (vm_id, state, spec, updated_at) VALUES (?, ?, ?, ?)
         ON CONFLICT (vm_id) DO NOTHING",
    )
    .bind(&spec.vm_id)
    .bind(REQUESTED)
    .bind(spec.encode_to_vec())
    .bind(now())
    .execute(conn)
    .await
    .map(drop)
}

/// Marks `vm_id` serving with the published `ready` and the listener's `bind`/`port`.
pub async fn set_serving(
    conn: &mut SqliteConnection,
    vm_id: &str,
    ready: &proto::StorageReady,
    listener: Option<(String, u16)>,
) -> Result<(), sqlx::Error> {
    let (bind, port) = listener.unzip();
    sqlx::query(
        "UPDATE gateway_vms SET state = ?, ready = ?, bind = ?, port = ?, updated_at = ?
         WHERE vm_id = ?",
    )
    .bind(SERVING)
    .bind(ready.encode_to_vec())
    .bind(bind)
    .bind(port.map(i64::from))
    .bind(now())
    .bind(vm_id)
    .execute(conn)
    .await
    .map(drop)
}

/// Marks `vm_id` released (a tombstone when there was no row); frees its port.
pub async fn release(conn: &mut SqliteConnection, vm_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO gateway_vms (vm_id, state, updated_at) VALUES (?, ?, ?)
         ON CONFLICT (vm_id) DO UPDATE SET state = excluded.state, port = NULL, bind = NULL,
           updated_at = excluded.updated_at",
    )
    .bind(vm_id)
    .bind(RELEASED)
    .bind(now())
    .execute(conn)
    .await
    .map(drop)
}
