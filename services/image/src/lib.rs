//! The WNoDeS image service: keeps a host-local, content-addressed cache of VM disk images
//! (and direct-boot kernels/initrds) and answers `vm.requested` with `image.ready` or
//! `image.failed` (see `docs/job-flow-contract.md`).
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the `[image]` section: cache directory and image catalog |
//! | [`cache`] | [`Cache`]: `<cache_dir>/sha256/<hex>`, verified streaming fetches, single flight |
//! | [`handler`] | [`ImageHandler`]: `vm.requested` → ready/failed, `job.queued` → prefetch |
//!
//! [`start`] wires them to a durable consumer `image-<host>`; `main.rs` runs it on the
//! service runtime.

pub mod cache;
pub mod config;
#[cfg(test)]
mod error_rule;
pub mod handler;

use std::path::Path;

use wnodes_bus::{Bus, BusError, Consumer, ConsumerSpec, ConsumerTuning, KeyStore, subject};

pub use cache::{Cache, CacheError, Cached};
pub use config::{Artifact, CatalogEntry, CatalogError, DiskFormat, ImageConfig};
pub use handler::ImageHandler;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid [image] configuration")]
    Config(#[from] CatalogError),
    #[error("cannot open the image cache")]
    Cache(#[from] CacheError),
    #[error("cannot set up the image consumer")]
    Bus(#[from] BusError),
}

/// The subjects the service consumes on `host`: its `vm.requested` and every `job.queued`.
pub fn filter_subjects(host: &str) -> Result<Vec<String>, BusError> {
    Ok(vec![
        subject::event_filter(Some(host), "vm.requested")?,
        subject::event_subject("", "job.queued")?,
    ])
}

/// Validates the configuration, opens the cache (default `<state_dir>/cache`), removes
/// temporary files a crash left behind and creates the durable consumer `image-<host>`.
/// Events are published with the bus's source (`image@<host>`).
pub async fn start(
    bus: Bus,
    store: KeyStore,
    tuning: ConsumerTuning,
    host: &str,
    config: &ImageConfig,
    state_dir: &Path,
) -> Result<Consumer<ImageHandler>, StartError> {
    config.validate()?;
    let cache_dir = config
        .cache_dir
        .clone()
        .unwrap_or_else(|| state_dir.join("cache"));
    let cache = Cache::open(&cache_dir)?;
    let stale = cache.remove_stale_temp_files().await?;
    tracing::info!(cache = %cache.dir().display(), images = config.catalog.len(), stale, "Image cache open.");
    let handler = ImageHandler::new(
        config.catalog.clone(),
        cache,
        bus.source().to_owned(),
        tuning.max_attempts,
        tuning.handler_timeout,
    );
    let spec = ConsumerSpec {
        durable: subject::durable_name("image", Some(host))?,
        filter_subjects: filter_subjects(host)?,
        tuning,
    };
    Ok(Consumer::create(bus, store, spec, handler).await?)
}
