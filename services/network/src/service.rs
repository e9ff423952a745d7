//! The handler (`vm.requested` → `network.ready` / `network.failed`; `vm.stopped`/`vm.failed` →
//! `resource.released` kind NETWORK). Start-up reconciliation is in [`crate::reconcile`].

use std::net::Ipv4Addr;

use wnodes_bus::{ErrorChain, EventExt, Handler, HandlerCtx, HandlerError, KeyStore, proto};
use wnodes_preparer::{Events, Incoming, TableError};

use crate::{
    config::{Ipv4Net, Mode, NetworkConfig, NetworkConfigError},
    host::{Host, HostError, valid_tap_name},
    lease::{self, Lease, LeaseRow},
    mac::Mac,
    nft,
    sriov::{SriovConfig, SriovError, VfSettings},
    tap_vlan::Vlans,
};

/// Address a user-mode guest gets from qemu's slirp.
pub const USER_ADDRESS: &str = "10.0.2.15/24";
/// qemu's slirp gateway (the host, as the guest sees it).
pub const USER_GATEWAY: &str = "10.0.2.2";
/// The note published with user-mode networking.
pub const USER_NOTE: &str =
    "user-mode networking: no CAP_NET_ADMIN; per-VM address filtering does not apply";

/// Tap of a VM: `wn-` + the 12 hex digits of `vm-<12hex>`. `None` for another form of id.
pub fn tap_name(vm_id: &str) -> Option<String> {
    let tap = format!("wn-{}", vm_id.strip_prefix("vm-")?);
    valid_tap_name(&tap).then_some(tap)
}

/// The network service's handler.
#[derive(Debug, Clone)]
pub struct NetworkHandler {
    pub host: Host,
    pub mode: Mode,
    pub bridge: String,
    pub pool: Option<Ipv4Net>,
    /// `[network.sriov]`, and its pool and gateway when it has physical functions.
    pub sriov: SriovConfig,
    pub sriov_network: Option<(Ipv4Net, Ipv4Addr)>,
    /// `[network.vlan]`: which VLAN a VM is on, each VLAN's network, how taps join it.
    pub vlans: Vlans,
    /// `"network@<host>"`.
    pub source: String,
}

/// Why a VM's network could not be prepared (published as `network.failed`).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("VM id {0:?} is not of the form vm-<12 hex digits>")]
    BadVmId(String),
    #[error("bridge {0:?} does not exist")]
    BridgeMissing(String),
    #[error("cannot inspect bridge {bridge:?}")]
    Bridge {
        bridge: String,
        #[source]
        source: HostError,
    },
    #[error("{0} networking is not available on this host")]
    Unsupported(&'static str),
    #[error(
        "the spec asks for a tap, and this host's network service runs in user mode ([network] mode = \"user\", or \"auto\" without root or /dev/net/tun): no tap can be made, and user mode is used only when the spec or the configuration asks for it"
    )]
    TapUnavailable,
    #[error("no address pool configured ([network] pool)")]
    NoPool,
    #[error("address pool {pool} is not inside the bridge's subnet {bridge}")]
    PoolOutsideBridge { pool: Ipv4Net, bridge: Ipv4Net },
    #[error(transparent)]
    Exhausted(#[from] lease::Exhausted),
    #[error("cannot set up tap {tap}")]
    Tap {
        tap: String,
        #[source]
        source: HostError,
    },
    #[error(
        "SR-IOV networking is not configured on this host ([network.sriov] physical_functions is empty)"
    )]
    SriovOff,
    #[error("cannot list the VFs")]
    Vfs(#[source] SriovError),
    #[error(transparent)]
    NoVf(#[from] lease::NoVf),
    #[error("cannot set VF {index} of {pf}")]
    SetVf {
        pf: String,
        index: u32,
        #[source]
        source: HostError,
    },
    #[error("VLAN {0} has no network here ([network.vlan.networks.{0}])")]
    NoVlanNetwork(u16),
    #[error("cannot set up VLAN {vid} on this host")]
    Vlan {
        vid: u16,
        #[source]
        source: HostError,
    },
}

/// The network a tap VM's address comes from: the bridge's, or its VLAN's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapNetwork {
    /// The addresses VMs get.
    pub pool: Ipv4Net,
    /// The host's address on that network (the VMs' gateway), with its prefix.
    pub gateway: Ipv4Net,
    /// 0: `[network] bridge`, untagged.
    pub vlan: u16,
}

fn store_err(e: TableError) -> HandlerError {
    HandlerError::retry(e)
}

impl NetworkHandler {
    /// Builds the handler from its configuration (the mode resolved).
    pub fn new(cfg: &NetworkConfig, source: String) -> Result<Self, NetworkConfigError> {
        cfg.validate()?;
        let mode = cfg.mode.resolve();
        let pool = cfg.pool()?;
        Ok(Self {
            host: Host::new(cfg.netns.clone()).map_err(NetworkConfigError::Netns)?,
            mode,
            bridge: cfg.bridge.clone(),
            pool,
            sriov: cfg.sriov.clone(),
            sriov_network: cfg.sriov_network()?,
            vlans: Vlans::new(cfg.vlan.clone()).map_err(NetworkConfigError::Vlan)?,
            source,
        })
    }

    fn events(&self) -> Events<'_, proto::NetworkReady> {
        Events::new(&self.source)
    }

    /// The bridge's address, checked against the pool (slow host work: done before the
    /// transaction).
    async fn bridge_address(&self) -> Result<(Ipv4Net, Ipv4Net), PrepareError> {
        let pool = self.pool.ok_or(PrepareError::NoPool)?;
        let bridge = match self.host.ipv4_of(&self.bridge).await {
            Ok(Some(a)) => a,
            Ok(None) => return Err(PrepareError::BridgeMissing(self.bridge.clone())),
            Err(source) => {
                return Err(PrepareError::Bridge {
                    bridge: self.bridge.clone(),
                    source,
                });
            }
        };
        if !bridge.covers(pool) {
            return Err(PrepareError::PoolOutsideBridge { pool, bridge });
        }
        Ok((pool, bridge))
    }

    /// The network of a tap VM on VLAN `vlan` (0: the bridge's, checked against the pool:
    /// slow host work, done before the transaction).
    ///
    /// # Errors
    /// The bridge is missing or its network does not hold the pool; the VLAN has no network.
    pub async fn tap_network(&self, vlan: u16) -> Result<TapNetwork, PrepareError> {
        if vlan == 0 {
            let (pool, gateway) = self.bridge_address().await?;
            return Ok(TapNetwork {
                pool,
                gateway,
                vlan,
            });
        }
        let net = self
            .vlans
            .networks
            .get(&vlan)
            .ok_or(PrepareError::NoVlanNetwork(vlan))?;
        Ok(TapNetwork {
            pool: net.pool,
            gateway: net.address,
            vlan,
        })
    }

    /// Makes the tap as a port of `bridge`, on VLAN `vlan` (0: none), and its filter
    /// (idempotent: checked against host state).
    async fn make_tap(
        &self,
        tap: &str,
        bridge: &str,
        vlan: u16,
        mac: Mac,
        ip: Ipv4Addr,
        owner: Option<&proto::HostUser>,
    ) -> Result<(), HostError> {
        self.host.create_tap(tap, bridge, owner).await?;
        if vlan != 0 {
            self.vlan_port(tap, vlan).await?;
        }
        self.host.nft_apply(&nft::vm_script(tap, mac, ip)).await
    }

    /// Removes the tap and its filter (idempotent).
    async fn remove_tap(&self, tap: &str) -> Result<(), HostError> {
        self.host.nft_apply(&nft::remove_script(tap)).await?;
        self.host.delete_link(tap).await.map(drop)
    }

    async fn on_requested(
        &self,
        ctx: &mut HandlerCtx,
        ev: &proto::Event,
        spec: &proto::VmSpec,
    ) -> Result<(), HandlerError> {
        let vm_id = spec.vm_id.as_str();
        let run_key = ev.run_key();
        // The spec may ask for user-mode networking; SR-IOV is not available on this host.
        let requested = proto::NetworkMode::try_from(spec.network_mode)
            .unwrap_or(proto::NetworkMode::Unspecified);
        if requested == proto::NetworkMode::Sriov {
            return self.on_requested_vf(ctx, ev, spec, &run_key).await;
        }
        let plan = match (requested, self.mode) {
            (proto::NetworkMode::Sriov, _) => Err(PrepareError::Unsupported("SR-IOV")),
            // No silent fallback: a tap asked for is a tap or a failure.
            (proto::NetworkMode::VirtioTap, Mode::User) => Err(PrepareError::TapUnavailable),
            (proto::NetworkMode::User, _) | (_, Mode::User) => Ok(None),
            (_, Mode::Tap) => self
                .tap_network(self.vlans.config.vlan_for(&spec.vo, &spec.queue))
                .await
                .map(Some),
        };
        let network = match plan {
            Ok(b) => b,
            Err(e) => {
                // A late request after the release is still only released.
                let conn = ctx.tx().await?;
                if lease::get(conn, vm_id)
                    .await
                    .map_err(store_err)?
                    .is_some_and(|l| l.is_released())
                {
                    ctx.publish(self.events().released(ev, vm_id, "already released".into()));
                } else {
                    let reason = ErrorChain(&e).to_string();
                    tracing::warn!(vm_id, error = %reason, "Cannot prepare the network.");
                    ctx.publish(self.events().failed(ev, vm_id, reason));
                }
                return Ok(());
            }
        };
        let conn = ctx.tx().await?;
        let existing = lease::get(conn, vm_id).await.map_err(store_err)?;
        if existing.as_ref().is_some_and(|l| l.is_released()) {
            tracing::info!(vm_id, "vm.requested after the release: releasing at once.");
            ctx.publish(self.events().released(ev, vm_id, "already released".into()));
            return Ok(());
        }
        let ready = match network {
            Some(network) => {
                match self
                    .prepare_tap(ctx.tx().await?, spec, &run_key, existing, network)
                    .await?
                {
                    Ok(r) => r,
                    Err(e) => {
                        let reason = ErrorChain(&e).to_string();
                        tracing::warn!(vm_id, error = %reason, "Cannot prepare the network.");
                        ctx.publish(self.events().failed(ev, vm_id, reason));
                        return Ok(());
                    }
                }
            }
            None => {
                lease::record_user(ctx.tx().await?, vm_id, &run_key)
                    .await
                    .map_err(store_err)?;
                proto::NetworkReady {
                    vm_id: vm_id.to_owned(),
                    mode: proto::NetworkMode::User as i32,
                    // slirp has one guest per VM: no collision to avoid, attempt 0.
                    mac: Mac::for_vm(vm_id, 0).to_string(),
                    address: USER_ADDRESS.into(),
                    gateway: USER_GATEWAY.into(),
                    address_filtered: false,
                    note: USER_NOTE.into(),
                    ..Default::default()
                }
            }
        };
        tracing::info!(vm_id, tap = %ready.tap, mac = %ready.mac, address = %ready.address, "Network ready.");
        ctx.publish(self.events().ready(ev, ready));
        Ok(())
    }

    /// A tap for the VM of `spec` (its lease, `existing` or made in `conn`'s transaction) on
    /// `network` (a lease's own VLAN over it), with its VLAN's host side and its filter;
    /// `Ok(Err(_))` when it cannot be had (published as `network.failed`: the lease is
    /// forgotten in `conn` and what was made undone). The handler's tap path, public for the
    /// in-guest tests (`crates/wnodes-guest-probe`).
    ///
    /// # Errors
    /// The lease table (retry), or a corrupt lease (reject).
    pub async fn prepare_tap(
        &self,
        conn: &mut sqlx::SqliteConnection,
        spec: &proto::VmSpec,
        run_key: &str,
        existing: Option<LeaseRow>,
        network: TapNetwork,
    ) -> Result<Result<proto::NetworkReady, PrepareError>, HandlerError> {
        let vm_id = spec.vm_id.as_str();
        let Some(tap) = tap_name(vm_id) else {
            return Ok(Err(PrepareError::BadVmId(vm_id.to_owned())));
        };
        let (lease, network) = match existing {
            Some(l)
                if l.detail.mode == Mode::Tap
                    && l.detail.vf.is_none()
                    && l.detail.address.is_some()
                    && l.detail.mac.is_some() =>
            {
                // A redelivery: the lease says which network (the configuration may have
                // changed since).
                let network = if l.detail.vlan == network.vlan {
                    network
                } else {
                    match self.tap_network(l.detail.vlan).await {
                        Ok(n) => n,
                        Err(e) => return Ok(Err(e)),
                    }
                };
                (l.detail, network)
            }
            _ => match lease::allocate_tap(
                &mut *conn,
                vm_id,
                run_key,
                &tap,
                network.pool,
                network.gateway.addr,
                network.vlan,
            )
            .await
            .map_err(store_err)?
            {
                Ok(l) => (l, network),
                Err(e) => return Ok(Err(e.into())),
            },
        };
        let parsed = (
            lease
                .address
                .as_deref()
                .and_then(|a| a.parse::<Ipv4Addr>().ok()),
            lease.mac.as_deref().and_then(|m| m.parse::<Mac>().ok()),
        );
        let (Some(ip), Some(mac)) = parsed else {
            return Err(HandlerError::reject(format!(
                "lease of {vm_id} in the store is corrupt: {lease:?}"
            )));
        };
        let vlan = network.vlan;
        let bridge = if vlan == 0 {
            Ok(self.bridge.clone())
        } else {
            self.vlan_side(vlan, network.gateway)
                .await
                .map_err(|source| PrepareError::Vlan { vid: vlan, source })
        };
        let made = match bridge {
            Ok(bridge) => self
                .make_tap(&tap, &bridge, vlan, mac, ip, spec.vm_user.as_ref())
                .await
                .map(|()| bridge)
                .map_err(|source| PrepareError::Tap {
                    tap: tap.clone(),
                    source,
                }),
            Err(e) => Err(e),
        };
        let bridge = match made {
            Ok(b) => b,
            Err(e) => {
                // Undo what was made; the lease goes with it (same transaction).
                if let Err(e) = self.remove_tap(&tap).await {
                    tracing::warn!(vm_id, %tap, error = %ErrorChain(&e), "Cannot undo a half-made tap.");
                }
                lease::forget(&mut *conn, vm_id).await.map_err(store_err)?;
                if let Err(e) = self.release_vlan_if_unused(conn, vm_id, vlan).await {
                    tracing::warn!(vm_id, vlan, error = %e, "Cannot undo a VLAN's half-made host side.");
                }
                return Ok(Err(e));
            }
        };
        Ok(Ok(proto::NetworkReady {
            vm_id: vm_id.to_owned(),
            mode: proto::NetworkMode::VirtioTap as i32,
            tap,
            mac: mac.to_string(),
            address: format!("{ip}/{}", network.gateway.prefix),
            gateway: network.gateway.addr.to_string(),
            bridge,
            address_filtered: true,
            vlan: u32::from(vlan),
            ..Default::default()
        }))
    }

    /// Removes VLAN `vid`'s host side when no other prepared tap lease than `vm_id`'s is on it
    /// (`conn`'s transaction holds the store's write lock: no VM joins meanwhile); what was
    /// removed.
    ///
    /// # Errors
    /// The lease table (retry), or the kernel refused (retry).
    pub async fn release_vlan_if_unused(
        &self,
        conn: &mut sqlx::SqliteConnection,
        vm_id: &str,
        vid: u16,
    ) -> Result<Vec<String>, HandlerError> {
        if vid == 0
            || lease::tap_vlan_in_use(conn, vm_id, vid)
                .await
                .map_err(store_err)?
        {
            return Ok(Vec::new());
        }
        self.remove_vlan_side(vid)
            .await
            .map_err(HandlerError::retry)
    }

    /// Releases what `lease` holds on the host: its tap and filter, its VF (reset), its VLAN's
    /// host side when no other VM is on it; what was released, for the release's detail.
    ///
    /// # Errors
    /// The lease table or the kernel (retry: the release is redone on redelivery).
    pub async fn release_host(
        &self,
        conn: &mut sqlx::SqliteConnection,
        vm_id: &str,
        lease: &Lease,
    ) -> Result<String, HandlerError> {
        let mut parts = Vec::new();
        if let Some(tap) = lease.tap.as_deref().filter(|t| valid_tap_name(t)) {
            self.remove_tap(tap).await.map_err(HandlerError::retry)?;
            parts.push(format!("tap {tap}, nft chain {tap}"));
            parts.extend(self.release_vlan_if_unused(conn, vm_id, lease.vlan).await?);
        }
        if let Some(done) = self.reset_vf(lease).await.map_err(HandlerError::retry)? {
            parts.push(done);
        }
        if let Some(a) = &lease.address {
            parts.push(format!("lease {a}"));
        }
        Ok(if parts.is_empty() {
            "user-mode networking: nothing held on the host".to_owned()
        } else {
            parts.join(", ")
        })
    }

    /// `vm.requested` asking for SR-IOV: a VF of the configured PFs, set to the VM's MAC and
    /// its VO's (or queue's) VLAN with spoof checking on, or `network.failed` with the reason.
    async fn on_requested_vf(
        &self,
        ctx: &mut HandlerCtx,
        ev: &proto::Event,
        spec: &proto::VmSpec,
        run_key: &str,
    ) -> Result<(), HandlerError> {
        let vm_id = spec.vm_id.as_str();
        let conn = ctx.tx().await?;
        let existing = lease::get(conn, vm_id).await.map_err(store_err)?;
        if existing.as_ref().is_some_and(|l| l.is_released()) {
            tracing::info!(vm_id, "vm.requested after the release: releasing at once.");
            ctx.publish(self.events().released(ev, vm_id, "already released".into()));
            return Ok(());
        }
        match self
            .prepare_vf(ctx.tx().await?, spec, run_key, existing)
            .await?
        {
            Ok(ready) => {
                tracing::info!(vm_id, pci = %ready.pci_address, mac = %ready.mac, vlan = ready.vlan, address = %ready.address, "Network ready (SR-IOV VF).");
                ctx.publish(self.events().ready(ev, ready));
            }
            Err(e) => {
                let reason = ErrorChain(&e).to_string();
                tracing::warn!(vm_id, error = %reason, "Cannot prepare the network.");
                ctx.publish(self.events().failed(ev, vm_id, reason));
            }
        }
        Ok(())
    }

    /// A VF for the VM of `spec` (its lease, `existing` or made in `conn`'s transaction) set
    /// on its PF; `Ok(Err(_))` when it cannot be had (published as `network.failed`: the lease
    /// is forgotten in `conn` and the VF reset). The handler's SR-IOV path, public for the
    /// in-guest tests (`crates/wnodes-guest-probe`).
    ///
    /// # Errors
    /// The lease table (retry), or a corrupt lease (reject).
    pub async fn prepare_vf(
        &self,
        conn: &mut sqlx::SqliteConnection,
        spec: &proto::VmSpec,
        run_key: &str,
        existing: Option<LeaseRow>,
    ) -> Result<Result<proto::NetworkReady, PrepareError>, HandlerError> {
        let vm_id = spec.vm_id.as_str();
        let Some((pool, gateway)) = self.sriov_network else {
            return Ok(Err(PrepareError::SriovOff));
        };
        let lease: Lease = match existing {
            Some(l) if l.detail.vf.is_some() && l.detail.address.is_some() => l.detail,
            _ => {
                let pfs =
                    match crate::sriov::discover(&self.sriov.sysfs, &self.sriov.physical_functions)
                    {
                        Ok(p) => p,
                        Err(e) => return Ok(Err(PrepareError::Vfs(e))),
                    };
                let vlan = self.vlans.config.vlan_for(&spec.vo, &spec.queue);
                match lease::allocate_vf(&mut *conn, vm_id, run_key, &pfs, pool, gateway, vlan)
                    .await
                    .map_err(store_err)?
                {
                    Ok(l) => l,
                    Err(e) => return Ok(Err(e.into())),
                }
            }
        };
        let (Some(vf), Some(mac), Some(address)) = (
            lease.vf.clone(),
            lease.mac.as_deref().and_then(|m| m.parse::<Mac>().ok()),
            lease.address.clone(),
        ) else {
            return Err(HandlerError::reject(format!(
                "lease of {vm_id} in the store is corrupt: {lease:?}"
            )));
        };
        let settings = VfSettings::for_vm(mac, lease.vlan, self.sriov.trust);
        if let Err(source) = self.host.set_vf(&vf.pf, vf.index, &settings).await {
            // Undo what may have been set; the lease goes with it (same transaction).
            if let Err(e) = self.host.set_vf(&vf.pf, vf.index, &VfSettings::RESET).await {
                tracing::warn!(vm_id, pf = %vf.pf, vf = vf.index, error = %ErrorChain(&e), "Cannot reset a half-set VF.");
            }
            lease::forget(conn, vm_id).await.map_err(store_err)?;
            return Ok(Err(PrepareError::SetVf {
                pf: vf.pf,
                index: vf.index,
                source,
            }));
        }
        Ok(Ok(proto::NetworkReady {
            vm_id: vm_id.to_owned(),
            mode: proto::NetworkMode::Sriov as i32,
            mac: mac.to_string(),
            address: format!("{address}/{}", pool.prefix),
            gateway: gateway.to_string(),
            vlan: u32::from(lease.vlan),
            pci_address: vf.pci,
            // The PF's spoof checking holds the VF to its MAC; nothing on this host filters
            // its IPv4 address.
            address_filtered: false,
            note: "SR-IOV VF: spoof checking on the PF holds the VM to its MAC; its IPv4 address is not filtered on this host".into(),
            ..Default::default()
        }))
    }

    /// Resets the lease's VF, if it holds one (MAC zero, VLAN 0, spoof checking on, trust
    /// off); what was reset, for the release's detail.
    ///
    /// # Errors
    /// The PF refused.
    pub async fn reset_vf(&self, lease: &Lease) -> Result<Option<String>, HostError> {
        let Some(vf) = &lease.vf else {
            return Ok(None);
        };
        self.host
            .set_vf(&vf.pf, vf.index, &VfSettings::RESET)
            .await?;
        Ok(Some(format!(
            "VF {} of {} ({}), reset",
            vf.index, vf.pf, vf.pci
        )))
    }

    async fn on_stopped(
        &self,
        ctx: &mut HandlerCtx,
        ev: &proto::Event,
        vm_id: &str,
    ) -> Result<(), HandlerError> {
        let conn = ctx.tx().await?;
        let existing = lease::get(conn, vm_id).await.map_err(store_err)?;
        let detail = match &existing {
            Some(l) if l.is_prepared() => {
                self.release_host(ctx.tx().await?, vm_id, &l.detail).await?
            }
            Some(_) => "already released".to_owned(),
            None => "nothing was prepared".to_owned(),
        };
        let tombstone = Lease::empty(existing.map_or(self.mode, |l| l.detail.mode));
        self.events()
            .release(ctx, &lease::TABLE, ev, vm_id, &tombstone, detail)
            .await?;
        Ok(())
    }
}

impl Handler for NetworkHandler {
    fn name(&self) -> &'static str {
        "network.handle"
    }

    async fn handle(&self, ctx: &mut HandlerCtx, event: proto::Event) -> Result<(), HandlerError> {
        match Incoming::of(&event)? {
            Incoming::Requested(spec) => self.on_requested(ctx, &event, spec).await,
            Incoming::Ended { vm_id } => self.on_stopped(ctx, &event, vm_id).await,
            Incoming::Other(_) => Ok(()),
        }
    }
}

/// Creates the lease table (migrating an earlier version's, once).
pub async fn init_store(store: &KeyStore) -> Result<(), TableError> {
    lease::init(store.pool()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModeSetting;

    #[test]
    fn config_is_checked_at_start() {
        let cfg = |mode, pool: Option<&str>, bridge: &str| NetworkConfig {
            mode,
            bridge: bridge.into(),
            pool: pool.map(str::to_owned),
            netns: None,
            sriov: SriovConfig::default(),
            vlan: crate::vlan::VlanConfig::default(),
        };
        let err = NetworkHandler::new(&cfg(ModeSetting::Tap, None, "wnbr0"), "n@h".into())
            .unwrap_err()
            .to_string();
        assert!(matches!(
            NetworkHandler::new(
                &cfg(ModeSetting::Tap, Some("10.0.0.0/33"), "wnbr0"),
                "n@h".into()
            ),
            Err(NetworkConfigError::Pool(_))
        ));
        assert!(err.contains("pool is required"), "{err}");
        assert!(
            NetworkHandler::new(
                &cfg(ModeSetting::Tap, Some("10.0.0.0/33"), "wnbr0"),
                "n@h".into()
            )
            .is_err()
        );
        assert!(
            NetworkHandler::new(
                &cfg(ModeSetting::Tap, Some("10.0.0.0/24"), "br;x"),
                "n@h".into()
            )
            .is_err()
        );
        let user =
            NetworkHandler::new(&cfg(ModeSetting::User, None, "wnbr0"), "n@h".into()).unwrap();
        assert_eq!(user.mode, Mode::User);
        assert_eq!(
            tap_name("vm-0123456789ab").as_deref(),
            Some("wn-0123456789ab")
        );
        assert_eq!(tap_name("vm-job-1"), None);
        assert_eq!(tap_name("vm-0123456789AB"), None);
    }
}
