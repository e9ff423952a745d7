//! The igb guest (`wnodes_testkit::guest_run`) gives later SR-IOV and VLAN tests what they rely
//! on: an `igb` PF whose VFs `sriov_numvfs` creates, the static probe reading them from sysfs and
//! through rtnetlink (MAC and VLAN set with iproute2), 802.1Q devices, a VLAN-filtering bridge,
//! and the script's stdout, stderr and exit status back on the host.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure

use std::time::Duration;

use serde_json::Value;
use wnodes_testkit::{guest_run, host_test, vm::vm_lock};

fn main() -> std::process::ExitCode {
    wnodes_testkit::host::main(vec![host_test!(
        multi_thread vm_igb_guest_has_sriov_vfs_vlans_and_a_vlan_filtering_bridge
        needs guest_run::IGB_GUEST_NEEDS
    )])
}

/// One JSON document per line of the script's stdout, in order.
const SCRIPT: &str = r#"set -e
wnodes-guest-probe sysfs-vfs eth0
echo 2 > /sys/class/net/eth0/device/sriov_numvfs
wnodes-guest-probe sysfs-vfs eth0
ip link set eth0 vf 0 mac 52:54:00:aa:bb:01
ip link set eth0 vf 1 vlan 100
wnodes-guest-probe vf-info eth0
ip link add link eth0 name eth0.100 type vlan id 100
wnodes-guest-probe netlink-links
printf '['; sep=
for v in /sys/class/net/eth0/device/virtfn*; do
    printf '%s"%s"' "$sep" "$(basename "$(readlink "$v")")"; sep=,
done
echo ']'
ip link add br0 type bridge vlan_filtering 1
echo "{\"vlan_filtering\": $(cat /sys/class/net/br0/bridge/vlan_filtering)}"
echo "the script's stderr" >&2
exit 3
"#;

async fn vm_igb_guest_has_sriov_vfs_vlans_and_a_vlan_filtering_bridge() {
    let _vm = vm_lock();
    let out = guest_run::run_in_igb_guest(SCRIPT, Duration::from_secs(180))
        .await
        .unwrap();
    let report = out.report();
    eprintln!(
        "igb guest: boot, script and power-off in {:.1?}",
        out.elapsed
    );
    assert_eq!(out.exit_code, 3, "{report}");
    assert_eq!(out.stderr.trim(), "the script's stderr", "{report}");
    let docs: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}\n{report}")))
        .collect();
    let [before, after, vf_info, links, virtfn, bridge] = docs.as_slice() else {
        panic!("expected 6 JSON lines\n{report}");
    };

    // the PF: igb, SR-IOV capable, no VFs yet
    assert_eq!(before["driver"], "igb", "{report}");
    assert_eq!(before["totalvfs"], 7, "{report}");
    assert_eq!(before["numvfs"], 0, "{report}");
    assert_eq!(before["vfs"], Value::Array(vec![]), "{report}");

    // two VFs, bound by igbvf, at the PCI addresses sysfs's virtfn links name
    assert_eq!(after["numvfs"], 2, "{report}");
    let vfs = after["vfs"].as_array().unwrap();
    assert_eq!(vfs.len(), 2, "{report}");
    let pci: Vec<&Value> = vfs.iter().map(|v| &v["pci"]).collect();
    assert_eq!(
        virtfn.as_array().unwrap().iter().collect::<Vec<_>>(),
        pci,
        "{report}"
    );
    for vf in vfs {
        assert_eq!(vf["driver"], "igbvf", "{report}");
        assert_eq!(vf["netdevs"].as_array().map(Vec::len), Some(1), "{report}");
    }

    // rtnetlink with the VF filter: what iproute2 set
    assert_eq!(vf_info["num_vf"], 2, "{report}");
    let vfi = vf_info["vfs"].as_array().unwrap();
    assert_eq!(vfi.len(), 2, "{report}");
    assert_eq!(vfi[0]["vf"], 0, "{report}");
    assert_eq!(vfi[0]["mac"], "52:54:00:aa:bb:01", "{report}");
    assert_eq!(vfi[1]["vlan"], 100, "{report}");
    assert_eq!(vfi[0]["spoofchk"], true, "{report}");
    assert_eq!(vfi[0]["trust"], false, "{report}");

    // the VLAN device on the PF, as rtnetlink lists it
    let links = links.as_array().unwrap();
    let link = |name: &str| links.iter().find(|l| l["name"] == name);
    let pf = link("eth0").unwrap_or_else(|| panic!("no eth0\n{report}"));
    assert_eq!(pf["mac"], guest_run::PF_MAC, "{report}");
    let vlan = link("eth0.100").unwrap_or_else(|| panic!("no eth0.100\n{report}"));
    assert_eq!(vlan["kind"], "vlan", "{report}");
    assert_eq!(vlan["parent"], pf["index"], "{report}");
    // the VFs' netdevs are links too
    for vf in vfs {
        let name = vf["netdevs"][0].as_str().unwrap();
        assert!(
            link(name).is_some(),
            "VF netdev {name} not listed\n{report}"
        );
    }

    assert_eq!(bridge["vlan_filtering"], 1, "{report}");
}
