//! The usage exporter (`wnodes-usage`) beside a real accounting: its counters on `/metrics`
//! equal the sums of accounting's store, per (VO, group, role), after it was killed (SIGKILL)
//! in the middle of a run and started again.
//!
//! The binaries are those `cargo build --workspace --bins` put in `target/debug`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use wnodes_bus::{proto, proto::event::Body, roles};
use wnodes_testkit::{
    NatsServer, ServiceProcess,
    bus::connect,
    events::{Events, RunRefExt, run, vm_stopped, vm_usage},
    process::ProcessBuilder,
    wait_until,
};

const HOST: &str = "hv1.example.org";

fn bin(name: &str) -> PathBuf {
    wnodes_devstack::options::default_bin_dir()
        .expect("the binaries (cargo build --workspace --bins)")
        .join(name)
}

/// (VO, first FQAN) of run `i`.
fn identity(i: usize) -> (&'static str, &'static str) {
    match i % 3 {
        0 => ("atlas", "/atlas/Role=production/Capability=NULL"),
        1 => ("atlas", "/atlas/it/Capability=NULL"),
        _ => ("cms", "/cms/Role=pilot/Capability=NULL"),
    }
}

async fn publish_runs(bus: &wnodes_bus::Bus, runs: std::ops::Range<usize>) {
    let events = Events::new(HOST, "test");
    for i in runs {
        let r = run(&format!("{}", 500 + i)).site("INFN-T1");
        let (vo, fqan) = identity(i);
        let job = proto::JobDescription {
            run: Some(r.clone()),
            vo: vo.into(),
            owner: Some(proto::JobOwner {
                user: format!("u{}", i % 4),
                uid: 1000,
                gid: 1000,
            }),
            identity: Some(proto::GridIdentity {
                x509_dn: "/DC=org/CN=someone".into(),
                voms_fqans: vec![fqan.into()],
                ..Default::default()
            }),
            host: HOST.into(),
            ..Default::default()
        };
        bus.publish(&events.build(
            &r,
            Body::JobStarted(proto::JobStarted {
                job: Some(job),
                started_at: None,
            }),
        ))
        .await
        .unwrap();
        bus.publish(&events.build(
            &r,
            Body::VmStopped(proto::VmStopped {
                usage: Some(vm_usage(
                    1.25 * i as f64,
                    1 << 20,
                    Duration::from_secs(10 + i as u64),
                    1 + (i % 2) as u32,
                )),
                ..vm_stopped(&format!("vm-{:012}", i))
            }),
        ))
        .await
        .unwrap();
    }
}

/// `wnodes_usage_<name>_total` per (vo, group, role), from a `/metrics` text.
fn series(metrics: &str, name: &str) -> BTreeMap<(String, String, String), f64> {
    let prefix = format!("wnodes_usage_{name}_total{{");
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (labels, value) = rest.split_once("} ")?;
            let label = |k: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                    .map(|v| v.trim_end_matches('"').to_owned())
                    .unwrap_or_default()
            };
            Some((
                (label("vo"), label("group"), label("role")),
                value.trim().parse().ok()?,
            ))
        })
        .collect()
}

async fn metrics_of(addr: &str) -> String {
    wnodes_testkit::http::get(addr, "/metrics")
        .await
        .unwrap_or_default()
}

async fn http_addr(p: &mut ServiceProcess) -> String {
    p.wait_stderr("the starting line", Duration::from_secs(30), |line| {
        let rest = line.split("http_addr=").nth(1)?;
        Some(rest.split_whitespace().next()?.to_owned())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_equal_the_store_after_a_killed_and_restarted_exporter() {
    let nats = NatsServer::start().await.unwrap();
    let (acct_dir, usage_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let acct_id = nats.identity(&roles::ACCOUNTING, "").await.unwrap();
    // A quick consumer (its durable provisioned to match): what the killed process held is
    // redelivered after 3 s, not 30.
    let tuning = wnodes_bus::ConsumerTuning {
        ack_wait: Duration::from_secs(3),
        handler_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let usage_id = nats
        .identity_tuned(&roles::USAGE, "", &tuning)
        .await
        .unwrap();
    let accounting = || {
        ServiceProcess::builder(bin("wnodes-accounting"), acct_dir.path()).runtime_env(
            &acct_id,
            "INFN-T1",
            "central.example.org",
            acct_dir.path(),
        )
    };
    let usage = || -> ProcessBuilder {
        ServiceProcess::builder(bin("wnodes-usage"), usage_dir.path())
            .runtime_env(
                &usage_id,
                "INFN-T1",
                "central.example.org",
                usage_dir.path(),
            )
            .wnodes_env("USAGE__REFRESH", "200ms")
            .wnodes_env("CONSUMER__ACK_WAIT", "3s")
            .wnodes_env("CONSUMER__HANDLER_TIMEOUT", "2s")
            .stderr_to(&usage_dir.path().join("usage.stderr"))
    };
    let mut acct = accounting().arg("serve").spawn().unwrap();
    let mut exporter = usage().arg("serve").spawn().unwrap();
    let addr = http_addr(&mut exporter).await;
    let bus = connect(&nats.admin(), "test@hv1.example.org")
        .await
        .unwrap();

    publish_runs(&bus, 0..12).await;
    // Some usage counted, then SIGKILL: whatever it had handled but not acked comes again.
    wait_until(Duration::from_secs(30), "some usage counted", || async {
        let jobs: f64 = series(&metrics_of(&addr).await, "jobs").values().sum();
        (jobs >= 3.0).then_some(())
    })
    .await
    .unwrap();
    exporter.kill().unwrap();
    publish_runs(&bus, 12..30).await;
    let mut exporter = usage().arg("serve").spawn().unwrap();
    // The restarted process logs its own starting line after the first one's.
    let addr = exporter
        .wait_stderr("the second starting line", Duration::from_secs(30), |_| {
            let log = std::fs::read_to_string(usage_dir.path().join("usage.stderr")).ok()?;
            let last = log.lines().filter(|l| l.contains("http_addr=")).nth(1)?;
            let rest = last.split("http_addr=").nth(1)?;
            Some(rest.split_whitespace().next()?.to_owned())
        })
        .await
        .unwrap();
    let metrics = wait_until(Duration::from_secs(60), "every run counted", || async {
        let m = metrics_of(&addr).await;
        let jobs: f64 = series(&m, "jobs").values().sum();
        (jobs >= 30.0).then_some(m)
    })
    .await
    .unwrap();

    // The store's sums, from the records themselves.
    let records = accounting()
        .arg("records")
        .arg("--json")
        .json_lines()
        .await
        .unwrap();
    assert_eq!(records.len(), 30);
    let mut expect: BTreeMap<(String, String, String), [f64; 4]> = BTreeMap::new();
    for r in &records {
        let fqans: Vec<String> = serde_json::from_str(r["fqans"].as_str().unwrap()).unwrap();
        let a = wnodes_apel::fqan::parse(&fqans[0]).unwrap();
        let key = (
            r["vo"].as_str().unwrap().to_owned(),
            a.group,
            a.role.unwrap_or_default(),
        );
        let (wall, cores) = (
            r["wall_seconds"].as_f64().unwrap(),
            r["cores"].as_f64().unwrap(),
        );
        let e = expect.entry(key).or_default();
        e[0] += 1.0;
        e[1] += r["cpu_seconds"].as_f64().unwrap();
        e[2] += wall;
        e[3] += wall * cores;
    }
    assert_eq!(expect.len(), 3, "{expect:?}");
    for (i, name) in ["jobs", "cpu_seconds", "wall_seconds", "core_seconds"]
        .into_iter()
        .enumerate()
    {
        let got = series(&metrics, name);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expect.keys().collect::<Vec<_>>(),
            "{name}: {metrics}"
        );
        for (k, want) in &expect {
            let have = got[k];
            assert!(
                (have - want[i]).abs() <= 1e-9 * want[i].abs().max(1.0),
                "{name}{k:?}: {have} on /metrics, {} in the store",
                want[i]
            );
        }
    }
    assert!(
        metrics.contains(
            "wnodes_usage_jobs_total{vo=\"atlas\",group=\"/atlas\",role=\"Role=production\"}"
        ),
        "{metrics}"
    );
    assert!(!metrics.contains("user=\""), "no user label by default");

    let status = exporter.terminate(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", exporter.stderr());
    let status = acct.terminate(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", acct.stderr());
}
