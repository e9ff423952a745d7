//! `wnodes-accounting apel-export` end to end: a database filled through the accounting
//! service's own tables, the binary run as a site runs it, the queue read back and parsed;
//! each job exported once, summaries/cloud/sync again when they change, and a crash at either
//! side of queueing a message (failpoints) neither loses a job nor queues one twice. The export
//! and crash tests run on both stores: `<test>::sqlite` and `<test>::postgres` (a fresh database
//! on the run's cluster, `wnodes_testkit::postgres`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    collections::BTreeMap, os::unix::process::ExitStatusExt, path::PathBuf, process::Output,
};

use wnodes_accounting::{StoreUrl, apel::parse_date};
use wnodes_apel::{OutgoingQueue, message};
use wnodes_bus::{db::Pool, on_pool};

/// A record parsed back: field name → value, nulls as `None`.
type Fields = BTreeMap<String, Option<String>>;

const CONFIG: &str = r#"
site = "INFN-T1"
host = "central.example.org"
[accounting.apel]
submit_host = "ce01.example.org:9619/ce01.example.org-condor"
[accounting.apel.benchmark]
kind = "hepspec06"
per_core = 10.0
"#;

struct Site {
    dir: tempfile::TempDir,
    store: StoreUrl,
}

impl Site {
    /// A site on SQLite.
    async fn new() -> Self {
        Self::on(None).await
    }

    /// A site on SQLite (`None`) or on the PostgreSQL database `pg` names.
    async fn on(pg: Option<String>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("wnodes.toml"), CONFIG).unwrap();
        let store = match pg {
            None => StoreUrl::Sqlite(dir.path().join("accounting.db")),
            Some(url) => StoreUrl::Postgres(url),
        };
        // The service's own tables, as `serve` creates them.
        drop(wnodes_accounting::open_store(&store).await.unwrap());
        Self { dir, store }
    }

    async fn pool(&self) -> Pool {
        wnodes_accounting::apel::open(&self.store).await.unwrap()
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("outgoing")
    }

    /// One usage record, as the handler writes it: 2 cores, 1 h wall, 1.5 h CPU, 2 GiB peak.
    async fn record(&self, job_id: &str, stopped: &str) {
        self.insert(job_id, stopped, "atlas", "pilatl001").await;
    }

    async fn insert(&self, job_id: &str, stopped: &str, vo: &str, user: &str) {
        let stopped_ms = at(stopped);
        let pool = self.pool().await;
        on_pool!(&pool, |p| sqlx::query(
            "INSERT INTO usage_records (run_key, site, lrms, job_id, run_attempt, host, vm_id, vo,
                user_name, uid, gid, x509_dn, fqans, queue, cores, cpu_seconds, peak_memory_bytes,
                wall_seconds, exit_code, lrms_exit_code, stop_reason, started_ms, stopped_ms,
                recorded_ms)
             VALUES ($1, 'INFN-T1', 'htcondor', $2, 1, 'hv1.example.org', $3, $4, $5,
                41200, 1307, '/DC=ch/CN=pilot', '[\"/atlas/Role=production/Capability=NULL\"]',
                'atlas', 2, 5400.0, 2147483648, 3600.0, 0, 0, 'guest_poweroff', $6, $7, $8)",
        )
        .bind(format!("INFN-T1/htcondor/{job_id}/1"))
        .bind(job_id)
        .bind(format!("vm-{job_id:0>12}"))
        .bind(vo)
        .bind(user)
        .bind(stopped_ms - 3_600_000)
        .bind(stopped_ms)
        .bind(stopped_ms + 1000)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))
        .unwrap();
        pool.close().await;
    }

    fn export(&self, args: &[&str], failpoint: Option<&str>) -> Output {
        let db = String::from(self.store.clone());
        let out = self.out();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wnodes-accounting"));
        cmd.env("WNODES_CONFIG", self.dir.path().join("wnodes.toml"))
            .env("WNODES_STATE_DIR", self.dir.path())
            .env_remove("WNODES_FAILPOINT")
            .args(["apel-export", "--store", &db, "--out"])
            .arg(&out)
            .args(args);
        if let Some(f) = failpoint {
            cmd.env("WNODES_FAILPOINT", f);
        }
        cmd.output().unwrap()
    }

    fn export_ok(&self, args: &[&str]) -> String {
        let o = self.export(args, None);
        assert!(
            o.status.success(),
            "apel-export {args:?}: {:?}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Every message in the queue: (header, records as field maps), in queue order.
    fn queue(&self) -> Vec<(String, Vec<Fields>)> {
        let q = OutgoingQueue::open(&self.out()).unwrap();
        q.elements()
            .unwrap()
            .iter()
            .map(|e| {
                let text = std::fs::read_to_string(self.out().join(e)).unwrap();
                let p = message::parse(&text).unwrap();
                (p.header, p.records.iter().map(|r| r.to_map()).collect())
            })
            .collect()
    }

    fn records_of(&self, header: &str) -> Vec<Fields> {
        self.queue()
            .into_iter()
            .filter(|(h, _)| h == header)
            .flat_map(|(_, r)| r)
            .collect()
    }

    fn job_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .records_of("APEL-individual-job-message")
            .iter()
            .map(|r| r["LocalJobId"].clone().unwrap())
            .collect();
        ids.sort();
        ids
    }

    async fn exported(&self, kind: &str) -> Vec<String> {
        let pool = self.pool().await;
        let rows: Vec<(String,)> = on_pool!(&pool, |p| {
            sqlx::query_as("SELECT run_key FROM apel_exported WHERE kind = $1 ORDER BY run_key")
                .bind(kind)
                .fetch_all(p)
                .await
        })
        .unwrap();
        pool.close().await;
        rows.into_iter().map(|(k,)| k).collect()
    }
}

wnodes_testkit::on_both_stores!(
    apel_export_writes_every_kind_then_only_what_changed,
    a_crash_after_queueing_never_queues_a_job_twice,
    a_crash_after_queueing_is_settled_even_once_ssmsend_took_the_message,
    a_crash_before_queueing_loses_no_job,
    a_crash_before_queueing_a_summary_sends_it_on_the_next_run,
);

/// `YYYY-MM-DDTHH` (UTC) as Unix milliseconds.
fn at(s: &str) -> i64 {
    let (day, hour) = s.split_once('T').unwrap();
    parse_date(day).unwrap() + hour.parse::<i64>().unwrap() * 3_600_000
}

fn field<'a>(r: &'a Fields, k: &str) -> &'a str {
    r[k].as_deref().unwrap_or("None")
}

async fn apel_export_writes_every_kind_then_only_what_changed(pg: Option<String>) {
    let site = Site::on(pg).await;
    site.record("101", "2026-11-03T12").await;
    site.record("102", "2026-11-10T12").await;
    site.record("103", "2026-11-20T12").await; // after the period, same month
    site.record("104", "2026-10-31T23").await; // the month before
    let period = ["--from", "2026-11-01", "--to", "2026-11-15"];

    let stdout = site.export_ok(&period);
    assert!(
        stdout.contains("job: 2 records in 1 messages, 0 unchanged"),
        "{stdout}"
    );
    assert_eq!(site.job_ids(), ["101", "102"]);
    let job = &site.records_of("APEL-individual-job-message")[0];
    for (k, v) in [
        ("Site", "INFN-T1"),
        (
            "SubmitHost",
            "ce01.example.org:9619/ce01.example.org-condor",
        ),
        ("MachineName", "hv1.example.org"),
        ("VO", "atlas"),
        ("VOGroup", "/atlas"),
        ("VORole", "Role=production"),
        ("WallDuration", "3600"),
        ("CpuDuration", "5400"),
        ("Processors", "2"),
        ("StartTime", &(at("2026-11-03T11") / 1000).to_string()),
        ("EndTime", &(at("2026-11-03T12") / 1000).to_string()),
        ("MemoryReal", "2097152"),
        ("ServiceLevelType", "HEPSPEC"),
        ("ServiceLevel", "10.0"),
        ("InfrastructureType", "grid"),
    ] {
        assert_eq!(field(job, k), v, "job field {k}");
    }
    // The summary and the sync record count the whole month: 101, 102 and 103.
    let sums = site.records_of("APEL-summary-job-message");
    assert_eq!(sums.len(), 1);
    for (k, v) in [
        ("Month", "11"),
        ("Year", "2026"),
        ("NumberOfJobs", "3"),
        ("WallDuration", "10800"),
        ("CpuDuration", "16200"),
        ("NormalisedWallDuration", "108000"),
        ("NormalisedCpuDuration", "162000"),
        ("EarliestEndTime", &(at("2026-11-03T12") / 1000).to_string()),
        ("LatestEndTime", &(at("2026-11-20T12") / 1000).to_string()),
    ] {
        assert_eq!(field(&sums[0], k), v, "summary field {k}");
    }
    let syncs = site.records_of("APEL-sync-message");
    assert_eq!(syncs.len(), 1);
    assert_eq!(field(&syncs[0], "NumberOfJobs"), "3");
    let vms: Vec<String> = site
        .records_of("APEL-cloud-message")
        .iter()
        .map(|r| field(r, "VMUUID").to_string())
        .collect();
    assert_eq!(vms, ["vm-000000000101", "vm-000000000102"]);
    assert_eq!(site.queue().len(), 4);
    assert_eq!(
        site.exported("job").await,
        ["INFN-T1/htcondor/101/1", "INFN-T1/htcondor/102/1"]
    );

    // Nothing changed: nothing new.
    let stdout = site.export_ok(&period);
    assert!(
        stdout.contains("job: 0 records in 0 messages, 2 unchanged"),
        "{stdout}"
    );
    assert!(
        stdout.contains("summary: 0 records in 0 messages, 1 unchanged"),
        "{stdout}"
    );
    assert_eq!(site.queue().len(), 4);

    // A new run in the period: its job and VM, and the month's new figures.
    site.record("105", "2026-11-12T12").await;
    site.export_ok(&period);
    assert_eq!(site.job_ids(), ["101", "102", "105"]);
    let counts: Vec<String> = site
        .records_of("APEL-summary-job-message")
        .iter()
        .map(|r| field(r, "NumberOfJobs").to_string())
        .collect();
    assert_eq!(counts, ["3", "4"]);
    assert_eq!(site.records_of("APEL-sync-message").len(), 2);
    assert_eq!(site.records_of("APEL-cloud-message").len(), 3);

    // A record whose job identity has not come yet (vm.stopped before job.started) waits.
    site.insert("106", "2026-11-13T12", "", "").await;
    let stdout = site.export_ok(&period);
    assert!(
        stdout.contains("not exported yet: INFN-T1/htcondor/106/1: waiting for the job's identity"),
        "{stdout}"
    );
    assert!(
        stdout.contains("job: 0 records in 0 messages, 3 unchanged"),
        "{stdout}"
    );
    assert_eq!(site.job_ids(), ["101", "102", "105"]);
    let pool = site.pool().await;
    on_pool!(&pool, |p| {
        sqlx::query("DELETE FROM usage_records WHERE run_key = 'INFN-T1/htcondor/106/1'")
            .execute(p)
            .await
            .map(|r| r.rows_affected())
    })
    .unwrap();
    pool.close().await;

    // One kind, a wider period: only the jobs not yet sent.
    let stdout = site.export_ok(&[
        "--from",
        "2026-10-01",
        "--to",
        "2026-12-01",
        "--kind",
        "job",
    ]);
    assert!(
        stdout.contains("job: 2 records in 1 messages, 3 unchanged"),
        "{stdout}"
    );
    assert!(!stdout.contains("summary"), "{stdout}");
    assert_eq!(site.job_ids(), ["101", "102", "103", "104", "105"]);
}

#[tokio::test]
async fn apel_export_refuses_bad_arguments() {
    let site = Site::new().await;
    for (args, code) in [
        (vec!["--from", "2026-11-31", "--to", "2026-12-01"], 64),
        (vec!["--from", "2026-11-02", "--to", "2026-11-01"], 64),
        (
            vec![
                "--from",
                "2026-11-01",
                "--to",
                "2026-12-01",
                "--kind",
                "star",
            ],
            2,
        ),
    ] {
        let o = site.export(&args, None);
        assert_eq!(
            o.status.code(),
            Some(code),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let export_from = |store: &str| {
        // (A PostgreSQL store that does not answer is retried for 10 s before exit 69.)
        std::process::Command::new(env!("CARGO_BIN_EXE_wnodes-accounting"))
            .env("WNODES_CONFIG", site.dir.path().join("wnodes.toml"))
            .env("WNODES_STATE_DIR", site.dir.path())
            .args(["apel-export", "--store", store, "--from", "2026-11-01"])
            .args(["--to", "2026-12-01", "--out"])
            .arg(site.out())
            .output()
            .unwrap()
    };
    // Not a store at all: a usage error naming it.
    let o = export_from("mysql://db.example.org/acct");
    assert_eq!(o.status.code(), Some(64));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("\"mysql://db.example.org/acct\" is neither a SQLite path"),
        "{err}"
    );
}

async fn four_jobs(pg: Option<String>) -> Site {
    let site = Site::on(pg).await;
    for (id, day) in [("1", "02"), ("2", "03"), ("3", "04"), ("4", "05")] {
        site.record(id, &format!("2026-11-{day}T08")).await;
    }
    site
}

const JOBS: [&str; 4] = ["--from", "2026-11-01", "--to", "2026-12-01"];

fn crashed(o: &Output) {
    assert_eq!(
        o.status.signal(),
        Some(nix::sys::signal::Signal::SIGABRT as i32),
        "the failpoint did not abort: {:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

async fn a_crash_after_queueing_never_queues_a_job_twice(pg: Option<String>) {
    let site = four_jobs(pg).await;
    let o = site.export(
        &[&JOBS[..], &["--kind", "job"]].concat(),
        Some("apel-after-queue"),
    );
    crashed(&o);
    // The message is in the queue; the database does not say so yet.
    assert_eq!(site.job_ids(), ["1", "2", "3", "4"]);
    assert!(site.exported("job").await.is_empty());

    let stdout = site.export_ok(&[&JOBS[..], &["--kind", "job"]].concat());
    assert!(
        stdout.contains("recovered: 1 messages already queued, 0 never queued"),
        "{stdout}"
    );
    assert!(
        stdout.contains("job: 0 records in 0 messages, 4 unchanged"),
        "{stdout}"
    );
    assert_eq!(site.job_ids(), ["1", "2", "3", "4"], "each job once");
    assert_eq!(site.exported("job").await.len(), 4);
}

async fn a_crash_after_queueing_is_settled_even_once_ssmsend_took_the_message(pg: Option<String>) {
    let site = four_jobs(pg).await;
    crashed(&site.export(
        &[&JOBS[..], &["--kind", "job"]].concat(),
        Some("apel-after-queue"),
    ));
    // ssmsend sends and removes the element before the exporter runs again.
    let q = OutgoingQueue::open(&site.out()).unwrap();
    for e in q.elements().unwrap() {
        std::fs::remove_file(site.out().join(e)).unwrap();
    }
    let stdout = site.export_ok(&[&JOBS[..], &["--kind", "job"]].concat());
    assert!(
        stdout.contains("recovered: 1 messages already queued"),
        "{stdout}"
    );
    assert!(site.job_ids().is_empty(), "sent already: not queued again");
    assert_eq!(site.exported("job").await.len(), 4);
}

async fn a_crash_before_queueing_loses_no_job(pg: Option<String>) {
    let site = four_jobs(pg).await;
    crashed(&site.export(
        &[&JOBS[..], &["--kind", "job"]].concat(),
        Some("apel-before-queue"),
    ));
    // Staged and recorded as pending, not in the queue.
    let q = OutgoingQueue::open(&site.out()).unwrap();
    assert!(q.elements().unwrap().is_empty());
    assert_eq!(q.staged().unwrap().len(), 1);

    let stdout = site.export_ok(&[&JOBS[..], &["--kind", "job"]].concat());
    assert!(
        stdout.contains("recovered: 0 messages already queued, 1 never queued"),
        "{stdout}"
    );
    assert!(stdout.contains("job: 4 records in 1 messages"), "{stdout}");
    assert_eq!(site.job_ids(), ["1", "2", "3", "4"], "each job once");
    assert!(q.staged().unwrap().is_empty());
    assert_eq!(site.exported("job").await.len(), 4);
}

async fn a_crash_before_queueing_a_summary_sends_it_on_the_next_run(pg: Option<String>) {
    let site = four_jobs(pg).await;
    crashed(&site.export(
        &[&JOBS[..], &["--kind", "summary"]].concat(),
        Some("apel-before-queue"),
    ));
    assert!(site.queue().is_empty());
    site.export_ok(&[&JOBS[..], &["--kind", "summary"]].concat());
    let sums = site.records_of("APEL-summary-job-message");
    assert_eq!(sums.len(), 1);
    assert_eq!(field(&sums[0], "NumberOfJobs"), "4");
}

/// `serve` with `[accounting.apel_export]`: a usage record made from events reaches the queue
/// without anyone running `apel-export`, and SIGTERM still stops the service cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn serve_exports_to_apel_periodically() {
    use std::{process::Stdio, time::Duration};
    use wnodes_bus::{Bus, BusMetrics, EventExt, proto, proto::event::Body};
    use wnodes_testkit::{NatsServer, wait_until};

    let nats = NatsServer::start().await.unwrap();
    let site = Site::new().await;
    let config = format!(
        "{CONFIG}[accounting.apel_export]\nout = \"{}\"\nevery = \"300ms\"\n",
        site.out().display()
    );
    std::fs::write(site.dir.path().join("wnodes.toml"), config).unwrap();
    let mut service = tokio::process::Command::new(env!("CARGO_BIN_EXE_wnodes-accounting"))
        .env("WNODES_CONFIG", site.dir.path().join("wnodes.toml"))
        .env("WNODES_NATS__URL", nats.url())
        .env(
            "WNODES_NATS__CREDS_FILE",
            nats.identity(&wnodes_bus::roles::ACCOUNTING, "")
                .await
                .unwrap()
                .creds_file
                .unwrap(),
        )
        .env("WNODES_STATE_DIR", site.dir.path())
        .env("WNODES_HTTP_ADDR", "127.0.0.1:0")
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let bus = Bus::connect(
        &nats.admin(),
        "test@hv1.example.org",
        BusMetrics::unregistered(),
    )
    .await
    .unwrap();
    bus.check_streams().await.unwrap();
    let run = proto::JobRunRef {
        site: "INFN-T1".into(),
        lrms: proto::Lrms::Htcondor as i32,
        job_id: "31337".into(),
        run_attempt: 1,
    };
    let job = proto::JobDescription {
        run: Some(run.clone()),
        vo: "cms".into(),
        owner: Some(proto::JobOwner {
            user: "bob".into(),
            uid: 1001,
            gid: 1001,
        }),
        host: "hv1.example.org".into(),
        ..Default::default()
    };
    let now = wnodes_proto::time::timestamp(std::time::SystemTime::now());
    for body in [
        Body::JobStarted(proto::JobStarted {
            job: Some(job),
            started_at: None,
        }),
        Body::VmStopped(proto::VmStopped {
            vm_id: "vm-0123456789ab".into(),
            exit_code: 0,
            usage: Some(proto::VmUsage {
                cpu_seconds: 100.0,
                peak_memory_bytes: 1 << 30,
                wall: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                cores: 1,
                ..Default::default()
            }),
            stop_reason: "guest-poweroff".into(),
            stopped_at: Some(now),
            ..Default::default()
        }),
    ] {
        bus.publish(&proto::Event::build(
            run.clone(),
            "hv1.example.org",
            "test",
            body,
        ))
        .await
        .unwrap();
    }

    wait_until(
        Duration::from_secs(30),
        "the job in the APEL queue",
        || async { (site.job_ids() == ["31337"]).then_some(()) },
    )
    .await
    .unwrap();
    let job = &site.records_of("APEL-individual-job-message")[0];
    assert_eq!(field(job, "VO"), "cms");
    assert_eq!(field(job, "LocalUserId"), "bob");
    assert_eq!(field(job, "WallDuration"), "60");
    assert_eq!(field(job, "CpuDuration"), "100");
    wait_until(
        Duration::from_secs(30),
        "the VM in the APEL queue",
        || async { (site.records_of("APEL-cloud-message").len() == 1).then_some(()) },
    )
    .await
    .unwrap();
    // Later ticks send nothing again.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(site.job_ids(), ["31337"]);
    assert_eq!(site.records_of("APEL-summary-job-message").len(), 1);

    let pid = nix::unistd::Pid::from_raw(i32::try_from(service.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), service.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
