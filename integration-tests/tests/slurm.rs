//! A real Slurm drives WNoDeS (issue 9, items 1, 2 and 5; `docs/slurm.md`,
//! `docs/host-agent.md`): ordinary `sbatch` jobs, submitted by an unprivileged user (uid 65534)
//! to the private one-node Slurm 22.05 cluster of `scripts/slurm-cluster.sh`, run inside WNoDeS
//! VMs because the cluster's `job_submit/lua` filter (`slurm/job_submit.lua`) hands each script,
//! unchanged, to the job starter (`slurm/wnodes-slurm-job-starter`, i.e. `wnodes-bridge
//! job-starter`), which sends it to the stack's host agent (`wnodes-agent`) over its unix
//! socket. The agent asks Slurm whose job the starter's process is. `sacct` then shows each
//! payload's exit code as its job's: `COMPLETED|0:0` and `FAILED|3:0`; each job's output file
//! holds what the payload printed inside the VM (the guest's kernel and its WNoDeS kernel command
//! line); each run has one usage record under its Slurm run key; the stack leaves nothing behind.
//! `scancel` stops a running job's VM; `scontrol requeue` makes a new run attempt with a usage
//! record of its own; a job starter killed with SIGKILL takes its VM with it. A job starter as
//! user A cannot start a VM as another user or for another job, nor reach NATS.
//!
//! The cluster is not started here: the test needs `SLURM_CONF` naming a running cluster's
//! config (`scripts/test.sh` starts one per run and exports it; by hand: `scripts/slurm-cluster.sh
//! start` and `eval "$(scripts/slurm-cluster.sh env)"`). Without it the test is skipped, or
//! fails naming what is missing under `WNODES_HOST_TESTS=required` (as `scripts/test.sh` runs
//! it). slurmd runs its jobs in the host's network namespace, so the stack runs there too, with
//! qemu user-mode networking (no taps), unlike the other whole-job tests.
//!
//! The job's environment names only the agent's socket: no NATS credentials, no WNoDeS
//! configuration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failure is a test failure

use std::{process::Command, time::Duration};

use wnodes_bus::EventType;
use wnodes_devstack::{
    NetworkChoice, Stack, StackOptions,
    slurm::{output as run, sacct_final},
};
use wnodes_integration_tests::jobs::{no_leftovers, one_usage_record};
use wnodes_testkit::{
    host::{self, Precondition},
    host_test,
    vm::JOB_NEEDS,
    wait_until,
};

/// The job's user: `nobody`, as in the other whole-job tests.
const JOB_UID: u32 = 65534;

/// From `sbatch` to a final state in `sacct`: scheduling, a VM boot under TCG on a loaded
/// 2-core machine, and slurmctld's record reaching slurmdbd.
const SLURM_TIMEOUT: Duration = Duration::from_secs(300);

/// Slurm's `KillWait` (default, as `scripts/slurm-cluster.sh` leaves it): how long after the
/// SIGTERM of a cancel slurmstepd waits before it SIGKILLs the job's processes.
const KILL_WAIT: Duration = Duration::from_secs(30);

const SLURM_CLUSTER: &str = "a running Slurm cluster with WNoDeS's job_submit.lua, named by SLURM_CONF \
     (scripts/slurm-cluster.sh start; eval \"$(scripts/slurm-cluster.sh env)\"; scripts/test.sh does both)";

/// `Ok` when `SLURM_CONF` names a config with the WNoDeS filter and slurmctld answers with an
/// available node; otherwise what is missing, and how to get it.
fn slurm_cluster() -> Result<(), String> {
    check_slurm_cluster().map_err(|e| format!("{SLURM_CLUSTER}: {e}"))
}

fn check_slurm_cluster() -> Result<(), String> {
    let conf = std::env::var("SLURM_CONF").map_err(|_| "SLURM_CONF is not set".to_owned())?;
    let text = std::fs::read_to_string(&conf).map_err(|e| format!("SLURM_CONF={conf}: {e}"))?;
    if !text.lines().any(|l| l.trim() == "JobSubmitPlugins=lua") {
        return Err(format!("{conf} has no JobSubmitPlugins=lua"));
    }
    let (ok, out) = run(Command::new("scontrol").arg("ping"));
    if !ok || !out.contains("is UP") {
        return Err(format!("scontrol ping: {}", out.trim()));
    }
    let (ok, out) = run(Command::new("sinfo").args(["-h", "-o", "%T"]));
    if !ok || !out.lines().any(|l| matches!(l.trim(), "idle" | "mixed")) {
        return Err(format!("no idle node in sinfo: {}", out.trim()));
    }
    Ok(())
}

const NEEDS: &[Precondition] = &{
    let mut all = [Precondition::Other(SLURM_CLUSTER, slurm_cluster); JOB_NEEDS.len() + 1];
    let mut i = 0;
    while i < JOB_NEEDS.len() {
        all[i] = JOB_NEEDS[i];
        i += 1;
    }
    all
};

/// A stack as the Slurm jobs need it: in the host's network namespace, where slurmd runs
/// them, so with qemu user-mode networking.
async fn slurm_stack(work: &std::path::Path) -> Stack {
    Stack::start(slurm_options(work)).await.unwrap()
}

/// The options of a stack Slurm drives: in the host's network namespace (user-mode
/// networking), with its host agent, the Slurm node's name as its host, the cluster's jobcomp
/// spool followed and its pending jobs polled.
fn slurm_options(work: &std::path::Path) -> StackOptions {
    // The job's user reaches its job directory and the agent's socket under `work`.
    std::fs::set_permissions(work, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut opts = StackOptions::new(work.join("stack"));
    opts.network = NetworkChoice::User;
    opts.host_agent = true;
    opts.host = wnodes_devstack::slurm::node_name();
    opts.slurm_events = wnodes_devstack::slurm::jobcomp_spool();
    opts
}

/// A stack and a job whose payload sleeps 300 s, once its VM runs.
async fn sleeping_job(work: &std::path::Path, name: &str) -> (Stack, wnodes_devstack::SlurmJob) {
    let stack = slurm_stack(work).await;
    let job = stack
        .sbatch(
            &work.join("jobs"),
            name,
            "#!/bin/sh\necho payload started\nsleep 300\n",
        )
        .unwrap();
    wait_vm_running(&stack, &job.run_key).await;
    (stack, job)
}

/// Waits until the VM of run `run_key` runs.
async fn wait_vm_running(stack: &Stack, run_key: &str) {
    wait_until(SLURM_TIMEOUT, &format!("the VM of {run_key}"), || async {
        stack
            .run_events(run_key)
            .await
            .ok()?
            .iter()
            .any(|e| e.event_type == EventType::VmRunning)
            .then_some(())
    })
    .await
    .unwrap();
}

/// The payload: what it prints can only come from inside a WNoDeS VM (the guest's kernel, and
/// the `wnodes.*` parameters the launcher puts on its kernel command line). It also holds a
/// line equal to the filter's default here-document delimiter, inside a quoted here-document of
/// its own, and the last script has no final newline: the script must reach the VM unchanged.
fn job_script(code: i32) -> String {
    let script = format!(
        "#!/bin/sh\n#SBATCH --job-name=wnodes-exit-{code}\n\
         echo \"in the VM: kernel $(uname -r)\"\n\
         echo \"in the VM: cmdline $(cat /proc/cmdline)\"\n\
         echo \"in the VM: uid $(id -u)\"\n\
         echo \"from job $SLURM_JOB_ID\" > /shared/slurm-exit-{code}.txt\n\
         cat <<'WNODES_PAYLOAD_EOF'\n\
         unchanged: $HOME `stays` \\as written\n\
         WNODES_PAYLOAD_EOF\n\
         exit {code}\n"
    );
    if code == 0 {
        script
    } else {
        script.trim_end().to_owned()
    }
}

async fn vm_sbatch_jobs_run_in_wnodes_vms_and_sacct_shows_the_payloads_exit_codes() {
    let work = tempfile::tempdir().unwrap();
    let stack = slurm_stack(work.path()).await;

    // sbatch as uid 65534; the job's environment names only the host agent's socket.
    let jobs_dir = work.path().join("jobs");
    let mut jobs = Vec::new();
    for code in [0, 3] {
        let job = stack
            .sbatch(&jobs_dir, &format!("exit-{code}.sh"), &job_script(code))
            .unwrap();
        eprintln!("Slurm job {}: exit {code}", job.id);
        jobs.push((job, code));
    }

    let host_kernel = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned();
    for (job, code) in &jobs {
        let id = &job.id;
        let line = sacct_final(id, SLURM_TIMEOUT).await.unwrap();
        let out = std::fs::read_to_string(&job.output)
            .unwrap_or_else(|e| panic!("{}: {e}", job.output.display()));
        eprintln!("sacct: {line}\n--- slurm-{id}.out:\n{out}");
        let want = if *code == 0 {
            format!("{id}|COMPLETED|0:0")
        } else {
            format!("{id}|FAILED|{code}:0")
        };
        assert_eq!(line, want, "{out}");

        // The agent saw the job as Slurm describes it, and the payload ran in the VM.
        let run_key = &job.run_key;
        assert_eq!(run_key, &format!("WNODES-DEV/slurm/{id}/1"));
        assert!(
            out.contains(&format!(
                "job {run_key} of nobody ({JOB_UID}:{JOB_UID}), VO 'demo', started"
            )),
            "{out}"
        );
        let kernel = out
            .lines()
            .find_map(|l| l.strip_prefix("in the VM: kernel "))
            .unwrap_or_else(|| panic!("no kernel line: {out}"));
        assert_ne!(kernel, host_kernel, "the payload ran on the host: {out}");
        let cmdline = out
            .lines()
            .find_map(|l| l.strip_prefix("in the VM: cmdline "))
            .unwrap_or_else(|| panic!("no cmdline line: {out}"));
        assert!(
            cmdline.contains(&format!("wnodes.uid={JOB_UID}")),
            "not the WNoDeS guest's kernel command line: {cmdline}"
        );
        assert!(out.contains(&format!("in the VM: uid {JOB_UID}")), "{out}");
        assert!(
            out.lines()
                .any(|l| l == "unchanged: $HOME `stays` \\as written"),
            "the script was changed on its way: {out}"
        );

        // One usage record, under the Slurm run key, with the payload's exit code.
        let r = one_usage_record(&stack, run_key).await;
        assert_eq!(r.exit_code, i64::from(*code), "{r:#?}");
        assert_eq!((r.lrms.as_str(), r.job_id.as_str()), ("slurm", id.as_str()));
        assert_eq!(r.queue, "wnodes", "{r:#?}");
        assert_eq!(r.uid, Some(i64::from(JOB_UID)), "{r:#?}");
        // What the payload wrote on the site's storage belongs to the job's user.
        let written = stack.export_dir().join(format!("slurm-exit-{code}.txt"));
        let meta = std::fs::metadata(&written)
            .unwrap_or_else(|e| panic!("{}: {e}\n{out}", written.display()));
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            JOB_UID,
            "{}",
            written.display()
        );
        assert_eq!(
            std::fs::read_to_string(&written).unwrap(),
            format!("from job {id}\n")
        );
    }
    no_leftovers(&stack).await;
}

/// `scancel` of a running job: slurmstepd sends SIGTERM to the job's processes; the job starter
/// (`wnodes-bridge job-starter`) asks the host agent to cancel, which publishes `JobCancelled`;
/// the VM is stopped and every resource released within [`KILL_WAIT`], before Slurm would
/// SIGKILL the starter (for that, see the SIGKILL test).
async fn vm_scancel_of_a_running_sbatch_job_stops_its_vm_and_leaves_nothing() {
    let work = tempfile::tempdir().unwrap();
    let (stack, job) = sleeping_job(work.path(), "sleep.sh").await;
    assert!(!stack.leftovers().qemus.is_empty(), "no qemu while it runs");

    let (ok, out) = run(Command::new("scancel").arg(&job.id));
    assert!(ok, "scancel: {out}");
    let cancelled = std::time::Instant::now();
    let line = sacct_final(&job.id, SLURM_TIMEOUT).await.unwrap();
    assert!(
        line.starts_with(&format!("{}|CANCELLED", job.id)),
        "sacct: {line}"
    );
    if let Err(e) = wait_until(KILL_WAIT, "every resource released", || async {
        stack.leftovers().is_empty().then_some(())
    })
    .await
    {
        panic!("{e}: {:#?}", stack.leftovers());
    }
    eprintln!(
        "sacct: {line}; nothing left {:.1} s after scancel",
        cancelled.elapsed().as_secs_f64()
    );
    let events = stack.run_events(&job.run_key).await.unwrap();
    let types: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    for t in [EventType::JobCancelled, EventType::VmStopped] {
        assert!(types.contains(&t), "no {t:?} in {types:?}");
    }
    let r = one_usage_record(&stack, &job.run_key).await;
    assert_eq!(r.stop_reason, "cancelled", "{r:#?}");
    let out = std::fs::read_to_string(&job.output).unwrap_or_default();
    assert!(out.contains("SIGTERM: cancelling"), "{out}");
    no_leftovers(&stack).await;
}

/// `scontrol requeue` of a running job: the first run is cancelled (its VM stopped, its own usage
/// record), and the job runs again as a new run attempt (`SLURM_RESTART_COUNT` 1 → attempt 2, a
/// run key of its own) to its own end: `sacct` shows the second run's result, never the first's,
/// and each run has exactly one usage record.
async fn vm_scontrol_requeue_makes_a_new_run_attempt_with_its_own_usage_record() {
    let work = tempfile::tempdir().unwrap();
    let stack = slurm_stack(work.path()).await;
    // Long enough for the requeue to land while the first run sleeps, short enough for the
    // second run to finish.
    let job = stack
        .sbatch(
            &work.path().join("jobs"),
            "requeue.sh",
            "#!/bin/sh
echo payload started
sleep 25
echo payload done
exit 0
",
        )
        .unwrap();
    let first = job.run_key.clone();
    let second = first
        .strip_suffix("/1")
        .map(|k| format!("{k}/2"))
        .expect("a first attempt's run key");
    wait_vm_running(&stack, &first).await;

    let (ok, out) = run(Command::new("scontrol").args(["requeue", &job.id]));
    assert!(ok, "scontrol requeue: {out}");
    // A requeued job waits for a begin time Slurm sets in the future: once it is pending
    // again, let it start now.
    wait_until(SLURM_TIMEOUT, "the requeued job eligible now", || async {
        let (_, state) = run(Command::new("squeue").args(["-h", "-j", &job.id, "-o", "%T"]));
        if state.trim() != "PENDING" {
            return None;
        }
        let (ok, _) = run(Command::new("scontrol").args([
            "update",
            &format!("JobId={}", job.id),
            "StartTime=now",
        ]));
        ok.then_some(())
    })
    .await
    .unwrap();

    // The first run: cancelled by the requeue, its VM stopped, one record of its own.
    let r1 = one_usage_record(&stack, &first).await;
    assert_eq!(r1.stop_reason, "cancelled", "{r1:#?}");
    let types: Vec<EventType> = stack
        .run_events(&first)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event_type)
        .collect();
    for t in [EventType::JobCancelled, EventType::VmStopped] {
        assert!(types.contains(&t), "first run: no {t:?} in {types:?}");
    }
    // Slurm's own record of the requeue (its jobcomp hook; the bridge follows the spool): the
    // first run was evicted, in the first run's trace.
    let evicted = wait_until(
        Duration::from_secs(60),
        "job.evicted of the first run",
        || async {
            stack
                .run_events(&first)
                .await
                .ok()?
                .into_iter()
                .find(|e| e.event_type == EventType::JobEvicted)
        },
    )
    .await
    .unwrap();
    assert!(
        evicted.event.source.starts_with("bridge@"),
        "{:?}",
        evicted.event.source
    );
    let (trace, _) = wnodes_bus::propagation::run_ids(&first);
    assert_eq!(
        evicted.trace_id.as_deref(),
        Some(trace.to_string().as_str())
    );

    // The second run: a new attempt, to its own end.
    let line = sacct_final(&job.id, SLURM_TIMEOUT).await.unwrap();
    let out = std::fs::read_to_string(&job.output).unwrap_or_default();
    eprintln!("sacct: {line}\n--- slurm-{}.out:\n{out}", job.id);
    assert_eq!(line, format!("{}|COMPLETED|0:0", job.id), "{out}");
    assert!(out.contains(&format!("job {second} of nobody")), "{out}");
    assert!(out.contains("payload done"), "{out}");
    let r2 = one_usage_record(&stack, &second).await;
    assert_eq!(
        (r2.exit_code, r2.stop_reason.as_str()),
        (0, "guest-poweroff"),
        "{r2:#?}"
    );
    assert_eq!(r2.job_id, job.id, "{r2:#?}");
    // Still exactly one record for the first run.
    assert_eq!(stack.usage_record(&first).await.unwrap().len(), 1);
    no_leftovers(&stack).await;
}

/// One Slurm job is one trace (issue 9, item 3), whichever process publishes its events: the
/// job waits 3 s (`--begin=now+3`), so the bridge's `squeue` poll publishes its `job.queued`;
/// the host agent publishes `job.started` under the run's root span `wnodes.run`; Slurm's
/// jobcomp hook records the end, which the bridge reads from the spool. Each event's trace
/// context, and every span of the run, is in the trace whose id derives from the run key, and
/// that trace holds spans of the seven services and the agent under one root.
async fn vm_a_slurm_job_is_one_trace_with_slurm_s_events_and_the_seven_services() {
    let collector = wnodes_testkit::OtlpCollector::start().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut opts = slurm_options(work.path());
    opts.otlp_endpoint = Some(collector.endpoint());
    let mut stack = Stack::start(opts).await.unwrap();
    let spool = wnodes_devstack::slurm::jobcomp_spool().unwrap();
    let job = stack
        .sbatch_with(
            &work.path().join("jobs"),
            "traced.sh",
            "#!/bin/sh\necho traced\nexit 3\n",
            &["--begin=now+3"],
        )
        .unwrap();
    let line = sacct_final(&job.id, SLURM_TIMEOUT).await.unwrap();
    assert_eq!(line, format!("{}|FAILED|3:0", job.id));
    let key = &job.run_key;
    let (trace, root) = wnodes_bus::propagation::run_ids(key);
    let (trace, root) = (trace.to_string(), root.to_string());

    // Slurm's jobcomp record of the job reached the spool (the bridge publishes it as the
    // run's job.finished: the same event id as the agent's, so one event).
    let record = format!("JOBID={}\n", job.id);
    wait_until(
        Duration::from_secs(60),
        "the job's jobcomp record",
        || async {
            std::fs::read_to_string(&spool)
                .ok()?
                .split("\n\n")
                .any(|r| {
                    r.starts_with(&record)
                        && r.contains("JOBSTATE=FAILED")
                        && r.contains("RESTARTCNT=0")
                })
                .then_some(())
        },
    )
    .await
    .unwrap();
    let events = wait_until(
        Duration::from_secs(60),
        "the run's events up to job.finished",
        || async {
            let ev = stack.run_events(key).await.ok()?;
            ev.iter()
                .any(|e| e.event_type == EventType::JobFinished)
                .then_some(ev)
        },
    )
    .await
    .unwrap();
    let queued = events
        .iter()
        .find(|e| e.event_type == EventType::JobQueued)
        .unwrap_or_else(|| panic!("no job.queued from the squeue poll: {events:#?}"));
    assert!(
        queued.event.source.starts_with("bridge@"),
        "{:?}",
        queued.event.source
    );
    for e in &events {
        assert_eq!(
            e.trace_id.as_deref(),
            Some(trace.as_str()),
            "{} from {} is not in the run's trace",
            e.event_type.name(),
            e.event.source
        );
    }
    let types: Vec<&str> = events.iter().map(|e| e.event_type.name()).collect();
    eprintln!("run {key}: trace {trace}; events {types:?}");

    // The spans: stopping the stack flushes every service's exporter.
    stack.stop_services();
    let mut want = wnodes_integration_tests::jobs::seven_services();
    want.insert("wnodes-agent".into());
    let spans = collector
        .wait_for(
            Duration::from_secs(30),
            "spans of the seven services and the agent",
            |s| {
                let seen: std::collections::BTreeSet<&str> = s
                    .iter()
                    .filter(|s| s.trace_id == trace)
                    .map(|s| s.service_name.as_str())
                    .collect();
                want.iter().all(|svc| seen.contains(svc.as_str()))
            },
        )
        .await
        .unwrap();
    let tree = wnodes_testkit::otlp::one_trace(&spans, &trace);
    let run_span = tree
        .iter()
        .find(|s| s.parent_span_id.is_empty())
        .expect("a root");
    assert_eq!(
        (
            run_span.name.as_str(),
            run_span.span_id.as_str(),
            run_span.service_name.as_str()
        ),
        ("wnodes.run", root.as_str(), "wnodes-agent")
    );
    let by_service = wnodes_testkit::otlp::spans_by_service(&spans, &trace);
    eprintln!(
        "trace {trace}: {} spans by service {by_service:?}",
        tree.len()
    );
    let services: std::collections::BTreeSet<String> = by_service.into_keys().collect();
    assert_eq!(services, want);
}

/// The pid of the job starter of Slurm job `id` (its command line names `job-starter`, its
/// environment `SLURM_JOB_ID=<id>`).
fn starter_pid(id: &str) -> Option<i32> {
    let want = format!("SLURM_JOB_ID={id}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let is_starter = cmdline.split(|b| *b == 0).any(|w| w == b"job-starter");
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let in_job = environ.split(|b| *b == 0).any(|w| w == want.as_bytes());
        (is_starter && in_job).then_some(pid)
    })
}

/// SIGKILL of the job starter (no handler runs, nothing is said): the host agent sees its
/// socket close and cancels the run. The bound: `JobCancelled` within 5 s of the kill, every
/// resource released within [`KILL_WAIT`] (the VM's stop, as for `scancel`).
async fn vm_a_job_starter_killed_with_sigkill_takes_its_vm_with_it() {
    let work = tempfile::tempdir().unwrap();
    let (stack, job) = sleeping_job(work.path(), "killed.sh").await;
    let pid = starter_pid(&job.id).expect("the job starter's process");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let killed = std::time::Instant::now();
    let cancelled = wait_until(
        Duration::from_secs(5),
        "JobCancelled after the SIGKILL",
        || async {
            stack
                .run_events(&job.run_key)
                .await
                .ok()?
                .iter()
                .any(|e| e.event_type == EventType::JobCancelled)
                .then(|| killed.elapsed())
        },
    )
    .await
    .unwrap();
    if let Err(e) = wait_until(KILL_WAIT, "every resource released", || async {
        stack.leftovers().is_empty().then_some(())
    })
    .await
    {
        panic!("{e}: {:#?}", stack.leftovers());
    }
    let released = killed.elapsed();
    let line = sacct_final(&job.id, SLURM_TIMEOUT).await.unwrap();
    eprintln!(
        "SIGKILL of the job starter (pid {pid}): JobCancelled after {:.2} s, nothing left after {:.1} s; sacct: {line}",
        cancelled.as_secs_f64(),
        released.as_secs_f64()
    );
    assert!(!line.contains("COMPLETED"), "sacct: {line}");
    let r = one_usage_record(&stack, &job.run_key).await;
    assert_eq!(r.stop_reason, "cancelled", "{r:#?}");
    no_leftovers(&stack).await;
}

/// The payload's output reaches the unprivileged job starter whole, up to the host's cap (issue
/// 13, item 4): the launcher keeps at most `output_limit_bytes` of the VM's serial output,
/// ending with its truncation marker, in a file the job's user cannot read; the agent (root)
/// hands that file to the starter, which runs as uid 65534, so the job's output file holds the
/// very same bytes.
async fn vm_an_unprivileged_job_starter_gets_the_whole_output_up_to_the_cap() {
    const LIMIT: u64 = 256 << 10;
    let work = tempfile::tempdir().unwrap();
    let mut opts = slurm_options(work.path());
    opts.output_limit_bytes = Some(LIMIT);
    let stack = Stack::start(opts).await.unwrap();
    // About 700 KB of numbered lines: well past the cap.
    let job = stack
        .sbatch(
            &work.path().join("jobs"),
            "chatty.sh",
            "#!/bin/sh\ni=0\nwhile [ $i -lt 20000 ]; do echo \"line $i of the payload's output\"; i=$((i+1)); done\n",
        )
        .unwrap();
    let line = sacct_final(&job.id, SLURM_TIMEOUT).await.unwrap();
    let events = stack.run_events(&job.run_key).await.unwrap();
    let stopped = events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(wnodes_bus::proto::event::Body::VmStopped(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no vm.stopped: {events:?}"));
    let kept = std::fs::read(&stopped.output_location)
        .unwrap_or_else(|e| panic!("{}: {e}", stopped.output_location));
    let out = std::fs::read(&job.output).unwrap();
    // The job's output file: the starter's progress lines (stderr) and the output (stdout).
    let stdout: Vec<u8> = out
        .split_inclusive(|b| *b == b'\n')
        .filter(|l| !l.starts_with(b"wnodes-bridge: "))
        .flatten()
        .copied()
        .collect();
    let text = String::from_utf8_lossy(&stdout);
    eprintln!(
        "sacct: {line}; stop reason {}; kept {} bytes, the starter printed {} bytes; last line: {:?}",
        stopped.stop_reason,
        kept.len(),
        stdout.len(),
        text.lines().last()
    );
    assert_eq!(stopped.stop_reason, "output-limit", "{stopped:?}");
    assert!(
        text.contains("[wnodes: output truncated:"),
        "no truncation marker: {}",
        &text[text.len().saturating_sub(500)..]
    );
    assert!(
        text.contains("line 0 of the payload's output"),
        "{text:.500}"
    );
    assert!(
        u64::try_from(kept.len()).unwrap() <= LIMIT + 200,
        "kept {} bytes past the cap",
        kept.len()
    );
    assert!(
        stdout == kept,
        "the starter's output is not the kept output, byte for byte"
    );
    // The kept file is not readable by the job's user: only the agent could hand it over.
    let meta = std::fs::metadata(&stopped.output_location).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
    assert_eq!(mode & 0o004, 0, "{:o}", mode);
    no_leftovers(&stack).await;
}

/// `srun` (no batch script: the filter leaves it alone, so its command runs on the host) as
/// `uid`, with `account`, running `sh -c SCRIPT`; returns its output (the exit status of the
/// commands is printed by the script itself).
fn srun_as(uid: u32, account: &str, script: &str, stack: &Stack) -> String {
    let conf = std::env::var("SLURM_CONF").unwrap();
    let mut c = Command::new("setpriv");
    c.args([
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
        "srun".into(),
        "--quiet".into(),
        format!("--account={account}"),
        "--time=5".into(),
        "sh".into(),
        "-c".into(),
        script.into(),
    ])
    .current_dir("/tmp")
    .env_clear()
    .env("PATH", "/usr/local/bin:/usr/bin:/bin")
    .env("SLURM_CONF", conf)
    .env("WNODES_AGENT__SOCKET", stack.agent_socket());
    let (_, out) = run(&mut c);
    out
}

/// A job starter as user A (uid 65534) tries every way the interface allows to act as another
/// user or for another job, and each is refused with its reason; nothing reaches the bus:
/// - outside any Slurm job, naming a running job of its own user in `SLURM_JOB_ID`;
/// - inside its own job, with `SLURM_JOB_ID` forged to another user's running job;
/// - with the development flags (`--dev-job-id`), which the agent refuses unless configured;
/// - a process of uid A inside another user's (root's) job;
/// - NATS directly: the job's environment holds no credentials, A can read none of the
///   stack's, and a connection without them is refused.
async fn vm_a_job_starter_cannot_act_as_another_user_or_for_another_job() {
    let work = tempfile::tempdir().unwrap();
    let stack = slurm_stack(work.path()).await;
    let bridge = stack.bin("bridge");
    let bridge = bridge.display();
    let conf = std::env::var("SLURM_CONF").unwrap();

    // Another user's running job (root's, account root): a target to claim.
    let mut root_job = std::process::Command::new("srun")
        .args(["--quiet", "--account=root", "--time=5", "sleep", "120"])
        .env("SLURM_CONF", &conf)
        .current_dir("/tmp")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let other_id = wait_until(Duration::from_secs(60), "root's job running", || async {
        let (_, out) =
            run(Command::new("squeue").args(["-h", "-u", "root", "-t", "R", "-o", "%i"]));
        out.lines()
            .next()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
    })
    .await
    .unwrap();

    // Outside any job: the agent asks slurmd which job the process is in.
    let out = std::process::Command::new("setpriv")
        .args([
            format!("--reuid={JOB_UID}"),
            format!("--regid={JOB_UID}"),
            "--clear-groups".into(),
        ])
        .arg(stack.bin("bridge"))
        .args(["job-starter", "--lrms", "slurm", "--", "/bin/true"])
        .env_clear()
        .env("SLURM_JOB_ID", &other_id)
        .env("WNODES_AGENT__SOCKET", stack.agent_socket())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(
        err.contains("is not part of a Slurm job on this host"),
        "{err}"
    );

    // Inside its own job (srun as A), with every other trick in one script.
    let script = format!(
        "echo \"own job $SLURM_JOB_ID\"; \
         SLURM_JOB_ID={other_id} {bridge} job-starter --lrms slurm -- /bin/true; echo \"forged rc=$?\"; \
         {bridge} job-starter --lrms slurm --dev-job-id {other_id} -- /bin/true; echo \"dev rc=$?\"; \
         env | grep -c '^WNODES_NATS' ; \
         for f in {creds}/*; do cat \"$f\" >/dev/null 2>&1 && echo \"readable: $f\"; done; \
         echo done",
        creds = stack.creds("agent").unwrap().parent().unwrap().display(),
    );
    let out = srun_as(JOB_UID, &stack.options().vo, &script, &stack);
    eprintln!("--- srun as {JOB_UID}:\n{out}");
    let own = out
        .lines()
        .find_map(|l| l.strip_prefix("own job "))
        .unwrap_or_else(|| panic!("srun did not run: {out}"))
        .to_owned();
    assert!(out.contains("forged rc=77"), "{out}");
    assert!(
        out.contains(&format!("names Slurm job \"{other_id}\", but its process"))
            && out.contains(&format!("belongs to job {own}")),
        "{out}"
    );
    assert!(out.contains("dev rc=77"), "{out}");
    assert!(out.contains("allow_dev_identity is off"), "{out}");
    assert!(
        out.lines().any(|l| l.trim() == "0"),
        "WNODES_NATS* in the job's environment: {out}"
    );
    assert!(!out.contains("readable:"), "{out}");
    assert!(out.contains("done"), "{out}");

    // A process of uid A inside root's job: Slurm says the job is root's.
    let script = format!(
        "setpriv --reuid={JOB_UID} --regid={JOB_UID} --clear-groups {bridge} job-starter --lrms slurm -- /bin/true; echo \"rc=$?\""
    );
    let out = srun_as(0, "root", &script, &stack);
    eprintln!("--- srun as root, starter as {JOB_UID}:\n{out}");
    assert!(out.contains("rc=77"), "{out}");
    assert!(
        out.contains(&format!(
            "belongs to uid 0, but the job starter runs as uid {JOB_UID}"
        )),
        "{out}"
    );

    // NATS without credentials (all a job's user could try): refused.
    let anonymous = tokio::time::timeout(
        Duration::from_secs(10),
        async_nats::connect(stack.nats_url()),
    )
    .await;
    assert!(
        matches!(anonymous, Ok(Err(_))),
        "an anonymous NATS connection was not refused: {anonymous:?}"
    );

    // Nothing was started for either job: no job.started and no VM. (Slurm's own record of
    // a job's end, read by the bridge from the jobcomp spool, may be there: that is Slurm
    // speaking, not the starter.)
    for id in [&own, &other_id] {
        let key = format!("{}/slurm/{id}/1", stack.options().site);
        let events = stack.run_events(&key).await.unwrap();
        let started: Vec<_> = events
            .iter()
            .filter(|e| {
                e.event_type == EventType::JobStarted || e.event_type.name().starts_with("vm.")
            })
            .collect();
        assert!(started.is_empty(), "{key}: {started:?}");
        assert!(
            events.iter().all(|e| e.event.source.starts_with("bridge@")),
            "{key}: an event not from Slurm's records: {events:?}"
        );
    }
    let _ = root_job.kill();
    let _ = root_job.wait();
    let _ = run(Command::new("scancel").arg(&other_id));
    no_leftovers(&stack).await;
    // The next test wants an idle node, not one still completing root's job.
    wait_until(Duration::from_secs(120), "the node idle again", || async {
        let (_, out) = run(Command::new("sinfo").args(["-h", "-o", "%T"]));
        out.lines().any(|l| l.trim() == "idle").then_some(())
    })
    .await
    .unwrap();
}

fn main() -> std::process::ExitCode {
    host::main(vec![
        host_test!(
            multi_thread vm_sbatch_jobs_run_in_wnodes_vms_and_sacct_shows_the_payloads_exit_codes
            needs NEEDS
        ),
        host_test!(
            multi_thread vm_scancel_of_a_running_sbatch_job_stops_its_vm_and_leaves_nothing
            needs NEEDS
        ),
        host_test!(
            multi_thread vm_scontrol_requeue_makes_a_new_run_attempt_with_its_own_usage_record
            needs NEEDS
        ),
        host_test!(
            multi_thread vm_a_job_starter_killed_with_sigkill_takes_its_vm_with_it
            needs NEEDS
        ),
        host_test!(
            multi_thread vm_a_job_starter_cannot_act_as_another_user_or_for_another_job
            needs NEEDS
        ),
        host_test!(
            multi_thread vm_an_unprivileged_job_starter_gets_the_whole_output_up_to_the_cap
            needs NEEDS
        ),
        host_test!(
            multi_thread vm_a_slurm_job_is_one_trace_with_slurm_s_events_and_the_seven_services
            needs NEEDS
        ),
    ])
}
