//! `wnodes-trace-sink`: the compose stack's trace backend when no Jaeger image can be pulled.
//!
//! An OTLP/gRPC receiver (the test kit's [`wnodes_testkit::OtlpCollector`], the one the
//! integration tests use) that keeps every span in memory, and a small HTTP API shaped like
//! Jaeger's query API, so `scripts/compose-demo.sh` asks the same question of either:
//!
//! - `GET /api/traces/<trace id>`: `{"data":[{"traceID", "spans":[{"traceID", "spanID",
//!   "operationName", "references", "processID"}], "processes":{"p1":{"serviceName"}}}]}`, or
//!   404 with `{"data":[]}` when no span of that trace arrived;
//! - `GET /api/services`: `{"data":[service names]}`;
//! - `GET /metrics`: `wnodes_trace_sink_spans` (spans held) for Prometheus.
//!
//! Not Jaeger: no UI, no storage, no search; every span is kept in memory until the process
//! stops (a demo's backend, not a site's).

use std::{collections::BTreeMap, process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wnodes_testkit::otlp::{CollectedSpan, OtlpCollector};

#[derive(Debug, Parser)]
#[command(
    name = "wnodes-trace-sink",
    version,
    about = "OTLP/gRPC receiver with a Jaeger-shaped query API (the compose stack's trace backend stand-in)"
)]
struct Cli {
    /// OTLP/gRPC listen address.
    #[arg(long, default_value = "0.0.0.0:4317")]
    otlp: String,
    /// HTTP query API listen address.
    #[arg(long, default_value = "0.0.0.0:16686")]
    http: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wnodes-trace-sink: async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wnodes-trace-sink: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let collector = Arc::new(OtlpCollector::start_on(&cli.otlp).await?);
    let listener = tokio::net::TcpListener::bind(&cli.http)
        .await
        .with_context(|| format!("binding the query API on {}", cli.http))?;
    println!(
        "wnodes-trace-sink: OTLP/gRPC on {}, query API on http://{}",
        collector.local_addr(),
        listener.local_addr()?
    );
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
            accepted = listener.accept() => {
                let Ok((sock, _)) = accepted else { continue };
                let collector = collector.clone();
                tokio::spawn(async move {
                    let _ = answer(sock, &collector).await;
                });
            }
        }
    }
}

async fn answer(mut sock: tokio::net::TcpStream, collector: &OtlpCollector) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    while n < buf.len() {
        match sock.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or("/"));
    let path = path.split('?').next().unwrap_or("/");
    let (status, ctype, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        )
    } else if path == "/api/services" {
        let spans = collector.spans();
        let names: std::collections::BTreeSet<&str> =
            spans.iter().map(|s| s.service_name.as_str()).collect();
        (
            "200 OK",
            "application/json",
            serde_json::json!({ "data": names }).to_string(),
        )
    } else if let Some(id) = path.strip_prefix("/api/traces/") {
        let id = id.to_ascii_lowercase();
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            (
                "400 Bad Request",
                "application/json",
                serde_json::json!({"data": [], "errors": [{"msg": "a trace id is 32 hex digits"}]})
                    .to_string(),
            )
        } else {
            let all = collector.spans();
            let spans: Vec<&CollectedSpan> = all.iter().filter(|s| s.trace_id == id).collect();
            if spans.is_empty() {
                (
                    "404 Not Found",
                    "application/json",
                    serde_json::json!({"data": [], "errors": [{"msg": "trace not found"}]})
                        .to_string(),
                )
            } else {
                ("200 OK", "application/json", jaeger_trace(&id, &spans))
            }
        }
    } else if path == "/metrics" {
        let held = collector.spans().len();
        (
            "200 OK",
            "text/plain; version=0.0.4",
            format!(
                "# HELP wnodes_trace_sink_spans Spans held by the trace sink.\n# TYPE wnodes_trace_sink_spans gauge\nwnodes_trace_sink_spans {held}\n"
            ),
        )
    } else {
        ("404 Not Found", "text/plain", "not found\n".to_owned())
    };
    let h = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(h.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

/// One trace in the shape of Jaeger's `/api/traces/<id>` answer (the fields the demo reads).
fn jaeger_trace(id: &str, spans: &[&CollectedSpan]) -> String {
    let mut processes: BTreeMap<&str, String> = BTreeMap::new();
    for s in spans {
        let next = format!("p{}", processes.len() + 1);
        processes.entry(s.service_name.as_str()).or_insert(next);
    }
    let spans_json: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let refs: Vec<serde_json::Value> = if s.parent_span_id.is_empty() {
                Vec::new()
            } else {
                vec![serde_json::json!({
                    "refType": "CHILD_OF", "traceID": s.trace_id, "spanID": s.parent_span_id
                })]
            };
            serde_json::json!({
                "traceID": s.trace_id,
                "spanID": s.span_id,
                "operationName": s.name,
                "references": refs,
                "processID": processes[s.service_name.as_str()],
            })
        })
        .collect();
    let procs: serde_json::Map<String, serde_json::Value> = processes
        .iter()
        .map(|(name, p)| (p.clone(), serde_json::json!({ "serviceName": name })))
        .collect();
    serde_json::json!({
        "data": [{ "traceID": id, "spans": spans_json, "processes": procs }]
    })
    .to_string()
}
