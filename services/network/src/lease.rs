//! The leases: the network service's rows in the preparers' resource table
//! ([`wnodes_preparer::Table`], kind `network`, in the service's key store), one per VM. A row is
//! `prepared` while the VM holds its address, MAC and tap, and stays as a `released` tombstone
//! afterwards, so that a late `vm.requested` is answered with a release. Only prepared rows hold
//! an address or a MAC: a released row's are free for the next VM.

use std::{collections::HashSet, net::Ipv4Addr};

use serde::{Deserialize, Serialize};
use sqlx::{SqliteConnection, SqlitePool};
use wnodes_preparer::{Kind, Row, State, Table, TableError};

use crate::{
    config::{Ipv4Net, Mode},
    mac::Mac,
    sriov::{self, PhysFn, Vf},
};

/// What a lease holds (the row's JSON detail).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub mode: Mode,
    /// The leased IPv4 address (tap mode).
    pub address: Option<String>,
    pub mac: Option<String>,
    pub tap: Option<String>,
    /// SR-IOV: the VF the VM holds (its PF, index and PCI address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vf: Option<Vf>,
    /// The VLAN of the VM's VF or tap (0: untagged).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vlan: u16,
}

fn is_zero(v: &u16) -> bool {
    *v == 0
}

impl Lease {
    /// A lease of `mode` that holds nothing (user mode; a tombstone).
    pub fn empty(mode: Mode) -> Self {
        Self {
            mode,
            address: None,
            mac: None,
            tap: None,
            vf: None,
            vlan: 0,
        }
    }
}

/// One VM's row.
pub type LeaseRow = Row<Lease>;

/// The network rows.
pub const TABLE: Table<Lease> = Table::new(Kind::Network);

/// No free address.
#[derive(Debug, thiserror::Error)]
#[error("address pool {pool} exhausted ({in_use} addresses leased)")]
pub struct Exhausted {
    pub pool: Ipv4Net,
    pub in_use: usize,
}

/// Creates the table and migrates the rows of an earlier version's `network_leases` (at start).
pub async fn init(pool: &SqlitePool) -> Result<(), TableError> {
    type Old = (
        String,
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        i64,
    );
    TABLE.init(pool).await?;
    TABLE
        .migrate(
            pool,
            "network_leases",
            "SELECT vm_id, state, mode, address, mac, tap, updated_at FROM network_leases",
            |(vm_id, state, mode, address, mac, tap, at): Old| {
                let state = match state.as_str() {
                    "prepared" => State::Prepared,
                    "released" => State::Released,
                    _ => return None,
                };
                let mode = if mode == "user" {
                    Mode::User
                } else {
                    Mode::Tap
                };
                Some(Row {
                    kind: Kind::Network,
                    vm_id,
                    // The old table did not keep it.
                    run_key: String::new(),
                    state,
                    detail: Lease {
                        mode,
                        address,
                        mac,
                        tap,
                        vf: None,
                        vlan: 0,
                    },
                    created_at: at,
                    updated_at: at,
                })
            },
        )
        .await
        .map(drop)
}

/// The row of `vm_id`.
pub async fn get(conn: &mut SqliteConnection, vm_id: &str) -> Result<Option<LeaseRow>, TableError> {
    TABLE.get(conn, vm_id).await
}

/// The leases the other prepared VMs hold.
async fn others(conn: &mut SqliteConnection, vm_id: &str) -> Result<Vec<Lease>, TableError> {
    Ok(TABLE
        .prepared(&mut *conn)
        .await?
        .into_iter()
        .filter(|r| r.vm_id != vm_id)
        .map(|r| r.detail)
        .collect())
}

/// The first host address of `pool` that is not `exclude` and that no lease of `others` holds.
fn free_address(others: &[Lease], pool: Ipv4Net, exclude: Ipv4Addr) -> Result<Ipv4Addr, Exhausted> {
    let used: HashSet<Ipv4Addr> = others
        .iter()
        .filter_map(|l| l.address.as_deref()?.parse().ok())
        .collect();
    pool.hosts()
        .find(|a| *a != exclude && !used.contains(a))
        .ok_or(Exhausted {
            pool,
            in_use: used.len(),
        })
}

/// [`Mac::for_vm`] of `vm_id`, skipping the candidates `others` hold.
fn free_mac(others: &[Lease], vm_id: &str) -> String {
    let macs: HashSet<&str> = others.iter().filter_map(|l| l.mac.as_deref()).collect();
    (0u32..)
        .map(|i| Mac::for_vm(vm_id, i).to_string())
        .find(|m| !macs.contains(m.as_str()))
        .unwrap_or_default()
}

/// True when a prepared tap lease of another VM than `vm_id` is on VLAN `vid`.
pub async fn tap_vlan_in_use(
    conn: &mut SqliteConnection,
    vm_id: &str,
    vid: u16,
) -> Result<bool, TableError> {
    Ok(others(conn, vm_id)
        .await?
        .iter()
        .any(|l| l.tap.is_some() && l.vlan == vid))
}

/// Leases an address and a MAC for `vm_id` (tap mode, on VLAN `vlan`, 0: none) and records the
/// row as prepared.
/// Addresses: the first host address of `pool` that is not `exclude` (the bridge's) and not
/// held by another prepared lease. MAC: [`Mac::for_vm`], skipping candidates held by others.
pub async fn allocate_tap(
    conn: &mut SqliteConnection,
    vm_id: &str,
    run_key: &str,
    tap: &str,
    pool: Ipv4Net,
    exclude: Ipv4Addr,
    vlan: u16,
) -> Result<Result<Lease, Exhausted>, TableError> {
    let others = others(conn, vm_id).await?;
    let address = match free_address(&others, pool, exclude) {
        Ok(a) => a,
        Err(e) => return Ok(Err(e)),
    };
    let mac = free_mac(&others, vm_id);
    let lease = Lease {
        mode: Mode::Tap,
        address: Some(address.to_string()),
        mac: Some(mac),
        tap: Some(tap.to_owned()),
        vf: None,
        vlan,
    };
    TABLE.prepare(conn, vm_id, run_key, &lease).await?;
    Ok(Ok(lease))
}

/// No free VF, or no free address for one.
#[derive(Debug, thiserror::Error)]
pub enum NoVf {
    #[error("every VF of {pfs} is held by a VM ({held} held)")]
    AllHeld { pfs: String, held: usize },
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
}

/// Leases a VF of `pfs`, an address of `pool` (never `gateway`) and a MAC for `vm_id`
/// (SR-IOV), and records the row as prepared: the first VF no other prepared lease holds.
pub async fn allocate_vf(
    conn: &mut SqliteConnection,
    vm_id: &str,
    run_key: &str,
    pfs: &[PhysFn],
    pool: Ipv4Net,
    gateway: Ipv4Addr,
    vlan: u16,
) -> Result<Result<Lease, NoVf>, TableError> {
    let others = others(conn, vm_id).await?;
    let held: HashSet<String> = others
        .iter()
        .filter_map(|l| l.vf.as_ref().map(|v| v.pci.clone()))
        .collect();
    let Some(vf) = sriov::pick(pfs, &held).cloned() else {
        return Ok(Err(NoVf::AllHeld {
            pfs: pfs
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            held: held.len(),
        }));
    };
    let address = match free_address(&others, pool, gateway) {
        Ok(a) => a,
        Err(e) => return Ok(Err(e.into())),
    };
    let mac = free_mac(&others, vm_id);
    let lease = Lease {
        mode: Mode::Tap,
        address: Some(address.to_string()),
        mac: Some(mac),
        tap: None,
        vf: Some(vf),
        vlan,
    };
    TABLE.prepare(conn, vm_id, run_key, &lease).await?;
    Ok(Ok(lease))
}

/// Records a user-mode VM as prepared (nothing is held on the host).
pub async fn record_user(
    conn: &mut SqliteConnection,
    vm_id: &str,
    run_key: &str,
) -> Result<Lease, TableError> {
    let lease = Lease::empty(Mode::User);
    TABLE.prepare(conn, vm_id, run_key, &lease).await?;
    Ok(lease)
}

/// Forgets the row of `vm_id` (a preparation that failed and was undone).
pub async fn forget(conn: &mut SqliteConnection, vm_id: &str) -> Result<bool, TableError> {
    TABLE.forget(conn, vm_id).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use wnodes_preparer::Released;

    fn net() -> Ipv4Net {
        "10.231.1.0/29".parse().unwrap()
    }

    /// A store written by the previous version (its own table) is read after the upgrade, and a
    /// migrated lease still holds its address.
    #[tokio::test]
    async fn rows_of_the_old_table_are_migrated_once_and_keep_their_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let store = wnodes_bus::KeyStore::open(&dir.path().join("n.db"))
            .await
            .unwrap();
        let pool = store.pool();
        // The previous version's schema, verbatim.
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS network_leases (
                vm_id      TEXT PRIMARY KEY,
                state      TEXT NOT NULL,
                mode       TEXT NOT NULL,
                address    TEXT,
                mac        TEXT,
                tap        TEXT,
                updated_at INTEGER NOT NULL
            )",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO network_leases VALUES
                ('vm-000000000001', 'prepared', 'tap', '10.231.1.2', '52:54:00:00:00:01', 'wn-000000000001', 5),
                ('vm-000000000002', 'released', 'tap', NULL, '52:54:00:00:00:02', NULL, 6),
                ('vm-000000000003', 'prepared', 'user', NULL, NULL, NULL, 7)",
        )
        .execute(pool)
        .await
        .unwrap();
        init(pool).await.unwrap();
        let mut conn = pool.acquire().await.unwrap();
        let one = get(&mut conn, "vm-000000000001").await.unwrap().unwrap();
        assert!(one.is_prepared());
        assert_eq!(
            one.detail,
            Lease {
                mode: Mode::Tap,
                address: Some("10.231.1.2".into()),
                mac: Some("52:54:00:00:00:01".into()),
                tap: Some("wn-000000000001".into()),
                vf: None,
                vlan: 0,
            }
        );
        assert!(
            get(&mut conn, "vm-000000000002")
                .await
                .unwrap()
                .unwrap()
                .is_released()
        );
        let user = get(&mut conn, "vm-000000000003").await.unwrap().unwrap();
        assert_eq!(user.detail, Lease::empty(Mode::User));
        // The next VM does not get the migrated lease's address (.1 is the bridge's).
        let next = allocate_tap(
            &mut conn,
            "vm-000000000004",
            "k",
            "wn-000000000004",
            net(),
            "10.231.1.1".parse().unwrap(),
            0,
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(next.address.as_deref(), Some("10.231.1.3"));
        drop(conn);
        init(pool).await.unwrap();
        let mut conn = pool.acquire().await.unwrap();
        assert_eq!(
            get(&mut conn, "vm-000000000001").await.unwrap().unwrap(),
            one
        );
    }

    #[tokio::test]
    async fn released_addresses_are_reused_and_the_pool_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = wnodes_bus::KeyStore::open(&dir.path().join("n.db"))
            .await
            .unwrap();
        init(store.pool()).await.unwrap();
        let mut conn = store.pool().acquire().await.unwrap();
        let bridge: Ipv4Addr = "10.231.1.1".parse().unwrap();
        let mut got = Vec::new();
        // A /29 has six host addresses, one of them the bridge's.
        for i in 0..5 {
            let vm = format!("vm-00000000000{i}");
            let l = allocate_tap(&mut conn, &vm, "k", "wn-x", net(), bridge, 0)
                .await
                .unwrap()
                .unwrap();
            got.push(l.address.unwrap());
        }
        assert_eq!(got.len(), 5);
        let full = allocate_tap(&mut conn, "vm-00000000000a", "k", "wn-x", net(), bridge, 0)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(full.in_use, 5);
        assert!(matches!(
            TABLE
                .release(&mut conn, "vm-000000000000", "k", &Lease::empty(Mode::Tap))
                .await
                .unwrap(),
            Released::Now(_)
        ));
        let again = allocate_tap(&mut conn, "vm-00000000000a", "k", "wn-x", net(), bridge, 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.address.as_deref(), Some(got[0].as_str()));
    }
}
