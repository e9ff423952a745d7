//! Links, addresses and bridge ports through rtnetlink (the `rtnetlink` crate), in the host's
//! namespace or in the configured one: no `ip` process, no output to parse.
//!
//! A connection is opened lazily and kept. For a named namespace its socket is created on a
//! short-lived thread of its own that first joins the namespace (`setns`): a netlink socket
//! stays bound to the namespace it was created in, and the joining thread never returns to a
//! pool, so no other task runs in the wrong namespace.
//!
//! Creating a tap is not here: the kernel refuses tun/tap creation over rtnetlink (the tun
//! driver's `validate` returns `EOPNOTSUPP`), and the remaining way, an ioctl on
//! `/dev/net/tun`, needs `unsafe`, which this workspace forbids. [`Host`](crate::host::Host)
//! runs `ip tuntap add` for that one step.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::{
    Handle, LinkUnspec,
    packet_route::{
        AddressFamily,
        address::AddressAttribute,
        link::{
            InfoKind, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo, LinkMessage, LinkVfInfo,
            VfInfo, VfInfoMac, VfInfoSpoofCheck, VfInfoTrust, VfInfoVlan,
        },
    },
};
use tokio::sync::OnceCell;

use crate::{config::Ipv4Net, sriov::VfSettings};

/// `ENODEV`, as netlink reports it (negative).
const ENODEV: i32 = -19;
/// `ENOENT`, as netlink reports it (negative).
const ENOENT: i32 = -2;
/// `EOPNOTSUPP`, as netlink reports it (negative): what a kernel without a feature answers.
pub const EOPNOTSUPP: i32 = -95;

/// What a netlink operation was doing when it failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket in {namespace}")]
    Open {
        namespace: String,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink: cannot {op} {name}")]
    Request {
        op: &'static str,
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("netlink: no link {name} to {op}")]
    NoLink { op: &'static str, name: String },
}

/// One link, as the service needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` (`tun`, `bridge`, `veth`, ...); empty for a plain device.
    pub kind: String,
    /// The bridge (or other controller) it is a port of.
    pub controller: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Self {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            kind: String::new(),
            controller: None,
            up: m.header.flags.contains(LinkFlags::Up),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            link.kind = kind_name(k);
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Tun => "tun".into(),
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Dummy => "dummy".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A lazily opened rtnetlink connection in one namespace (`None`: the process's own).
#[derive(Debug, Default)]
pub struct Netlink {
    netns: Option<String>,
    handle: OnceCell<Handle>,
}

impl Netlink {
    pub fn new(netns: Option<String>) -> Self {
        Self {
            netns,
            handle: OnceCell::new(),
        }
    }

    fn namespace(&self) -> String {
        self.netns.as_deref().map_or_else(
            || "the host's network namespace".to_owned(),
            |ns| format!("network namespace {ns}"),
        )
    }

    async fn handle(&self) -> Result<&Handle, NetlinkError> {
        self.handle
            .get_or_try_init(|| async {
                let open_err = |source| NetlinkError::Open {
                    namespace: self.namespace(),
                    source,
                };
                let (conn, handle) = match &self.netns {
                    None => {
                        let (conn, handle, _) = rtnetlink::new_connection().map_err(open_err)?;
                        (conn, handle)
                    }
                    Some(ns) => open_in_netns(ns).await.map_err(open_err)?,
                };
                tokio::spawn(conn);
                Ok(handle)
            })
            .await
    }

    /// The link named `name`; `None` when there is none.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let handle = self.handle().await?;
        let mut links = handle.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(Some(m)) => Ok(Some(Link::from_message(&m))),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == ENODEV => Ok(None),
            Err(source) => Err(NetlinkError::Request {
                op: "read link",
                name: name.to_owned(),
                source,
            }),
        }
    }

    /// Every link in the namespace.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let handle = self.handle().await?;
        let request_err = |source| NetlinkError::Request {
            op: "list",
            name: "links".into(),
            source,
        };
        let mut out = Vec::new();
        let mut links = handle.link().get().execute();
        while let Some(m) = links.try_next().await.map_err(request_err)? {
            out.push(Link::from_message(&m));
        }
        Ok(out)
    }

    /// The IPv4 addresses of link `index`, with their prefixes, in the kernel's order.
    pub async fn ipv4_addresses(&self, link: &Link) -> Result<Vec<Ipv4Net>, NetlinkError> {
        let handle = self.handle().await?;
        let request_err = |source| NetlinkError::Request {
            op: "read the addresses of",
            name: link.name.clone(),
            source,
        };
        let mut out = Vec::new();
        let mut addrs = handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute();
        while let Some(m) = addrs.try_next().await.map_err(request_err)? {
            if m.header.family != AddressFamily::Inet {
                continue;
            }
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on a
            // point-to-point link); on other links both are the same.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let address = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if let Some(net) = local
                .or(address)
                .and_then(|ip: Ipv4Addr| Ipv4Net::new(ip, m.header.prefix_len))
            {
                out.push(net);
            }
        }
        Ok(out)
    }

    /// Makes `port` a port of `bridge` and sets it up.
    pub async fn attach_to_bridge(&self, port: &str, bridge: &str) -> Result<(), NetlinkError> {
        let no_link = |name: &str| NetlinkError::NoLink {
            op: "attach to a bridge",
            name: name.to_owned(),
        };
        let p = self.link(port).await?.ok_or_else(|| no_link(port))?;
        let b = self.link(bridge).await?.ok_or_else(|| no_link(bridge))?;
        let handle = self.handle().await?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(p.index)
                    .controller(b.index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                op: "attach to its bridge and set up",
                name: port.to_owned(),
                source,
            })
    }

    /// Sets VF `index` of the physical function `pf` (`IFLA_VFINFO_LIST` on the PF: MAC,
    /// VLAN, spoof checking, trust; what `ip link set <pf> vf <index> mac … vlan … spoofchk on
    /// trust off` sends).
    pub async fn set_vf(&self, pf: &str, index: u32, s: &VfSettings) -> Result<(), NetlinkError> {
        let link = self.link(pf).await?.ok_or_else(|| NetlinkError::NoLink {
            op: "set a VF of",
            name: pf.to_owned(),
        })?;
        let handle = self.handle().await?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(link.index)
                    .append_extra_attribute(vf_attribute(index, s))
                    .build(),
            )
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                op: "set a VF of",
                name: pf.to_owned(),
                source,
            })
    }

    /// The settings of every VF of `pf`, by index (`RTEXT_FILTER_VF`).
    pub async fn vfs(&self, pf: &str) -> Result<Vec<(u32, VfSettings)>, NetlinkError> {
        let handle = self.handle().await?;
        let request_err = |source| NetlinkError::Request {
            op: "read the VFs of",
            name: pf.to_owned(),
            source,
        };
        let mut links = handle
            .link()
            .get()
            .match_name(pf.to_owned())
            .set_filter_mask(AddressFamily::Unspec, vec![LinkExtentMask::Vf])
            .execute();
        let Some(m) = links.try_next().await.map_err(request_err)? else {
            return Err(NetlinkError::NoLink {
                op: "read the VFs of",
                name: pf.to_owned(),
            });
        };
        Ok(vf_settings(&m))
    }

    /// Creates the VLAN link `<trunk>.<vid>` on `trunk` (`ip link add link <trunk> name
    /// <trunk>.<vid> type vlan id <vid>`) and sets it up; returns its name. An existing link of
    /// that name is left as it is.
    pub async fn add_vlan_link(&self, trunk: &str, vid: u16) -> Result<String, NetlinkError> {
        let name = crate::vlan::vlan_link_name(trunk, vid).ok_or_else(|| NetlinkError::NoLink {
            op: "make a VLAN link on",
            name: format!("{trunk} (VLAN {vid})"),
        })?;
        if self.link(&name).await?.is_some() {
            return Ok(name);
        }
        let t = self
            .link(trunk)
            .await?
            .ok_or_else(|| NetlinkError::NoLink {
                op: "make a VLAN link on",
                name: trunk.to_owned(),
            })?;
        let handle = self.handle().await?;
        handle
            .link()
            .add(crate::vlan::vlan_link_message(t.index, &name, vid))
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                op: "make the VLAN link",
                name: name.clone(),
                source,
            })?;
        handle
            .link()
            .set(LinkUnspec::new_with_name(&name).up().build())
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                op: "set up",
                name: name.clone(),
                source,
            })?;
        Ok(name)
    }

    /// Turns VLAN filtering of `bridge` on or off.
    pub async fn set_vlan_filtering(&self, bridge: &str, on: bool) -> Result<(), NetlinkError> {
        let b = self
            .link(bridge)
            .await?
            .ok_or_else(|| NetlinkError::NoLink {
                op: "set VLAN filtering on",
                name: bridge.to_owned(),
            })?;
        let handle = self.handle().await?;
        handle
            .link()
            .change(crate::vlan::vlan_filtering_message(b.index, on))
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                op: "set VLAN filtering on",
                name: bridge.to_owned(),
                source,
            })
    }

    /// Makes bridge port `port` an untagged member of VLAN `vid` with `vid` as its PVID.
    pub async fn set_port_vlan(&self, port: &str, vid: u16) -> Result<(), NetlinkError> {
        let p = self.link(port).await?.ok_or_else(|| NetlinkError::NoLink {
            op: "set the VLAN of",
            name: port.to_owned(),
        })?;
        let handle = self.handle().await?;
        handle
            .link()
            // RTM_SETLINK with family AF_BRIDGE reaches the bridge's VLAN table (as `bridge
            // vlan add` sends it); RTM_NEWLINK would not.
            .set(crate::vlan::port_vlan_message(p.index, vid))
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                op: "set the VLAN of",
                name: port.to_owned(),
                source,
            })
    }

    /// Creates bridge `name` if there is no link of that name, and sets it up.
    pub async fn add_bridge(&self, name: &str) -> Result<(), NetlinkError> {
        let handle = self.handle().await?;
        if self.link(name).await?.is_none() {
            handle
                .link()
                .add(crate::vlan::bridge_message(name))
                .execute()
                .await
                .map_err(|source| NetlinkError::Request {
                    op: "make the bridge",
                    name: name.to_owned(),
                    source,
                })?;
        }
        self.set_up(name).await
    }

    /// Sets `name` up.
    pub async fn set_up(&self, name: &str) -> Result<(), NetlinkError> {
        let handle = self.handle().await?;
        handle
            .link()
            .set(LinkUnspec::new_with_name(name).up().build())
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                op: "set up",
                name: name.to_owned(),
                source,
            })
    }

    /// Gives `name` the address `net` unless it has it already.
    pub async fn add_ipv4(&self, name: &str, net: Ipv4Net) -> Result<(), NetlinkError> {
        let link = self.link(name).await?.ok_or_else(|| NetlinkError::NoLink {
            op: "add an address to",
            name: name.to_owned(),
        })?;
        if self.ipv4_addresses(&link).await?.contains(&net) {
            return Ok(());
        }
        let handle = self.handle().await?;
        handle
            .address()
            .add(link.index, IpAddr::V4(net.addr), net.prefix)
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                op: "add its address to",
                name: name.to_owned(),
                source,
            })
    }

    /// Makes bridge port `port` a tagged member of VLAN `vid` (`bridge vlan add dev <port> vid
    /// <vid>`); with `bridge_itself`, `port` is the bridge and the member is the host's own
    /// interface on it (`… self`).
    pub async fn add_tagged_vlan(
        &self,
        port: &str,
        vid: u16,
        bridge_itself: bool,
    ) -> Result<(), NetlinkError> {
        let p = self.link(port).await?.ok_or_else(|| NetlinkError::NoLink {
            op: "add a VLAN to",
            name: port.to_owned(),
        })?;
        let handle = self.handle().await?;
        handle
            .link()
            .set(crate::vlan::tagged_member_message(
                p.index,
                vid,
                bridge_itself,
            ))
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                op: "add a tagged VLAN to",
                name: port.to_owned(),
                source,
            })
    }

    /// Takes `port` (or, with `bridge_itself`, the bridge `port` itself) out of VLAN `vid`
    /// (`bridge vlan del dev <port> vid <vid>`); not a member already, or a kernel without
    /// VLAN filtering, is success.
    pub async fn del_vlan(
        &self,
        port: &str,
        vid: u16,
        bridge_itself: bool,
    ) -> Result<(), NetlinkError> {
        let Some(p) = self.link(port).await? else {
            return Ok(());
        };
        let handle = self.handle().await?;
        let mut req = handle.link().del(p.index);
        *req.message_mut() = crate::vlan::port_vlan_del_message(p.index, vid, bridge_itself);
        match req.execute().await {
            Ok(()) => Ok(()),
            // Not a member, or a bridge that has no VLANs at all: nothing to take off.
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == ENOENT || e.raw_code() == EOPNOTSUPP =>
            {
                Ok(())
            }
            Err(source) => Err(NetlinkError::Request {
                op: "take a VLAN off",
                name: port.to_owned(),
                source,
            }),
        }
    }

    /// The VLAN filtering settings of bridge `bridge` as the kernel reports them: whether it
    /// filters, and its default PVID (the VLAN a new port joins untagged); `None` for what it
    /// does not report.
    pub async fn bridge_vlan_settings(
        &self,
        bridge: &str,
    ) -> Result<(Option<bool>, Option<u16>), NetlinkError> {
        let handle = self.handle().await?;
        let mut links = handle.link().get().match_name(bridge.to_owned()).execute();
        let no_link = || NetlinkError::NoLink {
            op: "read the VLAN settings of",
            name: bridge.to_owned(),
        };
        let m = match links.try_next().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(no_link()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == ENODEV => {
                return Err(no_link());
            }
            Err(source) => {
                return Err(NetlinkError::Request {
                    op: "read the VLAN settings of",
                    name: bridge.to_owned(),
                    source,
                });
            }
        };
        Ok(crate::vlan::bridge_vlan_settings(&m))
    }

    /// Deletes `link`.
    pub async fn delete(&self, link: &Link) -> Result<(), NetlinkError> {
        let handle = self.handle().await?;
        match handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            // Gone meanwhile: what the caller wanted.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == ENODEV => Ok(()),
            Err(source) => Err(NetlinkError::Request {
                op: "delete",
                name: link.name.clone(),
                source,
            }),
        }
    }
}

type Opened = (
    rtnetlink::proto::Connection<rtnetlink::packet_route::RouteNetlinkMessage>,
    Handle,
);

/// Opens a connection whose socket lives in namespace `ns` (`/run/netns/<ns>`, as `ip netns`
/// names them): on a thread of its own that joins the namespace first and then ends.
async fn open_in_netns(ns: &str) -> std::io::Result<Opened> {
    let path = std::path::Path::new(rtnetlink::NETNS_PATH).join(ns);
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("wnodes-netns".into())
        .spawn(move || {
            let opened = (|| {
                let file = std::fs::File::open(&path)?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                // The socket registers with the runtime's reactor as it is made.
                let _enter = runtime.enter();
                let (conn, handle, _) = rtnetlink::new_connection()?;
                Ok((conn, handle))
            })();
            let _ = tx.send(opened);
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("the namespace thread ended without an answer"))?
}

/// The `IFLA_VFINFO_LIST` attribute that sets VF `index` to `s`.
pub fn vf_attribute(index: u32, s: &VfSettings) -> LinkAttribute {
    LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![
        VfInfo::Mac(VfInfoMac::new(index, &s.mac)),
        VfInfo::Vlan(VfInfoVlan::new(index, u32::from(s.vlan), 0)),
        VfInfo::SpoofCheck(VfInfoSpoofCheck::new(index, s.spoof_check)),
        VfInfo::Trust(VfInfoTrust::new(index, s.trust)),
    ])])
}

/// The VFs' settings in a PF's link message (what the kernel reports with `RTEXT_FILTER_VF`).
pub fn vf_settings(m: &LinkMessage) -> Vec<(u32, VfSettings)> {
    let mut out = Vec::new();
    for a in &m.attributes {
        let LinkAttribute::VfInfoList(list) = a else {
            continue;
        };
        for LinkVfInfo(infos) in list {
            let mut index = None;
            let mut s = VfSettings::RESET;
            for i in infos {
                match i {
                    VfInfo::Mac(m) => {
                        index = Some(m.vf_id);
                        s.mac.copy_from_slice(&m.mac[..6]);
                    }
                    VfInfo::Vlan(v) => s.vlan = u16::try_from(v.vlan_id).unwrap_or(u16::MAX),
                    VfInfo::SpoofCheck(c) => s.spoof_check = c.enabled,
                    VfInfo::Trust(t) => s.trust = t.enabled,
                    _ => {}
                }
            }
            if let Some(i) = index {
                out.push((i, s));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rtnetlink::packet_core::Emitable;
    use rtnetlink::packet_route::link::LinkHeader;

    use super::*;

    /// The `IFLA_VFINFO_LIST` that iproute2 6.1.0 sends for `ip link set lo vf 1 mac
    /// 52:54:00:12:34:56 vlan 100 spoofchk on trust off` (captured with `strace -e
    /// trace=sendmsg -e write=3`; bytes 0x20.. of its RTM_NEWLINK).
    const IPROUTE2_VF1: &str = "
        58 00 16 00 54 00 01 00 28 00 01 00 01 00 00 00
        52 54 00 12 34 56 00 00 00 00 00 00 00 00 00 00
        00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
        10 00 02 00 01 00 00 00 64 00 00 00 00 00 00 00
        0c 00 04 00 01 00 00 00 01 00 00 00 0c 00 09 00
        01 00 00 00 00 00 00 00";

    use crate::test_bytes::hex;

    #[test]
    fn a_vf_is_set_with_the_bytes_iproute2_sends() {
        let s = VfSettings {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            vlan: 100,
            spoof_check: true,
            trust: false,
        };
        let attr = vf_attribute(1, &s);
        let mut buf = vec![0u8; attr.buffer_len()];
        attr.emit(&mut buf);
        assert_eq!(buf, hex(IPROUTE2_VF1));
    }

    #[test]
    fn vf_settings_are_read_back_from_a_link_message() {
        let set = VfSettings {
            mac: [0x52, 0x54, 0, 0xaa, 0xbb, 0x01],
            vlan: 300,
            spoof_check: false,
            trust: true,
        };
        let mut m = LinkMessage::default();
        m.header = LinkHeader::default();
        m.attributes = vec![vf_attribute(0, &VfSettings::RESET), vf_attribute(3, &set)];
        assert_eq!(vf_settings(&m), [(0, VfSettings::RESET), (3, set)]);
    }
}
