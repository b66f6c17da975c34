-- The customer's key access log (src/access_log.rs): who used which key,
-- why, how, with what outcome. Per-minute counts (individual = 0, time_ms
-- the minute's start, one row per distinct combination, incremented by every
-- replica's flush) and individual records (individual = 1: refusals, and
-- reasons the tenant logs one by one), pruned after access_log_retention.
CREATE TABLE key_access (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id     TEXT    NOT NULL,
    time_ms       INTEGER NOT NULL,
    individual    INTEGER NOT NULL CHECK (individual IN (0, 1)),
    caller        TEXT    NOT NULL,
    reason        TEXT    NOT NULL,
    reason_detail TEXT    NOT NULL,
    key_binding   TEXT    NOT NULL,
    key_version   TEXT    NOT NULL,
    operation     TEXT    NOT NULL,
    outcome       TEXT    NOT NULL,
    error         TEXT    NOT NULL,
    request_id    TEXT    NOT NULL,
    count         INTEGER NOT NULL
);
CREATE UNIQUE INDEX key_access_minutes ON key_access
    (tenant_id, time_ms, caller, reason, key_binding, key_version, operation, outcome)
    WHERE individual = 0;
CREATE INDEX key_access_by_time ON key_access (tenant_id, time_ms, id);
CREATE INDEX key_access_by_age ON key_access (time_ms);
