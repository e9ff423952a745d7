//! SR-IOV virtual functions (`docs/sriov-and-vlans.md`): the pool of VFs of the configured
//! physical functions, found in sysfs; the settings a VM's VF gets (its MAC, its VO's VLAN,
//! spoof checking on, trust off) and the reset on release (MAC zero, VLAN 0, spoof checking
//! on), both applied through rtnetlink on the PF ([`crate::netlink::Netlink::set_vf`]).
//!
//! Discovery reads, per PF `<pf>`: `<sysfs>/class/net/<pf>/device/sriov_totalvfs`,
//! `sriov_numvfs`, and the `virtfn<N>` links, whose targets name the VFs' PCI addresses
//! (`../0000:00:12.2`). The VF is handed to qemu by that address (`vfio-pci`); the host must
//! have bound it to `vfio-pci` (a site's provisioning: `driverctl` or `sriov_drivers_autoprobe`).

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::mac::Mac;

/// `[network.sriov]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SriovConfig {
    /// The physical functions whose VFs VMs get (netdev names, e.g. `["ens1f0"]`).
    pub physical_functions: Vec<String>,
    /// Where sysfs is mounted.
    pub sysfs: PathBuf,
    /// The addresses VMs on VFs get (`10.231.2.0/24`): the network the PFs' uplink carries.
    pub pool: Option<String>,
    /// That network's gateway (excluded from the pool).
    pub gateway: Option<String>,
    /// Trust on the VF (lets the guest change its MAC and use promiscuous modes); off.
    pub trust: bool,
}

impl Default for SriovConfig {
    fn default() -> Self {
        Self {
            physical_functions: Vec::new(),
            sysfs: "/sys".into(),
            pool: None,
            gateway: None,
            trust: false,
        }
    }
}

impl SriovConfig {
    /// Every PF a plain interface name.
    ///
    /// # Errors
    /// The first offending key, named.
    pub fn check(&self) -> Result<(), String> {
        if let Some(pf) = self
            .physical_functions
            .iter()
            .find(|p| !crate::host::valid_ifname(p))
        {
            return Err(format!(
                "physical_functions: {pf:?} is not an interface name"
            ));
        }
        Ok(())
    }
}

/// A PCI address as sysfs names it: `dddd:bb:dd.f`.
pub fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && s.char_indices()
            .filter(|(i, _)| ![4, 7, 10].contains(i))
            .all(|(_, c)| c.is_ascii_hexdigit())
}

/// One virtual function.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Vf {
    /// Its physical function's netdev name.
    pub pf: String,
    /// Its index on the PF (`virtfn<index>`, `ip link set <pf> vf <index>`).
    pub index: u32,
    /// Its PCI address (`0000:00:12.2`).
    pub pci: String,
}

/// A physical function and its VFs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhysFn {
    pub name: String,
    pub total_vfs: u32,
    pub num_vfs: u32,
    pub vfs: Vec<Vf>,
}

/// Why the VFs of a PF could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SriovError {
    #[error("{pf} is not an SR-IOV physical function here ({path} is missing)")]
    NotSriov { pf: String, path: PathBuf },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds {said:?}, not a number")]
    NotANumber { path: PathBuf, said: String },
    #[error("{path} points to {target:?}, which is no PCI address")]
    BadLink { path: PathBuf, target: String },
}

fn read_u32(path: &Path) -> Result<u32, SriovError> {
    let s = std::fs::read_to_string(path).map_err(|source| SriovError::Read {
        path: path.to_owned(),
        source,
    })?;
    s.trim().parse().map_err(|_| SriovError::NotANumber {
        path: path.to_owned(),
        said: s.trim().to_owned(),
    })
}

/// The VFs of each of `pfs`, from sysfs under `sysfs` (`/sys`), in PF then index order.
///
/// # Errors
/// A PF that is not an SR-IOV device, or sysfs that cannot be read.
pub fn discover(sysfs: &Path, pfs: &[String]) -> Result<Vec<PhysFn>, SriovError> {
    let mut out = Vec::new();
    for pf in pfs {
        let dev = sysfs.join("class/net").join(pf).join("device");
        let total_path = dev.join("sriov_totalvfs");
        if !total_path.exists() {
            return Err(SriovError::NotSriov {
                pf: pf.clone(),
                path: total_path,
            });
        }
        let total_vfs = read_u32(&total_path)?;
        let num_vfs = read_u32(&dev.join("sriov_numvfs"))?;
        let mut vfs = Vec::new();
        let entries = std::fs::read_dir(&dev).map_err(|source| SriovError::Read {
            path: dev.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| SriovError::Read {
                path: dev.clone(),
                source,
            })?;
            let name = entry.file_name();
            let Some(index) = name
                .to_str()
                .and_then(|n| n.strip_prefix("virtfn"))
                .and_then(|i| i.parse::<u32>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let target = std::fs::read_link(&path).map_err(|source| SriovError::Read {
                path: path.clone(),
                source,
            })?;
            let pci = target
                .file_name()
                .and_then(|f| f.to_str())
                .filter(|f| is_pci_address(f))
                .ok_or_else(|| SriovError::BadLink {
                    path: path.clone(),
                    target: target.display().to_string(),
                })?
                .to_owned();
            vfs.push(Vf {
                pf: pf.clone(),
                index,
                pci,
            });
        }
        vfs.sort();
        out.push(PhysFn {
            name: pf.clone(),
            total_vfs,
            num_vfs,
            vfs,
        });
    }
    Ok(out)
}

/// The first VF (PF order, then index) not in `held` (by PCI address).
pub fn pick<'a>(pfs: &'a [PhysFn], held: &HashSet<String>) -> Option<&'a Vf> {
    pfs.iter()
        .flat_map(|p| p.vfs.iter())
        .find(|vf| !held.contains(&vf.pci))
}

/// What a VF is set to on its PF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VfSettings {
    pub mac: [u8; 6],
    /// 0: untagged.
    pub vlan: u16,
    pub spoof_check: bool,
    pub trust: bool,
}

impl VfSettings {
    /// A VM's VF: its MAC and VLAN, spoof checking on (the VF sends only from its MAC).
    pub fn for_vm(mac: Mac, vlan: u16, trust: bool) -> Self {
        Self {
            mac: mac.0,
            vlan,
            spoof_check: true,
            trust,
        }
    }

    /// A released VF: MAC zeroed, VLAN 0, spoof checking on, trust off.
    pub const RESET: Self = Self {
        mac: [0; 6],
        vlan: 0,
        spoof_check: true,
        trust: false,
    };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A sysfs tree as the kernel lays it out for an igb PF with `n` of `total` VFs enabled.
    fn fake_sysfs(dir: &Path, pf: &str, total: u32, pcis: &[&str]) {
        let dev = dir.join("bus/pci/devices/0000:00:03.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::create_dir_all(dir.join("class/net").join(pf)).unwrap();
        std::os::unix::fs::symlink(&dev, dir.join("class/net").join(pf).join("device")).unwrap();
        std::fs::write(dev.join("sriov_totalvfs"), format!("{total}\n")).unwrap();
        std::fs::write(dev.join("sriov_numvfs"), format!("{}\n", pcis.len())).unwrap();
        for (i, pci) in pcis.iter().enumerate() {
            std::fs::create_dir_all(dir.join("bus/pci/devices").join(pci)).unwrap();
            std::os::unix::fs::symlink(format!("../{pci}"), dev.join(format!("virtfn{i}")))
                .unwrap();
        }
    }

    #[test]
    fn vfs_are_found_in_sysfs_in_index_order() {
        let d = tempfile::tempdir().unwrap();
        fake_sysfs(
            d.path(),
            "eth0",
            7,
            &["0000:00:12.0", "0000:00:12.2", "0000:00:12.4"],
        );
        let pfs = discover(d.path(), &["eth0".into()]).unwrap();
        let [pf] = pfs.as_slice() else {
            panic!("{pfs:?}")
        };
        assert_eq!((pf.total_vfs, pf.num_vfs), (7, 3));
        let got: Vec<(u32, &str)> = pf.vfs.iter().map(|v| (v.index, v.pci.as_str())).collect();
        assert_eq!(
            got,
            [
                (0, "0000:00:12.0"),
                (1, "0000:00:12.2"),
                (2, "0000:00:12.4")
            ]
        );

        let mut held = HashSet::new();
        assert_eq!(pick(&pfs, &held).unwrap().index, 0);
        held.insert("0000:00:12.0".to_owned());
        assert_eq!(pick(&pfs, &held).unwrap().index, 1);
        held.extend(["0000:00:12.2".to_owned(), "0000:00:12.4".to_owned()]);
        assert!(pick(&pfs, &held).is_none());
    }

    #[test]
    fn a_device_without_sriov_or_with_junk_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("class/net/lo/device")).unwrap();
        let e = discover(d.path(), &["lo".into()]).unwrap_err();
        assert!(matches!(e, SriovError::NotSriov { .. }), "{e}");
        fake_sysfs(d.path(), "eth1", 7, &["0000:00:13.0"]);
        let dev = d.path().join("class/net/eth1/device");
        std::fs::write(dev.join("sriov_numvfs"), "many\n").unwrap();
        let e = discover(d.path(), &["eth1".into()]).unwrap_err();
        assert!(e.to_string().contains("\"many\", not a number"), "{e}");
        std::fs::write(dev.join("sriov_numvfs"), "1\n").unwrap();
        std::os::unix::fs::symlink("../not-pci", dev.join("virtfn1")).unwrap();
        let e = discover(d.path(), &["eth1".into()]).unwrap_err();
        assert!(matches!(e, SriovError::BadLink { .. }), "{e}");
    }

    #[test]
    fn physical_functions_must_be_interface_names() {
        let bad = SriovConfig {
            physical_functions: vec!["eth0; rm".into()],
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().contains("physical_functions"));
    }

    #[test]
    fn pci_addresses_and_settings() {
        assert!(is_pci_address("0000:00:12.2"));
        assert!(is_pci_address("0000:af:00.7"));
        for bad in [
            "0000:00:12",
            "00:12.2",
            "0000:00:12.2,x",
            "gggg:00:12.2",
            "0000-00:12.2",
        ] {
            assert!(!is_pci_address(bad), "{bad}");
        }
        let mac: Mac = "52:54:00:12:34:56".parse().unwrap();
        let s = VfSettings::for_vm(mac, 100, false);
        assert_eq!(s.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert!(s.spoof_check && !s.trust);
        assert_eq!(
            VfSettings::RESET,
            VfSettings {
                mac: [0; 6],
                vlan: 0,
                spoof_check: true,
                trust: false
            }
        );
    }
}
