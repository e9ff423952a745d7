//! The WNoDeS scratch service: gives every VM a local scratch disk and takes it back when the
//! VM ends (see `docs/job-flow-contract.md`).
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the `[scratch]` section: backend, directory, size limits, mkfs |
//! | [`volume`] | [`FileBackend`]: sparse `<dir>/<vm_id>.img` files, ext4 via mkfs, no mount |
//! | [`state`] | the per-VM rows (`prepared` / `released`) in the preparers' resource table |
//! | [`handler`] | [`ScratchHandler`]: `vm.requested` → ready/failed, `vm.stopped`/`vm.failed` → release |
//!
//! [`Scratch`] is the service as the runtime runs it: its build reconciles the directory with the
//! rows ([`reconcile`], through [`wnodes_preparer::reconcile()`]) before the durable consumer
//! `scratch-<host>` starts.

pub mod config;
#[cfg(test)]
mod error_rule;
pub mod handler;
pub mod state;
pub mod volume;

use std::path::PathBuf;

use sqlx::SqlitePool;
use wnodes_preparer::{HostResources, Row};
use wnodes_runtime::{NoCommand, Parts, Service, ServiceCtx, StartError};

pub use config::{Backend, ConfigError, ScratchConfig};
pub use handler::{Limits, ScratchHandler};
pub use state::{Volume, VolumeRow, VolumeState};
pub use volume::{FileBackend, VolumeError};
pub use wnodes_preparer::TableError;

/// Why reconciling failed.
pub type ReconcileError = wnodes_preparer::ReconcileError<VolumeError>;

/// The volume files, for [`wnodes_preparer::reconcile()`]: a prepared row holds
/// `<dir>/<vm_id>.img`.
impl HostResources<Volume> for FileBackend {
    type Error = VolumeError;
    type Item = String;

    async fn present(&self) -> Result<Vec<(String, String)>, VolumeError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .map(|id| (id.clone(), id))
            .collect())
    }

    fn held(&self, row: &Row<Volume>) -> Vec<String> {
        vec![row.vm_id.clone()]
    }

    async fn remove(&self, vm_id: &String) -> Result<(), VolumeError> {
        FileBackend::remove(self, vm_id).await.map(drop)
    }
}

/// Removes partial volumes and every `vm-*.img` whose row is `released` or missing (each is
/// logged). Returns the removed files. Run before the consumer starts.
pub async fn reconcile(
    backend: &FileBackend,
    pool: &SqlitePool,
) -> Result<Vec<PathBuf>, ReconcileError> {
    backend
        .remove_partials()
        .await
        .map_err(ReconcileError::Host)?;
    let done = wnodes_preparer::reconcile(&state::TABLE, pool, backend).await?;
    Ok(done.removed.iter().map(|id| backend.path_of(id)).collect())
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

    /// Prepares the volume directory (default `<state_dir>/volumes`) and the table, and
    /// reconciles them.
    async fn build(ctx: &ServiceCtx<ScratchConfig>) -> Result<Parts<ScratchHandler>, StartError> {
        let config = &ctx.config;
        let dir = config
            .dir
            .clone()
            .unwrap_or_else(|| ctx.state_dir.join("volumes"));
        let backend = FileBackend::new(dir, config.mkfs.then(|| config.mkfs_program.clone()))
            .map_err(|e| StartError::failed("prepare the scratch volume directory", e))?;
        state::init(ctx.store.pool())
            .await
            .map_err(|e| StartError::failed("create the scratch table", e))?;
        let removed = reconcile(&backend, ctx.store.read_pool())
            .await
            .map_err(|e| StartError::failed("reconcile scratch volumes", e))?;
        tracing::info!(dir = %backend.dir().display(), removed = removed.len(), "Scratch volumes reconciled.");
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
