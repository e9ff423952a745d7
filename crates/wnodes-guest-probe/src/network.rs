//! `network prepare|release|reconcile|vlan-bridge`: the network service's own code
//! (`wnodes-network`) run against the guest's kernel, with its lease table in a SQLite store
//! that persists across calls (`/tmp/wnodes-network.db`, or `$WNODES_PROBE_STORE`), so a test
//! can check each step with iproute2 in between.
//!
//! The service's configuration here: PF `eth0`, pool `10.231.2.0/24` with gateway
//! `10.231.2.1`, VO `atlas` on VLAN 100, queue `hpc` on VLAN 300, default untagged.
//!
//! - `prepare <vm_id> <vo> <queue>`: the handler's SR-IOV path (`NetworkHandler::prepare_vf`:
//!   sysfs discovery, the lease, the VF set on the PF through rtnetlink) in one transaction;
//!   prints the `NetworkReady` as JSON.
//! - `release <vm_id>`: the handler's release of the VF (`NetworkHandler::reset_vf`), then
//!   the lease is forgotten; prints what was reset.
//! - `reconcile`: start-up reconciliation (`NetworkHandler::reconcile`); prints what it reset.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;
use wnodes_network::{
    NetworkConfig, NetworkHandler, config::ModeSetting, lease, service, sriov::SriovConfig,
};
use wnodes_proto::v1 as proto;

fn store_path() -> PathBuf {
    std::env::var_os("WNODES_PROBE_STORE")
        .map_or_else(|| "/tmp/wnodes-network.db".into(), PathBuf::from)
}

fn handler() -> anyhow::Result<NetworkHandler> {
    let cfg = NetworkConfig {
        mode: ModeSetting::User,
        sriov: SriovConfig {
            physical_functions: vec!["eth0".into()],
            pool: Some("10.231.2.0/24".into()),
            gateway: Some("10.231.2.1".into()),
            vo_vlans: [("atlas".to_owned(), 100)].into(),
            queue_vlans: [("hpc".to_owned(), 300)].into(),
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(NetworkHandler::new(&cfg, "network@guest".into())?)
}

async fn store() -> anyhow::Result<wnodes_bus::KeyStore> {
    let store = wnodes_bus::KeyStore::open(&store_path()).await?;
    service::init_store(&store).await?;
    Ok(store)
}

/// `prepare <vm_id> <vo> <queue>`.
pub async fn prepare(vm_id: &str, vo: &str, queue: &str) -> anyhow::Result<serde_json::Value> {
    let h = handler()?;
    let store = store().await?;
    let mut tx = store.pool().begin().await?;
    let existing = lease::get(&mut tx, vm_id).await?;
    let spec = proto::VmSpec {
        vm_id: vm_id.into(),
        vo: vo.into(),
        queue: queue.into(),
        network_mode: proto::NetworkMode::Sriov as i32,
        ..Default::default()
    };
    let ready = h
        .prepare_vf(&mut tx, &spec, &format!("GUEST/slurm/{vm_id}/1"), existing)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .map_err(|e| anyhow::anyhow!(wnodes_bus::ErrorChain(&e).to_string()))?;
    tx.commit().await?;
    Ok(json!({
        "vm_id": ready.vm_id,
        "mac": ready.mac,
        "address": ready.address,
        "gateway": ready.gateway,
        "vlan": ready.vlan,
        "pci": ready.pci_address,
        "address_filtered": ready.address_filtered,
    }))
}

/// `release <vm_id>`.
pub async fn release(vm_id: &str) -> anyhow::Result<serde_json::Value> {
    let h = handler()?;
    let store = store().await?;
    let mut tx = store.pool().begin().await?;
    let row = lease::get(&mut tx, vm_id)
        .await?
        .with_context(|| format!("no lease of {vm_id}"))?;
    let done = h.reset_vf(&row.detail).await?;
    lease::forget(&mut tx, vm_id).await?;
    tx.commit().await?;
    Ok(json!({ "vm_id": vm_id, "released": done }))
}

/// `reconcile`.
pub async fn reconcile() -> anyhow::Result<serde_json::Value> {
    let h = handler()?;
    let store = store().await?;
    let removed = h.reconcile(&store).await?;
    Ok(json!({ "reset": removed }))
}

/// `vlan-filtering <bridge> on|off`: `Netlink::set_vlan_filtering`.
pub async fn vlan_filtering(bridge: &str, on: bool) -> anyhow::Result<serde_json::Value> {
    wnodes_network::netlink::Netlink::new(None)
        .set_vlan_filtering(bridge, on)
        .await?;
    Ok(json!({ "bridge": bridge, "vlan_filtering": on }))
}

/// `port-vlan <port> <vid>`: `Netlink::set_port_vlan` (untagged member, PVID).
pub async fn port_vlan(port: &str, vid: u16) -> anyhow::Result<serde_json::Value> {
    wnodes_network::netlink::Netlink::new(None)
        .set_port_vlan(port, vid)
        .await?;
    Ok(json!({ "port": port, "vlan": vid }))
}

/// `vlan-link <trunk> <vid>`: `Netlink::add_vlan_link` (`<trunk>.<vid>`, up).
pub async fn vlan_link(trunk: &str, vid: u16) -> anyhow::Result<serde_json::Value> {
    let name = wnodes_network::netlink::Netlink::new(None)
        .add_vlan_link(trunk, vid)
        .await?;
    Ok(json!({ "link": name }))
}
