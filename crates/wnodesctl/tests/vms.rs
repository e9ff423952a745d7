//! `wnodesctl vms` as the monitor identity against a real nats-server: each VM in the state
//! of its last `vm.*` event, by host, with `--all` for those that ended.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use wnodes_bus::{EventExt, proto, proto::event::Body};
use wnodes_testkit::{
    NatsServer,
    events::{Events, run, vm_spec},
};

const H1: &str = "hv1.example.org";
const H2: &str = "hv2.example.org";

fn ev(host: &str, job: &str, body: Body) -> proto::Event {
    Events::new(host, "launcher@test").build(&run(job), body)
}

fn requested(host: &str, job: &str) -> proto::Event {
    ev(
        host,
        job,
        Body::VmRequested(proto::VmRequested {
            spec: Some(proto::VmSpec {
                image: "el9".into(),
                cores: 2,
                memory_bytes: 2 << 30,
                ..vm_spec(&format!("vm-{job}"))
            }),
        }),
    )
}

fn running(host: &str, job: &str) -> proto::Event {
    ev(
        host,
        job,
        Body::VmRunning(proto::VmRunning {
            vm_id: format!("vm-{job}"),
            ..Default::default()
        }),
    )
}

fn wnodesctl(nats: &NatsServer, args: &[&str]) -> std::process::Output {
    let monitor = nats.monitor();
    std::process::Command::new(env!("CARGO_BIN_EXE_wnodesctl"))
        .arg("vms")
        .args(args)
        .args(["--nats", &monitor.url, "--creds"])
        .arg(monitor.creds_file.unwrap())
        .output()
        .unwrap()
}

fn vms(nats: &NatsServer, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let o = wnodesctl(nats, &all);
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn states(v: &[serde_json::Value]) -> Vec<(String, String)> {
    v.iter()
        .map(|v| {
            (
                v["vm_id"].as_str().unwrap().to_owned(),
                v["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_vm_in_the_state_of_its_last_event_by_host() {
    let nats = NatsServer::start().await.unwrap();
    let bus = wnodes_testkit::bus::connect(&nats.admin(), "test@local")
        .await
        .unwrap();
    let events = [
        requested(H1, "1"),
        running(H1, "1"),
        requested(H2, "2"),
        running(H2, "2"),
        ev(
            H2,
            "2",
            Body::VmStopped(proto::VmStopped {
                vm_id: "vm-2".into(),
                exit_code: 3,
                ..Default::default()
            }),
        ),
        requested(H1, "3"),
        ev(
            H1,
            "3",
            Body::VmFailed(proto::VmFailed {
                vm_id: "vm-3".into(),
                phase: "image".into(),
                reason: "no image for VO lhcb".into(),
            }),
        ),
        requested(H2, "4"),
    ];
    for e in &events {
        bus.publish(e).await.unwrap();
    }
    let pair = |vm: &str, state: &str| (vm.to_owned(), state.to_owned());

    // By default, what has not ended.
    let live = vms(&nats, &[]);
    assert_eq!(
        states(&live),
        [pair("vm-1", "running"), pair("vm-4", "preparing")]
    );
    assert_eq!(live[0]["host"], H1);
    assert_eq!(live[0]["run"], events[0].run_key());
    assert_eq!(live[0]["image"], "el9");
    assert_eq!(live[0]["cores"], 2);
    assert_eq!(live[0]["memory_bytes"], 2u64 << 30);
    assert!(live[0]["age_s"].as_f64().unwrap() >= 0.0);

    // --all: the ended ones too, with their exit code or failure.
    let all = vms(&nats, &["--all"]);
    assert_eq!(
        states(&all),
        [
            pair("vm-1", "running"),
            pair("vm-2", "stopped"),
            pair("vm-3", "failed"),
            pair("vm-4", "preparing"),
        ]
    );
    assert_eq!(all[1]["exit_code"], 3);
    assert_eq!(all[2]["failed_phase"], "image");
    assert_eq!(all[2]["failed_reason"], "no image for VO lhcb");

    // One host.
    let h1 = vms(&nats, &["--all", "--host", H1]);
    assert_eq!(
        states(&h1),
        [pair("vm-1", "running"), pair("vm-3", "failed")]
    );

    // The table.
    let o = wnodesctl(&nats, &["--all"]);
    assert!(o.status.success(), "{o:?}");
    let table = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "a header and four VMs:\n{table}");
    assert!(lines[0].starts_with("VM "), "{table}");
    assert!(
        lines[2].contains("vm-2") && lines[2].contains("stopped") && lines[2].contains("(exit 3)"),
        "{table}"
    );
    assert!(
        lines[3].contains("(image: no image for VO lhcb)"),
        "{table}"
    );

    // A host without VMs says so.
    let o = wnodesctl(&nats, &["--host", "hv9.example.org"]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("no running or preparing VMs"),
        "{o:?}"
    );
}
