//! What a finished job must not leave behind: [`Leftovers`].

use std::{path::Path, process::Command};

use crate::{NetworkChoice, Stack};

/// Host resources that outlive their job. Every list is empty once a job's resources are
/// released.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Files in the scratch volume directory (`vm-*.img`, `.vm-*.img.partial`).
    pub scratch_files: Vec<String>,
    /// Links named `wn-*` (VM taps).
    pub taps: Vec<String>,
    /// Per-VM chains (`wn-*`) in nft table `bridge wnodes` (tap mode only).
    pub nft_chains: Vec<String>,
    /// TCP ports in LISTEN inside the gateway's port range (this network namespace).
    pub gateway_listeners: Vec<u16>,
    /// `sftp-server` processes serving the stack's export (in tap mode: any in the private
    /// network namespace).
    pub sftp_servers: Vec<u32>,
    /// qemu processes whose command line names the work dir.
    pub qemus: Vec<u32>,
}

impl Leftovers {
    /// True when nothing is left.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// qemu processes whose command line mentions `work_dir`.
pub fn qemu_pids(work_dir: &Path) -> Vec<u32> {
    let needle = work_dir.display().to_string();
    pids()
        .into_iter()
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if !comm.starts_with("qemu-system") {
                return false;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&needle)
        })
        .collect()
}

// `/proc/thread-self`, not `/proc/self`: `enter_private_netns` moves only the calling thread
// (and the threads it spawns later), and `/proc/self` is the thread-group leader, which in a
// test harness stays in the host's namespace.
fn same_netns(pid: u32) -> bool {
    let mine = std::fs::read_link("/proc/thread-self/ns/net").ok();
    mine.is_some() && std::fs::read_link(format!("/proc/{pid}/ns/net")).ok() == mine
}

/// `sftp-server` processes serving a path under `work_dir` (`-d <export>`), and in tap mode
/// (a private namespace) every one in this network namespace.
fn sftp_server_pids(work_dir: &Path, private_netns: bool) -> Vec<u32> {
    let needle = work_dir.display().to_string();
    pids()
        .into_iter()
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() != "sftp-server" {
                return false;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&needle)
                || (private_netns && same_netns(*pid))
        })
        .collect()
}

/// How a process of the stack is confined, as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confined {
    pub pid: u32,
    /// `qemu-system-x86_64` or `sftp-server`.
    pub what: &'static str,
    /// Real uid.
    pub uid: u32,
    /// `Seccomp:` (2: a filter).
    pub seccomp: u32,
    pub no_new_privs: bool,
    /// Where `/proc/<pid>/root` points (`/`: the host's root).
    pub root: String,
}

fn confined(pid: u32, what: &'static str) -> Option<Confined> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(Confined {
        pid,
        what,
        uid: field("Uid:")?,
        seccomp: field("Seccomp:").unwrap_or(0),
        no_new_privs: field("NoNewPrivs:") == Some(1),
        root: std::fs::read_link(format!("/proc/{pid}/root"))
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    })
}

/// The stack's qemu and `sftp-server` processes running now, with their confinement.
pub fn confinement(work_dir: &Path, private_netns: bool) -> Vec<Confined> {
    let qemus = qemu_pids(work_dir)
        .into_iter()
        .filter_map(|p| confined(p, "qemu-system-x86_64"));
    let sftp = sftp_server_pids(work_dir, private_netns)
        .into_iter()
        .filter_map(|p| confined(p, "sftp-server"));
    qemus.chain(sftp).collect()
}

fn listening_ports(first: u16, last: u16) -> Vec<u16> {
    let mut out = Vec::new();
    for f in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 4 || cols[3] != "0A" {
                continue;
            }
            let Some(port) = cols[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
            else {
                continue;
            };
            if (first..=last).contains(&port) && !out.contains(&port) {
                out.push(port);
            }
        }
    }
    out.sort_unstable();
    out
}

fn taps() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let name = l.split(':').nth(1)?.trim();
            let name = name.split('@').next()?;
            name.starts_with("wn-").then(|| name.to_owned())
        })
        .collect()
}

fn nft_chains() -> Vec<String> {
    let Ok(out) = Command::new("nft")
        .args(["-j", "list", "table", "bridge", "wnodes"])
        .output()
    else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new(); // no table: nothing left
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["nftables"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["chain"]["name"].as_str())
                .filter(|n| n.starts_with("wn-"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

impl Stack {
    /// What is left on the host of finished jobs (see [`Leftovers`]).
    pub fn leftovers(&self) -> Leftovers {
        let scratch_dir = self.state_dir("scratch").join("volumes");
        let mut scratch_files: Vec<String> = std::fs::read_dir(&scratch_dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str().map(str::to_owned))
                    .filter(|n| n.contains("vm-"))
                    .collect()
            })
            .unwrap_or_default();
        scratch_files.sort();
        let tap_mode = self.network == NetworkChoice::Tap;
        Leftovers {
            scratch_files,
            taps: if tap_mode { taps() } else { Vec::new() },
            nft_chains: if tap_mode { nft_chains() } else { Vec::new() },
            gateway_listeners: listening_ports(
                self.opts.gateway_ports.0,
                self.opts.gateway_ports.1,
            ),
            sftp_servers: sftp_server_pids(&self.opts.work_dir, tap_mode),
            qemus: qemu_pids(&self.opts.work_dir),
        }
    }
}
