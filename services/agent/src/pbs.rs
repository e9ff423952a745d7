//! PBS (OpenPBS, PBS Pro, Torque), as the host agent asks it who a job starter is
//! (`docs/host-agent.md`). PBS has no "which job is this process in" query, so:
//!
//! 1. the starter's environment names the job (`PBS_JOBID`, checked to be a plain id);
//! 2. `qstat -f -F json ID` (OpenPBS) or `qstat -f -1 ID` (Torque) describes it;
//! 3. the job must be running (`job_state = R`) on this host (`exec_host`), as the starter's
//!    uid (`euser`), and the starter's process must be in the job's session (`session_id`: the
//!    session of the job's top process, made by the MOM; a process can leave its session but
//!    never join another one, so a process of another job, or of none, cannot pass).
//!
//! The run attempt is `run_count` (1 when qstat does not show it).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use wnodes_lrms::pbs_cli::{PbsJob, parse_qstat_json, parse_qstat_text};

use crate::lrms::{self, Client, ClientError, LrmsError, VerifiedJob, proc_facts};

/// Which form of `qstat -f` to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QstatFormat {
    /// `qstat -f -F json ID` (OpenPBS, PBS Pro ≥ 14.1).
    #[default]
    Json,
    /// `qstat -f -1 ID` (Torque; OpenPBS too).
    Text,
}

/// `[agent.pbs]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PbsConfig {
    /// `qstat` (a name on `PATH`, or a path).
    pub qstat: PathBuf,
    pub format: QstatFormat,
    /// This host's name in `exec_host` (default: the agent's host name; short names match).
    pub node_name: Option<String>,
    /// The VO of a job without `Account_Name`.
    pub default_vo: String,
    /// How long one qstat may take (seconds).
    pub timeout_secs: u64,
}

impl Default for PbsConfig {
    fn default() -> Self {
        Self {
            qstat: "qstat".into(),
            format: QstatFormat::Json,
            node_name: None,
            default_vo: String::new(),
            timeout_secs: 20,
        }
    }
}

/// Asks PBS.
#[derive(Debug, Clone)]
pub struct Pbs {
    config: PbsConfig,
    client: Client,
}

impl Pbs {
    pub fn new(config: PbsConfig) -> Self {
        let client = Client {
            timeout_secs: config.timeout_secs,
        };
        Self { config, client }
    }

    /// Job `id` as qstat shows it.
    ///
    /// # Errors
    /// An unknown job (refused), qstat failing, or an answer that is not that job.
    pub async fn job(&self, id: &str) -> Result<PbsJob, LrmsError> {
        let args: &[&str] = match self.config.format {
            QstatFormat::Json => &["-f", "-F", "json", id],
            QstatFormat::Text => &["-f", "-1", id],
        };
        let out = match self.client.stdout(&self.config.qstat, args).await {
            Ok(out) => out,
            Err(ClientError::Failed { said, .. }) if said.contains("Unknown Job Id") => {
                return Err(LrmsError::refused(
                    "not_in_job",
                    format!("PBS knows no job {id:?} (qstat: {said})"),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let parsed = match self.config.format {
            QstatFormat::Json => parse_qstat_json(&out, id),
            QstatFormat::Text => parse_qstat_text(&out),
        };
        let job = parsed.map_err(|what| ClientError::Parse {
            command: "qstat -f".into(),
            said: out.chars().take(512).collect(),
            what,
        })?;
        let short = |s: &str| s.split('.').next().unwrap_or_default().to_owned();
        if short(&job.job_id) != short(id) {
            return Err(ClientError::Parse {
                command: "qstat -f".into(),
                said: job.job_id.clone(),
                what: format!("job {} where {id} was asked for", job.job_id),
            }
            .into());
        }
        Ok(job)
    }

    /// The job the process `pid` (running as `uid` on `host`) runs for; `claimed` is the
    /// starter's `PBS_JOBID`.
    ///
    /// # Errors
    /// Refused when the job is not running here, as that uid, with that process in its
    /// session; or PBS could not be asked.
    pub async fn identify(
        &self,
        pid: i32,
        uid: u32,
        claimed: &str,
        host: &str,
    ) -> Result<VerifiedJob, LrmsError> {
        if claimed.is_empty() {
            return Err(LrmsError::refused(
                "no_job_id",
                "PBS cannot say which job a process is in: the job starter must run with PBS_JOBID set",
            ));
        }
        let id = lrms::claimed_id(claimed)?;
        let job = self.job(id).await?;
        let jid = &job.job_id;
        if job.state != "R" {
            return Err(LrmsError::refused(
                "state",
                format!("PBS job {jid} is in state {}, not R", job.state),
            ));
        }
        let node = self.config.node_name.as_deref().unwrap_or(host);
        lrms::check_runs_here(&format!("PBS job {jid}"), &job.exec_hosts, node)?;
        let session = proc_facts::session(pid)?;
        if job.session_id != Some(session) {
            return Err(LrmsError::refused(
                "not_in_job",
                format!(
                    "the job starter's process {pid} is in session {session}, PBS job {jid}'s session is {}",
                    job.session_id
                        .map_or_else(|| "not shown".to_owned(), |s| s.to_string())
                ),
            ));
        }
        let (job_uid, job_gid) = lrms::check_owner(&format!("PBS job {jid}"), &job.user, uid)?;
        let env = vec![
            ("PBS_JOBID".to_owned(), jid.clone()),
            ("PBS_QUEUE".to_owned(), job.queue.clone()),
        ];
        Ok(VerifiedJob {
            job_id: jid.clone(),
            attempt: job.run_count.unwrap_or(1).max(1),
            uid: job_uid,
            gid: job_gid,
            vo: job
                .account
                .clone()
                .unwrap_or_else(|| self.config.default_vo.clone()),
            user: job.user,
            queue: job.queue,
            cpus: job.cpus,
            memory_bytes: job.memory_bytes,
            walltime: job.walltime,
            env,
        })
    }
}
