//! The report: usage of a period summed per VO, user, queue, day or month (UTC), on either store
//! ([`report`]), and the gRPC API that serves it (`proto/wnodes/v1/accounting.proto`,
//! [`ReportApi`], on `[accounting] grpc_addr`).
//!
//! The database groups by (VO, user, queue, day of the VM's stop) with sums and maxima, in the
//! SQL both stores share; the rows are then merged into the groups asked for (sums add up, maxima
//! take the larger), so a month is the merge of its days.

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};
use wnodes_bus::{db::Pool, on_pool};
use wnodes_proto::{
    time,
    v1::{ReportKey, ReportRequest, ReportResponse, ReportRow, accounting_server},
};

/// A report's question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportQuery {
    /// Unix milliseconds, inclusive (VM stop time).
    pub from_ms: i64,
    /// Unix milliseconds, exclusive.
    pub to_ms: i64,
    /// Row keys, in column order; empty: one total row.
    pub group_by: Vec<ReportKey>,
    /// Filters (empty: any).
    pub vo: String,
    pub user: String,
    pub queue: String,
}

/// Why a report request cannot be answered as asked.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("the period is empty or reversed: from {from_ms} ms is not before to {to_ms} ms")]
    Period { from_ms: i64, to_ms: i64 },
    #[error("the request lacks `{0}`")]
    Missing(&'static str),
    #[error("group_by holds an unknown or unspecified key ({0})")]
    Key(i32),
    #[error("group_by names {0:?} twice")]
    Repeated(ReportKey),
    #[error("reading the usage records")]
    Sql(#[source] sqlx::Error),
}

const DAY_MS: i64 = 86_400_000;

#[derive(sqlx::FromRow)]
struct DayRow {
    vo: String,
    user_name: String,
    queue: String,
    day: i64,
    jobs: i64,
    wall: f64,
    cpu: f64,
    core: f64,
    peak: i64,
}

impl ReportQuery {
    /// From the gRPC request.
    ///
    /// # Errors
    /// [`ReportError`] naming what is wrong.
    pub fn from_request(r: &ReportRequest) -> Result<Self, ReportError> {
        let from = r.from.as_ref().ok_or(ReportError::Missing("from"))?;
        let to = r.to.as_ref().ok_or(ReportError::Missing("to"))?;
        let mut group_by = Vec::new();
        for &k in &r.group_by {
            let key = ReportKey::try_from(k)
                .ok()
                .filter(|k| *k != ReportKey::Unspecified)
                .ok_or(ReportError::Key(k))?;
            if group_by.contains(&key) {
                return Err(ReportError::Repeated(key));
            }
            group_by.push(key);
        }
        let q = Self {
            from_ms: time::timestamp_ms(from),
            to_ms: time::timestamp_ms(to),
            group_by,
            vo: r.vo.clone(),
            user: r.user.clone(),
            queue: r.queue.clone(),
        };
        if q.from_ms >= q.to_ms {
            return Err(ReportError::Period {
                from_ms: q.from_ms,
                to_ms: q.to_ms,
            });
        }
        Ok(q)
    }
}

/// `YYYY-MM-DD` and `YYYY-MM` of a day number (days since 1970-01-01, UTC).
fn day_and_month(day: i64) -> (String, String) {
    let date = ::time::OffsetDateTime::from_unix_timestamp(day * 86_400)
        .map(|t| t.date())
        .unwrap_or(::time::Date::MIN);
    let (y, m, d) = (date.year(), u8::from(date.month()), date.day());
    (format!("{y:04}-{m:02}-{d:02}"), format!("{y:04}-{m:02}"))
}

/// The report's rows, sorted by their keys.
///
/// # Errors
/// [`ReportError::Sql`].
pub async fn report(pool: &Pool, q: &ReportQuery) -> Result<Vec<ReportRow>, ReportError> {
    let sql = "SELECT vo, user_name, queue, stopped_ms / 86400000 AS day, COUNT(*) AS jobs,
            SUM(wall_seconds) AS wall, SUM(cpu_seconds) AS cpu,
            SUM(wall_seconds * cores) AS core, MAX(peak_memory_bytes) AS peak
        FROM usage_records
        WHERE stopped_ms >= $1 AND stopped_ms < $2
            AND ($3 = '' OR vo = $3) AND ($4 = '' OR user_name = $4) AND ($5 = '' OR queue = $5)
        GROUP BY vo, user_name, queue, stopped_ms / 86400000";
    let rows: Vec<DayRow> = on_pool!(pool, |p| {
        sqlx::query_as(sql)
            .bind(q.from_ms)
            .bind(q.to_ms)
            .bind(&q.vo)
            .bind(&q.user)
            .bind(&q.queue)
            .fetch_all(p)
            .await
    })
    .map_err(ReportError::Sql)?;
    let mut groups: BTreeMap<Vec<String>, ReportRow> = BTreeMap::new();
    for r in rows {
        debug_assert!(r.day * DAY_MS >= q.from_ms - DAY_MS);
        let (day, month) = day_and_month(r.day);
        let keys: Vec<String> = q
            .group_by
            .iter()
            .map(|k| match k {
                ReportKey::Vo => r.vo.clone(),
                ReportKey::User => r.user_name.clone(),
                ReportKey::Queue => r.queue.clone(),
                ReportKey::Day => day.clone(),
                ReportKey::Month | ReportKey::Unspecified => month.clone(),
            })
            .collect();
        let row = groups.entry(keys.clone()).or_insert_with(|| ReportRow {
            keys,
            ..Default::default()
        });
        row.jobs += u64::try_from(r.jobs).unwrap_or_default();
        row.wall_seconds += r.wall;
        row.cpu_seconds += r.cpu;
        row.core_seconds += r.core;
        row.max_peak_memory_bytes = row
            .max_peak_memory_bytes
            .max(u64::try_from(r.peak).unwrap_or_default());
    }
    Ok(groups.into_values().collect())
}

/// The gRPC service: reads through its own read-only pool.
#[derive(Debug, Clone)]
pub struct ReportApi {
    pub pool: Pool,
}

#[tonic::async_trait]
impl accounting_server::Accounting for ReportApi {
    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let q = ReportQuery::from_request(request.get_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let rows = report(&self.pool, &q).await.map_err(|e| {
            let request_id = uuid::Uuid::now_v7().simple().to_string();
            tracing::error!(%request_id, error = %wnodes_bus::ErrorChain(&e), "Report failed.");
            Status::internal(format!(
                "the report failed: internal error; see the accounting log, request id {request_id}"
            ))
        })?;
        Ok(Response::new(ReportResponse { rows }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_months_are_utc_calendar_dates() {
        assert_eq!(
            day_and_month(0),
            ("1970-01-01".to_owned(), "1970-01".to_owned())
        );
        // 2026-11-30 is day 20_787.
        assert_eq!(
            day_and_month(20_787),
            ("2026-11-30".to_owned(), "2026-11".to_owned())
        );
    }

    #[test]
    fn requests_are_checked_and_name_what_is_wrong() {
        let ts = |s| {
            Some(prost_types::Timestamp {
                seconds: s,
                nanos: 0,
            })
        };
        let ok = ReportRequest {
            from: ts(0),
            to: ts(86_400),
            group_by: vec![ReportKey::Vo as i32, ReportKey::Month as i32],
            ..Default::default()
        };
        let q = ReportQuery::from_request(&ok).unwrap();
        assert_eq!(q.group_by, [ReportKey::Vo, ReportKey::Month]);
        assert_eq!((q.from_ms, q.to_ms), (0, 86_400_000));
        let err = |r: ReportRequest| ReportQuery::from_request(&r).unwrap_err().to_string();
        assert!(
            err(ReportRequest {
                to: ts(0),
                ..ok.clone()
            })
            .contains("not before")
        );
        assert!(
            err(ReportRequest {
                from: None,
                ..ok.clone()
            })
            .contains("`from`")
        );
        assert!(
            err(ReportRequest {
                group_by: vec![0],
                ..ok.clone()
            })
            .contains("(0)")
        );
        assert!(
            err(ReportRequest {
                group_by: vec![42],
                ..ok.clone()
            })
            .contains("(42)")
        );
        assert!(
            err(ReportRequest {
                group_by: vec![1, 1],
                ..ok
            })
            .contains("twice"),
            "a key twice"
        );
    }
}
