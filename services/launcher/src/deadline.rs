//! The housekeeping task: fails VMs not started within `prepare_deadline` and republishes
//! pending events, every [`HOUSEKEEPING_EVERY`]; removes finished VMs' state directories
//! past `vm_dir_retention`.

use std::{sync::Arc, time::Duration};

use wnodes_bus::{ErrorChain, proto::event::Body};
use wnodes_proto::v1::VmFailed;

use crate::{
    state::{LauncherError, LauncherState},
    vm_dir::VmDir,
    vm_table::{self, VmState},
};

/// How often the deadline task and the pending-event flusher run.
pub const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(2);

/// How often, at most, finished VMs' state directories are looked at.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// When anything in `dir` (or `dir` itself) was last written; `None` when it does not exist.
fn newest_write(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    let mut newest = std::fs::metadata(dir).ok()?.modified().ok()?;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        if let Ok(t) = entry.metadata().and_then(|m| m.modified()) {
            newest = newest.max(t);
        }
    }
    Some(newest)
}

impl LauncherState {
    /// Fails VMs not started within `prepare_deadline`.
    pub async fn expire_deadlines(&self) -> Result<(), LauncherError> {
        let deadline = self.config.prepare_deadline;
        let cutoff =
            wnodes_proto::time::now_ms() - i64::try_from(deadline.as_millis()).unwrap_or(i64::MAX);
        for row in vm_table::list(self.store.read_pool(), &[VmState::Preparing]).await? {
            if row.requested_at_ms > cutoff {
                continue;
            }
            let missing: Vec<&str> = vm_table::Resource::ALL
                .iter()
                .filter(|r| !row.has(**r))
                .map(|r| r.name())
                .collect();
            let ev = self.event(
                &row,
                Body::VmFailed(VmFailed {
                    vm_id: row.vm_id.clone(),
                    reason: format!(
                        "not ready within {}; missing: {}",
                        humantime_serde::re::humantime::format_duration(deadline),
                        missing.join(", ")
                    ),
                    phase: "deadline".into(),
                }),
            );
            self.transition_and_emit(&row, VmState::Preparing, VmState::Failed, ev, None)
                .await?;
        }
        Ok(())
    }

    /// Removes the state directory of every finished VM (stopped or failed, its last event
    /// published, no qemu alive) whose newest file is older than `vm_dir_retention`. The VM's
    /// row stays: a redelivered event still finds the VM finished. Returns how many went.
    pub async fn prune_vm_dirs(&self) -> Result<usize, LauncherError> {
        let retention = self.config.vm_dir_retention;
        let mut removed = 0;
        for row in
            vm_table::list(self.store.read_pool(), &[VmState::Stopped, VmState::Failed]).await?
        {
            if row.pending.is_some() {
                continue;
            }
            let Ok(vm) = VmDir::new(&self.vms_dir, &row.vm_id) else {
                continue;
            };
            let Some(last) = newest_write(vm.dir()) else {
                continue; // no directory (never launched, or already removed)
            };
            if last.elapsed().unwrap_or_default() < retention {
                continue;
            }
            if let Ok(Some(r)) = vm.read_running()
                && vm.qemu_alive(r.pid)
            {
                continue;
            }
            match std::fs::remove_dir_all(vm.dir()) {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(vm_id = %row.vm_id, state = row.state.as_str(), "Removed the finished VM's state directory (vm_dir_retention).");
                }
                Err(e) => {
                    tracing::warn!(vm_id = %row.vm_id, dir = %vm.dir().display(), error = %e, "Cannot remove the finished VM's state directory.");
                }
            }
        }
        Ok(removed)
    }

    pub async fn housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY.min(self.config.prepare_deadline));
        // Often enough for the retention, at most once a minute.
        let prune_every = (self.config.vm_dir_retention / 2).clamp(HOUSEKEEPING_EVERY, PRUNE_EVERY);
        let mut last_prune: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.expire_deadlines().await {
                tracing::warn!(error = %ErrorChain(&e), "Deadline check failed.");
            }
            if let Err(e) = self.flush_pending().await {
                tracing::warn!(error = %ErrorChain(&e), "Publishing pending events failed.");
            }
            if last_prune.is_none_or(|t| t.elapsed() >= prune_every) {
                last_prune = Some(std::time::Instant::now());
                if let Err(e) = self.prune_vm_dirs().await {
                    tracing::warn!(error = %ErrorChain(&e), "Removing finished VMs' state directories failed.");
                }
            }
        }
    }
}
