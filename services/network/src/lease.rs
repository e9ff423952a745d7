//! The lease table (`network_leases`, in the service's key store): one row per VM, keyed by
//! `vm_id`. A row is `prepared` while the VM holds its address, MAC and tap, and stays as a
//! `released` tombstone afterwards (address and tap cleared, so both can be reused), so that a
//! late `vm.requested` is answered with a release.

use std::{collections::HashSet, net::Ipv4Addr};

use sqlx::{SqliteConnection, SqlitePool};

use crate::{config::Ipv4Net, mac::Mac};

/// Creates the table.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS network_leases (
    vm_id      TEXT PRIMARY KEY,
    state      TEXT NOT NULL,      -- 'prepared' | 'released'
    mode       TEXT NOT NULL,      -- 'tap' | 'user'
    address    TEXT,               -- leased IPv4 (tap mode, while prepared)
    mac        TEXT,
    tap        TEXT,
    updated_at INTEGER NOT NULL    -- unix seconds
)";

/// Row state.
pub const PREPARED: &str = "prepared";
/// Row state.
pub const RELEASED: &str = "released";

/// One row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Lease {
    pub vm_id: String,
    pub state: String,
    pub mode: String,
    pub address: Option<String>,
    pub mac: Option<String>,
    pub tap: Option<String>,
}

impl Lease {
    /// True while the VM holds its resources.
    pub fn is_prepared(&self) -> bool {
        self.state == PREPARED
    }
}

/// No free address.
#[derive(Debug, thiserror::Error)]
#[error("address pool {pool} exhausted ({in_use} addresses leased)")]
pub struct Exhausted {
    pub pool: Ipv4Net,
    pub in_use: usize,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The row of `vm_id`.
pub async fn get(conn: &mut SqliteConnection, vm_id: &str) -> Result<Option<Lease>, sqlx::Error> {
    sqlx::query_as(
        "SELECT vm_id, state, mode, address, mac, tap FROM network_leases WHERE vm_id = ?",
    )
    .bind(vm_id)
    .fetch_optional(conn)
    .await
}

/// Every prepared row.
pub async fn prepared(pool: &SqlitePool) -> Result<Vec<Lease>, sqlx::Error> {
    sqlx::query_as(
        "SELECT vm_id, state, mode, address, mac, tap FROM network_leases WHERE state = ?",
    )
    .bind(PREPARED)
    .fetch_all(pool)
    .await
}

/// Leases an address and a MAC for `vm_id` (tap mode) and records the row as prepared.
/// Addresses: the first host address of `pool` that is not `exclude` (the bridge's) and not
/// held by another prepared lease. MAC: [`Mac::for_vm`], skipping candidates held by others.
pub async fn allocate_tap(
    conn: &mut SqliteConnection,
    vm_id: &str,
    tap: &str,
    pool: Ipv4Net,
    exclude: Ipv4Addr,
) -> Result<Result<Lease, Exhausted>, sqlx::Error> {
    let rows: Vec<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT address, mac FROM network_leases WHERE state = ? AND vm_id != ?")
            .bind(PREPARED)
            .bind(vm_id)
            .fetch_all(&mut *conn)
            .await?;
    let used: HashSet<Ipv4Addr> = rows
        .iter()
        .filter_map(|(a, _)| a.as_deref()?.parse().ok())
        .collect();
    let macs: HashSet<String> = rows.iter().filter_map(|(_, m)| m.clone()).collect();
    let Some(address) = pool.hosts().find(|a| *a != exclude && !used.contains(a)) else {
        return Ok(Err(Exhausted {
            pool,
            in_use: used.len(),
        }));
    };
    let mac = (0u32..)
        .map(|i| Mac::for_vm(vm_id, i).to_string())
        .find(|m| !macs.contains(m))
        .unwrap_or_default();
    let lease = Lease {
        vm_id: vm_id.to_owned(),
        state: PREPARED.into(),
        mode: "tap".into(),
        address: Some(address.to_string()),
        mac: Some(mac),
        tap: Some(tap.to_owned()),
    };
    upsert(conn, &lease).await?;
    Ok(Ok(lease))
}

/// Records a user-mode VM as prepared (nothing is held on the host).
pub async fn record_user(conn: &mut SqliteConnection, vm_id: &str) -> Result<Lease, sqlx::Error> {
    let lease = Lease {
        vm_id: vm_id.to_owned(),
        state: PREPARED.into(),
        mode: "user".into(),
        address: None,
        mac: None,
        tap: None,
    };
    upsert(conn, &lease).await?;
    Ok(lease)
}

async fn upsert(conn: &mut SqliteConnection, l: &Lease) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO network_leases (vm_id, state, mode, address, mac, tap, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (vm_id) DO UPDATE SET state = excluded.state, mode = excluded.mode,
           address = excluded.address, mac = excluded.mac, tap = excluded.tap,
           updated_at = excluded.updated_at",
    )
    .bind(&l.vm_id)
    .bind(&l.state)
    .bind(&l.mode)
    .bind(&l.address)
    .bind(&l.mac)
    .bind(&l.tap)
    .bind(now())
    .execute(conn)
    .await
    .map(drop)
}

/// Marks `vm_id` released (inserting a tombstone when there was no row) and frees its address.
pub async fn release(
    conn: &mut SqliteConnection,
    vm_id: &str,
    mode: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO network_leases (vm_id, state, mode, address, mac, tap, updated_at)
         VALUES (?, ?, ?, NULL, NULL, NULL, ?)
         ON CONFLICT (vm_id) DO UPDATE SET state = excluded.state, address = NULL, tap = NULL,
           updated_at = excluded.updated_at",
    )
    .bind(vm_id)
    .bind(RELEASED)
    .bind(mode)
    .bind(now())
    .execute(conn)
    .await
    .map(drop)
}

/// Forgets the row of `vm_id` (a preparation that failed and was undone).
pub async fn forget(conn: &mut SqliteConnection, vm_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM network_leases WHERE vm_id = ?")
        .bind(vm_id)
        .execute(conn)
        .await
        .map(drop)
}
