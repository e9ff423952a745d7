//! WNoDeS benchmarks. Each prints progress on stderr and one JSON summary as its last stdout
//! line.
//!
//! - `bus`: N persisted messages published and consumed through the bus library (handler API:
//!   idempotency keys stored, a span per message, exporter off) and, in the same run, through
//!   raw async-nats JetStream calls with the same payload size, N and in-flight window.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::Context;
use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use wnodes_bus::{
    Bus, BusMetrics, Consumer, ConsumerSpec, ConsumerTuning, EventExt, Handler, HandlerCtx,
    HandlerError, KeyStore, NatsConfig, proto, proto::event::Body, subject,
};

mod vm_start;

#[derive(Parser, Debug)]
#[command(about = "WNoDeS benchmarks (JSON summary on the last line)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Bus library vs raw JetStream: publish + consume N persisted messages.
    Bus {
        #[arg(long, default_value_t = 20_000)]
        n: usize,
        /// Approximate payload size in bytes (the encoded event; raw uses the same bytes).
        #[arg(long, default_value_t = 512)]
        payload: usize,
        /// In-flight window for publishing and consuming.
        #[arg(long, default_value_t = 256)]
        window: usize,
        /// Rounds (alternating raw, bus); medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// A job through WNoDeS vs the same guest under a bare qemu (needs root).
    VmStart(vm_start::VmStartArgs),
}

fn event(i: usize, pad: usize) -> proto::Event {
    let run = proto::JobRunRef {
        site: "BENCH".into(),
        lrms: proto::Lrms::Slurm as i32,
        job_id: format!("{i}"),
        run_attempt: 1,
    };
    proto::Event::build(
        run,
        "bench.example",
        "bench@bench.example",
        Body::VmRequested(proto::VmRequested {
            spec: Some(proto::VmSpec {
                vm_id: format!("vm-{i}"),
                payload: Some(proto::JobPayload {
                    kind: Some(proto::job_payload::Kind::InlineScript(vec![b'x'; pad])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }),
    )
}

fn events(n: usize, payload: usize) -> Vec<proto::Event> {
    let base = event(0, 0).encoded_len();
    let pad = payload.saturating_sub(base);
    (0..n).map(|i| event(i, pad)).collect()
}

#[derive(Debug, Clone, Copy)]
struct Run {
    publish_s: f64,
    consume_s: f64,
}

impl Run {
    fn msgs_per_s(&self, n: usize) -> f64 {
        n as f64 / (self.publish_s + self.consume_s)
    }
}

async fn raw_round(
    js: &jetstream::Context,
    round: usize,
    evs: &[proto::Event],
    window: usize,
) -> anyhow::Result<Run> {
    let name = format!("RAW{round}");
    let subj = format!("raw{round}.bench");
    let s = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("raw{round}.>")],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let payloads: Vec<bytes::Bytes> = evs.iter().map(|e| e.encode_to_vec().into()).collect();
    let t = Instant::now();
    let mut pending = Vec::with_capacity(window);
    for p in &payloads {
        pending.push(js.publish(subj.clone(), p.clone()).await?);
        if pending.len() >= window {
            for f in pending.drain(..) {
                f.await?;
            }
        }
    }
    for f in pending.drain(..) {
        f.await?;
    }
    let publish_s = t.elapsed().as_secs_f64();
    let consumer: PullConsumer = s
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: (window * 4) as i64,
            ..Default::default()
        })
        .await?;
    let t = Instant::now();
    let mut msgs = consumer
        .stream()
        .max_messages_per_batch(window.min(256))
        .messages()
        .await?;
    let mut got = 0;
    while got < evs.len() {
        let m = msgs.next().await.context("stream ended")??;
        // Same decode work as the bus does.
        let _ = proto::Event::decode(m.payload.clone())?;
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        got += 1;
    }
    let consume_s = t.elapsed().as_secs_f64();
    js.delete_stream(&name).await?;
    Ok(Run {
        publish_s,
        consume_s,
    })
}

struct Count {
    n: AtomicU64,
    target: u64,
    done: Notify,
}

struct Nop(Arc<Count>);

impl Handler for Nop {
    fn name(&self) -> &'static str {
        "bench.handle"
    }
    async fn handle(&self, _ctx: &mut HandlerCtx, _e: proto::Event) -> Result<(), HandlerError> {
        if self.0.n.fetch_add(1, Ordering::SeqCst) + 1 == self.0.target {
            self.0.done.notify_one();
        }
        Ok(())
    }
}

async fn bus_round(
    url: &str,
    round: usize,
    evs: &[proto::Event],
    window: usize,
    dir: &std::path::Path,
) -> anyhow::Result<Run> {
    let cfg = NatsConfig {
        url: url.into(),
        ..Default::default()
    };
    let bus = Bus::connect(&cfg, "bench@bench.example", BusMetrics::unregistered()).await?;
    bus.ensure_streams().await?;
    let t = Instant::now();
    bus.publish_pipelined(evs, window)
        .instrument(tracing::info_span!("bench.publish"))
        .await?;
    let publish_s = t.elapsed().as_secs_f64();
    let store = KeyStore::open(&dir.join(format!("keys-{round}.db"))).await?;
    let count = Arc::new(Count {
        n: AtomicU64::new(0),
        target: evs.len() as u64,
        done: Notify::new(),
    });
    let spec = ConsumerSpec {
        durable: format!("bench-{round}"),
        filter_subjects: vec![subject::event_filter(
            Some("bench.example"),
            "vm.requested",
        )?],
        tuning: ConsumerTuning {
            max_in_flight: window,
            ..Default::default()
        },
    };
    // Timed from after the consumer exists, as on the raw side (which creates its consumer
    // before starting the clock).
    let consumer = Consumer::create(bus.clone(), store.clone(), spec, Nop(count.clone())).await?;
    let t = Instant::now();
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    count.done.notified().await;
    // Stop only after the last handlers committed their keys and acked (graceful drain).
    stop.cancel();
    task.await??;
    let consume_s = t.elapsed().as_secs_f64();
    let rows: (i64,) = sqlx_count(&store).await?;
    anyhow::ensure!(rows.0 as usize >= evs.len(), "only {} keys stored", rows.0);
    bus.jetstream()
        .delete_stream(subject::EVENTS_STREAM)
        .await?;
    Ok(Run {
        publish_s,
        consume_s,
    })
}

async fn sqlx_count(store: &KeyStore) -> anyhow::Result<(i64,)> {
    Ok(sqlx::query_as("SELECT COUNT(*) FROM wnodes_processed")
        .fetch_one(store.read_pool())
        .await?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn init_tracing() -> opentelemetry_sdk::trace::SdkTracerProvider {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    // A real provider (span ids, sampling, propagation) with no exporter: "exporter off".
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let tracer = provider.tracer("wnodes-bench");
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info,async_nats=warn"))
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init();
    provider
}

async fn bench_bus(n: usize, payload: usize, window: usize, rounds: usize) -> anyhow::Result<()> {
    wnodes_bus::connect::install_crypto_provider();
    let _provider = init_tracing();
    let nats = wnodes_testkit::NatsServer::start().await?;
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client);
    let dir = tempfile::tempdir()?;
    let evs = events(n, payload);
    let size = evs[0].encoded_len();
    let (mut raw, mut bus) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let a = raw_round(&js, r, &evs, window).await?;
        eprintln!(
            "round {r}: raw publish {:.2}s consume {:.2}s",
            a.publish_s, a.consume_s
        );
        let b = bus_round(&nats.url(), r, &evs, window, dir.path()).await?;
        eprintln!(
            "round {r}: bus publish {:.2}s consume {:.2}s",
            b.publish_s, b.consume_s
        );
        raw.push(a);
        bus.push(b);
    }
    let raw_rate = median(raw.iter().map(|r| r.msgs_per_s(n)).collect());
    let bus_rate = median(bus.iter().map(|r| r.msgs_per_s(n)).collect());
    let summary = serde_json::json!({
        "bench": "bus",
        "n": n,
        "payload_bytes": size,
        "window": window,
        "rounds": rounds,
        "raw_msgs_per_s": raw_rate.round(),
        "bus_msgs_per_s": bus_rate.round(),
        "ratio": (bus_rate / raw_rate * 1000.0).round() / 1000.0,
        "raw_publish_msgs_per_s": median(raw.iter().map(|r| n as f64 / r.publish_s).collect()).round(),
        "raw_consume_msgs_per_s": median(raw.iter().map(|r| n as f64 / r.consume_s).collect()).round(),
        "bus_publish_msgs_per_s": median(bus.iter().map(|r| n as f64 / r.publish_s).collect()).round(),
        "bus_consume_msgs_per_s": median(bus.iter().map(|r| n as f64 / r.consume_s).collect()).round(),
        "bus_features": [
            "envelope_encode_decode",
            "nats_msg_id_dedup",
            "traceparent_and_cloudevents_headers",
            "publish_ack_and_retry",
            "span_per_message_exporter_off",
            "idempotency_key_lookup_and_durable_commit_sqlite_wal",
            "explicit_ack",
            "dead_letter_path_armed"
        ],
        "nats_server": "2.15.1 (local, file storage)",
    });
    println!("{summary}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Bus {
                n,
                payload,
                window,
                rounds,
            } => bench_bus(n, payload, window, rounds.max(1)).await,
            // Runs on its own thread and runtime inside a private network namespace.
            Cmd::VmStart(args) => vm_start::run(args),
        }
    })
}
