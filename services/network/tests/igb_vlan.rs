//! The network service's VLAN requests (`wnodes_network::vlan`, sent by `Netlink`) against a
//! kernel that has 802.1Q and bridge VLAN filtering: the igb guest's
//! (`wnodes_testkit::guest_run`), whose "VMs" are network namespaces joined by veth pairs.
//! The static `wnodes-guest-probe network vlan-filtering|port-vlan|vlan-link` makes each VLAN
//! setting; iproute2 in the guest only builds the namespaces and veths and checks the result;
//! busybox `ping` says who reaches whom. The host has neither 8021q nor VLAN filtering.
//!
//! The tap handler does not choose a VLAN path yet (`docs/sriov-and-vlans.md`): this shows the
//! two paths' requests do what they are for.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failure is a test failure

use std::{process::ExitCode, time::Duration};

use wnodes_testkit::{guest_run, host, host_test, vm::vm_lock};

/// Both paths. Each "VM" is a namespace with `eth0` (veth) and an address in 10.0.0.0/24;
/// `reach A B ADDR` prints `A->B yes|no`.
///
/// 1. Bridge VLAN filtering: one bridge `br0` (filtering turned on by the probe); vm-a and
///    vm-b untagged members of VLAN 100, vm-c of VLAN 200 (each port set by the probe).
/// 2. A bridge per VLAN: two hosts `ha`, `hb` joined by a trunk veth (`ta`–`tb`); on each,
///    the probe makes the VLAN links `<trunk>.100` and `<trunk>.200`, each the uplink of that
///    VLAN's bridge. VMs: a1 on VLAN 100 at ha; b1 on VLAN 100 and b2 on VLAN 200 at hb.
const SCRIPT: &str = r#"set -e
reach() { if ip netns exec "$1" ping -c 1 -W 2 "$3" >/dev/null 2>&1; then echo "$1->$2 yes"; else echo "$1->$2 no"; fi; }
vm() { # vm NAME HOSTNS BRIDGE ADDR: a namespace whose eth0 is a port of BRIDGE (in HOSTNS or here)
    ip netns add "$1"
    if [ "$2" = - ]; then
        ip link add "v-$1" type veth peer name eth0 netns "$1"
        ip link set "v-$1" master "$3" up
    else
        ip link add "v-$1" netns "$2" type veth peer name eth0 netns "$1"
        ip -n "$2" link set "v-$1" master "$3" up
    fi
    ip -n "$1" addr add "$4/24" dev eth0
    ip -n "$1" link set eth0 up
    ip -n "$1" link set lo up
}
echo "== filtering"
ip link add br0 type bridge
wnodes-guest-probe network vlan-filtering br0 on >&2
ip link set br0 up
vm a - br0 10.0.0.1
vm b - br0 10.0.0.2
vm c - br0 10.0.0.3
wnodes-guest-probe network port-vlan v-a 100 >&2
wnodes-guest-probe network port-vlan v-b 100 >&2
wnodes-guest-probe network port-vlan v-c 200 >&2
echo "vlan_filtering=$(cat /sys/class/net/br0/bridge/vlan_filtering)"
bridge vlan show dev v-a >&2
reach a b 10.0.0.2
reach a c 10.0.0.3
reach c b 10.0.0.2
echo "== bridges"
ip netns add ha
ip netns add hb
ip link add ta netns ha type veth peer name tb netns hb
ip -n ha link set ta up
ip -n hb link set tb up
for h in ha hb; do
    t=t${h#h}
    for v in 100 200; do
        ip netns exec $h wnodes-guest-probe network vlan-link $t $v >&2
        ip -n $h link add br$v type bridge
        ip -n $h link set $t.$v master br$v
        ip -n $h link set br$v up
    done
done
echo "uplinks: $(ip -n ha -d -o link show ta.100 | grep -o 'vlan protocol 802.1Q id [0-9]*') / $(ip -n hb -d -o link show tb.200 | grep -o 'vlan protocol 802.1Q id [0-9]*')"
vm a1 ha br100 10.0.1.1
vm b1 hb br100 10.0.1.2
vm b2 hb br200 10.0.1.3
reach a1 b1 10.0.1.2
reach a1 b2 10.0.1.3
echo "tagged: ta.100 tx $(cat /sys/class/net/ta.100/statistics/tx_packets 2>/dev/null || ip netns exec ha cat /sys/class/net/ta.100/statistics/tx_packets), tb.200 rx $(ip netns exec hb cat /sys/class/net/tb.200/statistics/rx_packets)"
"#;

async fn vm_vlans_separate_vms_on_a_filtering_bridge_and_across_a_trunk_in_the_igb_guest() {
    let _vm = vm_lock();
    let out = guest_run::run_in_igb_guest(SCRIPT, Duration::from_secs(240))
        .await
        .unwrap();
    let report = out.report();
    eprintln!(
        "igb guest: {:.1?}; what it printed:\n{}",
        out.elapsed, out.stdout
    );
    assert_eq!(out.exit_code, 0, "{report}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    let has = |l: &str| lines.contains(&l);
    // Bridge VLAN filtering: same VLAN reaches, the other VLAN does not.
    assert!(has("vlan_filtering=1"), "{report}");
    assert!(has("a->b yes"), "{report}");
    assert!(has("a->c no"), "{report}");
    assert!(has("c->b no"), "{report}");
    // A bridge per VLAN: uplinks <trunk>.<vid>; VLAN 100 reaches across the trunk, VLAN 200
    // does not get VLAN 100's frames.
    assert!(
        has("uplinks: vlan protocol 802.1Q id 100 / vlan protocol 802.1Q id 200"),
        "{report}"
    );
    assert!(has("a1->b1 yes"), "{report}");
    assert!(has("a1->b2 no"), "{report}");
    let tagged = lines.iter().find(|l| l.starts_with("tagged: ")).unwrap();
    let tx: u64 = tagged
        .split("ta.100 tx ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{tagged}\n{report}"));
    assert!(
        tx > 0,
        "frames left ta.100, i.e. the trunk, tagged 100: {tagged}\n{report}"
    );
}

fn main() -> ExitCode {
    host::main(vec![host_test!(
        multi_thread vm_vlans_separate_vms_on_a_filtering_bridge_and_across_a_trunk_in_the_igb_guest
        needs guest_run::IGB_GUEST_NEEDS
    )])
}
