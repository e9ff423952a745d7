//! A private network namespace for the calling process (tap mode), and a handle on the one it
//! left ([`HostNetns`]).

use std::{fs::File, os::fd::AsFd};

use anyhow::Context;

/// A network namespace held open by a file descriptor (`/proc/thread-self/ns/net` of the thread
/// that opened it): the host's, kept by [`enter_private_netns`] so that sockets can still be
/// made there ([`HostNetns::enter_on_this_thread`]).
#[derive(Debug)]
pub struct HostNetns {
    fd: File,
}

impl HostNetns {
    /// The calling thread's network namespace.
    pub fn current() -> anyhow::Result<Self> {
        let path = "/proc/thread-self/ns/net";
        let fd = File::open(path).with_context(|| format!("opening {path}"))?;
        Ok(Self { fd })
    }

    /// Moves the calling thread (only it) into this namespace: sockets it creates from now on
    /// belong there, and keep belonging there whichever thread uses them later. Needs
    /// `CAP_SYS_ADMIN`. Meant for a thread of its own: the rest of the process stays where it is.
    pub fn enter_on_this_thread(&self) -> anyhow::Result<()> {
        nix::sched::setns(self.fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .context("setns(CLONE_NEWNET) into the host's network namespace (needs root)")
    }
}

/// Moves the calling process into a new, private network namespace and brings `lo` up; returns
/// the namespace it was in (the host's).
///
/// Everything started afterwards (nats-server, the services, qemu, `sftp-server`) inherits it,
/// so taps, the bridge `wnbr0`, nftables rules and listeners never touch the host's network.
///
/// `unshare(CLONE_NEWNET)` moves only the calling thread; threads that already exist stay in
/// the old namespace. Call this first thing in `main` (or at the top of a `#[test]`; nextest runs
/// each test in its own process), **before** any tokio runtime or other thread is created.
/// Needs root (`CAP_SYS_ADMIN`).
pub fn enter_private_netns() -> anyhow::Result<HostNetns> {
    let host = HostNetns::current()?;
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
    Ok(host)
}

/// True when the caller is root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
