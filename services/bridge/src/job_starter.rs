//! `wnodes-bridge job-starter`: the job starter every LRMS runs as the job's user (Slurm's
//! `job_submit.lua` wrapper, LSF's `JOB_STARTER`, HTCondor's `USER_JOB_WRAPPER`, a PBS job
//! wrapper). It holds no NATS credentials and reads no WNoDeS configuration: it sends what the
//! job runs to the host agent (`wnodes-agent`) over the agent's unix socket, prints the agent's
//! progress to stderr and the payload's output to stdout, and exits with the job's exit code.
//! Who the job is comes from the agent (the socket's peer credentials and the LRMS), never
//! from here. SIGTERM and SIGINT ask the agent to cancel the run and wait for the VM's
//! teardown; a second signal stops waiting. If this process dies, the agent sees the
//! connection close and cancels the run (docs/host-agent.md).

use std::{io::Write, path::PathBuf};

use tokio::net::UnixStream;
use wnodes_bus::proto::{self, agent_message::Kind as Reply, starter_message::Kind as Ask};

use crate::{
    agent_wire::{read_msg, write_msg},
    submit::{EXIT_SIGINT, EXIT_SIGTERM, LrmsArg, StorageModeArg},
};

/// The agent's default socket.
pub const DEFAULT_SOCKET: &str = "/run/wnodes/agent.sock";

/// Refused by the agent: not this user's job, or not permitted.
pub const EXIT_NOPERM: u8 = 77;

/// `--help` text on exit codes.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0-255  the payload's exit code (the VM ran and stopped; codes outside 0-255 become 255)
  125    the VM failed before the payload ran (the reason is printed on stderr)
  130    cancelled by SIGINT (the VM was torn down)
  143    cancelled by SIGTERM (the VM was torn down)
  64     bad command line, or a request the agent found malformed (the reason is printed)
  69     the host agent is unreachable, or went away before the job ended
  77     refused by the host agent: not a job of this user on this host (the reason is printed)
A payload can itself exit with 125, 130 or 143; stderr says which case it was.";

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// `job-starter` options: what the job runs, never who it is.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "wnodes-bridge job-starter",
    about = "Run this LRMS job's payload in a WNoDeS VM through the host agent",
    after_help = EXIT_CODES_HELP
)]
pub struct JobStarterArgs {
    /// The host agent's unix socket.
    #[arg(long, env = "WNODES_AGENT__SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The batch system running this job (default: found from the environment:
    /// SLURM_JOB_ID, _CONDOR_JOB_AD, LSB_JOBID, PBS_JOBID).
    #[arg(long, value_enum)]
    pub lrms: Option<LrmsArg>,
    /// A POSIX sh script to run (`-` reads it from stdin), instead of a command.
    #[arg(long, conflicts_with = "command")]
    pub script: Option<PathBuf>,
    /// Environment variable for the payload, KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the VM.
    #[arg(long, default_value = "")]
    pub workdir: String,
    /// How the VM reaches the site's shared storage (the site's policy may refuse it).
    #[arg(long, value_enum, default_value = "site")]
    pub storage_mode: StorageModeArg,
    /// Image name; empty = the VO's default (the site's policy decides).
    #[arg(long, default_value = "")]
    pub image: String,
    /// Development only, refused unless the agent allows it: the job id (instead of the
    /// LRMS's).
    #[arg(long)]
    pub dev_job_id: Option<String>,
    /// Development only: the run attempt (with --dev-job-id).
    #[arg(long, default_value_t = 1, requires = "dev_job_id")]
    pub dev_attempt: u32,
    /// Development only: the VO (with --dev-job-id).
    #[arg(long, default_value = "", requires = "dev_job_id")]
    pub dev_vo: String,
    /// Development only: the queue (with --dev-job-id).
    #[arg(long, default_value = "", requires = "dev_job_id")]
    pub dev_queue: String,
    /// The command and its arguments, after `--` (run without a shell).
    #[arg(last = true, required_unless_present = "script")]
    pub command: Vec<String>,
}

/// The LRMS whose job this process runs in, from its environment.
fn detect_lrms() -> Option<LrmsArg> {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    if set("SLURM_JOB_ID") {
        Some(LrmsArg::Slurm)
    } else if set("_CONDOR_JOB_AD") {
        Some(LrmsArg::Htcondor)
    } else if set("LSB_JOBID") {
        Some(LrmsArg::Lsf)
    } else if set("PBS_JOBID") {
        Some(LrmsArg::Pbs)
    } else {
        None
    }
}

/// The job id the environment claims (compared by the agent, never trusted).
fn claimed_job_id(lrms: LrmsArg) -> String {
    let var = match lrms {
        LrmsArg::Slurm => "SLURM_JOB_ID",
        LrmsArg::Lsf => "LSB_JOBID",
        LrmsArg::Pbs => "PBS_JOBID",
        LrmsArg::Htcondor | LrmsArg::Unspecified => return String::new(),
    };
    std::env::var(var).unwrap_or_default()
}

/// The start request from the options (reads the script).
///
/// # Errors
/// The script cannot be read, or no payload was named.
pub async fn start_request(args: &JobStarterArgs) -> Result<proto::StartRequest, String> {
    let kind = match &args.script {
        Some(p) if p.as_os_str() == "-" => {
            let read = tokio::task::spawn_blocking(|| {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf).map(|_| buf)
            })
            .await
            .map_err(|e| format!("--script -: {e}"))?;
            proto::job_payload::Kind::InlineScript(
                read.map_err(|e| format!("--script -: cannot read the script from stdin: {e}"))?,
            )
        }
        Some(p) => proto::job_payload::Kind::InlineScript(
            tokio::fs::read(p)
                .await
                .map_err(|e| format!("--script {}: {e}", p.display()))?,
        ),
        None => crate::submit::command_payload(&args.command)?,
    };
    let lrms = args
        .lrms
        .or_else(detect_lrms)
        .unwrap_or(LrmsArg::Unspecified);
    let dev = args.dev_job_id.as_ref().map(|id| proto::DevIdentity {
        job_id: id.clone(),
        run_attempt: args.dev_attempt,
        queue: args.dev_queue.clone(),
        vo: args.dev_vo.clone(),
        resources: None,
    });
    Ok(proto::StartRequest {
        lrms: proto::Lrms::from(lrms) as i32,
        payload: Some(proto::JobPayload {
            kind: Some(kind),
            environment: args.env.iter().cloned().collect(),
            working_dir: args.workdir.clone(),
        }),
        storage_mode: proto::StorageMode::from(args.storage_mode) as i32,
        image_hint: args.image.clone(),
        claimed_job_id: claimed_job_id(lrms),
        dev,
        bearer_token: bearer_token().await?,
        x509_proxy: x509_proxy().await?,
    })
}

/// The certificates of the job's X.509 proxy (`X509_USER_PROXY`, else `/tmp/x509up_u<uid>`),
/// as PEM: only its `CERTIFICATE` blocks, never its private key; empty when there is none.
///
/// # Errors
/// `X509_USER_PROXY` names a file that cannot be read.
pub async fn x509_proxy() -> Result<Vec<u8>, String> {
    let (path, named) = match std::env::var_os("X509_USER_PROXY").filter(|p| !p.is_empty()) {
        Some(p) => (PathBuf::from(p), true),
        None => (
            PathBuf::from(format!("/tmp/x509up_u{}", nix::unistd::getuid().as_raw())),
            false,
        ),
    };
    let text = match tokio::fs::read_to_string(&path).await {
        Ok(t) => t,
        Err(e) if named => return Err(format!("X509_USER_PROXY={}: {e}", path.display())),
        Err(_) => return Ok(Vec::new()),
    };
    Ok(certificate_blocks(&text).into_bytes())
}

/// The `CERTIFICATE` blocks of PEM text, in order: a proxy file's private key never leaves the
/// job's host.
pub fn certificate_blocks(text: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        if line.trim() == "-----BEGIN CERTIFICATE-----" {
            inside = true;
        }
        if inside {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        if line.trim() == "-----END CERTIFICATE-----" {
            inside = false;
        }
    }
    out
}

/// The job's WLCG bearer token, found as WLCG's bearer token discovery says: `BEARER_TOKEN`,
/// the file `BEARER_TOKEN_FILE` names, `$XDG_RUNTIME_DIR/bt_u<uid>`, `/tmp/bt_u<uid>`; empty
/// when there is none.
///
/// # Errors
/// `BEARER_TOKEN_FILE` names a file that cannot be read.
pub async fn bearer_token() -> Result<String, String> {
    if let Ok(t) = std::env::var("BEARER_TOKEN")
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_owned());
    }
    if let Some(f) = std::env::var_os("BEARER_TOKEN_FILE").filter(|f| !f.is_empty()) {
        return tokio::fs::read_to_string(&f)
            .await
            .map(|t| t.trim().to_owned())
            .map_err(|e| format!("BEARER_TOKEN_FILE={}: {e}", f.to_string_lossy()));
    }
    let uid = nix::unistd::getuid().as_raw();
    let mut places = Vec::new();
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        places.push(PathBuf::from(dir).join(format!("bt_u{uid}")));
    }
    places.push(PathBuf::from(format!("/tmp/bt_u{uid}")));
    for p in places {
        if let Ok(t) = tokio::fs::read_to_string(&p).await {
            return Ok(t.trim().to_owned());
        }
    }
    Ok(String::new())
}

fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "wnodes-bridge: {line}");
}

fn exit_u8(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(255)
}

/// Runs the job starter; returns the process exit code.
pub async fn run(args: JobStarterArgs) -> u8 {
    let (mut term, mut int) = match crate::submit::cancel_signals() {
        Ok(s) => s,
        Err(e) => {
            say(format_args!("cannot install signal handlers: {e}"));
            return wnodes_runtime::exit::SOFTWARE;
        }
    };
    let request = match start_request(&args).await {
        Ok(r) => r,
        Err(e) => {
            say(format_args!("{e}"));
            return wnodes_runtime::exit::USAGE;
        }
    };
    let stream = match UnixStream::connect(&args.socket).await {
        Ok(s) => s,
        Err(e) => {
            say(format_args!(
                "cannot reach the host agent at {}: {e}",
                args.socket.display()
            ));
            return wnodes_runtime::exit::UNAVAILABLE;
        }
    };
    let (mut rx, mut tx) = stream.into_split();
    let start = proto::StarterMessage {
        kind: Some(Ask::Start(request)),
    };
    if let Err(e) = write_msg(&mut tx, &start).await {
        say(format_args!("cannot send the job to the host agent: {e}"));
        return wnodes_runtime::exit::UNAVAILABLE;
    }
    // The agent's messages, read by a task of their own so that a signal never cuts a frame.
    let (mtx, mut mrx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let m = read_msg::<proto::AgentMessage>(&mut rx).await;
            let end = !matches!(m, Ok(Some(_)));
            if mtx.send(m).await.is_err() || end {
                return;
            }
        }
    });
    let mut cancelled: Option<u8> = None;
    loop {
        let msg = tokio::select! {
            m = mrx.recv() => m.unwrap_or(Ok(None)),
            _ = term.recv() => {
                if let Some(code) = cancelled { return code; }
                cancelled = Some(EXIT_SIGTERM);
                cancel(&mut tx, "SIGTERM", EXIT_SIGTERM).await;
                continue;
            }
            _ = int.recv() => {
                if let Some(code) = cancelled { return code; }
                cancelled = Some(EXIT_SIGINT);
                cancel(&mut tx, "SIGINT", EXIT_SIGINT).await;
                continue;
            }
        };
        match msg {
            Ok(Some(proto::AgentMessage { kind: Some(k) })) => match k {
                Reply::Accepted(a) => say(format_args!(
                    "job {} of {} ({}:{}), VO '{}', started (trace {})",
                    a.run_key, a.user, a.uid, a.gid, a.vo, a.trace_id
                )),
                Reply::Refused(r) => {
                    say(format_args!("the host agent refused the job: {}", r.reason));
                    return exit_u8(r.exit_code);
                }
                Reply::Progress(p) => say(format_args!("{p}")),
                Reply::Output(chunk) => {
                    let mut out = std::io::stdout().lock();
                    if let Err(e) = out.write_all(&chunk).and_then(|()| out.flush()) {
                        say(format_args!("cannot write the output: {e}"));
                    }
                }
                Reply::Done(d) => {
                    say(format_args!("{}", d.message));
                    return exit_u8(d.exit_code);
                }
            },
            Ok(Some(proto::AgentMessage { kind: None })) => {}
            Ok(None) => {
                say(format_args!(
                    "the host agent closed the connection before the job ended"
                ));
                return cancelled.unwrap_or(wnodes_runtime::exit::UNAVAILABLE);
            }
            Err(e) => {
                say(format_args!(
                    "lost the host agent: {}",
                    wnodes_bus::ErrorChain(&e)
                ));
                return cancelled.unwrap_or(wnodes_runtime::exit::UNAVAILABLE);
            }
        }
    }
}

async fn cancel(tx: &mut (impl tokio::io::AsyncWrite + Unpin), name: &str, code: u8) {
    say(format_args!(
        "{name}: cancelling the job; waiting for the VM's teardown"
    ));
    let msg = proto::StarterMessage {
        kind: Some(Ask::Cancel(proto::CancelRequest {
            reason: format!("{name} received by the job starter"),
            exit_code: i32::from(code),
        })),
    };
    if let Err(e) = write_msg(tx, &msg).await {
        say(format_args!("cannot ask the host agent to cancel: {e}"));
    }
}

/// `main` of `wnodes-bridge job-starter`: parses `args` (the process's, from `job-starter`
/// on), runs on a current-thread runtime, returns the exit code.
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> u8 {
    use clap::Parser;
    let args = match JobStarterArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                wnodes_runtime::exit::USAGE
            } else {
                wnodes_runtime::exit::OK
            };
        }
    };
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => {
            say(format_args!("cannot start the runtime: {e}"));
            wnodes_runtime::exit::SOFTWARE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn dev_flags_need_a_dev_job_id_and_a_payload_is_required() {
        let e = JobStarterArgs::try_parse_from(["x", "--dev-vo", "atlas", "--", "true"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--dev-job-id"), "{e}");
        let e = JobStarterArgs::try_parse_from(["x"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--script") || e.contains("COMMAND"), "{e}");
        let a =
            JobStarterArgs::try_parse_from(["x", "--socket", "/s", "--", "echo", "hi"]).unwrap();
        assert_eq!(a.command, ["echo", "hi"]);
        assert_eq!(a.socket, PathBuf::from("/s"));
    }

    #[test]
    fn only_a_proxy_s_certificates_are_sent_never_its_key() {
        let proxy = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n\
                     -----BEGIN RSA PRIVATE KEY-----\nSECRET\n-----END RSA PRIVATE KEY-----\n\
                     -----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n";
        let sent = certificate_blocks(proxy);
        assert!(
            !sent.contains("SECRET") && !sent.contains("PRIVATE"),
            "{sent}"
        );
        assert_eq!(sent.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(sent.find("AAAA") < sent.find("BBBB"));
    }

    #[tokio::test]
    async fn the_request_carries_the_payload_and_no_identity_without_dev_flags() {
        let a = JobStarterArgs::try_parse_from([
            "x",
            "--lrms",
            "slurm",
            "--env",
            "A=1",
            "--storage-mode",
            "nfs",
            "--",
            "echo",
            "hi",
        ])
        .unwrap();
        let r = start_request(&a).await.unwrap();
        assert_eq!(r.lrms, proto::Lrms::Slurm as i32);
        assert_eq!(r.storage_mode, proto::StorageMode::Nfs as i32);
        assert!(r.dev.is_none());
        let p = r.payload.unwrap();
        assert_eq!(p.environment.get("A").map(String::as_str), Some("1"));
        assert!(
            matches!(p.kind, Some(proto::job_payload::Kind::Command(c)) if c.executable == "echo")
        );
        let a = JobStarterArgs::try_parse_from(["x", "--script", "/nonexistent/s.sh"]).unwrap();
        let e = start_request(&a).await.unwrap_err();
        assert!(e.contains("/nonexistent/s.sh"), "{e}");
    }
}
