//! The agent's checks of PBS, LSF and HTCondor jobs, with the real agent binary, real job
//! starters run as another user (`nobody`), and the real kernel facts each check rests on: the
//! starter's session (PBS), its cgroup (LSF), its root `condor_starter` ancestor (HTCondor).
//!
//! None of these batch systems can run on the project's machines, so their clients (`qstat`,
//! `bjobs`, `bhist`, `condor_status`, `condor_q`) are stand-in scripts that print answers in the
//! clients' documented layouts (`crates/wnodes-lrms/tests/data/*/…_CONSTRUCTED.*`, ORIGIN.txt
//! says where each layout comes from) and fail as the real ones do for an unknown job. What is
//! tested: that the agent asks them the right questions, refuses every mismatch between what
//! they say and what the kernel says, and publishes the job they describe.
//!
//! A host test (`wnodes_testkit::host`): root (starters as another uid, sessions, cgroups).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failure is a test failure

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use common::*;
use wnodes_bus::proto::{self, event::Body};
use wnodes_testkit::{
    NatsServer,
    host::{self, Precondition},
    host_test,
    process::TomlValue,
};

const NEEDS: &[Precondition] = &[Precondition::Root, Precondition::Setpriv];
const NEEDS_CGROUPS: &[Precondition] = &[
    Precondition::Root,
    Precondition::Setpriv,
    Precondition::Cgroups,
];

/// An executable script `dir/bin/name`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let p = bin.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A job starter as `nobody`, held until [`Held::go`]: `sh` writes its pid, waits for a file,
/// then execs `setpriv … wnodes-bridge job-starter -- /bin/true` (same pid). `prefix` runs
/// first (`setsid`: the starter leads a new session; a stand-in `condor_starter`: it is the
/// starter's parent).
struct Held {
    child: tokio::process::Child,
    /// The pid of the process that becomes the job starter.
    pid: i32,
    go: PathBuf,
}

impl Held {
    async fn spawn(
        dir: &Path,
        name: &str,
        socket: &Path,
        prefix: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_with(dir, name, socket, prefix, env, None).await
    }

    /// [`Held::spawn`] through `wrapper` (one of `starters/`, the LRMS's hook) instead of
    /// `wnodes-bridge job-starter` itself.
    async fn spawn_with(
        dir: &Path,
        name: &str,
        socket: &Path,
        prefix: &[&str],
        env: &[(&str, &str)],
        wrapper: Option<&str>,
    ) -> Self {
        // Writable by a starter's parent that is not root (a look-alike condor_starter).
        let held = dir.join("held");
        std::fs::create_dir_all(&held).unwrap();
        std::fs::set_permissions(&held, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let pid_file = held.join(format!("{name}.pid"));
        let go = held.join(format!("{name}.go"));
        // Under a prefix that already runs as nobody, no second setpriv.
        let drop = if prefix.first() == Some(&"setpriv") {
            String::new()
        } else {
            format!("setpriv --reuid={OTHER_UID} --regid={OTHER_UID} --clear-groups")
        };
        let command = match wrapper {
            Some(w) => format!(
                "{}/../../starters/{w} /bin/true",
                env!("CARGO_MANIFEST_DIR")
            ),
            None => format!(
                "{} job-starter --socket {} -- /bin/true",
                bridge_bin().display(),
                socket.display()
            ),
        };
        let inner = format!(
            "echo $$ > {pid}; while [ ! -e {go} ]; do sleep 0.05; done; exec {drop} {command}",
            pid = pid_file.display(),
            go = go.display(),
        );
        let mut argv: Vec<String> = prefix.iter().map(|s| (*s).to_owned()).collect();
        argv.extend(["/bin/sh".into(), "-c".into(), inner]);
        let mut c = tokio::process::Command::new(&argv[0]);
        c.args(&argv[1..])
            .env_clear()
            .env(
                "PATH",
                format!(
                    "{}:/usr/bin:/bin:/usr/sbin:/sbin",
                    bridge_bin().parent().unwrap().display()
                ),
            )
            .env("WNODES_AGENT__SOCKET", socket)
            .env("WNODES_JOB_STARTER_CONF", "/nonexistent")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = c.spawn().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(p) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                break p;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Self { child, pid, go }
    }

    /// Lets it connect; its exit code and stderr.
    async fn go(self) -> (Option<i32>, String) {
        std::fs::write(&self.go, "").unwrap();
        let out = tokio::time::timeout(Duration::from_secs(60), self.child.wait_with_output())
            .await
            .expect("the job starter ended in time")
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// A refused start: exit code 77 and the reason.
fn assert_refused((code, stderr): (Option<i32>, String), says: &str) {
    assert_eq!(code, Some(77), "{stderr}");
    assert!(stderr.contains(says), "expected {says:?} in: {stderr}");
}

/// The JobStarted the agent published, with its job.
async fn job_started(
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<proto::Event>,
    agent: &AgentProc,
) -> proto::JobDescription {
    let ev = next_event(seen, agent, "job.started").await;
    let Some(Body::JobStarted(js)) = ev.body else {
        unreachable!()
    };
    js.job.unwrap()
}

fn fixture(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../crates/wnodes-lrms/tests/data")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn lrms(name: &str) -> TomlValue {
    TomlValue::Array(vec![name.into()])
}

async fn pbs_jobs_are_the_jobs_whose_session_holds_the_starter() {
    let nats = NatsServer::start().await.unwrap();
    let mut seen = fake_launcher(&nats, Answer::Stop(0, "")).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let jobs = d.join("pbs");
    std::fs::create_dir_all(&jobs).unwrap();
    let qstat = script(
        d,
        "qstat",
        &format!(
            "# qstat -f -F json ID\n[ \"$1 $2 $3\" = '-f -F json' ] || {{ echo \"unexpected: $*\" >&2; exit 2; }}\n\
             f={jobs}/\"$4\".json\n[ -f \"$f\" ] && exec cat \"$f\"\n\
             echo \"qstat: Unknown Job Id $4\" >&2\nexit 153\n",
            jobs = jobs.display()
        ),
    );
    let agent = start_agent_with(&nats, d, false, |c| {
        c.set("agent", "lrms", lrms("pbs"))
            .set("agent.pbs", "qstat", qstat.as_path())
    })
    .await;
    // The job `id` as qstat shows it: this host, `user`, `state`, in session `sid`.
    let write_job = |id: &str, user: &str, state: &str, sid: i32| {
        let json = fixture("pbs/qstat_f_F_json_CONSTRUCTED.json")
            .replace("1042.pbs01", id)
            .replace("\"euser\":\"atlas001\"", &format!("\"euser\":\"{user}\""))
            .replace("\"job_state\":\"R\"", &format!("\"job_state\":\"{state}\""))
            .replace("\"exec_host\":\"wn017/0*8\"", "\"exec_host\":\"hv1/0*8\"")
            .replace("\"session_id\":23456", &format!("\"session_id\":{sid}"));
        std::fs::write(jobs.join(format!("{id}.json")), json).unwrap();
    };

    // The job's own starter, leading the job's session: the job as qstat describes it.
    let s = Held::spawn_with(
        d,
        "ok",
        &agent.socket,
        &["setsid"],
        &[("PBS_JOBID", "1042.pbs01")],
        Some("wnodes-pbs-job-starter"),
    )
    .await;
    write_job("1042.pbs01", "nobody", "R", s.pid);
    let (code, stderr) = s.go().await;
    assert_eq!(code, Some(0), "{stderr}");
    let job = job_started(&mut seen, &agent).await;
    let run = job.run.unwrap();
    assert_eq!(run.lrms, proto::Lrms::Pbs as i32);
    assert_eq!(run.job_id, "1042.pbs01");
    assert_eq!(run.run_attempt, 2, "run_count");
    assert_eq!(job.owner.unwrap().uid, OTHER_UID);
    assert_eq!(job.queue, "grid");
    assert_eq!(job.vo, "atlas", "Account_Name");
    let r = job.resources.unwrap();
    assert_eq!((r.cores, r.memory_bytes), (8, 16 << 30));
    assert_eq!(r.walltime.unwrap().seconds, 48 * 3600);
    let env = job.payload.unwrap().environment;
    assert_eq!(env.get("PBS_JOBID").map(String::as_str), Some("1042.pbs01"));

    // The same job id claimed by a process outside the job's session.
    let s = Held::spawn(
        d,
        "outside",
        &agent.socket,
        &[],
        &[("PBS_JOBID", "1042.pbs01")],
    )
    .await;
    assert_refused(s.go().await, "PBS job 1042.pbs01's session is");
    // Another user's job, whose session it does lead.
    let s = Held::spawn(
        d,
        "root",
        &agent.socket,
        &["setsid"],
        &[("PBS_JOBID", "1043.pbs01")],
    )
    .await;
    write_job("1043.pbs01", "root", "R", s.pid);
    assert_refused(s.go().await, "PBS job 1043.pbs01 belongs to root (uid 0)");
    // A job that is not running; one PBS does not know; a job id that is no id; none.
    let s = Held::spawn(
        d,
        "queued",
        &agent.socket,
        &["setsid"],
        &[("PBS_JOBID", "1044.pbs01")],
    )
    .await;
    write_job("1044.pbs01", "nobody", "Q", s.pid);
    assert_refused(s.go().await, "is in state Q, not R");
    let s = Held::spawn(
        d,
        "unknown",
        &agent.socket,
        &["setsid"],
        &[("PBS_JOBID", "999.pbs01")],
    )
    .await;
    assert_refused(s.go().await, "PBS knows no job \"999.pbs01\"");
    let s = Held::spawn(
        d,
        "forged",
        &agent.socket,
        &["setsid"],
        &[("PBS_JOBID", "-f;x")],
    )
    .await;
    assert_refused(s.go().await, "which is no job id");
    let s = Held::spawn(d, "none", &agent.socket, &["setsid"], &[]).await;
    let (code, stderr) = s.go().await;
    assert_ne!(code, Some(0), "{stderr}");
    // Only the first starter's job was published.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                let ev = seen.recv().await.unwrap();
                if let Some(Body::JobStarted(_)) = ev.body {
                    return ev;
                }
            }
        })
        .await
        .is_err()
    );
}

/// A cgroup hierarchy this test may create groups in: cgroup2's root, or v1's memory.
fn cgroup_root() -> PathBuf {
    let root = Path::new(host::CGROUP_ROOT);
    if root.join("cgroup.procs").exists() {
        root.to_path_buf()
    } else {
        root.join("memory")
    }
}

/// Removes the test's cgroups (once their processes are gone).
struct CgroupDirs(Vec<PathBuf>);

impl Drop for CgroupDirs {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

async fn lsf_jobs_are_the_jobs_whose_cgroup_holds_the_starter() {
    let nats = NatsServer::start().await.unwrap();
    let mut seen = fake_launcher(&nats, Answer::Stop(0, "")).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let jobs = d.join("lsf");
    std::fs::create_dir_all(&jobs).unwrap();
    let not_found = r#"{"COMMAND":"bjobs","JOBS":1,"RECORDS":[{"ERROR":"Job <$4> is not found"}]}"#;
    let bjobs = script(
        d,
        "bjobs",
        &format!(
            "# bjobs -o FIELDS -json ID\n[ \"$1 $3\" = '-o -json' ] || {{ echo \"unexpected: $*\" >&2; exit 2; }}\n\
             case \"$2\" in *jobid*stat*user*queue*exec_host*nalloc_slot*runtimelimit*memlimit*) ;; *) echo \"fields: $2\" >&2; exit 2;; esac\n\
             f={jobs}/\"$4\".json\n[ -f \"$f\" ] && exec cat \"$f\"\necho '{not_found}'\n",
            jobs = jobs.display()
        ),
    );
    let bhist = script(
        d,
        "bhist",
        &format!(
            "# bhist -l -n 0 ID\n[ \"$1 $2 $3\" = '-l -n 0' ] || {{ echo \"unexpected: $*\" >&2; exit 2; }}\nexec cat {}\n",
            d.join("bhist.txt").display()
        ),
    );
    std::fs::write(
        d.join("bhist.txt"),
        fixture("lsf/bhist_l_requeued_CONSTRUCTED.txt"),
    )
    .unwrap();
    let agent = start_agent_with(&nats, d, false, |c| {
        c.set("agent", "lrms", lrms("lsf"))
            .set("agent.lsf", "bjobs", bjobs.as_path())
            .set("agent.lsf", "bhist", bhist.as_path())
    })
    .await;
    let write_job = |id: &str, user: &str| {
        let json = fixture("lsf/bjobs_o_json_CONSTRUCTED.json")
            .replace("\"JOBID\":\"5821\"", &format!("\"JOBID\":\"{id}\""))
            .replace("\"USER\":\"lhcb007\"", &format!("\"USER\":\"{user}\""))
            .replace("2*wn42:2*wn43", "4*hv1");
        std::fs::write(jobs.join(format!("{id}.json")), json).unwrap();
    };
    // LSF's cgroups for jobs 5821 and 5822.
    let top = cgroup_root()
        .join("lsf")
        .join(format!("wnodes-test-{}", std::process::id()));
    let job_cg = |id: u32| top.join(format!("job.{id}.0.1764668400"));
    let _cleanup = CgroupDirs(vec![
        top.parent().unwrap().to_path_buf(),
        top.clone(),
        job_cg(5821),
        job_cg(5822),
    ]);
    for id in [5821, 5822] {
        std::fs::create_dir_all(job_cg(id)).unwrap();
    }
    let enter = |pid: i32, id: u32| {
        std::fs::write(job_cg(id).join("cgroup.procs"), pid.to_string()).unwrap();
    };

    // The job's own starter, in the job's cgroup.
    write_job("5821", "nobody");
    let s = Held::spawn_with(
        d,
        "ok",
        &agent.socket,
        &[],
        &[("LSB_JOBID", "5821")],
        Some("wnodes-lsf-job-starter"),
    )
    .await;
    enter(s.pid, 5821);
    let (code, stderr) = s.go().await;
    assert_eq!(code, Some(0), "{stderr}");
    let job = job_started(&mut seen, &agent).await;
    let run = job.run.unwrap();
    assert_eq!(run.lrms, proto::Lrms::Lsf as i32);
    assert_eq!(run.job_id, "5821");
    assert_eq!(run.run_attempt, 2, "two starts in bhist");
    assert_eq!(job.owner.unwrap().uid, OTHER_UID);
    assert_eq!(job.queue, "grid_lhcb");
    assert_eq!(job.vo, "lhcb", "the project");
    let r = job.resources.unwrap();
    assert_eq!((r.cores, r.memory_bytes), (4, 8 << 30));
    assert_eq!(r.walltime.unwrap().seconds, 2880 * 60);

    // The job id claimed by a process in no LSF cgroup; by one in another job's cgroup.
    let s = Held::spawn(d, "outside", &agent.socket, &[], &[("LSB_JOBID", "5821")]).await;
    assert_refused(s.go().await, "is in no LSF job's cgroup");
    write_job("5822", "root");
    let s = Held::spawn(d, "claims", &agent.socket, &[], &[("LSB_JOBID", "5821")]).await;
    enter(s.pid, 5822);
    assert_refused(s.go().await, "but its process");
    // Its own cgroup's job, which is another user's.
    let s = Held::spawn(d, "root", &agent.socket, &[], &[("LSB_JOBID", "5822")]).await;
    enter(s.pid, 5822);
    assert_refused(s.go().await, "LSF job 5822 belongs to root (uid 0)");
}

async fn htcondor_jobs_are_the_jobs_of_the_root_starter_above_the_starter() {
    let nats = NatsServer::start().await.unwrap();
    let mut seen = fake_launcher(&nats, Answer::Stop(0, "")).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ads = d.join("ads");
    std::fs::create_dir_all(&ads).unwrap();
    // condor_status: the slot named in the constraint; condor_q: the job, from the schedd of
    // its GlobalJobId.
    let status = script(
        d,
        "condor_status",
        &format!(
            "# condor_status -startd -json -constraint 'Name == \"SLOT@HOST\"' -attributes A\n\
             [ \"$1 $2 $3 $5\" = '-startd -json -constraint -attributes' ] || {{ echo \"unexpected: $*\" >&2; exit 2; }}\n\
             slot=$(echo \"$4\" | sed -n 's/^Name == \"\\([a-z0-9_]*\\)@{HOST}\"$/\\1/p')\n\
             f={ads}/slot-$slot.json\n[ -n \"$slot\" ] && [ -f \"$f\" ] && exec cat \"$f\"\necho '[]'\n",
            ads = ads.display()
        ),
    );
    let q = script(
        d,
        "condor_q",
        &format!(
            "# condor_q -name SCHEDD -json ID -attributes A\n\
             [ \"$1 $2 $3 $5\" = '-name ce01.example.org -json -attributes' ] || {{ echo \"unexpected: $*\" >&2; exit 2; }}\n\
             f={ads}/job-$4.json\n[ -f \"$f\" ] && exec cat \"$f\"\necho '[]'\n",
            ads = ads.display()
        ),
    );
    // A stand-in for the startd's condor_starter: `-f -a SLOT`, the job as its child.
    let starter = script(d, "condor_starter", "shift 3\n\"$@\"\nexit $?\n");
    let agent = start_agent_with(&nats, d, false, |c| {
        c.set("agent", "lrms", lrms("htcondor"))
            .set("agent.htcondor", "condor_status", status.as_path())
            .set("agent.htcondor", "condor_q", q.as_path())
    })
    .await;
    let slot_ad = |slot: &str, proc_: u32| {
        let ad = fixture("htcondor/condor_status_startd_json_CONSTRUCTED.json")
            .replace("slot1_3@wn01.example.org", &format!("{slot}@{HOST}"))
            .replace("#4711.0#", &format!("#4711.{proc_}#"));
        std::fs::write(ads.join(format!("slot-{slot}.json")), ad).unwrap();
    };
    let job_ad = |slot: &str, proc_: u32, owner: &str| {
        let ad = fixture("htcondor/condor_q_json_CONSTRUCTED.json")
            .replace("slot1_3@wn01.example.org", &format!("{slot}@{HOST}"))
            .replace("#4711.0#", &format!("#4711.{proc_}#"))
            .replace("\"ProcId\": 0", &format!("\"ProcId\": {proc_}"))
            .replace("\"Owner\": \"cms042\"", &format!("\"Owner\": \"{owner}\""));
        std::fs::write(ads.join(format!("job-4711.{proc_}.json")), ad).unwrap();
    };
    let starter_s = starter.to_str().unwrap();

    // A job starter below slot1_3's root condor_starter: the slot's job, whatever the job's own
    // (user-writable) job ad says.
    std::fs::create_dir_all(d.join("held")).unwrap();
    let forged_ad = d.join("held/.job.ad");
    std::fs::write(
        &forged_ad,
        "ClusterId = 4711\nProcId = 1\nOwner = \"root\"\nNumJobStarts = 9\n",
    )
    .unwrap();
    slot_ad("slot1_3", 0);
    job_ad("slot1_3", 0, "nobody");
    let s = Held::spawn_with(
        d,
        "ok",
        &agent.socket,
        &[starter_s, "-f", "-a", "slot1_3"],
        &[("_CONDOR_JOB_AD", forged_ad.to_str().unwrap())],
        Some("wnodes-htcondor-job-wrapper"),
    )
    .await;
    let (code, stderr) = s.go().await;
    assert_eq!(code, Some(0), "{stderr}");
    let job = job_started(&mut seen, &agent).await;
    let run = job.run.unwrap();
    assert_eq!(run.lrms, proto::Lrms::Htcondor as i32);
    assert_eq!(run.job_id, "4711.0");
    assert_eq!(run.run_attempt, 2, "NumJobStarts");
    assert_eq!(job.owner.unwrap().uid, OTHER_UID);
    assert_eq!(job.vo, "cms", "x509UserProxyVOName");
    assert_eq!(job.queue, "group_cms", "the accounting group");
    let r = job.resources.unwrap();
    assert_eq!((r.cores, r.memory_bytes), (4, 8000 << 20));
    assert_eq!(r.walltime.unwrap().seconds, 172_800);

    // No condor_starter above it; one that is not root's (a user's look-alike).
    let s = Held::spawn(
        d,
        "none",
        &agent.socket,
        &[],
        &[("_CONDOR_JOB_AD", "/tmp/x")],
    )
    .await;
    assert_refused(
        s.go().await,
        "does not descend from a condor_starter run by root",
    );
    let nobody = format!("--reuid={OTHER_UID}");
    let s = Held::spawn(
        d,
        "fake",
        &agent.socket,
        &[
            "setpriv",
            &nobody,
            "--regid=65534",
            "--clear-groups",
            starter_s,
            "-f",
            "-a",
            "slot1_3",
        ],
        &[("_CONDOR_JOB_AD", "/tmp/x")],
    )
    .await;
    assert_refused(
        s.go().await,
        "does not descend from a condor_starter run by root",
    );
    // A slot whose job is another user's; a slot that runs no job.
    slot_ad("slot1_4", 1);
    job_ad("slot1_4", 1, "root");
    let s = Held::spawn(
        d,
        "root",
        &agent.socket,
        &[starter_s, "-f", "-a", "slot1_4"],
        &[("_CONDOR_JOB_AD", "/tmp/x")],
    )
    .await;
    assert_refused(s.go().await, "HTCondor job 4711.1 belongs to root (uid 0)");
    std::fs::write(
        ads.join("slot-slot1_5.json"),
        format!("[\n{{\n  \"Name\": \"slot1_5@{HOST}\",\n  \"State\": \"Unclaimed\"\n}}\n]\n"),
    )
    .unwrap();
    let s = Held::spawn(
        d,
        "idle",
        &agent.socket,
        &[starter_s, "-f", "-a", "slot1_5"],
        &[("_CONDOR_JOB_AD", "/tmp/x")],
    )
    .await;
    assert_refused(s.go().await, "runs no job");
}

fn main() -> std::process::ExitCode {
    host::main(vec![
        host_test!(multi_thread pbs_jobs_are_the_jobs_whose_session_holds_the_starter needs NEEDS),
        host_test!(multi_thread lsf_jobs_are_the_jobs_whose_cgroup_holds_the_starter needs NEEDS_CGROUPS),
        host_test!(
            multi_thread htcondor_jobs_are_the_jobs_of_the_root_starter_above_the_starter needs NEEDS
        ),
    ])
}
