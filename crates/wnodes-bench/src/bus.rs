//! `bus` and `keys`: the bus library against raw async-nats JetStream calls (same payload, N
//! and in-flight window; and raw with only the bus's two headers, the ceiling), and the
//! idempotency key store's group commit alone. Shared with `bridge`: [`median`],
//! [`init_tracing`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use futures::StreamExt;
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use wnodes_bus::{
    Bus, BusMetrics, Consumer, ConsumerSpec, ConsumerTuning, EventExt, Handler, HandlerCtx,
    HandlerError, KeyStore, proto, proto::event::Body, roles, subject,
};

/// The host the benchmark's events are about.
const BENCH_HOST: &str = "bench.example";

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

#[derive(Debug, Clone, Copy, Default)]
struct Run {
    publish_s: f64,
    consume_s: f64,
    /// CPU seconds (user + system) of nats-server and of this process in each phase.
    publish_cpu: Cpu,
    consume_cpu: Cpu,
}

#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    server_s: f64,
    client_s: f64,
}

/// CPU seconds used so far by the nats-server process and by this one (all threads), from
/// `/proc/<pid>/stat` (utime + stime, in USER_HZ = 100 ticks per second on Linux).
#[derive(Debug, Clone, Copy)]
struct CpuClock {
    server_pid: u32,
}

impl CpuClock {
    fn now(&self) -> Cpu {
        Cpu {
            server_s: proc_cpu_s(&self.server_pid.to_string()),
            client_s: proc_cpu_s("self"),
        }
    }

    /// Starts timing a phase (wall clock and CPU).
    fn start(self) -> Phase {
        Phase {
            clock: self,
            wall: Instant::now(),
            cpu: self.now(),
        }
    }
}

/// A phase being timed; [`Phase::stop`] gives its wall seconds and CPU.
struct Phase {
    clock: CpuClock,
    wall: Instant,
    cpu: Cpu,
}

impl Phase {
    fn stop(self) -> (f64, Cpu) {
        let wall = self.wall.elapsed().as_secs_f64();
        let now = self.clock.now();
        let cpu = Cpu {
            server_s: now.server_s - self.cpu.server_s,
            client_s: now.client_s - self.cpu.client_s,
        };
        (wall, cpu)
    }
}

fn proc_cpu_s(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0
}

impl Run {
    fn msgs_per_s(&self, n: usize) -> f64 {
        n as f64 / (self.publish_s + self.consume_s)
    }

    fn describe(&self) -> String {
        format!(
            "publish {:.3}s (cpu: server {:.2}s, bench {:.2}s) consume {:.3}s (cpu: server {:.2}s, bench {:.2}s)",
            self.publish_s,
            self.publish_cpu.server_s,
            self.publish_cpu.client_s,
            self.consume_s,
            self.consume_cpu.server_s,
            self.consume_cpu.client_s
        )
    }
}

/// Medians of each phase's CPU seconds, as JSON.
fn cpu_summary(runs: &[Run]) -> serde_json::Value {
    let m = |f: fn(&Run) -> f64| (median(runs.iter().map(f).collect()) * 100.0).round() / 100.0;
    serde_json::json!({
        "publish": { "server": m(|r| r.publish_cpu.server_s), "bench": m(|r| r.publish_cpu.client_s) },
        "consume": { "server": m(|r| r.consume_cpu.server_s), "bench": m(|r| r.consume_cpu.client_s) },
    })
}

/// What the raw side sends besides the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawHeaders {
    /// Nothing: plain JetStream.
    None,
    /// The two headers every bus message carries (`Nats-Msg-Id` = the event id, with the
    /// server's de-duplication on, and a `traceparent`), and nothing else the bus does: the
    /// best any library that publishes with the bus's guarantees can do.
    Bus,
}

async fn raw_round(
    clock: CpuClock,
    js: &jetstream::Context,
    round: usize,
    evs: &[proto::Event],
    window: usize,
    headers: RawHeaders,
) -> anyhow::Result<Run> {
    let tag = match headers {
        RawHeaders::None => "raw",
        RawHeaders::Bus => "rawh",
    };
    let name = format!("{}{round}", tag.to_uppercase());
    let subj = format!("{tag}{round}.bench");
    let s = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{tag}{round}.>")],
            // The bus's events stream keeps the default window too (2 minutes).
            duplicate_window: Duration::from_secs(120),
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let payloads: Vec<bytes::Bytes> = evs.iter().map(|e| e.encode_to_vec().into()).collect();
    let phase = clock.start();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut pending = Vec::with_capacity(window);
    for (e, p) in evs.iter().zip(&payloads) {
        pending.push(match headers {
            RawHeaders::None => js.publish(subj.clone(), p.clone()).await?,
            RawHeaders::Bus => {
                let mut h = async_nats::HeaderMap::new();
                h.insert(async_nats::header::NATS_MESSAGE_ID, e.id.as_str());
                h.insert("traceparent", traceparent);
                js.publish_with_headers(subj.clone(), h, p.clone()).await?
            }
        });
        if pending.len() >= window {
            for f in pending.drain(..) {
                f.await?;
            }
        }
    }
    for f in pending.drain(..) {
        f.await?;
    }
    let (publish_s, publish_cpu) = phase.stop();
    let consumer: PullConsumer = s
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(tag.into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: (window * 4) as i64,
            ..Default::default()
        })
        .await?;
    let phase = clock.start();
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
    let (consume_s, consume_cpu) = phase.stop();
    js.delete_stream(&name).await?;
    Ok(Run {
        publish_s,
        consume_s,
        publish_cpu,
        consume_cpu,
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

/// One round through the bus with authorization on, as the services run: the launcher's
/// identity publishes `vm.requested`, the image service's consumes it through its durable.
async fn bus_round(
    clock: CpuClock,
    nats: &wnodes_testkit::NatsServer,
    round: usize,
    evs: &[proto::Event],
    window: usize,
    dir: &std::path::Path,
) -> anyhow::Result<Run> {
    let site = nats
        .site()
        .context("the bench server runs with authorization")?;
    site.provision_streams(&nats.url()).await?;
    let tuning = ConsumerTuning {
        max_in_flight: window,
        ..Default::default()
    };
    let publisher = nats.identity(&roles::LAUNCHER, BENCH_HOST).await?;
    let consumer_cfg = nats
        .identity_tuned(&roles::IMAGE, BENCH_HOST, &tuning)
        .await?;
    let bus = Bus::connect(
        &publisher,
        "launcher@bench.example",
        BusMetrics::unregistered(),
    )
    .await?;
    bus.check_streams().await?;
    let consumer_bus = Bus::connect(
        &consumer_cfg,
        "image@bench.example",
        BusMetrics::unregistered(),
    )
    .await?;
    let phase = clock.start();
    bus.publish_pipelined(evs, window)
        .instrument(tracing::info_span!("bench.publish"))
        .await?;
    let (publish_s, publish_cpu) = phase.stop();
    let store = KeyStore::open(&dir.join(format!("keys-{round}.db"))).await?;
    let count = Arc::new(Count {
        n: AtomicU64::new(0),
        target: evs.len() as u64,
        done: Notify::new(),
    });
    let spec = ConsumerSpec {
        durable: roles::IMAGE
            .durable(BENCH_HOST)?
            .context("the image role has a durable")?,
        filter_subjects: roles::IMAGE.filters(BENCH_HOST)?,
        tuning,
    };
    // Timed from after the consumer exists, as on the raw side (which creates its consumer
    // before starting the clock).
    let consumer = Consumer::bind(
        consumer_bus.clone(),
        store.clone(),
        spec,
        Nop(count.clone()),
    )
    .await?;
    let phase = clock.start();
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    count.done.notified().await;
    // Stop only after the last handlers committed their keys and acked (graceful drain).
    stop.cancel();
    task.await??;
    let (consume_s, consume_cpu) = phase.stop();
    let rows: (i64,) = sqlx_count(&store).await?;
    anyhow::ensure!(rows.0 as usize >= evs.len(), "only {} keys stored", rows.0);
    // The next round starts from a fresh stream; deleting it is the operator's right.
    let admin = wnodes_bus::connect::connect(&nats.admin(), "bench-admin", None, None).await?;
    async_nats::jetstream::new(admin)
        .delete_stream(subject::EVENTS_STREAM)
        .await?;
    Ok(Run {
        publish_s,
        consume_s,
        publish_cpu,
        consume_cpu,
    })
}

async fn sqlx_count(store: &KeyStore) -> anyhow::Result<(i64,)> {
    Ok(sqlx::query_as("SELECT COUNT(*) FROM wnodes_processed")
        .fetch_one(store.read_pool())
        .await?)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn init_tracing() -> opentelemetry_sdk::trace::SdkTracerProvider {
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
        .with(wnodes_runtime::telemetry::span_layer(tracer))
        .try_init();
    provider
}

pub async fn bench_bus(
    n: usize,
    payload: usize,
    window: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    wnodes_bus::connect::install_crypto_provider();
    let _provider = init_tracing();
    let nats = wnodes_testkit::NatsServer::start().await?;
    let clock = CpuClock {
        server_pid: nats.pid().context("nats-server has no pid")?,
    };
    // The raw baseline: plain JetStream as the site's admin (its own streams, no service
    // permissions), on the same server with authorization on.
    let client = wnodes_bus::connect::connect(&nats.admin(), "bench-raw", None, None).await?;
    let js = jetstream::new(client);
    let dir = tempfile::tempdir()?;
    let evs = events(n, payload);
    let size = evs[0].encoded_len();
    let (mut raw, mut rawh, mut bus) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let a = raw_round(clock, &js, r, &evs, window, RawHeaders::None).await?;
        eprintln!("round {r}: raw {}", a.describe());
        let h = raw_round(clock, &js, r, &evs, window, RawHeaders::Bus).await?;
        eprintln!("round {r}: raw+bus headers {}", h.describe());
        rawh.push(h);
        let b = bus_round(clock, &nats, r, &evs, window, dir.path()).await?;
        eprintln!("round {r}: bus {}", b.describe());
        raw.push(a);
        bus.push(b);
    }
    let raw_rate = median(raw.iter().map(|r| r.msgs_per_s(n)).collect());
    let bus_rate = median(bus.iter().map(|r| r.msgs_per_s(n)).collect());
    let rawh_rate = median(rawh.iter().map(|r| r.msgs_per_s(n)).collect());
    let summary = serde_json::json!({
        "bench": "bus",
        "n": n,
        "payload_bytes": size,
        "window": window,
        "rounds": rounds,
        "raw_msgs_per_s": raw_rate.round(),
        "bus_msgs_per_s": bus_rate.round(),
        "ratio": (bus_rate / raw_rate * 1000.0).round() / 1000.0,
        // Raw JetStream with only the bus's two headers: what the headers and de-duplication
        // alone cost, hence the highest `ratio` any implementation could reach.
        "raw_with_bus_headers_msgs_per_s": rawh_rate.round(),
        "ratio_ceiling": (rawh_rate / raw_rate * 1000.0).round() / 1000.0,
        "bus_vs_raw_with_bus_headers": (bus_rate / rawh_rate * 1000.0).round() / 1000.0,
        "raw_publish_msgs_per_s": median(raw.iter().map(|r| n as f64 / r.publish_s).collect()).round(),
        "raw_consume_msgs_per_s": median(raw.iter().map(|r| n as f64 / r.consume_s).collect()).round(),
        "bus_publish_msgs_per_s": median(bus.iter().map(|r| n as f64 / r.publish_s).collect()).round(),
        "bus_consume_msgs_per_s": median(bus.iter().map(|r| n as f64 / r.consume_s).collect()).round(),
        "raw_cpu_s": cpu_summary(&raw),
        "raw_with_bus_headers_cpu_s": cpu_summary(&rawh),
        "bus_cpu_s": cpu_summary(&bus),
        "bus_features": [
            "envelope_encode_decode",
            "nats_msg_id_dedup",
            "nats_msg_id_and_traceparent_headers",
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

/// `KeyStore::record` of N new keys (shaped like event ids) from `concurrency` tasks, each
/// round in a fresh store; keys per second, median over the rounds.
pub async fn bench_keys(n: usize, concurrency: usize, rounds: usize) -> anyhow::Result<()> {
    let mut rates = Vec::new();
    for round in 0..rounds {
        let dir = tempfile::tempdir()?;
        let store = KeyStore::open(&dir.path().join("keys.db")).await?;
        let next = Arc::new(AtomicU64::new(0));
        let t = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (store, next) = (store.clone(), next.clone());
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= n {
                        return anyhow::Ok(());
                    }
                    let key = format!("vm.requested:BENCH/slurm/{i}/1");
                    anyhow::ensure!(store.record("bench", &key, &[]).await?, "{key} not new");
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        let rate = n as f64 / t.elapsed().as_secs_f64();
        eprintln!("round {round}: {rate:.0} keys/s");
        rates.push(rate);
    }
    let summary = serde_json::json!({
        "bench": "keys",
        "n": n,
        "concurrency": concurrency,
        "rounds": rounds,
        "keys_per_s": median(rates).round(),
    });
    println!("{summary}");
    Ok(())
}
