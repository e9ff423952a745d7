//! The accounting handler: one effect per event type (see the crate's table), each in the
//! same SQLite transaction as the message's idempotency key; one record per run.

use sqlx::SqliteConnection;
use wnodes_bus::{EventExt as _, Handler, HandlerCtx, HandlerError, proto, proto::event::Body};
use wnodes_proto::time;

use crate::Metrics;

/// How many deliveries of a `VmStopped` wait for the run's `JobStarted` before the record is
/// written without the job's identity (filled in when `JobStarted` comes).
pub const WAIT_FOR_JOB_ATTEMPTS: u32 = 3;

/// The accounting handler.
#[derive(Debug, Clone)]
pub struct AccountingHandler {
    /// `"accounting@<host>"`, the source of `UsageRecorded`.
    pub source: String,
    pub metrics: Metrics,
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
        let key = wnodes_bus::event::run_key(&run);
        match &event.body {
            Some(Body::JobStarted(js)) => {
                let conn = ctx.tx().await?;
                job_started(conn, &key, js).await.map_err(retry)?;
            }
            Some(Body::VmRunning(r)) => {
                let conn = ctx.tx().await?;
                sqlx::query(
                    "INSERT INTO accounting_jobs (run_key, vm_started_ms) VALUES (?, ?)
                     ON CONFLICT (run_key) DO UPDATE SET vm_started_ms = excluded.vm_started_ms",
                )
                .bind(&key)
                .bind(
                    r.started_at
                        .as_ref()
                        .or(event.time.as_ref())
                        .map(time::timestamp_ms),
                )
                .execute(&mut *conn)
                .await
                .map_err(retry)?;
            }
            Some(Body::VmStopped(s)) => {
                let attempt = ctx.attempt();
                let conn = ctx.tx().await?;
                let known = job_known(conn, &key).await.map_err(retry)?;
                if !known && attempt < WAIT_FOR_JOB_ATTEMPTS {
                    return Err(retry(format!(
                        "job.started of run {key} not seen yet (attempt {attempt})"
                    )));
                }
                if !known {
                    tracing::warn!(run = %key, "Recording usage without the job's identity: its job.started never came.");
                }
                if let Some(recorded) = vm_stopped(conn, &run, &key, &event.host, s)
                    .await
                    .map_err(retry)?
                {
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
                let conn = ctx.tx().await?;
                sqlx::query(
                    "INSERT INTO accounting_jobs (run_key, lrms_exit_code, finished_ms) VALUES (?, ?, ?)
                     ON CONFLICT (run_key) DO UPDATE SET lrms_exit_code = excluded.lrms_exit_code,
                        finished_ms = excluded.finished_ms",
                )
                .bind(&key)
                .bind(f.exit_code)
                .bind(f.finished_at.as_ref().map(time::timestamp_ms))
                .execute(&mut *conn)
                .await
                .map_err(retry)?;
                sqlx::query("UPDATE usage_records SET lrms_exit_code = ? WHERE run_key = ?")
                    .bind(f.exit_code)
                    .bind(&key)
                    .execute(&mut *conn)
                    .await
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

async fn job_started(
    conn: &mut SqliteConnection,
    key: &str,
    js: &proto::JobStarted,
) -> Result<(), sqlx::Error> {
    let job = js.job.clone().unwrap_or_default();
    let owner = job.owner.unwrap_or_default();
    let identity = job.identity.unwrap_or_default();
    let fqans = serde_json::to_string(&identity.voms_fqans).unwrap_or_else(|_| "[]".into());
    let cores = job.resources.map(|r| r.cores).unwrap_or_default();
    sqlx::query(
        "INSERT INTO accounting_jobs (run_key, user_name, uid, gid, vo, x509_dn, fqans, queue, cores,
            lrms_started_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (run_key) DO UPDATE SET user_name = excluded.user_name, uid = excluded.uid,
            gid = excluded.gid, vo = excluded.vo, x509_dn = excluded.x509_dn,
            fqans = excluded.fqans, queue = excluded.queue, cores = excluded.cores,
            lrms_started_ms = excluded.lrms_started_ms",
    )
    .bind(key)
    .bind(&owner.user)
    .bind(owner.uid)
    .bind(owner.gid)
    .bind(&job.vo)
    .bind(&identity.x509_dn)
    .bind(&fqans)
    .bind(&job.queue)
    .bind(cores)
    .bind(js.started_at.as_ref().map(time::timestamp_ms))
    .execute(&mut *conn)
    .await?;
    // A record written before the job's identity was known gets it now.
    sqlx::query(
        "UPDATE usage_records SET user_name = ?, uid = ?, gid = ?, vo = ?, x509_dn = ?, fqans = ?,
            queue = ?
         WHERE run_key = ? AND vo = '' AND user_name = ''",
    )
    .bind(&owner.user)
    .bind(owner.uid)
    .bind(owner.gid)
    .bind(&job.vo)
    .bind(&identity.x509_dn)
    .bind(&fqans)
    .bind(&job.queue)
    .bind(key)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn job_known(conn: &mut SqliteConnection, key: &str) -> Result<bool, sqlx::Error> {
    let row: Option<(Option<String>,)> =
        sqlx::query_as("SELECT vo FROM accounting_jobs WHERE run_key = ?")
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
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
}

/// Inserts the record; `Some(UsageRecorded)` when this call wrote it, `None` when the run
/// already had one.
async fn vm_stopped(
    conn: &mut SqliteConnection,
    run: &proto::JobRunRef,
    key: &str,
    host: &str,
    s: &proto::VmStopped,
) -> Result<Option<proto::UsageRecorded>, sqlx::Error> {
    let job: JobRow = sqlx::query_as(
        "SELECT user_name, uid, gid, vo, x509_dn, fqans, queue, vm_started_ms, lrms_exit_code
         FROM accounting_jobs WHERE run_key = ?",
    )
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?
    .unwrap_or_default();
    let usage = s.usage.unwrap_or_default();
    let wall = time::duration_secs(usage.wall.as_ref());
    let stopped_ms = s.stopped_at.as_ref().map(time::timestamp_ms);
    let started_ms = job
        .vm_started_ms
        .or_else(|| stopped_ms.map(|t| t - (wall * 1000.0) as i64));
    let res = sqlx::query(
        "INSERT INTO usage_records (run_key, site, lrms, job_id, run_attempt, host, vm_id, vo,
            user_name, uid, gid, x509_dn, fqans, queue, cores, cpu_seconds, peak_memory_bytes,
            wall_seconds, exit_code, lrms_exit_code, stop_reason, started_ms, stopped_ms,
            recorded_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (run_key) DO NOTHING",
    )
    .bind(key)
    .bind(&run.site)
    .bind(wnodes_bus::event::lrms_name(run.lrms))
    .bind(&run.job_id)
    .bind(run.run_attempt)
    .bind(host)
    .bind(&s.vm_id)
    .bind(job.vo.clone().unwrap_or_default())
    .bind(job.user_name.clone().unwrap_or_default())
    .bind(job.uid)
    .bind(job.gid)
    .bind(job.x509_dn.clone().unwrap_or_default())
    .bind(job.fqans.clone().unwrap_or_else(|| "[]".into()))
    .bind(job.queue.clone().unwrap_or_default())
    .bind(usage.cores)
    .bind(usage.cpu_seconds)
    .bind(i64::try_from(usage.peak_memory_bytes).unwrap_or(i64::MAX))
    .bind(wall)
    .bind(s.exit_code)
    .bind(job.lrms_exit_code)
    .bind(&s.stop_reason)
    .bind(started_ms)
    .bind(stopped_ms)
    .bind(time::now_ms())
    .execute(&mut *conn)
    .await?;
    if res.rows_affected() == 0 {
        return Ok(None);
    }
    Ok(Some(proto::UsageRecorded {
        record_id: key.to_owned(),
        usage: Some(usage),
        exit_code: s.exit_code,
        vo: job.vo.unwrap_or_default(),
        user: job.user_name.unwrap_or_default(),
        x509_dn: job.x509_dn.unwrap_or_default(),
    }))
}
