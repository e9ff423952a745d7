//! Finishing a VM: a watcher per running VM waits for qemu's exit and publishes its one
//! `vm.stopped` (exit code, output tail, host-measured usage).

use std::sync::Arc;

use tracing::Instrument;
use wnodes_bus::{ErrorChain, propagation, proto::event::Body};
use wnodes_proto::{
    time,
    v1::{VmStopped, VmUsage},
};

use crate::{
    state::{LauncherError, LauncherState},
    usage,
    vm_dir::{self, VmDir},
    vm_table::VmState,
    watch::{self, STOP_CANCELLED, STOP_WALLTIME, VmExit},
};

impl LauncherState {
    /// Watches `vm_id` until qemu exits, then publishes `vm.stopped` (once per VM). On
    /// shutdown the watcher just ends: qemu keeps running and is reattached on the next start.
    pub fn spawn_watcher(self: &Arc<Self>, vm_id: String) {
        if !self.watching.lock().insert(vm_id.clone()) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let result = async {
                let vm = VmDir::new(&me.vms_dir, &vm_id)?;
                let exit = tokio::select! {
                    _ = me.shutdown.cancelled() => return Ok(()),
                    r = watch::watch(&vm, &me.watch) => r,
                };
                let exit = match exit {
                    Ok(exit) => exit,
                    Err(e) => {
                        // The state directory is gone or unreadable: the run still needs its
                        // one vm.stopped, without a result.
                        tracing::error!(vm_id, error = %ErrorChain(&e), "Cannot watch the VM; reporting it stopped without a result.");
                        lost_exit(&vm)
                    }
                };
                me.finish(&vm, exit).await
            }
            .await;
            if let Err(e) = result {
                tracing::error!(vm_id, error = %ErrorChain(&e), "Finishing the VM failed.");
            }
            me.watching.lock().remove(&vm_id);
        });
    }

    async fn finish(&self, vm: &VmDir, exit: VmExit) -> Result<(), LauncherError> {
        let Some(row) = self.load(vm.vm_id()).await? else {
            return Ok(());
        };
        if row.state != VmState::Running {
            return Ok(());
        }
        let stop_reason = if row.cancel_reason.is_some() && exit.stop_reason != STOP_WALLTIME {
            STOP_CANCELLED
        } else {
            exit.stop_reason
        };
        let ev = self.event(&row, Body::VmStopped(vm_stopped(vm, &exit, stop_reason)));
        let span = tracing::info_span!(
            "launcher.vm_stopped",
            vm_id = vm.vm_id(),
            exit_code = exit.exit_code,
            stop_reason
        );
        propagation::set_parent_from_map(&span, &row.trace);
        self.transition_and_emit(&row, VmState::Running, VmState::Stopped, ev, None)
            .instrument(span)
            .await?;
        Ok(())
    }
}

/// The result of a VM whose state directory cannot be read.
fn lost_exit(vm: &VmDir) -> VmExit {
    let now = std::time::SystemTime::now();
    let running = vm.read_running().ok().flatten();
    VmExit {
        exit_code: -1,
        guest: vm_dir::GuestStatus::default(),
        usage: usage::UsageSample::default(),
        cores: running.as_ref().map_or(0, |r| r.cores),
        started_at: running.map_or(now, |r| time::from_unix_ms(r.started_at_ms)),
        stopped_at: now,
        stop_reason: watch::STOP_QEMU_EXITED,
        output_tail: String::new(),
        observed_exit: false,
    }
}

/// The `VmStopped` body of a finished VM.
pub fn vm_stopped(vm: &VmDir, exit: &VmExit, stop_reason: &str) -> VmStopped {
    VmStopped {
        vm_id: vm.vm_id().to_owned(),
        exit_code: exit.exit_code,
        output_location: vm.output_log().display().to_string(),
        usage: Some(VmUsage {
            cpu_seconds: exit.usage.cpu_seconds,
            cpu_user_seconds: exit.usage.cpu_user_seconds,
            cpu_system_seconds: exit.usage.cpu_system_seconds,
            peak_memory_bytes: exit.usage.peak_memory_bytes,
            wall: Some(time::duration(exit.wall())),
            cores: exit.cores,
        }),
        stopped_at: Some(time::timestamp(exit.stopped_at)),
        stop_reason: stop_reason.to_owned(),
        output_tail: exit.output_tail.clone(),
    }
}
