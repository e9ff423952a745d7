//! 802.1Q VLANs for tap VMs (`docs/sriov-and-vlans.md`), as rtnetlink messages:
//!
//! - **bridge VLAN filtering** (where the kernel has it): the bridge filters
//!   ([`vlan_filtering_message`]) and a VM's tap is an untagged member of its VLAN, which is
//!   also the port's PVID ([`port_vlan_message`]; `bridge vlan add dev <tap> vid <v> pvid
//!   untagged`);
//! - **a bridge per VLAN** (where it does not, as on the project's hosts): the uplink of VLAN
//!   `<v>`'s bridge is the VLAN link `<trunk>.<v>` ([`vlan_link_message`]; `ip link add link
//!   <trunk> name <trunk>.<v> type vlan id <v>`), so frames leave the trunk tagged.
//!
//! Each message is what iproute2 6.1.0 sends for the same command (the tests: byte for byte,
//! or parsed where iproute2 leaves the NUL off a link kind's name).
//! Which VLAN a VM is on is [`crate::sriov::SriovConfig::vlan_for`]'s rule.

use rtnetlink::packet_route::{
    AddressFamily,
    link::{
        AfSpecBridge, BridgeVlanInfo, BridgeVlanInfoFlags, InfoBridge, InfoData, InfoKind,
        InfoVlan, LinkAttribute, LinkInfo, LinkMessage,
    },
};

/// The VLAN link of `trunk` for VLAN `vid`: `<trunk>.<vid>`, when that fits an interface
/// name (15 bytes).
pub fn vlan_link_name(trunk: &str, vid: u16) -> Option<String> {
    let name = format!("{trunk}.{vid}");
    (crate::host::valid_ifname(trunk) && (1..=crate::sriov::MAX_VLAN).contains(&vid))
        .then_some(name)
        .filter(|n| n.len() <= 15)
}

/// `RTM_NEWLINK` body creating `name`, VLAN `vid` on the link with index `trunk_index`.
pub fn vlan_link_message(trunk_index: u32, name: &str, vid: u16) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes = vec![
        LinkAttribute::Link(trunk_index),
        LinkAttribute::IfName(name.to_owned()),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vlan),
            LinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(vid)])),
        ]),
    ];
    m
}

/// `RTM_SETLINK` (family `AF_BRIDGE`) body making the port with index `port_index` an
/// untagged member of VLAN `vid`, with `vid` as its PVID.
pub fn port_vlan_message(port_index: u32, vid: u16) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.interface_family = AddressFamily::Bridge;
    m.header.index = port_index;
    m.attributes = vec![LinkAttribute::AfSpecBridge(vec![AfSpecBridge::VlanInfo(
        BridgeVlanInfo {
            flags: BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged,
            vid,
        },
    )])];
    m
}

/// `RTM_NEWLINK` body turning VLAN filtering of the bridge with index `bridge_index` on or
/// off.
pub fn vlan_filtering_message(bridge_index: u32, on: bool) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = bridge_index;
    m.attributes = vec![LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Bridge),
        LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::VlanFiltering(on)])),
    ])];
    m
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rtnetlink::packet_core::Emitable;

    use super::*;

    /// `hex`'s bytes (whitespace ignored).
    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(char::is_ascii_hexdigit).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn body(m: &LinkMessage) -> Vec<u8> {
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        buf
    }

    /// iproute2's request body, parsed. iproute2 sends `IFLA_INFO_KIND` without the string's
    /// NUL (`"vlan"`, length 8) where netlink-packet-route sends it with one (as the kernel's
    /// own messages do, length 9); the kernel takes both. So a request with a kind is compared
    /// parsed, the others byte for byte.
    fn parsed(hex_body: &str) -> LinkMessage {
        use rtnetlink::packet_core::Parseable;
        LinkMessage::parse(hex(hex_body).as_slice()).unwrap()
    }

    // Each constant is an iproute2 6.1.0 request after its 16-byte netlink header, captured
    // with `strace -e trace=sendmsg -e write=3 <command>` (the kernel here refused each one:
    // no 8021q, no VLAN filtering).

    /// `ip link add link lo name lo.100 type vlan id 100`.
    const IP_LINK_ADD_VLAN: &str = "
        00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
        08 00 05 00 01 00 00 00 0b 00 03 00 6c 6f 2e 31
        30 30 00 00 18 00 12 00 08 00 01 00 76 6c 61 6e
        0c 00 02 00 06 00 01 00 64 00 00 00";

    /// `bridge vlan add dev lo vid 100 pvid untagged` (lo is index 1).
    const BRIDGE_VLAN_ADD: &str = "
        07 00 00 00 01 00 00 00 00 00 00 00 00 00 00 00
        0c 00 1a 00 08 00 02 00 06 00 64 00";

    /// `ip link set lo type bridge vlan_filtering 1`.
    const IP_LINK_VLAN_FILTERING: &str = "
        00 00 00 00 01 00 00 00 00 00 00 00 00 00 00 00
        1c 00 12 00 0a 00 01 00 62 72 69 64 67 65 00 00
        0c 00 02 00 05 00 07 00 01 00 00 00";

    #[test]
    fn a_vlan_link_is_made_as_ip_link_add_makes_it() {
        let name = vlan_link_name("lo", 100).unwrap();
        assert_eq!(vlan_link_message(1, &name, 100), parsed(IP_LINK_ADD_VLAN));
    }

    #[test]
    fn a_port_joins_its_vlan_untagged_as_bridge_vlan_add_does() {
        assert_eq!(body(&port_vlan_message(1, 100)), hex(BRIDGE_VLAN_ADD));
    }

    #[test]
    fn vlan_filtering_is_turned_on_as_ip_link_set_does() {
        assert_eq!(
            vlan_filtering_message(1, true),
            parsed(IP_LINK_VLAN_FILTERING)
        );
    }

    #[test]
    fn vlan_link_names_fit_an_interface_name() {
        assert_eq!(vlan_link_name("eth1", 100).as_deref(), Some("eth1.100"));
        assert_eq!(
            vlan_link_name("enp129s0f1", 4094).as_deref(),
            Some("enp129s0f1.4094")
        );
        assert_eq!(vlan_link_name("enp129s0f1np0", 4094), None, "18 bytes");
        assert_eq!(vlan_link_name("eth1", 0), None);
        assert_eq!(vlan_link_name("eth1", 4095), None);
        assert_eq!(vlan_link_name("eth 1", 10), None);
    }
}
