-- The tenant's (the customer's) access policy: which access reasons its
-- keys may be used for, and whether a call must give one. Empty: every
-- reason accepted, none required; else JSON (src/access.rs).
ALTER TABLE tenants ADD COLUMN access_policy TEXT NOT NULL DEFAULT '';
