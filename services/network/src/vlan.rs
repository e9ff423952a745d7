//! VLANs per VO or queue (`docs/sriov-and-vlans.md`): the `[network.vlan]` policy (which VLAN a
//! VM is on, shared by taps and SR-IOV VFs; how tap VMs join theirs; each VLAN's network) and
//! the 802.1Q requests for tap VMs as rtnetlink messages:
//!
//! - **bridge VLAN filtering** (where the kernel has it): the bridge filters
//!   ([`vlan_filtering_message`]) and a VM's tap is an untagged member of its VLAN, which is
//!   also the port's PVID ([`port_vlan_message`]; `bridge vlan add dev <tap> vid <v> pvid
//!   untagged`), and leaves the bridge's default VLAN ([`port_vlan_del_message`]); the trunk
//!   and the bridge itself are tagged members ([`tagged_member_message`]);
//! - **a bridge per VLAN** (where it does not, as on the project's hosts): VLAN `<v>`'s bridge
//!   `<prefix><v>` ([`bridge_message`]) has the VLAN link `<trunk>.<v>` as its uplink
//!   ([`vlan_link_message`]; `ip link add link <trunk> name <trunk>.<v> type vlan id <v>`), so
//!   frames leave the trunk tagged.
//!
//! Each message is what iproute2 6.1.0 sends for the same command (the tests: byte for byte,
//! or parsed where iproute2 leaves the NUL off a link kind's name). The handler's use of them
//! is in [`crate::tap_vlan`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::Ipv4Net;

use rtnetlink::packet_route::{
    AddressFamily,
    link::{
        AfSpecBridge, BridgeFlag, BridgeVlanInfo, BridgeVlanInfoFlags, InfoBridge, InfoData,
        InfoKind, InfoVlan, LinkAttribute, LinkInfo, LinkMessage,
    },
};

/// The highest 802.1Q VLAN id.
pub const MAX_VLAN: u16 = 4094;

/// How tap VMs join their VLAN (`[network.vlan] method`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodSetting {
    /// `filtering` where the kernel lets the bridge filter VLANs, else `bridges` (found out on
    /// the first VLAN VM: turning filtering on is tried once).
    #[default]
    Auto,
    /// One bridge (`[network] bridge`) with VLAN filtering: the tap an untagged member of its
    /// VLAN.
    Filtering,
    /// A bridge per VLAN (`<bridge_prefix><vid>`) whose uplink is `<trunk>.<vid>`.
    Bridges,
}

/// The method in use, after `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Filtering,
    Bridges,
}

impl Method {
    /// Its name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Filtering => "filtering",
            Self::Bridges => "bridges",
        }
    }
}

/// One VLAN's network, for the tap VMs on it (`[network.vlan.networks.<vid>]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VlanNetworkConfig {
    /// This host's address on the VLAN, with its prefix (`10.231.100.1/24`): the VMs' gateway,
    /// where the storage gateway listens for them. Several hosts on one trunk each have their
    /// own.
    pub address: String,
    /// The addresses this host hands to the VLAN's VMs, inside `address`'s prefix (several
    /// hosts on one trunk: a slice each). Unset: `address`'s whole prefix.
    #[serde(default)]
    pub pool: Option<String>,
}

/// A VLAN's network, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanNetwork {
    /// This host's address on the VLAN (the VMs' gateway).
    pub address: Ipv4Net,
    pub pool: Ipv4Net,
}

/// `[network.vlan]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VlanConfig {
    /// The VLAN of a VO's VMs (`{ atlas = 100 }`); others get `default_vlan`.
    pub vo_vlans: BTreeMap<String, u16>,
    /// The VLAN of a queue's VMs (over the VO's).
    pub queue_vlans: BTreeMap<String, u16>,
    /// 0: untagged (tap VMs on `[network] bridge` as without VLANs).
    pub default_vlan: u16,
    /// How tap VMs join their VLAN.
    pub method: MethodSetting,
    /// The uplink that carries the VLANs tagged to the rest of the site (`bond0`). Unset: each
    /// VLAN stays on this host.
    pub trunk: Option<String>,
    /// The per-VLAN bridges' names: `<bridge_prefix><vid>` (method `bridges`).
    pub bridge_prefix: String,
    /// Each VLAN's network (keys: VLAN ids), required for every VLAN a tap VM can be on.
    pub networks: BTreeMap<String, VlanNetworkConfig>,
}

impl Default for VlanConfig {
    fn default() -> Self {
        Self {
            vo_vlans: BTreeMap::new(),
            queue_vlans: BTreeMap::new(),
            default_vlan: 0,
            method: MethodSetting::Auto,
            trunk: None,
            bridge_prefix: "wnvl".into(),
            networks: BTreeMap::new(),
        }
    }
}

impl VlanConfig {
    /// The VLAN of a VM of `vo` in `queue`: the queue's, else the VO's, else the default.
    pub fn vlan_for(&self, vo: &str, queue: &str) -> u16 {
        self.queue_vlans
            .get(queue)
            .or_else(|| self.vo_vlans.get(vo))
            .copied()
            .unwrap_or(self.default_vlan)
    }

    /// Every VLAN a VM can be put on (0 left out).
    pub fn vlans(&self) -> impl Iterator<Item = u16> + '_ {
        self.vo_vlans
            .values()
            .chain(self.queue_vlans.values())
            .copied()
            .chain(std::iter::once(self.default_vlan))
            .filter(|v| *v != 0)
    }

    /// The checked networks, by VLAN id.
    ///
    /// # Errors
    /// The first offending key, named.
    pub fn networks(&self) -> Result<BTreeMap<u16, VlanNetwork>, String> {
        let mut out = BTreeMap::new();
        for (key, n) in &self.networks {
            let vid = key
                .parse::<u16>()
                .ok()
                .filter(|v| (1..=MAX_VLAN).contains(v))
                .ok_or_else(|| format!("networks.{key}: not a VLAN id (1-{MAX_VLAN})"))?;
            let address: Ipv4Net = n
                .address
                .parse()
                .map_err(|e| format!("networks.{key}.address: {e}"))?;
            let pool = match &n.pool {
                Some(p) => p
                    .parse::<Ipv4Net>()
                    .map_err(|e| format!("networks.{key}.pool: {e}"))?,
                None => address,
            };
            if !address.covers(pool) {
                return Err(format!(
                    "networks.{key}.pool: {pool} is not inside {address}"
                ));
            }
            if address.prefix >= 31 {
                return Err(format!(
                    "networks.{key}.address: {address} leaves no address for a VM"
                ));
            }
            out.insert(vid, VlanNetwork { address, pool });
        }
        Ok(out)
    }

    /// Every VLAN id in range, every name valid, and with `taps`, a network for every VLAN a
    /// tap VM can be on, and no name too long for an interface.
    ///
    /// # Errors
    /// The first offending key, named.
    pub fn check(&self, bridge: &str, taps: bool) -> Result<(), String> {
        if self.default_vlan > MAX_VLAN {
            return Err(format!(
                "default_vlan: {} is not a VLAN id (0-{MAX_VLAN})",
                self.default_vlan
            ));
        }
        for (what, map) in [
            ("vo_vlans", &self.vo_vlans),
            ("queue_vlans", &self.queue_vlans),
        ] {
            if let Some((k, v)) = map.iter().find(|(_, v)| **v == 0 || **v > MAX_VLAN) {
                return Err(format!("{what}.{k}: {v} is not a VLAN id (1-{MAX_VLAN})"));
            }
        }
        if self.bridge_prefix.is_empty()
            || self.bridge_prefix.ends_with(|c: char| c.is_ascii_digit())
            || !crate::host::valid_ifname(&self.bridge_prefix)
        {
            return Err(format!(
                "bridge_prefix: {:?} is not an interface name's start without a trailing digit",
                self.bridge_prefix
            ));
        }
        if let Some(t) = &self.trunk
            && !crate::host::valid_ifname(t)
        {
            return Err(format!("trunk: {t:?} is not an interface name"));
        }
        let networks = self.networks()?;
        if !taps {
            return Ok(());
        }
        for vid in self.vlans() {
            if !networks.contains_key(&vid) {
                return Err(format!(
                    "networks.{vid}: VLAN {vid} has no network (tap VMs of its VO or queue need \
                     one: [network.vlan.networks.{vid}] address = \"10.231.{}.1/24\")",
                    vid % 256
                ));
            }
            let names = [
                ("bridge_prefix", bridge_name(&self.bridge_prefix, vid)),
                ("[network] bridge", vlan_link_name(bridge, vid)),
                (
                    "trunk",
                    self.trunk
                        .as_deref()
                        .map_or(Some(String::new()), |t| vlan_link_name(t, vid)),
                ),
            ];
            if let Some((key, _)) = names.iter().find(|(_, n)| n.is_none()) {
                return Err(format!(
                    "{key}: too long for VLAN {vid}'s interface name (15 bytes at most)"
                ));
            }
        }
        Ok(())
    }
}

/// The bridge of VLAN `vid` (method `bridges`): `<prefix><vid>`, when that is an interface
/// name.
pub fn bridge_name(prefix: &str, vid: u16) -> Option<String> {
    let name = format!("{prefix}{vid}");
    ((1..=MAX_VLAN).contains(&vid) && crate::host::valid_ifname(&name)).then_some(name)
}

/// The VLAN id of a per-VLAN bridge's name `<prefix><vid>`.
pub fn vid_of_bridge(prefix: &str, name: &str) -> Option<u16> {
    name.strip_prefix(prefix)
        .filter(|d| !d.starts_with('0') && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse().ok())
        .filter(|v| (1..=MAX_VLAN).contains(v))
}

/// The VLAN id of a VLAN link's name `<trunk>.<vid>`.
pub fn vid_of_link(trunk: &str, name: &str) -> Option<u16> {
    name.strip_prefix(trunk)
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|d| vid_of_bridge("", d))
}

/// The VLAN link of `trunk` for VLAN `vid`: `<trunk>.<vid>`, when that fits an interface
/// name (15 bytes).
pub fn vlan_link_name(trunk: &str, vid: u16) -> Option<String> {
    let name = format!("{trunk}.{vid}");
    (crate::host::valid_ifname(trunk) && (1..=MAX_VLAN).contains(&vid))
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

/// `RTM_NEWLINK` body creating bridge `name` (`ip link add <name> type bridge`).
pub fn bridge_message(name: &str) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes = vec![
        LinkAttribute::IfName(name.to_owned()),
        LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]),
    ];
    m
}

/// `RTM_SETLINK` (family `AF_BRIDGE`) body making the port with index `port_index` a tagged
/// member of VLAN `vid` (`bridge vlan add dev <port> vid <vid>`), or, with `bridge_itself`,
/// the bridge with that index (`… self`: the host's own interface on the VLAN).
pub fn tagged_member_message(index: u32, vid: u16, bridge_itself: bool) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.interface_family = AddressFamily::Bridge;
    m.header.index = index;
    let mut spec = Vec::new();
    if bridge_itself {
        spec.push(AfSpecBridge::Flags(BridgeFlag::LowerDev));
    }
    spec.push(AfSpecBridge::VlanInfo(BridgeVlanInfo {
        flags: BridgeVlanInfoFlags::empty(),
        vid,
    }));
    m.attributes = vec![LinkAttribute::AfSpecBridge(spec)];
    m
}

/// `RTM_DELLINK` (family `AF_BRIDGE`) body taking the port with index `port_index` out of VLAN
/// `vid` (`bridge vlan del dev <port> vid <vid>`), or the bridge itself out of it.
pub fn port_vlan_del_message(index: u32, vid: u16, bridge_itself: bool) -> LinkMessage {
    tagged_member_message(index, vid, bridge_itself)
}

/// Whether the bridge of link message `m` filters VLANs, and its default PVID, where the
/// kernel says.
pub fn bridge_vlan_settings(m: &LinkMessage) -> (Option<bool>, Option<u16>) {
    let (mut filtering, mut pvid) = (None, None);
    for a in &m.attributes {
        if let LinkAttribute::LinkInfo(infos) = a {
            for i in infos {
                if let LinkInfo::Data(InfoData::Bridge(opts)) = i {
                    for o in opts {
                        match o {
                            InfoBridge::VlanFiltering(on) => filtering = Some(*on),
                            InfoBridge::VlanDefaultPvid(v) => pvid = Some(*v),
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    (filtering, pvid)
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

    use crate::test_bytes::hex;

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

    /// `ip link add wnvl100 type bridge`.
    const IP_LINK_ADD_BRIDGE: &str = "
        00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
        0c 00 03 00 77 6e 76 6c 31 30 30 00 10 00 12 00
        0a 00 01 00 62 72 69 64 67 65 00 00";

    /// `bridge vlan add dev tb0 vid 100` (tb0 is index 8), and `bridge vlan del` of VLAN 1
    /// (`RTM_DELLINK`, the same body).
    const BRIDGE_VLAN_ADD_TAGGED: &str = "
        07 00 00 00 08 00 00 00 00 00 00 00 00 00 00 00
        0c 00 1a 00 08 00 02 00 00 00 64 00";
    const BRIDGE_VLAN_DEL_1: &str = "
        07 00 00 00 08 00 00 00 00 00 00 00 00 00 00 00
        0c 00 1a 00 08 00 02 00 00 00 01 00";

    /// `bridge vlan add dev tb0 vid 100 self`.
    const BRIDGE_VLAN_ADD_SELF: &str = "
        07 00 00 00 08 00 00 00 00 00 00 00 00 00 00 00
        14 00 1a 00 06 00 00 00 02 00 00 00 08 00 02 00
        00 00 64 00";

    #[test]
    fn a_bridge_is_made_as_ip_link_add_makes_it() {
        assert_eq!(bridge_message("wnvl100"), parsed(IP_LINK_ADD_BRIDGE));
    }

    #[test]
    fn tagged_members_are_added_and_removed_as_bridge_vlan_does() {
        assert_eq!(
            body(&tagged_member_message(8, 100, false)),
            hex(BRIDGE_VLAN_ADD_TAGGED)
        );
        assert_eq!(
            body(&tagged_member_message(8, 100, true)),
            hex(BRIDGE_VLAN_ADD_SELF)
        );
        assert_eq!(
            body(&port_vlan_del_message(8, 1, false)),
            hex(BRIDGE_VLAN_DEL_1)
        );
    }

    #[test]
    fn the_bridges_vlan_settings_are_read_from_its_link_message() {
        let mut m = LinkMessage::default();
        m.attributes = vec![LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            LinkInfo::Data(InfoData::Bridge(vec![
                InfoBridge::VlanFiltering(true),
                InfoBridge::VlanDefaultPvid(7),
            ])),
        ])];
        assert_eq!(bridge_vlan_settings(&m), (Some(true), Some(7)));
        assert_eq!(bridge_vlan_settings(&LinkMessage::default()), (None, None));
    }

    fn config() -> VlanConfig {
        VlanConfig {
            vo_vlans: [("atlas".to_owned(), 100)].into(),
            queue_vlans: [("hpc".to_owned(), 300)].into(),
            trunk: Some("eth1".into()),
            networks: [
                ("100", "10.231.100.1/24", Some("10.231.100.16/28")),
                ("300", "10.231.44.1/24", None),
            ]
            .into_iter()
            .map(|(k, a, p)| {
                (
                    k.to_owned(),
                    VlanNetworkConfig {
                        address: a.into(),
                        pool: p.map(str::to_owned),
                    },
                )
            })
            .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn vlans_come_from_the_queue_then_the_vo_then_the_default() {
        let mut cfg = config();
        assert_eq!(cfg.vlan_for("atlas", "grid"), 100);
        assert_eq!(cfg.vlan_for("atlas", "hpc"), 300);
        assert_eq!(cfg.vlan_for("cms", "grid"), 0);
        cfg.default_vlan = 10;
        assert_eq!(cfg.vlan_for("cms", "grid"), 10);
        let mut vlans: Vec<u16> = cfg.vlans().collect();
        vlans.sort_unstable();
        assert_eq!(vlans, [10, 100, 300]);
    }

    #[test]
    fn the_configuration_is_checked_and_each_error_names_its_key() {
        let cfg = config();
        cfg.check("wnbr0", true).unwrap();
        let nets = cfg.networks().unwrap();
        assert_eq!(nets[&100].pool.to_string(), "10.231.100.16/28");
        assert_eq!(nets[&300].pool.to_string(), "10.231.44.1/24");
        let err = |f: &dyn Fn(&mut VlanConfig), taps: bool| {
            let mut c = config();
            f(&mut c);
            c.check("wnbr0", taps).unwrap_err()
        };
        let e = err(&|c| c.default_vlan = 9, true);
        assert!(e.starts_with("networks.9: VLAN 9 has no network"), "{e}");
        // Without taps (SR-IOV only) a VLAN needs no network here.
        let mut sriov_only = config();
        sriov_only.default_vlan = 9;
        sriov_only.check("wnbr0", false).unwrap();
        let e = err(
            &|c| {
                c.vo_vlans.insert("cms".into(), 4095);
            },
            true,
        );
        assert!(e.contains("vo_vlans.cms: 4095 is not a VLAN id"), "{e}");
        let e = err(
            &|c| {
                c.queue_vlans.insert("q".into(), 0);
            },
            true,
        );
        assert!(e.contains("queue_vlans.q: 0"), "{e}");
        let e = err(&|c| c.trunk = Some("eth1; rm".into()), true);
        assert!(e.starts_with("trunk:"), "{e}");
        let e = err(&|c| c.trunk = Some("enp129s0f1np0".into()), true);
        assert!(e.starts_with("trunk: too long for VLAN 100"), "{e}");
        let e = err(&|c| c.bridge_prefix = "wnvl1".into(), true);
        assert!(e.starts_with("bridge_prefix:"), "{e}");
        let e = err(
            &|c| {
                c.networks.get_mut("100").unwrap().pool = Some("10.231.101.0/24".into());
            },
            false,
        );
        assert!(
            e.contains("networks.100.pool: 10.231.101.0/24 is not inside"),
            "{e}"
        );
        let e = err(
            &|c| {
                let n = c.networks.remove("100").unwrap();
                c.networks.insert("4095".into(), n);
            },
            false,
        );
        assert!(e.starts_with("networks.4095: not a VLAN id"), "{e}");
        let e = err(
            &|c| c.networks.get_mut("300").unwrap().address = "10.231.44.1".into(),
            false,
        );
        assert!(e.starts_with("networks.300.address:"), "{e}");
    }

    #[test]
    fn names_of_vlan_bridges_and_links_give_back_their_vlan() {
        assert_eq!(bridge_name("wnvl", 100).as_deref(), Some("wnvl100"));
        assert_eq!(bridge_name("wnvl", 0), None);
        assert_eq!(vid_of_bridge("wnvl", "wnvl100"), Some(100));
        for bad in ["wnvl", "wnvl0100", "wnvl4095", "wnvlx", "wnbr0", "wnvl-1"] {
            assert_eq!(vid_of_bridge("wnvl", bad), None, "{bad}");
        }
        assert_eq!(vid_of_link("eth1", "eth1.300"), Some(300));
        assert_eq!(vid_of_link("eth1", "eth10.300"), None);
        assert_eq!(vid_of_link("eth1", "eth1.0"), None);
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
