//! The accounting tables (`accounting_jobs`: what is known of a run before its record;
//! `usage_records`: one row per run; the APEL exporter's `apel_exported` and `apel_pending`,
//! [`crate::apel`]), created at start in the consumer's idempotency store so
//! that every effect commits with its key.

use wnodes_bus::KeyStore;

use crate::AccountingError;

pub(crate) const SCHEMA: [&str; 2] = [
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
    for stmt in SCHEMA.into_iter().chain(crate::apel::SCHEMA) {
        sqlx::query(stmt).execute(store.pool()).await?;
    }
    Ok(())
}

/// Opens the accounting database as the consumer's idempotency store and creates the tables.
pub async fn open_store(path: &std::path::Path) -> Result<KeyStore, AccountingError> {
    let store = KeyStore::open(path).await?;
    migrate(&store).await?;
    Ok(store)
}
