//! A real Slurm drives WNoDeS (issue 9, item 1; `docs/slurm.md`): ordinary `sbatch` jobs,
//! submitted by an unprivileged user (uid 65534) to the private one-node Slurm 22.05 cluster of
//! `scripts/slurm-cluster.sh`, run inside WNoDeS VMs because the cluster's `job_submit/lua`
//! filter (`slurm/job_submit.lua`) hands each script, unchanged, to the job starter
//! (`slurm/wnodes-slurm-job-starter`, i.e. `wnodes-bridge submit`). `sacct` then shows each
//! payload's exit code as its job's: `COMPLETED|0:0` and `FAILED|3:0`; each job's output file
//! holds what the payload printed inside the VM (the guest's kernel and its WNoDeS kernel command
//! line); each run has one usage record under its Slurm run key; the stack leaves nothing behind.
//! `scancel` stops a running job's VM; `scontrol requeue` makes a new run attempt with a usage
//! record of its own.
//!
//! The cluster is not started here: the test needs `SLURM_CONF` naming a running cluster's
//! config (`scripts/test.sh` starts one per run and exports it; by hand: `scripts/slurm-cluster.sh
//! start` and `eval "$(scripts/slurm-cluster.sh env)"`). Without it the test is skipped, or
//! fails naming what is missing under `WNODES_HOST_TESTS=required` (as `scripts/test.sh` runs
//! it). slurmd runs its jobs in the host's network namespace, so the stack runs there too, with
//! qemu user-mode networking (no taps), unlike the other whole-job tests.
//!
//! Development path (what issue 9, item 2 replaces): the job's environment names the stack's
//! config and a copy of the agent's NATS credentials readable by the job's user.

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
    let mut opts = StackOptions::new(work.join("stack"));
    opts.network = NetworkChoice::User;
    Stack::start(opts).await.unwrap()
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

    // sbatch as uid 65534, with the stack's config and a copy of the agent's creds the job's
    // user can read in the job's environment (the development path, docs/slurm.md).
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

        // The job starter saw the job as Slurm describes it, and the payload ran in the VM.
        assert!(
            out.contains(&format!(
                "Slurm job {id} (attempt 1) as nobody ({JOB_UID}:{JOB_UID}), vo 'demo'"
            )),
            "{out}"
        );
        let run_key = &job.run_key;
        assert_eq!(run_key, &format!("WNODES-DEV/slurm/{id}/1"));
        assert!(out.contains(&format!("job {run_key} started on")), "{out}");
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
    }
    no_leftovers(&stack).await;
}

/// `scancel` of a running job: slurmstepd sends SIGTERM to the job's processes, which the job
/// starter (`wnodes-bridge submit`) turns into `JobCancelled`; the VM is stopped and every
/// resource released within [`KILL_WAIT`], before Slurm would SIGKILL the starter (a SIGKILLed
/// starter leaving its VM running is issue 9, item 5, not built).
async fn vm_scancel_of_a_running_sbatch_job_stops_its_vm_and_leaves_nothing() {
    let work = tempfile::tempdir().unwrap();
    let stack = slurm_stack(work.path()).await;
    let job = stack
        .sbatch(
            &work.path().join("jobs"),
            "sleep.sh",
            "#!/bin/sh\necho payload started\nsleep 300\n",
        )
        .unwrap();
    wait_vm_running(&stack, &job.run_key).await;
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

    // The second run: a new attempt, to its own end.
    let line = sacct_final(&job.id, SLURM_TIMEOUT).await.unwrap();
    let out = std::fs::read_to_string(&job.output).unwrap_or_default();
    eprintln!("sacct: {line}\n--- slurm-{}.out:\n{out}", job.id);
    assert_eq!(line, format!("{}|COMPLETED|0:0", job.id), "{out}");
    assert!(
        out.contains(&format!("Slurm job {} (attempt 2)", job.id)),
        "{out}"
    );
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
    ])
}
