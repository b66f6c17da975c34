-- One watcher pass per fleet (issue 21): a binding is checked when
-- next_check_at (unix ms) has passed. A replica claims due bindings by
-- moving next_check_at one watcher interval ahead in the same statement
-- (PostgreSQL: FOR UPDATE SKIP LOCKED), so each binding is described about
-- once per interval across the fleet; a replica that dies after claiming
-- leaves its claims to come due again one interval later.
ALTER TABLE key_bindings ADD COLUMN next_check_at BIGINT NOT NULL DEFAULT 0;
CREATE INDEX key_bindings_next_check ON key_bindings (next_check_at);
