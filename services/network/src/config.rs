//! The `[network]` configuration section (env `WNODES_NETWORK__<KEY>`) and the IPv4 prefix type
//! it uses.

use std::{fmt, net::Ipv4Addr, path::Path, str::FromStr};

use serde::{Deserialize, Serialize};

/// How VMs get their network, as configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeSetting {
    /// A tap in the bridge with a per-VM MAC/IP filter (needs CAP_NET_ADMIN).
    Tap,
    /// qemu user-mode networking: nothing on the host, no address filtering.
    User,
    /// `tap` when the service runs as root and `/dev/net/tun` exists, else `user`.
    #[default]
    Auto,
}

/// The mode actually used, after `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Tap,
    User,
}

impl Mode {
    /// Its name (also its JSON form in the lease table).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tap => "tap",
            Self::User => "user",
        }
    }
}

impl ModeSetting {
    /// Resolves `auto`: tap needs CAP_NET_ADMIN (we check for euid 0) and the tun device.
    pub fn resolve(self) -> Mode {
        match self {
            Self::Tap => Mode::Tap,
            Self::User => Mode::User,
            Self::Auto => {
                if nix::unistd::geteuid().is_root() && Path::new("/dev/net/tun").exists() {
                    Mode::Tap
                } else {
                    Mode::User
                }
            }
        }
    }
}

/// The `[network]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// `tap`, `user` or `auto` (default).
    pub mode: ModeSetting,
    /// Existing Linux bridge the taps join; its IPv4 address is the VMs' gateway.
    pub bridge: String,
    /// Addresses handed to VMs, e.g. `"10.231.1.0/24"` (required in tap mode). The network and
    /// broadcast addresses and the bridge's own address are never handed out.
    pub pool: Option<String>,
    /// Run every `ip`/`nft` command inside this network namespace (`ip netns exec <netns>`),
    /// for a hypervisor network kept in its own namespace (and for tests). Unset: the service's
    /// own namespace.
    pub netns: Option<String>,
    /// `[network.sriov]`: VMs that ask for SR-IOV get a VF of these physical functions
    /// (`docs/sriov-and-vlans.md`). Off while `physical_functions` is empty.
    pub sriov: crate::sriov::SriovConfig,
    /// `[network.vlan]`: VMs of a configured VO or queue on their own VLAN, with a tap or a VF
    /// (`docs/sriov-and-vlans.md`). Off while no VLAN is configured.
    pub vlan: crate::vlan::VlanConfig,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            mode: ModeSetting::Auto,
            bridge: "wnbr0".into(),
            pool: None,
            netns: None,
            sriov: crate::sriov::SriovConfig::default(),
            vlan: crate::vlan::VlanConfig::default(),
        }
    }
}

/// A `[network]` value the service cannot use; names the key.
#[derive(Debug, thiserror::Error)]
pub enum NetworkConfigError {
    #[error("pool: not an IPv4 prefix")]
    Pool(#[source] CidrError),
    #[error("pool is required in tap mode (e.g. pool = \"10.231.1.0/24\")")]
    PoolRequired,
    #[error("bridge {0:?} is not a valid interface name")]
    Bridge(String),
    #[error("netns")]
    Netns(#[source] crate::host::HostError),
    #[error("sriov.{0}")]
    Sriov(String),
    #[error("vlan.{0}")]
    Vlan(String),
}

impl NetworkConfig {
    /// The address pool, parsed (`None` when unset).
    pub fn pool(&self) -> Result<Option<Ipv4Net>, NetworkConfigError> {
        self.pool
            .as_deref()
            .map(str::parse::<Ipv4Net>)
            .transpose()
            .map_err(NetworkConfigError::Pool)
    }

    /// Checks every value, with `mode` resolved on this host.
    pub fn validate(&self) -> Result<(), NetworkConfigError> {
        let pool = self.pool()?;
        if self.mode.resolve() == Mode::Tap && pool.is_none() {
            return Err(NetworkConfigError::PoolRequired);
        }
        if !crate::host::valid_ifname(&self.bridge) {
            return Err(NetworkConfigError::Bridge(self.bridge.clone()));
        }
        crate::host::Host::new(self.netns.clone()).map_err(NetworkConfigError::Netns)?;
        self.sriov_network()?;
        self.vlan
            .check(&self.bridge, self.mode.resolve() == Mode::Tap)
            .map_err(NetworkConfigError::Vlan)?;
        Ok(())
    }

    /// `[network.sriov]`'s pool and gateway, checked (`None` while SR-IOV is off).
    pub fn sriov_network(&self) -> Result<Option<(Ipv4Net, Ipv4Addr)>, NetworkConfigError> {
        let s = &self.sriov;
        s.check().map_err(NetworkConfigError::Sriov)?;
        if s.physical_functions.is_empty() {
            return Ok(None);
        }
        let pool: Ipv4Net = s
            .pool
            .as_deref()
            .ok_or_else(|| {
                NetworkConfigError::Sriov(
                    "pool is required with physical_functions (e.g. pool = \"10.231.2.0/24\")"
                        .into(),
                )
            })?
            .parse()
            .map_err(|e: CidrError| NetworkConfigError::Sriov(format!("pool: {e}")))?;
        let gateway: Ipv4Addr = s
            .gateway
            .as_deref()
            .ok_or_else(|| {
                NetworkConfigError::Sriov("gateway is required with physical_functions".into())
            })?
            .parse()
            .map_err(|e| NetworkConfigError::Sriov(format!("gateway: {e}")))?;
        if !pool.contains(gateway) {
            return Err(NetworkConfigError::Sriov(format!(
                "gateway {gateway} is not inside pool {pool}"
            )));
        }
        Ok(Some((pool, gateway)))
    }
}

/// An IPv4 address with a prefix length, e.g. `10.231.1.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// A malformed `a.b.c.d/n` value.
#[derive(Debug, thiserror::Error)]
#[error("invalid IPv4 prefix {value:?}: {why}")]
pub struct CidrError {
    pub value: String,
    pub why: &'static str,
}

impl Ipv4Net {
    /// Builds a prefix; `None` when `prefix > 32`.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then_some(Self { addr, prefix })
    }

    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The broadcast address (host bits set).
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// True when `ip` is inside this prefix.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// True when every address of `other` is inside this prefix.
    pub fn covers(self, other: Ipv4Net) -> bool {
        other.prefix >= self.prefix && self.contains(other.network())
    }

    /// Usable host addresses: every address but the network and broadcast ones (for /31 and
    /// /32 every address).
    pub fn hosts(self) -> impl Iterator<Item = Ipv4Addr> {
        let (first, last) = (u32::from(self.network()), u32::from(self.broadcast()));
        let (first, last) = if self.prefix >= 31 {
            (first, last)
        } else {
            (first + 1, last - 1)
        };
        (first..=last).map(Ipv4Addr::from)
    }
}

impl FromStr for Ipv4Net {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| CidrError {
            value: s.to_owned(),
            why,
        };
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| err("expected a.b.c.d/prefix"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| err("bad IPv4 address"))?;
        let prefix: u8 = p.parse().map_err(|_| err("bad prefix length"))?;
        Self::new(addr, prefix).ok_or_else(|| err("prefix length above 32"))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_arithmetic() {
        let n: Ipv4Net = "10.231.1.77/24".parse().unwrap();
        assert_eq!(n.network(), Ipv4Addr::new(10, 231, 1, 0));
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 231, 1, 255));
        assert!(n.contains(Ipv4Addr::new(10, 231, 1, 9)));
        assert!(!n.contains(Ipv4Addr::new(10, 231, 2, 9)));
        assert_eq!(n.hosts().count(), 254);
        assert_eq!(n.hosts().next(), Some(Ipv4Addr::new(10, 231, 1, 1)));
        let small: Ipv4Net = "10.231.1.0/30".parse().unwrap();
        assert!(n.covers(small));
        assert!(!small.covers(n));
        assert_eq!(small.hosts().count(), 2);
        assert_eq!("1.2.3.4/32".parse::<Ipv4Net>().unwrap().hosts().count(), 1);
        for bad in ["10.0.0.0", "10.0.0/8", "10.0.0.0/33", "x/8", "10.0.0.0/-1"] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
        }
        assert_eq!(n.to_string(), "10.231.1.77/24");
    }
}
