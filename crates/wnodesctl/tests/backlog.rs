//! `wnodesctl backlog` as the monitor identity against a real nats-server: the oldest
//! unprocessed message's age per durable, a consumer the retention overtook, the VMs per host
//! and the dead letters.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use wnodes_bus::{Bus, BusMetrics, proto, roles};
use wnodes_testkit::{
    NatsServer,
    events::{Events, run, vm_spec},
    wait_until,
};

const H1: &str = "hv1.example.org";

fn requested(job: &str) -> proto::Event {
    Events::new(H1, "launcher@test").build(
        &run(job),
        proto::event::Body::VmRequested(proto::VmRequested {
            spec: Some(vm_spec(&format!("vm-{job}"))),
        }),
    )
}

fn backlog(nats: &NatsServer) -> serde_json::Value {
    let monitor = nats.monitor();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_wnodesctl"))
        .args(["backlog", "--json", "--nats", &monitor.url, "--creds"])
        .arg(monitor.creds_file.unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap()
}

fn durable<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["durable"] == name)
        .unwrap_or_else(|| panic!("{name} not in {report}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_oldest_unprocessed_age_and_a_consumer_overtaken_by_the_retention() {
    let nats = NatsServer::start().await.unwrap();
    let launcher = Bus::connect(
        &nats.identity(&roles::LAUNCHER, H1).await.unwrap(),
        "launcher@h1",
        BusMetrics::unregistered(),
    )
    .await
    .unwrap();
    let image_cfg = nats.identity(&roles::IMAGE, H1).await.unwrap();
    nats.identity(&roles::SCRATCH, H1).await.unwrap();

    // Caught up: no age.
    let r = backlog(&nats);
    assert!(durable(&r, "image-hv1_example_org")["oldest_unprocessed_age_seconds"].is_null());

    launcher.publish(&requested("1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    launcher.publish(&requested("2")).await.unwrap();
    let r = backlog(&nats);
    let image = durable(&r, "image-hv1_example_org");
    assert_eq!(image["pending"], 2, "{r}");
    let age = image["oldest_unprocessed_age_seconds"].as_f64().unwrap();
    assert!((1.0..60.0).contains(&age), "{r}");
    assert_eq!(image["behind_retention"], false);
    assert_eq!(r["events_max_age_seconds"], 7.0 * 86400.0);
    // Two VMs requested on H1, none running; no dead letter.
    assert_eq!(
        r["vms"],
        serde_json::json!([{ "host": H1, "preparing": 2, "running": 0 }]),
        "{r}"
    );
    assert_eq!(r["dead_letters"], 0, "{r}");

    // The image service handles the first message; the second is now the oldest.
    let image = Bus::connect(&image_cfg, "image@h1", BusMetrics::unregistered())
        .await
        .unwrap();
    wnodes_testkit::bus::pull_one(&image, "image-hv1_example_org")
        .await
        .unwrap()
        .double_ack()
        .await
        .unwrap();
    let r = backlog(&nats);
    let after = durable(&r, "image-hv1_example_org")["oldest_unprocessed_age_seconds"]
        .as_f64()
        .unwrap();
    assert!(after < age, "{after} !< {age}");

    // The operator shortens the retention to 1 s: the second message expires before the image
    // service acknowledged it (and both before the scratch service, which never ran). The
    // monitor says so; a durable made after the expiry is not flagged.
    let admin = wnodes_testkit::bus::connect(&nats.admin(), "test@local")
        .await
        .unwrap();
    let mut cfg = admin
        .jetstream()
        .get_stream("WNODES_EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    cfg.max_age = Duration::from_secs(1);
    cfg.duplicate_window = Duration::from_secs(1);
    admin.jetstream().update_stream(cfg).await.unwrap();
    launcher.publish(&requested("3")).await.unwrap();
    let r = wait_until(
        Duration::from_secs(30),
        "the retention to remove message 2",
        || {
            let r = backlog(&nats);
            async move {
                (durable(&r, "image-hv1_example_org")["behind_retention"] == true).then_some(r)
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        durable(&r, "scratch-hv1_example_org")["behind_retention"],
        true,
        "{r}"
    );
    nats.identity(&roles::IMAGE, "hv2.example.org")
        .await
        .unwrap();
    let r = backlog(&nats);
    assert_eq!(
        durable(&r, "image-hv2_example_org")["behind_retention"],
        false,
        "{r}"
    );
}
