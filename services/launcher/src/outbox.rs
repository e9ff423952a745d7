//! The launcher's outbox. Events not caused by a message (`vm.running`, `vm.stopped`, a
//! deadline or launch `vm.failed`) are written to the VM's row as `pending` together with the
//! state change, then published with [`Bus::publish`](wnodes_bus::Bus::publish) inside a span
//! whose parent is the job's persisted trace context, then cleared: published at least once,
//! and the deterministic event id makes JetStream drop a repeat.

use std::collections::BTreeMap;

use tracing::Instrument;
use wnodes_bus::{ErrorChain, EventExt, propagation};
use wnodes_proto::v1::Event;

use crate::{
    state::{LauncherError, LauncherState},
    vm_table::{self, VmRow, VmState},
};

impl LauncherState {
    /// Moves a VM and stores `event` as pending in one statement, then publishes it.
    pub(crate) async fn transition_and_emit(
        &self,
        row: &VmRow,
        from: VmState,
        to: VmState,
        event: Event,
        pid: Option<u32>,
    ) -> Result<bool, LauncherError> {
        let moved = {
            let mut conn = self.store.pool().acquire().await?;
            vm_table::transition(&mut conn, &row.vm_id, from, to, Some(&event), pid).await?
        };
        if moved && to.is_final() {
            self.reclaim(row);
        }
        if moved {
            self.emit(&row.vm_id, &event, &row.trace).await;
        }
        Ok(moved)
    }

    /// Gives a finished VM's files (and scratch volume) back to root, so that its uid can go
    /// to the next VM ([`crate::confine::reclaim`]); only for VMs that had a user of their own.
    pub(crate) fn reclaim(&self, row: &VmRow) {
        if row.spec.vm_user.is_none() {
            return;
        }
        let Ok(vm) = crate::vm_dir::VmDir::new(&self.vms_dir, &row.vm_id) else {
            return;
        };
        let scratch = row
            .scratch
            .as_ref()
            .filter(|s| !s.path.is_empty())
            .map(|s| std::path::PathBuf::from(&s.path));
        if let Err(e) = crate::confine::reclaim(&vm, scratch.as_deref()) {
            tracing::warn!(vm_id = %row.vm_id, error = %ErrorChain(&e), "Cannot give the VM's files back to root.");
        }
    }

    /// Publishes a pending event in a span under the job's trace, then clears it. On failure
    /// it stays pending and the flusher retries.
    pub async fn emit(&self, vm_id: &str, event: &Event, trace: &BTreeMap<String, String>) {
        let ty = event.event_type().map(|t| t.name()).unwrap_or("?");
        let span = tracing::info_span!(
            "launcher.publish",
            otel.kind = "producer",
            vm_id,
            event = ty,
            wnodes.run = %event.run_key()
        );
        propagation::set_parent_from_map(&span, trace);
        let published = self.bus.publish(event).instrument(span).await;
        match published {
            Ok(_) => {
                let cleared = async {
                    let mut conn = self.store.pool().acquire().await?;
                    vm_table::clear_pending(&mut conn, vm_id, &event.id).await?;
                    Ok::<_, LauncherError>(())
                }
                .await;
                if let Err(e) = cleared {
                    tracing::warn!(vm_id, error = %ErrorChain(&e), "Cannot clear a published event.");
                }
                tracing::info!(vm_id, event = ty, "Published.");
            }
            Err(e) => {
                tracing::warn!(vm_id, event = ty, error = %ErrorChain(&e), "Publish failed; will retry.");
            }
        }
    }

    /// Republishes every pending event.
    pub async fn flush_pending(&self) -> Result<(), LauncherError> {
        for row in vm_table::list_pending(self.store.read_pool()).await? {
            if let Some(ev) = &row.pending {
                self.emit(&row.vm_id, ev, &row.trace).await;
            }
        }
        Ok(())
    }
}
