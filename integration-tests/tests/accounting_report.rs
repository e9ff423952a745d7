//! `wnodesctl accounting report` against a real `wnodes-accounting serve` with its report API
//! on: usage made from events, summed per VO and month, per user, in total, as JSON, CSV and a
//! table, equal to the sums of the records themselves (`records --json`); a reversed period is
//! refused with the reason. On both stores: `<test>::sqlite` and `<test>::postgres`.
//!
//! The binaries are those `cargo build --workspace --bins` put in `target/debug`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{path::PathBuf, process::Output, time::Duration};

use wnodes_bus::{proto, proto::event::Body, roles};
use wnodes_testkit::{
    NatsServer, ServiceProcess,
    bus::connect,
    events::{Events, RunRefExt, run, vm_stopped, vm_usage},
    wait_until,
};

const HOST: &str = "hv1.example.org";

fn bin(name: &str) -> PathBuf {
    wnodes_devstack::options::default_bin_dir()
        .expect("the binaries (cargo build --workspace --bins)")
        .join(name)
}

fn wnodesctl(addr: &str, args: &[&str]) -> Output {
    std::process::Command::new(bin("wnodesctl"))
        .args(["accounting", "report", "--addr", &format!("http://{addr}")])
        .args(args)
        .output()
        .unwrap()
}

fn ts(rfc3339: &str) -> Option<prost_types::Timestamp> {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap();
    Some(prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: 0,
    })
}

/// One run: (job, VO, user, queue, CPU seconds, wall seconds, cores, stopped at).
type Run = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    f64,
    u64,
    u32,
    &'static str,
);

const RUNS: [Run; 4] = [
    (
        "1",
        "atlas",
        "alice",
        "grid",
        100.5,
        200,
        2,
        "2026-11-03T10:00:00Z",
    ),
    (
        "2",
        "atlas",
        "alice",
        "grid",
        50.25,
        100,
        4,
        "2026-11-20T10:00:00Z",
    ),
    (
        "3",
        "atlas",
        "carol",
        "short",
        10.0,
        20,
        1,
        "2026-11-21T10:00:00Z",
    ),
    (
        "4",
        "cms",
        "bob",
        "grid",
        7.0,
        30,
        1,
        "2026-12-02T10:00:00Z",
    ),
];

async fn report_matches_the_records(store: Option<String>) {
    let nats = NatsServer::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let identity = nats.identity(&roles::ACCOUNTING, "").await.unwrap();
    let builder = || {
        let b = ServiceProcess::builder(bin("wnodes-accounting"), state.path())
            .runtime_env(&identity, "INFN-T1", "central.example.org", state.path())
            .wnodes_env("ACCOUNTING__GRPC_ADDR", "127.0.0.1:0")
            .wnodes_env("LOG_FORMAT", "json");
        match &store {
            Some(url) => b.wnodes_env("ACCOUNTING__DATABASE", url.as_str()),
            None => b,
        }
    };
    let mut service = builder().arg("serve").spawn().unwrap();
    let addr = service
        .wait_stderr(
            "the report API's address",
            Duration::from_secs(30),
            |line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                (v["fields"]["message"] == "Accounting report API listening.")
                    .then(|| v["fields"]["addr"].as_str().map(str::to_owned))?
            },
        )
        .await
        .unwrap();

    let bus = connect(&nats.admin(), "test@hv1.example.org")
        .await
        .unwrap();
    let events = Events::new(HOST, "test");
    for (job, vo, user, queue, cpu, wall, cores, stopped) in RUNS {
        let r = run(job).site("INFN-T1");
        let description = proto::JobDescription {
            run: Some(r.clone()),
            vo: vo.into(),
            queue: queue.into(),
            owner: Some(proto::JobOwner {
                user: user.into(),
                uid: 1000,
                gid: 1000,
            }),
            host: HOST.into(),
            ..Default::default()
        };
        bus.publish(&events.build(
            &r,
            Body::JobStarted(proto::JobStarted {
                job: Some(description),
                started_at: None,
            }),
        ))
        .await
        .unwrap();
        bus.publish(&events.build(
            &r,
            Body::VmStopped(proto::VmStopped {
                usage: Some(vm_usage(cpu, 1 << 30, Duration::from_secs(wall), cores)),
                stopped_at: ts(stopped),
                ..vm_stopped(&format!("vm-00000000000{job}"))
            }),
        ))
        .await
        .unwrap();
    }

    let period = ["--from", "2026-11-01", "--to", "2027-01-01"];
    let json = |args: &[&str]| -> serde_json::Value {
        let o = wnodesctl(&addr, &[&period[..], args, &["--format", "json"]].concat());
        assert!(o.status.success(), "{o:?}");
        serde_json::from_slice(&o.stdout).unwrap()
    };
    wait_until(
        Duration::from_secs(30),
        "every record in the report",
        || async {
            let total = json(&["--by", "none"]);
            (total[0]["jobs"] == 4).then_some(())
        },
    )
    .await
    .unwrap();

    // The records themselves, as `records --json` prints them.
    let records = builder()
        .arg("records")
        .arg("--json")
        .json_lines()
        .await
        .unwrap();
    assert_eq!(records.len(), 4);
    let cpu_of = |pred: &dyn Fn(&serde_json::Value) -> bool| -> f64 {
        records
            .iter()
            .filter(|r| pred(r))
            .map(|r| r["cpu_seconds"].as_f64().unwrap())
            .sum()
    };

    let total = json(&["--by", "none"]);
    assert_eq!(total[0]["cpu_seconds"].as_f64().unwrap(), cpu_of(&|_| true));
    assert_eq!(total[0]["wall_seconds"], 350.0);
    // Core-seconds: 200×2 + 100×4 + 20×1 + 30×1.
    assert_eq!(total[0]["core_seconds"], 850.0);
    assert_eq!(total[0]["max_peak_memory_bytes"], 1u64 << 30);

    let by_vo_month = json(&["--by", "vo,month"]);
    let rows: Vec<(String, String, u64, f64)> = by_vo_month
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["vo"].as_str().unwrap().to_owned(),
                r["month"].as_str().unwrap().to_owned(),
                r["jobs"].as_u64().unwrap(),
                r["cpu_seconds"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                "atlas".into(),
                "2026-11".into(),
                3,
                cpu_of(&|r| r["vo"] == "atlas")
            ),
            (
                "cms".into(),
                "2026-12".into(),
                1,
                cpu_of(&|r| r["vo"] == "cms")
            ),
        ]
    );

    let o = wnodesctl(
        &addr,
        &[
            &period[..],
            &["--by", "user", "--vo", "atlas", "--format", "csv"],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{o:?}");
    let csv = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "user,jobs,wall_seconds,cpu_seconds,core_seconds,max_peak_memory_bytes"
    );
    assert_eq!(lines[1], "alice,2,300,150.75,800,1073741824");
    assert_eq!(lines[2], "carol,1,20,10,20,1073741824");
    assert_eq!(lines.len(), 3, "{csv}");

    let o = wnodesctl(&addr, &[&period[..], &["--by", "queue,day"]].concat());
    assert!(o.status.success(), "{o:?}");
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.starts_with("QUEUE"), "{table}");
    assert!(table.contains("2026-11-21"), "{table}");
    assert_eq!(
        table.lines().count(),
        5,
        "a header and 4 (queue, day) rows: {table}"
    );

    let o = wnodesctl(&addr, &["--from", "2026-12-01", "--to", "2026-11-01"]);
    assert_eq!(o.status.code(), Some(64), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is not before"),
        "{o:?}"
    );

    let status = service.terminate(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", service.stderr());
}

wnodes_testkit::on_both_stores!(report_matches_the_records);
