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
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            sftp_server: PathBuf::from("/usr/lib/openssh/sftp-server"),
            setpriv: PathBuf::from("/usr/bin/setpriv"),
            bind_address: None,
            port_range: "20000-20999".into(),
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
}

impl GatewayConfig {
    /// The port range, parsed.
    pub fn ports(&self) -> Result<PortRange, GatewayConfigError> {
        self.port_range
            .parse()
            .map_err(GatewayConfigError::PortRange)
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), GatewayConfigError> {
        self.ports()?;
        for (key, p) in [
            ("setpriv", &self.setpriv),
            ("sftp_server", &self.sftp_server),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        let r: PortRange = "20000-20002".parse().unwrap();
        assert_eq!(r.ports().collect::<Vec<_>>(), vec![20000, 20001, 20002]);
        for bad in ["", "1", "0-5", "5-4", "1-70000", "a-b"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }
}
