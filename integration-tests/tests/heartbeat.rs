//! Service heartbeats in the hosts bucket, from a real service process (the runtime's
//! `bus-node`) through a real nats-server, read back as `wnodesctl hosts` reads them (the
//! monitor identity): a beat at start with the service's pid, address and readiness, a last
//! `stopped` beat on SIGTERM, and a SIGKILLed service turning stale after three intervals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use wnodes_bus::{
    Bus, BusMetrics,
    heartbeat::{self, Seen, ServiceState},
};
use wnodes_testkit::{
    NatsServer,
    process::{BUS_NODE_HOST as HOST, bus_node},
    wait_until,
};

const BIN: &str = env!("CARGO_BIN_EXE_bus-node");
const LONG: Duration = Duration::from_secs(30);

async fn beats(monitor: &Bus) -> Vec<Seen> {
    heartbeat::read(monitor.jetstream()).await.unwrap().beats
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_beats_says_goodbye_on_sigterm_and_turns_stale_when_killed() {
    let nats = NatsServer::start().await.unwrap();
    let monitor = Bus::connect(&nats.monitor(), "test@monitor", BusMetrics::unregistered())
        .await
        .unwrap();
    assert!(beats(&monitor).await.is_empty(), "the bucket starts empty");

    let dir = tempfile::tempdir().unwrap();
    let mut node = bus_node(BIN, &nats.admin(), dir.path(), "sink")
        .wnodes_env("HEARTBEAT_INTERVAL", "1s")
        .start()
        .await
        .unwrap();
    let seen = wait_until(LONG, "a ready heartbeat", || async {
        beats(&monitor).await.into_iter().find(|s| s.beat.ready)
    })
    .await
    .unwrap();
    let b = &seen.beat;
    assert_eq!(b.service, "node");
    assert_eq!(b.host, HOST);
    assert_eq!(b.identity, format!("node-{}", HOST.replace('.', "_")));
    assert_eq!(b.state, ServiceState::Running);
    assert_eq!(b.pid, node.pid());
    assert_eq!(b.interval_ms, 1000);
    assert_eq!(b.version, env!("CARGO_PKG_VERSION"));
    assert!(b.reason.is_none(), "{b:?}");
    assert!(
        node.stderr()
            .contains(&format!("http_addr={}", b.http_addr)),
        "the beat names the address the service bound: {b:?}"
    );
    // It keeps beating: a later beat, stored later.
    let later = wait_until(LONG, "a second heartbeat", || async {
        beats(&monitor)
            .await
            .into_iter()
            .find(|s| s.beat.sent_ms > b.sent_ms)
    })
    .await
    .unwrap();
    assert!(later.stored > seen.stored);
    assert!(!later.beat.is_stale(later.stored, SystemTime::now()));

    // SIGTERM: the last beat says stopped (and never turns stale).
    node.terminate(LONG).await.unwrap();
    let all = beats(&monitor).await;
    assert_eq!(all.len(), 1, "one key per identity: {all:?}");
    assert_eq!(all[0].beat.state, ServiceState::Stopped, "{all:?}");
    assert!(!all[0].beat.ready);
    assert!(
        !all[0]
            .beat
            .is_stale(all[0].stored, SystemTime::now() + LONG)
    );

    // Started again, then SIGKILLed: no goodbye, so stale once three intervals pass.
    let mut node = bus_node(BIN, &nats.admin(), dir.path(), "sink")
        .wnodes_env("HEARTBEAT_INTERVAL", "1s")
        .start()
        .await
        .unwrap();
    let pid = node.pid();
    wait_until(LONG, "the restarted service's heartbeat", || async {
        beats(&monitor)
            .await
            .into_iter()
            .find(|s| s.beat.pid == pid && s.beat.state == ServiceState::Running)
    })
    .await
    .unwrap();
    node.kill().unwrap();
    let stale = wait_until(LONG, "the killed service to turn stale", || async {
        beats(&monitor)
            .await
            .into_iter()
            .find(|s| s.beat.is_stale(s.stored, SystemTime::now()))
    })
    .await
    .unwrap();
    assert_eq!(stale.beat.pid, pid);
    assert_eq!(stale.beat.state, ServiceState::Running, "no goodbye");
    let age = SystemTime::now().duration_since(stale.stored).unwrap();
    assert!(age > Duration::from_secs(3), "{age:?}");
}
