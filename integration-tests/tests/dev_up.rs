//! `wnodes-dev up` keeps the stack running: a job submitted with the command line it prints
//! runs, `wnodesctl` pointed at it as it says reads the services' heartbeats, prefetches the
//! job's image (found cached), reads the VMs, the durables and the dead letters, a `vm.stopped`
//! dead-lettered on purpose is shown, redriven once and the VM's scratch released, and
//! `wnodes-dev down` stops it and finds nothing left behind.
//!
//! Needs what `job_flow.rs` needs (`wnodes_testkit::vm::JOB_NEEDS`) and the binaries
//! (`cargo build --workspace --bins`); named `vm_*`: it boots a VM. A host test: skipped where a
//! precondition is missing, or failed naming it under `WNODES_HOST_TESTS=required`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{path::Path, process::Stdio, time::Duration};

use tokio::io::{AsyncBufReadExt, BufReader};
use wnodes_devstack::options::default_bin_dir;
use wnodes_testkit::{host, host_test, vm::JOB_NEEDS};

/// `program args…`, inside the stack's network namespace when it has one.
fn command(netns: Option<&str>, program: &Path) -> std::process::Command {
    match netns {
        Some(ns) => {
            let mut c = std::process::Command::new("nsenter");
            c.arg(format!("--net={ns}")).arg(program);
            c
        }
        None => std::process::Command::new(program),
    }
}

/// Polls `f` every 200 ms until it gives a value; panics naming `what` after `within`.
fn wait_for<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A directory made immutable (`chattr +i`: nothing in it can be removed) until dropped.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn new(dir: &Path) -> Self {
        let st = std::process::Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "chattr +i {}", dir.display());
        Self(dir.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

fn output(mut c: std::process::Command) -> (i32, String, String) {
    let o = c.stdin(Stdio::null()).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

async fn vm_wnodes_dev_up_serves_jobs_and_wnodesctl_until_down() {
    let bin = default_bin_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("up");
    let mut up = tokio::process::Command::new(bin.join("wnodes-dev"))
        .arg("up")
        .arg("--work-dir")
        .arg(&work)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(180), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            seen.push_str(&l);
            seen.push('\n');
            if l.starts_with("   stop:") {
                return;
            }
        }
        panic!("wnodes-dev up ended: {seen}");
    })
    .await
    .unwrap_or_else(|_| panic!("wnodes-dev up not up within 180 s: {seen}"));
    assert!(seen.contains("== stack up (pid"), "{seen}");
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join("wnodes-dev.json")).unwrap()).unwrap();
    let netns = info["netns"].as_str();
    let s = |k: &str| info[k].as_str().unwrap().to_owned();

    // A job, as the printed submit line runs it.
    let (uid, user) = if nix::unistd::geteuid().is_root() {
        ("65534".to_owned(), "nobody".to_owned())
    } else {
        let uid = nix::unistd::getuid().as_raw().to_string();
        (uid.clone(), uid)
    };
    let mut submit = command(netns, &bin.join("wnodes-bridge"));
    submit
        .env("WNODES_CONFIG", s("config"))
        .env("WNODES_NATS__CREDS_FILE", s("agent_creds"))
        .args([
            "submit", "--vo", "demo", "--user", &user, "--uid", &uid, "--gid", &uid,
        ])
        .args(["--job-id", "up-1", "--", "/bin/echo", "hello from up"]);
    let (code, stdout, stderr) = output(submit);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("hello from up"), "{stdout}{stderr}");
    let run = stderr
        .lines()
        .find_map(|l| l.split("run ").nth(1)?.split(':').next())
        .unwrap_or_else(|| panic!("no run key in: {stderr}"))
        .to_owned();

    // wnodesctl job: the run's events, phases and trace id (usage.recorded comes last).
    let job = |netns: Option<&str>| {
        let mut c = command(netns, &bin.join("wnodesctl"));
        c.args([
            "job",
            "--nats",
            &s("nats_url"),
            "--creds",
            &s("monitor_creds"),
            &run,
            "--json",
        ]);
        output(c)
    };
    let mut report = serde_json::Value::Null;
    for _ in 0..50 {
        let (code, stdout, stderr) = job(netns);
        assert_eq!(code, 0, "{stderr}");
        report = serde_json::from_str(&stdout).unwrap();
        let types: Vec<&str> = report["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        if types.contains(&"usage.recorded") {
            assert!(types.starts_with(&["job.started"]), "{report}");
            assert!(
                types.contains(&"vm.running") && types.contains(&"vm.stopped"),
                "{report}"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let trace = report["trace_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(trace.len(), 32, "{report}");
    assert!(
        report["phases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["phase"] == "job.started → usage.recorded (total)"),
        "{report}"
    );

    // wnodesctl vms: the job's VM, stopped (none left running).
    let vms = |all: bool| {
        let mut c = command(netns, &bin.join("wnodesctl"));
        c.args([
            "vms",
            "--nats",
            &s("nats_url"),
            "--creds",
            &s("monitor_creds"),
            "--json",
        ]);
        if all {
            c.arg("--all");
        }
        let (code, stdout, stderr) = output(c);
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
    };
    let ended = vms(true);
    let ours: Vec<&serde_json::Value> = ended
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["run"] == run.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "{ended}");
    assert_eq!(ours[0]["state"], "stopped", "{ended}");
    assert_eq!(ours[0]["exit_code"], 0, "{ended}");
    assert_eq!(vms(false), serde_json::json!([]), "no VM left running");

    // wnodesctl hosts: every service of the stack beating, running and ready.
    let mut hosts = command(netns, &bin.join("wnodesctl"));
    hosts.args([
        "hosts",
        "--check",
        "--json",
        "--nats",
        &s("nats_url"),
        "--creds",
        &s("monitor_creds"),
    ]);
    let (code, stdout, stderr) = output(hosts);
    assert_eq!(code, 0, "every service running and ready: {stdout}{stderr}");
    let beats: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let mut services: Vec<&str> = beats
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            assert_eq!(b["state"], "running", "{b}");
            assert_eq!(b["ready"], true, "{b}");
            b["service"].as_str().unwrap()
        })
        .collect();
    services.sort_unstable();
    assert_eq!(
        services,
        [
            "accounting",
            "bridge",
            "gateway",
            "image",
            "launcher",
            "network",
            "scratch"
        ],
        "{beats}"
    );
    // The table: a row per service, by host, and the summary.
    let mut table = command(netns, &bin.join("wnodesctl"));
    table.args([
        "hosts",
        "--nats",
        &s("nats_url"),
        "--creds",
        &s("monitor_creds"),
    ]);
    let (code, stdout, stderr) = output(table);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.lines().any(|l| l.starts_with("hv1.wnodes.dev")
            && l.contains(" launcher ")
            && l.contains(" running ")
            && l.contains(" yes ")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("(central)") && l.contains(" accounting ")),
        "{stdout}"
    );
    assert!(
        stdout.contains("7 service(s) on 1 host(s) and central; 0 stale, stopped or not ready"),
        "{stdout}"
    );

    // wnodesctl prefetch (as the admin): the job's image is already in the host's cache.
    let mut prefetch = command(netns, &bin.join("wnodesctl"));
    prefetch.args([
        "prefetch",
        "--image",
        "demo",
        "--hosts",
        "hv1.wnodes.dev",
        "--json",
        "--nats",
        &s("nats_url"),
        "--creds",
        &s("admin_creds"),
    ]);
    let (code, stdout, stderr) = output(prefetch);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let answers: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answers[0]["host"], "hv1.wnodes.dev", "{answers}");
    assert_eq!(answers[0]["status"], "cached", "{answers}");
    assert_eq!(answers[0]["ok"], true, "{answers}");

    // wnodesctl, as the monitor and as the admin.
    let mut backlog = command(netns, &bin.join("wnodesctl"));
    backlog.args([
        "backlog",
        "--json",
        "--nats",
        &s("nats_url"),
        "--creds",
        &s("monitor_creds"),
    ]);
    let (code, stdout, stderr) = output(backlog);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let durables: Vec<&str> = report["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["durable"].as_str().unwrap())
        .collect();
    assert_eq!(durables.len(), 6, "{report}");
    assert!(durables.contains(&"accounting"), "{report}");
    let mut dlq = command(netns, &bin.join("wnodesctl"));
    dlq.args([
        "dlq",
        "--nats",
        &s("nats_url"),
        "--creds",
        &s("admin_creds"),
        "list",
        "--json",
    ]);
    let (code, stdout, stderr) = output(dlq);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "[]", "no dead letters after a good job");

    // A vm.stopped dead-lettered on purpose: while a second job's VM runs, its scratch
    // directory is made immutable (chattr +i), so scratch cannot remove the volume and its
    // release fails until its attempts are spent. Then the directory is mended, `dlq redrive`
    // gives scratch the vm.stopped again and the volume goes; a second redrive finds nothing.
    let volumes = work.join("state/scratch/volumes");
    let mut second = command(netns, &bin.join("wnodes-bridge"));
    second
        .env("WNODES_CONFIG", s("config"))
        .env("WNODES_NATS__CREDS_FILE", s("agent_creds"))
        .args([
            "submit", "--vo", "demo", "--user", &user, "--uid", &uid, "--gid", &uid,
        ])
        .args(["--job-id", "up-2", "--", "/bin/sleep", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let second = second.spawn().unwrap();
    let volume = wait_for(
        Duration::from_secs(60),
        "the second job's scratch volume",
        || {
            std::fs::read_dir(&volumes)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .next()
        },
    );
    let immutable = Immutable::new(&volumes);
    let o = second.wait_with_output().unwrap();
    assert!(o.status.success(), "{o:?}");
    let dlq = |args: &[&str]| {
        let mut c = command(netns, &bin.join("wnodesctl"));
        c.args([
            "dlq",
            "--nats",
            &s("nats_url"),
            "--creds",
            &s("admin_creds"),
        ])
        .args(args);
        output(c)
    };
    let letter = wait_for(Duration::from_secs(60), "scratch's dead letter", || {
        let (code, stdout, _) = dlq(&["list", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&stdout).ok().filter(|_| code == 0)?;
        list.as_array()?
            .iter()
            .find(|d| {
                d["subject"]
                    .as_str()
                    .is_some_and(|s| s.ends_with(".vm.stopped"))
                    && d["consumer"]
                        .as_str()
                        .is_some_and(|c| c.starts_with("scratch"))
            })
            .cloned()
    });
    assert_eq!(letter["reason"], "exhausted", "{letter}");
    assert!(
        volume.exists(),
        "the volume stays while its release is dead-lettered"
    );
    drop(immutable);
    let seq = letter["sequence"].as_u64().unwrap().to_string();
    // dlq show: the entry whole, with the message's headers and its event.
    let (code, stdout, stderr) = dlq(&["show", &seq, "--json"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["sequence"], letter["sequence"], "{shown}");
    assert_eq!(shown["reason"], "exhausted", "{shown}");
    assert_eq!(shown["run"], letter["run"], "{shown}");
    assert_eq!(shown["consumer"], "scratch-hv1_wnodes_dev", "{shown}");
    assert!(
        shown["subject"].as_str().unwrap().ends_with(".vm.stopped"),
        "{shown}"
    );
    let (code, stdout, stderr) = dlq(&["redrive", &seq, "--yes"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("redriven 1 of 1"), "{stdout}{stderr}");
    wait_for(Duration::from_secs(30), "the redriven release", || {
        (!volume.exists()).then_some(())
    });
    let (code, stdout, stderr) = dlq(&["redrive", &seq, "--yes"]);
    assert_eq!(
        code, 1,
        "a second redrive of the same entry: {stdout}{stderr}"
    );
    assert!(stderr.contains("not found"), "{stderr}");
    assert!(stdout.contains("redriven 0 of 1"), "{stdout}");
    let (code, stdout, stderr) = dlq(&["list", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "[]", "the redriven entry is gone");
    let (code, _, stderr) = dlq(&["show", &seq]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("no dead letter {seq}")),
        "{stderr}"
    );

    // down: the stack stops and nothing is left behind.
    let (code, stdout, stderr) = output({
        let mut c = std::process::Command::new(bin.join("wnodes-dev"));
        c.arg("down").arg("--work-dir").arg(&work);
        c
    });
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("== nothing left behind"), "{stdout}");
    let status = tokio::time::timeout(Duration::from_secs(30), up.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "wnodes-dev up: {status}");
    assert!(!work.join("wnodes-dev.json").exists());
    // A second down finds nothing to stop.
    let (code, _, stderr) = output({
        let mut c = std::process::Command::new(bin.join("wnodes-dev"));
        c.arg("down").arg("--work-dir").arg(&work);
        c
    });
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no stack is up"), "{stderr}");
}

fn main() -> std::process::ExitCode {
    host::main(vec![host_test!(
        multi_thread vm_wnodes_dev_up_serves_jobs_and_wnodesctl_until_down
        needs JOB_NEEDS
    )])
}
