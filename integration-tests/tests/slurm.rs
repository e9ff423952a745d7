//! A real Slurm drives WNoDeS (issue 9, item 1; `docs/slurm.md`): ordinary `sbatch` jobs,
//! submitted by an unprivileged user (uid 65534) to the private one-node Slurm 22.05 cluster of
//! `scripts/slurm-cluster.sh`, run inside WNoDeS VMs because the cluster's `job_submit/lua`
//! filter (`slurm/job_submit.lua`) hands each script, unchanged, to the job starter
//! (`slurm/wnodes-slurm-job-starter`, i.e. `wnodes-bridge submit`). `sacct` then shows each
//! payload's exit code as its job's: `COMPLETED|0:0` and `FAILED|3:0`; each job's output file
//! holds what the payload printed inside the VM (the guest's kernel and its WNoDeS kernel command
//! line); each run has one usage record under its Slurm run key; the stack leaves nothing behind.
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

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use wnodes_devstack::{NetworkChoice, Stack, StackOptions};
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

/// Runs `c`; whether it succeeded, and its stdout and stderr.
fn run(c: &mut Command) -> (bool, String) {
    match c.output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, format!("{c:?}: {e}")),
    }
}

/// The payload: what it prints can only come from inside a WNoDeS VM (the guest's kernel, and
/// the `wnodes.*` parameters the launcher puts on its kernel command line).
fn job_script(code: i32) -> String {
    format!(
        "#!/bin/sh\n#SBATCH --job-name=wnodes-exit-{code}\n\
         echo \"in the VM: kernel $(uname -r)\"\n\
         echo \"in the VM: cmdline $(cat /proc/cmdline)\"\n\
         echo \"in the VM: uid $(id -u)\"\n\
         exit {code}\n"
    )
}

/// `sbatch` as uid [`JOB_UID`] with only the environment a user would have (`PATH` with the
/// stack's binaries, `SLURM_CONF`) plus the stack's config and the agent's creds; the job id.
fn sbatch(stack: &Stack, dir: &Path, creds: &Path, script: &Path) -> String {
    let bin = stack.bin("bridge");
    let path = format!(
        "{}:/usr/local/bin:/usr/bin:/bin",
        bin.parent().unwrap().display()
    );
    let mut c = Command::new("setpriv");
    c.args([
        format!("--reuid={JOB_UID}"),
        format!("--regid={JOB_UID}"),
        "--clear-groups".into(),
    ])
    .arg("sbatch")
    .args(["--parsable", "--account=demo", "--chdir"])
    .arg(dir)
    .arg(format!("--output={}/slurm-%j.out", dir.display()))
    .arg(script)
    .current_dir(dir)
    .env_clear()
    .env("PATH", path)
    .env("HOME", "/nonexistent")
    .env("SLURM_CONF", std::env::var("SLURM_CONF").unwrap())
    .env("WNODES_CONFIG", stack.config_path())
    .env("WNODES_NATS__CREDS_FILE", creds);
    let (ok, out) = run(&mut c);
    assert!(ok, "sbatch failed: {out}");
    let id = out.trim().split(';').next().unwrap().to_owned();
    assert!(
        !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()),
        "sbatch: {out}"
    );
    id
}

/// `sacct -X -n -P -j ID --format=JobID,State,ExitCode` once the job's state is final.
async fn sacct_final(id: &str) -> String {
    let sacct = || {
        let (ok, out) = run(Command::new("sacct").args([
            "-X",
            "-n",
            "-P",
            "-j",
            id,
            "--format=JobID,State,ExitCode",
        ]));
        assert!(ok, "sacct: {out}");
        out.trim().to_owned()
    };
    let r = wait_until(
        SLURM_TIMEOUT,
        &format!("a final state of Slurm job {id} in sacct"),
        || async {
            let line = sacct();
            let state = line.split('|').nth(1).unwrap_or_default();
            let running = state.is_empty()
                || ["PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "COMPLETING"]
                    .iter()
                    .any(|s| state.starts_with(s));
            (!running).then_some(line)
        },
    )
    .await;
    match r {
        Ok(line) => line,
        Err(e) => panic!("{e}; last: {}", sacct()),
    }
}

fn output_of(dir: &Path, id: &str) -> String {
    let path: PathBuf = dir.join(format!("slurm-{id}.out"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

async fn vm_sbatch_jobs_run_in_wnodes_vms_and_sacct_shows_the_payloads_exit_codes() {
    let work = tempfile::tempdir().unwrap();
    let mut opts = StackOptions::new(work.path().join("stack"));
    opts.network = NetworkChoice::User;
    let stack = Stack::start(opts).await.unwrap();

    // What the job's user must read (the development path, docs/slurm.md): the config, and a
    // copy of the agent's creds.
    let jobs = work.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let creds = jobs.join("agent.creds");
    std::fs::copy(stack.creds("agent").unwrap(), &creds).unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o400)).unwrap();
    std::os::unix::fs::chown(&creds, Some(JOB_UID), Some(JOB_UID)).unwrap();
    std::os::unix::fs::chown(&jobs, Some(JOB_UID), Some(JOB_UID)).unwrap();

    let mut ids = Vec::new();
    for code in [0, 3] {
        let script = jobs.join(format!("exit-{code}.sh"));
        std::fs::write(&script, job_script(code)).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        let id = sbatch(&stack, &jobs, &creds, &script);
        eprintln!("Slurm job {id}: exit {code}");
        ids.push((id, code));
    }

    let host_kernel = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned();
    for (id, code) in &ids {
        let line = sacct_final(id).await;
        let out = output_of(&jobs, id);
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
        let run_key = format!("WNODES-DEV/slurm/{id}/1");
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

        // One usage record, under the Slurm run key, with the payload's exit code.
        let r = one_usage_record(&stack, &run_key).await;
        assert_eq!(r.exit_code, i64::from(*code), "{r:#?}");
        assert_eq!((r.lrms.as_str(), r.job_id.as_str()), ("slurm", id.as_str()));
        assert_eq!(r.queue, "wnodes", "{r:#?}");
        assert_eq!(r.uid, Some(i64::from(JOB_UID)), "{r:#?}");
    }
    no_leftovers(&stack).await;
}

fn main() -> std::process::ExitCode {
    host::main(vec![host_test!(
        multi_thread vm_sbatch_jobs_run_in_wnodes_vms_and_sacct_shows_the_payloads_exit_codes
        needs NEEDS
    )])
}
