-- Wrapped key import (GetImportParameters): one row per token, holding the
-- one-time RSA private key sealed under the platform keyring, for one
-- tenant's key name and one wrapping algorithm, until it expires or is used
-- (used_at: whichever replica redeems it first; never again).
CREATE TABLE import_tokens (
    token       TEXT    PRIMARY KEY,
    tenant_id   TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    wrapping    TEXT    NOT NULL,
    sealed_key  BYTEA   NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT
);
CREATE INDEX import_tokens_by_expiry ON import_tokens (expires_at);
