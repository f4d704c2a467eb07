-- As migrations/sqlite/0005_heartbeats.sql.
CREATE TABLE server_heartbeats (
    server     TEXT   PRIMARY KEY,
    seen_at_ms BIGINT NOT NULL
);
