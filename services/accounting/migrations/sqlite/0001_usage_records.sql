-- The accounting tables on SQLite (the embedded default). IF NOT EXISTS: databases created
-- before migrations existed already hold them.

-- What is known of a run before its record.
CREATE TABLE IF NOT EXISTS accounting_jobs (
    run_key         TEXT PRIMARY KEY,
    user_name       TEXT,
    uid             INTEGER,
    gid             INTEGER,
    vo              TEXT,
    x509_dn         TEXT,
    fqans           TEXT,     -- JSON array of VOMS FQANs
    queue           TEXT,
    cores           INTEGER,  -- requested cores (count)
    lrms_started_ms INTEGER,  -- unix milliseconds
    vm_started_ms   INTEGER,  -- unix milliseconds (VmRunning.started_at)
    lrms_exit_code  INTEGER,
    finished_ms     INTEGER   -- unix milliseconds (JobFinished.finished_at)
);

-- One row per run.
CREATE TABLE IF NOT EXISTS usage_records (
    run_key           TEXT PRIMARY KEY,   -- site/lrms/job_id/attempt
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
);

-- What the APEL exporter queued.
CREATE TABLE IF NOT EXISTS apel_exported (
    run_key     TEXT NOT NULL,    -- job: the run key; summary/cloud/sync: APEL's key of the record
    kind        TEXT NOT NULL,    -- job | summary | cloud | sync
    record      TEXT NOT NULL DEFAULT '',  -- summary/cloud/sync: the record as queued
    exported_at INTEGER NOT NULL, -- unix milliseconds
    PRIMARY KEY (run_key, kind)
);

-- Messages staged but not yet settled (crash recovery).
CREATE TABLE IF NOT EXISTS apel_pending (
    staged     TEXT NOT NULL,     -- staged file name under <queue>/.wnodes-staging
    queue      TEXT NOT NULL,     -- the queue's directory
    kind       TEXT NOT NULL,
    entries    TEXT NOT NULL,     -- JSON [[key, record], ...] of what the message holds
    created_at INTEGER NOT NULL,  -- unix milliseconds
    PRIMARY KEY (queue, staged)
);

CREATE INDEX IF NOT EXISTS usage_records_stopped ON usage_records (stopped_ms);
