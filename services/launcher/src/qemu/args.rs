//! qemu's argument vector from the four preparation results and the VM's spec. No shell: every
//! value spliced into an option string (paths, tap names, MACs, kernel parameters) is checked
//! first, and a bad one is a [`QemuError::Invalid`](super::QemuError).

use std::{net::Ipv4Addr, path::Path};

use wnodes_proto::v1::{
    ImageReady, NetworkMode, NetworkReady, ScratchReady, StorageMode, StorageReady, VmSpec,
};

use super::QemuError;
use crate::{
    config::Accel,
    tuning::{HUGEPAGE_MIB, VmTuning},
    vm_dir::VmDir,
};

fn bad(what: &'static str, value: &str, why: &'static str) -> QemuError {
    QemuError::BadValue {
        what,
        value: value.to_owned(),
        why,
    }
}

/// A host path that can be spliced into a qemu option value: absolute, UTF-8, no `,` (the
/// option separator) and no control characters.
pub fn option_path<'a>(what: &'static str, path: &'a Path) -> Result<&'a str, QemuError> {
    let s = path
        .to_str()
        .ok_or_else(|| bad(what, &path.display().to_string(), "not UTF-8"))?;
    if !path.is_absolute() {
        return Err(bad(what, s, "must be an absolute path"));
    }
    if s.contains(',') || s.chars().any(char::is_control) {
        return Err(bad(what, s, "must not contain ',' or control characters"));
    }
    Ok(s)
}

/// A value for the kernel command line: printable ASCII without spaces, quotes or backslashes.
fn kernel_value<'a>(what: &'static str, v: &'a str) -> Result<&'a str, QemuError> {
    if v.is_empty()
        || !v
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'\\'))
    {
        return Err(bad(
            what,
            v,
            "must be printable ASCII without spaces, quotes or backslashes",
        ));
    }
    Ok(v)
}

fn check_mac(mac: &str) -> Result<&str, QemuError> {
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        Ok(mac)
    } else {
        Err(bad("MAC address", mac, "expected xx:xx:xx:xx:xx:xx"))
    }
}

fn check_tap(tap: &str) -> Result<&str, QemuError> {
    if !tap.is_empty()
        && tap.len() <= 15
        && tap
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        Ok(tap)
    } else {
        Err(bad("tap name", tap, "expected 1-15 of A-Z a-z 0-9 - _"))
    }
}

/// A PCI address as sysfs names it: `dddd:bb:dd.f` (hex digits).
fn check_pci(addr: &str) -> Result<&str, QemuError> {
    let b = addr.as_bytes();
    let ok = b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && addr
            .char_indices()
            .filter(|(i, _)| ![4, 7, 10].contains(i))
            .all(|(_, c)| c.is_ascii_hexdigit());
    if ok {
        Ok(addr)
    } else {
        Err(bad("VF PCI address", addr, "expected dddd:bb:dd.f"))
    }
}

fn check_cidr(addr: &str) -> Result<&str, QemuError> {
    let ok = addr.split_once('/').is_some_and(|(ip, prefix)| {
        ip.parse::<Ipv4Addr>().is_ok() && prefix.parse::<u8>().is_ok_and(|p| p <= 32)
    });
    if ok {
        Ok(addr)
    } else {
        Err(bad("guest address", addr, "expected IPv4/prefix"))
    }
}

fn check_ip(ip: &str) -> Result<&str, QemuError> {
    ip.parse::<Ipv4Addr>()
        .map(|_| ip)
        .map_err(|_| bad("IPv4 address", ip, "not an IPv4 address"))
}

/// Everything a VM's command line is made of.
#[derive(Debug, Clone, Copy)]
pub struct LaunchInputs<'a> {
    pub accel: Accel,
    pub vm: &'a VmDir,
    pub spec: &'a VmSpec,
    pub image: &'a ImageReady,
    /// `None` or an empty path: no scratch disk.
    pub scratch: Option<&'a ScratchReady>,
    /// `None`: no network.
    pub network: Option<&'a NetworkReady>,
    /// `None` or port 0: nothing to mount.
    pub storage: Option<&'a StorageReady>,
    /// Start qemu with `-sandbox` ([`crate::confine::SANDBOX`]).
    pub sandbox: bool,
    /// The VM's tunings (`[launcher.tuning]`); `None`: none, qemu's defaults.
    pub tuning: Option<&'a VmTuning>,
}

/// The qemu arguments (without the binary) for `inputs`.
pub fn build_args(inputs: &LaunchInputs<'_>) -> Result<Vec<String>, QemuError> {
    let vm = inputs.vm;
    let spec = inputs.spec;
    let untuned = VmTuning::default();
    let vt = inputs.tuning.unwrap_or(&untuned);
    let tuning = vt.tuning;
    tuning.check().map_err(|_| {
        bad(
            "tuning",
            &format!("{tuning:?}"),
            "knobs that exclude each other",
        )
    })?;
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    let mut mem_mib = spec.memory_bytes.div_ceil(1024 * 1024).max(16);
    if tuning.hugepages {
        // The backend's size must be a whole number of huge pages.
        mem_mib = mem_mib.div_ceil(HUGEPAGE_MIB) * HUGEPAGE_MIB;
    }
    let mut machine = String::from("pc");
    if tuning.hugepages {
        machine.push_str(",memory-backend=mem0");
    }
    if let Some(merge) = tuning.mem_merge {
        machine.push_str(if merge {
            ",mem-merge=on"
        } else {
            ",mem-merge=off"
        });
    }
    push(&["-accel", inputs.accel.as_str(), "-M", &machine]);
    push(&[
        "-m",
        &format!("{mem_mib}M"),
        "-smp",
        &spec.cores.max(1).to_string(),
    ]);
    if tuning.hugepages {
        // Preallocated: qemu takes every page at start, or does not start.
        let backend = match &vt.hugepages_path {
            Some(dir) => format!(
                "memory-backend-file,id=mem0,size={mem_mib}M,mem-path={},share=off,prealloc=on",
                option_path("huge page path", dir)?
            ),
            None => format!(
                "memory-backend-memfd,id=mem0,size={mem_mib}M,hugetlb=on,hugetlbsize={HUGEPAGE_MIB}M,share=off,prealloc=on"
            ),
        };
        push(&["-object", &backend]);
    }
    if tuning.iothread {
        push(&["-object", "iothread,id=io0"]);
    }
    push(&["-nodefaults", "-display", "none", "-no-reboot", "-snapshot"]);
    if inputs.sandbox {
        push(&["-sandbox", crate::confine::SANDBOX]);
    }
    if !tuning.pin_vcpus {
        push(&["-name", &format!("wnodes-{}", vm.vm_id())]);
    } else {
        // Pinned vCPUs: their threads are named ("CPU 0/KVM"), for whoever looks at them.
        push(&["-name", &format!("wnodes-{},debug-threads=on", vm.vm_id())]);
    }

    // Kernel parameters.
    let mut kparams: Vec<String> = vec![
        "console=ttyS0".into(),
        "root=/dev/vda".into(),
        "panic=-1".into(),
        "quiet".into(),
    ];
    let net_mode = inputs.network.map(|n| n.mode);
    let user_net = net_mode == Some(NetworkMode::User as i32);
    // The network service owns the guest's address, gateway and MAC in both modes (in user
    // mode, qemu slirp's 10.0.2.15/24 and 10.0.2.2): the launcher only checks and passes them.
    if let Some(n) = inputs.network {
        if !n.address.is_empty() {
            kparams.push(format!("wnodes.ip={}", check_cidr(&n.address)?));
        }
        if !n.gateway.is_empty() {
            kparams.push(format!("wnodes.gw={}", check_ip(&n.gateway)?));
        }
    }
    if let Some(s) = inputs.storage.filter(|s| s.port != 0) {
        // In user mode the gateway listens on the host's loopback, which the guest reaches
        // as slirp's gateway.
        let host = match inputs.network {
            Some(n) if user_net => check_ip(&n.gateway)?,
            _ => check_ip(&s.address)?,
        };
        let path = kernel_value("storage remote path", &s.remote_path)?;
        if s.mode == StorageMode::Nfs as i32 {
            // NFSv4 to the gateway's address on the VM's network (storage.ready's address);
            // the gateway never serves NFS in user mode.
            kparams.push(format!(
                "wnodes.nfs={}:{}:{path}",
                check_ip(&s.address)?,
                s.port
            ));
        } else {
            kparams.push(format!("wnodes.sshfs={host}:{}:{path}", s.port));
        }
    }
    let scratch = inputs.scratch.filter(|s| !s.path.is_empty());
    if scratch.is_some() {
        kparams.push("wnodes.scratch=/dev/vdb".into());
    }
    if let Some(owner) = spec.owner.as_ref().filter(|o| o.uid != 0) {
        kparams.push(format!("wnodes.uid={}", owner.uid));
        kparams.push(format!("wnodes.gid={}", owner.gid));
    }

    let image = inputs.image;
    if !image.kernel_path.is_empty() {
        let k = option_path("kernel", Path::new(&image.kernel_path))?;
        push(&["-kernel", k]);
        if !image.initrd_path.is_empty() {
            let i = option_path("initrd", Path::new(&image.initrd_path))?;
            push(&["-initrd", i]);
        }
        push(&["-append", &kparams.join(" ")]);
    }
    let format = match image.format.as_str() {
        "" | "raw" => "raw",
        "qcow2" => "qcow2",
        other => return Err(bad("image format", other, "expected raw or qcow2")),
    };
    // The disks' tunings, and with an I/O thread each disk as its own virtio-blk-pci device
    // (id vda, vdb: the guest still sees the image first, the scratch disk second).
    let mut disk_opts = String::new();
    if let Some(cache) = tuning.disk_cache {
        disk_opts.push_str(",cache=");
        disk_opts.push_str(cache.as_str());
    }
    if let Some(aio) = tuning.disk_aio {
        disk_opts.push_str(",aio=");
        disk_opts.push_str(aio.as_str());
    }
    let mut disk = |id: &str, drive: String, extra: &str| {
        if tuning.iothread {
            push(&[
                "-drive",
                &format!("{drive},if=none,id={id}{extra}{disk_opts}"),
            ]);
            push(&[
                "-device",
                &format!("virtio-blk-pci,drive={id},id={id},iothread=io0"),
            ]);
        } else {
            push(&["-drive", &format!("{drive},if=virtio{extra}{disk_opts}")]);
        }
    };
    let img = option_path("image", Path::new(&image.path))?;
    disk("vda", format!("file={img},format={format}"), ",readonly=on");
    if let Some(s) = scratch {
        let p = option_path("scratch disk", Path::new(&s.path))?;
        if !(s.format.is_empty() || s.format == "raw") {
            return Err(bad("scratch format", &s.format, "expected raw"));
        }
        disk("vdb", format!("file={p},format=raw"), ",snapshot=off");
    }
    let payload = vm.payload();
    let payload = option_path("payload", &payload)?;
    push(&["-fw_cfg", &format!("name=opt/wnodes/job.sh,file={payload}")]);
    for log in [vm.console_log(), vm.output_log(), vm.status_log()] {
        let p = option_path("serial file", &log)?;
        push(&["-serial", &format!("file:{p}")]);
    }
    if let Some(n) = inputs
        .network
        .filter(|n| n.mode == NetworkMode::Sriov as i32)
    {
        // The VF itself, passed through; its MAC and VLAN are set on the PF by the network
        // service, and the guest's driver reads the MAC from the VF.
        check_mac(&n.mac)?;
        let pci = check_pci(&n.pci_address)?;
        push(&["-device", &format!("vfio-pci,host={pci}")]);
    } else if let Some(n) = inputs.network {
        let mac = check_mac(&n.mac)?;
        if user_net {
            push(&["-netdev", "user,id=n0"]);
        } else {
            let tap = check_tap(&n.tap)?;
            push(&[
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            ]);
        }
        push(&["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")]);
    }
    let qmp = vm.qmp_socket();
    push(&[
        "-qmp",
        &format!(
            "unix:{},server=on,wait=off",
            option_path("QMP socket", &qmp)?
        ),
    ]);
    let events = vm.qmp_events_socket();
    push(&[
        "-qmp",
        &format!(
            "unix:{},server=on,wait=off",
            option_path("QMP event socket", &events)?
        ),
    ]);
    let pid = vm.pid_file();
    // No `-daemonize`: the launcher's wrapper has detached qemu already (and `-daemonize`'s
    // fork would be refused by `-sandbox ...,spawn=deny`).
    push(&["-pidfile", option_path("pid file", &pid)?]);
    Ok(a)
}
