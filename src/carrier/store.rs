//! The embedded store: the carrier's configuration (accounts, trunk groups, DIDs) in SQLite.
//!
//! The file is `<data_dir>/store.sqlite3`, created with its schema on first open (the
//! migrations in `migrations/sqlite/` are compiled into the binary). It runs in WAL mode with a
//! busy timeout, so the admin command line and a running server can use it at the same time;
//! the server polls [`Store::config_version`], a counter every change bumps, and reloads its
//! in-memory copy when it moves.
//!
//! Rules kept here, whoever calls:
//! - a trunk group's password is never stored: only HA1 = H(username:realm:password) for MD5
//!   and SHA-256 (see [`crate::sip::digest::ha1`]), with the realm they were computed for;
//! - SIP usernames are unique across the carrier, DID numbers are unique and stored in E.164
//!   with the `+`, account names are unique, trunk group names are unique within an account;
//! - removal is refused, never cascaded: an account is removed only without trunk groups, a
//!   trunk group only without DIDs. Deleting routing by accident is worse than one more step.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::sip::digest::{Algorithm, ha1};

/// The database file inside the data folder.
pub const STORE_FILE: &str = "store.sqlite3";

/// How long a statement waits for another process's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest account or trunk group name, in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// Longest SIP username, in bytes (all token characters are ASCII).
pub const MAX_USERNAME_LEN: usize = 64;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// An account's id.
pub type AccountId = i64;

/// A trunk group's id.
pub type TrunkGroupId = i64;

/// Why the store refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data folder does not exist and could not be created.
    #[error("cannot create the data folder {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The database file does not exist and could not be created.
    #[error("cannot create the store {path}: {source}")]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The database file could not be opened: no permission, not an SQLite file, or locked
    /// by another process past the busy timeout.
    #[error("cannot open the store {path}: {source}")]
    Open { path: PathBuf, source: sqlx::Error },
    /// The schema could not be brought up to date (for instance the file was written by a
    /// newer Lifeline with migrations this one does not know).
    #[error("cannot update the schema of {path}: {source}")]
    Migrate {
        path: PathBuf,
        source: sqlx::migrate::MigrateError,
    },
    /// Any other database failure (I/O error, disk full, lock held past the busy timeout).
    #[error("store: {0}")]
    Database(#[from] sqlx::Error),
    /// A phone number is not E.164: an optional `+`, then 8 to 15 digits, the first not 0.
    #[error("invalid phone number {input:?}: {reason}")]
    InvalidNumber { input: String, reason: &'static str },
    /// A SIP username is empty, longer than 64 bytes or has a character outside the RFC 3261
    /// token set (letters, digits and `-.!%*_+`'~`).
    #[error("invalid SIP username {input:?}: {reason}")]
    InvalidUsername { input: String, reason: &'static str },
    /// An account or trunk group name is empty (or only spaces), longer than 200 characters,
    /// or has a control character (tabs and line breaks would break the admin output).
    #[error("invalid {field} {input:?}: {reason}")]
    InvalidName {
        /// `"account name"` or `"trunk group name"`.
        field: &'static str,
        input: String,
        reason: &'static str,
    },
    /// The password is empty.
    #[error("the password must not be empty")]
    EmptyPassword,
    /// The realm (from the configuration) is empty or has a control character or a `"`.
    #[error("invalid realm {0:?}")]
    InvalidRealm(String),
    /// The value must be unique and is already taken; `field` says which one.
    #[error("{field} {value:?} is already taken")]
    Duplicate { field: UniqueField, value: String },
    /// No account has this id.
    #[error("no account with id {0}")]
    AccountNotFound(AccountId),
    /// No trunk group has this id.
    #[error("no trunk group with id {0}")]
    TrunkGroupNotFound(TrunkGroupId),
    /// No trunk group has this SIP username.
    #[error("no trunk group with SIP username {0:?}")]
    UsernameNotFound(String),
    /// The DID (normalised, with `+`) is not in the store.
    #[error("no DID {0}")]
    DidNotFound(String),
    /// The account still owns trunk groups; they must be removed first.
    #[error("account {id} still has {count} trunk group(s); remove them first")]
    AccountHasTrunkGroups { id: AccountId, count: i64 },
    /// The trunk group still has DIDs; they must be removed first.
    #[error("trunk group {id} still has {count} DID(s); remove them first")]
    TrunkGroupHasDids { id: TrunkGroupId, count: i64 },
}

/// A value the store keeps unique, as named in [`StoreError::Duplicate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniqueField {
    /// Account names are unique across the carrier.
    AccountName,
    /// Trunk group names are unique within their account.
    TrunkGroupName,
    /// SIP usernames are unique across the carrier.
    Username,
    /// DID numbers are unique across the carrier.
    Number,
}

impl std::fmt::Display for UniqueField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UniqueField::AccountName => "account name",
            UniqueField::TrunkGroupName => "trunk group name",
            UniqueField::Username => "SIP username",
            UniqueField::Number => "DID number",
        })
    }
}

/// A customer account.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    /// Unix seconds, UTC.
    pub created_at: i64,
}

/// A trunk group: one customer PBX connection and its SIP credentials.
#[derive(Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TrunkGroup {
    pub id: TrunkGroupId,
    pub account_id: AccountId,
    pub name: String,
    /// The Digest username the PBX registers with.
    pub username: String,
    /// The realm the HA1 values were computed for. If the configured realm differs, the
    /// password must be set again: the HA1 values cannot be converted.
    pub realm: String,
    /// MD5(username:realm:password), lowercase hex.
    pub ha1_md5: String,
    /// SHA-256(username:realm:password), lowercase hex.
    pub ha1_sha256: String,
    /// Unix seconds, UTC.
    pub created_at: i64,
}

impl TrunkGroup {
    /// The stored HA1 for `alg`, in lowercase hex.
    pub fn ha1(&self, alg: Algorithm) -> &str {
        match alg {
            Algorithm::Md5 => &self.ha1_md5,
            Algorithm::Sha256 => &self.ha1_sha256,
        }
    }
}

/// HA1 values are as good as the password within their realm: never in logs.
impl std::fmt::Debug for TrunkGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrunkGroup")
            .field("id", &self.id)
            .field("account_id", &self.account_id)
            .field("name", &self.name)
            .field("username", &self.username)
            .field("realm", &self.realm)
            .field("ha1_md5", &"<redacted>")
            .field("ha1_sha256", &"<redacted>")
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// A DID: a number delivered to a trunk group.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Did {
    /// E.164 with the leading `+`.
    pub number: String,
    pub trunk_group_id: TrunkGroupId,
    /// Unix seconds, UTC.
    pub created_at: i64,
}

/// Checks an E.164 number and returns it with the leading `+`.
///
/// Accepts `+` then 8 to 15 digits, the first not 0, or the same digits without the `+`.
/// Nothing else is accepted: no spaces, dashes or national prefixes.
pub fn normalize_e164(input: &str) -> Result<String, StoreError> {
    let refuse = |reason| StoreError::InvalidNumber {
        input: input.to_owned(),
        reason,
    };
    let digits = input.strip_prefix('+').unwrap_or(input);
    if digits.is_empty() {
        return Err(refuse("no digits"));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refuse("only digits may follow the optional '+'"));
    }
    if !(8..=15).contains(&digits.len()) {
        return Err(refuse("E.164 numbers have 8 to 15 digits"));
    }
    if digits.starts_with('0') {
        return Err(refuse("a country code never starts with 0"));
    }
    Ok(format!("+{digits}"))
}

/// Checks a SIP username: 1 to 64 RFC 3261 token characters.
pub fn check_username(input: &str) -> Result<(), StoreError> {
    let refuse = |reason| StoreError::InvalidUsername {
        input: input.to_owned(),
        reason,
    };
    if input.is_empty() {
        return Err(refuse("must not be empty"));
    }
    if input.len() > MAX_USERNAME_LEN {
        return Err(refuse("longer than 64 characters"));
    }
    let token = |b: u8| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b);
    if !input.bytes().all(token) {
        return Err(refuse(
            "only letters, digits and - . ! % * _ + ` ' ~ are allowed",
        ));
    }
    Ok(())
}

/// Checks an account or trunk group name and returns it without surrounding spaces.
fn check_name(field: &'static str, input: &str) -> Result<String, StoreError> {
    let refuse = |reason| StoreError::InvalidName {
        field,
        input: input.to_owned(),
        reason,
    };
    let name = input.trim();
    if name.is_empty() {
        return Err(refuse("must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(refuse("longer than 200 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(refuse(
            "control characters (tabs, line breaks) are not allowed",
        ));
    }
    Ok(name.to_owned())
}

fn check_realm(realm: &str) -> Result<(), StoreError> {
    if realm.is_empty() || realm.chars().any(|c| c.is_control() || c == '"') {
        return Err(StoreError::InvalidRealm(realm.to_owned()));
    }
    Ok(())
}

/// The two HA1 values for a username, realm and password.
fn ha1_pair(username: &str, realm: &str, password: &str) -> Result<(String, String), StoreError> {
    if password.is_empty() {
        return Err(StoreError::EmptyPassword);
    }
    check_realm(realm)?;
    Ok((
        ha1(Algorithm::Md5, username, realm, password),
        ha1(Algorithm::Sha256, username, realm, password),
    ))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What a failed statement says about a constraint.
enum Constraint {
    Unique(String),
    ForeignKey,
}

fn constraint(e: &sqlx::Error) -> Option<Constraint> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    match db.kind() {
        sqlx::error::ErrorKind::UniqueViolation => Some(Constraint::Unique(db.message().into())),
        sqlx::error::ErrorKind::ForeignKeyViolation => Some(Constraint::ForeignKey),
        // A RESTRICT action fails with SQLITE_CONSTRAINT_TRIGGER, which sqlx does not classify.
        _ if db.message().starts_with("FOREIGN KEY constraint failed") => {
            Some(Constraint::ForeignKey)
        }
        _ => None,
    }
}

/// Maps SQLite's "UNIQUE constraint failed: table.column" to the field it names.
fn unique_field(message: &str) -> Option<UniqueField> {
    let columns = message.rsplit(": ").next().unwrap_or(message);
    if columns.contains("trunk_groups.username") {
        Some(UniqueField::Username)
    } else if columns.contains("trunk_groups.name") {
        Some(UniqueField::TrunkGroupName)
    } else if columns.contains("accounts.name") {
        Some(UniqueField::AccountName)
    } else if columns.contains("dids.number") {
        Some(UniqueField::Number)
    } else {
        None
    }
}

/// Turns a unique violation into [`StoreError::Duplicate`], naming the field and the value
/// the caller tried (`values` pairs each field a statement can violate with its value).
fn duplicate(e: sqlx::Error, values: &[(UniqueField, &str)]) -> StoreError {
    if let Some(Constraint::Unique(message)) = constraint(&e)
        && let Some(field) = unique_field(&message)
        && let Some((_, value)) = values.iter().find(|(f, _)| *f == field)
    {
        return StoreError::Duplicate {
            field,
            value: (*value).to_owned(),
        };
    }
    StoreError::Database(e)
}

fn is_foreign_key(e: &sqlx::Error) -> bool {
    matches!(constraint(e), Some(Constraint::ForeignKey))
}

/// `SELECT <every trunk group column> FROM trunk_groups <rest>`.
macro_rules! select_trunk_groups {
    ($rest:literal) => {
        concat!(
            "SELECT id, account_id, name, username, realm, ha1_md5, ha1_sha256, created_at ",
            "FROM trunk_groups ",
            $rest
        )
    };
}

/// Creates an empty database file readable by its owner only (HA1 values are as good as the
/// passwords within their realm; SQLite gives the WAL files the same mode). An existing file
/// is left as it is, mode included.
pub(crate) fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// How every SQLite file of the carrier is opened: WAL (readers never wait for the writer),
/// `synchronous=NORMAL` (a power cut may lose the last transactions, never consistency), and a
/// busy timeout so the admin command and a running server can share a file.
pub(crate) fn sqlite_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT)
}

/// The embedded store. Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
}

impl Store {
    /// Opens `<data_dir>/store.sqlite3`, creating the folder, the file and the schema if
    /// absent and applying any newer migrations.
    pub async fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(STORE_FILE);
        create_private(&path).map_err(|source| StoreError::CreateFile {
            path: path.clone(),
            source,
        })?;
        let options = sqlite_options(&path)
            .foreign_keys(true)
            // Overwrite deleted content, so replaced HA1 values do not linger in free pages.
            .pragma("secure_delete", "ON");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate {
                path: path.clone(),
                source,
            })?;
        Ok(Store { pool, path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes every connection, checkpointing the WAL.
    pub async fn close(self) {
        self.pool.close().await;
    }

    /// A counter that moves with every change to accounts, trunk groups or DIDs, made by
    /// this process or another. One indexed row: cheap enough to poll every second.
    pub async fn config_version(&self) -> Result<i64, StoreError> {
        let version = sqlx::query_scalar("SELECT version FROM config_version WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(version)
    }

    // ---- accounts ----

    /// Creates an account; the name is trimmed and must be unique.
    pub async fn create_account(&self, name: &str) -> Result<Account, StoreError> {
        let name = check_name("account name", name)?;
        let created_at = now();
        let id: AccountId = sqlx::query_scalar(
            "INSERT INTO accounts (name, created_at) VALUES (?, ?) RETURNING id",
        )
        .bind(&name)
        .bind(created_at)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| duplicate(e, &[(UniqueField::AccountName, &name)]))?;
        Ok(Account {
            id,
            name,
            created_at,
        })
    }

    /// The account with this id, if any.
    pub async fn account(&self, id: AccountId) -> Result<Option<Account>, StoreError> {
        let account = sqlx::query_as("SELECT id, name, created_at FROM accounts WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(account)
    }

    /// Every account, by id.
    pub async fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        let accounts = sqlx::query_as("SELECT id, name, created_at FROM accounts ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        Ok(accounts)
    }

    /// Removes an account; refused while it has trunk groups.
    pub async fn remove_account(&self, id: AccountId) -> Result<(), StoreError> {
        match sqlx::query("DELETE FROM accounts WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
        {
            Ok(done) if done.rows_affected() == 0 => Err(StoreError::AccountNotFound(id)),
            Ok(_) => Ok(()),
            Err(e) if is_foreign_key(&e) => {
                let count =
                    sqlx::query_scalar("SELECT count(*) FROM trunk_groups WHERE account_id = ?")
                        .bind(id)
                        .fetch_one(&self.pool)
                        .await?;
                Err(StoreError::AccountHasTrunkGroups { id, count })
            }
            Err(e) => Err(e.into()),
        }
    }

    // ---- trunk groups ----

    /// Creates a trunk group under an account. The password is turned into HA1 values for
    /// `realm` and dropped; it is never stored.
    pub async fn create_trunk_group(
        &self,
        account_id: AccountId,
        name: &str,
        username: &str,
        password: &str,
        realm: &str,
    ) -> Result<TrunkGroup, StoreError> {
        let name = check_name("trunk group name", name)?;
        check_username(username)?;
        let (ha1_md5, ha1_sha256) = ha1_pair(username, realm, password)?;
        let created_at = now();
        let id: TrunkGroupId = sqlx::query_scalar(
            "INSERT INTO trunk_groups \
             (account_id, name, username, realm, ha1_md5, ha1_sha256, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(account_id)
        .bind(&name)
        .bind(username)
        .bind(realm)
        .bind(&ha1_md5)
        .bind(&ha1_sha256)
        .bind(created_at)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            if is_foreign_key(&e) {
                StoreError::AccountNotFound(account_id)
            } else {
                duplicate(
                    e,
                    &[
                        (UniqueField::Username, username),
                        (UniqueField::TrunkGroupName, &name),
                    ],
                )
            }
        })?;
        Ok(TrunkGroup {
            id,
            account_id,
            name,
            username: username.to_owned(),
            realm: realm.to_owned(),
            ha1_md5,
            ha1_sha256,
            created_at,
        })
    }

    /// The trunk group with this id, if any.
    pub async fn trunk_group(&self, id: TrunkGroupId) -> Result<Option<TrunkGroup>, StoreError> {
        let group = sqlx::query_as(select_trunk_groups!("WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(group)
    }

    /// The trunk group a REGISTER or INVITE authenticates as. Usernames are compared
    /// exactly (Digest usernames are case-sensitive).
    pub async fn trunk_group_by_username(
        &self,
        username: &str,
    ) -> Result<Option<TrunkGroup>, StoreError> {
        let group = sqlx::query_as(select_trunk_groups!("WHERE username = ?"))
            .bind(username)
            .fetch_optional(&self.pool)
            .await?;
        Ok(group)
    }

    /// Trunk groups by id: all of them, or those of one account.
    pub async fn list_trunk_groups(
        &self,
        account_id: Option<AccountId>,
    ) -> Result<Vec<TrunkGroup>, StoreError> {
        let groups = sqlx::query_as(select_trunk_groups!(
            "WHERE ?1 IS NULL OR account_id = ?1 ORDER BY id"
        ))
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(groups)
    }

    /// Replaces a trunk group's HA1 values with those of a new password under `realm`
    /// (also the way to move a trunk group to a new realm).
    pub async fn set_trunk_group_password(
        &self,
        id: TrunkGroupId,
        password: &str,
        realm: &str,
    ) -> Result<(), StoreError> {
        if password.is_empty() {
            return Err(StoreError::EmptyPassword);
        }
        check_realm(realm)?;
        let Some(group) = self.trunk_group(id).await? else {
            return Err(StoreError::TrunkGroupNotFound(id));
        };
        let (ha1_md5, ha1_sha256) = ha1_pair(&group.username, realm, password)?;
        // The username is part of the hash: update only if it is still the one hashed.
        let done = sqlx::query(
            "UPDATE trunk_groups SET realm = ?, ha1_md5 = ?, ha1_sha256 = ? \
             WHERE id = ? AND username = ?",
        )
        .bind(realm)
        .bind(&ha1_md5)
        .bind(&ha1_sha256)
        .bind(id)
        .bind(&group.username)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::TrunkGroupNotFound(id));
        }
        Ok(())
    }

    /// Removes a trunk group; refused while it has DIDs.
    pub async fn remove_trunk_group(&self, id: TrunkGroupId) -> Result<(), StoreError> {
        match sqlx::query("DELETE FROM trunk_groups WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
        {
            Ok(done) if done.rows_affected() == 0 => Err(StoreError::TrunkGroupNotFound(id)),
            Ok(_) => Ok(()),
            Err(e) if is_foreign_key(&e) => {
                let count =
                    sqlx::query_scalar("SELECT count(*) FROM dids WHERE trunk_group_id = ?")
                        .bind(id)
                        .fetch_one(&self.pool)
                        .await?;
                Err(StoreError::TrunkGroupHasDids { id, count })
            }
            Err(e) => Err(e.into()),
        }
    }

    // ---- DIDs ----

    /// Adds a DID to a trunk group; `number` may be given with or without the `+`.
    pub async fn create_did(
        &self,
        number: &str,
        trunk_group_id: TrunkGroupId,
    ) -> Result<Did, StoreError> {
        let number = normalize_e164(number)?;
        let created_at = now();
        sqlx::query("INSERT INTO dids (number, trunk_group_id, created_at) VALUES (?, ?, ?)")
            .bind(&number)
            .bind(trunk_group_id)
            .bind(created_at)
            .execute(&self.pool)
            .await
            .map_err(|e| {
                if is_foreign_key(&e) {
                    StoreError::TrunkGroupNotFound(trunk_group_id)
                } else {
                    duplicate(e, &[(UniqueField::Number, &number)])
                }
            })?;
        Ok(Did {
            number,
            trunk_group_id,
            created_at,
        })
    }

    /// The DID for a number given with or without the `+`. A malformed number is an
    /// [`StoreError::InvalidNumber`], an unknown one `Ok(None)`.
    pub async fn did(&self, number: &str) -> Result<Option<Did>, StoreError> {
        let number = normalize_e164(number)?;
        let did =
            sqlx::query_as("SELECT number, trunk_group_id, created_at FROM dids WHERE number = ?")
                .bind(&number)
                .fetch_optional(&self.pool)
                .await?;
        Ok(did)
    }

    /// DIDs by number: all of them, or those of one trunk group.
    pub async fn list_dids(
        &self,
        trunk_group_id: Option<TrunkGroupId>,
    ) -> Result<Vec<Did>, StoreError> {
        let dids = sqlx::query_as(
            "SELECT number, trunk_group_id, created_at FROM dids \
             WHERE ?1 IS NULL OR trunk_group_id = ?1 ORDER BY number",
        )
        .bind(trunk_group_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(dids)
    }

    /// Removes a DID, given with or without the `+`.
    pub async fn remove_did(&self, number: &str) -> Result<(), StoreError> {
        let number = normalize_e164(number)?;
        let done = sqlx::query("DELETE FROM dids WHERE number = ?")
            .bind(&number)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::DidNotFound(number));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REALM: &str = "lifeline.test";

    async fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        (dir, store)
    }

    /// An account and a trunk group under it, ids 1 and 1.
    async fn seeded() -> (tempfile::TempDir, Store, Account, TrunkGroup) {
        let (dir, store) = open().await;
        let account = store.create_account("Acme").await.unwrap();
        let group = store
            .create_trunk_group(account.id, "main", "acme-main", "pw-main", REALM)
            .await
            .unwrap();
        (dir, store, account, group)
    }

    fn is_duplicate(r: Result<impl std::fmt::Debug, StoreError>, want: UniqueField) -> bool {
        matches!(r, Err(StoreError::Duplicate { field, .. }) if field == want)
    }

    #[tokio::test]
    async fn open_creates_folder_and_file_in_wal_mode_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("state").join("nested");
        let store = Store::open(&data).await.unwrap();
        assert_eq!(store.path(), data.join(STORE_FILE));
        assert!(store.path().is_file());
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
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(busy, 5000);
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(fk, 1);
        store.create_account("Acme").await.unwrap();
        store.close().await;

        // A second open finds the data and does not re-run the migrations.
        let store = Store::open(&data).await.unwrap();
        assert_eq!(store.list_accounts().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn open_reports_a_folder_it_cannot_create() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let err = Store::open(&file.join("sub")).await.unwrap_err();
        assert!(matches!(err, StoreError::CreateDir { .. }), "{err:?}");
    }

    #[test]
    fn e164_numbers_are_checked_and_normalised() {
        assert_eq!(normalize_e164("+442071234567").unwrap(), "+442071234567");
        assert_eq!(normalize_e164("442071234567").unwrap(), "+442071234567");
        assert_eq!(normalize_e164("12345678").unwrap(), "+12345678");
        assert_eq!(
            normalize_e164("+123456789012345").unwrap(),
            "+123456789012345"
        );
        for bad in [
            "",
            "+",
            "1234567",
            "+1234567890123456",
            "+0442071234567",
            "0442071234567",
            "+44 20 7123 4567",
            "+44-2071234567",
            "++442071234567",
            " +442071234567",
            "+4420712345６7",
            "sip:+442071234567",
        ] {
            let err = normalize_e164(bad).unwrap_err();
            assert!(
                matches!(&err, StoreError::InvalidNumber { input, .. } if input == bad),
                "{bad:?}: {err:?}"
            );
        }
        let err = normalize_e164("+0123456789").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid phone number \"+0123456789\": a country code never starts with 0"
        );
    }

    #[test]
    fn usernames_are_rfc3261_tokens_of_1_to_64() {
        for good in [
            "a",
            "acme-main",
            "A.b!c%d*e_f+g`h'i~j",
            "0123",
            &"x".repeat(64),
        ] {
            check_username(good).unwrap();
        }
        for bad in [
            "",
            &"x".repeat(65),
            "acme main",
            "acme@example.com",
            "acme:1",
            "a\"b",
            "naïve",
            "a\tb",
        ] {
            let err = check_username(bad).unwrap_err();
            assert!(
                matches!(&err, StoreError::InvalidUsername { input, .. } if input == bad),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn accounts_are_created_listed_found_and_removed() {
        let (_dir, store) = open().await;
        assert!(store.list_accounts().await.unwrap().is_empty());
        let before = now();
        let a = store.create_account("  Acme Ltd ").await.unwrap();
        let b = store.create_account("Globex").await.unwrap();
        assert_eq!(a.name, "Acme Ltd", "surrounding spaces are trimmed");
        assert!(a.created_at >= before && a.created_at <= now());
        assert!(b.id > a.id);
        assert_eq!(store.list_accounts().await.unwrap(), [a.clone(), b.clone()]);
        assert_eq!(store.account(a.id).await.unwrap(), Some(a.clone()));
        assert_eq!(store.account(999).await.unwrap(), None);

        store.remove_account(a.id).await.unwrap();
        assert_eq!(store.list_accounts().await.unwrap(), [b]);
        assert!(matches!(
            store.remove_account(a.id).await,
            Err(StoreError::AccountNotFound(id)) if id == a.id
        ));
    }

    #[tokio::test]
    async fn account_names_are_checked_and_unique() {
        let (_dir, store) = open().await;
        for bad in ["", "   ", "a\tb", "a\nb", &"n".repeat(201)] {
            let err = store.create_account(bad).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::InvalidName {
                        field: "account name",
                        ..
                    }
                ),
                "{bad:?}: {err:?}"
            );
        }
        store.create_account(&"n".repeat(200)).await.unwrap();
        store.create_account("Acme").await.unwrap();
        let err = store.create_account(" Acme").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Duplicate { field: UniqueField::AccountName, value } if value == "Acme"),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "account name \"Acme\" is already taken");
    }

    #[tokio::test]
    async fn an_account_with_trunk_groups_is_not_removed() {
        let (_dir, store, account, group) = seeded().await;
        let err = store.remove_account(account.id).await.unwrap_err();
        assert!(
            matches!(err, StoreError::AccountHasTrunkGroups { id, count: 1 } if id == account.id),
            "{err:?}"
        );
        assert_eq!(
            store.account(account.id).await.unwrap(),
            Some(account.clone())
        );
        store.remove_trunk_group(group.id).await.unwrap();
        store.remove_account(account.id).await.unwrap();
    }

    #[tokio::test]
    async fn trunk_groups_are_created_listed_found_and_removed() {
        let (_dir, store, acme, main) = seeded().await;
        assert_eq!(main.account_id, acme.id);
        assert_eq!(main.name, "main");
        assert_eq!(main.username, "acme-main");
        assert_eq!(main.realm, REALM);
        let globex = store.create_account("Globex").await.unwrap();
        let backup = store
            .create_trunk_group(acme.id, "backup", "acme-backup", "pw", REALM)
            .await
            .unwrap();
        let other = store
            .create_trunk_group(globex.id, "main", "globex", "pw", REALM)
            .await
            .unwrap();

        assert_eq!(
            store.list_trunk_groups(None).await.unwrap(),
            [main.clone(), backup.clone(), other.clone()]
        );
        assert_eq!(
            store.list_trunk_groups(Some(acme.id)).await.unwrap(),
            [main.clone(), backup.clone()]
        );
        assert_eq!(
            store.list_trunk_groups(Some(globex.id)).await.unwrap(),
            std::slice::from_ref(&other)
        );
        assert!(store.list_trunk_groups(Some(999)).await.unwrap().is_empty());
        assert_eq!(
            store.trunk_group(backup.id).await.unwrap(),
            Some(backup.clone())
        );
        assert_eq!(store.trunk_group(999).await.unwrap(), None);
        assert_eq!(
            store.trunk_group_by_username("globex").await.unwrap(),
            Some(other.clone())
        );
        assert_eq!(store.trunk_group_by_username("GLOBEX").await.unwrap(), None);
        assert_eq!(store.trunk_group_by_username("nobody").await.unwrap(), None);

        store.remove_trunk_group(backup.id).await.unwrap();
        assert_eq!(store.trunk_group(backup.id).await.unwrap(), None);
        assert!(matches!(
            store.remove_trunk_group(backup.id).await,
            Err(StoreError::TrunkGroupNotFound(id)) if id == backup.id
        ));
    }

    #[tokio::test]
    async fn trunk_group_input_is_checked() {
        let (_dir, store, acme, _main) = seeded().await;
        let create =
            |name: &'static str, user: &'static str, pw: &'static str, realm: &'static str| {
                let store = store.clone();
                async move {
                    store
                        .create_trunk_group(acme.id, name, user, pw, realm)
                        .await
                }
            };
        assert!(matches!(
            create("", "u1", "pw", REALM).await,
            Err(StoreError::InvalidName {
                field: "trunk group name",
                ..
            })
        ));
        assert!(matches!(
            create("x", "bad user", "pw", REALM).await,
            Err(StoreError::InvalidUsername { .. })
        ));
        assert!(matches!(
            create("x", "u1", "", REALM).await,
            Err(StoreError::EmptyPassword)
        ));
        assert!(matches!(
            create("x", "u1", "pw", "").await,
            Err(StoreError::InvalidRealm(_))
        ));
        assert!(matches!(
            create("x", "u1", "pw", "a\"b").await,
            Err(StoreError::InvalidRealm(_))
        ));
        assert!(matches!(
            store.create_trunk_group(999, "x", "u1", "pw", REALM).await,
            Err(StoreError::AccountNotFound(999))
        ));
        assert_eq!(store.list_trunk_groups(None).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn usernames_are_unique_across_the_carrier_names_within_an_account() {
        let (_dir, store, acme, _main) = seeded().await;
        let globex = store.create_account("Globex").await.unwrap();
        let err = store
            .create_trunk_group(globex.id, "other", "acme-main", "pw", REALM)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Duplicate { field: UniqueField::Username, value } if value == "acme-main"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "SIP username \"acme-main\" is already taken"
        );
        let err = store
            .create_trunk_group(acme.id, "main", "acme-2", "pw", REALM)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Duplicate { field: UniqueField::TrunkGroupName, value } if value == "main"),
            "{err:?}"
        );
        // The same name under another account is fine.
        store
            .create_trunk_group(globex.id, "main", "globex-main", "pw", REALM)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn ha1_values_match_the_digest_module_for_both_algorithms() {
        let (_dir, store, _acme, main) = seeded().await;
        for alg in [Algorithm::Md5, Algorithm::Sha256] {
            let want = ha1(alg, "acme-main", REALM, "pw-main");
            assert_eq!(main.ha1(alg), want);
            assert_eq!(want.len(), alg.hex_len());
            let stored = store.trunk_group(main.id).await.unwrap().unwrap();
            assert_eq!(stored.ha1(alg), want);
        }
        assert_ne!(
            main.ha1_md5,
            ha1(Algorithm::Md5, "acme-main", "other", "pw-main")
        );
    }

    #[tokio::test]
    async fn set_password_replaces_the_ha1_values_and_may_change_realm() {
        let (_dir, store, _acme, main) = seeded().await;
        store
            .set_trunk_group_password(main.id, "new-pw", REALM)
            .await
            .unwrap();
        let got = store.trunk_group(main.id).await.unwrap().unwrap();
        assert_eq!(
            got.ha1_md5,
            ha1(Algorithm::Md5, "acme-main", REALM, "new-pw")
        );
        assert_eq!(
            got.ha1_sha256,
            ha1(Algorithm::Sha256, "acme-main", REALM, "new-pw")
        );
        assert_eq!(
            (got.name.as_str(), got.created_at),
            ("main", main.created_at)
        );

        store
            .set_trunk_group_password(main.id, "new-pw", "example.net")
            .await
            .unwrap();
        let got = store.trunk_group(main.id).await.unwrap().unwrap();
        assert_eq!(got.realm, "example.net");
        assert_eq!(
            got.ha1_sha256,
            ha1(Algorithm::Sha256, "acme-main", "example.net", "new-pw")
        );

        assert!(matches!(
            store.set_trunk_group_password(999, "x", REALM).await,
            Err(StoreError::TrunkGroupNotFound(999))
        ));
        assert!(matches!(
            store.set_trunk_group_password(main.id, "", REALM).await,
            Err(StoreError::EmptyPassword)
        ));
        assert!(matches!(
            store.set_trunk_group_password(main.id, "x", "").await,
            Err(StoreError::InvalidRealm(_))
        ));
    }

    #[tokio::test]
    async fn the_plain_password_is_nowhere_in_the_database_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let first = "Plain-First-Pa55word-7d41";
        let second = "Plain-Second-Pa55word-93c2";
        let a = store.create_account("Acme").await.unwrap();
        let g = store
            .create_trunk_group(a.id, "main", "acme-main", first, REALM)
            .await
            .unwrap();
        store
            .set_trunk_group_password(g.id, second, REALM)
            .await
            .unwrap();

        // Look at the files while the WAL is live, then after a checkpoint.
        let mut scans = Vec::new();
        let scan = |dir: &Path| {
            let mut all = Vec::new();
            for entry in std::fs::read_dir(dir).unwrap() {
                all.extend(std::fs::read(entry.unwrap().path()).unwrap());
            }
            all
        };
        scans.push(scan(dir.path()));
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&store.pool)
            .await
            .unwrap();
        scans.push(scan(dir.path()));
        store.close().await;
        let contains =
            |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
        let current = ha1(Algorithm::Sha256, "acme-main", REALM, second);
        let replaced = ha1(Algorithm::Sha256, "acme-main", REALM, first);
        for bytes in &scans {
            assert!(contains(bytes, "acme-main"), "the scan sees the data");
            assert!(!contains(bytes, first));
            assert!(!contains(bytes, second));
        }
        let last = scans.last().unwrap();
        assert!(contains(last, &current));
        assert!(
            !contains(last, &replaced),
            "secure_delete overwrote the old HA1"
        );
    }

    #[tokio::test]
    async fn debug_output_hides_the_ha1_values() {
        let (_dir, _store, _acme, main) = seeded().await;
        let shown = format!("{main:?}");
        assert!(shown.contains("acme-main"));
        assert!(!shown.contains(&main.ha1_md5));
        assert!(!shown.contains(&main.ha1_sha256));
    }

    #[tokio::test]
    async fn dids_are_created_found_listed_and_removed() {
        let (_dir, store, acme, main) = seeded().await;
        let backup = store
            .create_trunk_group(acme.id, "backup", "acme-backup", "pw", REALM)
            .await
            .unwrap();
        let d1 = store.create_did("442071234567", main.id).await.unwrap();
        assert_eq!(d1.number, "+442071234567");
        assert_eq!(d1.trunk_group_id, main.id);
        let d2 = store.create_did("+15551230000", backup.id).await.unwrap();
        let d3 = store.create_did("+15551230001", main.id).await.unwrap();

        assert_eq!(
            store.list_dids(None).await.unwrap(),
            [d2.clone(), d3.clone(), d1.clone()],
            "ordered by number"
        );
        assert_eq!(
            store.list_dids(Some(main.id)).await.unwrap(),
            [d3.clone(), d1.clone()]
        );
        assert_eq!(store.did("+442071234567").await.unwrap(), Some(d1.clone()));
        assert_eq!(store.did("442071234567").await.unwrap(), Some(d1.clone()));
        assert_eq!(store.did("+442071234568").await.unwrap(), None);
        assert!(matches!(
            store.did("not-a-number").await,
            Err(StoreError::InvalidNumber { .. })
        ));

        store.remove_did("15551230000").await.unwrap();
        assert_eq!(store.did("+15551230000").await.unwrap(), None);
        let err = store.remove_did("+15551230000").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::DidNotFound(n) if n == "+15551230000"),
            "{err:?}"
        );
        assert!(matches!(
            store.remove_did("12").await,
            Err(StoreError::InvalidNumber { .. })
        ));
    }

    #[tokio::test]
    async fn did_input_is_checked_and_numbers_are_unique() {
        let (_dir, store, _acme, main) = seeded().await;
        assert!(matches!(
            store.create_did("+0123456789", main.id).await,
            Err(StoreError::InvalidNumber { .. })
        ));
        assert!(matches!(
            store.create_did("+442071234567", 999).await,
            Err(StoreError::TrunkGroupNotFound(999))
        ));
        store.create_did("+442071234567", main.id).await.unwrap();
        // The same number without '+' is the same DID.
        let err = store.create_did("442071234567", main.id).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Duplicate { field: UniqueField::Number, value } if value == "+442071234567"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "DID number \"+442071234567\" is already taken"
        );
        assert!(is_duplicate(
            store.create_did("+442071234567", main.id).await,
            UniqueField::Number
        ));
    }

    #[tokio::test]
    async fn a_trunk_group_with_dids_is_not_removed() {
        let (_dir, store, _acme, main) = seeded().await;
        store.create_did("+442071234567", main.id).await.unwrap();
        store.create_did("+442071234568", main.id).await.unwrap();
        let err = store.remove_trunk_group(main.id).await.unwrap_err();
        assert!(
            matches!(err, StoreError::TrunkGroupHasDids { id, count: 2 } if id == main.id),
            "{err:?}"
        );
        assert_eq!(store.list_dids(None).await.unwrap().len(), 2);
        store.remove_did("+442071234567").await.unwrap();
        store.remove_did("+442071234568").await.unwrap();
        store.remove_trunk_group(main.id).await.unwrap();
    }

    #[tokio::test]
    async fn the_config_version_moves_with_every_change_only() {
        let (_dir, store) = open().await;
        let mut last = store.config_version().await.unwrap();
        let mut changed = async |store: &Store| {
            let v = store.config_version().await.unwrap();
            let moved = v > last;
            last = v;
            moved
        };
        let a = store.create_account("Acme").await.unwrap();
        assert!(changed(&store).await);
        let g = store
            .create_trunk_group(a.id, "main", "acme", "pw", REALM)
            .await
            .unwrap();
        assert!(changed(&store).await);
        store
            .set_trunk_group_password(g.id, "pw2", REALM)
            .await
            .unwrap();
        assert!(changed(&store).await);
        store.create_did("+442071234567", g.id).await.unwrap();
        assert!(changed(&store).await);

        // Reads and refused changes leave it alone.
        store.list_accounts().await.unwrap();
        store.list_trunk_groups(None).await.unwrap();
        store.did("+442071234567").await.unwrap();
        store.create_account("Acme").await.unwrap_err();
        store.remove_trunk_group(g.id).await.unwrap_err();
        store.remove_did("+442071234999").await.unwrap_err();
        assert!(!changed(&store).await);

        store.remove_did("+442071234567").await.unwrap();
        assert!(changed(&store).await);
        store.remove_trunk_group(g.id).await.unwrap();
        assert!(changed(&store).await);
        store.remove_account(a.id).await.unwrap();
        assert!(changed(&store).await);
    }

    #[tokio::test]
    async fn the_config_version_moves_when_another_process_writes() {
        let dir = tempfile::tempdir().unwrap();
        let server = Store::open(dir.path()).await.unwrap();
        let admin = Store::open(dir.path()).await.unwrap();
        let seen = server.config_version().await.unwrap();
        admin.create_account("Acme").await.unwrap();
        let now_seen = server.config_version().await.unwrap();
        assert!(now_seen > seen);
        assert_eq!(server.list_accounts().await.unwrap().len(), 1);
        admin.close().await;
        assert_eq!(server.config_version().await.unwrap(), now_seen);
    }

    #[tokio::test]
    async fn two_stores_on_one_file_write_at_the_same_time() {
        let dir = tempfile::tempdir().unwrap();
        let one = Store::open(dir.path()).await.unwrap();
        let two = Store::open(dir.path()).await.unwrap();
        let write = async |store: &Store, prefix: &str| {
            for i in 0..25 {
                store
                    .create_account(&format!("{prefix}-{i}"))
                    .await
                    .unwrap();
            }
        };
        tokio::join!(write(&one, "one"), write(&two, "two"));
        assert_eq!(one.list_accounts().await.unwrap().len(), 50);
        assert_eq!(two.config_version().await.unwrap(), 50);
    }
}
