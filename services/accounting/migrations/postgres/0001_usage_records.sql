-- The accounting tables on PostgreSQL (a site's production store). Integers are BIGINT and reals DOUBLE
-- PRECISION: the handler binds i64 and f64, and reads them back as such.

-- What is known of a run before its record.
CREATE TABLE IF NOT EXISTS accounting_jobs (
    run_key         TEXT PRIMARY KEY,
    user_name       TEXT,
    uid             BIGINT,
    gid             BIGINT,
    vo              TEXT,
    x509_dn         TEXT,
    fqans           TEXT,     -- JSON array of VOMS FQANs
    queue           TEXT,
    cores           BIGINT,  -- requested cores (count)
    lrms_started_ms BIGINT,  -- unix milliseconds
    vm_started_ms   BIGINT,  -- unix milliseconds (VmRunning.started_at)
    lrms_exit_code  BIGINT,
    finished_ms     BIGINT   -- unix milliseconds (JobFinished.finished_at)
);

-- One row per run.
CREATE TABLE IF NOT EXISTS usage_records (
    run_key           TEXT PRIMARY KEY,   -- site/lrms/job_id/attempt
    site              TEXT NOT NULL,
    lrms              TEXT NOT NULL,
    job_id            TEXT NOT NULL,
    run_attempt       BIGINT NOT NULL,
    host              TEXT NOT NULL,
    vm_id             TEXT NOT NULL,
    vo                TEXT NOT NULL DEFAULT '',
    user_name         TEXT NOT NULL DEFAULT '',
    uid               BIGINT,
    gid               BIGINT,
    x509_dn           TEXT NOT NULL DEFAULT '',
    fqans             TEXT NOT NULL DEFAULT '[]',
    queue             TEXT NOT NULL DEFAULT '',
    cores             BIGINT NOT NULL,   -- vCPUs (count)
    cpu_seconds       DOUBLE PRECISION NOT NULL,      -- seconds
    peak_memory_bytes BIGINT NOT NULL,   -- bytes
    wall_seconds      DOUBLE PRECISION NOT NULL,      -- seconds
    exit_code         BIGINT NOT NULL,   -- payload exit status
    lrms_exit_code    BIGINT,            -- from JobFinished, when it came
    stop_reason       TEXT NOT NULL,
    started_ms        BIGINT,            -- unix milliseconds
    stopped_ms        BIGINT,            -- unix milliseconds
    recorded_ms       BIGINT NOT NULL    -- unix milliseconds
);

-- What the APEL exporter queued.
CREATE TABLE IF NOT EXISTS apel_exported (
    run_key     TEXT NOT NULL,    -- job: the run key; summary/cloud/sync: APEL's key of the record
    kind        TEXT NOT NULL,    -- job | summary | cloud | sync
    record      TEXT NOT NULL DEFAULT '',  -- summary/cloud/sync: the record as queued
    exported_at BIGINT NOT NULL, -- unix milliseconds
    PRIMARY KEY (run_key, kind)
);

-- Messages staged but not yet settled (crash recovery).
CREATE TABLE IF NOT EXISTS apel_pending (
    staged     TEXT NOT NULL,     -- staged file name under <queue>/.wnodes-staging
    queue      TEXT NOT NULL,     -- the queue's directory
    kind       TEXT NOT NULL,
    entries    TEXT NOT NULL,     -- JSON [[key, record], ...] of what the message holds
    created_at BIGINT NOT NULL,  -- unix milliseconds
    PRIMARY KEY (queue, staged)
);

CREATE INDEX IF NOT EXISTS usage_records_stopped ON usage_records (stopped_ms);
