//! The `wnodes-scratch` binary on the service runtime: TOML config, an environment override
//! of `[scratch]`, a `vm.requested` answered through a real nats-server, and a clean exit on
//! SIGTERM.

use std::time::Duration;

use futures::StreamExt;
use nix::{sys::signal, unistd::Pid};
use prost::Message;
use wnodes_bus::{
    Bus, BusMetrics, EventExt, NatsConfig,
    proto::{self, event::Body},
};
use wnodes_testkit::NatsServer;

const HOST: &str = "hv2.example.org";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_answers_vm_requested_and_stops_on_sigterm() {
    let nats = NatsServer::start().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("wnodes.toml");
    std::fs::write(
        &conf,
        format!(
            "site = \"T1\"\nhost = \"{HOST}\"\nstate_dir = \"{state}\"\n\
             http_addr = \"127.0.0.1:0\"\n[nats]\nurl = \"{url}\"\n\
             [scratch]\nmax_bytes = 67108864\ndefault_bytes = 8388608\n\
             [image.catalog.x]\nurl = \"file:///x\"\nsha256 = \"nope\"\n",
            state = tmp.path().join("state").display(),
            url = nats.url(),
        ),
    )
    .unwrap();
    let volumes = tmp.path().join("env-volumes");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wnodes-scratch"))
        .arg("--config")
        .arg(&conf)
        .env("WNODES_SCRATCH__DIR", &volumes)
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let bus = Bus::connect(
        &NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
        "launcher@hv2.example.org",
        BusMetrics::unregistered(),
    )
    .await
    .unwrap();
    bus.ensure_streams().await.unwrap();
    let mut sub = bus
        .client()
        .subscribe("wnodes.evt.*.scratch.>")
        .await
        .unwrap();
    bus.client().flush().await.unwrap();
    let run = proto::JobRunRef {
        site: "T1".into(),
        lrms: proto::Lrms::Lsf as i32,
        job_id: "9".into(),
        run_attempt: 2,
    };
    let req = proto::Event::build(
        run,
        HOST,
        "launcher@hv2.example.org",
        Body::VmRequested(proto::VmRequested {
            spec: Some(proto::VmSpec {
                vm_id: "vm-9".into(),
                ..Default::default()
            }),
        }),
    );
    bus.publish(&req).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("no scratch event within 30 s")
        .unwrap();
    let ev = proto::Event::decode(msg.payload).unwrap();
    let Some(Body::ScratchReady(r)) = ev.body else {
        panic!("expected scratch.ready, got {ev:?}")
    };
    assert_eq!(r.path, volumes.join("vm-9.img").display().to_string());
    assert_eq!(r.size_bytes, 8 << 20);

    let pid = i32::try_from(child.id().unwrap()).unwrap();
    signal::kill(Pid::from_raw(pid), signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("no exit within 20 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}
