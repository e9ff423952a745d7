//! Reading usage records back (the `records` subcommand, the APEL exporter, tests), from
//! either store.

use wnodes_bus::{db::Pool, on_pool};

use crate::{AccountingError, StoreUrl};

pub use wnodes_accounting_types::UsageRecord;

/// `SELECT` of a usage record's columns, in [`UsageRecord`]'s order, followed by the rest of the
/// query (static text, as sqlx wants it).
macro_rules! select_records {
    ($rest:literal) => {
        concat!(
            "SELECT run_key, site, lrms, job_id, run_attempt, host, vm_id, vo, user_name,
            uid, gid, x509_dn, fqans, queue, cores, cpu_seconds, peak_memory_bytes, wall_seconds,
            exit_code, lrms_exit_code, stop_reason, started_ms, stopped_ms, recorded_ms,
            submitted_ms, image, image_sha256, memory_bytes, scratch_bytes, network_mode,
            benchmark_kind, benchmark_per_core, cpu_user_seconds, cpu_system_seconds,
            gateway_bytes_to_vm, gateway_bytes_from_vm ",
            $rest
        )
    };
}

/// Every record in `pool`, oldest first.
pub async fn list(pool: &Pool) -> Result<Vec<UsageRecord>, AccountingError> {
    let q = select_records!("FROM usage_records ORDER BY recorded_ms, run_key");
    Ok(on_pool!(pool, |p| sqlx::query_as(q).fetch_all(p).await)?)
}

/// The records whose VM stopped in `[from_ms, to_ms)`, by stop time.
pub async fn stopped_between(
    pool: &Pool,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<UsageRecord>, sqlx::Error> {
    let q = select_records!(
        "FROM usage_records WHERE stopped_ms >= $1 AND stopped_ms < $2 ORDER BY stopped_ms, run_key"
    );
    on_pool!(pool, |p| {
        sqlx::query_as(q)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(p)
            .await
    })
}

/// Opens the store for reading only (SQLite read-only; PostgreSQL sessions with
/// `default_transaction_read_only`).
pub async fn open_read_only(url: &StoreUrl) -> Result<Pool, AccountingError> {
    crate::store::tool_pool(url, crate::store::Access::ReadOnly)
        .await
        .map_err(|source| AccountingError::Database {
            store: url.to_string(),
            source,
        })
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
