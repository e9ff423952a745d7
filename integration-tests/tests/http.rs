//! The service runtime's `/healthz`, `/readyz` and `/metrics`, on a real node process.

// Test helpers outside #[test] functions panic on failure too: that is the point of a test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wnodes_bus::proto;
use wnodes_testkit::{
    NatsServer,
    bus::BusClient,
    events::{Events, RunRefExt, run},
    process::{BUS_NODE_HOST as HOST, BUS_NODE_SITE as SITE, bus_node},
    wait_until,
};

const BIN: &str = env!("CARGO_BIN_EXE_bus-node");
const LONG: Duration = Duration::from_secs(30);

/// A minimal HTTP/1.1 GET: (status, body).
async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics() {
    let mut nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = bus_node(BIN, &nats.admin(), dir.path(), "sink")
        .start()
        .await
        .unwrap();
    // The runtime logs the bound address (the node asked for port 0).
    let addr = wait_until(LONG, "the HTTP address in the log", || async {
        let log = node.stderr();
        let at = log.find("http_addr=")? + "http_addr=".len();
        Some(log[at..].split_whitespace().next()?.to_owned())
    })
    .await
    .unwrap();
    assert_eq!(get(&addr, "/healthz").await.unwrap().0, 200);
    assert_eq!(
        get(&addr, "/readyz").await.unwrap(),
        (200, "ready\n".into())
    );

    // The node made the streams: only connect.
    let bus = BusClient::new(&nats.admin())
        .without_streams()
        .connect()
        .await
        .unwrap();
    let ev = Events::new(HOST, "test@local").build(
        &run("m-1").site(SITE).lrms(proto::Lrms::Unspecified),
        proto::VmRequested::default(),
    );
    bus.publish(&ev).await.unwrap();
    let metrics = wait_until(LONG, "the handled message in /metrics", || async {
        let (code, body) = get(&addr, "/metrics").await?;
        (code == 200
            && body.lines().any(|l| {
                l.starts_with("wnodes_bus_handled_total{")
                    && l.contains("outcome=\"ok\"")
                    && l.ends_with(" 1")
            }))
        .then_some(body)
    })
    .await
    .unwrap();
    assert!(metrics.contains("wnodes_bus_connected 1"), "{metrics}");

    // Without NATS the process is alive but not ready.
    nats.kill().await.unwrap();
    wait_until(LONG, "/readyz to report the lost connection", || async {
        let (code, body) = get(&addr, "/readyz").await?;
        (code == 503 && body.contains("NATS")).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(get(&addr, "/healthz").await.unwrap().0, 200);
    nats.restart().await.unwrap();
    wait_until(LONG, "/readyz after the reconnect", || async {
        (get(&addr, "/readyz").await?.0 == 200).then_some(())
    })
    .await
    .unwrap();
}
