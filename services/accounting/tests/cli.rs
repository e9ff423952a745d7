//! The `wnodes-accounting` binary: `serve` records usage, `records --json` prints it, SIGTERM
//! stops the service cleanly.

// Helpers outside `#[test]` functions are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use wnodes_bus::{proto, proto::event::Body};
use wnodes_testkit::{
    NatsServer, ServiceProcess,
    bus::connect,
    events::{Events, RunRefExt, run, vm_stopped, vm_usage},
    process::ProcessBuilder,
    wait_until,
};

const HOST: &str = "hv1.example.org";

/// `wnodes-accounting` configured by environment, its state in `state`.
async fn accounting(nats: &NatsServer, state: &std::path::Path) -> ProcessBuilder {
    let identity = nats
        .identity(&wnodes_bus::roles::ACCOUNTING, "")
        .await
        .unwrap();
    ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-accounting"), state).runtime_env(
        &identity,
        "INFN-T1",
        "central.example.org",
        state,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_records_usage_and_records_prints_it() {
    let nats = NatsServer::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut service = accounting(&nats, state.path())
        .await
        .arg("serve")
        .spawn()
        .unwrap();

    let bus = connect(&nats.admin(), "test@hv1.example.org")
        .await
        .unwrap();
    let run = run("31337")
        .site("INFN-T1")
        .lrms(proto::Lrms::Lsf)
        .attempt(2);
    let job = proto::JobDescription {
        run: Some(run.clone()),
        vo: "cms".into(),
        owner: Some(proto::JobOwner {
            user: "bob".into(),
            uid: 1001,
            gid: 1001,
        }),
        host: HOST.into(),
        ..Default::default()
    };
    for body in [
        Body::JobStarted(proto::JobStarted {
            job: Some(job),
            started_at: None,
        }),
        Body::VmStopped(proto::VmStopped {
            exit_code: 0,
            usage: Some(vm_usage(1.5, 1 << 20, Duration::from_secs(2), 1)),
            ..vm_stopped("vm-0123456789ab")
        }),
    ] {
        bus.publish(&Events::new(HOST, "test").build(&run, body))
            .await
            .unwrap();
    }

    let line = wait_until(
        Duration::from_secs(30),
        "the record in `records --json`",
        || async {
            let out = accounting(&nats, state.path())
                .await
                .arg("records")
                .arg("--json")
                .output()
                .await
                .ok()?;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            (out.status.success() && !stdout.is_empty()).then_some(stdout)
        },
    )
    .await
    .unwrap();
    let rec: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(rec["run_key"], "INFN-T1/lsf/31337/2");
    assert_eq!(rec["vo"], "cms");
    assert_eq!(rec["user_name"], "bob");
    assert_eq!(rec["cpu_seconds"], 1.5);

    let table = accounting(&nats, state.path())
        .await
        .arg("records")
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.starts_with("RUN"), "{table}");
    assert!(table.contains("INFN-T1/lsf/31337/2"), "{table}");

    let status = service.terminate(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", service.stderr());
}
