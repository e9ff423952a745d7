//! The NFS gateway with real servers.
//!
//! - `vm_nfs_guest_mounts_its_export_and_another_address_is_refused`: the network service makes
//!   the VMs' taps, the gateway runs its own nfs-ganesha (and private dbus-daemon) and adds the
//!   VM's export over D-Bus; the test guest boots under TCG on its tap, mounts the export with
//!   the kernel's NFSv4 client and writes, as a uid that is not the job's, a file that lands on
//!   the host as the job's uid (the export squashes every uid to the job's). A
//!   second guest on its own tap and address, asking for the first VM's export, is refused.
//!   After `vm.stopped` the export is gone from the server. Then a VM whose `vm.stopped` comes
//!   while the gateway is down (its consumer stopped, its ganesha left running as after a
//!   crash): the restarted gateway replaces the leftover daemon, and the export is gone once
//!   it has caught up.
//! - `ganesha_keeps_a_redelivered_export_and_replaces_another_vms`: a managed ganesha (no
//!   guest) on the loopback: the same export added twice is kept; an export id still active
//!   for one VM (as a gateway that crashed before recording it would leave it) and handed to
//!   another VM is replaced, and ganesha's own `DisplayExport` names the new VM's address only.
//! - `exportfs_adds_lists_and_removes_kernel_exports`: the kernel backend against the real
//!   `exportfs`, its table (`/var/lib/nfs`) on a tmpfs in a private mount namespace. No nfsd
//!   runs on these hosts, so nothing is served; the table is what `exportfs` keeps.
//!
//! Both run in private namespaces (entered before the runtime starts; nextest runs each test
//! in its own process).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use wnodes_bus::{proto, proto::event::Body};
use wnodes_gateway::{
    GatewayConfig, GatewayHandler,
    nfs::{NfsBackend, NfsConfig, NfsExport, NfsServer, config::GaneshaConfig},
};
use wnodes_network::{
    NetworkHandler,
    config::{Ipv4Net, Mode},
    host::Host,
};
use wnodes_testkit::{
    host::{self, Precondition},
    host_test,
    service::*,
};

/// `nobody`/`nogroup`: a non-root account every Debian host has.
const UID: u32 = 65534;
/// The uid the guest's payload runs as: not the export's, so that a file landing as [`UID`]
/// shows the export squashes (the directory, `UID`'s and mode 0755, takes no other writer).
const GUEST_UID: u32 = 4321;

fn ganesha() -> Result<(), String> {
    for p in [
        "/usr/bin/ganesha.nfsd",
        "/usr/bin/dbus-daemon",
        "/usr/bin/dbus-send",
    ] {
        if !Path::new(p).exists() {
            return Err(format!(
                "{p} (nfs-ganesha, nfs-ganesha-vfs, dbus-daemon: scripts/install-vm-deps.sh)"
            ));
        }
    }
    Ok(())
}

fn exportfs() -> Result<(), String> {
    if Path::new("/usr/sbin/exportfs").exists() {
        Ok(())
    } else {
        Err("/usr/sbin/exportfs (nfs-kernel-server: scripts/install-vm-deps.sh)".into())
    }
}

const GANESHA: Precondition = Precondition::Other("nfs-ganesha", ganesha);
const EXPORTFS: Precondition = Precondition::Other("exportfs", exportfs);
const VM_NEEDS: &[Precondition] = &[
    Precondition::Root,
    Precondition::Qemu,
    Precondition::TestGuest,
    Precondition::Nft,
    GANESHA,
];
const EXPORTFS_NEEDS: &[Precondition] = &[Precondition::Root, EXPORTFS];
const GANESHA_NEEDS: &[Precondition] = &[Precondition::Root, GANESHA];

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

fn vm_nfs_guest_mounts_its_export_and_another_address_is_refused() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    cmd(&["ip", "link", "set", "lo", "up"]);
    cmd(&["ip", "link", "add", "wnbr0", "type", "bridge"]);
    cmd(&["ip", "addr", "add", "10.231.1.1/24", "dev", "wnbr0"]);
    cmd(&["ip", "link", "set", "wnbr0", "up"]);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run_guests());
}

fn nfs_spec(vm: &str, export: &Path) -> proto::VmSpec {
    proto::VmSpec {
        vm_id: vm.into(),
        network_mode: proto::NetworkMode::VirtioTap as i32,
        storage_mode: proto::StorageMode::Nfs as i32,
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
    }
}

async fn gateway(cfg: &GatewayConfig) -> GatewayHandler {
    GatewayHandler::new(cfg, "gateway@hv1.test".into())
        .unwrap()
        .with_nfs(cfg)
        .await
        .unwrap()
}

async fn ids(server: &NfsServer) -> Vec<u16> {
    server
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect()
}

async fn run_guests() {
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

    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = work.path().join("ganesha");
    let _reaper = Reaper(state.clone());
    let cfg = GatewayConfig {
        export_roots: vec![work.path().to_owned()],
        nfs: Some(NfsConfig {
            backend: NfsBackend::Ganesha,
            ganesha: GaneshaConfig {
                state_dir: state.clone(),
                ..Default::default()
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    let gw = gateway(&cfg).await;
    let server: Arc<NfsServer> = gw.nfs.clone().unwrap();
    let gstore = tb.store("gateway.db").await;
    wnodes_gateway::service::init_store(&gstore).await.unwrap();
    gw.reconcile(&gstore).await.unwrap();
    let first = tb
        .consume(gstore, &wnodes_bus::roles::GATEWAY, HOST, gw)
        .await;

    // The export: owned by the job's user, with a file from the host.
    let export = work.path().join("export");
    std::fs::create_dir(&export).unwrap();
    std::fs::write(export.join("input.txt"), "from-the-host\n").unwrap();
    std::os::unix::fs::chown(&export, Some(UID), Some(UID)).unwrap();
    std::fs::set_permissions(&export, std::fs::Permissions::from_mode(0o755)).unwrap();

    let vm = "vm-0f5000000001";
    tb.publish(&ev(&run("1"), vm_requested(nfs_spec(vm, &export))))
        .await;
    let net = wait_net(&tb, vm).await;
    let st = tb
        .wait_for("storage.ready", |e| match &e.body {
            Some(Body::StorageReady(r)) if r.vm_id == vm => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(st.mode, proto::StorageMode::Nfs as i32);
    assert_eq!(st.address, net.gateway);
    assert_eq!(st.remote_path, format!("/wnodes/{vm}"));
    assert_eq!(format!("{}/24", st.allowed_client), net.address);
    let held = ids(&server).await;
    assert_eq!(held.len(), 1, "one export on the server: {held:?}");

    let a_dir = work.path().join("a");
    let append = format!(
        "wnodes.ip={} wnodes.gw={} wnodes.nfs={}:{}:{} wnodes.uid={GUEST_UID} wnodes.gid={GUEST_UID}",
        net.address, net.gateway, st.address, st.port, st.remote_path
    );
    let job = "echo \"uid=$(id -u)\"\ncat /shared/input.txt\necho from-the-guest > /shared/out.txt\ngrep ' /shared ' /proc/mounts\n";
    let (status, report) = boot(&a_dir, job, &append, &net.tap, &net.mac).await;
    assert!(status.success(), "qemu: {status}\n{report}");
    let read = |d: &Path, n: &str| std::fs::read_to_string(d.join(n)).unwrap_or_default();
    assert!(
        read(&a_dir, "status.log").contains("WNODES exit=0"),
        "{report}"
    );
    let out = read(&a_dir, "output.log");
    assert!(out.contains(&format!("uid={GUEST_UID}")), "{report}");
    assert!(out.contains("from-the-host"), "{report}");
    assert!(out.contains(" nfs4 "), "mounted over NFSv4: {report}");
    let written = export.join("out.txt");
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        "from-the-guest\n"
    );
    let meta = std::fs::metadata(&written).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (UID, UID),
        "written by guest uid {GUEST_UID}, squashed to the job's user"
    );

    // Another VM, on its own tap with its own address, asks for the first VM's export.
    let vm_b = "vm-0f5000000002";
    let spec_b = proto::VmSpec {
        vm_id: vm_b.into(),
        ..Default::default()
    };
    tb.publish(&ev(&run("2"), vm_requested(spec_b))).await;
    let net_b = wait_net(&tb, vm_b).await;
    assert_ne!(net_b.address, net.address);
    let b_dir = work.path().join("b");
    let append_b = format!(
        "wnodes.ip={} wnodes.gw={} wnodes.nfs={}:{}:{}",
        net_b.address, net_b.gateway, st.address, st.port, st.remote_path
    );
    let (status, report) = boot(
        &b_dir,
        "echo stolen > /shared/stolen.txt\n",
        &append_b,
        &net_b.tap,
        &net_b.mac,
    )
    .await;
    assert!(status.success(), "qemu: {status}\n{report}");
    assert!(
        read(&b_dir, "status.log").contains("WNODES exit=124"),
        "another address mounted the export: {report}"
    );
    assert!(!export.join("stolen.txt").exists());

    // vm.stopped withdraws the export.
    tb.publish(&ev(&run("1"), vm_stopped(vm))).await;
    wait_released(&tb, vm).await;
    assert!(ids(&server).await.is_empty(), "the export is gone");
    assert!(
        std::fs::read_dir(state.join("exports"))
            .unwrap()
            .next()
            .is_none(),
        "its export file is gone"
    );

    // A VM whose vm.stopped arrives while the gateway is down.
    let vm_c = "vm-0f5000000003";
    tb.publish(&ev(&run("3"), vm_requested(nfs_spec(vm_c, &export))))
        .await;
    wait_net(&tb, vm_c).await;
    tb.wait_for("storage.ready of C", |e| match &e.body {
        Some(Body::StorageReady(r)) if r.vm_id == vm_c => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(ids(&server).await.len(), 1);
    let old_pid = std::fs::read_to_string(state.join("ganesha.pid")).unwrap();
    first.cancel(); // the gateway is gone; its ganesha keeps running, as after a crash
    tokio::time::sleep(Duration::from_millis(500)).await;
    tb.publish(&ev(&run("3"), vm_stopped(vm_c))).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        ids(&server).await.len(),
        1,
        "nobody withdrew it while the gateway was down"
    );
    drop(server);
    let gw2 = gateway(&cfg).await;
    let new_pid = std::fs::read_to_string(state.join("ganesha.pid")).unwrap();
    assert_ne!(old_pid, new_pid, "the leftover daemon was replaced");
    assert!(
        !Path::new(&format!("/proc/{}", old_pid.trim())).exists(),
        "the leftover daemon is gone"
    );
    let server2 = gw2.nfs.clone().unwrap();
    let gstore = tb.store("gateway.db").await;
    gw2.reconcile(&gstore).await.unwrap();
    tb.consume(gstore, &wnodes_bus::roles::GATEWAY, HOST, gw2)
        .await;
    wait_released(&tb, vm_c).await;
    assert!(
        ids(&server2).await.is_empty(),
        "the stopped VM's export is gone after the restart"
    );
    server2.stop().await;
}

/// Stops the daemons a failed test leaves behind (their pid files are in the state dir).
struct Reaper(std::path::PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for f in ["ganesha.pid", "bus.pid"] {
            if let Some(pid) = std::fs::read_to_string(self.0.join(f))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

async fn wait_net(tb: &TestBus, vm: &str) -> proto::NetworkReady {
    tb.wait_for(&format!("network.ready of {vm}"), |e| match &e.body {
        Some(Body::NetworkReady(r)) if r.vm_id == vm => Some(r.clone()),
        _ => None,
    })
    .await
}

async fn wait_released(tb: &TestBus, vm: &str) {
    tb.wait_for(&format!("storage of {vm} released"), |e| match &e.body {
        Some(Body::ResourceReleased(r))
            if r.vm_id == vm && r.kind == proto::ResourceKind::Storage as i32 =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
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

fn ganesha_keeps_a_redelivered_export_and_replaces_another_vms() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let work = tempfile::tempdir().unwrap();
            // A port of its own on the loopback: the VM test's daemon may run beside it.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let cfg = NfsConfig {
                backend: NfsBackend::Ganesha,
                port,
                export_ids: "100-199".into(),
                ganesha: GaneshaConfig {
                    state_dir: work.path().join("ganesha"),
                    bind_address: Some("127.0.0.1".parse().unwrap()),
                    ..Default::default()
                },
                ..Default::default()
            };
            let server = NfsServer::start(&cfg).await.unwrap();
            let dir = work.path().join("job");
            std::fs::create_dir_all(&dir).unwrap();
            let export = |vm: &str, client: &str| NfsExport {
                id: 100,
                vm_id: vm.into(),
                path: dir.clone(),
                client: client.parse().unwrap(),
                uid: UID,
                gid: UID,
                read_only: false,
            };
            let first = export("vm-000000000001", "10.79.0.2");
            server.add(&first).await.unwrap();
            assert_eq!(server.clients(100).await.unwrap(), ["10.79.0.2/32"]);
            // Redelivered: ganesha says "already active"; the same block is kept.
            server.add(&first).await.unwrap();
            assert_eq!(server.clients(100).await.unwrap(), ["10.79.0.2/32"]);
            // The same id and path for another VM: replaced, the first VM's address gone.
            let second = export("vm-000000000002", "10.79.0.3");
            server.add(&second).await.unwrap();
            assert_eq!(server.clients(100).await.unwrap(), ["10.79.0.3/32"]);
            let listed = server.list().await.unwrap();
            assert_eq!(listed.len(), 1, "{listed:?}");
            assert_eq!((listed[0].id, &listed[0].path), (100, &dir));
            server.remove(100, &dir).await.unwrap();
            assert!(server.list().await.unwrap().is_empty());
            assert!(
                server.clients(100).await.is_err(),
                "export 100 still displayed"
            );
            server.stop().await;
        });
}

fn exportfs_adds_lists_and_removes_kernel_exports() {
    // exportfs keeps its table in /var/lib/nfs: a tmpfs of this process's own.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
    cmd(&["mount", "--make-rprivate", "/"]);
    std::fs::create_dir_all("/var/lib/nfs").unwrap();
    cmd(&["mount", "-t", "tmpfs", "tmpfs", "/var/lib/nfs"]);
    for f in ["etab", "rmtab"] {
        std::fs::write(Path::new("/var/lib/nfs").join(f), "").unwrap();
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let work = tempfile::tempdir().unwrap();
            let cfg = NfsConfig {
                backend: NfsBackend::Exportfs,
                export_ids: "100-199".into(),
                ..Default::default()
            };
            let server = NfsServer::start(&cfg).await.unwrap();
            assert!(server.list().await.unwrap().is_empty());
            let export = |id, name: &str, client: &str, read_only| {
                let path = work.path().join(name);
                std::fs::create_dir_all(&path).unwrap();
                NfsExport {
                    id,
                    vm_id: format!("vm-00000000000{}", id % 10),
                    path,
                    client: client.parse().unwrap(),
                    uid: 1000,
                    gid: 1000,
                    read_only,
                }
            };
            let a = export(101, "a", "10.231.1.2", false);
            let b = export(
                102,
                "a-rather-long-directory-name-so-that-exportfs-wraps-its-line",
                "10.231.1.3",
                true,
            );
            // Outside the range: the site's own export, never touched.
            let site = export(7, "site", "10.0.0.9", true);
            for e in [&a, &b, &site, &a] {
                server.add(e).await.unwrap();
            }
            let mut held: Vec<(u16, String, Option<String>)> = server
                .list()
                .await
                .unwrap()
                .into_iter()
                .map(|p| (p.id, p.path.display().to_string(), p.client))
                .collect();
            held.sort();
            assert_eq!(
                held,
                [
                    (101, a.path.display().to_string(), Some("10.231.1.2".into())),
                    (102, b.path.display().to_string(), Some("10.231.1.3".into())),
                ]
            );
            assert_eq!(server.remote_path(&a), a.path.display().to_string());
            let etab = std::fs::read_to_string("/var/lib/nfs/etab").unwrap();
            let line = etab
                .lines()
                .find(|l| l.starts_with(&format!("{}\t", a.path.display())))
                .unwrap();
            for want in [
                "all_squash",
                "anonuid=1000",
                "anongid=1000",
                "fsid=101",
                "rw",
            ] {
                assert!(line.contains(want), "{want} missing: {line}");
            }
            server.remove(101, &a.path).await.unwrap();
            server.remove(101, &a.path).await.unwrap(); // absent: nothing to do
            let left: Vec<u16> = server
                .list()
                .await
                .unwrap()
                .into_iter()
                .map(|p| p.id)
                .collect();
            assert_eq!(left, [102]);
            let etab = std::fs::read_to_string("/var/lib/nfs/etab").unwrap();
            assert!(etab.contains(&site.path.display().to_string()));
            assert!(!etab.contains(&format!("{}\t", a.path.display())));
            // A path an export line cannot carry is refused before exportfs runs.
            let spaced = NfsExport {
                path: work.path().join("a b"),
                ..a.clone()
            };
            assert!(server.add(&spaced).await.is_err());
        });
}

fn main() -> ExitCode {
    host::main(vec![
        host_test!(sync vm_nfs_guest_mounts_its_export_and_another_address_is_refused needs VM_NEEDS),
        host_test!(sync ganesha_keeps_a_redelivered_export_and_replaces_another_vms needs GANESHA_NEEDS),
        host_test!(sync exportfs_adds_lists_and_removes_kernel_exports needs EXPORTFS_NEEDS),
    ])
}
