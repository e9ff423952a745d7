//! What a VM used, measured on the host (never trusted from the guest).
//!
//! Two sources, chosen per host at launch time:
//!
//! - **cgroup v2** when `/sys/fs/cgroup` is a writable cgroup2 mount: qemu is moved into
//!   `/sys/fs/cgroup/wnodes/<vm_id>`; `cpu.stat` (`usage_usec`) and `memory.peak` keep counting
//!   and stay readable after qemu exits, even while the launcher is down.
//! - **`/proc` samples** otherwise (cgroup v1 or hybrid hosts, like this project's machines):
//!   the watcher reads `/proc/<pid>/stat` (utime+stime, all threads) and `/proc/<pid>/status`
//!   (`VmHWM`, the kernel's own peak RSS) every poll and persists them to `usage.json` at least
//!   once a second; the last sample before exit is the result. While the launcher is down
//!   nothing is sampled, so CPU time after the last sample is missed.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::vmstate::{self, StateError, UsageSource, VmDir};

/// Where the per-VM cgroups live when cgroup v2 is used.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// CPU and memory figures of one VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageSample {
    pub cpu_seconds: f64,
    pub peak_memory_bytes: u64,
    pub sampled_at_ms: u64,
}

impl UsageSample {
    /// The larger of both figures (CPU time and the peak only grow).
    pub fn max(self, other: Self) -> Self {
        Self {
            cpu_seconds: self.cpu_seconds.max(other.cpu_seconds),
            peak_memory_bytes: self.peak_memory_bytes.max(other.peak_memory_bytes),
            sampled_at_ms: self.sampled_at_ms.max(other.sampled_at_ms),
        }
    }
}

/// An accounting problem.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("cgroup {path}: {op}: {source}")]
    Cgroup {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

/// True when `root` is a cgroup2 mount this process can create groups in.
pub fn cgroup2_usable(root: &Path) -> bool {
    let is_cgroup2 = nix::sys::statfs::statfs(root)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    is_cgroup2 && nix::unistd::access(root, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Moves `pid` (all its threads) into `<root>/wnodes/<vm_id>`, enabling the cpu and memory
/// controllers on the way.
pub fn attach_cgroup(root: &Path, vm_id: &str, pid: u32) -> Result<PathBuf, UsageError> {
    let err = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| UsageError::Cgroup { op, path, source }
    };
    let parent = root.join("wnodes");
    std::fs::create_dir_all(&parent).map_err(err("create", &parent))?;
    for dir in [root, parent.as_path()] {
        let ctl = dir.join("cgroup.subtree_control");
        // Best effort: a controller already enabled or not delegated is not fatal.
        let _ = std::fs::write(&ctl, "+cpu +memory");
    }
    let group = parent.join(vm_id);
    match std::fs::create_dir(&group) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err("create", &group)(e)),
    }
    let procs = group.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(err("write cgroup.procs", &procs))?;
    Ok(group)
}

/// Reads `cpu.stat` `usage_usec` and `memory.peak` of a cgroup v2 group.
pub fn read_cgroup(group: &Path) -> Result<UsageSample, UsageError> {
    let read = |name: &str| {
        let p = group.join(name);
        std::fs::read_to_string(&p).map_err(|source| UsageError::Cgroup {
            op: "read",
            path: p,
            source,
        })
    };
    let cpu_usec: u64 = read("cpu.stat")?
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let peak = read("memory.peak")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Ok(UsageSample {
        cpu_seconds: cpu_usec as f64 / 1e6,
        peak_memory_bytes: peak,
        sampled_at_ms: vmstate::unix_ms(SystemTime::now()),
    })
}

/// Removes a VM's (empty) cgroup after its usage was read.
pub fn remove_cgroup(group: &Path) {
    if let Err(e) = std::fs::remove_dir(group) {
        tracing::warn!(group = %group.display(), error = %e, "Cannot remove the VM's cgroup.");
    }
}

fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// Parses utime + stime (clock ticks) out of `/proc/<pid>/stat` text.
pub fn parse_proc_stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the command (which may contain spaces and parentheses): state is field 3,
    // utime field 14, stime field 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Parses `VmHWM` (kB) out of `/proc/<pid>/status` text, in bytes.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One `/proc` sample of `pid`; `None` once the process is gone.
pub fn sample_proc(pid: u32) -> Option<UsageSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let ticks = parse_proc_stat_ticks(&stat)?;
    // A zombie has no VmHWM line; treat it as gone.
    let peak = parse_vm_hwm(&status)?;
    Some(UsageSample {
        cpu_seconds: ticks as f64 / clock_ticks(),
        peak_memory_bytes: peak,
        sampled_at_ms: vmstate::unix_ms(SystemTime::now()),
    })
}

/// The persisted samples of a VM (zero when there are none).
pub fn read_usage_file(vm: &VmDir) -> UsageSample {
    vmstate::read_json(&vm.usage_json()).unwrap_or_default()
}

/// Persists a sample (atomically).
pub fn write_usage_file(vm: &VmDir, sample: &UsageSample) -> Result<(), UsageError> {
    Ok(vmstate::write_json(&vm.usage_json(), sample)?)
}

/// The final usage of a VM whose qemu has exited.
pub fn final_usage(vm: &VmDir, source: &UsageSource, last: Option<UsageSample>) -> UsageSample {
    let from_source = match source {
        UsageSource::Cgroup { path } => match read_cgroup(path) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(vm_id = vm.vm_id(), error = %e, "Cannot read the VM's cgroup; using samples.");
                read_usage_file(vm)
            }
        },
        UsageSource::Proc => read_usage_file(vm),
    };
    match last {
        Some(l) => from_source.max(l),
        None => from_source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_parsed() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_proc_stat_ticks(stat), Some(300));
        let status = "Name:\tqemu\nVmPeak:\t 9 kB\nVmHWM:\t   51200 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(51200 * 1024));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
    }

    #[test]
    fn cgroup_files_are_written_and_read() {
        // A plain directory stands in for the cgroup2 mount (this host has cgroup v1).
        let root = tempfile::tempdir().unwrap();
        assert!(!cgroup2_usable(root.path()));
        let group = attach_cgroup(root.path(), "vm-0123456789ab", 4242).unwrap();
        assert_eq!(group, root.path().join("wnodes/vm-0123456789ab"));
        assert_eq!(
            std::fs::read_to_string(group.join("cgroup.procs")).unwrap(),
            "4242"
        );
        std::fs::write(
            group.join("cpu.stat"),
            "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
        )
        .unwrap();
        std::fs::write(group.join("memory.peak"), "123456789\n").unwrap();
        let s = read_cgroup(&group).unwrap();
        assert_eq!((s.cpu_seconds, s.peak_memory_bytes), (2.5, 123_456_789));
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample_proc(std::process::id()).unwrap();
        assert!(s.peak_memory_bytes > 0);
        assert!(sample_proc(u32::MAX).is_none());
    }
}
