//! Stopping a running VM on cancellation: ACPI powerdown through QMP, then quit after the
//! grace period.

use std::sync::Arc;

use wnodes_bus::ErrorChain;

use crate::{qmp, state::LauncherState, vm_dir::VmDir, vm_table::VmState};

impl LauncherState {
    /// Stops a running VM (cancellation) in the background, after the caller's transaction
    /// committed.
    pub fn spawn_stop(self: &Arc<Self>, vm_id: String) {
        let me = self.clone();
        tokio::spawn(async move {
            let row = match me.load(&vm_id).await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(vm_id, error = %ErrorChain(&e), "Cannot load the VM to stop it.");
                    return;
                }
            };
            if row.state != VmState::Running {
                return;
            }
            let (Ok(vm), Some(pid)) = (VmDir::new(&me.vms_dir, &vm_id), row.pid) else {
                return;
            };
            tracing::info!(vm_id, pid, "Stopping the VM (cancelled).");
            if let Err(e) = qmp::stop_vm(&vm.qmp_socket(), me.watch.powerdown_grace, || {
                vm.qemu_alive(pid)
            })
            .await
            {
                tracing::warn!(vm_id, error = %ErrorChain(&e), "Cannot stop the VM through QMP.");
            }
        });
    }
}
