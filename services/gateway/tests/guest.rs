//! End to end with a real guest: the network service makes the VM's tap and filter, the gateway
//! serves its export, and the test guest (`guest/README.md`) boots under TCG on that tap, mounts
//! the export with sshfs through the filter and writes a file that lands on the host as the
//! job's user. The whole test runs in a private network namespace (entered before the runtime
//! starts; nextest runs each test in its own process), so nothing touches the host's network.
//! A host test (`wnodes_testkit::host`): needs root, qemu, the test guest, `/dev/fuse`,
//! `sftp-server`, `setpriv` and `nft`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::ExitCode,
};

use wnodes_bus::{proto, proto::event::Body};
use wnodes_gateway::{GatewayConfig, GatewayHandler};
use wnodes_network::{
    NetworkHandler,
    config::{Ipv4Net, Mode},
    host::Host,
};
use wnodes_testkit::{host, host_test, service::*};

/// `nobody`/`nogroup`: a non-root account every Debian host has.
const UID: u32 = 65534;

fn cmd(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn a_guest_mounts_its_export_through_the_filtered_tap() {
    // A private network namespace for this process; threads and children made from here on
    // (the runtime's workers, nats-server, qemu) live in it.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    cmd(&["ip", "link", "set", "lo", "up"]);
    cmd(&["ip", "link", "add", "wnbr0", "type", "bridge"]);
    cmd(&["ip", "addr", "add", "10.231.1.1/24", "dev", "wnbr0"]);
    cmd(&["ip", "link", "set", "wnbr0", "up"]);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run_guest());
}

async fn run_guest() {
    let tb = TestBus::start().await;
    let network = NetworkHandler {
        host: Host::new(None).unwrap(),
        mode: Mode::Tap,
        bridge: "wnbr0".into(),
        pool: Some("10.231.1.0/24".parse::<Ipv4Net>().unwrap()),
        sriov: Default::default(),
        sriov_network: None,
        vlans: Default::default(),
        source: "network@hv1.test".into(),
    };
    let nstore = tb.store("network.db").await;
    wnodes_network::service::init_store(&nstore).await.unwrap();
    network.reconcile(&nstore).await.unwrap();
    tb.consume(nstore, &wnodes_bus::roles::NETWORK, HOST, network)
        .await;
    let gateway = GatewayHandler::new(
        &GatewayConfig {
            port_range: "33000-33999".into(),
            export_roots: vec![std::env::temp_dir()],
            ..Default::default()
        },
        "gateway@hv1.test".into(),
    )
    .unwrap();
    let gstore = tb.store("gateway.db").await;
    wnodes_gateway::service::init_store(&gstore).await.unwrap();
    tb.consume(gstore, &wnodes_bus::roles::GATEWAY, HOST, gateway)
        .await;

    // The export: owned by the job's user, with a file from the host.
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let export = work.path().join("export");
    std::fs::create_dir(&export).unwrap();
    std::fs::write(export.join("input.txt"), "from-the-host\n").unwrap();
    std::os::unix::fs::chown(&export, Some(UID), Some(UID)).unwrap();

    let vm = "vm-e2e000000001";
    let spec = proto::VmSpec {
        vm_id: vm.into(),
        network_mode: proto::NetworkMode::VirtioTap as i32,
        storage_mode: proto::StorageMode::Sshfs as i32,
        exports: vec![proto::StorageExport {
            name: "home".into(),
            host_path: export.display().to_string(),
            guest_path: "/shared".into(),
            read_only: false,
        }],
        owner: Some(proto::JobOwner {
            user: "nobody".into(),
            uid: UID,
            gid: UID,
        }),
        ..Default::default()
    };
    tb.publish(&ev(&run("1"), vm_requested(spec))).await;
    let net = tb
        .wait_for("network.ready", |e| match &e.body {
            Some(Body::NetworkReady(r)) if r.vm_id == vm => Some(r.clone()),
            _ => None,
        })
        .await;
    let st = tb
        .wait_for("storage.ready", |e| match &e.body {
            Some(Body::StorageReady(r)) if r.vm_id == vm => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(st.address, net.gateway);
    assert_eq!(format!("{}/24", st.allowed_client), net.address);

    // Boot the guest as the launcher would (guest/README.md, "QEMU command line").
    let a_dir = work.path().join("a");
    let append = format!(
        "wnodes.ip={} wnodes.gw={} wnodes.sshfs={}:{}:{} wnodes.uid={UID} wnodes.gid={UID}",
        net.address, net.gateway, st.address, st.port, st.remote_path
    );
    let job =
        "echo \"uid=$(id -u)\"\ncat /shared/input.txt\necho from-the-guest > /shared/out.txt\n";
    let (status, report) = boot(&a_dir, job, &append, &net.tap, &net.mac).await;
    assert!(status.success(), "qemu: {status}\n{report}");
    let read = |n: &str| std::fs::read_to_string(a_dir.join(n)).unwrap_or_default();
    assert!(
        read("status.log").contains("WNODES phase=shared"),
        "{report}"
    );
    assert!(read("status.log").contains("WNODES exit=0"), "{report}");
    assert!(read("output.log").contains("uid=65534"), "{report}");
    assert!(read("output.log").contains("from-the-host"), "{report}");
    let out = export.join("out.txt");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "from-the-guest\n");
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (UID, UID),
        "written as the job's user"
    );

    // A second VM on its own tap that claims the first VM's address to reach the first VM's
    // export: the filter drops its frames, the mount fails (guest exit 124), nothing is written.
    let vm_b = "vm-e2e000000002";
    let spec_b = proto::VmSpec {
        vm_id: vm_b.into(),
        ..Default::default()
    };
    tb.publish(&ev(&run("2"), vm_requested(spec_b))).await;
    let net_b = tb
        .wait_for("network.ready of B", |e| match &e.body {
            Some(Body::NetworkReady(r)) if r.vm_id == vm_b => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_ne!(net_b.address, net.address);
    let b_dir = work.path().join("b");
    let append_b = format!(
        "wnodes.ip={} wnodes.gw={} wnodes.sshfs={}:{}:{}",
        net.address, net.gateway, st.address, st.port, st.remote_path
    );
    let job_b = "echo stolen > /shared/stolen.txt\n";
    cmd(&["ip", "neigh", "flush", "all"]); // forget A's MAC: only the filter may stop B
    let (status, report) = boot(&b_dir, job_b, &append_b, &net_b.tap, &net_b.mac).await;
    assert!(status.success(), "qemu: {status}\n{report}");
    let status_b = std::fs::read_to_string(b_dir.join("status.log")).unwrap_or_default();
    assert!(
        status_b.contains("WNODES exit=124"),
        "the spoofing guest mounted: {report}"
    );
    assert!(!export.join("stolen.txt").exists());
    // Control: without the filter the same spoofing guest gets in, so the filter is what
    // stopped it above.
    cmd(&["nft", "delete", "table", "bridge", "wnodes"]);
    cmd(&["ip", "neigh", "flush", "all"]);
    let c_dir = work.path().join("control");
    let (status, report) = boot(&c_dir, job_b, &append_b, &net_b.tap, &net_b.mac).await;
    assert!(status.success(), "qemu: {status}\n{report}");
    assert!(
        export.join("stolen.txt").exists(),
        "control run failed: {report}"
    );

    // The launcher's vm.stopped releases both.
    tb.publish(&ev(&run("1"), vm_stopped(vm))).await;
    for kind in [proto::ResourceKind::Network, proto::ResourceKind::Storage] {
        tb.wait_for(&format!("{kind:?} released"), |e| match &e.body {
            Some(Body::ResourceReleased(r)) if r.vm_id == vm && r.kind == kind as i32 => Some(()),
            _ => None,
        })
        .await;
    }
    assert!(
        Host::new(None)
            .unwrap()
            .link(&net.tap)
            .await
            .unwrap()
            .is_none()
    );
    let port = u16::try_from(st.port).unwrap();
    assert!(
        tokio::net::TcpStream::connect((net.gateway.as_str(), port))
            .await
            .is_err()
    );
}

/// Boots the test guest on `tap` with `mac`, `job` as its payload and `params` on the kernel
/// command line; returns qemu's exit status and the three logs, for assertion messages.
async fn boot(
    dir: &Path,
    job: &str,
    params: &str,
    tap: &str,
    mac: &str,
) -> (std::process::ExitStatus, String) {
    let net = wnodes_testkit::vm::GuestNet::Tap { tap, mac };
    let b = wnodes_testkit::vm::boot_guest(dir, job, params, net, None).await;
    (b.status, b.report)
}

fn main() -> ExitCode {
    host::main(vec![host_test!(
        sync a_guest_mounts_its_export_through_the_filtered_tap
        needs [Root, Qemu, TestGuest, DevFuse, SftpServer, Setpriv, Nft]
    )])
}
