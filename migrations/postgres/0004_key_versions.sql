-- Retiring old key versions, counting use per key version, and automatic
-- rotation claims (issue 17). None of these tables references `tenants`:
-- fleet-wide rows use the tenant id '#platform', which no tenant can have,
-- and DeleteTenant deletes a tenant's rows itself.

-- Unwraps under a version older than `min_version` are refused. `key_name`
-- is a binding, 'platform' (tenant '#platform': the platform keyring, fleet
-- wide) or '#tenant-key' (the tenant's own key versions).
CREATE TABLE key_retirements (
    tenant_id   TEXT   NOT NULL,
    key_name    TEXT   NOT NULL,
    min_version BIGINT NOT NULL CHECK (min_version > 0),
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, key_name)
);

-- Wraps and unwraps served per key version: which versions still protect
-- live data, and what guards retiring one. `version` is the provider's
-- version as wrapped keys name it ('' where the provider has none), or a
-- tenant key version number under '#tenant-key'.
CREATE TABLE key_version_usage (
    tenant_id    TEXT   NOT NULL,
    key_name     TEXT   NOT NULL,
    version      TEXT   NOT NULL,
    wrap_count   BIGINT NOT NULL DEFAULT 0,
    unwrap_count BIGINT NOT NULL DEFAULT 0,
    last_used_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, key_name, version)
);

-- The last automatic rotation of a fleet-wide key ('platform-keyring'):
-- replicas claim a rotation by moving `rotated_at` forward only when it is
-- older than the period, so one rotation happens per period fleet-wide.
CREATE TABLE rotations (
    subject    TEXT   PRIMARY KEY,
    rotated_at BIGINT NOT NULL
);

-- Imported key material: when its newest version was imported (the age
-- `imported_key_rotation_period` reminds about). NULL for other keys.
ALTER TABLE key_bindings ADD COLUMN material_updated_at BIGINT;
UPDATE key_bindings SET material_updated_at = created_at WHERE key_material IS NOT NULL;
