//! What a VM used, measured on the host (never trusted from the guest).
//!
//! Three sources, chosen per host when the launcher starts ([`CgroupHost::detect`]) and
//! recorded per VM in `running.json` ([`UsageSource`]):
//!
//! - **cgroup v2** when `/sys/fs/cgroup` is a writable cgroup2 mount: qemu is moved into
//!   `/sys/fs/cgroup/wnodes/<vm_id>`; `cpu.stat` (`usage_usec`) and `memory.peak`.
//! - **cgroup v1** otherwise, when both `/sys/fs/cgroup/cpuacct` and `/sys/fs/cgroup/memory`
//!   are writable v1 hierarchies (EL7/EL8-era hosts, this project's machines): qemu is moved
//!   into `cpuacct/wnodes/<vm_id>` and `memory/wnodes/<vm_id>` (with
//!   `memory.move_charge_at_immigrate` = 3 where the kernel still accepts it; 6.x rejects it);
//!   `cpuacct.usage` (ns) and `memory.max_usage_in_bytes`.
//! - **`/proc` samples** when neither is usable: the watcher reads `/proc/<pid>/stat`
//!   (utime+stime, all threads) and `/proc/<pid>/status` (`VmHWM`, the kernel's own peak RSS)
//!   every poll and persists them to `usage.json` at least once a second; the last sample
//!   before exit is the result. While the launcher is down nothing is sampled, so CPU time
//!   after the last sample is missed.
//!
//! With a cgroup, the launcher's wrapper joins the group(s) before it execs qemu, so qemu's
//! whole life is counted (qemu's pid is checked to be in the group afterwards, and moved there
//! if it is not). The group keeps counting after qemu exits and stays readable until the launcher
//! removes it, also after a launcher restart; [`final_usage`] reads it and the watcher then
//! removes it (`rmdir`). On start the launcher removes the groups of VMs that are finished or
//! unknown to its state directory ([`list_groups`]).
//!
//! Exercised on this project's machines: cgroup v1 with real qemu (`tests/vm.rs`) and `/proc`
//! sampling; cgroup v2 only against plain directories standing in for the mount (unit tests).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::vm_dir::{self, StateError, UsageSource, VmDir};

/// Where the cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The directory (in each hierarchy) holding the per-VM groups.
pub const GROUP_PARENT: &str = "wnodes";

/// CPU and memory figures of one VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageSample {
    pub cpu_seconds: f64,
    /// The part of `cpu_seconds` spent in user mode (0 when the source does not say).
    #[serde(default)]
    pub cpu_user_seconds: f64,
    /// The part spent in the kernel (0 when the source does not say).
    #[serde(default)]
    pub cpu_system_seconds: f64,
    pub peak_memory_bytes: u64,
    pub sampled_at_ms: u64,
}

impl UsageSample {
    /// The larger of both figures (CPU time and the peak only grow).
    pub fn max(self, other: Self) -> Self {
        Self {
            cpu_seconds: self.cpu_seconds.max(other.cpu_seconds),
            cpu_user_seconds: self.cpu_user_seconds.max(other.cpu_user_seconds),
            cpu_system_seconds: self.cpu_system_seconds.max(other.cpu_system_seconds),
            peak_memory_bytes: self.peak_memory_bytes.max(other.peak_memory_bytes),
            sampled_at_ms: self.sampled_at_ms.max(other.sampled_at_ms),
        }
    }
}

/// An accounting problem.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("cgroup {path}: cannot {op}")]
    Cgroup {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: the VM has no cgroup (usage from /proc samples)")]
    NoCgroup(String),
    #[error(transparent)]
    State(#[from] StateError),
}

fn cg_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> UsageError + use<> {
    let path = path.to_path_buf();
    move |source| UsageError::Cgroup { op, path, source }
}

/// True when `root` is a cgroup2 mount this process can create groups in.
pub fn cgroup2_usable(root: &Path) -> bool {
    let is_cgroup2 = nix::sys::statfs::statfs(root)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    is_cgroup2 && writable(root)
}

fn writable(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// True when `dir` is a (v1) hierarchy root that has `marker` and that this process can
/// create groups in.
fn v1_usable(dir: &Path, marker: &str) -> bool {
    dir.join(marker).is_file() && writable(dir)
}

/// The cgroup layout of this host, as far as the launcher can use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupHost {
    /// A writable cgroup2 mount.
    V2 { root: PathBuf },
    /// Writable v1 `cpuacct` and `memory` hierarchies, and `cpu` when it is a hierarchy of
    /// its own with `cpu.cfs_quota_us` (where the cores are enforced).
    V1 {
        cpuacct: PathBuf,
        memory: PathBuf,
        cpu: Option<PathBuf>,
    },
}

impl CgroupHost {
    /// The usable cgroup layout under `root` (normally [`CGROUP_ROOT`]); `None`: sample /proc.
    pub fn detect(root: &Path) -> Option<Self> {
        Self::choose(root, cgroup2_usable(root))
    }

    /// v2 when `root` is a usable cgroup2 mount (`cgroup2`), else v1 when both `root/cpuacct`
    /// (with `cpuacct.usage`) and `root/memory` (with `memory.max_usage_in_bytes`) exist and
    /// are writable, else none.
    pub fn choose(root: &Path, cgroup2: bool) -> Option<Self> {
        if cgroup2 {
            return Some(Self::V2 {
                root: root.to_path_buf(),
            });
        }
        let cpuacct = root.join("cpuacct");
        let memory = root.join("memory");
        let cpu = root.join("cpu");
        // A `cpu` co-mounted with `cpuacct` (one hierarchy) is the same directory: not a
        // second group.
        let cpu = (v1_usable(&cpu, "cpu.cfs_quota_us")
            && std::fs::canonicalize(&cpu).ok() != std::fs::canonicalize(&cpuacct).ok())
        .then_some(cpu);
        (v1_usable(&cpuacct, "cpuacct.usage") && v1_usable(&memory, "memory.max_usage_in_bytes"))
            .then_some(Self::V1 {
                cpuacct,
                memory,
                cpu,
            })
    }

    /// For logs.
    pub fn describe(host: Option<&Self>) -> &'static str {
        match host {
            Some(Self::V2 { .. }) => "cgroup v2",
            Some(Self::V1 { cpu: Some(_), .. }) => "cgroup v1 (cpuacct, memory, cpu)",
            Some(Self::V1 { .. }) => {
                "cgroup v1 (cpuacct, memory; no cpu hierarchy: cores not enforced)"
            }
            None => "/proc samples",
        }
    }

    /// The directories holding the per-VM groups (`<hierarchy>/wnodes`).
    pub fn parents(&self) -> Vec<PathBuf> {
        match self {
            Self::V2 { root } => vec![root.join(GROUP_PARENT)],
            Self::V1 {
                cpuacct,
                memory,
                cpu,
            } => {
                let mut p = vec![cpuacct.join(GROUP_PARENT), memory.join(GROUP_PARENT)];
                p.extend(cpu.iter().map(|c| c.join(GROUP_PARENT)));
                p
            }
        }
    }

    /// The source a VM gets on this host (paths only; nothing is created).
    pub fn source_for(&self, vm_id: &str) -> UsageSource {
        match self {
            Self::V2 { root } => UsageSource::Cgroup {
                path: root.join(GROUP_PARENT).join(vm_id),
            },
            Self::V1 {
                cpuacct,
                memory,
                cpu,
            } => UsageSource::CgroupV1 {
                cpuacct: cpuacct.join(GROUP_PARENT).join(vm_id),
                memory: memory.join(GROUP_PARENT).join(vm_id),
                cpu: cpu.as_ref().map(|c| c.join(GROUP_PARENT).join(vm_id)),
            },
        }
    }

    /// Creates the VM's group(s), parents included, holding no process yet, with `limits`
    /// ([`apply_limits`]). v2: enables the cpu and memory controllers on the way (best
    /// effort). v1: sets `memory.move_charge_at_immigrate` to 3 (best effort: newer kernels
    /// deprecate it).
    pub fn create(&self, vm_id: &str, limits: Option<Limits>) -> Result<UsageSource, UsageError> {
        let source = self.source_for(vm_id);
        match (&source, self) {
            (UsageSource::Cgroup { path }, Self::V2 { root }) => {
                let parent = root.join(GROUP_PARENT);
                std::fs::create_dir_all(&parent).map_err(cg_err("create", &parent))?;
                for dir in [root, &parent] {
                    // Best effort: a controller already enabled or not delegated is not fatal.
                    let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory");
                }
                create_dir(path)?;
            }
            (
                UsageSource::CgroupV1 {
                    cpuacct,
                    memory,
                    cpu,
                },
                Self::V1 { .. },
            ) => {
                create_dir(cpuacct)?;
                create_dir(memory)?;
                if let Some(cpu) = cpu {
                    create_dir(cpu)?;
                }
                // Kernels since 6.x reject it (EINVAL: charge moving was removed); then the
                // little the foreground qemu has charged before the move stays with its old
                // group, and everything after is counted here.
                let ctl = memory.join("memory.move_charge_at_immigrate");
                if let Err(e) = std::fs::write(&ctl, "3") {
                    tracing::debug!(path = %ctl.display(), error = %e, "Cannot set memory.move_charge_at_immigrate.");
                }
            }
            _ => unreachable!("source_for matches the host"),
        }
        if let Some(l) = limits {
            apply_limits(vm_id, &source, l);
        }
        Ok(source)
    }
}

/// What a VM's cgroup enforces: its memory (the guest's RAM plus qemu's own overhead) and its
/// cores as CPU bandwidth (v2, or v1 with a `cpu` hierarchy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cores: u32,
}

/// cgroup v2's CPU bandwidth period (`cpu.max`), microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Writes the limits into the VM's group(s): v2 `memory.max` and `cpu.max` (`cores` ×
/// the period per period); v1 `memory.limit_in_bytes` and, with a `cpu` group,
/// `cpu.cfs_period_us` and `cpu.cfs_quota_us` (the same bandwidth). A limit the host refuses
/// is logged and the VM runs without it: the log says so.
pub fn apply_limits(vm_id: &str, source: &UsageSource, limits: Limits) {
    let writes: Vec<(PathBuf, String)> = match source {
        UsageSource::Cgroup { path } => vec![
            (path.join("memory.max"), limits.memory_bytes.to_string()),
            (
                path.join("cpu.max"),
                format!(
                    "{} {CPU_PERIOD_US}",
                    u64::from(limits.cores.max(1)) * CPU_PERIOD_US
                ),
            ),
        ],
        UsageSource::CgroupV1 { memory, cpu, .. } => {
            let mut w = vec![(
                memory.join("memory.limit_in_bytes"),
                limits.memory_bytes.to_string(),
            )];
            if let Some(cpu) = cpu {
                w.push((cpu.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string()));
                w.push((
                    cpu.join("cpu.cfs_quota_us"),
                    (u64::from(limits.cores.max(1)) * CPU_PERIOD_US).to_string(),
                ));
            }
            w
        }
        UsageSource::Proc => Vec::new(),
    };
    for (file, value) in writes {
        if let Err(e) = std::fs::write(&file, &value) {
            tracing::warn!(vm_id, file = %file.display(), value, error = %e, "Cannot set a cgroup limit: the VM runs without it.");
        }
    }
}

/// How many processes of the VM's group the kernel's OOM killer killed because the group hit
/// its memory limit (v2 `memory.events`, v1 `memory.oom_control`: `oom_kill N`); 0 when it
/// cannot be read.
pub fn oom_kills(source: &UsageSource) -> u64 {
    let file = match source {
        UsageSource::Cgroup { path } => path.join("memory.events"),
        UsageSource::CgroupV1 { memory, .. } => memory.join("memory.oom_control"),
        UsageSource::Proc => return 0,
    };
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| parse_oom_kill(&text))
        .unwrap_or(0)
}

/// The `oom_kill N` line of `memory.events` or `memory.oom_control`.
pub fn parse_oom_kill(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

fn create_dir(path: &Path) -> Result<(), UsageError> {
    std::fs::create_dir_all(path).map_err(cg_err("create", path))
}

/// The group directories of a cgroup source (none for `/proc` samples).
pub fn group_dirs(source: &UsageSource) -> Vec<&Path> {
    match source {
        UsageSource::Cgroup { path } => vec![path.as_path()],
        UsageSource::CgroupV1 {
            cpuacct,
            memory,
            cpu,
        } => {
            let mut d = vec![cpuacct.as_path(), memory.as_path()];
            d.extend(cpu.as_deref());
            d
        }
        UsageSource::Proc => Vec::new(),
    }
}

/// Moves `pid` (the whole process, all its threads) into the source's group(s).
pub fn attach(vm_id: &str, source: &UsageSource, pid: u32) -> Result<(), UsageError> {
    let dirs = group_dirs(source);
    if dirs.is_empty() {
        return Err(UsageError::NoCgroup(vm_id.to_owned()));
    }
    for dir in dirs {
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(cg_err("write cgroup.procs", &procs))?;
    }
    Ok(())
}

/// Parses `cgroup.procs` / `tasks` text (one pid a line).
pub fn parse_pids(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// True when `pid` is in every group of the source (false for `/proc` samples).
pub fn contains(source: &UsageSource, pid: u32) -> bool {
    let dirs = group_dirs(source);
    !dirs.is_empty()
        && dirs.iter().all(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .is_ok_and(|t| parse_pids(&t).contains(&pid))
        })
}

fn read_file(dir: &Path, name: &str) -> Result<String, UsageError> {
    let p = dir.join(name);
    std::fs::read_to_string(&p).map_err(cg_err("read", &p))
}

/// Parses `usage_usec` out of a cgroup v2 `cpu.stat`, in seconds.
pub fn parse_cpu_stat_v2(text: &str) -> Option<f64> {
    let usec: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))?
        .trim()
        .parse()
        .ok()?;
    Some(usec as f64 / 1e6)
}

/// Parses `user_usec` and `system_usec` out of a cgroup v2 `cpu.stat`, in seconds.
pub fn parse_cpu_stat_v2_split(text: &str) -> Option<(f64, f64)> {
    let field = |name: &str| -> Option<f64> {
        let usec: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?
            .trim()
            .parse()
            .ok()?;
        Some(usec as f64 / 1e6)
    };
    Some((field("user_usec")?, field("system_usec")?))
}

/// Parses a cgroup v1 `cpuacct.stat` (`user N`, `system N`, clock ticks), in seconds.
pub fn parse_cpuacct_stat(text: &str) -> Option<(f64, f64)> {
    let field = |name: &str| -> Option<f64> {
        let ticks: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?
            .trim()
            .parse()
            .ok()?;
        Some(ticks as f64 / clock_ticks())
    };
    Some((field("user")?, field("system")?))
}

/// Parses a cgroup v1 `cpuacct.usage` (nanoseconds), in seconds.
pub fn parse_cpuacct_usage(text: &str) -> Option<f64> {
    let ns: u64 = text.trim().parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// Reads `cpu.stat` `usage_usec` and `memory.peak` of a cgroup v2 group.
pub fn read_cgroup(group: &Path) -> Result<UsageSample, UsageError> {
    let stat = read_file(group, "cpu.stat")?;
    let cpu_seconds = parse_cpu_stat_v2(&stat).unwrap_or(0.0);
    let (user, system) = parse_cpu_stat_v2_split(&stat).unwrap_or_default();
    let peak = read_file(group, "memory.peak")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Ok(UsageSample {
        cpu_seconds,
        cpu_user_seconds: user,
        cpu_system_seconds: system,
        peak_memory_bytes: peak,
        sampled_at_ms: wnodes_proto::time::unix_ms(SystemTime::now()),
    })
}

/// Reads `cpuacct.usage` and `memory.max_usage_in_bytes` of a VM's cgroup v1 groups.
pub fn read_cgroup_v1(cpuacct: &Path, memory: &Path) -> Result<UsageSample, UsageError> {
    let usage = read_file(cpuacct, "cpuacct.usage")?;
    let cpu_seconds = parse_cpuacct_usage(&usage).ok_or_else(|| {
        cg_err("parse", &cpuacct.join("cpuacct.usage"))(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a number: {:?}", usage.trim()),
        ))
    })?;
    let peak = read_file(memory, "memory.max_usage_in_bytes")?
        .trim()
        .parse()
        .unwrap_or(0);
    let (user, system) = read_file(cpuacct, "cpuacct.stat")
        .ok()
        .and_then(|s| parse_cpuacct_stat(&s))
        .unwrap_or_default();
    Ok(UsageSample {
        cpu_seconds,
        cpu_user_seconds: user,
        cpu_system_seconds: system,
        peak_memory_bytes: peak,
        sampled_at_ms: wnodes_proto::time::unix_ms(SystemTime::now()),
    })
}

/// Reads a cgroup source.
pub fn read_source(vm_id: &str, source: &UsageSource) -> Result<UsageSample, UsageError> {
    match source {
        UsageSource::Cgroup { path } => read_cgroup(path),
        UsageSource::CgroupV1 {
            cpuacct, memory, ..
        } => read_cgroup_v1(cpuacct, memory),
        UsageSource::Proc => Err(UsageError::NoCgroup(vm_id.to_owned())),
    }
}

/// Removes one (empty) group directory; retries briefly while it is busy (a process that
/// just exited may still be leaving it). A group that is already gone is fine.
pub fn remove_group_dir(dir: &Path) -> Result<(), UsageError> {
    let mut tries = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) && tries < 10 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(cg_err("remove", dir)(e)),
        }
    }
}

/// Removes a VM's (empty) cgroup(s) after its usage was read.
pub fn remove_groups(vm_id: &str, source: &UsageSource) {
    for dir in group_dirs(source) {
        if let Err(e) = remove_group_dir(dir) {
            tracing::warn!(vm_id, error = %wnodes_bus::ErrorChain(&e), "Cannot remove the VM's cgroup.");
        }
    }
}

/// The per-VM group directories on this host, by VM id (names that are not VM ids are
/// skipped).
pub fn list_groups(host: &CgroupHost) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for parent in host.parents() {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if let Some(name) = entry.file_name().to_str()
                && crate::policy::is_valid_vm_id(name)
                && path.is_dir()
            {
                out.entry(name.to_owned()).or_default().push(path);
            }
        }
    }
    out
}

fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// Parses utime + stime (clock ticks) out of `/proc/<pid>/stat` text.
pub fn parse_proc_stat_ticks(stat: &str) -> Option<u64> {
    parse_proc_stat_user_system(stat).map(|(u, s)| u + s)
}

/// Parses utime and stime (clock ticks) out of `/proc/<pid>/stat` text.
pub fn parse_proc_stat_user_system(stat: &str) -> Option<(u64, u64)> {
    // Fields after the command (which may contain spaces and parentheses): state is field 3,
    // utime field 14, stime field 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime, stime))
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
    let (user, system) = parse_proc_stat_user_system(&stat)?;
    // A zombie has no VmHWM line; treat it as gone.
    let peak = parse_vm_hwm(&status)?;
    let hz = clock_ticks();
    Some(UsageSample {
        cpu_seconds: (user + system) as f64 / hz,
        cpu_user_seconds: user as f64 / hz,
        cpu_system_seconds: system as f64 / hz,
        peak_memory_bytes: peak,
        sampled_at_ms: wnodes_proto::time::unix_ms(SystemTime::now()),
    })
}

/// The persisted samples of a VM (zero when there are none).
pub fn read_usage_file(vm: &VmDir) -> UsageSample {
    vm_dir::read_json(&vm.usage_json()).unwrap_or_default()
}

/// Persists a sample (atomically).
pub fn write_usage_file(vm: &VmDir, sample: &UsageSample) -> Result<(), UsageError> {
    Ok(vm_dir::write_json(&vm.usage_json(), sample)?)
}

/// The final usage of a VM whose qemu has exited: from its cgroup (which kept counting while
/// nobody watched), else from the persisted samples; never below `last`.
pub fn final_usage(vm: &VmDir, source: &UsageSource, last: Option<UsageSample>) -> UsageSample {
    let from_source = match source {
        UsageSource::Proc => read_usage_file(vm),
        cgroup => match read_source(vm.vm_id(), cgroup) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(vm_id = vm.vm_id(), error = %wnodes_bus::ErrorChain(&e), "Cannot read the VM's cgroup; using samples.");
                read_usage_file(vm)
            }
        },
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
        assert_eq!(parse_proc_stat_user_system(stat), Some((250, 50)));
        let status = "Name:\tqemu\nVmPeak:\t 9 kB\nVmHWM:\t   51200 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(51200 * 1024));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
    }

    #[test]
    fn oom_kill_counts_are_parsed_from_both_versions() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kill(v2), Some(1));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_oom_kill(v1), Some(3));
        assert_eq!(parse_oom_kill("oom_kill_disable 0\n"), None);
    }

    #[test]
    fn cgroup_files_are_parsed() {
        assert_eq!(
            parse_cpu_stat_v2("usage_usec 2500000\nuser_usec 2000000\n"),
            Some(2.5)
        );
        assert_eq!(parse_cpu_stat_v2("user_usec 1\n"), None);
        assert_eq!(
            parse_cpu_stat_v2_split("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"),
            Some((2.0, 0.5))
        );
        assert_eq!(
            parse_cpu_stat_v2_split("usage_usec 2500000\nuser_usec 2000000\n"),
            None
        );
        let hz = clock_ticks();
        assert_eq!(
            parse_cpuacct_stat("user 300\nsystem 40\n"),
            Some((300.0 / hz, 40.0 / hz))
        );
        assert_eq!(parse_cpuacct_stat("user 300\n"), None);
        assert_eq!(parse_cpuacct_usage("3400000000\n"), Some(3.4));
        assert_eq!(parse_cpuacct_usage("x"), None);
        assert_eq!(parse_pids("12\n345\n\n"), vec![12, 345]);
    }

    /// Fake v1 hierarchy roots: plain directories with the marker files.
    fn fake_v1(root: &Path) {
        for (dir, file) in [
            ("cpuacct", "cpuacct.usage"),
            ("memory", "memory.max_usage_in_bytes"),
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            std::fs::write(root.join(dir).join(file), "0\n").unwrap();
        }
    }

    #[test]
    fn the_source_is_chosen_from_what_the_host_has() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // A plain directory is not a cgroup2 mount.
        assert!(!cgroup2_usable(r));
        assert_eq!(CgroupHost::choose(r, false), None);
        assert_eq!(
            CgroupHost::choose(r, true),
            Some(CgroupHost::V2 {
                root: r.to_path_buf()
            })
        );
        // Only one v1 hierarchy: not enough.
        std::fs::create_dir(r.join("cpuacct")).unwrap();
        std::fs::write(r.join("cpuacct/cpuacct.usage"), "0").unwrap();
        std::fs::create_dir(r.join("memory")).unwrap();
        assert_eq!(CgroupHost::choose(r, false), None);
        fake_v1(r);
        let v1 = CgroupHost::V1 {
            cpuacct: r.join("cpuacct"),
            memory: r.join("memory"),
            cpu: None,
        };
        assert_eq!(CgroupHost::choose(r, false), Some(v1.clone()));
        assert_eq!(CgroupHost::detect(r), Some(v1));
        // A `cpu` hierarchy of its own: the cores are enforced there.
        std::fs::create_dir(r.join("cpu")).unwrap();
        std::fs::write(r.join("cpu/cpu.cfs_quota_us"), "-1\n").unwrap();
        let with_cpu = CgroupHost::choose(r, false).unwrap();
        assert_eq!(
            with_cpu,
            CgroupHost::V1 {
                cpuacct: r.join("cpuacct"),
                memory: r.join("memory"),
                cpu: Some(r.join("cpu")),
            }
        );
        let source = with_cpu
            .create(
                "vm-0123456789ab",
                Some(Limits {
                    memory_bytes: 1 << 30,
                    cores: 2,
                }),
            )
            .unwrap();
        let group = r.join("cpu/wnodes/vm-0123456789ab");
        assert!(group_dirs(&source).contains(&group.as_path()));
        assert_eq!(
            std::fs::read_to_string(group.join("cpu.cfs_quota_us")).unwrap(),
            "200000"
        );
        assert_eq!(
            std::fs::read_to_string(group.join("cpu.cfs_period_us")).unwrap(),
            "100000"
        );
        std::fs::remove_dir_all(r.join("cpu")).unwrap();
        // v2 wins when both are there.
        assert!(matches!(
            CgroupHost::choose(r, true),
            Some(CgroupHost::V2 { .. })
        ));
    }

    #[test]
    fn cgroup_v1_groups_are_created_attached_read_and_removed() {
        let root = tempfile::tempdir().unwrap();
        fake_v1(root.path());
        let host = CgroupHost::detect(root.path()).unwrap();
        let source = host.create("vm-0123456789ab", None).unwrap();
        let (cpuacct, memory) = match &source {
            UsageSource::CgroupV1 {
                cpuacct, memory, ..
            } => (cpuacct.clone(), memory.clone()),
            other => panic!("{other:?}"),
        };
        assert_eq!(cpuacct, root.path().join("cpuacct/wnodes/vm-0123456789ab"));
        assert_eq!(memory, root.path().join("memory/wnodes/vm-0123456789ab"));
        assert_eq!(
            std::fs::read_to_string(memory.join("memory.move_charge_at_immigrate")).unwrap(),
            "3"
        );
        // Removed before qemu starts: the wrapper qemu is started through creates it again and
        // joins it, keeping its pid across the exec.
        std::fs::remove_dir_all(&cpuacct).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(crate::qemu::JOIN_CGROUPS_AND_EXEC)
            .arg("wnodes-qemu")
            .args(group_dirs(&source).iter().map(|d| d.join("cgroup.procs")))
            .args(["--", "sh", "-c", "echo $$; echo \"$1\"", "sh", "a b; $(x)"])
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let mut lines = stdout.lines();
        let pid: u32 = lines.next().unwrap().parse().unwrap();
        assert_eq!(
            lines.next(),
            Some("a b; $(x)"),
            "arguments pass through as they are"
        );
        assert!(contains(&source, pid));
        assert!(!contains(&source, pid + 1));
        assert!(!contains(&UsageSource::Proc, pid));
        std::fs::write(cpuacct.join("cpuacct.usage"), "3400000000\n").unwrap();
        std::fs::write(memory.join("memory.max_usage_in_bytes"), "52428800\n").unwrap();
        let s = read_source("vm-0123456789ab", &source).unwrap();
        assert_eq!((s.cpu_seconds, s.peak_memory_bytes), (3.4, 52_428_800));
        std::fs::create_dir_all(root.path().join("memory/wnodes/not-a-vm")).unwrap();
        let listed = list_groups(&host);
        assert_eq!(
            listed.get("vm-0123456789ab"),
            Some(&vec![cpuacct.clone(), memory.clone()])
        );
        assert_eq!(listed.len(), 1);
        // Real cgroup directories hold only kernel files; empty the fake ones.
        for d in [&cpuacct, &memory] {
            for f in std::fs::read_dir(d).unwrap() {
                std::fs::remove_file(f.unwrap().path()).unwrap();
            }
        }
        remove_groups("vm-0123456789ab", &source);
        assert!(!cpuacct.exists() && !memory.exists());
        // Already gone is fine.
        remove_group_dir(&cpuacct).unwrap();
    }

    #[test]
    fn cgroup_v2_group_is_created_attached_and_read() {
        // A plain directory stands in for the cgroup2 mount (this host has cgroup v1).
        let root = tempfile::tempdir().unwrap();
        let host = CgroupHost::choose(root.path(), true).unwrap();
        let source = host.create("vm-0123456789ab", None).unwrap();
        let group = root.path().join("wnodes/vm-0123456789ab");
        assert_eq!(
            source,
            UsageSource::Cgroup {
                path: group.clone()
            }
        );
        attach("vm-0123456789ab", &source, 4242).unwrap();
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
        let s = read_source("vm-0123456789ab", &source).unwrap();
        assert_eq!((s.cpu_seconds, s.peak_memory_bytes), (2.5, 123_456_789));
        assert_eq!((s.cpu_user_seconds, s.cpu_system_seconds), (2.0, 0.5));
        assert!(attach("vm-0123456789ab", &UsageSource::Proc, 1).is_err());
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample_proc(std::process::id()).unwrap();
        assert!(s.peak_memory_bytes > 0);
        assert!(
            (s.cpu_user_seconds + s.cpu_system_seconds - s.cpu_seconds).abs() < 1e-9,
            "user + system is the total: {s:?}"
        );
        assert!(sample_proc(u32::MAX).is_none());
    }
}
