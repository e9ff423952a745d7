//! The `wnodes-gateway` binary as deployed: config file with a `[gateway]` section, a VM
//! served, SIGTERM → exit 0 with the listener closed, and a restart that re-opens it; and
//! events that break the host's policy (exports outside the export roots, through a symlink or
//! `..`, as root or a system account; NFS from a host without it, to a user-mode guest, of
//! a path an export definition cannot carry, or for a VM id that cannot name it), each refused with `storage.failed` naming the rule and
//! an error log line, with no listener opened.
//! A host test (`wnodes_testkit::host`): needs root, `sftp-server` and `setpriv`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{os::unix::fs::PermissionsExt, path::Path, process::ExitCode, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wnodes_bus::proto::{self, event::Body};
use wnodes_testkit::{
    ServiceConfig, ServiceProcess, host, host_test, process::ProcessBuilder, service::*,
};

fn gateway(nats: &wnodes_bus::NatsConfig, dir: &Path) -> ProcessBuilder {
    let conf = ServiceConfig::new(HOST, nats, &dir.join("state"))
        .set("gateway", "port_range", "32000-32999")
        .set("gateway", "export_roots", vec![dir]);
    ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-gateway"), dir).config(&conf)
}

/// SIGTERM; the gateway exits 0.
async fn sigterm(mut gateway: ServiceProcess) {
    let status = gateway.terminate(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "{status}: {}", gateway.stderr());
}

/// SFTP INIT → the first bytes of the answer (empty: closed).
async fn hello(port: u16) -> Option<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3]).await.ok()?;
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

async fn binary_serves_stops_and_reopens_after_restart() {
    let tb = TestBus::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let gateway = gateway(
        &tb.server
            .identity(&wnodes_bus::roles::GATEWAY, HOST)
            .await
            .unwrap(),
        dir.path(),
    );
    let child = gateway.spawn().unwrap();

    let vm = "vm-c0c0c0c0c0c0";
    let spec = proto::VmSpec {
        vm_id: vm.into(),
        exports: vec![proto::StorageExport {
            name: "home".into(),
            host_path: dir.path().display().to_string(),
            guest_path: "/shared".into(),
            read_only: true,
        }],
        owner: Some(proto::JobOwner {
            user: "nobody".into(),
            uid: 65534,
            gid: 65534,
        }),
        ..Default::default()
    };
    tb.publish(&ev(&run("1"), vm_requested(spec))).await;
    tb.publish(&ev(
        &run("1"),
        Body::NetworkReady(proto::NetworkReady {
            vm_id: vm.into(),
            mode: proto::NetworkMode::VirtioTap as i32,
            address: "127.0.0.1/8".into(),
            gateway: "127.0.0.1".into(),
            ..Default::default()
        }),
    ))
    .await;
    let (source, r) = tb
        .wait_for("storage.ready from the binary", |e| match &e.body {
            Some(Body::StorageReady(r)) if r.vm_id == vm => Some((e.source.clone(), r.clone())),
            _ => None,
        })
        .await;
    assert_eq!(source, format!("gateway@{HOST}"));
    let port = u16::try_from(r.port).unwrap();
    assert!((32000..=32999).contains(&port));
    assert_eq!(hello(port).await.and_then(|b| b.get(4).copied()), Some(2));

    // SIGTERM: exit 0, listener closed.
    sigterm(child).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );

    // Restart: the serving VM's listener comes back on the same port.
    let child = gateway.spawn().unwrap();
    wait_until_hello(port).await;
    sigterm(child).await;
}

async fn wait_until_hello(port: u16) {
    wnodes_testkit::wait_until(
        Duration::from_secs(15),
        "listener re-opened",
        || async move { hello(port).await.filter(|b| b.get(4) == Some(&2)) },
    )
    .await
    .unwrap();
}

/// One attack: a VM whose spec breaks `rule`.
struct Attack {
    vm: &'static str,
    host_path: String,
    uid: u32,
    gid: u32,
    /// NFS rather than sshfs.
    nfs: bool,
    /// qemu user-mode networking rather than a tap.
    user_mode: bool,
    rule: &'static str,
}

async fn binary_refuses_what_host_policy_forbids_and_opens_nothing() {
    let tb = TestBus::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The export root, a job's directory in it, and links a job could have planted there.
    let root = dir.path().join("exports");
    let job = root.join("job");
    std::fs::create_dir_all(&job).unwrap();
    std::os::unix::fs::chown(&job, Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::symlink("/root", root.join("to-root")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../etc", job.join("to-etc")).unwrap();
    // A job directory whose name an NFS export definition cannot carry.
    let spaced = root.join("job two");
    std::fs::create_dir_all(&spaced).unwrap();
    std::os::unix::fs::chown(&spaced, Some(65534), Some(65534)).unwrap();
    let conf = ServiceConfig::new(
        HOST,
        &tb.server
            .identity(&wnodes_bus::roles::GATEWAY, HOST)
            .await
            .unwrap(),
        &dir.path().join("state"),
    )
    .set("gateway", "port_range", "32100-32109")
    .set("gateway", "export_roots", vec![&root]);
    let mut child = ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-gateway"), dir.path())
        .config(&conf)
        .spawn()
        .unwrap();

    let path = |p: &Path| p.display().to_string();
    let attacks = [
        Attack {
            vm: "vm-a00000000001",
            host_path: "/".into(),
            uid: 65534,
            gid: 65534,
            nfs: false,
            user_mode: false,
            rule: "exports.roots",
        },
        Attack {
            vm: "vm-a00000000002",
            host_path: "/etc".into(),
            uid: 65534,
            gid: 65534,
            nfs: false,
            user_mode: false,
            rule: "exports.roots",
        },
        Attack {
            vm: "vm-a00000000003",
            host_path: path(&root.join("to-root")),
            uid: 65534,
            gid: 65534,
            nfs: false,
            user_mode: false,
            rule: "exports.roots",
        },
        Attack {
            vm: "vm-a00000000004",
            host_path: path(&job.join("to-etc")),
            uid: 65534,
            gid: 65534,
            nfs: false,
            user_mode: false,
            rule: "exports.roots",
        },
        Attack {
            vm: "vm-a00000000005",
            host_path: format!("{}/../..", path(&job)),
            uid: 65534,
            gid: 65534,
            nfs: false,
            user_mode: false,
            rule: "exports.roots",
        },
        Attack {
            vm: "vm-a00000000006",
            host_path: path(&job),
            uid: 0,
            gid: 0,
            nfs: false,
            user_mode: false,
            rule: "owner.job_uids",
        },
        Attack {
            vm: "vm-a00000000007",
            host_path: path(&job),
            uid: 100,
            gid: 65534,
            nfs: false,
            user_mode: false,
            rule: "owner.job_uids",
        },
        Attack {
            vm: "vm-a00000000008",
            host_path: path(&job),
            uid: 65534,
            gid: 0,
            nfs: false,
            user_mode: false,
            rule: "owner.job_gids",
        },
        Attack {
            vm: "vm-a00000000009",
            host_path: "etc".into(),
            uid: 65534,
            gid: 65534,
            nfs: false,
            user_mode: false,
            rule: "exports.absolute",
        },
        // NFS from a host with no [gateway.nfs].
        Attack {
            vm: "vm-a0000000000b",
            host_path: path(&job),
            uid: 65534,
            gid: 65534,
            nfs: true,
            user_mode: false,
            rule: "storage.nfs",
        },
        // NFS to a guest on user-mode networking: every guest is 127.0.0.1 there.
        Attack {
            vm: "vm-a0000000000c",
            host_path: path(&job),
            uid: 65534,
            gid: 65534,
            nfs: true,
            user_mode: true,
            rule: "storage.nfs_user_mode",
        },
        Attack {
            vm: "vm-a0000000000d",
            host_path: path(&spaced),
            uid: 65534,
            gid: 65534,
            nfs: true,
            user_mode: false,
            rule: "exports.path_chars",
        },
        // A VM id that cannot name an NFS export (its pseudo path <pseudo_root>/<vm id>).
        Attack {
            vm: "vm-a0000000000e/..",
            host_path: path(&job),
            uid: 65534,
            gid: 65534,
            nfs: true,
            user_mode: false,
            rule: "storage.nfs_vm_id",
        },
    ];
    let spec = |vm: &str, host_path: &str, uid: u32, gid: u32, nfs: bool| proto::VmSpec {
        vm_id: vm.into(),
        storage_mode: if nfs {
            proto::StorageMode::Nfs as i32
        } else {
            proto::StorageMode::Sshfs as i32
        },
        exports: vec![proto::StorageExport {
            name: "home".into(),
            host_path: host_path.into(),
            guest_path: "/shared".into(),
            read_only: false,
        }],
        owner: Some(proto::JobOwner {
            user: "nobody".into(),
            uid,
            gid,
        }),
        ..Default::default()
    };
    let network_ready = |vm: &str, user_mode: bool| {
        Body::NetworkReady(proto::NetworkReady {
            vm_id: vm.into(),
            mode: if user_mode {
                proto::NetworkMode::User as i32
            } else {
                proto::NetworkMode::VirtioTap as i32
            },
            address: "127.0.0.1/8".into(),
            gateway: "127.0.0.1".into(),
            ..Default::default()
        })
    };
    for (i, a) in attacks.iter().enumerate() {
        let r = run(&format!("attack-{i}"));
        tb.publish(&ev(
            &r,
            vm_requested(spec(a.vm, &a.host_path, a.uid, a.gid, a.nfs)),
        ))
        .await;
        tb.publish(&ev(&r, network_ready(a.vm, a.user_mode))).await;
    }
    for a in &attacks {
        let reason = tb.wait_payload::<proto::StorageFailed>(a.vm).await.reason;
        assert!(
            reason.starts_with(&format!("host policy {}: ", a.rule)),
            "{}: {reason}",
            a.vm
        );
        let log = child.stderr();
        assert!(
            log.lines().any(|l| l.contains("ERROR")
                && l.contains("Refused by host policy")
                && l.contains(a.vm)
                && l.contains(a.rule)),
            "no error line for {}:\n{log}",
            a.vm
        );
    }
    for a in &attacks {
        assert!(
            tb.events_of(a.vm)
                .iter()
                .all(|e| !matches!(e.body, Some(Body::StorageReady(_)))),
            "{} was served",
            a.vm
        );
    }
    // No listener on any port of the range.
    for port in 32100..=32109 {
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "a listener on {port}"
        );
    }

    // The same gateway serves the job's own directory: the refusals were the policy's.
    let vm = "vm-a0000000000a";
    let r = run("allowed");
    tb.publish(&ev(
        &r,
        vm_requested(spec(vm, &path(&job), 65534, 65534, false)),
    ))
    .await;
    tb.publish(&ev(&r, network_ready(vm, false))).await;
    let ready = tb.wait_payload::<proto::StorageReady>(vm).await;
    let port = u16::try_from(ready.port).unwrap();
    assert_eq!(hello(port).await.and_then(|b| b.get(4).copied()), Some(2));
    let status = child.terminate(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "{status}: {}", child.stderr());
}

fn main() -> ExitCode {
    host::main(vec![
        host_test!(
            multi_thread binary_serves_stops_and_reopens_after_restart
            needs [Root, SftpServer, Setpriv]
        ),
        host_test!(
            multi_thread binary_refuses_what_host_policy_forbids_and_opens_nothing
            needs [Root, SftpServer, Setpriv]
        ),
    ])
}
