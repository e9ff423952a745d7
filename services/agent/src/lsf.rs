//! LSF, as the host agent asks it who a job starter is (`docs/host-agent.md`):
//!
//! 1. the job the starter's process is in, from its cgroup: LSF's cgroup process tracking
//!    (`LSF_PROCESS_TRACKING=Y`, `LSF_LINUX_CGROUP_ACCT=Y` in `lsf.conf`) puts every job's
//!    processes in `<lsf>/<cluster>/job.<id>.<index>.<time>`, which only root can move a
//!    process out of. Without it the agent refuses LSF jobs: `LSB_JOBID` alone is the job's
//!    own word.
//! 2. `bjobs -o "<fields>" -json ID`: the job runs (`RUN`) on this host as the starter's uid;
//! 3. `bhist -l ID`: the run attempt is the number of times the job started.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use wnodes_lrms::lsf_cli::{
    bjobs_fields, count_starts, job_of_cgroup, lsf_job_id, parse_bjobs_json,
};

use crate::lrms::{self, Client, ClientError, LrmsError, VerifiedJob, proc_facts};

/// `[agent.lsf]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LsfConfig {
    /// `bjobs` (a name on `PATH`, or a path).
    pub bjobs: PathBuf,
    /// `bhist`.
    pub bhist: PathBuf,
    /// How many `lsb.events` files bhist searches (`-n`; 0: all of them).
    pub bhist_event_files: u32,
    /// The cgroup path component LSF's job cgroups are under (`lsf`).
    pub cgroup_top: String,
    /// This host's name in `EXEC_HOST` (default: the agent's host name; short names match).
    pub node_name: Option<String>,
    /// The VO of a job whose project is LSF's `default`.
    pub default_vo: String,
    /// How long one command may take (seconds).
    pub timeout_secs: u64,
}

impl Default for LsfConfig {
    fn default() -> Self {
        Self {
            bjobs: "bjobs".into(),
            bhist: "bhist".into(),
            bhist_event_files: 0,
            cgroup_top: "lsf".into(),
            node_name: None,
            default_vo: String::new(),
            timeout_secs: 20,
        }
    }
}

/// Asks LSF.
#[derive(Debug, Clone)]
pub struct Lsf {
    config: LsfConfig,
    client: Client,
}

impl Lsf {
    pub fn new(config: LsfConfig) -> Self {
        let client = Client {
            timeout_secs: config.timeout_secs,
        };
        Self { config, client }
    }

    /// The job the process `pid` (running as `uid` on `host`) runs for; `claimed` is the
    /// starter's `LSB_JOBID`.
    ///
    /// # Errors
    /// Refused when the process is in no LSF job cgroup, in another job than claimed, or the
    /// job is not running here as that uid; or LSF could not be asked.
    pub async fn identify(
        &self,
        pid: i32,
        uid: u32,
        claimed: &str,
        host: &str,
    ) -> Result<VerifiedJob, LrmsError> {
        let cgroups = proc_facts::cgroups(pid)?;
        let Some((id, idx)) = job_of_cgroup(&cgroups, &self.config.cgroup_top) else {
            return Err(LrmsError::refused(
                "not_in_job",
                format!(
                    "process {pid} is in no LSF job's cgroup (under {:?}; LSF_PROCESS_TRACKING and LSF_LINUX_CGROUP_ACCT must be on)",
                    self.config.cgroup_top
                ),
            ));
        };
        let jid = lsf_job_id(id, idx);
        if !claimed.is_empty() && claimed != id.to_string() && claimed != jid {
            return Err(LrmsError::refused(
                "claimed_job",
                format!(
                    "the job starter's environment names LSF job {claimed:?}, but its process {pid} belongs to job {jid}"
                ),
            ));
        }
        let fields = bjobs_fields();
        let out = self
            .client
            .stdout(&self.config.bjobs, &["-o", &fields, "-json", &jid])
            .await?;
        let job = parse_bjobs_json(&out).map_err(|what| {
            if what.contains("not found") {
                LrmsError::refused("not_in_job", format!("LSF knows no job {jid} ({what})"))
            } else {
                ClientError::Parse {
                    command: "bjobs".into(),
                    said: out.chars().take(512).collect(),
                    what,
                }
                .into()
            }
        })?;
        if job.job_id != jid {
            return Err(ClientError::Parse {
                command: "bjobs".into(),
                said: job.job_id,
                what: format!("another job where {jid} was asked for"),
            }
            .into());
        }
        if job.state != "RUN" {
            return Err(LrmsError::refused(
                "state",
                format!("LSF job {jid} is {}, not RUN", job.state),
            ));
        }
        let node = self.config.node_name.as_deref().unwrap_or(host);
        lrms::check_runs_here(&format!("LSF job {jid}"), &job.exec_hosts, node)?;
        let (job_uid, job_gid) = lrms::check_owner(&format!("LSF job {jid}"), &job.user, uid)?;
        let files = self.config.bhist_event_files.to_string();
        let hist = self
            .client
            .stdout(&self.config.bhist, &["-l", "-n", &files, &jid])
            .await?;
        let attempt = count_starts(&hist).max(1);
        let env = vec![
            ("LSB_JOBID".to_owned(), id.to_string()),
            ("LSB_JOBINDEX".to_owned(), idx.to_string()),
            ("LSB_QUEUE".to_owned(), job.queue.clone()),
        ];
        let vo = match job.project.as_deref() {
            None | Some("default") => self.config.default_vo.clone(),
            Some(p) => p.to_owned(),
        };
        Ok(VerifiedJob {
            job_id: jid,
            attempt,
            uid: job_uid,
            gid: job_gid,
            user: job.user,
            queue: job.queue,
            vo,
            cpus: job.slots,
            memory_bytes: job.mem_limit.unwrap_or(0),
            walltime: job.run_limit,
            env,
        })
    }
}
