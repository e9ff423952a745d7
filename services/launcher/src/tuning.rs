//! `[launcher.tuning]`: the performance tunings of a VM as policy knobs, per VO and per queue
//! (`docs/tuning.md`). A profile names what it changes; what no profile sets stays qemu's
//! default and is not on the command line, so a launcher without this section starts qemu
//! exactly as before.
//!
//! Which profile applies, field by field: the job's queue's (`queues.<queue>`), else its VO's
//! (`vos.<vo>`), else `default`'s, else qemu's default. The result is a [`Tuning`], which
//! [`crate::qemu::build_args`] turns into options and [`crate::cores`] into pinned vCPUs.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A disk's host page cache mode (qemu's `-drive cache=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    /// `O_DIRECT`, the guest's flushes honoured: no host page cache.
    None,
    /// Host page cache, the guest's flushes honoured (qemu's default).
    Writeback,
    /// Host page cache, every write flushed.
    Writethrough,
    /// `O_DIRECT` and every write flushed.
    Directsync,
    /// Host page cache, the guest's flushes ignored (data lost on a host crash).
    Unsafe,
}

impl DiskCache {
    /// The value of `-drive cache=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Writeback => "writeback",
            Self::Writethrough => "writethrough",
            Self::Directsync => "directsync",
            Self::Unsafe => "unsafe",
        }
    }

    /// Whether the mode opens the file with `O_DIRECT` (`cache.direct=on`).
    pub fn direct(self) -> bool {
        matches!(self, Self::None | Self::Directsync)
    }

    /// What QMP `query-block` reports for a drive in this mode (its `inserted.cache`):
    /// `(writeback, direct, no-flush)`.
    pub fn qmp_flags(self) -> (bool, bool, bool) {
        match self {
            Self::None => (true, true, false),
            Self::Writeback => (true, false, false),
            Self::Writethrough => (false, false, false),
            Self::Directsync => (false, true, false),
            Self::Unsafe => (true, false, true),
        }
    }
}

/// How qemu submits a disk's I/O (`-drive aio=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskAio {
    /// A pool of worker threads (qemu's default).
    Threads,
    /// Linux native AIO (`io_submit`); needs `O_DIRECT`: cache `none` or `directsync`.
    Native,
    /// Linux `io_uring`.
    IoUring,
}

impl DiskAio {
    /// The value of `-drive aio=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Threads => "threads",
            Self::Native => "native",
            Self::IoUring => "io_uring",
        }
    }
}

/// One profile: each knob it sets. Unset knobs fall through (queue → VO → default → qemu).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TuningProfile {
    /// Pin each vCPU thread to one host core of `[launcher.tuning] host_cores`, chosen by the
    /// launcher's core allocator (VO grouping) and set from outside qemu.
    pub pin_vcpus: Option<bool>,
    /// Back the guest's RAM with 2 MiB huge pages (`memory-backend-memfd,hugetlb=on`, or a
    /// file on `hugepages_path`), preallocated at start: qemu fails to start when the host
    /// has too few free huge pages.
    pub hugepages: Option<bool>,
    /// KSM for the guest's RAM (`-machine mem-merge=on|off`; qemu's default is on, the
    /// kernel's `/sys/kernel/mm/ksm/run` decides whether anything is merged).
    pub mem_merge: Option<bool>,
    /// The disks' host cache mode.
    pub disk_cache: Option<DiskCache>,
    /// The disks' I/O submission.
    pub disk_aio: Option<DiskAio>,
    /// Run the disks' I/O in a qemu I/O thread of their own (`-object iothread`, the disks
    /// as `virtio-blk-pci` devices with `iothread=`), off the main loop.
    pub iothread: Option<bool>,
}

impl TuningProfile {
    /// `self`'s knobs where set, else `under`'s.
    fn over(&self, under: &Self) -> Self {
        Self {
            pin_vcpus: self.pin_vcpus.or(under.pin_vcpus),
            hugepages: self.hugepages.or(under.hugepages),
            mem_merge: self.mem_merge.or(under.mem_merge),
            disk_cache: self.disk_cache.or(under.disk_cache),
            disk_aio: self.disk_aio.or(under.disk_aio),
            iothread: self.iothread.or(under.iothread),
        }
    }
}

/// `[launcher.tuning]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TuningConfig {
    /// The host cores pinned vCPUs are placed on, as a CPU list (`"2-7,10"`); unset: the
    /// CPUs the launcher itself may run on.
    pub host_cores: Option<String>,
    /// Place a VO's pinned VMs on the same host cores: a core already used by another VO is
    /// taken last, and among the rest the ones nearest the VO's own (see [`crate::cores`]).
    pub vo_grouping: bool,
    /// Where the huge-page memory backend creates its file (a hugetlbfs mount the VM's user
    /// can write); unset: an anonymous `memfd` on the kernel's own hugetlbfs.
    pub hugepages_path: Option<std::path::PathBuf>,
    /// Every VM's profile.
    pub default: TuningProfile,
    /// VO name → profile, over `default`.
    pub vos: BTreeMap<String, TuningProfile>,
    /// Queue (LRMS queue, partition, pool) → profile, over the VO's.
    pub queues: BTreeMap<String, TuningProfile>,
}

/// What a VM gets: the knobs of its profiles, resolved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tuning {
    pub pin_vcpus: bool,
    pub hugepages: bool,
    /// `None`: qemu's default (not on the command line).
    pub mem_merge: Option<bool>,
    pub disk_cache: Option<DiskCache>,
    pub disk_aio: Option<DiskAio>,
    pub iothread: bool,
}

/// What a VM's launch needs of its tuning: the resolved knobs, the host cores its vCPUs get
/// (from [`crate::cores::allocate`], stored in the VM table) and where huge pages come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmTuning {
    pub tuning: Tuning,
    /// vCPU i → `host_cores[i]`; empty: not pinned.
    pub host_cores: Vec<u32>,
    /// `[launcher.tuning] hugepages_path`.
    pub hugepages_path: Option<std::path::PathBuf>,
}

/// A tuning configuration that cannot work; names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("launcher.tuning.{key}: {reason}")]
pub struct TuningConfigError {
    pub key: String,
    pub reason: String,
}

/// The size of the huge pages the launcher asks for (x86-64's default), in MiB.
pub const HUGEPAGE_MIB: u64 = 2;

/// The most CPUs a host core list may name.
const MAX_CPU: u32 = 4095;

/// Parses a CPU list as the kernel writes it (`"0-3,8,10-11"`): sorted, without duplicates.
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, String> {
    let mut cores = BTreeSet::new();
    for part in text.trim().split(',') {
        let part = part.trim();
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let num = |s: &str| {
            s.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= MAX_CPU)
                .ok_or_else(|| format!("{part:?} is not a CPU number or range 0-{MAX_CPU}"))
        };
        let (first, last) = (num(first)?, num(last)?);
        if first > last {
            return Err(format!("{part:?} is a range that ends before it starts"));
        }
        cores.extend(first..=last);
    }
    Ok(cores.into_iter().collect())
}

impl TuningConfig {
    /// The profile of a VM of `vo` from `queue`, knob by knob: queue over VO over default.
    pub fn resolve(&self, vo: &str, queue: &str) -> Tuning {
        let none = TuningProfile::default();
        let vo = self.vos.get(vo).unwrap_or(&none);
        let queue = self.queues.get(queue).unwrap_or(&none);
        let p = queue.over(&vo.over(&self.default));
        Tuning {
            pin_vcpus: p.pin_vcpus.unwrap_or(false),
            hugepages: p.hugepages.unwrap_or(false),
            mem_merge: p.mem_merge,
            disk_cache: p.disk_cache,
            disk_aio: p.disk_aio,
            iothread: p.iothread.unwrap_or(false),
        }
    }

    /// The configured host cores (`None`: the launcher's own CPUs).
    pub fn host_cores(&self) -> Result<Option<Vec<u32>>, TuningConfigError> {
        self.host_cores
            .as_deref()
            .map(|text| {
                parse_cpu_list(text).map_err(|reason| TuningConfigError {
                    key: "host_cores".into(),
                    reason,
                })
            })
            .transpose()
    }

    /// Checks the section: the core list, the huge-page path, and every combination a VM can
    /// get (each VO with each queue) for knobs that exclude each other.
    pub fn validate(&self) -> Result<(), TuningConfigError> {
        self.host_cores()?;
        if let Some(p) = &self.hugepages_path {
            crate::qemu::option_path("hugepages_path", p).map_err(|e| TuningConfigError {
                key: "hugepages_path".into(),
                reason: e.to_string(),
            })?;
        }
        for vo in self.vos.keys() {
            check_name(vo, "vos")?;
        }
        for queue in self.queues.keys() {
            check_name(queue, "queues")?;
        }
        let vos = std::iter::once(None).chain(self.vos.keys().map(Some));
        for vo in vos {
            let queues = std::iter::once(None).chain(self.queues.keys().map(Some));
            for queue in queues {
                let t = self.resolve(vo.map_or("", |v| v), queue.map_or("", |q| q));
                if let Err(reason) = t.check() {
                    let key = match (vo, queue) {
                        (_, Some(q)) => format!("queues.{q}"),
                        (Some(v), None) => format!("vos.{v}"),
                        (None, None) => "default".into(),
                    };
                    let with = match (vo, queue) {
                        (Some(v), Some(_)) => format!(" (over vos.{v})"),
                        _ => String::new(),
                    };
                    return Err(TuningConfigError {
                        key,
                        reason: format!("{reason}{with}"),
                    });
                }
            }
        }
        Ok(())
    }
}

fn check_name(name: &str, table: &str) -> Result<(), TuningConfigError> {
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err(TuningConfigError {
            key: format!("{table}.{name:?}"),
            reason: "a name must be non-empty and without control characters".into(),
        });
    }
    Ok(())
}

impl Tuning {
    /// Knobs that exclude each other (also checked when qemu's arguments are built).
    pub fn check(&self) -> Result<(), String> {
        if self.disk_aio == Some(DiskAio::Native) && !self.disk_cache.is_some_and(DiskCache::direct)
        {
            return Err(
                "disk_aio = \"native\" needs O_DIRECT: disk_cache = \"none\" or \"directsync\""
                    .into(),
            );
        }
        if self.hugepages && self.mem_merge == Some(true) {
            return Err(
                "mem_merge = true with hugepages = true: KSM never merges huge pages".into(),
            );
        }
        Ok(())
    }

    /// True when nothing is tuned: qemu's command line is the untuned one.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str) -> Result<crate::LauncherConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wnodes.toml");
        std::fs::write(&path, format!("site = \"T1\"\nhost = \"h\"\n{toml}")).unwrap();
        wnodes_runtime::config::load::<crate::LauncherConfig>("launcher", Some(&path))
            .map(|c| c.service)
            .map_err(|e| wnodes_bus::ErrorChain(&e).to_string())
    }

    #[test]
    fn no_section_tunes_nothing() {
        let cfg = load("[launcher]\n").unwrap();
        assert_eq!(cfg.tuning, TuningConfig::default());
        let t = cfg.tuning.resolve("atlas", "long");
        assert!(t.is_default(), "{t:?}");
        cfg.tuning.validate().unwrap();
    }

    #[test]
    fn the_queue_wins_over_the_vo_over_the_default_knob_by_knob() {
        let cfg = load(
            r#"
[launcher.tuning]
host_cores = "2-5,8"
vo_grouping = true
[launcher.tuning.default]
disk_cache = "none"
disk_aio = "native"
mem_merge = true
[launcher.tuning.vos.atlas]
pin_vcpus = true
iothread = true
[launcher.tuning.queues.hpc]
hugepages = true
mem_merge = false
disk_cache = "directsync"
pin_vcpus = false
"#,
        )
        .unwrap();
        let t = &cfg.tuning;
        t.validate().unwrap();
        assert_eq!(t.host_cores().unwrap(), Some(vec![2, 3, 4, 5, 8]));
        assert!(t.vo_grouping);
        assert_eq!(
            t.resolve("cms", "short"),
            Tuning {
                mem_merge: Some(true),
                disk_cache: Some(DiskCache::None),
                disk_aio: Some(DiskAio::Native),
                ..Tuning::default()
            }
        );
        assert_eq!(
            t.resolve("atlas", "short"),
            Tuning {
                pin_vcpus: true,
                iothread: true,
                mem_merge: Some(true),
                disk_cache: Some(DiskCache::None),
                disk_aio: Some(DiskAio::Native),
                ..Tuning::default()
            }
        );
        assert_eq!(
            t.resolve("atlas", "hpc"),
            Tuning {
                pin_vcpus: false,
                hugepages: true,
                iothread: true,
                mem_merge: Some(false),
                disk_cache: Some(DiskCache::Directsync),
                disk_aio: Some(DiskAio::Native),
            }
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = load("[launcher.tuning.default]\ndisk_cache = \"fast\"\n").unwrap_err();
        assert!(err.contains("disk_cache"), "{err}");
        let err = load("[launcher.tuning.vos.atlas]\npin = true\n").unwrap_err();
        assert!(err.contains("pin"), "{err}");
        // The service's own check (what `--check-config` and the start run) names it.
        use wnodes_runtime::Service as _;
        let cfg = load("[launcher.tuning]\nhost_cores = \"3-1\"\n").unwrap();
        let err = crate::Launcher::validate(&cfg).unwrap_err();
        let err = wnodes_bus::ErrorChain(&err).to_string();
        assert!(err.contains("launcher.tuning.host_cores"), "{err}");

        let invalid = |toml: &str| load(toml).unwrap().tuning.validate().unwrap_err();
        let e = invalid("[launcher.tuning]\nhost_cores = \"0,x\"\n");
        assert_eq!(e.key, "host_cores");
        let e = invalid("[launcher.tuning]\nhugepages_path = \"hp,mem-path=/etc\"\n");
        assert_eq!(e.key, "hugepages_path");
        let e = invalid("[launcher.tuning.default]\ndisk_aio = \"native\"\n");
        assert_eq!(e.key, "default");
        assert!(e.to_string().contains("O_DIRECT"), "{e}");
        // Each alone is fine; the queue's cache under the VO's native AIO is not.
        let e = invalid(
            "[launcher.tuning.vos.atlas]\ndisk_aio = \"native\"\ndisk_cache = \"none\"\n\
             [launcher.tuning.queues.short]\ndisk_cache = \"writeback\"\n",
        );
        assert_eq!(e.key, "queues.short");
        assert!(e.reason.ends_with("(over vos.atlas)"), "{e}");
        let e = invalid("[launcher.tuning.vos.cms]\nhugepages = true\nmem_merge = true\n");
        assert_eq!(e.key, "vos.cms");
        assert!(e.to_string().contains("KSM"), "{e}");
    }

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list("1,1,0-1").unwrap(), vec![0, 1]);
        for bad in ["", "a", "1-", "-1", "2-1", "0,,1", "5000", "1 2"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cache_modes_and_their_qmp_flags() {
        assert!(DiskCache::None.direct() && DiskCache::Directsync.direct());
        assert!(!DiskCache::Writeback.direct());
        assert_eq!(DiskCache::Writethrough.qmp_flags(), (false, false, false));
        assert_eq!(DiskAio::IoUring.as_str(), "io_uring");
    }
}
