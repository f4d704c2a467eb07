-- This trunk server's own registrations (bindings), in `<data_dir>/bindings.sqlite3`: a file
-- local to the server, never shared (the shared store holds only presence). The registrar keeps
-- the bindings in memory and writes changes behind, coalesced, in one transaction at a time.
--
-- One row per registered Contact of a trunk group. `trunk_group` is a trunk group id of the
-- configuration store, which is another database: no foreign key. Times are Unix milliseconds
-- (wall clock). `transport` is the Via token (UDP, TCP, TLS); `remote` and `local` are socket
-- addresses as Rust writes them (`192.0.2.1:5060`, `[2001:db8::1]:5060`).
--
-- No CHECK constraints beyond NOT NULL, on purpose: changes are written in batches, and a row
-- the schema refused would fail its whole batch again on every retry. The program's types are
-- the only validation; a row that does not read back is skipped (and purged when it expires).

CREATE TABLE bindings (
    trunk_group      INTEGER NOT NULL,
    -- The Contact URI as registered (inside <>).
    contact          TEXT    NOT NULL,
    -- The Contact's header parameters other than expires and q, as written ("" if none).
    contact_params   TEXT    NOT NULL,
    -- The q-value times 1000, NULL if the Contact had none.
    q                INTEGER NULL,
    expires_at_ms    INTEGER NOT NULL,
    call_id          TEXT    NOT NULL,
    cseq             INTEGER NOT NULL,
    transport        TEXT    NOT NULL,
    remote           TEXT    NOT NULL,
    local            TEXT    NOT NULL,
    user_agent       TEXT    NULL,
    registered_at_ms INTEGER NOT NULL,
    PRIMARY KEY (trunk_group, contact)
);

-- Opening the store deletes the bindings that expired while the server was down.
CREATE INDEX bindings_expires_at ON bindings (expires_at_ms);
