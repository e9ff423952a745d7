//! The one handler of the `scratch-<host>` consumer. The durable consumer receives several
//! event types; [`ScratchHandler::handle`] matches on the body and dispatches:
//!
//! | event | effect | publishes |
//! |---|---|---|
//! | `vm.requested` | create `<dir>/<vm_id>.img` (sparse, ext4) or the VM's LV, row `prepared` | `scratch.ready`, or `scratch.failed` (too large, no space: the file system or the VG is full, bad id, mkfs or lvm failed) |
//! | `vm.requested` again (redelivery, another key) | nothing: the prepared volume is kept | `scratch.ready` again, same id; `scratch.failed` if the size differs |
//! | `vm.requested` after the release | nothing (tombstone) | `resource.released` again |
//! | `vm.stopped`, `vm.failed` | remove the file or LV, row `released` | `resource.released` (kind SCRATCH) |
//!
//! Events about one VM are handled one at a time (a per-VM lock); the row is read again inside
//! the store transaction before it is written, so a release that committed while a volume was
//! being made wins and the new volume is removed.

use parking_lot::Mutex;
use std::{collections::HashMap, sync::Arc};

use tokio::sync::OwnedMutexGuard;
use wnodes_bus::{ErrorChain, EventExt, Handler, HandlerCtx, HandlerError, proto};
use wnodes_preparer::{Events, Incoming, TableError};

use crate::{
    backend::Volumes,
    state,
    volume::{VolumeError, derive_vm_id, is_valid_vm_id},
};

/// Sizes the handler enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest volume (bytes).
    pub max_bytes: u64,
    /// Size when the spec asks for 0 (bytes).
    pub default_bytes: u64,
}

/// Handles `vm.requested`, `vm.stopped` and `vm.failed` for one host.
#[derive(Debug)]
pub struct ScratchHandler {
    backend: Volumes,
    limits: Limits,
    source: String,
    max_attempts: u32,
    locks: VmLocks,
}

/// One async lock per VM id, dropped from the map when nobody holds or waits for it.
#[derive(Debug, Default)]
struct VmLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

struct VmGuard<'a> {
    locks: &'a VmLocks,
    vm_id: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl VmLocks {
    async fn lock(&self, vm_id: &str) -> VmGuard<'_> {
        let lock = self.0.lock().entry(vm_id.to_owned()).or_default().clone();
        let guard = Some(lock.lock_owned().await);
        VmGuard {
            locks: self,
            vm_id: vm_id.to_owned(),
            guard,
        }
    }
}

impl Drop for VmGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut m = self.locks.0.lock();
        if m.get(&self.vm_id)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            m.remove(&self.vm_id);
        }
    }
}

fn store_err(e: TableError) -> HandlerError {
    HandlerError::retry(e)
}

impl ScratchHandler {
    /// `source` is `"scratch@<host>"`; `max_attempts` is the consumer's (transient trouble on
    /// the last attempt becomes `scratch.failed`).
    pub fn new(backend: Volumes, limits: Limits, source: String, max_attempts: u32) -> Self {
        Self {
            backend,
            limits,
            source,
            max_attempts,
            locks: VmLocks::default(),
        }
    }

    fn events(&self) -> Events<'_, proto::ScratchReady> {
        Events::new(&self.source)
    }

    fn failed(&self, ctx: &mut HandlerCtx, incoming: &proto::Event, vm_id: &str, reason: String) {
        tracing::warn!(vm_id, %reason, "Scratch failed.");
        ctx.publish(self.events().failed(incoming, vm_id, reason));
    }

    fn ready(
        &self,
        ctx: &mut HandlerCtx,
        incoming: &proto::Event,
        vm_id: &str,
        path: &str,
        size_bytes: u64,
    ) {
        ctx.publish(self.events().ready(
            incoming,
            proto::ScratchReady {
                vm_id: vm_id.to_owned(),
                path: path.to_owned(),
                size_bytes,
                backend: self.backend.name().into(),
                format: "raw".into(),
            },
        ));
    }

    /// Answers a request that came after the release: make sure nothing exists, release again.
    async fn tombstone(
        &self,
        ctx: &mut HandlerCtx,
        incoming: &proto::Event,
        vm_id: &str,
    ) -> Result<(), HandlerError> {
        self.backend
            .remove(vm_id)
            .await
            .map_err(HandlerError::retry)?;
        let detail = format!(
            "scratch of {vm_id} was already released; the late vm.requested created nothing"
        );
        tracing::info!(vm_id, %detail, "Scratch released.");
        ctx.publish(self.events().released(incoming, vm_id, detail));
        Ok(())
    }

    async fn on_requested(
        &self,
        ctx: &mut HandlerCtx,
        incoming: &proto::Event,
        spec: &proto::VmSpec,
    ) -> Result<(), HandlerError> {
        let run_key = incoming.run_key();
        let vm_id = if spec.vm_id.is_empty() {
            derive_vm_id(&run_key)
        } else {
            spec.vm_id.clone()
        };
        if !is_valid_vm_id(&vm_id) {
            self.failed(
                ctx,
                incoming,
                &vm_id,
                format!(
                    "vm id {vm_id:?} cannot name a scratch volume (expected \"vm-\" and [a-z0-9-])"
                ),
            );
            return Ok(());
        }
        let _guard = self.locks.lock(&vm_id).await;
        let row = state::get(ctx.sqlite_store()?.read_pool(), &vm_id)
            .await
            .map_err(store_err)?;
        let size = match spec.scratch_bytes {
            0 => self.limits.default_bytes,
            n => n,
        };
        match &row {
            Some(r) if r.is_released() => {
                return self.tombstone(ctx, incoming, &vm_id).await;
            }
            Some(r) => {
                let on_disk = self
                    .backend
                    .size_of(&vm_id)
                    .await
                    .map_err(HandlerError::retry)?;
                // An LV is whole extents: what a request of `size` bytes allocates.
                let on_disk = match on_disk {
                    Some(n)
                        if self
                            .backend
                            .holds(n, size)
                            .await
                            .map_err(HandlerError::retry)? =>
                    {
                        Some(size)
                    }
                    other => other,
                };
                match on_disk {
                    Some(n) if n == size && r.detail.size_bytes == size => {
                        tracing::info!(
                            vm_id,
                            "Scratch volume already prepared; publishing ready again."
                        );
                        self.ready(ctx, incoming, &vm_id, &r.detail.path, size);
                        return Ok(());
                    }
                    // A prepared volume may be in use: never replace it behind the VM's back.
                    Some(n) => {
                        self.failed(
                            ctx,
                            incoming,
                            &vm_id,
                            format!(
                                "{vm_id} already has a prepared scratch volume of {n} bytes; \
                                 this request asks for {size} bytes"
                            ),
                        );
                        return Ok(());
                    }
                    // Prepared but the file is gone: make it again.
                    None => {}
                }
            }
            None => {}
        }
        if size > self.limits.max_bytes {
            self.failed(
                ctx,
                incoming,
                &vm_id,
                format!(
                    "requested scratch of {size} bytes exceeds the maximum of {} bytes",
                    self.limits.max_bytes
                ),
            );
            return Ok(());
        }
        // Sparse volumes must not promise more than the file system holds.
        let space = match self.backend.space().await {
            Ok(s) => s,
            Err(e) => return self.create_failed(ctx, incoming, &vm_id, e),
        };
        if size > space.unpromised() {
            tracing::warn!(
                vm_id,
                size,
                available = space.available,
                promised = space.promised,
                "Not enough free space to back the scratch volume."
            );
            let reason = self.backend.refusal(size, space);
            self.failed(ctx, incoming, &vm_id, reason);
            return Ok(());
        }
        let path = match self
            .backend
            .create(&vm_id, &run_key, size, spec.vm_user.as_ref())
            .await
        {
            Ok(p) => p,
            Err(e) => return self.create_failed(ctx, incoming, &vm_id, e),
        };
        let path_str = path.display().to_string();
        let conn = ctx.tx().await?;
        // A release may have committed while the volume was being made: it wins.
        let now = state::get(&mut *conn, &vm_id).await.map_err(store_err)?;
        if now.is_some_and(|r| r.is_released()) {
            return self.tombstone(ctx, incoming, &vm_id).await;
        }
        state::mark_prepared(&mut *conn, &vm_id, &run_key, &path_str, size)
            .await
            .map_err(store_err)?;
        tracing::info!(vm_id, path = %path_str, size, "Scratch volume prepared.");
        self.ready(ctx, incoming, &vm_id, &path_str, size);
        Ok(())
    }

    fn create_failed(
        &self,
        ctx: &mut HandlerCtx,
        incoming: &proto::Event,
        vm_id: &str,
        e: VolumeError,
    ) -> Result<(), HandlerError> {
        let reason = format!("creating the scratch volume of {vm_id}: {}", ErrorChain(&e));
        let transient = matches!(e, VolumeError::Io { .. });
        if transient && ctx.attempt() < self.max_attempts {
            return Err(HandlerError::retry(reason));
        }
        self.failed(ctx, incoming, vm_id, reason);
        Ok(())
    }

    async fn on_vm_ended(
        &self,
        ctx: &mut HandlerCtx,
        incoming: &proto::Event,
        vm_id: &str,
    ) -> Result<(), HandlerError> {
        let run_key = incoming.run_key();
        let vm_id = if vm_id.is_empty() {
            derive_vm_id(&run_key)
        } else {
            vm_id.to_owned()
        };
        if !is_valid_vm_id(&vm_id) {
            return Err(HandlerError::reject(format!(
                "vm id {vm_id:?} cannot name a scratch volume"
            )));
        }
        let _guard = self.locks.lock(&vm_id).await;
        let name = self.backend.name_of(&vm_id);
        let existed = self
            .backend
            .remove(&vm_id)
            .await
            .map_err(HandlerError::retry)?;
        let detail = if existed {
            format!("removed scratch volume {name}")
        } else {
            format!("no scratch volume for {vm_id}; nothing to remove")
        };
        let tombstone = state::tombstone(&name);
        self.events()
            .release(ctx, &state::TABLE, incoming, &vm_id, &tombstone, detail)
            .await?;
        Ok(())
    }
}

impl Handler for ScratchHandler {
    fn name(&self) -> &'static str {
        "scratch.handle"
    }

    async fn handle(&self, ctx: &mut HandlerCtx, event: proto::Event) -> Result<(), HandlerError> {
        if event.run.is_none() {
            return Err(HandlerError::reject("event without a run"));
        }
        match Incoming::of(&event)? {
            Incoming::Requested(spec) => self.on_requested(ctx, &event, spec).await,
            Incoming::Ended { vm_id } => self.on_vm_ended(ctx, &event, vm_id).await,
            Incoming::Other(other) => {
                tracing::debug!(event_type = ?other.map(wnodes_bus::EventType::of), "Not for the scratch service; ignored.");
                Ok(())
            }
        }
    }
}
