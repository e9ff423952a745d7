//! The `wnodes-bridge serve` binary: listens on `[bridge] grpc_addr`, publishes, and stops
//! cleanly on SIGTERM.

// Helpers outside `#[test]` functions are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{process::Stdio, time::Duration};

use tokio::io::{AsyncBufReadExt, BufReader};
use wnodes_bus::proto;
use wnodes_testkit::NatsServer;

#[tokio::test(flavor = "multi_thread")]
async fn serve_answers_grpc_and_stops_on_sigterm() {
    let nats = NatsServer::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut service = tokio::process::Command::new(env!("CARGO_BIN_EXE_wnodes-bridge"))
        .env_remove("WNODES_CONFIG")
        .env("WNODES_NATS__URL", nats.url())
        .env("WNODES_HOST", "central.example.org")
        .env("WNODES_SITE", "INFN-T1")
        .env("WNODES_STATE_DIR", state.path())
        .env("WNODES_HTTP_ADDR", "127.0.0.1:0")
        .env("WNODES_BRIDGE__GRPC_ADDR", "127.0.0.1:0")
        .env("WNODES_LOG_FORMAT", "json")
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The bound address is in the "listening" log line.
    let mut lines = BufReader::new(service.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["fields"]["message"] == "Bridge gRPC service listening." {
                return v["fields"]["addr"].as_str().unwrap().to_owned();
            }
        }
        panic!("the service exited before listening");
    })
    .await
    .expect("the service listens in time");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let mut client = proto::bridge_client::BridgeClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let ack = client
        .job_started(proto::JobStartedRequest {
            job: Some(proto::JobDescription {
                run: Some(proto::JobRunRef {
                    site: "INFN-T1".into(),
                    lrms: proto::Lrms::Pbs as i32,
                    job_id: "12.pbs01".into(),
                    run_attempt: 1,
                }),
                host: "hv2.example.org".into(),
                payload: Some(proto::JobPayload {
                    kind: Some(proto::job_payload::Kind::InlineScript(b"true".to_vec())),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            started_at: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.event_id, "job.started:INFN-T1/pbs/12.pbs01/1");
    assert!(ack.sequence > 0);

    let pid = nix::unistd::Pid::from_raw(i32::try_from(service.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), service.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// A call that fails inside the bridge (NATS is gone): the caller gets a request id, and the
/// bridge's log has one line under that id with the whole error chain, each link once.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_call_is_logged_once_with_its_whole_chain_under_the_callers_request_id() {
    let mut nats = NatsServer::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut service = tokio::process::Command::new(env!("CARGO_BIN_EXE_wnodes-bridge"))
        .env_remove("WNODES_CONFIG")
        .env("WNODES_NATS__URL", nats.url())
        .env("WNODES_NATS__PUBLISH_TIMEOUT", "1s")
        .env("WNODES_HOST", "central.example.org")
        .env("WNODES_SITE", "INFN-T1")
        .env("WNODES_STATE_DIR", state.path())
        .env("WNODES_HTTP_ADDR", "127.0.0.1:0")
        .env("WNODES_BRIDGE__GRPC_ADDR", "127.0.0.1:0")
        .env("WNODES_LOG_FORMAT", "json")
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (tx, mut log) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let mut lines = BufReader::new(service.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(v) = log.recv().await {
            if v["fields"]["message"] == "Bridge gRPC service listening." {
                return v["fields"]["addr"].as_str().unwrap().to_owned();
            }
        }
        panic!("the service exited before listening");
    })
    .await
    .expect("the service listens in time");
    let mut client = proto::bridge_client::BridgeClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    nats.kill().await.unwrap();

    let status = client
        .job_started(proto::JobStartedRequest {
            job: Some(proto::JobDescription {
                run: Some(proto::JobRunRef {
                    site: "INFN-T1".into(),
                    lrms: proto::Lrms::Pbs as i32,
                    job_id: "13.pbs01".into(),
                    run_attempt: 1,
                }),
                host: "hv2.example.org".into(),
                payload: Some(proto::JobPayload {
                    kind: Some(proto::job_payload::Kind::InlineScript(b"true".to_vec())),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            started_at: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let request_id = status
        .message()
        .rsplit_once("request id ")
        .map(|(_, id)| id.to_owned())
        .unwrap_or_else(|| panic!("no request id: {}", status.message()));

    let line = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(v) = log.recv().await {
            if v["fields"]["request_id"] == request_id.as_str() {
                return v;
            }
        }
        panic!("the service exited before logging the failure");
    })
    .await
    .expect("the failure is logged");
    println!("{line}");
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(
        line["fields"]["what"],
        "publishing job.started:INFN-T1/pbs/13.pbs01/1"
    );
    let chain = line["fields"]["error"].as_str().unwrap();
    let top = "publishing to `wnodes.evt.hv2_example_org.job.started` was not acknowledged after ";
    assert!(chain.starts_with(top), "{chain}");
    assert_eq!(chain.matches("not acknowledged").count(), 1, "{chain}");
    // The chain goes on past the bus's own message: the cause is there too, once.
    let (_, causes) = chain
        .split_once(" ms: ")
        .unwrap_or_else(|| panic!("no cause: {chain}"));
    assert!(!causes.is_empty(), "{chain}");
    let links: Vec<&str> = causes.split(": ").collect();
    for pair in links.windows(2) {
        assert_ne!(pair[0], pair[1], "a link repeats: {chain}");
    }
    // The caller's message is not in the log line's error, and the chain not in the message.
    assert!(!status.message().contains(chain), "{}", status.message());
}
