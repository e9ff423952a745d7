//! The demo's trace reaches a receiver on the host: `wnodes-dev demo` (the binary
//! `scripts/demo.sh` runs) with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at an OTLP collector on
//! the host's `127.0.0.1`, in both network modes. As root the demo runs its stack in a private
//! network namespace, where `127.0.0.1` is not the host's loopback: the spans get out through the
//! stack's OTLP relay (`wnodes_devstack::OtlpRelay`). Run as uid 65534 (`setpriv`) it uses qemu
//! user-mode networking on the host's loopback and the services export there directly. This test
//! itself stays in the host's namespace.
//!
//! Needs what `job_flow.rs` needs (`wnodes_testkit::vm::JOB_NEEDS`: root, `/dev/fuse`, qemu, the test guest, ...)
//! and the binaries (`cargo build --workspace --bins`); named `vm_*`: they boot VMs, one at a
//! time. Host tests (`wnodes_testkit::host`): where a precondition is missing they are skipped,
//! or fail naming it under `WNODES_HOST_TESTS=required`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure

use std::{collections::BTreeSet, os::unix::fs::PermissionsExt, process::Stdio, time::Duration};

use wnodes_devstack::options::{default_bin_dir, workspace_root};
use wnodes_integration_tests::jobs::seven_services;
use wnodes_testkit::{
    OtlpCollector,
    host::{self, Precondition},
    host_test,
    otlp::{one_trace, spans_by_service, trace_id_in},
    vm::JOB_NEEDS,
};

/// The demo boots one VM under TCG; generous for a loaded 2-core machine.
const DEMO_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `wnodes-dev demo` (through `setpriv` as `as_user` when given) with
/// `OTEL_EXPORTER_OTLP_ENDPOINT` = `endpoint`; returns its stdout after checking it succeeded.
async fn run_demo(endpoint: &str, as_user: Option<u32>) -> String {
    let work = tempfile::tempdir().unwrap();
    // The demo creates its work dir inside: let another uid do that too.
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let demo = default_bin_dir().unwrap().join("wnodes-dev");
    assert!(
        demo.is_file(),
        "{} missing: cargo build --workspace --bins",
        demo.display()
    );
    let mut cmd = match as_user {
        Some(uid) => {
            let mut c = tokio::process::Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg(&demo);
            c
        }
        None => tokio::process::Command::new(&demo),
    };
    let run = cmd
        .arg("demo")
        .arg("--work-dir")
        .arg(work.path().join("demo"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEMO_TIMEOUT, run)
        .await
        .expect("the demo finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "demo failed: {}", out.status);
    assert!(stdout.contains("== demo OK"), "{stdout}");
    // The demo's records exported for APEL, into a directory that outlives the demo.
    let outgoing = stdout
        .lines()
        .find_map(|l| l.strip_prefix("== apel outgoing: "))
        .unwrap_or_else(|| panic!("no apel outgoing line: {stdout}"));
    let dir = outgoing.split(" (").next().unwrap_or_default();
    assert!(std::path::Path::new(dir).is_dir(), "{dir} is gone");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("== usage store: sqlite://")),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(dir);
    stdout
}

/// Waits for the job's trace (its id from the demo's output) to hold spans of all seven
/// services, then checks it is one trace: a single root, every other span's parent inside it,
/// and no service but the seven.
async fn check_one_trace_of_seven_services(collector: &OtlpCollector, stdout: &str) {
    // "wnodes-bridge: job … started on … (trace <32 hex>)", among the job starter's progress.
    let trace_id = trace_id_in(stdout).unwrap_or_else(|| panic!("no trace id in {stdout}"));
    // The demo stopped its stack before exiting (SIGTERM flushes every service's spans), so
    // everything should be here already; the wait only covers a slow last export.
    let want = seven_services();
    let spans = collector
        .wait_for(
            Duration::from_secs(30),
            "spans of all seven services in the demo job's trace",
            |s| {
                let seen: BTreeSet<&str> = s
                    .iter()
                    .filter(|s| s.trace_id == trace_id)
                    .map(|s| s.service_name.as_str())
                    .collect();
                want.iter().all(|svc| seen.contains(svc.as_str()))
            },
        )
        .await
        .unwrap();
    let trace = one_trace(&spans, &trace_id);
    let by_service = spans_by_service(&spans, &trace_id);
    eprintln!(
        "trace {trace_id}: {} spans by service {by_service:?}",
        trace.len()
    );
    let services: BTreeSet<String> = by_service.into_keys().collect();
    assert_eq!(services, want);
}

/// As root: tap networking in the demo's private network namespace, spans through the relay.
async fn vm_the_demo_exports_one_trace_with_spans_from_all_seven_services_to_the_hosts_loopback() {
    // On the host's loopback, in this (the host's) network namespace.
    let collector = OtlpCollector::start().await.unwrap();
    let endpoint = collector.endpoint();
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
    let stdout = run_demo(&endpoint, None).await;
    // The one line saying where spans go; as root, through the relay.
    assert!(
        stdout.contains(&format!(
            "== spans: every service exports to {endpoint} (relayed out of the private network namespace)"
        )),
        "{stdout}"
    );
    check_one_trace_of_seven_services(&collector, &stdout).await;
}

/// `Ok` when uid 65534 can run the demo binary and read the test guest (a checkout under a
/// directory only root can enter cannot).
fn nobody_can_run_the_demo() -> Result<(), String> {
    let demo = default_bin_dir().map(|d| d.join("wnodes-dev"));
    let rootfs = workspace_root().join(".cache/guest/rootfs.ext4");
    let as_nobody = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ok = demo.is_ok_and(|demo| {
        as_nobody(&[demo.as_os_str(), "--version".as_ref()])
            && as_nobody(&["test".as_ref(), "-r".as_ref(), rootfs.as_os_str()])
    });
    if ok {
        Ok(())
    } else {
        Err(NOBODY_RUNS_THE_DEMO.into())
    }
}

const NOBODY_RUNS_THE_DEMO: &str =
    "uid 65534 able to run wnodes-dev and read the test guest (through setpriv)";

/// [`JOB_NEEDS`], and uid 65534 able to run the demo.
const NEEDS_AS_NOBODY: &[Precondition] = &{
    let mut all =
        [Precondition::Other(NOBODY_RUNS_THE_DEMO, nobody_can_run_the_demo); JOB_NEEDS.len() + 1];
    let mut i = 0;
    while i < JOB_NEEDS.len() {
        all[i] = JOB_NEEDS[i];
        i += 1;
    }
    all
};

/// Not root (uid 65534 through `setpriv`): qemu user-mode networking on the host's loopback,
/// spans straight to the endpoint.
async fn vm_the_demo_without_root_exports_its_trace_to_the_hosts_loopback_too() {
    let collector = OtlpCollector::start().await.unwrap();
    let endpoint = collector.endpoint();
    let stdout = run_demo(&endpoint, Some(65534)).await;
    assert!(
        stdout.contains("== not root: qemu user-mode networking"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("== spans: every service exports to {endpoint}\n")),
        "{stdout}"
    );
    check_one_trace_of_seven_services(&collector, &stdout).await;
}

fn main() -> std::process::ExitCode {
    host::main(vec![
        host_test!(
            multi_thread vm_the_demo_exports_one_trace_with_spans_from_all_seven_services_to_the_hosts_loopback
            needs JOB_NEEDS
        ),
        host_test!(
            multi_thread vm_the_demo_without_root_exports_its_trace_to_the_hosts_loopback_too
            needs NEEDS_AS_NOBODY
        ),
    ])
}
