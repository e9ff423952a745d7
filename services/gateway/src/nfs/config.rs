//! `[gateway.nfs]`: which NFS server exports VMs' directories, and how it is reached.
//!
//! ```toml
//! [gateway.nfs]
//! backend = "ganesha"          # or "exportfs" (the kernel's nfsd)
//! port = 2049                  # what guests mount (ganesha: NFS_Port of a managed daemon)
//! export_ids = "100-9999"      # Export_Id / fsid values this gateway hands out
//!
//! [gateway.nfs.ganesha]
//! manage = true                # run ganesha.nfsd and a private dbus-daemon as children
//! state_dir = "/var/lib/wnodes/gateway/ganesha"
//! # bind_address = "10.231.1.1"   # a managed daemon's Bind_addr (default: every address)
//! # bus_address = "unix:path=/run/dbus/system_bus_socket"   # manage = false: the daemon's bus
//! ```

use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::IdRange;

/// The NFS server a host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NfsBackend {
    /// nfs-ganesha, userspace, exports changed through its D-Bus export manager.
    Ganesha,
    /// The kernel's nfsd, exports changed with `exportfs`.
    Exportfs,
}

/// `[gateway.nfs]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NfsConfig {
    pub backend: NfsBackend,
    /// The port guests mount (2049 unless the server listens elsewhere).
    pub port: u16,
    /// The export ids (`Export_Id`, `fsid`) this gateway hands out and, at start, removes when
    /// no VM holds them: `"first-last"`, never 0 (ganesha's pseudo root).
    pub export_ids: String,
    pub ganesha: GaneshaConfig,
    pub exportfs: ExportfsConfig,
}

impl Default for NfsConfig {
    fn default() -> Self {
        Self {
            backend: NfsBackend::Ganesha,
            port: 2049,
            export_ids: "100-9999".into(),
            ganesha: GaneshaConfig::default(),
            exportfs: ExportfsConfig::default(),
        }
    }
}

/// `[gateway.nfs.ganesha]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GaneshaConfig {
    /// Run `ganesha.nfsd` (and a private `dbus-daemon` for its export manager) as children of
    /// the gateway, with a configuration of its own under `state_dir`; a leftover of a killed
    /// gateway is stopped first. Off: talk to a ganesha the site runs, on `bus_address`.
    pub manage: bool,
    pub ganesha_nfsd: PathBuf,
    pub dbus_daemon: PathBuf,
    pub dbus_send: PathBuf,
    /// Configuration, logs, pid files, the bus socket, export files and NFSv4 recovery data
    /// of a managed daemon; export files also without `manage`.
    pub state_dir: PathBuf,
    /// A managed daemon's `Bind_addr`; unset: every address (exports name their client).
    pub bind_address: Option<IpAddr>,
    /// `manage = false`: the D-Bus address of the bus ganesha is on; unset: the system bus.
    pub bus_address: Option<String>,
    /// The pseudo-filesystem directory under which each VM's export appears
    /// (`<pseudo_root>/<vm id>`).
    pub pseudo_root: String,
    /// How long a managed daemon may take to answer on D-Bus after its start (seconds).
    pub start_timeout_secs: u64,
}

impl Default for GaneshaConfig {
    fn default() -> Self {
        Self {
            manage: true,
            ganesha_nfsd: PathBuf::from("/usr/bin/ganesha.nfsd"),
            dbus_daemon: PathBuf::from("/usr/bin/dbus-daemon"),
            dbus_send: PathBuf::from("/usr/bin/dbus-send"),
            state_dir: PathBuf::from("/var/lib/wnodes/gateway/ganesha"),
            bind_address: None,
            bus_address: None,
            pseudo_root: "/wnodes".into(),
            start_timeout_secs: 30,
        }
    }
}

/// `[gateway.nfs.exportfs]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportfsConfig {
    /// nfs-utils' `exportfs`.
    pub exportfs: PathBuf,
}

impl Default for ExportfsConfig {
    fn default() -> Self {
        Self {
            exportfs: PathBuf::from("/usr/sbin/exportfs"),
        }
    }
}

/// A `[gateway.nfs]` value the gateway cannot use; names the key.
#[derive(Debug, thiserror::Error)]
pub enum NfsConfigError {
    #[error(
        "nfs.export_ids: invalid range {0:?}: expected \"first-last\" with 1 <= first <= last <= 65535"
    )]
    ExportIds(String),
    #[error("nfs.{key} must be an absolute path, got {path:?}")]
    NotAbsolute { key: &'static str, path: PathBuf },
    #[error("nfs.ganesha.pseudo_root must be an absolute path of [A-Za-z0-9._-] parts, got {0:?}")]
    PseudoRoot(String),
    #[error("nfs.port must not be 0")]
    Port,
}

impl NfsConfig {
    /// The export id range, parsed.
    pub fn ids(&self) -> Result<IdRange, NfsConfigError> {
        let r: IdRange = self
            .export_ids
            .parse()
            .map_err(|()| NfsConfigError::ExportIds(self.export_ids.clone()))?;
        if r.last > u32::from(u16::MAX) {
            return Err(NfsConfigError::ExportIds(self.export_ids.clone()));
        }
        Ok(r)
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), NfsConfigError> {
        self.ids()?;
        if self.port == 0 {
            return Err(NfsConfigError::Port);
        }
        let g = &self.ganesha;
        for (key, p) in [
            ("ganesha.ganesha_nfsd", &g.ganesha_nfsd),
            ("ganesha.dbus_daemon", &g.dbus_daemon),
            ("ganesha.dbus_send", &g.dbus_send),
            ("ganesha.state_dir", &g.state_dir),
            ("exportfs.exportfs", &self.exportfs.exportfs),
        ] {
            if !p.is_absolute() {
                return Err(NfsConfigError::NotAbsolute {
                    key,
                    path: p.clone(),
                });
            }
        }
        let root = &g.pseudo_root;
        if !root.starts_with('/') || root.len() < 2 || !root[1..].split('/').all(is_name) {
            return Err(NfsConfigError::PseudoRoot(root.clone()));
        }
        Ok(())
    }
}

/// One name of `[A-Za-z0-9._-]`, not `.` or `..`: a part of the pseudo root, and the VM id
/// that names an export under it.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_bad_values_name_their_key() {
        NfsConfig::default().validate().unwrap();
        let ids = NfsConfig {
            export_ids: "0-10".into(),
            ..Default::default()
        };
        assert!(
            ids.validate()
                .unwrap_err()
                .to_string()
                .contains("export_ids")
        );
        let big = NfsConfig {
            export_ids: "1-70000".into(),
            ..Default::default()
        };
        assert!(big.validate().is_err());
        for bad in ["wnodes", "/", "/a/../b", "/a b", "/a//b"] {
            let mut c = NfsConfig::default();
            c.ganesha.pseudo_root = bad.into();
            assert!(
                c.validate()
                    .unwrap_err()
                    .to_string()
                    .contains("pseudo_root"),
                "{bad}"
            );
        }
        let mut rel = NfsConfig::default();
        rel.exportfs.exportfs = "exportfs".into();
        assert!(rel.validate().unwrap_err().to_string().contains("exportfs"));
        let parsed: NfsConfig =
            serde_json::from_str(r#"{"backend": "exportfs", "ganesha": {"manage": false}}"#)
                .unwrap();
        assert_eq!(parsed.backend, NfsBackend::Exportfs);
        assert!(!parsed.ganesha.manage);
        assert!(serde_json::from_str::<NfsConfig>(r#"{"ganesha": {"mange": false}}"#).is_err());
    }
}
