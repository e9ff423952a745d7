//! The `wnodes-accounting` binary: `serve` records usage, `records --json` prints it, SIGTERM
//! stops the service cleanly.

// Helpers outside `#[test]` functions are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{process::Stdio, time::Duration};

use wnodes_bus::{Bus, BusMetrics, EventExt, NatsConfig, proto, proto::event::Body};
use wnodes_testkit::{NatsServer, wait_until};

const HOST: &str = "hv1.example.org";

fn accounting(nats: &NatsServer, state: &std::path::Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_wnodes-accounting"));
    cmd.env_remove("WNODES_CONFIG")
        .env("WNODES_NATS__URL", nats.url())
        .env("WNODES_HOST", "central.example.org")
        .env("WNODES_SITE", "INFN-T1")
        .env("WNODES_STATE_DIR", state)
        .env("WNODES_HTTP_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_records_usage_and_records_prints_it() {
    let nats = NatsServer::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut service = accounting(&nats, state.path())
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let bus = Bus::connect(
        &NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
        "test@hv1.example.org",
        BusMetrics::unregistered(),
    )
    .await
    .unwrap();
    bus.ensure_streams().await.unwrap();
    let run = proto::JobRunRef {
        site: "INFN-T1".into(),
        lrms: proto::Lrms::Lsf as i32,
        job_id: "31337".into(),
        run_attempt: 2,
    };
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
            vm_id: "vm-0123456789ab".into(),
            exit_code: 0,
            usage: Some(proto::VmUsage {
                cpu_seconds: 1.5,
                peak_memory_bytes: 1 << 20,
                wall: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                cores: 1,
            }),
            stop_reason: "guest-poweroff".into(),
            ..Default::default()
        }),
    ] {
        bus.publish(&proto::Event::build(run.clone(), HOST, "test", body))
            .await
            .unwrap();
    }

    let line = wait_until(
        Duration::from_secs(30),
        "the record in `records --json`",
        || async {
            let out = accounting(&nats, state.path())
                .args(["records", "--json"])
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
        .arg("records")
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.starts_with("RUN"), "{table}");
    assert!(table.contains("INFN-T1/lsf/31337/2"), "{table}");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(service.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), service.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
