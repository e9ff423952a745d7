//! WNoDeS storage gateway: serves each VM's export to that VM only, as the job's uid/gid, in
//! one of two modes (the launcher's policy picks one per site, VO or job: `spec.storage_mode`):
//!
//! - **sshfs** (default): SFTP on plain TCP (the guest mounts it with `sshfs -o directport=`),
//!   from a listener that accepts only the VM's address and runs `sftp-server` as the job's
//!   uid/gid, never as root;
//! - **NFS**: an NFSv4 export restricted to the VM's address and squashed to the job's
//!   uid/gid, on the host's nfs-ganesha (added and removed at run time over D-Bus) or, at sites
//!   with a kernel nfsd, through `exportfs` ([`nfs`]; `[gateway.nfs]` must be configured).
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the `[gateway]` section, the port range |
//! | [`listener`] | per-VM in-process listeners and their `sftp-server` sessions |
//! | [`nfs`] | the NFS servers (ganesha, exportfs), their exports and the export-id range |
//! | [`table`] | the per-VM rows in the preparers' resource table: spec, listener or NFS export, tombstones |
//! | [`service`] | the handler |
//! | [`reconcile`] | start-up reconciliation: re-opening the listeners of prepared VMs, re-adding their NFS exports and removing the server's exports nobody holds |
//! | [`fuzzing`] | what the fuzz target checks: a VM's spec and `network.ready` through the handler's checks (export roots, owner ranges, NFS rules) against a fixed directory tree, the configuration's ranges and roots, NFS path characters, and the parsers of `exportfs -v`, ganesha's replies, `/proc/net/tcp` and `ldd` |
//!
//! [`Gateway`] is the service as the runtime runs it.
//!
//! ```toml
//! [gateway]
//! sftp_server = "/usr/lib/openssh/sftp-server"
//! setpriv = "/usr/bin/setpriv"
//! # bind_address = "10.231.1.1"   # default: network.ready's gateway; 127.0.0.1 in user mode
//! port_range = "20000-20999"
//!
//! [gateway.nfs]                    # optional: without it, NFS VMs fail with a reason
//! backend = "ganesha"              # or "exportfs"
//! export_ids = "100-9999"
//! ```
//!
//! What a VM gets: one export (`spec.exports`, at most one), served from `network.ready`'s
//! gateway address to the VM's address only (user-mode networking: to 127.0.0.1, which any local
//! process shares, so NFS is refused there). For sshfs the owner must be a non-root uid/gid with
//! a passwd entry on the host (`sftp-server` refuses others). `sftp-server -d` only sets the
//! start directory: it has no chroot, so the guest can reach whatever the job's uid can reach
//! on the host, as a job run on the host itself could. An NFS export is the job's directory
//! only, every access squashed to the job's uid/gid.

pub mod config;
#[cfg(test)]
mod error_rule;
pub mod fuzzing;
pub mod listener;
pub mod nfs;
pub mod reconcile;
pub mod service;
pub mod table;

pub use config::{GatewayConfig, GatewayConfigError};
pub use service::GatewayHandler;

use wnodes_runtime::{ConfigError, NoCommand, Parts, Service, ServiceCtx, StartError};

/// The storage gateway service.
#[derive(Debug)]
pub struct Gateway;

impl Service for Gateway {
    const ROLE: &'static wnodes_runtime::Role = &wnodes_bus::roles::GATEWAY;
    const ABOUT: &'static str =
        "WNoDeS storage gateway: each VM's export over SFTP or NFSv4, to that VM, as the job's uid";
    type Config = GatewayConfig;
    type Handler = GatewayHandler;
    type Command = NoCommand;

    fn validate(config: &GatewayConfig) -> Result<(), ConfigError> {
        config
            .validate()
            .map_err(|e| ConfigError::section(Self::NAME, e))
    }

    /// Creates the table and re-opens the listeners of serving VMs; they are closed when the
    /// service stops.
    async fn build(ctx: &ServiceCtx<GatewayConfig>) -> Result<Parts<GatewayHandler>, StartError> {
        let handler = GatewayHandler::new(&ctx.config, ctx.source())
            .map_err(|e| StartError::config(Self::NAME, e))?
            .with_nfs(&ctx.config)
            .await
            .map_err(|e| StartError::failed("start the NFS server", e))?;
        service::init_store(&ctx.store)
            .await
            .map_err(|e| StartError::failed("create the gateway table", e))?;
        let open = handler
            .reconcile(&ctx.store)
            .await
            .map_err(|e| StartError::failed("reconcile listeners and NFS exports", e))?;
        if !open.is_empty() {
            tracing::info!(?open, "Re-opened the listeners of serving VMs.");
        }
        let listeners = handler.listeners.clone();
        let nfs = handler.nfs.clone();
        Ok(Parts::consumer(handler).on_stop(async move {
            listeners.stop_all().await;
            if let Some(nfs) = nfs {
                nfs.stop().await;
            }
        }))
    }
}
