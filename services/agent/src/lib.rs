//! WNoDeS host agent (`wnodes-agent`, `docs/host-agent.md`): one per hypervisor, as root. The
//! LRMS runs `wnodes-bridge job-starter` as the job's user; the starter holds no NATS
//! credentials and talks to this agent over a unix socket. The agent decides who the job is
//! and publishes its events with its own per-host identity (`agent-<host>`).
//!
//! - [`session`]: one starter's connection. uid, gid and pid from the socket's peer
//!   credentials; the job from the LRMS (for Slurm: which job the starter's process belongs
//!   to, and that job's owner, state, restart count, partition, account, time limit and
//!   allocation); `JobStarted` (the root of the job's trace); progress and the payload's output
//!   back to the starter; `JobFinished`. A cancel request, the connection closing (the starter
//!   killed, even by SIGKILL) or the agent stopping cancels the run.
//! - [`lrms`]: what every batch system's check shares: the verified job, the errors, the
//!   clients run without a shell, and what `/proc` says about the starter's process.
//! - [`slurm`]: `scontrol pidinfo` and `squeue` (tested against a real Slurm).
//! - [`pbs`]: `PBS_JOBID`, `qstat -f`, and the job's session holding the starter's process.
//! - [`lsf`]: the LSF job cgroup holding the starter's process, `bjobs -o -json`, `bhist -l`.
//! - [`htcondor`]: the root `condor_starter` above the starter's process, its slot's ad
//!   (`condor_status`) and its job's ad (`condor_q`).
//!
//!   PBS, LSF and HTCondor are checked with their clients' documented output; none of them
//!   runs on the project's machines, so their tests use stand-in clients printing that output
//!   (`services/agent/tests/lrms.rs`), with real processes, sessions and cgroups.
//! - grid credentials (an X.509 proxy with its VOMS AC, a WLCG bearer token) are verified by
//!   `wnodes-identity` (`[agent.identity]`), shared with the bridge's gRPC ingest.
//! - [`runs`]: the runs whose starter is connected, on disk: an agent that restarts cancels
//!   them (their starters lost the connection).
//! - [`metrics`]: the Prometheus metrics (`wnodes_agent_*`).
//!
//! What the job's user chooses: the payload, its environment and working directory, the
//! storage mode and an image name (the launcher's policy still decides both). Nothing else.

#[cfg(test)]
mod error_rule;
pub mod htcondor;
pub mod lrms;
pub mod lsf;
pub mod metrics;
pub mod pbs;
pub mod runs;
pub mod session;
pub mod slurm;

pub use wnodes_identity::{IdentityConfig, proxy, token};

use std::{os::unix::fs::PermissionsExt, path::PathBuf, sync::Arc};

use serde::{Deserialize, Serialize};
use wnodes_lrms::LrmsKind;
use wnodes_runtime::{ConfigError, Parts, ServiceCtx, StartError};

/// The agent's default socket.
pub const DEFAULT_SOCKET: &str = wnodes_bridge::job_starter::DEFAULT_SOCKET;

/// `[agent]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The unix socket job starters connect to (default `/run/wnodes/agent.sock`); its
    /// directory is created if missing.
    pub socket: PathBuf,
    /// The socket's mode (default `0o666`: any local user may ask; who they are comes from the
    /// socket). A site may narrow it to a group, e.g. `0o660` with `socket_group`.
    pub socket_mode: u32,
    /// The group owning the socket (a gid), for a mode that leaves others out.
    pub socket_group: Option<u32>,
    /// The batch systems whose jobs this agent takes (default `["slurm"]`; `pbs`, `lsf` and
    /// `htcondor` too, each checked as its section says).
    pub lrms: Vec<LrmsKind>,
    /// Development only: accept a job starter's own job id, attempt, VO and queue
    /// (`--dev-job-id` ...). uid and gid still come from the socket. Default off.
    pub allow_dev_identity: bool,
    /// `[agent.slurm]`.
    pub slurm: slurm::SlurmConfig,
    /// `[agent.pbs]`.
    pub pbs: pbs::PbsConfig,
    /// `[agent.lsf]`.
    pub lsf: lsf::LsfConfig,
    /// `[agent.htcondor]`.
    pub htcondor: htcondor::HtcondorConfig,
    /// `[agent.identity]`: grid credentials verified offline.
    pub identity: IdentityConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            socket_mode: 0o666,
            socket_group: None,
            lrms: vec![LrmsKind::Slurm],
            allow_dev_identity: false,
            slurm: slurm::SlurmConfig::default(),
            pbs: pbs::PbsConfig::default(),
            lsf: lsf::LsfConfig::default(),
            htcondor: htcondor::HtcondorConfig::default(),
            identity: IdentityConfig::default(),
        }
    }
}

/// The host agent service.
#[derive(Debug)]
pub struct HostAgent;

impl wnodes_runtime::Service for HostAgent {
    const ROLE: &'static wnodes_runtime::Role = &wnodes_bus::roles::AGENT;
    const ABOUT: &'static str = "WNoDeS host agent: starts VMs for the LRMS's job starters";
    type Config = Config;
    type Handler = wnodes_runtime::NoHandler;
    type Command = wnodes_runtime::NoCommand;

    fn validate(config: &Config) -> Result<(), ConfigError> {
        if !config.socket.is_absolute() {
            return Err(ConfigError::section(
                "agent",
                format!("socket: {:?} must be an absolute path", config.socket),
            ));
        }
        if config.socket_mode > 0o777 {
            return Err(ConfigError::section(
                "agent",
                format!(
                    "socket_mode: {:o} is not a permission mode",
                    config.socket_mode
                ),
            ));
        }
        if config.lrms.is_empty() {
            return Err(ConfigError::section(
                "agent",
                "lrms: empty (name at least one of slurm, pbs, lsf, htcondor)",
            ));
        }
        if let Some(n) = [
            ("agent.pbs", config.pbs.node_name.as_deref()),
            ("agent.lsf", config.lsf.node_name.as_deref()),
            ("agent.htcondor", config.htcondor.node_name.as_deref()),
        ]
        .into_iter()
        .find(|(_, n)| {
            n.is_some_and(|n| !wnodes_lrms::htcondor_cli::is_condor_name(n) || n.contains('@'))
        }) {
            return Err(ConfigError::section(
                n.0,
                format!(
                    "node_name: {:?} is not a host name",
                    n.1.unwrap_or_default()
                ),
            ));
        }
        Ok(())
    }

    async fn build(
        ctx: &ServiceCtx<Config>,
    ) -> Result<Parts<wnodes_runtime::NoHandler>, StartError> {
        let config = ctx.config.clone();
        let metrics = metrics::Metrics::register(&mut ctx.registry.lock());
        let runs = runs::Runs::open(&ctx.state_dir.join("runs"))
            .map_err(|e| StartError::failed("create the live runs' directory", e))?;
        let verifier = wnodes_identity::Verifier::new(&config.identity)
            .map_err(|e| StartError::config("agent", wnodes_bus::ErrorChain(&e).to_string()))?;
        let listener = bind(&config)?;
        let agent = Arc::new(session::Agent::new(
            ctx.bus.clone(),
            config.clone(),
            ctx.common.site.clone(),
            ctx.common.host.clone(),
            ctx.source(),
            runs.clone(),
            metrics,
            verifier,
            ctx.shutdown.clone(),
        ));
        cancel_left_over(&agent, &runs).await;
        tracing::info!(socket = %config.socket.display(), lrms = ?config.lrms, dev_identity = config.allow_dev_identity, "Host agent listening.");
        let shutdown = ctx.shutdown.clone();
        let socket = config.socket.clone();
        let tracker = tokio_util::task::TaskTracker::new();
        Ok(Parts::tasks_only().task("agent-socket", async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            tracker.spawn(agent.clone().session(stream));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "Accepting a job starter failed.");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            drop(listener);
            let _ = std::fs::remove_file(&socket);
            // Each session cancels its run on shutdown and waits for its VM's end.
            tracker.close();
            tracker.wait().await;
            Ok(())
        }))
    }
}

/// Binds the socket: its directory made (0755) if missing, a stale socket replaced, mode and
/// group set.
fn bind(config: &Config) -> Result<tokio::net::UnixListener, StartError> {
    let path = &config.socket;
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| StartError::failed("create the agent socket's directory", e))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path)
                .map_err(|e| StartError::failed("remove the agent's stale socket", e))?;
        }
        Ok(_) => {
            return Err(StartError::config(
                "agent",
                format!("socket: {} exists and is not a socket", path.display()),
            ));
        }
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| StartError::failed("bind the agent's socket", e))?;
    if let Some(gid) = config.socket_group {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| StartError::failed("set the agent socket's group", e))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.socket_mode))
        .map_err(|e| StartError::failed("set the agent socket's mode", e))?;
    Ok(listener)
}

/// Cancels the runs an earlier agent process left live: their starters lost their
/// connection with it.
async fn cancel_left_over(agent: &session::Agent, runs: &runs::Runs) {
    let left = match runs.left_over() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "Cannot list the runs an earlier agent left.");
            return;
        }
    };
    for (path, run) in left {
        match run {
            Ok(live) => {
                let run = live.run();
                let key = wnodes_bus::event::run_key(&run);
                let ev = wnodes_bridge::server::job_cancelled_event(
                    run,
                    &live.host,
                    "the host agent restarted: the job starter's connection was lost",
                    None,
                    &agent.source,
                );
                match agent.bus.publish(&ev).await {
                    Ok(_) => {
                        tracing::warn!(run = %key, "Cancelled a run whose job starter an earlier agent process served.");
                        let _ = std::fs::remove_file(&path);
                    }
                    Err(e) => {
                        tracing::error!(run = %key, error = %wnodes_bus::ErrorChain(&e), "Cannot cancel a left-over run; trying again at the next start.")
                    }
                }
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "An unreadable live-run file: removed.");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}
