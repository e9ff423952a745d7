//! The WNoDeS scratch service: gives every VM a local scratch disk and takes it back when the
//! VM ends (see `docs/job-flow-contract.md`).
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the `[scratch]` section: backend, directory, size limits, mkfs |
//! | [`volume`] | [`FileBackend`]: sparse `<dir>/<vm_id>.img` files, ext4 via mkfs, no mount |
//! | [`state`] | the per-VM rows (`prepared` / `released`) in the service's store |
//! | [`handler`] | [`ScratchHandler`]: `vm.requested` → ready/failed, `vm.stopped`/`vm.failed` → release |
//!
//! [`start`] reconciles the directory with the rows ([`reconcile`]) and creates the durable
//! consumer `scratch-<host>`; `main.rs` runs it on the service runtime.

pub mod config;
#[cfg(test)]
mod error_rule;
pub mod handler;
pub mod state;
pub mod volume;

use std::path::{Path, PathBuf};

use sqlx::SqlitePool;
use wnodes_bus::{Bus, BusError, Consumer, ConsumerSpec, ConsumerTuning, KeyStore, subject};

pub use config::{Backend, ConfigError, ScratchConfig};
pub use handler::{Limits, ScratchHandler};
pub use state::{StateError, VolumeRow, VolumeState};
pub use volume::{FileBackend, VolumeError};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid [scratch] configuration")]
    Config(#[from] ConfigError),
    #[error("scratch volume directory")]
    Volume(#[from] VolumeError),
    #[error("scratch state store")]
    State(#[from] StateError),
    #[error("cannot set up the scratch consumer")]
    Bus(#[from] BusError),
}

/// Why reconciling failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("reconcile: volume directory")]
    Volume(#[from] VolumeError),
    #[error("reconcile: state store")]
    State(#[from] StateError),
}

/// The subjects the service consumes on `host`.
pub fn filter_subjects(host: &str) -> Result<Vec<String>, BusError> {
    ["vm.requested", "vm.stopped", "vm.failed"]
        .into_iter()
        .map(|t| subject::event_filter(Some(host), t))
        .collect()
}

/// Removes partial volumes and every `vm-*.img` whose row is `released` or missing (each is
/// logged). Returns the removed files. Run before the consumer starts.
pub async fn reconcile(
    backend: &FileBackend,
    pool: &SqlitePool,
) -> Result<Vec<PathBuf>, ReconcileError> {
    backend.remove_partials().await?;
    let mut removed = Vec::new();
    for vm_id in backend.list().await? {
        let why = match state::get(pool, &vm_id).await? {
            Some(r) if r.state == VolumeState::Prepared => continue,
            Some(_) => "its row says released",
            None => "no row knows it",
        };
        backend.remove(&vm_id).await?;
        let path = backend.path_of(&vm_id);
        tracing::info!(vm_id, path = %path.display(), why, "Reconcile: removed a leaked scratch volume.");
        removed.push(path);
    }
    Ok(removed)
}

/// Validates the configuration, prepares the volume directory (default
/// `<state_dir>/volumes`) and the table, reconciles, and creates the durable consumer
/// `scratch-<host>`. Events are published with the bus's source (`scratch@<host>`).
pub async fn start(
    bus: Bus,
    store: KeyStore,
    tuning: ConsumerTuning,
    host: &str,
    config: &ScratchConfig,
    state_dir: &Path,
) -> Result<Consumer<ScratchHandler>, StartError> {
    config.validate()?;
    let dir = config
        .dir
        .clone()
        .unwrap_or_else(|| state_dir.join("volumes"));
    let backend = FileBackend::new(dir, config.mkfs.then(|| config.mkfs_program.clone()))?;
    state::init(store.pool()).await?;
    match reconcile(&backend, store.read_pool()).await {
        Ok(removed) => {
            tracing::info!(dir = %backend.dir().display(), removed = removed.len(), "Scratch volumes reconciled.");
        }
        Err(ReconcileError::Volume(e)) => return Err(e.into()),
        Err(ReconcileError::State(e)) => return Err(e.into()),
    }
    let handler = ScratchHandler::new(
        backend,
        Limits {
            max_bytes: config.max_bytes,
            default_bytes: config.default_bytes,
        },
        bus.source().to_owned(),
        tuning.max_attempts,
    );
    let spec = ConsumerSpec {
        durable: subject::durable_name("scratch", Some(host))?,
        filter_subjects: filter_subjects(host)?,
        tuning,
    };
    Ok(Consumer::create(bus, store, spec, handler).await?)
}
