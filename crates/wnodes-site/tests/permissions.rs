//! The permissions `wnodes-site` gives each identity, enforced by a real nats-server
//! provisioned through it (the test kit's site): who may publish what, and who may pull and
//! ack which durable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use wnodes_bus::{Bus, BusError, BusMetrics, NatsConfig, proto, roles};
use wnodes_testkit::{
    NatsServer,
    events::{Events, run, vm_spec},
};

const H1: &str = "hv1.example.org";
const H2: &str = "hv2.example.org";

async fn bus(cfg: &NatsConfig, name: &str) -> Bus {
    let cfg = NatsConfig {
        publish_timeout: Duration::from_secs(20),
        ..cfg.clone()
    };
    Bus::connect(&cfg, name, BusMetrics::unregistered())
        .await
        .unwrap()
}

fn requested(host: &str, job: &str) -> proto::Event {
    Events::new(host, "launcher@test").build(
        &run(job),
        proto::event::Body::VmRequested(proto::VmRequested {
            spec: Some(vm_spec(&format!("vm-{job}"))),
        }),
    )
}

fn refused(err: BusError, subject: &str) {
    match err {
        BusError::PermissionDenied(m) => {
            assert!(
                m.contains("Permissions Violation") && m.contains(subject),
                "{m}"
            );
        }
        other => panic!("expected a permission refusal, got {other:?}"),
    }
}

/// Every log line of this test process, as the services would write them.
#[derive(Clone, Default)]
struct Log(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn capture() -> Self {
        let log = Log::default();
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .init();
        log
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_publishes_only_its_own_events_for_its_own_host() {
    let log = Log::capture();
    let nats = NatsServer::start().await.unwrap();
    let launcher = bus(
        &nats.identity(&roles::LAUNCHER, H1).await.unwrap(),
        "launcher@h1",
    )
    .await;
    let scratch = bus(
        &nats.identity(&roles::SCRATCH, H1).await.unwrap(),
        "scratch@h1",
    )
    .await;

    // Its own type for its own host: stored.
    let ok = launcher.publish(&requested(H1, "1")).await.unwrap();
    assert!(ok.sequence > 0);

    // Another service's type: refused at once with the server's error, not retried.
    let started = std::time::Instant::now();
    let err = scratch.publish(&requested(H1, "2")).await.unwrap_err();
    refused(err, "wnodes.evt.hv1_example_org.vm.requested");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // One clear log line, at error level, with the server's words.
    let text = log.text();
    let line = text
        .lines()
        .find(|l| l.contains("NATS refused an operation"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{text}"));
    assert!(
        line.contains("ERROR")
            && line.contains(
                "Permissions Violation for Publish to \"wnodes.evt.hv1_example_org.vm.requested\""
            ),
        "{line}"
    );

    // Its own type for another host: refused.
    let err = launcher.publish(&requested(H2, "3")).await.unwrap_err();
    refused(err, "wnodes.evt.hv2_example_org.vm.requested");

    // A dead letter under another consumer's name: refused.
    let err = scratch
        .publish_raw(
            "wnodes.dlq.launcher-hv1_example_org",
            async_nats::HeaderMap::new(),
            "x".into(),
            "dead_letter",
        )
        .await
        .unwrap_err();
    refused(err, "wnodes.dlq.launcher-hv1_example_org");

    // Only the one event is in the stream.
    let admin = wnodes_testkit::bus::connect(&nats.admin(), "test@local")
        .await
        .unwrap();
    assert_eq!(wnodes_testkit::bus::stored_events(&admin).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_cannot_pull_or_ack_another_services_durable() {
    let nats = NatsServer::start().await.unwrap();
    let launcher_cfg = nats.identity(&roles::LAUNCHER, H1).await.unwrap();
    let image_cfg = nats.identity(&roles::IMAGE, H1).await.unwrap();
    let scratch_cfg = nats.identity(&roles::SCRATCH, H1).await.unwrap();
    let launcher = bus(&launcher_cfg, "launcher@h1").await;
    launcher.publish(&requested(H1, "1")).await.unwrap();

    // The image service pulls its own durable and gets the event.
    let image = bus(&image_cfg, "image@h1").await;
    let msg = wnodes_testkit::bus::pull_one(&image, "image-hv1_example_org")
        .await
        .unwrap();
    let reply = msg.reply.clone().unwrap().to_string();
    assert!(
        reply.starts_with("$JS.ACK.WNODES_EVENTS.image-hv1_example_org."),
        "{reply}"
    );

    // The scratch service can neither read nor pull the image service's durable...
    let scratch = bus(&scratch_cfg, "scratch@h1").await;
    // A denied request gets no reply (the server reports the violation asynchronously): a
    // few seconds without an answer is the refusal.
    let info = tokio::time::timeout(
        Duration::from_secs(3),
        scratch
            .jetstream()
            .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                "image-hv1_example_org",
                "WNODES_EVENTS",
            ),
    )
    .await;
    assert!(!matches!(info, Ok(Ok(_))), "scratch read image's durable");
    let pull = tokio::time::timeout(
        Duration::from_secs(3),
        scratch.client().request(
            "$JS.API.CONSUMER.MSG.NEXT.WNODES_EVENTS.image-hv1_example_org",
            "{\"batch\":1,\"expires\":1000000000}".into(),
        ),
    )
    .await;
    assert!(
        !matches!(pull, Ok(Ok(_))),
        "scratch pulled from image's durable: {pull:?}"
    );

    // ...nor ack the image service's message: after its ack attempt the message is still
    // unacknowledged; the image service's own ack then takes.
    scratch
        .client()
        .publish(reply.clone(), "+ACK".into())
        .await
        .unwrap();
    scratch.client().flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admin = wnodes_testkit::bus::connect(&nats.admin(), "test@local")
        .await
        .unwrap();
    let state = |admin: Bus| async move {
        let s = admin.jetstream().get_stream("WNODES_EVENTS").await.unwrap();
        s.consumer_info("image-hv1_example_org")
            .await
            .unwrap()
            .num_ack_pending
    };
    assert_eq!(state(admin.clone()).await, 1, "the foreign ack took effect");
    msg.double_ack().await.unwrap();
    assert_eq!(state(admin).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_job_starter_watches_only_its_own_host() {
    let nats = NatsServer::start().await.unwrap();
    let agent = bus(&nats.creds(&roles::AGENT, H1).unwrap(), "bridge@h1").await;
    let stream = agent.jetstream().get_stream("WNODES_EVENTS").await.unwrap();
    let watch = |host: &str| async_nats::jetstream::consumer::push::OrderedConfig {
        name: Some("watch_test".into()),
        deliver_subject: agent.client().new_inbox(),
        filter_subject: format!("wnodes.evt.{}.>", host.replace('.', "_")),
        ..Default::default()
    };
    stream.create_consumer(watch(H1)).await.unwrap();
    let other =
        tokio::time::timeout(Duration::from_secs(3), stream.create_consumer(watch(H2))).await;
    assert!(
        !matches!(other, Ok(Ok(_))),
        "the job starter of {H1} watched {H2}"
    );
}

/// A service puts only its own heartbeat key; the job starter none; the monitor reads them.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_puts_only_its_own_heartbeat() {
    use wnodes_bus::heartbeat::{self, Heartbeat, ServiceState};
    let nats = NatsServer::start().await.unwrap();
    let beat = |service: &str, identity: &str| Heartbeat {
        service: service.into(),
        host: H1.into(),
        identity: identity.into(),
        version: "0.1.0".into(),
        state: ServiceState::Running,
        ready: true,
        reason: None,
        http_addr: "127.0.0.1:1".into(),
        pid: 1,
        started_ms: 0,
        sent_ms: 0,
        interval_ms: 1000,
    };
    let short = Duration::from_secs(3);
    let scratch = bus(
        &nats.identity(&roles::SCRATCH, H1).await.unwrap(),
        "scratch@h1",
    )
    .await;
    heartbeat::put(
        scratch.jetstream(),
        &beat("scratch", "scratch-hv1_example_org"),
        short,
    )
    .await
    .unwrap();
    // Another service's key, on its host or another: refused (no ack comes).
    for other in ["launcher-hv1_example_org", "scratch-hv2_example_org"] {
        assert!(
            heartbeat::put(scratch.jetstream(), &beat("launcher", other), short)
                .await
                .is_err(),
            "scratch put {other}'s heartbeat"
        );
    }
    // The host agent is a service like the others: its own key, and no other.
    let agent = bus(&nats.creds(&roles::AGENT, H1).unwrap(), "agent@h1").await;
    heartbeat::put(
        agent.jetstream(),
        &beat("agent", "agent-hv1_example_org"),
        short,
    )
    .await
    .unwrap();
    assert!(
        heartbeat::put(
            agent.jetstream(),
            &beat("scratch", "scratch-hv1_example_org"),
            short
        )
        .await
        .is_err(),
        "the host agent put scratch's heartbeat"
    );
    let monitor = bus(&nats.monitor(), "monitor").await;
    let read = heartbeat::read(monitor.jetstream()).await.unwrap();
    let keys: Vec<&str> = read
        .beats
        .iter()
        .map(|s| s.beat.identity.as_str())
        .collect();
    assert_eq!(keys, ["agent-hv1_example_org", "scratch-hv1_example_org"]);
    assert!(read.unreadable.is_empty());
}

/// The next answer in `replies`, or `None` after `within`.
async fn answer(
    replies: &mut wnodes_bus::control::Replies,
    within: Duration,
) -> Option<wnodes_bus::control::Reply> {
    tokio::time::timeout(within, replies.next())
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_service_answers_its_own_hosts_control_requests_and_publishes_nothing_else() {
    use prost::Message;
    use wnodes_bus::control::{self, Reply};

    let nats = NatsServer::start().await.unwrap();
    let image = bus(&nats.identity(&roles::IMAGE, H1).await.unwrap(), "image@h1").await;
    let scratch = bus(
        &nats.identity(&roles::SCRATCH, H1).await.unwrap(),
        "scratch@h1",
    )
    .await;
    let admin = bus(&nats.admin(), "wnodesctl@test").await;
    let h1 = wnodes_bus::subject::image_prefetch_subject(H1).unwrap();
    let h2 = wnodes_bus::subject::image_prefetch_subject(H2).unwrap();

    // The image service of H1 hears H1's requests and may answer each, several times.
    let mut served = control::serve(&image, &h1).await.unwrap();
    // Neither the scratch service of H1 nor the image service of H1 for H2 may listen.
    let mut eavesdrop = control::serve(&scratch, &h1).await.unwrap();
    let mut other_host = control::serve(&image, &h2).await.unwrap();

    let mut replies = control::request(
        &admin,
        &h1,
        &proto::PrefetchRequest {
            image: "el9".into(),
            wait: None,
        },
    )
    .await
    .unwrap();
    let req = tokio::time::timeout(Duration::from_secs(5), served.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        proto::PrefetchRequest::decode(req.payload).unwrap().image,
        "el9"
    );
    let replier = req.replier.unwrap();
    for n in 0..3u64 {
        replier
            .send(&proto::PrefetchProgress {
                host: H1.into(),
                image: "el9".into(),
                artifacts: vec![proto::PrefetchArtifact {
                    bytes_done: n,
                    ..Default::default()
                }],
                outcome: None,
            })
            .await
            .unwrap();
    }
    replier.flush().await.unwrap();
    for n in 0..3u64 {
        let Some(Reply::Answer(body)) = answer(&mut replies, Duration::from_secs(5)).await else {
            panic!("answer {n} did not arrive")
        };
        let p = proto::PrefetchProgress::decode(body).unwrap();
        assert_eq!(p.artifacts[0].bytes_done, n);
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(1), eavesdrop.next())
            .await
            .is_err(),
        "the scratch service heard the image service's request"
    );

    // Another host's requests: nobody may listen there, so the server says so at once.
    let mut replies = control::request(&admin, &h2, &proto::PrefetchRequest::default())
        .await
        .unwrap();
    assert_eq!(
        answer(&mut replies, Duration::from_secs(5)).await,
        Some(Reply::NoResponders)
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), other_host.next())
            .await
            .is_err()
    );

    // Anywhere but a reply subject it was given: nothing arrives.
    let probe = "_INBOX.admin.probe";
    let mut sub = admin.client().subscribe(probe).await.unwrap();
    admin.client().flush().await.unwrap();
    for subject in [probe, h1.as_str()] {
        image
            .client()
            .publish(subject.to_owned(), "not an answer".into())
            .await
            .unwrap();
    }
    image.client().flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), futures::StreamExt::next(&mut sub))
            .await
            .is_err(),
        "the image service published to another identity's inbox"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), served.next())
            .await
            .is_err(),
        "the image service published a request to itself"
    );
}
