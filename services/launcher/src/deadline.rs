//! The housekeeping task: fails VMs not started within `prepare_deadline` and republishes
//! pending events, every [`HOUSEKEEPING_EVERY`].

use std::{sync::Arc, time::Duration};

use wnodes_bus::{ErrorChain, proto::event::Body};
use wnodes_proto::v1::VmFailed;

use crate::{
    state::{LauncherError, LauncherState},
    vm_table::{self, VmState},
};

/// How often the deadline task and the pending-event flusher run.
pub const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(2);

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

    pub async fn housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY.min(self.config.prepare_deadline));
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
        }
    }
}
