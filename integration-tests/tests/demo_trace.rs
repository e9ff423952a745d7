//! The demo's trace reaches a receiver on the host: `wnodes-dev demo` (the binary
//! `scripts/demo.sh` runs) with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at an OTLP collector on
//! the host's `127.0.0.1`. As root the demo runs its stack in a private network namespace, where
//! `127.0.0.1` is not the host's loopback: the spans get out through the stack's OTLP relay
//! (`wnodes_devstack::OtlpRelay`). This test itself stays in the host's namespace.
//!
//! Needs what `job_flow.rs` needs (root, `/dev/fuse`, qemu, the test guest) and the binaries
//! (`cargo build --workspace --bins`); named `vm_*`: it boots a VM, one at a time.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Stdio,
    time::Duration,
};

use wnodes_devstack::options::default_bin_dir;
use wnodes_integration_tests::jobs::can_run;
use wnodes_testkit::{CollectedSpan, OtlpCollector};

/// The demo boots one VM under TCG; generous for a loaded 2-core machine.
const DEMO_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread")]
async fn vm_the_demo_exports_one_trace_with_spans_from_all_seven_services_to_the_hosts_loopback() {
    if !can_run() {
        return;
    }
    // On the host's loopback, in this (the host's) network namespace.
    let collector = OtlpCollector::start().await.unwrap();
    let endpoint = collector.endpoint();
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
    let work = tempfile::tempdir().unwrap();
    let demo = default_bin_dir().unwrap().join("wnodes-dev");
    assert!(
        demo.is_file(),
        "{} missing: cargo build --workspace --bins",
        demo.display()
    );
    let run = tokio::process::Command::new(&demo)
        .arg("demo")
        .arg("--work-dir")
        .arg(work.path().join("demo"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEMO_TIMEOUT, run)
        .await
        .expect("the demo finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "demo failed: {}", out.status);
    assert!(stdout.contains("== demo OK"), "{stdout}");
    // The one line saying where spans go; as root, through the relay.
    assert!(
        stdout.contains(&format!(
            "== spans: every service exports to {endpoint} (relayed out of the private network namespace)"
        )),
        "{stdout}"
    );
    // "wnodes-bridge: job … started on … (trace <32 hex>)", among the job starter's progress.
    let trace_id = stdout
        .split("(trace ")
        .nth(1)
        .and_then(|s| s.get(..32))
        .unwrap_or_else(|| panic!("no trace id in {stdout}"))
        .to_owned();
    assert!(
        trace_id.chars().all(|c| c.is_ascii_hexdigit()),
        "{trace_id}"
    );

    // The demo stopped its stack before exiting (SIGTERM flushes every service's spans), so
    // everything should be here already; the wait only covers a slow last export.
    let want: BTreeSet<String> = [
        "bridge",
        "launcher",
        "image",
        "scratch",
        "network",
        "gateway",
        "accounting",
    ]
    .iter()
    .map(|s| format!("wnodes-{s}"))
    .collect();
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
    let trace: Vec<&CollectedSpan> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let mut by_service = BTreeMap::new();
    for s in &trace {
        *by_service.entry(s.service_name.clone()).or_insert(0_usize) += 1;
    }
    eprintln!(
        "trace {trace_id}: {} spans by service {by_service:?}",
        trace.len()
    );
    // One trace: a single root, and every other span's parent inside it.
    let ids: BTreeSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    let roots = trace.iter().filter(|s| s.parent_span_id.is_empty()).count();
    assert_eq!(roots, 1, "one root span: {trace:#?}");
    for s in &trace {
        assert!(
            s.parent_span_id.is_empty() || ids.contains(s.parent_span_id.as_str()),
            "span {} ({}) has a parent outside the trace: {}",
            s.name,
            s.service_name,
            s.parent_span_id
        );
    }
    let services: BTreeSet<String> = by_service.into_keys().collect();
    assert_eq!(services, want);
}
