//! The `[gateway]` configuration section (env `WNODES_GATEWAY__<KEY>`).

use std::{net::IpAddr, path::PathBuf, str::FromStr};

use serde::{Deserialize, Serialize};

/// The `[gateway]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// OpenSSH's `sftp-server`, run once per connection as the job's uid/gid.
    pub sftp_server: PathBuf,
    /// util-linux `setpriv`, which drops to the job's uid/gid and clears supplementary groups
    /// before exec'ing `sftp-server`.
    pub setpriv: PathBuf,
    /// Address the per-VM listeners bind. Unset: the VM's gateway from `network.ready` (the
    /// bridge address), or 127.0.0.1 for user-mode networking.
    pub bind_address: Option<IpAddr>,
    /// Ports handed to VMs, `"first-last"` inclusive.
    pub port_range: String,
    /// Host policy: the directories under which an export may lie, checked after resolving
    /// symlinks (`/` is refused, also as `/..` or a symlink to it). Empty (the default): the
    /// gateway serves no export at all.
    pub export_roots: Vec<PathBuf>,
    /// Host policy: the uids a job may own its export as, `"first-last"` inclusive; 0 is
    /// refused. The default leaves out Debian's system accounts (below 1000).
    pub job_uids: String,
    /// Host policy: the same for gids.
    pub job_gids: String,
    /// Run each `sftp-server` in a jail of its own (a mount namespace whose root holds only
    /// the export, see [`crate::listener::Jail`]); needs root. Without root the gateway serves
    /// as its own user, unjailed, and says so at start.
    pub jail: bool,
    /// The jail's mount point (an empty directory, created at start).
    pub jail_dir: PathBuf,
    /// util-linux `unshare`.
    pub unshare: PathBuf,
    /// coreutils `chroot`.
    pub chroot: PathBuf,
    /// glibc's `ldd`, which lists what `sftp-server` loads (bound into the jail).
    pub ldd: PathBuf,
    /// The NFS gateway (`[gateway.nfs]`); unset: this host offers no NFS, and a VM whose spec
    /// asks for NFS fails with rule `storage.nfs`.
    pub nfs: Option<crate::nfs::NfsConfig>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            sftp_server: PathBuf::from("/usr/lib/openssh/sftp-server"),
            setpriv: PathBuf::from("/usr/bin/setpriv"),
            bind_address: None,
            port_range: "20000-20999".into(),
            export_roots: Vec::new(),
            job_uids: "1000-65534".into(),
            job_gids: "1000-65534".into(),
            jail: true,
            jail_dir: PathBuf::from("/run/wnodes-gateway/jail"),
            unshare: PathBuf::from("/usr/bin/unshare"),
            chroot: PathBuf::from("/usr/sbin/chroot"),
            ldd: PathBuf::from("/usr/bin/ldd"),
            nfs: None,
        }
    }
}

/// A `[gateway]` value the service cannot use; names the key.
#[derive(Debug, thiserror::Error)]
pub enum GatewayConfigError {
    #[error("port_range")]
    PortRange(#[source] PortRangeError),
    #[error("{key} must be an absolute path, got {path:?}")]
    NotAbsolute { key: &'static str, path: PathBuf },
    #[error(
        "{key}: invalid range {value:?}: expected \"first-last\" with 1 <= first <= last (0 is root)"
    )]
    IdRange { key: &'static str, value: String },
    #[error("export_roots: {path:?} is not allowed (it would export the whole host)")]
    RootExport { path: PathBuf },
    #[error("jail: {0}")]
    Jail(String),
    #[error("nfs")]
    Nfs(#[source] crate::nfs::config::NfsConfigError),
}

impl GatewayConfig {
    /// The port range, parsed.
    pub fn ports(&self) -> Result<PortRange, GatewayConfigError> {
        self.port_range
            .parse()
            .map_err(GatewayConfigError::PortRange)
    }

    /// The job uid and gid ranges, parsed.
    pub fn id_ranges(&self) -> Result<(IdRange, IdRange), GatewayConfigError> {
        let parse = |key: &'static str, value: &str| {
            value.parse().map_err(|()| GatewayConfigError::IdRange {
                key,
                value: value.to_owned(),
            })
        };
        Ok((
            parse("job_uids", &self.job_uids)?,
            parse("job_gids", &self.job_gids)?,
        ))
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), GatewayConfigError> {
        self.ports()?;
        self.id_ranges()?;
        if let Some(nfs) = &self.nfs {
            nfs.validate().map_err(GatewayConfigError::Nfs)?;
        }
        for root in &self.export_roots {
            if !root.is_absolute() {
                return Err(GatewayConfigError::NotAbsolute {
                    key: "export_roots",
                    path: root.clone(),
                });
            }
            // `/` itself, or a path that leads there (`/srv/..`, a symlink to `/`).
            let resolved = std::fs::canonicalize(root).ok();
            if root.parent().is_none() || resolved.is_some_and(|r| r.parent().is_none()) {
                return Err(GatewayConfigError::RootExport { path: root.clone() });
            }
        }
        for (key, p) in [
            ("setpriv", &self.setpriv),
            ("sftp_server", &self.sftp_server),
            ("jail_dir", &self.jail_dir),
            ("unshare", &self.unshare),
            ("chroot", &self.chroot),
            ("ldd", &self.ldd),
        ] {
            if !p.is_absolute() {
                return Err(GatewayConfigError::NotAbsolute {
                    key,
                    path: p.clone(),
                });
            }
        }
        Ok(())
    }
}

/// An inclusive range of uids or gids, never containing 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub first: u32,
    pub last: u32,
}

impl FromStr for IdRange {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (a, b) = s.split_once('-').ok_or(())?;
        let first: u32 = a.trim().parse().map_err(drop)?;
        let last: u32 = b.trim().parse().map_err(drop)?;
        if first == 0 || first > last {
            return Err(());
        }
        Ok(Self { first, last })
    }
}

impl IdRange {
    pub fn contains(self, id: u32) -> bool {
        (self.first..=self.last).contains(&id)
    }
}

impl std::fmt::Display for IdRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// A malformed `port_range`.
#[derive(Debug, thiserror::Error)]
#[error("invalid port range {0:?}: expected \"first-last\" with 1 <= first <= last <= 65535")]
pub struct PortRangeError(pub String);

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PortRangeError(s.to_owned());
        let (a, b) = s.split_once('-').ok_or_else(err)?;
        let first: u16 = a.trim().parse().map_err(|_| err())?;
        let last: u16 = b.trim().parse().map_err(|_| err())?;
        if first == 0 || first > last {
            return Err(err());
        }
        Ok(Self { first, last })
    }
}

impl PortRange {
    /// Every port of the range.
    pub fn ports(self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }
}

impl GatewayConfig {
    /// The jail each `sftp-server` runs in: `None` when `jail` is off or the gateway is not
    /// root. Creates `jail_dir` and asks `ldd` what `sftp-server` loads.
    pub fn prepare_jail(&self) -> Result<Option<crate::listener::Jail>, GatewayConfigError> {
        if !self.jail || !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let fail = |what: String| GatewayConfigError::Jail(what);
        std::fs::create_dir_all(&self.jail_dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", self.jail_dir.display())))?;
        let out = std::process::Command::new(&self.ldd)
            .arg(&self.sftp_server)
            .output()
            .map_err(|e| fail(format!("cannot run {}: {e}", self.ldd.display())))?;
        if !out.status.success() {
            return Err(fail(format!(
                "{} {} failed ({}): {}",
                self.ldd.display(),
                self.sftp_server.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let libs =
            crate::listener::parse_ldd(&String::from_utf8_lossy(&out.stdout)).map_err(|e| {
                fail(format!(
                    "{} {}: {e}",
                    self.ldd.display(),
                    self.sftp_server.display()
                ))
            })?;
        Ok(Some(crate::listener::Jail {
            unshare: self.unshare.clone(),
            chroot: self.chroot.clone(),
            root: self.jail_dir.clone(),
            libs,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_ranges_never_hold_root() {
        let r: IdRange = "1000-65534".parse().unwrap();
        assert!(r.contains(1000) && r.contains(65534) && !r.contains(999));
        for bad in ["", "0-10", "0-0", "5-4", "a-b", "1000"] {
            assert!(bad.parse::<IdRange>().is_err(), "{bad}");
        }
        let cfg = GatewayConfig {
            export_roots: vec!["/".into()],
            ..Default::default()
        };
        assert!(matches!(
            cfg.validate(),
            Err(GatewayConfigError::RootExport { .. })
        ));
        // `/` by another name: `..`, a symlink.
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/", dir.path().join("slash")).unwrap();
        let up = dir
            .path()
            .components()
            .skip(1)
            .fold(dir.path().to_owned(), |p, _| p.join(".."));
        for root in [PathBuf::from("/.."), up, dir.path().join("slash")] {
            let cfg = GatewayConfig {
                export_roots: vec![dir.path().to_owned(), root.clone()],
                ..Default::default()
            };
            assert!(
                matches!(cfg.validate(), Err(GatewayConfigError::RootExport { .. })),
                "{root:?}"
            );
        }
        let cfg = GatewayConfig {
            export_roots: vec![dir.path().to_owned(), "/srv/not-there-yet".into()],
            ..Default::default()
        };
        assert!(cfg.validate().is_ok());
        let cfg = GatewayConfig {
            job_uids: "0-100".into(),
            ..Default::default()
        };
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .starts_with("job_uids:"),
            "the key is named"
        );
    }

    #[test]
    fn port_ranges() {
        let r: PortRange = "20000-20002".parse().unwrap();
        assert_eq!(r.ports().collect::<Vec<_>>(), vec![20000, 20001, 20002]);
        for bad in ["", "1", "0-5", "5-4", "1-70000", "a-b"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }
}
