-- CPU time split into user and system mode (seconds), when the launcher measured it.
ALTER TABLE usage_records ADD COLUMN cpu_user_seconds DOUBLE PRECISION;
ALTER TABLE usage_records ADD COLUMN cpu_system_seconds DOUBLE PRECISION;
