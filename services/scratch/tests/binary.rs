//! The `wnodes-scratch` binary on the service runtime: TOML config, an environment override
//! of `[scratch]`, a `vm.requested` answered through a real nats-server, and a clean exit on
//! SIGTERM.

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
    let conf = ServiceConfig::new(HOST, &nats.url(), &tmp.path().join("state"))
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

    let bus = connect(&nats.url(), "launcher@hv2.example.org")
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
