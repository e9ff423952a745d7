//! The accounting handler: one effect per event type (see the crate's table), each in the
//! same transaction as the message's idempotency key; one record per run. Every statement is
//! one text for SQLite and PostgreSQL ([`wnodes_bus::db`]).

use wnodes_bus::{
    EventExt as _, Handler, HandlerCtx, HandlerError, db::Db, on_db, proto, proto::event::Body,
};
use wnodes_proto::time;

use crate::Metrics;

/// How many deliveries of a `VmStopped` wait for the run's `JobStarted` before the record is
/// written without the job's identity (filled in when `JobStarted` comes).
pub const WAIT_FOR_JOB_ATTEMPTS: u32 = 3;

/// The accounting handler.
#[derive(Debug, Clone, Default)]
pub struct AccountingHandler {
    /// `"accounting@<host>"`, the source of `UsageRecorded`.
    pub source: String,
    pub metrics: Metrics,
    /// The benchmark each record gets, by its host.
    pub benchmarks: crate::config::Benchmarks,
}

/// `virtio_tap`, `sriov`, `user`; empty when unspecified.
fn network_mode_name(mode: i32) -> &'static str {
    match proto::NetworkMode::try_from(mode) {
        Ok(proto::NetworkMode::VirtioTap) => "virtio_tap",
        Ok(proto::NetworkMode::Sriov) => "sriov",
        Ok(proto::NetworkMode::User) => "user",
        _ => "",
    }
}

/// Phases named in `VmFailed` (anything else is counted as `other`, keeping labels bounded).
const PHASES: [&str; 7] = [
    "policy", "image", "scratch", "network", "storage", "launch", "deadline",
];

fn retry(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> HandlerError {
    HandlerError::retry(e)
}

impl Handler for AccountingHandler {
    fn name(&self) -> &'static str {
        "accounting.record"
    }

    async fn handle(&self, ctx: &mut HandlerCtx, event: proto::Event) -> Result<(), HandlerError> {
        let Some(run) = event.run.clone() else {
            return Err(HandlerError::reject(format!(
                "event {} has no run",
                event.id
            )));
        };
        if let Some(why) = impossible(&run, event.body.as_ref()) {
            return Err(HandlerError::reject(format!(
                "impossible usage event {}: {why}",
                event.id
            )));
        }
        let key = wnodes_bus::event::run_key(&run);
        if matches!(
            &event.body,
            Some(
                Body::JobStarted(_)
                    | Body::VmRequested(_)
                    | Body::ImageReady(_)
                    | Body::VmRunning(_)
                    | Body::VmStopped(_)
                    | Body::JobFinished(_)
            )
        ) {
            let mut db = ctx.db().await?;
            lock_run(&mut db, &key).await.map_err(retry)?;
        }
        match &event.body {
            Some(Body::JobStarted(js)) => {
                let mut db = ctx.db().await?;
                job_started(&mut db, &key, js).await.map_err(retry)?;
            }
            Some(Body::VmRequested(r)) => {
                let spec = r.spec.clone().unwrap_or_default();
                let mut db = ctx.db().await?;
                vm_requested(&mut db, &key, &spec).await.map_err(retry)?;
            }
            Some(Body::ImageReady(r)) => {
                let mut db = ctx.db().await?;
                image_ready(&mut db, &key, r).await.map_err(retry)?;
            }
            Some(Body::VmRunning(r)) => {
                let started = r
                    .started_at
                    .as_ref()
                    .or(event.time.as_ref())
                    .map(time::timestamp_ms);
                let mut db = ctx.db().await?;
                on_db!(&mut db, |c| {
                    sqlx::query(
                        "INSERT INTO accounting_jobs (run_key, vm_started_ms) VALUES ($1, $2)
                         ON CONFLICT (run_key) DO UPDATE SET vm_started_ms = excluded.vm_started_ms",
                    )
                    .bind(&key)
                    .bind(started)
                    .execute(c)
                    .await
                    .map(|r| r.rows_affected())
                })
                .map_err(retry)?;
            }
            Some(Body::VmStopped(s)) => {
                let attempt = ctx.attempt();
                let mut db = ctx.db().await?;
                let known = job_known(&mut db, &key).await.map_err(retry)?;
                if !known && attempt < WAIT_FOR_JOB_ATTEMPTS {
                    return Err(retry(format!(
                        "job.started of run {key} not seen yet (attempt {attempt})"
                    )));
                }
                if !known {
                    tracing::warn!(run = %key, "Recording usage without the job's identity: its job.started never came.");
                }
                let benchmark = self.benchmarks.of(&event.host);
                let recorded = match vm_stopped(&mut db, &run, &key, &event.host, s, benchmark)
                    .await
                    .map_err(retry)?
                {
                    Stopped::Impossible(why) => {
                        // Dead-lettered with the reason; the transaction rolls back.
                        return Err(HandlerError::reject(format!(
                            "impossible usage event {}: {why}",
                            event.id
                        )));
                    }
                    Stopped::Recorded(r) => Some(*r),
                    Stopped::Already => None,
                };
                if let Some(recorded) = recorded {
                    tracing::info!(run = %key, cpu_seconds = recorded.usage.as_ref().map(|u| u.cpu_seconds), "Usage recorded.");
                    self.metrics.records.inc();
                    ctx.publish(proto::Event::build(
                        run,
                        &event.host,
                        &self.source,
                        Body::UsageRecorded(recorded),
                    ));
                } else {
                    tracing::info!(run = %key, "Usage of this run already recorded; ignoring.");
                }
            }
            Some(Body::JobFinished(f)) => {
                let finished = f.finished_at.as_ref().map(time::timestamp_ms);
                let exit = i64::from(f.exit_code);
                let mut db = ctx.db().await?;
                on_db!(&mut db, |c| {
                    sqlx::query(
                        "INSERT INTO accounting_jobs (run_key, lrms_exit_code, finished_ms)
                         VALUES ($1, $2, $3)
                         ON CONFLICT (run_key) DO UPDATE SET lrms_exit_code = excluded.lrms_exit_code,
                            finished_ms = excluded.finished_ms",
                    )
                    .bind(&key)
                    .bind(exit)
                    .bind(finished)
                    .execute(c)
                    .await
                    .map(|r| r.rows_affected())
                })
                .map_err(retry)?;
                on_db!(&mut db, |c| {
                    sqlx::query("UPDATE usage_records SET lrms_exit_code = $1 WHERE run_key = $2")
                        .bind(exit)
                        .bind(&key)
                        .execute(c)
                        .await
                        .map(|r| r.rows_affected())
                })
                .map_err(retry)?;
            }
            Some(Body::VmFailed(f)) => {
                let phase = PHASES
                    .iter()
                    .find(|p| **p == f.phase)
                    .copied()
                    .unwrap_or("other");
                tracing::info!(run = %key, phase, reason = %f.reason, "VM failed before it ran: no usage record.");
                self.metrics
                    .vm_failed
                    .get_or_create(&vec![("phase", phase.to_owned())])
                    .inc();
            }
            _ => {
                tracing::debug!(id = %event.id, "Not an accounting event; ignoring.");
            }
        }
        Ok(())
    }
}

/// Why an event cannot describe a real run (checked before anything is written): the event is
/// dead-lettered with this reason.
fn impossible(run: &proto::JobRunRef, body: Option<&Body>) -> Option<String> {
    if run.job_id.is_empty() {
        return Some("its run has no job id".into());
    }
    if run.site.is_empty() {
        return Some("its run has no site".into());
    }
    let Some(Body::VmStopped(s)) = body else {
        return None;
    };
    let usage = s.usage.unwrap_or_default();
    if !usage.cpu_seconds.is_finite() || usage.cpu_seconds < 0.0 {
        return Some(format!("CPU time {} s", usage.cpu_seconds));
    }
    if usage.wall.is_some_and(|w| w.seconds < 0 || w.nanos < 0) {
        return Some(format!(
            "negative wall time {} s",
            time::duration_secs(usage.wall.as_ref())
        ));
    }
    None
}

/// Serialises the transactions of one run: each reads what the others of the run wrote
/// (`vm.stopped` reads what `job.started` and `job.finished` stored, `job.finished` updates the
/// record `vm.stopped` wrote), so two of them interleaving could lose an update. On SQLite
/// every write transaction is already serial (`BEGIN IMMEDIATE` on one connection); on
/// PostgreSQL a transaction-scoped advisory lock on the run key does it, leaving other runs
/// parallel. Under READ COMMITTED each later statement sees what the previous holder committed.
async fn lock_run(db: &mut Db<'_>, key: &str) -> Result<(), sqlx::Error> {
    if let Db::Postgres(c) = db {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(key)
            .execute(&mut **c)
            .await?;
    }
    Ok(())
}

async fn job_started(
    db: &mut Db<'_>,
    key: &str,
    js: &proto::JobStarted,
) -> Result<(), sqlx::Error> {
    let job = js.job.clone().unwrap_or_default();
    let owner = job.owner.unwrap_or_default();
    let identity = job.identity.unwrap_or_default();
    let fqans = serde_json::to_string(&identity.voms_fqans).unwrap_or_else(|_| "[]".into());
    let cores = job
        .resources
        .map(|r| i64::from(r.cores))
        .unwrap_or_default();
    let (uid, gid) = (i64::from(owner.uid), i64::from(owner.gid));
    let started = js.started_at.as_ref().map(time::timestamp_ms);
    let submitted = job.submitted_at.as_ref().map(time::timestamp_ms);
    on_db!(&mut *db, |c| {
        sqlx::query(
            "INSERT INTO accounting_jobs (run_key, user_name, uid, gid, vo, x509_dn, fqans, queue,
                cores, lrms_started_ms, submitted_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (run_key) DO UPDATE SET user_name = excluded.user_name, uid = excluded.uid,
                gid = excluded.gid, vo = excluded.vo, x509_dn = excluded.x509_dn,
                fqans = excluded.fqans, queue = excluded.queue, cores = excluded.cores,
                lrms_started_ms = excluded.lrms_started_ms, submitted_ms = excluded.submitted_ms",
        )
        .bind(key)
        .bind(&owner.user)
        .bind(uid)
        .bind(gid)
        .bind(&job.vo)
        .bind(&identity.x509_dn)
        .bind(&fqans)
        .bind(&job.queue)
        .bind(cores)
        .bind(started)
        .bind(submitted)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    // A record written before the job's identity was known gets it now.
    on_db!(&mut *db, |c| {
        sqlx::query(
            "UPDATE usage_records SET user_name = $1, uid = $2, gid = $3, vo = $4, x509_dn = $5,
                fqans = $6, queue = $7, submitted_ms = $9
             WHERE run_key = $8 AND vo = '' AND user_name = ''",
        )
        .bind(&owner.user)
        .bind(uid)
        .bind(gid)
        .bind(&job.vo)
        .bind(&identity.x509_dn)
        .bind(&fqans)
        .bind(&job.queue)
        .bind(key)
        .bind(submitted)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// What the VM was given; also onto a record written before it came.
async fn vm_requested(db: &mut Db<'_>, key: &str, spec: &proto::VmSpec) -> Result<(), sqlx::Error> {
    let memory = i64::try_from(spec.memory_bytes).unwrap_or(i64::MAX);
    let scratch = i64::try_from(spec.scratch_bytes).unwrap_or(i64::MAX);
    let mode = network_mode_name(spec.network_mode);
    on_db!(&mut *db, |c| {
        sqlx::query(
            "INSERT INTO accounting_jobs (run_key, image, memory_bytes, scratch_bytes, network_mode)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (run_key) DO UPDATE SET image = excluded.image,
                memory_bytes = excluded.memory_bytes, scratch_bytes = excluded.scratch_bytes,
                network_mode = excluded.network_mode",
        )
        .bind(key)
        .bind(&spec.image)
        .bind(memory)
        .bind(scratch)
        .bind(mode)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    on_db!(&mut *db, |c| {
        sqlx::query(
            "UPDATE usage_records SET image = $2, memory_bytes = $3, scratch_bytes = $4,
                network_mode = $5
             WHERE run_key = $1 AND image = ''",
        )
        .bind(key)
        .bind(&spec.image)
        .bind(memory)
        .bind(scratch)
        .bind(mode)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// The image's verified digest; also onto a record written before it came.
async fn image_ready(db: &mut Db<'_>, key: &str, r: &proto::ImageReady) -> Result<(), sqlx::Error> {
    on_db!(&mut *db, |c| {
        sqlx::query(
            "INSERT INTO accounting_jobs (run_key, image_sha256) VALUES ($1, $2)
             ON CONFLICT (run_key) DO UPDATE SET image_sha256 = excluded.image_sha256",
        )
        .bind(key)
        .bind(&r.sha256)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    on_db!(&mut *db, |c| {
        sqlx::query(
            "UPDATE usage_records SET image_sha256 = $2 WHERE run_key = $1 AND image_sha256 = ''",
        )
        .bind(key)
        .bind(&r.sha256)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(())
}

async fn job_known(db: &mut Db<'_>, key: &str) -> Result<bool, sqlx::Error> {
    let row: Option<(Option<String>,)> = on_db!(&mut *db, |c| {
        sqlx::query_as("SELECT vo FROM accounting_jobs WHERE run_key = $1")
            .bind(key)
            .fetch_optional(c)
            .await
    })?;
    Ok(matches!(row, Some((Some(_),))))
}

#[derive(sqlx::FromRow, Default)]
struct JobRow {
    user_name: Option<String>,
    uid: Option<i64>,
    gid: Option<i64>,
    vo: Option<String>,
    x509_dn: Option<String>,
    fqans: Option<String>,
    queue: Option<String>,
    vm_started_ms: Option<i64>,
    lrms_exit_code: Option<i64>,
    submitted_ms: Option<i64>,
    image: Option<String>,
    image_sha256: Option<String>,
    memory_bytes: Option<i64>,
    scratch_bytes: Option<i64>,
    network_mode: Option<String>,
}

/// What `vm.stopped` did.
enum Stopped {
    /// This call wrote the record.
    Recorded(Box<proto::UsageRecorded>),
    /// The run already had one.
    Already,
    /// The event contradicts what is stored of the run (it stopped before it started).
    Impossible(String),
}

/// Inserts the record, unless the run already has one or the event is impossible.
async fn vm_stopped(
    db: &mut Db<'_>,
    run: &proto::JobRunRef,
    key: &str,
    host: &str,
    s: &proto::VmStopped,
    benchmark: Option<wnodes_apel::Benchmark>,
) -> Result<Stopped, sqlx::Error> {
    let job: JobRow = on_db!(&mut *db, |c| {
        sqlx::query_as(
            "SELECT user_name, uid, gid, vo, x509_dn, fqans, queue, vm_started_ms, lrms_exit_code,
                submitted_ms, image, image_sha256, memory_bytes, scratch_bytes, network_mode
             FROM accounting_jobs WHERE run_key = $1",
        )
        .bind(key)
        .fetch_optional(c)
        .await
    })?
    .unwrap_or_default();
    let usage = s.usage.unwrap_or_default();
    let wall = time::duration_secs(usage.wall.as_ref());
    let stopped_ms = s.stopped_at.as_ref().map(time::timestamp_ms);
    if let (Some(started), Some(stopped)) = (job.vm_started_ms, stopped_ms)
        && stopped < started
    {
        return Ok(Stopped::Impossible(format!(
            "the VM stopped at {stopped} ms, before it started at {started} ms (unix)"
        )));
    }
    let started_ms = job
        .vm_started_ms
        .or_else(|| stopped_ms.map(|t| t - (wall * 1000.0) as i64));
    let (vo, user, dn) = (
        job.vo.unwrap_or_default(),
        job.user_name.unwrap_or_default(),
        job.x509_dn.unwrap_or_default(),
    );
    let fqans = job.fqans.unwrap_or_else(|| "[]".into());
    let queue = job.queue.unwrap_or_default();
    let lrms = wnodes_bus::event::lrms_name(run.lrms);
    let attempt = i64::from(run.run_attempt);
    let cores = i64::from(usage.cores);
    let peak = i64::try_from(usage.peak_memory_bytes).unwrap_or(i64::MAX);
    let exit = i64::from(s.exit_code);
    let now = time::now_ms();
    let image = job.image.clone().unwrap_or_default();
    let image_sha256 = job.image_sha256.clone().unwrap_or_default();
    let network_mode = job.network_mode.clone().unwrap_or_default();
    let bench_kind = benchmark.map(|b| b.kind.name()).unwrap_or_default();
    let bench_per_core = benchmark.map(|b| b.per_core);
    // Known when the launcher measured them (a split that does not add up is not kept).
    let split = (usage.cpu_user_seconds + usage.cpu_system_seconds > 0.0
        && usage.cpu_user_seconds >= 0.0
        && usage.cpu_system_seconds >= 0.0
        && usage.cpu_user_seconds + usage.cpu_system_seconds <= usage.cpu_seconds * 1.01 + 0.01)
        .then_some((usage.cpu_user_seconds, usage.cpu_system_seconds));
    let (cpu_user, cpu_system) = (split.map(|s| s.0), split.map(|s| s.1));
    let inserted = on_db!(&mut *db, |c| {
        sqlx::query(
            "INSERT INTO usage_records (run_key, site, lrms, job_id, run_attempt, host, vm_id, vo,
                user_name, uid, gid, x509_dn, fqans, queue, cores, cpu_seconds, peak_memory_bytes,
                wall_seconds, exit_code, lrms_exit_code, stop_reason, started_ms, stopped_ms,
                recorded_ms, submitted_ms, image, image_sha256, memory_bytes, scratch_bytes,
                network_mode, benchmark_kind, benchmark_per_core, cpu_user_seconds,
                cpu_system_seconds)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33,
                $34)
             ON CONFLICT (run_key) DO NOTHING",
        )
        .bind(key)
        .bind(&run.site)
        .bind(lrms)
        .bind(&run.job_id)
        .bind(attempt)
        .bind(host)
        .bind(&s.vm_id)
        .bind(&vo)
        .bind(&user)
        .bind(job.uid)
        .bind(job.gid)
        .bind(&dn)
        .bind(&fqans)
        .bind(&queue)
        .bind(cores)
        .bind(usage.cpu_seconds)
        .bind(peak)
        .bind(wall)
        .bind(exit)
        .bind(job.lrms_exit_code)
        .bind(&s.stop_reason)
        .bind(started_ms)
        .bind(stopped_ms)
        .bind(now)
        .bind(job.submitted_ms)
        .bind(&image)
        .bind(&image_sha256)
        .bind(job.memory_bytes)
        .bind(job.scratch_bytes)
        .bind(&network_mode)
        .bind(bench_kind)
        .bind(bench_per_core)
        .bind(cpu_user)
        .bind(cpu_system)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    if inserted == 0 {
        return Ok(Stopped::Already);
    }
    let voms_fqans: Vec<String> = serde_json::from_str(&fqans).unwrap_or_default();
    let attributes = voms_fqans.first().and_then(|f| wnodes_apel::fqan::parse(f));
    let record = proto::UsageRecord {
        run_key: key.to_owned(),
        site: run.site.clone(),
        lrms: lrms.to_owned(),
        job_id: run.job_id.clone(),
        run_attempt: run.run_attempt,
        host: host.to_owned(),
        vm_id: s.vm_id.clone(),
        vo: vo.clone(),
        vo_group: attributes
            .as_ref()
            .map(|a| a.group.clone())
            .unwrap_or_default(),
        vo_role: attributes.and_then(|a| a.role).unwrap_or_default(),
        user: user.clone(),
        uid: job.uid.and_then(|u| u32::try_from(u).ok()),
        gid: job.gid.and_then(|g| u32::try_from(g).ok()),
        x509_dn: dn.clone(),
        voms_fqans,
        queue,
        cores: usage.cores,
        cpu_seconds: usage.cpu_seconds,
        peak_memory_bytes: usage.peak_memory_bytes,
        wall_seconds: wall,
        exit_code: s.exit_code,
        lrms_exit_code: job.lrms_exit_code.and_then(|c| i32::try_from(c).ok()),
        stop_reason: s.stop_reason.clone(),
        started_at: started_ms.map(time::timestamp_from_ms),
        stopped_at: stopped_ms.map(time::timestamp_from_ms),
        recorded_at: Some(time::timestamp_from_ms(now)),
        submitted_at: job.submitted_ms.map(time::timestamp_from_ms),
        image,
        image_sha256,
        memory_bytes: job
            .memory_bytes
            .and_then(|b| u64::try_from(b).ok())
            .unwrap_or_default(),
        scratch_bytes: job
            .scratch_bytes
            .and_then(|b| u64::try_from(b).ok())
            .unwrap_or_default(),
        network_mode,
        benchmark_kind: bench_kind.to_owned(),
        benchmark_per_core: bench_per_core.unwrap_or_default(),
        cpu_user_seconds: cpu_user,
        cpu_system_seconds: cpu_system,
    };
    Ok(Stopped::Recorded(Box::new(proto::UsageRecorded {
        record_id: key.to_owned(),
        usage: Some(usage),
        exit_code: s.exit_code,
        vo,
        user,
        x509_dn: dn,
        record: Some(record),
    })))
}
