-- The calls this trunk server handled, in `<data_dir>/calls.sqlite3`: a file local to the server,
-- never shared, kept for support ("why did my call go there?"). The proxy makes one record per
-- inbound call when the caller has its final answer; a writer task appends them in batches,
-- and records older than the retention are deleted (on open, then at most once an hour).
--
-- `trunk_group` is a trunk group id of the configuration store, which is another database: no
-- foreign key. Times are Unix milliseconds (wall clock); durations and offsets milliseconds.
--
-- No CHECK constraints beyond NOT NULL, on purpose: records are written in batches, and a row
-- the schema refused would fail its whole batch again on every retry. The program's types are
-- the only validation; a row that does not read back is skipped (and pruned with its age).

CREATE TABLE calls (
    id            INTEGER PRIMARY KEY,
    -- The Call-ID of the INVITE.
    call_id       TEXT    NOT NULL,
    -- The DID called, E.164 with the '+'.
    did           TEXT    NOT NULL,
    trunk_group   INTEGER NOT NULL,
    -- This trunk server's name.
    server        TEXT    NOT NULL,
    -- Where the INVITE came from (ip:port).
    source        TEXT    NOT NULL,
    -- The peer trunk server that passed the call here, NULL if none.
    from_peer     TEXT    NULL,
    -- When the INVITE arrived.
    started_at_ms INTEGER NOT NULL,
    -- From the INVITE to the caller's final answer.
    duration_ms   INTEGER NOT NULL,
    -- The final status the caller got.
    status        INTEGER NOT NULL,
    -- delivered, reached, passed to peer, failed or cancelled.
    outcome       TEXT    NOT NULL,
    -- The target whose answer the caller got, NULL if none.
    answered_by   TEXT    NULL
);

-- Retention deletes by age; listing is newest first.
CREATE INDEX calls_started_at ON calls (started_at_ms);
-- Listing one DID's calls, newest first.
CREATE INDEX calls_did ON calls (did, started_at_ms);

-- Every target tried for a call, in order (`position` from 0). `call` is the id of the row in
-- `calls` (not the SIP Call-ID).
CREATE TABLE call_attempts (
    call        INTEGER NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    position    INTEGER NOT NULL,
    -- primary, failover PBX, failover number or next trunk server.
    stage       TEXT    NOT NULL,
    -- The target as the logs name it.
    target      TEXT    NOT NULL,
    -- When the attempt started, after the INVITE arrived.
    offset_ms   INTEGER NOT NULL,
    -- How long until its outcome was decided; NULL if undecided when the call ended.
    duration_ms INTEGER NULL,
    -- How it ended (answered 200, not delivered: 503, transport error, ...).
    outcome     TEXT    NOT NULL,
    PRIMARY KEY (call, position)
) WITHOUT ROWID;
