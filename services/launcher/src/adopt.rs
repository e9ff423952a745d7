//! Adopting what a crashed launcher left: on start, VMs marked `launching` go back to the
//! starter, VMs marked `running` get a watcher, pending events are republished; a qemu whose
//! start was not recorded is adopted through its pid file.

use std::sync::Arc;

use crate::{
    state::{LauncherError, LauncherState},
    usage::{self, CgroupHost},
    vm_dir::{self, VmDir},
    vm_table::{VmRow, VmState},
};

impl LauncherState {
    /// On start: VMs marked `launching` go to the starter (which adopts a qemu that was
    /// already started), VMs marked `running` get a watcher (which finishes them at once if
    /// qemu exited while the launcher was down); pending events are republished.
    pub async fn reattach(self: &Arc<Self>) -> Result<(), LauncherError> {
        self.reconcile_cgroups().await?;
        for vm in vm_dir::list(&self.vms_dir)? {
            let Some(row) = self.load(vm.vm_id()).await? else {
                tracing::warn!(
                    vm_id = vm.vm_id(),
                    "VM directory without a row; left alone."
                );
                continue;
            };
            match row.state {
                VmState::Launching => self.request_start(&row.vm_id),
                VmState::Running => {
                    tracing::info!(vm_id = %row.vm_id, "Reattaching to a running VM.");
                    self.spawn_watcher(row.vm_id.clone());
                }
                // Finished: its files go back to root (again, if a crash came between).
                VmState::Failed | VmState::Stopped => self.reclaim(&row),
                VmState::Preparing => {}
            }
        }
        self.flush_pending().await
    }
}

/// `running.json` for a live qemu whose start was not recorded (the launcher crashed right
/// after starting it): start time from the pid file, usage from the VM's cgroup when qemu is
/// in it, else from `/proc` samples.
pub(crate) fn from_pid_file(
    vm: &VmDir,
    row: &VmRow,
    cgroups: Option<&CgroupHost>,
) -> Result<vm_dir::RunningRecord, LauncherError> {
    let pid = vm.read_pid_file().unwrap_or_default();
    let usage = cgroups
        .map(|h| h.source_for(vm.vm_id()))
        .filter(|s| usage::contains(s, pid))
        .unwrap_or(vm_dir::UsageSource::Proc);
    let started = std::fs::metadata(vm.pid_file())
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| std::time::SystemTime::now());
    let running = vm_dir::RunningRecord {
        pid,
        accel: String::from(if vm_cmdline_has(pid, "kvm") {
            "kvm"
        } else {
            "tcg"
        }),
        started_at_ms: wnodes_proto::time::unix_ms(started),
        cores: row.spec.cores.max(1),
        walltime_secs: row
            .spec
            .walltime
            .as_ref()
            .map(|w| u64::try_from(w.seconds).unwrap_or(0))
            .unwrap_or(0),
        usage,
        // Adopted after a crash: its start-up CPU cannot be told apart any more.
        cpu_at_start_ns: 0,
    };
    vm.write_running(&running)?;
    Ok(running)
}

/// True when `/proc/<pid>/cmdline` has `-accel <accel>`.
fn vm_cmdline_has(pid: u32, accel: &str) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"-accel" && w[1] == accel.as_bytes())
}
