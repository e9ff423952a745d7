//! The WNoDeS image service: keeps a host-local, content-addressed cache of VM disk images
//! (and direct-boot kernels/initrds) and answers `vm.requested` with `image.ready` or
//! `image.failed` (see `docs/job-flow-contract.md`).
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the `[image]` section: cache directory, cap and watermarks, image catalog |
//! | [`cache`] | [`Cache`]: `<cache_dir>/sha256/<hex>`, verified streaming fetches, single flight, pins and LRU eviction |
//! | [`pins`] | which runs use which cached files (`image_pins`, in the key store) |
//! | [`metrics`] | [`CacheMetrics`]: hits, misses, evictions, bytes |
//! | [`handler`] | [`ImageHandler`]: `vm.requested` → pin, ready/failed; `job.queued` → prefetch; `vm.stopped`/`vm.failed` → unpin |
//! | [`prefetch`] | [`PrefetchServer`]: the operator's prefetch requests, answered with progress |
//!
//! [`Image`] is the service as the runtime runs it (`wnodes_runtime::main::<Image>()`): a durable
//! consumer `image-<host>` on the host's `vm.requested`, `vm.stopped`, `vm.failed` and every
//! `job.queued`, and a task
//! answering `wnodes.ctl.<host>.image.prefetch`.

pub mod cache;
pub mod config;
#[cfg(test)]
mod error_rule;
pub mod handler;
pub mod metrics;
pub mod pins;
pub mod prefetch;

use wnodes_runtime::{ConfigError, NoCommand, Parts, Service, ServiceCtx, StartError};

pub use cache::{Cache, CacheError, Cached, Evicted, Fetch, FetchProgress, Started};
pub use config::{
    Artifact, CatalogEntry, CatalogError, ConfigError as ImageConfigError, DiskFormat, ImageConfig,
    Watermarks,
};
pub use handler::ImageHandler;
pub use metrics::CacheMetrics;
pub use pins::PinsError;
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
    /// behind, pins again what the runs still using files hold, keeps the cache within its
    /// cap, and subscribes to this host's prefetch requests.
    async fn build(ctx: &ServiceCtx<ImageConfig>) -> Result<Parts<ImageHandler>, StartError> {
        let config = &ctx.config;
        let cache_dir = config
            .cache_dir
            .clone()
            .unwrap_or_else(|| ctx.state_dir.join("cache"));
        let metrics = CacheMetrics::register(&mut ctx.registry.lock());
        let cache = Cache::open_with(&cache_dir, config.watermarks(), metrics)
            .map_err(|e| StartError::failed("open the image cache", e))?;
        let stale = cache
            .remove_stale_temp_files()
            .await
            .map_err(|e| StartError::failed("clean the image cache", e))?;
        pins::init(ctx.store.pool())
            .await
            .map_err(|e| StartError::failed("create the image pins table", e))?;
        let using = pins::using(ctx.store.read_pool())
            .await
            .map_err(|e| StartError::failed("read the image pins", e))?;
        for (run_key, digests) in &using {
            cache.pin(run_key, digests.clone());
        }
        let evicted = cache
            .enforce()
            .await
            .map_err(|e| StartError::failed("keep the image cache within its cap", e))?;
        tracing::info!(
            cache = %cache.dir().display(),
            images = config.catalog.len(),
            stale,
            runs_using = using.len(),
            evicted = evicted.removed.len(),
            bytes = evicted.bytes_after,
            "Image cache open."
        );
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
