//! The WNoDeS image service: keeps a host-local, content-addressed cache of VM disk images
//! (and direct-boot kernels/initrds) and answers `vm.requested` with `image.ready` or
//! `image.failed` (see `docs/job-flow-contract.md`).
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the `[image]` section: cache directory and image catalog |
//! | [`cache`] | [`Cache`]: `<cache_dir>/sha256/<hex>`, verified streaming fetches, single flight |
//! | [`handler`] | [`ImageHandler`]: `vm.requested` → ready/failed, `job.queued` → prefetch |
//! | [`prefetch`] | [`PrefetchServer`]: the operator's prefetch requests, answered with progress |
//!
//! [`Image`] is the service as the runtime runs it (`wnodes_runtime::main::<Image>()`): a durable
//! consumer `image-<host>` on the host's `vm.requested` and every `job.queued`, and a task
//! answering `wnodes.ctl.<host>.image.prefetch`.

pub mod cache;
pub mod config;
#[cfg(test)]
mod error_rule;
pub mod handler;
pub mod prefetch;

use wnodes_runtime::{ConfigError, NoCommand, Parts, Service, ServiceCtx, StartError};

pub use cache::{Cache, CacheError, Cached, Fetch, FetchProgress, Started};
pub use config::{Artifact, CatalogEntry, CatalogError, DiskFormat, ImageConfig};
pub use handler::ImageHandler;
pub use prefetch::PrefetchServer;

/// The image service.
#[derive(Debug)]
pub struct Image;

impl Service for Image {
    const ROLE: &'static wnodes_runtime::Role = &wnodes_bus::roles::IMAGE;
    const ABOUT: &'static str =
        "WNoDeS image service: the VO images of this host, verified and cached";
    type Config = ImageConfig;
    type Handler = ImageHandler;
    type Command = NoCommand;

    fn validate(config: &ImageConfig) -> Result<(), ConfigError> {
        config
            .validate()
            .map_err(|e| ConfigError::section(Self::NAME, e))
    }

    /// Opens the cache (default `<state_dir>/cache`), removes the temporary files a crash left
    /// behind, and subscribes to this host's prefetch requests.
    async fn build(ctx: &ServiceCtx<ImageConfig>) -> Result<Parts<ImageHandler>, StartError> {
        let config = &ctx.config;
        let cache_dir = config
            .cache_dir
            .clone()
            .unwrap_or_else(|| ctx.state_dir.join("cache"));
        let cache =
            Cache::open(&cache_dir).map_err(|e| StartError::failed("open the image cache", e))?;
        let stale = cache
            .remove_stale_temp_files()
            .await
            .map_err(|e| StartError::failed("clean the image cache", e))?;
        tracing::info!(cache = %cache.dir().display(), images = config.catalog.len(), stale, "Image cache open.");
        let requests = wnodes_bus::control::serve(
            &ctx.bus,
            &wnodes_bus::subject::image_prefetch_subject(&ctx.common.host)?,
        )
        .await?;
        let prefetch = PrefetchServer::new(
            config.catalog.clone(),
            cache.clone(),
            ctx.common.host.clone(),
        );
        let shutdown = ctx.shutdown.clone();
        Ok(Parts::consumer(ImageHandler::new(
            config.catalog.clone(),
            cache,
            ctx.source(),
            ctx.tuning().max_attempts,
            ctx.tuning().handler_timeout,
        ))
        .task("prefetch-requests", prefetch.run(requests, shutdown)))
    }
}
