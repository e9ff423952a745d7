//! Site policy: what VM a started job gets. Fills in what the job did not ask for, refuses
//! requests above the site's maxima or for a VO without an image, and derives the VM id.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use sha2::Digest;
use wnodes_proto::v1::{
    JobDescription, JobRunRef, NetworkMode, StorageExport, StorageMode, VmSpec, job_payload,
};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// Network mode names in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkModeConfig {
    /// virtio-net on a tap the network service creates.
    VirtioTap,
    /// qemu user-mode networking (no root; no per-VM filtering).
    User,
}

impl NetworkModeConfig {
    fn proto(self) -> NetworkMode {
        match self {
            Self::VirtioTap => NetworkMode::VirtioTap,
            Self::User => NetworkMode::User,
        }
    }
}

/// Storage mode names in the config: how a VM reaches its exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageModeConfig {
    /// SFTP over plain TCP, mounted with sshfs (the gateway's listener).
    Sshfs,
    /// NFSv4, to the VM's address only (the gateway's NFS server; needs a tap).
    Nfs,
}

impl StorageModeConfig {
    fn proto(self) -> StorageMode {
        match self {
            Self::Sshfs => StorageMode::Sshfs,
            Self::Nfs => StorageMode::Nfs,
        }
    }

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sshfs => "sshfs",
            Self::Nfs => "nfs",
        }
    }

    /// `only sshfs, nfs`, or `none` for an empty list.
    fn list(modes: &[Self]) -> String {
        if modes.is_empty() {
            return "none".into();
        }
        let names: Vec<&str> = modes.iter().map(|m| m.name()).collect();
        format!("only {}", names.join(", "))
    }

    fn of(mode: StorageMode) -> Option<Self> {
        match mode {
            StorageMode::Sshfs => Some(Self::Sshfs),
            StorageMode::Nfs => Some(Self::Nfs),
            StorageMode::Unspecified => None,
        }
    }
}

/// One storage export every VM gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub name: String,
    pub host_path: PathBuf,
    pub guest_path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// `[launcher.policy]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// VO name → image catalog name.
    pub vo_images: BTreeMap<String, String>,
    pub default_cores: u32,
    pub max_cores: u32,
    pub default_memory_bytes: u64,
    pub max_memory_bytes: u64,
    pub default_scratch_bytes: u64,
    pub max_scratch_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub default_walltime: Duration,
    pub network_mode: NetworkModeConfig,
    pub storage_exports: Vec<ExportConfig>,
    /// How VMs reach the exports, unless their VO or the job says otherwise.
    pub storage_mode: StorageModeConfig,
    /// VO name → storage mode for that VO's VMs.
    pub vo_storage_modes: BTreeMap<String, StorageModeConfig>,
    /// The modes a job may ask for itself (`JobDescription.storage_mode`); empty (the
    /// default): a job that asks is refused.
    pub job_storage_modes: Vec<StorageModeConfig>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            vo_images: BTreeMap::new(),
            default_cores: 1,
            max_cores: 64,
            default_memory_bytes: 256 * MIB,
            max_memory_bytes: 256 * GIB,
            default_scratch_bytes: GIB,
            max_scratch_bytes: 1024 * GIB,
            default_walltime: Duration::from_secs(24 * 3600),
            network_mode: NetworkModeConfig::VirtioTap,
            storage_exports: Vec::new(),
            storage_mode: StorageModeConfig::Sshfs,
            vo_storage_modes: BTreeMap::new(),
            job_storage_modes: Vec::new(),
        }
    }
}

/// Why a job gets no VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("no image configured for VO '{vo}'")]
    NoImage { vo: String },
    #[error("requested {resource} {requested} exceeds the site maximum {maximum}")]
    AboveMaximum {
        resource: &'static str,
        requested: u64,
        maximum: u64,
    },
    #[error("image '{hint}' requested by the job is not configured for any VO")]
    UnknownImage { hint: String },
    #[error(
        "image '{hint}' requested by the job belongs to VO '{owner}', not to the job's VO '{vo}'"
    )]
    ImageOfAnotherVo {
        hint: String,
        owner: String,
        vo: String,
    },
    #[error("the job has no payload")]
    NoPayload,
    #[error(
        "script_ref payloads are not supported by this launcher (only command and inline_script)"
    )]
    ScriptRefUnsupported,
    #[error("the job description has no run reference")]
    NoRun,
    #[error(
        "requested walltime {seconds} s + {nanos} ns is not a duration (negative, or nanoseconds out of 0..1e9)"
    )]
    BadWalltime { seconds: i64, nanos: i32 },
    #[error(
        "the job asks for storage mode {requested}; jobs may choose {} ([launcher.policy] job_storage_modes)",
        StorageModeConfig::list(allowed)
    )]
    StorageModeNotAllowed {
        /// The config spelling (`nfs`), or the unknown proto value.
        requested: String,
        allowed: Vec<StorageModeConfig>,
    },
}

/// A policy configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("launcher.policy: {0}")]
pub struct PolicyConfigError(pub String);

/// `"vm-" + first 12 hex digits of sha256(run key)`.
pub fn vm_id(run: &JobRunRef) -> String {
    let digest = sha2::Sha256::digest(wnodes_bus::event::run_key(run).as_bytes());
    format!("vm-{}", &hex::encode(digest)[..12])
}

/// True for a VM id as [`vm_id`] makes them (also safe as a directory name).
pub fn is_valid_vm_id(id: &str) -> bool {
    id.len() == 15
        && id.starts_with("vm-")
        && id[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl PolicyConfig {
    /// Checks the configuration (defaults within maxima, absolute export paths, sane names).
    pub fn validate(&self) -> Result<(), PolicyConfigError> {
        let err = |m: String| Err(PolicyConfigError(m));
        if self.default_cores == 0 || self.default_cores > self.max_cores {
            return err(format!(
                "default_cores {} must be between 1 and max_cores {}",
                self.default_cores, self.max_cores
            ));
        }
        if self.default_memory_bytes < 16 * MIB || self.default_memory_bytes > self.max_memory_bytes
        {
            return err(format!(
                "default_memory_bytes {} must be between 16 MiB and max_memory_bytes {}",
                self.default_memory_bytes, self.max_memory_bytes
            ));
        }
        if self.default_scratch_bytes > self.max_scratch_bytes {
            return err(format!(
                "default_scratch_bytes {} exceeds max_scratch_bytes {}",
                self.default_scratch_bytes, self.max_scratch_bytes
            ));
        }
        for (vo, image) in &self.vo_images {
            if !is_catalog_name(image) {
                return err(format!("vo_images.{vo}: bad image name {image:?}"));
            }
        }
        for e in &self.storage_exports {
            if !e.host_path.is_absolute() || !e.guest_path.is_absolute() {
                return err(format!(
                    "storage export '{}': host_path and guest_path must be absolute",
                    e.name
                ));
            }
        }
        if self.network_mode == NetworkModeConfig::User {
            // An NFS export is limited to the VM's address; in user mode every guest reaches
            // the host from 127.0.0.1, so the gateway refuses every such VM.
            let nfs = StorageModeConfig::Nfs;
            let mut keys = Vec::new();
            if self.storage_mode == nfs {
                keys.push("storage_mode".to_owned());
            }
            keys.extend(
                self.vo_storage_modes
                    .iter()
                    .filter(|(_, m)| **m == nfs)
                    .map(|(vo, _)| format!("vo_storage_modes.{vo}")),
            );
            if self.job_storage_modes.contains(&nfs) {
                keys.push("job_storage_modes".to_owned());
            }
            if !keys.is_empty() {
                return err(format!(
                    "network_mode \"user\" cannot serve NFS, which needs a tap (network_mode \"virtio_tap\"); nfs allowed by {}",
                    keys.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// The storage mode of a job's VM: the job's own request when the site lets jobs choose
    /// it, else its VO's, else the site's.
    fn storage_mode_for(&self, job: &JobDescription) -> Result<StorageModeConfig, PolicyError> {
        let requested = StorageMode::try_from(job.storage_mode).ok();
        match requested {
            Some(StorageMode::Unspecified) => {}
            Some(mode) => {
                if let Some(m) =
                    StorageModeConfig::of(mode).filter(|m| self.job_storage_modes.contains(m))
                {
                    return Ok(m);
                }
                return Err(PolicyError::StorageModeNotAllowed {
                    requested: StorageModeConfig::of(mode)
                        .map_or_else(|| mode.as_str_name().to_owned(), |m| m.name().to_owned()),
                    allowed: self.job_storage_modes.clone(),
                });
            }
            None => {
                return Err(PolicyError::StorageModeNotAllowed {
                    requested: format!("unknown value {}", job.storage_mode),
                    allowed: self.job_storage_modes.clone(),
                });
            }
        }
        Ok(self
            .vo_storage_modes
            .get(&job.vo)
            .copied()
            .unwrap_or(self.storage_mode))
    }

    /// Applies the policy to a started job.
    pub fn apply(&self, job: &JobDescription) -> Result<VmSpec, PolicyError> {
        let run = job.run.as_ref().ok_or(PolicyError::NoRun)?;
        let vo_image = self
            .vo_images
            .get(&job.vo)
            .ok_or_else(|| PolicyError::NoImage { vo: job.vo.clone() })?;
        // A job runs its own VO's image: a hint may name it, never another VO's.
        let image = if job.image_hint.is_empty() || job.image_hint == *vo_image {
            vo_image.clone()
        } else if let Some((owner, _)) = self.vo_images.iter().find(|(_, i)| **i == job.image_hint)
        {
            return Err(PolicyError::ImageOfAnotherVo {
                hint: job.image_hint.clone(),
                owner: owner.clone(),
                vo: job.vo.clone(),
            });
        } else {
            return Err(PolicyError::UnknownImage {
                hint: job.image_hint.clone(),
            });
        };
        let req = job.resources.unwrap_or_default();
        let pick = |resource: &'static str, requested: u64, default: u64, maximum: u64| {
            if requested == 0 {
                Ok(default)
            } else if requested > maximum {
                Err(PolicyError::AboveMaximum {
                    resource,
                    requested,
                    maximum,
                })
            } else {
                Ok(requested)
            }
        };
        let cores = pick(
            "cores",
            u64::from(req.cores),
            u64::from(self.default_cores),
            u64::from(self.max_cores),
        )?;
        let memory = pick(
            "memory_bytes",
            req.memory_bytes,
            self.default_memory_bytes,
            self.max_memory_bytes,
        )?;
        let scratch = pick(
            "scratch_bytes",
            req.scratch_bytes,
            self.default_scratch_bytes,
            self.max_scratch_bytes,
        )?;
        // Whole seconds (the watcher counts seconds), rounded up: a request under a second
        // gets one, never none (a walltime of 0 s is no limit at all).
        let walltime = match req.walltime {
            None
            | Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }) => prost_types::Duration {
                seconds: i64::try_from(self.default_walltime.as_secs()).unwrap_or(i64::MAX),
                nanos: 0,
            },
            Some(w) if w.seconds < 0 || !(0..1_000_000_000).contains(&w.nanos) => {
                return Err(PolicyError::BadWalltime {
                    seconds: w.seconds,
                    nanos: w.nanos,
                });
            }
            Some(w) => prost_types::Duration {
                seconds: w.seconds.saturating_add(i64::from(w.nanos > 0)),
                nanos: 0,
            },
        };
        let payload = job.payload.clone().ok_or(PolicyError::NoPayload)?;
        match payload.kind {
            None => return Err(PolicyError::NoPayload),
            Some(job_payload::Kind::ScriptRef(_)) => return Err(PolicyError::ScriptRefUnsupported),
            Some(_) => {}
        }
        let exports: Vec<StorageExport> = self
            .storage_exports
            .iter()
            .map(|e| StorageExport {
                name: e.name.clone(),
                host_path: e.host_path.display().to_string(),
                guest_path: e.guest_path.display().to_string(),
                read_only: e.read_only,
            })
            .collect();
        let storage_mode = if exports.is_empty() {
            StorageMode::Unspecified
        } else {
            self.storage_mode_for(job)?.proto()
        };
        Ok(VmSpec {
            vm_id: vm_id(run),
            image,
            cores: u32::try_from(cores).unwrap_or(u32::MAX),
            memory_bytes: memory,
            scratch_bytes: scratch,
            walltime: Some(walltime),
            network_mode: self.network_mode.proto() as i32,
            exports,
            storage_mode: storage_mode as i32,
            owner: job.owner.clone(),
            payload: Some(payload),
            vo: job.vo.clone(),
            queue: job.queue.clone(),
            // Chosen by the handler, within its transaction.
            vm_user: None,
        })
    }
}

/// An image catalog name: 1–64 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn is_catalog_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wnodes_proto::v1::{JobPayload, Lrms, ResourceRequest, ScriptRef};

    fn policy() -> PolicyConfig {
        PolicyConfig {
            vo_images: [("atlas".to_string(), "el9".to_string())].into(),
            max_cores: 8,
            max_memory_bytes: 16 * GIB,
            max_scratch_bytes: 10 * GIB,
            ..Default::default()
        }
    }

    fn job(vo: &str, resources: ResourceRequest) -> JobDescription {
        JobDescription {
            run: Some(JobRunRef {
                site: "INFN-T1".into(),
                lrms: Lrms::Htcondor as i32,
                job_id: "1001.0".into(),
                run_attempt: 1,
            }),
            vo: vo.into(),
            resources: Some(resources),
            payload: Some(JobPayload {
                kind: Some(job_payload::Kind::InlineScript(b"true".to_vec())),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_fill_in_what_was_not_asked() {
        let p = policy();
        p.validate().unwrap();
        let spec = p.apply(&job("atlas", ResourceRequest::default())).unwrap();
        assert_eq!(spec.image, "el9");
        assert_eq!(spec.cores, 1);
        assert_eq!(spec.memory_bytes, 256 * MIB);
        assert_eq!(spec.scratch_bytes, GIB);
        assert_eq!(spec.walltime.unwrap().seconds, 24 * 3600);
        assert!(is_valid_vm_id(&spec.vm_id), "{}", spec.vm_id);
        // Deterministic: sha256("INFN-T1/htcondor/1001.0/1").
        let d = sha2::Sha256::digest(b"INFN-T1/htcondor/1001.0/1");
        assert_eq!(spec.vm_id, format!("vm-{}", &hex::encode(d)[..12]));
    }

    #[test]
    fn the_storage_mode_comes_from_the_job_the_vo_or_the_site() {
        let mut p = policy();
        p.vo_images.insert("cms".into(), "el9".into());
        p.storage_exports = vec![ExportConfig {
            name: "home".into(),
            host_path: "/srv/home".into(),
            guest_path: "/shared".into(),
            read_only: false,
        }];
        p.vo_storage_modes
            .insert("cms".into(), StorageModeConfig::Nfs);
        let mode = |p: &PolicyConfig, vo: &str, asked: StorageMode| {
            let mut j = job(vo, ResourceRequest::default());
            j.storage_mode = asked as i32;
            p.apply(&j).map(|s| s.storage_mode)
        };
        let (sshfs, nfs) = (StorageMode::Sshfs as i32, StorageMode::Nfs as i32);
        assert_eq!(mode(&p, "atlas", StorageMode::Unspecified), Ok(sshfs));
        assert_eq!(mode(&p, "cms", StorageMode::Unspecified), Ok(nfs));
        // Jobs may not choose unless the site lets them.
        assert_eq!(
            mode(&p, "atlas", StorageMode::Nfs).unwrap_err().to_string(),
            "the job asks for storage mode nfs; jobs may choose none ([launcher.policy] job_storage_modes)"
        );
        p.job_storage_modes = vec![StorageModeConfig::Sshfs];
        assert_eq!(
            mode(&p, "atlas", StorageMode::Nfs).unwrap_err().to_string(),
            "the job asks for storage mode nfs; jobs may choose only sshfs ([launcher.policy] job_storage_modes)"
        );
        p.job_storage_modes = vec![StorageModeConfig::Nfs];
        assert_eq!(mode(&p, "atlas", StorageMode::Nfs), Ok(nfs));
        assert!(mode(&p, "cms", StorageMode::Sshfs).is_err());
        let mut odd = job("atlas", ResourceRequest::default());
        odd.storage_mode = 7;
        assert!(
            p.apply(&odd)
                .unwrap_err()
                .to_string()
                .contains("unknown value 7")
        );
        // Without exports there is nothing to mount.
        p.storage_exports.clear();
        assert_eq!(
            mode(&p, "cms", StorageMode::Unspecified),
            Ok(StorageMode::Unspecified as i32)
        );
    }

    /// A walltime under a second, or negative, once reached the watcher as 0 s: no limit.
    #[test]
    fn a_walltime_is_whole_seconds_never_zero_and_never_negative() {
        let p = policy();
        let wall = |seconds, nanos| {
            p.apply(&job(
                "atlas",
                ResourceRequest {
                    walltime: Some(prost_types::Duration { seconds, nanos }),
                    ..Default::default()
                },
            ))
            .map(|s| s.walltime.unwrap())
        };
        let secs = |d: prost_types::Duration| (d.seconds, d.nanos);
        assert_eq!(wall(0, 0).map(secs), Ok((24 * 3600, 0)));
        assert_eq!(wall(0, 1).map(secs), Ok((1, 0)));
        assert_eq!(wall(90, 500_000_000).map(secs), Ok((91, 0)));
        assert_eq!(wall(3600, 0).map(secs), Ok((3600, 0)));
        assert_eq!(wall(i64::MAX, 1).map(secs), Ok((i64::MAX, 0)));
        for (s, n) in [(-1, 0), (-5, 1), (0, -1), (1, 1_000_000_000)] {
            assert_eq!(
                wall(s, n),
                Err(PolicyError::BadWalltime {
                    seconds: s,
                    nanos: n
                })
            );
        }
    }

    #[test]
    fn nfs_with_user_mode_networking_is_a_config_error() {
        let mut p = policy();
        p.network_mode = NetworkModeConfig::User;
        assert_eq!(p.validate(), Ok(()));
        p.vo_storage_modes
            .insert("cms".into(), StorageModeConfig::Nfs);
        p.job_storage_modes = vec![StorageModeConfig::Sshfs, StorageModeConfig::Nfs];
        assert_eq!(
            p.validate().unwrap_err().to_string(),
            "launcher.policy: network_mode \"user\" cannot serve NFS, which needs a tap (network_mode \"virtio_tap\"); nfs allowed by vo_storage_modes.cms, job_storage_modes"
        );
        p.vo_storage_modes.clear();
        p.job_storage_modes.clear();
        p.storage_mode = StorageModeConfig::Nfs;
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .ends_with("nfs allowed by storage_mode")
        );
        // The same policy with taps is fine.
        p.network_mode = NetworkModeConfig::VirtioTap;
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn vo_without_image_is_refused() {
        let e = policy()
            .apply(&job("lhcb", ResourceRequest::default()))
            .unwrap_err();
        assert_eq!(e.to_string(), "no image configured for VO 'lhcb'");
    }

    #[test]
    fn requests_above_a_maximum_name_the_resource() {
        let p = policy();
        let e = p
            .apply(&job(
                "atlas",
                ResourceRequest {
                    cores: 9,
                    ..Default::default()
                },
            ))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "requested cores 9 exceeds the site maximum 8"
        );
        let e = p
            .apply(&job(
                "atlas",
                ResourceRequest {
                    memory_bytes: 17 * GIB,
                    ..Default::default()
                },
            ))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("requested memory_bytes 18253611008"),
            "{e}"
        );
        let e = p
            .apply(&job(
                "atlas",
                ResourceRequest {
                    scratch_bytes: 11 * GIB,
                    ..Default::default()
                },
            ))
            .unwrap_err();
        assert!(e.to_string().contains("scratch_bytes"), "{e}");
        assert!(
            p.apply(&job(
                "atlas",
                ResourceRequest {
                    cores: 8,
                    ..Default::default()
                }
            ))
            .is_ok()
        );
    }

    #[test]
    fn script_refs_and_unknown_images_are_refused() {
        let p = policy();
        let mut j = job("atlas", ResourceRequest::default());
        j.payload = Some(JobPayload {
            kind: Some(job_payload::Kind::ScriptRef(ScriptRef::default())),
            ..Default::default()
        });
        assert_eq!(p.apply(&j).unwrap_err(), PolicyError::ScriptRefUnsupported);
        let mut j = job("atlas", ResourceRequest::default());
        j.image_hint = "../etc".into();
        assert!(matches!(
            p.apply(&j).unwrap_err(),
            PolicyError::UnknownImage { .. }
        ));
    }

    #[test]
    fn a_job_may_name_its_own_vo_s_image_but_never_another_vo_s() {
        let mut p = policy();
        p.vo_images.insert("cms".into(), "cms-el9".into());
        let mut j = job("atlas", ResourceRequest::default());
        j.image_hint = "el9".into();
        assert_eq!(p.apply(&j).unwrap().image, "el9");
        j.image_hint = "cms-el9".into();
        let e = p.apply(&j).unwrap_err();
        assert_eq!(
            e,
            PolicyError::ImageOfAnotherVo {
                hint: "cms-el9".into(),
                owner: "cms".into(),
                vo: "atlas".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "image 'cms-el9' requested by the job belongs to VO 'cms', not to the job's VO 'atlas'"
        );
    }

    #[test]
    fn bad_config_is_refused() {
        let mut p = policy();
        p.default_cores = 9;
        assert!(p.validate().is_err());
        let mut p = policy();
        p.vo_images.insert("x".into(), "a/b".into());
        assert!(p.validate().is_err());
    }
}
