//! The `wnodes-scratch` binary on the service runtime: TOML config, an environment override
//! of `[scratch]`, a `vm.requested` answered through a real nats-server, and a clean exit on
//! SIGTERM.

// Helpers outside `#[test]` functions are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use wnodes_bus::proto::{self, event::Body};
use wnodes_testkit::{
    NatsServer, ServiceConfig, ServiceProcess,
    bus::{connect, subscribe},
    events::{Events, RunRefExt, run, vm_requested, vm_spec},
};

const HOST: &str = "hv2.example.org";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_answers_vm_requested_and_stops_on_sigterm() {
    let nats = NatsServer::start().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let conf = ServiceConfig::new(
        HOST,
        &nats
            .identity(&wnodes_bus::roles::SCRATCH, HOST)
            .await
            .unwrap(),
        &tmp.path().join("state"),
    )
    .set("scratch", "max_bytes", 67_108_864)
    .set("scratch", "default_bytes", 8_388_608)
    .set("image.catalog.x", "url", "file:///x")
    .set("image.catalog.x", "sha256", "nope");
    let volumes = tmp.path().join("env-volumes");
    let mut scratch = ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-scratch"), tmp.path())
        .config(&conf)
        .wnodes_env("SCRATCH__DIR", &volumes)
        .spawn()
        .unwrap();

    let bus = connect(&nats.admin(), "launcher@hv2.example.org")
        .await
        .unwrap();
    let mut sub = subscribe(&bus, "wnodes.evt.*.scratch.>").await.unwrap();
    let req = Events::new(HOST, "launcher@hv2.example.org").build(
        &run("9").lrms(proto::Lrms::Lsf).attempt(2),
        vm_requested(vm_spec("vm-9")),
    );
    bus.publish(&req).await.unwrap();
    let ev = sub
        .next(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", scratch.stderr()));
    let Some(Body::ScratchReady(r)) = ev.body else {
        panic!("expected scratch.ready, got {ev:?}")
    };
    assert_eq!(r.path, volumes.join("vm-9.img").display().to_string());
    assert_eq!(r.size_bytes, 8 << 20);

    let status = scratch.terminate(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status}: {}", scratch.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_expecting_another_retention_is_not_ready_and_leaves_the_stream_alone() {
    let nats = NatsServer::start().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let conf = ServiceConfig::new(
        HOST,
        &nats
            .identity(&wnodes_bus::roles::SCRATCH, HOST)
            .await
            .unwrap(),
        &tmp.path().join("state"),
    )
    .set("nats", "events_max_age", "1h");
    let mut scratch = ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-scratch"), tmp.path())
        .config(&conf)
        .wnodes_env("SCRATCH__DIR", tmp.path().join("volumes"))
        .spawn()
        .unwrap();
    let addr = scratch
        .wait_stderr("the starting line", Duration::from_secs(30), |line| {
            let rest = line.split("http_addr=").nth(1)?;
            Some(rest.split_whitespace().next()?.to_owned())
        })
        .await
        .unwrap();
    // One log line names the difference.
    scratch
        .wait_stderr("the not-ready line", Duration::from_secs(30), |line| {
            (line.contains("Not ready") && line.contains("max_age is 7days (expected 1h)"))
                .then_some(())
        })
        .await
        .unwrap();
    let ready = wnodes_testkit::http::get(&addr, "/readyz").await.unwrap();
    assert!(
        ready.starts_with("HTTP/1.0 503") || ready.starts_with("HTTP/1.1 503"),
        "{ready}"
    );
    assert!(
        ready.contains("stream `WNODES_EVENTS` differs from what this service expects: max_age is 7days (expected 1h)"),
        "{ready}"
    );
    // The alert's series says the same.
    let metrics = wnodes_testkit::http::get(&addr, "/metrics").await.unwrap();
    assert!(metrics.contains("\nwnodes_service_ready 0\n"), "{metrics}");
    let bus = connect(&nats.admin(), "test@local").await.unwrap();
    let mut stream = bus.jetstream().get_stream("WNODES_EVENTS").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.max_age, Duration::from_secs(7 * 24 * 3600));
    let status = scratch.terminate(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status}: {}", scratch.stderr());
}
