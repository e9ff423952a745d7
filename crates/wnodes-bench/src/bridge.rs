//! `bridge`: a large generated HTCondor job event log replayed into JetStream through
//! `wnodes-lrms` (read, parse, normalise, build the events, publish through the bus, every
//! message persisted and acknowledged) and, in the same run, the same events pre-built and
//! published raw with the same payloads, the same in-flight window and the bus's two headers
//! (`Nats-Msg-Id`, `traceparent`), as `raw_with_bus_headers` in the `bus` bench.

use std::{
    io::Write,
    path::Path,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, stream};
use prost::Message;
use tracing::Instrument;
use wnodes_bus::{Bus, BusMetrics, subject};
use wnodes_lrms::{LrmsKind, Publisher, ReplayOptions, replay::Summary, replay_to_bus};

/// Arguments of `wnodes-bench bridge`.
#[derive(clap::Args, Debug)]
pub struct BridgeArgs {
    /// Jobs in the generated log; each has a submit, an execute and a terminated event.
    #[arg(long, default_value_t = 40_000)]
    jobs: usize,
    /// In-flight window (acks outstanding) on both sides.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Events handed to the bus per publish call by the replay.
    #[arg(long, default_value_t = 4096)]
    batch: usize,
    /// Rounds (alternating raw, bridge); medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// Writes an ISO-date HTCondor log of `jobs` jobs (submit, execute, terminated with the usage
/// lines and the Partitionable Resources table, as HTCondor 23+ writes them).
fn generate_log(path: &Path, jobs: usize) -> anyhow::Result<u64> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    for j in 0..jobs {
        let cluster = 100_000 + j;
        let (m, s) = ((j / 60) % 60, j % 60);
        write!(
            w,
            "000 ({cluster}.000.000) 2025-03-01 10:{m:02}:{s:02} Job submitted from host: <192.0.2.10:9618?addrs=192.0.2.10-9618&alias=ce01.example.org&noUDP&sock=schedd_1234_abcd>\n\
             ...\n\
             001 ({cluster}.000.000) 2025-03-01 11:{m:02}:{s:02} Job executing on host: <192.0.2.20:9618?addrs=192.0.2.20-9618&alias=wn{n:03}.example.org&noUDP&sock=startd_987_ef01>\n\
             \tSlotName: slot1_{n}@wn{n:03}.example.org\n\
             \tCpus = 8\n\
             \tDisk = 2048\n\
             \tMemory = 16000\n\
             ...\n\
             005 ({cluster}.000.000) 2025-03-01 12:{m:02}:{s:02} Job terminated.\n\
             \t(1) Normal termination (return value {rv})\n\
             \t\tUsr 0 00:59:{s:02}, Sys 0 00:00:{s:02}  -  Run Remote Usage\n\
             \t\tUsr 0 00:00:00, Sys 0 00:00:00  -  Run Local Usage\n\
             \t\tUsr 0 00:59:{s:02}, Sys 0 00:00:{s:02}  -  Total Remote Usage\n\
             \t\tUsr 0 00:00:00, Sys 0 00:00:00  -  Total Local Usage\n\
             \t6249  -  Run Bytes Sent By Job\n\
             \t0  -  Run Bytes Received By Job\n\
             \t6249  -  Total Bytes Sent By Job\n\
             \t0  -  Total Bytes Received By Job\n\
             \tPartitionable Resources :    Usage  Request Allocated \n\
             \t   Cpus                 :        8        8         8 \n\
             \t   Disk (KB)            :       90        1      2048 \n\
             \t   Memory (MB)          :     9000    16000     16000 \n\
             \t   TimeExecute (s)      :     3600                    \n\
             ...\n",
            n = j % 500,
            rv = j % 3,
        )?;
    }
    w.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

#[derive(Debug, Clone, Copy)]
struct Side {
    secs: f64,
    events: usize,
}

impl Side {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs
    }
}

async fn raw_round(
    js: &jetstream::Context,
    round: usize,
    prebuilt: &[(String, bytes::Bytes)],
    window: usize,
) -> anyhow::Result<Side> {
    let name = format!("RAWBRIDGE{round}");
    let subj = format!("rawbridge{round}.evt");
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("rawbridge{round}.>")],
        duplicate_window: Duration::from_secs(120),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let start = Instant::now();
    let mut pending = Vec::with_capacity(window);
    for (id, payload) in prebuilt {
        let mut h = async_nats::HeaderMap::new();
        h.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        h.insert("traceparent", traceparent);
        pending.push(
            js.publish_with_headers(subj.clone(), h, payload.clone())
                .await?,
        );
        if pending.len() >= window {
            for f in pending.drain(..) {
                f.await?;
            }
        }
    }
    for f in pending.drain(..) {
        f.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let stored = js.get_stream(&name).await?.info().await?.state.messages;
    anyhow::ensure!(stored as usize == prebuilt.len(), "raw stored {stored}");
    js.delete_stream(&name).await?;
    Ok(Side {
        secs,
        events: prebuilt.len(),
    })
}

async fn bridge_round(
    nats: &wnodes_testkit::NatsServer,
    log: &Path,
    opts: &ReplayOptions,
    window: usize,
    batch: usize,
) -> anyhow::Result<(Side, Summary)> {
    let site = anyhow::Context::context(nats.site(), "the bench server runs with authorization")?;
    site.provision_streams(&nats.url()).await?;
    let cfg = nats
        .identity(&wnodes_bus::roles::BRIDGE, "bench.example")
        .await?;
    let bus = Bus::connect(&cfg, "bridge@bench.example", BusMetrics::unregistered()).await?;
    bus.check_streams().await?;
    let publisher = Publisher::new(bus.clone(), "BENCH", window);
    let start = Instant::now();
    let summary = replay_to_bus(&publisher, opts, &[log.to_owned()], batch)
        .instrument(tracing::info_span!("bench.bridge"))
        .await?;
    let secs = start.elapsed().as_secs_f64();
    let mut s = bus.jetstream().get_stream(subject::EVENTS_STREAM).await?;
    let stored = s.info().await?.state.messages;
    anyhow::ensure!(
        stored == summary.emitted,
        "bridge stored {stored} of {}",
        summary.emitted
    );
    let admin = wnodes_bus::connect::connect(&nats.admin(), "bench-admin", None, None).await?;
    async_nats::jetstream::new(admin)
        .delete_stream(subject::EVENTS_STREAM)
        .await?;
    Ok((
        Side {
            secs,
            events: summary.emitted as usize,
        },
        summary,
    ))
}

pub async fn run(args: BridgeArgs) -> anyhow::Result<()> {
    wnodes_bus::connect::install_crypto_provider();
    let _provider = crate::bus::init_tracing();
    let nats = wnodes_testkit::NatsServer::start().await?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("events.log");
    let log_bytes = generate_log(&log, args.jobs)?;
    let opts = ReplayOptions {
        tz: jiff::tz::TimeZone::UTC,
        ..ReplayOptions::new(LrmsKind::Htcondor)
    };

    // The raw side's messages: exactly the events the bridge publishes (same ids, same bytes),
    // built before its clock starts. Timing this build gives the parse + normalise cost alone.
    let parse_start = Instant::now();
    let mut events = Vec::new();
    let summary = wnodes_lrms::replay(&opts, std::slice::from_ref(&log), &mut events)?;
    anyhow::ensure!(summary.malformed == 0, "generated log: {summary}");
    let parse_s = parse_start.elapsed().as_secs_f64();
    let wire: Vec<(String, bytes::Bytes)> = events
        .iter()
        .map(|e| {
            let ev = wnodes_lrms::convert::to_event(e, "BENCH", "bridge@bench.example");
            (ev.id.clone(), bytes::Bytes::from(ev.encode_to_vec()))
        })
        .collect();
    let n = wire.len();
    let mean_payload = wire.iter().map(|(_, p)| p.len()).sum::<usize>() / n.max(1);
    eprintln!(
        "log: {} jobs, {n} events, {log_bytes} bytes; parse + normalise alone: {:.0} events/s",
        args.jobs,
        n as f64 / parse_s
    );

    let client = wnodes_bus::connect::connect(&nats.admin(), "bench-raw", None, None).await?;
    let js = jetstream::new(client);
    let (mut raw, mut bridge) = (Vec::new(), Vec::new());
    for r in 0..args.rounds.max(1) {
        let a = raw_round(&js, r, &wire, args.window).await?;
        eprintln!("round {r}: raw {:.0} events/s ({:.2} s)", a.rate(), a.secs);
        let (b, s) = bridge_round(&nats, &log, &opts, args.window, args.batch).await?;
        eprintln!(
            "round {r}: bridge {:.0} events/s ({:.2} s; {s})",
            b.rate(),
            b.secs
        );
        anyhow::ensure!(b.events == n, "bridge emitted {} of {n}", b.events);
        raw.push(a.rate());
        bridge.push(b.rate());
    }
    let raw_rate = crate::bus::median(raw);
    let bridge_rate = crate::bus::median(bridge);
    let summary = serde_json::json!({
        "bench": "bridge",
        "jobs": args.jobs,
        "events": n,
        "log_bytes": log_bytes,
        "mean_payload_bytes": mean_payload,
        "window": args.window,
        "batch": args.batch,
        "rounds": args.rounds.max(1),
        "parse_events_per_s": (n as f64 / parse_s).round(),
        "raw_events_per_s": raw_rate.round(),
        "bridge_events_per_s": bridge_rate.round(),
        "ratio": (bridge_rate / raw_rate * 1000.0).round() / 1000.0,
        "raw": "pre-built events, same payloads, Nats-Msg-Id + traceparent, same window, file storage, acked",
        "bridge": "read + parse + normalise + build + Bus::publish_pipelined, file storage, acked",
    });
    println!("{summary}");
    Ok(())
}
