//! The `[scratch]` configuration section (env `WNODES_SCRATCH__...`).
//!
//! ```toml
//! [scratch]
//! backend = "file"              # or "lvm": one logical volume per VM ([scratch.lvm])
//! dir = "/var/lib/wnodes/scratch/volumes"   # file backend; default: <state_dir>/volumes
//! max_bytes = 68719476736       # largest volume one VM may get (64 GiB)
//! default_bytes = 1073741824    # size when the VmSpec asks for 0 (1 GiB)
//! mkfs = true                   # format new volumes as ext4 (the file or the LV's device, no mount)
//! mkfs_program = "mkfs.ext4"    # looked up in PATH unless absolute
//!
//! [scratch.lvm]                 # backend = "lvm" (see the lvm module)
//! vg = "vg_scratch"             # the volume group (it must exist)
//! lvm_program = "lvm"           # run as `lvm lvcreate ...`
//! losetup_program = "losetup"   # metadata-only mode
//! system_dir = "/etc/wnodes/lvm" # LVM_SYSTEM_DIR for the commands; default: lvm's own
//! wipe = true                   # zero the first MiB of a new LV
//! metadata_only = false         # hosts without device-mapper (tests): --driverloaded n, -an, -Zn,
//!                               # the LV's extents mapped through a loop device
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::lvm::{LvmConfig, is_valid_vg_name};

const GIB: u64 = 1 << 30;

/// Where scratch volumes come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A sparse raw file per VM in `dir`.
    #[default]
    File,
    /// A logical volume per VM in `[scratch.lvm] vg`.
    Lvm,
}

impl Backend {
    /// The name used in configuration and in `ScratchReady.backend`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Lvm => "lvm",
        }
    }
}

/// The service's own configuration section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScratchConfig {
    pub backend: Backend,
    /// Directory of the volume files; default `<state_dir>/volumes`.
    pub dir: Option<PathBuf>,
    /// Largest volume a VM may get (bytes).
    pub max_bytes: u64,
    /// Size given when `VmSpec.scratch_bytes` is 0 (bytes).
    pub default_bytes: u64,
    /// Format new volumes as ext4.
    pub mkfs: bool,
    /// The mkfs program (run with arguments, never through a shell).
    pub mkfs_program: PathBuf,
    /// The LVM backend's settings.
    pub lvm: LvmConfig,
}

impl Default for ScratchConfig {
    fn default() -> Self {
        Self {
            backend: Backend::File,
            dir: None,
            max_bytes: 64 * GIB,
            default_bytes: GIB,
            mkfs: true,
            mkfs_program: PathBuf::from("mkfs.ext4"),
            lvm: LvmConfig::default(),
        }
    }
}

/// A configuration that cannot be used; names the key.
#[derive(Debug, thiserror::Error)]
#[error("scratch.{key}: {problem}")]
pub struct ConfigError {
    pub key: &'static str,
    pub problem: String,
}

impl ScratchConfig {
    /// Checks the values against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backend == Backend::Lvm && !is_valid_vg_name(&self.lvm.vg) {
            return Err(ConfigError {
                key: "lvm.vg",
                problem: format!(
                    "{:?} is not a volume group name (1 to 127 of [A-Za-z0-9_+.-], not starting with -)",
                    self.lvm.vg
                ),
            });
        }
        if self.max_bytes == 0 {
            return Err(ConfigError {
                key: "max_bytes",
                problem: "must be greater than 0".into(),
            });
        }
        if self.default_bytes == 0 || self.default_bytes > self.max_bytes {
            return Err(ConfigError {
                key: "default_bytes",
                problem: format!(
                    "{} must be between 1 and max_bytes ({})",
                    self.default_bytes, self.max_bytes
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml_like(json: &str) -> ScratchConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_are_valid_and_lvm_needs_a_volume_group() {
        let c = ScratchConfig::default();
        c.validate().unwrap();
        assert_eq!(c.max_bytes, 64 << 30);
        assert_eq!(c.default_bytes, 1 << 30);
        let e = ScratchConfig {
            backend: Backend::Lvm,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("scratch.lvm.vg"), "{e}");
        let lvm: ScratchConfig =
            toml_like(r#"{"backend": "lvm", "lvm": {"vg": "vg_scratch", "metadata_only": true}}"#);
        lvm.validate().unwrap();
        assert!(lvm.lvm.metadata_only && lvm.lvm.wipe);
        let e = ScratchConfig {
            default_bytes: 128 << 30,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("scratch.default_bytes"), "{e}");
    }
}
