//! The `wnodes-image` binary on the service runtime: TOML config with a catalog table, an
//! environment override of `[image]`, a `vm.requested` answered through a real nats-server,
//! and a clean exit on SIGTERM.

use std::time::Duration;

use futures::StreamExt;
use nix::{sys::signal, unistd::Pid};
use prost::Message;
use sha2::{Digest, Sha256};
use wnodes_bus::{
    Bus, BusMetrics, EventExt, NatsConfig,
    proto::{self, event::Body},
};
use wnodes_testkit::NatsServer;

const HOST: &str = "hv1.example.org";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_answers_vm_requested_and_stops_on_sigterm() {
    let nats = NatsServer::start().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let image = b"binary test image".repeat(100);
    let src = tmp.path().join("img.raw");
    std::fs::write(&src, &image).unwrap();
    let sha = hex::encode(Sha256::digest(&image));
    let conf = tmp.path().join("wnodes.toml");
    std::fs::write(
        &conf,
        format!(
            "site = \"T1\"\nhost = \"{HOST}\"\nstate_dir = \"{state}\"\n\
             http_addr = \"127.0.0.1:0\"\n[nats]\nurl = \"{url}\"\n\
             [image.catalog.sl6]\nurl = \"file://{src}\"\nsha256 = \"{sha}\"\n\
             [scratch]\nmax_bytes = 1\n",
            state = tmp.path().join("state").display(),
            url = nats.url(),
            src = src.display(),
        ),
    )
    .unwrap();
    let cache = tmp.path().join("env-cache");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wnodes-image"))
        .arg("--config")
        .arg(&conf)
        .env("WNODES_IMAGE__CACHE_DIR", &cache)
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let bus = Bus::connect(
        &NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
        "launcher@hv1.example.org",
        BusMetrics::unregistered(),
    )
    .await
    .unwrap();
    bus.ensure_streams().await.unwrap();
    let mut sub = bus
        .client()
        .subscribe("wnodes.evt.*.image.>")
        .await
        .unwrap();
    bus.client().flush().await.unwrap();
    let run = proto::JobRunRef {
        site: "T1".into(),
        lrms: proto::Lrms::Pbs as i32,
        job_id: "77".into(),
        run_attempt: 1,
    };
    let req = proto::Event::build(
        run,
        HOST,
        "launcher@hv1.example.org",
        Body::VmRequested(proto::VmRequested {
            spec: Some(proto::VmSpec {
                vm_id: "vm-77".into(),
                image: "sl6".into(),
                ..Default::default()
            }),
        }),
    );
    // The durable consumer delivers everything in the stream, so publishing before the
    // binary has created it is fine.
    bus.publish(&req).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("no image event within 30 s")
        .unwrap();
    let ev = proto::Event::decode(msg.payload).unwrap();
    let Some(Body::ImageReady(r)) = ev.body else {
        panic!("expected image.ready, got {ev:?}")
    };
    assert_eq!(
        r.path,
        cache.join("sha256").join(&sha).display().to_string()
    );
    assert_eq!(ev.source, format!("image@{HOST}"));

    let pid = i32::try_from(child.id().unwrap()).unwrap();
    signal::kill(Pid::from_raw(pid), signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("no exit within 20 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}
