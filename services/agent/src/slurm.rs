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

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
pub use wnodes_lrms::slurm_cli::{SlurmJob, parse_pidinfo, parse_squeue, squeue_format};

use crate::lrms::{Client, ClientError, LrmsError, VerifiedJob};

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

/// Runs Slurm's clients.
#[derive(Debug, Clone)]
pub struct Slurm {
    config: SlurmConfig,
    client: Client,
}

impl Slurm {
    pub fn new(config: SlurmConfig) -> Self {
        let client = Client {
            timeout_secs: config.timeout_secs,
        };
        Self { config, client }
    }

    /// The job the process `pid` of this host belongs to.
    ///
    /// # Errors
    /// Not in a job (refused), or scontrol failing otherwise.
    pub async fn job_of_pid(&self, pid: i32) -> Result<String, LrmsError> {
        let pid_s = pid.to_string();
        let (ok, out) = self
            .client
            .run(&self.config.scontrol, &["pidinfo", &pid_s])
            .await?;
        match parse_pidinfo(&out) {
            Some(id) if ok => Ok(id),
            _ if out.contains("Failed to locate job") || out.contains("not found") => {
                Err(LrmsError::refused(
                    "not_in_job",
                    format!(
                        "process {pid} is not part of a Slurm job on this host (scontrol pidinfo: {})",
                        out.trim()
                    ),
                ))
            }
            _ if ok => Err(ClientError::Parse {
                command: "scontrol pidinfo".into(),
                said: out.trim().to_owned(),
                what: "no \"Slurm JobId=\" line".into(),
            }
            .into()),
            _ => Err(ClientError::Failed {
                command: "scontrol pidinfo".into(),
                said: out.trim().to_owned(),
            }
            .into()),
        }
    }

    /// The job `id` as squeue shows it.
    ///
    /// # Errors
    /// squeue failing, or an answer that is not one job's line.
    pub async fn job(&self, id: &str) -> Result<SlurmJob, ClientError> {
        let format = squeue_format();
        let (ok, out) = self
            .client
            .run(&self.config.squeue, &["-h", "-j", id, "-O", &format])
            .await?;
        if !ok {
            return Err(ClientError::Failed {
                command: "squeue".into(),
                said: out.trim().to_owned(),
            });
        }
        let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        let [line] = lines.as_slice() else {
            return Err(ClientError::Parse {
                command: "squeue".into(),
                said: out.trim().to_owned(),
                what: format!("{} lines where one job's was expected", lines.len()),
            });
        };
        let job = parse_squeue(line).map_err(|what| ClientError::Parse {
            command: "squeue".into(),
            said: (*line).to_owned(),
            what,
        })?;
        if job.job_id != id {
            return Err(ClientError::Parse {
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

    /// The job whose process `pid` (running as `uid`) connected; `claimed` is the job id the
    /// starter's environment names (`SLURM_JOB_ID`; compared, never trusted).
    ///
    /// # Errors
    /// Refused: the process is in no job, in another job than claimed, the job is another
    /// user's or not running. Or Slurm could not be asked.
    pub async fn identify(
        &self,
        pid: i32,
        uid: u32,
        claimed: &str,
    ) -> Result<VerifiedJob, LrmsError> {
        let id = self.job_of_pid(pid).await?;
        if !claimed.is_empty() && claimed != id {
            return Err(LrmsError::refused(
                "claimed_job",
                format!(
                    "the job starter's environment names Slurm job {claimed:?}, but its process {pid} belongs to job {id}"
                ),
            ));
        }
        let job = self.job(&id).await?;
        if job.uid != uid {
            return Err(LrmsError::refused(
                "uid",
                format!(
                    "Slurm job {id} belongs to uid {}, but the job starter runs as uid {uid}",
                    job.uid
                ),
            ));
        }
        if job.state != "RUNNING" {
            return Err(LrmsError::refused(
                "state",
                format!("Slurm job {id} is {}, not RUNNING", job.state),
            ));
        }
        let env = vec![
            ("SLURM_JOB_ID".to_owned(), id.clone()),
            ("SLURM_JOB_USER".to_owned(), job.user.clone()),
            ("SLURM_JOB_UID".to_owned(), job.uid.to_string()),
            ("SLURM_JOB_PARTITION".to_owned(), job.partition.clone()),
            ("SLURM_JOB_ACCOUNT".to_owned(), job.account.clone()),
            ("SLURM_RESTART_COUNT".to_owned(), job.restarts.to_string()),
            ("SLURM_CPUS_ON_NODE".to_owned(), job.cpus.to_string()),
        ];
        Ok(VerifiedJob {
            vo: self.vo(&job),
            job_id: id,
            attempt: job.restarts.saturating_add(1),
            uid: job.uid,
            gid: job.gid,
            user: job.user,
            queue: job.partition,
            cpus: job.cpus,
            memory_bytes: job.memory_bytes,
            walltime: job.time_limit,
            env,
        })
    }
}
