-- Tenants and their key bindings. Times are Unix milliseconds.
CREATE TABLE tenants (
    id          TEXT    NOT NULL PRIMARY KEY,
    key_policy  TEXT    NOT NULL CHECK (key_policy IN ('keyring', 'single_key')),
    external_id TEXT    NOT NULL UNIQUE,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);

CREATE TABLE key_bindings (
    tenant_id       TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name            TEXT    NOT NULL,
    description     TEXT    NOT NULL DEFAULT '',
    provider        TEXT    NOT NULL CHECK (provider IN ('local', 'aws-kms', 'gcp-kms')),
    key_reference   TEXT    NOT NULL,
    region          TEXT    NOT NULL DEFAULT '',
    role_arn        TEXT    NOT NULL DEFAULT '',
    service_account TEXT    NOT NULL DEFAULT '',
    -- Imported raw key material, encrypted under the platform key.
    key_material    BYTEA,
    state           TEXT    NOT NULL CHECK (state IN ('ACTIVE', 'DISABLED', 'REVOKED')),
    state_reason    TEXT    NOT NULL DEFAULT '',
    is_primary      BIGINT  NOT NULL DEFAULT 0 CHECK (is_primary IN (0, 1)),
    created_at      BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL,
    last_used_at    BIGINT,
    wrap_count      BIGINT  NOT NULL DEFAULT 0,
    unwrap_count    BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, name)
);

-- At most one primary key per tenant.
CREATE UNIQUE INDEX key_bindings_one_primary ON key_bindings (tenant_id) WHERE is_primary = 1;
