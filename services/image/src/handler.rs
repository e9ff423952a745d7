//! The one handler of the `image-<host>` consumer: `vm.requested` → make sure the image (and
//! kernel/initrd) is cached → `image.ready` / `image.failed`; `job.queued` with an
//! `image_hint` → start a prefetch (no event); `vm.stopped` / `vm.failed` → the run's files may
//! be evicted again (no event).
//!
//! A `vm.requested` pins the image's files in the cache (under the run key) before it looks
//! them up, and records the pin in the `image_pins` table in its transaction; the VM's end
//! releases it (a tombstone: a late `vm.requested` of that run pins nothing) and lets the
//! cache evict down to its low watermark if it is above the high one.
//!
//! Failures are events: an unknown image, a digest mismatch or a missing source is answered
//! with `image.failed` at once. Transient trouble (network, 5xx, a fetch still running when the
//! handler's time is up) is retried by the consumer; on the last attempt it becomes
//! `image.failed` too, so the launcher always gets an answer.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use wnodes_bus::{
    ErrorChain, EventExt, Handler, HandlerCtx, HandlerError,
    proto::{self, event::Body},
};

use crate::{
    cache::{Cache, CacheError, Cached},
    config::{Artifact, CatalogEntry},
    pins,
};

/// Handles `vm.requested` and `job.queued` for one host.
#[derive(Debug)]
pub struct ImageHandler {
    catalog: BTreeMap<String, CatalogEntry>,
    cache: Cache,
    source: String,
    max_attempts: u32,
    wait: Duration,
}

/// What failed while caching one part of an image.
struct PartError {
    what: String,
    error: Arc<CacheError>,
}

impl ImageHandler {
    /// `source` is `"image@<host>"`; `max_attempts` and `handler_timeout` are the consumer's
    /// (a fetch is waited for at most 4/5 of the handler timeout per attempt).
    pub fn new(
        catalog: BTreeMap<String, CatalogEntry>,
        cache: Cache,
        source: String,
        max_attempts: u32,
        handler_timeout: Duration,
    ) -> Self {
        Self {
            catalog,
            cache,
            source,
            max_attempts,
            wait: handler_timeout.mul_f64(0.8),
        }
    }

    fn failed(
        &self,
        ctx: &mut HandlerCtx,
        incoming: &proto::Event,
        vm_id: &str,
        image: &str,
        reason: String,
    ) {
        tracing::warn!(vm_id, image, %reason, "Image failed.");
        ctx.publish(incoming.derive(
            &self.source,
            Body::ImageFailed(proto::ImageFailed {
                vm_id: vm_id.to_owned(),
                image: image.to_owned(),
                reason,
            }),
        ));
    }

    async fn ensure_part(&self, what: String, art: &Artifact) -> Result<Cached, PartError> {
        self.cache
            .ensure(art)
            .await
            .map_err(|error| PartError { what, error })
    }

    async fn ensure_optional(
        &self,
        what: String,
        art: Option<&Artifact>,
    ) -> Result<Option<Cached>, PartError> {
        match art {
            None => Ok(None),
            Some(a) => self.ensure_part(what, a).await.map(Some),
        }
    }

    async fn on_vm_requested(
        &self,
        ctx: &mut HandlerCtx,
        incoming: &proto::Event,
        req: &proto::VmRequested,
    ) -> Result<(), HandlerError> {
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| HandlerError::reject("vm.requested without a VmSpec"))?;
        let (vm_id, image) = (spec.vm_id.as_str(), spec.image.as_str());
        let Some(entry) = self.catalog.get(image) else {
            self.failed(
                ctx,
                incoming,
                vm_id,
                image,
                format!("image '{image}' is not in the catalog"),
            );
            return Ok(());
        };
        let disk = entry.disk();
        let run_key = incoming.run_key();
        let digests: Vec<String> = std::iter::once(&disk)
            .chain(entry.kernel.iter())
            .chain(entry.initrd.iter())
            .map(|a| a.sha256.clone())
            .collect();
        let released = pins::is_released(ctx.sqlite_store()?.read_pool(), &run_key)
            .await
            .map_err(HandlerError::retry)?;
        // Pinned before the lookup, so eviction cannot take a file between the two.
        if !released {
            self.cache.pin(&run_key, digests.clone());
        }
        let parts = futures::future::try_join3(
            self.ensure_part(format!("image '{image}'"), &disk),
            self.ensure_optional(format!("kernel of image '{image}'"), entry.kernel.as_ref()),
            self.ensure_optional(format!("initrd of image '{image}'"), entry.initrd.as_ref()),
        );
        let last_attempt = ctx.attempt() >= self.max_attempts;
        let outcome = tokio::time::timeout(self.wait, parts).await;
        if !released {
            let conn = ctx.tx().await?;
            let using = pins::mark_using(conn, &run_key, vm_id, &digests)
                .await
                .map_err(HandlerError::retry)?;
            // The VM ended while its image was being looked up: its release wins.
            if !using {
                self.cache.unpin(&run_key);
            }
        }
        match outcome {
            Ok(Ok((disk, kernel, initrd))) => {
                let cache_hit = disk.hit
                    && kernel.as_ref().is_none_or(|k| k.hit)
                    && initrd.as_ref().is_none_or(|i| i.hit);
                let path_of =
                    |c: Option<Cached>| c.map(|c| c.path.display().to_string()).unwrap_or_default();
                tracing::info!(vm_id, image, cache_hit, "Image ready.");
                ctx.publish(incoming.derive(
                    &self.source,
                    Body::ImageReady(proto::ImageReady {
                        vm_id: vm_id.to_owned(),
                        image: image.to_owned(),
                        sha256: entry.sha256.clone(),
                        path: disk.path.display().to_string(),
                        format: entry.format.as_str().to_owned(),
                        kernel_path: path_of(kernel),
                        initrd_path: path_of(initrd),
                        size_bytes: disk.size_bytes,
                        cache_hit,
                    }),
                ));
                Ok(())
            }
            Ok(Err(PartError { what, error })) => {
                let reason = format!("{what}: {}", ErrorChain(&*error));
                if error.is_transient() && !last_attempt {
                    return Err(HandlerError::retry(reason));
                }
                self.failed(ctx, incoming, vm_id, image, reason);
                Ok(())
            }
            Err(_elapsed) => {
                let reason = format!(
                    "image '{image}' is still being fetched after {:?} (attempt {} of {})",
                    self.wait,
                    ctx.attempt(),
                    self.max_attempts
                );
                if !last_attempt {
                    // The fetch goes on in its own task; the redelivery waits for it again.
                    return Err(HandlerError::retry(reason));
                }
                self.failed(ctx, incoming, vm_id, image, reason);
                Ok(())
            }
        }
    }

    /// The VM of the run ended: its files are no longer in use.
    async fn on_vm_ended(
        &self,
        ctx: &mut HandlerCtx,
        incoming: &proto::Event,
        vm_id: &str,
    ) -> Result<(), HandlerError> {
        let run_key = incoming.run_key();
        let conn = ctx.tx().await?;
        pins::mark_released(conn, &run_key, vm_id)
            .await
            .map_err(HandlerError::retry)?;
        if self.cache.unpin(&run_key) {
            tracing::info!(
                vm_id,
                run_key,
                "The VM ended; its image may be evicted again."
            );
            match self.cache.enforce().await {
                Ok(e) if !e.removed.is_empty() => {
                    tracing::info!(
                        evicted = e.removed.len(),
                        bytes = e.bytes_after,
                        "Image cache back within its cap."
                    )
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %ErrorChain(&e), "Cannot keep the image cache within its cap.")
                }
            }
        }
        Ok(())
    }

    fn on_job_queued(&self, q: &proto::JobQueued) {
        let Some(job) = q.job.as_ref() else { return };
        let hint = job.image_hint.as_str();
        if hint.is_empty() {
            return;
        }
        let Some(entry) = self.catalog.get(hint) else {
            tracing::debug!(
                image = hint,
                "Queued job hints at an image not in the catalog; no prefetch."
            );
            return;
        };
        let disk = entry.disk();
        for art in std::iter::once(&disk)
            .chain(entry.kernel.iter())
            .chain(entry.initrd.iter())
        {
            match self.cache.prefetch(art) {
                Ok(()) => {
                    tracing::debug!(image = hint, url = %art.url, "Prefetch started or already cached.")
                }
                Err(e) => {
                    tracing::warn!(image = hint, url = %art.url, error = %ErrorChain(&e), "Cannot prefetch.")
                }
            }
        }
    }
}

impl Handler for ImageHandler {
    fn name(&self) -> &'static str {
        "image.handle"
    }

    async fn handle(&self, ctx: &mut HandlerCtx, event: proto::Event) -> Result<(), HandlerError> {
        match &event.body {
            Some(Body::VmRequested(req)) => {
                if event.run.is_none() {
                    return Err(HandlerError::reject("vm.requested without a run"));
                }
                self.on_vm_requested(ctx, &event, req).await
            }
            Some(Body::JobQueued(q)) => {
                self.on_job_queued(q);
                Ok(())
            }
            Some(Body::VmStopped(s)) if event.run.is_some() => {
                self.on_vm_ended(ctx, &event, &s.vm_id).await
            }
            Some(Body::VmFailed(f)) if event.run.is_some() => {
                self.on_vm_ended(ctx, &event, &f.vm_id).await
            }
            Some(Body::VmStopped(_) | Body::VmFailed(_)) => {
                Err(HandlerError::reject("a VM's end without a run"))
            }
            other => {
                tracing::debug!(event_type = ?other.as_ref().map(wnodes_bus::EventType::of), "Not for the image service; ignored.");
                Ok(())
            }
        }
    }
}
