-- The provisioning API: API tokens and the audit trail.
--
-- Neither table is configuration: no trigger bumps `config_version` for them, so creating or
-- revoking a token, or appending to the audit trail, does not make every server reload.

-- A token is scoped to the whole carrier (the operator: both scope columns NULL), to one
-- account (`account_id` only) or to one trunk group (both: the group and its account).
-- Only the SHA-256 of the secret is kept (lowercase hex); the secret is shown once.
-- Times are Unix seconds (UTC).
--
-- Removal: an account or trunk group is not removed while it has live (unrevoked) tokens —
-- the foreign keys below have no ON DELETE action, and the store names the tokens in the way.
-- Its revoked tokens are deleted in the same transaction as the account or trunk group: they
-- can no longer be used, and would otherwise block the removal for ever.

-- A trunk group token's account must be the group's own account: the composite foreign key
-- below needs a unique index on the parent columns it names.
CREATE UNIQUE INDEX trunk_groups_by_account_and_id ON trunk_groups (account_id, id);

CREATE TABLE api_tokens (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    secret_sha256  TEXT    NOT NULL UNIQUE
        CHECK (length(secret_sha256) = 64 AND secret_sha256 NOT GLOB '*[^0-9a-f]*'),
    account_id     INTEGER NULL REFERENCES accounts (id),
    -- A trunk group scope always names the group's account too.
    trunk_group_id INTEGER NULL CHECK (trunk_group_id IS NULL OR account_id IS NOT NULL),
    label          TEXT    NOT NULL,
    created_at     INTEGER NOT NULL,
    revoked_at     INTEGER NULL CHECK (revoked_at IS NULL OR revoked_at >= created_at),
    FOREIGN KEY (account_id, trunk_group_id) REFERENCES trunk_groups (account_id, id)
);

-- Listing an account's tokens, and the foreign key look-ups when an account or a trunk group
-- is removed.
CREATE INDEX api_tokens_by_scope ON api_tokens (account_id, trunk_group_id);

-- The audit trail: one row per settings change, appended, never changed.
--
-- `account_id` and `token_id` are deliberately not foreign keys: the trail outlives what it
-- describes (the entry for removing an account is written after the account is gone, and
-- "which token removed trunk group 3?" is what the trail is for). Both ids come from
-- AUTOINCREMENT columns and are never reused, so an id left behind stays unambiguous.
-- `token_id` is NULL for a change made with the admin command line. `at_ms` is Unix
-- milliseconds (UTC); `before_json` is NULL for a creation, `after_json` for a removal.
CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id  INTEGER NOT NULL,
    token_id    INTEGER NULL,
    at_ms       INTEGER NOT NULL,
    action      TEXT    NOT NULL CHECK (length(action) > 0),
    object      TEXT    NOT NULL CHECK (length(object) > 0),
    before_json TEXT    NULL,
    after_json  TEXT    NULL
);

CREATE INDEX audit_log_by_account ON audit_log (account_id, at_ms);
