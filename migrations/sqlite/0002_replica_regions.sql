-- Regions holding replicas of an AWS multi-Region key, comma separated.
ALTER TABLE key_bindings ADD COLUMN replica_regions TEXT NOT NULL DEFAULT '';
