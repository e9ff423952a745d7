//! `wnodes-bridge submit`: the minimal job starter. Publishes `JobStarted` (the root of the
//! job's trace), prints the run's progress to stderr, waits for `VmStopped`/`VmFailed`, prints
//! the payload's output to stdout, publishes `JobFinished`, and returns the exit code (see the
//! crate docs for the table). SIGINT/SIGTERM publish `JobCancelled` and wait for the teardown;
//! a second signal stops waiting.

use std::{collections::HashMap, io::Write, path::PathBuf, time::Duration};

use tokio::{
    signal::unix::{SignalKind, signal},
    time::Instant,
};
use tracing::Instrument;
use wnodes_bus::{Bus, BusMetrics, ErrorChain, EventExt, proto, proto::event::Body};
use wnodes_runtime::CommonConfig;

use crate::{
    server::{job_cancelled_event, job_finished_event, job_started_event},
    validate,
    watch::{self, Ending},
};

/// The VM failed before the payload ran.
pub const EXIT_VM_FAILED: u8 = 125;
/// Cancelled by SIGINT.
pub const EXIT_SIGINT: u8 = 130;
/// Cancelled by SIGTERM.
pub const EXIT_SIGTERM: u8 = 143;

/// `--help` text on exit codes.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0-255  the payload's exit code (the VM ran and stopped; codes outside 0-255 become 255)
  125    the VM failed before the payload ran (the reason is printed on stderr)
  130    cancelled by SIGINT (JobCancelled published, VM torn down)
  143    cancelled by SIGTERM (JobCancelled published, VM torn down)
  64     bad command line or job description (the field is named)
  69     NATS unreachable, or the bus failed while waiting
  70     internal error (e.g. signal handlers could not be installed)
  78     bad configuration
A payload can itself exit with 125, 130 or 143; stderr says which case it was.";

/// The storage mode a job asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StorageModeArg {
    /// The VO's or the site's choice.
    Site,
    /// sshfs over the VM's private channel to the sftp gateway.
    Sshfs,
    /// An NFSv4 export restricted to the VM's address.
    Nfs,
}

impl From<StorageModeArg> for proto::StorageMode {
    fn from(m: StorageModeArg) -> Self {
        match m {
            StorageModeArg::Site => proto::StorageMode::Unspecified,
            StorageModeArg::Sshfs => proto::StorageMode::Sshfs,
            StorageModeArg::Nfs => proto::StorageMode::Nfs,
        }
    }
}

/// The batch system, for the run key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LrmsArg {
    Unspecified,
    Htcondor,
    Slurm,
    Pbs,
    Lsf,
}

impl From<LrmsArg> for proto::Lrms {
    fn from(l: LrmsArg) -> Self {
        match l {
            LrmsArg::Unspecified => proto::Lrms::Unspecified,
            LrmsArg::Htcondor => proto::Lrms::Htcondor,
            LrmsArg::Slurm => proto::Lrms::Slurm,
            LrmsArg::Pbs => proto::Lrms::Pbs,
            LrmsArg::Lsf => proto::Lrms::Lsf,
        }
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// `submit` options.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct SubmitArgs {
    /// Virtual organisation, e.g. "atlas".
    #[arg(long, default_value = "")]
    pub vo: String,
    /// Local user name the job runs as (default: $USER).
    #[arg(long)]
    pub user: Option<String>,
    /// POSIX uid the job runs as (default: this process's uid).
    #[arg(long)]
    pub uid: Option<u32>,
    /// POSIX gid the job runs as (default: this process's gid).
    #[arg(long)]
    pub gid: Option<u32>,
    /// CPU cores (count; 0 = site default).
    #[arg(long, default_value_t = 0)]
    pub cores: u32,
    /// Memory (MiB; 0 = site default).
    #[arg(long, default_value_t = 0)]
    pub memory_mib: u64,
    /// Local scratch disk (MiB; 0 = site default).
    #[arg(long, default_value_t = 0)]
    pub scratch_mib: u64,
    /// Wall-clock limit (seconds; 0 = site default).
    #[arg(long, default_value_t = 0)]
    pub walltime_secs: u64,
    /// LRMS job id (default: "submit-" and a new UUID).
    #[arg(long)]
    pub job_id: Option<String>,
    /// 1-based run attempt of the job.
    #[arg(long, default_value_t = 1)]
    pub attempt: u32,
    /// The batch system that scheduled the job.
    #[arg(long, value_enum, default_value = "unspecified")]
    pub lrms: LrmsArg,
    /// LRMS queue, partition or pool.
    #[arg(long, default_value = "")]
    pub queue: String,
    /// Image (catalog name); empty = the VO's default.
    #[arg(long, default_value = "")]
    pub image: String,
    /// How the VM reaches the site's shared storage; `site` leaves it to the site's policy
    /// (the launcher refuses a mode its `job_storage_modes` does not allow).
    #[arg(long, value_enum, default_value = "site")]
    pub storage_mode: StorageModeArg,
    /// Hypervisor host the job runs on (default: `host` of the configuration).
    #[arg(long)]
    pub host: Option<String>,
    /// Subject DN of the job's X.509 proxy.
    #[arg(long)]
    pub x509_dn: Option<String>,
    /// VOMS FQAN (repeatable).
    #[arg(long = "fqan")]
    pub fqans: Vec<String>,
    /// Environment variable for the payload, KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the VM.
    #[arg(long, default_value = "")]
    pub workdir: String,
    /// A POSIX sh script to run (sent inline), instead of a command.
    #[arg(long, conflicts_with = "command")]
    pub script: Option<PathBuf>,
    /// Log filter of the job starter itself (`RUST_LOG` wins). It also selects the spans that
    /// are exported: keep `wnodes_bridge=info` for the job's root span.
    #[arg(long, default_value = "warn,wnodes_bridge=info")]
    pub log_level: String,
    /// The command and its arguments, after `--` (run without a shell).
    #[arg(last = true, required_unless_present = "script")]
    pub command: Vec<String>,
}

/// The payload of a command after `--` (run without a shell); the error when there is none.
///
/// # Errors
/// An empty command.
pub fn command_payload(command: &[String]) -> Result<proto::job_payload::Kind, String> {
    match command.split_first() {
        Some((exe, rest)) => Ok(proto::job_payload::Kind::Command(proto::JobCommand {
            executable: exe.clone(),
            args: rest.to_vec(),
        })),
        None => Err("a command after `--`, or --script FILE, is required".into()),
    }
}

/// Builds the job description from the options; errors name the option or field.
pub fn job_description(
    args: &SubmitArgs,
    common: &CommonConfig,
) -> Result<proto::JobDescription, String> {
    let kind = match &args.script {
        Some(path) => proto::job_payload::Kind::InlineScript(
            std::fs::read(path).map_err(|e| format!("--script {}: {e}", path.display()))?,
        ),
        None => command_payload(&args.command)?,
    };
    let job_id = args
        .job_id
        .clone()
        .unwrap_or_else(|| format!("submit-{}", uuid::Uuid::now_v7().simple()));
    let run = proto::JobRunRef {
        site: common.site.clone(),
        lrms: proto::Lrms::from(args.lrms) as i32,
        job_id,
        run_attempt: args.attempt,
    };
    let user = args
        .user
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default();
    let job = proto::JobDescription {
        run: Some(run),
        owner: Some(proto::JobOwner {
            user,
            uid: args.uid.unwrap_or_else(|| nix::unistd::getuid().as_raw()),
            gid: args.gid.unwrap_or_else(|| nix::unistd::getgid().as_raw()),
        }),
        identity: Some(proto::GridIdentity {
            x509_dn: args.x509_dn.clone().unwrap_or_default(),
            voms_fqans: args.fqans.clone(),
            ..Default::default()
        }),
        vo: args.vo.clone(),
        queue: args.queue.clone(),
        resources: Some(proto::ResourceRequest {
            cores: args.cores,
            memory_bytes: args.memory_mib.saturating_mul(1 << 20),
            scratch_bytes: args.scratch_mib.saturating_mul(1 << 20),
            walltime: (args.walltime_secs > 0).then(|| prost_types::Duration {
                seconds: i64::try_from(args.walltime_secs).unwrap_or(i64::MAX),
                nanos: 0,
            }),
        }),
        image_hint: args.image.clone(),
        storage_mode: proto::StorageMode::from(args.storage_mode) as i32,
        host: args.host.clone().unwrap_or_else(|| common.host.clone()),
        payload: Some(proto::JobPayload {
            kind: Some(kind),
            environment: args.env.iter().cloned().collect::<HashMap<_, _>>(),
            working_dir: args.workdir.clone(),
        }),
        submitted_at: None,
    };
    validate::job(Some(&job)).map_err(|e| e.to_string())?;
    Ok(job)
}

fn say(line: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "wnodes-bridge: {line}");
}

/// One progress line for an event of the run.
fn progress(started: Instant, ev: &proto::Event) {
    say(format_args!("{}", progress_line(started, ev)));
}

/// The progress line of an event of the run, `[   1.2s] ImageReady image … (cached)`.
pub fn progress_line(started: Instant, ev: &proto::Event) -> String {
    let t = started.elapsed().as_secs_f64();
    let name = ev.event_type().map(|t| t.name()).unwrap_or("?");
    let detail = match &ev.body {
        Some(Body::ImageReady(i)) => format!(
            " image {} ({})",
            i.image,
            if i.cache_hit { "cached" } else { "fetched" }
        ),
        Some(Body::ImageFailed(f)) => format!(" {}", f.reason),
        Some(Body::ScratchFailed(f)) => format!(" {}", f.reason),
        Some(Body::NetworkReady(n)) => format!(" address {}", n.address),
        Some(Body::NetworkFailed(f)) => format!(" {}", f.reason),
        Some(Body::StorageFailed(f)) => format!(" {}", f.reason),
        Some(Body::VmRunning(r)) => format!(" {} pid {} ({})", r.vm_id, r.pid, r.accel),
        Some(Body::VmStopped(s)) => format!(" exit code {} ({})", s.exit_code, s.stop_reason),
        Some(Body::VmFailed(f)) => format!(" in phase {}: {}", f.phase, f.reason),
        Some(Body::JobCancelled(c)) => format!(" {}", c.reason),
        _ => String::new(),
    };
    format!("[{t:7.1}s] {name}{detail}")
}

/// Writes the payload's output to stdout: the file at `output_location` when this host can read
/// it, else the tail carried in the event.
async fn print_output(stopped: &proto::VmStopped) {
    let location = stopped.output_location.clone();
    let tail = stopped.output_tail.clone();
    let res = tokio::task::spawn_blocking(move || {
        let mut out = std::io::stdout().lock();
        let file = (!location.is_empty())
            .then(|| std::fs::File::open(&location).ok())
            .flatten();
        match file {
            Some(mut f) => std::io::copy(&mut f, &mut out)
                .map(|_| ())
                .map_err(|e| format!("cannot copy the output from {location}: {e}")),
            None => out
                .write_all(tail.as_bytes())
                .map_err(|e| format!("cannot write the output: {e}")),
        }
        .and_then(|()| {
            out.flush()
                .map_err(|e| format!("cannot write the output: {e}"))
        })
    })
    .await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => say(format_args!("{e}")),
        Err(e) => say(format_args!("printing the output failed: {e}")),
    }
}

fn clamp_exit(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(255)
}

/// A started run: what the job starter publishes about it after `JobStarted`.
struct Started {
    bus: Bus,
    run: proto::JobRunRef,
    host: String,
    key: String,
    source: String,
    /// Context of the trace's root span (`bridge.job_started`).
    root: opentelemetry::Context,
    /// The run's root span (`wnodes.run`), ended with the job starter.
    _run_span: opentelemetry::global::BoxedSpan,
}

impl Started {
    /// A span under the job's root span.
    fn span(&self, span: tracing::Span) -> tracing::Span {
        wnodes_bus::propagation::set_parent(&span, self.root.clone());
        span
    }

    async fn cancel(&self, reason: &str) -> Result<(), wnodes_bus::BusError> {
        let ev = job_cancelled_event(self.run.clone(), &self.host, reason, None, &self.source);
        let span = self.span(tracing::info_span!(
            "bridge.job_cancelled",
            otel.kind = "producer"
        ));
        self.bus.publish(&ev).instrument(span).await.map(|_| ())
    }

    async fn finish(&self, code: u8) {
        let ev = job_finished_event(
            self.run.clone(),
            &self.host,
            i32::from(code),
            None,
            &self.source,
        );
        let span = self.span(tracing::info_span!(
            "bridge.job_finished",
            otel.kind = "producer"
        ));
        let publish = self.bus.publish(&ev).instrument(span);
        match tokio::time::timeout(Duration::from_secs(30), publish).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => say(format_args!(
                "cannot publish JobFinished: {}",
                ErrorChain(&e)
            )),
            Err(_) => say(format_args!("publishing JobFinished timed out")),
        }
    }
}

/// Connects and publishes `JobStarted` in the root span of the job's trace. Returns the run and
/// the stream sequence of its `JobStarted`.
async fn start(
    job: proto::JobDescription,
    common: &CommonConfig,
) -> Result<(Started, u64), wnodes_bus::BusError> {
    let run = job.run.clone().unwrap_or_default();
    let host = job.host.clone();
    let key = wnodes_bus::event::run_key(&run);
    let source = format!("bridge@{}", common.host);
    // The job starter is its host's agent (`agent-<host>`): with `nats.creds_dir`, its creds.
    let identity = wnodes_bus::roles::AGENT.identity(&common.host)?;
    let bus = Bus::connect(
        &common.nats.for_identity(&identity),
        &source,
        BusMetrics::unregistered(),
    )
    .await?;
    // As patient as a publish: a NATS cluster that just lost a server answers nothing about
    // the stream until it has elected a new leader.
    bus.check_streams_within(common.nats.publish_timeout)
        .await?;
    // The run's root span (its ids derived from the run key), ended when the job starter is.
    let run_span = wnodes_runtime::telemetry::start_run_span(&key, "wnodes.run");
    let root = tracing::info_span!(
        "bridge.job_started",
        otel.kind = "producer",
        wnodes.run = key.as_str()
    );
    // The run's own trace (derived from its run key): the LRMS's events of the run, published
    // by other processes, land in the same trace.
    wnodes_bus::propagation::set_parent(&root, wnodes_bus::propagation::run_context(&key));
    let event = job_started_event(job, None, &source);
    let (published, trace_id) = async {
        let trace_id = wnodes_bus::propagation::current_trace_id();
        bus.publish(&event).await.map(|p| (p, trace_id))
    }
    .instrument(root.clone())
    .await?;
    say(format_args!(
        "job {key} started on {host} (trace {trace_id})"
    ));
    let root = {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        root.context()
    };
    let started = Started {
        bus,
        run,
        host,
        key,
        source,
        root,
        _run_span: run_span,
    };
    Ok((started, published.sequence))
}

/// What the job starter reports for how the run ended; returns the exit code.
async fn report(key: &str, ending: &Ending, cancelled_by: Option<u8>) -> u8 {
    match ending {
        Ending::Stopped(s) => {
            print_output(s).await;
            let code = cancelled_by.unwrap_or_else(|| clamp_exit(s.exit_code));
            let note = if cancelled_by.is_some() {
                " (cancelled)"
            } else {
                ""
            };
            say(format_args!(
                "run {key}: payload exited with code {} ({}); exit code {code}{note}",
                s.exit_code, s.stop_reason
            ));
            code
        }
        Ending::Failed(f) => {
            let code = cancelled_by.unwrap_or(EXIT_VM_FAILED);
            say(format_args!(
                "run {key}: VM failed in phase {}: {}; exit code {code}",
                f.phase, f.reason
            ));
            code
        }
    }
}

/// SIGTERM and SIGINT, which cancel a job instead of killing its starter (`submit` and
/// `job-starter`).
///
/// # Errors
/// The handlers cannot be installed.
pub fn cancel_signals()
-> std::io::Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    Ok((
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    ))
}

/// Runs the job starter; returns the process exit code.
pub async fn run(args: SubmitArgs, common: &CommonConfig) -> u8 {
    // Signal handlers first: a signal from now on cancels the job instead of killing us (one
    // that arrives while starting is handled once the job has started).
    let (mut term, mut int) = match crate::submit::cancel_signals() {
        Ok(s) => s,
        Err(e) => {
            say(format_args!("cannot install signal handlers: {e}"));
            return wnodes_runtime::exit::SOFTWARE;
        }
    };
    let job = match job_description(&args, common) {
        Ok(j) => j,
        Err(e) => {
            say(format_args!("{e}"));
            return wnodes_runtime::exit::USAGE;
        }
    };
    if let Err(e) = wnodes_bus::subject::validate_host(&job.host) {
        say(format_args!("{}", ErrorChain(&e)));
        return wnodes_runtime::exit::USAGE;
    }
    let job_host = job.host.clone();
    let t0 = Instant::now();
    let (started, seq) = match start(job, common).await {
        Ok(s) => s,
        Err(e) => {
            say(format_args!("cannot start the job: {}", ErrorChain(&e)));
            return wnodes_runtime::exit::UNAVAILABLE;
        }
    };
    let key = started.key.clone();
    let wait = watch::run_outcome(
        &started.bus,
        &job_host,
        watch::From::Sequence(seq),
        &key,
        |ev| progress(t0, ev),
    );
    tokio::pin!(wait);
    let mut cancelled_by: Option<u8> = None;
    let outcome = loop {
        let (sig, name) = tokio::select! {
            res = &mut wait => break res,
            _ = term.recv() => (EXIT_SIGTERM, "SIGTERM"),
            _ = int.recv() => (EXIT_SIGINT, "SIGINT"),
        };
        if cancelled_by.is_some() {
            say(format_args!(
                "{name} again: not waiting for the VM's teardown of {key}"
            ));
            return sig;
        }
        cancelled_by = Some(sig);
        say(format_args!(
            "{name}: cancelling {key}; waiting for the VM's teardown"
        ));
        if let Err(e) = started
            .cancel(&format!("{name} received by the job starter"))
            .await
        {
            say(format_args!(
                "cannot publish JobCancelled: {}",
                ErrorChain(&e)
            ));
            return sig;
        }
    };
    let code = match outcome {
        Ok(o) => report(&key, &o.ending, cancelled_by).await,
        Err(e) => {
            say(format_args!("lost track of {key}: {}", ErrorChain(&e)));
            // Nobody would wait for the VM: cancel it rather than leave it running.
            if cancelled_by.is_none()
                && let Err(e) = started
                    .cancel("the job starter lost track of the run")
                    .await
            {
                say(format_args!(
                    "cannot publish JobCancelled: {}",
                    ErrorChain(&e)
                ));
            }
            return cancelled_by.unwrap_or(wnodes_runtime::exit::UNAVAILABLE);
        }
    };
    started.finish(code).await;
    started.bus.flush().await;
    code
}
