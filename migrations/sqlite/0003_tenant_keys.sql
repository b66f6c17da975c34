-- The tenant key hierarchy (DESIGN.md section 4a).
-- How a tenant's DEKs are wrapped; tenants from before stay `direct`.
ALTER TABLE tenants ADD COLUMN key_hierarchy TEXT NOT NULL DEFAULT 'direct'
    CHECK (key_hierarchy IN ('direct', 'tenant_key'));
-- The binding ('platform' for the platform key) every tenant key version is
-- being re-encrypted under after a key change; NULL when none ever ran.
ALTER TABLE tenants ADD COLUMN reencrypt_to TEXT;
-- `direct` tenants: the disabled key RewrapKey may still read until the
-- operator finishes moving its DEKs (NULL: none).
ALTER TABLE tenants ADD COLUMN reencrypt_from TEXT;
-- Cube: the most recently imported key becomes primary by itself.
ALTER TABLE tenants ADD COLUMN newest_import_primary INTEGER NOT NULL DEFAULT 0
    CHECK (newest_import_primary IN (0, 1));

-- Tenant key versions, each stored only wrapped by a key binding of the
-- tenant ('platform' for the platform key). Deleting a row destroys every
-- DEK sealed under that version.
CREATE TABLE tenant_keys (
    tenant_id            TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    version              INTEGER NOT NULL CHECK (version > 0),
    binding              TEXT    NOT NULL,
    provider_key_version TEXT    NOT NULL DEFAULT '',
    wrapped              BLOB    NOT NULL,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, version)
);
