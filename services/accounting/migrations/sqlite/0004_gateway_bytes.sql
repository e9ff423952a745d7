-- What the storage gateway carried for the run's VM (resource.released, kind storage), when it
-- counted all of it: bytes to the VM and from it.
ALTER TABLE accounting_jobs ADD COLUMN gateway_bytes_to_vm INTEGER;
ALTER TABLE accounting_jobs ADD COLUMN gateway_bytes_from_vm INTEGER;
ALTER TABLE usage_records ADD COLUMN gateway_bytes_to_vm INTEGER;
ALTER TABLE usage_records ADD COLUMN gateway_bytes_from_vm INTEGER;
