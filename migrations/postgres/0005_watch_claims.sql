-- One watcher pass per fleet (issue 21). A replica claims a binding for a
-- state check by setting check_claimed_at (unix ms) to now, in the same
-- statement that finds it due (claimed longer ago than the replica's
-- watcher interval; PostgreSQL: FOR UPDATE SKIP LOCKED). So each binding is
-- described about once per interval across the fleet, a replica with a
-- longer interval never delays the others, and a replica that dies after
-- claiming leaves its claims to come due again one interval later.
ALTER TABLE key_bindings ADD COLUMN check_claimed_at BIGINT NOT NULL DEFAULT 0;
CREATE INDEX key_bindings_check_claimed ON key_bindings (check_claimed_at);
