//! Slurm, as the host agent asks it who a job starter is (`docs/host-agent.md`).
//!
//! 1. `scontrol pidinfo <pid>`: this host's slurmd says which job the peer's process belongs to
//!    (slurmd asks each job step's proctrack container, so a process can only be found in a
//!    job it descends from, and only on the host whose slurmd runs that job).
//! 2. `squeue -h -j <id> -O <fields>` with `|` after each field: the job's uid, gid, state,
//!    restart count, partition, account, time limit and allocated TRES.
//!
//! What they print is read by `wnodes_lrms::slurm_cli` (shared with the bridge's queue poll).
//!
//! Both are run without a shell, with `SLURM_CONF` as the agent's environment has it.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
pub use wnodes_lrms::slurm_cli::{SlurmJob, parse_pidinfo, parse_squeue, squeue_format};

/// `[agent.slurm]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmConfig {
    /// `scontrol` (a name on `PATH`, or a path).
    pub scontrol: PathBuf,
    /// `squeue`.
    pub squeue: PathBuf,
    /// The VO of a job whose Slurm account is empty (the account names the VO otherwise).
    pub default_vo: String,
    /// How long one Slurm command may take (seconds).
    pub timeout_secs: u64,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        Self {
            scontrol: "scontrol".into(),
            squeue: "squeue".into(),
            default_vo: String::new(),
            timeout_secs: 20,
        }
    }
}

/// Why Slurm could not vouch for a process.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("process {pid} is not part of a Slurm job on this host (scontrol pidinfo: {said})")]
    NotInJob { pid: i32, said: String },
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} did not answer within {secs} s")]
    Timeout { command: String, secs: u64 },
    #[error("{command} failed: {said}")]
    Failed { command: String, said: String },
    #[error("cannot read {command}'s answer {said:?}: {what}")]
    Parse {
        command: String,
        said: String,
        what: String,
    },
}

/// Runs Slurm's clients.
#[derive(Debug, Clone)]
pub struct Slurm {
    config: SlurmConfig,
}

impl Slurm {
    pub fn new(config: SlurmConfig) -> Self {
        Self { config }
    }

    async fn run(&self, program: &PathBuf, args: &[&str]) -> Result<(bool, String), SlurmError> {
        let command = format!("{} {}", program.display(), args.join(" "));
        let mut c = tokio::process::Command::new(program);
        c.args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let secs = self.config.timeout_secs;
        let out = tokio::time::timeout(Duration::from_secs(secs), c.output())
            .await
            .map_err(|_| SlurmError::Timeout {
                command: command.clone(),
                secs,
            })?
            .map_err(|source| SlurmError::Spawn {
                command: command.clone(),
                source,
            })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    /// The job the process `pid` of this host belongs to.
    ///
    /// # Errors
    /// Not in a job ([`SlurmError::NotInJob`]), or scontrol failing otherwise.
    pub async fn job_of_pid(&self, pid: i32) -> Result<String, SlurmError> {
        let pid_s = pid.to_string();
        let (ok, out) = self
            .run(&self.config.scontrol, &["pidinfo", &pid_s])
            .await?;
        match parse_pidinfo(&out) {
            Some(id) if ok => Ok(id),
            _ if out.contains("Failed to locate job") || out.contains("not found") => {
                Err(SlurmError::NotInJob {
                    pid,
                    said: out.trim().to_owned(),
                })
            }
            _ if ok => Err(SlurmError::Parse {
                command: "scontrol pidinfo".into(),
                said: out.trim().to_owned(),
                what: "no \"Slurm JobId=\" line".into(),
            }),
            _ => Err(SlurmError::Failed {
                command: "scontrol pidinfo".into(),
                said: out.trim().to_owned(),
            }),
        }
    }

    /// The job `id` as squeue shows it.
    ///
    /// # Errors
    /// squeue failing, or an answer that is not one job's line.
    pub async fn job(&self, id: &str) -> Result<SlurmJob, SlurmError> {
        let format = squeue_format();
        let (ok, out) = self
            .run(&self.config.squeue, &["-h", "-j", id, "-O", &format])
            .await?;
        if !ok {
            return Err(SlurmError::Failed {
                command: "squeue".into(),
                said: out.trim().to_owned(),
            });
        }
        let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        let [line] = lines.as_slice() else {
            return Err(SlurmError::Parse {
                command: "squeue".into(),
                said: out.trim().to_owned(),
                what: format!("{} lines where one job's was expected", lines.len()),
            });
        };
        let job = parse_squeue(line).map_err(|what| SlurmError::Parse {
            command: "squeue".into(),
            said: (*line).to_owned(),
            what,
        })?;
        if job.job_id != id {
            return Err(SlurmError::Parse {
                command: "squeue".into(),
                said: (*line).to_owned(),
                what: format!("job {} where {id} was asked for", job.job_id),
            });
        }
        Ok(job)
    }

    /// The VO of a job: its account, or `default_vo` when it has none.
    pub fn vo(&self, job: &SlurmJob) -> String {
        if job.account.is_empty() {
            self.config.default_vo.clone()
        } else {
            job.account.clone()
        }
    }
}
