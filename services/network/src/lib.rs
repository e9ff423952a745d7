//! WNoDeS network service: gives each VM its network on this hypervisor.
//!
//! A VM that asks for SR-IOV gets a VF of `[network.sriov] physical_functions` instead
//! ([`sriov`]). In tap mode a VM gets an address from the configured pool, a MAC derived from its id and a
//! tap `wn-<12hex>` in the bridge, behind an nftables filter that drops every frame the VM sends
//! with another MAC or IPv4 address. In user mode (no CAP_NET_ADMIN) it gets qemu's user-mode
//! network and a `NetworkReady` that says no filtering applies.
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the `[network]` section, mode resolution, the IPv4 prefix type |
//! | [`host`] | the host's network: links and addresses (netlink), `nft` and `ip tuntap` commands (arguments only), optionally in a network namespace |
//! | [`netlink`] | links, addresses and bridge ports over rtnetlink, in the host's or a named namespace |
//! | [`nft`] | the anti-spoofing table and its per-VM chains, as nft scripts |
//! | [`mac`] | guest MAC derivation |
//! | [`lease`] | the leases: one row per VM in the preparers' resource table, tombstones after release |
//! | [`service`] | the handler |
//! | [`sriov`] | SR-IOV: the VFs of the configured physical functions (sysfs), a VM's VF settings and their reset |
//! | [`vlan`] | `[network.vlan]` (which VLAN a VM of a VO or queue is on, each VLAN's network) and 802.1Q as rtnetlink messages: VLAN links `<trunk>.<vid>`, bridges, bridge VLAN filtering, a port's VLANs |
//! | [`tap_vlan`] | how a tap VM joins its VLAN: the method (filtering or a bridge per VLAN), each VLAN's host side made on its first VM and removed after its last |
//! | [`reconcile`] | start-up reconciliation: taps and filters no prepared lease holds are removed |
//!
//! [`Network`] is the service as the runtime runs it.
//!
//! ```toml
//! [network]
//! mode = "auto"             # "tap" | "user" | "auto" (tap when euid 0 and /dev/net/tun exists)
//! bridge = "wnbr0"          # must exist with an IPv4 address: the VMs' gateway
//! pool = "10.231.1.0/24"    # required in tap mode; must lie inside the bridge's subnet
//! # netns = "wnodes-hv"     # run ip/nft inside this network namespace
//!
//! [network.sriov]           # VMs asking for SR-IOV get a VF (docs/sriov-and-vlans.md)
//! # physical_functions = ["ens1f0"]
//! # pool = "10.231.2.0/24"
//! # gateway = "10.231.2.1"
//!
//! [network.vlan]            # VMs of a VO or queue on their own VLAN, tap or VF
//! # vo_vlans = { atlas = 100 }
//! # method = "auto"         # "filtering" | "bridges" | "auto"
//! # trunk = "bond0"
//! # [network.vlan.networks.100]
//! # address = "10.231.100.1/24"   # this host on VLAN 100: its VMs' gateway
//! ```
//!
//! Deployment notes: taps are created without an owner, so qemu needs CAP_NET_ADMIN (or root) to
//! attach to them; with `netns` set, qemu and the storage gateway must run in that namespace too.
//! The filter passes only IPv4 and ARP from a VM (IPv6 and VLAN-tagged frames are dropped).

pub mod config;
#[cfg(test)]
mod error_rule;
pub mod host;
pub mod lease;
pub mod mac;
pub mod netlink;
pub mod nft;
pub mod reconcile;
pub mod service;
pub mod sriov;
pub mod tap_vlan;
#[cfg(test)]
mod test_bytes;
pub mod vlan;

pub use config::{NetworkConfig, NetworkConfigError};
pub use service::NetworkHandler;

use wnodes_runtime::{ConfigError, NoCommand, Parts, Service, ServiceCtx, StartError};

/// The network service.
#[derive(Debug)]
pub struct Network;

impl Service for Network {
    const ROLE: &'static wnodes_runtime::Role = &wnodes_bus::roles::NETWORK;
    const ABOUT: &'static str = "WNoDeS network service: a tap (or user-mode network) per VM";
    type Config = NetworkConfig;
    type Handler = NetworkHandler;
    type Command = NoCommand;

    fn validate(config: &NetworkConfig) -> Result<(), ConfigError> {
        config
            .validate()
            .map_err(|e| ConfigError::section(Self::NAME, e))
    }

    /// Creates the lease table and removes taps and nft chains no prepared lease holds.
    async fn build(ctx: &ServiceCtx<NetworkConfig>) -> Result<Parts<NetworkHandler>, StartError> {
        let handler = NetworkHandler::new(&ctx.config, ctx.source())
            .map_err(|e| StartError::config(Self::NAME, e))?;
        tracing::info!(mode = handler.mode.as_str(), bridge = %handler.bridge, pool = ?handler.pool.map(|p| p.to_string()), "Network service configured.");
        service::init_store(&ctx.store)
            .await
            .map_err(|e| StartError::failed("create the lease table", e))?;
        let removed = handler
            .reconcile(&ctx.store)
            .await
            .map_err(|e| StartError::failed("reconcile host network state", e))?;
        if !removed.is_empty() {
            tracing::info!(
                ?removed,
                "Reconciled: removed what no prepared lease holds."
            );
        }
        Ok(Parts::consumer(handler))
    }
}
