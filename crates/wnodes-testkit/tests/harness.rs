//! The harness's own builders and questions: run and event builders, `RunEvents` over a run's
//! events, the service config file, a child process (a real `sh`) started, waited for and
//! stopped, and the test bus against a real nats-server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use wnodes_bus::{EventType, proto};
use wnodes_testkit::{
    NatsServer, ServiceConfig, ServiceProcess,
    bus::{self, BusClient},
    events::{Events, RunEvents, RunRefExt, run, vm_failed, vm_requested, vm_spec, vm_stopped},
};

fn released(vm: &str, kind: proto::ResourceKind) -> proto::ResourceReleased {
    proto::ResourceReleased {
        vm_id: vm.into(),
        kind: kind as i32,
        ..Default::default()
    }
}

/// A run's events: requested, scratch and network ready, stopped, both released.
fn run_events() -> Vec<proto::Event> {
    let r = run("7").attempt(2);
    let e = Events::new("hv1.test", "test@local");
    vec![
        e.build(&r, vm_requested(vm_spec("vm-7"))),
        e.build(
            &r,
            proto::ScratchReady {
                vm_id: "vm-7".into(),
                ..Default::default()
            },
        ),
        e.build(
            &r,
            proto::NetworkReady {
                vm_id: "vm-7".into(),
                ..Default::default()
            },
        ),
        e.build(&r, vm_stopped("vm-7")),
        e.build(&r, released("vm-7", proto::ResourceKind::Network)),
        e.build(&r, released("vm-7", proto::ResourceKind::Scratch)),
    ]
}

#[test]
fn run_and_event_builders_fill_the_envelope() {
    let r = run("42.0")
        .site("INFN-T1")
        .lrms(proto::Lrms::Slurm)
        .attempt(3);
    assert_eq!(wnodes_bus::event::run_key(&r), "INFN-T1/slurm/42.0/3");
    let ev = Events::new("hv9.example.org", "launcher@hv9.example.org")
        .build(&r, vm_failed("vm-1", "launch", "test"));
    assert_eq!(ev.id, "vm.failed:INFN-T1/slurm/42.0/3");
    assert_eq!(ev.host, "hv9.example.org");
    assert_eq!(ev.source, "launcher@hv9.example.org");
    assert_eq!(ev.run, Some(r));
    assert_eq!(wnodes_testkit::events::vm_of(&ev).as_deref(), Some("vm-1"));
}

#[test]
fn run_events_answer_what_is_there_in_which_order() {
    let evs = run_events();
    assert_eq!(
        evs.names(),
        "vm.requested, scratch.ready, network.ready, vm.stopped, resource.released, resource.released"
    );
    assert!(evs.has(EventType::VmStopped));
    assert!(!evs.has(EventType::VmFailed));
    assert_eq!(evs.count(EventType::ResourceReleased), 2);
    assert_eq!(evs.position(EventType::NetworkReady), 2);
    assert!(evs.in_order(&[
        EventType::VmRequested,
        EventType::NetworkReady,
        EventType::VmStopped
    ]));
    assert!(!evs.in_order(&[EventType::VmStopped, EventType::ScratchReady]));
    assert!(!evs.in_order(&[EventType::VmRequested, EventType::VmFailed]));
    assert_eq!(evs.the::<proto::VmStopped>().stop_reason, "guest-poweroff");
    assert_eq!(
        evs.first_payload::<proto::VmRequested>()
            .and_then(|r| r.spec)
            .map(|s| s.vm_id)
            .as_deref(),
        Some("vm-7")
    );
    assert_eq!(evs.payloads::<proto::ResourceReleased>().len(), 2);
    assert_eq!(
        evs.prepared(),
        vec![proto::ResourceKind::Scratch, proto::ResourceKind::Network]
    );
    assert_eq!(
        evs.released().into_iter().collect::<Vec<_>>(),
        vec![
            (proto::ResourceKind::Scratch as i32, 1),
            (proto::ResourceKind::Network as i32, 1)
        ]
    );
}

#[test]
#[should_panic(expected = "one vm.failed: vm.requested")]
fn the_one_payload_names_the_events_when_it_is_missing() {
    run_events().the::<proto::VmFailed>();
}

#[test]
fn the_service_config_is_toml_with_tables_and_arrays_of_tables() {
    let conf = ServiceConfig::new(
        "hv1.test",
        &wnodes_bus::NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            ..Default::default()
        },
        "/var/lib/w \"x\"".as_ref(),
    )
    .set("", "site", "INFN-T1")
    .set("image.catalog.sl6", "url", "file:///img")
    .set("scratch", "max_bytes", 1024)
    .set("network", "filter", true)
    .push("bridge.sources", &[("lrms", "pbs".into())]);
    assert_eq!(
        conf.to_toml(),
        "site = \"INFN-T1\"\nhost = \"hv1.test\"\nstate_dir = \"/var/lib/w \\\"x\\\"\"\n\
         http_addr = \"127.0.0.1:0\"\n\n[image.catalog.sl6]\nurl = \"file:///img\"\n\n\
         [nats]\nurl = \"nats://127.0.0.1:4222\"\n\n[network]\nfilter = true\n\n\
         [scratch]\nmax_bytes = 1024\n\n[[bridge.sources]]\nlrms = \"pbs\"\n"
    );
}

#[tokio::test]
async fn a_process_is_started_waited_for_and_terminated() {
    let dir = tempfile::tempdir().unwrap();
    let conf = ServiceConfig::new(
        "hv1.test",
        &wnodes_bus::NatsConfig {
            url: "nats://127.0.0.1:1".into(),
            ..Default::default()
        },
        dir.path(),
    );
    // `sh -c <script> --config <file>`: the script sees `--config` as `$0`, the file as `$1`.
    let script = "echo \"$WNODES_GREETING\" >&2; grep -q '^\\[nats\\]$' \"$1\" && echo ready; \
                  trap 'exit 3' TERM; while :; do sleep 0.05; done";
    let mut p = ServiceProcess::builder("/bin/sh", dir.path())
        .env_clear()
        .wnodes_env("GREETING", "hello")
        .arg("-c")
        .arg(script)
        .config(&conf)
        .spawn()
        .unwrap();
    assert_eq!(
        p.wait_line("ready", Duration::from_secs(10)).await.unwrap(),
        "ready"
    );
    let greeting = p
        .wait_stderr("the greeting", Duration::from_secs(10), |l| {
            l.starts_with("hello").then(|| l.to_owned())
        })
        .await
        .unwrap();
    assert_eq!(greeting, "hello");
    assert!(p.is_running());
    let status = p.terminate(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(3), "{}", p.stderr());

    let err = ServiceProcess::builder("/bin/sh", dir.path())
        .arg("-c")
        .arg("echo bye >&2; exit 0")
        .spawn()
        .unwrap()
        .wait_line("ready", Duration::from_secs(10))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("exited") && err.contains("bye"), "{err}");

    let out = ServiceProcess::builder("/bin/sh", dir.path())
        .arg("-c")
        .arg("echo one-shot")
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one-shot\n");
}

#[tokio::test]
async fn the_server_is_provisioned_and_the_test_bus_checks_the_streams() {
    // An open server has no streams: the bus's check names what is missing.
    let open = NatsServer::start_open().await.unwrap();
    let bare = BusClient::new(&open.admin())
        .without_streams()
        .connect()
        .await
        .unwrap();
    assert!(bus::stored_events(&bare).await.is_err(), "no stream yet");
    let err = bus::connect(&open.admin(), "test@hv1.test")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("WNODES_EVENTS") && err.contains("not provisioned"),
        "{err}"
    );

    let nats = NatsServer::start().await.unwrap();
    let b = bus::connect(&nats.admin(), "test@hv1.test").await.unwrap();
    assert_eq!(bus::stored_events(&b).await.unwrap(), 0);
    let mut sub = bus::subscribe(&b, "wnodes.evt.>").await.unwrap();
    let r = run("1");
    b.publish(&Events::new("hv1.test", "test@local").build(&r, vm_stopped("vm-1")))
        .await
        .unwrap();
    let ev = sub.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(ev.id, "vm.stopped:T1/htcondor/1/1");
    assert_eq!(bus::stored_events(&b).await.unwrap(), 1);
    let last = bus::wait_event(&b, "hv1.test", "vm.stopped", &r, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(last, ev);
}
