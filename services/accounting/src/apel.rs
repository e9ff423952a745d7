//! `apel-export`: usage records into APEL messages in an SSM outgoing queue
//! ([`wnodes_apel`]), remembering what was exported in the accounting database.
//!
//! Job records go out once each. Summaries, sync records and cloud records are keyed as APEL
//! keys them (month/site/user/VO/group/role/submit host/...; month/site/submit host; VM and
//! month) and go out again when their text changes, since APEL replaces them by key. Summaries
//! and sync records cover whole months: every month the period touches, counted over the
//! whole month, so a partial period never replaces a month's figures with partial ones.
//!
//! Each message is written in four steps, so that a crash at any point neither loses a record
//! nor queues one twice:
//!
//! 1. the message is staged (written and synced outside the queue, [`OutgoingQueue::stage`]);
//! 2. `apel_pending` records the staged file and the keys (and texts) it holds;
//! 3. the staged file is renamed into the queue ([`OutgoingQueue::commit`]);
//! 4. `apel_exported` gets the keys and the pending row goes, in one transaction.
//!
//! Each run first settles the pending rows a crashed run left: a staged file still there was
//! never queued (it is removed and its records are exported again); a staged file gone was
//! queued, whether or not `ssmsend` has sent it since (its keys are recorded as exported).
//! Staged files without a pending row (a crash between 1 and 2) are removed. One exporter at a
//! time per queue: a lock on the staging directory is held for the run.
//!
//! Records still waiting for their job's identity (no VO and no user: `vm.stopped` handled
//! before `job.started`) are left for a later run.
//!
//! `serve` runs the same export periodically when `[accounting.apel_export]` is set
//! ([`run_periodic`]).
//!
//! Failpoints (feature `failpoints`, `WNODES_FAILPOINT=<name>`, the process aborts):
//! `apel-before-queue` (after step 2) and `apel-after-queue` (after step 3).

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
};

use wnodes_apel::{
    ApelConfig, ApelError, CloudRecord, JobRecord, Kind, OutgoingQueue, SummaryRecord, SyncRecord,
    message::{self, MAX_MESSAGE_BYTES, MAX_RECORDS},
    records::ApelRecord,
};
use wnodes_bus::{
    db::{Pool, Tx},
    on_db, on_pool,
};

use crate::{
    StoreUrl,
    records::{self, UsageRecord},
};

/// What can go wrong exporting to APEL.
#[derive(Debug, thiserror::Error)]
pub enum ApelExportError {
    #[error("invalid date {value:?} (YYYY-MM-DD)")]
    Date { value: String },
    #[error("the period is empty: --from {from} is not before --to {to}")]
    EmptyPeriod { from: String, to: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreUrlError),
    #[error("accounting database {store}")]
    Open {
        store: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("accounting database {store}: migrations")]
    Migrate {
        store: String,
        #[source]
        source: crate::AccountingError,
    },
    #[error("accounting database: {op}")]
    Sql {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("APEL {kind} export")]
    Apel {
        kind: &'static str,
        #[source]
        source: ApelError,
    },
    #[error("another apel-export holds {path}")]
    Locked { path: String },
    #[error("pending export {staged} holds an unreadable key list")]
    Pending {
        staged: String,
        #[source]
        source: serde_json::Error,
    },
}

fn sql(op: &'static str) -> impl FnOnce(sqlx::Error) -> ApelExportError {
    move |source| ApelExportError::Sql { op, source }
}

fn apel(kind: &'static str) -> impl FnOnce(ApelError) -> ApelExportError {
    move |source| ApelExportError::Apel { kind, source }
}

/// A `YYYY-MM-DD` date as Unix milliseconds at 00:00 UTC.
///
/// # Errors
/// [`ApelExportError::Date`].
pub fn parse_date(value: &str) -> Result<i64, ApelExportError> {
    let bad = || ApelExportError::Date {
        value: value.to_string(),
    };
    let parts: Vec<&str> = value.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return Err(bad());
    }
    let y: i32 = y.parse().map_err(|_| bad())?;
    let m: u8 = m.parse().map_err(|_| bad())?;
    let d: u8 = d.parse().map_err(|_| bad())?;
    let month = time::Month::try_from(m).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(y, month, d).map_err(|_| bad())?;
    Ok(date.midnight().assume_utc().unix_timestamp() * 1000)
}

/// Opens the store for export (durable commits: SQLite `synchronous=FULL`, PostgreSQL
/// `synchronous_commit = on`) and applies the migrations (the exporter's tables among them).
///
/// # Errors
/// [`ApelExportError::Open`], [`ApelExportError::Migrate`].
pub async fn open(url: &StoreUrl) -> Result<Pool, ApelExportError> {
    let pool = crate::store::tool_pool(url, crate::store::Access::Write)
        .await
        .map_err(|source| ApelExportError::Open {
            store: url.to_string(),
            source,
        })?;
    crate::migrate(&pool)
        .await
        .map_err(|source| ApelExportError::Migrate {
            store: url.to_string(),
            source,
        })?;
    Ok(pool)
}

/// What one kind's export did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindReport {
    /// Records queued.
    pub records: usize,
    /// Messages queued.
    pub messages: usize,
    /// Records already exported as they are (skipped).
    pub unchanged: usize,
}

/// What an export did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    pub kinds: BTreeMap<Kind, KindReport>,
    /// Usage records APEL cannot take (run key, why), left out of every kind.
    pub unexportable: Vec<(String, String)>,
    /// Usage records still waiting for their job's identity (`job.started` not handled yet:
    /// no VO and no user), left out of every kind until a later run: a job record goes once,
    /// and a summary keyed by an empty VO would never be replaced.
    pub waiting: Vec<String>,
    /// Messages a crashed run had queued, now recorded as exported.
    pub recovered_queued: usize,
    /// Messages a crashed run had staged but not queued, removed (their records went again).
    pub recovered_unqueued: usize,
}

/// The period and what to export.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// Unix milliseconds, inclusive.
    pub from_ms: i64,
    /// Unix milliseconds, exclusive.
    pub to_ms: i64,
    pub kinds: Vec<Kind>,
    pub out: PathBuf,
    /// Largest message in bytes ([`MAX_MESSAGE_BYTES`] by default).
    pub max_message_bytes: usize,
    /// Most records per message ([`MAX_RECORDS`] by default).
    pub max_records: usize,
}

impl ExportRequest {
    /// A request with the default message limits.
    pub fn new(from_ms: i64, to_ms: i64, kinds: Vec<Kind>, out: PathBuf) -> Self {
        Self {
            from_ms,
            to_ms,
            kinds,
            out,
            max_message_bytes: MAX_MESSAGE_BYTES,
            max_records: MAX_RECORDS,
        }
    }
}

#[cfg(feature = "failpoints")]
fn crash_at(name: &str) {
    if std::env::var("WNODES_FAILPOINT").ok().as_deref() == Some(name) {
        eprintln!("wnodes-accounting: failpoint {name} reached: aborting");
        std::process::abort();
    }
}

#[cfg(not(feature = "failpoints"))]
fn crash_at(_name: &str) {}

/// The first millisecond of the month (UTC) holding `ms`, and of the month after it.
fn month_bounds(ms: i64) -> (i64, i64) {
    let (y, m) = wnodes_apel::records::year_month(ms.div_euclid(1000));
    let start = |y: i32, m: u8| {
        time::Month::try_from(m)
            .ok()
            .and_then(|mo| time::Date::from_calendar_date(y, mo, 1).ok())
            .map_or(0, |d| d.midnight().assume_utc().unix_timestamp() * 1000)
    };
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (start(y, m), start(ny, nm))
}

/// The period a periodic export covers at `now_ms`: from the first day (UTC) of the month
/// `months_back` months before the current one, to the start of tomorrow (UTC).
pub fn rolling_period(now_ms: i64, months_back: u8) -> (i64, i64) {
    let (mut start, _) = month_bounds(now_ms);
    for _ in 0..months_back {
        start = month_bounds(start - 1).0;
    }
    let day = 86_400_000;
    (start, now_ms.div_euclid(day) * day + day)
}

/// Runs [`export`] at start and then every `every` until `shutdown`: the service's
/// `[accounting.apel_export]`. A failed export is logged and tried again at the next tick.
///
/// # Errors
/// Opening the database.
pub async fn run_periodic(
    db: StoreUrl,
    cfg: ApelConfig,
    periodic: crate::config::PeriodicApelExport,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), ApelExportError> {
    let pool = open(&db).await?;
    loop {
        let (from_ms, to_ms) = rolling_period(wnodes_proto::time::now_ms(), periodic.months_back);
        let req = ExportRequest::new(from_ms, to_ms, Kind::ALL.to_vec(), periodic.out.clone());
        match export(&pool, &cfg, &req).await {
            Ok(report) => {
                let records: usize = report.kinds.values().map(|k| k.records).sum();
                let messages: usize = report.kinds.values().map(|k| k.messages).sum();
                tracing::info!(
                    records,
                    messages,
                    unexportable = report.unexportable.len(),
                    waiting = report.waiting.len(),
                    out = %periodic.out.display(),
                    "APEL export done."
                );
            }
            Err(e) => {
                tracing::warn!(error = %wnodes_bus::ErrorChain(&e), "APEL export failed; trying again at the next tick.");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(periodic.every) => {}
        }
    }
    pool.close().await;
    Ok(())
}

/// Exports the usage records of the period into the queue at `req.out`.
///
/// # Errors
/// [`ApelExportError`]: the database, the queue, or a summary without a benchmark.
pub async fn export(
    pool: &Pool,
    cfg: &ApelConfig,
    req: &ExportRequest,
) -> Result<ExportReport, ApelExportError> {
    if req.from_ms >= req.to_ms {
        return Err(ApelExportError::EmptyPeriod {
            from: req.from_ms.to_string(),
            to: req.to_ms.to_string(),
        });
    }
    cfg.validate().map_err(apel("config"))?;
    let queue = OutgoingQueue::open(&req.out).map_err(apel("queue"))?;
    let _lock = lock(&queue)?;
    let mut report = ExportReport::default();
    recover(pool, &queue, &mut report).await?;

    let mut ex = Exporter {
        pool,
        queue: &queue,
        req,
        report: &mut report,
    };
    let needs_months = req
        .kinds
        .iter()
        .any(|k| matches!(k, Kind::Summary | Kind::Sync));
    // One read: the whole months the period touches when summaries need them (the period is
    // inside them), else the period alone.
    let (in_period, months) = if needs_months {
        let (start, _) = month_bounds(req.from_ms);
        let (_, end) = month_bounds(req.to_ms - 1);
        let months = records::stopped_between(pool, start, end)
            .await
            .map_err(sql("read usage records"))?;
        let in_period: Vec<UsageRecord> = months
            .iter()
            .filter(|r| {
                r.stopped_ms
                    .is_some_and(|t| t >= req.from_ms && t < req.to_ms)
            })
            .cloned()
            .collect();
        (in_period, months)
    } else {
        let in_period = records::stopped_between(pool, req.from_ms, req.to_ms)
            .await
            .map_err(sql("read usage records"))?;
        (in_period, Vec::new())
    };

    let mut waiting = std::collections::BTreeSet::new();
    let mut identified = |recs: Vec<UsageRecord>| -> Vec<UsageRecord> {
        recs.into_iter()
            .filter(|u| {
                let known = !(u.vo.is_empty() && u.user_name.is_empty());
                if !known {
                    waiting.insert(u.run_key.clone());
                }
                known
            })
            .collect()
    };
    let in_period = identified(in_period);
    let months = identified(months);
    let mut unexportable = BTreeMap::new();
    let mut jobs_of = |recs: &[UsageRecord]| -> Vec<(String, JobRecord)> {
        recs.iter()
            .filter_map(|u| match JobRecord::from_usage(u, cfg) {
                Ok(j) => Some((u.run_key.clone(), j)),
                Err(e) => {
                    unexportable.insert(u.run_key.clone(), e.to_string());
                    None
                }
            })
            .collect()
    };
    let period_jobs = jobs_of(&in_period);
    let month_jobs: Vec<JobRecord> = jobs_of(&months).into_iter().map(|(_, j)| j).collect();

    for kind in &req.kinds {
        match kind {
            Kind::Job => {
                let done = exported_keys(pool, Kind::Job).await?;
                let (skip, todo): (Vec<_>, Vec<_>) = period_jobs
                    .iter()
                    .cloned()
                    .partition(|(k, _)| done.contains(k));
                ex.report.kinds.entry(Kind::Job).or_default().unchanged = skip.len();
                let entries = todo
                    .into_iter()
                    .map(|(k, j)| (k, j, String::new()))
                    .collect();
                ex.write(entries).await?;
            }
            Kind::Summary => {
                let sums = SummaryRecord::summarise(&month_jobs).map_err(apel("summary"))?;
                let keyed = sums.into_iter().map(|s| (s.key(), s)).collect();
                ex.write_changed(keyed).await?;
            }
            Kind::Cloud => {
                let mut vms = Vec::new();
                for u in &in_period {
                    match CloudRecord::from_usage(u, cfg) {
                        Ok(c) => vms.push((c.key(), c)),
                        Err(e) => {
                            unexportable.insert(u.run_key.clone(), e.to_string());
                        }
                    }
                }
                ex.write_changed(vms).await?;
            }
            Kind::Sync => {
                let syncs = SyncRecord::count(&month_jobs);
                let keyed = syncs.into_iter().map(|s| (s.key(), s)).collect();
                ex.write_changed(keyed).await?;
            }
        }
    }
    report.unexportable = unexportable.into_iter().collect();
    report.waiting = waiting.into_iter().collect();
    Ok(report)
}

fn lock(queue: &OutgoingQueue) -> Result<nix::fcntl::Flock<std::fs::File>, ApelExportError> {
    let path = queue
        .root()
        .join(wnodes_apel::dirq::STAGING_DIR)
        .join("lock");
    let locked = || ApelExportError::Locked {
        path: path.display().to_string(),
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ApelExportError::Apel {
            kind: "queue",
            source: ApelError::Queue {
                op: "open",
                path: path.display().to_string(),
                source,
            },
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| locked())
}

async fn exported_keys(pool: &Pool, kind: Kind) -> Result<HashSet<String>, ApelExportError> {
    let rows: Vec<(String,)> = on_pool!(pool, |p| {
        sqlx::query_as("SELECT run_key FROM apel_exported WHERE kind = $1")
            .bind(kind.name())
            .fetch_all(p)
            .await
    })
    .map_err(sql("read exported keys"))?;
    Ok(rows.into_iter().map(|(k,)| k).collect())
}

type Entries = Vec<(String, String)>;

/// Settles what a crashed run left (see the module docs).
async fn recover(
    pool: &Pool,
    queue: &OutgoingQueue,
    report: &mut ExportReport,
) -> Result<(), ApelExportError> {
    let rows: Vec<(String, String, String, String)> = on_pool!(pool, |p| {
        sqlx::query_as("SELECT staged, queue, kind, entries FROM apel_pending ORDER BY created_at")
            .fetch_all(p)
            .await
    })
    .map_err(sql("read pending exports"))?;
    let mut known = HashSet::new();
    for (staged, dir, kind, entries) in rows {
        let q = if Path::new(&dir) == queue.root() {
            queue.clone()
        } else {
            OutgoingQueue::open(Path::new(&dir)).map_err(apel("queue"))?
        };
        if q.root() == queue.root() {
            known.insert(staged.clone());
        }
        let mut tx = pool.begin().await.map_err(sql("begin"))?;
        if q.is_staged(&staged).map_err(apel("queue"))? {
            // Never queued: drop it; its records are exported again.
            q.discard(&staged).map_err(apel("queue"))?;
            report.recovered_unqueued += 1;
        } else {
            let entries: Entries =
                serde_json::from_str(&entries).map_err(|source| ApelExportError::Pending {
                    staged: staged.clone(),
                    source,
                })?;
            for (key, record) in entries {
                mark(&mut tx, &key, &kind, &record).await?;
            }
            report.recovered_queued += 1;
        }
        settle(&mut tx, &dir, &staged).await?;
        tx.commit().await.map_err(sql("commit"))?;
    }
    for staged in queue.staged().map_err(apel("queue"))? {
        if !known.contains(&staged) {
            queue.discard(&staged).map_err(apel("queue"))?;
        }
    }
    Ok(())
}

async fn mark(tx: &mut Tx, key: &str, kind: &str, record: &str) -> Result<(), ApelExportError> {
    let now = wnodes_proto::time::now_ms();
    on_db!(&mut tx.db(), |c| {
        sqlx::query(
            "INSERT INTO apel_exported (run_key, kind, record, exported_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (run_key, kind) DO UPDATE SET record = excluded.record,
                 exported_at = excluded.exported_at",
        )
        .bind(key)
        .bind(kind)
        .bind(record)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })
    .map_err(sql("record an export"))?;
    Ok(())
}

/// Removes a pending row (its message is settled) inside `tx`.
async fn settle(tx: &mut Tx, queue: &str, staged: &str) -> Result<(), ApelExportError> {
    on_db!(&mut tx.db(), |c| {
        sqlx::query("DELETE FROM apel_pending WHERE queue = $1 AND staged = $2")
            .bind(queue)
            .bind(staged)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })
    .map_err(sql("settle a pending export"))?;
    Ok(())
}

struct Exporter<'a> {
    pool: &'a Pool,
    queue: &'a OutgoingQueue,
    req: &'a ExportRequest,
    report: &'a mut ExportReport,
}

impl Exporter<'_> {
    /// Queues the records whose text differs from what was last exported under their key.
    async fn write_changed<R: ApelRecord>(
        &mut self,
        keyed: Vec<(String, R)>,
    ) -> Result<(), ApelExportError> {
        let rows: Vec<(String, String)> = on_pool!(self.pool, |p| {
            sqlx::query_as("SELECT run_key, record FROM apel_exported WHERE kind = $1")
                .bind(R::KIND.name())
                .fetch_all(p)
                .await
        })
        .map_err(sql("read exported records"))?;
        let last: BTreeMap<String, String> = rows.into_iter().collect();
        let mut todo = Vec::new();
        let mut unchanged = 0;
        for (key, r) in keyed {
            let text = message::render(&r).map_err(apel(R::KIND.name()))?;
            if last.get(&key) == Some(&text) {
                unchanged += 1;
            } else {
                todo.push((key, r, text));
            }
        }
        self.report.kinds.entry(R::KIND).or_default().unchanged = unchanged;
        self.write(todo).await
    }

    /// Queues `(key, record, text to remember)` in messages, each by the four steps.
    async fn write<R: ApelRecord>(
        &mut self,
        entries: Vec<(String, R, String)>,
    ) -> Result<(), ApelExportError> {
        let kind = R::KIND;
        let rendered = entries
            .iter()
            .map(|(_, r, _)| message::render(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(apel(kind.name()))?;
        let messages = message::split(
            kind,
            &rendered,
            self.req.max_message_bytes,
            self.req.max_records,
        )
        .map_err(apel(kind.name()))?;
        let queue_dir = self.queue.root().display().to_string();
        for m in messages {
            let held: Entries = entries[m.records.clone()]
                .iter()
                .map(|(k, _, t)| (k.clone(), t.clone()))
                .collect();
            let staged = self
                .queue
                .stage(m.text.as_bytes())
                .map_err(apel(kind.name()))?;
            let json = serde_json::to_string(&held).map_err(|source| ApelExportError::Pending {
                staged: staged.clone(),
                source,
            })?;
            let now = wnodes_proto::time::now_ms();
            on_pool!(self.pool, |p| {
                sqlx::query(
                    "INSERT INTO apel_pending (staged, queue, kind, entries, created_at)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&staged)
                .bind(&queue_dir)
                .bind(kind.name())
                .bind(&json)
                .bind(now)
                .execute(p)
                .await
                .map(|r| r.rows_affected())
            })
            .map_err(sql("record a pending export"))?;
            crash_at("apel-before-queue");
            let element = self.queue.commit(&staged).map_err(apel(kind.name()))?;
            crash_at("apel-after-queue");
            let mut tx = self.pool.begin().await.map_err(sql("begin"))?;
            for (key, text) in &held {
                mark(&mut tx, key, kind.name(), text).await?;
            }
            settle(&mut tx, &queue_dir, &staged).await?;
            tx.commit().await.map_err(sql("commit"))?;
            tracing::info!(
                kind = kind.name(),
                element,
                records = held.len(),
                "APEL message queued."
            );
            let r = self.report.kinds.entry(kind).or_default();
            r.records += held.len();
            r.messages += 1;
        }
        self.report.kinds.entry(kind).or_default();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_stores_and_the_rolling_period() {
        assert_eq!(parse_date("2026-11-01").unwrap(), 1_793_491_200_000);
        for bad in ["2026-11-31", "2026-1-01", "26-11-01", "2026-11-01T00", ""] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
        let url = |s: &str| s.parse::<StoreUrl>();
        assert_eq!(
            url("sqlite:///srv/a.db").unwrap(),
            StoreUrl::Sqlite("/srv/a.db".into())
        );
        assert_eq!(url("sqlite:a.db").unwrap(), StoreUrl::Sqlite("a.db".into()));
        assert_eq!(
            url("/srv/a.db").unwrap(),
            StoreUrl::Sqlite("/srv/a.db".into())
        );
        assert_eq!(
            url("postgres://acct@h/db").unwrap(),
            StoreUrl::Postgres("postgres://acct@h/db".into())
        );
        assert!(url("sqlite://a.db?mode=ro").is_err());
        assert!(url("mysql://h/db").is_err());
        assert!(url("").is_err());
        // 2026-01-15T10:00Z, one month back: 2025-12-01 .. 2026-01-16.
        let now = parse_date("2026-01-15").unwrap() + 10 * 3_600_000;
        assert_eq!(
            rolling_period(now, 1),
            (
                parse_date("2025-12-01").unwrap(),
                parse_date("2026-01-16").unwrap()
            )
        );
        assert_eq!(rolling_period(now, 0).0, parse_date("2026-01-01").unwrap());
    }
}
