//! How a tap VM joins its VLAN on this host (`docs/sriov-and-vlans.md`): the method chosen
//! once (bridge VLAN filtering where the kernel has it, a bridge per VLAN where it does not),
//! each VLAN's **host side** made on its first VM and removed after its last, and the VM's
//! port put on the VLAN.
//!
//! | method | VLAN `v`'s host side | a VM's port |
//! |---|---|---|
//! | `filtering` | `[network] bridge` filters VLANs; the bridge itself and the trunk tagged members of `v`; the VLAN link `<bridge>.<v>` with the host's address on `v` | a port of `[network] bridge`, untagged member of `v` with `v` as its PVID, out of the bridge's default VLAN |
//! | `bridges` | the bridge `<prefix><v>` with the host's address on `v`; its uplink the VLAN link `<trunk>.<v>` | a port of `<prefix><v>` |
//!
//! A VLAN's host side is what the lease table accounts for as `vlan:<v>`: held while a
//! prepared tap lease is on `v` ([`crate::reconcile`]).

use std::{collections::BTreeMap, sync::Arc};

use tokio::sync::OnceCell;

use crate::{
    config::Ipv4Net,
    host::HostError,
    netlink::{EOPNOTSUPP, NetlinkError},
    service::{NetworkHandler, TapNetwork},
    vlan::{self, Method, MethodSetting, VlanConfig, VlanNetwork},
};

/// `[network.vlan]`, checked, with the method once it is known.
#[derive(Debug, Clone, Default)]
pub struct Vlans {
    pub config: VlanConfig,
    pub networks: BTreeMap<u16, VlanNetwork>,
    method: Arc<OnceCell<Method>>,
}

impl Vlans {
    /// The policy and networks of `config`.
    ///
    /// # Errors
    /// A network that does not parse (the key named).
    pub fn new(config: VlanConfig) -> Result<Self, String> {
        Ok(Self {
            networks: config.networks()?,
            config,
            method: Arc::default(),
        })
    }

    /// The method, once the first VLAN VM made it known (`None` before).
    pub fn method(&self) -> Option<Method> {
        self.method.get().copied()
    }
}

/// The key under which a VLAN's host side is held in the lease table.
pub fn held_key(vid: u16) -> String {
    format!("vlan:{vid}")
}

impl NetworkHandler {
    /// The method: the configured one, or for `auto` whether `[network] bridge` filters VLANs
    /// once asked to (the kernel's `EOPNOTSUPP`: a bridge per VLAN). Found out once.
    ///
    /// # Errors
    /// The bridge could not be asked.
    pub async fn vlan_method(&self) -> Result<Method, HostError> {
        let nl = self.host.netlink();
        self.vlans
            .method
            .get_or_try_init(|| async {
                let method = match self.vlans.config.method {
                    MethodSetting::Filtering => Method::Filtering,
                    MethodSetting::Bridges => Method::Bridges,
                    MethodSetting::Auto => match nl.set_vlan_filtering(&self.bridge, true).await {
                        Ok(()) => Method::Filtering,
                        Err(NetlinkError::Request {
                            source: rtnetlink::Error::NetlinkError(e),
                            ..
                        }) if e.raw_code() == EOPNOTSUPP => Method::Bridges,
                        Err(e) => return Err(HostError::from(e)),
                    },
                };
                tracing::info!(
                    method = method.as_str(),
                    bridge = %self.bridge,
                    "VLANs of tap VMs: {}.",
                    match method {
                        Method::Filtering => "VLAN filtering on the bridge",
                        Method::Bridges => "a bridge per VLAN",
                    }
                );
                Ok(method)
            })
            .await
            .copied()
    }

    /// Makes VLAN `vid`'s host side if it is missing (idempotent), with `address` (the
    /// VLAN's network's, [`NetworkHandler::tap_network`]) as the host's, and returns the
    /// bridge its VMs' ports join.
    ///
    /// # Errors
    /// A name too long, or the kernel refused a step.
    pub async fn vlan_side(&self, vid: u16, address: Ipv4Net) -> Result<String, HostError> {
        let nl = self.host.netlink();
        let trunk = self.vlans.config.trunk.as_deref();
        match self.vlan_method().await? {
            Method::Filtering => {
                let bridge = self.bridge.as_str();
                nl.set_vlan_filtering(bridge, true).await?;
                nl.add_tagged_vlan(bridge, vid, true).await?;
                let own = nl.add_vlan_link(bridge, vid).await?;
                nl.add_ipv4(&own, address).await?;
                if let Some(t) = trunk {
                    nl.attach_to_bridge(t, bridge).await?;
                    nl.add_tagged_vlan(t, vid, false).await?;
                }
                Ok(bridge.to_owned())
            }
            Method::Bridges => {
                let bridge = self.vlan_bridge_name(vid)?;
                nl.add_bridge(&bridge).await?;
                nl.add_ipv4(&bridge, address).await?;
                if let Some(t) = trunk {
                    let uplink = nl.add_vlan_link(t, vid).await?;
                    nl.attach_to_bridge(&uplink, &bridge).await?;
                }
                Ok(bridge)
            }
        }
    }

    fn vlan_bridge_name(&self, vid: u16) -> Result<String, HostError> {
        vlan::bridge_name(&self.vlans.config.bridge_prefix, vid).ok_or_else(|| {
            HostError::InvalidName {
                kind: "VLAN bridge name",
                name: format!("{}{vid}", self.vlans.config.bridge_prefix),
            }
        })
    }

    /// Puts port `port` (already a port of `bridge`, the VLAN's from [`Self::vlan_side`]) on
    /// VLAN `vid`: with filtering an untagged member of `vid` with `vid` as its PVID and out of
    /// the bridge's default VLAN (so no frame of another VLAN reaches it); with a bridge per
    /// VLAN there is nothing more to do.
    ///
    /// # Errors
    /// The kernel refused.
    pub async fn vlan_port(&self, port: &str, vid: u16) -> Result<(), HostError> {
        if self.vlan_method().await? != Method::Filtering {
            return Ok(());
        }
        let nl = self.host.netlink();
        nl.set_port_vlan(port, vid).await?;
        let (_, default_pvid) = nl.bridge_vlan_settings(&self.bridge).await?;
        let default_pvid = default_pvid.unwrap_or(1);
        if default_pvid != 0 && default_pvid != vid {
            nl.del_vlan(port, default_pvid, false).await?;
        }
        Ok(())
    }

    /// Puts link `port` on the VLAN of `network` as the tap path puts a VM's tap on it (the
    /// VLAN's host side made if missing, the port attached to its bridge and set up, its VLAN
    /// set); returns the bridge. The tests join veth ports (network-namespace "VMs") with it.
    ///
    /// # Errors
    /// As [`Self::vlan_side`] and [`Self::vlan_port`].
    pub async fn join_vlan(&self, port: &str, network: TapNetwork) -> Result<String, HostError> {
        let vid = network.vlan;
        let bridge = self.vlan_side(vid, network.gateway).await?;
        self.host.netlink().attach_to_bridge(port, &bridge).await?;
        self.vlan_port(port, vid).await?;
        Ok(bridge)
    }

    /// Removes VLAN `vid`'s host side, whichever method made it (idempotent); what was
    /// removed.
    ///
    /// # Errors
    /// The kernel refused.
    pub async fn remove_vlan_side(&self, vid: u16) -> Result<Vec<String>, HostError> {
        let nl = self.host.netlink();
        let mut removed = Vec::new();
        if let Some(bridge) = vlan::bridge_name(&self.vlans.config.bridge_prefix, vid)
            && let Some(b) = nl.link(&bridge).await?
            && b.kind == "bridge"
        {
            // The uplink `<trunk>.<vid>` goes with the bridge it is a port of (a VLAN link of
            // the trunk that is not is the site's, and stays).
            if let Some(uplink) = self
                .vlans
                .config
                .trunk
                .as_deref()
                .and_then(|t| vlan::vlan_link_name(t, vid))
                && let Some(u) = nl.link(&uplink).await?
                && u.controller == Some(b.index)
            {
                nl.delete(&u).await?;
                removed.push(format!("VLAN link {uplink}"));
            }
            nl.delete(&b).await?;
            removed.push(format!("bridge {bridge}"));
        }
        if let Some(own) = vlan::vlan_link_name(&self.bridge, vid)
            && let Some(l) = nl.link(&own).await?
        {
            nl.delete(&l).await?;
            removed.push(format!("VLAN link {own}"));
        }
        if self.vlan_method().await? == Method::Filtering {
            nl.del_vlan(&self.bridge, vid, true).await?;
            if let Some(t) = &self.vlans.config.trunk {
                nl.del_vlan(t, vid, false).await?;
            }
        }
        Ok(removed)
    }

    /// The VLANs whose host side is on this host: per-VLAN bridges `<prefix><v>` and VLAN links
    /// `<bridge>.<v>` (both only ever made by this service).
    ///
    /// # Errors
    /// The links could not be listed.
    pub async fn vlan_sides(&self) -> Result<Vec<u16>, HostError> {
        let mut vids: Vec<u16> = self
            .host
            .netlink()
            .links()
            .await?
            .into_iter()
            .filter_map(|l| match l.kind.as_str() {
                "bridge" => vlan::vid_of_bridge(&self.vlans.config.bridge_prefix, &l.name),
                "vlan" => vlan::vid_of_link(&self.bridge, &l.name),
                _ => None,
            })
            .collect();
        vids.sort_unstable();
        vids.dedup();
        Ok(vids)
    }
}
