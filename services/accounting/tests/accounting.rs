//! Accounting against a real nats-server: one record per run, whatever is redelivered, on
//! both stores: each test runs once on SQLite and once on PostgreSQL (a fresh database on the
//! run's cluster, `wnodes_testkit::postgres`), as `<test>::sqlite` and `<test>::postgres`.

// Helpers outside `#[test]` functions are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use wnodes_accounting::{
    Accounting, AccountingHandler, Metrics, StoreUrl,
    config::{Benchmarks, HostBenchmark},
    open_store, records,
};
use wnodes_bus::{Bus, BusError, Consumer, ConsumerTuning, proto, proto::event::Body, subject};
use wnodes_runtime::Service as _;
use wnodes_testkit::{
    NatsServer,
    bus::stored_messages,
    events::{self, Events, RunRefExt, vm_failed, vm_usage},
    wait_until,
};

const HOST: &str = "hv1.example.org";
const WAIT: Duration = Duration::from_secs(20);

async fn connect(nats: &NatsServer) -> Bus {
    wnodes_testkit::bus::connect(&nats.admin(), "test@hv1.example.org")
        .await
        .unwrap()
}

fn tuning() -> ConsumerTuning {
    ConsumerTuning {
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ..Default::default()
    }
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), BusError>>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn start(bus: &Bus, db: &StoreUrl) -> Running {
    start_with(bus, db, Metrics::default()).await
}

async fn start_with(bus: &Bus, db: &StoreUrl, metrics: Metrics) -> Running {
    start_tuned(bus, db, metrics, tuning()).await
}

async fn start_tuned(
    bus: &Bus,
    db: &StoreUrl,
    metrics: Metrics,
    tuning: ConsumerTuning,
) -> Running {
    let store = open_store(db).await.unwrap();
    let spec = wnodes_runtime::consumer_spec::<Accounting>("central.example.org", tuning).unwrap();
    let handler = AccountingHandler {
        source: "accounting@central.example.org".into(),
        metrics,
        // The hypervisors hv*.example.org score 18.5 HEPscore23 per core; others have none.
        benchmarks: Benchmarks {
            by_host: vec![HostBenchmark {
                hosts: "hv*.example.org".into(),
                kind: wnodes_apel::BenchmarkKind::Hepscore23,
                per_core: 18.5,
            }],
            site: None,
        },
    };
    // The test's bus is the site's admin: it provisions the durable as `wnodesctl provision`
    // does (with this test's tuning), then binds to it.
    wnodes_site::streams::provision_durable(
        bus.jetstream(),
        spec.expected(),
        wnodes_site::Mode::Apply,
    )
    .await
    .unwrap();
    let consumer = Consumer::bind(bus.clone(), store, spec, handler)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    Running { stop, task }
}

fn run(job_id: &str) -> proto::JobRunRef {
    wnodes_testkit::events::run(job_id).site("INFN-T1")
}

fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

fn job_started(r: &proto::JobRunRef) -> proto::Event {
    let job = proto::JobDescription {
        run: Some(r.clone()),
        owner: Some(proto::JobOwner {
            user: "alice".into(),
            uid: 1000,
            gid: 100,
        }),
        identity: Some(proto::GridIdentity {
            x509_dn: "/C=IT/O=INFN/CN=Alice".into(),
            voms_fqans: vec!["/atlas/Role=production".into()],
            ..Default::default()
        }),
        vo: "atlas".into(),
        queue: "grid".into(),
        host: HOST.into(),
        submitted_at: ts(1_699_999_000),
        ..Default::default()
    };
    Events::new(HOST, "bridge@test").build(
        r,
        Body::JobStarted(proto::JobStarted {
            job: Some(job),
            started_at: ts(1_700_000_000),
        }),
    )
}

fn vm_requested(r: &proto::JobRunRef) -> proto::Event {
    Events::new(HOST, "launcher@test").build(
        r,
        events::vm_requested(proto::VmSpec {
            image: "el9".into(),
            memory_bytes: 2 << 30,
            scratch_bytes: 10 << 30,
            network_mode: proto::NetworkMode::VirtioTap as i32,
            ..events::vm_spec("vm-0123456789ab")
        }),
    )
}

const EL9_SHA256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn image_ready(r: &proto::JobRunRef) -> proto::Event {
    Events::new(HOST, "image@test").build(
        r,
        Body::ImageReady(proto::ImageReady {
            vm_id: "vm-0123456789ab".into(),
            image: "el9".into(),
            sha256: EL9_SHA256.into(),
            ..Default::default()
        }),
    )
}

fn vm_running(r: &proto::JobRunRef) -> proto::Event {
    Events::new(HOST, "launcher@test").build(
        r,
        Body::VmRunning(proto::VmRunning {
            vm_id: "vm-0123456789ab".into(),
            pid: 42,
            accel: "tcg".into(),
            started_at: ts(1_700_000_010),
        }),
    )
}

fn vm_stopped(r: &proto::JobRunRef, exit_code: i32) -> proto::Event {
    Events::new(HOST, "launcher@test").build(
        r,
        proto::VmStopped {
            exit_code,
            usage: Some(proto::VmUsage {
                cpu_user_seconds: 10.0,
                cpu_system_seconds: 2.5,
                ..vm_usage(12.5, 256 << 20, Duration::from_secs(30), 2)
            }),
            stopped_at: ts(1_700_000_040),
            ..events::vm_stopped("vm-0123456789ab")
        },
    )
}

fn job_finished(r: &proto::JobRunRef, exit_code: i32) -> proto::Event {
    Events::new(HOST, "bridge@test").build(
        r,
        Body::JobFinished(proto::JobFinished {
            run: Some(r.clone()),
            exit_code,
            finished_at: ts(1_700_000_050),
        }),
    )
}

async fn all_records(db: &StoreUrl) -> Vec<records::UsageRecord> {
    let pool = records::open_read_only(db).await.unwrap();
    let recs = records::list(&pool).await.unwrap();
    pool.close().await;
    recs
}

async fn wait_record(
    db: &StoreUrl,
    what: &str,
    pred: impl Fn(&records::UsageRecord) -> bool,
) -> records::UsageRecord {
    wait_until(WAIT, what, || async {
        all_records(db).await.into_iter().find(|r| pred(r))
    })
    .await
    .unwrap()
}

/// Every event on `filter` in the stream, read with an ordered consumer until it is idle.
async fn events_on(bus: &Bus, filter: &str) -> Vec<proto::Event> {
    let mut stored = stored_messages(bus, filter).await.unwrap();
    let mut out = Vec::new();
    while let Some(ev) = stored.next_event(Duration::from_millis(500)).await.unwrap() {
        out.push(ev);
    }
    out
}

/// The test's store: SQLite in `dir`, or the PostgreSQL database `pg` names.
fn store_url(pg: Option<String>, dir: &tempfile::TempDir) -> StoreUrl {
    match pg {
        None => StoreUrl::Sqlite(dir.path().join("accounting.db")),
        Some(url) => StoreUrl::Postgres(url),
    }
}

wnodes_testkit::on_both_stores!(
    vm_stopped_writes_one_record_and_publishes_usage_recorded,
    redelivery_after_restart_and_new_message_ids_keep_one_record,
    job_finished_before_or_after_vm_stopped_enriches_the_record,
    vm_stopped_before_job_started_is_recorded_and_filled_in,
    a_run_whose_vm_failed_gets_no_record_and_is_counted,
    impossible_usage_events_are_dead_lettered_with_the_reason_and_never_stored,
    batches_write_what_one_message_at_a_time_writes,
);

/// Waits until the accounting consumer has acked everything in the stream for it.
async fn wait_caught_up(bus: &Bus) {
    wnodes_testkit::bus::wait_caught_up(bus, Accounting::NAME, WAIT)
        .await
        .unwrap();
}

async fn vm_stopped_writes_one_record_and_publishes_usage_recorded(pg: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let db = store_url(pg, &dir);
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let svc = start(&bus, &db).await;
    let r = run("1001.0");
    for ev in [
        job_started(&r),
        vm_requested(&r),
        image_ready(&r),
        vm_running(&r),
    ] {
        bus.publish(&ev).await.unwrap();
    }
    // As in a real run, the VM stops after all that was handled (handlers of one consumer run
    // concurrently: a stop handled first would publish a record without them; the store gets
    // them later, the event does not).
    wait_caught_up(&bus).await;
    bus.publish(&vm_stopped(&r, 3)).await.unwrap();
    let rec = wait_record(&db, "the usage record", |_| true).await;
    assert_eq!(rec.run_key, "INFN-T1/htcondor/1001.0/1");
    assert_eq!(
        (
            rec.vo.as_str(),
            rec.user_name.as_str(),
            rec.x509_dn.as_str()
        ),
        ("atlas", "alice", "/C=IT/O=INFN/CN=Alice")
    );
    assert_eq!(rec.fqans, r#"["/atlas/Role=production"]"#);
    assert_eq!((rec.cores, rec.exit_code, rec.lrms_exit_code), (2, 3, None));
    assert!((rec.cpu_seconds - 12.5).abs() < 1e-9);
    assert!((rec.wall_seconds - 30.0).abs() < 1e-9);
    assert_eq!(rec.peak_memory_bytes, 256 << 20);
    assert_eq!(rec.started_ms, Some(1_700_000_010_000));
    assert_eq!(rec.stopped_ms, Some(1_700_000_040_000));
    assert_eq!(rec.host, HOST);
    // What the VM was given, its image's digest, the job's submit time, the host's benchmark.
    assert_eq!(
        (rec.image.as_str(), rec.image_sha256.as_str()),
        ("el9", EL9_SHA256)
    );
    assert_eq!(
        (rec.memory_bytes, rec.scratch_bytes),
        (Some(2 << 30), Some(10 << 30))
    );
    assert_eq!(rec.network_mode, "virtio_tap");
    assert_eq!(rec.submitted_ms, Some(1_699_999_000_000));
    assert_eq!(
        (rec.cpu_user_seconds, rec.cpu_system_seconds),
        (Some(10.0), Some(2.5))
    );
    assert_eq!(
        (rec.benchmark_kind.as_str(), rec.benchmark_per_core),
        ("hepscore23", Some(18.5))
    );

    let filter = subject::event_filter(None, "usage.recorded").unwrap();
    let evs = wait_until(WAIT, "UsageRecorded", || async {
        let evs = events_on(&bus, &filter).await;
        (!evs.is_empty()).then_some(evs)
    })
    .await
    .unwrap();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].id, "usage.recorded:INFN-T1/htcondor/1001.0/1");
    let Some(Body::UsageRecorded(u)) = &evs[0].body else {
        panic!("not a UsageRecorded: {:?}", evs[0]);
    };
    assert_eq!(u.record_id, "INFN-T1/htcondor/1001.0/1");
    assert_eq!(
        (u.vo.as_str(), u.user.as_str(), u.exit_code),
        ("atlas", "alice", 3)
    );
    assert_eq!(u.usage.as_ref().map(|u| u.cores), Some(2));
    // The whole record, as stored.
    let r = u.record.as_ref().expect("the event carries the record");
    assert_eq!(r.run_key, rec.run_key);
    assert_eq!(
        (
            r.site.as_str(),
            r.lrms.as_str(),
            r.job_id.as_str(),
            r.run_attempt
        ),
        ("INFN-T1", "htcondor", "1001.0", 1)
    );
    assert_eq!(
        (r.vo.as_str(), r.vo_group.as_str(), r.vo_role.as_str()),
        ("atlas", "/atlas", "Role=production")
    );
    assert_eq!(r.voms_fqans, ["/atlas/Role=production"]);
    assert_eq!((r.uid, r.gid), (Some(1000), Some(100)));
    assert_eq!((r.user.as_str(), r.queue.as_str()), ("alice", "grid"));
    assert_eq!((r.cores, r.exit_code, r.lrms_exit_code), (2, 3, None));
    assert_eq!(r.cpu_seconds, rec.cpu_seconds);
    assert_eq!(r.wall_seconds, rec.wall_seconds);
    assert_eq!(r.peak_memory_bytes, 256 << 20);
    assert_eq!(
        r.started_at.as_ref().map(wnodes_proto::time::timestamp_ms),
        rec.started_ms
    );
    assert_eq!(
        r.stopped_at.as_ref().map(wnodes_proto::time::timestamp_ms),
        rec.stopped_ms
    );
    assert_eq!(
        r.recorded_at.as_ref().map(wnodes_proto::time::timestamp_ms),
        Some(rec.recorded_ms)
    );
    assert_eq!(
        (r.host.as_str(), r.vm_id.as_str()),
        (HOST, rec.vm_id.as_str())
    );
    assert_eq!(
        (r.image.as_str(), r.image_sha256.as_str()),
        ("el9", EL9_SHA256)
    );
    assert_eq!((r.memory_bytes, r.scratch_bytes), (2 << 30, 10 << 30));
    assert_eq!(r.network_mode, "virtio_tap");
    assert_eq!(
        (r.cpu_user_seconds, r.cpu_system_seconds),
        (Some(10.0), Some(2.5))
    );
    assert_eq!(
        r.submitted_at
            .as_ref()
            .map(wnodes_proto::time::timestamp_ms),
        rec.submitted_ms
    );
    assert_eq!(
        (r.benchmark_kind.as_str(), r.benchmark_per_core),
        ("hepscore23", 18.5)
    );
    svc.stop().await;
}

async fn redelivery_after_restart_and_new_message_ids_keep_one_record(pg: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let db = store_url(pg, &dir);
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let svc = start(&bus, &db).await;
    let r = run("2002.0");
    let stopped = vm_stopped(&r, 0);
    for ev in [job_started(&r), vm_running(&r), stopped.clone()] {
        bus.publish(&ev).await.unwrap();
    }
    let first = wait_record(&db, "the usage record", |_| true).await;
    wait_caught_up(&bus).await;
    svc.stop().await;

    // Restart on the same state: the durable consumer is recreated from scratch, so every
    // event (VmStopped included) is delivered again.
    let stream = bus
        .jetstream()
        .get_stream(subject::EVENTS_STREAM)
        .await
        .unwrap();
    stream.delete_consumer(Accounting::NAME).await.unwrap();
    let svc = start(&bus, &db).await;

    // The same VmStopped republished with another Nats-Msg-Id (JetStream stores it again).
    let duplicate = wnodes_testkit::bus::publish_again(&bus, &stopped, "republished-by-hand-1")
        .await
        .unwrap();
    assert!(!duplicate);

    // A VmStopped for the same run under another event id (a producer bug): the handler runs,
    // and the run key (the PRIMARY KEY) still refuses a second record.
    let mut other = vm_stopped(&r, 99);
    other.id = format!("{}#again", other.id);
    bus.publish(&other).await.unwrap();

    wait_caught_up(&bus).await;
    let recs = all_records(&db).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0], first);
    let usage = events_on(
        &bus,
        &subject::event_filter(None, "usage.recorded").unwrap(),
    )
    .await;
    assert_eq!(usage.len(), 1, "{usage:?}");
    svc.stop().await;
}

async fn job_finished_before_or_after_vm_stopped_enriches_the_record(pg: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let db = store_url(pg, &dir);
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let svc = start(&bus, &db).await;

    let before = run("3003.0");
    for ev in [
        job_started(&before),
        vm_running(&before),
        job_finished(&before, 7),
        vm_stopped(&before, 7),
    ] {
        bus.publish(&ev).await.unwrap();
    }
    let rec = wait_record(&db, "record of the run finished first", |r| {
        r.job_id == "3003.0"
    })
    .await;
    assert_eq!(rec.lrms_exit_code, Some(7));

    let after = run("4004.0");
    for ev in [
        job_started(&after),
        vm_running(&after),
        vm_stopped(&after, 9),
    ] {
        bus.publish(&ev).await.unwrap();
    }
    let rec = wait_record(&db, "record of the run stopped first", |r| {
        r.job_id == "4004.0"
    })
    .await;
    assert_eq!(rec.lrms_exit_code, None);
    bus.publish(&job_finished(&after, 9)).await.unwrap();
    wait_record(&db, "the LRMS exit code on the record", |r| {
        r.job_id == "4004.0" && r.lrms_exit_code == Some(9)
    })
    .await;
    svc.stop().await;
}

async fn vm_stopped_before_job_started_is_recorded_and_filled_in(pg: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let db = store_url(pg, &dir);
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let svc = start(&bus, &db).await;
    let r = run("5005.0");
    // No JobStarted yet: the handler waits a few attempts, then records without identity.
    bus.publish(&vm_stopped(&r, 1)).await.unwrap();
    let rec = wait_record(&db, "the record without identity", |_| true).await;
    assert_eq!(rec.vo, "");
    assert_eq!((rec.image.as_str(), rec.memory_bytes), ("", None));
    // Everything the record lacked, late: the identity, what the VM was given, its image.
    for ev in [job_started(&r), vm_requested(&r), image_ready(&r)] {
        bus.publish(&ev).await.unwrap();
    }
    wait_record(&db, "the identity and the VM's details filled in", |r| {
        r.vo == "atlas"
            && r.user_name == "alice"
            && r.image == "el9"
            && r.image_sha256 == EL9_SHA256
            && r.memory_bytes == Some(2 << 30)
            && r.submitted_ms == Some(1_699_999_000_000)
    })
    .await;
    let recs = all_records(&db).await;
    assert_eq!(recs.len(), 1);
    svc.stop().await;
}

async fn a_run_whose_vm_failed_gets_no_record_and_is_counted(pg: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let db = store_url(pg, &dir);
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let metrics = Metrics::default();
    let svc = start_with(&bus, &db, metrics.clone()).await;
    let failed = run("6006.0");
    let ok = run("6007.0");
    bus.publish(&job_started(&failed)).await.unwrap();
    bus.publish(&Events::new(HOST, "launcher@test").build(
        &failed,
        vm_failed(
            "vm-0123456789ab",
            "policy",
            "no image configured for VO 'lhcb'",
        ),
    ))
    .await
    .unwrap();
    bus.publish(&job_finished(&failed, 125)).await.unwrap();
    for ev in [job_started(&ok), vm_running(&ok), vm_stopped(&ok, 0)] {
        bus.publish(&ev).await.unwrap();
    }
    wait_record(&db, "the record of the run that ran", |r| {
        r.job_id == "6007.0"
    })
    .await;
    wait_caught_up(&bus).await;
    let recs = all_records(&db).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(metrics.vm_failed("policy"), 1);
    assert_eq!(metrics.records(), 1);
    svc.stop().await;
}

/// Records survive a PostgreSQL restart during ingest: the server of a private cluster is
/// stopped (fast shutdown: every connection cut) while runs are being published and started
/// again; every run ends with exactly one record, the sums exact, and one `UsageRecorded` per run.
#[tokio::test(flavor = "multi_thread")]
async fn records_survive_a_postgres_restart_during_ingest() {
    const RUNS: usize = 60;
    let cluster = wnodes_testkit::postgres::Cluster::start();
    let db = StoreUrl::Postgres(
        wnodes_testkit::postgres::create_database(cluster.url())
            .await
            .url,
    );
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    // Enough attempts to outlast the outage: a message is never dead-lettered for it.
    let tuning = ConsumerTuning {
        max_attempts: 1000,
        ..tuning()
    };
    let svc = start_tuned(&bus, &db, Metrics::default(), tuning).await;
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for i in 0..RUNS {
                let r = run(&format!("{}.0", 7000 + i));
                for ev in [job_started(&r), vm_running(&r), vm_stopped(&r, 0)] {
                    bus.publish(&ev).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    // Some records are in before the outage...
    wait_until(WAIT, "the first records", || async {
        (all_records(&db).await.len() >= 5).then_some(())
    })
    .await
    .unwrap();
    cluster.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.resume();
    publisher.await.unwrap();
    // ... and every one after it. (A record written before its job.started, which the outage
    // can delay past the handler's wait, gets its identity when that comes: read once caught up.)
    wait_until(Duration::from_secs(60), "every run's record", || async {
        (all_records(&db).await.len() >= RUNS).then_some(())
    })
    .await
    .unwrap();
    wait_caught_up(&bus).await;
    let recs = all_records(&db).await;
    assert_eq!(recs.len(), RUNS, "exactly one record per run");
    let cpu: f64 = recs.iter().map(|r| r.cpu_seconds).sum();
    assert!((cpu - 12.5 * RUNS as f64).abs() < 1e-6, "cpu sum {cpu}");
    assert!(
        recs.iter().all(|r| r.vo == "atlas"),
        "identity on every record"
    );
    let usage = events_on(
        &bus,
        &subject::event_filter(None, "usage.recorded").unwrap(),
    )
    .await;
    assert_eq!(usage.len(), RUNS, "one UsageRecorded per run");
    svc.stop().await;
}

/// A usage event with impossible values goes to the dead-letter stream with the reason, and
/// nothing of it is stored: a VM that stopped before it started, negative CPU time, a run
/// without a job id.
async fn impossible_usage_events_are_dead_lettered_with_the_reason_and_never_stored(
    pg: Option<String>,
) {
    let dir = tempfile::tempdir().unwrap();
    let db = store_url(pg, &dir);
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let svc = start(&bus, &db).await;
    let backwards = run("8001.0");
    let mut stopped_early = vm_stopped(&backwards, 0);
    if let Some(Body::VmStopped(s)) = &mut stopped_early.body {
        s.stopped_at = ts(1_700_000_005); // vm_running says it started at 1_700_000_010
    }
    let negative = run("8002.0");
    let mut negative_cpu = vm_stopped(&negative, 0);
    if let Some(Body::VmStopped(s)) = &mut negative_cpu.body {
        s.usage = Some(vm_usage(-3.0, 1 << 20, Duration::from_secs(30), 2));
    }
    let nameless = run("");
    let fine = run("8004.0");
    // The VM's start is stored before its stop arrives (handlers of one consumer run
    // concurrently: a stop handled first could not be known to be early).
    for ev in [job_started(&backwards), vm_running(&backwards)] {
        bus.publish(&ev).await.unwrap();
    }
    wait_caught_up(&bus).await;
    for ev in [
        stopped_early,
        job_started(&negative),
        negative_cpu,
        vm_stopped(&nameless, 0),
        job_started(&fine),
        vm_running(&fine),
        vm_stopped(&fine, 0),
    ] {
        bus.publish(&ev).await.unwrap();
    }
    wait_record(&db, "the record of the sound run", |r| r.job_id == "8004.0").await;
    let letters = wait_until(WAIT, "three dead letters", || async {
        let l = wnodes_bus::dlq::read_all(&bus, Some(Accounting::NAME))
            .await
            .ok()?;
        (l.len() >= 3).then_some(l)
    })
    .await
    .unwrap();
    wait_caught_up(&bus).await;
    assert_eq!(letters.len(), 3, "{letters:?}");
    let errors: Vec<&str> = letters.iter().map(|l| l.error.as_str()).collect();
    for (what, needle) in [
        ("end before start", "before it started"),
        ("negative CPU", "CPU time -3 s"),
        ("no job id", "its run has no job id"),
    ] {
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "{what}: no dead letter says {needle:?}: {errors:?}"
        );
    }
    assert!(
        letters.iter().all(|l| l.reason == "rejected"),
        "{letters:?}"
    );
    let recs = all_records(&db).await;
    assert_eq!(recs.len(), 1, "only the sound run is recorded: {recs:?}");
    assert_eq!(recs[0].job_id, "8004.0");
    let usage = events_on(
        &bus,
        &subject::event_filter(None, "usage.recorded").unwrap(),
    )
    .await;
    assert_eq!(usage.len(), 1, "{usage:?}");
    svc.stop().await;
}

fn traffic(i: usize) -> proto::GatewayTraffic {
    proto::GatewayTraffic {
        to_vm_bytes: 1_000_000 + i as u64,
        from_vm_bytes: 2_000_000 + i as u64,
    }
}

fn released(
    r: &proto::JobRunRef,
    kind: proto::ResourceKind,
    traffic: Option<proto::GatewayTraffic>,
) -> proto::Event {
    Events::new(HOST, "gateway@test").build(
        r,
        Body::ResourceReleased(proto::ResourceReleased {
            vm_id: "vm-0123456789ab".into(),
            kind: kind as i32,
            detail: "released".into(),
            traffic,
        }),
    )
}

/// The events of `runs` runs, in an order that exercises every path: runs whose VM stopped
/// before their job started, `job.finished` before and after `vm.stopped`, a `vm.stopped`
/// republished under a new event id, and one impossible event (negative CPU time).
fn mixed_events(runs: usize) -> Vec<proto::Event> {
    let mut evs = Vec::new();
    for i in 0..runs {
        let r = run(&format!("9{i:03}.0"));
        let mut stopped = vm_stopped(&r, i32::try_from(i % 3).unwrap());
        if let Some(Body::VmStopped(s)) = &mut stopped.body {
            s.usage = Some(vm_usage(
                i as f64 + 0.5,
                (i as u64 + 1) << 20,
                Duration::from_secs(60 + i as u64),
                2,
            ));
        }
        let (started, requested, ready, running) = (
            job_started(&r),
            vm_requested(&r),
            image_ready(&r),
            vm_running(&r),
        );
        let finished = job_finished(&r, i32::try_from(i % 5).unwrap());
        // The gateway's release: what it carried (unknown for every fifth run: a gateway
        // restarted during the job), and the scratch release, which carries nothing.
        let storage = released(
            &r,
            proto::ResourceKind::Storage,
            (i % 5 != 4).then(|| traffic(i)),
        );
        let scratch = released(&r, proto::ResourceKind::Scratch, None);
        evs.push(scratch);
        if i % 2 == 0 {
            evs.push(storage.clone()); // before the record is written
        }
        match i % 4 {
            // In order.
            0 => evs.extend([started, requested, ready, running, stopped, finished]),
            // The stop and the finish first, the job's identity last.
            1 => evs.extend([stopped, finished, running, requested, ready, started]),
            // The finish before the stop.
            2 => evs.extend([started, running, finished, requested, ready, stopped]),
            // The stop twice: once more under another event id.
            _ => {
                let mut again = stopped.clone();
                again.id = format!("{}#again", again.id);
                evs.extend([started, requested, ready, running, stopped, again, finished]);
            }
        }
        if i % 2 == 1 {
            evs.push(storage); // after it
        }
    }
    let bad = run("9999.0");
    let mut negative = vm_stopped(&bad, 0);
    if let Some(Body::VmStopped(s)) = &mut negative.body {
        s.usage = Some(vm_usage(-1.0, 1 << 20, Duration::from_secs(30), 2));
    }
    evs.insert(evs.len() / 2, negative);
    evs
}

/// Ingests `evs` (all published before the consumer starts, so they are at hand together) into
/// a fresh store; returns the records and the consumer's (batches, messages in them).
async fn ingest_all(
    db: &StoreUrl,
    evs: &[proto::Event],
    max_batch: usize,
) -> (Vec<records::UsageRecord>, (u64, u64)) {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").try_init();
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    bus.publish_pipelined(evs, 64).await.unwrap();
    let tuning = ConsumerTuning {
        max_batch,
        ..tuning()
    };
    let svc = start_tuned(&bus, db, Metrics::default(), tuning).await;
    wait_caught_up(&bus).await;
    svc.stop().await;
    let letters = wnodes_bus::dlq::read_all(&bus, Some(Accounting::NAME))
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "the negative CPU time only: {letters:?}");
    assert!(letters[0].error.contains("CPU time -1 s"), "{letters:?}");
    let mut recs = all_records(db).await;
    recs.sort_by(|a, b| a.run_key.cmp(&b.run_key));
    for r in &mut recs {
        r.recorded_ms = 0; // when it was written, the one column that differs
    }
    (recs, bus.metrics().batch_counts(Accounting::NAME))
}

/// The same events, handled in batches (every message at hand, up to 256) and one message at
/// a time, leave the same records: set-based statements write what the per-event ones do,
/// whatever the order of a run's events.
async fn batches_write_what_one_message_at_a_time_writes(pg: Option<String>) {
    let evs = mixed_events(40);
    let (one_dir, many_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let one_db = match &pg {
        Some(_) => StoreUrl::Postgres(wnodes_testkit::postgres::database().await.url),
        None => store_url(None, &one_dir),
    };
    let many_db = store_url(pg, &many_dir);
    let (alone, (batches, in_batches)) = ingest_all(&one_db, &evs, 1).await;
    assert_eq!(batches, in_batches, "max_batch = 1: batches of one message");
    let (batched, (batches, in_batches)) = ingest_all(&many_db, &evs, 256).await;
    assert!(
        in_batches >= 2 * batches,
        "the events were at hand together: {in_batches} messages in {batches} batches"
    );
    assert_eq!(alone.len(), 40, "{alone:?}");
    for (a, b) in alone.iter().zip(&batched) {
        assert_eq!(a, b);
    }
    assert_eq!(alone.len(), batched.len());
    // Complete records: the identity, the image, the LRMS exit code and the gateway's
    // traffic (when it was counted) of every run.
    for r in &batched {
        assert_eq!(r.vo, "atlas", "{r:?}");
        assert_eq!(r.image_sha256, EL9_SHA256, "{r:?}");
        assert!(r.lrms_exit_code.is_some(), "{r:?}");
        let i: usize = r.job_id[1..4].parse().unwrap();
        let expected = (i % 5 != 4).then(|| traffic(i));
        assert_eq!(
            (r.gateway_bytes_to_vm, r.gateway_bytes_from_vm),
            (
                expected.map(|t| t.to_vm_bytes as i64),
                expected.map(|t| t.from_vm_bytes as i64)
            ),
            "{r:?}"
        );
    }
}

/// What the "Usage recorded." lines at info said: (the `records` or one `run` of each line).
#[derive(Clone, Default)]
struct RecordedLines(Arc<parking_lot::Mutex<Vec<u64>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RecordedLines {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            message: String,
            records: Option<u64>,
            run: bool,
        }
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                match f.name() {
                    "message" => self.message = format!("{v:?}"),
                    "run" => self.run = true,
                    _ => {}
                }
            }
            fn record_u64(&mut self, f: &tracing::field::Field, v: u64) {
                if f.name() == "records" {
                    self.records = Some(v);
                }
            }
        }
        if *event.metadata().level() != tracing::Level::INFO {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.message == "Usage recorded." {
            self.0
                .lock()
                .push(fields.records.unwrap_or(u64::from(fields.run)));
        }
    }
}

/// A batch logs its records in one line at info (a line per record would be most of the log at
/// ingest rates, and more events than a span keeps), and the lines count every record.
#[tokio::test]
async fn a_batch_logs_its_records_in_one_line() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let lines = RecordedLines::default();
    // This test's runtime has one thread: the consumer's tasks log through this subscriber.
    let _default =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(lines.clone()));
    let dir = tempfile::tempdir().unwrap();
    let (recs, (batches, _)) = ingest_all(&store_url(None, &dir), &mixed_events(40), 256).await;
    let lines = lines.0.lock().clone();
    assert_eq!(
        lines.iter().sum::<u64>(),
        recs.len() as u64,
        "the lines count every record once: {lines:?}"
    );
    assert!(
        lines.len() < recs.len() && lines.len() as u64 <= batches,
        "at most a line per batch ({batches} batches, {} records): {lines:?}",
        recs.len()
    );
}
