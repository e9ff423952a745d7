//! The network service's SR-IOV code against a real SR-IOV NIC: QEMU's `igb` (Intel 82576) in a
//! TCG guest (`wnodes_testkit::guest_run`), the service's code run there by the static
//! `wnodes-guest-probe network …` (`NetworkHandler::prepare_vf`, `reset_vf`, `reconcile`, with
//! its lease table in a SQLite store kept across the calls, each call a fresh process: a
//! restarted service). iproute2 in the guest (`ip -j link show eth0`) only checks the result.
//!
//! The host has no SR-IOV (`docs/sriov-and-vlans.md`); nothing here passes a VF into a VM.
//! A host test (`wnodes_testkit::host`): qemu, the test guest, the igb guest's disk and the
//! probe (`guest/build-igb.sh`, `scripts/build-guest-probe.sh`; `scripts/test.sh` builds both).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failure is a test failure

use std::{process::ExitCode, time::Duration};

use serde_json::Value;
use wnodes_testkit::{guest_run, host, host_test, vm::vm_lock};

/// Two VMs get VFs 0 and 1 (VO atlas → VLAN 100; queue hpc → VLAN 300); the first is
/// released; VF 0 is then set by hand as if a VM had left it behind, and a restarted service's
/// reconcile resets it while VF 1 (still leased) stays. Each step prints one JSON line.
const SCRIPT: &str = r#"set -e
echo 2 > /sys/class/net/eth0/device/sriov_numvfs
wnodes-guest-probe network prepare vm-0000000000a1 atlas grid
ip -j link show eth0
wnodes-guest-probe network prepare vm-0000000000a2 cms hpc
ip -j link show eth0
wnodes-guest-probe network prepare vm-0000000000a2 cms hpc
wnodes-guest-probe network release vm-0000000000a1
ip -j link show eth0
ip link set eth0 vf 0 mac 52:54:00:99:99:99 vlan 7 spoofchk off
wnodes-guest-probe network reconcile
ip -j link show eth0
wnodes-guest-probe network prepare vm-0000000000a3 atlas grid
"#;

/// The VFs of `eth0` in `ip -j link show eth0`'s answer: (vf, MAC, VLAN, spoof check).
fn vfs(doc: &Value, report: &str) -> Vec<(u64, String, u64, bool)> {
    let list = doc[0]["vfinfo_list"]
        .as_array()
        .unwrap_or_else(|| panic!("no vfinfo_list in {doc}\n{report}"));
    list.iter()
        .map(|v| {
            let vlan = v["vlan_list"]
                .as_array()
                .and_then(|l| l.first())
                .and_then(|x| x["vlan"].as_u64())
                .or_else(|| v["vlan"].as_u64())
                .unwrap_or(0);
            (
                v["vf"].as_u64().unwrap(),
                v["address"].as_str().unwrap_or_default().to_owned(),
                vlan,
                v["spoofchk"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

async fn vm_vfs_are_set_released_and_reconciled_by_the_network_service_in_an_igb_guest() {
    let _vm = vm_lock();
    let (out, report) = guest_run::run_in_igb_guest_ok(SCRIPT, Duration::from_secs(240)).await;
    let docs: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}\n{report}")))
        .collect();
    let [a1, ip1, a2, ip2, again, released, ip3, reconciled, ip4, a3] = docs.as_slice() else {
        panic!("expected 10 JSON lines\n{report}");
    };
    // The first VM: VF 0 at the first VF's PCI address, its MAC, its VO's VLAN.
    assert_eq!(a1["vlan"], 100, "{report}");
    assert_eq!(a1["address"], "10.231.2.2/24", "{report}");
    assert_eq!(a1["gateway"], "10.231.2.1", "{report}");
    assert_eq!(a1["address_filtered"], false, "{report}");
    let mac1 = a1["mac"].as_str().unwrap().to_owned();
    let v = vfs(ip1, &report);
    assert_eq!(v[0], (0, mac1.clone(), 100, true), "{report}");
    assert_eq!(v[1].1, "00:00:00:00:00:00", "VF 1 untouched\n{report}");
    // The second VM: the next VF, the queue's VLAN; asked again, the same VF (its lease).
    assert_eq!(a2["vlan"], 300, "{report}");
    assert_ne!(a2["pci"], a1["pci"], "{report}");
    assert_eq!(again, a2, "a repeated request gets the same VF\n{report}");
    let mac2 = a2["mac"].as_str().unwrap().to_owned();
    let v = vfs(ip2, &report);
    assert_eq!(v[1], (1, mac2.clone(), 300, true), "{report}");
    // The first VM released: VF 0 reset.
    assert!(
        released["released"]
            .as_str()
            .unwrap()
            .contains("VF 0 of eth0"),
        "{report}"
    );
    let v = vfs(ip3, &report);
    assert_eq!(v[0], (0, "00:00:00:00:00:00".into(), 0, true), "{report}");
    assert_eq!(v[1], (1, mac2.clone(), 300, true), "{report}");
    // VF 0 left set by nobody's lease: a restarted service resets it, VF 1 stays.
    let reset = reconciled["reset"].as_array().unwrap();
    assert_eq!(reset.len(), 1, "{report}");
    assert!(
        reset[0].as_str().unwrap().starts_with("VF 0 of eth0"),
        "{report}"
    );
    let v = vfs(ip4, &report);
    assert_eq!(v[0], (0, "00:00:00:00:00:00".into(), 0, true), "{report}");
    assert_eq!(v[1], (1, mac2, 300, true), "{report}");
    // A third VM gets the freed VF 0 again.
    assert_eq!(a3["pci"], a1["pci"], "{report}");
}

fn main() -> ExitCode {
    host::main(vec![host_test!(
        multi_thread vm_vfs_are_set_released_and_reconciled_by_the_network_service_in_an_igb_guest
        needs guest_run::IGB_GUEST_NEEDS
    )])
}
