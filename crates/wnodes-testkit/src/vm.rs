//! What tests that boot VMs share: what a whole job needs of the host ([`JOB_NEEDS`]), one
//! VM-booting test at a time ([`vm_lock`]), and the host's memory ([`mem_total_bytes`]) that
//! bounds a VM's measured peak.

use std::time::Duration;

use crate::host::Precondition;

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
