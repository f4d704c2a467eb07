//! This trunk server's own registrations (bindings), kept in a local SQLite file and written
//! behind.
//!
//! The file is `<data_dir>/bindings.sqlite3`, private to this server (never shared, unlike the
//! configuration store: the bindings are the registrations this server received), with its
//! own schema in `migrations/bindings/` compiled into the binary. It runs in WAL mode with
//! `synchronous=NORMAL` and a busy timeout, like the configuration store, and is created
//! readable by its owner only.
//!
//! The registrar keeps the bindings in memory; memory is the source of truth while the server
//! runs, and the file only lets them survive a restart:
//! - [`BindingStore::open`] deletes the bindings that expired while the server was down and
//!   returns the rest, for the registrar to load;
//! - [`BindingStore::upsert`] and [`BindingStore::remove`] record a change without blocking
//!   or awaiting, so the REGISTER rate is not bound by fsync. A background writer task
//!   coalesces the changes by key (trunk group, contact; the last change wins) and writes all
//!   of them in one transaction at most every flush interval (the registrar uses
//!   [`DEFAULT_FLUSH_INTERVAL`]; the design asks for "within a second");
//! - a failed write is logged as a warning and its changes are kept and retried on the next
//!   tick: nothing is lost, unless a newer change to the same key replaced it meanwhile;
//! - [`BindingStore::flush`] waits until every change recorded before it is committed
//!   (shutdown, tests), and [`BindingStore::close`] flushes and closes the file.
//!
//! Expiry: the registrar removes the bindings it expires with [`BindingStore::remove`] (it has
//! to drop them from memory anyway, and a removal is just another coalesced change). There is
//! no separate purge while running; the bindings that expire while the server is down are
//! deleted by the next [`BindingStore::open`].
//!
//! Durability: with WAL and `synchronous=NORMAL` a commit does not wait for fsync; a power cut
//! may lose the last transactions (at most a second of changes, plus what the OS had not
//! written), never the file's consistency. The PBXs re-register anyway.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sqlx::Sqlite;
use sqlx::sqlite::{SqliteArguments, SqlitePool, SqlitePoolOptions};
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use super::store::{
    Backend, JoinedScan, MAX_PARAMETERS, TrunkGroupId, create_private, insert_sqls, pow2_chunks,
    sql_for, sqlite_options,
};
use crate::sip::transport::Transport;

/// The database file inside the data folder.
pub const BINDINGS_FILE: &str = "bindings.sqlite3";

/// How often the registrar has the pending changes written.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// While writes keep failing, at most one warning per this interval (plus the first one).
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/bindings");

/// One registered contact of a trunk group on this server.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// The trunk group that registered ([`TrunkGroupId`] of the configuration store).
    pub trunk_group: TrunkGroupId,
    /// The Contact URI as registered (inside `<>`); with `trunk_group`, the binding's key.
    /// Compared byte for byte.
    pub contact: String,
    /// The Contact's header parameters other than `expires` and `q`, as written, e.g.
    /// `;+sip.instance="<urn:uuid:...>";reg-id=1` (`""` if none).
    pub contact_params: String,
    /// The q-value times 1000 (`q=0.5` is 500); `None` if the Contact had none.
    pub q: Option<u16>,
    /// When the binding expires: wall clock, Unix milliseconds.
    pub expires_at_ms: i64,
    /// The Call-ID of the REGISTER that created or last refreshed the binding.
    pub call_id: String,
    /// The CSeq number of that REGISTER.
    pub cseq: u32,
    /// Where the REGISTER came from.
    pub flow: BindingFlow,
    /// The User-Agent of that REGISTER, if it had one.
    pub user_agent: Option<String>,
    /// When the binding was last registered or refreshed: wall clock, Unix milliseconds.
    pub registered_at_ms: i64,
}

/// The flow a REGISTER arrived on: requests for the binding go back the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingFlow {
    /// The transport the REGISTER arrived on.
    pub transport: Transport,
    /// The address it came from (the PBX, or its NAT).
    pub remote: SocketAddr,
    /// The local address it arrived at.
    pub local: SocketAddr,
}

/// Why the binding store could not be opened, or a flush did not complete.
#[derive(Debug, thiserror::Error)]
pub enum BindingStoreError {
    /// The data folder does not exist and could not be created.
    #[error("cannot create the data folder {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The database file does not exist and could not be created.
    #[error("cannot create the binding store {path}: {source}")]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The database file could not be opened: no permission, not an SQLite file, or locked
    /// past the busy timeout.
    #[error("cannot open the binding store {path}: {source}")]
    Open { path: PathBuf, source: sqlx::Error },
    /// The schema could not be brought up to date (for instance the file was written by a
    /// newer Lifeline with migrations this one does not know).
    #[error("cannot update the schema of {path}: {source}")]
    Migrate {
        path: PathBuf,
        source: sqlx::migrate::MigrateError,
    },
    /// Deleting the expired bindings or reading the others failed while opening.
    #[error("cannot load the bindings from {path}: {source}")]
    Load { path: PathBuf, source: sqlx::Error },
    /// Writing the pending changes failed (I/O error, disk full, lock held past the busy
    /// timeout, damaged schema). The changes are kept and retried on the next tick.
    #[error("cannot write the bindings to {path} (the changes are kept and retried): {source}")]
    Write { path: PathBuf, source: sqlx::Error },
    /// The background writer has stopped: the store was closed, or the runtime is shutting
    /// down.
    #[error("the binding store is closed")]
    Closed,
}

/// A binding's key: trunk group and contact URI.
type Key = (TrunkGroupId, String);

/// A change waiting to be written.
#[derive(Debug, Clone, PartialEq)]
enum Change {
    Upsert(Binding),
    Remove,
}

/// The changes waiting to be written, at most one per key.
type Pending = HashMap<Key, Change>;

/// What the handles and the writer task share.
#[derive(Debug)]
struct Shared {
    /// The coalescing map. Recording a change locks it for one hash-map insert; the writer
    /// locks it only to swap it for an empty one (never across an await), so `upsert` does
    /// not wait for the database. Its size is bounded by the number of distinct keys (about
    /// the number of bindings in memory), however long the writer is stuck; a channel of
    /// changes would instead grow with the REGISTER rate while a write waits on a lock.
    pending: Mutex<Pending>,
    path: PathBuf,
    pool: SqlitePool,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while the lock is held; a poisoned map is still consistent.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts back a batch that could not be written, under the changes recorded since it was
    /// taken (those are newer and win).
    fn restore(&self, batch: Pending) {
        let mut pending = self.pending();
        for (key, change) in batch {
            pending.entry(key).or_insert(change);
        }
    }
}

/// What a handle asks of the writer task. Only callers that await an answer send requests
/// (changes go through the coalescing map), so this unbounded channel holds at most one
/// request per waiting caller.
#[derive(Debug)]
enum Request {
    /// Write everything pending now and answer.
    Flush(oneshot::Sender<Result<(), BindingStoreError>>),
    /// Write everything pending, close the database and stop.
    Close(oneshot::Sender<Result<(), BindingStoreError>>),
}

/// The bindings file and its background writer. Cheap to clone: clones share the pending
/// changes and the writer. When the last clone is dropped, the writer writes what is
/// pending (logging a failure) and stops.
#[derive(Clone)]
pub struct BindingStore {
    shared: Arc<Shared>,
    requests: mpsc::UnboundedSender<Request>,
}

impl std::fmt::Debug for BindingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BindingStore")
            .field("path", &self.shared.path)
            .field("pending", &self.pending())
            .finish()
    }
}

impl BindingStore {
    /// Opens `<data_dir>/bindings.sqlite3`, creating the folder, the file (mode 0600) and the
    /// schema if absent; deletes the bindings with `expires_at_ms <= now_ms` and returns the
    /// others, ordered by trunk group and contact. A row that cannot be read back (an
    /// unknown transport, an address or number out of range) is skipped with a warning; it
    /// is deleted once it expires.
    ///
    /// Starts the writer task on the current Tokio runtime; it writes at most every
    /// `flush_interval` (at least 1 ms).
    pub async fn open(
        data_dir: &Path,
        flush_interval: Duration,
        now_ms: i64,
    ) -> Result<(BindingStore, Vec<Binding>), BindingStoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| BindingStoreError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(BINDINGS_FILE);
        create_private(&path).map_err(|source| BindingStoreError::CreateFile {
            path: path.clone(),
            source,
        })?;
        let options = sqlite_options(&path);
        // One writer, one connection: the writer's transactions never wait for each other.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|source| BindingStoreError::Open {
                path: path.clone(),
                source,
            })?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| BindingStoreError::Migrate {
                path: path.clone(),
                source,
            })?;

        let load = |source| BindingStoreError::Load {
            path: path.clone(),
            source,
        };
        let expired = sqlx::query("DELETE FROM bindings WHERE expires_at_ms <= ?")
            .bind(now_ms)
            .execute(&pool)
            .await
            .map_err(load)?
            .rows_affected();
        let rows = load_rows(&pool, LOAD_CHUNK).await.map_err(load)?;
        let mut bindings = Vec::with_capacity(rows.len());
        for row in rows {
            let (trunk_group, contact) = (row.trunk_group, row.contact.clone());
            match row.into_binding() {
                Ok(binding) => bindings.push(binding),
                Err(reason) => warn!(
                    path = %path.display(),
                    trunk_group,
                    contact,
                    reason,
                    "skipping a stored binding that cannot be read back"
                ),
            }
        }
        info!(
            path = %path.display(),
            loaded = bindings.len(),
            expired,
            "bindings loaded"
        );

        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            path,
            pool,
        });
        let (requests, receiver) = mpsc::unbounded_channel();
        let writer = Writer {
            shared: Arc::clone(&shared),
            failures: 0,
            last_warning: None,
        };
        tokio::spawn(writer.run(receiver, flush_interval.max(Duration::from_millis(1))));
        Ok((BindingStore { shared, requests }, bindings))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Records that `binding` was created or refreshed, replacing any pending change to the
    /// same trunk group and contact. Never blocks on the database and never awaits.
    pub fn upsert(&self, binding: Binding) {
        let key = (binding.trunk_group, binding.contact.clone());
        self.shared.pending().insert(key, Change::Upsert(binding));
    }

    /// Records that the binding of `trunk_group` for `contact` was removed (unregistered or
    /// expired), replacing any pending change to it. Never blocks on the database and never
    /// awaits. Removing a binding the file does not have is harmless.
    pub fn remove(&self, trunk_group: TrunkGroupId, contact: &str) {
        self.shared
            .pending()
            .insert((trunk_group, contact.to_owned()), Change::Remove);
    }

    /// How many changes (distinct keys) wait to be written, not counting a batch the writer is
    /// writing at this moment.
    pub fn pending(&self) -> usize {
        self.shared.pending().len()
    }

    /// Writes every change recorded before this call now, in one transaction, and returns
    /// once it is committed. On [`BindingStoreError::Write`] the changes stay pending and the
    /// writer keeps retrying them on its ticks.
    pub async fn flush(&self) -> Result<(), BindingStoreError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Flush(reply))
            .map_err(|_| BindingStoreError::Closed)?;
        answer.await.map_err(|_| BindingStoreError::Closed)?
    }

    /// Flushes, then closes the database (checkpointing the WAL) and stops the writer. The
    /// changes other clones record afterwards are not written; their `flush` reports
    /// [`BindingStoreError::Closed`]. On a write error the database is closed all the same
    /// and the pending changes are lost.
    pub async fn close(self) -> Result<(), BindingStoreError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Close(reply))
            .map_err(|_| BindingStoreError::Closed)?;
        answer.await.map_err(|_| BindingStoreError::Closed)?
    }
}

/// The background writer task.
struct Writer {
    shared: Arc<Shared>,
    /// Failed writes in a row.
    failures: u32,
    last_warning: Option<Instant>,
}

impl Writer {
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>, every: Duration) {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.tick().await; // The first tick is immediate; nothing is pending yet.
        loop {
            // Both arms are cancel-safe; the writes run in the arm bodies, never cancelled.
            tokio::select! {
                request = requests.recv() => match request {
                    Some(Request::Flush(reply)) => {
                        let _ = reply.send(self.write_pending().await);
                    }
                    Some(Request::Close(reply)) => {
                        let result = self.write_pending().await;
                        self.shared.pool.close().await;
                        let _ = reply.send(result);
                        return;
                    }
                    None => {
                        // Every handle is gone: a last attempt (a failure is logged).
                        let _ = self.write_pending().await;
                        self.shared.pool.close().await;
                        return;
                    }
                },
                _ = ticker.tick() => {
                    let _ = self.write_pending().await;
                }
            }
        }
    }

    /// Writes everything pending in one transaction; on failure puts it back and warns.
    async fn write_pending(&mut self) -> Result<(), BindingStoreError> {
        let batch = std::mem::take(&mut *self.shared.pending());
        if batch.is_empty() {
            return Ok(());
        }
        let count = batch.len();
        match write_batch(&self.shared.pool, &batch).await {
            Ok(()) => {
                if self.failures > 0 {
                    info!(
                        path = %self.shared.path.display(),
                        failures = self.failures,
                        written = count,
                        "bindings written again after failed attempts"
                    );
                    self.failures = 0;
                    self.last_warning = None;
                }
                Ok(())
            }
            Err(source) => {
                self.shared.restore(batch);
                self.failures = self.failures.saturating_add(1);
                if self
                    .last_warning
                    .is_none_or(|at| at.elapsed() >= WARNING_INTERVAL)
                {
                    warn!(
                        path = %self.shared.path.display(),
                        error = %source,
                        changes = count,
                        failures = self.failures,
                        "cannot write the bindings; keeping the changes and retrying"
                    );
                    self.last_warning = Some(Instant::now());
                }
                Err(BindingStoreError::Write {
                    path: self.shared.path.clone(),
                    source,
                })
            }
        }
    }
}

/// Upserts per statement: one statement per row costs a round trip to SQLite's worker thread
/// each, several times the insert itself. A batch is written in as many statements of 64 rows
/// as fit, then one of each smaller power of two its rest needs ([`pow2_chunks`]).
const UPSERT_CHUNK: usize = 64;
const _: () = assert!(UPSERT_CHUNK * COLUMNS.len() <= MAX_PARAMETERS);

/// The upserts of 1, 2, 4 … 64 rows, each cached by SQLx once prepared.
static UPSERTS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let head = format!("INSERT INTO bindings ({}) VALUES ", COLUMNS.join(", "));
    let update = concat!(
        " ON CONFLICT (trunk_group, contact) DO UPDATE SET ",
        "contact_params = excluded.contact_params, q = excluded.q, ",
        "expires_at_ms = excluded.expires_at_ms, call_id = excluded.call_id, ",
        "cseq = excluded.cseq, transport = excluded.transport, remote = excluded.remote, ",
        "local = excluded.local, user_agent = excluded.user_agent, ",
        "registered_at_ms = excluded.registered_at_ms"
    );
    insert_sqls(&head, COLUMNS.len(), UPSERT_CHUNK)
        .into_iter()
        .map(|insert| insert + update)
        .collect()
});

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;

/// Binds one binding's 12 columns, in the order of [`COLUMNS`].
fn bind_binding<'q>(query: SqliteQuery<'q>, b: &'q Binding) -> SqliteQuery<'q> {
    query
        .bind(b.trunk_group)
        .bind(&b.contact)
        .bind(&b.contact_params)
        .bind(b.q.map(i64::from))
        .bind(b.expires_at_ms)
        .bind(&b.call_id)
        .bind(i64::from(b.cseq))
        .bind(b.flow.transport.as_str())
        .bind(b.flow.remote.to_string())
        .bind(b.flow.local.to_string())
        .bind(b.user_agent.as_deref())
        .bind(b.registered_at_ms)
}

/// Writes a batch of changes in one transaction (rolled back if any statement fails). The
/// keys are distinct, so the order of the statements does not matter.
async fn write_batch(pool: &SqlitePool, batch: &Pending) -> Result<(), sqlx::Error> {
    let mut upserts = Vec::new();
    let mut removals = Vec::new();
    for (key, change) in batch {
        match change {
            Change::Upsert(b) => upserts.push(b),
            Change::Remove => removals.push(key),
        }
    }
    let mut tx = pool.begin().await?;
    for chunk in pow2_chunks(&upserts, UPSERT_CHUNK) {
        let mut query = sqlx::query(sql_for(&UPSERTS, chunk.len()));
        for b in chunk {
            query = bind_binding(query, b);
        }
        query.execute(&mut *tx).await?;
    }
    for (trunk_group, contact) in removals {
        sqlx::query("DELETE FROM bindings WHERE trunk_group = ? AND contact = ?")
            .bind(trunk_group)
            .bind(contact)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// Rows per statement of the load: about 2 MB of text.
const LOAD_CHUNK: i64 = 10_000;

/// Every column of `bindings`, in the order of [`Row`].
const COLUMNS: [&str; 12] = [
    "trunk_group",
    "contact",
    "contact_params",
    "q",
    "expires_at_ms",
    "call_id",
    "cseq",
    "transport",
    "remote",
    "local",
    "user_agent",
    "registered_at_ms",
];

/// Every row, ordered by trunk group and contact, from one snapshot, read in chunks of
/// `chunk` rows by rowid (see [`JoinedScan`]: one row at a time, the driver's cost per value
/// took a second for 100 000 bindings).
async fn load_rows(pool: &SqlitePool, chunk: i64) -> Result<Vec<Row>, sqlx::Error> {
    // A user agent is NULL or text that may be empty: tagged.
    let scan = JoinedScan::new(
        Backend::Sqlite,
        "bindings",
        "rowid",
        &COLUMNS,
        &["user_agent"],
        chunk,
    );
    let mut tx = pool.begin().await?;
    let mut rows = Vec::new();
    scan.run(&mut tx, i64::MIN, |chunk| {
        chunk.read_into(&mut rows, row_from_text)
    })
    .await?;
    tx.commit().await?;
    rows.sort_unstable_by(|a, b| (a.trunk_group, &a.contact).cmp(&(b.trunk_group, &b.contact)));
    Ok(rows)
}

/// A row from the text of its columns, as it would decode; `None` if it would not.
fn row_from_text(f: [&str; 12]) -> Option<Row> {
    Some(Row {
        trunk_group: f[0].parse().ok()?,
        contact: f[1].to_owned(),
        contact_params: f[2].to_owned(),
        q: match f[3] {
            "" => None,
            q => Some(q.parse().ok()?),
        },
        expires_at_ms: f[4].parse().ok()?,
        call_id: f[5].to_owned(),
        cseq: f[6].parse().ok()?,
        transport: f[7].to_owned(),
        remote: f[8].to_owned(),
        local: f[9].to_owned(),
        user_agent: match f[10] {
            "" => None,
            ua => Some(ua.strip_prefix('=')?.to_owned()),
        },
        registered_at_ms: f[11].parse().ok()?,
    })
}

/// A row of `bindings` as stored.
#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Row {
    trunk_group: i64,
    contact: String,
    contact_params: String,
    q: Option<i64>,
    expires_at_ms: i64,
    call_id: String,
    cseq: i64,
    transport: String,
    remote: String,
    local: String,
    user_agent: Option<String>,
    registered_at_ms: i64,
}

impl Row {
    fn into_binding(self) -> Result<Binding, &'static str> {
        let q = match self.q {
            None => None,
            Some(q) => Some(u16::try_from(q).map_err(|_| "q out of range")?),
        };
        Ok(Binding {
            trunk_group: self.trunk_group,
            contact: self.contact,
            contact_params: self.contact_params,
            q,
            expires_at_ms: self.expires_at_ms,
            call_id: self.call_id,
            cseq: u32::try_from(self.cseq).map_err(|_| "CSeq out of range")?,
            flow: BindingFlow {
                transport: Transport::from_token(&self.transport).ok_or("unknown transport")?,
                remote: self.remote.parse().map_err(|_| "bad remote address")?,
                local: self.local.parse().map_err(|_| "bad local address")?,
            },
            user_agent: self.user_agent,
            registered_at_ms: self.registered_at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carrier::store::BUSY_TIMEOUT;
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions, Connection, SqliteConnection};

    const TICK: Duration = Duration::from_millis(20);
    const DEADLINE: Duration = Duration::from_secs(10);

    fn binding(trunk_group: i64, contact: &str, expires_at_ms: i64) -> Binding {
        Binding {
            trunk_group,
            contact: contact.to_owned(),
            contact_params: String::new(),
            q: None,
            expires_at_ms,
            call_id: format!("{trunk_group}-{contact}@pbx"),
            cseq: 1,
            flow: BindingFlow {
                transport: Transport::Udp,
                remote: "127.0.0.11:5060".parse().unwrap(),
                local: "127.0.0.10:5060".parse().unwrap(),
            },
            user_agent: None,
            registered_at_ms: expires_at_ms - 3_600_000,
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

    async fn rows_in_file(path: &Path) -> i64 {
        let mut conn = other_connection(path).await;
        sqlx::query_scalar("SELECT count(*) FROM bindings")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }

    /// Waits (up to a generous deadline) until the file holds `want` rows.
    async fn wait_for_rows(path: &Path, want: i64) {
        let start = Instant::now();
        loop {
            let got = rows_in_file(path).await;
            if got == want {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{got} rows in the file, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn open_creates_a_private_wal_file_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("state").join("nested");
        let (store, loaded) = BindingStore::open(&data, TICK, 0).await.unwrap();
        assert!(loaded.is_empty());
        assert_eq!(store.path(), data.join(BINDINGS_FILE));
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
            .fetch_one(&store.shared.pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(&store.shared.pool)
            .await
            .unwrap();
        assert_eq!(busy, 5000);
        store.close().await.unwrap();
        // A second open finds the schema and does not re-run the migrations.
        let (store, loaded) = BindingStore::open(&data, TICK, 0).await.unwrap();
        assert!(loaded.is_empty());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn open_reports_a_folder_it_cannot_create() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let err = BindingStore::open(&file.join("sub"), TICK, 0)
            .await
            .unwrap_err();
        assert!(
            matches!(err, BindingStoreError::CreateDir { .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn round_trip_across_reopen_and_expired_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BindingStore::open(dir.path(), TICK, 1_000).await.unwrap();

        let mut a = binding(7, "sip:pbx@192.0.2.1:5060;transport=tcp", 10_000);
        a.contact_params =
            ";+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\";reg-id=1"
                .to_owned();
        a.q = Some(500);
        a.cseq = u32::MAX;
        a.user_agent = Some("Asterisk PBX 20.5.0".to_owned());
        a.flow = BindingFlow {
            transport: Transport::Tls,
            remote: "[2001:db8::1]:40000".parse().unwrap(),
            local: "[::1]:5061".parse().unwrap(),
        };
        let b = binding(7, "sip:backup@192.0.2.2", 5_000);
        let c = binding(8, "sip:pbx@192.0.2.3", 20_000);
        let removed = binding(9, "sip:gone@192.0.2.4", 30_000);
        for x in [&a, &b, &c, &removed] {
            store.upsert(x.clone());
        }
        store.flush().await.unwrap();
        store.remove(9, "sip:gone@192.0.2.4");
        store.remove(9, "sip:never-registered@192.0.2.5");
        store.flush().await.unwrap();
        drop(store);

        // Before b expires: all three, ordered by trunk group and contact.
        let (store, loaded) = BindingStore::open(dir.path(), TICK, 2_000).await.unwrap();
        assert_eq!(loaded, vec![b.clone(), a.clone(), c.clone()]);
        store.close().await.unwrap();

        // At b's expiry (<= now): b is gone, from the result and from the file.
        let (store, loaded) = BindingStore::open(dir.path(), TICK, 5_000).await.unwrap();
        assert_eq!(loaded, vec![a.clone(), c.clone()]);
        assert_eq!(rows_in_file(store.path()).await, 2);
        store.close().await.unwrap();
    }

    /// An empty store whose writer waits an hour between rounds: only a flush (or the last
    /// handle going) writes.
    async fn open_flush_only(dir: &Path) -> BindingStore {
        BindingStore::open(dir, Duration::from_secs(3600), 0)
            .await
            .unwrap()
            .0
    }

    #[tokio::test]
    async fn batches_of_any_size_are_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_flush_only(dir.path()).await;
        let mut all = Vec::new();
        // Sizes that need the 64-row statement, several smaller ones, or one alone.
        for (round, size) in [1, 63, 64, 65, 127, 200].into_iter().enumerate() {
            for i in 0..size {
                let b = binding(
                    round as i64 + 1,
                    &format!("sip:pbx{i}@192.0.2.1"),
                    1_000_000,
                );
                store.upsert(b.clone());
                all.push(b);
            }
            store.flush().await.unwrap();
            assert_eq!(
                rows_in_file(store.path()).await,
                all.len() as i64,
                "after {size}"
            );
        }
        store.close().await.unwrap();
        let (store, mut loaded) = BindingStore::open(dir.path(), TICK, 0).await.unwrap();
        let key = |b: &Binding| (b.trunk_group, b.contact.clone());
        loaded.sort_by_key(key);
        all.sort_by_key(key);
        assert_eq!(loaded, all);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn repeated_changes_to_one_key_coalesce_and_the_last_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_flush_only(dir.path()).await;
        let mut last = binding(1, "sip:pbx@192.0.2.1", 1_000_000);
        for cseq in 1..=1000u32 {
            last.cseq = cseq;
            last.expires_at_ms = 1_000_000 + i64::from(cseq);
            store.upsert(last.clone());
        }
        assert_eq!(store.pending(), 1);
        // Upsert then remove: removed; remove then upsert: present.
        store.upsert(binding(2, "sip:short@192.0.2.2", 1_000_000));
        store.remove(2, "sip:short@192.0.2.2");
        store.remove(3, "sip:back@192.0.2.3");
        let back = binding(3, "sip:back@192.0.2.3", 1_000_000);
        store.upsert(back.clone());
        assert_eq!(store.pending(), 3);
        store.flush().await.unwrap();
        assert_eq!(store.pending(), 0);
        assert_eq!(rows_in_file(store.path()).await, 2);
        store.close().await.unwrap();

        let (store, loaded) = BindingStore::open(dir.path(), TICK, 0).await.unwrap();
        assert_eq!(loaded, vec![last, back]);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn many_keys_written_behind_then_flushed_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BindingStore::open(dir.path(), TICK, 0).await.unwrap();
        let mut all: Vec<Binding> = (0..5_000)
            .map(|i| {
                let mut b = binding(
                    i % 50,
                    &format!("sip:pbx-{i}@192.0.2.{}", i % 250),
                    1_000_000 + i,
                );
                b.cseq = u32::try_from(i).unwrap();
                b
            })
            .collect();
        for (n, b) in all.iter().enumerate() {
            store.upsert(b.clone());
            if n % 500 == 0 {
                // Let the writer's ticks take some batches while changes keep coming.
                tokio::task::yield_now().await;
            }
        }
        store.flush().await.unwrap();
        drop(store);

        let (store, loaded) = BindingStore::open(dir.path(), TICK, 0).await.unwrap();
        all.sort_by(|x, y| (x.trunk_group, &x.contact).cmp(&(y.trunk_group, &y.contact)));
        assert_eq!(loaded.len(), 5_000);
        assert!(loaded == all);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn changes_are_written_on_the_ticks_without_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BindingStore::open(dir.path(), TICK, 0).await.unwrap();
        store.upsert(binding(1, "sip:a@192.0.2.1", 1_000));
        store.upsert(binding(1, "sip:b@192.0.2.1", 1_000));
        wait_for_rows(store.path(), 2).await;
        store.remove(1, "sip:a@192.0.2.1");
        wait_for_rows(store.path(), 1).await;
        assert_eq!(store.pending(), 0);
    }

    #[tokio::test]
    async fn dropping_every_handle_writes_what_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_flush_only(dir.path()).await;
        let path = store.path().to_owned();
        let clone = store.clone();
        store.upsert(binding(1, "sip:a@192.0.2.1", 1_000));
        drop(store);
        clone.upsert(binding(1, "sip:b@192.0.2.1", 1_000));
        drop(clone);
        wait_for_rows(&path, 2).await;
    }

    #[tokio::test]
    async fn after_close_other_clones_report_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BindingStore::open(dir.path(), TICK, 0).await.unwrap();
        let clone = store.clone();
        store.close().await.unwrap();
        clone.upsert(binding(1, "sip:late@192.0.2.1", 1_000));
        let err = clone.flush().await.unwrap_err();
        assert!(matches!(err, BindingStoreError::Closed), "{err:?}");
    }

    /// `upsert` is a plain function: it is called here from a thread with no runtime, while the
    /// writer is stuck in a transaction waiting for another connection's write lock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upsert_does_not_wait_for_a_stuck_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_flush_only(dir.path()).await;
        let mut locker = other_connection(store.path()).await;
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut locker)
            .await
            .unwrap();

        store.upsert(binding(1, "sip:first@192.0.2.1", 1_000));
        let flushing = tokio::spawn({
            let store = store.clone();
            async move { store.flush().await }
        });
        // The writer has taken the batch and now waits for the lock (busy timeout 5 s).
        let start = Instant::now();
        while store.pending() != 0 {
            assert!(start.elapsed() < DEADLINE);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let upserts = std::thread::spawn({
            let store = store.clone();
            move || {
                for i in 0..1000 {
                    store.upsert(binding(2, &format!("sip:pbx-{i}@192.0.2.2"), 1_000));
                }
                store.remove(2, "sip:pbx-0@192.0.2.2");
            }
        });
        upserts.join().unwrap();
        assert_eq!(store.pending(), 1000);
        assert!(
            !flushing.is_finished(),
            "the writer was waiting for the lock"
        );

        sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
        flushing.await.unwrap().unwrap();
        assert_eq!(rows_in_file(store.path()).await, 1);
        store.flush().await.unwrap();
        assert_eq!(rows_in_file(store.path()).await, 1000);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn write_errors_keep_the_changes_and_they_are_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BindingStore::open(dir.path(), TICK, 0).await.unwrap();
        let kept = binding(1, "sip:kept@192.0.2.1", 1_000);
        store.upsert(kept.clone());
        store.flush().await.unwrap();

        // Break the schema from another connection: every write now fails.
        let mut other = other_connection(store.path()).await;
        sqlx::query("DROP TABLE bindings")
            .execute(&mut other)
            .await
            .unwrap();
        let a = binding(1, "sip:a@192.0.2.1", 2_000);
        let b = binding(2, "sip:b@192.0.2.2", 3_000);
        store.upsert(a.clone());
        store.upsert(b.clone());
        let err = store.flush().await.unwrap_err();
        assert!(matches!(err, BindingStoreError::Write { .. }), "{err:?}");
        assert!(err.to_string().contains("no such table"), "{err}");
        assert_eq!(store.pending(), 2);
        // A few failed ticks go by; nothing is lost, and newer changes still coalesce. (A tick
        // holds the batch out of the pending map while it tries: look between ticks.)
        tokio::time::sleep(TICK * 5).await;
        eventually_pending(&store, 2).await;
        let mut b2 = b.clone();
        b2.cseq = 2;
        store.upsert(b2.clone());
        eventually_pending(&store, 2).await;

        // Repair: the next tick writes the pending changes, without a flush.
        sqlx::raw_sql(include_str!("../../migrations/bindings/0001_bindings.sql"))
            .execute(&mut other)
            .await
            .unwrap();
        other.close().await.unwrap();
        wait_for_rows(store.path(), 2).await;
        assert_eq!(store.pending(), 0);
        store.close().await.unwrap();

        // The table was recreated empty, so `kept` (written before the damage) is gone.
        let (store, loaded) = BindingStore::open(dir.path(), TICK, 0).await.unwrap();
        assert_eq!(loaded, vec![a, b2]);
        store.close().await.unwrap();
    }

    /// Waits (bounded) until `n` changes are pending between two writer ticks.
    async fn eventually_pending(store: &BindingStore, n: usize) {
        let start = tokio::time::Instant::now();
        while store.pending() != n {
            assert!(
                start.elapsed() < DEADLINE,
                "pending stayed {} (want {n})",
                store.pending()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The batch of a failed write goes back under the changes recorded since it was taken.
    #[tokio::test]
    async fn a_restored_batch_does_not_override_newer_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_flush_only(dir.path()).await;
        store.upsert(binding(1, "sip:a@192.0.2.1", 1_000));
        store.upsert(binding(1, "sip:b@192.0.2.1", 1_000));
        let batch = std::mem::take(&mut *store.shared.pending());
        // Meanwhile: a is removed, c is new.
        store.remove(1, "sip:a@192.0.2.1");
        store.upsert(binding(1, "sip:c@192.0.2.1", 1_000));
        store.shared.restore(batch);
        let pending = store.shared.pending().clone();
        assert_eq!(pending.len(), 3);
        assert_eq!(pending[&(1, "sip:a@192.0.2.1".to_owned())], Change::Remove);
        assert_eq!(
            pending[&(1, "sip:b@192.0.2.1".to_owned())],
            Change::Upsert(binding(1, "sip:b@192.0.2.1", 1_000))
        );
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn rows_that_cannot_be_read_back_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BindingStore::open(dir.path(), TICK, 0).await.unwrap();
        let good = binding(1, "sip:good@192.0.2.1", 1_000);
        store.upsert(good.clone());
        store.upsert(binding(1, "sip:bad@192.0.2.1", 1_000));
        store.flush().await.unwrap();
        let mut other = other_connection(store.path()).await;
        sqlx::query("UPDATE bindings SET transport = 'SCTP' WHERE contact = 'sip:bad@192.0.2.1'")
            .execute(&mut other)
            .await
            .unwrap();
        other.close().await.unwrap();
        store.close().await.unwrap();

        let (store, loaded) = BindingStore::open(dir.path(), TICK, 0).await.unwrap();
        assert_eq!(loaded, vec![good]);
        store.close().await.unwrap();
        // Once expired, the unreadable row is deleted too.
        let (store, loaded) = BindingStore::open(dir.path(), TICK, 1_000).await.unwrap();
        assert!(loaded.is_empty());
        assert_eq!(rows_in_file(store.path()).await, 0);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn loading_by_chunks_reads_every_row_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BindingStore::open(dir.path(), TICK, 0).await.unwrap();
        let mut all = Vec::new();
        for (i, (ua, q, params)) in [
            (None, None, ""),
            (Some(""), Some(0), ";reg-id=1"),
            (Some("="), Some(1000), ";+sip.instance=\"<urn:uuid:1>\""),
            (Some("Asterisk, PBX"), None, ";a=b,c"),
        ]
        .into_iter()
        .enumerate()
        {
            for group in [3, 1, 2] {
                let mut b = binding(group, &format!("sip:pbx{i}@192.0.2.{i}"), 10_000);
                b.user_agent = ua.map(str::to_owned);
                b.q = q;
                b.contact_params = params.to_owned();
                b.cseq = u32::MAX - i as u32;
                all.push(b);
            }
        }
        all[4].flow = BindingFlow {
            transport: Transport::Tls,
            remote: "[2001:db8::1]:40000".parse().unwrap(),
            local: "[::1]:5061".parse().unwrap(),
        };
        for b in &all {
            store.upsert(b.clone());
        }
        store.flush().await.unwrap();
        let pool = &store.shared.pool;
        let plain = async || -> Vec<Row> {
            let sql = format!(
                "SELECT {} FROM bindings ORDER BY trunk_group, contact",
                COLUMNS.join(", ")
            );
            sqlx::query_as(&sql).fetch_all(pool).await.unwrap()
        };
        let want = plain().await;
        assert_eq!(want.len(), 12);
        for chunk in [1, 2, 5, 100] {
            assert_eq!(
                load_rows(pool, chunk).await.unwrap(),
                want,
                "chunks of {chunk}"
            );
        }
        // What does not read back as text is read row by row, in its chunk only.
        let set = async |sql: &str| {
            sqlx::query(sql).execute(pool).await.unwrap();
        };
        set("UPDATE bindings SET call_id = 'a' || char(31) || 'b' WHERE rowid = 2").await;
        let want = plain().await;
        assert_eq!(want.iter().filter(|r| r.call_id == "a\u{1f}b").count(), 1);
        for chunk in [1, 2, 5, 100] {
            assert_eq!(
                load_rows(pool, chunk).await.unwrap(),
                want,
                "chunks of {chunk}"
            );
        }
        // As before, a value of another type fails the load.
        for (odd, fix) in [
            ("user_agent = x'41'", "user_agent = NULL"),
            ("q = 0.5", "q = 500"),
            ("cseq = 'x'", "cseq = 1"),
            ("cseq = x'3132'", "cseq = 1"),
        ] {
            set(&format!("UPDATE bindings SET {odd} WHERE rowid = 5")).await;
            for chunk in [1, 2, 100] {
                assert!(
                    load_rows(pool, chunk).await.is_err(),
                    "{odd}, chunks of {chunk}"
                );
            }
            set(&format!("UPDATE bindings SET {fix} WHERE rowid = 5")).await;
        }
        let want = plain().await;
        for chunk in [1, 3, 100] {
            assert_eq!(
                load_rows(pool, chunk).await.unwrap(),
                want,
                "chunks of {chunk}"
            );
        }
        store.close().await.unwrap();
    }

    /// A throwaway measurement, not a gate: `cargo test --release --lib
    /// carrier::bindings::tests::throughput -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn throughput() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BindingStore::open(dir.path(), DEFAULT_FLUSH_INTERVAL, 0)
            .await
            .unwrap();
        let keys: Vec<Binding> = (0..100_000)
            .map(|i| {
                let mut b = binding(
                    i % 1000,
                    &format!("sip:pbx-{i}@192.0.2.{}", i % 250),
                    1_000_000 + i,
                );
                b.contact_params =
                    ";+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\";reg-id=1"
                        .to_owned();
                b.user_agent = Some("Asterisk PBX 20.5.0".to_owned());
                b
            })
            .collect();

        // Recording: the cost a REGISTER pays.
        let start = Instant::now();
        for b in &keys {
            store.upsert(b.clone());
        }
        let record = start.elapsed();
        // Writing: distinct keys, so nothing coalesces; all in one transaction.
        let start = Instant::now();
        store.flush().await.unwrap();
        let write = start.elapsed();
        println!(
            "upsert: {} distinct keys recorded in {record:?} ({:.0}/s); \
             written in one transaction in {write:?} ({:.0} rows/s)",
            keys.len(),
            keys.len() as f64 / record.as_secs_f64(),
            keys.len() as f64 / write.as_secs_f64(),
        );

        // Sustained, written behind on the 200 ms ticks: 10 000 bindings refreshed in turn
        // (every key changes between two ticks, so every tick writes up to 10 000 rows).
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(3) {
            for b in &keys[..10_000] {
                let mut b = b.clone();
                b.cseq = u32::try_from(n % 1_000_000).unwrap();
                store.upsert(b);
                n += 1;
            }
            tokio::task::yield_now().await;
        }
        store.flush().await.unwrap();
        let sustained = start.elapsed();
        println!(
            "sustained: {n} upserts over 10 000 keys in {sustained:?} ({:.0}/s), all committed",
            n as f64 / sustained.as_secs_f64()
        );
        store.close().await.unwrap();
    }
}
