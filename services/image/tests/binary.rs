//! The `wnodes-image` binary on the service runtime: TOML config with a catalog table, an
//! environment override of `[image]`, a `vm.requested` answered through a real nats-server,
//! and a clean exit on SIGTERM.

use std::time::Duration;

use sha2::{Digest, Sha256};
use wnodes_bus::proto::{self, event::Body};
use wnodes_testkit::{
    NatsServer, ServiceConfig, ServiceProcess,
    bus::{connect, subscribe},
    events::{Events, RunRefExt, run, vm_requested},
};

const HOST: &str = "hv1.example.org";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_answers_vm_requested_and_stops_on_sigterm() {
    let nats = NatsServer::start().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let image = b"binary test image".repeat(100);
    let src = tmp.path().join("img.raw");
    std::fs::write(&src, &image).unwrap();
    let sha = hex::encode(Sha256::digest(&image));
    let conf = ServiceConfig::new(
        HOST,
        &nats
            .identity(&wnodes_bus::roles::IMAGE, HOST)
            .await
            .unwrap(),
        &tmp.path().join("state"),
    )
    .set(
        "image.catalog.sl6",
        "url",
        format!("file://{}", src.display()),
    )
    .set("image.catalog.sl6", "sha256", sha.as_str())
    .set("scratch", "max_bytes", 1);
    let cache = tmp.path().join("env-cache");
    let mut image_service = ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-image"), tmp.path())
        .config(&conf)
        .wnodes_env("IMAGE__CACHE_DIR", &cache)
        .spawn()
        .unwrap();

    let bus = connect(&nats.admin(), "launcher@hv1.example.org")
        .await
        .unwrap();
    let mut sub = subscribe(&bus, "wnodes.evt.*.image.>").await.unwrap();
    let req = Events::new(HOST, "launcher@hv1.example.org").build(
        &run("77").lrms(proto::Lrms::Pbs),
        vm_requested(proto::VmSpec {
            vm_id: "vm-77".into(),
            image: "sl6".into(),
            ..Default::default()
        }),
    );
    // The durable consumer delivers everything in the stream, so publishing before the
    // binary has created it is fine.
    bus.publish(&req).await.unwrap();
    let ev = sub
        .next(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", image_service.stderr()));
    let Some(Body::ImageReady(r)) = ev.body else {
        panic!("expected image.ready, got {ev:?}")
    };
    assert_eq!(
        r.path,
        cache.join("sha256").join(&sha).display().to_string()
    );
    assert_eq!(ev.source, format!("image@{HOST}"));

    let status = image_service
        .terminate(Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success(), "{status}: {}", image_service.stderr());
}
