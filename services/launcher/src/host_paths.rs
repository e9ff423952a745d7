//! Host policy on the paths the launcher hands qemu: the disk image, kernel and initrd named
//! in `image.ready` must lie under `[launcher] image_roots` and the scratch volume named in
//! `scratch.ready` under `scratch_roots`, each a regular file, checked after resolving every
//! symlink and `..`. qemu then gets the resolved paths, so a link swapped after the check
//! changes nothing. A qcow2 image must be one, without a backing file ([`inspect_image`]). A
//! violation names its rule; nothing is started.
//!
//! A scratch volume of the `lvm` backend is a block device instead, allowed by a rule of its
//! own ([`check_lvm_device`]): a device-mapper node of a logical volume in one of `[launcher]
//! scratch_volume_groups` (the kernel's name for it, `<vg>-<lv>` in
//! `/sys/dev/block/M:m/dm/name`, says which), or, on a host without device-mapper (the
//! scratch service's `metadata_only` mode), a loop device whose backing file lies under
//! `scratch_roots`. Any other device, or a file, is refused.

use std::{
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use wnodes_proto::v1::{ImageReady, ScratchReady};
use wnodes_runtime::host_paths::{self, PathRefusal};

/// A rule of the host's policy that a preparation result breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: &'static str,
    pub reason: String,
}

/// `path` resolved, when it is a regular file under one of `roots`
/// ([`wnodes_runtime::host_paths::resolve_under`]).
fn resolve_under(
    what: &str,
    path: &str,
    roots: &[PathBuf],
    key: &'static str,
    rule_roots: &'static str,
    rule_file: &'static str,
) -> Result<String, Violation> {
    let v = |rule, reason| Violation { rule, reason };
    let real = host_paths::resolve_under(path, roots).map_err(|r| match r {
        PathRefusal::NotAbsolute => v(
            rule_file,
            format!("{what} {path:?} is not an absolute path"),
        ),
        PathRefusal::Unresolvable(e) => v(
            rule_file,
            format!("{what} {path:?} cannot be resolved: {e}"),
        ),
        PathRefusal::NoRoot => v(
            rule_roots,
            format!("{what} {path:?}: none of {roots:?} exists on this host ([launcher] {key})"),
        ),
        PathRefusal::Outside { real } => v(
            rule_roots,
            format!(
                "{what} {path:?} (resolved: {}) is outside {roots:?} ([launcher] {key})",
                real.display()
            ),
        ),
    })?;
    if !real.is_file() {
        return Err(v(
            rule_file,
            format!("{what} {path:?} is not a regular file"),
        ));
    }
    Ok(real.display().to_string())
}

/// The image and scratch results with every path resolved and checked.
pub fn check(
    image_roots: &[PathBuf],
    scratch_roots: &[PathBuf],
    scratch_volume_groups: &[String],
    image: &ImageReady,
    scratch: &ScratchReady,
) -> Result<(ImageReady, ScratchReady), Violation> {
    let img = |what, p: &str| {
        resolve_under(
            what,
            p,
            image_roots,
            "image_roots",
            "image.roots",
            "image.file",
        )
    };
    let mut image = image.clone();
    image.path = img("disk image", &image.path)?;
    if !image.kernel_path.is_empty() {
        image.kernel_path = img("kernel", &image.kernel_path)?;
    }
    if !image.initrd_path.is_empty() {
        image.initrd_path = img("initrd", &image.initrd_path)?;
    }
    let mut scratch = scratch.clone();
    if !scratch.path.is_empty() {
        scratch.path = match scratch.backend.as_str() {
            "" | "file" => resolve_under(
                "scratch volume",
                &scratch.path,
                scratch_roots,
                "scratch_roots",
                "scratch.roots",
                "scratch.file",
            )?,
            "lvm" => check_lvm_device(
                Path::new(SYS_DEV_BLOCK),
                &scratch.path,
                scratch_volume_groups,
                scratch_roots,
            )?,
            other => {
                return Err(Violation {
                    rule: "scratch.backend",
                    reason: format!(
                        "scratch backend {other:?}: this launcher starts VMs on file volumes and LVM logical volumes only"
                    ),
                });
            }
        };
    }
    Ok((image, scratch))
}

/// Where the kernel describes each block device by `major:minor`.
const SYS_DEV_BLOCK: &str = "/sys/dev/block";

/// The volume group and logical volume of a device-mapper name (`<vg>-<lv>`, each `-` in
/// either doubled): `None` when it is not one.
fn split_dm_name(name: &str) -> Option<(String, String)> {
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'-' {
            if b.get(i + 1) == Some(&b'-') {
                i += 2;
                continue;
            }
            let (vg, lv) = (&name[..i], &name[i + 1..]);
            if vg.is_empty() || lv.is_empty() {
                return None;
            }
            return Some((vg.replace("--", "-"), lv.replace("--", "-")));
        }
        i += 1;
    }
    None
}

/// The `lvm` backend's scratch device `path`, resolved, when the host allows it: a block
/// device that is a logical volume of one of `volume_groups` (by the device-mapper name the
/// kernel gives it under `sys_dev_block`), or a loop device whose backing file lies under
/// `scratch_roots` (metadata-only LVM, where the LV's extents are mapped through a loop).
pub fn check_lvm_device(
    sys_dev_block: &Path,
    path: &str,
    volume_groups: &[String],
    scratch_roots: &[PathBuf],
) -> Result<String, Violation> {
    let v = |rule, reason| Violation { rule, reason };
    let what = "scratch device";
    if !Path::new(path).is_absolute() {
        return Err(v(
            "scratch.device",
            format!("{what} {path:?} is not an absolute path"),
        ));
    }
    let real = std::fs::canonicalize(path).map_err(|e| {
        v(
            "scratch.device",
            format!("{what} {path:?} cannot be resolved: {e}"),
        )
    })?;
    let meta = std::fs::metadata(&real).map_err(|e| {
        v(
            "scratch.device",
            format!("{what} {path:?} cannot be read: {e}"),
        )
    })?;
    if !meta.file_type().is_block_device() {
        return Err(v(
            "scratch.device",
            format!("{what} {path:?} is not a block device"),
        ));
    }
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let sys = sys_dev_block.join(format!("{major}:{minor}"));
    let read = |rel: &str| {
        std::fs::read_to_string(sys.join(rel))
            .ok()
            .map(|s| s.trim_end_matches('\n').to_owned())
    };
    if let Some(name) = read("dm/name") {
        return match split_dm_name(&name) {
            Some((vg, _)) if volume_groups.contains(&vg) => Ok(real.display().to_string()),
            Some((vg, lv)) => Err(v(
                "scratch.lvm",
                format!(
                    "{what} {path:?} is logical volume {lv:?} of volume group {vg:?}, not one of {volume_groups:?} ([launcher] scratch_volume_groups)"
                ),
            )),
            None => Err(v(
                "scratch.lvm",
                format!("{what} {path:?} is device-mapper device {name:?}, not a logical volume"),
            )),
        };
    }
    if let Some(backing) = read("loop/backing_file") {
        return match host_paths::resolve_under(&backing, scratch_roots) {
            Ok(_) => Ok(real.display().to_string()),
            Err(_) => Err(v(
                "scratch.lvm",
                format!(
                    "{what} {path:?} is a loop device over {backing:?}, which is not under {scratch_roots:?} ([launcher] scratch_roots)"
                ),
            )),
        };
    }
    Err(v(
        "scratch.lvm",
        format!(
            "{what} {path:?} ({major}:{minor}) is neither a logical volume nor a loop device over a file under scratch_roots"
        ),
    ))
}

/// How long `qemu-img info` may take.
const INSPECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A qcow2 image is opened only without a backing file (qemu would open it as the qemu user,
/// wherever it points), and only when it is qcow2: `qemu-img info` with the declared format
/// (never probed) and without opening any backing file tells. A raw image has no backing
/// file and qemu is told its format: nothing to inspect.
pub async fn inspect_image(qemu_img: &Path, image: &ImageReady) -> Result<(), Violation> {
    if image.format != "qcow2" {
        return Ok(());
    }
    let v = |rule, reason| Violation { rule, reason };
    let out = tokio::time::timeout(
        INSPECT_TIMEOUT,
        tokio::process::Command::new(qemu_img)
            .args(["info", "--output=json", "--force-share", "-f", "qcow2"])
            .arg(&image.path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| {
        v(
            "image.format",
            format!(
                "`qemu-img info` of {:?} took longer than {INSPECT_TIMEOUT:?}",
                image.path
            ),
        )
    })?
    .map_err(|e| {
        v(
            "image.format",
            format!("cannot run {}: {e}", qemu_img.display()),
        )
    })?;
    if !out.status.success() {
        return Err(v(
            "image.format",
            format!(
                "{:?} is not a qcow2 image qemu-img can read: {}",
                image.path,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        v(
            "image.format",
            format!("`qemu-img info` of {:?} is not JSON: {e}", image.path),
        )
    })?;
    if info["format"] != "qcow2" {
        return Err(v(
            "image.format",
            format!(
                "{:?}: qemu-img reads format {}, not qcow2",
                image.path, info["format"]
            ),
        ));
    }
    if let Some(backing) = info.get("backing-filename") {
        return Err(v(
            "image.backing_file",
            format!(
                "{:?} is a qcow2 image with backing file {backing}: only images without a backing file are started",
                image.path
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(dir: &Path) -> (ImageReady, ScratchReady) {
        (
            ImageReady {
                path: dir.join("cache/disk.img").display().to_string(),
                kernel_path: dir.join("cache/vmlinux").display().to_string(),
                ..Default::default()
            },
            ScratchReady {
                path: dir.join("volumes/vm.img").display().to_string(),
                backend: "file".into(),
                ..Default::default()
            },
        )
    }

    /// With Debian's qemu-img (the launcher's tests need qemu anyway).
    #[tokio::test]
    async fn a_qcow2_with_a_backing_file_or_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = |name: &str, args: &[&str]| {
            let path = dir.path().join(name);
            let ok = std::process::Command::new("qemu-img")
                .arg("create")
                .args(args)
                .arg(&path)
                .arg("1M")
                .output()
                .expect("qemu-img (Debian's qemu-utils) is installed")
                .status
                .success();
            assert!(ok, "qemu-img create {name}");
            ImageReady {
                path: path.display().to_string(),
                format: "qcow2".into(),
                ..Default::default()
            }
        };
        let qemu_img = Path::new("qemu-img");
        let plain = img("plain.qcow2", &["-f", "qcow2"]);
        inspect_image(qemu_img, &plain).await.unwrap();
        let evil = img(
            "evil.qcow2",
            &["-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw"],
        );
        let v = inspect_image(qemu_img, &evil).await.unwrap_err();
        assert_eq!(v.rule, "image.backing_file", "{v:?}");
        assert!(v.reason.contains("/etc/shadow"), "{v:?}");
        let mut raw = img("raw.img", &["-f", "raw"]);
        let v = inspect_image(qemu_img, &raw).await.unwrap_err();
        assert_eq!(v.rule, "image.format", "{v:?}");
        raw.format = "raw".into();
        inspect_image(qemu_img, &raw).await.unwrap();
    }

    #[test]
    fn paths_resolve_under_their_roots_and_links_out_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["cache", "volumes"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        for f in ["cache/disk.img", "cache/vmlinux", "volumes/vm.img"] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        let roots = (vec![d.join("cache")], vec![d.join("volumes")]);
        let (img, scr) = ready(d);
        let (i, s) = check(&roots.0, &roots.1, &[], &img, &scr).unwrap();
        assert_eq!(
            i.path,
            d.join("cache/disk.img")
                .canonicalize()
                .unwrap()
                .display()
                .to_string()
        );
        assert_eq!(
            s.path,
            d.join("volumes/vm.img")
                .canonicalize()
                .unwrap()
                .display()
                .to_string()
        );

        let refused = |img: &ImageReady, scr: &ScratchReady| {
            check(&roots.0, &roots.1, &[], img, scr).unwrap_err()
        };
        // A link in the cache to a host file.
        std::os::unix::fs::symlink("/etc/passwd", d.join("cache/evil")).unwrap();
        let mut bad = img.clone();
        bad.path = d.join("cache/evil").display().to_string();
        assert_eq!(refused(&bad, &scr).rule, "image.roots");
        // `..` out of the cache.
        bad.path = format!("{}/../volumes/vm.img", d.join("cache").display());
        assert_eq!(refused(&bad, &scr).rule, "image.roots");
        // The kernel too.
        let mut bad = img.clone();
        bad.kernel_path = "/etc/shadow".into();
        assert_eq!(refused(&bad, &scr).rule, "image.roots");
        // A directory, a relative path, a missing file.
        let mut bad = img.clone();
        bad.path = d.join("cache").display().to_string();
        assert_eq!(refused(&bad, &scr).rule, "image.file");
        bad.path = "disk.img".into();
        assert_eq!(refused(&bad, &scr).rule, "image.file");
        // Scratch outside its root, or on a backend this launcher does not start.
        let mut bad = scr.clone();
        bad.path = d.join("cache/disk.img").display().to_string();
        assert_eq!(refused(&img, &bad).rule, "scratch.roots");
        let mut bad = scr.clone();
        bad.backend = "zfs".into();
        assert_eq!(refused(&img, &bad).rule, "scratch.backend");
        // An `lvm` volume must be a block device: the file volume is not one.
        bad.backend = "lvm".into();
        assert_eq!(refused(&img, &bad).rule, "scratch.device");
        // No scratch disk: nothing to check.
        let none = ScratchReady::default();
        assert!(check(&roots.0, &roots.1, &[], &img, &none).is_ok());
    }

    #[test]
    fn device_mapper_names_split_into_volume_group_and_volume() {
        let split = |n: &str| split_dm_name(n);
        assert_eq!(
            split("vg_scratch-vm--0123"),
            Some(("vg_scratch".into(), "vm-0123".into()))
        );
        assert_eq!(split("my--vg-lv"), Some(("my-vg".into(), "lv".into())));
        // Not a logical volume: no single dash, or an empty half.
        assert_eq!(split("mpatha"), None);
        assert_eq!(split("a--b"), None);
        assert_eq!(split("-lv"), None);
        assert_eq!(split("vg-"), None);
    }
}
