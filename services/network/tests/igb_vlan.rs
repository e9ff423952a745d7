//! The network service's tap path with VLANs per VO and queue, against a kernel that has
//! 802.1Q and bridge VLAN filtering: the igb guest's (`wnodes_testkit::guest_run`). The host
//! has neither, so only the bridge-per-VLAN path without a trunk runs there (`tests/netns.rs`).
//!
//! The static `wnodes-guest-probe network tap prepare|release|reconcile` runs the handler's
//! own tap path (`NetworkHandler::prepare_tap`, `release_host`, `reconcile`: the lease, the
//! VLAN's host side, the tap in it and its nft filter) with its lease table in a SQLite file
//! per hypervisor namespace; `network join-vlan` puts a veth on a VM's VLAN with the same code
//! (`NetworkHandler::join_vlan`), so that network namespaces can stand in for VMs (a tap
//! carries nothing until a qemu opens it). iproute2 in the guest only builds the namespaces
//! and reads the result back as JSON; busybox `ping` says who reaches whom.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failure is a test failure

use std::{collections::HashMap, process::ExitCode, time::Duration};

use serde_json::Value;
use wnodes_testkit::{guest_run, host, host_test, vm::vm_lock};

/// Hypervisor namespaces, each with bridge `br0` (10.231.1.1/24): `hf` with `method = "auto"`
/// (this kernel: filtering), its trunk veth `thf` to `shf` in the namespace `site` (the site's
/// router on VLAN 100, set up with iproute2 as a site would); `hb` and `hc` with `method =
/// "bridges"`, joined by the trunk veth `thb`–`thc` (`hc` the second host on the trunk: its
/// own address and pool on each VLAN). The service's configuration is the probe's: atlas on VLAN 100,
/// cms on 200, queue hpc on 300, VLAN networks 10.231.<vid mod 256>.0/24 with the host at .1.
///
/// Each part: three tap VMs prepared (atlas, atlas in queue hpc or cms, a VO on no VLAN);
/// namespace "VMs" joined to VLANs, one of them on VLAN 200 with an address of VLAN 100's
/// network (only the VLAN separates it); pings to each other (across the trunk for the
/// bridges), to the host's address on VLAN 100 and, for filtering, to the site's across the
/// trunk; then releases and a reconcile with a stray VLAN host side.
///
/// Output: `json <name> <document>` lines, `<a>-><b> yes|no` lines, `rx <link> <packets>`.
const SCRIPT: &str = r#"set -e
P=wnodes-guest-probe
j() { echo "json $1 $(cat)"; }
svc() { # svc NS METHOD ARGS...: the network service's code in hypervisor namespace NS
    ns=$1; m=$2; shift 2
    ( export WNODES_PROBE_STORE=/tmp/$ns.db WNODES_PROBE_TRUNK=t$ns WNODES_PROBE_VLAN_METHOD=$m \
          WNODES_PROBE_VLAN_HOST=${VLAN_HOST:-a}
      ip netns exec "$ns" "$P" network "$@" 2>&1 )
}
reach() { if ip netns exec "$1" ping -c 1 -W 2 "$3" >/dev/null 2>&1; then echo "$1->$2 yes"; else echo "$1->$2 no"; fi; }
vm() { # vm NAME NS METHOD ADDR VO QUEUE: a namespace "VM" whose veth the service puts on its VLAN in NS
    ip netns add "$1"
    ip link add "v-$1" netns "$2" type veth peer name eth0 netns "$1"
    svc "$2" "$3" join-vlan "v-$1" "$5" "$6" | j "join-$1"
    ip -n "$1" addr add "$4/24" dev eth0
    ip -n "$1" link set eth0 up
    ip -n "$1" link set lo up
}
hv() { # hv NS: a hypervisor namespace with its bridge br0
    ip netns add "$1"
    ip -n "$1" link add br0 type bridge
    ip -n "$1" addr add 10.231.1.1/24 dev br0
    ip -n "$1" link set br0 up
    ip -n "$1" link set lo up
}
trunk() { # trunk NS1 NS2 NAME1 NAME2: a trunk veth between two namespaces
    ip link add "$3" netns "$1" type veth peer name "$4" netns "$2"
    ip -n "$1" link set "$3" up
    ip -n "$2" link set "$4" up
}
site_vlan() { # site_vlan PORT VID ADDR: the site's own address on VLAN VID behind PORT
    ip -n site link add link "$1" name "$1.$2" type vlan id "$2"
    ip -n site addr add "$3/24" dev "$1.$2"
    ip -n site link set "$1.$2" up
}
show() { # show NS N: what the kernel has, as JSON (`links-NS-N`, ...)
    ip -n "$1" -d -j link show | j "links-$1-$2"
    ip -n "$1" -j -4 addr show | j "addrs-$1-$2"
    bridge -n "$1" -j vlan show | j "vlans-$1-$2"
}
ip netns add site
ip -n site link set lo up

echo "== filtering"
hv hf
trunk hf site thf shf
svc hf auto tap prepare vm-fa0000000001 atlas grid | j tap-fa1
svc hf auto tap prepare vm-fa0000000002 atlas hpc | j tap-fa2
svc hf auto tap prepare vm-fa0000000003 lhcb grid | j tap-fa3
echo "vlan_filtering $(ip netns exec hf cat /sys/class/net/br0/bridge/vlan_filtering)"
ip netns exec hf nft -j list chain bridge wnodes wn-fa0000000001 | j nft-fa1
show hf 1
vm fa hf auto 10.231.100.101 atlas grid
vm fb hf auto 10.231.100.102 atlas grid
vm fc hf auto 10.231.100.103 cms grid
site_vlan shf 100 10.231.100.254
reach fa fb 10.231.100.102
reach fa fc 10.231.100.103
reach fc fb 10.231.100.102
reach fa host 10.231.100.1
reach fa site 10.231.100.254
reach fc site 10.231.100.254
echo "rx shf.100 $(ip netns exec site cat /sys/class/net/shf.100/statistics/rx_packets)"
svc hf auto tap release vm-fa0000000001 | j rel-fa1
svc hf auto tap release vm-fa0000000002 | j rel-fa2
ip -n hf link add link br0 name br0.400 type vlan id 400
svc hf auto tap reconcile | j rec-hf
show hf 2

echo "== bridges"
hv hb
hv hc
trunk hb hc thb thc
svc hb bridges tap prepare vm-ba0000000001 atlas grid | j tap-ba1
svc hb bridges tap prepare vm-ba0000000002 cms grid | j tap-ba2
svc hb bridges tap prepare vm-ba0000000003 lhcb grid | j tap-ba3
show hb 1
vm bd hb bridges 10.231.100.111 atlas grid
VLAN_HOST=b
vm cd hc bridges 10.231.100.121 atlas grid
vm ce hc bridges 10.231.100.122 cms grid
VLAN_HOST=a
reach bd host 10.231.100.1
reach bd cd 10.231.100.121
reach bd ce 10.231.100.122
reach cd hc 10.231.100.2
echo "rx thc.100 $(ip netns exec hc cat /sys/class/net/thc.100/statistics/rx_packets)"
ip -n hc -d -j link show | j links-hc-1
svc hb bridges tap release vm-ba0000000001 | j rel-ba1
ip -n hb link add wnvl400 type bridge
svc hb bridges tap reconcile | j rec-hb
show hb 2
"#;

/// The `json <name> <document>` lines.
fn documents(stdout: &str) -> HashMap<String, Value> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("json "))
        .map(|l| {
            let (name, doc) = l.split_once(' ').unwrap_or((l, ""));
            // A probe that failed printed its reason instead.
            let v = serde_json::from_str(doc).unwrap_or_else(|e| panic!("{name}: {e}: {doc}"));
            (name.to_owned(), v)
        })
        .collect()
}

/// The link `name` of an `ip -d -j link show` document, as the last `show` printed it.
fn link<'a>(links: &'a Value, name: &str) -> Option<&'a Value> {
    links.as_array()?.iter().find(|l| l["ifname"] == name)
}

/// The IPv4 addresses of `name` in an `ip -j -4 addr show` document.
fn addrs(doc: &Value, name: &str) -> Vec<String> {
    link(doc, name)
        .and_then(|l| l["addr_info"].as_array())
        .map(|a| {
            a.iter()
                .map(|i| format!("{}/{}", i["local"].as_str().unwrap(), i["prefixlen"]))
                .collect()
        })
        .unwrap_or_default()
}

/// The VLANs of port `name` in a `bridge -j vlan show` document: (vid, flags).
fn port_vlans(doc: &Value, name: &str) -> Vec<(u64, Vec<String>)> {
    link(doc, name)
        .and_then(|l| l["vlans"].as_array())
        .map(|vs| {
            vs.iter()
                .map(|v| {
                    let flags = v["flags"]
                        .as_array()
                        .map(|f| f.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
                        .unwrap_or_default();
                    (v["vlan"].as_u64().unwrap(), flags)
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn vm_tap_vms_join_their_vlans_with_filtering_or_a_bridge_per_vlan_in_the_igb_guest() {
    let _vm = vm_lock();
    let (out, report) = guest_run::run_in_igb_guest_ok(SCRIPT, Duration::from_secs(300)).await;
    let lines: Vec<&str> = out.stdout.lines().collect();
    let has = |l: &str| lines.contains(&l);
    let docs = documents(&out.stdout);
    let doc = |n: &str| {
        docs.get(n)
            .unwrap_or_else(|| panic!("no {n} document\n{report}"))
    };

    // Filtering (auto found the kernel has it): each tap VM on its VO's (or queue's) VLAN,
    // with an address of that VLAN's network and the host's address there as its gateway.
    let (fa1, fa2, fa3) = (doc("tap-fa1"), doc("tap-fa2"), doc("tap-fa3"));
    assert_eq!(fa1["method"], "filtering", "{report}");
    assert!(has("vlan_filtering 1"), "{report}");
    for (t, vlan, addr, gw) in [
        (fa1, 100, "10.231.100.2/24", "10.231.100.1"),
        (fa2, 300, "10.231.44.2/24", "10.231.44.1"),
        (fa3, 0, "10.231.1.2/24", "10.231.1.1"),
    ] {
        assert_eq!(t["vlan"], vlan, "{t}");
        assert_eq!(t["bridge"], "br0", "{t}");
        assert_eq!(t["address"], addr, "{t}");
        assert_eq!(t["gateway"], gw, "{t}");
        assert_eq!(t["address_filtered"], true, "{t}");
    }
    let nft = doc("nft-fa1").to_string();
    assert!(nft.contains("10.231.100.2"), "the tap's filter: {nft}");
    // The taps' VLANs: each an untagged member of its VLAN only (its PVID); the untagged VM
    // in the bridge's default VLAN; the bridge itself and the trunk tagged members of both
    // VLANs; the host's address on `br0.<vid>`.
    let vlans = doc("vlans-hf-1");
    let untagged_only =
        |vid: u64| vec![(vid, vec!["PVID".to_owned(), "Egress Untagged".to_owned()])];
    assert_eq!(
        port_vlans(vlans, "wn-fa0000000001"),
        untagged_only(100),
        "{vlans}"
    );
    assert_eq!(
        port_vlans(vlans, "wn-fa0000000002"),
        untagged_only(300),
        "{vlans}"
    );
    assert_eq!(
        port_vlans(vlans, "wn-fa0000000003"),
        untagged_only(1),
        "{vlans}"
    );
    for port in ["br0", "thf"] {
        let tagged: Vec<(u64, Vec<String>)> = port_vlans(vlans, port)
            .into_iter()
            .filter(|(v, _)| *v != 1)
            .collect();
        assert_eq!(
            tagged,
            vec![(100, vec![]), (300, vec![])],
            "{port}: {vlans}"
        );
    }
    let addrs_hf = doc("addrs-hf-1");
    assert_eq!(
        addrs(addrs_hf, "br0.100"),
        ["10.231.100.1/24"],
        "{addrs_hf}"
    );
    assert_eq!(addrs(addrs_hf, "br0.300"), ["10.231.44.1/24"], "{addrs_hf}");
    // Separation: the same VLAN reaches; another VLAN does not, even with an address of the
    // same network; the host's address on VLAN 100 from VLAN 100; the site's across the trunk
    // only from VLAN 100.
    for l in [
        "fa->fb yes",
        "fa->fc no",
        "fc->fb no",
        "fa->host yes",
        "fa->site yes",
        "fc->site no",
    ] {
        assert!(has(l), "{l}\n{report}");
    }
    let rx = |link: &str| -> u64 {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("rx {link} ")))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("rx {link}\n{report}"))
    };
    assert!(rx("shf.100") > 0, "tagged 100 on the trunk\n{report}");
    // Release: the VLAN's host side goes with its last tap VM (the namespace "VMs" hold no
    // lease); a restarted service's reconcile removes the VLAN host sides no lease is on: VLAN
    // 200's (only namespace "VMs" on it) and a stray one (400).
    let rel1 = doc("rel-fa1")["released"].as_str().unwrap().to_owned();
    assert!(
        rel1.contains("tap wn-fa0000000001") && rel1.contains("VLAN link br0.100"),
        "{rel1}"
    );
    assert!(
        doc("rel-fa2")["released"]
            .as_str()
            .unwrap()
            .contains("VLAN link br0.300")
    );
    assert_eq!(
        doc("rec-hf")["removed"],
        serde_json::json!(["VLAN 200's host side", "VLAN 400's host side"])
    );
    let after = doc("links-hf-2");
    for gone in [
        "wn-fa0000000001",
        "wn-fa0000000002",
        "br0.100",
        "br0.200",
        "br0.300",
        "br0.400",
    ] {
        assert!(link(after, gone).is_none(), "{gone} still there: {after}");
    }
    assert!(
        link(after, "wn-fa0000000003").is_some(),
        "the untagged VM keeps its tap"
    );
    let vlans_after = doc("vlans-hf-2");
    for port in ["thf", "br0"] {
        assert!(
            port_vlans(vlans_after, port).iter().all(|(v, _)| *v == 1),
            "{port} left VLANs 100, 200 and 300: {vlans_after}"
        );
    }

    // A bridge per VLAN: VLAN 100's VMs in `wnvl100` (the host's address on it), whose
    // uplink is the trunk's VLAN link `thb.100`.
    let (ba1, ba2, ba3) = (doc("tap-ba1"), doc("tap-ba2"), doc("tap-ba3"));
    assert_eq!(ba1["method"], "bridges");
    for (t, vlan, bridge, addr) in [
        (ba1, 100, "wnvl100", "10.231.100.2/24"),
        (ba2, 200, "wnvl200", "10.231.200.2/24"),
        (ba3, 0, "br0", "10.231.1.2/24"),
    ] {
        assert_eq!(
            (&t["vlan"], &t["bridge"], &t["address"]),
            (&vlan.into(), &bridge.into(), &addr.into()),
            "{t}"
        );
    }
    // Two hypervisors on one trunk: VLAN 100's VMs reach each other across it (frames arrive
    // on `thc.100`: tagged), VLAN 200's VM on the other host with an address of VLAN 100's
    // network is not reached; each host is its VMs' gateway.
    for l in ["bd->host yes", "bd->cd yes", "bd->ce no", "cd->hc yes"] {
        assert!(has(l), "{l}\n{report}");
    }
    assert!(rx("thc.100") > 0, "tagged 100 on the trunk\n{report}");
    let hc = doc("links-hc-1");
    for (uplink, bridge, id) in [("thc.100", "wnvl100", 100), ("thc.200", "wnvl200", 200)] {
        let l = link(hc, uplink).unwrap_or_else(|| panic!("{uplink}: {hc}"));
        assert_eq!(l["master"], bridge, "{l}");
        assert_eq!(l["linkinfo"]["info_data"]["id"], id, "{l}");
    }
    assert_eq!(doc("join-cd")["bridge"], "wnvl100");
    let rel = doc("rel-ba1")["released"].as_str().unwrap().to_owned();
    assert!(
        rel.contains("VLAN link thb.100") && rel.contains("bridge wnvl100"),
        "{rel}"
    );
    assert_eq!(
        doc("rec-hb")["removed"],
        serde_json::json!(["VLAN 400's host side"])
    );
    let hb = doc("links-hb-2");
    for gone in ["wnvl100", "thb.100", "wnvl400", "wn-ba0000000001"] {
        assert!(link(hb, gone).is_none(), "{gone} still there: {hb}");
    }
    let uplink = link(hb, "thb.200").unwrap_or_else(|| panic!("thb.200: {hb}"));
    assert_eq!(uplink["master"], "wnvl200", "{uplink}");
    assert_eq!(uplink["linkinfo"]["info_data"]["id"], 200, "{uplink}");
    assert_eq!(addrs(doc("addrs-hb-2"), "wnvl200"), ["10.231.200.1/24"]);
    assert_eq!(
        addrs(doc("addrs-hb-1"), "wnvl100"),
        ["10.231.100.1/24"],
        "the host's address on VLAN 100"
    );
    let hb1 = doc("links-hb-1");
    let up100 = link(hb1, "thb.100").unwrap_or_else(|| panic!("thb.100: {hb1}"));
    assert_eq!(up100["master"], "wnvl100", "{up100}");
    assert_eq!(link(hb1, "wn-ba0000000001").unwrap()["master"], "wnvl100");
    assert_eq!(link(hb1, "wn-ba0000000003").unwrap()["master"], "br0");
    assert_eq!(link(hb, "wn-ba0000000002").unwrap()["master"], "wnvl200");
}

fn main() -> ExitCode {
    host::main(vec![host_test!(
        multi_thread vm_tap_vms_join_their_vlans_with_filtering_or_a_bridge_per_vlan_in_the_igb_guest
        needs guest_run::IGB_GUEST_NEEDS
    )])
}
