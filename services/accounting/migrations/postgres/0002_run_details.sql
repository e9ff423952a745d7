-- What the VM of a run was given (vm.requested), its image's digest (image.ready), when the
-- LRMS accepted the job (job.started), and the benchmark of its host (config).
ALTER TABLE accounting_jobs ADD COLUMN submitted_ms BIGINT;  -- unix milliseconds
ALTER TABLE accounting_jobs ADD COLUMN image TEXT;
ALTER TABLE accounting_jobs ADD COLUMN image_sha256 TEXT;
ALTER TABLE accounting_jobs ADD COLUMN memory_bytes BIGINT;  -- bytes
ALTER TABLE accounting_jobs ADD COLUMN scratch_bytes BIGINT; -- bytes
ALTER TABLE accounting_jobs ADD COLUMN network_mode TEXT;
ALTER TABLE usage_records ADD COLUMN submitted_ms BIGINT;    -- unix milliseconds
ALTER TABLE usage_records ADD COLUMN image TEXT NOT NULL DEFAULT '';
ALTER TABLE usage_records ADD COLUMN image_sha256 TEXT NOT NULL DEFAULT '';
ALTER TABLE usage_records ADD COLUMN memory_bytes BIGINT;    -- bytes (guest RAM)
ALTER TABLE usage_records ADD COLUMN scratch_bytes BIGINT;   -- bytes
ALTER TABLE usage_records ADD COLUMN network_mode TEXT NOT NULL DEFAULT '';
ALTER TABLE usage_records ADD COLUMN benchmark_kind TEXT NOT NULL DEFAULT '';
ALTER TABLE usage_records ADD COLUMN benchmark_per_core DOUBLE PRECISION; -- score per core
