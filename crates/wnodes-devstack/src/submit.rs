//! Submitting jobs: as the LRMS's job starter would (`wnodes-bridge submit`, a process) or
//! through the bridge's gRPC API.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context;
use wnodes_bus::proto;

use crate::Stack;

/// What the job runs.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A POSIX sh script, sent inline.
    Script(String),
    /// A command and its arguments (no shell).
    Command(Vec<String>),
}

/// One job.
#[derive(Debug, Clone)]
pub struct SubmitArgs {
    pub payload: Payload,
    /// LRMS job id (the run key is `<site>/unknown/<job_id>/1`).
    pub job_id: String,
    /// VO; `None` = the stack's (`demo`).
    pub vo: Option<String>,
    /// CPU cores (0 = site default).
    pub cores: u32,
    /// Memory in MiB (0 = site default).
    pub memory_mib: u64,
    /// Scratch disk in MiB (0 = site default).
    pub scratch_mib: u64,
    /// Wall-clock limit for the whole submission (the job starter is killed after it).
    pub timeout: Duration,
}

impl SubmitArgs {
    /// A script job with the site defaults and a 300 s timeout.
    pub fn script(job_id: impl Into<String>, script: impl Into<String>) -> Self {
        Self {
            payload: Payload::Script(script.into()),
            job_id: job_id.into(),
            vo: None,
            cores: 0,
            memory_mib: 0,
            scratch_mib: 0,
            timeout: Duration::from_secs(300),
        }
    }
}

/// How a submission ended.
#[derive(Debug, Clone)]
pub struct SubmitOutcome {
    /// The job starter's exit code (`submit`), or the payload's (`grpc_submit`; 125 when the
    /// VM failed).
    pub exit_code: i32,
    /// The payload's output.
    pub stdout: String,
    /// The job starter's progress lines (`submit`) or the failure reason (`grpc_submit`).
    pub stderr: String,
    /// From the submission to its end.
    pub wall: Duration,
    /// `site/lrms/job_id/attempt`.
    pub run_key: String,
}

impl Stack {
    /// The run reference a job id gets (LRMS unspecified, attempt 1).
    pub fn run_ref(&self, job_id: &str) -> proto::JobRunRef {
        proto::JobRunRef {
            site: self.opts.site.clone(),
            lrms: proto::Lrms::Unspecified as i32,
            job_id: job_id.into(),
            run_attempt: 1,
        }
    }

    /// The run key for `run`: a run key as is (it contains `/`), or a job id's attempt 1.
    pub fn run_key_of(&self, run: &str) -> String {
        if run.contains('/') {
            run.to_owned()
        } else {
            wnodes_bus::event::run_key(&self.run_ref(run))
        }
    }

    /// Runs `wnodes-bridge submit` (the job starter) with the stack's config and waits for it.
    pub async fn submit(&self, args: &SubmitArgs) -> anyhow::Result<SubmitOutcome> {
        self.spawn_submit(args)?.wait().await
    }

    /// Starts `wnodes-bridge submit` (the job starter) with the stack's config and returns at
    /// once: the handle gives its pid (to signal it) and waits for it. It does not borrow the
    /// stack, so services can be stopped and restarted while the job runs.
    pub fn spawn_submit(&self, args: &SubmitArgs) -> anyhow::Result<RunningSubmit> {
        let mut cmd = tokio::process::Command::new(self.bin("bridge"));
        cmd.env("WNODES_CONFIG", &self.config_path)
            .env_remove("RUST_LOG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .arg("submit")
            .args(["--vo", args.vo.as_deref().unwrap_or(&self.opts.vo)])
            .args(["--user", &self.opts.job_user])
            .args(["--uid", &self.opts.job_uid.to_string()])
            .args(["--gid", &self.opts.job_gid.to_string()])
            .args(["--job-id", &args.job_id])
            .args(["--cores", &args.cores.to_string()])
            .args(["--memory-mib", &args.memory_mib.to_string()])
            .args(["--scratch-mib", &args.scratch_mib.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let script_path;
        match &args.payload {
            Payload::Script(s) => {
                script_path = self
                    .opts
                    .work_dir
                    .join(format!("job-{}.sh", sanitize(&args.job_id)));
                std::fs::write(&script_path, s)
                    .with_context(|| format!("writing {}", script_path.display()))?;
                cmd.arg("--script").arg(&script_path);
            }
            Payload::Command(c) => {
                cmd.arg("--").args(c);
            }
        }
        let start = Instant::now();
        let child = cmd.spawn().context("starting wnodes-bridge submit")?;
        Ok(RunningSubmit {
            child,
            start,
            timeout: args.timeout,
            run_key: wnodes_bus::event::run_key(&self.run_ref(&args.job_id)),
        })
    }

    /// Submits through the bridge's gRPC API as an LRMS integration would: `JobStarted`, then
    /// `WaitJob`, then `JobFinished` with the payload's exit code.
    pub async fn grpc_submit(&self, args: &SubmitArgs) -> anyhow::Result<SubmitOutcome> {
        let mut client =
            proto::bridge_client::BridgeClient::connect(format!("http://{}", self.grpc_addr))
                .await
                .context("connecting to the bridge's gRPC API")?;
        let run = self.run_ref(&args.job_id);
        let kind = match &args.payload {
            Payload::Script(s) => proto::job_payload::Kind::InlineScript(s.clone().into_bytes()),
            Payload::Command(c) => proto::job_payload::Kind::Command(proto::JobCommand {
                executable: c.first().cloned().unwrap_or_default(),
                args: c.iter().skip(1).cloned().collect(),
            }),
        };
        let job = proto::JobDescription {
            run: Some(run.clone()),
            owner: Some(proto::JobOwner {
                user: self.opts.job_user.clone(),
                uid: self.opts.job_uid,
                gid: self.opts.job_gid,
            }),
            vo: args.vo.clone().unwrap_or_else(|| self.opts.vo.clone()),
            resources: Some(proto::ResourceRequest {
                cores: args.cores,
                memory_bytes: args.memory_mib * 1024 * 1024,
                scratch_bytes: args.scratch_mib * 1024 * 1024,
                ..Default::default()
            }),
            host: self.opts.host.clone(),
            payload: Some(proto::JobPayload {
                kind: Some(kind),
                ..Default::default()
            }),
            ..Default::default()
        };
        let start = Instant::now();
        client
            .job_started(proto::JobStartedRequest {
                job: Some(job),
                started_at: None,
                ..Default::default()
            })
            .await
            .context("Bridge.JobStarted")?;
        let mut wait = tonic::Request::new(proto::WaitJobRequest {
            run: Some(run.clone()),
            host: self.opts.host.clone(),
        });
        wait.set_timeout(args.timeout);
        let outcome = client
            .wait_job(wait)
            .await
            .context("Bridge.WaitJob")?
            .into_inner();
        let (exit_code, stdout, stderr) = match &outcome.result {
            Some(proto::job_outcome::Result::Stopped(s)) => {
                let out = std::fs::read_to_string(&s.output_location)
                    .unwrap_or_else(|_| s.output_tail.clone());
                (outcome.exit_code, out, String::new())
            }
            Some(proto::job_outcome::Result::Failed(f)) => (
                i32::from(wnodes_bridge_exit_vm_failed()),
                String::new(),
                format!("VM failed in phase {}: {}", f.phase, f.reason),
            ),
            None => anyhow::bail!("Bridge.WaitJob returned no result"),
        };
        client
            .job_finished(proto::JobFinishedRequest {
                run: Some(run.clone()),
                host: self.opts.host.clone(),
                exit_code,
                finished_at: None,
            })
            .await
            .context("Bridge.JobFinished")?;
        Ok(SubmitOutcome {
            exit_code,
            stdout,
            stderr,
            wall: start.elapsed(),
            run_key: wnodes_bus::event::run_key(&run),
        })
    }
}

/// A `wnodes-bridge submit` process started by [`Stack::spawn_submit`] (killed when dropped).
#[derive(Debug)]
pub struct RunningSubmit {
    child: tokio::process::Child,
    start: Instant,
    timeout: Duration,
    run_key: String,
}

impl RunningSubmit {
    /// The process id (`None` once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` to the job starter (SIGTERM/SIGINT cancel the job).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| anyhow::anyhow!("wnodes-bridge submit has already exited"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .with_context(|| format!("sending {signal} to wnodes-bridge submit ({pid})"))
    }

    /// Waits for the job starter to exit (at most the submission's timeout).
    pub async fn wait(self) -> anyhow::Result<SubmitOutcome> {
        let Self {
            child,
            start,
            timeout,
            run_key,
        } = self;
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .with_context(|| format!("wnodes-bridge submit did not end within {timeout:?}"))?
            .context("waiting for wnodes-bridge submit")?;
        Ok(SubmitOutcome {
            exit_code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            wall: start.elapsed(),
            run_key,
        })
    }
}

/// The job starter's code for "the VM failed before the payload ran".
const fn wnodes_bridge_exit_vm_failed() -> u8 {
    125
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}
