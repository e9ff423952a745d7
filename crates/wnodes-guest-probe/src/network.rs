//! `network prepare|release|reconcile`, `network tap prepare|release|reconcile`, `network
//! join-vlan`: the network service's own code
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
//! - `tap prepare|release|reconcile` and `join-vlan`: the tap path, with VLANs (below,
//!   [`tap_handler`]).

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;
use wnodes_network::{
    NetworkConfig, NetworkHandler,
    config::ModeSetting,
    lease, service,
    sriov::SriovConfig,
    vlan::{MethodSetting, VlanConfig, VlanNetworkConfig},
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
            ..Default::default()
        },
        vlan: VlanConfig {
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

/// The spec of a VM of `vo` in `queue` asking for `mode`.
fn spec(vm_id: &str, vo: &str, queue: &str, mode: proto::NetworkMode) -> proto::VmSpec {
    proto::VmSpec {
        vm_id: vm_id.into(),
        vo: vo.into(),
        queue: queue.into(),
        network_mode: mode as i32,
        ..Default::default()
    }
}

/// The run key the probe's leases are recorded under.
fn run_key(vm_id: &str) -> String {
    format!("GUEST/slurm/{vm_id}/1")
}

/// A preparation's `network.ready`, or why there is none (the handler's error, or the reason
/// it would publish in `network.failed`).
fn ready(
    prepared: Result<Result<proto::NetworkReady, service::PrepareError>, wnodes_bus::HandlerError>,
) -> anyhow::Result<proto::NetworkReady> {
    prepared
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .map_err(|e| anyhow::anyhow!(wnodes_bus::ErrorChain(&e).to_string()))
}

/// `prepare <vm_id> <vo> <queue>`.
pub async fn prepare(vm_id: &str, vo: &str, queue: &str) -> anyhow::Result<serde_json::Value> {
    let h = handler()?;
    let store = store().await?;
    let mut tx = store.pool().begin().await?;
    let existing = lease::get(&mut tx, vm_id).await?;
    let spec = spec(vm_id, vo, queue, proto::NetworkMode::Sriov);
    let ready = ready(
        h.prepare_vf(&mut tx, &spec, &run_key(vm_id), existing)
            .await,
    )?;
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
    reconcile_with(handler()?, "reset").await
}

/// Start-up reconciliation with `h` on the store; what it removed, under `key`.
async fn reconcile_with(h: NetworkHandler, key: &str) -> anyhow::Result<serde_json::Value> {
    let store = store().await?;
    let removed = h.reconcile(&store).await?;
    Ok(json!({ key: removed }))
}

/// The tap path's configuration: bridge `br0` (the script gives it 10.231.1.1/24), pool
/// 10.231.1.0/24; VO `atlas` on VLAN 100, `cms` on 200, queue `hpc` on 300, each VLAN's
/// network 10.231.<vid mod 256>.0/24 with this host at `.1` and VMs from `.0/25` (with
/// `WNODES_PROBE_VLAN_HOST=b`, a second hypervisor on the same trunk: `.2`, `.128/25`); `method` from `$WNODES_PROBE_VLAN_METHOD` (`auto`, `filtering`, `bridges`), the trunk
/// from `$WNODES_PROBE_TRUNK` (none when unset).
fn tap_handler() -> anyhow::Result<NetworkHandler> {
    let method = match std::env::var("WNODES_PROBE_VLAN_METHOD").as_deref() {
        Ok("filtering") => MethodSetting::Filtering,
        Ok("bridges") => MethodSetting::Bridges,
        Ok("auto") | Err(_) => MethodSetting::Auto,
        Ok(other) => anyhow::bail!("WNODES_PROBE_VLAN_METHOD={other:?}"),
    };
    // A second hypervisor on the same trunk has its own address and pool on each VLAN.
    let (host, half) = if std::env::var("WNODES_PROBE_VLAN_HOST").as_deref() == Ok("b") {
        (2, 128)
    } else {
        (1, 0)
    };
    let networks = [100u16, 200, 300]
        .into_iter()
        .map(|vid| {
            let net = vid % 256;
            (
                vid.to_string(),
                VlanNetworkConfig {
                    address: format!("10.231.{net}.{host}/24"),
                    pool: Some(format!("10.231.{net}.{half}/25")),
                },
            )
        })
        .collect();
    let cfg = NetworkConfig {
        mode: ModeSetting::Tap,
        bridge: "br0".into(),
        pool: Some("10.231.1.0/24".into()),
        vlan: VlanConfig {
            vo_vlans: [("atlas".to_owned(), 100), ("cms".to_owned(), 200)].into(),
            queue_vlans: [("hpc".to_owned(), 300)].into(),
            method,
            trunk: std::env::var("WNODES_PROBE_TRUNK").ok(),
            networks,
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(NetworkHandler::new(&cfg, "network@guest".into())?)
}

/// `tap prepare <vm_id> <vo> <queue>`: the handler's tap path (`NetworkHandler::tap_network`
/// for the VM's VLAN, then `prepare_tap`: the lease, the VLAN's host side, the tap and its
/// filter) in one transaction; prints the `NetworkReady`.
pub async fn tap_prepare(vm_id: &str, vo: &str, queue: &str) -> anyhow::Result<serde_json::Value> {
    let h = tap_handler()?;
    let store = store().await?;
    let vlan = h.vlans.config.vlan_for(vo, queue);
    let network = h
        .tap_network(vlan)
        .await
        .map_err(|e| anyhow::anyhow!(wnodes_bus::ErrorChain(&e).to_string()))?;
    let mut tx = store.pool().begin().await?;
    let existing = lease::get(&mut tx, vm_id).await?;
    let spec = spec(vm_id, vo, queue, proto::NetworkMode::VirtioTap);
    let ready = ready(
        h.prepare_tap(&mut tx, &spec, &run_key(vm_id), existing, network)
            .await,
    )?;
    tx.commit().await?;
    Ok(json!({
        "vm_id": ready.vm_id,
        "tap": ready.tap,
        "bridge": ready.bridge,
        "vlan": ready.vlan,
        "mac": ready.mac,
        "address": ready.address,
        "gateway": ready.gateway,
        "address_filtered": ready.address_filtered,
        "method": h.vlans.method().map(|m| m.as_str()),
    }))
}

/// `tap release <vm_id>`: the handler's release (`NetworkHandler::release_host`: the tap and
/// its filter, the VLAN's host side after its last VM), then the lease is forgotten.
pub async fn tap_release(vm_id: &str) -> anyhow::Result<serde_json::Value> {
    let h = tap_handler()?;
    let store = store().await?;
    let mut tx = store.pool().begin().await?;
    let row = lease::get(&mut tx, vm_id)
        .await?
        .with_context(|| format!("no lease of {vm_id}"))?;
    let done = h
        .release_host(&mut tx, vm_id, &row.detail)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    lease::forget(&mut tx, vm_id).await?;
    tx.commit().await?;
    Ok(json!({ "vm_id": vm_id, "released": done }))
}

/// `tap reconcile`: start-up reconciliation of the tap path; prints what it removed.
pub async fn tap_reconcile() -> anyhow::Result<serde_json::Value> {
    reconcile_with(tap_handler()?, "removed").await
}

/// `join-vlan <port> <vo> <queue>`: puts link `port` (a veth whose peer is a "VM"'s
/// namespace) on the VM's VLAN as the tap path puts a tap there
/// (`NetworkHandler::join_vlan`).
pub async fn join_vlan(port: &str, vo: &str, queue: &str) -> anyhow::Result<serde_json::Value> {
    let h = tap_handler()?;
    let vlan = h.vlans.config.vlan_for(vo, queue);
    let network = h
        .tap_network(vlan)
        .await
        .map_err(|e| anyhow::anyhow!(wnodes_bus::ErrorChain(&e).to_string()))?;
    let bridge = h.join_vlan(port, network).await?;
    Ok(json!({
        "port": port,
        "vlan": vlan,
        "bridge": bridge,
        "method": h.vlans.method().map(|m| m.as_str()),
    }))
}
