//! The OTLP relay across network namespaces: a connection made inside a private namespace
//! reaches a listener on the host's loopback. A host test (`wnodes_testkit::host`): needs root
//! (a private network namespace, entered by the test's own thread).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::Arc,
};

use wnodes_devstack::{OtlpRelay, enter_private_netns};
use wnodes_testkit::{host, host_test};

fn a_connection_in_the_private_namespace_reaches_a_listener_on_the_hosts_loopback() {
    // A receiver on the host's loopback, made before this thread leaves the host.
    let receiver = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = receiver.local_addr().unwrap();
    let host = enter_private_netns().unwrap();
    // From here 127.0.0.1 is the private namespace's loopback: nobody listens on `target`.
    assert!(
        TcpStream::connect(target).is_err(),
        "{target} reachable from inside the private namespace"
    );
    let relay = OtlpRelay::start(&format!("http://{target}"), Arc::new(host)).unwrap();
    assert!(relay.endpoint().starts_with("http://127.0.0.1:"));
    assert_eq!(relay.target(), format!("http://{target}"));
    let local: SocketAddr = relay
        .endpoint()
        .strip_prefix("http://")
        .unwrap()
        .parse()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = receiver.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(&got.to_ascii_uppercase()).unwrap();
    });
    let mut c = TcpStream::connect(local).unwrap();
    c.write_all(b"spans").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = String::new();
    c.read_to_string(&mut back).unwrap();
    assert_eq!(back, "SPANS");
    server.join().unwrap();
    drop(relay);
    // Stopped: the relay's port no longer accepts.
    assert!(TcpStream::connect(local).is_err());
}

fn main() -> std::process::ExitCode {
    host::main(vec![host_test!(
        sync a_connection_in_the_private_namespace_reaches_a_listener_on_the_hosts_loopback
        needs [Root]
    )])
}
