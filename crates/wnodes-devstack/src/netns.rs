//! A private network namespace for the calling process (tap mode).

use anyhow::Context;

/// Moves the calling process into a new, private network namespace and brings `lo` up.
///
/// Everything started afterwards (nats-server, the services, qemu, `sftp-server`) inherits it,
/// so taps, the bridge `wnbr0`, nftables rules and listeners never touch the host's network.
///
/// `unshare(CLONE_NEWNET)` moves only the calling thread; threads that already exist stay in
/// the old namespace. Call this first thing in `main` (or at the top of a `#[test]`; nextest runs
/// each test in its own process), **before** any tokio runtime or other thread is created.
/// Needs root (`CAP_SYS_ADMIN`).
pub fn enter_private_netns() -> anyhow::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("unshare(CLONE_NEWNET) (needs root)")?;
    let out = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .context("running `ip link set lo up`")?;
    anyhow::ensure!(
        out.status.success(),
        "`ip link set lo up` failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// True when the caller is root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
