-- Each trunk server writes its row every few seconds while it runs. The API's status trusts
-- a server's presence rows only while its heartbeat is fresh: a stopped or crashed server's
-- rows would otherwise claim registrations nobody serves. Not configuration: no triggers.
CREATE TABLE server_heartbeats (
    server     TEXT    PRIMARY KEY NOT NULL,
    seen_at_ms INTEGER NOT NULL
);
