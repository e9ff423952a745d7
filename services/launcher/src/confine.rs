//! Confinement of each VM's qemu (`[launcher.confinement]`): a host account of its own, the
//! files it may touch, the wrapper that drops to that account, and giving everything back.
//!
//! - **Allocation.** At `job.started` the handler picks the lowest uid of the configured range
//!   that no live VM of this host holds (`launcher_vms`, in the same transaction) and that no
//!   running process has ([`pick_uid`]); it goes into `VmSpec.vm_user` (uid = gid), so the
//!   network service makes the VM's tap owned by it.
//! - **Files.** [`prepare_dirs`]: the VM directory becomes `root:<gid>` mode 0750 (qemu may
//!   enter it and read `job.sh`, mode 0640, but not the launcher's own records, mode 0600);
//!   `qemu/` inside is `<uid>:root` mode 2770, where qemu writes its pid file, QMP sockets,
//!   serial files and `-snapshot` overlay (group root through the set-gid bit, so the launcher
//!   reads and connects without `CAP_DAC_OVERRIDE`); [`give`] hands the scratch volume to
//!   the uid (mode 0600). [`check_reachable`] names the directory that would stop qemu.
//! - **The wrapper** ([`wrapper_args`]): `setsid` (own session: qemu survives the launcher)
//!   and `setpriv --reuid --regid --clear-groups --no-new-privs` exec qemu already detached
//!   and unprivileged; qemu itself runs with `-sandbox` ([`SANDBOX`]).
//! - **Giving back** ([`reclaim`]): once qemu has exited, everything goes back to root, so a
//!   later VM that gets the same uid finds nothing of this one.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};
use wnodes_proto::v1::HostUser;

use crate::vm_dir::VmDir;

/// qemu's seccomp filter: deny obsolete system calls, any change of uid/gid, `fork`/`execve`
/// (no helper process, whatever a QMP client or the guest asks) and scheduler/affinity
/// changes (no tuning here needs `resourcecontrol`: the launcher pins nothing).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The lowest uid a VM may get: never root or a system account.
pub const MIN_VM_UID: u32 = 1000;

/// `[launcher.confinement]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfinementConfig {
    /// Run each VM's qemu as a uid (and gid) of its own from the range below. Needs a
    /// launcher running as root with `CAP_SETUID`, `CAP_SETGID` and `CAP_CHOWN`. Off: qemu
    /// runs as the launcher's own user (a developer's laptop).
    pub vm_users: bool,
    /// The first uid of the range (at least 1000; keep it clear of the site's users and of
    /// the job uids the gateway maps to).
    pub vm_uid_first: u32,
    /// How many uids the range holds: the most VMs this host runs at once.
    pub vm_uid_count: u32,
    /// Start qemu with `-sandbox` ([`SANDBOX`]).
    pub sandbox: bool,
    /// `setpriv` (util-linux), which drops to the VM's uid and execs qemu.
    pub setpriv_binary: PathBuf,
    /// `setsid` (util-linux), which gives qemu a session of its own.
    pub setsid_binary: PathBuf,
}

impl Default for ConfinementConfig {
    fn default() -> Self {
        Self {
            vm_users: true,
            // Far above the ranges sites give people (and /etc/subuid's 100000 + 65536·n).
            vm_uid_first: 3_000_000_000,
            vm_uid_count: 65_536,
            sandbox: true,
            setpriv_binary: PathBuf::from("setpriv"),
            setsid_binary: PathBuf::from("setsid"),
        }
    }
}

/// A confinement problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error(
        "confinement.vm_uid_first {first} with vm_uid_count {count}: the range must hold at least one uid, start at {MIN_VM_UID} or above and end below 4294967295"
    )]
    BadRange { first: u32, count: u32 },
    #[error(
        "confinement.vm_users needs the launcher to run as root (euid is {euid}); set it to false to run qemu as the launcher's own user"
    )]
    NotRoot { euid: u32 },
    #[error("no free VM uid in {first}..={last}: every one is held by a live VM or a process")]
    Exhausted { first: u32, last: u32 },
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot inspect {at} on the way to {what} {path}")]
    Inspect {
        what: &'static str,
        path: PathBuf,
        at: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{what} {path} cannot be {how} by the VM's user {uid}:{gid}: {blocker} (mode {mode:o}, owner {owner}:{group})"
    )]
    Unreachable {
        what: &'static str,
        path: PathBuf,
        how: &'static str,
        uid: u32,
        gid: u32,
        blocker: String,
        mode: u32,
        owner: u32,
        group: u32,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ConfineError + 'a {
    move |source| ConfineError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl ConfinementConfig {
    /// The range, checked.
    pub fn range(&self) -> Result<std::ops::RangeInclusive<u32>, ConfineError> {
        let bad = || ConfineError::BadRange {
            first: self.vm_uid_first,
            count: self.vm_uid_count,
        };
        if self.vm_uid_count == 0 || self.vm_uid_first < MIN_VM_UID {
            return Err(bad());
        }
        let last = self
            .vm_uid_first
            .checked_add(self.vm_uid_count - 1)
            .filter(|l| *l < u32::MAX)
            .ok_or_else(bad)?;
        Ok(self.vm_uid_first..=last)
    }

    /// Checks the section against this process: the range, and root when `vm_users` is on.
    pub fn validate(&self) -> Result<(), ConfineError> {
        self.range()?;
        let euid = Uid::effective().as_raw();
        if self.vm_users && euid != 0 {
            return Err(ConfineError::NotRoot { euid });
        }
        Ok(())
    }
}

/// The lowest uid of `range` neither `taken` (by a live VM) nor `busy` (some process's).
pub fn pick_uid(
    range: std::ops::RangeInclusive<u32>,
    taken: &BTreeSet<u32>,
    busy: &BTreeSet<u32>,
) -> Result<u32, ConfineError> {
    let (first, last) = (*range.start(), *range.end());
    range
        .into_iter()
        .find(|u| !taken.contains(u) && !busy.contains(u))
        .ok_or(ConfineError::Exhausted { first, last })
}

/// The real and effective uids of every process on the host (`/proc/*/status`): a uid a
/// leftover qemu still runs as is not handed out again.
pub fn process_uids() -> BTreeSet<u32> {
    let mut uids = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return uids;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .as_encoded_bytes()
            .iter()
            .all(u8::is_ascii_digit)
        {
            continue;
        }
        if let Ok(status) = std::fs::read_to_string(entry.path().join("status")) {
            uids.extend(parse_status_uids(&status));
        }
    }
    uids
}

/// The real and effective uid from a `/proc/<pid>/status` text.
pub fn parse_status_uids(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|rest| {
            rest.split_whitespace()
                .take(2)
                .filter_map(|u| u.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), ConfineError> {
    nix::unistd::chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(|e| {
        ConfineError::Io {
            op: "change the owner of",
            path: path.to_path_buf(),
            source: e.into(),
        }
    })
}

fn chmod(path: &Path, mode: u32) -> Result<(), ConfineError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("change the mode of", path))
}

/// Makes the VM's directories the VM's user's (see the module doc): the VM directory
/// `root:<gid>` 0750, `job.sh` `root:<gid>` 0640, `qemu/` `<uid>:root` 2770 with what is in it.
pub fn prepare_dirs(vm: &VmDir, user: &HostUser) -> Result<(), ConfineError> {
    chown(vm.dir(), 0, user.gid)?;
    chmod(vm.dir(), 0o750)?;
    let payload = vm.payload();
    if payload.exists() {
        chown(&payload, 0, user.gid)?;
        chmod(&payload, 0o640)?;
    }
    // Mode first: once the directory is the VM user's, changing its mode would need
    // CAP_FOWNER, which the launcher's unit does not grant.
    let qemu = vm.qemu_dir();
    chmod(&qemu, 0o2770)?;
    chown(&qemu, user.uid, 0)?;
    Ok(())
}

/// Hands a file or block device (the scratch volume) to the VM's user, mode 0600.
pub fn give(path: &Path, user: &HostUser) -> Result<(), ConfineError> {
    chmod(path, 0o600)?;
    chown(path, user.uid, user.gid)
}

/// Gives everything of a finished VM back to root: the VM directory (0700), `qemu/` and what
/// qemu left in it, and `scratch` if it still exists. Idempotent; the first failure is
/// returned after trying the rest.
pub fn reclaim(vm: &VmDir, scratch: Option<&Path>) -> Result<(), ConfineError> {
    let mut first_err = None;
    let mut note = |r: Result<(), ConfineError>| {
        if let Err(e) = r
            && first_err.is_none()
        {
            first_err = Some(e);
        }
    };
    let qemu = vm.qemu_dir();
    if let Ok(entries) = std::fs::read_dir(&qemu) {
        for entry in entries.flatten() {
            // Never follow what qemu may have placed there.
            let path = entry.path();
            note(
                nix::unistd::fchownat(
                    nix::fcntl::AT_FDCWD,
                    &path,
                    Some(Uid::from_raw(0)),
                    Some(Gid::from_raw(0)),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| ConfineError::Io {
                    op: "change the owner of",
                    path: path.clone(),
                    source: e.into(),
                }),
            );
        }
    }
    if qemu.exists() {
        note(chown(&qemu, 0, 0));
        note(chmod(&qemu, 0o700));
    }
    if vm.dir().exists() {
        note(chown(vm.dir(), 0, 0));
        note(chmod(vm.dir(), 0o700));
        let payload = vm.payload();
        if payload.exists() {
            note(chown(&payload, 0, 0));
        }
    }
    if let Some(s) = scratch.filter(|s| s.exists()) {
        note(chown(s, 0, 0));
    }
    first_err.map_or(Ok(()), Err)
}

/// Checks that `user` can reach `path` (`write`: read and write it, else read it): every
/// directory above it searchable, the file itself readable (and writable). The error names
/// the first thing in the way.
pub fn check_reachable(
    what: &'static str,
    path: &Path,
    user: &HostUser,
    write: bool,
) -> Result<(), ConfineError> {
    let allows = |meta: &std::fs::Metadata, bits: u32| {
        let mode = meta.mode();
        let granted = if meta.uid() == user.uid {
            (mode >> 6) & 7
        } else if meta.gid() == user.gid {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        granted & bits == bits
    };
    let unreachable =
        |at: &Path, meta: &std::fs::Metadata, blocker: String| ConfineError::Unreachable {
            what,
            path: path.to_path_buf(),
            how: if write { "read and written" } else { "read" },
            uid: user.uid,
            gid: user.gid,
            blocker: format!("{blocker} {}", at.display()),
            mode: meta.mode() & 0o7777,
            owner: meta.uid(),
            group: meta.gid(),
        };
    let inspect = |at: &Path| {
        std::fs::metadata(at).map_err(|source| ConfineError::Inspect {
            what,
            path: path.to_path_buf(),
            at: at.to_path_buf(),
            source,
        })
    };
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for dir in dirs {
        let meta = inspect(dir)?;
        if !allows(&meta, 1) {
            return Err(unreachable(dir, &meta, "cannot enter".into()));
        }
    }
    let meta = inspect(path)?;
    let bits = if write { 6 } else { 4 };
    if !allows(&meta, bits) {
        return Err(unreachable(path, &meta, "no permission on".into()));
    }
    Ok(())
}

/// The wrapper's argument vector, ending in `--`: qemu and its arguments follow. With a VM
/// user: `setsid setpriv --reuid U --regid G --clear-groups|--groups K --no-new-privs --`
/// (`kvm_gid`: the group of `/dev/kvm`, the one supplementary group qemu keeps); without:
/// `setsid --`.
pub fn wrapper_args(
    config: &ConfinementConfig,
    user: Option<&HostUser>,
    kvm_gid: Option<u32>,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![config.setsid_binary.clone().into_os_string()];
    if let Some(user) = user {
        a.push(config.setpriv_binary.clone().into_os_string());
        a.push(format!("--reuid={}", user.uid).into());
        a.push(format!("--regid={}", user.gid).into());
        match kvm_gid {
            Some(g) => a.push(format!("--groups={g}").into()),
            None => a.push("--clear-groups".into()),
        }
        a.push("--no-new-privs".into());
    }
    a.push("--".into());
    a
}

/// The group of `/dev/kvm`, when it exists.
pub fn kvm_gid() -> Option<u32> {
    std::fs::metadata("/dev/kvm").ok().map(|m| m.gid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_is_checked() {
        let mut c = ConfinementConfig::default();
        assert_eq!(c.range().unwrap(), 3_000_000_000..=3_000_065_535);
        c.vm_uid_first = 0;
        assert!(matches!(c.range(), Err(ConfineError::BadRange { .. })));
        c.vm_uid_first = 999;
        assert!(c.range().is_err());
        c.vm_uid_first = 1000;
        c.vm_uid_count = 0;
        assert!(c.range().is_err());
        c.vm_uid_first = u32::MAX - 10;
        c.vm_uid_count = 11;
        assert!(c.range().is_err(), "must end below 4294967295 (-1)");
        c.vm_uid_count = 10;
        assert_eq!(c.range().unwrap(), u32::MAX - 10..=u32::MAX - 1);
    }

    #[test]
    fn the_lowest_free_uid_is_picked() {
        let taken = BTreeSet::from([5000, 5001]);
        let busy = BTreeSet::from([5002]);
        assert_eq!(pick_uid(5000..=5010, &taken, &busy).unwrap(), 5003);
        assert_eq!(
            pick_uid(5000..=5010, &BTreeSet::new(), &busy).unwrap(),
            5000
        );
        let err = pick_uid(5000..=5002, &taken, &busy).unwrap_err();
        assert!(err.to_string().contains("5000..=5002"), "{err}");
    }

    #[test]
    fn status_uids_are_parsed() {
        let s = "Name:\tqemu\nUid:\t3000000001\t3000000002\t3\t4\nGid:\t5\t5\t5\t5\n";
        assert_eq!(parse_status_uids(s), vec![3_000_000_001, 3_000_000_002]);
        assert!(parse_status_uids("Name:\tx\n").is_empty());
        assert!(process_uids().contains(&Uid::current().as_raw()));
    }

    #[test]
    fn the_wrapper_drops_to_the_vm_user() {
        let c = ConfinementConfig::default();
        let user = HostUser {
            uid: 3_000_000_007,
            gid: 3_000_000_007,
        };
        let args = wrapper_args(&c, Some(&user), None);
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "setsid",
                "setpriv",
                "--reuid=3000000007",
                "--regid=3000000007",
                "--clear-groups",
                "--no-new-privs",
                "--"
            ]
        );
        let kvm = wrapper_args(&c, Some(&user), Some(108));
        assert!(kvm.iter().any(|a| a == "--groups=108"));
        assert!(!kvm.iter().any(|a| a == "--clear-groups"));
        let off = wrapper_args(&c, None, None);
        assert_eq!(off, [OsString::from("setsid"), OsString::from("--")]);
    }

    #[test]
    fn reachability_names_the_blocking_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("rootfs.ext4");
        std::fs::write(&file, b"x").unwrap();
        let user = HostUser {
            uid: 3_000_000_000,
            gid: 3_000_000_000,
        };
        chmod(root.path(), 0o755).unwrap();
        chmod(&dir, 0o755).unwrap();
        chmod(&file, 0o644).unwrap();
        // The temporary directory's parents are searchable by anyone on any sane host.
        check_reachable("image", &file, &user, false).unwrap();
        let err = check_reachable("image", &file, &user, true).unwrap_err();
        assert!(err.to_string().contains("no permission on"), "{err}");
        chmod(&dir, 0o700).unwrap();
        let err = check_reachable("image", &file, &user, false).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("cannot enter") && text.contains("cache"),
            "{text}"
        );
        assert!(text.contains("mode 700"), "{text}");
    }
}
