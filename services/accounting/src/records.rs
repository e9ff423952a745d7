//! Reading usage records back (the `records` subcommand, tests).

use std::{path::Path, str::FromStr};

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

use crate::AccountingError;

pub use wnodes_accounting_types::UsageRecord;

/// `SELECT` of a usage record's columns, in [`UsageRecord`]'s order, followed by the rest of the
/// query (static text, as sqlx wants it).
macro_rules! select_records {
    ($rest:literal) => {
        concat!(
            "SELECT run_key, site, lrms, job_id, run_attempt, host, vm_id, vo, user_name,
            uid, gid, x509_dn, fqans, queue, cores, cpu_seconds, peak_memory_bytes, wall_seconds,
            exit_code, lrms_exit_code, stop_reason, started_ms, stopped_ms, recorded_ms ",
            $rest
        )
    };
}

/// Every record in `pool`, oldest first.
pub async fn list(pool: &SqlitePool) -> Result<Vec<UsageRecord>, AccountingError> {
    let q = select_records!("FROM usage_records ORDER BY recorded_ms, run_key");
    Ok(sqlx::query_as(q).fetch_all(pool).await?)
}

/// The records whose VM stopped in `[from_ms, to_ms)`, by stop time.
pub async fn stopped_between(
    pool: &SqlitePool,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<UsageRecord>, sqlx::Error> {
    let q = select_records!(
        "FROM usage_records WHERE stopped_ms >= ? AND stopped_ms < ? ORDER BY stopped_ms, run_key"
    );
    sqlx::query_as(q)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(pool)
        .await
}

/// Opens the accounting database read-only.
pub async fn open_read_only(path: &Path) -> Result<SqlitePool, AccountingError> {
    let err = |source| AccountingError::Database {
        path: path.display().to_string(),
        source,
    };
    let opts = SqliteConnectOptions::from_str("sqlite:")
        .map_err(err)?
        .filename(path)
        .read_only(true);
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .map_err(err)
}

/// Renders records as an aligned text table.
pub fn render_table(records: &[UsageRecord]) -> String {
    let mut out = format!(
        "{:<40} {:<10} {:<12} {:>5} {:>10} {:>12} {:>10} {:>5} {:>5}  {}\n",
        "RUN", "VO", "USER", "CORES", "CPU_S", "PEAK_MEM_B", "WALL_S", "EXIT", "LRMS", "HOST"
    );
    for r in records {
        out.push_str(&format!(
            "{:<40} {:<10} {:<12} {:>5} {:>10.2} {:>12} {:>10.2} {:>5} {:>5}  {}\n",
            r.run_key,
            r.vo,
            r.user_name,
            r.cores,
            r.cpu_seconds,
            r.peak_memory_bytes,
            r.wall_seconds,
            r.exit_code,
            r.lrms_exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            r.host
        ));
    }
    out
}
