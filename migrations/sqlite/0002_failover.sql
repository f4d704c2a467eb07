-- Failover settings (DESIGN.md, "Words"): a failover number per DID, and per trunk group a
-- global failover number (used when the DID has none) and a failover PBX — either a SIP URI
-- or another trunk group of the same account.
--
-- The store (src/carrier/store.rs) checks every value before writing it: numbers are E.164,
-- URIs are sip:/sips: with a host and no password, normalised; a failover trunk group exists,
-- belongs to the same account and is not the group itself (that one needs a look-up, so it is
-- enforced in Rust only). The checks below are the last line of defence against other writers.
--
-- ALTER TABLE cannot add table constraints, so the rule "a URI or a trunk group, never both"
-- (and "not itself") is a column CHECK on the last column added: SQLite evaluates column
-- checks against the whole row. The store enforces it in Rust too.
--
-- No ON DELETE action: a trunk group that is another's failover PBX cannot be removed (the
-- store reports which groups use it). The existing trunk_groups and dids triggers bump
-- `config_version` on UPDATE, so changing these columns reloads every running server.

ALTER TABLE trunk_groups ADD COLUMN failover_number TEXT NULL
    CHECK (failover_number IS NULL OR failover_number GLOB '+[1-9]*');

ALTER TABLE trunk_groups ADD COLUMN failover_pbx_uri TEXT NULL
    CHECK (failover_pbx_uri IS NULL
           OR failover_pbx_uri GLOB 'sip:?*'
           OR failover_pbx_uri GLOB 'sips:?*');

ALTER TABLE trunk_groups ADD COLUMN failover_pbx_trunk_group INTEGER NULL
    REFERENCES trunk_groups (id)
    CHECK (failover_pbx_trunk_group IS NULL
           OR (failover_pbx_uri IS NULL AND failover_pbx_trunk_group <> id));

-- Removing a trunk group looks up the groups that fail over to it.
CREATE INDEX trunk_groups_by_failover_pbx ON trunk_groups (failover_pbx_trunk_group);

ALTER TABLE dids ADD COLUMN failover_number TEXT NULL
    CHECK (failover_number IS NULL OR failover_number GLOB '+[1-9]*');
