//! The handler's statements, set-based: each takes the rows of many events and writes them in
//! one statement: on SQLite a multi-row `VALUES` (per chunk of [`CHUNK`] rows), on PostgreSQL
//! one array per column through `unnest` (one statement text whatever the batch's size, so
//! it is parsed and planned once per connection). A single message is a batch of one.
//!
//! ```text
//! lock_runs        PostgreSQL: the batch's runs' advisory locks, in one order
//! upsert_jobs      accounting_jobs: one INSERT … ON CONFLICT DO UPDATE per event type
//! backfill         usage_records written before the event came get its columns (SQLite;
//!                  on PostgreSQL part of the upsert's statement)
//! job_rows         what is stored of the runs whose VM stopped
//! insert_records   usage_records … ON CONFLICT DO NOTHING RETURNING the run keys inserted
//! ```

use std::collections::HashSet;

use wnodes_bus::{db::Db, on_db};

/// Rows per statement: the widest (`usage_records`, 34 columns) stays far below SQLite's
/// (32,766) and PostgreSQL's (65,535) limits on bound parameters.
pub(crate) const CHUNK: usize = 256;

/// A bound value of one column.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val {
    Text(String),
    Int(Option<i64>),
    Real(Option<f64>),
}

/// One row: the run key, then its values in the statement's column order.
pub(crate) type Row = (String, Vec<Val>);

/// Serialises the transactions of the batch's runs with every other transaction on them: a
/// transaction-scoped advisory lock per run key, taken in the order of the locks' ids so that
/// two batches never wait on each other in a cycle. On SQLite every write transaction is
/// serial already (`BEGIN IMMEDIATE` on one connection).
pub(crate) async fn lock_runs(db: &mut Db<'_>, keys: &[&str]) -> Result<(), sqlx::Error> {
    if let Db::Postgres(c) = db
        && !keys.is_empty()
    {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        sqlx::query(
            "SELECT pg_advisory_xact_lock(h) FROM (
                SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k ORDER BY h
             ) AS locks",
        )
        .bind(keys)
        .execute(&mut **c)
        .await?;
    }
    Ok(())
}

fn push_val<DB>(row: &mut sqlx::query_builder::Separated<'_, DB, &'static str>, v: &Val)
where
    DB: sqlx::Database,
    for<'t> &'t str: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> Option<i64>: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> Option<f64>: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    match v {
        Val::Text(s) => row.push_bind(s.as_str()),
        Val::Int(i) => row.push_bind(*i),
        Val::Real(r) => row.push_bind(*r),
    };
}

/// A column of a PostgreSQL batch, bound as one array: the rows of a batch go through
/// `unnest($1::text[], $2::bigint[], …)`, so the statement's text (and its plan, prepared
/// once per connection) is the same whatever the batch's size. (Multi-row `VALUES` would be
/// a new statement, parsed and planned again, for every batch size.)
enum Column {
    Text(Vec<String>),
    Int(Vec<Option<i64>>),
    Real(Vec<Option<f64>>),
}

/// The run keys, then each value column of `rows` (all rows of one statement have the same
/// shape).
fn array_columns(rows: &[Row]) -> Vec<Column> {
    let width = rows.first().map_or(0, |(_, vals)| vals.len());
    let mut cols = vec![Column::Text(rows.iter().map(|(k, _)| k.clone()).collect())];
    for i in 0..width {
        let at = |r: &Row| r.1.get(i).cloned();
        cols.push(match rows.first().and_then(at) {
            Some(Val::Int(_)) => Column::Int(
                rows.iter()
                    .map(|r| match at(r) {
                        Some(Val::Int(v)) => v,
                        _ => None,
                    })
                    .collect(),
            ),
            Some(Val::Real(_)) => Column::Real(
                rows.iter()
                    .map(|r| match at(r) {
                        Some(Val::Real(v)) => v,
                        _ => None,
                    })
                    .collect(),
            ),
            _ => Column::Text(
                rows.iter()
                    .map(|r| match at(r) {
                        Some(Val::Text(v)) => v,
                        _ => String::new(),
                    })
                    .collect(),
            ),
        });
    }
    cols
}

/// Appends `unnest($1::text[], $2::bigint[], …)` of `cols` to `q`.
fn push_unnest(q: &mut sqlx::QueryBuilder<sqlx::Postgres>, cols: Vec<Column>) {
    q.push("unnest(");
    for (i, c) in cols.into_iter().enumerate() {
        if i > 0 {
            q.push(", ");
        }
        match c {
            Column::Text(v) => q.push_bind(v).push("::text[]"),
            Column::Int(v) => q.push_bind(v).push("::bigint[]"),
            Column::Real(v) => q.push_bind(v).push("::float8[]"),
        };
    }
    q.push(")");
}

fn key_array(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| (*k).to_owned()).collect()
}

/// `INSERT INTO accounting_jobs (run_key, columns…) VALUES … ON CONFLICT (run_key) DO UPDATE`
/// of `columns`. A run key must appear once in `rows` (PostgreSQL refuses to update a row
/// twice in one statement).
///
/// `fill` (`SET` from `j`, a condition): then the records written before these rows' events
/// get them too ([`backfill`]): on PostgreSQL in the same statement (the upsert's `RETURNING`
/// rows as `j` of the `UPDATE`), on SQLite right after it.
pub(crate) async fn upsert_jobs(
    db: &mut Db<'_>,
    columns: &[&str],
    rows: &[Row],
    fill: Option<(&str, &str)>,
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let head = format!(
        "INSERT INTO accounting_jobs (run_key, {}) ",
        columns.join(", ")
    );
    let tail = format!(
        " ON CONFLICT (run_key) DO UPDATE SET {}",
        columns
            .iter()
            .map(|c| format!("{c} = excluded.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Db::Postgres(c) = db {
        let mut q = sqlx::QueryBuilder::new(match fill {
            Some(_) => format!("WITH j AS ({head}"),
            None => head.clone(),
        });
        q.push("SELECT * FROM ");
        push_unnest(&mut q, array_columns(rows));
        q.push(tail.as_str());
        if let Some((set, only_if)) = fill {
            q.push(format!(
                " RETURNING *) UPDATE usage_records SET {set} FROM j
                 WHERE usage_records.run_key = j.run_key AND {only_if}"
            ));
        }
        q.build().execute(&mut **c).await?;
        return Ok(());
    }
    for chunk in rows.chunks(CHUNK) {
        on_db!(&mut *db, |c| {
            let mut q = sqlx::QueryBuilder::new(head.as_str());
            q.push_values(chunk, |mut b, (key, vals)| {
                b.push_bind(key.as_str());
                for v in vals {
                    push_val(&mut b, v);
                }
            });
            q.push(tail.as_str());
            q.build().execute(c).await.map(|r| r.rows_affected())
        })?;
    }
    if let Some((set, only_if)) = fill {
        let keys: Vec<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
        backfill(db, set, only_if, &keys).await?;
    }
    Ok(())
}

/// `UPDATE usage_records SET <set> FROM accounting_jobs AS j WHERE j.run_key =
/// usage_records.run_key AND <only_if> AND usage_records.run_key IN (keys)`: a record written
/// before an event of its run came gets what the event stored in `accounting_jobs` (SQLite;
/// PostgreSQL does it in the upsert's statement, [`upsert_jobs`]).
pub(crate) async fn backfill(
    db: &mut Db<'_>,
    set: &str,
    only_if: &str,
    keys: &[&str],
) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    let head = format!(
        "UPDATE usage_records SET {set} FROM accounting_jobs AS j
         WHERE j.run_key = usage_records.run_key AND {only_if} AND usage_records.run_key "
    );
    for chunk in keys.chunks(CHUNK) {
        on_db!(&mut *db, |c| {
            let mut q = sqlx::QueryBuilder::new(head.as_str());
            q.push("IN (");
            let mut list = q.separated(", ");
            for k in chunk {
                list.push_bind(*k);
            }
            list.push_unseparated(")");
            q.build().execute(c).await.map(|r| r.rows_affected())
        })?;
    }
    Ok(())
}

/// What is stored of a run in `accounting_jobs`.
#[derive(sqlx::FromRow, Debug, Default, Clone)]
pub(crate) struct JobRow {
    pub run_key: String,
    pub user_name: Option<String>,
    pub uid: Option<i64>,
    pub gid: Option<i64>,
    pub vo: Option<String>,
    pub x509_dn: Option<String>,
    pub fqans: Option<String>,
    pub queue: Option<String>,
    pub vm_started_ms: Option<i64>,
    pub lrms_exit_code: Option<i64>,
    pub submitted_ms: Option<i64>,
    pub image: Option<String>,
    pub image_sha256: Option<String>,
    pub memory_bytes: Option<i64>,
    pub scratch_bytes: Option<i64>,
    pub network_mode: Option<String>,
    pub gateway_bytes_to_vm: Option<i64>,
    pub gateway_bytes_from_vm: Option<i64>,
}

/// The stored rows of `keys` (those that have one).
pub(crate) async fn job_rows(db: &mut Db<'_>, keys: &[&str]) -> Result<Vec<JobRow>, sqlx::Error> {
    const COLUMNS: &str = "j.run_key, j.user_name, j.uid, j.gid, j.vo, j.x509_dn, j.fqans,
        j.queue, j.vm_started_ms, j.lrms_exit_code, j.submitted_ms, j.image, j.image_sha256,
        j.memory_bytes, j.scratch_bytes, j.network_mode, j.gateway_bytes_to_vm,
        j.gateway_bytes_from_vm";
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    if let Db::Postgres(c) = db {
        // Driven by the keys, one primary-key probe each: a join (or `run_key = ANY($1)`)
        // can get a generic plan, made while the table was small, that scans it whole once
        // it has grown; a correlated subquery with `LIMIT 1` cannot become that join.
        let mut q = sqlx::QueryBuilder::new(format!("SELECT {COLUMNS} FROM unnest("));
        q.push_bind(key_array(keys)).push(
            "::text[]) AS k(run_key) CROSS JOIN LATERAL (
                 SELECT * FROM accounting_jobs WHERE run_key = k.run_key LIMIT 1
             ) AS j",
        );
        return q.build_query_as().fetch_all(&mut **c).await;
    }
    let select = format!("SELECT {COLUMNS} FROM accounting_jobs AS j WHERE j.run_key ");
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(CHUNK) {
        let rows: Vec<JobRow> = on_db!(&mut *db, |c| {
            let mut q = sqlx::QueryBuilder::new(select.as_str());
            q.push("IN (");
            let mut list = q.separated(", ");
            for k in chunk {
                list.push_bind(*k);
            }
            list.push_unseparated(")");
            q.build_query_as().fetch_all(c).await
        })?;
        out.extend(rows);
    }
    Ok(out)
}

/// The columns of `usage_records` after `run_key`, in the order of a record's values
/// ([`crate::handler`] builds them).
pub(crate) const RECORD_COLUMNS: &[&str] = &[
    "site",
    "lrms",
    "job_id",
    "run_attempt",
    "host",
    "vm_id",
    "vo",
    "user_name",
    "uid",
    "gid",
    "x509_dn",
    "fqans",
    "queue",
    "cores",
    "cpu_seconds",
    "peak_memory_bytes",
    "wall_seconds",
    "exit_code",
    "lrms_exit_code",
    "stop_reason",
    "started_ms",
    "stopped_ms",
    "recorded_ms",
    "submitted_ms",
    "image",
    "image_sha256",
    "memory_bytes",
    "scratch_bytes",
    "network_mode",
    "benchmark_kind",
    "benchmark_per_core",
    "cpu_user_seconds",
    "cpu_system_seconds",
    "gateway_bytes_to_vm",
    "gateway_bytes_from_vm",
];

/// Inserts the records (a run key once in `rows`); returns the run keys inserted: a run that
/// already had its record keeps it (`ON CONFLICT DO NOTHING`).
pub(crate) async fn insert_records(
    db: &mut Db<'_>,
    rows: &[Row],
) -> Result<HashSet<String>, sqlx::Error> {
    let head = format!(
        "INSERT INTO usage_records (run_key, {}) ",
        RECORD_COLUMNS.join(", ")
    );
    let mut inserted = HashSet::with_capacity(rows.len());
    if rows.is_empty() {
        return Ok(inserted);
    }
    if let Db::Postgres(c) = db {
        let mut q = sqlx::QueryBuilder::new(head.as_str());
        q.push("SELECT * FROM ");
        push_unnest(&mut q, array_columns(rows));
        q.push(" ON CONFLICT (run_key) DO NOTHING RETURNING run_key");
        let keys: Vec<(String,)> = q.build_query_as().fetch_all(&mut **c).await?;
        inserted.extend(keys.into_iter().map(|(k,)| k));
        return Ok(inserted);
    }
    for chunk in rows.chunks(CHUNK) {
        let keys: Vec<(String,)> = on_db!(&mut *db, |c| {
            let mut q = sqlx::QueryBuilder::new(head.as_str());
            q.push_values(chunk, |mut b, (key, vals)| {
                b.push_bind(key.as_str());
                for v in vals {
                    push_val(&mut b, v);
                }
            });
            q.push(" ON CONFLICT (run_key) DO NOTHING RETURNING run_key");
            q.build_query_as().fetch_all(c).await
        })?;
        inserted.extend(keys.into_iter().map(|(k,)| k));
    }
    Ok(inserted)
}
