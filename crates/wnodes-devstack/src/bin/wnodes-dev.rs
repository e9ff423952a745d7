//! `wnodes-dev demo`: the whole stack on this machine and one batch job through it.
//! `wnodes-dev up` / `down`: the same stack kept running until `down` stops it and checks
//! nothing was left behind (`up` prints how to submit jobs, point `wnodesctl` at it and where
//! each service's `/metrics` is; `--usage-exporter` adds `wnodes-usage`).
//!
//! As root it enters a private network namespace first (tap networking, the nftables filter,
//! the gateway on the bridge address); otherwise it uses qemu user-mode networking and says so.
//! Prints the job's output, the per-phase timeline, the exit code, the usage record and the file
//! the job wrote through the gateway; exits non-zero if anything failed.
//!
//! With `--otlp-endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) every service exports its spans
//! there; in the private namespace they go through an [`wnodes_devstack::OtlpRelay`] to the
//! host's namespace, so a receiver on the host's loopback gets the job's whole trace.

use std::{os::unix::fs::MetadataExt, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use wnodes_devstack::{
    HostNetns, NetworkChoice, Stack, StackOptions, SubmitArgs, SubmitOutcome, slurm, timeline,
};

#[derive(Debug, Parser)]
#[command(
    name = "wnodes-dev",
    version,
    about = "Run the WNoDeS stack on this machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the stack, run one job through it, print what happened, clean up.
    Demo {
        /// Keep the work dir (config, logs, state) instead of deleting it.
        #[arg(long)]
        keep: bool,
        /// Work dir (default: a new directory under /tmp).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// OTLP/gRPC endpoint on this host that every service exports its spans to, e.g.
        /// http://127.0.0.1:4317 (as root: http://HOST:PORT, relayed out of the private network
        /// namespace). Default: none, spans are not exported.
        #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
        otlp_endpoint: Option<String>,
        /// Submit the job with `sbatch` to the Slurm cluster `SLURM_CONF` names
        /// (`scripts/slurm-cluster.sh`), whose job_submit.lua hands it to the WNoDeS job
        /// starter; print the Slurm job id and `sacct`'s line. The stack then uses qemu user-mode
        /// networking in this network namespace, where slurmd runs its jobs.
        #[arg(long)]
        slurm: bool,
    },
    /// Start the stack and keep it running (in the foreground) until `down` or Ctrl-C.
    Up {
        /// Work dir (config, logs, state, `wnodes-dev.json`).
        #[arg(long, default_value = DEFAULT_UP_DIR)]
        work_dir: PathBuf,
        /// OTLP/gRPC endpoint for every service's spans (as for `demo`).
        #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
        otlp_endpoint: Option<String>,
        /// Also run the usage exporter (`wnodes-usage`: usage counters per VO on `/metrics`).
        #[arg(long)]
        usage_exporter: bool,
    },
    /// Stop the stack `up` started and say whether anything was left behind.
    Down {
        #[arg(long, default_value = DEFAULT_UP_DIR)]
        work_dir: PathBuf,
    },
}

/// Where `up` keeps its stack, and `down` finds it.
const DEFAULT_UP_DIR: &str = "/tmp/wnodes-dev";
/// What `up` writes for `down` and for tools: its pid, NATS, the config and the creds.
const UP_FILE: &str = "wnodes-dev.json";
/// What `up` writes when it stopped: `nothing left behind` or what was.
const DOWN_FILE: &str = "wnodes-dev.down";

const PAYLOAD: &str =
    "echo \"hello from $(hostname)\" > /shared/hello.txt; cat /shared/hello.txt; exit 0\n";

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Demo {
            keep,
            work_dir,
            otlp_endpoint,
            slurm,
        } => run_demo(keep, work_dir, otlp_endpoint, slurm),
        Cmd::Up {
            work_dir,
            otlp_endpoint,
            usage_exporter,
        } => run_up(work_dir, otlp_endpoint, usage_exporter),
        Cmd::Down { work_dir } => down(&work_dir),
    }
}

/// What `demo` and `up` share: the network choice (entering the private namespace as root,
/// before any thread exists, unless `stay_in_host_netns`), the runtime and where spans go.
fn prepare(
    otlp_endpoint: Option<String>,
    stay_in_host_netns: bool,
) -> Result<(NetworkChoice, Otlp, tokio::runtime::Runtime), ExitCode> {
    // An empty OTEL_EXPORTER_OTLP_ENDPOINT means none.
    let otlp_endpoint = otlp_endpoint.filter(|e| !e.trim().is_empty());
    let root = nix::unistd::geteuid().is_root() && !stay_in_host_netns;
    // As root the endpoint is relayed: check it before starting anything.
    if root
        && let Some(e) = &otlp_endpoint
        && let Err(err) = wnodes_devstack::otlp_relay::parse_http_endpoint(e)
    {
        eprintln!("wnodes-dev: {err:#}");
        return Err(ExitCode::from(2));
    }
    // Before any thread exists: unshare(CLONE_NEWNET) moves only the calling thread.
    let mut host_netns = None;
    let network = if root {
        match wnodes_devstack::enter_private_netns() {
            Ok(host) => host_netns = Some(Arc::new(host)),
            Err(e) => {
                eprintln!("wnodes-dev: {e:#}");
                return Err(ExitCode::FAILURE);
            }
        }
        println!(
            "== running as root: private network namespace, tap networking on wnbr0 (10.231.1.1/24)"
        );
        NetworkChoice::Tap
    } else if stay_in_host_netns {
        println!(
            "== Slurm: qemu user-mode networking in this network namespace, where slurmd runs its jobs (no taps, no nftables filter; the gateway listens on 127.0.0.1)"
        );
        NetworkChoice::User
    } else {
        println!(
            "== not root: qemu user-mode networking (no taps, no nftables filter; the gateway listens on 127.0.0.1)"
        );
        NetworkChoice::User
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wnodes-dev: async runtime: {e}");
            return Err(ExitCode::FAILURE);
        }
    };
    match (&otlp_endpoint, &host_netns) {
        (Some(e), Some(_)) => println!(
            "== spans: every service exports to {e} (relayed out of the private network namespace)"
        ),
        (Some(e), None) => println!("== spans: every service exports to {e}"),
        (None, _) => println!(
            "== spans: not exported (set OTEL_EXPORTER_OTLP_ENDPOINT or --otlp-endpoint to see the trace)"
        ),
    }
    let otlp = Otlp {
        endpoint: otlp_endpoint,
        netns: host_netns,
    };
    Ok((network, otlp, rt))
}

fn run_demo(
    keep: bool,
    work_dir: Option<PathBuf>,
    otlp_endpoint: Option<String>,
    slurm: bool,
) -> ExitCode {
    let (network, otlp, rt) = match prepare(otlp_endpoint, slurm) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let work = match work_dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("wnodes-demo-{}", std::process::id())),
    };
    let result = rt.block_on(demo(work.clone(), network, otlp, slurm));
    let failed = !matches!(result, Ok(true));
    if keep || failed {
        println!(
            "== work dir kept: {} (config wnodes.toml, logs/, state/)",
            work.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    match result {
        Ok(true) => {
            println!("== demo OK");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("== demo FAILED (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("wnodes-dev: {e:#}");
            println!("== demo FAILED");
            ExitCode::FAILURE
        }
    }
}

fn run_up(work: PathBuf, otlp_endpoint: Option<String>, usage_exporter: bool) -> ExitCode {
    if let Some(pid) = up_pid(&work)
        && alive(pid)
    {
        eprintln!(
            "wnodes-dev: a stack is already up in {} (pid {pid}); `wnodes-dev down --work-dir {}` stops it",
            work.display(),
            work.display()
        );
        return ExitCode::FAILURE;
    }
    let _ = std::fs::remove_dir_all(&work);
    let (network, otlp, rt) = match prepare(otlp_endpoint, false) {
        Ok(p) => p,
        Err(code) => return code,
    };
    match rt.block_on(up(work, network, otlp, usage_exporter)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("wnodes-dev: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The pid `up` recorded in `work`.
fn up_pid(work: &std::path::Path) -> Option<i32> {
    let text = std::fs::read_to_string(work.join(UP_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["pid"].as_i64().and_then(|p| i32::try_from(p).ok())
}

/// Whether `pid` still runs: exists and is not a zombie (an `up` whose parent has not reaped it
/// yet has stopped).
fn alive(pid: i32) -> bool {
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Starts the stack, says how to use it, and waits for SIGTERM/SIGINT; then stops the
/// services, checks what was left behind (in this process: as root the stack's network
/// namespace is this thread's), writes [`DOWN_FILE`] and stops nats-server.
async fn up(
    work: PathBuf,
    network: NetworkChoice,
    otlp: Otlp,
    usage_exporter: bool,
) -> anyhow::Result<bool> {
    use anyhow::Context;
    let mut opts = StackOptions::new(&work);
    opts.network = network;
    opts.usage_exporter = usage_exporter;
    opts.otlp_netns = otlp.endpoint.is_some().then_some(otlp.netns).flatten();
    opts.otlp_endpoint = otlp.endpoint;
    run_jobs_as_the_caller_unless_root(&mut opts);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut stack = Stack::start(opts).await?;
    let admin = stack.nats_admin();
    let monitor = stack.nats_monitor();
    let path = |p: Option<&std::path::Path>| p.map(|p| p.display().to_string());
    // As root everything listens inside the stack's network namespace: reach it with nsenter.
    let netns = (network == NetworkChoice::Tap)
        .then(|| stack.nats_pid().map(|p| format!("/proc/{p}/ns/net")))
        .flatten();
    // Each service's `/metrics` (and `/readyz`), by service name.
    let metrics: serde_json::Map<String, serde_json::Value> = stack
        .services()
        .iter()
        .filter_map(|s| Some(((*s).to_owned(), stack.http_addr(s)?.to_string().into())))
        .collect();
    let info = serde_json::json!({
        "pid": std::process::id(),
        "nats_url": admin.url,
        "config": stack.config_path(),
        "admin_creds": path(admin.creds_file.as_deref()),
        "monitor_creds": path(monitor.creds_file.as_deref()),
        "agent_creds": path(stack.creds("agent")),
        "netns": netns,
        "grpc_addr": stack.grpc_addr().to_string(),
        "bin_dir": stack.bin("x").parent(),
        "metrics": metrics,
    });
    let info_path = work.join(UP_FILE);
    std::fs::write(&info_path, serde_json::to_vec_pretty(&info)?)
        .with_context(|| format!("writing {}", info_path.display()))?;
    let enter = netns
        .as_deref()
        .map_or(String::new(), |n| format!("nsenter --net={n} "));
    let bin = stack
        .bin("x")
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    println!(
        "== stack up (pid {}): nats {}",
        std::process::id(),
        admin.url
    );
    println!("   config:  {}", stack.config_path().display());
    println!("   details: {}", info_path.display());
    println!(
        "   metrics: {}",
        metrics
            .iter()
            .map(|(s, a)| format!("{s} http://{}/metrics", a.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let o = stack.options();
    println!(
        "   submit:  {enter}env WNODES_CONFIG={} WNODES_NATS__CREDS_FILE={} {bin}/wnodes-bridge submit --vo {} --user {} --uid {} --gid {} --job-id J1 -- /bin/echo hello",
        stack.config_path().display(),
        path(stack.creds("agent")).unwrap_or_default(),
        o.vo,
        o.job_user,
        o.job_uid,
        o.job_gid
    );
    println!(
        "   wnodesctl: {enter}{bin}/wnodesctl dlq --nats {} --creds {} list",
        admin.url,
        path(admin.creds_file.as_deref()).unwrap_or_default()
    );
    println!(
        "              {enter}{bin}/wnodesctl backlog --nats {} --creds {}",
        monitor.url,
        path(monitor.creds_file.as_deref()).unwrap_or_default()
    );
    println!("   stop:    wnodes-dev down --work-dir {}", work.display());
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
    println!("== stopping the services");
    stack.stop_services();
    // What a job's release would have removed; give late releases a moment (none should be
    // running: services are stopped).
    let left = stack.leftovers();
    let verdict = if left.is_empty() {
        "nothing left behind (scratch, taps, nft chains, listeners, sftp-server, qemu)".to_owned()
    } else {
        format!("left behind: {left:?}")
    };
    drop(stack);
    std::fs::write(work.join(DOWN_FILE), &verdict)
        .with_context(|| format!("writing {}", work.join(DOWN_FILE).display()))?;
    let _ = std::fs::remove_file(&info_path);
    println!("== {verdict}");
    println!("== stack stopped");
    Ok(left.is_empty())
}

/// Signals `up` and waits for it to stop; prints its verdict.
fn down(work: &std::path::Path) -> ExitCode {
    let Some(pid) = up_pid(work) else {
        eprintln!(
            "wnodes-dev: no stack is up in {} (no {UP_FILE})",
            work.display()
        );
        return ExitCode::FAILURE;
    };
    let _ = std::fs::remove_file(work.join(DOWN_FILE));
    if let Err(e) = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    ) {
        eprintln!("wnodes-dev: signalling {pid}: {e}");
        return ExitCode::FAILURE;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while alive(pid) {
        if std::time::Instant::now() >= deadline {
            eprintln!("wnodes-dev: the stack (pid {pid}) did not stop within 120 s");
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match std::fs::read_to_string(work.join(DOWN_FILE)) {
        Ok(verdict) => {
            println!("== {verdict}");
            if verdict.starts_with("nothing left behind") {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!(
                "wnodes-dev: the stack stopped without its verdict ({}: {e}); see its output",
                work.join(DOWN_FILE).display()
            );
            ExitCode::FAILURE
        }
    }
}

/// Where the services' spans go, and the namespace that endpoint is reached from.
struct Otlp {
    endpoint: Option<String>,
    netns: Option<Arc<HostNetns>>,
}

/// Without root the gateway cannot switch to another uid: jobs run as the caller.
fn run_jobs_as_the_caller_unless_root(opts: &mut StackOptions) {
    if nix::unistd::geteuid().is_root() {
        return;
    }
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    opts.job_uid = uid.as_raw();
    opts.job_gid = gid.as_raw();
    opts.job_user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string());
    println!(
        "   the job runs as the caller ({}, uid {uid}): without root the gateway cannot switch users",
        opts.job_user
    );
}

/// Runs `wnodes-accounting apel-export` (the real CLI, with the stack's config) on the
/// accounting store for today and tomorrow (UTC) into `$TMPDIR/wnodes-demo-apel-<job id>`.
/// Returns the store's URL, the queue directory and the number of messages in it.
fn apel_export(stack: &Stack, job_id: &str) -> anyhow::Result<(String, PathBuf, usize)> {
    use anyhow::Context;
    let store = stack.state_dir("accounting").join("accounting.db");
    let out = std::env::temp_dir().join(format!("wnodes-demo-apel-{job_id}"));
    let day = 86_400;
    let today = wnodes_proto::time::now_secs() / day * day;
    let date = |secs: i64| -> anyhow::Result<String> {
        let t = time::OffsetDateTime::from_unix_timestamp(secs)?;
        Ok(format!(
            "{:04}-{:02}-{:02}",
            t.year(),
            u8::from(t.month()),
            t.day()
        ))
    };
    let status = std::process::Command::new(stack.bin("accounting"))
        .arg("--config")
        .arg(stack.config_path())
        .env("WNODES_LOG_LEVEL", "warn")
        .arg("apel-export")
        .arg("--store")
        .arg(&store)
        .args(["--from", &date(today)?, "--to", &date(today + day)?])
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running wnodes-accounting apel-export")?;
    anyhow::ensure!(status.success(), "wnodes-accounting apel-export: {status}");
    // The dirq QueueSimple layout: one file per message in 8-hex-digit directories.
    let mut messages = 0;
    for dir in std::fs::read_dir(&out).with_context(|| format!("reading {}", out.display()))? {
        let dir = dir?;
        if dir.file_type()?.is_dir() && !dir.file_name().to_string_lossy().starts_with('.') {
            messages += std::fs::read_dir(dir.path())?
                .filter_map(Result::ok)
                .filter(|f| f.file_type().is_ok_and(|t| t.is_file()))
                .filter(|f| {
                    let n = f.file_name().to_string_lossy().into_owned();
                    !n.ends_with(".tmp") && !n.ends_with(".lck")
                })
                .count();
        }
    }
    Ok((format!("sqlite://{}", store.display()), out, messages))
}

/// The demo's job through Slurm: `sbatch` (as the job user), the Slurm job id, `sacct`'s final
/// line; the output file's progress lines as the job starter's, the rest as the payload's.
async fn slurm_job(stack: &Stack) -> anyhow::Result<SubmitOutcome> {
    println!(
        "== sbatch --account={} <payload> (SLURM_CONF={}; job_submit.lua hands the script to the WNoDeS job starter)",
        stack.options().vo,
        std::env::var("SLURM_CONF").unwrap_or_default()
    );
    let t = std::time::Instant::now();
    let dir = stack.options().work_dir.join("slurm");
    let job = stack.sbatch(&dir, "demo.sh", &format!("#!/bin/sh\n{PAYLOAD}"))?;
    println!("== Slurm job id: {}", job.id);
    let line = slurm::sacct_final(&job.id, Duration::from_secs(300)).await?;
    println!("sacct: {line}");
    let text = std::fs::read_to_string(&job.output).unwrap_or_default();
    let progress =
        |l: &&str| l.starts_with("wnodes-bridge: ") || l.starts_with("wnodes-slurm-job-starter: ");
    let join = |lines: Vec<&str>| lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    Ok(SubmitOutcome {
        exit_code: slurm::exit_code(&line).unwrap_or(-1),
        stdout: join(text.lines().filter(|l| !progress(l)).collect()),
        stderr: join(text.lines().filter(progress).collect()),
        wall: t.elapsed(),
        run_key: job.run_key,
    })
}

async fn demo(
    work: PathBuf,
    network: NetworkChoice,
    otlp: Otlp,
    slurm: bool,
) -> anyhow::Result<bool> {
    let mut opts = StackOptions::new(&work);
    opts.network = network;
    opts.otlp_netns = otlp.endpoint.is_some().then_some(otlp.netns).flatten();
    opts.otlp_endpoint = otlp.endpoint;
    run_jobs_as_the_caller_unless_root(&mut opts);
    // Slurm's job starters talk to the host agent: they hold no NATS credentials. The stack's
    // host is the Slurm node's name, and the bridge reads Slurm's own records of the job.
    opts.host_agent = slurm;
    if slurm {
        opts.host = slurm::node_name();
        opts.slurm_events = slurm::jobcomp_spool();
    }
    println!(
        "== starting nats-server and 7 services{} (logs: {}/logs)",
        if slurm { " and the host agent" } else { "" },
        work.display()
    );
    let t = std::time::Instant::now();
    let stack = Stack::start(opts).await?;
    println!("   ready in {:.1} s", t.elapsed().as_secs_f64());
    let job_id = format!("demo-{}", std::process::id());
    if !slurm {
        println!("== wnodes-bridge submit --vo demo --job-id {job_id} --script <payload>");
    }
    for l in PAYLOAD.lines() {
        println!("   payload: {l}");
    }
    let mut args = SubmitArgs::script(&job_id, PAYLOAD);
    args.timeout = Duration::from_secs(300);
    // While the job runs: how its qemu and its gateway's sftp-server are confined.
    let watch_dir = stack.options().work_dir.clone();
    let private_netns = network == NetworkChoice::Tap;
    let (stop_watch, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let mut seen: Vec<wnodes_devstack::leftovers::Confined> = Vec::new();
        loop {
            // The last sample of each process counts: the first may be taken between qemu's
            // exec and its installing the seccomp filter (`-sandbox` is applied during its
            // start-up).
            for c in wnodes_devstack::leftovers::confinement(&watch_dir, private_netns) {
                match seen.iter_mut().find(|s| s.pid == c.pid) {
                    Some(s) => *s = c,
                    None => seen.push(c),
                }
            }
            tokio::select! {
                _ = &mut stopped => return seen,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    let out = if slurm {
        slurm_job(&stack).await
    } else {
        stack.submit(&args).await
    };
    let _ = stop_watch.send(());
    let seen = watcher.await.unwrap_or_default();
    let out = out?;
    // The run the events and the usage record are looked up by: a job id's attempt 1, or the
    // Slurm job's run key.
    let run = if slurm {
        out.run_key.clone()
    } else {
        job_id.clone()
    };
    println!("== job starter progress (stderr):");
    for l in out.stderr.lines() {
        println!("   {l}");
    }
    println!("== job output (stdout):");
    for l in out.stdout.lines() {
        println!("   {l}");
    }
    println!(
        "== exit code: {} ({} took {:.1} s)",
        out.exit_code,
        if slurm {
            "sbatch to sacct's final state"
        } else {
            "submit"
        },
        out.wall.as_secs_f64()
    );
    let mut ok = out.exit_code == 0;
    println!("== confinement (seen while the job ran):");
    for c in &seen {
        println!(
            "   {} pid {}: uid {}, seccomp {}, no_new_privs {}, root {}",
            c.what,
            c.pid,
            c.uid,
            c.seccomp,
            u8::from(c.no_new_privs),
            c.root
        );
    }
    let qemus: Vec<_> = seen.iter().filter(|c| c.what.starts_with("qemu")).collect();
    let sftp: Vec<_> = seen.iter().filter(|c| c.what == "sftp-server").collect();
    if nix::unistd::geteuid().is_root() {
        // As root, each qemu has a uid of its own and a seccomp filter; each sftp-server runs
        // as the job's uid in its jail.
        let confined = !qemus.is_empty()
            && qemus
                .iter()
                .all(|c| c.uid != 0 && c.seccomp == 2 && c.no_new_privs)
            && !sftp.is_empty()
            && sftp.iter().all(|c| c.uid != 0 && c.root != "/");
        if !confined {
            println!("   NOT CONFINED as expected");
        }
        ok &= confined;
    }

    // Accounting records after vm.stopped; give it a moment.
    let mut records = Vec::new();
    for _ in 0..100 {
        records = stack.usage_record(&run).await?;
        if !records.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = stack.run_events(&run).await?;
    println!(
        "== timeline ({} events of run {}):",
        events.len(),
        out.run_key
    );
    for p in timeline(&events) {
        println!("   {:<40} {:>8.3} s", p.name, p.duration.as_secs_f64());
    }
    match records.as_slice() {
        [r] => {
            println!("== usage record:");
            println!(
                "   run {}  vm {}  vo {}  user {} ({}:{})",
                r.run_key,
                r.vm_id,
                r.vo,
                r.user_name,
                r.uid.unwrap_or(-1),
                r.gid.unwrap_or(-1)
            );
            println!(
                "   cores {}  cpu {:.2} s  wall {:.2} s  peak memory {:.1} MiB  exit {}  stop {}",
                r.cores,
                r.cpu_seconds,
                r.wall_seconds,
                r.peak_memory_bytes as f64 / 1048576.0,
                r.exit_code,
                r.stop_reason
            );
        }
        other => {
            println!("== usage record: expected 1, found {}", other.len());
            ok = false;
        }
    }
    // The demo's records, exported as APEL would receive them, into a directory that outlives
    // the demo.
    match apel_export(&stack, &job_id) {
        Ok((store, out, messages)) => {
            println!("== usage store: {store} (in the work dir: `--keep` keeps it)");
            println!(
                "== apel outgoing: {} ({messages} messages: job, summary, cloud, sync)",
                out.display()
            );
            if messages == 0 {
                ok = false;
            }
        }
        Err(e) => {
            println!("== apel export failed: {e:#}");
            ok = false;
        }
    }
    let file = stack.export_dir().join("hello.txt");
    match std::fs::metadata(&file) {
        Ok(m) => {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            println!(
                "== on the host: {} owned by {}:{} (the job's uid:gid): {}",
                file.display(),
                m.uid(),
                m.gid(),
                text.trim_end()
            );
            if m.uid() != stack.options().job_uid {
                println!("   but the job uid is {}", stack.options().job_uid);
                ok = false;
            }
        }
        Err(e) => {
            println!("== on the host: {} missing: {e}", file.display());
            ok = false;
        }
    }
    // Resources are released after vm.stopped; wait briefly, then check.
    let mut left = stack.leftovers();
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = stack.leftovers();
    }
    if left.is_empty() {
        println!(
            "== nothing left behind (scratch, taps, nft chains, listeners, sftp-server, qemu)"
        );
    } else {
        println!("== left behind: {left:?}");
        ok = false;
    }
    drop(stack);
    println!("== stack stopped");
    Ok(ok)
}
