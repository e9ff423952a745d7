//! `sysfs-vfs <pf>`: what sysfs says about a PF's SR-IOV VFs.

use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

/// Where the kernel lists network interfaces.
pub const SYS_CLASS_NET: &str = "/sys/class/net";

/// `{"pf", "pci", "driver", "totalvfs", "numvfs", "vfs": [{"index", "pci", "driver",
/// "netdevs"}]}` for `pf` under `class_net` (normally [`SYS_CLASS_NET`]); the VFs sorted by
/// index (`virtfn<N>`).
///
/// # Errors
/// When `pf` has no device, or its device is not SR-IOV capable (no `sriov_totalvfs`).
pub fn sriov(class_net: &Path, pf: &str) -> anyhow::Result<Value> {
    let dev = class_net.join(pf).join("device");
    let total = read_number(&dev.join("sriov_totalvfs"))
        .with_context(|| format!("{pf} is not an SR-IOV PF"))?;
    let num = read_number(&dev.join("sriov_numvfs"))?;
    let mut vfs = Vec::new();
    for entry in std::fs::read_dir(&dev).with_context(|| format!("reading {}", dev.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(index) = name
            .strip_prefix("virtfn")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let vf = entry.path();
        vfs.push((
            index,
            json!({
                "index": index,
                "pci": link_name(&vf),
                "driver": link_name(&vf.join("driver")),
                "netdevs": dir_names(&vf.join("net")),
            }),
        ));
    }
    vfs.sort_by_key(|(i, _)| *i);
    Ok(json!({
        "pf": pf,
        "pci": link_name(&dev),
        "driver": link_name(&dev.join("driver")),
        "totalvfs": total,
        "numvfs": num,
        "vfs": vfs.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    }))
}

fn read_number(path: &Path) -> anyhow::Result<u32> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: not a number: {text:?}", path.display()))
}

/// The last component of the symlink `path` points to (a PCI address, a driver's name), or
/// null when it is not a symlink.
fn link_name(path: &Path) -> Value {
    std::fs::read_link(path)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map_or(Value::Null, Value::String)
}

/// The sorted entries of `dir` (none when it does not exist).
fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake `/sys`: `class/net/eth0/device` -> `devices/0000:00:02.0` (driver igb) with
    /// `virtfn1` and `virtfn0` (driver igbvf, netdevs eth2 and eth1), and `lo` without a device.
    fn fake_sys() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let pf = r.join("devices/0000:00:02.0");
        std::fs::create_dir_all(&pf).unwrap();
        std::fs::create_dir_all(r.join("drivers/igb")).unwrap();
        std::fs::create_dir_all(r.join("drivers/igbvf")).unwrap();
        symlink(r.join("drivers/igb"), pf.join("driver")).unwrap();
        std::fs::write(pf.join("sriov_totalvfs"), "7\n").unwrap();
        std::fs::write(pf.join("sriov_numvfs"), "2\n").unwrap();
        for (i, addr, netdev) in [(0, "0000:00:12.0", "eth1"), (1, "0000:00:12.2", "eth2")] {
            let vf = r.join("devices").join(addr);
            std::fs::create_dir_all(vf.join("net").join(netdev)).unwrap();
            symlink(r.join("drivers/igbvf"), vf.join("driver")).unwrap();
            symlink(&vf, pf.join(format!("virtfn{i}"))).unwrap();
        }
        std::fs::create_dir_all(r.join("class/net/eth0")).unwrap();
        symlink(&pf, r.join("class/net/eth0/device")).unwrap();
        std::fs::create_dir_all(r.join("class/net/lo")).unwrap();
        t
    }

    #[test]
    fn a_pf_with_two_vfs_lists_them_in_index_order() {
        let sys = fake_sys();
        let v = sriov(&sys.path().join("class/net"), "eth0").unwrap();
        assert_eq!(
            v,
            json!({
                "pf": "eth0", "pci": "0000:00:02.0", "driver": "igb",
                "totalvfs": 7, "numvfs": 2,
                "vfs": [
                    {"index": 0, "pci": "0000:00:12.0", "driver": "igbvf", "netdevs": ["eth1"]},
                    {"index": 1, "pci": "0000:00:12.2", "driver": "igbvf", "netdevs": ["eth2"]},
                ],
            })
        );
    }

    #[test]
    fn a_link_without_sriov_is_an_error_naming_it() {
        let sys = fake_sys();
        let e = sriov(&sys.path().join("class/net"), "lo").unwrap_err();
        assert!(format!("{e:#}").contains("lo is not an SR-IOV PF"), "{e:#}");
        assert!(sriov(&sys.path().join("class/net"), "eth9").is_err());
    }
}
