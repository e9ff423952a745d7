//! The `lvm` backend: one logical volume per VM in a configured volume group, named after the
//! VM and tagged `wnodes`, `wnodes_vm=<vm_id>` and `wnodes_run=<run key>`.
//!
//! | step | command (arguments, never a shell) |
//! |---|---|
//! | free space | `lvm vgs --reportformat json --units b --nosuffix -o vg_name,vg_free,vg_extent_size <vg>` |
//! | what exists | `lvm lvs --reportformat json ... -o lv_name,lv_size,lv_tags,seg_pe_ranges <vg>` |
//! | create | `lvm lvcreate --yes -Wy -Zy -L <bytes>b -n <vm_id> --addtag ... <vg>` |
//! | activate | `lvm lvchange -ay <vg>/<vm_id>`; the device node `/dev/<vg>/<vm_id>` |
//! | hand over | wiped (first MiB zeroed) and/or formatted as configured, then owned by the VM's qemu user (`VmSpec.vm_user`), mode 0600 |
//! | release | `lvm lvchange --addtag wnodes_state=released <vg>/<vm_id>`, then `lvm lvremove -y <vg>/<vm_id>` |
//!
//! The `released` tag goes on first, so a release that crashed half-way is finished by the
//! start-up reconcile, which removes every `wnodes` LV whose tag says released, whose VM no
//! prepared row knows, or that names no VM at all.
//!
//! **Metadata-only mode** (`metadata_only = true`, for hosts without device-mapper such as the
//! project's machines and CI): every command gets `--driverloaded n`, `lvcreate` gets `-an -Zn
//! --contiguous y` instead of `-Wy -Zy`, nothing is activated, and the LV's extents are mapped
//! through a loop device at the LV's offset on its PV (`losetup --find --show --offset
//! <pe_start + first_pe * extent_size> --sizelimit <lv_size> <pv>`), recorded in a
//! `wnodes_loop=<device>` tag and detached at release. The loop device stands in for the
//! device node and is what the VM gets.

use std::{
    fmt::Write as _,
    io,
    path::{Path, PathBuf},
    process::Stdio,
};

use serde::{Deserialize, Serialize};
use wnodes_proto::v1::HostUser;

use crate::volume::{Space, VolumeError, is_valid_vm_id, run_mkfs};

/// The tag every LV of this service carries.
pub const TAG: &str = "wnodes";
const TAG_VM: &str = "wnodes_vm=";
const TAG_RUN: &str = "wnodes_run=";
const TAG_LOOP: &str = "wnodes_loop=";
/// The tag a release puts on before it removes the LV.
pub const TAG_RELEASED: &str = "wnodes_state=released";
/// Bytes zeroed at the start of a new volume when `wipe` is on.
const WIPE_BYTES: usize = 1 << 20;

/// The `[scratch.lvm]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LvmConfig {
    /// The volume group the VMs' LVs are made in (it must exist).
    pub vg: String,
    /// The `lvm` program (`lvm lvcreate ...`); looked up in PATH unless absolute.
    pub lvm_program: PathBuf,
    /// The `losetup` program (metadata-only mode).
    pub losetup_program: PathBuf,
    /// `LVM_SYSTEM_DIR` for the commands (a private `lvm.conf`); none: lvm's default.
    pub system_dir: Option<PathBuf>,
    /// Zero the first MiB of a new volume (old signatures and file systems gone).
    pub wipe: bool,
    /// Hosts without device-mapper (tests): `--driverloaded n`, no activation, the LV's
    /// extents mapped through a loop device.
    pub metadata_only: bool,
}

impl Default for LvmConfig {
    fn default() -> Self {
        Self {
            vg: String::new(),
            lvm_program: PathBuf::from("lvm"),
            losetup_program: PathBuf::from("losetup"),
            system_dir: None,
            wipe: true,
            metadata_only: false,
        }
    }
}

/// Whether `name` can be a volume group's name: 1 to 127 of `[A-Za-z0-9_+.-]`, not starting
/// with `-` and not `.` or `..`.
pub fn is_valid_vg_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+.-".contains(&b))
}

/// `size` rounded up to whole extents of `extent` bytes (what `lvcreate -L` allocates).
pub fn round_up(size: u64, extent: u64) -> u64 {
    if extent == 0 {
        return size;
    }
    size.div_ceil(extent).saturating_mul(extent)
}

/// A run key as an LVM tag value: characters LVM refuses in tags become `_`.
pub fn tag_value(s: &str) -> String {
    s.chars()
        .take(900)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+.-/=!:&#".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// One of this service's LVs, from `lvs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lv {
    pub name: String,
    pub size_bytes: u64,
    pub tags: Vec<String>,
    /// `seg_pe_ranges`: `<pv>:<first>-<last>` per segment.
    pub pe_ranges: String,
}

impl Lv {
    fn tag(&self, prefix: &str) -> Option<&str> {
        self.tags.iter().find_map(|t| t.strip_prefix(prefix))
    }

    /// The VM its `wnodes_vm=` tag names.
    pub fn vm_id(&self) -> Option<&str> {
        self.tag(TAG_VM)
    }

    /// The run its `wnodes_run=` tag names.
    pub fn run(&self) -> Option<&str> {
        self.tag(TAG_RUN)
    }

    /// The loop device its extents are mapped through (metadata-only mode).
    pub fn loop_device(&self) -> Option<&str> {
        self.tag(TAG_LOOP)
    }

    /// Whether a release tagged it.
    pub fn is_released(&self) -> bool {
        self.tags.iter().any(|t| t == TAG_RELEASED)
    }

    /// The PV and first extent of its only segment (`None` with several segments).
    pub fn single_segment(&self) -> Option<(&str, u64)> {
        let range = self.pe_ranges.trim();
        if range.is_empty() || range.contains([' ', ',']) {
            return None;
        }
        let (pv, extents) = range.rsplit_once(':')?;
        let first = extents.split_once('-')?.0.parse().ok()?;
        Some((pv, first))
    }
}

#[derive(Debug, Deserialize)]
struct Report {
    report: Vec<ReportPart>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ReportPart {
    lv: Vec<LvRow>,
    vg: Vec<VgRow>,
    pv: Vec<PvRow>,
}

#[derive(Debug, Deserialize)]
struct LvRow {
    lv_name: String,
    lv_size: String,
    #[serde(default)]
    lv_tags: String,
    #[serde(default)]
    seg_pe_ranges: String,
}

#[derive(Debug, Deserialize)]
struct VgRow {
    vg_free: String,
    vg_extent_size: String,
}

#[derive(Debug, Deserialize)]
struct PvRow {
    pv_name: String,
    pe_start: String,
    vg_name: String,
}

fn number(command: &str, field: &str, s: &str) -> Result<u64, VolumeError> {
    s.trim().parse().map_err(|_| VolumeError::Report {
        command: command.to_owned(),
        problem: format!("{field} {s:?} is not a number of bytes"),
    })
}

fn parse(command: &str, json: &[u8]) -> Result<Vec<ReportPart>, VolumeError> {
    serde_json::from_slice::<Report>(json)
        .map(|r| r.report)
        .map_err(|e| VolumeError::Report {
            command: command.to_owned(),
            problem: e.to_string(),
        })
}

/// This service's LVs in an `lvs --reportformat json` report: those tagged `wnodes`, one
/// entry per LV (an LV of several segments is reported once per segment; the ranges are
/// joined).
pub fn parse_lvs(json: &[u8]) -> Result<Vec<Lv>, VolumeError> {
    let mut out: Vec<Lv> = Vec::new();
    for row in parse("lvs", json)?.into_iter().flat_map(|p| p.lv) {
        let tags: Vec<String> = row
            .lv_tags
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        if !tags.iter().any(|t| t == TAG) {
            continue;
        }
        if let Some(lv) = out.iter_mut().find(|l| l.name == row.lv_name) {
            lv.pe_ranges.push(' ');
            lv.pe_ranges.push_str(&row.seg_pe_ranges);
            continue;
        }
        out.push(Lv {
            size_bytes: number("lvs", "lv_size", &row.lv_size)?,
            name: row.lv_name,
            tags,
            pe_ranges: row.seg_pe_ranges,
        });
    }
    Ok(out)
}

/// The volume group's free bytes and extent size from a `vgs --reportformat json` report.
pub fn parse_vgs(json: &[u8]) -> Result<(u64, u64), VolumeError> {
    let vg = parse("vgs", json)?
        .into_iter()
        .flat_map(|p| p.vg)
        .next()
        .ok_or_else(|| VolumeError::Report {
            command: "vgs".into(),
            problem: "no volume group in the report".into(),
        })?;
    Ok((
        number("vgs", "vg_free", &vg.vg_free)?,
        number("vgs", "vg_extent_size", &vg.vg_extent_size)?,
    ))
}

/// `pe_start` of PV `pv` in a `pvs --reportformat json` report, when it belongs to `vg`.
pub fn parse_pe_start(json: &[u8], pv: &str, vg: &str) -> Result<u64, VolumeError> {
    let row = parse("pvs", json)?
        .into_iter()
        .flat_map(|p| p.pv)
        .find(|r| r.pv_name == pv && r.vg_name == vg)
        .ok_or_else(|| VolumeError::Report {
            command: "pvs".into(),
            problem: format!("no physical volume {pv} in volume group {vg}"),
        })?;
    number("pvs", "pe_start", &row.pe_start)
}

/// The LVM backend of one volume group.
#[derive(Debug, Clone)]
pub struct LvmBackend {
    config: LvmConfig,
    mkfs: Option<PathBuf>,
}

impl LvmBackend {
    /// Checks the names; `mkfs` formats new volumes (`None`: unformatted).
    pub fn new(config: LvmConfig, mkfs: Option<PathBuf>) -> Result<Self, VolumeError> {
        if !is_valid_vg_name(&config.vg) {
            return Err(VolumeError::BadName {
                what: "volume group",
                name: config.vg.clone(),
            });
        }
        Ok(Self { config, mkfs })
    }

    pub fn config(&self) -> &LvmConfig {
        &self.config
    }

    /// `<vg>/<vm_id>`.
    pub fn lv_path(&self, vm_id: &str) -> String {
        format!("{}/{vm_id}", self.config.vg)
    }

    /// The device node LVM makes for an active LV: `/dev/<vg>/<vm_id>`.
    pub fn device_node(&self, vm_id: &str) -> PathBuf {
        Path::new("/dev").join(&self.config.vg).join(vm_id)
    }

    /// `--driverloaded n` in metadata-only mode.
    fn mode_args(&self) -> Vec<String> {
        if self.config.metadata_only {
            vec!["--driverloaded".into(), "n".into()]
        } else {
            Vec::new()
        }
    }

    fn report_args(&self, command: &str, fields: &str) -> Vec<String> {
        let mut a = vec![command.to_owned()];
        a.extend(self.mode_args());
        a.extend(
            [
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                fields,
            ]
            .map(str::to_owned),
        );
        a
    }

    /// `lvm vgs ...` for the free space and extent size.
    pub fn vgs_args(&self) -> Vec<String> {
        let mut a = self.report_args("vgs", "vg_name,vg_free,vg_extent_size");
        a.push(self.config.vg.clone());
        a
    }

    /// `lvm lvs ...` for this service's LVs.
    pub fn lvs_args(&self) -> Vec<String> {
        let mut a = self.report_args("lvs", "lv_name,lv_size,lv_tags,seg_pe_ranges");
        a.push(self.config.vg.clone());
        a
    }

    /// `lvm pvs ...` for the PVs' first extent offsets.
    pub fn pvs_args(&self) -> Vec<String> {
        self.report_args("pvs", "pv_name,pe_start,vg_name")
    }

    /// `lvm lvcreate ...` of the VM's LV.
    pub fn create_args(&self, vm_id: &str, run_key: &str, size_bytes: u64) -> Vec<String> {
        let mut a = vec!["lvcreate".to_owned()];
        a.extend(self.mode_args());
        if self.config.metadata_only {
            // No activation, so nothing can be zeroed or wiped; one segment, so one loop
            // device maps it.
            a.extend(["-an", "-Zn", "--contiguous", "y"].map(str::to_owned));
        } else {
            a.extend(["--yes", "-Wy", "-Zy"].map(str::to_owned));
        }
        a.extend([
            "-L".to_owned(),
            format!("{size_bytes}b"),
            "-n".to_owned(),
            vm_id.to_owned(),
            "--addtag".to_owned(),
            TAG.to_owned(),
            "--addtag".to_owned(),
            format!("{TAG_VM}{vm_id}"),
            "--addtag".to_owned(),
            format!("{TAG_RUN}{}", tag_value(run_key)),
            self.config.vg.clone(),
        ]);
        a
    }

    /// `lvm lvchange -ay <vg>/<vm_id>`: activation (not in metadata-only mode).
    pub fn activate_args(&self, vm_id: &str) -> Vec<String> {
        vec!["lvchange".into(), "-ay".into(), self.lv_path(vm_id)]
    }

    /// `lvm lvchange --addtag <tag> <vg>/<vm_id>`.
    pub fn add_tag_args(&self, vm_id: &str, tag: &str) -> Vec<String> {
        let mut a = vec!["lvchange".to_owned()];
        a.extend(self.mode_args());
        a.extend(["--addtag".to_owned(), tag.to_owned(), self.lv_path(vm_id)]);
        a
    }

    /// `lvm lvremove -y <vg>/<vm_id>` (deactivates an active LV first).
    pub fn remove_args(&self, vm_id: &str) -> Vec<String> {
        let mut a = vec!["lvremove".to_owned()];
        a.extend(self.mode_args());
        a.extend(["-y".to_owned(), self.lv_path(vm_id)]);
        a
    }

    /// `losetup --find --show --offset <offset> --sizelimit <size> <pv>`.
    pub fn loop_map_args(pv: &str, offset: u64, size: u64) -> Vec<String> {
        vec![
            "--find".into(),
            "--show".into(),
            "--offset".into(),
            offset.to_string(),
            "--sizelimit".into(),
            size.to_string(),
            pv.into(),
        ]
    }

    async fn run(&self, program: &Path, args: &[String]) -> Result<Vec<u8>, VolumeError> {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = &self.config.system_dir {
            cmd.env("LVM_SYSTEM_DIR", dir);
        }
        let out = cmd.output().await.map_err(|source| VolumeError::Run {
            program: program.display().to_string(),
            source,
        })?;
        if !out.status.success() {
            let mut command = program.display().to_string();
            for a in args {
                let _ = write!(command, " {a}");
            }
            // lvm's warnings about the mode it was asked for are noise here.
            let stderr: String = String::from_utf8_lossy(&out.stderr)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("WARNING: Activation disabled"))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(VolumeError::Failed {
                command,
                status: out.status.to_string(),
                stderr: stderr.chars().take(500).collect(),
            });
        }
        Ok(out.stdout)
    }

    async fn lvm(&self, args: &[String]) -> Result<Vec<u8>, VolumeError> {
        self.run(&self.config.lvm_program, args).await
    }

    /// This service's LVs in the volume group.
    pub async fn list(&self) -> Result<Vec<Lv>, VolumeError> {
        parse_lvs(&self.lvm(&self.lvs_args()).await?)
    }

    /// The VM's LV, if there is one.
    pub async fn find(&self, vm_id: &str) -> Result<Option<Lv>, VolumeError> {
        Ok(self.list().await?.into_iter().find(|l| l.name == vm_id))
    }

    /// The size of the VM's LV, `None` when there is none (or it was released).
    pub async fn size_of(&self, vm_id: &str) -> Result<Option<u64>, VolumeError> {
        Ok(self
            .find(vm_id)
            .await?
            .filter(|l| !l.is_released())
            .map(|l| l.size_bytes))
    }

    /// The volume group's free bytes (an LV is allocated in full: nothing is promised) and its
    /// extent size.
    pub async fn space(&self) -> Result<(Space, u64), VolumeError> {
        let (free, extent) = parse_vgs(&self.lvm(&self.vgs_args()).await?)?;
        Ok((
            Space {
                available: free,
                promised: 0,
            },
            extent,
        ))
    }

    /// Creates, activates (or maps) and hands over the VM's LV; returns its device. An LV of
    /// that name left by an earlier life is removed first; on failure nothing is left.
    pub async fn create(
        &self,
        vm_id: &str,
        run_key: &str,
        size_bytes: u64,
        owner: Option<&HostUser>,
    ) -> Result<PathBuf, VolumeError> {
        if !is_valid_vm_id(vm_id) {
            return Err(VolumeError::BadName {
                what: "logical volume",
                name: vm_id.to_owned(),
            });
        }
        self.remove(vm_id).await?;
        self.lvm(&self.create_args(vm_id, run_key, size_bytes))
            .await?;
        match self.hand_over(vm_id, owner).await {
            Ok(dev) => Ok(dev),
            Err(e) => {
                if let Err(undo) = self.remove(vm_id).await {
                    tracing::warn!(vm_id, error = %wnodes_bus::ErrorChain(&undo), "Cannot remove the LV of a failed creation; reconcile will.");
                }
                Err(e)
            }
        }
    }

    async fn hand_over(
        &self,
        vm_id: &str,
        owner: Option<&HostUser>,
    ) -> Result<PathBuf, VolumeError> {
        let dev = if self.config.metadata_only {
            self.map_loop(vm_id).await?
        } else {
            self.lvm(&self.activate_args(vm_id)).await?;
            self.device_node(vm_id)
        };
        if self.config.wipe {
            wipe(&dev).await?;
        }
        if let Some(program) = &self.mkfs {
            run_mkfs(program, &dev).await?;
        }
        if let Some(user) = owner {
            give(&dev, user)?;
        }
        Ok(dev)
    }

    /// Maps the LV's extents through a new loop device and tags the LV with it.
    async fn map_loop(&self, vm_id: &str) -> Result<PathBuf, VolumeError> {
        let lv = self.find(vm_id).await?.ok_or_else(|| VolumeError::Report {
            command: "lvs".into(),
            problem: format!("the new LV {} is not listed", self.lv_path(vm_id)),
        })?;
        let (pv, first) = lv.single_segment().ok_or_else(|| VolumeError::Report {
            command: "lvs".into(),
            problem: format!(
                "{} is not one contiguous segment ({:?}); a loop device cannot map it",
                self.lv_path(vm_id),
                lv.pe_ranges
            ),
        })?;
        let (_, extent) = self.space().await?;
        let pe_start = parse_pe_start(&self.lvm(&self.pvs_args()).await?, pv, &self.config.vg)?;
        let offset = pe_start + first * extent;
        let out = self
            .run(
                &self.config.losetup_program,
                &Self::loop_map_args(pv, offset, lv.size_bytes),
            )
            .await?;
        let dev = String::from_utf8_lossy(&out).trim().to_owned();
        if !dev.starts_with("/dev/loop") {
            return Err(VolumeError::Report {
                command: "losetup".into(),
                problem: format!("unexpected device {dev:?}"),
            });
        }
        let tagged = self
            .lvm(&self.add_tag_args(vm_id, &format!("{TAG_LOOP}{dev}")))
            .await;
        if let Err(e) = tagged {
            self.detach(&dev).await;
            return Err(e);
        }
        tracing::info!(
            vm_id,
            dev,
            offset,
            size = lv.size_bytes,
            "LV extents mapped through a loop device."
        );
        Ok(PathBuf::from(dev))
    }

    async fn detach(&self, dev: &str) {
        let args = ["-d".to_owned(), dev.to_owned()];
        if let Err(e) = self.run(&self.config.losetup_program, &args).await {
            tracing::warn!(dev, error = %wnodes_bus::ErrorChain(&e), "Cannot detach the loop device.");
        }
    }

    /// The device the VM's volume is on (the loop device in metadata-only mode).
    pub async fn device_of(&self, vm_id: &str) -> Result<Option<PathBuf>, VolumeError> {
        Ok(self.find(vm_id).await?.map(|lv| self.device(&lv)))
    }

    fn device(&self, lv: &Lv) -> PathBuf {
        match lv.loop_device() {
            Some(dev) => PathBuf::from(dev),
            None => self.device_node(&lv.name),
        }
    }

    /// Removes the VM's LV: tagged released, its loop device detached, removed. Returns
    /// whether there was one.
    pub async fn remove(&self, vm_id: &str) -> Result<bool, VolumeError> {
        let Some(lv) = self.find(vm_id).await? else {
            return Ok(false);
        };
        self.remove_lv(&lv).await?;
        Ok(true)
    }

    /// Removes one of this service's LVs (see [`LvmBackend::remove`]).
    pub async fn remove_lv(&self, lv: &Lv) -> Result<(), VolumeError> {
        if !lv.is_released() {
            self.lvm(&self.add_tag_args(&lv.name, TAG_RELEASED)).await?;
        }
        if let Some(dev) = lv.loop_device() {
            self.detach(dev).await;
        }
        self.lvm(&self.remove_args(&lv.name)).await?;
        Ok(())
    }
}

/// Zeroes the first MiB of `dev` (or all of it when smaller).
async fn wipe(dev: &Path) -> Result<(), VolumeError> {
    let dev = dev.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::{Seek, SeekFrom, Write};
        let io_err = |op, source| VolumeError::Io {
            op,
            path: dev.display().to_string(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&dev)
            .map_err(|e| io_err("open for wiping", e))?;
        let len = f.seek(SeekFrom::End(0)).map_err(|e| io_err("measure", e))?;
        f.seek(SeekFrom::Start(0)).map_err(|e| io_err("wipe", e))?;
        let n = usize::try_from(len).unwrap_or(WIPE_BYTES).min(WIPE_BYTES);
        f.write_all(&vec![0u8; n]).map_err(|e| io_err("wipe", e))?;
        f.sync_all().map_err(|e| io_err("fsync", e))
    })
    .await
    .map_err(|e| VolumeError::Io {
        op: "wipe",
        path: String::new(),
        source: io::Error::other(e),
    })?
}

/// Hands the device to the VM's qemu user, mode 0600 (as the launcher does for a file volume).
fn give(dev: &Path, user: &HostUser) -> Result<(), VolumeError> {
    use std::os::unix::fs::PermissionsExt;
    let io_err = |op, source| VolumeError::Io {
        op,
        path: dev.display().to_string(),
        source,
    };
    std::fs::set_permissions(dev, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_err("set the mode of", e))?;
    nix::unistd::chown(
        dev,
        Some(nix::unistd::Uid::from_raw(user.uid)),
        Some(nix::unistd::Gid::from_raw(user.gid)),
    )
    .map_err(|e| io_err("hand to the VM's user", e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(metadata_only: bool) -> LvmBackend {
        LvmBackend::new(
            LvmConfig {
                vg: "vg_scratch".into(),
                metadata_only,
                ..Default::default()
            },
            None,
        )
        .unwrap()
    }

    #[test]
    fn production_command_lines_create_activate_tag_and_remove() {
        let b = backend(false);
        assert_eq!(
            b.create_args("vm-0a1b", "T1/slurm/42 x/1", 1 << 30),
            [
                "lvcreate",
                "--yes",
                "-Wy",
                "-Zy",
                "-L",
                "1073741824b",
                "-n",
                "vm-0a1b",
                "--addtag",
                "wnodes",
                "--addtag",
                "wnodes_vm=vm-0a1b",
                "--addtag",
                "wnodes_run=T1/slurm/42_x/1",
                "vg_scratch"
            ]
        );
        assert_eq!(
            b.activate_args("vm-0a1b"),
            ["lvchange", "-ay", "vg_scratch/vm-0a1b"]
        );
        assert_eq!(
            b.device_node("vm-0a1b"),
            Path::new("/dev/vg_scratch/vm-0a1b")
        );
        assert_eq!(
            b.add_tag_args("vm-0a1b", TAG_RELEASED),
            [
                "lvchange",
                "--addtag",
                "wnodes_state=released",
                "vg_scratch/vm-0a1b"
            ]
        );
        assert_eq!(
            b.remove_args("vm-0a1b"),
            ["lvremove", "-y", "vg_scratch/vm-0a1b"]
        );
        assert_eq!(
            b.lvs_args(),
            [
                "lvs",
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "lv_name,lv_size,lv_tags,seg_pe_ranges",
                "vg_scratch"
            ]
        );
        assert_eq!(b.vgs_args().last().map(String::as_str), Some("vg_scratch"));
    }

    #[test]
    fn metadata_only_command_lines_never_touch_device_mapper() {
        let b = backend(true);
        let create = b.create_args("vm-0a1b", "T1/slurm/42/1", 64 << 20);
        assert_eq!(
            &create[..7],
            [
                "lvcreate",
                "--driverloaded",
                "n",
                "-an",
                "-Zn",
                "--contiguous",
                "y"
            ]
        );
        assert!(!create.iter().any(|a| a == "-Wy" || a == "-Zy"));
        for args in [
            b.lvs_args(),
            b.vgs_args(),
            b.pvs_args(),
            b.remove_args("vm-0a1b"),
            b.add_tag_args("vm-0a1b", "x"),
        ] {
            assert_eq!(&args[1..3], ["--driverloaded", "n"], "{args:?}");
        }
        assert_eq!(
            LvmBackend::loop_map_args("/dev/loop0", 1_074_790_400, 536_870_912),
            [
                "--find",
                "--show",
                "--offset",
                "1074790400",
                "--sizelimit",
                "536870912",
                "/dev/loop0"
            ]
        );
    }

    #[test]
    fn sizes_round_up_to_whole_extents() {
        assert_eq!(round_up(10 << 20, 4 << 20), 12 << 20);
        assert_eq!(round_up(16 << 20, 4 << 20), 16 << 20);
        assert_eq!(round_up(1, 4 << 20), 4 << 20);
        assert_eq!(round_up(5, 0), 5);
    }

    #[test]
    fn names_are_checked() {
        for good in ["vg0", "vg_scratch", "a.b+c-d"] {
            assert!(is_valid_vg_name(good), "{good}");
        }
        for bad in ["", "-vg", "..", "vg/x", "vg x", "vg;rm"] {
            assert!(!is_valid_vg_name(bad), "{bad}");
        }
        let e = LvmBackend::new(
            LvmConfig {
                vg: "vg;rm".into(),
                ..Default::default()
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("vg;rm"), "{e}");
    }

    /// As lvm2 2.03.16 printed it on this machine (`lvs --driverloaded n ...`).
    const LVS: &str = r#"  {
      "report": [
          {
              "lv": [
                  {"lv_name":"vm-abc", "lv_size":"67108864", "lv_tags":"wnodes,wnodes_run=T1/slurm/a/1,wnodes_vm=vm-abc", "seg_pe_ranges":"/dev/loop0:0-15"},
                  {"lv_name":"other", "lv_size":"4194304", "lv_tags":"", "seg_pe_ranges":"/dev/loop0:16-16"},
                  {"lv_name":"vm-old", "lv_size":"8388608", "lv_tags":"wnodes,wnodes_loop=/dev/loop3,wnodes_state=released,wnodes_vm=vm-old", "seg_pe_ranges":"/dev/loop0:17-17"},
                  {"lv_name":"vm-old", "lv_size":"8388608", "lv_tags":"wnodes,wnodes_loop=/dev/loop3,wnodes_state=released,wnodes_vm=vm-old", "seg_pe_ranges":"/dev/loop1:0-0"}
              ]
          }
      ]
  }"#;

    #[test]
    fn lvs_report_is_parsed_to_this_services_lvs() {
        let lvs = parse_lvs(LVS.as_bytes()).unwrap();
        assert_eq!(lvs.len(), 2, "{lvs:?}");
        let a = &lvs[0];
        assert_eq!(
            (a.name.as_str(), a.size_bytes, a.vm_id(), a.run()),
            ("vm-abc", 64 << 20, Some("vm-abc"), Some("T1/slurm/a/1"))
        );
        assert!(!a.is_released());
        assert_eq!(a.single_segment(), Some(("/dev/loop0", 0)));
        let old = &lvs[1];
        assert!(old.is_released());
        assert_eq!(old.loop_device(), Some("/dev/loop3"));
        assert_eq!(old.single_segment(), None, "two segments");
        let e = parse_lvs(b"{\"report\": [{\"lv\": [{\"lv_name\": \"x\", \"lv_size\": \"1G\", \"lv_tags\": \"wnodes\"}]}]}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lv_size") && e.contains("1G"), "{e}");
    }

    #[test]
    fn vgs_and_pvs_reports_are_parsed() {
        let vgs = br#"{"report": [{"vg": [{"vg_name":"wnodes_t", "vg_free":"197132288", "vg_extent_size":"4194304"}]}]}"#;
        assert_eq!(parse_vgs(vgs).unwrap(), (197_132_288, 4_194_304));
        assert!(parse_vgs(br#"{"report": [{"vg": []}]}"#).is_err());
        let pvs = br#"{"report": [{"pv": [{"pv_name":"/dev/loop0", "pe_start":"1048576", "vg_name":"wnodes_t"}]}]}"#;
        assert_eq!(
            parse_pe_start(pvs, "/dev/loop0", "wnodes_t").unwrap(),
            1_048_576
        );
        assert!(parse_pe_start(pvs, "/dev/loop0", "other").is_err());
    }
}
