//! The calls this trunk server handled, kept in a local SQLite file for support, and the
//! `lifeline-carrier calls` listing.
//!
//! The file is `<data_dir>/calls.sqlite3`, private to this server (not the configuration store,
//! not the bindings file), with its own schema in `migrations/calls/` compiled into the binary:
//! a row of `calls` per [`CallRecord`] and a row of `call_attempts` per [`AttemptRecord`]. It
//! runs in WAL mode with `synchronous=NORMAL` and a busy timeout, like the other files of the
//! carrier, and is created readable by its owner only.
//!
//! Writing ([`CallLog`]):
//! - [`CallLog::record`] queues a record without blocking or awaiting (the SIP service loop
//!   calls it); a background writer task writes what is queued in one transaction (at most
//!   [`BATCH`] calls per transaction, in a few multi-row statements), in the order recorded.
//!   After the first record of a batch the writer lingers ([`LINGER`]) so that records come in
//!   batches, not one by one: it does not look at the queue meanwhile, so recording does not
//!   wake it; the [`BATCH`]-th record queued, a flush or a close end the linger at once;
//! - a failed write is logged as a warning (at most one per 10 s while writes keep failing) and
//!   retried a second later, or at once when someone calls [`CallLog::flush`]; the records are
//!   kept meanwhile, up to [`MAX_QUEUED`]: beyond that the oldest are dropped, with a warning;
//! - [`CallLog::flush`] returns once every record queued before it is committed, and
//!   [`CallLog::close`] flushes and closes the file. When the last clone is dropped, the writer
//!   notices it at the end of the linger, writes what is queued (a few attempts if writes fail)
//!   and stops. The writer runs on the Tokio runtime: records still queued when the runtime
//!   shuts down are lost, so a server flushes or closes the log on the way out;
//! - retention: [`CallLog::open`] deletes the calls that started more than `keep` ago, and the
//!   writer does it again at most once an hour.
//!
//! Reading: [`CallLog::recent`] on the server, [`CallLogReader`] for the command line. The
//! reader opens the file read-only and never creates, migrates or prunes it, so it can run
//! while a server writes the same file (WAL: the reader sees the last committed state).
//!
//! `lifeline-carrier calls [--did NUMBER] [--limit N]` prints the newest calls first (20 by
//! default), optionally of one DID (given with or without the `+`), one block per call, as
//! [`format_call`] writes it. The first line has tab-separated fields:
//!
//! `STARTED  CALL_ID  DID  STATUS  OUTCOME  ANSWERED_BY  DURATION`
//!
//! - `STARTED`: when the INVITE arrived, UTC with milliseconds, `2026-11-26T15:25:03.120Z`;
//! - `CALL_ID`: the INVITE's Call-ID; `DID`: E.164 with the `+`;
//! - `STATUS`: the final status the caller got; `OUTCOME`: `delivered`, `reached`,
//!   `passed to peer`, `failed` or `cancelled`;
//! - `ANSWERED_BY`: the target whose answer the caller got, `-` if none;
//! - `DURATION`: from the INVITE to the caller's final answer, `1234ms`.
//!
//! Then one line per target tried, in order: two spaces, then tab-separated fields
//!
//! `+OFFSET  STAGE  TARGET  OUTCOME  DURATION`
//!
//! - `+OFFSET`: when the attempt started after the INVITE arrived, `+120ms`;
//! - `STAGE`: `primary`, `failover PBX`, `failover number` or `next trunk server`;
//! - `TARGET`: the target as the logs name it; `OUTCOME`: how it ended (`answered 200`,
//!   `not delivered: 503`, ...);
//! - `DURATION`: until its outcome was decided, `800ms`, or `-` if undecided when the call ended.
//!
//! Fields may hold spaces but never a tab or a line break: control characters are printed
//! escaped (`\t`, `\n`, `\u{1b}`), so lines always split cleanly. Nothing is printed when there
//! are no calls. The trunk group, server, source and peer of a call are stored but not printed.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{error, info, warn};

use super::call_record::{AttemptRecord, CallRecord};
use super::store::{
    MAX_PARAMETERS, TrunkGroupId, create_private, insert_sqls, pow2_chunks, sql_for, sqlite_options,
};

/// The database file inside the data folder.
pub const CALLS_FILE: &str = "calls.sqlite3";

/// A retention a server may use when its configuration names none: 30 days.
pub const DEFAULT_KEEP: Duration = Duration::from_secs(30 * 86_400);

/// At most this many calls per transaction.
pub const BATCH: usize = 500;

/// After the first record of a batch, the writer waits this long for more before writing,
/// unless [`BATCH`] records are queued first, or a flush or close comes.
pub const LINGER: Duration = Duration::from_millis(200);

/// At most this many records wait in memory while writes fail; beyond that the oldest are
/// dropped.
pub const MAX_QUEUED: usize = 100_000;

/// How often the writer deletes the calls older than the retention.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// After a failed write, the next attempt comes this much later (or at a flush).
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// While writes keep failing, at most one warning per this interval (plus the first one).
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// When every handle is gone and writes fail, the writer tries this many times, then gives up.
const FINAL_ATTEMPTS: u32 = 3;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/calls");

/// Why the call log could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum CallLogError {
    /// The data folder does not exist and could not be created.
    #[error("cannot create the data folder {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The database file does not exist and could not be created.
    #[error("cannot create the call log {path}: {source}")]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Opening read-only: there is no such file (no server recorded calls with this data
    /// folder).
    #[error(
        "cannot open the call log {path}: no such file (no call recorded with this data folder)"
    )]
    Missing { path: PathBuf },
    /// The database file could not be opened: no permission, not an SQLite file, or locked
    /// past the busy timeout.
    #[error("cannot open the call log {path}: {source}")]
    Open { path: PathBuf, source: sqlx::Error },
    /// The schema could not be brought up to date (for instance the file was written by a
    /// newer Lifeline with migrations this one does not know).
    #[error("cannot update the schema of {path}: {source}")]
    Migrate {
        path: PathBuf,
        source: sqlx::migrate::MigrateError,
    },
    /// Deleting the calls older than the retention failed while opening.
    #[error("cannot delete the old calls from {path}: {source}")]
    Prune { path: PathBuf, source: sqlx::Error },
    /// Reading the calls failed (not an SQLite file, no schema, I/O error).
    #[error("cannot read the calls from {path}: {source}")]
    Read { path: PathBuf, source: sqlx::Error },
    /// Writing the queued records failed (I/O error, disk full, lock held past the busy
    /// timeout, damaged schema). The records are kept and retried.
    #[error("cannot write the calls to {path} (the records are kept and retried): {source}")]
    Write {
        path: PathBuf,
        source: Arc<sqlx::Error>,
    },
    /// Writes kept failing and the queue was full: records were dropped, some of them queued
    /// before the flush that reports it.
    #[error(
        "records were dropped from the call log {path}: writes kept failing and the queue was full"
    )]
    Dropped { path: PathBuf },
    /// The background writer has stopped: the log was closed, or the runtime is shutting down.
    #[error("the call log is closed")]
    Closed,
}

type Reply = oneshot::Sender<Result<(), CallLogError>>;

/// What a handle sends to the writer task, in order.
#[derive(Debug)]
enum Message {
    /// A call to write (boxed: a record is much larger than the other messages).
    Record(Box<CallRecord>),
    /// Answer once every record sent before is committed (or the attempt failed).
    Flush(Reply),
    /// Write everything sent before, close the database and stop.
    Close(Reply),
}

/// What the handles and the writer task share.
#[derive(Debug)]
struct Shared {
    path: PathBuf,
    /// One connection: the writer's transactions and the reads take turns.
    pool: SqlitePool,
    /// Records recorded and not yet written or dropped (counted before they are sent).
    unwritten: AtomicUsize,
    /// Wakes a lingering writer: a flush, a close, or the [`BATCH`]-th unwritten record.
    wake: Notify,
}

/// The call log of a running server: the file and its background writer. Cheap to clone:
/// clones share the queue and the writer. When the last clone is dropped, the writer writes
/// what is queued and stops.
#[derive(Debug, Clone)]
pub struct CallLog {
    shared: Arc<Shared>,
    messages: mpsc::UnboundedSender<Message>,
}

impl CallLog {
    /// Opens `<data_dir>/calls.sqlite3`, creating the folder, the file (mode 0600) and the
    /// schema if absent, and deletes the calls that started more than `keep` ago (by the wall
    /// clock). Starts the writer task on the current Tokio runtime; it deletes the old calls
    /// again at most once an hour.
    pub async fn open(data_dir: &Path, keep: Duration) -> Result<CallLog, CallLogError> {
        CallLog::open_with(data_dir, keep, PRUNE_INTERVAL, LINGER).await
    }

    async fn open_with(
        data_dir: &Path,
        keep: Duration,
        prune_every: Duration,
        linger: Duration,
    ) -> Result<CallLog, CallLogError> {
        std::fs::create_dir_all(data_dir).map_err(|source| CallLogError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(CALLS_FILE);
        create_private(&path).map_err(|source| CallLogError::CreateFile {
            path: path.clone(),
            source,
        })?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(sqlite_options(&path))
            .await
            .map_err(|source| CallLogError::Open {
                path: path.clone(),
                source,
            })?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| CallLogError::Migrate {
                path: path.clone(),
                source,
            })?;
        let pruned = prune(&pool, keep)
            .await
            .map_err(|source| CallLogError::Prune {
                path: path.clone(),
                source,
            })?;
        info!(path = %path.display(), pruned, keep_s = keep.as_secs(), "call log opened");

        let shared = Arc::new(Shared {
            path,
            pool,
            unwritten: AtomicUsize::new(0),
            wake: Notify::new(),
        });
        let (messages, receiver) = mpsc::unbounded_channel();
        let writer = Writer {
            shared: Arc::clone(&shared),
            keep,
            prune_every,
            next_prune: tokio::time::Instant::now() + prune_every,
            linger,
            batch_due: tokio::time::Instant::now(),
            queue: VecDeque::new(),
            taken: 0,
            done: 0,
            flushes: Vec::new(),
            retry_at: None,
            failures: 0,
            last_warning: None,
        };
        tokio::spawn(writer.run(receiver));
        Ok(CallLog { shared, messages })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Queues `call` for the writer. Never blocks and never awaits; callable from any thread.
    /// After [`CallLog::close`] the record is lost (with a warning).
    pub fn record(&self, call: CallRecord) {
        let unwritten = self.shared.unwritten.fetch_add(1, Ordering::Relaxed) + 1;
        match self.messages.send(Message::Record(Box::new(call))) {
            // Notified once per crossing: the count only ever rises by one.
            Ok(()) if unwritten == BATCH => self.shared.wake.notify_one(),
            Ok(()) => {}
            Err(mpsc::error::SendError(message)) => {
                self.shared.unwritten.fetch_sub(1, Ordering::Relaxed);
                if let Message::Record(call) = message {
                    warn!(
                        path = %self.shared.path.display(),
                        call_id = call.call_id,
                        "the call log is closed; call record lost"
                    );
                }
            }
        }
    }

    /// Returns once every record queued before this call (by any clone) is committed. On
    /// [`CallLogError::Write`] the records stay queued and the writer keeps retrying them.
    pub async fn flush(&self) -> Result<(), CallLogError> {
        let (reply, answer) = oneshot::channel();
        self.messages
            .send(Message::Flush(reply))
            .map_err(|_| CallLogError::Closed)?;
        self.shared.wake.notify_one();
        answer.await.map_err(|_| CallLogError::Closed)?
    }

    /// Flushes, then closes the database and stops the writer. What other clones record
    /// afterwards is lost; their `flush` reports [`CallLogError::Closed`]. If writes keep
    /// failing the database is closed all the same after a few attempts, and the queued
    /// records are lost.
    pub async fn close(self) -> Result<(), CallLogError> {
        let (reply, answer) = oneshot::channel();
        self.messages
            .send(Message::Close(reply))
            .map_err(|_| CallLogError::Closed)?;
        self.shared.wake.notify_one();
        answer.await.map_err(|_| CallLogError::Closed)?
    }

    /// The newest `limit` calls (of `did` if given, with or without its `+`), newest first,
    /// each with its attempts in order. Records still queued are not included: flush first
    /// to see them.
    pub async fn recent(
        &self,
        did: Option<&str>,
        limit: u32,
    ) -> Result<Vec<CallRecord>, CallLogError> {
        let filter = did.map_or(Filter::All, Filter::Did);
        read_recent(&self.shared.pool, &self.shared.path, filter, limit).await
    }

    /// The newest `limit` calls of one trunk group, newest first, as [`CallLog::recent`].
    pub async fn recent_of_trunk_group(
        &self,
        trunk_group: TrunkGroupId,
        limit: u32,
    ) -> Result<Vec<CallRecord>, CallLogError> {
        let filter = Filter::TrunkGroup(trunk_group);
        read_recent(&self.shared.pool, &self.shared.path, filter, limit).await
    }
}

/// Which calls a read returns.
#[derive(Debug, Clone, Copy)]
enum Filter<'a> {
    All,
    Did(&'a str),
    TrunkGroup(TrunkGroupId),
}

/// The call log opened read-only, for the command line: never created, migrated or pruned,
/// safe while a server writes the same file.
#[derive(Debug, Clone)]
pub struct CallLogReader {
    path: PathBuf,
    pool: SqlitePool,
}

impl CallLogReader {
    /// Opens `<data_dir>/calls.sqlite3` read-only; [`CallLogError::Missing`] if there is no
    /// such file, [`CallLogError::Open`] if it cannot be opened or is not an SQLite file.
    pub async fn open(data_dir: &Path) -> Result<CallLogReader, CallLogError> {
        let path = data_dir.join(CALLS_FILE);
        if let Ok(false) = path.try_exists() {
            return Err(CallLogError::Missing { path });
        }
        let options = sqlite_options(&path)
            .create_if_missing(false)
            .read_only(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|source| CallLogError::Open {
                path: path.clone(),
                source,
            })?;
        Ok(CallLogReader { path, pool })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// As [`CallLog::recent`].
    pub async fn recent(
        &self,
        did: Option<&str>,
        limit: u32,
    ) -> Result<Vec<CallRecord>, CallLogError> {
        let filter = did.map_or(Filter::All, Filter::Did);
        read_recent(&self.pool, &self.path, filter, limit).await
    }

    /// Closes the file.
    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// One call as `lifeline-carrier calls` prints it (see the module documentation): the call's
/// line and one line per attempt, each ending with `\n`.
pub fn format_call(call: &CallRecord) -> String {
    let mut out = format!(
        "{}\t{}\t{}\t{}\t{}\t{}\t{}ms\n",
        utc_ms(call.started_at_ms),
        field(&call.call_id),
        field(&call.did),
        call.status,
        field(&call.outcome),
        call.answered_by.as_deref().map_or("-".into(), field),
        call.duration_ms,
    );
    for a in &call.attempts {
        out.push_str(&format!(
            "  +{}ms\t{}\t{}\t{}\t{}\n",
            a.offset_ms,
            field(&a.stage),
            field(&a.target),
            field(&a.outcome),
            a.duration_ms.map_or("-".into(), |d| format!("{d}ms")),
        ));
    }
    out
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
fn utc_ms(unix_ms: i64) -> String {
    let seconds = super::admin::utc(unix_ms.div_euclid(1000));
    let base = seconds.strip_suffix('Z').unwrap_or(&seconds);
    format!("{base}.{:03}Z", unix_ms.rem_euclid(1000))
}

/// A field as printed: control characters (tabs, line breaks) escaped.
fn field(value: &str) -> String {
    if !value.chars().any(char::is_control) {
        return value.to_owned();
    }
    value
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The wall clock, Unix milliseconds.
fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// Deletes the calls that started more than `keep` ago, and their attempts, in one
/// transaction. Returns how many calls.
async fn prune(pool: &SqlitePool, keep: Duration) -> Result<u64, sqlx::Error> {
    let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    let cutoff = now_ms().saturating_sub(keep_ms);
    let mut tx = pool.begin().await?;
    // Explicit rather than relying on `ON DELETE CASCADE` (foreign keys may be off).
    sqlx::query(
        "DELETE FROM call_attempts WHERE call IN (SELECT id FROM calls WHERE started_at_ms < ?)",
    )
    .bind(cutoff)
    .execute(&mut *tx)
    .await?;
    let pruned = sqlx::query("DELETE FROM calls WHERE started_at_ms < ?")
        .bind(cutoff)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(pruned)
}

const CALL_COLUMNS: usize = 12;
const INSERT_CALLS_HEAD: &str = concat!(
    "INSERT INTO calls (id, call_id, did, trunk_group, server, source, from_peer, ",
    "started_at_ms, duration_ms, status, outcome, answered_by) VALUES "
);
/// Rows of the largest `INSERT INTO calls` (a batch takes a few: see [`pow2_chunks`]).
const CALL_CHUNK: usize = 256;

const ATTEMPT_COLUMNS: usize = 7;
const INSERT_ATTEMPTS_HEAD: &str = concat!(
    "INSERT INTO call_attempts ",
    "(call, position, stage, target, offset_ms, duration_ms, outcome) VALUES "
);
/// Rows of the largest `INSERT INTO call_attempts`.
const ATTEMPT_CHUNK: usize = 1024;

const _: () = assert!(CALL_CHUNK.is_power_of_two() && ATTEMPT_CHUNK.is_power_of_two());
const _: () = assert!(CALL_CHUNK * CALL_COLUMNS <= MAX_PARAMETERS);
const _: () = assert!(ATTEMPT_CHUNK * ATTEMPT_COLUMNS <= MAX_PARAMETERS);

static INSERT_CALLS: LazyLock<Vec<String>> =
    LazyLock::new(|| insert_sqls(INSERT_CALLS_HEAD, CALL_COLUMNS, CALL_CHUNK));
static INSERT_ATTEMPTS: LazyLock<Vec<String>> =
    LazyLock::new(|| insert_sqls(INSERT_ATTEMPTS_HEAD, ATTEMPT_COLUMNS, ATTEMPT_CHUNK));

/// A `u64` as SQLite stores it (values past `i64::MAX`, millennia, are clamped).
fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Writes calls in one transaction (rolled back if any statement fails), in a few multi-row
/// statements. The ids of the new rows are assigned here, following the largest id, as SQLite
/// would (`id` is a rowid without AUTOINCREMENT); this writer is the only one inserting.
async fn write_calls(pool: &SqlitePool, calls: &[Box<CallRecord>]) -> Result<(), sqlx::Error> {
    // IMMEDIATE: the write lock from the start, so the largest id read stays the largest.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM calls")
        .fetch_one(&mut *tx)
        .await?;
    let n = i64::try_from(calls.len()).unwrap_or(i64::MAX);
    if last > i64::MAX - n {
        return Err(sqlx::Error::Protocol("no call id left".to_owned()));
    }
    let first = last + 1;

    let mut id = first;
    for chunk in pow2_chunks(calls, CALL_CHUNK) {
        let mut query = sqlx::query(sql_for(&INSERT_CALLS, chunk.len()));
        for call in chunk {
            query = query
                .bind(id)
                .bind(&call.call_id)
                .bind(&call.did)
                .bind(call.trunk_group)
                .bind(&call.server)
                .bind(&call.source)
                .bind(call.from_peer.as_deref())
                .bind(call.started_at_ms)
                .bind(to_i64(call.duration_ms))
                .bind(i64::from(call.status))
                .bind(&call.outcome)
                .bind(call.answered_by.as_deref());
            id += 1;
        }
        query.execute(&mut *tx).await?;
    }

    // (call id, position, attempt) of every attempt of the batch, in order.
    let attempts: Vec<(i64, i64, &AttemptRecord)> = calls
        .iter()
        .zip(first..)
        .flat_map(|(call, id)| {
            call.attempts
                .iter()
                .enumerate()
                .map(move |(position, a)| (id, i64::try_from(position).unwrap_or(i64::MAX), a))
        })
        .collect();
    for chunk in pow2_chunks(&attempts, ATTEMPT_CHUNK) {
        let mut query = sqlx::query(sql_for(&INSERT_ATTEMPTS, chunk.len()));
        for &(call, position, a) in chunk {
            query = query
                .bind(call)
                .bind(position)
                .bind(&a.stage)
                .bind(&a.target)
                .bind(to_i64(a.offset_ms))
                .bind(a.duration_ms.map(to_i64))
                .bind(&a.outcome);
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await
}

const SELECT_CALLS: &str = concat!(
    "SELECT id, call_id, did, trunk_group, server, source, from_peer, started_at_ms, ",
    "duration_ms, status, outcome, answered_by FROM calls ",
    "ORDER BY started_at_ms DESC, id DESC LIMIT ?"
);
const SELECT_CALLS_OF_DID: &str = concat!(
    "SELECT id, call_id, did, trunk_group, server, source, from_peer, started_at_ms, ",
    "duration_ms, status, outcome, answered_by FROM calls WHERE did = ? ",
    "ORDER BY started_at_ms DESC, id DESC LIMIT ?"
);
const SELECT_ATTEMPTS: &str = concat!(
    "SELECT call, position, stage, target, offset_ms, duration_ms, outcome FROM call_attempts ",
    "WHERE call IN (SELECT id FROM calls ORDER BY started_at_ms DESC, id DESC LIMIT ?) ",
    "ORDER BY call, position"
);
const SELECT_CALLS_OF_TRUNK_GROUP: &str = concat!(
    "SELECT id, call_id, did, trunk_group, server, source, from_peer, started_at_ms, ",
    "duration_ms, status, outcome, answered_by FROM calls WHERE trunk_group = ? ",
    "ORDER BY started_at_ms DESC, id DESC LIMIT ?"
);
const SELECT_ATTEMPTS_OF_TRUNK_GROUP: &str = concat!(
    "SELECT call, position, stage, target, offset_ms, duration_ms, outcome FROM call_attempts ",
    "WHERE call IN (SELECT id FROM calls WHERE trunk_group = ? ",
    "ORDER BY started_at_ms DESC, id DESC LIMIT ?) ",
    "ORDER BY call, position"
);
const SELECT_ATTEMPTS_OF_DID: &str = concat!(
    "SELECT call, position, stage, target, offset_ms, duration_ms, outcome FROM call_attempts ",
    "WHERE call IN (SELECT id FROM calls WHERE did = ? ",
    "ORDER BY started_at_ms DESC, id DESC LIMIT ?) ",
    "ORDER BY call, position"
);

/// A DID as stored: E.164 with the `+`.
fn stored_did(did: &str) -> String {
    let did = did.trim();
    format!("+{}", did.strip_prefix('+').unwrap_or(did))
}

/// The newest calls with their attempts, read in one transaction (one snapshot).
async fn read_recent(
    pool: &SqlitePool,
    path: &Path,
    filter: Filter<'_>,
    limit: u32,
) -> Result<Vec<CallRecord>, CallLogError> {
    let read = |source| CallLogError::Read {
        path: path.to_owned(),
        source,
    };
    if limit == 0 {
        return Ok(Vec::new());
    }
    let (calls_sql, attempts_sql) = match filter {
        Filter::All => (SELECT_CALLS, SELECT_ATTEMPTS),
        Filter::Did(_) => (SELECT_CALLS_OF_DID, SELECT_ATTEMPTS_OF_DID),
        Filter::TrunkGroup(_) => (SELECT_CALLS_OF_TRUNK_GROUP, SELECT_ATTEMPTS_OF_TRUNK_GROUP),
    };
    let mut tx = pool.begin().await.map_err(read)?;
    let mut calls = sqlx::query_as::<_, CallRow>(calls_sql);
    let mut attempts = sqlx::query_as::<_, AttemptRow>(attempts_sql);
    match filter {
        Filter::All => {}
        Filter::Did(did) => {
            let did = stored_did(did);
            calls = calls.bind(did.clone());
            attempts = attempts.bind(did);
        }
        Filter::TrunkGroup(group) => {
            calls = calls.bind(group);
            attempts = attempts.bind(group);
        }
    }
    let calls = calls
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(read)?;
    let attempts = attempts
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(read)?;
    tx.commit().await.map_err(read)?;

    let mut by_call: HashMap<i64, Vec<AttemptRecord>> = HashMap::new();
    for row in attempts {
        let (call, position) = (row.call, row.position);
        match row.into_attempt() {
            Ok(a) => by_call.entry(call).or_default().push(a),
            Err(reason) => warn!(
                path = %path.display(),
                call,
                position,
                reason,
                "skipping a stored call attempt that cannot be read back"
            ),
        }
    }
    let mut out = Vec::with_capacity(calls.len());
    for row in calls {
        let id = row.id;
        let attempts = by_call.remove(&id).unwrap_or_default();
        match row.into_call(attempts) {
            Ok(call) => out.push(call),
            Err(reason) => warn!(
                path = %path.display(),
                id,
                reason,
                "skipping a stored call that cannot be read back"
            ),
        }
    }
    Ok(out)
}

/// A row of `calls` as stored.
#[derive(sqlx::FromRow)]
struct CallRow {
    id: i64,
    call_id: String,
    did: String,
    trunk_group: i64,
    server: String,
    source: String,
    from_peer: Option<String>,
    started_at_ms: i64,
    duration_ms: i64,
    status: i64,
    outcome: String,
    answered_by: Option<String>,
}

impl CallRow {
    fn into_call(self, attempts: Vec<AttemptRecord>) -> Result<CallRecord, &'static str> {
        Ok(CallRecord {
            call_id: self.call_id,
            did: self.did,
            trunk_group: self.trunk_group,
            server: self.server,
            source: self.source,
            from_peer: self.from_peer,
            started_at_ms: self.started_at_ms,
            duration_ms: u64::try_from(self.duration_ms).map_err(|_| "negative duration")?,
            status: u16::try_from(self.status).map_err(|_| "status out of range")?,
            outcome: self.outcome,
            answered_by: self.answered_by,
            attempts,
        })
    }
}

/// A row of `call_attempts` as stored.
#[derive(sqlx::FromRow)]
struct AttemptRow {
    call: i64,
    position: i64,
    stage: String,
    target: String,
    offset_ms: i64,
    duration_ms: Option<i64>,
    outcome: String,
}

impl AttemptRow {
    fn into_attempt(self) -> Result<AttemptRecord, &'static str> {
        Ok(AttemptRecord {
            stage: self.stage,
            target: self.target,
            offset_ms: u64::try_from(self.offset_ms).map_err(|_| "negative offset")?,
            duration_ms: match self.duration_ms {
                None => None,
                Some(d) => Some(u64::try_from(d).map_err(|_| "negative duration")?),
            },
            outcome: self.outcome,
        })
    }
}

/// The background writer task.
struct Writer {
    shared: Arc<Shared>,
    keep: Duration,
    prune_every: Duration,
    next_prune: tokio::time::Instant,
    /// [`LINGER`], but for tests.
    linger: Duration,
    /// When the linger of the queued records ends: the first of them came `linger` before.
    batch_due: tokio::time::Instant,
    /// Records received and not yet written, oldest first.
    queue: VecDeque<Box<CallRecord>>,
    /// Records received so far.
    taken: u64,
    /// Records written (or dropped) so far: always the oldest ones.
    done: u64,
    /// Flushes waiting, with the count of records they wait for (`done` must reach it).
    flushes: Vec<(u64, Reply)>,
    /// After a failed write: when to try again (a flush tries at once).
    retry_at: Option<tokio::time::Instant>,
    /// Failed writes in a row.
    failures: u32,
    last_warning: Option<Instant>,
}

impl Writer {
    async fn run(mut self, mut messages: mpsc::UnboundedReceiver<Message>) {
        let close = 'run: loop {
            // Take everything queued without waiting: one transaction for all of it.
            loop {
                match messages.try_recv() {
                    Ok(message) => {
                        if let ControlFlow::Break(reply) = self.take(message) {
                            break 'run Some(reply);
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => break 'run None,
                }
            }
            let now = tokio::time::Instant::now();
            if now >= self.next_prune {
                self.prune().await;
                continue;
            }
            if self.write_now(now) {
                // The outcome is logged, and answered to the flushes it concerns.
                let _ = self.write_batch().await;
                continue;
            }
            // Every arm is cancel-safe; the work runs in the loop body, never cancelled.
            if self.queue.is_empty() {
                // Idle: the first record starts a batch.
                tokio::select! {
                    message = messages.recv() => match message {
                        Some(message) => {
                            if let ControlFlow::Break(reply) = self.take(message) {
                                break 'run Some(reply);
                            }
                        }
                        None => break 'run None,
                    },
                    () = tokio::time::sleep_until(self.next_prune) => {}
                }
            } else {
                // Lingering, or waiting to retry: the channel is left alone, so records sent
                // meanwhile do not wake this task. Records are taken at the next turn.
                let wake = self.retry_at.unwrap_or(self.batch_due).min(self.next_prune);
                tokio::select! {
                    () = self.shared.wake.notified() => {}
                    () = tokio::time::sleep_until(wake) => {}
                }
            }
        };
        // Whatever comes after a close is not written: flushes waiting in the channel get
        // `Closed` when it is dropped.
        drop(messages);
        self.finish(close).await;
    }

    /// Whether to write the queued records now: a flush waits for them, or else the retry
    /// delay after a failure, or the linger, is over (or a full batch is queued).
    fn write_now(&self, now: tokio::time::Instant) -> bool {
        if self.queue.is_empty() {
            false
        } else if !self.flushes.is_empty() {
            true
        } else if let Some(at) = self.retry_at {
            at <= now
        } else {
            self.batch_due <= now || self.queue.len() >= BATCH
        }
    }

    /// Takes a message in; `Break` with the reply on a close.
    fn take(&mut self, message: Message) -> ControlFlow<Reply> {
        match message {
            Message::Record(call) => {
                if self.queue.is_empty() {
                    self.batch_due = tokio::time::Instant::now() + self.linger;
                }
                if self.queue.len() >= MAX_QUEUED {
                    self.queue.pop_front();
                    self.done += 1;
                    self.shared.unwritten.fetch_sub(1, Ordering::Relaxed);
                    // Every flush still waiting was waiting for the dropped record.
                    for (_, reply) in self.flushes.drain(..) {
                        let _ = reply.send(Err(CallLogError::Dropped {
                            path: self.shared.path.clone(),
                        }));
                    }
                    if self.may_warn() {
                        warn!(
                            path = %self.shared.path.display(),
                            queued = MAX_QUEUED,
                            "call log writes keep failing and the queue is full; \
                             dropping the oldest records"
                        );
                    }
                }
                self.queue.push_back(call);
                self.taken += 1;
            }
            Message::Flush(reply) => {
                if self.done >= self.taken {
                    let _ = reply.send(Ok(()));
                } else {
                    self.flushes.push((self.taken, reply));
                }
            }
            Message::Close(reply) => return ControlFlow::Break(reply),
        }
        ControlFlow::Continue(())
    }

    /// Whether a warning may be logged now (rate limit), and if so notes it.
    fn may_warn(&mut self) -> bool {
        if self
            .last_warning
            .is_none_or(|at| at.elapsed() >= WARNING_INTERVAL)
        {
            self.last_warning = Some(Instant::now());
            true
        } else {
            false
        }
    }

    /// Writes the oldest [`BATCH`] queued records in one transaction and answers the flushes
    /// that waited for them; on failure keeps them, schedules a retry, warns (rate-limited)
    /// and answers every waiting flush with the error.
    async fn write_batch(&mut self) -> Result<(), Arc<sqlx::Error>> {
        let count = self.queue.len().min(BATCH);
        let calls = &self.queue.make_contiguous()[..count];
        match write_calls(&self.shared.pool, calls).await {
            Ok(()) => {
                self.queue.drain(..count);
                self.done += count as u64;
                self.shared.unwritten.fetch_sub(count, Ordering::Relaxed);
                self.retry_at = None;
                if self.failures > 0 {
                    info!(
                        path = %self.shared.path.display(),
                        failures = self.failures,
                        written = count,
                        "calls written again after failed attempts"
                    );
                    self.failures = 0;
                    self.last_warning = None;
                }
                let done = self.done;
                let (answered, waiting) = std::mem::take(&mut self.flushes)
                    .into_iter()
                    .partition(|(upto, _)| *upto <= done);
                self.flushes = waiting;
                for (_, reply) in answered {
                    let _ = reply.send(Ok(()));
                }
                Ok(())
            }
            Err(source) => {
                self.failures = self.failures.saturating_add(1);
                self.retry_at = Some(tokio::time::Instant::now() + RETRY_DELAY);
                if self.may_warn() {
                    warn!(
                        path = %self.shared.path.display(),
                        error = %source,
                        queued = self.queue.len(),
                        failures = self.failures,
                        "cannot write the calls; keeping them and retrying"
                    );
                }
                let source = Arc::new(source);
                for (_, reply) in self.flushes.drain(..) {
                    let _ = reply.send(Err(CallLogError::Write {
                        path: self.shared.path.clone(),
                        source: Arc::clone(&source),
                    }));
                }
                Err(source)
            }
        }
    }

    /// Deletes the calls older than the retention; a failure is logged and retried later.
    async fn prune(&mut self) {
        self.next_prune = tokio::time::Instant::now() + self.prune_every;
        match prune(&self.shared.pool, self.keep).await {
            Ok(0) => {}
            Ok(pruned) => info!(path = %self.shared.path.display(), pruned, "old calls deleted"),
            Err(e) => warn!(
                path = %self.shared.path.display(),
                error = %e,
                "cannot delete the old calls; trying again later"
            ),
        }
    }

    /// Writes what is queued (a few attempts if writes fail), closes the database and
    /// answers the close, if it was one.
    async fn finish(mut self, close: Option<Reply>) {
        let mut result = Ok(());
        let mut failed = 0;
        while !self.queue.is_empty() {
            if let Some(at) = self.retry_at {
                tokio::time::sleep_until(at).await;
            }
            if let Err(source) = self.write_batch().await {
                failed += 1;
                if failed >= FINAL_ATTEMPTS {
                    error!(
                        path = %self.shared.path.display(),
                        error = %source,
                        lost = self.queue.len(),
                        "cannot write the calls; giving up, the queued records are lost"
                    );
                    result = Err(CallLogError::Write {
                        path: self.shared.path.clone(),
                        source,
                    });
                    break;
                }
            }
        }
        self.shared.pool.close().await;
        if let Some(reply) = close {
            let _ = reply.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carrier::store::{BUSY_TIMEOUT, chunk_lens};
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions, Connection, Executor, SqliteConnection};

    const DAY: Duration = Duration::from_secs(86_400);
    const DEADLINE: Duration = Duration::from_secs(10);
    /// A linger no test waits for: only a flush, a close or a full batch ends it.
    const HOUR: Duration = Duration::from_secs(3600);

    fn attempt(
        stage: &str,
        target: &str,
        offset_ms: u64,
        duration_ms: Option<u64>,
    ) -> AttemptRecord {
        AttemptRecord {
            stage: stage.to_owned(),
            target: target.to_owned(),
            offset_ms,
            duration_ms,
            outcome: match duration_ms {
                Some(_) => "not delivered: 503".to_owned(),
                None => "undecided".to_owned(),
            },
        }
    }

    fn call(call_id: &str, did: &str, started_at_ms: i64) -> CallRecord {
        CallRecord {
            call_id: call_id.to_owned(),
            did: did.to_owned(),
            trunk_group: 7,
            server: "ts1".to_owned(),
            source: "192.0.2.50:5060".to_owned(),
            from_peer: None,
            started_at_ms,
            duration_ms: 1_234,
            status: 200,
            outcome: "delivered".to_owned(),
            answered_by: Some("sip:pbx@192.0.2.1:5060".to_owned()),
            attempts: vec![AttemptRecord {
                stage: "primary".to_owned(),
                target: "sip:pbx@192.0.2.1:5060".to_owned(),
                offset_ms: 0,
                duration_ms: Some(1_200),
                outcome: "answered 200".to_owned(),
            }],
        }
    }

    /// A second connection to the file, as another process would have.
    async fn other_connection(path: &Path) -> SqliteConnection {
        SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(BUSY_TIMEOUT)
            .connect()
            .await
            .unwrap()
    }

    async fn count(path: &Path, table: &str) -> i64 {
        let mut conn = other_connection(path).await;
        let n = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        n
    }

    /// Call `i` with `n` attempts, all told apart by their fields.
    fn call_with_attempts(i: usize, n: usize, started_at_ms: i64) -> CallRecord {
        let mut c = call(&format!("c{i}"), &format!("+4930{i:07}"), started_at_ms);
        c.attempts = (0..n as u64)
            .map(|j| {
                let duration = (j % 2 == 0).then_some(j * 7);
                attempt("next trunk server", &format!("sip:ts{i}-{j}"), j, duration)
            })
            .collect();
        c
    }

    /// The ids of `calls`, in order.
    async fn ids(path: &Path) -> Vec<i64> {
        let mut conn = other_connection(path).await;
        let ids = sqlx::query_scalar("SELECT id FROM calls ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        ids
    }

    #[test]
    fn a_batch_takes_few_statements_of_cached_sizes() {
        for max in [1, 8, CALL_CHUNK, ATTEMPT_CHUNK] {
            for n in 0..3 * ATTEMPT_CHUNK {
                let lens: Vec<usize> = chunk_lens(n, max).collect();
                assert_eq!(lens.iter().sum::<usize>(), n, "{n} rows by {max}");
                assert!(lens.iter().all(|l| l.is_power_of_two() && *l <= max));
                assert!(lens.is_sorted_by(|a, b| a >= b), "{lens:?}");
                assert!(lens.len() <= n / max + max.ilog2() as usize, "{lens:?}");
            }
        }
        assert_eq!(chunk_lens(BATCH, CALL_CHUNK).count(), 6);
    }

    #[tokio::test]
    async fn every_insert_statement_prepares() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open(dir.path(), DAY).await.unwrap();
        for sql in INSERT_CALLS.iter().chain(INSERT_ATTEMPTS.iter()) {
            (&log.shared.pool).prepare(sql.as_str()).await.unwrap();
        }
        assert_eq!(INSERT_CALLS.len(), CALL_CHUNK.ilog2() as usize + 1);
        assert_eq!(INSERT_ATTEMPTS.len(), ATTEMPT_CHUNK.ilog2() as usize + 1);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_full_batch_of_calls_and_attempts_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open(dir.path(), DAY).await.unwrap();
        let now = now_ms();
        // All recorded before the writer runs (one thread): one batch. One call has more
        // attempts than a statement holds; all start in the same millisecond, so the read
        // order is the id order.
        let attempts = |i: usize| match i {
            7 => ATTEMPT_CHUNK * 2 + 3,
            _ => [0, 1, 2, 3, 5][i % 5],
        };
        let calls: Vec<CallRecord> = (0..BATCH)
            .map(|i| call_with_attempts(i, attempts(i), now))
            .collect();
        for c in &calls {
            log.record(c.clone());
        }
        log.flush().await.unwrap();
        let want: Vec<CallRecord> = calls.iter().rev().cloned().collect();
        assert_eq!(log.recent(None, 10_000).await.unwrap(), want);
        let ids = ids(log.path()).await;
        assert_eq!(ids, (1..=BATCH as i64).collect::<Vec<_>>());
        let total: usize = calls.iter().map(|c| c.attempts.len()).sum();
        assert_eq!(count(log.path(), "call_attempts").await, total as i64);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn batches_get_distinct_ids_after_the_largest() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open(dir.path(), DAY).await.unwrap();
        let now = now_ms();
        let mut calls: Vec<CallRecord> = (0..3)
            .map(|i| call_with_attempts(i, i, now + i as i64))
            .collect();
        for c in &calls {
            log.record(c.clone());
        }
        log.flush().await.unwrap();
        // Two more batches.
        for i in 3..BATCH + 5 {
            let c = call_with_attempts(i, i % 4, now + i as i64);
            log.record(c.clone());
            calls.push(c);
        }
        log.flush().await.unwrap();
        assert_eq!(
            ids(log.path()).await,
            (1..=calls.len() as i64).collect::<Vec<_>>()
        );
        let want: Vec<CallRecord> = calls.iter().rev().cloned().collect();
        assert_eq!(log.recent(None, 10_000).await.unwrap(), want);

        // The newest row deleted (as a prune may delete a late record of an old call): its id
        // is given again, as SQLite would, and the attempts go with the new call.
        let mut other = other_connection(log.path()).await;
        let newest = calls.len() as i64;
        sqlx::raw_sql(&format!(
            "DELETE FROM call_attempts WHERE call = {newest}; DELETE FROM calls WHERE id = {newest}"
        ))
        .execute(&mut other)
        .await
        .unwrap();
        other.close().await.unwrap();
        calls.pop();
        let again = call_with_attempts(9_999, 2, now + 100_000);
        log.record(again.clone());
        log.flush().await.unwrap();
        calls.push(again);
        assert_eq!(
            ids(log.path()).await,
            (1..=calls.len() as i64).collect::<Vec<_>>()
        );
        let want: Vec<CallRecord> = calls.iter().rev().cloned().collect();
        assert_eq!(log.recent(None, 10_000).await.unwrap(), want);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_flush_or_a_close_ends_the_linger() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open_with(dir.path(), DAY, PRUNE_INTERVAL, HOUR)
            .await
            .unwrap();
        let path = log.path().to_owned();
        let now = now_ms();
        log.record(call("a", "+4930111111", now));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Lingering: a record sent meanwhile does not end it.
        log.record(call("b", "+4930111111", now + 1));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(count(&path, "calls").await, 0);
        tokio::time::timeout(DEADLINE, log.flush())
            .await
            .expect("the flush waited for the linger")
            .unwrap();
        // Readable by anyone once the flush returns.
        assert_eq!(count(&path, "calls").await, 2);

        log.record(call("c", "+4930111111", now + 2));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(count(&path, "calls").await, 2);
        tokio::time::timeout(DEADLINE, log.close())
            .await
            .expect("the close waited for the linger")
            .unwrap();
        assert_eq!(count(&path, "calls").await, 3);
    }

    #[tokio::test]
    async fn a_full_batch_ends_the_linger() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open_with(dir.path(), DAY, PRUNE_INTERVAL, HOUR)
            .await
            .unwrap();
        let now = now_ms();
        for i in 0..BATCH - 1 {
            log.record(call(&format!("c{i}"), "+4930111111", now));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(count(log.path(), "calls").await, 0);
        log.record(call("last", "+4930111111", now));
        let start = Instant::now();
        while count(log.path(), "calls").await != BATCH as i64 {
            assert!(start.elapsed() < DEADLINE, "the full batch was not written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_batch_failing_half_way_is_rolled_back_and_retried_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open(dir.path(), DAY).await.unwrap();
        let now = now_ms();
        let before = call_with_attempts(0, 0, now);
        log.record(before.clone());
        log.flush().await.unwrap();

        // The calls insert succeeds, the attempts insert fails.
        let mut other = other_connection(log.path()).await;
        let schema: String =
            sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE name = 'call_attempts'")
                .fetch_one(&mut other)
                .await
                .unwrap();
        sqlx::raw_sql("DROP TABLE call_attempts")
            .execute(&mut other)
            .await
            .unwrap();
        let calls: Vec<CallRecord> = (1..4)
            .map(|i| call_with_attempts(i, [3, 0, 2][i - 1], now + i as i64))
            .collect();
        for c in &calls {
            log.record(c.clone());
        }
        let err = log.flush().await.unwrap_err();
        assert!(err.to_string().contains("no such table"), "{err}");
        assert_eq!(ids(log.path()).await, [1]);

        sqlx::raw_sql(&schema).execute(&mut other).await.unwrap();
        other.close().await.unwrap();
        // A flush tries again at once: each call once, with its own attempts.
        log.flush().await.unwrap();
        assert_eq!(ids(log.path()).await, [1, 2, 3, 4]);
        let want: Vec<CallRecord> = calls
            .iter()
            .rev()
            .chain(std::iter::once(&before))
            .cloned()
            .collect();
        assert_eq!(log.recent(None, 10).await.unwrap(), want);
        assert_eq!(count(log.path(), "call_attempts").await, 5);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn open_creates_a_private_wal_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("state").join("nested");
        let log = CallLog::open(&data, DAY).await.unwrap();
        assert_eq!(log.path(), data.join(CALLS_FILE));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for entry in std::fs::read_dir(&data).unwrap() {
                let entry = entry.unwrap();
                let mode = entry.metadata().unwrap().permissions().mode();
                assert_eq!(mode & 0o077, 0, "{:?} is private", entry.path());
            }
        }
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&log.shared.pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        log.close().await.unwrap();
        let log = CallLog::open(&data, DAY).await.unwrap();
        assert!(log.recent(None, 10).await.unwrap().is_empty());
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_record_with_several_attempts_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open(dir.path(), DAY).await.unwrap();
        let now = now_ms();
        let mut failover = call("a84b4c76e66710@pstn", "+4930123456", now - 5_000);
        failover.from_peer = Some("ts2".to_owned());
        failover.status = 200;
        failover.outcome = "reached".to_owned();
        failover.answered_by = Some("+4917012345678".to_owned());
        failover.duration_ms = u64::MAX; // clamped to i64::MAX
        failover.attempts = vec![
            attempt(
                "primary",
                "sip:pbx@192.0.2.1:5060;transport=tcp",
                0,
                Some(32_000),
            ),
            attempt("failover PBX", "sip:backup@192.0.2.2", 32_000, Some(4)),
            AttemptRecord {
                stage: "failover number".to_owned(),
                target: "+4917012345678".to_owned(),
                offset_ms: 32_004,
                duration_ms: Some(9_000),
                outcome: "answered 200".to_owned(),
            },
        ];
        // More attempts than one insert statement holds.
        let mut many = call("many@pstn", "+4930999999", now - 4_000);
        many.answered_by = None;
        many.outcome = "failed".to_owned();
        many.status = 480;
        many.attempts = (0..(ATTEMPT_CHUNK as u64 * 2 + 3))
            .map(|i| {
                attempt(
                    "next trunk server",
                    &format!("sip:ts{i}.example"),
                    i * 10,
                    None,
                )
            })
            .collect();
        let mut bare = call("bare@pstn", "+4930123456", now - 3_000);
        bare.attempts.clear();
        bare.answered_by = None;
        bare.outcome = "cancelled".to_owned();
        bare.status = 487;
        for c in [&failover, &many, &bare] {
            log.record(c.clone());
        }
        log.flush().await.unwrap();

        failover.duration_ms = i64::MAX as u64;
        let want = vec![bare, many, failover];
        assert_eq!(log.recent(None, 10).await.unwrap(), want);
        log.close().await.unwrap();
        let log = CallLog::open(dir.path(), DAY).await.unwrap();
        assert_eq!(log.recent(None, 10).await.unwrap(), want);
        log.close().await.unwrap();
        let reader = CallLogReader::open(dir.path()).await.unwrap();
        assert_eq!(reader.recent(None, 10).await.unwrap(), want);
        reader.close().await;
    }

    #[tokio::test]
    async fn newest_first_with_a_limit_and_a_did_filter() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open(dir.path(), DAY).await.unwrap();
        let now = now_ms();
        // Recorded out of order; two start in the same millisecond (the later id comes first).
        let calls = [
            call("c3", "+4930111111", now - 3_000),
            call("c1", "+4930222222", now - 5_000),
            call("c4", "+4930111111", now - 2_000),
            call("c2", "+4930111111", now - 4_000),
            call("c4b", "+4930222222", now - 2_000),
        ];
        for c in &calls {
            log.record(c.clone());
        }
        log.flush().await.unwrap();
        let ids = |v: Vec<CallRecord>| v.into_iter().map(|c| c.call_id).collect::<Vec<_>>();
        assert_eq!(
            ids(log.recent(None, 20).await.unwrap()),
            ["c4b", "c4", "c3", "c2", "c1"]
        );
        assert_eq!(ids(log.recent(None, 2).await.unwrap()), ["c4b", "c4"]);
        assert!(log.recent(None, 0).await.unwrap().is_empty());
        for did in ["+4930111111", "4930111111", " 4930111111 "] {
            assert_eq!(
                ids(log.recent(Some(did), 20).await.unwrap()),
                ["c4", "c3", "c2"],
                "{did}"
            );
        }
        assert_eq!(
            ids(log.recent(Some("4930111111"), 2).await.unwrap()),
            ["c4", "c3"]
        );
        assert_eq!(
            ids(log.recent(Some("4930222222"), 20).await.unwrap()),
            ["c4b", "c1"]
        );
        assert!(
            log.recent(Some("+4930333333"), 20)
                .await
                .unwrap()
                .is_empty()
        );
        // The attempts belong to their own calls under a limit and a filter.
        for c in log.recent(Some("4930111111"), 2).await.unwrap() {
            assert_eq!(c.attempts.len(), 1);
        }
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn open_deletes_the_calls_older_than_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open(dir.path(), 10 * DAY).await.unwrap();
        let now = now_ms();
        let day = 86_400_000;
        let old = call("old", "+4930111111", now - 3 * day);
        let older = call("older", "+4930111111", now - 5 * day);
        let recent = call("recent", "+4930111111", now - day / 2);
        for c in [&old, &older, &recent] {
            log.record(c.clone());
        }
        log.flush().await.unwrap();
        log.close().await.unwrap();

        // 10 days: nothing goes.
        let log = CallLog::open(dir.path(), 10 * DAY).await.unwrap();
        assert_eq!(log.recent(None, 10).await.unwrap().len(), 3);
        log.close().await.unwrap();
        // 4 days: the older one goes, with its attempt.
        let log = CallLog::open(dir.path(), 4 * DAY).await.unwrap();
        let path = log.path().to_owned();
        assert_eq!(
            log.recent(None, 10).await.unwrap(),
            vec![recent.clone(), old.clone()]
        );
        log.close().await.unwrap();
        assert_eq!(count(&path, "call_attempts").await, 2);
        // 1 day: only the recent one is left.
        let log = CallLog::open(dir.path(), DAY).await.unwrap();
        assert_eq!(log.recent(None, 10).await.unwrap(), vec![recent]);
        log.close().await.unwrap();
        assert_eq!(count(&path, "calls").await, 1);
        assert_eq!(count(&path, "call_attempts").await, 1);
    }

    #[tokio::test]
    async fn the_writer_prunes_periodically() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open_with(dir.path(), DAY, Duration::from_millis(20), LINGER)
            .await
            .unwrap();
        let now = now_ms();
        // Recorded while running, already past the retention: the next prune deletes it.
        log.record(call("stale", "+4930111111", now - 2 * 86_400_000));
        log.record(call("fresh", "+4930111111", now));
        log.flush().await.unwrap();
        let start = Instant::now();
        loop {
            let left = log.recent(None, 10).await.unwrap();
            if left.len() == 1 {
                assert_eq!(left[0].call_id, "fresh");
                break;
            }
            assert!(start.elapsed() < DEADLINE, "not pruned: {left:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(count(log.path(), "call_attempts").await, 1);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn records_queued_then_dropped_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open(dir.path(), DAY).await.unwrap();
        let now = now_ms();
        let clone = log.clone();
        // Recorded from a thread with no runtime, as any caller may.
        std::thread::spawn({
            let log = log.clone();
            move || {
                for i in 0..1_200 {
                    log.record(call(&format!("t{i}"), "+4930111111", now - 10_000 + i));
                }
            }
        })
        .join()
        .unwrap();
        log.record(call("last", "+4930222222", now));
        drop(log);
        drop(clone);

        // The writer finishes in the background; a new open waits for nothing.
        let start = Instant::now();
        let log = loop {
            let log = CallLog::open(dir.path(), DAY).await.unwrap();
            let n = log.recent(None, 5_000).await.unwrap().len();
            if n == 1_201 {
                break log;
            }
            assert!(start.elapsed() < DEADLINE, "{n} calls on disk");
            log.close().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let newest = log.recent(None, 2).await.unwrap();
        assert_eq!(newest[0].call_id, "last");
        assert_eq!(newest[1].call_id, "t1199");
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn write_errors_keep_the_records_and_they_are_retried() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open(dir.path(), DAY).await.unwrap();
        let now = now_ms();
        log.record(call("before", "+4930111111", now - 1_000));
        log.flush().await.unwrap();

        let mut other = other_connection(log.path()).await;
        sqlx::raw_sql("DROP TABLE call_attempts; DROP TABLE calls")
            .execute(&mut other)
            .await
            .unwrap();
        let a = call("a", "+4930111111", now);
        let b = call("b", "+4930111111", now + 1);
        log.record(a.clone());
        log.record(b.clone());
        let err = log.flush().await.unwrap_err();
        assert!(matches!(err, CallLogError::Write { .. }), "{err:?}");
        assert!(err.to_string().contains("no such table"), "{err}");
        assert!(err.to_string().contains(CALLS_FILE), "{err}");
        // A flush tries again at once, and fails again.
        assert!(log.flush().await.is_err());

        sqlx::raw_sql(include_str!("../../migrations/calls/0001_calls.sql"))
            .execute(&mut other)
            .await
            .unwrap();
        other.close().await.unwrap();
        // Retried without a flush.
        let start = Instant::now();
        while count(log.path(), "calls").await != 2 {
            assert!(start.elapsed() < DEADLINE, "not retried");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        log.flush().await.unwrap();
        assert_eq!(log.recent(None, 10).await.unwrap(), vec![b, a]);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn after_close_other_clones_report_closed() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open(dir.path(), DAY).await.unwrap();
        let clone = log.clone();
        log.record(call("kept", "+4930111111", now_ms()));
        log.close().await.unwrap();
        clone.record(call("late", "+4930111111", now_ms()));
        let err = clone.flush().await.unwrap_err();
        assert!(matches!(err, CallLogError::Closed), "{err:?}");
        drop(clone);
        let reader = CallLogReader::open(dir.path()).await.unwrap();
        let calls = reader.recent(None, 10).await.unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].call_id, "kept");
        reader.close().await;
    }

    #[tokio::test]
    async fn the_reader_never_creates_and_reports_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = CallLogReader::open(&dir.path().join("nowhere"))
            .await
            .unwrap_err();
        assert!(matches!(err, CallLogError::Missing { .. }), "{err:?}");
        assert!(!dir.path().join("nowhere").exists());

        let path = dir.path().join(CALLS_FILE);
        std::fs::write(&path, vec![0x5a; 4096]).unwrap();
        let err = match CallLogReader::open(dir.path()).await {
            Ok(reader) => reader.recent(None, 10).await.unwrap_err(),
            Err(e) => e,
        };
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_reader_sees_what_a_running_writer_committed() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open(dir.path(), DAY).await.unwrap();
        log.record(call("one", "+4930111111", now_ms()));
        log.flush().await.unwrap();
        let reader = CallLogReader::open(dir.path()).await.unwrap();
        assert_eq!(reader.recent(None, 10).await.unwrap().len(), 1);
        log.record(call("two", "+4930111111", now_ms() + 1));
        log.flush().await.unwrap();
        assert_eq!(
            reader.recent(Some("4930111111"), 10).await.unwrap().len(),
            2
        );
        reader.close().await;
        log.close().await.unwrap();
    }

    #[test]
    fn format_of_a_call_and_its_attempts() {
        let mut c = call("a84b4c76e66710@pstn", "+4930123456", 1_795_706_703_120);
        c.attempts = vec![
            attempt("primary", "sip:pbx@192.0.2.1", 0, Some(32_000)),
            attempt("failover number", "+4917012345678", 32_004, None),
        ];
        assert_eq!(
            format_call(&c),
            "2026-11-26T15:25:03.120Z\ta84b4c76e66710@pstn\t+4930123456\t200\tdelivered\t\
             sip:pbx@192.0.2.1:5060\t1234ms\n\
             \x20 +0ms\tprimary\tsip:pbx@192.0.2.1\tnot delivered: 503\t32000ms\n\
             \x20 +32004ms\tfailover number\t+4917012345678\tundecided\t-\n"
        );
        c.answered_by = None;
        c.attempts.clear();
        c.call_id = "evil\tid\n".to_owned();
        c.started_at_ms = -1;
        assert_eq!(
            format_call(&c),
            "1969-12-31T23:59:59.999Z\tevil\\tid\\n\t+4930123456\t200\tdelivered\t-\t1234ms\n"
        );
    }
}
