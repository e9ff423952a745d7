//! The `[launcher]` config section (env `WNODES_LAUNCHER__...`) and the accelerator choice.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{confine::ConfinementConfig, policy::PolicyConfig, tuning::TuningConfig};

/// Which accelerator qemu uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelMode {
    /// Always KVM (production default where the CPU offers VT-x/AMD-V).
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
    /// KVM only when `/proc/cpuinfo` shows `vmx` or `svm`, else TCG.
    Auto,
}

/// The accelerator actually used for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// `"kvm"` or `"tcg"`, as on the qemu command line and in `VmRunning.accel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

impl AccelMode {
    /// Resolves the mode against the text of `/proc/cpuinfo` (never `kvm:tcg`: a KVM that opens
    /// and then hangs must not be tried).
    pub fn resolve(self, cpuinfo: &str) -> Accel {
        match self {
            Self::Kvm => Accel::Kvm,
            Self::Tcg => Accel::Tcg,
            Self::Auto => {
                let hw = cpuinfo
                    .lines()
                    .filter(|l| l.starts_with("flags"))
                    .flat_map(|l| l.split_whitespace())
                    .any(|f| f == "vmx" || f == "svm");
                if hw { Accel::Kvm } else { Accel::Tcg }
            }
        }
    }

    /// Resolves the mode on this machine.
    pub fn resolve_here(self) -> Accel {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        self.resolve(&cpuinfo)
    }
}

/// The launcher's own configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LauncherConfig {
    /// `kvm`, `tcg` or `auto`.
    pub accel: AccelMode,
    /// The qemu binary (looked up in `PATH` when relative).
    pub qemu_binary: PathBuf,
    /// `qemu-img`, which inspects a qcow2 image before it is started (looked up in `PATH`
    /// when relative).
    pub qemu_img_binary: PathBuf,
    /// Per-VM state directories; default `<state_dir>/vms`.
    pub vms_dir: Option<PathBuf>,
    /// A VM not started this long after `vm.requested` fails with phase `deadline`.
    #[serde(with = "humantime_serde")]
    pub prepare_deadline: Duration,
    /// Site policy.
    pub policy: PolicyConfig,
    /// What a VM's cgroup allows qemu beyond the guest's RAM (its own code, device
    /// emulation, and under TCG the translation cache); the group's memory limit is the
    /// spec's memory plus this, and a qemu that crosses it is killed (`stop_reason` `oom`).
    pub memory_overhead_bytes: u64,
    /// How long a finished VM's state directory (its console and output logs, usage, job
    /// record) is kept after its last write; then the housekeeping task removes it.
    #[serde(with = "humantime_serde")]
    pub vm_dir_retention: Duration,
    /// Host policy: the directories the disk images, kernels and initrds named in
    /// `image.ready` must lie in (after resolving symlinks); the image service's cache.
    pub image_roots: Vec<PathBuf>,
    /// Host policy: the same for the scratch volumes named in `scratch.ready`; the scratch
    /// service's volume directory.
    pub scratch_roots: Vec<PathBuf>,
    /// Host policy: the volume groups whose logical volumes may be a VM's scratch device
    /// (the scratch service's `lvm` backend); empty, no logical volume is. On a host without
    /// device-mapper a loop device over a file under `scratch_roots` stands for one.
    pub scratch_volume_groups: Vec<String>,
    /// How each VM's qemu is confined: its own uid, `-sandbox`.
    pub confinement: ConfinementConfig,
    /// The most serial output (console and payload output together) a VM may leave on the
    /// host, in bytes; a VM that writes more is stopped (`stop_reason` `output-limit`) and
    /// what is kept ends with a truncation marker. 0: no limit.
    pub output_limit_bytes: u64,
    /// Performance tunings per VO and queue: vCPU pinning, huge pages, KSM, the disks' cache,
    /// AIO and I/O thread (`docs/tuning.md`). Empty: qemu's defaults.
    pub tuning: TuningConfig,
}

impl Default for LauncherConfig {
    fn default() -> Self {
        Self {
            accel: AccelMode::Kvm,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            qemu_img_binary: PathBuf::from("qemu-img"),
            vms_dir: None,
            prepare_deadline: Duration::from_secs(120),
            policy: PolicyConfig::default(),
            vm_dir_retention: Duration::from_secs(7 * 24 * 3600),
            memory_overhead_bytes: 1 << 30,
            // The image and scratch services' defaults (state directories under
            // /var/lib/wnodes).
            image_roots: vec![PathBuf::from("/var/lib/wnodes/image/cache")],
            scratch_roots: vec![PathBuf::from("/var/lib/wnodes/scratch/volumes")],
            scratch_volume_groups: Vec::new(),
            confinement: ConfinementConfig::default(),
            output_limit_bytes: 64 << 20,
            tuning: TuningConfig::default(),
        }
    }
}

impl LauncherConfig {
    /// The VM state directory for a service whose state directory is `state_dir`.
    pub fn vms_dir(&self, state_dir: &Path) -> PathBuf {
        self.vms_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("vms"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launcher_section_is_read_from_toml() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wnodes.toml");
        std::fs::write(
            &path,
            r#"
site = "T1"
host = "hv1.example.org"
[launcher]
accel = "auto"
prepare_deadline = "30s"
vms_dir = "/srv/vms"
[launcher.policy]
network_mode = "user"
max_cores = 4
default_walltime = "2h"
vo_images = { atlas = "el9" }
[[launcher.policy.storage_exports]]
name = "home"
host_path = "/home"
guest_path = "/shared"
"#,
        )
        .unwrap();
        let cfg = wnodes_runtime::config::load::<LauncherConfig>("launcher", Some(&path))
            .unwrap()
            .service;
        assert_eq!(cfg.accel, AccelMode::Auto);
        assert_eq!(cfg.prepare_deadline, Duration::from_secs(30));
        assert_eq!(cfg.vms_dir(Path::new("/state")), PathBuf::from("/srv/vms"));
        assert_eq!(cfg.policy.max_cores, 4);
        assert_eq!(cfg.policy.default_cores, 1);
        assert_eq!(cfg.policy.default_walltime, Duration::from_secs(7200));
        assert_eq!(cfg.policy.storage_exports.len(), 1);
        assert!(!cfg.policy.storage_exports[0].read_only);
        cfg.policy.validate().unwrap();
        let defaults = LauncherConfig::default();
        assert_eq!(
            defaults.vms_dir(Path::new("/state")),
            PathBuf::from("/state/vms")
        );
        assert_eq!(defaults.prepare_deadline, Duration::from_secs(120));

        std::fs::write(
            &path,
            "site = \"T1\"\nhost = \"h\"\n[launcher]\naccel = \"fast\"\n",
        )
        .unwrap();
        let err =
            wnodes_runtime::config::load::<LauncherConfig>("launcher", Some(&path)).unwrap_err();
        assert!(err.to_string().contains("accel"), "{err}");
    }

    #[test]
    fn auto_chooses_kvm_only_with_vmx_or_svm() {
        let with = "processor : 0\nflags\t\t: fpu vme vmx sse\n";
        let without = "processor : 0\nflags\t\t: fpu vme sse hypervisor\n";
        assert_eq!(AccelMode::Auto.resolve(with), Accel::Kvm);
        assert_eq!(AccelMode::Auto.resolve("flags : svm"), Accel::Kvm);
        assert_eq!(AccelMode::Auto.resolve(without), Accel::Tcg);
        assert_eq!(AccelMode::Kvm.resolve(without), Accel::Kvm);
        assert_eq!(AccelMode::Tcg.resolve(with), Accel::Tcg);
    }
}
