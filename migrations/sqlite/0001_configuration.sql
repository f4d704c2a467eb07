-- The carrier's configuration: accounts, trunk groups and DIDs.
--
-- Times are Unix seconds (UTC), written by the program. Foreign keys have no ON DELETE action:
-- an account with trunk groups, or a trunk group with DIDs, cannot be removed (the store reports
-- what is in the way). (Not RESTRICT: SQLite reports that as a trigger failure, not as a
-- foreign-key one.) Every table that is part of the configuration bumps `config_version` through
-- triggers, so a running server can poll one cheap row and reload when it moves; a table added
-- to the configuration later must get the same three triggers.

CREATE TABLE accounts (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT    NOT NULL UNIQUE CHECK (length(name) > 0),
    created_at INTEGER NOT NULL
);

CREATE TABLE trunk_groups (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    name       TEXT    NOT NULL CHECK (length(name) > 0),
    -- The Digest username the PBX registers with; unique across the carrier.
    username   TEXT    NOT NULL UNIQUE CHECK (length(username) BETWEEN 1 AND 64),
    -- The realm the HA1 values were computed for; they are void under another realm.
    realm      TEXT    NOT NULL,
    -- HA1 = H(username:realm:password) in lowercase hex; the password itself is never stored.
    ha1_md5    TEXT    NOT NULL CHECK (length(ha1_md5) = 32),
    ha1_sha256 TEXT    NOT NULL CHECK (length(ha1_sha256) = 64),
    created_at INTEGER NOT NULL,
    UNIQUE (account_id, name)
);

CREATE TABLE dids (
    -- E.164 with the leading '+', e.g. '+442071234567'.
    number         TEXT    PRIMARY KEY NOT NULL CHECK (number GLOB '+[1-9]*'),
    trunk_group_id INTEGER NOT NULL REFERENCES trunk_groups (id),
    created_at     INTEGER NOT NULL
);

CREATE INDEX dids_by_trunk_group ON dids (trunk_group_id);

-- One row; `version` grows by one with every change to the configuration tables.
CREATE TABLE config_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO config_version (id, version) VALUES (1, 0);

CREATE TRIGGER accounts_insert_version AFTER INSERT ON accounts
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER accounts_update_version AFTER UPDATE ON accounts
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER accounts_delete_version AFTER DELETE ON accounts
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;

CREATE TRIGGER trunk_groups_insert_version AFTER INSERT ON trunk_groups
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER trunk_groups_update_version AFTER UPDATE ON trunk_groups
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER trunk_groups_delete_version AFTER DELETE ON trunk_groups
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;

CREATE TRIGGER dids_insert_version AFTER INSERT ON dids
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER dids_update_version AFTER UPDATE ON dids
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER dids_delete_version AFTER DELETE ON dids
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
