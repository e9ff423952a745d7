//! The publishing replay against a real nats-server (JetStream): every event of a log is
//! stored once under its deterministic id, on its subject; a second replay of the same file
//! stores nothing new.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::path::PathBuf;

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use jiff::tz::TimeZone;
use prost::Message;
use wnodes_bus::{EventExt, proto, subject};
use wnodes_lrms::{LrmsKind, Publisher, ReplayOptions, replay_to_bus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_events_are_stored_once_with_their_ids() -> anyhow::Result<()> {
    let nats = wnodes_testkit::NatsServer::start().await?;
    let bus = wnodes_testkit::bus::connect(&nats.admin(), "bridge@ce01.example.org").await?;
    let publisher = Publisher::new(bus.clone(), "INFN-T1", 64);
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/htcondor/constructed_hold_release.log");
    let opts = ReplayOptions {
        tz: TimeZone::UTC,
        ..ReplayOptions::new(LrmsKind::Htcondor)
    };

    let first = replay_to_bus(&publisher, &opts, std::slice::from_ref(&file), 3).await?;
    assert_eq!(first.emitted, 7);
    let mut stream = bus.jetstream().get_stream(subject::EVENTS_STREAM).await?;
    assert_eq!(stream.info().await?.state.messages, 7);

    let again = replay_to_bus(&publisher, &opts, std::slice::from_ref(&file), 100).await?;
    assert_eq!(again.emitted, 7);
    assert_eq!(
        stream.info().await?.state.messages,
        7,
        "same ids: JetStream dropped them all"
    );

    let consumer: PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("check".into()),
            ..Default::default()
        })
        .await?;
    let mut msgs = consumer.fetch().max_messages(7).messages().await?;
    let mut seen = Vec::new();
    while let Some(m) = msgs.next().await {
        let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
        let ev = proto::Event::decode(m.payload.clone())?;
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned());
        assert_eq!(id.as_deref(), Some(ev.id.as_str()));
        assert_eq!(m.subject.as_str(), ev.subject()?);
        assert_eq!(ev.source, "bridge@ce01.example.org");
        seen.push((m.subject.to_string(), ev.id));
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let run = "INFN-T1/htcondor/1001.0/1";
    assert_eq!(
        seen,
        [
            (
                "wnodes.evt._queued.job.queued".to_owned(),
                format!("job.queued:{run}")
            ),
            (
                "wnodes.evt._queued.job.held".to_owned(),
                format!("job.held:{run}#t1740823205")
            ),
            (
                "wnodes.evt._queued.job.released".to_owned(),
                format!("job.released:{run}#t1740823500")
            ),
            (
                "wnodes.evt.wn01_example_org.job.start_observed".to_owned(),
                format!("job.start_observed:{run}")
            ),
            (
                "wnodes.evt._queued.job.evicted".to_owned(),
                format!("job.evicted:{run}")
            ),
            (
                "wnodes.evt._queued.job.held".to_owned(),
                format!("job.held:{run}#t1740823560")
            ),
            (
                "wnodes.evt._queued.job.cancelled".to_owned(),
                format!("job.cancelled:{run}")
            ),
        ]
    );
    Ok(())
}
