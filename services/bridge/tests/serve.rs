//! The `wnodes-bridge serve` binary: listens on `[bridge] grpc_addr`, publishes, and stops
//! cleanly on SIGTERM.

// Helpers outside `#[test]` functions are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{path::Path, time::Duration};

use wnodes_bus::proto;
use wnodes_testkit::{NatsServer, ServiceProcess, process::ProcessBuilder};

/// `wnodes-bridge serve` configured by environment, logging JSON.
fn bridge(nats: &NatsServer, dir: &Path) -> ProcessBuilder {
    ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-bridge"), dir)
        .runtime_env(
            &nats
                .creds(&wnodes_bus::roles::BRIDGE, "central.example.org")
                .unwrap(),
            "INFN-T1",
            "central.example.org",
            dir,
        )
        .wnodes_env("BRIDGE__GRPC_ADDR", "127.0.0.1:0")
        .wnodes_env("LOG_FORMAT", "json")
        .arg("serve")
}

/// A JSON log line, parsed.
fn json_line(line: &str) -> Option<serde_json::Value> {
    serde_json::from_str(line).ok()
}

/// The bound gRPC address, from the "listening" log line.
async fn grpc_addr(bridge: &mut ServiceProcess) -> String {
    bridge
        .wait_stderr("the listening line", Duration::from_secs(30), |line| {
            let v = json_line(line)?;
            (v["fields"]["message"] == "Bridge gRPC service listening.")
                .then(|| v["fields"]["addr"].as_str().map(str::to_owned))?
        })
        .await
        .unwrap()
}

/// A `job.started` call of job `job_id` (PBS) for host `hv2.example.org`.
fn job_started(job_id: &str) -> proto::JobStartedRequest {
    proto::JobStartedRequest {
        job: Some(proto::JobDescription {
            run: Some(proto::JobRunRef {
                site: "INFN-T1".into(),
                lrms: proto::Lrms::Pbs as i32,
                job_id: job_id.into(),
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
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_answers_grpc_and_stops_on_sigterm() {
    let nats = NatsServer::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut service = bridge(&nats, state.path()).spawn().unwrap();
    let addr = grpc_addr(&mut service).await;

    let mut client = proto::bridge_client::BridgeClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let ack = client
        .job_started(job_started("12.pbs01"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.event_id, "job.started:INFN-T1/pbs/12.pbs01/1");
    assert!(ack.sequence > 0);

    let status = service.terminate(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", service.stderr());
}

/// A call that fails inside the bridge (NATS is gone): the caller gets a request id, and the
/// bridge's log has one line under that id with the whole error chain, each link once.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_call_is_logged_once_with_its_whole_chain_under_the_callers_request_id() {
    let mut nats = NatsServer::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut service = bridge(&nats, state.path())
        .wnodes_env("NATS__PUBLISH_TIMEOUT", "1s")
        .spawn()
        .unwrap();
    let addr = grpc_addr(&mut service).await;
    let mut client = proto::bridge_client::BridgeClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    nats.kill().await.unwrap();

    let status = client
        .job_started(job_started("13.pbs01"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let request_id = status
        .message()
        .rsplit_once("request id ")
        .map(|(_, id)| id.to_owned())
        .unwrap_or_else(|| panic!("no request id: {}", status.message()));

    let line = service
        .wait_stderr("the failure", Duration::from_secs(10), |line| {
            json_line(line).filter(|v| v["fields"]["request_id"] == request_id.as_str())
        })
        .await
        .unwrap();
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
