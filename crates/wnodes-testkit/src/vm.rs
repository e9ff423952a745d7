//! What tests that boot VMs share: what a whole job needs of the host ([`JOB_NEEDS`]), one
//! VM-booting test at a time ([`vm_lock`]), the host's memory ([`mem_total_bytes`]) that
//! bounds a VM's measured peak, and the test guest's qemu command line for tests that boot it
//! without the launcher ([`guest_qemu`]), with a whole boot on a tap or user-mode network
//! ([`boot_guest`]).

use std::{os::unix::fs::PermissionsExt, path::Path, process::Stdio, time::Duration};

use crate::host::{Precondition, SETPRIV, guest_dir};

/// How long a job-level wait may take on a loaded 2-core machine.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(90);

/// What a whole-job test needs of the host ([`crate::host`]): root (a private network
/// namespace, taps, nftables, `setpriv` to the job's uid), qemu and the test guest, and what the
/// gateway runs (`sftp-server` through `setpriv`); `/dev/fuse` for the storage export.
pub const JOB_NEEDS: &[Precondition] = &[
    Precondition::Root,
    Precondition::Qemu,
    Precondition::TestGuest,
    Precondition::DevFuse,
    Precondition::SftpServer,
    Precondition::Setpriv,
    Precondition::Nft,
];

/// A host-wide lock: one VM-booting test at a time, whatever runs them (nextest, several
/// `cargo test`s); released on drop.
///
/// # Panics
/// When the lock file cannot be opened or locked: the test fails.
#[allow(clippy::expect_used)] // a test helper: failing is its job
pub fn vm_lock() -> nix::fcntl::Flock<std::fs::File> {
    let path = std::env::temp_dir().join("wnodes-launcher-vm-tests.lock");
    // Read-only is enough for flock(2): a lock file another user made stays usable.
    let f = std::fs::File::open(&path)
        .or_else(|_| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
        })
        .expect("opening the VM test lock file");
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("locking the VM test lock file")
}

/// The host's memory (`MemTotal`), in bytes; 0 when unreadable.
pub fn mem_total_bytes() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb * 1024.0)
}

/// qemu booting the test guest (`guest/README.md`) under TCG, as tests that do not go through
/// the launcher start it: 256 MiB, no defaults, `-snapshot`, the guest's kernel, initrd and
/// read-only root, `job_path` as the payload (`opt/wnodes/job.sh`), `params` appended to the
/// kernel command line, and the three serial ports into `console.log`, `output.log` and
/// `status.log` in `dir` (qemu's `TMPDIR` too). With `as_uid`, qemu runs as that uid and gid
/// through `setpriv`, with no groups and no new privileges, as the launcher confines it.
/// Callers add the network, any other disk, and how to wait. Killed when dropped.
pub fn guest_qemu(
    dir: &Path,
    job_path: &Path,
    params: &str,
    as_uid: Option<u32>,
) -> tokio::process::Command {
    let guest = guest_dir();
    let mut qemu = match as_uid {
        Some(uid) => {
            let mut c = tokio::process::Command::new(SETPRIV);
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                "--no-new-privs".into(),
                "--".into(),
                "qemu-system-x86_64".into(),
            ]);
            c
        }
        None => tokio::process::Command::new("qemu-system-x86_64"),
    };
    let serial = |n: &str| format!("file:{}", dir.join(n).display());
    qemu.args(["-accel", "tcg", "-M", "pc", "-m", "256", "-nodefaults"])
        .args(["-display", "none", "-no-reboot", "-snapshot"])
        .arg("-kernel")
        .arg(guest.join("vmlinux"))
        .arg("-initrd")
        .arg(guest.join("initrd.img"))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 root=/dev/vda panic=-1 quiet {params}"
        ))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            guest.join("rootfs.ext4").display()
        ))
        .arg("-fw_cfg")
        .arg(format!(
            "name=opt/wnodes/job.sh,file={}",
            job_path.display()
        ))
        .args(["-serial", &serial("console.log")])
        .args(["-serial", &serial("output.log")])
        .args(["-serial", &serial("status.log")])
        .env("TMPDIR", dir)
        .kill_on_drop(true);
    qemu
}

/// How a guest booted by [`boot_guest`] reaches the network.
#[derive(Debug, Clone, Copy)]
pub enum GuestNet<'a> {
    /// A tap the test (or the network service) made, with the VM's MAC.
    Tap { tap: &'a str, mac: &'a str },
    /// `-netdev user` (slirp: the host is 10.0.2.2, its loopback behind it).
    User,
}

/// What [`boot_guest`] saw: qemu's exit status, the payload's output, and the three logs for
/// assertion messages.
#[derive(Debug)]
pub struct Booted {
    pub status: std::process::ExitStatus,
    pub output: String,
    pub report: String,
}

/// Boots the test guest ([`guest_qemu`]) with `job` as its payload (written to `dir/job.sh`,
/// mode 0644) and `params` on the kernel command line, on `net`, and waits up to 300 s for it
/// to power off. With `as_uid`, qemu runs as that uid and `dir` is made that uid's (0700).
/// Logs and the snapshot overlay go to `dir`.
///
/// # Panics
/// When `dir` cannot be prepared, qemu cannot start, or the guest does not power off in time:
/// the test fails.
#[allow(clippy::expect_used)] // a test helper: failing is its job
pub async fn boot_guest(
    dir: &Path,
    job: &str,
    params: &str,
    net: GuestNet<'_>,
    as_uid: Option<u32>,
) -> Booted {
    std::fs::create_dir_all(dir).expect("creating the guest's directory");
    let job_path = dir.join("job.sh");
    std::fs::write(&job_path, job).expect("writing the payload");
    std::fs::set_permissions(&job_path, std::fs::Permissions::from_mode(0o644))
        .expect("making the payload readable");
    if let Some(uid) = as_uid {
        std::os::unix::fs::chown(dir, Some(uid), Some(uid))
            .expect("giving the directory to qemu's uid");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .expect("closing the directory");
    }
    let mut qemu = guest_qemu(dir, &job_path, params, as_uid);
    match net {
        GuestNet::Tap { tap, mac } => qemu
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            ])
            .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")]),
        GuestNet::User => qemu
            .args(["-netdev", "user,id=n0"])
            .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"]),
    };
    qemu.stdout(Stdio::null()).stderr(Stdio::inherit());
    let status = tokio::time::timeout(Duration::from_secs(300), qemu.status())
        .await
        .expect("the guest did not power off within 300 s")
        .expect("starting qemu");
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
    let output = read("output.log");
    let report = format!(
        "status.log:\n{}\noutput.log:\n{output}\nconsole.log:\n{}",
        read("status.log"),
        read("console.log")
    );
    Booted {
        status,
        output,
        report,
    }
}
