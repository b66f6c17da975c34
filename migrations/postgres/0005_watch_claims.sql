-- One watcher pass per fleet (issue 21). A replica claims a binding for a
-- state check by setting check_claimed_at (unix ms) to now and
-- check_claimed_by to its id, in the same statement that finds it due
-- (PostgreSQL: FOR UPDATE SKIP LOCKED). A binding is due for the replica
-- that claimed it last once that replica's watcher interval has passed, and
-- for any other replica a quarter interval later: so each binding is
-- described about once per interval across the fleet, by the same replica
-- (whose AWS role session for the tenant stays warm), and a replica that
-- dies leaves its bindings to the others 1.25 intervals after its last
-- claim. A replica with a longer interval never delays the others.
ALTER TABLE key_bindings ADD COLUMN check_claimed_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE key_bindings ADD COLUMN check_claimed_by TEXT NOT NULL DEFAULT '';
CREATE INDEX key_bindings_check_claimed ON key_bindings (check_claimed_at);
