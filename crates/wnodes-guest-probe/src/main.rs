//! `wnodes-guest-probe`: run inside the SR-IOV test guest (`guest/README.md`, "The igb guest")
//! by tests, it prints what the guest's kernel says as one JSON document on stdout. Built
//! statically (`scripts/build-guest-probe.sh`: `-C target-feature=+crt-static` on the gnu
//! target), so the guest needs no libraries for it.
//!
//! | Module | Subcommands |
//! |---|---|
//! | [`sysfs`] | `sysfs-vfs <pf>`: the PF's `sriov_totalvfs`, `sriov_numvfs` and each VF's PCI address, driver and netdevs, from `/sys/class/net/<pf>/device`. |
//! | [`network`] | `network prepare <vm_id> <vo> <queue>`, `network release <vm_id>`, `network reconcile`: the network service's SR-IOV code (`wnodes-network`) against the guest's PF, its leases in a SQLite store kept across calls; `network tap prepare|release|reconcile` and `network join-vlan <port> <vo> <queue>`: its tap path with VLANs (`NetworkHandler::prepare_tap`, `release_host`, `join_vlan`). |
//! | [`links`] | `netlink-links`: every link (index, name, MAC, MTU, kind, parent, VF count) through `rtnetlink`; `vf-info <pf>`: the PF's VFs (MAC, VLAN, QoS, spoof check, trust, link state) through `rtnetlink` with the VF ext filter (`RTEXT_FILTER_VF`). |
//!
//! Exit status: 0 with the JSON on stdout; 1 when the kernel refused or the PF is not there
//! (the reason on stderr); 2 on a usage error.

mod links;
mod network;
mod sysfs;

use std::{path::Path, process::ExitCode};

const USAGE: &str = "usage: wnodes-guest-probe sysfs-vfs <pf> | netlink-links | vf-info <pf> \
    | network prepare <vm_id> <vo> <queue> | network release <vm_id> | network reconcile \
    | network tap prepare <vm_id> <vo> <queue> | network tap release <vm_id> \
    | network tap reconcile | network join-vlan <port> <vo> <queue>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["sysfs-vfs", pf] => sysfs::sriov(Path::new(sysfs::SYS_CLASS_NET), pf),
        ["netlink-links"] => netlink(links::links()),
        ["vf-info", pf] => netlink(links::vf_info(pf)),
        ["network", "prepare", vm, vo, queue] => netlink(network::prepare(vm, vo, queue)),
        ["network", "release", vm] => netlink(network::release(vm)),
        ["network", "reconcile"] => netlink(network::reconcile()),
        ["network", "tap", "prepare", vm, vo, queue] => {
            netlink(network::tap_prepare(vm, vo, queue))
        }
        ["network", "tap", "release", vm] => netlink(network::tap_release(vm)),
        ["network", "tap", "reconcile"] => netlink(network::tap_reconcile()),
        ["network", "join-vlan", port, vo, queue] => netlink(network::join_vlan(port, vo, queue)),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wnodes-guest-probe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one netlink query on a current-thread runtime.
fn netlink(
    query: impl std::future::Future<Output = anyhow::Result<serde_json::Value>>,
) -> anyhow::Result<serde_json::Value> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(query)
}
