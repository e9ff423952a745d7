//! Waits for a VM's qemu to exit and collects what the run produced. Works the same for a VM
//! this launcher started and for one found running (or already gone) after a restart: all it
//! needs is the state directory.

use std::time::{Duration, SystemTime};

use crate::{
    qmp,
    usage::{self, UsageSample},
    vm_dir::{GuestStatus, StateError, UsageSource, VmDir},
};

/// How the watcher behaves.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// How often qemu's liveness is checked: the delay between the guest's power-off and
    /// `vm.stopped` is at most this.
    pub poll: Duration,
    /// How often `/proc` is sampled for usage (VMs without a cgroup).
    pub sample_every: Duration,
    /// How often samples are persisted to `usage.json`.
    pub persist_every: Duration,
    /// Grace between `system_powerdown` and `quit` when the walltime is over.
    pub powerdown_grace: Duration,
    /// The most a VM's serial files (console and payload output) may hold on the host, in
    /// bytes; a VM that writes more is stopped (`stop_reason` `output-limit`) and its files are
    /// cut to this size with a visible marker. 0: no limit.
    pub output_limit_bytes: u64,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(50),
            sample_every: Duration::from_millis(250),
            persist_every: Duration::from_secs(1),
            powerdown_grace: Duration::from_secs(5),
            output_limit_bytes: 64 << 20,
        }
    }
}

/// Why the VM stopped (`VmStopped.stop_reason`).
pub const STOP_GUEST_POWEROFF: &str = "guest-poweroff";
pub const STOP_QEMU_EXITED: &str = "qemu-exited";
pub const STOP_WALLTIME: &str = "walltime";
pub const STOP_CANCELLED: &str = "cancelled";
/// qemu was killed by the kernel when its cgroup crossed its memory limit.
pub const STOP_OOM: &str = "oom";
/// The VM wrote more serial output than the host keeps ([`WatchOptions::output_limit_bytes`]).
pub const STOP_OUTPUT_LIMIT: &str = "output-limit";

/// The serial files' sizes together, in bytes.
fn serial_bytes(vm: &VmDir) -> u64 {
    [vm.console_log(), vm.output_log()]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Cuts a serial file to `limit` bytes and appends a marker saying how much was dropped
/// (idempotent: a cut file is at most the limit plus its marker).
pub fn cap_file(path: &std::path::Path, limit: u64) -> std::io::Result<Option<u64>> {
    use std::io::Write;
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if limit == 0 || len <= limit + MARKER_ROOM {
        return Ok(None);
    }
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.set_len(limit)?;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    let dropped = len - limit;
    write!(
        f,
        "\n[wnodes: output truncated: {dropped} bytes beyond the host's {limit}-byte limit were dropped]\n"
    )?;
    Ok(Some(dropped))
}

/// Room left for a marker, so that a cut file is not cut again.
const MARKER_ROOM: u64 = 256;

/// The result of a VM run.
#[derive(Debug, Clone, PartialEq)]
pub struct VmExit {
    /// The payload's exit status; -1 when the guest never reported one.
    pub exit_code: i32,
    pub guest: GuestStatus,
    pub usage: UsageSample,
    pub cores: u32,
    pub started_at: SystemTime,
    pub stopped_at: SystemTime,
    pub stop_reason: &'static str,
    pub output_tail: String,
    /// False when qemu had already exited before this watcher looked (launcher was down).
    pub observed_exit: bool,
}

impl VmExit {
    /// From `VmRunning` to `VmStopped`.
    pub fn wall(&self) -> Duration {
        self.stopped_at
            .duration_since(self.started_at)
            .unwrap_or_default()
    }
}

/// A watcher problem.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{0}: qemu was never started (no running.json)")]
    NotStarted(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// How long the event monitor may take, once qemu has exited, to read the events qemu sent
/// before it (it ends at the socket's end of file, normally at once).
const EVENT_DRAIN: Duration = Duration::from_secs(1);

/// Follows the VM's QMP event monitor: the receiver turns `true` when qemu reports a
/// guest-initiated `SHUTDOWN` (the guest powered off). Without the monitor (a VM started by an
/// older launcher, or qemu already gone) the receiver stays `false` and the pid poll decides.
fn watch_shutdown_events(
    vm: &VmDir,
) -> (
    tokio::sync::watch::Receiver<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let socket = vm.qmp_events_socket();
    let vm_id = vm.vm_id().to_owned();
    let task = tokio::spawn(async move {
        if !socket.exists() {
            return;
        }
        let mut qmp = match qmp::Qmp::connect(&socket).await {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(%vm_id, error = %wnodes_bus::ErrorChain(&e), "No QMP event monitor; polling qemu's pid only.");
                return;
            }
        };
        while let Ok(ev) = qmp.next_event().await {
            let name = ev.get("event").and_then(|e| e.as_str()).unwrap_or_default();
            tracing::debug!(%vm_id, event = name, "QMP event.");
            if name == "SHUTDOWN" {
                let by_guest = ev
                    .pointer("/data/guest")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false);
                if by_guest {
                    let _ = tx.send(true);
                }
            }
        }
    });
    (rx, task)
}

/// Stops a VM the host ends (walltime, output limit): powerdown, then `quit` after the grace.
async fn force_stop(vm: &VmDir, pid: u32, opts: &WatchOptions) {
    if let Err(e) = qmp::stop_vm(&vm.qmp_socket(), opts.powerdown_grace, || {
        vm.qemu_alive(pid)
    })
    .await
    {
        tracing::warn!(vm_id = vm.vm_id(), error = %wnodes_bus::ErrorChain(&e), "Cannot stop the VM through QMP.");
    }
}

/// Waits until the VM's qemu has exited, enforcing the walltime, then returns the result.
pub async fn watch(vm: &VmDir, opts: &WatchOptions) -> Result<VmExit, WatchError> {
    let running = vm
        .read_running()?
        .ok_or_else(|| WatchError::NotStarted(vm.vm_id().to_owned()))?;
    let pid = running.pid;
    let started_at = wnodes_proto::time::from_unix_ms(running.started_at_ms);
    let walltime = (running.walltime_secs > 0).then(|| Duration::from_secs(running.walltime_secs));
    let sample_proc = running.usage == UsageSource::Proc;
    let mut last: Option<UsageSample> = sample_proc.then(|| usage::read_usage_file(vm));
    // The first sample is persisted at once, then at most every `persist_every`.
    let mut last_persist: Option<tokio::time::Instant> = None;
    let mut observed = false;
    let mut forced: Option<&'static str> = None;
    let mut last_sample: Option<tokio::time::Instant> = None;
    let (mut shutdown_rx, events) = watch_shutdown_events(vm);
    while vm.qemu_alive(pid) {
        observed = true;
        let sample_due = last_sample.is_none_or(|t| t.elapsed() >= opts.sample_every);
        if sample_proc
            && sample_due
            && let Some(s) = usage::sample_proc(pid)
        {
            last_sample = Some(tokio::time::Instant::now());
            let merged = last.map_or(s, |l| l.max(s));
            last = Some(merged);
            if last_persist.is_none_or(|t| t.elapsed() >= opts.persist_every) {
                if let Err(e) = usage::write_usage_file(vm, &merged) {
                    tracing::warn!(vm_id = vm.vm_id(), error = %wnodes_bus::ErrorChain(&e), "Cannot persist usage.");
                }
                last_persist = Some(tokio::time::Instant::now());
            }
        }
        if forced.is_none()
            && opts.output_limit_bytes > 0
            && serial_bytes(vm) > opts.output_limit_bytes
        {
            tracing::warn!(
                vm_id = vm.vm_id(),
                limit = opts.output_limit_bytes,
                "The VM wrote more output than the host keeps; stopping it."
            );
            forced = Some(STOP_OUTPUT_LIMIT);
            force_stop(vm, pid, opts).await;
        }
        if forced.is_none()
            && let Some(w) = walltime
            && SystemTime::now()
                .duration_since(started_at)
                .unwrap_or_default()
                > w
        {
            tracing::info!(vm_id = vm.vm_id(), walltime = ?w, "Walltime over; stopping the VM.");
            forced = Some(STOP_WALLTIME);
            force_stop(vm, pid, opts).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(opts.poll) => {}
            // The guest powered off: qemu exits right after; look again at once.
            _ = shutdown_rx.changed() => {}
        }
    }
    // qemu is gone, so its event socket is closed: let the monitor read what qemu sent before
    // it exited (under load it may not have handled the guest's SHUTDOWN yet), then stop it.
    let mut events = events;
    if tokio::time::timeout(EVENT_DRAIN, &mut events)
        .await
        .is_err()
    {
        events.abort();
    }
    let guest_shutdown = *shutdown_rx.borrow();
    let mut usage = usage::final_usage(vm, &running.usage, last);
    // CPU over the same interval as the wall time: qemu's start-up before `vm.running` is not
    // the VM's run (the cumulative figure stays in usage.json).
    let cpu_at_start = running.cpu_at_start_ns as f64 / 1e9;
    if sample_proc && let Err(e) = usage::write_usage_file(vm, &usage) {
        tracing::warn!(vm_id = vm.vm_id(), error = %wnodes_bus::ErrorChain(&e), "Cannot persist usage.");
    }
    usage.cpu_seconds = (usage.cpu_seconds - cpu_at_start).max(0.0);
    // Killed for crossing its cgroup's memory limit? Read before the group goes.
    let oom_killed = usage::oom_kills(&running.usage) > 0;
    if oom_killed {
        tracing::warn!(
            vm_id = vm.vm_id(),
            "qemu was killed by the kernel: its cgroup crossed its memory limit."
        );
    }
    // The group(s) are empty now: the usage is read, they can go.
    usage::remove_groups(vm.vm_id(), &running.usage);
    let stopped_at = if observed {
        SystemTime::now()
    } else {
        vm.last_serial_write().unwrap_or_else(SystemTime::now)
    };
    let guest = vm.guest_status();
    // What the host keeps of the output is bounded, with a visible marker where it was cut.
    for path in [vm.console_log(), vm.output_log()] {
        match cap_file(&path, opts.output_limit_bytes) {
            Ok(Some(dropped)) => {
                tracing::warn!(vm_id = vm.vm_id(), path = %path.display(), dropped, "Output cut to the host's limit.");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(vm_id = vm.vm_id(), path = %path.display(), error = %e, "Cannot cut the output to the host's limit.");
            }
        }
    }
    let stop_reason = forced.unwrap_or(if oom_killed {
        STOP_OOM
    } else if guest.exit_code.is_some() || guest_shutdown {
        STOP_GUEST_POWEROFF
    } else {
        STOP_QEMU_EXITED
    });
    Ok(VmExit {
        exit_code: guest.exit_code.unwrap_or(-1),
        guest,
        usage,
        cores: running.cores,
        started_at,
        stopped_at: stopped_at.max(started_at),
        stop_reason,
        output_tail: vm.output_tail()?,
        observed_exit: observed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_past_the_limit_is_cut_once_with_a_marker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        std::fs::write(&path, vec![b'x'; 10_000]).unwrap();
        assert_eq!(cap_file(&path, 4000).unwrap(), Some(6000));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(&"x".repeat(4000)));
        assert!(text.ends_with(
            "\n[wnodes: output truncated: 6000 bytes beyond the host's 4000-byte limit were dropped]\n"
        ), "{}", &text[4000..]);
        // Cut already: left alone; small files and no limit too.
        assert_eq!(cap_file(&path, 4000).unwrap(), None);
        assert_eq!(cap_file(&path, 0).unwrap(), None);
        assert_eq!(cap_file(&dir.path().join("missing"), 10).unwrap(), None);
    }
}
