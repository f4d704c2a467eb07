-- Presence and health: what the API's status of a trunk group is made of. Neither is
-- configuration: no config_version triggers.
--
-- presence: one row per trunk server and trunk group that holds live bindings there, written
-- by each server when the number changes (and at start). Times are Unix milliseconds.
CREATE TABLE presence (
    server         TEXT    NOT NULL,
    trunk_group_id INTEGER NOT NULL,
    contacts       INTEGER NOT NULL,
    updated_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (server, trunk_group_id)
);

-- health_reports: what agents report (JSON text as received, checked by the API), with the
-- time received. Only the newest few per trunk group are kept.
CREATE TABLE health_reports (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    trunk_group_id INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    report         TEXT    NOT NULL
);
CREATE INDEX health_reports_by_group ON health_reports (trunk_group_id, id);
