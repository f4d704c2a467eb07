//! The embedded store: the carrier's configuration (accounts, trunk groups, DIDs) in SQLite,
//! and beside it the provisioning API's tokens and audit trail.
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
//! - failover numbers (a DID's own, a trunk group's global one) are E.164 with the `+`; a
//!   failover PBX is either a `sip:`/`sips:` URI with a host and no password, kept in its
//!   normalised text form, or another trunk group of the same account, never both;
//! - a DID never fails over to its own number; a trunk group's whole failover plan (global
//!   number, PBX, every DID's number) can be written in one transaction
//!   ([`Store::set_failover_plan`]);
//! - removal is refused, never cascaded: an account is removed only without trunk groups, a
//!   trunk group only without DIDs and while no other trunk group uses it as its failover PBX.
//!   Deleting routing by accident is worse than one more step. Neither is removed while it
//!   has live API tokens (they are named); revoked ones go with it;
//! - API tokens are kept as the SHA-256 of their secret only, which is shown once; a token is
//!   scoped to the operator, an account, or a trunk group and its own account;
//! - tokens and the audit trail are not configuration: changing them does not move
//!   [`Store::config_version`]. The audit trail is append-only and outlives what it describes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytestring::ByteString;
use sha2::{Digest, Sha256};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{AnyPool, Executor};

use crate::carrier::delivery_rule::FailoverPbx;
use crate::sip::digest::{Algorithm, ha1};
use crate::sip::uri::{Host, Uri};

/// The database file inside the data folder.
pub const STORE_FILE: &str = "store.sqlite3";

/// How long a statement waits for another process's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest account or trunk group name, in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// Longest SIP username, in bytes (all token characters are ASCII).
pub const MAX_USERNAME_LEN: usize = 64;

/// Longest failover PBX URI, in bytes.
pub const MAX_FAILOVER_URI_LEN: usize = 1024;

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// An account's id.
pub type AccountId = i64;

/// A trunk group's id.
pub type TrunkGroupId = i64;

/// An API token's id.
pub type TokenId = i64;

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
    /// For PostgreSQL: the server is unreachable, refuses the credentials, or the database
    /// does not exist.
    #[error("cannot open the store {location}: {source}")]
    Open {
        location: String,
        source: sqlx::Error,
    },
    /// The schema could not be brought up to date (for instance the database was written by a
    /// newer Lifeline with migrations this one does not know).
    #[error("cannot update the schema of {location}: {source}")]
    Migrate {
        location: String,
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
    /// The trunk group is the failover PBX of other trunk groups (`used_by`, by id); their
    /// failover PBX must be changed first.
    #[error(
        "trunk group {id} is the failover PBX of trunk group(s) {}; change theirs first",
        join_ids(used_by)
    )]
    TrunkGroupIsFailoverPbx {
        id: TrunkGroupId,
        used_by: Vec<TrunkGroupId>,
    },
    /// A failover PBX URI is not a `sip:` or `sips:` URI with a host that a call can be sent
    /// to: `reason` says what is wrong.
    #[error("invalid failover PBX URI {input:?}: {reason}")]
    InvalidFailoverUri { input: String, reason: &'static str },
    /// The trunk group named as a failover PBX does not exist.
    #[error("no trunk group with id {0} to use as failover PBX")]
    FailoverPbxNotFound(TrunkGroupId),
    /// A trunk group cannot be its own failover PBX.
    #[error("trunk group {0} cannot be its own failover PBX")]
    FailoverPbxIsItself(TrunkGroupId),
    /// The trunk group named as a failover PBX belongs to another account.
    #[error(
        "trunk group {pbx} belongs to account {pbx_account}, not to account {account} of \
         trunk group {id}: a failover PBX must be a trunk group of the same account"
    )]
    FailoverPbxOtherAccount {
        /// The trunk group whose failover PBX was being set.
        id: TrunkGroupId,
        account: AccountId,
        /// The trunk group named as its failover PBX.
        pbx: TrunkGroupId,
        pbx_account: AccountId,
    },
    /// A DID's failover number is the DID itself (normalised, with `+`): the call would come
    /// straight back.
    #[error("DID {0} cannot fail over to its own number")]
    FailoverNumberIsDid(String),
    /// A failover plan lists the same DID (normalised, with `+`) twice, with two different
    /// failover numbers (e.g. once with and once without the `+`).
    #[error("DID {0} is listed twice in the failover plan, with different failover numbers")]
    DidListedTwice(String),
    /// No API token has this id.
    #[error("no API token with id {0}")]
    TokenNotFound(TokenId),
    /// A trunk group token's scope names an account that is not the trunk group's.
    #[error(
        "trunk group {trunk_group} belongs to account {group_account}, not to account \
         {account}: a trunk group token is scoped to the group's own account"
    )]
    TokenScopeMismatch {
        trunk_group: TrunkGroupId,
        /// The account the scope named.
        account: AccountId,
        /// The trunk group's account.
        group_account: AccountId,
    },
    /// The account still has live (not revoked) API tokens, by id; they must be revoked first.
    /// (Its revoked tokens do not stand in the way: they are removed with the account.)
    #[error(
        "account {id} still has live API token(s) {}; revoke them first",
        join_ids(tokens)
    )]
    AccountHasTokens { id: AccountId, tokens: Vec<TokenId> },
    /// The trunk group still has live (not revoked) API tokens, by id; they must be revoked
    /// first. (Its revoked tokens do not stand in the way: they are removed with the group.)
    #[error(
        "trunk group {id} still has live API token(s) {}; revoke them first",
        join_ids(tokens)
    )]
    TrunkGroupHasTokens {
        id: TrunkGroupId,
        tokens: Vec<TokenId>,
    },
    /// An audit entry is malformed: an empty action or object, or before/after text that is
    /// not JSON. `field` is `"action"`, `"object"`, `"before"` or `"after"`.
    #[error("invalid audit entry: {field} {reason}")]
    InvalidAuditEntry {
        field: &'static str,
        reason: &'static str,
    },
}

/// `1, 2, 3`
fn join_ids(ids: &[i64]) -> String {
    ids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
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

/// A trunk group: one customer PBX connection, its SIP credentials and its failover settings.
#[derive(Clone, PartialEq, Eq)]
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
    /// The global failover number, E.164 with the `+`: used for DIDs without their own.
    pub failover_number: Option<String>,
    /// The failover PBX: a normalised `sip:`/`sips:` URI, or another trunk group of the same
    /// account.
    pub failover_pbx: Option<FailoverPbx>,
}

/// The failover PBX is two nullable columns (a URI, a trunk group id), at most one set.
impl<'r> sqlx::FromRow<'r, AnyRow> for TrunkGroup {
    fn from_row(row: &'r AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let uri: Option<String> = row.try_get("failover_pbx_uri")?;
        let group: Option<TrunkGroupId> = row.try_get("failover_pbx_trunk_group")?;
        let failover_pbx =
            failover_pbx(uri, group).map_err(|source| sqlx::Error::ColumnDecode {
                index: "failover_pbx_trunk_group".into(),
                source: source.into(),
            })?;
        Ok(TrunkGroup {
            id: row.try_get("id")?,
            account_id: row.try_get("account_id")?,
            name: row.try_get("name")?,
            username: row.try_get("username")?,
            realm: row.try_get("realm")?,
            ha1_md5: row.try_get("ha1_md5")?,
            ha1_sha256: row.try_get("ha1_sha256")?,
            created_at: row.try_get("created_at")?,
            failover_number: row.try_get("failover_number")?,
            failover_pbx,
        })
    }
}

/// A trunk group's failover PBX from its two columns.
fn failover_pbx(
    uri: Option<String>,
    group: Option<TrunkGroupId>,
) -> Result<Option<FailoverPbx>, &'static str> {
    match (uri, group) {
        (None, None) => Ok(None),
        (Some(uri), None) => Ok(Some(FailoverPbx::Uri(uri))),
        (None, Some(id)) => Ok(Some(FailoverPbx::TrunkGroup(id))),
        // The schema's CHECK forbids it; say so rather than pick one.
        (Some(_), Some(_)) => Err("both a failover PBX URI and a failover PBX trunk group are set"),
    }
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
            .field("failover_number", &self.failover_number)
            .field("failover_pbx", &self.failover_pbx)
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
    /// The DID's own failover number, E.164 with the `+`; when unset, its trunk group's global
    /// one applies.
    pub failover_number: Option<String>,
}

/// A trunk group's whole failover plan: what `PUT /v1/trunk-groups/{id}/failover` writes
/// and the agent syncs (see [`Store::set_failover_plan`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FailoverSettings {
    /// The global failover number, E.164: used for DIDs without their own.
    pub global_number: Option<String>,
    /// The failover PBX: a SIP URI, or another trunk group of the same account.
    pub pbx: Option<FailoverPbx>,
    /// DID (E.164 with `+`) -> its own failover number; a DID of the group that is not listed
    /// has none. A `BTreeMap` for a stable order.
    pub dids: BTreeMap<String, String>,
}

/// What an API token may see and change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenScope {
    /// The carrier's operator: everything, and the only scope that creates accounts.
    Operator,
    /// One account and everything in it.
    Account(AccountId),
    /// One trunk group (what an agent gets); `account` is the group's account.
    TrunkGroup {
        account: AccountId,
        trunk_group: TrunkGroupId,
    },
}

/// An API token, without its secret (the store keeps only a SHA-256 of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub id: TokenId,
    pub scope: TokenScope,
    /// Free text for people (may be empty): what or who the token is for.
    pub label: String,
    /// Unix seconds, UTC.
    pub created_at: i64,
    /// Unix seconds, UTC; a revoked token no longer authenticates.
    pub revoked_at: Option<i64>,
}

/// The scope is two nullable columns: neither (operator), the account, or both.
impl<'r> sqlx::FromRow<'r, AnyRow> for ApiToken {
    fn from_row(row: &'r AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let account: Option<AccountId> = row.try_get("account_id")?;
        let group: Option<TrunkGroupId> = row.try_get("trunk_group_id")?;
        let scope = match (account, group) {
            (None, None) => TokenScope::Operator,
            (Some(account), None) => TokenScope::Account(account),
            (Some(account), Some(trunk_group)) => TokenScope::TrunkGroup {
                account,
                trunk_group,
            },
            // The schema's CHECK forbids it; never widen it to an operator token.
            (None, Some(_)) => {
                return Err(sqlx::Error::ColumnDecode {
                    index: "trunk_group_id".into(),
                    source: "a trunk group token without its account".into(),
                });
            }
        };
        Ok(ApiToken {
            id: row.try_get("id")?,
            scope,
            label: row.try_get("label")?,
            created_at: row.try_get("created_at")?,
            revoked_at: row.try_get("revoked_at")?,
        })
    }
}

/// An entry to append to the audit trail ([`Store::record_audit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewAuditEntry<'a> {
    /// The account whose settings changed.
    pub account: AccountId,
    /// The token that made the change; `None` for the admin command line.
    pub token: Option<TokenId>,
    /// What was done, e.g. `"trunk_group.update"`, `"failover.put"`; not empty.
    pub action: &'a str,
    /// What it was done to, e.g. `"trunk_group:3"`, `"did:+15551234567"`; not empty.
    pub object: &'a str,
    /// The object before, as JSON text; `None` when it was created.
    pub before: Option<&'a str>,
    /// The object after, as JSON text; `None` when it was removed.
    pub after: Option<&'a str>,
}

/// An entry of the audit trail, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: i64,
    pub account: AccountId,
    /// `None`: the admin command line.
    pub token: Option<TokenId>,
    /// When the entry was written: Unix milliseconds, UTC.
    pub at_ms: i64,
    pub action: String,
    pub object: String,
    /// JSON text.
    pub before: Option<String>,
    /// JSON text.
    pub after: Option<String>,
}

impl<'r> sqlx::FromRow<'r, AnyRow> for AuditEntry {
    fn from_row(row: &'r AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(AuditEntry {
            id: row.try_get("id")?,
            account: row.try_get("account_id")?,
            token: row.try_get("token_id")?,
            at_ms: row.try_get("at_ms")?,
            action: row.try_get("action")?,
            object: row.try_get("object")?,
            before: row.try_get("before_json")?,
            after: row.try_get("after_json")?,
        })
    }
}

/// The prefix of every API token secret: recognisable in logs, config files and secret
/// scanners.
pub const TOKEN_PREFIX: &str = "llt_";

/// A new token secret: [`TOKEN_PREFIX`] and 32 bytes from the thread's CSPRNG (ChaCha, seeded
/// by the operating system) in URL-safe base64 without padding: 47 characters in all.
fn new_token_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{TOKEN_PREFIX}{}", base64url(&bytes))
}

/// RFC 4648 §5 base64 (alphabet `A-Z a-z 0-9 - _`) without padding.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// What the store keeps of a token secret: its SHA-256, lowercase hex.
fn token_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Checks a token label and returns it without surrounding spaces; it may be empty.
fn check_label(input: &str) -> Result<String, StoreError> {
    let refuse = |reason| StoreError::InvalidName {
        field: "token label",
        input: input.to_owned(),
        reason,
    };
    let label = input.trim();
    if label.chars().count() > MAX_NAME_CHARS {
        return Err(refuse("longer than 200 characters"));
    }
    if label.chars().any(char::is_control) {
        return Err(refuse(
            "control characters (tabs, line breaks) are not allowed",
        ));
    }
    Ok(label.to_owned())
}

/// Checks an audit entry's before/after text: JSON, or absent.
fn check_audit_json(field: &'static str, text: Option<&str>) -> Result<(), StoreError> {
    match text {
        Some(t) if serde_json::from_str::<serde::de::IgnoredAny>(t).is_err() => {
            Err(StoreError::InvalidAuditEntry {
                field,
                reason: "is not JSON",
            })
        }
        _ => Ok(()),
    }
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

/// Checks a failover PBX URI and returns it in the normalised form the store keeps.
///
/// Accepted: a `sip:` or `sips:` URI (RFC 3261 §19.1) whose host is an IP address (IPv6 in
/// brackets) or a DNS name of letters, digits and hyphens, with an optional user part, port
/// (not 0) and parameters. Refused: other schemes, a password, headers (`?…`, not allowed in a
/// request URI), a `method` parameter, a `transport` other than `udp`, `tcp` or `tls`, and
/// `sips:` with `transport=udp`. The normal form is the URI's [`Display`](std::fmt::Display):
/// the scheme and a host name in lowercase, everything else as written.
pub fn normalize_failover_uri(input: &str) -> Result<String, StoreError> {
    let refuse = |reason| StoreError::InvalidFailoverUri {
        input: input.to_owned(),
        reason,
    };
    if input.len() > MAX_FAILOVER_URI_LEN {
        return Err(refuse("longer than 1024 characters"));
    }
    let Uri::Sip(mut uri) = Uri::parse(&ByteString::from(input)).map_err(refuse)? else {
        return Err(refuse("only sip: and sips: URIs can be a failover PBX"));
    };
    if uri.password.is_some() {
        return Err(refuse("a password does not belong in a URI"));
    }
    if uri.headers.is_some() {
        return Err(refuse("headers ('?…') are not allowed in a request URI"));
    }
    if uri.port == Some(0) {
        return Err(refuse("port 0"));
    }
    if let Host::Name(name) = &uri.host {
        check_host_name(name).map_err(refuse)?;
        uri.host = Host::Name(ByteString::from(name.to_ascii_lowercase()));
    }
    let param_char = |b: u8| b.is_ascii_alphanumeric() || b"-_.!~*'()%[]/:&+$".contains(&b);
    for p in &uri.params.0 {
        if !p
            .name
            .bytes()
            .chain(p.value.iter().flat_map(|v| v.bytes()))
            .all(param_char)
        {
            return Err(refuse(
                "a URI parameter has a character that must be escaped",
            ));
        }
    }
    if uri.params.has("method") {
        return Err(refuse("a method parameter is not allowed in a request URI"));
    }
    match uri.params.get("transport") {
        None => {}
        Some(Some(t)) if t.eq_ignore_ascii_case("udp") && uri.secure => {
            return Err(refuse("sips: cannot use transport=udp"));
        }
        Some(Some(t))
            if ["udp", "tcp", "tls"]
                .iter()
                .any(|k| t.eq_ignore_ascii_case(k)) => {}
        Some(_) => return Err(refuse("transport must be udp, tcp or tls")),
    }
    Ok(uri.to_string())
}

/// A DNS host name: dot-separated labels of 1 to 63 letters, digits and hyphens (not first or
/// last), 253 characters at most, and not all digits at the end (a mistyped IPv4 address).
fn check_host_name(name: &str) -> Result<(), &'static str> {
    if name.len() > 253 {
        return Err("host name longer than 253 characters");
    }
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label in host name");
        }
        if label.len() > 63 {
            return Err("host name label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("host names hold only letters, digits, hyphens and dots");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a host name label neither starts nor ends with a hyphen");
        }
        last = label;
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a valid IP address or host name");
    }
    Ok(())
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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
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
        // PostgreSQL names the constraint; SQLite only says it in the message.
        sqlx::error::ErrorKind::UniqueViolation => Some(Constraint::Unique(
            db.constraint().unwrap_or(db.message()).into(),
        )),
        sqlx::error::ErrorKind::ForeignKeyViolation => Some(Constraint::ForeignKey),
        // A RESTRICT action fails with SQLITE_CONSTRAINT_TRIGGER, which sqlx does not classify.
        _ if db.message().starts_with("FOREIGN KEY constraint failed") => {
            Some(Constraint::ForeignKey)
        }
        _ => None,
    }
}

/// Maps SQLite's "UNIQUE constraint failed: table.column" or a PostgreSQL constraint name
/// (`migrations/postgres/`) to the field it names.
fn unique_field(message: &str) -> Option<UniqueField> {
    let columns = message.rsplit(": ").next().unwrap_or(message);
    if columns.contains("trunk_groups.username") || columns == "trunk_groups_username_key" {
        Some(UniqueField::Username)
    } else if columns.contains("trunk_groups.name") || columns == "trunk_groups_account_id_name_key"
    {
        Some(UniqueField::TrunkGroupName)
    } else if columns.contains("accounts.name") || columns == "accounts_name_key" {
        Some(UniqueField::AccountName)
    } else if columns.contains("dids.number") || columns == "dids_pkey" {
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

/// Rows per statement of [`Store::reset_presence`]. Not more: SQLite looks each numbered
/// parameter up by name in a list, so a statement's binding costs the square of its size.
const PRESENCE_CHUNK: usize = 64;

/// Rows per chunk of a [`JoinedScan`] of the DIDs and of the trunk groups: about 2 MB of
/// text each (the driver holds a few copies of it at once).
const DID_CHUNK: i64 = 100_000;
const TRUNK_GROUP_CHUNK: i64 = 10_000;

/// What a [`JoinedScan`] joins a column's values with: the unit separator, a control character
/// the store writes in no text.
const JOINED_SEP: u8 = 0x1f;

/// A table read in chunks of rows by a key, each chunk's columns joined by the database into
/// one text per column: through the driver, each row costs far more than the database's
/// work (a million DIDs one row at a time took three seconds; joined, under one). A column's
/// NULL reads as `''`: only for columns where the schema refuses `''`, or `tagged` ones, whose
/// values read with a leading `=`. A chunk that does not split back into its rows (a value
/// holding the separator, which SQLite does not refuse from other programs), holds a blob
/// (SQLite's columns may) or whose values the caller cannot read is read again row by row:
/// the result is the rows' as the row-by-row query gives them, errors included.
pub(crate) struct JoinedScan<const N: usize> {
    /// The chunk after key `$1`, and (`[0]`) the first chunk, from `$1` on.
    sql: [String; 2],
    /// The same columns of the rows of a chunk, `$1` and `$2` its bounds, one row each.
    rows_sql: [String; 2],
    chunk: i64,
}

/// A chunk of a [`JoinedScan`]: its rows as the columns' texts, or as the row query reads them.
pub(crate) enum Chunk<'a, const N: usize, R> {
    Joined(&'a mut dyn Iterator<Item = [&'a str; N]>),
    Rows(Vec<R>),
}

impl<'a, const N: usize, R> Chunk<'a, N, R> {
    /// Appends the chunk's rows to `out`, a joined one read by `parse`: false, with nothing
    /// appended, if any of its rows does not read (the answer [`JoinedScan::run`] wants).
    pub(crate) fn read_into(
        self,
        out: &mut Vec<R>,
        parse: impl Fn([&'a str; N]) -> Option<R>,
    ) -> bool {
        match self {
            Chunk::Joined(texts) => {
                let read: Option<Vec<_>> = texts.map(parse).collect();
                read.map(|read| out.extend(read)).is_some()
            }
            Chunk::Rows(rows) => {
                out.extend(rows);
                true
            }
        }
    }
}

impl<const N: usize> JoinedScan<N> {
    pub(crate) fn new(
        backend: Backend,
        table: &str,
        key: &str,
        columns: &[&str; N],
        tagged: &[&str],
        chunk: i64,
    ) -> Self {
        let joined: Vec<String> = columns
            .iter()
            .map(|c| {
                let value = match (backend, tagged.contains(c)) {
                    (Backend::Sqlite, false) => format!("ifnull({c}, '')"),
                    (Backend::Sqlite, true) => format!("ifnull('=' || {c}, '')"),
                    (Backend::Postgres, false) => format!("coalesce({c}::text, '')"),
                    (Backend::Postgres, true) => format!("coalesce('=' || {c}::text, '')"),
                };
                match backend {
                    // SQLite steps every aggregate of a query on each row in turn: the lists
                    // are in the same order.
                    Backend::Sqlite => format!("group_concat({value}, char(31))"),
                    Backend::Postgres => format!("string_agg({value}, chr(31) ORDER BY {key})"),
                }
            })
            .collect();
        let blobs = match backend {
            Backend::Sqlite => {
                let each: Vec<_> = columns
                    .iter()
                    .map(|c| format!("typeof({c}) = 'blob'"))
                    .collect();
                format!("total({})", each.join(" OR "))
            }
            Backend::Postgres => "0.0::float8".to_owned(),
        };
        let list = columns.join(", ");
        let inner = if columns.contains(&key) {
            list.clone()
        } else {
            format!("{key}, {list}")
        };
        let joined = joined.join(", ");
        let sql = |from: &str| {
            format!(
                "SELECT max({key}), count(*), {blobs}, {joined} FROM (SELECT {inner} \
                 FROM {table} WHERE {key} {from} $1 ORDER BY {key} LIMIT $2) AS chunk",
            )
        };
        let rows_sql = |from: &str| {
            format!("SELECT {list} FROM {table} WHERE {key} {from} $1 AND {key} <= $2")
        };
        JoinedScan {
            sql: [sql(">="), sql(">")],
            rows_sql: [rows_sql(">="), rows_sql(">")],
            chunk,
        }
    }

    /// Hands every chunk from key `from` on to `each`, joined if it splits back, else as rows;
    /// `each` returns false, having kept nothing of it, for a joined chunk it cannot read,
    /// and then gets the same chunk as rows.
    pub(crate) async fn run<DB, K, R>(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        from: K,
        mut each: impl FnMut(Chunk<'_, N, R>) -> bool,
    ) -> Result<(), sqlx::Error>
    where
        DB: sqlx::Database,
        for<'e> &'e mut DB::Connection: sqlx::Executor<'e, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        K: Clone
            + Send
            + sqlx::Type<DB>
            + for<'q> sqlx::Encode<'q, DB>
            + for<'r> sqlx::Decode<'r, DB>
            + 'static,
        i64: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB> + for<'r> sqlx::Decode<'r, DB>,
        f64: sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
        String: sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
        usize: sqlx::ColumnIndex<DB::Row>,
        R: for<'r> sqlx::FromRow<'r, DB::Row> + Send + Unpin,
    {
        use sqlx::Row;
        let (mut bound, mut later) = (from, 0);
        loop {
            let row = sqlx::query::<DB>(&self.sql[later])
                .bind(bound.clone())
                .bind(self.chunk)
                .fetch_one(&mut **tx)
                .await?;
            let Some(last) = row.try_get::<Option<K>, _>(0)? else {
                return Ok(());
            };
            let count = usize::try_from(row.try_get::<i64, _>(1)?).unwrap_or(0);
            let blobs: f64 = row.try_get(2)?;
            let lists = (3..3 + N)
                .map(|i| {
                    row.try_get::<Option<String>, _>(i)
                        .map(Option::unwrap_or_default)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let splits = |l: &String| memchr::memchr_iter(JOINED_SEP, l.as_bytes()).count() + 1;
            let read = blobs == 0.0 && lists.iter().all(|l| splits(l) == count) && {
                let mut values: Vec<_> = lists
                    .iter()
                    .map(|l| l.split(char::from(JOINED_SEP)))
                    .collect();
                let mut texts =
                    (0..count).map(|_| std::array::from_fn(|i| values[i].next().unwrap_or("")));
                each(Chunk::Joined(&mut texts))
            };
            if !read {
                let rows = sqlx::query_as::<DB, R>(&self.rows_sql[later])
                    .bind(bound.clone())
                    .bind(last.clone())
                    .fetch_all(&mut **tx)
                    .await?;
                each(Chunk::Rows(rows));
            }
            (bound, later) = (last, 1);
        }
    }
}

/// A trunk group from the text of its columns (in the order of `select_trunk_groups!`), as the
/// row would decode; `None` if it would not (then the row is read as a row).
fn trunk_group_from_text(f: [&str; 11]) -> Option<TrunkGroup> {
    let text = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let group = match f[10] {
        "" => None,
        id => Some(id.parse().ok()?),
    };
    let failover_pbx = failover_pbx(text(f[9]), group).ok()?;
    Some(TrunkGroup {
        id: f[0].parse().ok()?,
        account_id: f[1].parse().ok()?,
        name: f[2].to_owned(),
        username: f[3].to_owned(),
        realm: f[4].to_owned(),
        ha1_md5: f[5].to_owned(),
        ha1_sha256: f[6].to_owned(),
        created_at: f[7].parse().ok()?,
        failover_number: text(f[8]),
        failover_pbx,
    })
}

/// Runs `query` in a savepoint of `tx` and returns its result: a failed statement is undone
/// alone and the transaction goes on (PostgreSQL would otherwise refuse every later statement
/// of the transaction). The outer error is the savepoint's own failure.
async fn in_savepoint<'q>(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
) -> Result<Result<sqlx::any::AnyQueryResult, sqlx::Error>, sqlx::Error> {
    let mut savepoint = sqlx::Connection::begin(&mut **tx).await?;
    match query.execute(&mut *savepoint).await {
        Ok(done) => {
            savepoint.commit().await?;
            Ok(Ok(done))
        }
        Err(e) => {
            savepoint.rollback().await?;
            Ok(Err(e))
        }
    }
}

/// The columns of [`select_trunk_groups!`], in its order (a test holds the two together).
const TRUNK_GROUP_COLUMNS: [&str; 11] = [
    "id",
    "account_id",
    "name",
    "username",
    "realm",
    "ha1_md5",
    "ha1_sha256",
    "created_at",
    "failover_number",
    "failover_pbx_uri",
    "failover_pbx_trunk_group",
];

/// `SELECT <every trunk group column> FROM trunk_groups <rest>`.
macro_rules! select_trunk_groups {
    ($rest:literal) => {
        concat!(
            "SELECT id, account_id, name, username, realm, ha1_md5, ha1_sha256, created_at, ",
            "failover_number, failover_pbx_uri, failover_pbx_trunk_group ",
            "FROM trunk_groups ",
            $rest
        )
    };
}

/// `SELECT <every DID column> FROM dids <rest>`.
macro_rules! select_dids {
    ($rest:literal) => {
        concat!(
            "SELECT number, trunk_group_id, created_at, failover_number FROM dids ",
            $rest
        )
    };
}

/// `SELECT <every API token column> FROM api_tokens <rest>`.
macro_rules! select_tokens {
    ($rest:literal) => {
        concat!(
            "SELECT id, account_id, trunk_group_id, label, created_at, revoked_at ",
            "FROM api_tokens ",
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

// === Multi-row inserts (the call log and the bindings file) ===

/// SQLite's limit on the parameters of one statement (`SQLITE_MAX_VARIABLE_NUMBER` of the
/// bundled SQLite 3.46, libsqlite3-sys 0.30).
pub(crate) const MAX_PARAMETERS: usize = 32_766;

/// `head` followed by `rows` rows of `columns` parameters.
pub(crate) fn insert_sql(head: &str, columns: usize, rows: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    format!("{head}{}", vec![row.as_str(); rows].join(", "))
}

/// The inserts of 1, 2, 4, ... `max` rows (index: log2 of the rows), so that SQLx's statement
/// cache (by SQL text) holds every one of them.
pub(crate) fn insert_sqls(head: &str, columns: usize, max: usize) -> Vec<String> {
    (0..=max.ilog2())
        .map(|k| insert_sql(head, columns, 1 << k))
        .collect()
}

/// Splits `n` rows into statements of power-of-two sizes up to `max` (a power of two): as many
/// of `max` as fit, then the binary digits of the rest, largest first: at most
/// `n / max + log2(max)` statements.
pub(crate) fn chunk_lens(n: usize, max: usize) -> impl Iterator<Item = usize> {
    let rest = n % max;
    std::iter::repeat_n(max, n / max).chain(
        (0..max.ilog2())
            .rev()
            .map(|k| 1 << k)
            .filter(move |size| rest & size != 0),
    )
}

/// `items` cut into the slices [`chunk_lens`] gives, in order.
pub(crate) fn pow2_chunks<T>(items: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    chunk_lens(items.len(), max).map(move |rows| {
        let (chunk, tail) = rest.split_at(rows);
        rest = tail;
        chunk
    })
}

/// The statement for `rows` rows out of `sqls` (built by [`insert_sqls`]).
pub(crate) fn sql_for(sqls: &[String], rows: usize) -> &str {
    debug_assert!(rows.is_power_of_two());
    &sqls[rows.ilog2() as usize]
}

/// How every SQLite file of the carrier is opened: WAL (readers never wait for the writer),
/// `synchronous=NORMAL` (a power cut may lose the last transactions, never consistency), and a
/// busy timeout so the admin command and a running server can share a file.
pub(crate) fn sqlite_options(path: &Path) -> SqliteConnectOptions {
    // The configuration store applies the same settings as SQL: keep SQLITE_PRAGMAS in step.
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT)
}

/// [`sqlite_options`] as SQL, for the configuration store's connections (which are opened
/// through a URL), plus foreign keys and `secure_delete` (replaced HA1 values do not linger in
/// free pages).
fn sqlite_pragmas() -> String {
    format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = {}; \
         PRAGMA foreign_keys = ON; PRAGMA secure_delete = ON;",
        BUSY_TIMEOUT.as_millis()
    )
}

/// The `sqlite://` URL of a database file, every byte but the unreserved ones
/// percent-encoded: sqlx decodes the path, so a `%`, `?` or `#` in a folder name must not be
/// taken for an escape or a query.
fn sqlite_url(path: &Path) -> Result<String, StoreError> {
    use std::fmt::Write;
    let bytes = path.as_os_str().as_encoded_bytes();
    if std::str::from_utf8(bytes).is_err() {
        return Err(StoreError::CreateFile {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the store's path must be UTF-8",
            ),
        });
    }
    let mut url = String::from("sqlite://");
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            url.push(char::from(b));
        } else {
            let _ = write!(url, "%{b:02X}");
        }
    }
    url.push_str("?mode=rwc");
    Ok(url)
}

/// Where the configuration lives.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// `<data_dir>/store.sqlite3`: the embedded default, for one server.
    Embedded(PathBuf),
    /// A PostgreSQL URL (`postgres://user:password@host:port/database`): several trunk
    /// servers share one configuration.
    Postgres(String),
}

/// Passwords in a URL never reach a log line.
impl std::fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Embedded(dir) => write!(f, "{}", dir.join(STORE_FILE).display()),
            StoreLocation::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

/// `url` with the password of its user information replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

/// Which database a [`Store`] talks to. The SQL is the same for both (`$n` parameters, which
/// SQLite accepts too); the schemas differ only in their dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL advisory lock that writes of failover settings, DIDs and removals take first,
/// so they are serialised as SQLite's single writer serialises them: a whole-plan write is
/// never interleaved with another change of the same rows ("LIFE" in ASCII).
const POSTGRES_WRITE_LOCK: i64 = 0x4c49_4645;

/// How long a PostgreSQL statement waits for a connection before failing: an API request gets
/// an answer, not a hang, while the database is down.
const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// The store. Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    location: StoreLocation,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// How many health reports are kept per trunk group.
pub const HEALTH_REPORTS_KEPT: i64 = 20;

impl Store {
    /// Opens the embedded store `<data_dir>/store.sqlite3`.
    pub async fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Store::connect(&StoreLocation::Embedded(data_dir.to_owned())).await
    }

    /// Opens the store at `location`, creating the SQLite folder, file and schema if absent,
    /// and applying any newer migrations. On PostgreSQL the migrations take an advisory lock,
    /// so servers starting at once apply each migration once.
    pub async fn connect(location: &StoreLocation) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let open_error = |source| StoreError::Open {
            location: location.to_string(),
            source,
        };
        let (pool, backend) = match location {
            StoreLocation::Embedded(data_dir) => {
                std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
                    path: data_dir.to_owned(),
                    source,
                })?;
                let path = data_dir.join(STORE_FILE);
                create_private(&path).map_err(|source| StoreError::CreateFile {
                    path: path.clone(),
                    source,
                })?;
                // Through the URL only the file and its mode pass; the pragmas are set on
                // every new connection.
                let options =
                    AnyConnectOptions::from_str(&sqlite_url(&path)?).map_err(open_error)?;
                let pool = AnyPoolOptions::new()
                    .max_connections(4)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute(sqlite_pragmas().as_str()).await?;
                            Ok(())
                        })
                    })
                    .connect_with(options)
                    .await
                    .map_err(open_error)?;
                (pool, Backend::Sqlite)
            }
            StoreLocation::Postgres(url) => {
                let options = AnyConnectOptions::from_str(url).map_err(open_error)?;
                let pool = AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await
                    .map_err(open_error)?;
                (pool, Backend::Postgres)
            }
        };
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATOR,
            Backend::Postgres => &POSTGRES_MIGRATOR,
        };
        migrator
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate {
                location: location.to_string(),
                source,
            })?;
        Ok(Store {
            pool,
            backend,
            location: location.clone(),
        })
    }

    /// Where the store is.
    pub fn location(&self) -> &StoreLocation {
        &self.location
    }

    /// Which database the store talks to.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes every connection (on SQLite, checkpointing the WAL).
    pub async fn close(self) {
        self.pool.close().await;
    }

    /// A transaction for a configuration write: SQLite takes its write lock at once
    /// (`BEGIN IMMEDIATE`, so a read-then-write never fails half-way on a busy lock);
    /// PostgreSQL takes [`POSTGRES_WRITE_LOCK`] until the transaction ends.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(POSTGRES_WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }
    }

    /// A read-only transaction that sees one snapshot throughout: SQLite's read
    /// transactions do; PostgreSQL's READ COMMITTED does not.
    async fn begin_snapshot(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin().await,
            Backend::Postgres => {
                self.pool
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await
            }
        }
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
            "INSERT INTO accounts (name, created_at) VALUES ($1, $2) RETURNING id",
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
        let account = sqlx::query_as("SELECT id, name, created_at FROM accounts WHERE id = $1")
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

    /// Removes an account; refused while it has trunk groups or live API tokens. Its revoked
    /// tokens are removed with it.
    pub async fn remove_account(&self, id: AccountId) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM api_tokens WHERE account_id = $1 AND revoked_at IS NOT NULL")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let refusal = match in_savepoint(
            &mut tx,
            sqlx::query("DELETE FROM accounts WHERE id = $1").bind(id),
        )
        .await?
        {
            Ok(done) if done.rows_affected() == 0 => StoreError::AccountNotFound(id),
            Ok(_) => {
                tx.commit().await?;
                return Ok(());
            }
            Err(e) if is_foreign_key(&e) => {
                // Looked up in the same transaction: what is in the way right now.
                let count: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM trunk_groups WHERE account_id = $1")
                        .bind(id)
                        .fetch_one(&mut *tx)
                        .await?;
                let tokens: Vec<TokenId> = sqlx::query_scalar(
                    "SELECT id FROM api_tokens WHERE account_id = $1 AND revoked_at IS NULL \
                     ORDER BY id",
                )
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
                if count > 0 {
                    StoreError::AccountHasTrunkGroups { id, count }
                } else if !tokens.is_empty() {
                    StoreError::AccountHasTokens { id, tokens }
                } else {
                    StoreError::Database(e)
                }
            }
            Err(e) => StoreError::Database(e),
        };
        tx.rollback().await?;
        Err(refusal)
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
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
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
            failover_number: None,
            failover_pbx: None,
        })
    }

    /// The trunk group with this id, if any.
    pub async fn trunk_group(&self, id: TrunkGroupId) -> Result<Option<TrunkGroup>, StoreError> {
        let group = sqlx::query_as(select_trunk_groups!("WHERE id = $1"))
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
        let group = sqlx::query_as(select_trunk_groups!("WHERE username = $1"))
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
            "WHERE $1 IS NULL OR account_id = $1 ORDER BY id"
        ))
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(groups)
    }

    /// Every trunk group, in no particular order, from one snapshot: what the routing copy
    /// needs ([`crate::carrier::customers::Customers::load`]). The same as
    /// `list_trunk_groups(None)`, cheaper for many rows (see [`JoinedScan`]).
    pub async fn scan_trunk_groups(&self) -> Result<Vec<TrunkGroup>, StoreError> {
        self.scan_trunk_groups_in_chunks(TRUNK_GROUP_CHUNK).await
    }

    async fn scan_trunk_groups_in_chunks(&self, chunk: i64) -> Result<Vec<TrunkGroup>, StoreError> {
        let mut tx = self.begin_snapshot().await?;
        let scan = JoinedScan::new(
            self.backend,
            "trunk_groups",
            "id",
            &TRUNK_GROUP_COLUMNS,
            &[],
            chunk,
        );
        let mut groups = Vec::new();
        scan.run(&mut tx, i64::MIN, |chunk| {
            chunk.read_into(&mut groups, trunk_group_from_text)
        })
        .await?;
        tx.commit().await?;
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
            "UPDATE trunk_groups SET realm = $1, ha1_md5 = $2, ha1_sha256 = $3 \
             WHERE id = $4 AND username = $5",
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

    /// Removes a trunk group; refused while it has DIDs, is another trunk group's failover
    /// PBX or has live API tokens (named in that order when several are in the way). Its
    /// revoked tokens are removed with it.
    pub async fn remove_trunk_group(&self, id: TrunkGroupId) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "DELETE FROM api_tokens WHERE revoked_at IS NOT NULL AND trunk_group_id = $1 \
             AND account_id = (SELECT account_id FROM trunk_groups WHERE id = $1)",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let refusal = match in_savepoint(
            &mut tx,
            sqlx::query("DELETE FROM trunk_groups WHERE id = $1").bind(id),
        )
        .await?
        {
            Ok(done) if done.rows_affected() == 0 => StoreError::TrunkGroupNotFound(id),
            Ok(_) => {
                tx.commit().await?;
                return Ok(());
            }
            Err(e) if is_foreign_key(&e) => {
                // Looked up in the same transaction: what is in the way right now.
                let count: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM dids WHERE trunk_group_id = $1")
                        .bind(id)
                        .fetch_one(&mut *tx)
                        .await?;
                let used_by: Vec<TrunkGroupId> = sqlx::query_scalar(
                    "SELECT id FROM trunk_groups WHERE failover_pbx_trunk_group = $1 ORDER BY id",
                )
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
                let tokens: Vec<TokenId> = sqlx::query_scalar(
                    "SELECT id FROM api_tokens WHERE trunk_group_id = $1 AND revoked_at IS NULL \
                     ORDER BY id",
                )
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
                if count > 0 {
                    StoreError::TrunkGroupHasDids { id, count }
                } else if !used_by.is_empty() {
                    StoreError::TrunkGroupIsFailoverPbx { id, used_by }
                } else if !tokens.is_empty() {
                    StoreError::TrunkGroupHasTokens { id, tokens }
                } else {
                    StoreError::Database(e)
                }
            }
            Err(e) => StoreError::Database(e),
        };
        tx.rollback().await?;
        Err(refusal)
    }

    /// Sets (`Some`, with or without the `+`) or clears (`None`) a trunk group's global
    /// failover number. Returns the number as stored.
    pub async fn set_trunk_group_failover_number(
        &self,
        id: TrunkGroupId,
        number: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        let number = number.map(normalize_e164).transpose()?;
        // Serialised with the other configuration writes (see `begin_write`).
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("UPDATE trunk_groups SET failover_number = $1 WHERE id = $2")
            .bind(&number)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::TrunkGroupNotFound(id));
        }
        tx.commit().await?;
        Ok(number)
    }

    /// Sets or clears (`None`) a trunk group's failover PBX, replacing the one it had (a URI
    /// replaces a trunk group and the other way round). A URI must pass
    /// [`normalize_failover_uri`] and is stored normalised; a trunk group must exist, belong
    /// to the same account and not be `id` itself. Returns the failover PBX as stored.
    pub async fn set_trunk_group_failover_pbx(
        &self,
        id: TrunkGroupId,
        pbx: Option<&FailoverPbx>,
    ) -> Result<Option<FailoverPbx>, StoreError> {
        // At most one of the two columns is set: enforced here, and by a CHECK in the schema.
        let (uri, group) = match pbx {
            None => (None, None),
            Some(FailoverPbx::Uri(uri)) => (Some(normalize_failover_uri(uri)?), None),
            Some(&FailoverPbx::TrunkGroup(pbx)) => {
                if pbx == id {
                    return Err(StoreError::FailoverPbxIsItself(id));
                }
                (None, Some(pbx))
            }
        };
        let Some(owner) = self.trunk_group(id).await? else {
            return Err(StoreError::TrunkGroupNotFound(id));
        };
        if let Some(pbx) = group {
            let Some(target) = self.trunk_group(pbx).await? else {
                return Err(StoreError::FailoverPbxNotFound(pbx));
            };
            // A trunk group never changes account, so this check cannot go stale.
            if target.account_id != owner.account_id {
                return Err(StoreError::FailoverPbxOtherAccount {
                    id,
                    account: owner.account_id,
                    pbx,
                    pbx_account: target.account_id,
                });
            }
        }
        // Serialised with the other configuration writes (see `begin_write`).
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE trunk_groups SET failover_pbx_uri = $1, failover_pbx_trunk_group = $2 \
             WHERE id = $3",
        )
        .bind(&uri)
        .bind(group)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(|e| match group {
            // The target was removed since it was looked up.
            Some(pbx) if is_foreign_key(&e) => StoreError::FailoverPbxNotFound(pbx),
            _ => StoreError::Database(e),
        })?;
        if done.rows_affected() == 0 {
            return Err(StoreError::TrunkGroupNotFound(id));
        }
        tx.commit().await?;
        Ok(match (uri, group) {
            (Some(uri), _) => Some(FailoverPbx::Uri(uri)),
            (None, Some(pbx)) => Some(FailoverPbx::TrunkGroup(pbx)),
            (None, None) => None,
        })
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
        // Serialised with the other configuration writes (see `begin_write`).
        let mut tx = self.begin_write().await?;
        sqlx::query("INSERT INTO dids (number, trunk_group_id, created_at) VALUES ($1, $2, $3)")
            .bind(&number)
            .bind(trunk_group_id)
            .bind(created_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if is_foreign_key(&e) {
                    StoreError::TrunkGroupNotFound(trunk_group_id)
                } else {
                    duplicate(e, &[(UniqueField::Number, &number)])
                }
            })?;
        tx.commit().await?;
        Ok(Did {
            number,
            trunk_group_id,
            created_at,
            failover_number: None,
        })
    }

    /// The DID for a number given with or without the `+`. A malformed number is an
    /// [`StoreError::InvalidNumber`], an unknown one `Ok(None)`.
    pub async fn did(&self, number: &str) -> Result<Option<Did>, StoreError> {
        let number = normalize_e164(number)?;
        let did = sqlx::query_as(select_dids!("WHERE number = $1"))
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
        let dids = sqlx::query_as(select_dids!(
            "WHERE $1 IS NULL OR trunk_group_id = $1 ORDER BY number"
        ))
        .bind(trunk_group_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(dids)
    }

    /// Calls `each(number, trunk group, own failover number)` for every DID, in no particular
    /// order, from one snapshot: what the routing copy needs
    /// ([`crate::carrier::customers::Customers::load`]). Cheaper than [`Store::list_dids`]
    /// for many rows (see [`JoinedScan`]), and no row is kept once read.
    pub async fn scan_dids(
        &self,
        each: impl FnMut(&str, TrunkGroupId, Option<&str>),
    ) -> Result<(), StoreError> {
        self.scan_dids_in_chunks(DID_CHUNK, each).await
    }

    async fn scan_dids_in_chunks(
        &self,
        chunk: i64,
        mut each: impl FnMut(&str, TrunkGroupId, Option<&str>),
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_snapshot().await?;
        let columns = ["number", "trunk_group_id", "failover_number"];
        // The trunk group ids first: no DID is passed on from a chunk that does not read back.
        let mut chunk_dids =
            |chunk: Chunk<'_, 3, (String, TrunkGroupId, Option<String>)>| match chunk {
                Chunk::Joined(texts) => {
                    let read: Option<Vec<_>> = texts
                        .map(|[n, g, f]| Some((n, g.parse().ok()?, (!f.is_empty()).then_some(f))))
                        .collect();
                    read.map(|read| read.into_iter().for_each(|(n, g, f)| each(n, g, f)))
                        .is_some()
                }
                Chunk::Rows(rows) => {
                    for (n, g, f) in &rows {
                        each(n, *g, f.as_deref());
                    }
                    true
                }
            };
        match self.backend {
            // By rowid: each chunk is a seek in the table itself (by number, each row would
            // cost a look-up from the index).
            Backend::Sqlite => {
                let scan = JoinedScan::new(self.backend, "dids", "rowid", &columns, &[], chunk);
                scan.run(&mut tx, i64::MIN, &mut chunk_dids).await?;
            }
            Backend::Postgres => {
                let scan = JoinedScan::new(self.backend, "dids", "number", &columns, &[], chunk);
                scan.run(&mut tx, String::new(), &mut chunk_dids).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Sets (`Some`) or clears (`None`) a DID's own failover number; both numbers may be given
    /// with or without the `+`, and must differ. Returns the failover number as stored.
    pub async fn set_did_failover_number(
        &self,
        number: &str,
        failover_number: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        let number = normalize_e164(number)?;
        let failover_number = failover_number.map(normalize_e164).transpose()?;
        if failover_number.as_ref() == Some(&number) {
            return Err(StoreError::FailoverNumberIsDid(number));
        }
        // Serialised with the other configuration writes (see `begin_write`).
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("UPDATE dids SET failover_number = $1 WHERE number = $2")
            .bind(&failover_number)
            .bind(&number)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::DidNotFound(number));
        }
        tx.commit().await?;
        Ok(failover_number)
    }

    /// Removes a DID, given with or without the `+`.
    pub async fn remove_did(&self, number: &str) -> Result<(), StoreError> {
        let number = normalize_e164(number)?;
        // Serialised with the other configuration writes (see `begin_write`).
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("DELETE FROM dids WHERE number = $1")
            .bind(&number)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::DidNotFound(number));
        }
        tx.commit().await?;
        Ok(())
    }

    // ---- failover plans ----

    /// Writes a trunk group's whole failover plan in one transaction: its global failover
    /// number, its failover PBX and the own failover numbers of all its DIDs (a DID of the
    /// group that `plan.dids` does not list gets none). Numbers may be given with or without
    /// the `+`.
    ///
    /// Refused, changing nothing, when a number is not E.164 ([`StoreError::InvalidNumber`]);
    /// a DID is listed twice with two numbers ([`StoreError::DidListedTwice`]) or fails over
    /// to itself ([`StoreError::FailoverNumberIsDid`]); the PBX URI is invalid, or the PBX
    /// trunk group is the group itself, unknown or of another account (as
    /// [`Store::set_trunk_group_failover_pbx`]); the trunk group is unknown; or a DID listed
    /// is not one of the group's ([`StoreError::DidNotFound`], also for a DID of another
    /// group: whose it is is not told). Rows whose settings do not change are not written, so
    /// writing the same plan again does not move [`Store::config_version`].
    ///
    /// Returns the plan as stored: normalised, listing only the DIDs with a number.
    pub async fn set_failover_plan(
        &self,
        trunk_group: TrunkGroupId,
        plan: &FailoverSettings,
    ) -> Result<FailoverSettings, StoreError> {
        let id = trunk_group;
        // Everything that needs no look-up first.
        let global_number = plan
            .global_number
            .as_deref()
            .map(normalize_e164)
            .transpose()?;
        let pbx = match plan.pbx.as_ref() {
            None => None,
            Some(FailoverPbx::Uri(uri)) => Some(FailoverPbx::Uri(normalize_failover_uri(uri)?)),
            Some(&FailoverPbx::TrunkGroup(pbx)) => {
                if pbx == id {
                    return Err(StoreError::FailoverPbxIsItself(id));
                }
                Some(FailoverPbx::TrunkGroup(pbx))
            }
        };
        let mut dids = BTreeMap::new();
        for (did, number) in &plan.dids {
            let did = normalize_e164(did)?;
            let number = normalize_e164(number)?;
            if number == did {
                return Err(StoreError::FailoverNumberIsDid(did));
            }
            match dids.entry(did) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(number);
                }
                std::collections::btree_map::Entry::Occupied(o) => {
                    if *o.get() != number {
                        return Err(StoreError::DidListedTwice(o.key().clone()));
                    }
                }
            }
        }

        // The write lock from the start: the look-ups below stay true until the commit.
        // Any early return drops the transaction, which rolls it back.
        let mut tx = self.begin_write().await?;
        let Some(owner) = sqlx::query_as::<_, TrunkGroup>(select_trunk_groups!("WHERE id = $1"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Err(StoreError::TrunkGroupNotFound(id));
        };
        if let Some(FailoverPbx::TrunkGroup(pbx)) = pbx {
            let target: Option<AccountId> =
                sqlx::query_scalar("SELECT account_id FROM trunk_groups WHERE id = $1")
                    .bind(pbx)
                    .fetch_optional(&mut *tx)
                    .await?;
            match target {
                None => return Err(StoreError::FailoverPbxNotFound(pbx)),
                Some(pbx_account) if pbx_account != owner.account_id => {
                    return Err(StoreError::FailoverPbxOtherAccount {
                        id,
                        account: owner.account_id,
                        pbx,
                        pbx_account,
                    });
                }
                Some(_) => {}
            }
        }
        let current: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT number, failover_number FROM dids WHERE trunk_group_id = $1 ORDER BY number",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        if let Some(stranger) = dids
            .keys()
            .find(|did| !current.iter().any(|(number, _)| number == *did))
        {
            return Err(StoreError::DidNotFound(stranger.clone()));
        }

        if owner.failover_number != global_number || owner.failover_pbx != pbx {
            let (uri, group) = match &pbx {
                None => (None, None),
                Some(FailoverPbx::Uri(uri)) => (Some(uri.as_str()), None),
                Some(FailoverPbx::TrunkGroup(group)) => (None, Some(*group)),
            };
            sqlx::query(
                "UPDATE trunk_groups SET failover_number = $1, failover_pbx_uri = $2, \
                 failover_pbx_trunk_group = $3 WHERE id = $4",
            )
            .bind(&global_number)
            .bind(uri)
            .bind(group)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| match group {
                Some(pbx) if is_foreign_key(&e) => StoreError::FailoverPbxNotFound(pbx),
                _ => StoreError::Database(e),
            })?;
        }
        for (number, old) in &current {
            let new = dids.get(number);
            if old.as_ref() != new {
                sqlx::query("UPDATE dids SET failover_number = $1 WHERE number = $2")
                    .bind(new)
                    .bind(number)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(FailoverSettings {
            global_number,
            pbx,
            dids,
        })
    }

    /// A trunk group's whole failover plan, read in one transaction (the DIDs listed are those
    /// with their own failover number).
    pub async fn failover_plan(
        &self,
        trunk_group: TrunkGroupId,
    ) -> Result<FailoverSettings, StoreError> {
        let mut tx = self.begin_snapshot().await?;
        let Some(group) = sqlx::query_as::<_, TrunkGroup>(select_trunk_groups!("WHERE id = $1"))
            .bind(trunk_group)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Err(StoreError::TrunkGroupNotFound(trunk_group));
        };
        let dids: Vec<(String, String)> = sqlx::query_as(
            "SELECT number, failover_number FROM dids \
             WHERE trunk_group_id = $1 AND failover_number IS NOT NULL ORDER BY number",
        )
        .bind(trunk_group)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(FailoverSettings {
            global_number: group.failover_number,
            pbx: group.failover_pbx,
            dids: dids.into_iter().collect(),
        })
    }

    // ---- API tokens ----

    /// Creates an API token. Returns it and its secret, which is shown this once: the store
    /// keeps only its SHA-256. The secret is `llt_` and 43 characters of URL-safe base64
    /// (no padding) of 32 random bytes. The label is trimmed and may be empty.
    ///
    /// Refused for an unknown account ([`StoreError::AccountNotFound`]) or trunk group
    /// ([`StoreError::TrunkGroupNotFound`]), and for a trunk group scope whose account is not
    /// the group's ([`StoreError::TokenScopeMismatch`]).
    pub async fn create_token(
        &self,
        scope: TokenScope,
        label: &str,
    ) -> Result<(ApiToken, String), StoreError> {
        let label = check_label(label)?;
        let (account, group) = match scope {
            TokenScope::Operator => (None, None),
            TokenScope::Account(account) => {
                if self.account(account).await?.is_none() {
                    return Err(StoreError::AccountNotFound(account));
                }
                (Some(account), None)
            }
            TokenScope::TrunkGroup {
                account,
                trunk_group,
            } => {
                let Some(group) = self.trunk_group(trunk_group).await? else {
                    return Err(StoreError::TrunkGroupNotFound(trunk_group));
                };
                if group.account_id != account {
                    return Err(StoreError::TokenScopeMismatch {
                        trunk_group,
                        account,
                        group_account: group.account_id,
                    });
                }
                (Some(account), Some(trunk_group))
            }
        };
        let secret = new_token_secret();
        let created_at = now();
        let id: TokenId = sqlx::query_scalar(
            "INSERT INTO api_tokens \
             (secret_sha256, account_id, trunk_group_id, label, created_at) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(token_hash(&secret))
        .bind(account)
        .bind(group)
        .bind(&label)
        .bind(created_at)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| match (scope, is_foreign_key(&e)) {
            // Removed since it was looked up.
            (TokenScope::Account(account), true) => StoreError::AccountNotFound(account),
            (TokenScope::TrunkGroup { trunk_group, .. }, true) => {
                StoreError::TrunkGroupNotFound(trunk_group)
            }
            _ => StoreError::Database(e),
        })?;
        let token = ApiToken {
            id,
            scope,
            label,
            created_at,
            revoked_at: None,
        };
        Ok((token, secret))
    }

    /// The live (not revoked) token with this secret, if any.
    ///
    /// The secret is looked up by its SHA-256 (a unique index): what the look-up's timing can
    /// tell is about the hash of the guess, which says nothing about any stored secret. The
    /// hash found is compared again in constant time, as a last line of defence.
    pub async fn token_by_secret(&self, secret: &str) -> Result<Option<ApiToken>, StoreError> {
        use sqlx::{FromRow, Row};
        use subtle::ConstantTimeEq;
        let hash = token_hash(secret);
        let row = sqlx::query(concat!(
            "SELECT id, account_id, trunk_group_id, label, created_at, revoked_at, secret_sha256 ",
            "FROM api_tokens WHERE secret_sha256 = $1 AND revoked_at IS NULL"
        ))
        .bind(&hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let stored: String = row.try_get("secret_sha256")?;
        if !bool::from(stored.as_bytes().ct_eq(hash.as_bytes())) {
            return Ok(None);
        }
        Ok(Some(ApiToken::from_row(&row)?))
    }

    /// The token with this id, revoked or not.
    pub async fn token(&self, id: TokenId) -> Result<Option<ApiToken>, StoreError> {
        let token = sqlx::query_as(select_tokens!("WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(token)
    }

    /// Tokens by id, revoked ones included: those of one account (scoped to it or to one of
    /// its trunk groups), or all of them (operator tokens too) with `None`.
    pub async fn list_tokens(
        &self,
        account: Option<AccountId>,
    ) -> Result<Vec<ApiToken>, StoreError> {
        let tokens = sqlx::query_as(select_tokens!(
            "WHERE $1 IS NULL OR account_id = $1 ORDER BY id"
        ))
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        Ok(tokens)
    }

    /// Revokes a token: it no longer authenticates. Revoking a revoked token is a success
    /// that keeps the first revocation time; an unknown id is [`StoreError::TokenNotFound`].
    pub async fn revoke_token(&self, id: TokenId) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, CASE WHEN $1 > created_at THEN $1 ELSE created_at END) \
             WHERE id = $2",
        )
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::TokenNotFound(id));
        }
        Ok(())
    }

    // ---- audit trail ----

    /// Appends an entry to the audit trail, stamped with the current time in milliseconds.
    /// The action and object must not be empty, before and after must be JSON when given.
    /// Neither the account nor the token is looked up: the trail outlives what it describes
    /// (the entry for removing an account is written when the account is gone).
    pub async fn record_audit(&self, entry: &NewAuditEntry<'_>) -> Result<(), StoreError> {
        for (field, text) in [("action", entry.action), ("object", entry.object)] {
            if text.is_empty() {
                return Err(StoreError::InvalidAuditEntry {
                    field,
                    reason: "must not be empty",
                });
            }
        }
        check_audit_json("before", entry.before)?;
        check_audit_json("after", entry.after)?;
        sqlx::query(
            "INSERT INTO audit_log \
             (account_id, token_id, at_ms, action, object, before_json, after_json) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(entry.account)
        .bind(entry.token)
        .bind(now_ms())
        .bind(entry.action)
        .bind(entry.object)
        .bind(entry.before)
        .bind(entry.after)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// An account's audit trail, newest first (by time, then by the order written), at most
    /// `limit` entries. An account without entries, or unknown, has an empty trail; the trail
    /// of a removed account stays readable.
    pub async fn audit(
        &self,
        account: AccountId,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let entries = sqlx::query_as(
            "SELECT id, account_id, token_id, at_ms, action, object, before_json, after_json \
             FROM audit_log WHERE account_id = $1 ORDER BY at_ms DESC, id DESC LIMIT $2",
        )
        .bind(account)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(entries)
    }

    // --- presence and health (not configuration) ---

    /// Records how many live bindings `trunk_group` has on `server` (0 removes the row).
    pub async fn set_presence(
        &self,
        server: &str,
        trunk_group: TrunkGroupId,
        contacts: usize,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if contacts == 0 {
            sqlx::query("DELETE FROM presence WHERE server = $1 AND trunk_group_id = $2")
                .bind(server)
                .bind(trunk_group)
                .execute(&self.pool)
                .await?;
        } else {
            sqlx::query(
                "INSERT INTO presence (server, trunk_group_id, contacts, updated_at_ms) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (server, trunk_group_id) \
                 DO UPDATE SET contacts = excluded.contacts, updated_at_ms = excluded.updated_at_ms",
            )
            .bind(server)
            .bind(trunk_group)
            .bind(contacts as i64)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Replaces all of `server`'s presence rows (at start: what it loaded).
    pub async fn reset_presence(
        &self,
        server: &str,
        groups: &[(TrunkGroupId, usize)],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM presence WHERE server = $1")
            .bind(server)
            .execute(&mut *tx)
            .await?;
        // Many rows per statement: one statement per row costs a round trip each, and a
        // server with 100 000 trunk groups held the write lock for seconds.
        let rows: Vec<_> = groups.iter().filter(|(_, n)| *n > 0).collect();
        for chunk in rows.chunks(PRESENCE_CHUNK) {
            let mut sql = String::from(
                "INSERT INTO presence (server, trunk_group_id, contacts, updated_at_ms) VALUES ",
            );
            for i in 0..chunk.len() {
                let sep = if i == 0 { "" } else { ", " };
                sql.push_str(&format!("{sep}($1, ${}, ${}, $2)", 3 + 2 * i, 4 + 2 * i));
            }
            let mut query = sqlx::query(&sql).bind(server).bind(now_ms);
            for &&(group, contacts) in chunk {
                query = query.bind(group).bind(contacts as i64);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The servers holding live bindings of `trunk_group`: (server, contacts, updated_at_ms),
    /// by server name.
    pub async fn presence(
        &self,
        trunk_group: TrunkGroupId,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        let rows = sqlx::query_as(
            "SELECT server, contacts, updated_at_ms FROM presence \
             WHERE trunk_group_id = $1 ORDER BY server",
        )
        .bind(trunk_group)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Records that `server` runs, at `now_ms`.
    pub async fn heartbeat(&self, server: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO server_heartbeats (server, seen_at_ms) VALUES ($1, $2) \
             ON CONFLICT (server) DO UPDATE SET seen_at_ms = excluded.seen_at_ms",
        )
        .bind(server)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// When each trunk server last said it runs: (server, seen_at_ms), by name.
    pub async fn heartbeats(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows =
            sqlx::query_as("SELECT server, seen_at_ms FROM server_heartbeats ORDER BY server")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows)
    }

    /// Keeps an agent's health report (JSON text) with the time received; only the newest
    /// [`HEALTH_REPORTS_KEPT`] per trunk group stay.
    pub async fn add_health_report(
        &self,
        trunk_group: TrunkGroupId,
        report: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO health_reports (trunk_group_id, received_at_ms, report) VALUES ($1, $2, $3)",
        )
        .bind(trunk_group)
        .bind(now_ms)
        .bind(report)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM health_reports WHERE trunk_group_id = $1 AND id NOT IN \
             (SELECT id FROM health_reports WHERE trunk_group_id = $1 ORDER BY id DESC LIMIT $2)",
        )
        .bind(trunk_group)
        .bind(HEALTH_REPORTS_KEPT)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The newest health report of `trunk_group`: (received_at_ms, JSON text).
    pub async fn last_health_report(
        &self,
        trunk_group: TrunkGroupId,
    ) -> Result<Option<(i64, String)>, StoreError> {
        let row = sqlx::query_as(
            "SELECT received_at_ms, report FROM health_reports WHERE trunk_group_id = $1 \
             ORDER BY id DESC LIMIT 1",
        )
        .bind(trunk_group)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }
}

/// The integration tests' throw-away PostgreSQL cluster, for running these tests on it.
#[cfg(test)]
#[path = "../../tests/common/postgres.rs"]
mod test_postgres;

#[cfg(test)]
mod tests {
    use super::*;

    const REALM: &str = "lifeline.test";

    /// What keeps a test's store alive: its folder, or its PostgreSQL cluster too.
    #[allow(dead_code)]
    enum Kept {
        Dir(tempfile::TempDir),
        Postgres(test_postgres::Postgres),
    }

    /// A fresh store: embedded, or with `LIFELINE_TEST_STORE=postgres` (as `scripts/test`
    /// runs these tests a second time) on a PostgreSQL cluster of the test's own. Tests of
    /// SQLite itself (files, modes, migrations of old files) call [`Store::open`] directly.
    async fn open() -> (Kept, Store) {
        match std::env::var("LIFELINE_TEST_STORE").as_deref() {
            Ok("postgres") => {
                let pg = test_postgres::Postgres::start(std::net::Ipv4Addr::LOCALHOST);
                let store = Store::connect(&StoreLocation::Postgres(pg.url()))
                    .await
                    .unwrap();
                (Kept::Postgres(pg), store)
            }
            Err(std::env::VarError::NotPresent) => {
                let dir = tempfile::tempdir().unwrap();
                let store = Store::open(dir.path()).await.unwrap();
                (Kept::Dir(dir), store)
            }
            other => panic!("LIFELINE_TEST_STORE={other:?}: `postgres` or unset"),
        }
    }

    /// An account and a trunk group under it, ids 1 and 1.
    async fn seeded() -> (Kept, Store, Account, TrunkGroup) {
        let (dir, store) = open().await;
        let account = store.create_account("Acme").await.unwrap();
        let group = store
            .create_trunk_group(account.id, "main", "acme-main", "pw-main", REALM)
            .await
            .unwrap();
        (dir, store, account, group)
    }

    /// A constraint the schema enforces.
    #[derive(Debug, Clone, Copy)]
    enum Violation {
        Check,
        ForeignKey,
        Unique,
    }

    /// Whether `err` is the database refusing a row for `want`, on either backend.
    fn violates(err: &sqlx::Error, want: Violation) -> bool {
        use sqlx::error::ErrorKind;
        let sqlx::Error::Database(db) = err else {
            return false;
        };
        matches!(
            (want, db.kind()),
            (Violation::Check, ErrorKind::CheckViolation)
                | (Violation::ForeignKey, ErrorKind::ForeignKeyViolation)
                | (Violation::Unique, ErrorKind::UniqueViolation)
        )
    }

    #[tokio::test]
    async fn a_folder_name_with_url_characters_is_opened_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("50%41 a#b?c");
        let store = Store::open(&data).await.unwrap();
        store.create_account("Acme").await.unwrap();
        store.close().await;
        assert!(data.join(STORE_FILE).is_file());
        // Nothing was created at the decoded or truncated names.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("50%41 a#b?c")]);
        let again = Store::open(&data).await.unwrap();
        assert_eq!(again.list_accounts().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn heartbeats_keep_the_newest_time_per_server() {
        let (_kept, store) = open().await;
        assert!(store.heartbeats().await.unwrap().is_empty());
        store.heartbeat("trunk2", 1_000).await.unwrap();
        store.heartbeat("trunk1", 2_000).await.unwrap();
        store.heartbeat("trunk2", 3_000).await.unwrap();
        assert_eq!(
            store.heartbeats().await.unwrap(),
            vec![("trunk1".to_string(), 2_000), ("trunk2".to_string(), 3_000)]
        );
    }

    fn is_duplicate(r: Result<impl std::fmt::Debug, StoreError>, want: UniqueField) -> bool {
        matches!(r, Err(StoreError::Duplicate { field, .. }) if field == want)
    }

    #[tokio::test]
    async fn open_creates_folder_and_file_in_wal_mode_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("state").join("nested");
        let store = Store::open(&data).await.unwrap();
        assert_eq!(store.location(), &StoreLocation::Embedded(data.clone()));
        assert_eq!(store.backend(), Backend::Sqlite);
        assert!(data.join(STORE_FILE).is_file());
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

    /// Every DID as `scan_dids` reports it, in a chunk size of `chunk`, sorted.
    async fn scanned(store: &Store, chunk: i64) -> Vec<(String, TrunkGroupId, Option<String>)> {
        let mut got = Vec::new();
        store
            .scan_dids_in_chunks(chunk, |n, g, f| {
                got.push((n.to_owned(), g, f.map(Into::into)))
            })
            .await
            .unwrap();
        got.sort();
        got
    }

    /// Every DID as `list_dids` gives it.
    async fn listed(store: &Store) -> Vec<(String, TrunkGroupId, Option<String>)> {
        let dids = store.list_dids(None).await.unwrap();
        let mut all: Vec<_> = (dids.into_iter())
            .map(|d| (d.number, d.trunk_group_id, d.failover_number))
            .collect();
        all.sort();
        all
    }

    #[tokio::test]
    async fn scanning_dids_in_chunks_gives_every_one_once() {
        let (_dir, store, acme, main) = seeded().await;
        assert!(scanned(&store, 2).await.is_empty());
        let backup = store
            .create_trunk_group(acme.id, "backup", "acme-backup", "pw", REALM)
            .await
            .unwrap();
        for i in 0..7 {
            let group = if i % 3 == 0 { backup.id } else { main.id };
            store
                .create_did(&format!("+4420712345{i:02}"), group)
                .await
                .unwrap();
        }
        store
            .set_did_failover_number("+442071234501", Some("+15550001111"))
            .await
            .unwrap();
        store
            .set_did_failover_number("+442071234506", Some("15550002222"))
            .await
            .unwrap();
        let all = listed(&store).await;
        assert_eq!(all.len(), 7);
        assert_eq!(all[1].2.as_deref(), Some("+15550001111"));
        for chunk in [1, 2, 3, 7, 100] {
            assert_eq!(scanned(&store, chunk).await, all, "chunks of {chunk}");
        }
        assert_eq!(scanned(&store, DID_CHUNK).await, all);
    }

    #[tokio::test]
    async fn scanning_dids_reads_rows_that_do_not_split_one_by_one() {
        let (_dir, store, _acme, main) = seeded().await;
        if store.backend() != Backend::Sqlite {
            // PostgreSQL's checks refuse such numbers.
            return;
        }
        for i in 0..5 {
            store
                .create_did(&format!("+4420712345{i:02}"), main.id)
                .await
                .unwrap();
        }
        // SQLite's checks only look at the start; another program may write these.
        for (number, failover) in [
            ("+1,5", None),
            ("+15551230000", Some("+1,2,3")),
            ("+9 abc", Some("+16665550000")),
        ] {
            sqlx::query(
                "INSERT INTO dids (number, trunk_group_id, created_at, failover_number) \
                 VALUES ($1, $2, 0, $3)",
            )
            .bind(number)
            .bind(main.id)
            .bind(failover)
            .execute(&store.pool)
            .await
            .unwrap();
        }
        // The lowest key there is: the first chunk starts at it, not after it.
        sqlx::query(
            "INSERT INTO dids (rowid, number, trunk_group_id, created_at) \
             VALUES (-9223372036854775808, '+15557770000', $1, 0)",
        )
        .bind(main.id)
        .execute(&store.pool)
        .await
        .unwrap();
        let all = listed(&store).await;
        assert_eq!(all.len(), 9);
        for chunk in [1, 2, 3, 100] {
            assert_eq!(scanned(&store, chunk).await, all, "chunks of {chunk}");
        }
        // A blob (SQLite's text checks let one through): as the rows read, or fail.
        sqlx::query(
            "UPDATE dids SET failover_number = CAST('+15550009999' AS BLOB) \
             WHERE number = '+442071234502'",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        let listed = store.list_dids(None).await.map(|d| d.len());
        for chunk in [1, 2, 100] {
            let mut n = 0;
            let scanned = store.scan_dids_in_chunks(chunk, |_, _, _| n += 1).await;
            assert_eq!(scanned.map(|()| n).ok(), listed.as_ref().ok().copied());
        }
    }

    #[test]
    fn the_trunk_group_scan_reads_the_columns_the_select_does() {
        let select = format!(
            "SELECT {} FROM trunk_groups ",
            TRUNK_GROUP_COLUMNS.join(", ")
        );
        assert_eq!(select_trunk_groups!(""), select);
    }

    #[tokio::test]
    async fn scanning_trunk_groups_gives_what_listing_them_does() {
        let (_dir, store, acme, main) = seeded().await;
        let scanned = async |store: &Store, chunk| {
            let mut groups = store.scan_trunk_groups_in_chunks(chunk).await.unwrap();
            groups.sort_by_key(|g| g.id);
            groups
        };
        let globex = store.create_account("Globex").await.unwrap();
        let mut ids = vec![main.id];
        for (account, name) in [(acme.id, "b"), (globex.id, "c, d"), (acme.id, "e")] {
            let username = format!("user-{}", name.len() + ids.len());
            let g = store
                .create_trunk_group(account, name, &username, "pw", REALM)
                .await
                .unwrap();
            ids.push(g.id);
        }
        store
            .set_trunk_group_failover_number(ids[1], Some("+15550002222"))
            .await
            .unwrap();
        store
            .set_trunk_group_failover_pbx(ids[1], Some(&FailoverPbx::TrunkGroup(ids[0])))
            .await
            .unwrap();
        store
            .set_trunk_group_failover_pbx(
                ids[2],
                Some(&FailoverPbx::Uri("sip:backup.example.com:5070".into())),
            )
            .await
            .unwrap();
        let all = store.list_trunk_groups(None).await.unwrap();
        assert_eq!(all.len(), 4);
        assert!(all[1].failover_pbx.is_some() && all[2].failover_pbx.is_some());
        for chunk in [1, 2, 3, 100, TRUNK_GROUP_CHUNK] {
            assert_eq!(scanned(&store, chunk).await, all, "chunks of {chunk}");
        }
        if store.backend() == Backend::Sqlite {
            // Another program's text with the separator in it: that chunk is read row by row.
            sqlx::query("UPDATE trunk_groups SET name = $1, realm = '' WHERE id = $2")
                .bind("odd\u{1f}name")
                .bind(ids[2])
                .execute(&store.pool)
                .await
                .unwrap();
            let all = store.list_trunk_groups(None).await.unwrap();
            assert_eq!(all[2].name, "odd\u{1f}name");
            for chunk in [1, 2, 3, 100] {
                assert_eq!(scanned(&store, chunk).await, all, "chunks of {chunk}");
            }
            // A blob: as the rows read, or fail.
            sqlx::query("UPDATE trunk_groups SET realm = CAST('r' AS BLOB) WHERE id = $1")
                .bind(ids[1])
                .execute(&store.pool)
                .await
                .unwrap();
            let listed = store.list_trunk_groups(None).await.ok();
            for chunk in [1, 2, 100] {
                let got = store.scan_trunk_groups_in_chunks(chunk).await.ok();
                let got = got.map(|mut g| {
                    g.sort_by_key(|g| g.id);
                    g
                });
                assert_eq!(got, listed, "chunks of {chunk}");
            }
            sqlx::query("UPDATE trunk_groups SET realm = 'r' WHERE id = $1")
                .bind(ids[1])
                .execute(&store.pool)
                .await
                .unwrap();
        }
        store.remove_trunk_group(ids[3]).await.unwrap();
        let all = store.list_trunk_groups(None).await.unwrap();
        assert_eq!(scanned(&store, 2).await, all);
    }

    #[tokio::test]
    async fn presence_is_reset_in_one_transaction_of_many_rows() {
        let (_dir, store) = open().await;
        store.set_presence("trunk1", 6, 1, 10).await.unwrap();
        store.set_presence("trunk2", 6, 2, 10).await.unwrap();
        let groups: Vec<(TrunkGroupId, usize)> =
            (1..=1201).map(|g| (g, (g % 3) as usize)).collect();
        store.reset_presence("trunk1", &groups, 20).await.unwrap();
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM presence WHERE server = $1")
            .bind("trunk1")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(rows, 801, "groups with no contacts have no row");
        assert_eq!(
            store.presence(6).await.unwrap(),
            [("trunk2".to_string(), 2, 10)],
            "0 contacts: trunk1's row is gone, trunk2's stays"
        );
        assert_eq!(
            store.presence(1201).await.unwrap(),
            [("trunk1".to_string(), 1, 20)]
        );
        assert_eq!(
            store.presence(1000).await.unwrap(),
            [("trunk1".to_string(), 1, 20)]
        );
        assert_eq!(
            store.presence(2).await.unwrap(),
            [("trunk1".to_string(), 2, 20)]
        );
        store.reset_presence("trunk1", &[(7, 3)], 30).await.unwrap();
        assert_eq!(store.presence(1201).await.unwrap(), []);
        assert_eq!(
            store.presence(7).await.unwrap(),
            [("trunk1".to_string(), 3, 30)]
        );
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
    #[test]
    fn failover_uris_are_checked_and_normalised() {
        for (input, want) in [
            ("sip:127.0.0.12:5060", "sip:127.0.0.12:5060"),
            ("sip:127.0.0.12", "sip:127.0.0.12"),
            (
                "sip:backup.example.com;transport=tcp",
                "sip:backup.example.com;transport=tcp",
            ),
            (
                "SIPS:Backup.Example.COM:5061",
                "sips:backup.example.com:5061",
            ),
            (
                "sips:backup.example.com;transport=TLS",
                "sips:backup.example.com;transport=TLS",
            ),
            ("sip:[::1]:5070", "sip:[::1]:5070"),
            ("sip:[2001:DB8::1]", "sip:[2001:db8::1]"),
            (
                "sip:+442071234567@pbx.example.com",
                "sip:+442071234567@pbx.example.com",
            ),
            ("sip:localhost;lr", "sip:localhost;lr"),
            (
                "sip:pbx-2.example.com;transport=udp",
                "sip:pbx-2.example.com;transport=udp",
            ),
        ] {
            assert_eq!(normalize_failover_uri(input).unwrap(), want, "{input}");
        }
        for (bad, reason) in [
            ("http://x", "only sip: and sips: URIs can be a failover PBX"),
            (
                "tel:+442071234567",
                "only sip: and sips: URIs can be a failover PBX",
            ),
            ("backup.example.com", "URI without scheme"),
            ("sip:", "bad host name"),
            ("sip:user@", "bad host name"),
            ("sip:a b.example.com", "white space in URI"),
            (
                "sip:u:secret@pbx.example.com",
                "a password does not belong in a URI",
            ),
            (
                "sip:pbx.example.com?subject=x",
                "headers ('?…') are not allowed in a request URI",
            ),
            ("sip:pbx.example.com:0", "port 0"),
            ("sip:pbx.example.com:70000", "port out of range"),
            ("sip:pbx..example.com", "empty label in host name"),
            ("sip:pbx.example.com.", "empty label in host name"),
            (
                "sip:pbx_1.example.com",
                "host names hold only letters, digits, hyphens and dots",
            ),
            (
                "sip:-pbx.example.com",
                "a host name label neither starts nor ends with a hyphen",
            ),
            ("sip:127.0.0.256", "not a valid IP address or host name"),
            (
                "sip:pbx.example.com;method=INVITE",
                "a method parameter is not allowed in a request URI",
            ),
            (
                "sip:pbx.example.com;transport=ws",
                "transport must be udp, tcp or tls",
            ),
            (
                "sip:pbx.example.com;transport",
                "transport must be udp, tcp or tls",
            ),
            (
                "sips:pbx.example.com;transport=udp",
                "sips: cannot use transport=udp",
            ),
            (
                "sip:pbx.example.com;x=<y>",
                "a URI parameter has a character that must be escaped",
            ),
        ] {
            let err = normalize_failover_uri(bad).unwrap_err();
            assert!(
                matches!(&err, StoreError::InvalidFailoverUri { input, reason: r }
                    if input == bad && *r == reason),
                "{bad:?}: {err:?}"
            );
        }
        let long = format!("sip:{}.example.com", "a".repeat(MAX_FAILOVER_URI_LEN));
        assert!(matches!(
            normalize_failover_uri(&long),
            Err(StoreError::InvalidFailoverUri {
                reason: "longer than 1024 characters",
                ..
            })
        ));
        assert_eq!(
            normalize_failover_uri("http://x").unwrap_err().to_string(),
            "invalid failover PBX URI \"http://x\": only sip: and sips: URIs can be a failover PBX"
        );
    }

    #[tokio::test]
    async fn a_trunk_groups_failover_number_is_set_normalised_and_cleared() {
        let (_dir, store, _acme, main) = seeded().await;
        assert_eq!(main.failover_number, None);
        assert_eq!(main.failover_pbx, None);
        let v0 = store.config_version().await.unwrap();
        assert_eq!(
            store
                .set_trunk_group_failover_number(main.id, Some("15550002222"))
                .await
                .unwrap()
                .as_deref(),
            Some("+15550002222")
        );
        let got = store.trunk_group(main.id).await.unwrap().unwrap();
        assert_eq!(got.failover_number.as_deref(), Some("+15550002222"));
        assert_eq!(
            (got.name.as_str(), got.ha1_md5.as_str()),
            ("main", main.ha1_md5.as_str())
        );
        let v1 = store.config_version().await.unwrap();
        assert!(v1 > v0);

        // Refusals change nothing.
        for bad in ["12", "+0123456789", "+44 20 7123 4567", ""] {
            let err = store
                .set_trunk_group_failover_number(main.id, Some(bad))
                .await
                .unwrap_err();
            assert!(
                matches!(&err, StoreError::InvalidNumber { input, .. } if input == bad),
                "{bad:?}: {err:?}"
            );
        }
        assert!(matches!(
            store
                .set_trunk_group_failover_number(999, Some("+15550002222"))
                .await,
            Err(StoreError::TrunkGroupNotFound(999))
        ));
        assert!(matches!(
            store.set_trunk_group_failover_number(999, None).await,
            Err(StoreError::TrunkGroupNotFound(999))
        ));
        assert_eq!(store.config_version().await.unwrap(), v1);
        assert_eq!(
            store
                .trunk_group(main.id)
                .await
                .unwrap()
                .unwrap()
                .failover_number
                .as_deref(),
            Some("+15550002222")
        );

        assert_eq!(
            store
                .set_trunk_group_failover_number(main.id, None)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .trunk_group(main.id)
                .await
                .unwrap()
                .unwrap()
                .failover_number,
            None
        );
        assert!(store.config_version().await.unwrap() > v1);
    }

    #[tokio::test]
    async fn a_trunk_groups_failover_pbx_is_a_uri_or_a_trunk_group_never_both() {
        let (_dir, store, acme, main) = seeded().await;
        let backup = store
            .create_trunk_group(acme.id, "backup", "acme-backup", "pw", REALM)
            .await
            .unwrap();
        let v0 = store.config_version().await.unwrap();

        let set = store
            .set_trunk_group_failover_pbx(
                main.id,
                Some(&FailoverPbx::Uri(
                    "SIP:Backup.Example.COM;transport=tcp".into(),
                )),
            )
            .await
            .unwrap();
        let uri = FailoverPbx::Uri("sip:backup.example.com;transport=tcp".into());
        assert_eq!(set.as_ref(), Some(&uri));
        let got = store.trunk_group(main.id).await.unwrap().unwrap();
        assert_eq!(got.failover_pbx.as_ref(), Some(&uri));
        let v1 = store.config_version().await.unwrap();
        assert!(v1 > v0);

        // A trunk group replaces the URI.
        let group = FailoverPbx::TrunkGroup(backup.id);
        assert_eq!(
            store
                .set_trunk_group_failover_pbx(main.id, Some(&group))
                .await
                .unwrap()
                .as_ref(),
            Some(&group)
        );
        assert_eq!(
            store
                .trunk_group(main.id)
                .await
                .unwrap()
                .unwrap()
                .failover_pbx,
            Some(group.clone())
        );
        let (uri_col, group_col): (Option<String>, Option<i64>) = sqlx::query_as(
            "SELECT failover_pbx_uri, failover_pbx_trunk_group FROM trunk_groups WHERE id = $1",
        )
        .bind(main.id)
        .fetch_one(&store.pool)
        .await
        .unwrap();
        assert_eq!((uri_col, group_col), (None, Some(backup.id)));
        let v2 = store.config_version().await.unwrap();
        assert!(v2 > v1);

        // And a URI replaces the trunk group.
        store
            .set_trunk_group_failover_pbx(
                main.id,
                Some(&FailoverPbx::Uri("sip:127.0.0.12:5060".into())),
            )
            .await
            .unwrap();
        assert_eq!(
            store
                .trunk_group(main.id)
                .await
                .unwrap()
                .unwrap()
                .failover_pbx,
            Some(FailoverPbx::Uri("sip:127.0.0.12:5060".into()))
        );
        // The other group is untouched throughout.
        assert_eq!(
            store.trunk_group(backup.id).await.unwrap(),
            Some(backup.clone())
        );

        // None clears both.
        assert_eq!(
            store
                .set_trunk_group_failover_pbx(main.id, None)
                .await
                .unwrap(),
            None
        );
        let (uri_col, group_col): (Option<String>, Option<i64>) = sqlx::query_as(
            "SELECT failover_pbx_uri, failover_pbx_trunk_group FROM trunk_groups WHERE id = $1",
        )
        .bind(main.id)
        .fetch_one(&store.pool)
        .await
        .unwrap();
        assert_eq!((uri_col, group_col), (None, None));
        assert!(store.config_version().await.unwrap() > v2);
    }

    #[tokio::test]
    async fn a_bad_failover_pbx_is_refused_and_changes_nothing() {
        let (_dir, store, acme, main) = seeded().await;
        let globex = store.create_account("Globex").await.unwrap();
        let foreign = store
            .create_trunk_group(globex.id, "main", "globex-main", "pw", REALM)
            .await
            .unwrap();
        let uri = FailoverPbx::Uri("sip:backup.example.com".into());
        store
            .set_trunk_group_failover_pbx(main.id, Some(&uri))
            .await
            .unwrap();
        let version = store.config_version().await.unwrap();

        let err = store
            .set_trunk_group_failover_pbx(main.id, Some(&FailoverPbx::Uri("http://x".into())))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidFailoverUri { input, .. } if input == "http://x"),
            "{err:?}"
        );

        let err = store
            .set_trunk_group_failover_pbx(main.id, Some(&FailoverPbx::TrunkGroup(foreign.id)))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::FailoverPbxOtherAccount { id, account, pbx, pbx_account }
                    if id == main.id && account == acme.id
                        && pbx == foreign.id && pbx_account == globex.id
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "trunk group {} belongs to account {}, not to account {} of trunk group {}: \
                 a failover PBX must be a trunk group of the same account",
                foreign.id, globex.id, acme.id, main.id
            )
        );

        let err = store
            .set_trunk_group_failover_pbx(main.id, Some(&FailoverPbx::TrunkGroup(main.id)))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::FailoverPbxIsItself(id) if id == main.id));
        assert_eq!(
            err.to_string(),
            format!("trunk group {} cannot be its own failover PBX", main.id)
        );

        let err = store
            .set_trunk_group_failover_pbx(main.id, Some(&FailoverPbx::TrunkGroup(999)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::FailoverPbxNotFound(999)),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "no trunk group with id 999 to use as failover PBX"
        );

        for pbx in [Some(&uri), None] {
            assert!(matches!(
                store.set_trunk_group_failover_pbx(999, pbx).await,
                Err(StoreError::TrunkGroupNotFound(999))
            ));
        }
        assert_eq!(store.config_version().await.unwrap(), version);
        assert_eq!(
            store
                .trunk_group(main.id)
                .await
                .unwrap()
                .unwrap()
                .failover_pbx,
            Some(uri)
        );
    }

    #[tokio::test]
    async fn the_schema_refuses_bad_failover_values_from_other_writers() {
        let (_dir, store, acme, main) = seeded().await;
        let backup = store
            .create_trunk_group(acme.id, "backup", "acme-backup", "pw", REALM)
            .await
            .unwrap();
        let update = async |sql: &str| {
            sqlx::query(sql)
                .bind(main.id)
                .execute(&store.pool)
                .await
                .map(|_| ())
        };
        store.create_did("+442071234567", main.id).await.unwrap();
        let check = Violation::Check;
        for (sql, want) in [
            (
                "UPDATE trunk_groups SET failover_number = '15550002222' WHERE id = $1",
                check,
            ),
            (
                "UPDATE trunk_groups SET failover_pbx_uri = 'http://x' WHERE id = $1",
                check,
            ),
            (
                "UPDATE trunk_groups SET failover_pbx_trunk_group = id WHERE id = $1",
                check,
            ),
            (
                "UPDATE trunk_groups SET failover_pbx_uri = 'sip:x.example', \
                 failover_pbx_trunk_group = 2 WHERE id = $1",
                check,
            ),
            (
                "UPDATE trunk_groups SET failover_pbx_trunk_group = 999 WHERE id = $1",
                Violation::ForeignKey,
            ),
            (
                "UPDATE dids SET failover_number = '15550002222' WHERE trunk_group_id = $1",
                check,
            ),
        ] {
            let err = update(sql).await.unwrap_err();
            assert!(violates(&err, want), "{sql}: {err}");
        }
        let version = store.config_version().await.unwrap();
        update("UPDATE trunk_groups SET failover_pbx_trunk_group = 2 WHERE id = $1")
            .await
            .unwrap();
        assert_eq!(backup.id, 2);
        assert_eq!(
            store
                .trunk_group(main.id)
                .await
                .unwrap()
                .unwrap()
                .failover_pbx,
            Some(FailoverPbx::TrunkGroup(2))
        );
        assert!(store.config_version().await.unwrap() > version);
    }

    #[tokio::test]
    async fn a_trunk_group_that_is_a_failover_pbx_is_not_removed() {
        let (_dir, store, acme, main) = seeded().await;
        let backup = store
            .create_trunk_group(acme.id, "backup", "acme-backup", "pw", REALM)
            .await
            .unwrap();
        let third = store
            .create_trunk_group(acme.id, "third", "acme-third", "pw", REALM)
            .await
            .unwrap();
        for g in [main.id, third.id] {
            store
                .set_trunk_group_failover_pbx(g, Some(&FailoverPbx::TrunkGroup(backup.id)))
                .await
                .unwrap();
        }
        let version = store.config_version().await.unwrap();
        let err = store.remove_trunk_group(backup.id).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::TrunkGroupIsFailoverPbx { id, used_by }
                if *id == backup.id && *used_by == [main.id, third.id]),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "trunk group {} is the failover PBX of trunk group(s) {}, {}; change theirs first",
                backup.id, main.id, third.id
            )
        );
        // DIDs are named first when both are in the way.
        store.create_did("+442071234567", backup.id).await.unwrap();
        assert!(matches!(
            store.remove_trunk_group(backup.id).await,
            Err(StoreError::TrunkGroupHasDids { count: 1, .. })
        ));
        store.remove_did("+442071234567").await.unwrap();
        let version = version + 2;
        assert_eq!(store.config_version().await.unwrap(), version);

        // A group that uses another as failover PBX can itself be removed.
        store.remove_trunk_group(third.id).await.unwrap();
        store
            .set_trunk_group_failover_pbx(main.id, None)
            .await
            .unwrap();
        store.remove_trunk_group(backup.id).await.unwrap();
        assert_eq!(store.list_trunk_groups(None).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_dids_failover_number_is_set_listed_and_cleared() {
        let (_dir, store, _acme, main) = seeded().await;
        let did = store.create_did("+442071234567", main.id).await.unwrap();
        assert_eq!(did.failover_number, None);
        let v0 = store.config_version().await.unwrap();

        assert_eq!(
            store
                .set_did_failover_number("442071234567", Some("15550001111"))
                .await
                .unwrap()
                .as_deref(),
            Some("+15550001111")
        );
        let got = store.did("+442071234567").await.unwrap().unwrap();
        assert_eq!(got.failover_number.as_deref(), Some("+15550001111"));
        assert_eq!(
            store.list_dids(None).await.unwrap(),
            std::slice::from_ref(&got)
        );
        assert_eq!(
            store.list_dids(Some(main.id)).await.unwrap(),
            std::slice::from_ref(&got)
        );
        let v1 = store.config_version().await.unwrap();
        assert!(v1 > v0);

        let err = store
            .set_did_failover_number("+442071234567", Some("12"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidNumber { input, .. } if input == "12"),
            "{err:?}"
        );
        let err = store
            .set_did_failover_number("not-a-number", Some("+15550001111"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidNumber { input, .. } if input == "not-a-number"),
            "{err:?}"
        );
        for failover in [Some("+15550001111"), None] {
            let err = store
                .set_did_failover_number("15559999999", failover)
                .await
                .unwrap_err();
            assert!(
                matches!(&err, StoreError::DidNotFound(n) if n == "+15559999999"),
                "{err:?}"
            );
        }
        assert_eq!(store.config_version().await.unwrap(), v1);
        assert_eq!(store.did("+442071234567").await.unwrap(), Some(got));

        assert_eq!(
            store
                .set_did_failover_number("+442071234567", None)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .did("+442071234567")
                .await
                .unwrap()
                .unwrap()
                .failover_number,
            None
        );
        assert!(store.config_version().await.unwrap() > v1);
    }

    #[tokio::test]
    async fn a_store_from_before_failover_is_migrated_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        // Only the first migration, as an older Lifeline left the file.
        {
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .connect_with(sqlite_options(&path).foreign_keys(true))
                .await
                .unwrap();
            let mut first = sqlx::migrate::Migrator::new(Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/migrations/sqlite"
            )))
            .await
            .unwrap();
            first.migrations = std::borrow::Cow::Owned(
                first
                    .migrations
                    .iter()
                    .filter(|m| m.version == 1)
                    .cloned()
                    .collect(),
            );
            first.run(&pool).await.unwrap();
            sqlx::query("INSERT INTO accounts (name, created_at) VALUES ('Acme', 1)")
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO trunk_groups \
                 (account_id, name, username, realm, ha1_md5, ha1_sha256, created_at) \
                 VALUES (1, 'main', 'acme', 'r', $1, $2, 2)",
            )
            .bind("0".repeat(32))
            .bind("0".repeat(64))
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query("INSERT INTO dids VALUES ('+442071234567', 1, 3)")
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        let store = Store::open(dir.path()).await.unwrap();
        let group = store.trunk_group(1).await.unwrap().unwrap();
        assert_eq!(
            (
                group.name.as_str(),
                group.failover_number,
                group.failover_pbx
            ),
            ("main", None, None)
        );
        let did = store.did("+442071234567").await.unwrap().unwrap();
        assert_eq!((did.created_at, did.failover_number), (3, None));
        store
            .set_did_failover_number("+442071234567", Some("+15550001111"))
            .await
            .unwrap();
    }

    // ---- failover plans ----

    /// Acme's trunk groups `main` (DIDs +442071234567, +442071234568, +442071234569) and
    /// `backup`; Globex's trunk group `main` with DID +15557770000.
    async fn plan_fixture() -> (Kept, Store, TrunkGroup, TrunkGroup, TrunkGroup) {
        let (dir, store, acme, main) = seeded().await;
        let backup = store
            .create_trunk_group(acme.id, "backup", "acme-backup", "pw", REALM)
            .await
            .unwrap();
        let globex = store.create_account("Globex").await.unwrap();
        let foreign = store
            .create_trunk_group(globex.id, "main", "globex-main", "pw", REALM)
            .await
            .unwrap();
        for n in ["+442071234567", "+442071234568", "+442071234569"] {
            store.create_did(n, main.id).await.unwrap();
        }
        store.create_did("+15557770000", foreign.id).await.unwrap();
        (dir, store, main, backup, foreign)
    }

    fn dids(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(d, n)| ((*d).to_owned(), (*n).to_owned()))
            .collect()
    }

    /// Every DID's own failover number, by number.
    async fn did_numbers(store: &Store) -> Vec<(String, Option<String>)> {
        store
            .list_dids(None)
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.number, d.failover_number))
            .collect()
    }

    #[tokio::test]
    async fn a_failover_plan_is_written_whole_and_read_back() {
        let (_dir, store, main, backup, _foreign) = plan_fixture().await;
        assert_eq!(
            store.failover_plan(main.id).await.unwrap(),
            FailoverSettings::default()
        );
        let v0 = store.config_version().await.unwrap();

        let plan = FailoverSettings {
            global_number: Some("15550002222".into()),
            pbx: Some(FailoverPbx::Uri(
                "SIP:Backup.Example.COM;transport=tcp".into(),
            )),
            dids: dids(&[
                ("442071234567", "+15550001111"),
                ("+442071234568", "15550003333"),
            ]),
        };
        let want = FailoverSettings {
            global_number: Some("+15550002222".into()),
            pbx: Some(FailoverPbx::Uri(
                "sip:backup.example.com;transport=tcp".into(),
            )),
            dids: dids(&[
                ("+442071234567", "+15550001111"),
                ("+442071234568", "+15550003333"),
            ]),
        };
        assert_eq!(store.set_failover_plan(main.id, &plan).await.unwrap(), want);
        assert_eq!(store.failover_plan(main.id).await.unwrap(), want);
        let group = store.trunk_group(main.id).await.unwrap().unwrap();
        assert_eq!(group.failover_number, want.global_number);
        assert_eq!(group.failover_pbx, want.pbx);
        assert_eq!(
            did_numbers(&store).await,
            [
                ("+15557770000".into(), None),
                ("+442071234567".into(), Some("+15550001111".into())),
                ("+442071234568".into(), Some("+15550003333".into())),
                ("+442071234569".into(), None),
            ]
        );
        let v1 = store.config_version().await.unwrap();
        assert!(v1 > v0, "the servers reload");
        // The other groups are untouched.
        assert_eq!(
            store.trunk_group(backup.id).await.unwrap(),
            Some(backup.clone())
        );

        // The same plan again writes nothing.
        assert_eq!(store.set_failover_plan(main.id, &want).await.unwrap(), want);
        assert_eq!(store.config_version().await.unwrap(), v1);

        // A DID left out loses its number; another gains one; a trunk group PBX replaces the URI.
        let plan = FailoverSettings {
            global_number: None,
            pbx: Some(FailoverPbx::TrunkGroup(backup.id)),
            dids: dids(&[("+442071234569", "+15550004444")]),
        };
        assert_eq!(store.set_failover_plan(main.id, &plan).await.unwrap(), plan);
        assert_eq!(store.failover_plan(main.id).await.unwrap(), plan);
        assert_eq!(
            did_numbers(&store).await,
            [
                ("+15557770000".into(), None),
                ("+442071234567".into(), None),
                ("+442071234568".into(), None),
                ("+442071234569".into(), Some("+15550004444".into())),
            ]
        );
        let (uri, group): (Option<String>, Option<i64>) = sqlx::query_as(
            "SELECT failover_pbx_uri, failover_pbx_trunk_group FROM trunk_groups WHERE id = $1",
        )
        .bind(main.id)
        .fetch_one(&store.pool)
        .await
        .unwrap();
        assert_eq!((uri, group), (None, Some(backup.id)));
        let v2 = store.config_version().await.unwrap();
        assert!(v2 > v1);

        // The same DID twice, in both forms, with one number is one entry.
        let plan = FailoverSettings {
            dids: dids(&[
                ("+442071234567", "+15550001111"),
                ("442071234567", "15550001111"),
            ]),
            ..FailoverSettings::default()
        };
        assert_eq!(
            store.set_failover_plan(main.id, &plan).await.unwrap().dids,
            dids(&[("+442071234567", "+15550001111")])
        );

        // An empty plan clears everything.
        assert_eq!(
            store
                .set_failover_plan(main.id, &FailoverSettings::default())
                .await
                .unwrap(),
            FailoverSettings::default()
        );
        assert_eq!(
            store.failover_plan(main.id).await.unwrap(),
            FailoverSettings::default()
        );
        assert!(did_numbers(&store).await.iter().all(|(_, n)| n.is_none()));
        assert!(store.config_version().await.unwrap() > v2);

        // A group without DIDs takes a plan without DIDs.
        let plan = FailoverSettings {
            global_number: Some("+15550002222".into()),
            ..FailoverSettings::default()
        };
        assert_eq!(
            store.set_failover_plan(backup.id, &plan).await.unwrap(),
            plan
        );
    }

    #[tokio::test]
    async fn a_refused_failover_plan_changes_nothing() {
        let (_dir, store, main, backup, foreign) = plan_fixture().await;
        let good = FailoverSettings {
            global_number: Some("+15550002222".into()),
            pbx: Some(FailoverPbx::Uri("sip:backup.example.com".into())),
            dids: dids(&[("+442071234567", "+15550001111")]),
        };
        store.set_failover_plan(main.id, &good).await.unwrap();
        store
            .set_did_failover_number("+15557770000", Some("+15550009999"))
            .await
            .unwrap();
        let version = store.config_version().await.unwrap();
        let groups = store.list_trunk_groups(None).await.unwrap();
        let numbers = did_numbers(&store).await;

        // Each bad plan also carries good changes that must not be applied.
        let with = |f: &dyn Fn(&mut FailoverSettings)| {
            let mut plan = FailoverSettings {
                global_number: Some("+15550005555".into()),
                pbx: Some(FailoverPbx::TrunkGroup(backup.id)),
                dids: dids(&[
                    ("+442071234568", "+15550006666"),
                    ("+442071234569", "+15550007777"),
                ]),
            };
            f(&mut plan);
            plan
        };
        let is_itself =
            |e: &StoreError| matches!(e, StoreError::FailoverPbxIsItself(id) if *id == main.id);
        let is_other_account = |e: &StoreError| {
            matches!(e, StoreError::FailoverPbxOtherAccount { id, pbx, .. }
                if *id == main.id && *pbx == foreign.id)
        };
        type Case<'a> = (
            TrunkGroupId,
            FailoverSettings,
            &'a dyn Fn(&StoreError) -> bool,
        );
        let cases: Vec<Case> = vec![
            (
                main.id,
                with(&|p| p.global_number = Some("+0123".into())),
                &|e| matches!(e, StoreError::InvalidNumber { input, .. } if input == "+0123"),
            ),
            (
                main.id,
                with(&|p| {
                    p.dids.insert("+442071234567".into(), "12".into());
                }),
                &|e| matches!(e, StoreError::InvalidNumber { input, .. } if input == "12"),
            ),
            (
                main.id,
                with(&|p| {
                    p.dids.insert("not-a-did".into(), "+15550001111".into());
                }),
                &|e| matches!(e, StoreError::InvalidNumber { input, .. } if input == "not-a-did"),
            ),
            (
                main.id,
                with(&|p| {
                    p.dids.insert("+442071234567".into(), "442071234567".into());
                }),
                &|e| matches!(e, StoreError::FailoverNumberIsDid(d) if d == "+442071234567"),
            ),
            (
                main.id,
                with(&|p| {
                    p.dids.insert("442071234568".into(), "+15550001111".into());
                }),
                &|e| matches!(e, StoreError::DidListedTwice(d) if d == "+442071234568"),
            ),
            (
                main.id,
                with(&|p| {
                    p.dids.insert("+15557770000".into(), "+15550001111".into());
                }),
                &|e| matches!(e, StoreError::DidNotFound(d) if d == "+15557770000"),
            ),
            (
                main.id,
                with(&|p| {
                    p.dids.insert("+15559999999".into(), "+15550001111".into());
                }),
                &|e| matches!(e, StoreError::DidNotFound(d) if d == "+15559999999"),
            ),
            (
                main.id,
                with(&|p| p.pbx = Some(FailoverPbx::Uri("http://x".into()))),
                &|e| matches!(e, StoreError::InvalidFailoverUri { input, .. } if input == "http://x"),
            ),
            (
                main.id,
                with(&|p| p.pbx = Some(FailoverPbx::TrunkGroup(main.id))),
                &is_itself,
            ),
            (
                main.id,
                with(&|p| p.pbx = Some(FailoverPbx::TrunkGroup(999))),
                &|e| matches!(e, StoreError::FailoverPbxNotFound(999)),
            ),
            (
                main.id,
                with(&|p| p.pbx = Some(FailoverPbx::TrunkGroup(foreign.id))),
                &is_other_account,
            ),
            (999, with(&|p| p.dids.clear()), &|e| {
                matches!(e, StoreError::TrunkGroupNotFound(999))
            }),
        ];
        for (i, (group, plan, want)) in cases.iter().enumerate() {
            let err = store.set_failover_plan(*group, plan).await.unwrap_err();
            assert!(want(&err), "case {i}: {err:?}");
            assert_eq!(store.config_version().await.unwrap(), version, "case {i}");
            assert_eq!(
                store.list_trunk_groups(None).await.unwrap(),
                groups,
                "case {i}"
            );
            assert_eq!(did_numbers(&store).await, numbers, "case {i}");
        }
        assert_eq!(
            StoreError::FailoverNumberIsDid("+442071234567".into()).to_string(),
            "DID +442071234567 cannot fail over to its own number"
        );
        assert!(matches!(
            store.failover_plan(999).await,
            Err(StoreError::TrunkGroupNotFound(999))
        ));

        // A failure half way through the writes rolls back the part already written.
        let trigger = match store.backend() {
            Backend::Sqlite => {
                "CREATE TRIGGER fail_late BEFORE UPDATE ON dids WHEN NEW.number = '+442071234569' \
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            }
            Backend::Postgres => {
                "CREATE FUNCTION fail_late() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'refused by the test'; END; $$; \
                 CREATE TRIGGER fail_late BEFORE UPDATE ON dids FOR EACH ROW \
                 WHEN (NEW.number = '+442071234569') EXECUTE FUNCTION fail_late();"
            }
        };
        sqlx::raw_sql(trigger).execute(&store.pool).await.unwrap();
        let err = store
            .set_failover_plan(main.id, &with(&|_| {}))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Database(e) if e.to_string().contains("refused by the test")),
            "{err:?}"
        );
        assert_eq!(store.config_version().await.unwrap(), version);
        assert_eq!(store.list_trunk_groups(None).await.unwrap(), groups);
        assert_eq!(did_numbers(&store).await, numbers);
        assert_eq!(store.failover_plan(main.id).await.unwrap(), good);
    }

    #[tokio::test]
    async fn a_did_cannot_fail_over_to_itself() {
        let (_dir, store, _acme, main) = seeded().await;
        store.create_did("+442071234567", main.id).await.unwrap();
        let version = store.config_version().await.unwrap();
        for failover in ["+442071234567", "442071234567"] {
            let err = store
                .set_did_failover_number("442071234567", Some(failover))
                .await
                .unwrap_err();
            assert!(
                matches!(&err, StoreError::FailoverNumberIsDid(d) if d == "+442071234567"),
                "{err:?}"
            );
        }
        assert_eq!(store.config_version().await.unwrap(), version);
        assert_eq!(
            store
                .did("+442071234567")
                .await
                .unwrap()
                .unwrap()
                .failover_number,
            None
        );
    }

    // ---- API tokens ----

    #[test]
    fn base64url_follows_rfc4648() {
        for (input, want) in [
            (&b""[..], ""),
            (b"f", "Zg"),
            (b"fo", "Zm8"),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg"),
            (b"fooba", "Zm9vYmE"),
            (b"foobar", "Zm9vYmFy"),
            (&[0xfb, 0xff], "-_8"),
            (&[0xff; 3], "____"),
            (&[0; 3], "AAAA"),
        ] {
            assert_eq!(base64url(input), want, "{input:?}");
        }
    }

    #[test]
    fn token_secrets_have_the_documented_form_and_differ() {
        let a = new_token_secret();
        let b = new_token_secret();
        for s in [&a, &b] {
            assert_eq!(s.len(), 47, "{s}");
            let body = s.strip_prefix("llt_").expect("prefix");
            assert_eq!(body.len(), 43);
            assert!(
                body.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
                "{s}"
            );
        }
        assert_ne!(a, b);
        assert_eq!(token_hash("llt_x"), hex::encode(Sha256::digest(b"llt_x")),);
    }

    /// Acme (with trunk group `main`) and Globex (with trunk group `main`).
    async fn token_fixture() -> (Kept, Store, Account, TrunkGroup, Account, TrunkGroup) {
        let (dir, store, acme, main) = seeded().await;
        let globex = store.create_account("Globex").await.unwrap();
        let other = store
            .create_trunk_group(globex.id, "main", "globex-main", "pw", REALM)
            .await
            .unwrap();
        (dir, store, acme, main, globex, other)
    }

    #[tokio::test]
    async fn tokens_of_every_scope_are_created_found_and_listed() {
        let (_dir, store, acme, main, globex, other) = token_fixture().await;
        let version = store.config_version().await.unwrap();
        let before = now();

        let (op, op_secret) = store
            .create_token(TokenScope::Operator, "  ops script ")
            .await
            .unwrap();
        let acme_scope = TokenScope::Account(acme.id);
        let (account, account_secret) = store.create_token(acme_scope, "portal").await.unwrap();
        let group_scope = TokenScope::TrunkGroup {
            account: acme.id,
            trunk_group: main.id,
        };
        let (agent, agent_secret) = store.create_token(group_scope, "").await.unwrap();
        let (foreign, _) = store
            .create_token(
                TokenScope::TrunkGroup {
                    account: globex.id,
                    trunk_group: other.id,
                },
                "globex agent",
            )
            .await
            .unwrap();

        assert_eq!(op.scope, TokenScope::Operator);
        assert_eq!(op.label, "ops script", "trimmed");
        assert_eq!(account.scope, acme_scope);
        assert_eq!(agent.scope, group_scope);
        assert_eq!(agent.label, "");
        assert!(op.created_at >= before && op.created_at <= now());
        assert_eq!(op.revoked_at, None);
        assert!(op.id < account.id && account.id < agent.id && agent.id < foreign.id);
        let secrets = [&op_secret, &account_secret, &agent_secret];
        for (i, s) in secrets.iter().enumerate() {
            assert!(s.starts_with("llt_") && s.len() == 47, "{s}");
            assert!(secrets[i + 1..].iter().all(|t| t != s), "secrets differ");
        }

        for (token, secret) in [
            (&op, &op_secret),
            (&account, &account_secret),
            (&agent, &agent_secret),
        ] {
            assert_eq!(
                store.token_by_secret(secret).await.unwrap().as_ref(),
                Some(token)
            );
            assert_eq!(store.token(token.id).await.unwrap().as_ref(), Some(token));
        }
        assert_eq!(store.token(999).await.unwrap(), None);

        assert_eq!(
            store.list_tokens(None).await.unwrap(),
            [op.clone(), account.clone(), agent.clone(), foreign.clone()]
        );
        assert_eq!(
            store.list_tokens(Some(acme.id)).await.unwrap(),
            [account.clone(), agent.clone()]
        );
        assert_eq!(
            store.list_tokens(Some(globex.id)).await.unwrap(),
            std::slice::from_ref(&foreign)
        );
        assert!(store.list_tokens(Some(999)).await.unwrap().is_empty());

        // Tokens are not configuration.
        store.revoke_token(agent.id).await.unwrap();
        assert_eq!(store.config_version().await.unwrap(), version);
    }

    #[tokio::test]
    async fn only_the_sha256_of_a_secret_is_stored() {
        // SQLite's files are read below.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let acme = store.create_account("Acme").await.unwrap();
        let (token, secret) = store
            .create_token(TokenScope::Account(acme.id), "portal")
            .await
            .unwrap();
        let stored: String =
            sqlx::query_scalar("SELECT secret_sha256 FROM api_tokens WHERE id = $1")
                .bind(token.id)
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert_eq!(stored, hex::encode(Sha256::digest(secret.as_bytes())));
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&store.pool)
            .await
            .unwrap();
        store.close().await;
        let body = secret.strip_prefix("llt_").unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            // SQLite may remove its -wal and -shm files as the last connection goes.
            let bytes = match std::fs::read(entry.unwrap().path()) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                read => read.unwrap(),
            };
            assert!(
                !bytes.windows(body.len()).any(|w| w == body.as_bytes()),
                "the secret is in the store"
            );
        }
    }

    #[tokio::test]
    async fn a_wrong_or_revoked_secret_finds_no_token() {
        let (_dir, store, acme, main) = seeded().await;
        let (kept, kept_secret) = store
            .create_token(TokenScope::Account(acme.id), "kept")
            .await
            .unwrap();
        let (gone, gone_secret) = store
            .create_token(
                TokenScope::TrunkGroup {
                    account: acme.id,
                    trunk_group: main.id,
                },
                "gone",
            )
            .await
            .unwrap();

        let mut flipped = kept_secret.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        let hash = token_hash(&kept_secret);
        for wrong in [
            "",
            "llt_",
            &flipped,
            &kept_secret[..kept_secret.len() - 1],
            &format!("{kept_secret}x"),
            &format!(" {kept_secret}"),
            &kept_secret.to_uppercase(),
            &hash,
        ] {
            assert_eq!(
                store.token_by_secret(wrong).await.unwrap(),
                None,
                "{wrong:?}"
            );
        }

        let before = now();
        store.revoke_token(gone.id).await.unwrap();
        assert_eq!(store.token_by_secret(&gone_secret).await.unwrap(), None);
        let revoked = store.token(gone.id).await.unwrap().unwrap();
        let at = revoked.revoked_at.expect("revoked");
        assert!(at >= before && at <= now());
        assert_eq!(
            ApiToken {
                revoked_at: None,
                ..revoked.clone()
            },
            gone
        );
        // Again: a success that keeps the first time.
        sqlx::query(
            "UPDATE api_tokens SET created_at = created_at - 10, revoked_at = revoked_at - 5 \
             WHERE id = $1",
        )
        .bind(gone.id)
        .execute(&store.pool)
        .await
        .unwrap();
        store.revoke_token(gone.id).await.unwrap();
        assert_eq!(
            store.token(gone.id).await.unwrap().unwrap().revoked_at,
            Some(at - 5)
        );
        // Listed still, as revoked.
        assert_eq!(
            store.list_tokens(Some(acme.id)).await.unwrap()[1].revoked_at,
            Some(at - 5)
        );

        let err = store.revoke_token(999).await.unwrap_err();
        assert!(matches!(err, StoreError::TokenNotFound(999)), "{err:?}");
        assert_eq!(err.to_string(), "no API token with id 999");

        // The other token is untouched.
        assert_eq!(
            store.token_by_secret(&kept_secret).await.unwrap(),
            Some(kept)
        );
    }

    #[tokio::test]
    async fn a_token_scope_must_exist_and_hold_together() {
        let (_dir, store, acme, main, globex, _other) = token_fixture().await;
        let err = store
            .create_token(TokenScope::Account(999), "x")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AccountNotFound(999)), "{err:?}");
        let err = store
            .create_token(
                TokenScope::TrunkGroup {
                    account: acme.id,
                    trunk_group: 999,
                },
                "x",
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::TrunkGroupNotFound(999)),
            "{err:?}"
        );
        let err = store
            .create_token(
                TokenScope::TrunkGroup {
                    account: globex.id,
                    trunk_group: main.id,
                },
                "x",
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::TokenScopeMismatch { trunk_group, account, group_account }
                if trunk_group == main.id && account == globex.id && group_account == acme.id),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "trunk group {} belongs to account {}, not to account {}: a trunk group token \
                 is scoped to the group's own account",
                main.id, acme.id, globex.id
            )
        );
        for bad in ["a\tb", "a\nb", &"l".repeat(201)] {
            let err = store
                .create_token(TokenScope::Operator, bad)
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::InvalidName {
                        field: "token label",
                        ..
                    }
                ),
                "{bad:?}: {err:?}"
            );
        }
        assert!(store.list_tokens(None).await.unwrap().is_empty());
        store
            .create_token(TokenScope::Operator, &"l".repeat(200))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn the_schema_refuses_bad_token_rows_from_other_writers() {
        let (_dir, store, acme, main, globex, _other) = token_fixture().await;
        let insert = async |account: Option<i64>, group: Option<i64>, hash: &str| {
            sqlx::query(
                "INSERT INTO api_tokens \
                 (secret_sha256, account_id, trunk_group_id, label, created_at) \
                 VALUES ($1, $2, $3, '', 1)",
            )
            .bind(hash)
            .bind(account)
            .bind(group)
            .execute(&store.pool)
            .await
            .map(|_| ())
        };
        let hash = "a".repeat(64);
        for (account, group, hash, want) in [
            (None, Some(main.id), hash.as_str(), Violation::Check),
            (Some(globex.id), Some(main.id), &hash, Violation::ForeignKey),
            (Some(999), None, &hash, Violation::ForeignKey),
            (Some(acme.id), None, "abc", Violation::Check),
            (Some(acme.id), None, &"A".repeat(64), Violation::Check),
        ] {
            let err = insert(account, group, hash).await.unwrap_err();
            assert!(violates(&err, want), "{account:?} {group:?}: {err}");
        }
        insert(Some(acme.id), Some(main.id), &hash).await.unwrap();
        let err = insert(Some(acme.id), None, &hash).await.unwrap_err();
        assert!(violates(&err, Violation::Unique), "{err}");
    }

    #[tokio::test]
    async fn live_tokens_keep_their_trunk_group_and_account_revoked_ones_go_with_them() {
        let (_dir, store, acme, main) = seeded().await;
        let group_scope = TokenScope::TrunkGroup {
            account: acme.id,
            trunk_group: main.id,
        };
        let (g1, _) = store.create_token(group_scope, "agent 1").await.unwrap();
        let (g2, _) = store.create_token(group_scope, "agent 2").await.unwrap();
        let (a1, _) = store
            .create_token(TokenScope::Account(acme.id), "portal")
            .await
            .unwrap();
        let (op, _) = store
            .create_token(TokenScope::Operator, "ops")
            .await
            .unwrap();
        store.revoke_token(g1.id).await.unwrap();
        let version = store.config_version().await.unwrap();

        let err = store.remove_trunk_group(main.id).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::TrunkGroupHasTokens { id, tokens }
                if *id == main.id && *tokens == [g2.id]),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "trunk group {} still has live API token(s) {}; revoke them first",
                main.id, g2.id
            )
        );
        // The refusal rolled back the removal of the revoked token too.
        assert!(store.token(g1.id).await.unwrap().is_some());
        assert_eq!(store.config_version().await.unwrap(), version);

        // DIDs are named before tokens.
        store.create_did("+442071234567", main.id).await.unwrap();
        assert!(matches!(
            store.remove_trunk_group(main.id).await,
            Err(StoreError::TrunkGroupHasDids { count: 1, .. })
        ));
        store.remove_did("+442071234567").await.unwrap();

        store.revoke_token(g2.id).await.unwrap();
        store.remove_trunk_group(main.id).await.unwrap();
        assert_eq!(store.token(g1.id).await.unwrap(), None);
        assert_eq!(store.token(g2.id).await.unwrap(), None);
        assert!(store.token(a1.id).await.unwrap().is_some());

        let err = store.remove_account(acme.id).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::AccountHasTokens { id, tokens }
                if *id == acme.id && *tokens == [a1.id]),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "account {} still has live API token(s) {}; revoke them first",
                acme.id, a1.id
            )
        );
        assert!(store.account(acme.id).await.unwrap().is_some());
        store.revoke_token(a1.id).await.unwrap();
        store.remove_account(acme.id).await.unwrap();
        assert_eq!(store.token(a1.id).await.unwrap(), None);
        assert_eq!(store.list_tokens(None).await.unwrap(), [op]);
        assert!(matches!(
            store.remove_account(acme.id).await,
            Err(StoreError::AccountNotFound(_))
        ));
    }

    #[tokio::test]
    async fn an_account_with_trunk_groups_and_tokens_names_the_trunk_groups() {
        let (_dir, store, acme, _main) = seeded().await;
        store
            .create_token(TokenScope::Account(acme.id), "portal")
            .await
            .unwrap();
        assert!(matches!(
            store.remove_account(acme.id).await,
            Err(StoreError::AccountHasTrunkGroups { count: 1, .. })
        ));
    }

    // ---- audit trail ----

    #[tokio::test]
    async fn the_audit_trail_is_per_account_and_newest_first() {
        let (_dir, store, acme, main, globex, _other) = token_fixture().await;
        let (token, _) = store
            .create_token(TokenScope::Account(acme.id), "portal")
            .await
            .unwrap();
        let version = store.config_version().await.unwrap();
        let before = now_ms();
        let object = format!("trunk_group:{}", main.id);
        let entries = [
            NewAuditEntry {
                account: acme.id,
                token: None,
                action: "trunk_group.create",
                object: &object,
                before: None,
                after: Some(r#"{"name":"main"}"#),
            },
            NewAuditEntry {
                account: globex.id,
                token: None,
                action: "account.create",
                object: "account:2",
                before: None,
                after: Some("{}"),
            },
            NewAuditEntry {
                account: acme.id,
                token: Some(token.id),
                action: "trunk_group.update",
                object: &object,
                before: Some(r#"{"name":"main"}"#),
                after: Some(r#"{"name":"head office"}"#),
            },
            NewAuditEntry {
                account: acme.id,
                token: Some(token.id),
                action: "did.delete",
                object: "did:+442071234567",
                before: Some(r#"{"number":"+442071234567"}"#),
                after: None,
            },
        ];
        for e in &entries {
            store.record_audit(e).await.unwrap();
        }
        let after = now_ms();

        let trail = store.audit(acme.id, 100).await.unwrap();
        let got: Vec<_> = trail
            .iter()
            .map(|e| {
                (
                    e.account,
                    e.token,
                    e.action.as_str(),
                    e.object.as_str(),
                    e.before.as_deref(),
                    e.after.as_deref(),
                )
            })
            .collect();
        let want: Vec<_> = [&entries[3], &entries[2], &entries[0]]
            .iter()
            .map(|e| (e.account, e.token, e.action, e.object, e.before, e.after))
            .collect();
        assert_eq!(got, want);
        assert!(
            trail
                .windows(2)
                .all(|w| w[0].at_ms >= w[1].at_ms && w[0].id > w[1].id)
        );
        assert!(trail.iter().all(|e| e.at_ms >= before && e.at_ms <= after));

        assert_eq!(store.audit(acme.id, 2).await.unwrap(), trail[..2]);
        assert!(store.audit(acme.id, 0).await.unwrap().is_empty());
        let theirs = store.audit(globex.id, 100).await.unwrap();
        assert_eq!(theirs.len(), 1);
        assert_eq!(theirs[0].action, "account.create");
        assert!(store.audit(999, 100).await.unwrap().is_empty());

        // Newest by time first, even if written out of order (a clock that stepped back).
        sqlx::query("UPDATE audit_log SET at_ms = at_ms + 60000 WHERE id = $1")
            .bind(trail[2].id)
            .execute(&store.pool)
            .await
            .unwrap();
        assert_eq!(store.audit(acme.id, 1).await.unwrap()[0].id, trail[2].id);

        // The trail is not configuration.
        assert_eq!(store.config_version().await.unwrap(), version);
    }

    #[tokio::test]
    async fn the_audit_trail_outlives_what_it_describes_and_refuses_bad_entries() {
        let (_dir, store) = open().await;
        let acme = store.create_account("Acme").await.unwrap();
        let (token, _) = store
            .create_token(TokenScope::Account(acme.id), "portal")
            .await
            .unwrap();
        store.revoke_token(token.id).await.unwrap();
        store.remove_account(acme.id).await.unwrap();
        let entry = NewAuditEntry {
            account: acme.id,
            token: Some(token.id),
            action: "account.delete",
            object: "account:1",
            before: Some(r#"{"id":1,"name":"Acme"}"#),
            after: None,
        };
        store.record_audit(&entry).await.unwrap();
        let trail = store.audit(acme.id, 10).await.unwrap();
        assert_eq!(trail.len(), 1);
        assert_eq!(trail[0].token, Some(token.id));

        for (bad, field) in [
            (
                NewAuditEntry {
                    action: "",
                    ..entry
                },
                "action",
            ),
            (
                NewAuditEntry {
                    object: "",
                    ..entry
                },
                "object",
            ),
            (
                NewAuditEntry {
                    before: Some("{"),
                    ..entry
                },
                "before",
            ),
            (
                NewAuditEntry {
                    after: Some("name=x"),
                    ..entry
                },
                "after",
            ),
        ] {
            let err = store.record_audit(&bad).await.unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidAuditEntry { field: f, .. } if f == field),
                "{err:?}"
            );
        }
        assert_eq!(
            StoreError::InvalidAuditEntry {
                field: "before",
                reason: "is not JSON"
            }
            .to_string(),
            "invalid audit entry: before is not JSON"
        );
        assert_eq!(store.audit(acme.id, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_store_from_before_the_api_is_migrated_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        {
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .connect_with(sqlite_options(&path).foreign_keys(true))
                .await
                .unwrap();
            let mut older = sqlx::migrate::Migrator::new(Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/migrations/sqlite"
            )))
            .await
            .unwrap();
            older.migrations = std::borrow::Cow::Owned(
                older
                    .migrations
                    .iter()
                    .filter(|m| m.version <= 2)
                    .cloned()
                    .collect(),
            );
            older.run(&pool).await.unwrap();
            sqlx::query("INSERT INTO accounts (name, created_at) VALUES ('Acme', 1)")
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO trunk_groups \
                 (account_id, name, username, realm, ha1_md5, ha1_sha256, created_at, \
                  failover_number) \
                 VALUES (1, 'main', 'acme', 'r', $1, $2, 2, '+15550002222')",
            )
            .bind("0".repeat(32))
            .bind("0".repeat(64))
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(
            store
                .failover_plan(1)
                .await
                .unwrap()
                .global_number
                .as_deref(),
            Some("+15550002222")
        );
        let (_, secret) = store
            .create_token(
                TokenScope::TrunkGroup {
                    account: 1,
                    trunk_group: 1,
                },
                "agent",
            )
            .await
            .unwrap();
        assert!(store.token_by_secret(&secret).await.unwrap().is_some());
    }
}
