//! WNoDeS accounting: one usage record per job run whose VM started.
//!
//! The `accounting` durable consumer reads, on every host (`wnodes.evt.*.<type>`):
//!
//! | event | effect (in the same SQLite transaction as the idempotency key) |
//! |---|---|
//! | `job.started` | stores the job's identity (owner, VO, DN, FQANs, queue) in `accounting_jobs`; fills a record written before it |
//! | `vm.running` | stores when the VM started |
//! | `vm.stopped` | inserts the usage record (`usage_records`, PRIMARY KEY = run key) and stages `UsageRecorded` |
//! | `job.finished` | sets the record's LRMS exit code, or keeps it for the record still to come |
//! | `vm.failed` | no record (the VM never ran): counted in `wnodes_accounting_vm_failed_total` by phase |
//!
//! The record is keyed by the run key (`site/lrms/job_id/attempt`, brief §7): a second insert
//! is impossible (`INSERT ... ON CONFLICT DO NOTHING`), whatever `Nats-Msg-Id` a republished
//! `VmStopped` carries. Accounting never waits for `JobFinished`; it enriches the record when it
//! comes. A run that failed before its VM started (`VmFailed`) gets no record.
//!
//! The usage tables live in the consumer's idempotency store database ([`Config::database`]),
//! so each effect commits together with its key ([`wnodes_bus::HandlerCtx::tx`]).

#[cfg(test)]
mod error_rule;
pub mod records;

mod service;

pub use service::{Accounting, AccountingCommand};

use std::path::PathBuf;

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use sqlx::SqliteConnection;
use wnodes_bus::{
    EventExt as _, Handler, HandlerCtx, HandlerError, KeyStore, proto, proto::event::Body,
};

/// How many deliveries of a `VmStopped` wait for the run's `JobStarted` before the record is
/// written without the job's identity (filled in when `JobStarted` comes).
pub const WAIT_FOR_JOB_ATTEMPTS: u32 = 3;

/// `[accounting]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// SQLite database holding the usage records and the consumer's idempotency keys; default
    /// `<state_dir>/accounting.db`. Env `WNODES_ACCOUNTING__DATABASE`. (A PostgreSQL backend
    /// for sites is planned; it needs the idempotency store on PostgreSQL too, so that a record
    /// still commits with its key.)
    pub database: Option<PathBuf>,
}

impl Config {
    /// The database path, given the service's state directory.
    pub fn database_path(&self, state_dir: &std::path::Path) -> PathBuf {
        self.database
            .clone()
            .unwrap_or_else(|| state_dir.join("accounting.db"))
    }
}

/// What can go wrong in accounting.
#[derive(Debug, thiserror::Error)]
pub enum AccountingError {
    #[error("database {path}")]
    Database {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("accounting database query failed")]
    Sql(#[from] sqlx::Error),
    #[error(transparent)]
    Bus(#[from] wnodes_bus::BusError),
}

const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS accounting_jobs (
        run_key        TEXT PRIMARY KEY,
        user_name      TEXT,
        uid            INTEGER,
        gid            INTEGER,
        vo             TEXT,
        x509_dn        TEXT,
        fqans          TEXT,     -- JSON array of VOMS FQANs
        queue          TEXT,
        cores          INTEGER,  -- requested cores (count)
        lrms_started_ms INTEGER, -- unix milliseconds
        vm_started_ms  INTEGER,  -- unix milliseconds (VmRunning.started_at)
        lrms_exit_code INTEGER,
        finished_ms    INTEGER   -- unix milliseconds (JobFinished.finished_at)
    )",
    "CREATE TABLE IF NOT EXISTS usage_records (
        run_key           TEXT PRIMARY KEY,   -- site/lrms/job_id/attempt: one record per run
        site              TEXT NOT NULL,
        lrms              TEXT NOT NULL,
        job_id            TEXT NOT NULL,
        run_attempt       INTEGER NOT NULL,
        host              TEXT NOT NULL,
        vm_id             TEXT NOT NULL,
        vo                TEXT NOT NULL DEFAULT '',
        user_name         TEXT NOT NULL DEFAULT '',
        uid               INTEGER,
        gid               INTEGER,
        x509_dn           TEXT NOT NULL DEFAULT '',
        fqans             TEXT NOT NULL DEFAULT '[]',
        queue             TEXT NOT NULL DEFAULT '',
        cores             INTEGER NOT NULL,   -- vCPUs (count)
        cpu_seconds       REAL NOT NULL,      -- seconds
        peak_memory_bytes INTEGER NOT NULL,   -- bytes
        wall_seconds      REAL NOT NULL,      -- seconds
        exit_code         INTEGER NOT NULL,   -- payload exit status
        lrms_exit_code    INTEGER,            -- from JobFinished, when it came
        stop_reason       TEXT NOT NULL,
        started_ms        INTEGER,            -- unix milliseconds
        stopped_ms        INTEGER,            -- unix milliseconds
        recorded_ms       INTEGER NOT NULL    -- unix milliseconds
    )",
];

/// Creates the accounting tables in the store (idempotent; run at start).
pub async fn migrate(store: &KeyStore) -> Result<(), AccountingError> {
    for stmt in SCHEMA {
        sqlx::query(stmt).execute(store.pool()).await?;
    }
    Ok(())
}

fn ts_ms(ts: Option<&prost_types::Timestamp>) -> Option<i64> {
    ts.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

fn duration_secs(d: Option<&prost_types::Duration>) -> f64 {
    d.map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
        .unwrap_or_default()
}

type Labels = Vec<(&'static str, String)>;

/// Accounting's Prometheus metrics (`wnodes_accounting_*`); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    records: Counter,
    vm_failed: Family<Labels, Counter>,
}

impl Metrics {
    /// Registers the metrics under `wnodes_accounting_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("wnodes_accounting");
        r.register("usage_records", "Usage records written", m.records.clone());
        r.register(
            "vm_failed",
            "Runs whose VM failed before it ran (no usage record), by phase",
            m.vm_failed.clone(),
        );
        m
    }

    /// Usage records written by this process.
    pub fn records(&self) -> u64 {
        self.records.get()
    }

    /// `VmFailed` events seen by this process in `phase`.
    pub fn vm_failed(&self, phase: &str) -> u64 {
        self.vm_failed
            .get_or_create(&vec![("phase", phase.to_owned())])
            .get()
    }
}

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
                .bind(ts_ms(r.started_at.as_ref()).or_else(|| ts_ms(event.time.as_ref())))
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
                .bind(ts_ms(f.finished_at.as_ref()))
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
    .bind(ts_ms(js.started_at.as_ref()))
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
    let wall = duration_secs(usage.wall.as_ref());
    let stopped_ms = ts_ms(s.stopped_at.as_ref());
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
    .bind(now_ms())
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

/// Opens the accounting database as the consumer's idempotency store and creates the tables.
pub async fn open_store(path: &std::path::Path) -> Result<KeyStore, AccountingError> {
    let store = KeyStore::open(path).await?;
    migrate(&store).await?;
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_defaults_to_the_state_dir_and_can_be_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wnodes.toml");
        std::fs::write(&path, "site = \"T1\"\nhost = \"c.example.org\"\n").unwrap();
        let c = wnodes_runtime::config::load::<Config>("accounting", Some(&path)).unwrap();
        assert_eq!(
            c.service.database_path(std::path::Path::new("/var/lib/x")),
            std::path::Path::new("/var/lib/x/accounting.db")
        );
        std::fs::write(
            &path,
            "site = \"T1\"\nhost = \"c.example.org\"\n[accounting]\ndatabase = \"/srv/acct.db\"\n",
        )
        .unwrap();
        let c = wnodes_runtime::config::load::<Config>("accounting", Some(&path)).unwrap();
        assert_eq!(
            c.service.database_path(std::path::Path::new("/var/lib/x")),
            std::path::Path::new("/srv/acct.db")
        );
        std::fs::write(
            &path,
            "site = \"T1\"\nhost = \"c.example.org\"\n[accounting]\ndatabse = \"/srv/acct.db\"\n",
        )
        .unwrap();
        let e = wnodes_runtime::config::load::<Config>("accounting", Some(&path)).unwrap_err();
        assert!(e.to_string().contains("databse"), "{e}");
    }
}
