//! Start-up reconciliation: the taps and their nft chains, the VFs set to a MAC and the VLANs'
//! host sides are the [`HostResources`] of the lease table; [`NetworkHandler::reconcile`]
//! removes (or resets) what no prepared lease holds.

use std::fmt;

use wnodes_bus::KeyStore;
use wnodes_preparer::{HostResources, Row};

use crate::{
    config::Mode,
    host::{HostError, valid_tap_name},
    lease::{self, Lease},
    nft,
    service::NetworkHandler,
    sriov::{self, Vf, VfSettings},
    tap_vlan,
};

impl NetworkHandler {
    /// The VFs of the configured PFs that are set to a MAC (a VM's, or one left behind), keyed
    /// by PCI address. A PF whose VFs cannot be listed is an error: reconcile must not guess.
    async fn set_vfs(&self) -> Result<Vec<(String, HostItem)>, HostError> {
        let pfs = sriov::discover(&self.sriov.sysfs, &self.sriov.physical_functions)?;
        let mut out = Vec::new();
        for pf in &pfs {
            let settings = self.host.vfs(&pf.name).await?;
            for vf in &pf.vfs {
                let set = settings
                    .iter()
                    .any(|(i, s)| *i == vf.index && *s != VfSettings::RESET);
                if set {
                    out.push((vf.pci.clone(), HostItem::Vf(vf.clone())));
                }
            }
        }
        Ok(out)
    }
}

/// Why start-up reconciliation failed.
pub type ReconcileError = wnodes_preparer::ReconcileError<HostError>;

/// What the network service leaves on the host for a VM, as reconcile finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostItem {
    /// A tap `wn-<12hex>`.
    Tap(String),
    /// The nft chain (or `taps` map element) of a tap.
    Chain(String),
    /// An SR-IOV VF set to a MAC (not reset).
    Vf(Vf),
    /// A VLAN's host side ([`crate::tap_vlan`]): its bridge or VLAN link.
    Vlan(u16),
}

impl fmt::Display for HostItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tap(t) => write!(f, "tap {t}"),
            Self::Chain(c) => write!(f, "nft chain {c}"),
            Self::Vf(v) => write!(f, "VF {} of {} ({})", v.index, v.pf, v.pci),
            Self::Vlan(v) => write!(f, "VLAN {v}'s host side"),
        }
    }
}

impl NetworkHandler {
    /// Removes taps and nft chains that no prepared lease accounts for; (re)installs the base
    /// table. Returns what was removed (`tap wn-…`, `nft chain wn-…`).
    pub async fn reconcile(&self, store: &KeyStore) -> Result<Vec<String>, ReconcileError> {
        if self.mode != Mode::Tap && self.sriov_network.is_none() {
            return Ok(Vec::new());
        }
        if self.mode == Mode::Tap {
            self.host
                .nft_apply(&nft::base_script())
                .await
                .map_err(ReconcileError::Host)?;
            // With VLANs for tap VMs, the host keeps them apart at layer 3 too.
            let l3 = if self.vlans.config.vlans().next().is_some() {
                nft::vlan_separation_script(&self.vlans.config.bridge_prefix, &self.bridge)
            } else {
                nft::vlan_separation_remove_script()
            };
            self.host
                .nft_apply(&l3)
                .await
                .map_err(ReconcileError::Host)?;
        }
        let done = wnodes_preparer::reconcile(&lease::TABLE, store.pool(), self).await?;
        Ok(done.removed.iter().map(ToString::to_string).collect())
    }
}

/// Taps and their filters, for [`wnodes_preparer::reconcile()`]: a prepared lease holds its tap
/// and the tap's chain (both named `wn-<12hex>`).
impl HostResources<Lease> for NetworkHandler {
    type Error = HostError;
    type Item = HostItem;

    /// Taps first, then the chains and map elements of the `bridge wnodes` table.
    async fn present(&self) -> Result<Vec<(String, HostItem)>, HostError> {
        let mut found: Vec<(String, HostItem)> = Vec::new();
        if self.sriov_network.is_some() {
            found.extend(self.set_vfs().await?);
        }
        if self.mode != Mode::Tap {
            return Ok(found);
        }
        found.extend(
            self.host
                .list_taps()
                .await?
                .into_iter()
                .map(|t| (t.clone(), HostItem::Tap(t))),
        );
        if let Some(table) = self.host.nft_table().await? {
            let (chains, elements) = nft::vm_chains_and_elements(&table);
            let mut names: Vec<String> = chains.into_iter().chain(elements).collect();
            names.sort();
            names.dedup();
            for name in names {
                if !valid_tap_name(&name) {
                    tracing::warn!(chain = %name, "Unexpected name in table bridge wnodes; left alone.");
                    continue;
                }
                found.push((name.clone(), HostItem::Chain(name)));
            }
        }
        // After the taps: a VLAN's bridge goes once its ports have.
        found.extend(
            self.vlan_sides()
                .await?
                .into_iter()
                .map(|v| (tap_vlan::held_key(v), HostItem::Vlan(v))),
        );
        Ok(found)
    }

    fn held(&self, row: &Row<Lease>) -> Vec<String> {
        row.detail
            .tap
            .iter()
            .cloned()
            .chain(row.detail.vf.iter().map(|v| v.pci.clone()))
            .chain(
                (row.detail.tap.is_some() && row.detail.vlan != 0)
                    .then(|| tap_vlan::held_key(row.detail.vlan)),
            )
            .collect()
    }

    async fn remove(&self, item: &HostItem) -> Result<(), HostError> {
        match item {
            HostItem::Tap(tap) => self.host.delete_link(tap).await.map(drop),
            HostItem::Chain(name) => self.host.nft_apply(&nft::remove_script(name)).await,
            HostItem::Vf(vf) => self.host.set_vf(&vf.pf, vf.index, &VfSettings::RESET).await,
            HostItem::Vlan(v) => self.remove_vlan_side(*v).await.map(drop),
        }
    }
}
