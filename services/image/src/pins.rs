//! Which runs use (or are about to use) which cached files, in the service's key store, so
//! that the pins survive a restart: a row per run, `using` from its `vm.requested` until its
//! `vm.stopped` / `vm.failed`, then `released` (a tombstone: a late `vm.requested` of that run
//! pins nothing). Written in the handler's transaction, with the event's key.

use sqlx::{Sqlite, SqliteConnection, SqlitePool};

/// Why the pins table could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} the image pins")]
pub struct PinsError {
    op: &'static str,
    #[source]
    source: sqlx::Error,
}

fn err(op: &'static str) -> impl FnOnce(sqlx::Error) -> PinsError {
    move |source| PinsError { op, source }
}

/// Creates the table (at start).
pub async fn init(pool: &SqlitePool) -> Result<(), PinsError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS image_pins (
            run_key    TEXT    NOT NULL PRIMARY KEY,
            vm_id      TEXT    NOT NULL,
            digests    TEXT    NOT NULL,
            state      TEXT    NOT NULL CHECK (state IN ('using', 'released')),
            updated_at INTEGER NOT NULL
        ) WITHOUT ROWID",
    )
    .execute(pool)
    .await
    .map(drop)
    .map_err(err("create"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// Whether the run's pins were released.
pub async fn is_released<'c, E>(exec: E, run_key: &str) -> Result<bool, PinsError>
where
    E: sqlx::Executor<'c, Database = Sqlite>,
{
    let row: Option<(String,)> = sqlx::query_as("SELECT state FROM image_pins WHERE run_key = ?")
        .bind(run_key)
        .fetch_optional(exec)
        .await
        .map_err(err("read"))?;
    Ok(row.is_some_and(|(s,)| s == "released"))
}

/// Records that the run uses `digests`. Never turns a released row back; returns whether the
/// row now says `using`.
pub async fn mark_using(
    conn: &mut SqliteConnection,
    run_key: &str,
    vm_id: &str,
    digests: &[String],
) -> Result<bool, PinsError> {
    sqlx::query(
        "INSERT INTO image_pins (run_key, vm_id, digests, state, updated_at)
         VALUES (?1, ?2, ?3, 'using', ?4)
         ON CONFLICT (run_key) DO UPDATE SET digests = ?3, updated_at = ?4
         WHERE state = 'using'",
    )
    .bind(run_key)
    .bind(vm_id)
    .bind(digests.join(" "))
    .bind(now_ms())
    .execute(&mut *conn)
    .await
    .map_err(err("write"))?;
    Ok(!is_released(&mut *conn, run_key).await?)
}

/// Records that the run's VM ended (a tombstone when there was no row).
pub async fn mark_released(
    conn: &mut SqliteConnection,
    run_key: &str,
    vm_id: &str,
) -> Result<(), PinsError> {
    sqlx::query(
        "INSERT INTO image_pins (run_key, vm_id, digests, state, updated_at)
         VALUES (?1, ?2, '', 'released', ?3)
         ON CONFLICT (run_key) DO UPDATE SET state = 'released', updated_at = ?3",
    )
    .bind(run_key)
    .bind(vm_id)
    .bind(now_ms())
    .execute(conn)
    .await
    .map(drop)
    .map_err(err("write"))
}

/// Every run still using files, with their digests (at start, to pin them again).
pub async fn using(pool: &SqlitePool) -> Result<Vec<(String, Vec<String>)>, PinsError> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT run_key, digests FROM image_pins WHERE state = 'using'")
            .fetch_all(pool)
            .await
            .map_err(err("read"))?;
    Ok(rows
        .into_iter()
        .map(|(k, d)| (k, d.split_whitespace().map(str::to_owned).collect()))
        .collect())
}

/// A sample for the error rule.
#[cfg(test)]
pub(crate) fn sample_error() -> PinsError {
    err("write")(sqlx::Error::Protocol(
        wnodes_testkit::error_rule::SOURCE_TEXT.into(),
    ))
}
