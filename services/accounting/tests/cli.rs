//! The `wnodes-accounting` binary: `serve` records usage, `records --json` prints it, SIGTERM
//! stops the service cleanly.

// Helpers outside `#[test]` functions are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use wnodes_bus::{proto, proto::event::Body};
use wnodes_testkit::{
    NatsServer, ServiceProcess,
    bus::connect,
    events::{Events, RunRefExt, run, vm_stopped, vm_usage},
    process::ProcessBuilder,
    wait_until,
};

const HOST: &str = "hv1.example.org";

/// `wnodes-accounting` configured by environment, its state in `state`.
async fn accounting(nats: &NatsServer, state: &std::path::Path) -> ProcessBuilder {
    let identity = nats
        .identity(&wnodes_bus::roles::ACCOUNTING, "")
        .await
        .unwrap();
    ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-accounting"), state).runtime_env(
        &identity,
        "INFN-T1",
        "central.example.org",
        state,
    )
}

/// [`accounting`] with a quick consumer (its durable provisioned to match): a message a killed
/// process held is redelivered after 3 s, not 30.
async fn quick_accounting(nats: &NatsServer, state: &std::path::Path) -> ProcessBuilder {
    let tuning = wnodes_bus::ConsumerTuning {
        ack_wait: Duration::from_secs(3),
        handler_timeout: Duration::from_secs(2),
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_millis(300),
        ..Default::default()
    };
    let identity = nats
        .identity_tuned(&wnodes_bus::roles::ACCOUNTING, "", &tuning)
        .await
        .unwrap();
    ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-accounting"), state)
        .runtime_env(&identity, "INFN-T1", "central.example.org", state)
        .wnodes_env("CONSUMER__ACK_WAIT", "3s")
        .wnodes_env("CONSUMER__HANDLER_TIMEOUT", "2s")
        .wnodes_env("CONSUMER__BACKOFF_BASE", "100ms")
        .wnodes_env("CONSUMER__BACKOFF_MAX", "300ms")
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_records_usage_and_records_prints_it() {
    let nats = NatsServer::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut service = accounting(&nats, state.path())
        .await
        .arg("serve")
        .spawn()
        .unwrap();

    let bus = connect(&nats.admin(), "test@hv1.example.org")
        .await
        .unwrap();
    let run = run("31337")
        .site("INFN-T1")
        .lrms(proto::Lrms::Lsf)
        .attempt(2);
    let job = proto::JobDescription {
        run: Some(run.clone()),
        vo: "cms".into(),
        owner: Some(proto::JobOwner {
            user: "bob".into(),
            uid: 1001,
            gid: 1001,
        }),
        host: HOST.into(),
        ..Default::default()
    };
    for body in [
        Body::JobStarted(proto::JobStarted {
            job: Some(job),
            started_at: None,
        }),
        Body::VmStopped(proto::VmStopped {
            exit_code: 0,
            usage: Some(vm_usage(1.5, 1 << 20, Duration::from_secs(2), 1)),
            ..vm_stopped("vm-0123456789ab")
        }),
    ] {
        bus.publish(&Events::new(HOST, "test").build(&run, body))
            .await
            .unwrap();
    }

    let line = wait_until(
        Duration::from_secs(30),
        "the record in `records --json`",
        || async {
            let out = accounting(&nats, state.path())
                .await
                .arg("records")
                .arg("--json")
                .output()
                .await
                .ok()?;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            (out.status.success() && !stdout.is_empty()).then_some(stdout)
        },
    )
    .await
    .unwrap();
    let rec: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(rec["run_key"], "INFN-T1/lsf/31337/2");
    assert_eq!(rec["vo"], "cms");
    assert_eq!(rec["user_name"], "bob");
    assert_eq!(rec["cpu_seconds"], 1.5);

    let table = accounting(&nats, state.path())
        .await
        .arg("records")
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.starts_with("RUN"), "{table}");
    assert!(table.contains("INFN-T1/lsf/31337/2"), "{table}");

    let status = service.terminate(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", service.stderr());
}

/// The service killed between committing a record and acking its event (the bus's
/// `after-commit` failpoint aborts the process there): started again, it finds the event's key,
/// republishes the `UsageRecorded` it had staged and acks; one record, one `UsageRecorded`. On
/// both stores: `<test>::sqlite`, `<test>::postgres`.
async fn killed_between_storing_and_acking_records_once(store: Option<String>) {
    let nats = NatsServer::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let with_store = |b: ProcessBuilder| match &store {
        Some(url) => b.wnodes_env("ACCOUNTING__DATABASE", url.as_str()),
        None => b,
    };
    let mut crashing = with_store(quick_accounting(&nats, state.path()).await)
        .env("WNODES_FAILPOINT", "after-commit")
        .arg("serve")
        .spawn()
        .unwrap();
    let bus = connect(&nats.admin(), "test@hv1.example.org")
        .await
        .unwrap();
    let run = run("4242").site("INFN-T1");
    let events = Events::new(HOST, "test");
    // vm.stopped alone: after its waits for job.started, the record is written without the
    // job's identity, committed, and the process aborts before publishing or acking.
    bus.publish(&events.build(
        &run,
        Body::VmStopped(proto::VmStopped {
            exit_code: 0,
            usage: Some(vm_usage(4.0, 1 << 20, Duration::from_secs(5), 1)),
            ..vm_stopped("vm-0123456789ab")
        }),
    ))
    .await
    .unwrap();
    let status = crashing.wait_exit(Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(6),
        "the failpoint aborts: {}",
        crashing.stderr()
    );
    let filter = wnodes_bus::subject::event_filter(None, "usage.recorded").unwrap();
    let usage_events = || async {
        let mut stored = wnodes_testkit::bus::stored_messages(&bus, &filter)
            .await
            .unwrap();
        let mut out = Vec::new();
        while let Some(ev) = stored.next_event(Duration::from_millis(300)).await.unwrap() {
            out.push(ev);
        }
        out
    };
    assert!(
        usage_events().await.is_empty(),
        "nothing published before the crash"
    );
    let records = || async {
        with_store(accounting(&nats, state.path()).await)
            .arg("records")
            .arg("--json")
            .json_lines()
            .await
            .unwrap()
    };
    assert_eq!(
        records().await.len(),
        1,
        "the record committed before the crash"
    );

    let mut service = with_store(quick_accounting(&nats, state.path()).await)
        .arg("serve")
        .spawn()
        .unwrap();
    let published = wait_until(
        Duration::from_secs(30),
        "the staged UsageRecorded",
        || async {
            let evs = usage_events().await;
            (!evs.is_empty()).then_some(evs)
        },
    )
    .await
    .unwrap();
    assert_eq!(published.len(), 1, "{published:?}");
    assert_eq!(published[0].id, "usage.recorded:INFN-T1/htcondor/4242/1");
    // The job's identity, late, fills the record in; still one record.
    let job = proto::JobDescription {
        run: Some(run.clone()),
        vo: "cms".into(),
        owner: Some(proto::JobOwner {
            user: "bob".into(),
            uid: 1001,
            gid: 1001,
        }),
        host: HOST.into(),
        ..Default::default()
    };
    bus.publish(&events.build(
        &run,
        Body::JobStarted(proto::JobStarted {
            job: Some(job),
            started_at: None,
        }),
    ))
    .await
    .unwrap();
    let recs = wait_until(
        Duration::from_secs(30),
        "the identity on the record",
        || async {
            let recs = records().await;
            (recs.iter().any(|r| r["vo"] == "cms")).then_some(recs)
        },
    )
    .await
    .unwrap();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["cpu_seconds"], 4.0);
    assert_eq!(usage_events().await.len(), 1, "one UsageRecorded");
    let status = service.terminate(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", service.stderr());
}

wnodes_testkit::on_both_stores!(killed_between_storing_and_acking_records_once);

/// Accounting's own store (records and keys together) is pruned like every service's key store:
/// started again with a key retention shorter than the keys' age, the service removes the keys
/// and keeps the records. On both stores.
async fn its_own_store_is_pruned_of_old_keys_and_keeps_the_records(store: Option<String>) {
    let nats = NatsServer::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let url: wnodes_accounting::StoreUrl = store
        .clone()
        .unwrap_or_else(|| {
            state
                .path()
                .join("accounting/accounting.db")
                .display()
                .to_string()
        })
        .parse()
        .unwrap();
    let with_store = |b: ProcessBuilder| match &store {
        Some(url) => b.wnodes_env("ACCOUNTING__DATABASE", url.as_str()),
        None => b.wnodes_env(
            "ACCOUNTING__DATABASE",
            state.path().join("accounting/accounting.db"),
        ),
    };
    let mut service = with_store(accounting(&nats, state.path()).await)
        .arg("serve")
        .spawn()
        .unwrap();
    let bus = connect(&nats.admin(), "test@hv1.example.org")
        .await
        .unwrap();
    let run = run("777").site("INFN-T1");
    bus.publish(&Events::new(HOST, "test").build(
        &run,
        Body::VmStopped(proto::VmStopped {
            usage: Some(vm_usage(1.0, 1 << 20, Duration::from_secs(2), 1)),
            ..vm_stopped("vm-0123456789ab")
        }),
    ))
    .await
    .unwrap();
    // Nothing while the service is still creating its tables.
    let records = || async {
        with_store(accounting(&nats, state.path()).await)
            .arg("records")
            .arg("--json")
            .json_lines()
            .await
            .unwrap_or_default()
    };
    wait_until(Duration::from_secs(30), "the record", || async {
        (records().await.len() == 1).then_some(())
    })
    .await
    .unwrap();
    let status = service.terminate(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", service.stderr());
    let keys = || async {
        let pool = wnodes_accounting::apel::open(&url).await.unwrap();
        let n: i64 = wnodes_bus::on_pool!(&pool, |p| {
            sqlx::query_scalar("SELECT COUNT(*) FROM wnodes_processed")
                .fetch_one(p)
                .await
        })
        .unwrap();
        pool.close().await;
        n
    };
    assert!(keys().await >= 1, "the event's key is stored");

    // Keys older than 1 s go at start.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut service = with_store(accounting(&nats, state.path()).await)
        .wnodes_env("CONSUMER__KEY_RETENTION", "1s")
        .arg("serve")
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "the old keys pruned", || async {
        (keys().await == 0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(records().await.len(), 1, "the record stays");
    let status = service.terminate(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", service.stderr());
}

wnodes_testkit::on_both_stores!(its_own_store_is_pruned_of_old_keys_and_keeps_the_records);
