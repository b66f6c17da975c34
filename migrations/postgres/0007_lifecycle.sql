-- The tenant-key lifecycle (issue 31, DESIGN.md section 4b): incarnations,
-- key epochs, a version counter, scheduled deletion with tombstones, and
-- per-link identities. Only src/lifecycle writes these columns.

-- Which life of a tenant id this row is: 1 for the first, one more for each
-- re-creation after a deletion. Wrapped keys carry it (0: issued before
-- incarnations existed), so nothing issued for an earlier life unwraps.
ALTER TABLE tenants ADD COLUMN incarnation BIGINT NOT NULL DEFAULT 1;
-- Wrapped keys without an incarnation are accepted (1 for tenants that
-- existed before incarnations; 0 once the id was ever deleted).
ALTER TABLE tenants ADD COLUMN legacy_deks BIGINT NOT NULL DEFAULT 1
    CHECK (legacy_deks IN (0, 1));
-- Created by the data plane on a first wrap (a tenant nobody registered,
-- served by the platform key through its own tenant key); CreateTenant
-- adopts it.
ALTER TABLE tenants ADD COLUMN implicit BIGINT NOT NULL DEFAULT 0
    CHECK (implicit IN (0, 1));
-- Bumped by every key change: only a version minted in the current epoch
-- seals new DEKs, so the first wrap after a change mints a fresh one.
ALTER TABLE tenants ADD COLUMN key_epoch BIGINT NOT NULL DEFAULT 0;
-- The number the next tenant key version gets: never reused, even after a
-- version is destroyed (a cached DEK names its version by number).
ALTER TABLE tenants ADD COLUMN next_key_version BIGINT NOT NULL DEFAULT 1;
UPDATE tenants SET next_key_version =
    COALESCE((SELECT MAX(version) FROM tenant_keys WHERE tenant_keys.tenant_id = tenants.id), 0) + 1;
-- DeleteTenant schedules: at this time (unix ms) the tenant's rows are
-- destroyed; until then every data-plane call for it is refused. NULL: none.
ALTER TABLE tenants ADD COLUMN delete_at BIGINT;
-- DisableKey with reencrypt_to: the key disabled (with this reason) in the
-- transaction that finishes the key change.
ALTER TABLE tenants ADD COLUMN reencrypt_then_disable TEXT;
ALTER TABLE tenants ADD COLUMN reencrypt_disable_reason TEXT NOT NULL DEFAULT '';
-- The target of the last key change that finished (NULL: none ever ran).
ALTER TABLE tenants ADD COLUMN reencrypt_last TEXT;

-- The epoch a tenant key version was minted in (a re-encryption keeps it).
ALTER TABLE tenant_keys ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;

-- Random per link: a key unlinked and linked again under the same name is
-- another key to every cache.
ALTER TABLE key_bindings ADD COLUMN link_id BIGINT NOT NULL DEFAULT 0;
-- A value keybroker encrypted under the key (envelope bytes): the key-state
-- check decrypts it, so a permission-only revocation is seen too.
ALTER TABLE key_bindings ADD COLUMN canary BYTEA;

-- Tenant ids deleted for good, one row per incarnation: a re-created id
-- starts at the next incarnation and refuses wrapped keys without one.
CREATE TABLE deleted_tenants (
    id          TEXT   NOT NULL,
    incarnation BIGINT NOT NULL,
    deleted_at  BIGINT NOT NULL,
    PRIMARY KEY (id, incarnation)
);
