//! Starting qemu detached (`-daemonize`), first in the VM's cgroup, and [`launch`]: payload,
//! arguments, spawn, `running.json`.

use std::{path::Path, process::Stdio, time::Duration};

use wnodes_proto::v1::JobPayload;

use super::{LaunchInputs, QemuError, build_args, payload_script};
use crate::{
    usage::{self, CgroupHost},
    vm_dir::{RunningRecord, UsageSource, VmDir},
};

/// How long qemu may take to initialise before `-daemonize` returns.
const DAEMONIZE_TIMEOUT: Duration = Duration::from_secs(60);

/// `sh -c` program run as `sh -c JOIN_CGROUPS_AND_EXEC wnodes-qemu <cgroup.procs>... -- <qemu>
/// <args>...`: joins each group (re-creating a directory that vanished) and execs qemu. Paths
/// and arguments are positional parameters, never interpolated into the program text. A group
/// it cannot join is skipped silently: the launcher checks the daemon's membership afterwards.
pub const JOIN_CGROUPS_AND_EXEC: &str = r#"for f; do shift; [ "$f" = -- ] && break; { mkdir -p "${f%/*}"; echo $$ > "$f"; } 2>/dev/null; done; exec "$@""#;
/// A qemu that initialised and daemonized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawned {
    /// The daemon's pid (from qemu's pid file).
    pub pid: u32,
    /// Where its usage is measured.
    pub usage: UsageSource,
    /// With a cgroup: the daemon was already in the group(s) when checked, i.e. it inherited
    /// them from the foreground qemu (otherwise it was moved there afterwards, and the CPU
    /// time it used before that is not counted).
    pub daemon_inherited: bool,
}

fn kill(pid: u32) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(raw),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Writes the payload file, runs qemu (which daemonizes) and returns qemu's pid. qemu's
/// `-snapshot` overlay goes to the VM directory (`TMPDIR`).
///
/// With `cgroups`, the VM's group(s) are created first and qemu is started in them: a `sh`
/// ([`JOIN_CGROUPS_AND_EXEC`]) writes its own pid into each group's `cgroup.procs` and then
/// execs qemu, so qemu and the daemon it forks are in the groups from their first instruction
/// and all of qemu's CPU time and memory is counted (moving the foreground qemu after `spawn()`
/// raced with its fork). The daemon's membership is checked (and, if it is missing, the
/// daemon is moved in). Any cgroup failure falls back to `/proc` samples.
pub async fn spawn_detached(
    binary: &Path,
    vm: &VmDir,
    payload: &JobPayload,
    args: &[String],
    cgroups: Option<&CgroupHost>,
    limits: Option<usage::Limits>,
) -> Result<Spawned, QemuError> {
    let script = payload_script(payload)?;
    crate::vm_dir::write_atomic(&vm.payload(), &script)?;
    // A stale pid file from an earlier attempt must not be taken for this qemu.
    let _ = std::fs::remove_file(vm.pid_file());
    let vm_id = vm.vm_id();
    let group = cgroups.and_then(|host| match host.create(vm_id, limits) {
        Ok(source) => Some(source),
        Err(e) => {
            tracing::warn!(vm_id, error = %wnodes_bus::ErrorChain(&e), "No cgroup for the VM; sampling /proc.");
            None
        }
    });
    let mut command = match &group {
        Some(g) => {
            let mut c = tokio::process::Command::new("sh");
            c.arg("-c").arg(JOIN_CGROUPS_AND_EXEC).arg("wnodes-qemu");
            c.args(usage::group_dirs(g).iter().map(|d| d.join("cgroup.procs")));
            c.arg("--").arg(binary);
            c
        }
        None => tokio::process::Command::new(binary),
    };
    let spawned = command
        .args(args)
        .env("TMPDIR", vm.dir())
        .current_dir(vm.dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let child = match spawned {
        Ok(c) => c,
        Err(source) => {
            if let Some(g) = &group {
                usage::remove_groups(vm_id, g);
            }
            return Err(QemuError::Spawn {
                binary: binary.to_path_buf(),
                source,
            });
        }
    };
    // The foreground qemu exits once the daemon is initialised; the daemon itself has its
    // stdio on /dev/null by then, so the pipes close.
    let waited = tokio::time::timeout(DAEMONIZE_TIMEOUT, child.wait_with_output()).await;
    match waited {
        Ok(Ok(out)) if out.status.success() => {}
        other => {
            // The group goes too; one still busy (a qemu stuck initialising) is left to the
            // reconciliation at the next launcher start.
            if let Some(g) = &group {
                usage::remove_groups(vm_id, g);
            }
            return Err(match other {
                Err(_) => QemuError::Timeout(DAEMONIZE_TIMEOUT),
                Ok(Err(source)) => QemuError::Spawn {
                    binary: binary.to_path_buf(),
                    source,
                },
                Ok(Ok(out)) => {
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    let stderr: String = stderr.trim().chars().take(2000).collect();
                    QemuError::Failed {
                        status: out.status.to_string(),
                        stderr,
                    }
                }
            });
        }
    }
    let pid = vm
        .read_pid_file()
        .ok_or_else(|| QemuError::NoPid(vm.pid_file()))?;
    let Some(source) = group else {
        return Ok(Spawned {
            pid,
            usage: UsageSource::Proc,
            daemon_inherited: false,
        });
    };
    if usage::contains(&source, pid) {
        return Ok(Spawned {
            pid,
            usage: source,
            daemon_inherited: true,
        });
    }
    tracing::warn!(
        vm_id,
        pid,
        "The qemu daemon did not inherit its cgroup; moving it there now (its start-up is not counted)."
    );
    match usage::attach(vm_id, &source, pid) {
        Ok(()) => Ok(Spawned {
            pid,
            usage: source,
            daemon_inherited: false,
        }),
        Err(e) => {
            tracing::warn!(vm_id, error = %wnodes_bus::ErrorChain(&e), "Cannot move qemu into its cgroup; sampling /proc.");
            usage::remove_groups(vm_id, &source);
            Ok(Spawned {
                pid,
                usage: UsageSource::Proc,
                daemon_inherited: false,
            })
        }
    }
}

/// Starts a VM: writes the payload, runs qemu detached inside its own cgroup(s) when the host
/// allows (else usage comes from `/proc` samples, see [`crate::usage`]), limited to the spec's
/// memory plus `memory_overhead_bytes` and its cores ([`usage::apply_limits`]), and writes
/// `running.json`.
pub async fn launch(
    binary: &Path,
    inputs: &LaunchInputs<'_>,
    cgroups: Option<&CgroupHost>,
    memory_overhead_bytes: u64,
) -> Result<RunningRecord, QemuError> {
    let vm = inputs.vm;
    vm.create()?;
    let payload = inputs
        .spec
        .payload
        .as_ref()
        .ok_or_else(|| QemuError::Payload("the job has no payload".into()))?;
    let args = build_args(inputs)?;
    let limits = usage::Limits {
        memory_bytes: inputs
            .spec
            .memory_bytes
            .saturating_add(memory_overhead_bytes),
        cores: inputs.spec.cores.max(1),
    };
    let spawned = spawn_detached(binary, vm, payload, &args, cgroups, Some(limits)).await?;
    // The VM runs from the moment qemu has initialised and detached (what `vm.running`
    // reports): the usage record's wall time is measured from here, and qemu's start-up CPU
    // time still counts in its CPU seconds.
    let started_at_ms = wnodes_proto::time::unix_ms(std::time::SystemTime::now());
    let pid = spawned.pid;
    let running = RunningRecord {
        pid,
        accel: inputs.accel.as_str().to_owned(),
        started_at_ms,
        cores: inputs.spec.cores.max(1),
        walltime_secs: inputs
            .spec
            .walltime
            .as_ref()
            .map(|w| u64::try_from(w.seconds).unwrap_or(0))
            .unwrap_or(0),
        cpu_at_start_ns: cpu_used_so_far(vm.vm_id(), &spawned.usage, pid),
        usage: spawned.usage,
    };
    if let Err(e) = vm.write_running(&running) {
        // The launch is reported as failed: a qemu nobody would watch must not keep running.
        kill(pid);
        return Err(e.into());
    }
    Ok(running)
}

/// CPU time qemu has used so far (its start-up), in nanoseconds; 0 when it cannot be read.
fn cpu_used_so_far(vm_id: &str, source: &UsageSource, pid: u32) -> u64 {
    let sample = match source {
        UsageSource::Proc => crate::usage::sample_proc(pid),
        cgroup => crate::usage::read_source(vm_id, cgroup).ok(),
    };
    sample.map_or(0, |s| (s.cpu_seconds * 1e9) as u64)
}
