//! `accounting`: N job runs' usage events (`job.started`, then `vm.stopped`) ingested through
//! NATS by the real accounting consumer into SQLite and into PostgreSQL, each with the
//! durability the service runs with (SQLite WAL `synchronous=FULL`; PostgreSQL
//! `synchronous_commit = on`, `fsync = on`), and in the same run the baselines: a raw JetStream
//! consume+ack of the same 2N events, and a batched multi-row INSERT of the same N records
//! straight into each store (same durability, 500 rows per statement and per transaction).
//!
//! PostgreSQL is a private cluster started for the run (`scripts/pg-cluster.sh`), or the server
//! `--postgres URL` names (a database is created on it).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::Context;
use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use futures::StreamExt;
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use wnodes_accounting::{AccountingHandler, Metrics, StoreUrl, open_store, records};
use wnodes_bus::{
    BatchCtx, BatchItem, Bus, BusMetrics, Consumer, ConsumerSpec, ConsumerTuning, EventExt,
    Handler, HandlerCtx, HandlerError, on_pool, proto, proto::event::Body, roles,
};

use crate::bus::median;

const HOST: &str = "hv1.bench.example";

/// The two events of run `i`, as the bridge and the launcher publish them.
fn run_events(i: usize) -> [proto::Event; 2] {
    let run = proto::JobRunRef {
        site: "BENCH".into(),
        lrms: proto::Lrms::Slurm as i32,
        job_id: format!("{i}"),
        run_attempt: 1,
    };
    let ts = |s: i64| {
        Some(prost_types::Timestamp {
            seconds: 1_790_000_000 + s,
            nanos: 0,
        })
    };
    let job = proto::JobDescription {
        run: Some(run.clone()),
        owner: Some(proto::JobOwner {
            user: format!("user{:03}", i % 50),
            uid: 10_000 + (i % 50) as u32,
            gid: 1000,
        }),
        identity: Some(proto::GridIdentity {
            x509_dn: format!("/DC=ch/DC=cern/CN=user{:03}", i % 50),
            voms_fqans: vec!["/atlas/Role=production/Capability=NULL".into()],
            ..Default::default()
        }),
        vo: "atlas".into(),
        queue: "grid".into(),
        host: HOST.into(),
        ..Default::default()
    };
    let started = proto::Event::build(
        run.clone(),
        HOST,
        "bridge@bench",
        Body::JobStarted(proto::JobStarted {
            job: Some(job),
            started_at: ts(i as i64),
        }),
    );
    let stopped = proto::Event::build(
        run,
        HOST,
        "launcher@bench",
        Body::VmStopped(proto::VmStopped {
            vm_id: format!("vm-{i:012x}"),
            exit_code: 0,
            usage: Some(proto::VmUsage {
                cpu_seconds: 3600.0 + (i % 7) as f64,
                peak_memory_bytes: 2 << 30,
                wall: Some(prost_types::Duration {
                    seconds: 3700,
                    nanos: 0,
                }),
                cores: 8,
                ..Default::default()
            }),
            stopped_at: ts(i as i64 + 3700),
            stop_reason: "guest-poweroff".into(),
            ..Default::default()
        }),
    );
    [started, stopped]
}

/// Every run's `job.started` first, then every `vm.stopped`: no `vm.stopped` waits for its job.
fn all_events(n: usize) -> Vec<proto::Event> {
    let (mut started, mut stopped) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let [a, b] = run_events(i);
        started.push(a);
        stopped.push(b);
    }
    started.extend(stopped);
    started
}

/// Seconds to consume and ack `evs` (already in a stream of their own) with plain JetStream.
async fn raw_consume(
    js: &jetstream::Context,
    round: usize,
    evs: &[proto::Event],
    window: usize,
) -> anyhow::Result<f64> {
    let name = format!("RAWACCT{round}");
    let subj = format!("rawacct{round}.x");
    let s = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("rawacct{round}.>")],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let mut pending = Vec::with_capacity(window);
    for e in evs {
        pending.push(js.publish(subj.clone(), e.encode_to_vec().into()).await?);
        if pending.len() >= window {
            for f in pending.drain(..) {
                f.await?;
            }
        }
    }
    for f in pending.drain(..) {
        f.await?;
    }
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
    for _ in 0..evs.len() {
        let m = msgs.next().await.context("stream ended")??;
        let _ = proto::Event::decode(m.payload.clone())?;
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let secs = t.elapsed().as_secs_f64();
    js.delete_stream(&name).await?;
    Ok(secs)
}

/// Counts handled messages, then hands them to the real handler.
struct Counting {
    inner: AccountingHandler,
    n: Arc<AtomicU64>,
    target: u64,
    done: Arc<Notify>,
}

impl Counting {
    fn count(&self, handled: u64) {
        let before = self.n.fetch_add(handled, Ordering::SeqCst);
        if before < self.target && before + handled >= self.target {
            self.done.notify_one();
        }
    }
}

impl Handler for Counting {
    const BATCHED: bool = AccountingHandler::BATCHED;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn handle(&self, ctx: &mut HandlerCtx, e: proto::Event) -> Result<(), HandlerError> {
        self.inner.handle(ctx, e).await?;
        self.count(1);
        Ok(())
    }

    async fn handle_batch(
        &self,
        batch: &mut BatchCtx,
        items: &mut [BatchItem],
    ) -> Result<(), HandlerError> {
        self.inner.handle_batch(batch, items).await?;
        self.count(items.iter().filter(|i| !i.is_failed()).count() as u64);
        Ok(())
    }
}

/// Seconds for the accounting consumer to ingest `evs` (published beforehand) into `store`.
async fn accounting_round(
    nats: &wnodes_testkit::NatsServer,
    admin: &Bus,
    store: &StoreUrl,
    evs: &[proto::Event],
    window: usize,
) -> anyhow::Result<(f64, f64)> {
    let site = nats
        .site()
        .context("the bench server runs with authorization")?;
    site.provision_streams(&nats.url()).await?;
    admin.publish_pipelined(evs, window).await?;
    let tuning = ConsumerTuning {
        max_batch: window,
        ..Default::default()
    };
    let cfg = nats.identity_tuned(&roles::ACCOUNTING, "", &tuning).await?;
    let bus = Bus::connect(&cfg, "accounting@bench", BusMetrics::unregistered()).await?;
    let opened = open_store(store).await?;
    let spec = ConsumerSpec {
        durable: roles::ACCOUNTING
            .durable("")?
            .context("accounting has a durable")?,
        filter_subjects: roles::ACCOUNTING.filters("")?,
        tuning,
    };
    let (n, done) = (Arc::new(AtomicU64::new(0)), Arc::new(Notify::new()));
    let handler = Counting {
        inner: AccountingHandler {
            source: "accounting@bench".into(),
            metrics: Metrics::default(),
            ..Default::default()
        },
        n: n.clone(),
        target: evs.len() as u64,
        done: done.clone(),
    };
    let durable = spec.durable.clone();
    let consumer = Consumer::bind(bus.clone(), opened.clone(), spec, handler).await?;
    let t = Instant::now();
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    done.notified().await;
    // Every handler committed (and acked, after the drain).
    stop.cancel();
    task.await??;
    let secs = t.elapsed().as_secs_f64();
    let pool = opened.pool();
    let recs = records::list(&pool).await?;
    anyhow::ensure!(
        recs.len() == evs.len() / 2,
        "{} records for {} runs",
        recs.len(),
        evs.len() / 2
    );
    let js = admin.jetstream();
    js.delete_stream(wnodes_bus::subject::EVENTS_STREAM).await?;
    let (batches, messages) = bus.metrics().batch_counts(&durable);
    Ok((secs, messages as f64 / batches.max(1) as f64))
}

/// The same N records, as the handler would write them, by multi-row INSERTs of 500 rows per
/// transaction: what the store itself takes, without NATS or a handler.
async fn insert_round(store: &StoreUrl, n: usize) -> anyhow::Result<f64> {
    let opened = open_store(store).await?;
    let pool = opened.pool();
    const BATCH: usize = 500;
    let t = Instant::now();
    let mut i = 0;
    while i < n {
        let rows = BATCH.min(n - i);
        let mut tx = pool.begin().await?;
        let mut sql = String::from(
            "INSERT INTO usage_records (run_key, site, lrms, job_id, run_attempt, host, vm_id, vo,
                user_name, uid, gid, x509_dn, fqans, queue, cores, cpu_seconds,
                peak_memory_bytes, wall_seconds, exit_code, stop_reason, started_ms, stopped_ms,
                recorded_ms) VALUES ",
        );
        for r in 0..rows {
            let b = r * 8;
            if r > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${}, 'BENCH', 'slurm', ${}, 1, 'hv1.bench.example', ${}, 'atlas', ${}, 10000, \
                 1000, ${}, '[\"/atlas/Role=production/Capability=NULL\"]', 'grid', 8, ${}, \
                 2147483648, 3700.0, 0, 'guest-poweroff', ${}, ${}, 0)",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7,
                b + 8
            ));
        }
        let rows_done = wnodes_bus::on_db!(&mut tx.db(), |c| {
            // Built here from numbered placeholders only: nothing to escape.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
            for j in i..i + rows {
                let start = 1_790_000_000_000_i64 + j as i64 * 1000;
                q = q
                    .bind(format!("BENCH/slurm/{j}/1"))
                    .bind(format!("{j}"))
                    .bind(format!("vm-{j:012x}"))
                    .bind(format!("user{:03}", j % 50))
                    .bind(format!("/DC=ch/DC=cern/CN=user{:03}", j % 50))
                    .bind(3600.0 + (j % 7) as f64)
                    .bind(start)
                    .bind(start + 3_700_000);
            }
            q.execute(c).await.map(|r| r.rows_affected())
        })?;
        anyhow::ensure!(rows_done as usize == rows, "inserted {rows_done} of {rows}");
        tx.commit().await?;
        i += rows;
    }
    let secs = t.elapsed().as_secs_f64();
    let count: i64 = on_pool!(&pool, |p| {
        sqlx::query_scalar("SELECT COUNT(*) FROM usage_records")
            .fetch_one(p)
            .await
    })?;
    anyhow::ensure!(count as usize == n, "{count} rows for {n}");
    pool.close().await;
    Ok(secs)
}

fn rate(n: usize, secs: &[f64]) -> f64 {
    (n as f64 / median(secs.to_vec())).round()
}

fn ratio(a: f64, b: f64) -> f64 {
    (a / b * 1000.0).round() / 1000.0
}

/// Runs the benchmark: `rounds` rounds, each SQLite, PostgreSQL and the baselines; medians.
pub async fn bench_accounting(
    n: usize,
    window: usize,
    rounds: usize,
    postgres: Option<String>,
) -> anyhow::Result<()> {
    wnodes_bus::connect::install_crypto_provider();
    let _provider = crate::bus::init_tracing();
    let nats = wnodes_testkit::NatsServer::start().await?;
    let admin = Bus::connect(&nats.admin(), "bench@admin", BusMetrics::unregistered()).await?;
    let js = admin.jetstream().clone();
    let cluster;
    let pg_admin = match postgres {
        Some(u) => u,
        None => {
            cluster = wnodes_testkit::postgres::Cluster::start();
            cluster.url().to_owned()
        }
    };
    let dir = tempfile::tempdir()?;
    let evs = all_events(n);
    let (mut raw, mut sqlite, mut pg, mut sqlite_ins, mut pg_ins) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut sqlite_batch, mut pg_batch) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let s = raw_consume(&js, r, &evs, window).await?;
        eprintln!(
            "round {r}: raw JetStream consume+ack of {} events: {s:.3}s",
            evs.len()
        );
        raw.push(s);
        let url = StoreUrl::Sqlite(dir.path().join(format!("acct-{r}.db")));
        let (s, mean) = accounting_round(&nats, &admin, &url, &evs, window).await?;
        eprintln!(
            "round {r}: accounting into SQLite: {s:.3}s ({:.0} records/s, {mean:.0} messages per batch)",
            n as f64 / s
        );
        sqlite_batch.push(mean);
        sqlite.push(s);
        let db = wnodes_testkit::postgres::create_database(&pg_admin).await;
        let (s, mean) =
            accounting_round(&nats, &admin, &StoreUrl::Postgres(db.url), &evs, window).await?;
        eprintln!(
            "round {r}: accounting into PostgreSQL: {s:.3}s ({:.0} records/s, {mean:.0} messages per batch)",
            n as f64 / s
        );
        pg_batch.push(mean);
        pg.push(s);
        let url = StoreUrl::Sqlite(dir.path().join(format!("ins-{r}.db")));
        let s = insert_round(&url, n).await?;
        eprintln!("round {r}: batched INSERT into SQLite: {s:.3}s");
        sqlite_ins.push(s);
        let db = wnodes_testkit::postgres::create_database(&pg_admin).await;
        let s = insert_round(&StoreUrl::Postgres(db.url), n).await?;
        eprintln!("round {r}: batched INSERT into PostgreSQL: {s:.3}s");
        pg_ins.push(s);
    }
    // Rates in records (runs) per second; the raw side consumes the same 2 events per run.
    let raw_rate = rate(n, &raw);
    let (sqlite_rate, pg_rate) = (rate(n, &sqlite), rate(n, &pg));
    let (sqlite_ins_rate, pg_ins_rate) = (rate(n, &sqlite_ins), rate(n, &pg_ins));
    let summary = serde_json::json!({
        "bench": "accounting",
        "n_records": n,
        "events_per_record": 2,
        "window": window,
        "rounds": rounds,
        "sqlite_records_per_s": sqlite_rate,
        "postgres_records_per_s": pg_rate,
        "jetstream_records_per_s": raw_rate,
        "sqlite_insert_records_per_s": sqlite_ins_rate,
        "postgres_insert_records_per_s": pg_ins_rate,
        "sqlite_vs_jetstream": ratio(sqlite_rate, raw_rate),
        "sqlite_vs_insert": ratio(sqlite_rate, sqlite_ins_rate),
        "postgres_vs_jetstream": ratio(pg_rate, raw_rate),
        "postgres_vs_insert": ratio(pg_rate, pg_ins_rate),
        "sqlite_messages_per_batch": median(sqlite_batch).round(),
        "postgres_messages_per_batch": median(pg_batch).round(),
        "durability": {
            "sqlite": "WAL, synchronous=FULL",
            "postgres": "synchronous_commit=on, fsync=on",
        },
        "postgres": "15 (Debian), private cluster on this machine",
        "nats_server": "2.15.1 (local, file storage)",
    });
    println!("{summary}");
    Ok(())
}
