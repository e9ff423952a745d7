//! `wnodes-trace-sink` as a process: spans exported to it over OTLP/gRPC by two services come
//! back from its Jaeger-shaped query API, one trace with both services' processes; an unknown
//! trace is 404 and a malformed id 400.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

/// Kills the sink when the test ends, however it ends.
struct Sink(Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nobody listens on now (bound and released; the sink binds it next).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `GET path` on the query API: (status code, body).
fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

fn service(name: &str, spans: Vec<Span>) -> ResourceSpans {
    ResourceSpans {
        resource: Some(Resource {
            attributes: vec![KeyValue {
                key: "service.name".into(),
                value: Some(AnyValue {
                    value: Some(Value::StringValue(name.into())),
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        scope_spans: vec![ScopeSpans {
            spans,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn spans_of_two_services_come_back_as_one_trace() {
    let (otlp, http) = (free_port(), free_port());
    let _sink = Sink(
        Command::new(env!("CARGO_BIN_EXE_wnodes-trace-sink"))
            .args(["--otlp", &format!("127.0.0.1:{otlp}")])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(http, "/api/services").is_err() {
        assert!(Instant::now() < deadline, "the sink never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let trace = vec![0xab; 16];
    let root = Span {
        trace_id: trace.clone(),
        span_id: vec![0x01; 8],
        name: "bridge.job_started".into(),
        ..Default::default()
    };
    let child = Span {
        trace_id: trace.clone(),
        span_id: vec![0x02; 8],
        parent_span_id: vec![0x01; 8],
        name: "launcher.start".into(),
        ..Default::default()
    };
    let other = Span {
        trace_id: vec![0xcd; 16],
        span_id: vec![0x03; 8],
        name: "elsewhere".into(),
        ..Default::default()
    };
    let mut client = TraceServiceClient::connect(format!("http://127.0.0.1:{otlp}"))
        .await
        .unwrap();
    client
        .export(ExportTraceServiceRequest {
            resource_spans: vec![
                service("wnodes-bridge", vec![root]),
                service("wnodes-launcher", vec![child, other]),
            ],
        })
        .await
        .unwrap();

    let id = "ab".repeat(16);
    let (status, body) = get(http, &format!("/api/traces/{id}")).unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let t = &v["data"][0];
    assert_eq!(t["traceID"], id.as_str());
    let spans = t["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 2, "{body}");
    let service_of = |span: &serde_json::Value| {
        let p = span["processID"].as_str().unwrap();
        t["processes"][p]["serviceName"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let root = spans
        .iter()
        .find(|s| s["operationName"] == "bridge.job_started")
        .unwrap();
    let child = spans
        .iter()
        .find(|s| s["operationName"] == "launcher.start")
        .unwrap();
    assert_eq!(service_of(root), "wnodes-bridge");
    assert_eq!(service_of(child), "wnodes-launcher");
    assert_eq!(root["references"].as_array().unwrap().len(), 0);
    assert_eq!(child["references"][0]["refType"], "CHILD_OF");
    assert_eq!(child["references"][0]["spanID"], "01".repeat(8).as_str());

    let (status, body) = get(http, "/api/services").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["data"],
        serde_json::json!(["wnodes-bridge", "wnodes-launcher"])
    );

    let (status, _) = get(http, &format!("/api/traces/{}", "ef".repeat(16))).unwrap();
    assert_eq!(status, 404);
    let (status, _) = get(http, "/api/traces/not-a-trace-id").unwrap();
    assert_eq!(status, 400);
    let (status, body) = get(http, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("wnodes_trace_sink_spans 3"), "{body}");
}
