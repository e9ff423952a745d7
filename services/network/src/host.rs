//! Host network plumbing: links, addresses and bridge ports through rtnetlink ([`netlink`]);
//! the nftables ruleset through `nft -f -` (a whole ruleset applied atomically; there is no
//! maintained Rust binding); creating a tap through `ip tuntap add` (the kernel refuses that
//! over rtnetlink, see [`netlink`]). Commands get arguments only, never a shell; every name is
//! validated first ([`valid_tap_name`], [`valid_ifname`]).
//!
//! With a configured network namespace the netlink socket is opened inside it and every
//! command runs as `ip netns exec <ns> <cmd> ...`.
//!
//! [`netlink`]: crate::netlink

use std::{process::Stdio, sync::Arc};

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::{
    config::Ipv4Net,
    netlink::{Link, Netlink, NetlinkError},
    nft,
};

/// A host command that failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot run {cmd}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("cannot parse the output of {cmd}: {why}")]
    Parse { cmd: String, why: String },
    #[error("invalid {kind} {name:?}")]
    InvalidName { kind: &'static str, name: String },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Sriov(#[from] crate::sriov::SriovError),
}

/// Interface names we accept on a command line: 1–15 of `[A-Za-z0-9_.-]`, not starting with `-`.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Network namespace names: 1–64 of `[A-Za-z0-9_.-]`, not starting with `-` or `.`.
pub fn valid_netns(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Tap names this service makes: `wn-` + 12 lowercase hex digits.
pub fn valid_tap_name(name: &str) -> bool {
    name.strip_prefix("wn-").is_some_and(|hex| {
        hex.len() == 12
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Changes the host's network, optionally inside a network namespace.
#[derive(Debug, Clone, Default)]
pub struct Host {
    netns: Option<String>,
    netlink: Arc<Netlink>,
}

struct Output {
    ok: bool,
    status: String,
    stdout: String,
    stderr: String,
}

impl Host {
    /// A runner for the given namespace (`None`: our own).
    pub fn new(netns: Option<String>) -> Result<Self, HostError> {
        if let Some(ns) = &netns
            && !valid_netns(ns)
        {
            return Err(HostError::InvalidName {
                kind: "network namespace",
                name: ns.clone(),
            });
        }
        Ok(Self {
            netlink: Arc::new(Netlink::new(netns.clone())),
            netns,
        })
    }

    fn command(&self, program: &str, args: &[&str]) -> (tokio::process::Command, String) {
        let mut argv: Vec<&str> = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["ip", "netns", "exec", ns.as_str()]);
        }
        argv.push(program);
        argv.extend_from_slice(args);
        let shown = argv.join(" ");
        let mut cmd = tokio::process::Command::new(argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        (cmd, shown)
    }

    async fn output(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<(Output, String), HostError> {
        let (mut cmd, shown) = self.command(program, args);
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let spawn_err = |source| HostError::Spawn {
            cmd: shown.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).await.map_err(spawn_err)?;
            drop(pipe);
        }
        let out = child.wait_with_output().await.map_err(spawn_err)?;
        Ok((
            Output {
                ok: out.status.success(),
                status: out.status.to_string(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            },
            shown,
        ))
    }

    /// The rtnetlink connection, for the VLAN steps ([`crate::tap_vlan`]).
    pub fn netlink(&self) -> &Netlink {
        &self.netlink
    }

    /// Runs a command that must succeed; returns its stdout.
    async fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, HostError> {
        let (out, cmd) = self.output(program, args, stdin).await?;
        if out.ok {
            Ok(out.stdout)
        } else {
            Err(HostError::Failed {
                cmd,
                status: out.status,
                stderr: out.stderr,
            })
        }
    }

    /// The first IPv4 address of `ifname` with its prefix; `Ok(None)` when the interface does
    /// not exist.
    pub async fn ipv4_of(&self, ifname: &str) -> Result<Option<Ipv4Net>, HostError> {
        check_ifname(ifname)?;
        let Some(link) = self.netlink.link(ifname).await? else {
            return Ok(None);
        };
        let addrs = self.netlink.ipv4_addresses(&link).await?;
        addrs
            .first()
            .copied()
            .map(Some)
            .ok_or_else(|| HostError::Parse {
                cmd: format!("netlink: addresses of {ifname}"),
                why: format!("{ifname} has no IPv4 address"),
            })
    }

    /// One link; `None` when it does not exist.
    pub async fn link(&self, ifname: &str) -> Result<Option<Link>, HostError> {
        check_ifname(ifname)?;
        Ok(self.netlink.link(ifname).await?)
    }

    /// Sets VF `index` of the physical function `pf` (MAC, VLAN, spoof checking, trust).
    pub async fn set_vf(
        &self,
        pf: &str,
        index: u32,
        settings: &crate::sriov::VfSettings,
    ) -> Result<(), HostError> {
        Ok(self.netlink.set_vf(pf, index, settings).await?)
    }

    /// The settings of every VF of `pf`, by index.
    pub async fn vfs(&self, pf: &str) -> Result<Vec<(u32, crate::sriov::VfSettings)>, HostError> {
        Ok(self.netlink.vfs(pf).await?)
    }

    /// The taps this service made (tun devices named like [`valid_tap_name`]).
    pub async fn list_taps(&self) -> Result<Vec<String>, HostError> {
        Ok(self
            .netlink
            .links()
            .await?
            .into_iter()
            .filter(|l| l.kind == "tun" && valid_tap_name(&l.name))
            .map(|l| l.name)
            .collect())
    }

    /// Creates tap `tap` (if missing), makes it a port of `bridge` and sets it up. With an
    /// `owner` (the VM's own host user, under which its qemu runs) the tap belongs to that uid
    /// and gid: that qemu may attach it, no other unprivileged process may.
    pub async fn create_tap(
        &self,
        tap: &str,
        bridge: &str,
        owner: Option<&wnodes_proto::v1::HostUser>,
    ) -> Result<(), HostError> {
        check_tap(tap)?;
        check_ifname(bridge)?;
        if self.netlink.link(tap).await?.is_none() {
            let args = tap_add_args(tap, owner)?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.run("ip", &args, None).await?;
        }
        self.netlink.attach_to_bridge(tap, bridge).await?;
        Ok(())
    }

    /// Deletes link `ifname`; `false` when it did not exist.
    pub async fn delete_link(&self, ifname: &str) -> Result<bool, HostError> {
        check_ifname(ifname)?;
        let Some(link) = self.netlink.link(ifname).await? else {
            return Ok(false);
        };
        self.netlink.delete(&link).await?;
        Ok(true)
    }

    /// Applies an nft script atomically (`nft -f -`). Callers build scripts with [`nft`] from
    /// validated values only.
    pub async fn nft_apply(&self, script: &str) -> Result<(), HostError> {
        self.run("nft", &["-f", "-"], Some(script)).await.map(drop)
    }

    /// `nft -j list table bridge wnodes`; `None` when the table does not exist.
    pub async fn nft_table(&self) -> Result<Option<Value>, HostError> {
        let args = ["-j", "list", "table", nft::FAMILY, nft::TABLE];
        let (out, cmd) = self.output("nft", &args, None).await?;
        if !out.ok {
            if out.stderr.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(HostError::Failed {
                cmd,
                status: out.status,
                stderr: out.stderr,
            });
        }
        parse_json(&cmd, &out.stdout).map(Some)
    }
}

fn parse_json(cmd: &str, text: &str) -> Result<Value, HostError> {
    serde_json::from_str(text).map_err(|e| HostError::Parse {
        cmd: cmd.to_owned(),
        why: e.to_string(),
    })
}

fn check_ifname(name: &str) -> Result<(), HostError> {
    if valid_ifname(name) {
        Ok(())
    } else {
        Err(HostError::InvalidName {
            kind: "interface name",
            name: name.to_owned(),
        })
    }
}

/// `ip tuntap add` arguments for tap `tap`, owned by `owner` when given (never uid or gid 0
/// or a system account: such an owner is refused).
pub fn tap_add_args(
    tap: &str,
    owner: Option<&wnodes_proto::v1::HostUser>,
) -> Result<Vec<String>, HostError> {
    let mut args: Vec<String> = ["tuntap", "add", "mode", "tap", "name", tap]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    if let Some(o) = owner {
        if o.uid < 1000 || o.gid < 1000 {
            return Err(HostError::InvalidName {
                kind: "tap owner (uid:gid below 1000)",
                name: format!("{}:{}", o.uid, o.gid),
            });
        }
        args.extend([
            "user".to_owned(),
            o.uid.to_string(),
            "group".to_owned(),
            o.gid.to_string(),
        ]);
    }
    Ok(args)
}

fn check_tap(name: &str) -> Result<(), HostError> {
    if valid_tap_name(name) {
        Ok(())
    } else {
        Err(HostError::InvalidName {
            kind: "tap name",
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_is_made_for_the_vm_user_and_never_for_root() {
        let owner = wnodes_proto::v1::HostUser {
            uid: 3_000_000_004,
            gid: 3_000_000_004,
        };
        assert_eq!(
            tap_add_args("wn-0123456789ab", Some(&owner))
                .unwrap()
                .join(" "),
            "tuntap add mode tap name wn-0123456789ab user 3000000004 group 3000000004"
        );
        assert_eq!(
            tap_add_args("wn-0123456789ab", None).unwrap().join(" "),
            "tuntap add mode tap name wn-0123456789ab"
        );
        for (uid, gid) in [(0, 3_000_000_004), (3_000_000_004, 0), (999, 1000)] {
            let err = tap_add_args(
                "wn-0123456789ab",
                Some(&wnodes_proto::v1::HostUser { uid, gid }),
            )
            .unwrap_err();
            assert!(err.to_string().contains("tap owner"), "{err}");
        }
    }

    #[test]
    fn names_are_validated() {
        assert!(valid_tap_name("wn-0123456789ab"));
        for bad in [
            "wn-0123456789a",
            "wn-0123456789abc",
            "wn-0123456789AB",
            "wnbr0",
            "wn-;rm -rf",
        ] {
            assert!(!valid_tap_name(bad), "{bad}");
        }
        assert!(valid_ifname("wnbr0"));
        for bad in ["", "-x", "a b", "a;b", "sixteen-chars-xx"] {
            assert!(!valid_ifname(bad), "{bad}");
        }
        assert!(Host::new(Some("bad ns".into())).is_err());
        assert!(Host::new(Some("wn-test-ns".into())).is_ok());
    }
}
