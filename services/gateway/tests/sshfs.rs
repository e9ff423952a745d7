//! The gateway with the real `sftp-server` (through `setpriv`) and a real `sshfs` mount on this
//! host, over 127.0.0.0/8, with a real nats-server and consumer. Host tests
//! (`wnodes_testkit::host`): they need root, `sshfs`, `sftp-server`, `setpriv` and `/dev/fuse`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{
    net::SocketAddr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wnodes_bus::{proto, proto::event::Body};
use wnodes_gateway::{GatewayConfig, GatewayHandler, service};
use wnodes_testkit::{host, host_test, service::*};

/// The job's uid/gid: `nobody`/`nogroup`, a non-root account every Debian host has
/// (`sftp-server` refuses a uid without a passwd entry, so an arbitrary uid cannot be used).
const UID: u32 = 65534;

fn handler(bind: Option<&str>) -> GatewayHandler {
    let cfg = GatewayConfig {
        bind_address: bind.map(|b| b.parse().unwrap()),
        // Ephemeral-looking range away from other tests' fixed ports; a taken port is skipped.
        port_range: "31000-31999".into(),
        // Every test's export is a temp dir.
        export_roots: vec![std::env::temp_dir()],
        ..Default::default()
    };
    GatewayHandler::new(&cfg, "gateway@hv1.test".into()).unwrap()
}

async fn start(tb: &TestBus, h: GatewayHandler) {
    let store = tb.store("gateway.db").await;
    service::init_store(&store).await.unwrap();
    h.reconcile(&store).await.unwrap();
    tb.consume(store, &wnodes_bus::roles::GATEWAY, HOST, h)
        .await;
}

/// A world-traversable temp dir with `job/` (owned by the job's uid) and `job/rootonly/`
/// (root's, 0755).
struct Export {
    dir: tempfile::TempDir,
}

impl Export {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let job = dir.path().join("job");
        std::fs::create_dir(&job).unwrap();
        std::fs::write(job.join("input.txt"), "from the host\n").unwrap();
        std::fs::create_dir(job.join("rootonly")).unwrap();
        std::fs::set_permissions(job.join("rootonly"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::set_permissions(
            job.join("input.txt"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        std::os::unix::fs::chown(&job, Some(UID), Some(UID)).unwrap();
        Self { dir }
    }

    fn job(&self) -> PathBuf {
        self.dir.path().join("job")
    }

    fn mnt(&self, name: &str) -> PathBuf {
        let m = self.dir.path().join(name);
        std::fs::create_dir_all(&m).unwrap();
        m
    }
}

fn spec(vm_id: &str, export: &Path, read_only: bool, uid: u32) -> proto::VmSpec {
    proto::VmSpec {
        vm_id: vm_id.into(),
        exports: vec![proto::StorageExport {
            name: "home".into(),
            host_path: export.display().to_string(),
            guest_path: "/shared".into(),
            read_only,
        }],
        owner: Some(proto::JobOwner {
            user: "job".into(),
            uid,
            gid: uid,
        }),
        ..Default::default()
    }
}

fn network_ready(run: proto::JobRunRef, vm_id: &str, address: &str) -> proto::Event {
    ev(
        &run,
        Body::NetworkReady(proto::NetworkReady {
            vm_id: vm_id.into(),
            mode: proto::NetworkMode::VirtioTap as i32,
            tap: "wn-000000000000".into(),
            mac: "52:54:00:00:00:01".into(),
            address: address.into(),
            gateway: "127.0.0.1".into(),
            bridge: "wnbr0".into(),
            address_filtered: true,
            ..Default::default()
        }),
    )
}

/// A mounted sshfs, lazily unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn new(port: u32, remote: &str, mnt: PathBuf) -> Self {
        let out = Command::new("sshfs")
            .args([
                "-o",
                &format!("directport={port}"),
                &format!("127.0.0.1:{remote}"),
            ])
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sshfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(mnt)
    }
}

impl Mount {
    /// sshfs with extra `-o` options; the error is sshfs's stderr.
    fn try_new(port: u32, remote: &str, mnt: PathBuf, opts: &str) -> Result<Self, String> {
        let out = Command::new("sshfs")
            .args(["-o", &format!("directport={port},{opts}")])
            .arg(format!("127.0.0.1:{remote}"))
            .arg(&mnt)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(Self(mnt))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-uz").arg(&self.0).status();
    }
}

/// Pids of the sftp-server processes serving paths under `dir`.
fn sftp_servers(dir: &Path) -> Vec<(u32, u32)> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("sftp-server") && cmdline.contains(&needle) {
            let uid = std::fs::metadata(entry.path())
                .map(|m| m.uid())
                .unwrap_or(0);
            out.push((pid, uid));
        }
    }
    out
}

/// Connects from `from` to `to` and sends an SFTP INIT; returns what came back (empty: the
/// connection was closed without an answer).
async fn sftp_hello(from: &str, to: SocketAddr) -> Vec<u8> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(to).await.unwrap();
    // SSH_FXP_INIT, version 3: length 5, type 1, version 3.
    let _ = s.write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3]).await;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("no answer and not closed")
        .unwrap_or(0);
    buf.truncate(n);
    buf
}

async fn export_served_as_the_job_user_only_to_the_vm_and_closed_on_release() {
    let ex = Export::new();
    let tb = TestBus::start().await;
    start(&tb, handler(None)).await;

    // network.ready before vm.requested: retried until the spec is known.
    let vm = "vm-5e5e5e5e5e5e";
    tb.publish(&network_ready(run("1"), vm, "127.0.0.1/8"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    tb.publish(&ev(
        &run("1"),
        vm_requested(spec(vm, &ex.job(), false, UID)),
    ))
    .await;
    let r = tb.wait_payload::<proto::StorageReady>(vm).await;
    assert_eq!(r.mode, proto::StorageMode::Sshfs as i32);
    assert_eq!(r.address, "127.0.0.1");
    assert_eq!(r.allowed_client, "127.0.0.1");
    assert_eq!(r.remote_path, ex.job().display().to_string());
    assert_eq!(r.guest_path, "/shared");
    assert!((31000..=31999).contains(&r.port), "{}", r.port);
    let addr: SocketAddr = format!("127.0.0.1:{}", r.port).parse().unwrap();

    // Idempotent by vm_id: another network.ready for the VM gets the same listener.
    tb.publish(&network_ready(run("1").attempt(5), vm, "127.0.0.1/8"))
        .await;
    let again = tb
        .wait_for("second storage.ready", |e| match &e.body {
            Some(Body::StorageReady(s)) if e.run.as_ref()?.run_attempt == 5 => Some(s.clone()),
            _ => None,
        })
        .await;
    assert_eq!(again, r);

    // A connection from another address is closed without an SFTP answer; the VM's gets one.
    assert!(
        sftp_hello("127.0.0.3", addr).await.is_empty(),
        "a foreign client was served"
    );
    let hello = sftp_hello("127.0.0.1", addr).await;
    assert_eq!(
        hello.get(4),
        Some(&2u8),
        "SSH_FXP_VERSION expected, got {hello:?}"
    );

    // Through a real sshfs mount: files are created as the job's user, root's dirs are closed.
    {
        let m = Mount::new(r.port, &r.remote_path, ex.mnt("mnt"));
        assert_eq!(
            std::fs::read_to_string(m.0.join("input.txt")).unwrap(),
            "from the host\n"
        );
        std::fs::write(m.0.join("result.txt"), "written by the job\n").unwrap();
        let meta = std::fs::metadata(ex.job().join("result.txt")).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (UID, UID),
            "owned by the job on the host"
        );
        let denied = std::fs::write(m.0.join("rootonly/x"), "nope");
        assert!(denied.is_err(), "wrote into a root-owned directory");
        assert!(!ex.job().join("rootonly/x").exists());
        // The sftp-server of the mount runs as the job's uid, not root.
        let procs = sftp_servers(ex.dir.path());
        assert!(!procs.is_empty(), "no sftp-server found for the mount");
        assert!(procs.iter().all(|&(_, uid)| uid == UID), "{procs:?}");

        // Release while the mount is live: listener closed, sftp-server killed.
        tb.publish(&ev(&run("1"), vm_stopped(vm))).await;
        let detail = tb.wait_released(vm, proto::ResourceKind::Storage).await;
        assert!(detail.contains("closed"), "{detail}");
        // What the gateway carried, counted on the wire: at least the file read (14 bytes)
        // and the file written (19 bytes) with their SFTP requests and replies, and the two
        // SFTP hellos (9 bytes out, a version reply back).
        let traffic = tb
            .wait_for("the storage release's traffic", |e| match &e.body {
                Some(Body::ResourceReleased(r))
                    if r.vm_id == vm && r.kind == proto::ResourceKind::Storage as i32 =>
                {
                    Some(r.traffic)
                }
                _ => None,
            })
            .await
            .expect("the listener ran for the VM's whole life: its traffic is known");
        assert!(
            traffic.to_vm_bytes > "from the host\n".len() as u64 + 9,
            "{traffic:?}"
        );
        assert!(
            traffic.from_vm_bytes > "written by the job\n".len() as u64 + 18,
            "{traffic:?}"
        );
        assert!(
            sftp_servers(ex.dir.path()).is_empty(),
            "sftp-server left running"
        );
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert!(refused.is_err(), "the listener still accepts");
    }

    // User-mode networking: the guest reaches the host as 10.0.2.2, which qemu turns into a
    // connection from 127.0.0.1 to 127.0.0.1.
    let vm_user = "vm-0e0e0e0e0e0e";
    tb.publish(&ev(
        &run("7"),
        vm_requested(spec(vm_user, &ex.job(), false, UID)),
    ))
    .await;
    let mut user = network_ready(run("7"), vm_user, "10.0.2.15/24");
    if let Some(Body::NetworkReady(n)) = user.body.as_mut() {
        n.mode = proto::NetworkMode::User as i32;
        n.gateway = "10.0.2.2".into();
        n.address_filtered = false;
    }
    tb.publish(&user).await;
    let u = tb.wait_payload::<proto::StorageReady>(vm_user).await;
    assert_eq!(
        (u.address.as_str(), u.allowed_client.as_str()),
        ("10.0.2.2", "127.0.0.1")
    );
    let uaddr: SocketAddr = format!("127.0.0.1:{}", u.port).parse().unwrap();
    assert_eq!(sftp_hello("127.0.0.1", uaddr).await.get(4), Some(&2u8));

    // Tombstone: network.ready / vm.requested after the release are released, not served.
    tb.publish(&network_ready(run("1").attempt(2), vm, "127.0.0.1/8"))
        .await;
    tb.wait_for("late network.ready released", |e| {
        (e.run.as_ref()?.run_attempt == 2 && matches!(e.body, Some(Body::ResourceReleased(_))))
            .then_some(())
    })
    .await;
    tb.publish(&ev(
        &run("1").attempt(6),
        vm_requested(spec(vm, &ex.job(), false, UID)),
    ))
    .await;
    tb.wait_for("late vm.requested released", |e| {
        (e.run.as_ref()?.run_attempt == 6 && matches!(e.body, Some(Body::ResourceReleased(_))))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late_readies = tb
        .events_of(vm)
        .iter()
        .filter(|e| matches!(e.body, Some(Body::StorageReady(_))))
        .filter(|e| e.run.as_ref().is_some_and(|r| r.run_attempt == 2))
        .count();
    assert_eq!(late_readies, 0, "served after the release");
}

async fn read_only_root_owner_no_exports_and_restart() {
    let ex = Export::new();
    let tb = TestBus::start().await;
    let store = tb.store("gateway.db").await;
    service::init_store(&store).await.unwrap();
    let h = handler(Some("127.0.0.1"));
    let token = tb
        .consume(store.clone(), &wnodes_bus::roles::GATEWAY, HOST, h.clone())
        .await;

    // Read-only export: reads work, writes fail.
    let vm = "vm-0d0d0d0d0d0d";
    tb.publish(&ev(&run("1"), vm_requested(spec(vm, &ex.job(), true, UID))))
        .await;
    tb.publish(&network_ready(run("1"), vm, "127.0.0.1/8"))
        .await;
    let r = tb.wait_payload::<proto::StorageReady>(vm).await;
    {
        let m = Mount::new(r.port, &r.remote_path, ex.mnt("ro"));
        assert_eq!(
            std::fs::read_to_string(m.0.join("input.txt")).unwrap(),
            "from the host\n"
        );
        assert!(
            std::fs::write(m.0.join("new.txt"), "x").is_err(),
            "read-only export written"
        );
    }

    // Root is never served.
    let vm_root = "vm-000000000001";
    tb.publish(&ev(
        &run("2"),
        vm_requested(spec(vm_root, &ex.job(), false, 0)),
    ))
    .await;
    tb.publish(&network_ready(run("2"), vm_root, "127.0.0.1/8"))
        .await;
    let reason = tb
        .wait_payload::<proto::StorageFailed>(vm_root)
        .await
        .reason;
    assert!(
        reason.starts_with(
            "host policy owner.job_uids: owner uid 0 is outside the job uids 1000-65534"
        ),
        "{reason}"
    );

    // A uid unknown to the host cannot be served (sftp-server would exit at once).
    let vm_ghost = "vm-000000000003";
    tb.publish(&ev(
        &run("4"),
        vm_requested(spec(vm_ghost, &ex.job(), false, 64_017)),
    ))
    .await;
    tb.publish(&network_ready(run("4"), vm_ghost, "127.0.0.1/8"))
        .await;
    let reason = tb
        .wait_payload::<proto::StorageFailed>(vm_ghost)
        .await
        .reason;
    assert!(reason.contains("no passwd entry"), "{reason}");

    // No exports: ready, nothing to mount.
    let vm_none = "vm-000000000002";
    let mut s = spec(vm_none, &ex.job(), false, UID);
    s.exports.clear();
    tb.publish(&ev(&run("3"), vm_requested(s))).await;
    tb.publish(&network_ready(run("3"), vm_none, "127.0.0.1/8"))
        .await;
    let none = tb.wait_payload::<proto::StorageReady>(vm_none).await;
    assert_eq!((none.port, none.remote_path.as_str()), (0, ""));

    // Restart: the consumer and the listeners go away; a new instance on the same store
    // re-opens the serving VM's listener on the same port.
    token.cancel();
    h.listeners.stop_all().await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", r.port as u16))
            .await
            .is_err()
    );
    let h2 = handler(Some("127.0.0.1"));
    let open = h2.reconcile(&store).await.unwrap();
    assert_eq!(open, vec![vm.to_owned()]);
    {
        let m = Mount::new(r.port, &r.remote_path, ex.mnt("ro2"));
        assert!(m.0.join("input.txt").exists());
    }
    // A re-opened listener counts what it carries, but cannot know what went before it: its
    // release reports no traffic rather than a part of it.
    let stopped = h2
        .listeners
        .stop(vm)
        .await
        .expect("the re-opened listener ran");
    assert!(stopped.served >= 1, "{stopped:?}");
    assert_eq!(stopped.traffic, None, "{stopped:?}");
    h2.listeners.stop_all().await;
    assert!(
        sftp_servers(ex.dir.path()).is_empty(),
        "sftp-server left running"
    );
}

/// The attacks a job can make over SFTP (what its guest's sshfs sends): the export's parent,
/// an absolute path elsewhere on the host, and symlinks it placed in the export (absolute and
/// relative, resolved server-side). Each stays inside the jail: the sftp-server runs as the
/// job's uid with a root of its own, where nothing but the export exists.
async fn escapes_by_dotdot_absolute_paths_and_symlinks_stay_in_the_export() {
    let ex = Export::new();
    // Symlinks the job plants in its export.
    std::os::unix::fs::symlink("/etc", ex.job().join("etc-abs")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../etc", ex.job().join("etc-rel")).unwrap();
    std::fs::write(ex.dir.path().join("beside.txt"), "outside the export\n").unwrap();
    let tb = TestBus::start().await;
    start(&tb, handler(None)).await;
    let vm = "vm-e5ca9e000001";
    tb.publish(&ev(
        &run("1"),
        vm_requested(spec(vm, &ex.job(), false, UID)),
    ))
    .await;
    tb.publish(&network_ready(run("1"), vm, "127.0.0.1/8"))
        .await;
    let r = tb.wait_payload::<proto::StorageReady>(vm).await;

    // The export itself, symlinks resolved by the server.
    let m = Mount::try_new(r.port, &r.remote_path, ex.mnt("follow"), "follow_symlinks").unwrap();
    assert_eq!(
        std::fs::read_to_string(m.0.join("input.txt")).unwrap(),
        "from the host\n"
    );
    for link in ["etc-abs", "etc-rel"] {
        // The jail's /etc holds only the job's own passwd and group lines.
        let read = std::fs::read_to_string(m.0.join(link).join("hostname"));
        assert!(read.is_err(), "{link}/hostname was read: {read:?}");
        let passwd = std::fs::read_to_string(m.0.join(link).join("passwd")).unwrap_or_default();
        assert!(
            !passwd.contains("root:"),
            "{link}/passwd is the host's: {passwd}"
        );
    }
    // The sftp-server: the job's uid, and a root of its own.
    let needle = ex.job().display().to_string();
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("sftp-server") && c.contains(&needle) && !c.contains("wnodes-sftp-jail")
            })
        })
        .map(|e| e.path())
        .expect("the session's sftp-server");
    let status = std::fs::read_to_string(pid.join("status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid_line.split_whitespace().nth(1),
        Some(UID.to_string().as_str()),
        "{uid_line}"
    );
    let root = std::fs::read_link(pid.join("root")).unwrap();
    assert_ne!(root, Path::new("/"), "sftp-server has a root of its own");
    drop(m);

    // The export's parent: only the way down to the export exists there.
    let up = format!("{}/..", r.remote_path);
    let m = Mount::try_new(r.port, &up, ex.mnt("up"), "follow_symlinks").unwrap();
    let names: Vec<String> = std::fs::read_dir(&m.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["job"], "the export's parent holds nothing else");
    assert!(std::fs::read_to_string(m.0.join("beside.txt")).is_err());
    drop(m);

    // An absolute path elsewhere on the host does not exist for the session.
    match Mount::try_new(r.port, "/etc", ex.mnt("etc"), "follow_symlinks") {
        Err(e) => assert!(e.contains("No such file"), "{e}"),
        Ok(m) => {
            let read = std::fs::read_to_string(m.0.join("hostname"));
            assert!(read.is_err(), "/etc/hostname was read: {read:?}");
            let passwd = std::fs::read_to_string(m.0.join("passwd")).unwrap_or_default();
            assert!(
                !passwd.contains("root:"),
                "the host's /etc/passwd: {passwd}"
            );
        }
    }
}

/// The SFTP greeting to `port` on 127.0.0.1 from a process running as `uid` (socat through
/// setpriv): what came back.
fn sftp_hello_as(uid: u32, port: u32) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
            "--".into(),
            "socat".into(),
            "-t2".into(),
            "-T5".into(),
            "-".into(),
            format!("TCP:127.0.0.1:{port}"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // SSH_FXP_INIT, version 3; stdin stays open until socat's -t2 after the peer closes.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3]).unwrap();
    let out = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        drop(stdin);
    });
    let output = child.wait_with_output().unwrap();
    out.join().unwrap();
    output.stdout
}

/// User-mode networking: the VM's gateway listens on 127.0.0.1, which every local process and
/// every other user-mode guest shares. A connection is served only when its socket belongs
/// to the VM's own uid (its qemu's); root and another uid get nothing.
async fn user_mode_serves_only_the_vm_users_own_sockets() {
    let ex = Export::new();
    let tb = TestBus::start().await;
    start(&tb, handler(None)).await;
    let vm = "vm-10c411000001";
    let vm_uid = 3_000_000_007;
    let mut s = spec(vm, &ex.job(), false, UID);
    s.vm_user = Some(proto::HostUser {
        uid: vm_uid,
        gid: vm_uid,
    });
    tb.publish(&ev(&run("1"), vm_requested(s))).await;
    tb.publish(&ev(
        &run("1"),
        Body::NetworkReady(proto::NetworkReady {
            vm_id: vm.into(),
            mode: proto::NetworkMode::User as i32,
            mac: "52:54:00:00:00:01".into(),
            address: "10.0.2.15/24".into(),
            gateway: "10.0.2.2".into(),
            ..Default::default()
        }),
    ))
    .await;
    let r = tb.wait_payload::<proto::StorageReady>(vm).await;
    assert_eq!(r.allowed_client, "127.0.0.1");
    let addr: SocketAddr = format!("127.0.0.1:{}", r.port).parse().unwrap();
    // Root (this test) and another local user: closed without an answer.
    assert!(
        sftp_hello("127.0.0.1", addr).await.is_empty(),
        "root was served"
    );
    assert!(
        sftp_hello_as(65534, r.port).is_empty(),
        "uid 65534 was served"
    );
    // The VM's own uid (what its qemu runs as): served.
    let hello = sftp_hello_as(vm_uid, r.port);
    assert_eq!(
        hello.get(4),
        Some(&2u8),
        "SSH_FXP_VERSION expected, got {hello:?}"
    );
}

fn main() -> ExitCode {
    host::main(vec![
        host_test!(
            multi_thread export_served_as_the_job_user_only_to_the_vm_and_closed_on_release
            needs [Root, Sshfs, SftpServer, Setpriv, DevFuse]
        ),
        host_test!(
            multi_thread read_only_root_owner_no_exports_and_restart
            needs [Root, Sshfs, SftpServer, Setpriv, DevFuse]
        ),
        host_test!(
            multi_thread user_mode_serves_only_the_vm_users_own_sockets
            needs [Root, SftpServer, Setpriv, Socat]
        ),
        host_test!(
            multi_thread escapes_by_dotdot_absolute_paths_and_symlinks_stay_in_the_export
            needs [Root, Sshfs, SftpServer, Setpriv, DevFuse]
        ),
    ])
}
