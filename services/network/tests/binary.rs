//! The `wnodes-network` binary as deployed: config file with a `[network]` section, start-up
//! reconciliation, a request served, SIGTERM → exit 0. A host test (`wnodes_testkit::host`):
//! needs root and `nft`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{process::ExitCode, time::Duration};

use wnodes_bus::proto::{self, event::Body};
use wnodes_testkit::{ServiceConfig, ServiceProcess, host, host_test, service::*};

/// Set (to 1) by scripts/check-systemd.sh, which runs this test inside a network namespace of
/// its own (`unshare --net`): the service then works in the test's namespace, as on a
/// hypervisor, with no `[network] netns` (whose `setns` needs CAP_SYS_ADMIN), so that it runs
/// with nothing but its unit's CAP_NET_ADMIN.
const IN_PLACE_ENV: &str = "TESTKIT_NETWORK_IN_PLACE";

/// Where the test builds the hypervisor's bridge: a namespace of its own (`Some`), or, with
/// [`IN_PLACE_ENV`], the one the test runs in, which must not be the machine's.
fn hypervisor() -> Option<Netns> {
    if std::env::var_os(IN_PLACE_ENV).is_none() {
        return Some(Netns::new("bin"));
    }
    // A fresh namespace has nothing but its loopback: never build bridges on the machine's.
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    assert!(
        links.lines().count() == 1 && links.contains(": lo:"),
        "{IN_PLACE_ENV} is set but this network namespace is not a fresh one (run under \
         `unshare --net`): {links}"
    );
    None
}

fn in_ns(hv: &Option<Netns>, argv: &[&str]) {
    match hv {
        Some(ns) => {
            ns.exec(argv);
        }
        None => {
            let out = std::process::Command::new(argv[0])
                .args(&argv[1..])
                .output()
                .unwrap();
            assert!(out.status.success(), "{argv:?}: {out:?}");
        }
    }
}

/// The network service's config file in `dir`, as its own identity on [`HOST`].
async fn config(tb: &TestBus, dir: &std::path::Path) -> ServiceConfig {
    ServiceConfig::new(
        HOST,
        &tb.server
            .identity(&wnodes_bus::roles::NETWORK, HOST)
            .await
            .unwrap(),
        &dir.join("state"),
    )
}

async fn binary_reconciles_serves_and_stops_on_sigterm() {
    let hv = hypervisor();
    in_ns(&hv, &["ip", "link", "add", "wnbr0", "type", "bridge"]);
    in_ns(&hv, &["ip", "addr", "add", "10.231.7.1/24", "dev", "wnbr0"]);
    in_ns(&hv, &["ip", "link", "set", "wnbr0", "up"]);
    in_ns(
        &hv,
        &[
            "ip",
            "tuntap",
            "add",
            "mode",
            "tap",
            "name",
            "wn-deadbeef0000",
        ],
    );
    let tb = TestBus::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = config(&tb, dir.path())
        .await
        .set("network", "mode", "tap")
        .set("network", "bridge", "wnbr0")
        .set("network", "pool", "10.231.7.0/24");
    let conf = match &hv {
        Some(ns) => conf.set("network", "netns", ns.0.as_str()),
        None => conf,
    };
    let mut network = ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-network"), dir.path())
        .config(&conf)
        .spawn()
        .unwrap();

    let vm = "vm-b1b1b1b1b1b1";
    tb.publish(&ev(
        &run("1"),
        vm_requested(proto::VmSpec {
            vm_id: vm.into(),
            // The launcher's VM user: the tap is made that uid's, so its qemu may attach it.
            vm_user: Some(proto::HostUser {
                uid: 3_000_000_004,
                gid: 3_000_000_004,
            }),
            ..Default::default()
        }),
    ))
    .await;
    let r = tb
        .wait_for("network.ready from the binary", |e| match &e.body {
            Some(Body::NetworkReady(r)) if r.vm_id == vm => Some((e.source.clone(), r.clone())),
            _ => None,
        })
        .await;
    let (source, r) = r;
    assert_eq!(source, format!("network@{HOST}"));
    assert_eq!(r.address, "10.231.7.2/24");
    assert_eq!(r.gateway, "10.231.7.1");
    let taps = wnodes_network::host::Host::new(hv.as_ref().map(|ns| ns.0.clone()))
        .unwrap()
        .list_taps()
        .await
        .unwrap();
    assert_eq!(
        taps,
        vec!["wn-b1b1b1b1b1b1".to_owned()],
        "the stray tap was reconciled away"
    );
    let mut ip = std::process::Command::new("ip");
    if let Some(ns) = &hv {
        ip.args(["-n", &ns.0]);
    }
    let out = ip
        .args(["-d", "link", "show", "dev", "wn-b1b1b1b1b1b1"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("user 3000000004 group 3000000004"),
        "the tap belongs to the VM's user: {shown}"
    );

    let status = network.terminate(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "{status}: {}", network.stderr());
}

/// No silent fallback: in user mode, a spec that asks for a tap fails with the reason (and
/// nothing is made on the host), while a spec that leaves the mode to the host gets user mode.
async fn binary_in_user_mode_refuses_a_tap_instead_of_falling_back() {
    let tb = TestBus::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = config(&tb, dir.path()).await.set("network", "mode", "user");
    let mut network = ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-network"), dir.path())
        .config(&conf)
        .spawn()
        .unwrap();
    let links_before = std::fs::read_dir("/sys/class/net").unwrap().count();

    let (tap_vm, any_vm) = ("vm-c1c1c1c1c1c1", "vm-c2c2c2c2c2c2");
    for (job, vm, mode) in [
        ("1", tap_vm, proto::NetworkMode::VirtioTap),
        ("2", any_vm, proto::NetworkMode::Unspecified),
    ] {
        tb.publish(&ev(
            &run(job),
            vm_requested(proto::VmSpec {
                vm_id: vm.into(),
                network_mode: mode as i32,
                ..Default::default()
            }),
        ))
        .await;
    }
    let failed = tb.wait_payload::<proto::NetworkFailed>(tap_vm).await;
    assert!(
        failed.reason.starts_with(
            "the spec asks for a tap, and this host's network service runs in user mode"
        ),
        "{}",
        failed.reason
    );
    let ready = tb.wait_payload::<proto::NetworkReady>(any_vm).await;
    assert_eq!(ready.mode, proto::NetworkMode::User as i32);
    assert!(
        tb.events_of(tap_vm)
            .iter()
            .all(|e| !matches!(e.body, Some(Body::NetworkReady(_)))),
        "the tap VM got a network"
    );
    assert_eq!(
        std::fs::read_dir("/sys/class/net").unwrap().count(),
        links_before,
        "a link appeared"
    );
    let status = network.terminate(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "{status}: {}", network.stderr());
}

fn main() -> ExitCode {
    host::main(vec![
        host_test!(
            multi_thread binary_reconciles_serves_and_stops_on_sigterm
            needs [Root, Nft]
        ),
        host_test!(
            multi_thread binary_in_user_mode_refuses_a_tap_instead_of_falling_back
            needs []
        ),
    ])
}
