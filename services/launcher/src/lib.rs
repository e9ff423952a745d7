//! The WNoDeS launcher: turns a started job into a qemu VM on this host and reports its life on
//! the bus (`docs/job-flow-contract.md`, `guest/README.md`).
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the `[launcher]` config section, accelerator choice |
//! | [`policy`] | site policy: job request → [`VmSpec`](wnodes_proto::v1::VmSpec), VM ids |
//! | [`host_paths`] | host policy: the image and scratch paths qemu gets lie under their roots, symlinks resolved |
//! | [`vm_table`] | the VM table (`launcher_vms`) and its state machine (joins the four preparation results) |
//! | [`vm_dir`] | the VM's state directory: `job.json`, `running.json`, serial files, liveness |
//! | [`confine`] | each VM's qemu confined: a uid of its own (allocation, file ownership, giving back), the `setpriv` wrapper, `-sandbox` |
//! | [`qemu`] | the qemu command line, the payload script, starting qemu detached through the wrapper |
//! | [`qmp`] | a minimal QMP client (powerdown / quit / queries) over the VM's unix socket |
//! | [`tuning`] | `[launcher.tuning]`: per-VO and per-queue profiles (pinning, huge pages, KSM, disk cache, AIO, I/O thread) resolved into a VM's [`Tuning`](tuning::Tuning) |
//! | [`cores`] | vCPU pinning: the core allocator (VO grouping, rebuilt from the VM table) and `sched_setaffinity` on the vCPU threads QMP names |
//! | [`usage`] | CPU and peak memory: per-VM cgroup (v2, else v1 `cpuacct`+`memory`) when usable, else `/proc` samples in `usage.json` |
//! | [`watch`] | waits for a VM's qemu to exit (also after a launcher restart) and collects the result |
//! | [`fuzzing`] | what the fuzz targets check: event values through the VM id, path and qemu-argument validators; a job's request through the site policy |
//! | [`handler`] | the bus handler (`job.started`, `job.cancelled`, the four results) |
//! | [`state`] | [`LauncherState`](state::LauncherState), shared by the handler and the tasks; building events |
//! | [`outbox`] | pending events: stored with the state change, published under the job's trace, cleared |
//! | [`start`] | the starter task: launches qemu one VM at a time, publishes `vm.running` |
//! | [`adopt`] | after a restart: reattaching watchers, re-queuing launches, adopting a qemu through its pid file |
//! | [`stop`] | stopping a cancelled VM through QMP |
//! | [`finish`] | the watcher per running VM and its one `vm.stopped` |
//! | [`deadline`] | the housekeeping task: preparation deadlines, republishing pending events |
//! | [`cgroups`] | removing leftover per-VM cgroups on start |
//!
//! Modules depend in one direction: `handler`, `start`, `adopt`, `stop`, `finish`,
//! `deadline` and `cgroups` use `state` and `outbox` (and the leaf modules below them), never
//! each other; `state` uses only leaf modules.
//!
//! [`Launcher`] is the service as the runtime runs it.
//!
//! Flow (see [`join`] for the state machine): `job.started` → policy → `vm.requested` (or
//! `vm.failed` phase `policy`); the four results are joined per VM in `launcher_vms`; when all
//! are ready the starter runs qemu and publishes `vm.running`; a watcher waits for qemu's exit
//! and publishes `vm.stopped` (exit code from `status.log`, output tail, host-measured usage).
//! Any preparation failure, a cancellation before start, or the preparation deadline ends the
//! run with `vm.failed`; exactly one of `vm.stopped`/`vm.failed` is published per run.
//!
//! What survives a launcher crash lives in `<vms_dir>/<vm_id>/` (qemu's pid file, QMP socket,
//! serial files, the persisted job and trace context, usage samples) and in the `launcher_vms`
//! table; qemu runs detached (its own session, through the launcher's wrapper) and is never
//! killed when the launcher stops. On start the launcher reattaches a watcher to every VM marked running (a
//! qemu that exited meanwhile is finished from its state directory at once), adopts a qemu
//! started just before a crash, and republishes events that were not acknowledged.
//!
//! Usage accounting ([`usage`]) survives a launcher that is down when qemu exits: the wrapper
//! joins a per-VM cgroup before it execs qemu, so qemu is in it from its first instruction; the group keeps the counters after qemu's exit and is read (then removed) by whichever
//! launcher finishes the VM; leftover groups of finished or unknown VMs are removed on start.
//! Sources, in order of preference: cgroup v2 (`/sys/fs/cgroup` a writable cgroup2 mount), cgroup
//! v1 (writable `cpuacct` and `memory` hierarchies), `/proc` samples (which miss the CPU time
//! after the last sample when nobody watched the exit). Exercised with real qemu: cgroup v1 and
//! `/proc` samples (this project's machines are v1); cgroup v2 only against fake directories.
//!
//! Deployment note: under systemd the unit needs `KillMode=process` unless qemu leaves the
//! unit's cgroup, or stopping the service kills the VMs. On cgroup v2 hosts moving qemu into
//! `wnodes/<vm_id>` does that; on cgroup v1 hosts it does not (systemd tracks the unit in its
//! own `name=systemd` hierarchy, which the launcher leaves alone), so keep `KillMode=process`.

mod adopt;
mod cgroups;
pub mod config;
pub mod confine;
pub mod cores;
mod deadline;
#[cfg(test)]
mod error_rule;
mod finish;
pub mod fuzzing;
pub mod handler;
pub mod host_paths;
mod outbox;
pub mod policy;
pub mod qemu;
pub mod qmp;
mod start;
pub mod state;
mod stop;
pub mod tuning;
pub mod usage;
pub mod vm_dir;
pub mod vm_table;
pub mod watch;

pub use config::LauncherConfig;

use wnodes_runtime::{ConfigError, NoCommand, Parts, Service, ServiceCtx, StartError};

/// The launcher service.
#[derive(Debug)]
pub struct Launcher;

impl Service for Launcher {
    const ROLE: &'static wnodes_runtime::Role = &wnodes_bus::roles::LAUNCHER;
    const ABOUT: &'static str = "WNoDeS launcher: runs each started job in a qemu VM on this host";
    type Config = LauncherConfig;
    type Handler = handler::LauncherHandler;
    type Command = NoCommand;

    fn validate(config: &LauncherConfig) -> Result<(), ConfigError> {
        config
            .policy
            .validate()
            .map_err(|e| ConfigError::section(Self::NAME, e))?;
        config
            .tuning
            .validate()
            .map_err(|e| ConfigError::section(Self::NAME, e))?;
        config
            .confinement
            .range()
            .map(drop)
            .map_err(|e| ConfigError::section(Self::NAME, e))
    }

    /// Reattaches to running VMs; the starter (qemu launches, one at a time) and housekeeping
    /// (deadlines, pending events, cgroups) run as tasks.
    async fn build(
        ctx: &ServiceCtx<LauncherConfig>,
    ) -> Result<Parts<handler::LauncherHandler>, StartError> {
        let (launcher, rx) = prepare(ctx)
            .await
            .map_err(|e| StartError::failed("prepare the launcher", e))?;
        let starter = launcher.clone();
        let housekeeping = launcher.clone();
        Ok(Parts::consumer(handler::LauncherHandler::new(launcher))
            .task("starter", async move {
                starter.run_starter(rx).await;
                Ok(())
            })
            .task("housekeeping", async move {
                housekeeping.housekeeping().await;
                Ok(())
            }))
    }
}

/// Prepares the launcher (its policy was checked by `Service::validate`): creates the VM
/// table, reattaches to the VMs that run, and returns the shared state with the starter's
/// queue. VMs keep running after the service stops.
async fn prepare(
    ctx: &ServiceCtx<LauncherConfig>,
) -> Result<
    (
        std::sync::Arc<state::LauncherState>,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ),
    state::LauncherError,
> {
    // Running as root is a fact of this process, not of the file (`--check-config` passes
    // without it).
    ctx.config.confinement.validate()?;
    vm_table::init(ctx.store.pool()).await?;
    let (launcher, rx) = state::LauncherState::new(ctx);
    tracing::info!(
        accel = launcher.accel.as_str(),
        vms_dir = %launcher.vms_dir.display(),
        usage = usage::CgroupHost::describe(launcher.cgroups.as_ref()),
        "Launcher starting."
    );
    launcher.reattach().await?;
    Ok((launcher, rx))
}
