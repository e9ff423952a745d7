//! The per-VM anti-spoofing filter, as nft scripts applied atomically with `nft -f -`.
//!
//! ```text
//! table bridge wnodes {
//!   map taps { type ifname : verdict }           # "wn-<12hex>" : jump wn-<12hex>
//!   chain prerouting {                           # every frame entering any bridge port
//!     type filter hook prerouting priority -200; policy accept;
//!     iifname vmap @taps                         # a known tap: its own chain decides
//!     iifname "wn-*" drop                        # a tap without a filter: nothing passes
//!   }
//!   chain wn-<12hex> {                           # one per VM
//!     ether saddr != <mac> drop
//!     arp saddr ether != <mac> drop
//!     arp saddr ip != <ip> drop
//!     ether type arp accept
//!     ip saddr != <ip> drop
//!     ether type ip accept
//!     drop                                       # IPv6, VLAN tags, anything else
//!   }
//! }
//! ```
//!
//! With VLANs for tap VMs, a table `inet wnodes` ([`vlan_separation_script`]) also keeps the
//! VLANs apart at layer 3 on the host.
//!
//! The prerouting hook sees frames both bridged to other ports and delivered to the host (the
//! gateway, the storage listener), so a VM cannot reach either with another VM's addresses.
//! Scripts are built only from values that were validated ([`crate::host::valid_tap_name`], a
//! parsed [`Ipv4Addr`], a [`Mac`]).

use std::net::Ipv4Addr;

use crate::mac::Mac;

/// nft table family.
pub const FAMILY: &str = "bridge";
/// nft table name.
pub const TABLE: &str = "wnodes";
/// Name of the map from tap name to the tap's chain.
pub const MAP: &str = "taps";
/// Name of the base chain.
pub const BASE_CHAIN: &str = "prerouting";

/// Creates the table, map and base chain if missing and (re)writes the base chain's rules, in one
/// transaction (idempotent).
pub fn base_script() -> String {
    format!(
        "add table {FAMILY} {TABLE}\n\
         add map {FAMILY} {TABLE} {MAP} {{ type ifname : verdict; }}\n\
         add chain {FAMILY} {TABLE} {BASE_CHAIN} {{ type filter hook prerouting priority -200; policy accept; }}\n\
         flush chain {FAMILY} {TABLE} {BASE_CHAIN}\n\
         add rule {FAMILY} {TABLE} {BASE_CHAIN} iifname vmap @{MAP}\n\
         add rule {FAMILY} {TABLE} {BASE_CHAIN} iifname \"wn-*\" drop\n"
    )
}

/// Installs (or rewrites) the filter of one tap: the VM may only send with `mac` and `ip`.
pub fn vm_script(tap: &str, mac: Mac, ip: Ipv4Addr) -> String {
    let mut s = base_script();
    let rule = |r: &str| format!("add rule {FAMILY} {TABLE} {tap} {r}\n");
    s.push_str(&format!("add chain {FAMILY} {TABLE} {tap}\n"));
    s.push_str(&format!("flush chain {FAMILY} {TABLE} {tap}\n"));
    s.push_str(&rule(&format!("ether saddr != {mac} drop")));
    s.push_str(&rule(&format!("arp saddr ether != {mac} drop")));
    s.push_str(&rule(&format!("arp saddr ip != {ip} drop")));
    s.push_str(&rule("ether type arp accept"));
    s.push_str(&rule(&format!("ip saddr != {ip} drop")));
    s.push_str(&rule("ether type ip accept"));
    s.push_str(&rule("drop"));
    s.push_str(&format!(
        "add element {FAMILY} {TABLE} {MAP} {{ \"{tap}\" : jump {tap} }}\n"
    ));
    s
}

/// Removes the filter of one tap, whether or not it exists (adding before deleting makes the
/// deletion succeed either way; it is one transaction, so nothing is ever half-removed).
pub fn remove_script(tap: &str) -> String {
    format!(
        "add table {FAMILY} {TABLE}\n\
         add map {FAMILY} {TABLE} {MAP} {{ type ifname : verdict; }}\n\
         add chain {FAMILY} {TABLE} {tap}\n\
         add element {FAMILY} {TABLE} {MAP} {{ \"{tap}\" : jump {tap} }}\n\
         delete element {FAMILY} {TABLE} {MAP} {{ \"{tap}\" }}\n\
         flush chain {FAMILY} {TABLE} {tap}\n\
         delete chain {FAMILY} {TABLE} {tap}\n"
    )
}

/// Name of the table that keeps VLANs apart at layer 3 on the host (family `inet`).
pub const VLAN_TABLE: &str = "wnodes";

/// Keeps the VLANs apart at layer 3 on this host (`docs/sriov-and-vlans.md`): a packet that
/// arrives on the host's interface on one VLAN (`<vlan_bridge_prefix>*`, `<bridge>.*`) is
/// taken in only if it is for an address of that interface (Linux would otherwise take a
/// VM's packet for the host's address on another VLAN: the weak host model), and nothing is
/// routed from one VLAN's interface to another's. Created or rewritten in one transaction.
pub fn vlan_separation_script(vlan_bridge_prefix: &str, bridge: &str) -> String {
    let ifs = format!("{{ \"{vlan_bridge_prefix}*\", \"{bridge}.*\" }}");
    format!(
        "add table inet {VLAN_TABLE}\n\
         add chain inet {VLAN_TABLE} input {{ type filter hook input priority -10; policy accept; }}\n\
         add chain inet {VLAN_TABLE} forward {{ type filter hook forward priority -10; policy accept; }}\n\
         flush chain inet {VLAN_TABLE} input\n\
         flush chain inet {VLAN_TABLE} forward\n\
         add rule inet {VLAN_TABLE} input iifname {ifs} fib daddr . iif type != {{ local, broadcast, multicast }} drop\n\
         add rule inet {VLAN_TABLE} forward iifname {ifs} oifname {ifs} drop\n"
    )
}

/// Removes the layer-3 separation table, whether or not it exists.
pub fn vlan_separation_remove_script() -> String {
    format!("add table inet {VLAN_TABLE}\ndelete table inet {VLAN_TABLE}\n")
}

/// From `nft -j list table bridge wnodes`: the per-VM chains and the taps in the map.
pub fn vm_chains_and_elements(table: &serde_json::Value) -> (Vec<String>, Vec<String>) {
    let mut chains = Vec::new();
    let mut elements = Vec::new();
    let items = table
        .get("nftables")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten();
    for item in items {
        if let Some(c) = item.get("chain") {
            if let Some(name) = c.get("name").and_then(|n| n.as_str())
                && name != BASE_CHAIN
            {
                chains.push(name.to_owned());
            }
        } else if let Some(m) = item.get("map")
            && m.get("name").and_then(|n| n.as_str()) == Some(MAP)
        {
            for e in m
                .get("elem")
                .and_then(|e| e.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(name) = e.get(0).and_then(|n| n.as_str()) {
                    elements.push(name.to_owned());
                }
            }
        }
    }
    (chains, elements)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_separation_covers_both_kinds_of_vlan_interface() {
        let s = vlan_separation_script("wnvl", "wnbr0");
        assert!(s.contains(
            "input iifname { \"wnvl*\", \"wnbr0.*\" } fib daddr . iif type != { local, broadcast, multicast } drop"
        ));
        assert!(s.contains(
            "forward iifname { \"wnvl*\", \"wnbr0.*\" } oifname { \"wnvl*\", \"wnbr0.*\" } drop"
        ));
        assert!(vlan_separation_remove_script().ends_with("delete table inet wnodes\n"));
    }

    #[test]
    fn vm_script_names_the_tap_mac_and_ip() {
        let mac = Mac::for_vm("vm-0123456789ab", 0);
        let s = vm_script("wn-0123456789ab", mac, Ipv4Addr::new(10, 231, 1, 2));
        assert!(s.contains(&format!("ether saddr != {mac} drop")));
        assert!(s.contains("ip saddr != 10.231.1.2 drop"));
        assert!(s.contains("arp saddr ip != 10.231.1.2 drop"));
        assert!(s.contains("{ \"wn-0123456789ab\" : jump wn-0123456789ab }"));
        assert!(
            remove_script("wn-0123456789ab").contains("delete chain bridge wnodes wn-0123456789ab")
        );
    }
}
