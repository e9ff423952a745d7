//! Host policy on the paths the launcher hands qemu: the disk image, kernel and initrd named
//! in `image.ready` must lie under `[launcher] image_roots` and the scratch volume named in
//! `scratch.ready` under `scratch_roots`, each a regular file, checked after resolving every
//! symlink and `..`. qemu then gets the resolved paths, so a link swapped after the check
//! changes nothing. A qcow2 image must be one, without a backing file ([`inspect_image`]). A
//! violation names its rule; nothing is started.
//!
//! Only file scratch volumes are allowed: an LVM volume (a block device) will need a rule of
//! its own (issue 14).

use std::path::{Path, PathBuf};

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
        if !(scratch.backend.is_empty() || scratch.backend == "file") {
            return Err(Violation {
                rule: "scratch.backend",
                reason: format!(
                    "scratch backend {:?}: this launcher starts VMs on file volumes only",
                    scratch.backend
                ),
            });
        }
        scratch.path = resolve_under(
            "scratch volume",
            &scratch.path,
            scratch_roots,
            "scratch_roots",
            "scratch.roots",
            "scratch.file",
        )?;
    }
    Ok((image, scratch))
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
        let (i, s) = check(&roots.0, &roots.1, &img, &scr).unwrap();
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

        let refused =
            |img: &ImageReady, scr: &ScratchReady| check(&roots.0, &roots.1, img, scr).unwrap_err();
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
        bad.backend = "lvm".into();
        assert_eq!(refused(&img, &bad).rule, "scratch.backend");
        // No scratch disk: nothing to check.
        let none = ScratchReady::default();
        assert!(check(&roots.0, &roots.1, &img, &none).is_ok());
    }
}
