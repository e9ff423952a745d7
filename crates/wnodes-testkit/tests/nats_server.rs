//! `NatsServer` against the real nats-server binary (run `scripts/install-deps.sh nats` first).

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use wnodes_testkit::{NatsServer, wait_until};

fn pid_exists(pid: u32) -> bool {
    // Signal 0: an existing process, zombie included, answers Ok.
    i32::try_from(pid).is_ok_and(|pid| kill(Pid::from_raw(pid), None).is_ok())
}

#[tokio::test]
async fn start_publish_subscribe() {
    let server = NatsServer::start_open().await.unwrap();
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    assert!(server.store_dir().is_dir());

    let client = async_nats::connect(server.url()).await.unwrap();
    let mut sub = client.subscribe("testkit.hello").await.unwrap();
    client.flush().await.unwrap();
    client.publish("testkit.hello", "hi".into()).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&msg.payload[..], b"hi");

    // JetStream is on.
    let js = jetstream::new(client);
    let info = js.query_account().await.unwrap();
    assert_eq!(info.streams, 0);
}

#[tokio::test]
async fn concurrent_servers_get_distinct_ports() {
    let (a, b, c) = tokio::join!(
        NatsServer::start_open(),
        NatsServer::start_open(),
        NatsServer::start_open()
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let mut ports = vec![a.port(), b.port(), c.port()];
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3, "{ports:?}");
    assert_ne!(a.store_dir(), b.store_dir());
}

#[tokio::test]
async fn restart_keeps_port_and_jetstream_store() {
    let mut server = NatsServer::start_open().await.unwrap();
    let port = server.port();
    let first_pid = server.pid().unwrap();

    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: "RESTART".into(),
        subjects: vec!["restart.>".into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("restart.one", "1".into())
        .await
        .unwrap()
        .await
        .unwrap();

    server.kill().await.unwrap();
    assert_eq!(server.pid(), None);
    assert!(!pid_exists(first_pid), "killed server must be reaped");
    assert!(server.store_dir().is_dir(), "store survives kill");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "nothing listens after kill"
    );
    server.kill().await.unwrap(); // idempotent

    server.restart().await.unwrap();
    assert_eq!(server.port(), port);
    assert_ne!(server.pid().unwrap(), first_pid);

    let fresh = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let mut stream = fresh.get_stream("RESTART").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);

    // The client that was connected before the crash reconnects by itself.
    wait_until(Duration::from_secs(10), "old client reconnect", || {
        let js = js.clone();
        async move {
            match js.publish("restart.two", "2".into()).await {
                Ok(ack) => ack.await.ok(),
                Err(_) => None,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 2);

    // restart() on a running server kills it first.
    let pid = server.pid().unwrap();
    server.restart().await.unwrap();
    assert_eq!(server.port(), port);
    assert!(!pid_exists(pid));
}

#[tokio::test]
async fn restart_waits_for_a_briefly_busy_port() {
    let mut server = NatsServer::start_open().await.unwrap();
    let port = server.port();
    server.kill().await.unwrap();

    // Someone else holds the port for a moment.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(600));
        drop(squatter);
    });
    let started = std::time::Instant::now();
    server.restart().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    release.join().unwrap();
    assert_eq!(server.port(), port);
    let client = async_nats::connect(server.url()).await.unwrap();
    client.flush().await.unwrap();
}

#[tokio::test]
async fn drop_kills_and_reaps_the_server_and_removes_the_store() {
    let server = NatsServer::start_open().await.unwrap();
    let pid = server.pid().unwrap();
    let store = server.store_dir().to_path_buf();
    assert!(pid_exists(pid));
    drop(server);
    assert!(
        !pid_exists(pid),
        "nats-server {pid} still exists (or is a zombie)"
    );
    assert!(!store.exists(), "temp dir removed");
}

#[tokio::test]
async fn bad_config_fails_fast_with_the_log_tail() {
    let started = std::time::Instant::now();
    let err = NatsServer::start_with_config("authorization { this is not valid")
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(msg.contains("did not become ready"), "{msg}");
    assert!(msg.contains("exited"), "{msg}");
    assert!(msg.contains("--- stderr tail ---"), "{msg}");
    assert!(
        msg.contains("Parse error"),
        "server's own message included: {msg}"
    );
}
