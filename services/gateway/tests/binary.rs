//! The `wnodes-gateway` binary as deployed: config file with a `[gateway]` section, a VM
//! served, SIGTERM → exit 0 with the listener closed, and a restart that re-opens it.
//! A host test (`wnodes_testkit::host`): needs root, `sftp-server` and `setpriv`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{os::unix::fs::PermissionsExt, path::Path, process::ExitCode, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wnodes_bus::proto::{self, event::Body};
use wnodes_testkit::{
    ServiceConfig, ServiceProcess, host, host_test, process::ProcessBuilder, service::*,
};

fn gateway(nats: &wnodes_bus::NatsConfig, dir: &Path) -> ProcessBuilder {
    let conf = ServiceConfig::new(HOST, nats, &dir.join("state")).set(
        "gateway",
        "port_range",
        "32000-32999",
    );
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

fn main() -> ExitCode {
    host::main(vec![host_test!(
        multi_thread binary_serves_stops_and_reopens_after_restart
        needs [Root, SftpServer, Setpriv]
    )])
}
