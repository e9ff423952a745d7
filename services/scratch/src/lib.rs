//! The WNoDeS scratch service: gives every VM a local scratch disk and takes it back when the
//! VM ends (see `docs/job-flow-contract.md`).
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the `[scratch]` section: backend, directory, size limits, mkfs, `[scratch.lvm]` |
//! | [`volume`] | [`FileBackend`]: sparse `<dir>/<vm_id>.img` files, ext4 via mkfs, no mount |
//! | [`lvm`] | [`LvmBackend`]: one tagged LV per VM (`lvcreate`/`lvs`/`lvremove`), activation or, in metadata-only mode, a loop device over its extents |
//! | [`backend`] | [`Volumes`]: the configured backend, and its side of the reconcile |
//! | [`state`] | the per-VM rows (`prepared` / `released`) in the preparers' resource table |
//! | [`handler`] | [`ScratchHandler`]: `vm.requested` → ready/failed, `vm.stopped`/`vm.failed` → release |
//!
//! [`Scratch`] is the service as the runtime runs it: its build reconciles the volumes with the
//! rows ([`reconcile`], through [`wnodes_preparer::reconcile()`]) before the durable consumer
//! `scratch-<host>` starts.

pub mod backend;
pub mod config;
#[cfg(test)]
mod error_rule;
pub mod handler;
pub mod lvm;
pub mod state;
pub mod volume;

use sqlx::SqlitePool;
use wnodes_runtime::{NoCommand, Parts, Service, ServiceCtx, StartError};

pub use backend::{Found, Volumes};
pub use config::{Backend, ConfigError, ScratchConfig};
pub use handler::{Limits, ScratchHandler};
pub use lvm::{Lv, LvmBackend, LvmConfig};
pub use state::{Volume, VolumeRow, VolumeState};
pub use volume::{FileBackend, VolumeError};
pub use wnodes_preparer::TableError;

/// Why reconciling failed.
pub type ReconcileError = wnodes_preparer::ReconcileError<VolumeError>;

/// Removes partial volume files and every volume whose row is `released` or missing (each is
/// logged): `vm-*.img` files, or the LVs tagged `wnodes` whose tag says released, that name no
/// VM, or whose VM no prepared row knows. Returns what was removed (file paths, LV names).
/// Run before the consumer starts.
pub async fn reconcile(
    volumes: &Volumes,
    pool: &SqlitePool,
) -> Result<Vec<String>, ReconcileError> {
    if let Volumes::File(f) = volumes {
        f.remove_partials().await.map_err(ReconcileError::Host)?;
    }
    let done = wnodes_preparer::reconcile(&state::TABLE, pool, volumes).await?;
    Ok(done
        .removed
        .iter()
        .map(|found| match (found, volumes) {
            (Found::File(id), Volumes::File(f)) => f.path_of(id).display().to_string(),
            (Found::File(id), _) => id.clone(),
            (Found::Lv(lv), _) => lv.name.clone(),
        })
        .collect())
}

/// The scratch service.
#[derive(Debug)]
pub struct Scratch;

impl Service for Scratch {
    const ROLE: &'static wnodes_runtime::Role = &wnodes_bus::roles::SCRATCH;
    const ABOUT: &'static str = "WNoDeS scratch service: a local scratch disk for every VM";
    type Config = ScratchConfig;
    type Handler = ScratchHandler;
    type Command = NoCommand;

    fn validate(config: &ScratchConfig) -> Result<(), wnodes_runtime::ConfigError> {
        config
            .validate()
            .map_err(|e| wnodes_runtime::ConfigError::section(Self::NAME, e))
    }

    /// Prepares the backend (the volume directory, default `<state_dir>/volumes`, or the
    /// volume group) and the table, and reconciles them.
    async fn build(ctx: &ServiceCtx<ScratchConfig>) -> Result<Parts<ScratchHandler>, StartError> {
        let config = &ctx.config;
        let mkfs = config.mkfs.then(|| config.mkfs_program.clone());
        let backend =
            match config.backend {
                Backend::File => {
                    let dir = config
                        .dir
                        .clone()
                        .unwrap_or_else(|| ctx.state_dir.join("volumes"));
                    Volumes::File(FileBackend::new(dir, mkfs).map_err(|e| {
                        StartError::failed("prepare the scratch volume directory", e)
                    })?)
                }
                Backend::Lvm => {
                    let lvm = LvmBackend::new(config.lvm.clone(), mkfs)
                        .map_err(|e| StartError::failed("prepare the LVM scratch backend", e))?;
                    // The volume group must answer before the consumer starts.
                    lvm.space()
                        .await
                        .map_err(|e| StartError::failed("read the scratch volume group", e))?;
                    Volumes::Lvm(lvm)
                }
            };
        state::init(ctx.store.pool())
            .await
            .map_err(|e| StartError::failed("create the scratch table", e))?;
        let removed = reconcile(&backend, ctx.store.read_pool())
            .await
            .map_err(|e| StartError::failed("reconcile scratch volumes", e))?;
        tracing::info!(backend = backend.name(), volumes = %backend.location(), removed = removed.len(), "Scratch volumes reconciled.");
        Ok(Parts::consumer(ScratchHandler::new(
            backend,
            Limits {
                max_bytes: config.max_bytes,
                default_bytes: config.default_bytes,
            },
            ctx.source(),
            ctx.tuning().max_attempts,
        )))
    }
}
