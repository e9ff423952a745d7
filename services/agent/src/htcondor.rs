//! HTCondor, as the host agent asks it who a job starter is (`docs/host-agent.md`). The
//! starter runs as `USER_JOB_WRAPPER`, so it descends from the slot's `condor_starter`:
//!
//! 1. the nearest ancestor of the starter's process whose command is `condor_starter` and
//!    whose real uid is 0 (a process cannot choose its parent, and only root can start a root
//!    process), and the slot it serves (`-a <slot>` in its arguments);
//! 2. that slot's ad from the collector (`condor_status -startd -json -constraint 'Name ==
//!    "<slot>@<host>"'`): the job it runs (`GlobalJobId`);
//! 3. that job's ad from its schedd (`condor_q -name <schedd> -json <cluster.proc>`): running
//!    (`JobStatus == 2`) in this slot (`RemoteHost`), owned by the starter's uid (`Owner`).
//!
//! The run attempt is `NumJobStarts`. The job's `.job.ad` (`_CONDOR_JOB_AD`) is never read:
//! the job's user can write it. Jobs run as per-slot accounts (`SLOT<N>_USER`) are refused:
//! the starter's uid is then not the job owner's.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use wnodes_lrms::htcondor_cli::{
    CONDOR_Q_ATTRIBUTES, CONDOR_STATUS_ATTRIBUTES, JOB_STATUS_RUNNING, parse_job_json,
    parse_slot_json, slot_constraint, slot_of_starter, split_global_job_id,
};

use crate::lrms::{self, Client, ClientError, LrmsError, VerifiedJob, proc_facts};

/// `[agent.htcondor]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HtcondorConfig {
    /// `condor_status` (a name on `PATH`, or a path).
    pub condor_status: PathBuf,
    /// `condor_q`.
    pub condor_q: PathBuf,
    /// The starter's command name (`comm`) among the starter's ancestors.
    pub starter_command: String,
    /// This host's name in slot names (`slot1_1@<node_name>`; default: the agent's host name).
    pub node_name: Option<String>,
    /// The VO of a job without `x509UserProxyVOName`.
    pub default_vo: String,
    /// How long one command may take (seconds).
    pub timeout_secs: u64,
}

impl Default for HtcondorConfig {
    fn default() -> Self {
        Self {
            condor_status: "condor_status".into(),
            condor_q: "condor_q".into(),
            starter_command: "condor_starter".into(),
            node_name: None,
            default_vo: String::new(),
            timeout_secs: 20,
        }
    }
}

/// Asks HTCondor.
#[derive(Debug, Clone)]
pub struct Htcondor {
    config: HtcondorConfig,
    client: Client,
}

impl Htcondor {
    pub fn new(config: HtcondorConfig) -> Self {
        let client = Client {
            timeout_secs: config.timeout_secs,
        };
        Self { config, client }
    }

    /// The slot whose root-owned `condor_starter` the process `pid` descends from.
    fn slot_of(&self, pid: i32) -> Result<String, LrmsError> {
        for p in proc_facts::ancestors(pid)? {
            if proc_facts::comm(p)? != self.config.starter_command {
                continue;
            }
            if proc_facts::real_uid(p)? != 0 {
                // A user's own process with that name: not HTCondor's.
                continue;
            }
            let args = proc_facts::cmdline(p)?;
            return slot_of_starter(&args).ok_or_else(|| {
                LrmsError::refused(
                    "not_in_job",
                    format!(
                        "the {} (pid {p}) above process {pid} names no slot (-a): {}",
                        self.config.starter_command,
                        args.join(" ")
                    ),
                )
            });
        }
        Err(LrmsError::refused(
            "not_in_job",
            format!(
                "process {pid} does not descend from a {} run by root: it is no HTCondor job's",
                self.config.starter_command
            ),
        ))
    }

    /// The job the process `pid` (running as `uid` on `host`) runs for; `claimed` is a job id
    /// the starter names (HTCondor's starters name none).
    ///
    /// # Errors
    /// Refused when the process descends from no starter, or the slot's job is not running
    /// there as that uid; or HTCondor could not be asked.
    pub async fn identify(
        &self,
        pid: i32,
        uid: u32,
        claimed: &str,
        host: &str,
    ) -> Result<VerifiedJob, LrmsError> {
        let slot = self.slot_of(pid)?;
        let node = self.config.node_name.as_deref().unwrap_or(host);
        let constraint = slot_constraint(&slot, node).ok_or_else(|| {
            LrmsError::refused(
                "not_in_job",
                format!("slot {slot:?} on {node:?} is not a name HTCondor gives"),
            )
        })?;
        let out = self
            .client
            .stdout(
                &self.config.condor_status,
                &[
                    "-startd",
                    "-json",
                    "-constraint",
                    &constraint,
                    "-attributes",
                    CONDOR_STATUS_ATTRIBUTES,
                ],
            )
            .await?;
        let ad = parse_slot_json(&out).map_err(|what| ClientError::Parse {
            command: "condor_status".into(),
            said: out.chars().take(512).collect(),
            what,
        })?;
        let Some((schedd, job_id)) = ad.global_job_id.as_deref().and_then(split_global_job_id)
        else {
            return Err(LrmsError::refused(
                "state",
                format!(
                    "slot {} runs no job (state {:?}, GlobalJobId {:?})",
                    ad.name, ad.state, ad.global_job_id
                ),
            ));
        };
        if !claimed.is_empty() && claimed != job_id {
            return Err(LrmsError::refused(
                "claimed_job",
                format!(
                    "the job starter names HTCondor job {claimed:?}, but its slot {} runs job {job_id}",
                    ad.name
                ),
            ));
        }
        let out = self
            .client
            .stdout(
                &self.config.condor_q,
                &[
                    "-name",
                    &schedd,
                    "-json",
                    &job_id,
                    "-attributes",
                    CONDOR_Q_ATTRIBUTES,
                ],
            )
            .await?;
        let job = parse_job_json(&out).map_err(|what| ClientError::Parse {
            command: "condor_q".into(),
            said: out.chars().take(512).collect(),
            what,
        })?;
        if ad.global_job_id.as_deref() != Some(job.global_job_id.as_str()) {
            return Err(ClientError::Parse {
                command: "condor_q".into(),
                said: job.global_job_id,
                what: format!("another job than slot {}'s", ad.name),
            }
            .into());
        }
        if job.status != JOB_STATUS_RUNNING {
            return Err(LrmsError::refused(
                "state",
                format!(
                    "HTCondor job {job_id} has JobStatus {}, not 2 (running)",
                    job.status
                ),
            ));
        }
        if job.remote_host.as_deref().is_some_and(|r| r != ad.name) {
            return Err(LrmsError::refused(
                "host",
                format!(
                    "HTCondor job {job_id} runs in {:?}, not in slot {}",
                    job.remote_host, ad.name
                ),
            ));
        }
        let (job_uid, job_gid) =
            lrms::check_owner(&format!("HTCondor job {job_id}"), &job.owner, uid)?;
        let env = vec![
            (
                "WNODES_CONDOR_GLOBAL_JOB_ID".to_owned(),
                job.global_job_id.clone(),
            ),
            ("WNODES_CONDOR_SLOT".to_owned(), ad.name.clone()),
        ];
        Ok(VerifiedJob {
            job_id,
            attempt: job.num_job_starts.max(1),
            uid: job_uid,
            gid: job_gid,
            user: job.owner,
            queue: job.accounting_group.unwrap_or_default(),
            vo: job.vo.unwrap_or_else(|| self.config.default_vo.clone()),
            cpus: job.request_cpus,
            memory_bytes: job.request_memory_bytes,
            walltime: job.max_runtime_secs,
            env,
        })
    }
}
