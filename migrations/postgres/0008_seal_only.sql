-- The first version of a binding's imported key material made by a build
-- that wraps with the `seal` construction only: no wrapped key of the legacy
-- layout exists under it or any later version, so one is refused there
-- (legacy_local_wraps = predating, the default). NULL: every version
-- predates the upgrade and may hold legacy wraps.
ALTER TABLE key_bindings ADD COLUMN seal_only_from BIGINT;
