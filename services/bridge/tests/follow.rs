//! `wnodes-bridge serve` with a followed LRMS source (`[[bridge.sources]]`): records appended to
//! a real file become job events in JetStream; after a restart the bridge resumes from its
//! stored cursor, so nothing is republished and nothing is lost; a rotated log is read on.

// Helpers outside `#[test]` functions are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{path::PathBuf, time::Duration};
use wnodes_testkit::files::append;

use wnodes_bus::subject;
use wnodes_testkit::{
    NatsServer, ServiceConfig, ServiceProcess,
    bus::{connect, stored_events},
    wait::wait_until,
};

/// PBS accounting records of one job (the OpenPBS format): queued, started, finished.
fn records(job: u32) -> String {
    format!(
        "03/01/2025 10:00:00;Q;{job}.pbs01;queue=workq\n\
         03/01/2025 10:05:10;S;{job}.pbs01;user=alice group=atlas queue=workq start=1740823510 exec_host=wn001/0\n\
         03/01/2025 11:05:10;E;{job}.pbs01;user=alice group=atlas queue=workq start=1740823510 end=1740827110 Exit_status=0 resources_used.cput=00:59:00 resources_used.walltime=01:00:00 run_count=1\n"
    )
}

/// SIGTERM; the bridge exits 0.
async fn stop(mut bridge: ServiceProcess) {
    let status = bridge.terminate(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status}: {}", bridge.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_pbs_log_is_published_once_across_a_restart_and_a_rotation() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log: PathBuf = dir.path().join("20250301");
    append(&log, &records(1));
    let config = ServiceConfig::new(
        "central.example.org",
        &nats
            .identity(&wnodes_bus::roles::BRIDGE, "central.example.org")
            .await
            .unwrap(),
        &dir.path().join("state"),
    )
    .set("", "site", "INFN-T1")
    .set("bridge", "grpc_addr", "127.0.0.1:0")
    .set("bridge.image_hints.by_queue", "workq", "el9")
    .push(
        "bridge.sources",
        &[("lrms", "pbs".into()), ("path", (&log).into())],
    );
    let bridge = ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-bridge"), dir.path())
        .env_clear()
        .env("TZ", "UTC")
        .config(&config)
        .arg("serve");
    let bus = connect(&nats.admin(), "test@local").await.unwrap();
    let stored = || async { stored_events(&bus).await.unwrap() };
    let until = |n: u64, what: &'static str| async move {
        wait_until(Duration::from_secs(30), what, || async move {
            (stored().await >= n).then_some(())
        })
        .await
        .unwrap();
    };

    let (log1, log2) = (
        dir.path().join("bridge-1.log"),
        dir.path().join("bridge-2.log"),
    );
    let first = bridge.clone().stderr_to(&log1).spawn().unwrap();
    until(3, "job 1's three events").await;
    append(&log, &records(2));
    until(6, "job 2's three events, appended while running").await;
    assert_eq!(stored().await, 6);
    stop(first).await;

    // Stopped: job 3 is written, and the log rotated (renamed) with job 4 in the new file.
    append(&log, &records(3));
    std::fs::rename(&log, dir.path().join("20250301.1")).unwrap();
    append(&log, &records(4));
    let second = bridge.stderr_to(&log2).spawn().unwrap();
    // Job 3 is read from the rotated file where the cursor stopped, then job 4 from the new
    // file at the same path.
    until(12, "jobs 3 and 4, from the rotated file and the new one").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stored().await, 12, "nothing republished after the restart");

    // The queued event carries the site's hint for queue `workq`.
    let msg = bus
        .jetstream()
        .get_stream(subject::EVENTS_STREAM)
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&subject::event_subject("", "job.queued").unwrap())
        .await
        .unwrap();
    let ev = <wnodes_bus::proto::Event as prost::Message>::decode(msg.payload).unwrap();
    let Some(wnodes_bus::proto::event::Body::JobQueued(q)) = ev.body else {
        panic!("{ev:?}")
    };
    assert_eq!(q.job.unwrap().image_hint, "el9");
    stop(second).await;

    // JetStream's de-duplication would hide a re-read; the bridge's own count does not: the
    // second life published jobs 3 and 4 only.
    let first = std::fs::read_to_string(&log1).unwrap();
    let second = std::fs::read_to_string(&log2).unwrap();
    assert!(first.contains("published=6"), "{first}");
    assert!(second.contains("published=6"), "{second}");
}
