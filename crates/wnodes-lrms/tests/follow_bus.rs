//! `follow_to_bus` against a real nats-server: a growing HTCondor log, rotated by rename,
//! followed across a restart of the loop. Every event reaches JetStream, and the loop publishes
//! each exactly once (its own count, not only the stream's de-duplicated one).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{path::Path, time::Duration};
use wnodes_testkit::{bus::stored_events, files::append};

use jiff::tz::TimeZone;
use tokio_util::sync::CancellationToken;
use wnodes_bus::Bus;
use wnodes_lrms::{
    CursorFile, FollowLoopOptions, FollowOptions, Follower, LrmsKind, ParseOptions, Publisher,
    follow_to_bus, publish::FollowStats,
};

fn job(n: u32) -> String {
    format!(
        "000 ({n}.000.000) 2025-03-01 10:00:00 Job submitted from host: <h>\n...\n\
         001 ({n}.000.000) 2025-03-01 10:01:00 Job executing on host: <10.0.0.1:9618?alias=wn1>\n...\n\
         005 ({n}.000.000) 2025-03-01 10:02:00 Job terminated.\n\t(1) Normal termination (return value 0)\n...\n"
    )
}

fn start(
    publisher: &Publisher,
    log: &Path,
    store: &Path,
) -> (CancellationToken, tokio::task::JoinHandle<FollowStats>) {
    let opts = FollowOptions::new(
        LrmsKind::Htcondor,
        ParseOptions {
            tz: TimeZone::UTC,
            year: 2025,
            ..Default::default()
        },
    );
    let store = CursorFile::new(store);
    let follower = Follower::open(log, opts, store.load().unwrap()).unwrap();
    let stop = CancellationToken::new();
    let (p, s) = (publisher.clone(), stop.clone());
    let loop_opts = FollowLoopOptions {
        poll_interval: Duration::from_millis(20),
        idle_flush: Duration::from_millis(200),
    };
    let task = tokio::spawn(async move {
        follow_to_bus(&p, follower, store, &loop_opts, s)
            .await
            .unwrap()
    });
    (stop, task)
}

async fn wait_for(bus: &Bus, n: u64) {
    wnodes_testkit::wait_until(
        Duration::from_secs(10),
        &format!("{n} stored events"),
        || async { (stored_events(bus).await.unwrap() >= n).then_some(()) },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_log_reaches_jetstream_once_across_rotation_and_restart() {
    let nats = wnodes_testkit::NatsServer::start().await.unwrap();
    let bus = wnodes_testkit::bus::connect(&nats.admin(), "bridge@ce01")
        .await
        .unwrap();
    let publisher = Publisher::new(bus.clone(), "INFN-T1", 32);
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = (
        dir.path().join("events.log"),
        dir.path().join("cursor.json"),
    );

    let (stop, task) = start(&publisher, &log, &store);
    append(&log, &(job(1) + &job(2)));
    wait_for(&bus, 6).await;
    append(&log, &job(3));
    std::fs::rename(&log, dir.path().join("events.log.1")).unwrap();
    append(&log, &job(4));
    wait_for(&bus, 12).await;
    // A submit at the very end waits for a possible 028, then goes out when the file is idle.
    append(
        &log,
        "000 (5.000.000) 2025-03-01 10:00:00 Job submitted from host: <h>\n...\n",
    );
    wait_for(&bus, 13).await;
    stop.cancel();
    let first = task.await.unwrap();
    assert_eq!(first.published, 13);
    assert_eq!(first.malformed, 0);

    // Restart: nothing is published again; new lines are.
    let (stop, task) = start(&publisher, &log, &store);
    append(&log, &job(6));
    wait_for(&bus, 16).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let second = task.await.unwrap();
    assert_eq!(second.published, 3, "only job 6's events after the restart");
    assert_eq!(stored_events(&bus).await.unwrap(), 16);
}
