//! Starting qemu detached through the launcher's wrapper, first in the VM's cgroup and as
//! the VM's own user, and [`launch`]: payload, arguments, spawn, `running.json`.

use std::{path::Path, process::Stdio, time::Duration};

use wnodes_proto::v1::{HostUser, JobPayload};

use super::{LaunchInputs, QemuError, build_args, payload_script};
use crate::{
    confine::{self, ConfinementConfig},
    qmp::Qmp,
    usage::{self, CgroupHost},
    vm_dir::{RunningRecord, UsageSource, VmDir},
};

/// How long qemu may take to initialise (until its QMP monitor greets).
const INIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a starting qemu is looked at.
const INIT_POLL: Duration = Duration::from_millis(20);

/// `sh -c` program run as `sh -c JOIN_CGROUPS_AND_EXEC wnodes-qemu <cgroup.procs>... --
/// <wrapper>... <qemu> <args>...`: sets umask 007 (qemu's sockets and files stay with its
/// user and group root, see [`crate::confine`]), joins each group (re-creating a directory
/// that vanished) and execs the wrapper, which execs qemu. Paths and arguments are positional
/// parameters, never interpolated into the program text. A group it cannot join is skipped
/// silently: the launcher checks qemu's membership afterwards.
pub const JOIN_CGROUPS_AND_EXEC: &str = r#"umask 007; for f; do shift; [ "$f" = -- ] && break; { mkdir -p "${f%/*}"; echo $$ > "$f"; } 2>/dev/null; done; exec "$@""#;

/// How qemu is wrapped: the confinement settings and the VM's user (`None`: qemu runs as
/// the launcher's own user, only in its own session).
#[derive(Debug, Clone, Copy)]
pub struct Wrapper<'a> {
    pub config: &'a ConfinementConfig,
    pub user: Option<&'a HostUser>,
    /// The group of `/dev/kvm`, kept as qemu's one supplementary group (KVM only).
    pub kvm_gid: Option<u32>,
}

/// A qemu that initialised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawned {
    /// qemu's pid.
    pub pid: u32,
    /// Where its usage is measured.
    pub usage: UsageSource,
    /// With a cgroup: qemu was in the group(s) from its first instruction (otherwise it was
    /// moved there afterwards, and the CPU time it used before that is not counted).
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

/// The last 2,000 characters qemu wrote to its stdout/stderr.
fn qemu_log_tail(vm: &VmDir) -> String {
    let text = std::fs::read(vm.qemu_log()).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let text = text.trim();
    let skip = text.chars().count().saturating_sub(2000);
    text.chars().skip(skip).collect()
}

/// Writes the payload file, starts qemu through the wrapper and returns once qemu's QMP
/// monitor greets (qemu has initialised). qemu's `-snapshot` overlay goes to the VM's
/// `qemu/` directory (`TMPDIR`).
///
/// The launcher's direct child is `sh` ([`JOIN_CGROUPS_AND_EXEC`]), which joins the VM's
/// group(s) and execs the wrapper (`setsid`, then `setpriv` when the VM has a user of its
/// own), which execs qemu: one pid throughout, already in its own session, in its cgroup and
/// unprivileged before qemu's first instruction. qemu stays the launcher's child until the
/// launcher exits (tokio reaps it when it exits first); it is never killed with the launcher.
pub async fn spawn_detached(
    binary: &Path,
    vm: &VmDir,
    payload: &JobPayload,
    args: &[String],
    cgroups: Option<&CgroupHost>,
    limits: Option<usage::Limits>,
    wrapper: Wrapper<'_>,
) -> Result<Spawned, QemuError> {
    let script = payload_script(payload)?;
    crate::vm_dir::write_atomic(&vm.payload(), &script)?;
    // A stale pid file from an earlier attempt must not be taken for this qemu.
    let _ = std::fs::remove_file(vm.pid_file());
    if let Some(user) = wrapper.user {
        confine::prepare_dirs(vm, user)?;
        confine::check_reachable("VM state directory", &vm.qemu_dir(), user, true)?;
    }
    let log = std::fs::File::create(vm.qemu_log()).map_err(|source| QemuError::Io {
        op: "create",
        path: vm.qemu_log(),
        source,
    })?;
    let log_err = log.try_clone().map_err(|source| QemuError::Io {
        op: "duplicate the handle of",
        path: vm.qemu_log(),
        source,
    })?;
    let vm_id = vm.vm_id();
    let group = cgroups.and_then(|host| match host.create(vm_id, limits) {
        Ok(source) => Some(source),
        Err(e) => {
            tracing::warn!(vm_id, error = %wnodes_bus::ErrorChain(&e), "No cgroup for the VM; sampling /proc.");
            None
        }
    });
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(JOIN_CGROUPS_AND_EXEC)
        .arg("wnodes-qemu");
    if let Some(g) = &group {
        command.args(usage::group_dirs(g).iter().map(|d| d.join("cgroup.procs")));
    }
    command
        .arg("--")
        .args(confine::wrapper_args(
            wrapper.config,
            wrapper.user,
            wrapper.kvm_gid,
        ))
        .arg(binary)
        .args(args)
        .env("TMPDIR", vm.qemu_dir())
        .current_dir(vm.qemu_dir())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    let remove_group = || {
        if let Some(g) = &group {
            usage::remove_groups(vm_id, g);
        }
    };
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(source) => {
            remove_group();
            return Err(QemuError::Spawn {
                binary: binary.to_path_buf(),
                source,
            });
        }
    };
    let Some(pid) = child.id() else {
        remove_group();
        return Err(QemuError::Failed {
            status: "exited at once".into(),
            stderr: qemu_log_tail(vm),
        });
    };
    let deadline = tokio::time::Instant::now() + INIT_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                // The group goes too; one still busy is left to the reconciliation at the
                // next launcher start.
                remove_group();
                return Err(QemuError::Failed {
                    status: status.to_string(),
                    stderr: qemu_log_tail(vm),
                });
            }
            Ok(None) => {}
            Err(source) => {
                kill(pid);
                remove_group();
                return Err(QemuError::Spawn {
                    binary: binary.to_path_buf(),
                    source,
                });
            }
        }
        if vm.qmp_socket().exists() && Qmp::connect(&vm.qmp_socket()).await.is_ok() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            kill(pid);
            let _ = child.wait().await;
            remove_group();
            return Err(QemuError::Timeout(INIT_TIMEOUT));
        }
        tokio::time::sleep(INIT_POLL).await;
    }
    // qemu is the launcher's child until the launcher exits: dropping the handle leaves it
    // running, and tokio reaps it if it exits first.
    drop(child);
    if let Some(user) = wrapper.user {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let uids = confine::parse_status_uids(&status);
        if uids != [user.uid, user.uid] {
            kill(pid);
            remove_group();
            return Err(QemuError::Failed {
                status: format!("running as uids {uids:?}, not the VM's user {}", user.uid),
                stderr: qemu_log_tail(vm),
            });
        }
    }
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
        "qemu did not start in its cgroup; moving it there now (its start-up is not counted)."
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
///
/// With a VM user (`confinement`, and the spec's `vm_user`), every file qemu opens is
/// checked to be reachable by that user first ([`confine::check_reachable`]: the error names
/// the directory in the way), and the scratch volume is handed to it.
pub async fn launch(
    binary: &Path,
    inputs: &LaunchInputs<'_>,
    cgroups: Option<&CgroupHost>,
    memory_overhead_bytes: u64,
    confinement: &ConfinementConfig,
) -> Result<RunningRecord, QemuError> {
    let vm = inputs.vm;
    vm.create()?;
    let user = inputs
        .spec
        .vm_user
        .as_ref()
        .filter(|_| confinement.vm_users);
    if let Some(user) = user {
        let image = inputs.image;
        for (what, path) in [
            ("image", &image.path),
            ("kernel", &image.kernel_path),
            ("initrd", &image.initrd_path),
        ] {
            if !path.is_empty() {
                confine::check_reachable(what, Path::new(path), user, false)?;
            }
        }
        if inputs
            .network
            .is_some_and(|n| n.mode == wnodes_proto::v1::NetworkMode::VirtioTap as i32)
        {
            // qemu opens the tun device itself, as the VM's user (the tap is that user's).
            confine::check_reachable("tun device", Path::new("/dev/net/tun"), user, true)?;
        }
        if let Some(s) = inputs.scratch.filter(|s| !s.path.is_empty()) {
            confine::give(Path::new(&s.path), user)?;
            confine::check_reachable("scratch volume", Path::new(&s.path), user, true)?;
        }
    }
    let wrapper = Wrapper {
        config: confinement,
        user,
        kvm_gid: if inputs.accel == crate::config::Accel::Kvm {
            confine::kvm_gid()
        } else {
            None
        },
    };
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
    let spawned =
        spawn_detached(binary, vm, payload, &args, cgroups, Some(limits), wrapper).await?;
    if let Some(t) = inputs
        .tuning
        .filter(|t| t.tuning.pin_vcpus && !t.host_cores.is_empty())
    {
        // From outside qemu: its sandbox denies it changing its own threads' affinity.
        match crate::cores::pin_vcpus(&vm.qmp_socket(), &t.host_cores).await {
            Ok(plan) => {
                tracing::info!(vm_id = vm.vm_id(), pid = spawned.pid, threads = ?plan, "vCPUs pinned.");
            }
            Err(e) => {
                // A VM that asked for pinned cores does not run unpinned.
                kill(spawned.pid);
                return Err(QemuError::Pin(e));
            }
        }
    }
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
