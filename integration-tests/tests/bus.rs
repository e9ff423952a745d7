//! The event bus against a real nats-server, with services as separate processes
//! (`bus-node` on the real service runtime).

// Test helpers outside #[test] functions panic on failure too: that is the point of a test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use prost::Message;
use wnodes_bus::{Bus, EventExt, dlq, proto};
use wnodes_testkit::{
    NatsServer, OtlpCollector,
    bus::{ConsumerState, connect, consumer_state},
    events::{Events, RunRefExt, run, vm_requested as requested, vm_spec},
    process::{BUS_NODE_HOST as HOST, BUS_NODE_SITE as SITE, ProcessBuilder, bus_node},
    wait_until,
};

const BIN: &str = env!("CARGO_BIN_EXE_bus-node");
const LONG: Duration = Duration::from_secs(30);

fn vm_requested(job: &str) -> proto::Event {
    Events::new(HOST, "test@local").build(
        &run(job).site(SITE).lrms(proto::Lrms::Slurm),
        requested(vm_spec(&format!("vm-{job}"))),
    )
}

async fn test_bus(nats: &NatsServer) -> Bus {
    connect(&nats.admin(), "test@local").await.unwrap()
}

/// Rows in a sink node's `effects` table (0 if the table does not exist yet).
async fn effect_rows(state_dir: &std::path::Path) -> anyhow::Result<(i64, i64)> {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions, Connection};
    let db = state_dir.join("keys.db");
    if !db.exists() {
        return Ok((0, 0));
    }
    let mut conn = SqliteConnectOptions::new()
        .filename(&db)
        .read_only(true)
        .connect()
        .await?;
    let res: Result<(i64, i64), _> =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT key) FROM effects")
            .fetch_one(&mut conn)
            .await;
    conn.close().await?;
    Ok(res.unwrap_or((0, 0)))
}

fn sink(nats: &NatsServer, dir: &std::path::Path, durable: &str) -> ProcessBuilder {
    bus_node(BIN, &nats.admin(), dir, "sink")
        .wnodes_env("NODE__DURABLE", durable)
        .wnodes_env("CONSUMER__ACK_WAIT", "2s")
        .wnodes_env("CONSUMER__HANDLER_TIMEOUT", "1s")
        .wnodes_env("CONSUMER__BACKOFF_BASE", "100ms")
}

async fn wait_rows(dir: &std::path::Path, n: i64) -> (i64, i64) {
    wait_until(LONG, &format!("{n} effect rows"), || async {
        let r = effect_rows(dir).await.ok()?;
        (r.0 >= n).then_some(r)
    })
    .await
    .unwrap()
}

/// Waits until `durable` has seen at least `deliveries` deliveries and has nothing unacked.
async fn wait_settled(bus: &Bus, durable: &str, deliveries: u64) -> ConsumerState {
    wait_until(
        LONG,
        &format!("{durable} settled after {deliveries} deliveries"),
        || async {
            let s = consumer_state(bus.jetstream(), durable).await.ok()?;
            (s.ack_pending == 0 && s.pending == 0 && s.deliveries >= deliveries).then_some(s)
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn trace_context_crosses_three_processes() {
    let nats = NatsServer::start().await.unwrap();
    let collector = OtlpCollector::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ep = collector.endpoint();
    let _b = bus_node(BIN, &nats.admin(), &dir.path().join("b"), "relay")
        .wnodes_env("OTLP_ENDPOINT", &ep)
        .start()
        .await
        .unwrap();
    let _c = bus_node(BIN, &nats.admin(), &dir.path().join("c"), "sink")
        .wnodes_env("OTLP_ENDPOINT", &ep)
        .start()
        .await
        .unwrap();
    let mut a = bus_node(BIN, &nats.admin(), &dir.path().join("a"), "publish")
        .wnodes_env("NODE__COUNT", "1")
        .wnodes_env("OTLP_ENDPOINT", &ep)
        .spawn()
        .unwrap();
    let line = a.wait_line("trace_id=", LONG).await.unwrap();
    let trace_id = line.trim_start_matches("trace_id=").to_owned();
    assert_eq!(trace_id.len(), 32);
    assert_ne!(trace_id, "0".repeat(32));
    assert!(a.wait_exit(LONG).await.unwrap().success(), "{}", a.stderr());
    wait_rows(&dir.path().join("c"), 1).await;

    let spans = collector
        .wait_for(LONG, "publish, relay and sink spans", |s| {
            ["demo.publish", "node.relay", "node.sink"]
                .iter()
                .all(|n| s.iter().any(|x| x.name == *n))
        })
        .await
        .unwrap();
    let find = |n: &str| spans.iter().find(|x| x.name == n).unwrap().clone();
    let (p, r, s) = (find("demo.publish"), find("node.relay"), find("node.sink"));
    for span in [&p, &r, &s] {
        assert_eq!(span.trace_id, trace_id, "{span:?}");
    }
    assert_eq!(p.parent_span_id, "", "the publisher's span is the root");
    assert_eq!(
        r.parent_span_id, p.span_id,
        "relay is a child of the publisher"
    );
    assert_eq!(s.parent_span_id, r.span_id, "sink is a child of the relay");
    assert_eq!(
        s.attributes
            .get("messaging.destination.name")
            .map(String::as_str),
        Some("wnodes.evt.hv1_test_example.vm.requested")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn same_event_published_twice_is_handled_once() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _sink = sink(&nats, dir.path(), "dup").start().await.unwrap();
    let bus = test_bus(&nats).await;
    let ev = vm_requested("dup-1");
    let first = bus.publish(&ev).await.unwrap();
    let second = bus.publish(&ev).await.unwrap();
    assert!(!first.duplicate);
    assert!(
        second.duplicate,
        "JetStream de-duplicates the same Nats-Msg-Id"
    );
    wait_rows(dir.path(), 1).await;
    wait_settled(&bus, "dup", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(effect_rows(dir.path()).await.unwrap(), (1, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn ack_withheld_once_then_restart_applies_effect_once() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("failpoint-fired");
    let bus = test_bus(&nats).await;
    let opts = sink(&nats, dir.path(), "withheld");
    let mut node = opts
        .clone()
        .env("WNODES_FAILPOINT", "skip-ack")
        .env("WNODES_FAILPOINT_MARKER", marker.to_str().unwrap())
        .start()
        .await
        .unwrap();
    bus.publish(&vm_requested("withheld-1")).await.unwrap();
    wait_rows(dir.path(), 1).await;
    assert!(marker.exists(), "the ack was withheld");
    let state = consumer_state(bus.jetstream(), "withheld").await.unwrap();
    assert_eq!(state.ack_pending, 1, "one message waits for its ack");
    assert!(node.terminate(LONG).await.unwrap().success());
    let _node = opts.start().await.unwrap();
    let s = wait_settled(&bus, "withheld", 2).await;
    assert!(s.deliveries >= 2, "the message was delivered again");
    assert_eq!(effect_rows(dir.path()).await.unwrap(), (1, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_killed_after_effect_before_ack_applies_effect_once() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("failpoint-fired");
    let bus = test_bus(&nats).await;
    let opts = sink(&nats, dir.path(), "crashy");
    let mut node = opts
        .clone()
        .env("WNODES_FAILPOINT", "after-commit")
        .env("WNODES_FAILPOINT_MARKER", marker.to_str().unwrap())
        .start()
        .await
        .unwrap();
    bus.publish(&vm_requested("crashy-1")).await.unwrap();
    let status = node.wait_exit(LONG).await.unwrap();
    assert!(!status.success(), "the node crashed at the failpoint");
    assert_eq!(
        effect_rows(dir.path()).await.unwrap(),
        (1, 1),
        "effect committed"
    );
    let _node = opts.start().await.unwrap();
    wait_settled(&bus, "crashy", 2).await;
    assert_eq!(effect_rows(dir.path()).await.unwrap(), (1, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn same_event_with_a_new_message_id_after_restart_applies_effect_once() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = test_bus(&nats).await;
    let opts = sink(&nats, dir.path(), "newid");
    let mut node = opts.start().await.unwrap();
    let ev = vm_requested("newid-1");
    bus.publish(&ev).await.unwrap();
    wait_rows(dir.path(), 1).await;
    wait_settled(&bus, "newid", 1).await;
    assert!(node.terminate(LONG).await.unwrap().success());
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        "a-different-message-id",
    );
    let p = bus
        .publish_raw(
            &ev.subject().unwrap(),
            headers,
            Bytes::from(ev.encode_to_vec()),
            "test",
        )
        .await
        .unwrap();
    assert!(
        !p.duplicate,
        "a new message id passes JetStream de-duplication"
    );
    let _node = opts.start().await.unwrap();
    wait_settled(&bus, "newid", 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(effect_rows(dir.path()).await.unwrap(), (1, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_hanging_panicking_and_malformed_messages_go_to_the_dead_letter_stream() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = test_bus(&nats).await;
    let failing = sink(&nats, &dir.path().join("f"), "sink-fail")
        .wnodes_env("NODE__FAIL", "always")
        .wnodes_env("NODE__FAULT_MATCH", "bad")
        .wnodes_env("CONSUMER__MAX_ATTEMPTS", "3")
        .start()
        .await
        .unwrap();
    let _hanging = sink(&nats, &dir.path().join("h"), "sink-hang")
        .wnodes_env("NODE__HANG", "true")
        .wnodes_env("NODE__FAULT_MATCH", "bad")
        .wnodes_env("CONSUMER__MAX_ATTEMPTS", "2")
        .start()
        .await
        .unwrap();
    let mut panicking = sink(&nats, &dir.path().join("p"), "sink-panic")
        .wnodes_env("NODE__FAIL", "panic")
        .wnodes_env("NODE__FAULT_MATCH", "bad")
        .wnodes_env("CONSUMER__MAX_ATTEMPTS", "2")
        .start()
        .await
        .unwrap();
    bus.publish(&vm_requested("bad-1")).await.unwrap();
    let subject = vm_requested("x").subject().unwrap();
    bus.publish_raw(
        &subject,
        HeaderMap::new(),
        Bytes::from_static(b"\xff\xff not protobuf"),
        "test",
    )
    .await
    .unwrap();
    bus.publish(&vm_requested("good-1")).await.unwrap();

    let letters = wait_until(LONG, "six dead letters", || async {
        let l = dlq::read_all(&bus, None).await.ok()?;
        (l.len() >= 6).then_some(l)
    })
    .await
    .unwrap();
    let find = |consumer: &str, reason: &str| {
        letters
            .iter()
            .find(|l| l.consumer == consumer && l.reason == reason)
            .unwrap_or_else(|| panic!("no {reason} letter of {consumer} in {letters:#?}"))
    };
    let f = find("sink-fail", "exhausted");
    assert_eq!(f.attempts, 3);
    assert_eq!(f.original_subject, subject);
    assert!(
        f.error.contains("simulated failure on attempt 3"),
        "{}",
        f.error
    );
    assert_eq!(
        proto::Event::decode(f.payload.clone()).unwrap().id,
        vm_requested("bad-1").id
    );
    let h = find("sink-hang", "exhausted");
    assert_eq!(h.attempts, 2);
    assert!(h.error.contains("timed out"), "{}", h.error);
    // A panicking handler fails its attempt like an error: retried, then dead-lettered, and
    // the process (and its consumer) stays up.
    let p = find("sink-panic", "exhausted");
    assert_eq!(p.attempts, 2);
    assert!(
        p.error
            .contains("handler panicked: simulated panic on attempt 2"),
        "{}",
        p.error
    );
    assert!(panicking.is_running(), "{}", panicking.stderr());
    for c in ["sink-fail", "sink-hang", "sink-panic"] {
        let m = find(c, "malformed");
        assert_eq!(m.attempts, 1, "malformed payloads are not retried");
        assert_eq!(m.original_subject, subject);
        assert_eq!(&m.payload[..], b"\xff\xff not protobuf");
    }
    // The consumers kept going: the good message after the bad ones was handled.
    wait_rows(&dir.path().join("f"), 1).await;
    wait_rows(&dir.path().join("h"), 1).await;
    wait_rows(&dir.path().join("p"), 1).await;
    wait_settled(&bus, "sink-fail", 3).await;
    let log = failing.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("Malformed") && l.contains(&subject)),
        "an error log names the subject:\n{log}"
    );
    assert_eq!(
        dlq::read_all(&bus, Some("sink-fail")).await.unwrap().len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkilled_consumer_gets_unacked_messages_again() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = test_bus(&nats).await;
    let opts = sink(&nats, dir.path(), "killed")
        .wnodes_env("NODE__WORK_MS", "150")
        .wnodes_env("CONSUMER__MAX_IN_FLIGHT", "4");
    let mut node = opts.start().await.unwrap();
    let events: Vec<_> = (0..20).map(|i| vm_requested(&format!("k-{i}"))).collect();
    bus.publish_pipelined(&events, 20).await.unwrap();
    wait_rows(dir.path(), 2).await;
    node.kill().unwrap();
    let before = effect_rows(dir.path()).await.unwrap().0;
    assert!(before < 20, "killed with work left ({before} done)");
    let _node = opts.start().await.unwrap();
    assert_eq!(wait_rows(dir.path(), 20).await, (20, 20));
    wait_settled(&bus, "killed", 20).await;
    assert_eq!(effect_rows(dir.path()).await.unwrap(), (20, 20));
}

#[tokio::test(flavor = "multi_thread")]
async fn server_restart_while_publishing_loses_nothing() {
    let mut nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = test_bus(&nats).await;
    let _node = sink(&nats, dir.path(), "restart").start().await.unwrap();
    const N: usize = 300;
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for i in 0..N {
                bus.publish(&vm_requested(&format!("r-{i}"))).await?;
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Ok::<_, wnodes_bus::BusError>(())
        })
    };
    wait_rows(dir.path(), 50).await;
    nats.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    nats.restart().await.unwrap();
    publisher.await.unwrap().unwrap();
    assert_eq!(wait_rows(dir.path(), N as i64).await, (N as i64, N as i64));
    wait_settled(&bus, "restart", N as u64).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(effect_rows(dir.path()).await.unwrap(), (N as i64, N as i64));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_handler_finishes_acks_and_exports_the_span() {
    let nats = NatsServer::start().await.unwrap();
    let collector = OtlpCollector::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = test_bus(&nats).await;
    let mut node = sink(&nats, dir.path(), "graceful")
        .wnodes_env("NODE__WORK_MS", "1500")
        .wnodes_env("CONSUMER__ACK_WAIT", "30s")
        .wnodes_env("CONSUMER__HANDLER_TIMEOUT", "20s")
        .wnodes_env("OTLP_ENDPOINT", collector.endpoint())
        .start()
        .await
        .unwrap();
    bus.publish(&vm_requested("graceful-1")).await.unwrap();
    wait_until(LONG, "the handler to start", || async {
        node.stderr().contains("Handling.").then_some(())
    })
    .await
    .unwrap();
    let status = node.terminate(LONG).await.unwrap();
    assert!(
        status.success(),
        "exit 0 on SIGTERM: {status}\n{}",
        node.stderr()
    );
    assert_eq!(effect_rows(dir.path()).await.unwrap(), (1, 1));
    assert_eq!(
        consumer_state(bus.jetstream(), "graceful").await.unwrap(),
        ConsumerState {
            ack_pending: 0,
            redelivered: 0,
            pending: 0,
            deliveries: 1
        },
        "acked, never redelivered"
    );
    if let Err(e) = collector
        .wait_for(LONG, "the handler's span", |s| {
            s.iter().any(|x| x.name == "node.sink")
        })
        .await
    {
        panic!("{e:#}\nthe node's log:\n{}", node.stderr());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_crashes_every_delivery_is_dead_lettered_by_the_next_process() {
    // The handler's process dies on every delivery, so no verdict ever reaches the server. The
    // server's max_deliver is above the client's attempts: the delivery after the last attempt
    // is dead-lettered without running the handler, instead of the server dropping it silently.
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = test_bus(&nats).await;
    let opts = sink(&nats, dir.path(), "crashloop")
        .wnodes_env("CONSUMER__MAX_ATTEMPTS", "2")
        .env("WNODES_FAILPOINT", "before-handler");
    bus.publish(&vm_requested("crash-every-time"))
        .await
        .unwrap();
    let mut crashes = 0;
    let letters = loop {
        let mut node = opts.start().await.unwrap();
        let ended = tokio::select! {
            s = node.wait_exit(Duration::from_secs(10)) => s.ok(),
            l = wait_until(Duration::from_secs(10), "a dead letter", || async {
                let l = dlq::read_all(&bus, Some("crashloop")).await.ok()?;
                (!l.is_empty()).then_some(l)
            }) => { break l.unwrap(); }
        };
        assert!(
            ended.is_some_and(|s| !s.success()),
            "the node crashed at the failpoint"
        );
        crashes += 1;
        assert!(crashes <= 2, "the handler ran more often than max_attempts");
    };
    assert_eq!(crashes, 2, "one crash per allowed attempt");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "no_verdict");
    assert_eq!(letters[0].attempts, 3);
    assert!(
        letters[0].error.contains("no verdict after 2 attempts"),
        "{}",
        letters[0].error
    );
    assert_eq!(effect_rows(dir.path()).await.unwrap(), (0, 0));
}

/// Handlers of one consumer run concurrently (on the consumer's task): while the first
/// message's handler is still working, the others have started too.
#[tokio::test(flavor = "multi_thread")]
async fn handlers_of_one_consumer_overlap() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = test_bus(&nats).await;
    let node = sink(&nats, dir.path(), "sink-overlap")
        .wnodes_env("NODE__WORK_MS", "300")
        .wnodes_env("CONSUMER__HANDLER_TIMEOUT", "5s")
        .wnodes_env("CONSUMER__ACK_WAIT", "10s")
        .start()
        .await
        .unwrap();
    let events: Vec<_> = (0..5)
        .map(|i| vm_requested(&format!("overlap-{i}")))
        .collect();
    bus.publish_pipelined(&events, 16).await.unwrap();
    assert_eq!(wait_rows(dir.path(), 5).await.0, 5);
    let log = node.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Handling.") || l.contains("Effect applied."))
        .collect();
    let first_done = lines
        .iter()
        .position(|l| l.contains("Effect applied."))
        .unwrap();
    assert_eq!(
        lines[..first_done]
            .iter()
            .filter(|l| l.contains("Handling."))
            .count(),
        5,
        "all five handlers started before the first finished:\n{}",
        lines.join("\n")
    );
}
