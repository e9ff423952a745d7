//! `wnodesctl dlq` against the real scratch service: a `vm.stopped` it cannot handle is
//! dead-lettered (its volume path was turned into a directory), listed and shown; once the
//! cause is gone, `redrive` releases the VM's scratch, and a second redrive does nothing.
//!
//! The binaries are those `cargo build --workspace --bins` put in `target/debug`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{path::PathBuf, process::Output, time::Duration};

use wnodes_bus::{ConsumerTuning, dlq, proto, proto::event::Body, roles};
use wnodes_testkit::{
    NatsServer, ServiceConfig, ServiceProcess,
    bus::{connect, subscribe},
    events::{Events, run, vm_requested, vm_spec, vm_stopped},
    wait_until,
};

const HOST: &str = "hv3.example.org";
const VM: &str = "vm-7";

fn bin(name: &str) -> PathBuf {
    wnodes_devstack::options::default_bin_dir()
        .expect("the binaries (cargo build --workspace --bins)")
        .join(name)
}

fn wnodesctl(nats: &NatsServer, args: &[&str]) -> Output {
    let admin = nats.admin();
    std::process::Command::new(bin("wnodesctl"))
        .args(["dlq", "--nats", &admin.url, "--creds"])
        .arg(admin.creds_file.unwrap())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_lettered_vm_stopped_is_redriven_once_and_releases_the_scratch() {
    let nats = NatsServer::start().await.unwrap();
    let tuning = ConsumerTuning {
        max_attempts: 1,
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(100),
        ..Default::default()
    };
    let identity = nats
        .identity_tuned(&roles::SCRATCH, HOST, &tuning)
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let volumes = tmp.path().join("volumes");
    let conf = ServiceConfig::new(HOST, &identity, &tmp.path().join("state"))
        .set("consumer", "max_attempts", 1)
        .set("consumer", "backoff_base", "50ms")
        .set("consumer", "backoff_max", "100ms");
    let mut scratch = ServiceProcess::builder(bin("wnodes-scratch"), tmp.path())
        .config(&conf)
        .wnodes_env("SCRATCH__DIR", &volumes)
        .spawn()
        .unwrap();

    let bus = connect(&nats.admin(), "launcher@hv3.example.org")
        .await
        .unwrap();
    let mut sub = subscribe(&bus, "wnodes.evt.*.>").await.unwrap();
    let r = run("77");
    let events = Events::new(HOST, "launcher@hv3.example.org");
    bus.publish(&events.build(&r, vm_requested(vm_spec(VM))))
        .await
        .unwrap();
    loop {
        let ev = sub
            .next(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}: {}", scratch.stderr()));
        if matches!(ev.body, Some(Body::ScratchReady(_))) {
            break;
        }
    }

    // The volume's path becomes a non-empty directory: releasing it fails, the one allowed
    // attempt is spent, the vm.stopped is dead-lettered.
    let volume = volumes.join(format!("{VM}.img"));
    std::fs::remove_file(&volume).unwrap();
    std::fs::create_dir(&volume).unwrap();
    std::fs::write(volume.join("in-the-way"), "x").unwrap();
    bus.publish(&events.build(&r, vm_stopped(VM)))
        .await
        .unwrap();
    let durable = roles::SCRATCH.durable(HOST).unwrap().unwrap();
    let dead = wait_until(Duration::from_secs(60), "the dead letter", || {
        let bus = bus.clone();
        let durable = durable.clone();
        async move {
            let l = dlq::read_all(&bus, Some(&durable)).await.ok()?;
            l.into_iter().next()
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", scratch.stderr()));
    assert!(dead.original_subject.ends_with(".vm.stopped"), "{dead:?}");

    // list and show.
    let o = wnodesctl(&nats, &["list", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["sequence"], dead.sequence);
    assert_eq!(list[0]["consumer"], durable);
    assert_eq!(list[0]["reason"], "exhausted");
    assert!(
        list[0]["error"].as_str().unwrap().contains("remove"),
        "{list}"
    );
    let seq = dead.sequence.to_string();
    let o = wnodesctl(&nats, &["show", &seq, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        shown["event_id"]
            .as_str()
            .unwrap()
            .starts_with("vm.stopped:"),
        "{shown}"
    );
    assert_eq!(
        shown["headers"]["Wnodes-Dlq-Subject"][0], "wnodes.evt.hv3_example_org.vm.stopped",
        "{shown}"
    );

    // Without a terminal and without --yes: refused, nothing published.
    let o = wnodesctl(&nats, &["redrive", "--all"]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert_eq!(dlq::read_all(&bus, None).await.unwrap().len(), 1);

    // The cause is gone; redrive: the scratch is released.
    std::fs::remove_dir_all(&volume).unwrap();
    let o = wnodesctl(&nats, &["redrive", "--all", "--yes"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("redriven 1 of 1"), "{}", text(&o));
    loop {
        let ev = sub
            .next(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}: {}", scratch.stderr()));
        if let Some(Body::ResourceReleased(rel)) = &ev.body {
            assert_eq!(rel.vm_id, VM);
            assert_eq!(rel.kind, proto::ResourceKind::Scratch as i32);
            break;
        }
    }
    assert!(dlq::read_all(&bus, None).await.unwrap().is_empty());

    // A second redrive does nothing: by sequence it is not found, with --all there is none.
    let o = wnodesctl(&nats, &["redrive", &seq, "--yes"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("not found"), "{}", text(&o));
    let o = wnodesctl(&nats, &["redrive", "--all", "--yes"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("nothing to redrive"), "{}", text(&o));
    // And no second release follows.
    match sub.next(Duration::from_secs(3)).await {
        Err(_) => {}
        Ok(ev) => panic!("unexpected event after the redrive: {ev:?}"),
    }

    let status = scratch.terminate(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status}: {}", scratch.stderr());
}
