//! Wiring: the shared [`LauncherState`] state, reattaching on start, the starter (qemu launches,
//! serialised), the deadline task, the pending-event flusher and the per-VM watchers.
//!
//! Events not caused by a message (`vm.running`, `vm.stopped`, a deadline or launch
//! `vm.failed`) are written to the VM's row as `pending` together with the state change, then
//! published with [`Bus::publish`] inside a span whose parent is the job's persisted trace
//! context, then cleared: published at least once, and the deterministic event id makes
//! JetStream drop a repeat.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use wnodes_bus::{Bus, ErrorChain, EventExt, KeyStore, proto::event::Body};
use wnodes_proto::v1::{Event, NetworkMode, NetworkReady, VmFailed, VmRunning, VmStopped, VmUsage};
use wnodes_runtime::ServiceCtx;

use crate::{
    config::{Accel, LauncherConfig},
    join::{self, JoinError, VmRow, VmState},
    qemu::{self, LaunchInputs},
    qmp,
    usage::{self, CGROUP_ROOT, CgroupHost},
    vmstate::{self, StateError, VmDir},
    watch::{self, STOP_CANCELLED, STOP_WALLTIME, VmExit, WatchOptions},
};

/// How often the deadline task and the pending-event flusher run.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(2);

/// A launcher problem outside a handler.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("launcher store")]
    Store(#[from] sqlx::Error),
    #[error(transparent)]
    Bus(#[from] wnodes_bus::BusError),
}

/// State shared by the handler and the background tasks.
#[derive(Debug)]
pub struct LauncherState {
    pub config: LauncherConfig,
    pub accel: Accel,
    pub vms_dir: PathBuf,
    pub host: String,
    pub source: String,
    pub store: KeyStore,
    pub bus: Bus,
    /// The host's usable cgroups (`None`: usage from `/proc` samples).
    pub cgroups: Option<CgroupHost>,
    pub watch: WatchOptions,
    pub shutdown: CancellationToken,
    starter: mpsc::UnboundedSender<String>,
    watching: Mutex<HashSet<String>>,
}

/// The W3C trace context of the current span (`traceparent`, `tracestate`).
pub fn current_trace_context() -> BTreeMap<String, String> {
    let cx = tracing::Span::current().context();
    let mut map: HashMap<String, String> = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut map));
    map.into_iter().collect()
}

fn span_with_parent(span: &tracing::Span, trace: &BTreeMap<String, String>) {
    let map: HashMap<String, String> = trace.clone().into_iter().collect();
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&map));
    if let Err(e) = span.set_parent(parent) {
        tracing::debug!(error = %e, "Could not set the span's parent.");
    }
}

fn prost_time(t: std::time::SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn prost_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A MAC for user-mode networking when the network service gave none: 52:54:00 + 3 bytes of
/// the VM id.
fn derived_mac(vm_id: &str) -> String {
    let h = vm_id.trim_start_matches("vm-");
    let b = |i: usize| h.get(i..i + 2).unwrap_or("00");
    format!("52:54:00:{}:{}:{}", b(0), b(2), b(4))
}

impl LauncherState {
    /// Builds the shared state; the receiver feeds [`LauncherState::run_starter`].
    pub fn new(ctx: &ServiceCtx<LauncherConfig>) -> (Arc<Self>, mpsc::UnboundedReceiver<String>) {
        let shutdown = ctx.shutdown.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let cgroups = CgroupHost::detect(std::path::Path::new(CGROUP_ROOT));
        let launcher = Self {
            accel: ctx.config.accel.resolve_here(),
            // qemu's command line must name absolute paths (and liveness checks look for them).
            vms_dir: {
                let d = ctx.config.vms_dir(&ctx.state_dir);
                std::path::absolute(&d).unwrap_or(d)
            },
            config: ctx.config.clone(),
            host: ctx.common.host.clone(),
            source: ctx.source(),
            store: ctx.store.clone(),
            bus: ctx.bus.clone(),
            cgroups,
            watch: WatchOptions::default(),
            shutdown,
            starter: tx,
            watching: Mutex::new(HashSet::new()),
        };
        (Arc::new(launcher), rx)
    }

    /// Builds an event about `row`'s run.
    pub fn event(&self, row: &VmRow, body: Body) -> Event {
        let host = if row.host.is_empty() {
            &self.host
        } else {
            &row.host
        };
        Event::build(row.run.clone(), host, &self.source, body)
    }

    /// Asks the starter to start `vm_id` (it re-reads the row once the caller's transaction
    /// has committed: the store has a single write connection).
    pub fn request_start(&self, vm_id: &str) {
        if self.starter.send(vm_id.to_owned()).is_err() {
            tracing::warn!(
                vm_id,
                "Starter gone; the VM starts at the next launcher start."
            );
        }
    }

    async fn load(&self, vm_id: &str) -> Result<Option<VmRow>, ServiceError> {
        let mut conn = self.store.pool().acquire().await?;
        Ok(join::load(&mut conn, vm_id).await?)
    }

    /// Moves a VM and stores `event` as pending in one statement, then publishes it.
    async fn transition_and_emit(
        &self,
        row: &VmRow,
        from: VmState,
        to: VmState,
        event: Event,
        pid: Option<u32>,
    ) -> Result<bool, ServiceError> {
        let moved = {
            let mut conn = self.store.pool().acquire().await?;
            join::transition(&mut conn, &row.vm_id, from, to, Some(&event), pid).await?
        };
        if moved {
            self.emit(&row.vm_id, &event, &row.trace).await;
        }
        Ok(moved)
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
        span_with_parent(&span, trace);
        let published = self.bus.publish(event).instrument(span).await;
        match published {
            Ok(_) => {
                let cleared = async {
                    let mut conn = self.store.pool().acquire().await?;
                    join::clear_pending(&mut conn, vm_id, &event.id).await?;
                    Ok::<_, ServiceError>(())
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
    pub async fn flush_pending(&self) -> Result<(), ServiceError> {
        for row in join::list_pending(self.store.read_pool()).await? {
            if let Some(ev) = &row.pending {
                self.emit(&row.vm_id, ev, &row.trace).await;
            }
        }
        Ok(())
    }

    /// On start: VMs marked `launching` go to the starter (which adopts a qemu that was
    /// already started), VMs marked `running` get a watcher (which finishes them at once if
    /// qemu exited while the launcher was down); pending events are republished.
    pub async fn reattach(self: &Arc<Self>) -> Result<(), ServiceError> {
        self.reconcile_cgroups().await?;
        for vm in vmstate::list(&self.vms_dir)? {
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
                _ => {}
            }
        }
        self.flush_pending().await
    }

    /// On start: removes the per-VM cgroups (`wnodes/vm-*`) of VMs that are finished
    /// (`stopped`, `failed`) or unknown (no state directory). Groups of VMs still preparing,
    /// launching or running are kept (their watcher reads and removes them), and so are those
    /// of a VM directory without a row (left alone, like the directory). Only empty groups can
    /// be removed: a group still holding a process stays and is logged.
    pub async fn reconcile_cgroups(&self) -> Result<(), ServiceError> {
        let Some(host) = &self.cgroups else {
            return Ok(());
        };
        for (vm_id, dirs) in usage::list_groups(host) {
            let vm = VmDir::new(&self.vms_dir, &vm_id)?;
            let known = vm.dir().exists();
            let state = if known {
                self.load(&vm_id).await?.map(|r| r.state)
            } else {
                None
            };
            if !cgroup_is_stale(known, state) {
                continue;
            }
            for dir in dirs {
                match usage::remove_group_dir(&dir) {
                    Ok(()) => {
                        tracing::info!(vm_id, group = %dir.display(), "Removed a leftover cgroup.")
                    }
                    Err(e) => {
                        tracing::warn!(vm_id, error = %ErrorChain(&e), "Cannot remove a leftover cgroup.")
                    }
                }
            }
        }
        Ok(())
    }

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

    async fn start_vm(self: &Arc<Self>, vm_id: &str) -> Result<(), ServiceError> {
        let Some(row) = self.load(vm_id).await? else {
            return Ok(());
        };
        if row.state != VmState::Launching {
            return Ok(());
        }
        let span = tracing::info_span!("launcher.start_vm", vm_id);
        span_with_parent(&span, &row.trace);
        self.start_row(row).instrument(span).await
    }

    async fn start_row(self: &Arc<Self>, row: VmRow) -> Result<(), ServiceError> {
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
        let running = match vm.read_running()? {
            Some(r) => {
                tracing::info!(vm_id = %row.vm_id, pid = r.pid, "Adopting a qemu started before a restart.");
                r
            }
            // Crashed between qemu's start and running.json: qemu's own pid file tells.
            None if vm.read_pid_file().is_some_and(|pid| vm.qemu_alive(pid)) => {
                let r = adopt_from_pid_file(&vm, &row, self.cgroups.as_ref())?;
                tracing::info!(vm_id = %row.vm_id, pid = r.pid, "Adopting a qemu found through its pid file.");
                r
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
                let mut network: NetworkReady = network.clone();
                if network.mode == NetworkMode::User as i32 && network.mac.is_empty() {
                    network.mac = derived_mac(&row.vm_id);
                }
                let inputs = LaunchInputs {
                    accel: self.accel,
                    vm: &vm,
                    spec: &row.spec,
                    image,
                    scratch: Some(scratch),
                    // A tap without a MAC or name fails validation: a clear vm.failed (launch).
                    network: Some(&network),
                    storage: Some(storage),
                };
                match qemu::launch(&self.config.qemu_binary, &inputs, self.cgroups.as_ref()).await {
                    Ok(r) => r,
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
        let ev = self.event(
            &row,
            Body::VmRunning(VmRunning {
                vm_id: row.vm_id.clone(),
                pid: running.pid,
                accel: running.accel.clone(),
                started_at: Some(prost_time(vmstate::from_unix_ms(running.started_at_ms))),
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

    async fn finish(&self, vm: &VmDir, exit: VmExit) -> Result<(), ServiceError> {
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
        span_with_parent(&span, &row.trace);
        self.transition_and_emit(&row, VmState::Running, VmState::Stopped, ev, None)
            .instrument(span)
            .await?;
        Ok(())
    }

    /// Fails VMs not started within `prepare_deadline`.
    pub async fn expire_deadlines(&self) -> Result<(), ServiceError> {
        let deadline = self.config.prepare_deadline;
        let cutoff = join::now_ms() - i64::try_from(deadline.as_millis()).unwrap_or(i64::MAX);
        for row in join::list(self.store.read_pool(), &[VmState::Preparing]).await? {
            if row.requested_at_ms > cutoff {
                continue;
            }
            let missing: Vec<&str> = join::Resource::ALL
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

/// True when a VM's leftover cgroup can go: the VM has no state directory here (unknown), or
/// its row says it is finished. A directory without a row is left alone.
fn cgroup_is_stale(has_state_dir: bool, state: Option<VmState>) -> bool {
    match (has_state_dir, state) {
        (false, _) => true,
        (true, Some(s)) => matches!(s, VmState::Stopped | VmState::Failed),
        (true, None) => false,
    }
}

/// The result of a VM whose state directory cannot be read.
fn lost_exit(vm: &VmDir) -> VmExit {
    let now = std::time::SystemTime::now();
    let running = vm.read_running().ok().flatten();
    VmExit {
        exit_code: -1,
        guest: vmstate::GuestStatus::default(),
        usage: usage::UsageSample::default(),
        cores: running.as_ref().map_or(0, |r| r.cores),
        started_at: running.map_or(now, |r| vmstate::from_unix_ms(r.started_at_ms)),
        stopped_at: now,
        stop_reason: watch::STOP_QEMU_EXITED,
        output_tail: String::new(),
        observed_exit: false,
    }
}

/// `running.json` for a live qemu whose start was not recorded (the launcher crashed right
/// after starting it): start time from the pid file, usage from the VM's cgroup when qemu is
/// in it, else from `/proc` samples.
fn adopt_from_pid_file(
    vm: &VmDir,
    row: &VmRow,
    cgroups: Option<&CgroupHost>,
) -> Result<vmstate::RunningRecord, ServiceError> {
    let pid = vm.read_pid_file().unwrap_or_default();
    let usage = cgroups
        .map(|h| h.source_for(vm.vm_id()))
        .filter(|s| usage::contains(s, pid))
        .unwrap_or(vmstate::UsageSource::Proc);
    let started = std::fs::metadata(vm.pid_file())
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| std::time::SystemTime::now());
    let running = vmstate::RunningRecord {
        pid,
        accel: String::from(if vm_cmdline_has(pid, "kvm") {
            "kvm"
        } else {
            "tcg"
        }),
        started_at_ms: vmstate::unix_ms(started),
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

/// The `VmStopped` body of a finished VM.
pub fn vm_stopped(vm: &VmDir, exit: &VmExit, stop_reason: &str) -> VmStopped {
    VmStopped {
        vm_id: vm.vm_id().to_owned(),
        exit_code: exit.exit_code,
        output_location: vm.output_log().display().to_string(),
        usage: Some(VmUsage {
            cpu_seconds: exit.usage.cpu_seconds,
            peak_memory_bytes: exit.usage.peak_memory_bytes,
            wall: Some(prost_duration(exit.wall())),
            cores: exit.cores,
        }),
        stopped_at: Some(prost_time(exit.stopped_at)),
        stop_reason: stop_reason.to_owned(),
        output_tail: exit.output_tail.clone(),
    }
}

/// Prepares the launcher (its policy was checked by `Service::validate`): creates the VM table, reattaches to the VMs that
/// run, and returns the shared state with the starter's queue. VMs keep running after the
/// service stops.
pub async fn prepare(
    ctx: &ServiceCtx<LauncherConfig>,
) -> Result<(Arc<LauncherState>, mpsc::UnboundedReceiver<String>), ServiceError> {
    join::init(ctx.store.pool()).await?;
    let (launcher, rx) = LauncherState::new(ctx);
    tracing::info!(
        accel = launcher.accel.as_str(),
        vms_dir = %launcher.vms_dir.display(),
        usage = CgroupHost::describe(launcher.cgroups.as_ref()),
        "Launcher starting."
    );
    launcher.reattach().await?;
    Ok((launcher, rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cgroups_of_finished_or_unknown_vms_are_stale() {
        assert!(cgroup_is_stale(false, None));
        assert!(cgroup_is_stale(true, Some(VmState::Stopped)));
        assert!(cgroup_is_stale(true, Some(VmState::Failed)));
        for live in [VmState::Preparing, VmState::Launching, VmState::Running] {
            assert!(!cgroup_is_stale(true, Some(live)), "{live:?}");
        }
        assert!(
            !cgroup_is_stale(true, None),
            "a directory without a row is left alone"
        );
    }

    #[test]
    fn user_mode_macs_are_locally_administered_and_stable() {
        assert_eq!(derived_mac("vm-0123456789ab"), "52:54:00:01:23:45");
    }
}
