//! `OtlpCollector` receiving spans from the real OpenTelemetry OTLP/gRPC exporter and from a raw
//! generated client.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::{TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, KeyValue as PKeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource as PResource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use wnodes_testkit::OtlpCollector;

// Multi-thread runtime: the OTLP exporter's flush blocks (dependencies.md G4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receives_spans_from_the_otlp_exporter() {
    let collector = OtlpCollector::start().await.unwrap();
    assert!(collector.endpoint().starts_with("http://127.0.0.1:"));

    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(collector.endpoint())
        .build()
        .unwrap();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("testkit-svc").build())
        .build();
    let tracer = provider.tracer("testkit");
    tracer.in_span("parent", |cx| {
        let _child = tracer
            .span_builder("child")
            .with_attributes([KeyValue::new("k", "v"), KeyValue::new("n", 7)])
            .start_with_context(&tracer, &cx);
        assert!(cx.span().span_context().is_valid());
    });
    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.force_flush())
        .await
        .unwrap()
        .unwrap();

    let spans = collector
        .wait_for(Duration::from_secs(10), "parent and child", |s| {
            s.iter().any(|s| s.name == "parent") && s.iter().any(|s| s.name == "child")
        })
        .await
        .unwrap();
    let parent = spans.iter().find(|s| s.name == "parent").unwrap();
    let child = spans.iter().find(|s| s.name == "child").unwrap();
    assert_eq!(parent.trace_id.len(), 32);
    assert_eq!(parent.span_id.len(), 16);
    assert!(
        parent
            .trace_id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    assert_eq!(parent.parent_span_id, "");
    assert_eq!(child.trace_id, parent.trace_id);
    assert_eq!(child.parent_span_id, parent.span_id);
    assert_eq!(child.service_name, "testkit-svc");
    assert_eq!(child.attributes.get("k").map(String::as_str), Some("v"));
    assert_eq!(child.attributes.get("n").map(String::as_str), Some("7"));

    tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .unwrap()
        .unwrap();
}

fn kv(key: &str, value: Value) -> PKeyValue {
    PKeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

#[tokio::test]
async fn flattens_raw_export_requests() {
    let collector = OtlpCollector::start_on("127.0.0.1:0").await.unwrap();
    let mut client = TraceServiceClient::connect(collector.endpoint())
        .await
        .unwrap();
    let span = Span {
        trace_id: vec![0xAB; 16],
        span_id: vec![0x01; 8],
        parent_span_id: vec![0x02; 8],
        name: "raw".into(),
        attributes: vec![
            kv("s", Value::StringValue("x".into())),
            kv("b", Value::BoolValue(true)),
            kv("d", Value::DoubleValue(1.5)),
            kv("bytes", Value::BytesValue(vec![0xde, 0xad])),
            kv(
                "arr",
                Value::ArrayValue(ArrayValue {
                    values: vec![
                        AnyValue {
                            value: Some(Value::IntValue(1)),
                        },
                        AnyValue {
                            value: Some(Value::IntValue(2)),
                        },
                    ],
                }),
            ),
        ],
        ..Default::default()
    };
    client
        .export(ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(PResource {
                    attributes: vec![kv("service.name", Value::StringValue("rawsvc".into()))],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        })
        .await
        .unwrap();

    let spans = collector.spans();
    assert_eq!(spans.len(), 1);
    let s = &spans[0];
    assert_eq!(s.trace_id, "ab".repeat(16));
    assert_eq!(s.span_id, "0101010101010101");
    assert_eq!(s.parent_span_id, "0202020202020202");
    assert_eq!(s.service_name, "rawsvc");
    let attr = |k: &str| s.attributes.get(k).cloned().unwrap_or_default();
    assert_eq!(attr("s"), "x");
    assert_eq!(attr("b"), "true");
    assert_eq!(attr("d"), "1.5");
    assert_eq!(attr("bytes"), "dead");
    assert_eq!(attr("arr"), "[1, 2]");
}

#[tokio::test]
async fn wait_for_times_out_listing_what_it_saw() {
    let collector = OtlpCollector::start().await.unwrap();
    let err = collector
        .wait_for(Duration::from_millis(100), "a span named nothing", |s| {
            s.iter().any(|s| s.name == "nothing")
        })
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("a span named nothing"), "{msg}");
    assert!(msg.contains("0 span(s) seen"), "{msg}");
}
