//! Starting VMs, one at a time: the starter task takes VM ids from the handler, launches qemu
//! (or adopts one started before a crash) and publishes `vm.running` or `vm.failed`.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::Instrument;
use wnodes_bus::{ErrorChain, propagation, proto::event::Body};
use wnodes_proto::{
    time,
    v1::{VmFailed, VmRunning},
};

use crate::{
    adopt,
    qemu::{self, LaunchInputs},
    state::{LauncherError, LauncherState},
    tuning::VmTuning,
    vm_dir::VmDir,
    vm_table::{self, VmRow, VmState},
};

impl LauncherState {
    /// Starts VMs one at a time, as the handler asks.
    pub async fn run_starter(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<String>) {
        loop {
            let vm_id = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                v = rx.recv() => match v { Some(v) => v, None => return },
            };
            if let Err(e) = self.start_vm(&vm_id).await {
                tracing::error!(vm_id, error = %ErrorChain(&e), "Starting the VM failed.");
            }
        }
    }

    async fn start_vm(self: &Arc<Self>, vm_id: &str) -> Result<(), LauncherError> {
        let Some(row) = self.load(vm_id).await? else {
            return Ok(());
        };
        if row.state != VmState::Launching {
            return Ok(());
        }
        let span = tracing::info_span!("launcher.start_vm", vm_id);
        propagation::set_parent_from_map(&span, &row.trace);
        self.start_row(row).instrument(span).await
    }

    async fn start_row(self: &Arc<Self>, row: VmRow) -> Result<(), LauncherError> {
        let vm = VmDir::new(&self.vms_dir, &row.vm_id)?;
        let fail = |reason: String, phase: &str| {
            self.event(
                &row,
                Body::VmFailed(VmFailed {
                    vm_id: row.vm_id.clone(),
                    reason,
                    phase: phase.into(),
                }),
            )
        };
        if let Some(reason) = &row.cancel_reason {
            let ev = fail(reason.clone(), "cancelled");
            self.transition_and_emit(&row, VmState::Launching, VmState::Failed, ev, None)
                .await?;
            return Ok(());
        }
        // Host state first: a qemu started before a crash is adopted, not started twice.
        let (running, adopted) = match vm.read_running()? {
            Some(r) => {
                tracing::info!(vm_id = %row.vm_id, pid = r.pid, "Adopting a qemu started before a restart.");
                (r, true)
            }
            // Crashed between qemu's start and running.json: qemu's own pid file tells.
            None if vm.read_pid_file().is_some_and(|pid| vm.qemu_alive(pid)) => {
                let r = adopt::from_pid_file(&vm, &row, self.cgroups.as_ref())?;
                tracing::info!(vm_id = %row.vm_id, pid = r.pid, "Adopting a qemu found through its pid file.");
                (r, true)
            }
            None => {
                let (Some(image), Some(scratch), Some(network), Some(storage)) =
                    (&row.image, &row.scratch, &row.network, &row.storage)
                else {
                    let ev = fail(
                        "launching without all four preparation results".into(),
                        "launch",
                    );
                    self.transition_and_emit(&row, VmState::Launching, VmState::Failed, ev, None)
                        .await?;
                    return Ok(());
                };
                // Host policy: only images from the cache and volumes from the scratch
                // directory, as resolved here (qemu gets these paths).
                let checked = match crate::host_paths::check(
                    &self.config.image_roots,
                    &self.config.scratch_roots,
                    &self.config.scratch_volume_groups,
                    image,
                    scratch,
                ) {
                    Ok((image, scratch)) => {
                        crate::host_paths::inspect_image(&self.config.qemu_img_binary, &image)
                            .await
                            .map(|()| (image, scratch))
                    }
                    Err(v) => Err(v),
                };
                let (image, scratch) = match checked {
                    Ok(checked) => checked,
                    Err(v) => {
                        tracing::error!(vm_id = %row.vm_id, rule = v.rule, reason = %v.reason, "Refused by host policy: qemu not started.");
                        let ev = fail(format!("host policy {}: {}", v.rule, v.reason), "policy");
                        self.transition_and_emit(
                            &row,
                            VmState::Launching,
                            VmState::Failed,
                            ev,
                            None,
                        )
                        .await?;
                        return Ok(());
                    }
                };
                let tuning = self.vm_tuning(&row).await?;
                let inputs = LaunchInputs {
                    accel: self.accel,
                    vm: &vm,
                    spec: &row.spec,
                    image: &image,
                    scratch: Some(&scratch),
                    // A tap without a MAC or name fails validation: a clear vm.failed (launch).
                    network: Some(network),
                    storage: Some(storage),
                    sandbox: self.config.confinement.sandbox,
                    tuning: Some(&tuning),
                };
                let launch_started = std::time::Instant::now();
                let launched = qemu::launch(
                    &self.config.qemu_binary,
                    &inputs,
                    self.cgroups.as_ref(),
                    self.config.memory_overhead_bytes,
                    &self.config.confinement,
                )
                .await;
                if launched.is_ok() {
                    self.observe_phase("launch", launch_started.elapsed().as_secs_f64());
                }
                match launched {
                    Ok(r) => (r, false),
                    Err(e) => {
                        tracing::warn!(vm_id = %row.vm_id, error = %ErrorChain(&e), "qemu did not start.");
                        let ev = fail(ErrorChain(&e).to_string(), "launch");
                        self.transition_and_emit(
                            &row,
                            VmState::Launching,
                            VmState::Failed,
                            ev,
                            None,
                        )
                        .await?;
                        return Ok(());
                    }
                }
            }
        };
        if adopted && !row.host_cores.is_empty() {
            // The launcher may have died between qemu's start and its pinning (pinning twice
            // is harmless).
            if let Err(e) = crate::cores::pin_vcpus(&vm.qmp_socket(), &row.host_cores).await {
                tracing::warn!(vm_id = %row.vm_id, error = %ErrorChain(&e), "Cannot pin an adopted qemu's vCPUs; it runs unpinned.");
            }
        }
        // Counted before vm.running goes out, so whoever sees the event sees the count.
        let start_ms = i64::try_from(running.started_at_ms)
            .unwrap_or(i64::MAX)
            .saturating_sub(row.requested_at_ms)
            .max(0);
        self.vm_start_seconds.observe(start_ms as f64 / 1000.0);
        let ev = self.event(
            &row,
            Body::VmRunning(VmRunning {
                vm_id: row.vm_id.clone(),
                pid: running.pid,
                accel: running.accel.clone(),
                started_at: Some(time::timestamp(time::from_unix_ms(running.started_at_ms))),
            }),
        );
        self.transition_and_emit(
            &row,
            VmState::Launching,
            VmState::Running,
            ev,
            Some(running.pid),
        )
        .await?;
        tracing::info!(vm_id = %row.vm_id, pid = running.pid, accel = %running.accel, "VM running.");
        self.spawn_watcher(row.vm_id.clone());
        // A cancellation that arrived while qemu was starting.
        if self
            .load(&row.vm_id)
            .await?
            .is_some_and(|r| r.cancel_reason.is_some())
        {
            self.spawn_stop(row.vm_id.clone());
        }
        Ok(())
    }
}

impl LauncherState {
    /// The VM's tuning: its profile (`[launcher.tuning]`, by VO and queue) and, when it pins
    /// its vCPUs, its host cores: the row's own when it has some (a launch retried after a
    /// restart), else allocated next to the live VMs' and stored in the row before qemu
    /// starts, so that a restarted launcher never hands them out twice.
    async fn vm_tuning(&self, row: &VmRow) -> Result<VmTuning, LauncherError> {
        let config = &self.config.tuning;
        let tuning = config.resolve(&row.spec.vo, &row.spec.queue);
        let mut host_cores = Vec::new();
        if tuning.pin_vcpus {
            host_cores = row.host_cores.clone();
            if self.host_cores.is_empty() {
                tracing::warn!(vm_id = %row.vm_id, "No host cores to pin to ([launcher.tuning] host_cores, or this process's CPUs unreadable); the VM runs unpinned.");
            } else if host_cores.is_empty() {
                let mut conn = self.store.pool().acquire().await?;
                let live = vm_table::live_core_uses(&mut conn, &row.vm_id).await?;
                let vcpus = usize::try_from(row.spec.cores.max(1)).unwrap_or(1);
                host_cores = crate::cores::allocate(
                    &self.host_cores,
                    &live,
                    &row.spec.vo,
                    vcpus,
                    config.vo_grouping,
                );
                vm_table::set_host_cores(&mut conn, &row.vm_id, &host_cores).await?;
            }
            tracing::info!(vm_id = %row.vm_id, vo = %row.spec.vo, cores = ?host_cores, "Host cores for the VM's vCPUs.");
        }
        Ok(VmTuning {
            tuning,
            host_cores,
            hugepages_path: config.hugepages_path.clone(),
        })
    }
}
