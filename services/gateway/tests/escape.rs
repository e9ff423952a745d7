//! Escape attempts from inside a real guest (issue 13): the test guest (`guest/README.md`)
//! boots under TCG against the real gateway, whose `sftp-server`s run jailed (`[gateway] jail`,
//! the default), and its payload tries to leave its export or to reach another VM's gateway.
//! What the guest saw is read from its output channel (ttyS1) and checked against what lies
//! outside the export on the host: a marker file in the export's parent, the host's
//! `/etc/passwd` and `/etc/shadow`.
//!
//! * Tap mode: the network service makes the VM's tap and filter, as in `guest.rs`; the
//!   payload, as the job's uid, walks `..` from `/shared`, plants absolute and relative
//!   symlinks to `/etc` and `..` and follows them and those the host planted; then, as the
//!   guest's root, runs its own `sshfs` against the gateway with other remote paths (`/`,
//!   `/..`, the export's `..`, `/etc`) and server-side symlink resolution.
//! * User mode (`-netdev user`): two VMs whose qemus run as uids of their own; B's payload tries
//!   A's gateway port through 10.0.2.2 (sshfs and a raw SFTP greeting), and local non-root
//!   processes try it on the host's loopback. Only A's qemu is served.
//!
//! Each test runs in a private network namespace (nextest runs each test in its own process).
//! Host tests (`wnodes_testkit::host`): root, qemu, the test guest, `/dev/fuse`, `sftp-server`,
//! `setpriv`, and `nft` (tap) or `socat` (user mode).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Duration,
};

use wnodes_bus::{proto, proto::event::Body};
use wnodes_gateway::{GatewayConfig, GatewayHandler};
use wnodes_network::{
    NetworkHandler,
    config::{Ipv4Net, Mode},
    host::Host,
};
use wnodes_testkit::vm::GuestNet as Net;
use wnodes_testkit::{host, host_test, service::*};

/// The job's uid/gid: `nobody`/`nogroup` (`sftp-server` needs a passwd entry).
const UID: u32 = 65534;

fn cmd(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A string no file on this host holds by chance.
fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}-{}-{nanos}", std::process::id())
}

/// A private network namespace for this process, with `lo` up; threads and children made from
/// here on (the runtime's workers, nats-server, qemu, sftp-server) live in it.
fn private_netns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    cmd(&["ip", "link", "set", "lo", "up"]);
}

fn block_on(f: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f);
}

/// The real gateway (jailed `sftp-server`, the default) on the test's bus.
async fn start_gateway(tb: &TestBus, ports: &str) {
    let cfg = GatewayConfig {
        port_range: ports.into(),
        export_roots: vec![std::env::temp_dir()],
        ..Default::default()
    };
    assert!(cfg.jail, "the gateway under test is the jailed one");
    let gateway = GatewayHandler::new(&cfg, "gateway@hv1.test".into()).unwrap();
    let store = tb.store("gateway.db").await;
    wnodes_gateway::service::init_store(&store).await.unwrap();
    gateway.reconcile(&store).await.unwrap();
    tb.consume(store, &wnodes_bus::roles::GATEWAY, HOST, gateway)
        .await;
}

/// A world-traversable work directory with `marker.txt` (outside the export), and `export/`
/// (the job's) holding `input.txt`.
struct Work {
    dir: tempfile::TempDir,
    marker: String,
    input: String,
}

impl Work {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let marker = unique("OUTSIDE-THE-EXPORT");
        let input = unique("IN-THE-EXPORT");
        // Readable by anyone, the job's uid included: only the jail keeps it out of reach.
        std::fs::write(dir.path().join("marker.txt"), format!("{marker}\n")).unwrap();
        std::fs::set_permissions(
            dir.path().join("marker.txt"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let export = dir.path().join("export");
        std::fs::create_dir(&export).unwrap();
        std::fs::write(export.join("input.txt"), format!("{input}\n")).unwrap();
        std::os::unix::fs::chown(&export, Some(UID), Some(UID)).unwrap();
        Self { dir, marker, input }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn export(&self) -> PathBuf {
        self.dir.path().join("export")
    }
}

fn spec(vm_id: &str, export: &Path, vm_uid: Option<u32>) -> proto::VmSpec {
    proto::VmSpec {
        vm_id: vm_id.into(),
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
        vm_user: vm_uid.map(|uid| proto::HostUser { uid, gid: uid }),
        ..Default::default()
    }
}

/// What the guest must never print: the marker outside the export, and every line of the
/// host's `/etc/passwd` and `/etc/shadow`, except the job's own passwd line (the jail's
/// `/etc/passwd` holds it, by design) and lines the guest's own `/etc/passwd` has too.
fn forbidden(marker: &str) -> Vec<String> {
    let job_line = String::from_utf8(
        Command::new("getent")
            .args(["passwd", &UID.to_string()])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let guest_own = [
        job_line.trim_end(),
        "root:x:0:0:root:/root:/bin/sh",
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/sh",
    ];
    let mut out = vec![marker.to_string()];
    for file in ["/etc/passwd", "/etc/shadow"] {
        out.extend(
            std::fs::read_to_string(file)
                .unwrap()
                .lines()
                .filter(|l| !l.is_empty() && !guest_own.contains(l))
                .map(str::to_string),
        );
    }
    out
}

/// The first of `forbidden` that `output` holds.
fn leaked<'a>(output: &str, forbidden: &'a [String]) -> Option<&'a str> {
    forbidden
        .iter()
        .find(|f| output.contains(f.as_str()))
        .map(String::as_str)
}

/// Boots the test guest (`wnodes_testkit::vm::boot_guest`) and checks it powered off cleanly;
/// returns qemu's exit status, the payload's output and a report of the three logs.
async fn boot(
    dir: &Path,
    job: &str,
    params: &str,
    net: &Net<'_>,
    as_uid: Option<u32>,
) -> (std::process::ExitStatus, String, String) {
    let b = wnodes_testkit::vm::boot_guest(dir, job, params, *net, as_uid).await;
    assert!(b.status.success(), "qemu: {}\n{}", b.status, b.report);
    (b.status, b.output, b.report)
}

/// Tap mode: `..`, symlinks (the job's and the host's, absolute and relative) and the guest's
/// own sshfs with other remote paths never show anything outside the export.
fn vm_escape_from_a_tap_guest_stays_in_its_export() {
    private_netns();
    cmd(&["ip", "link", "add", "wnbr0", "type", "bridge"]);
    cmd(&["ip", "addr", "add", "10.231.2.1/24", "dev", "wnbr0"]);
    cmd(&["ip", "link", "set", "wnbr0", "up"]);
    block_on(tap_escape());
}

async fn tap_escape() {
    let tb = TestBus::start().await;
    let network = NetworkHandler {
        host: Host::new(None).unwrap(),
        mode: Mode::Tap,
        bridge: "wnbr0".into(),
        pool: Some("10.231.2.0/24".parse::<Ipv4Net>().unwrap()),
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
    start_gateway(&tb, "34000-34999").await;

    let work = Work::new();
    let export = work.export();
    // Links the host side plants in the export: to the host's /etc, absolute and relative, and
    // to the directory holding the marker.
    std::os::unix::fs::symlink("/etc", export.join("host-etc")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../etc", export.join("host-etc-rel")).unwrap();
    std::os::unix::fs::symlink(work.path(), export.join("host-up")).unwrap();
    let forbidden = forbidden(&work.marker);

    let vm = "vm-e5ca9e000011";
    tb.publish(&ev(&run("1"), vm_requested(spec(vm, &export, None))))
        .await;
    let net = tb.wait_payload::<proto::NetworkReady>(vm).await;
    let st = tb.wait_payload::<proto::StorageReady>(vm).await;
    let tap = Net::Tap {
        tap: &net.tap,
        mac: &net.mac,
    };
    let mount = format!(
        "wnodes.ip={} wnodes.gw={} wnodes.sshfs={}:{}:{}",
        net.address, net.gateway, st.address, st.port, st.remote_path
    );

    // 1. The payload as the job's uid, on the /shared the guest mounted.
    let job = r#"
echo "== uid $(id -u)"
echo "== ls /shared"; ls -la /shared
echo "== input"; cat /shared/input.txt
echo "== cd /shared/.."; cd /shared/.. && pwd && ls -la; cd /shared
echo "== ls /shared/../.."; ls -la /shared/../..
echo "== read via .."; cat /shared/../etc/passwd /shared/../etc/shadow /shared/../marker.txt /shared/../../marker.txt
echo "== job links"
ln -s /etc /shared/evil && echo "made evil"
ln -s ../../../../../../../../etc /shared/evil-rel && echo "made evil-rel"
ln -s .. /shared/up && echo "made up"
ls -la /shared/evil/ /shared/evil-rel/ /shared/up/
cat /shared/evil/shadow /shared/evil/passwd /shared/evil-rel/passwd /shared/up/marker.txt
echo "== host links"
ls -la /shared/host-etc/ /shared/host-etc-rel/ /shared/host-up/
cat /shared/host-etc/passwd /shared/host-etc/shadow /shared/host-etc-rel/passwd /shared/host-up/marker.txt
echo "== done"
"#;
    let params = format!("{mount} wnodes.uid={UID} wnodes.gid={UID}");
    let a_dir = work.path().join("boot-job");
    let (_, out, report) = boot(&a_dir, job, &params, &tap, None).await;
    assert!(out.contains(&format!("== uid {UID}")), "{report}");
    assert!(out.contains("== done"), "{report}");
    assert!(
        out.contains(&work.input),
        "the guest did not see its export: {report}"
    );
    // The job's links were made, in the export (as links: nothing followed them on the host).
    for link in ["evil", "evil-rel", "up"] {
        assert!(out.contains(&format!("made {link}")), "{report}");
        assert!(
            std::fs::symlink_metadata(export.join(link))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
    if let Some(l) = leaked(&out, &forbidden) {
        panic!("the job's guest printed {l:?} from outside its export:\n{report}");
    }

    // 2. The guest's root runs its own sshfs against the gateway: other remote paths, and the
    //    export with every link resolved by the server (`follow_symlinks`).
    let r = &st.remote_path;
    let job = format!(
        r#"
try() {{
  d=/tmp/m$1; mkdir -p $d
  echo "== sshfs :$2"
  if sshfs -o directport={port},follow_symlinks {gw}:$2 $d; then
    echo "MOUNTED :$2"
    ls -la $d
    find $d -maxdepth 5 | head -n 100
    cat $d/etc/passwd $d/etc/shadow $d/marker.txt $d/../marker.txt $d{work}/marker.txt
    for l in evil evil-rel up host-etc host-etc-rel host-up; do
      ls -la $d/$l/; cat $d/$l/passwd $d/$l/shadow $d/$l/marker.txt
    done
    cat $d/input.txt
    umount $d
  else
    echo "MOUNT-FAILED :$2"
  fi
}}
try 1 {r}
try 2 /
try 3 /..
try 4 {r}/..
try 5 {r}/../..
try 6 /etc
try 7 {r}/host-up
try 8 {r}/evil
echo "== done"
"#,
        port = st.port,
        gw = st.address,
        work = work.path().display(),
    );
    let b_dir = work.path().join("boot-root");
    let (_, out, report) = boot(&b_dir, &job, &mount, &tap, None).await;
    assert!(out.contains("== done"), "{report}");
    assert!(
        out.contains(&format!("MOUNTED :{r}")) && out.contains(&work.input),
        "the guest's own sshfs did not see its export: {report}"
    );
    if let Some(l) = leaked(&out, &forbidden) {
        panic!("the guest's sshfs printed {l:?} from outside its export:\n{report}");
    }

    tb.publish(&ev(&run("1"), vm_stopped(vm))).await;
    tb.wait_released(vm, proto::ResourceKind::Storage).await;
}

/// The SFTP greeting to `port` on 127.0.0.1 from a process running as `uid` (socat through
/// setpriv): what came back (empty: closed without an answer).
fn sftp_hello_as(uid: u32, port: u32) -> Vec<u8> {
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
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // SSH_FXP_INIT, version 3; stdin stays open until after the peer had time to answer.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3]).unwrap();
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        drop(stdin);
    });
    let output = child.wait_with_output().unwrap();
    closer.join().unwrap();
    output.stdout
}

/// User mode: A's gateway on the host's loopback serves A's qemu only; a second user-mode
/// guest (its qemu another uid) and local non-root processes get nothing.
fn vm_user_mode_gateway_refuses_other_guests_and_local_users() {
    private_netns();
    block_on(user_mode_escape());
}

async fn user_mode_escape() {
    let tb = TestBus::start().await;
    start_gateway(&tb, "35000-35999").await;
    let (ua, ub) = (3_000_000_021, 3_000_000_022);
    let work_a = Work::new();
    let work_b = Work::new();
    // Neither A's export nor what lies beside it may reach B.
    let mut forbidden = forbidden(&work_a.marker);
    forbidden.push(work_a.input.clone());

    let mut ready = Vec::new();
    for (vm, work, uid) in [
        ("vm-05e7a0000001", &work_a, ua),
        ("vm-05e7b0000002", &work_b, ub),
    ] {
        tb.publish(&ev(
            &run(vm),
            vm_requested(spec(vm, &work.export(), Some(uid))),
        ))
        .await;
        tb.publish(&ev(
            &run(vm),
            Body::NetworkReady(proto::NetworkReady {
                vm_id: vm.into(),
                mode: proto::NetworkMode::User as i32,
                mac: "52:54:00:12:34:56".into(),
                address: "10.0.2.15/24".into(),
                gateway: "10.0.2.2".into(),
                ..Default::default()
            }),
        ))
        .await;
        let st = tb.wait_payload::<proto::StorageReady>(vm).await;
        assert_eq!(st.allowed_client, "127.0.0.1");
        ready.push(st);
    }
    let (a, b) = (&ready[0], &ready[1]);
    let mount = |st: &proto::StorageReady| {
        format!(
            "wnodes.ip=10.0.2.15/24 wnodes.gw=10.0.2.2 wnodes.sshfs=10.0.2.2:{}:{}",
            st.port, st.remote_path
        )
    };

    // Control: A's own qemu (uid UA) mounts A's export through slirp.
    let a_dir = work_a.path().join("boot-a");
    let params = format!("{} wnodes.uid={UID} wnodes.gid={UID}", mount(a));
    let job = "cat /shared/input.txt\necho '== done'\n";
    let (_, out, report) = boot(&a_dir, job, &params, &Net::User, Some(ua)).await;
    assert!(
        out.contains(&work_a.input),
        "A's own guest was not served: {report}"
    );

    // B (its qemu uid UB) mounts its own export, then its root tries A's port.
    let job = format!(
        r#"
echo "== own"; cat /shared/input.txt
probe() {{
  (printf '\000\000\000\005\001\000\000\000\003'; sleep 3) | timeout 10 nc 10.0.2.2 $1 > /tmp/p$1 2>/dev/null
  echo "NC-$2-BYTES=$(wc -c < /tmp/p$1 | tr -d ' ')"
}}
probe {pb} OWN
probe {pa} A
n=0
for r in {ra} / {ra}/..; do
  n=$((n+1)); d=/tmp/a$n; mkdir -p $d
  if sshfs -o directport={pa} 10.0.2.2:$r $d; then
    echo "MOUNTED-A :$r"; ls -la $d; cat $d/input.txt; umount $d
  else
    echo "REFUSED-A :$r"
  fi
done
echo "== done"
"#,
        pa = a.port,
        pb = b.port,
        ra = a.remote_path,
    );
    let b_dir = work_b.path().join("boot-b");
    let (_, out, report) = boot(&b_dir, &job, &mount(b), &Net::User, Some(ub)).await;
    assert!(out.contains("== done"), "{report}");
    assert!(
        out.contains(&work_b.input),
        "B's own guest was not served: {report}"
    );
    // The probe works (B's own port answers SSH_FXP_VERSION), and A's port says nothing.
    assert!(
        out.contains("NC-OWN-BYTES=") && !out.contains("NC-OWN-BYTES=0\n"),
        "the probe got no answer from B's own gateway: {report}"
    );
    assert!(
        out.contains("NC-A-BYTES=0\n"),
        "A's gateway answered B: {report}"
    );
    assert!(!out.contains("MOUNTED-A"), "B mounted A's export: {report}");
    assert_eq!(out.matches("REFUSED-A").count(), 3, "{report}");
    if let Some(l) = leaked(&out, &forbidden) {
        panic!("B printed {l:?}:\n{report}");
    }

    // Local processes on the host: nobody and B's uid get nothing; A's uid (control) is served.
    // (A non-root sshfs on the host is no probe here: it cannot open /dev/fuse at all.)
    for uid in [65534, ub] {
        assert!(
            sftp_hello_as(uid, a.port).is_empty(),
            "uid {uid} was served A's export"
        );
    }
    let hello = sftp_hello_as(ua, a.port);
    assert_eq!(
        hello.get(4),
        Some(&2u8),
        "SSH_FXP_VERSION expected for A's uid, got {hello:?}"
    );
}

fn main() -> ExitCode {
    host::main(vec![
        host_test!(
            sync vm_escape_from_a_tap_guest_stays_in_its_export
            needs [Root, Qemu, TestGuest, DevFuse, SftpServer, Setpriv, Nft]
        ),
        host_test!(
            sync vm_user_mode_gateway_refuses_other_guests_and_local_users
            needs [Root, Qemu, TestGuest, DevFuse, SftpServer, Setpriv, Socat]
        ),
    ])
}
