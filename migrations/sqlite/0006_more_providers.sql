-- Customer keys in Vault/OpenBao Transit (issue 18), and room for the
-- providers planned next (PKCS#11 tokens, Azure Key Vault). SQLite cannot
-- alter a CHECK constraint: the table is rebuilt (SQLite's documented
-- procedure; no table references key_bindings), in this migration's
-- transaction.
CREATE TABLE key_bindings_v6 (
    tenant_id           TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name                TEXT    NOT NULL,
    description         TEXT    NOT NULL DEFAULT '',
    provider            TEXT    NOT NULL CHECK (provider IN
        ('local', 'aws-kms', 'gcp-kms', 'vault-transit', 'pkcs11', 'azure-kv')),
    key_reference       TEXT    NOT NULL,
    region              TEXT    NOT NULL DEFAULT '',
    role_arn            TEXT    NOT NULL DEFAULT '',
    service_account     TEXT    NOT NULL DEFAULT '',
    -- Imported raw key material (or a Vault AppRole secret_id), encrypted
    -- under the platform key.
    key_material        BLOB,
    state               TEXT    NOT NULL CHECK (state IN ('ACTIVE', 'DISABLED', 'REVOKED')),
    state_reason        TEXT    NOT NULL DEFAULT '',
    is_primary          INTEGER NOT NULL DEFAULT 0 CHECK (is_primary IN (0, 1)),
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    last_used_at        INTEGER,
    wrap_count          INTEGER NOT NULL DEFAULT 0,
    unwrap_count        INTEGER NOT NULL DEFAULT 0,
    replica_regions     TEXT    NOT NULL DEFAULT '',
    material_updated_at BIGINT,
    check_claimed_at    BIGINT  NOT NULL DEFAULT 0,
    check_claimed_by    TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (tenant_id, name)
);
INSERT INTO key_bindings_v6 (tenant_id, name, description, provider, key_reference, region,
    role_arn, service_account, key_material, state, state_reason, is_primary, created_at,
    updated_at, last_used_at, wrap_count, unwrap_count, replica_regions, material_updated_at,
    check_claimed_at, check_claimed_by)
SELECT tenant_id, name, description, provider, key_reference, region,
    role_arn, service_account, key_material, state, state_reason, is_primary, created_at,
    updated_at, last_used_at, wrap_count, unwrap_count, replica_regions, material_updated_at,
    check_claimed_at, check_claimed_by
FROM key_bindings;
DROP TABLE key_bindings;
ALTER TABLE key_bindings_v6 RENAME TO key_bindings;
CREATE UNIQUE INDEX key_bindings_one_primary ON key_bindings (tenant_id) WHERE is_primary = 1;
CREATE INDEX key_bindings_check_claimed ON key_bindings (check_claimed_at);
