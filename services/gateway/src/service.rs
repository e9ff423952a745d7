//! The handler (`vm.requested` → remember the spec; `network.ready` → listener +
//! `storage.ready` / `storage.failed`; `vm.stopped`/`vm.failed` → close +
//! `resource.released` kind STORAGE). Start-up reconciliation is in [`crate::reconcile`].

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use tokio::net::TcpListener;
use wnodes_bus::{
    EventExt, Handler, HandlerCtx, HandlerError, KeyStore, proto, proto::event::Body,
};
use wnodes_preparer::{Events, Incoming, State, TableError};
use wnodes_runtime::host_paths::{PathRefusal, resolve_under};

use crate::{
    config::{GatewayConfig, GatewayConfigError, IdRange, PortRange},
    listener::{Listeners, Programs, ServeSpec},
    nfs::{NfsError, NfsExport, NfsServer},
    table::{self, NfsHeld, Row, Storage},
};

/// The gateway's handler.
#[derive(Debug, Clone)]
pub struct GatewayHandler {
    pub listeners: Listeners,
    pub bind_address: Option<IpAddr>,
    pub ports: PortRange,
    /// Host policy: where exports may lie, and whose they may be ([`GatewayConfig`]).
    pub export_roots: Vec<PathBuf>,
    pub job_uids: IdRange,
    pub job_gids: IdRange,
    /// `"gateway@<host>"`.
    pub source: String,
    /// The host's NFS server (`[gateway.nfs]`), started by [`GatewayHandler::with_nfs`].
    pub nfs: Option<Arc<NfsServer>>,
    /// The NFS export ids this gateway hands out, and the port guests mount.
    pub nfs_ids: IdRange,
    pub nfs_port: u16,
}

/// Why a VM's storage is not served: a rule of the host's policy the spec breaks (logged as
/// an error: the event asked for something this host never allows), or a failure to serve
/// an allowed spec (a warning).
#[derive(Debug)]
pub(crate) enum Refusal {
    Policy { rule: &'static str, reason: String },
    Cannot(String),
}

impl From<String> for Refusal {
    fn from(reason: String) -> Self {
        Self::Cannot(reason)
    }
}

impl From<&str> for Refusal {
    fn from(reason: &str) -> Self {
        Self::Cannot(reason.to_owned())
    }
}

fn policy(rule: &'static str, reason: String) -> Refusal {
    Refusal::Policy { rule, reason }
}

fn store_err(e: TableError) -> HandlerError {
    HandlerError::retry(e)
}

/// What the VM asked for, checked; or why it cannot be served.
pub(crate) enum Plan {
    /// No exports: nothing to serve.
    Nothing,
    Serve {
        spec: ServeSpec,
        bind: IpAddr,
        guest_path: String,
    },
    /// An NFS export (its id is chosen when it is made).
    Nfs {
        export: NfsExport,
        guest_path: String,
    },
}

/// In user-mode networking, the uid a connection's socket must belong to: the VM's own
/// (its qemu's, `VmSpec.vm_user`), when the launcher gave it one.
fn vm_peer_uid(spec: &proto::VmSpec, user_mode: bool) -> Option<u32> {
    spec.vm_user.as_ref().map(|u| u.uid).filter(|_| user_mode)
}

impl GatewayHandler {
    /// Builds the handler from its configuration.
    pub fn new(cfg: &GatewayConfig, source: String) -> Result<Self, GatewayConfigError> {
        cfg.validate()?;
        let ports = cfg.ports()?;
        let (job_uids, job_gids) = cfg.id_ranges()?;
        Ok(Self {
            export_roots: cfg.export_roots.clone(),
            job_uids,
            job_gids,
            listeners: Listeners::new(Programs {
                setpriv: cfg.setpriv.clone(),
                sftp_server: cfg.sftp_server.clone(),
                jail: cfg.prepare_jail()?,
            }),
            bind_address: cfg.bind_address,
            ports,
            source,
            nfs: None,
            nfs_ids: IdRange {
                first: 100,
                last: 9999,
            },
            nfs_port: 2049,
        })
    }

    /// Starts (or connects to) the NFS server of `[gateway.nfs]`, when the section is set.
    pub async fn with_nfs(mut self, cfg: &GatewayConfig) -> Result<Self, NfsError> {
        if let Some(nfs) = &cfg.nfs {
            self.nfs_ids = nfs
                .ids()
                .map_err(|e| NfsError::Daemon(format!("configuration: {e}")))?;
            self.nfs_port = nfs.port;
            self.nfs = Some(Arc::new(NfsServer::start(nfs).await?));
        }
        Ok(self)
    }

    fn events(&self) -> Events<'_, proto::StorageReady> {
        Events::new(&self.source)
    }

    /// Checks the spec against the host's policy and the network: what to serve, where, to
    /// whom. Also what the fuzz target checks ([`crate::fuzzing`]).
    pub(crate) fn plan(
        &self,
        spec: &proto::VmSpec,
        net: &proto::NetworkReady,
    ) -> Result<Plan, Refusal> {
        let Some(export) = spec.exports.first() else {
            return Ok(Plan::Nothing);
        };
        if spec.exports.len() > 1 {
            return Err(policy(
                "exports.count",
                format!(
                    "{} exports requested; the gateway serves one export per VM",
                    spec.exports.len()
                ),
            ));
        }
        let owner = spec
            .owner
            .as_ref()
            .ok_or_else(|| policy("owner.required", "the spec names no owner (uid/gid)".into()))?;
        if !self.job_uids.contains(owner.uid) {
            return Err(policy(
                "owner.job_uids",
                format!(
                    "owner uid {} is outside the job uids {} ([gateway] job_uids): never root or a system account",
                    owner.uid, self.job_uids
                ),
            ));
        }
        if !self.job_gids.contains(owner.gid) {
            return Err(policy(
                "owner.job_gids",
                format!(
                    "owner gid {} is outside the job gids {} ([gateway] job_gids)",
                    owner.gid, self.job_gids
                ),
            ));
        }
        let path = self.export_path(&export.name, &export.host_path)?;
        let user_mode = net.mode == proto::NetworkMode::User as i32;
        if spec.storage_mode == proto::StorageMode::Nfs as i32 {
            // What the spec asks first, then what this host offers.
            if user_mode {
                return Err(policy(
                    "storage.nfs_user_mode",
                    "the spec asks for NFS in user-mode networking, where every guest reaches the host from 127.0.0.1: an NFS export cannot be limited to one VM there".into(),
                ));
            }
            crate::nfs::check_path(&path)
                .map_err(|e| policy("exports.path_chars", e.to_string()))?;
            crate::nfs::check_vm_id(&spec.vm_id)
                .map_err(|e| policy("storage.nfs_vm_id", e.to_string()))?;
            if self.nfs.is_none() {
                return Err(policy(
                    "storage.nfs",
                    "the spec asks for NFS and this host offers no NFS gateway ([gateway.nfs] is not set)".into(),
                ));
            }
            let a = net.address.split('/').next().unwrap_or_default();
            let client: IpAddr = a.parse().map_err(|_| {
                format!(
                    "network.ready address {:?} is not an IP address",
                    net.address
                )
            })?;
            return Ok(Plan::Nfs {
                export: NfsExport {
                    id: 0,
                    vm_id: spec.vm_id.clone(),
                    path,
                    client,
                    uid: owner.uid,
                    gid: owner.gid,
                    read_only: export.read_only,
                },
                guest_path: export.guest_path.clone(),
            });
        }
        let me = nix::unistd::geteuid();
        if !me.is_root() && me.as_raw() != owner.uid {
            return Err(format!(
                "the gateway runs as uid {me}, not root: it cannot run sftp-server as uid {}",
                owner.uid
            )
            .into());
        }
        // sftp-server exits at once ("No user found for uid N") without a passwd entry.
        match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(owner.uid)) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(format!(
                    "owner uid {} has no passwd entry on this host (sftp-server needs one)",
                    owner.uid
                )
                .into());
            }
            Err(e) => return Err(format!("cannot look up owner uid {}: {e}", owner.uid).into()),
        }
        let allowed: IpAddr = if user_mode {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            let a = net.address.split('/').next().unwrap_or_default();
            a.parse().map_err(|_| {
                format!(
                    "network.ready address {:?} is not an IP address",
                    net.address
                )
            })?
        };
        let bind = match self.bind_address {
            Some(b) => b,
            None if user_mode => IpAddr::V4(Ipv4Addr::LOCALHOST),
            None => net.gateway.parse().map_err(|_| {
                format!(
                    "network.ready gateway {:?} is not an IP address",
                    net.gateway
                )
            })?,
        };
        Ok(Plan::Serve {
            spec: ServeSpec {
                vm_id: spec.vm_id.clone(),
                allowed,
                path,
                read_only: export.read_only,
                uid: owner.uid,
                gid: owner.gid,
                peer_uid: vm_peer_uid(spec, user_mode),
            },
            bind,
            guest_path: export.guest_path.clone(),
        })
    }

    /// The export's directory with every symlink resolved, when it lies under an export root
    /// (itself resolved): a link placed anywhere on the way cannot lead out of the roots.
    fn export_path(&self, name: &str, host_path: &str) -> Result<PathBuf, Refusal> {
        let real = resolve_under(host_path, &self.export_roots).map_err(|r| match r {
            PathRefusal::NotAbsolute => policy(
                "exports.absolute",
                format!("export {name:?}: host path {host_path:?} is not absolute"),
            ),
            PathRefusal::Unresolvable(e) => policy(
                "exports.directory",
                format!("export {name:?}: host path {host_path:?} cannot be resolved: {e}"),
            ),
            PathRefusal::NoRoot => policy(
                "exports.roots",
                format!(
                    "export {name:?}: no export root of this host exists ([gateway] export_roots = {:?}); it serves no export",
                    self.export_roots
                ),
            ),
            PathRefusal::Outside { real } => policy(
                "exports.roots",
                format!(
                    "export {name:?}: host path {host_path:?} (resolved: {}) is outside the export roots {:?} ([gateway] export_roots)",
                    real.display(),
                    self.export_roots
                ),
            ),
        })?;
        if !real.is_dir() {
            return Err(policy(
                "exports.directory",
                format!("export {name:?}: host path {host_path:?} is not a directory"),
            ));
        }
        Ok(real)
    }

    /// Binds the first free port of the range on `bind` (skipping `used`).
    async fn bind_port(&self, bind: IpAddr, used: &[u16]) -> Result<TcpListener, String> {
        let mut last_err = None;
        for port in self.ports.ports().filter(|p| !used.contains(p)) {
            match TcpListener::bind(SocketAddr::new(bind, port)).await {
                Ok(l) => return Ok(l),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
                Err(e) => {
                    last_err = Some(e);
                    break;
                }
            }
        }
        Err(match last_err {
            Some(e) => format!("cannot listen on {bind}: {e}"),
            None => format!(
                "no free port in {}-{} on {bind}",
                self.ports.first, self.ports.last
            ),
        })
    }

    async fn on_requested(
        &self,
        ctx: &mut HandlerCtx,
        ev: &proto::Event,
        spec: &proto::VmSpec,
    ) -> Result<(), HandlerError> {
        let conn = ctx.tx().await?;
        match table::get(conn, &spec.vm_id).await.map_err(store_err)? {
            Some(r) if r.is_released() => {
                tracing::info!(vm_id = %spec.vm_id, "vm.requested after the release: releasing at once.");
                ctx.publish(
                    self.events()
                        .released(ev, &spec.vm_id, "already released".into()),
                );
            }
            Some(_) => {}
            None => table::remember(conn, &ev.run_key(), spec)
                .await
                .map_err(store_err)?,
        }
        Ok(())
    }

    async fn on_network_ready(
        &self,
        ctx: &mut HandlerCtx,
        ev: &proto::Event,
        net: &proto::NetworkReady,
    ) -> Result<(), HandlerError> {
        let vm_id = net.vm_id.as_str();
        let conn = ctx.tx().await?;
        let row = table::get(conn, vm_id).await.map_err(store_err)?;
        let Some(row) = row else {
            return Err(HandlerError::retry(format!(
                "no vm.requested seen yet for {vm_id}: its spec (exports, owner) is unknown"
            )));
        };
        match row.state {
            State::Released => {
                ctx.publish(self.events().released(ev, vm_id, "already released".into()));
                return Ok(());
            }
            State::Prepared => {
                if let Some(ready) = row.detail.ready.clone() {
                    self.ensure_served(&row).await;
                    ctx.publish(self.events().ready(ev, ready));
                    return Ok(());
                }
            }
            State::Pending => {}
        }
        let Some(spec) = row.detail.spec.as_ref() else {
            return Err(HandlerError::reject(format!(
                "the stored spec of {vm_id} cannot be decoded"
            )));
        };
        let plan = match self.plan(spec, net) {
            Ok(p) => p,
            Err(Refusal::Policy { rule, reason }) => {
                tracing::error!(vm_id, rule, %reason, "Refused by host policy: nothing served.");
                ctx.publish(self.events().failed(
                    ev,
                    vm_id,
                    format!("host policy {rule}: {reason}"),
                ));
                return Ok(());
            }
            Err(Refusal::Cannot(reason)) => {
                tracing::warn!(vm_id, %reason, "Cannot serve the VM's storage.");
                ctx.publish(self.events().failed(ev, vm_id, reason));
                return Ok(());
            }
        };
        let (ready, listener, nfs) = match plan {
            Plan::Nothing => (
                proto::StorageReady {
                    vm_id: vm_id.to_owned(),
                    mode: proto::StorageMode::Sshfs as i32,
                    address: net.gateway.clone(),
                    ..Default::default()
                },
                None,
                None,
            ),
            Plan::Nfs {
                mut export,
                guest_path,
            } => {
                let Some(server) = self.nfs.clone() else {
                    return Err(HandlerError::reject("NFS planned without an NFS server"));
                };
                let used = table::nfs_ids_in_use(ctx.tx().await?, vm_id)
                    .await
                    .map_err(store_err)?;
                let free = (self.nfs_ids.first..=self.nfs_ids.last)
                    .filter_map(|i| u16::try_from(i).ok())
                    .find(|i| !used.contains(i));
                let Some(id) = free else {
                    let reason = format!("no free NFS export id in {}", self.nfs_ids);
                    tracing::warn!(vm_id, %reason, "Cannot export the VM's storage over NFS.");
                    ctx.publish(self.events().failed(ev, vm_id, reason));
                    return Ok(());
                };
                export.id = id;
                if let Err(e) = server.add(&export).await {
                    let reason = format!("NFS export of {}: {e}", export.path.display());
                    tracing::warn!(vm_id, %reason, "Cannot export the VM's storage over NFS.");
                    ctx.publish(self.events().failed(ev, vm_id, reason));
                    return Ok(());
                }
                (
                    proto::StorageReady {
                        vm_id: vm_id.to_owned(),
                        mode: proto::StorageMode::Nfs as i32,
                        address: net.gateway.clone(),
                        port: u32::from(self.nfs_port),
                        remote_path: server.remote_path(&export),
                        guest_path,
                        allowed_client: export.client.to_string(),
                    },
                    None,
                    Some(NfsHeld {
                        id,
                        path: export.path.clone(),
                    }),
                )
            }
            Plan::Serve {
                spec: serve,
                bind,
                guest_path,
            } => {
                // A listener left by an earlier attempt of this message is reused.
                let addr = match self.listeners.addr_of(vm_id) {
                    Some(a) if self.listeners.spec_of(vm_id).as_ref() == Some(&serve) => a,
                    _ => {
                        let used = table::ports_in_use(ctx.tx().await?, vm_id)
                            .await
                            .map_err(store_err)?;
                        let bound = match self.bind_port(bind, &used).await {
                            Ok(l) => l,
                            Err(reason) => {
                                tracing::warn!(vm_id, %reason, "Cannot open the SFTP listener.");
                                ctx.publish(self.events().failed(ev, vm_id, reason));
                                return Ok(());
                            }
                        };
                        self.listeners
                            .start(bound, serve.clone(), true)
                            .map_err(HandlerError::retry)?
                    }
                };
                (
                    proto::StorageReady {
                        vm_id: vm_id.to_owned(),
                        mode: proto::StorageMode::Sshfs as i32,
                        address: net.gateway.clone(),
                        port: u32::from(addr.port()),
                        remote_path: serve.path.display().to_string(),
                        guest_path,
                        allowed_client: serve.allowed.to_string(),
                    },
                    Some((addr.ip().to_string(), addr.port())),
                    None,
                )
            }
        };
        table::set_serving(ctx.tx().await?, &row, &ready, listener, nfs)
            .await
            .map_err(store_err)?;
        tracing::info!(vm_id, port = ready.port, remote_path = %ready.remote_path, allowed = %ready.allowed_client, "Storage ready.");
        ctx.publish(self.events().ready(ev, ready));
        Ok(())
    }

    /// Re-adds the NFS export of a prepared row (idempotent on the server); true when the
    /// server holds it afterwards.
    pub(crate) async fn ensure_export(&self, row: &Row, held: &NfsHeld) -> bool {
        let (Some(spec), Some(ready)) = (&row.detail.spec, &row.detail.ready) else {
            return false;
        };
        let (Some(export), Some(owner)) = (spec.exports.first(), spec.owner.as_ref()) else {
            return false;
        };
        let Some(server) = &self.nfs else {
            tracing::error!(vm_id = %row.vm_id, id = held.id, "The VM holds an NFS export and [gateway.nfs] is not set: not re-added.");
            return false;
        };
        // The policy again: the host's configuration may have changed since.
        let path = match self.export_path(&export.name, &export.host_path) {
            Ok(p) => p,
            Err(Refusal::Policy { reason, .. } | Refusal::Cannot(reason)) => {
                tracing::error!(vm_id = %row.vm_id, %reason, "The NFS export is not re-added.");
                return false;
            }
        };
        let Ok(client) = ready.allowed_client.parse() else {
            tracing::error!(vm_id = %row.vm_id, "Stored NFS client address is corrupt; not re-added.");
            return false;
        };
        let e = NfsExport {
            id: held.id,
            vm_id: row.vm_id.clone(),
            path,
            client,
            uid: owner.uid,
            gid: owner.gid,
            read_only: export.read_only,
        };
        match server.add(&e).await {
            Ok(()) => true,
            Err(err) => {
                tracing::error!(vm_id = %row.vm_id, id = held.id, error = %err, "Cannot re-add the NFS export.");
                false
            }
        }
    }

    /// Brings back what a prepared row serves: its listener or its NFS export.
    pub(crate) async fn ensure_served(&self, row: &Row) -> bool {
        if let Some(held) = &row.detail.nfs {
            return self.ensure_export(row, held).await;
        }
        self.ensure_listener(row).await;
        self.listeners.addr_of(&row.vm_id).is_some()
    }

    /// Starts the listener of a prepared row if it does not run (restart, redelivery).
    pub(crate) async fn ensure_listener(&self, row: &Row) {
        let Storage {
            spec: Some(spec),
            ready: Some(ready),
            bind: Some(bind),
            port: Some(port),
            ..
        } = &row.detail
        else {
            return; // serving without exports: nothing listens
        };
        if self.listeners.addr_of(&row.vm_id).is_some() {
            return;
        }
        let (Some(export), Some(owner)) = (spec.exports.first(), spec.owner.as_ref()) else {
            return;
        };
        let (Ok(bind), Ok(allowed)) = (bind.parse::<IpAddr>(), ready.allowed_client.parse()) else {
            tracing::error!(vm_id = %row.vm_id, "Stored listener address is corrupt; not re-opened.");
            return;
        };
        // The policy again: the host's configuration may have changed since.
        let path = match self.export_path(&export.name, &export.host_path) {
            Ok(p) => p,
            Err(Refusal::Policy { rule, reason }) => {
                tracing::error!(vm_id = %row.vm_id, rule, %reason, "Refused by host policy: the listener is not re-opened.");
                return;
            }
            Err(Refusal::Cannot(reason)) => {
                tracing::error!(vm_id = %row.vm_id, %reason, "Cannot re-open the SFTP listener.");
                return;
            }
        };
        let serve = ServeSpec {
            vm_id: row.vm_id.clone(),
            allowed,
            path,
            read_only: export.read_only,
            uid: owner.uid,
            gid: owner.gid,
            // Served on loopback: user-mode networking.
            peer_uid: vm_peer_uid(spec, allowed == IpAddr::V4(Ipv4Addr::LOCALHOST)),
        };
        let addr = SocketAddr::new(bind, *port);
        match TcpListener::bind(addr).await {
            Ok(l) => {
                // Re-opened (restart, redelivery): what went before is not counted.
                if let Err(e) = self.listeners.start(l, serve, false) {
                    tracing::error!(vm_id = %row.vm_id, %addr, error = %e, "Cannot re-open the SFTP listener.");
                }
            }
            Err(e) => {
                tracing::error!(vm_id = %row.vm_id, %addr, error = %e, "Cannot re-open the SFTP listener.");
            }
        }
    }

    async fn on_stopped(
        &self,
        ctx: &mut HandlerCtx,
        ev: &proto::Event,
        vm_id: &str,
    ) -> Result<(), HandlerError> {
        let conn = ctx.tx().await?;
        let row = table::get(conn, vm_id).await.map_err(store_err)?;
        let mut withdrawn = None;
        if let Some(held) = row
            .as_ref()
            .filter(|r| !r.is_released())
            .and_then(|r| r.detail.nfs.clone())
        {
            withdrawn = Some(match &self.nfs {
                Some(server) => {
                    server
                        .remove(held.id, &held.path)
                        .await
                        .map_err(HandlerError::retry)?;
                    format!(
                        "NFS export {} of {} withdrawn",
                        held.id,
                        held.path.display()
                    )
                }
                None => {
                    tracing::error!(
                        vm_id,
                        id = held.id,
                        "The VM holds an NFS export and [gateway.nfs] is not set: it cannot be withdrawn here."
                    );
                    format!(
                        "NFS export {} of {} NOT withdrawn: [gateway.nfs] is not set",
                        held.id,
                        held.path.display()
                    )
                }
            });
        }
        let stopped = self.listeners.stop(vm_id).await;
        let mut detail = match &stopped {
            Some(s) => {
                format!(
                    "SFTP listener {} closed, {} connection(s), sftp-server processes ended",
                    s.addr, s.served
                )
            }
            None => withdrawn.unwrap_or_default(),
        };
        let traffic = stopped
            .and_then(|s| s.traffic)
            .map(|t| proto::GatewayTraffic {
                to_vm_bytes: t.to_vm,
                from_vm_bytes: t.from_vm,
            });
        if detail.is_empty() {
            detail = match row.map(|r| r.state) {
                Some(State::Released) => "already released".into(),
                Some(_) => "no listener was running".into(),
                None => "nothing was prepared".into(),
            };
        }
        self.events()
            .release_counted(
                ctx,
                &table::TABLE,
                ev,
                vm_id,
                &Storage::default(),
                detail,
                traffic,
            )
            .await?;
        Ok(())
    }
}

impl Handler for GatewayHandler {
    fn name(&self) -> &'static str {
        "gateway.handle"
    }

    async fn handle(&self, ctx: &mut HandlerCtx, event: proto::Event) -> Result<(), HandlerError> {
        match Incoming::of(&event)? {
            Incoming::Requested(spec) => self.on_requested(ctx, &event, spec).await,
            Incoming::Ended { vm_id } => self.on_stopped(ctx, &event, vm_id).await,
            Incoming::Other(Some(Body::NetworkReady(n))) => {
                self.on_network_ready(ctx, &event, n).await
            }
            Incoming::Other(_) => Ok(()),
        }
    }
}

/// Creates the service's table (migrating an earlier version's, once).
pub async fn init_store(store: &KeyStore) -> Result<(), TableError> {
    table::init(store.pool()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked_at_start() {
        let bad_range = GatewayConfig {
            port_range: "9-1".into(),
            ..Default::default()
        };
        assert!(GatewayHandler::new(&bad_range, "g@h".into()).is_err());
        let relative = GatewayConfig {
            sftp_server: "sftp-server".into(),
            ..Default::default()
        };
        assert!(GatewayHandler::new(&relative, "g@h".into()).is_err());
        assert!(GatewayHandler::new(&GatewayConfig::default(), "g@h".into()).is_ok());
    }
}
