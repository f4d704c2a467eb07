//! SIP Digest authentication, both sides (RFC 3261 §22, RFC 2617, RFC 7616, RFC 8760).
//!
//! This module owns:
//!
//! - the two `Digest` header values: [`Challenge`] (a `WWW-Authenticate` or
//!   `Proxy-Authenticate` value) and [`Credentials`] (an `Authorization` or
//!   `Proxy-Authorization` value), their parsing and their formatting;
//! - the hash arithmetic both sides share: [`ha1`] and [`compute_response`];
//! - the client side: [`Credentials::answer`] answers a challenge;
//! - the server side: [`Authenticator`] issues self-authenticating nonces and verifies
//!   credentials against them, telling a stale nonce, a replayed nonce count, a wrong
//!   response and a nonce that is not ours apart ([`AuthFailure`]).
//!
//! It does not own which header carries a value (401 and `WWW-Authenticate` for a
//! registrar or UAS, 407 and `Proxy-Authenticate` for a proxy), user storage (the caller
//! looks up HA1 values, the carrier stores those and never passwords), nor the clock:
//! every server-side method takes the current time as a [`SystemTime`] argument so that
//! tests can move time freely.
//!
//! Supported: algorithms `MD5` and `SHA-256`, `qop=auth`, and the RFC 2069 form without
//! qop. Not supported, and reported as errors rather than answered wrongly: the `-sess`
//! algorithms, `SHA-512-256`, `qop=auth-int` (it needs the message body) and `userhash`.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use md5::Md5;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// Errors from parsing a Digest header value or from answering a challenge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The value uses another authentication scheme (`Basic`, `Bearer`, ...). A registrar
    /// treats this as "no usable credentials" and challenges.
    #[error("authentication scheme is {scheme:?}, not Digest")]
    NotDigest {
        /// The scheme the value names (clipped for logging).
        scheme: String,
    },
    /// The value does not follow the auth-param grammar.
    #[error("malformed Digest header at byte {offset}: {reason}")]
    Syntax {
        /// What was expected or found.
        reason: &'static str,
        /// Byte offset in the input where parsing stopped.
        offset: usize,
    },
    /// A parameter the value must carry is absent.
    #[error("Digest header lacks the {0} parameter")]
    MissingParam(&'static str),
    /// A parameter appears twice; RFC 7616 allows each at most once, and guessing which
    /// one the peer meant is how authentication bypasses start.
    #[error("Digest header repeats the {0:?} parameter")]
    DuplicateParam(String),
    /// The algorithm is one this module does not implement (`MD5-sess`, `SHA-256-sess`,
    /// `SHA-512-256`, `AKAv1-MD5`, ...) or an unknown one.
    #[error("unsupported Digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The quality of protection is not `auth` (e.g. only `auth-int` is offered, or a
    /// credential names an unknown qop).
    #[error("unsupported Digest qop {0:?}")]
    UnsupportedQop(String),
    /// The `nc` parameter is not a hexadecimal nonce count of at most 8 digits, or a
    /// count of zero was asked for.
    #[error("invalid Digest nonce count {0:?}")]
    InvalidNonceCount(String),
    /// The credentials use RFC 7616 `userhash=true`, which this module does not support.
    #[error("Digest userhash is not supported")]
    UserhashUnsupported,
    /// A value given to [`Credentials::answer`] cannot be carried in a header (it holds a
    /// control character such as CR or LF) or is empty where it must not be.
    #[error("the {0} value cannot be sent in a Digest header")]
    InvalidValue(&'static str),
}

/// Why [`Authenticator::verify`] refused credentials.
///
/// [`AuthFailure::rechallenge`] tells which outcomes call for a fresh challenge and which
/// for refusing the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// The nonce is malformed, was not issued by this authenticator's secret, was issued
    /// for another realm or algorithm, or the opaque value is not ours. Answer with a
    /// fresh challenge (stale=false).
    #[error("nonce not issued by us")]
    UnknownNonce,
    /// The response is correct but the nonce has outlived its lifetime (or its replay
    /// state had to be forgotten under memory pressure). Answer with a fresh challenge
    /// with stale=true: the client retries without asking its user for a password.
    #[error("nonce is stale")]
    Stale,
    /// The response does not match: wrong password, or a tampered request.
    #[error("wrong digest response")]
    BadResponse,
    /// The nonce count is not greater than the highest already accepted for this nonce:
    /// a replayed (or badly reordered) request.
    #[error("nonce count replayed")]
    Replay,
    /// The lookup has no HA1 for this username, realm and algorithm. Callers should
    /// answer exactly as for [`AuthFailure::BadResponse`] so as not to reveal which
    /// usernames exist.
    #[error("unknown user")]
    UnknownUser,
    /// The credentials name another realm than the one expected.
    #[error("realm mismatch")]
    RealmMismatch,
    /// The credentials use a qop other than `auth` (we only ever offer `auth`).
    #[error("unsupported qop")]
    UnsupportedQop,
    /// The credentials use `qop` but lack `nc` or `cnonce`.
    #[error("credentials lack {0}")]
    MissingParam(&'static str),
}

impl AuthFailure {
    /// How a server should answer: `Some(stale)` means send a fresh challenge with that
    /// `stale` flag; `None` means refuse the request (403).
    pub fn rechallenge(self) -> Option<bool> {
        match self {
            AuthFailure::Stale => Some(true),
            AuthFailure::UnknownNonce
            | AuthFailure::Replay
            | AuthFailure::RealmMismatch
            | AuthFailure::UnsupportedQop => Some(false),
            AuthFailure::BadResponse | AuthFailure::UnknownUser | AuthFailure::MissingParam(_) => {
                None
            }
        }
    }
}

/// A Digest hash algorithm (RFC 7616 §3.3, RFC 8760 for SIP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// `MD5`, the default when a header names no algorithm.
    #[default]
    Md5,
    /// `SHA-256`.
    Sha256,
}

impl Algorithm {
    /// The name on the wire: `MD5` or `SHA-256`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    /// Length of a digest in lowercase hex: 32 for MD5, 64 for SHA-256.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Md5 => 32,
            Algorithm::Sha256 => 64,
        }
    }

    /// Lowercase hex of H(parts joined by ':'), the `H()`/`KD()` of RFC 7616.
    fn hash_hex(self, parts: &[&[u8]]) -> String {
        fn run<D: sha2::Digest>(parts: &[&[u8]]) -> String {
            let mut d = D::new();
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    d.update(b":");
                }
                d.update(p);
            }
            hex::encode(d.finalize())
        }
        match self {
            Algorithm::Md5 => run::<Md5>(parts),
            Algorithm::Sha256 => run::<Sha256>(parts),
        }
    }

    /// A byte that binds a nonce to the algorithm it was issued for.
    fn tag(self) -> u8 {
        match self {
            Algorithm::Md5 => 1,
            Algorithm::Sha256 => 2,
        }
    }
}

impl FromStr for Algorithm {
    type Err = DigestError;

    /// Parses a wire name, case-insensitively. `-sess` variants and other algorithms are
    /// [`DigestError::UnsupportedAlgorithm`].
    fn from_str(s: &str) -> Result<Algorithm, DigestError> {
        if s.eq_ignore_ascii_case("MD5") {
            Ok(Algorithm::Md5)
        } else if s.eq_ignore_ascii_case("SHA-256") {
            Ok(Algorithm::Sha256)
        } else {
            Err(DigestError::UnsupportedAlgorithm(clip(s)))
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A quality-of-protection value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qop {
    /// `auth`: the response covers method and URI. The only one this module answers or
    /// accepts.
    Auth,
    /// `auth-int`: the response also covers the body. Parsed so it can be reported, never
    /// computed.
    AuthInt,
}

impl Qop {
    /// The token on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Qop::Auth => "auth",
            Qop::AuthInt => "auth-int",
        }
    }

    fn from_token(s: &str) -> Option<Qop> {
        if s.eq_ignore_ascii_case("auth") {
            Some(Qop::Auth)
        } else if s.eq_ignore_ascii_case("auth-int") {
            Some(Qop::AuthInt)
        } else {
            None
        }
    }
}

impl fmt::Display for Qop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// HA1 = H(username ":" realm ":" password), in lowercase hex.
///
/// This is what a server stores per user, realm and algorithm instead of the password.
pub fn ha1(alg: Algorithm, username: &str, realm: &str, password: &str) -> String {
    alg.hash_hex(&[username.as_bytes(), realm.as_bytes(), password.as_bytes()])
}

/// The `response` value, in lowercase hex, from HA1 (RFC 7616 §3.4.1, RFC 2069 without qop).
///
/// With `qop` given (it is written verbatim into the hash; only `"auth"` is meaningful
/// here, as `auth-int` would need the body), response = KD(HA1, nonce:nc:cnonce:qop:HA2);
/// without it, `nc` and `cnonce` are ignored and response = KD(HA1, nonce:HA2). HA2 is
/// H(method ":" uri). `ha1_hex` may be in either case; it is lowercased first, as the RFC
/// hashes the lowercase hex.
#[allow(clippy::too_many_arguments)] // the RFC's inputs, shared by client and server
pub fn compute_response(
    alg: Algorithm,
    ha1_hex: &str,
    nonce: &str,
    nc: u32,
    cnonce: &str,
    qop: Option<&str>,
    method: &str,
    uri: &str,
) -> String {
    let ha1 = ha1_hex.to_ascii_lowercase();
    let ha2 = alg.hash_hex(&[method.as_bytes(), uri.as_bytes()]);
    match qop {
        Some(qop) => {
            let nc = format!("{nc:08x}");
            alg.hash_hex(&[
                ha1.as_bytes(),
                nonce.as_bytes(),
                nc.as_bytes(),
                cnonce.as_bytes(),
                qop.as_bytes(),
                ha2.as_bytes(),
            ])
        }
        None => alg.hash_hex(&[ha1.as_bytes(), nonce.as_bytes(), ha2.as_bytes()]),
    }
}

/// A Digest challenge: the value of a `WWW-Authenticate` or `Proxy-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The protection space, shown to users and part of HA1.
    pub realm: String,
    /// The server's nonce.
    pub nonce: String,
    /// Opaque data the client must echo unchanged.
    pub opaque: Option<String>,
    /// The hash algorithm; MD5 when the header names none.
    pub algorithm: Algorithm,
    /// The qop values offered that this module knows (unknown tokens are dropped); empty
    /// when the challenge has no `qop` (RFC 2069 form).
    pub qop: Vec<Qop>,
    /// Whether the previous request failed only because its nonce was stale.
    pub stale: bool,
}

impl Challenge {
    /// Parses a challenge header value such as
    /// `Digest realm="x", nonce="y", algorithm=MD5, qop="auth"`.
    ///
    /// The scheme is case-insensitive, whitespace (including folded lines) is tolerated
    /// anywhere between items, unknown parameters (`domain`, `charset`, ...) are ignored,
    /// and a `qop` list that offers nothing known is an error. Exactly one challenge is
    /// parsed: a value that joins several challenges with commas is a syntax error.
    pub fn parse(value: &str) -> Result<Challenge, DigestError> {
        let params = parse_digest(value)?;
        let mut realm = None;
        let mut nonce = None;
        let mut opaque = None;
        let mut algorithm = Algorithm::Md5;
        let mut qop = Vec::new();
        let mut stale = false;
        for (name, val) in params {
            match name.to_ascii_lowercase().as_str() {
                "realm" => realm = Some(val),
                "nonce" => nonce = Some(val),
                "opaque" => opaque = Some(val),
                "algorithm" => algorithm = val.parse()?,
                "qop" => {
                    qop = val
                        .split(',')
                        .filter_map(|t| Qop::from_token(t.trim()))
                        .collect();
                    if qop.is_empty() {
                        return Err(DigestError::UnsupportedQop(clip(&val)));
                    }
                    qop.dedup();
                }
                "stale" => stale = val.eq_ignore_ascii_case("true"),
                _ => {} // domain, charset, userhash and extensions
            }
        }
        Ok(Challenge {
            realm: realm.ok_or(DigestError::MissingParam("realm"))?,
            nonce: nonce.ok_or(DigestError::MissingParam("nonce"))?,
            opaque,
            algorithm,
            qop,
            stale,
        })
    }
}

impl fmt::Display for Challenge {
    /// Writes the header value, e.g.
    /// `Digest realm="x", nonce="y", opaque="z", algorithm=SHA-256, qop="auth", stale=true`.
    /// Control characters, which a header cannot carry, are dropped from quoted values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Digest realm=")?;
        write_quoted(f, &self.realm)?;
        f.write_str(", nonce=")?;
        write_quoted(f, &self.nonce)?;
        if let Some(opaque) = &self.opaque {
            f.write_str(", opaque=")?;
            write_quoted(f, opaque)?;
        }
        write!(f, ", algorithm={}", self.algorithm)?;
        if !self.qop.is_empty() {
            f.write_str(", qop=\"")?;
            for (i, q) in self.qop.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                f.write_str(q.as_str())?;
            }
            f.write_str("\"")?;
        }
        if self.stale {
            f.write_str(", stale=true")?;
        }
        Ok(())
    }
}

/// Digest credentials: the value of an `Authorization` or `Proxy-Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The realm the response was computed for.
    pub realm: String,
    /// The server nonce being answered.
    pub nonce: String,
    /// The digest-uri the response covers (normally the Request-URI as the client sent it).
    pub uri: String,
    /// The response, hex.
    pub response: String,
    /// The hash algorithm; MD5 when the header names none.
    pub algorithm: Algorithm,
    /// The client nonce; present with a qop.
    pub cnonce: Option<String>,
    /// The challenge's opaque value, echoed.
    pub opaque: Option<String>,
    /// The quality of protection chosen; `None` for the RFC 2069 form.
    pub qop: Option<Qop>,
    /// The nonce count; present with a qop.
    pub nc: Option<u32>,
}

impl Credentials {
    /// Parses a credentials header value such as
    /// `Digest username="1000",realm="asterisk",nonce="…",uri="sip:…",response="…",algorithm=MD5,cnonce="…",qop=auth,nc=00000001`.
    ///
    /// Another scheme is [`DigestError::NotDigest`]. `nc` is 1 to 8 hex digits (8 on the
    /// wire per the RFC); an unknown `qop` or algorithm is an error; unknown parameters are
    /// ignored; `userhash=true` is [`DigestError::UserhashUnsupported`].
    pub fn parse(value: &str) -> Result<Credentials, DigestError> {
        let params = parse_digest(value)?;
        let mut username = None;
        let mut realm = None;
        let mut nonce = None;
        let mut uri = None;
        let mut response = None;
        let mut algorithm = Algorithm::Md5;
        let mut cnonce = None;
        let mut opaque = None;
        let mut qop = None;
        let mut nc = None;
        for (name, val) in params {
            match name.to_ascii_lowercase().as_str() {
                "username" => username = Some(val),
                "realm" => realm = Some(val),
                "nonce" => nonce = Some(val),
                "uri" => uri = Some(val),
                "response" => response = Some(val),
                "algorithm" => algorithm = val.parse()?,
                "cnonce" => cnonce = Some(val),
                "opaque" => opaque = Some(val),
                "qop" => {
                    qop = Some(
                        Qop::from_token(val.trim())
                            .ok_or_else(|| DigestError::UnsupportedQop(clip(&val)))?,
                    )
                }
                "nc" => nc = Some(parse_nc(&val)?),
                "userhash" if val.eq_ignore_ascii_case("true") => {
                    return Err(DigestError::UserhashUnsupported);
                }
                _ => {}
            }
        }
        Ok(Credentials {
            username: username.ok_or(DigestError::MissingParam("username"))?,
            realm: realm.ok_or(DigestError::MissingParam("realm"))?,
            nonce: nonce.ok_or(DigestError::MissingParam("nonce"))?,
            uri: uri.ok_or(DigestError::MissingParam("uri"))?,
            response: response.ok_or(DigestError::MissingParam("response"))?,
            algorithm,
            cnonce,
            opaque,
            qop,
            nc,
        })
    }

    /// Answers `challenge` for a request with `method` and digest-uri `uri`.
    ///
    /// Uses `qop=auth` with `cnonce` and `nc` when the challenge offers `auth` (the offer
    /// may be a list such as `auth,auth-int`), and the RFC 2069 form without qop (ignoring
    /// `cnonce` and `nc`) when it offers no qop. The challenge's algorithm and opaque are
    /// echoed. `cnonce` should be fresh and unpredictable; `nc` counts the requests made
    /// with this nonce, from 1.
    pub fn answer(
        challenge: &Challenge,
        method: &str,
        uri: &str,
        username: &str,
        password: &str,
        cnonce: &str,
        nc: u32,
    ) -> Result<Credentials, DigestError> {
        let qop = if challenge.qop.is_empty() {
            None
        } else if challenge.qop.contains(&Qop::Auth) {
            Some(Qop::Auth)
        } else {
            let offered: Vec<&str> = challenge.qop.iter().map(|q| q.as_str()).collect();
            return Err(DigestError::UnsupportedQop(offered.join(",")));
        };
        // Values that would be written into the header must survive the trip intact,
        // else the server hashes something else than we did.
        for (what, v) in [("username", username), ("uri", uri)] {
            if v.is_empty() || has_control(v) {
                return Err(DigestError::InvalidValue(what));
            }
        }
        if has_control(&challenge.realm) {
            return Err(DigestError::InvalidValue("realm"));
        }
        if has_control(&challenge.nonce) {
            return Err(DigestError::InvalidValue("nonce"));
        }
        if method.is_empty() || !method.bytes().all(is_tchar) {
            return Err(DigestError::InvalidValue("method"));
        }
        if qop.is_some() {
            if cnonce.is_empty() || has_control(cnonce) {
                return Err(DigestError::InvalidValue("cnonce"));
            }
            if nc == 0 {
                return Err(DigestError::InvalidNonceCount("00000000".into()));
            }
        }
        let alg = challenge.algorithm;
        let ha1 = ha1(alg, username, &challenge.realm, password);
        let response = compute_response(
            alg,
            &ha1,
            &challenge.nonce,
            nc,
            cnonce,
            qop.map(Qop::as_str),
            method,
            uri,
        );
        Ok(Credentials {
            username: username.to_owned(),
            realm: challenge.realm.clone(),
            nonce: challenge.nonce.clone(),
            uri: uri.to_owned(),
            response,
            algorithm: alg,
            cnonce: qop.map(|_| cnonce.to_owned()),
            opaque: challenge.opaque.clone(),
            qop,
            nc: qop.map(|_| nc),
        })
    }

    /// The response these credentials should carry if the user's HA1 is `ha1_hex` and the
    /// request's method is `method`: what a server compares [`Credentials::response`] with.
    pub fn expected_response(&self, ha1_hex: &str, method: &str) -> String {
        compute_response(
            self.algorithm,
            ha1_hex,
            &self.nonce,
            self.nc.unwrap_or(0),
            self.cnonce.as_deref().unwrap_or(""),
            self.qop.map(Qop::as_str),
            method,
            &self.uri,
        )
    }
}

impl fmt::Display for Credentials {
    /// Writes the header value, e.g. `Digest username="a", realm="r", nonce="n",
    /// uri="sip:x", response="…", algorithm=MD5, cnonce="c", qop=auth, nc=00000001`.
    ///
    /// `nonce` precedes `cnonce` on purpose: some naive parsers (older SIPp) search for
    /// the first `nonce=` substring.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Digest username=")?;
        write_quoted(f, &self.username)?;
        f.write_str(", realm=")?;
        write_quoted(f, &self.realm)?;
        f.write_str(", nonce=")?;
        write_quoted(f, &self.nonce)?;
        f.write_str(", uri=")?;
        write_quoted(f, &self.uri)?;
        f.write_str(", response=")?;
        write_quoted(f, &self.response)?;
        write!(f, ", algorithm={}", self.algorithm)?;
        if let Some(cnonce) = &self.cnonce {
            f.write_str(", cnonce=")?;
            write_quoted(f, cnonce)?;
        }
        if let Some(opaque) = &self.opaque {
            f.write_str(", opaque=")?;
            write_quoted(f, opaque)?;
        }
        if let Some(qop) = self.qop {
            write!(f, ", qop={qop}")?;
        }
        if let Some(nc) = self.nc {
            write!(f, ", nc={nc:08x}")?;
        }
        Ok(())
    }
}

/// Issues nonces and verifies Digest credentials: the server side.
///
/// Nonces are self-authenticating: each carries its issue time, 8 random bytes and an
/// HMAC-SHA-256 (truncated to 16 bytes) over those, the realm and the algorithm, keyed by
/// the authenticator's secret. So any nonce can be checked without having stored it, and
/// carrier nodes sharing a secret accept each other's nonces (but each keeps its own
/// replay state).
///
/// Replay protection: for credentials with `qop=auth`, the highest nonce count accepted
/// per nonce is remembered in a bounded table (see
/// [`Authenticator::with_max_tracked_nonces`]); a count that does not exceed it is
/// [`AuthFailure::Replay`]. Credentials in the RFC 2069 form (no qop, no nonce count) are
/// accepted while their nonce is fresh, so their replay protection rests on the nonce
/// lifetime alone.
///
/// The `uri` of the credentials is hashed as sent but not compared with the Request-URI:
/// SIP proxies and NATs rewrite Request-URIs, and the nonce binding plus the short
/// lifetime are what this check relies on.
///
/// `verify` takes `&self`; the replay table sits behind a [`Mutex`] held only for a map
/// lookup and never across an `.await`, so one authenticator can serve many tasks.
pub struct Authenticator {
    secret: HmacKey,
    lifetime: Duration,
    opaque: Option<String>,
    max_tracked: usize,
    replay: Mutex<ReplayTable>,
}

/// Per-nonce replay state.
#[derive(Default)]
struct ReplayTable {
    /// Nonce → (issue time in ms since the epoch, highest nonce count accepted).
    seen: HashMap<String, (u64, u32)>,
    /// Nonces issued at or before this time (ms) that are not in `seen` may have been
    /// forgotten under memory pressure, so they are treated as stale.
    floor_ms: u64,
}

/// Bytes of a decoded nonce: issue time (8), salt (8), MAC (16).
const NONCE_BYTES: usize = 32;
const MAC_BYTES: usize = 16;
/// Domain separation for the nonce MAC, versioned so the format can change.
const NONCE_LABEL: &[u8] = b"lifeline digest nonce v1";

impl Authenticator {
    /// Default bound on the replay table (entries are about 150 bytes each).
    pub const DEFAULT_MAX_TRACKED_NONCES: usize = 65_536;

    /// An authenticator with a random 32-byte secret: nonces it issues are valid for
    /// `lifetime` and only for this instance.
    pub fn new(lifetime: Duration) -> Authenticator {
        Authenticator::with_secret(rand::random(), lifetime)
    }

    /// An authenticator with the given secret, e.g. one shared by the nodes of a cluster
    /// or kept across restarts so that outstanding nonces stay valid.
    pub fn with_secret(secret: [u8; 32], lifetime: Duration) -> Authenticator {
        Authenticator {
            secret: HmacKey::new(&secret),
            lifetime,
            opaque: None,
            max_tracked: Self::DEFAULT_MAX_TRACKED_NONCES,
            replay: Mutex::new(ReplayTable::default()),
        }
    }

    /// Puts `opaque` in every challenge and requires credentials to echo it.
    pub fn with_opaque(mut self, opaque: impl Into<String>) -> Authenticator {
        self.opaque = Some(opaque.into());
        self
    }

    /// Bounds the replay table to `max` nonces (at least 1). When it is full, entries of
    /// expired nonces are dropped first; if that is not enough, the oldest eighth is
    /// forgotten and nonces issued up to then are treated as stale, so that a forgotten
    /// nonce count can never be replayed.
    pub fn with_max_tracked_nonces(mut self, max: usize) -> Authenticator {
        self.max_tracked = max.max(1);
        self
    }

    /// How long a nonce is accepted after it was issued.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Issues a challenge for `realm` with a fresh nonce, offering `qop="auth"`.
    ///
    /// `now` is the issue time written into the nonce. Set `stale` when answering a
    /// request that failed with [`AuthFailure::Stale`].
    pub fn challenge(
        &self,
        now: SystemTime,
        realm: &str,
        algorithm: Algorithm,
        stale: bool,
    ) -> Challenge {
        self.challenge_scoped(now, realm, algorithm, stale, &[])
    }

    /// As [`Authenticator::challenge`], with a nonce that only [`Authenticator::verify_scoped`]
    /// with the same `scope` accepts. The registrar scopes nonces to the client's address, so
    /// a nonce fetched from one address is worthless in a request claiming another.
    pub fn challenge_scoped(
        &self,
        now: SystemTime,
        realm: &str,
        algorithm: Algorithm,
        stale: bool,
        scope: &[u8],
    ) -> Challenge {
        let issued = millis(now).to_be_bytes();
        let salt: [u8; 8] = rand::random();
        let mac = self.nonce_mac(algorithm, realm, &issued, &salt, scope);
        let mut raw = [0u8; NONCE_BYTES];
        raw[..8].copy_from_slice(&issued);
        raw[8..16].copy_from_slice(&salt);
        raw[16..].copy_from_slice(&mac);
        Challenge {
            realm: realm.to_owned(),
            nonce: hex::encode(raw),
            opaque: self.opaque.clone(),
            algorithm,
            qop: vec![Qop::Auth],
            stale,
        }
    }

    /// Verifies `creds` sent with a request of `method` at time `now`, for `expected_realm`.
    ///
    /// `ha1_for(username, algorithm)` returns the user's stored HA1 (hex) for that realm
    /// and algorithm, or `None` if there is none. It is only called once the nonce is
    /// known to be ours.
    ///
    /// Order of checks: realm, opaque and nonce authenticity, qop, HA1 lookup, response
    /// (constant-time), then freshness, so that [`AuthFailure::Stale`] is only reported
    /// for a correct response (RFC 7616 §3.3), then the nonce count. A nonce count is
    /// recorded only once everything else passed.
    pub fn verify(
        &self,
        now: SystemTime,
        creds: &Credentials,
        method: &str,
        expected_realm: &str,
        ha1_for: impl FnOnce(&str, Algorithm) -> Option<String>,
    ) -> Result<(), AuthFailure> {
        self.verify_scoped(now, creds, method, expected_realm, &[], ha1_for)
    }

    /// As [`Authenticator::verify`], for nonces issued by
    /// [`Authenticator::challenge_scoped`] with this `scope`; another scope's nonce is
    /// [`AuthFailure::UnknownNonce`].
    pub fn verify_scoped(
        &self,
        now: SystemTime,
        creds: &Credentials,
        method: &str,
        expected_realm: &str,
        scope: &[u8],
        ha1_for: impl FnOnce(&str, Algorithm) -> Option<String>,
    ) -> Result<(), AuthFailure> {
        if creds.realm != expected_realm {
            return Err(AuthFailure::RealmMismatch);
        }
        if let Some(ours) = &self.opaque
            && creds.opaque.as_deref() != Some(ours.as_str())
        {
            return Err(AuthFailure::UnknownNonce);
        }
        let issued_ms = self
            .check_nonce(&creds.nonce, expected_realm, creds.algorithm, scope)
            .ok_or(AuthFailure::UnknownNonce)?;
        let counted = match creds.qop {
            Some(Qop::Auth) => {
                let nc = creds.nc.ok_or(AuthFailure::MissingParam("nc"))?;
                if creds.cnonce.as_deref().is_none_or(str::is_empty) {
                    return Err(AuthFailure::MissingParam("cnonce"));
                }
                Some(nc)
            }
            Some(Qop::AuthInt) => return Err(AuthFailure::UnsupportedQop),
            None => None,
        };
        let ha1 = ha1_for(&creds.username, creds.algorithm).ok_or(AuthFailure::UnknownUser)?;
        if ha1.len() != creds.algorithm.hex_len() {
            tracing::warn!(
                user = %creds.username,
                algorithm = %creds.algorithm,
                len = ha1.len(),
                "stored HA1 has the wrong length for its algorithm"
            );
        }
        let expected = creds.expected_response(&ha1, method);
        let given = creds.response.to_ascii_lowercase();
        if !bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
            return Err(AuthFailure::BadResponse);
        }
        let now_ms = millis(now);
        if self.expired(issued_ms, now_ms) {
            return Err(AuthFailure::Stale);
        }
        match counted {
            Some(nc) => self.count(&creds.nonce, issued_ms, nc, now_ms),
            None => Ok(()),
        }
    }

    /// HMAC over what a nonce binds, truncated.
    fn nonce_mac(
        &self,
        algorithm: Algorithm,
        realm: &str,
        issued: &[u8; 8],
        salt: &[u8; 8],
        scope: &[u8],
    ) -> [u8; MAC_BYTES] {
        // The scope is length-prefixed and the realm is last, so the input is unambiguous.
        let scope_len = (scope.len() as u32).to_be_bytes();
        let full = self.secret.mac(&[
            NONCE_LABEL,
            &[algorithm.tag()],
            issued,
            salt,
            &scope_len,
            scope,
            realm.as_bytes(),
        ]);
        let mut mac = [0u8; MAC_BYTES];
        mac.copy_from_slice(&full[..MAC_BYTES]);
        mac
    }

    /// The issue time (ms) of `nonce` if we issued it for this realm and algorithm.
    fn check_nonce(
        &self,
        nonce: &str,
        realm: &str,
        algorithm: Algorithm,
        scope: &[u8],
    ) -> Option<u64> {
        // Lowercase hex only, so one nonce has one spelling (the replay table is keyed
        // by the string).
        if nonce.len() != NONCE_BYTES * 2
            || !nonce
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        let mut raw = [0u8; NONCE_BYTES];
        hex::decode_to_slice(nonce, &mut raw).ok()?;
        let issued: [u8; 8] = raw[..8].try_into().ok()?;
        let salt: [u8; 8] = raw[8..16].try_into().ok()?;
        let mac = self.nonce_mac(algorithm, realm, &issued, &salt, scope);
        if bool::from(mac.ct_eq(&raw[16..])) {
            Some(u64::from_be_bytes(issued))
        } else {
            None
        }
    }

    /// Whether a nonce issued at `issued_ms` is no longer acceptable at `now_ms`. A nonce
    /// from more than a lifetime in the future means the clock stepped back; it is stale
    /// too, rather than valid for an unbounded time.
    fn expired(&self, issued_ms: u64, now_ms: u64) -> bool {
        let life = u64::try_from(self.lifetime.as_millis()).unwrap_or(u64::MAX);
        now_ms.saturating_sub(issued_ms) >= life || issued_ms > now_ms.saturating_add(life)
    }

    /// Records nonce count `nc` for `nonce`, refusing counts already passed.
    fn count(&self, nonce: &str, issued_ms: u64, nc: u32, now_ms: u64) -> Result<(), AuthFailure> {
        // A poisoned lock only means another thread panicked mid-update; the table is
        // still a valid map, so keep going rather than panic too.
        let mut table = self.replay.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, highest)) = table.seen.get_mut(nonce) {
            if nc <= *highest {
                return Err(AuthFailure::Replay);
            }
            *highest = nc;
            return Ok(());
        }
        if issued_ms <= table.floor_ms {
            return Err(AuthFailure::Stale);
        }
        if nc == 0 {
            return Err(AuthFailure::Replay);
        }
        if table.seen.len() >= self.max_tracked {
            self.evict(&mut table, now_ms);
        }
        table.seen.insert(nonce.to_owned(), (issued_ms, nc));
        Ok(())
    }

    /// Makes room in a full replay table (see [`Authenticator::with_max_tracked_nonces`]).
    fn evict(&self, table: &mut ReplayTable, now_ms: u64) {
        table
            .seen
            .retain(|_, (issued, _)| !self.expired(*issued, now_ms));
        if table.seen.len() < self.max_tracked {
            return;
        }
        // Forget the oldest eighth at once, so this O(n) pass runs once per n/8 inserts.
        let mut times: Vec<u64> = table.seen.values().map(|(issued, _)| *issued).collect();
        let k = (times.len() / 8).max(1) - 1;
        let (_, cutoff, _) = times.select_nth_unstable(k);
        let cutoff = *cutoff;
        table.seen.retain(|_, (issued, _)| *issued > cutoff);
        table.floor_ms = table.floor_ms.max(cutoff);
        tracing::warn!(
            kept = table.seen.len(),
            "digest replay table full of live nonces; older nonces will be re-challenged as stale"
        );
    }
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("Authenticator")
            .field("lifetime", &self.lifetime)
            .field("opaque", &self.opaque)
            .field("max_tracked", &self.max_tracked)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch; 0 for earlier times, saturating far in the future.
fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An HMAC-SHA-256 (RFC 2104) key with its two padded blocks already hashed: each MAC then costs the
/// compressions of the message and of the inner digest only, two fewer than from the raw key.
#[derive(Clone)]
pub struct HmacKey {
    inner: Sha256,
    outer: Sha256,
}

impl HmacKey {
    pub fn new(key: &[u8]) -> HmacKey {
        const BLOCK: usize = 64;
        let mut k = [0u8; BLOCK];
        if key.len() > BLOCK {
            k[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let mut inner = Sha256::new();
        inner.update(k.map(|b| b ^ 0x36));
        let mut outer = Sha256::new();
        outer.update(k.map(|b| b ^ 0x5c));
        HmacKey { inner, outer }
    }

    /// The MAC of the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut inner = self.inner.clone();
        for p in parts {
            inner.update(p);
        }
        let mut outer = self.outer.clone();
        outer.update(inner.finalize());
        outer.finalize().into()
    }
}

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key (its hashed pads are as good as the key).
        f.write_str("HmacKey(..)")
    }
}

/// Parses a nonce count: 1 to 8 hex digits.
fn parse_nc(s: &str) -> Result<u32, DigestError> {
    let t = s.trim();
    if t.is_empty() || t.len() > 8 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DigestError::InvalidNonceCount(clip(s)));
    }
    u32::from_str_radix(t, 16).map_err(|_| DigestError::InvalidNonceCount(clip(s)))
}

/// Clips a peer-supplied string for an error message, so errors stay small in logs.
fn clip(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(|c| c.is_control() && c != '\t')
}

/// RFC 7230 tchar.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Writes `s` as a quoted-string, escaping `"` and `\`. CR, LF and other control
/// characters cannot appear in a quoted-string even escaped (RFC 3261 quoted-pair), and
/// writing them would let a value inject header lines, so they are dropped.
fn write_quoted(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    use fmt::Write as _;
    f.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                f.write_char('\\')?;
                f.write_char(c)?;
            }
            '\t' => f.write_char(c)?,
            c if c.is_control() => {}
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

/// Checks the `Digest` scheme and splits the auth-params that follow into
/// (name, unescaped value) pairs. Duplicate names (case-insensitive) are errors.
fn parse_digest(input: &str) -> Result<Vec<(String, String)>, DigestError> {
    let b = input.as_bytes();
    let mut i = skip_lws(b, 0);
    let start = i;
    while i < b.len() && is_tchar(b[i]) {
        i += 1;
    }
    let scheme = &input[start..i];
    if scheme.is_empty() {
        return Err(DigestError::Syntax {
            reason: "expected an authentication scheme",
            offset: i,
        });
    }
    if !scheme.eq_ignore_ascii_case("Digest") {
        return Err(DigestError::NotDigest {
            scheme: clip(scheme),
        });
    }
    if i < b.len() && !is_lws(b[i]) {
        return Err(DigestError::Syntax {
            reason: "expected whitespace after the scheme",
            offset: i,
        });
    }

    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        // Empty list elements (",,") are allowed by the #rule.
        loop {
            i = skip_lws(b, i);
            if i < b.len() && b[i] == b',' {
                i += 1;
            } else {
                break;
            }
        }
        if i >= b.len() {
            break;
        }
        let name_start = i;
        while i < b.len() && is_tchar(b[i]) {
            i += 1;
        }
        if i == name_start {
            return Err(DigestError::Syntax {
                reason: "expected a parameter name",
                offset: i,
            });
        }
        let name = &input[name_start..i];
        i = skip_lws(b, i);
        if i >= b.len() || b[i] != b'=' {
            return Err(DigestError::Syntax {
                reason: "expected '=' after a parameter name (several challenges in one value?)",
                offset: i,
            });
        }
        i = skip_lws(b, i + 1);
        let value = if i < b.len() && b[i] == b'"' {
            let (v, next) = parse_quoted(input, i)?;
            i = next;
            v
        } else {
            // A token; tolerate more than tchar (some peers send unquoted URIs), but
            // stop at what delimits items.
            let vs = i;
            while i < b.len() && !is_lws(b[i]) && b[i] != b',' && b[i] != b'"' {
                i += 1;
            }
            if i == vs {
                return Err(DigestError::Syntax {
                    reason: "expected a parameter value",
                    offset: i,
                });
            }
            input[vs..i].to_owned()
        };
        i = skip_lws(b, i);
        if i < b.len() && b[i] != b',' {
            return Err(DigestError::Syntax {
                reason: "expected ',' between parameters",
                offset: i,
            });
        }
        if params.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Err(DigestError::DuplicateParam(clip(name)));
        }
        params.push((name.to_owned(), value));
    }
    Ok(params)
}

fn skip_lws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_lws(b[i]) {
        i += 1;
    }
    i
}

/// Parses the quoted-string whose opening quote is at byte `open`, returning the
/// unescaped value and the index just past the closing quote.
fn parse_quoted(input: &str, open: usize) -> Result<(String, usize), DigestError> {
    let mut out = String::new();
    let mut chars = input[open + 1..].char_indices();
    while let Some((off, c)) = chars.next() {
        match c {
            '"' => return Ok((out, open + 1 + off + 1)),
            '\\' => match chars.next() {
                Some((_, e)) => out.push(e),
                None => break,
            },
            c => out.push(c),
        }
    }
    Err(DigestError::Syntax {
        reason: "unterminated quoted string",
        offset: input.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scoped_nonce_is_only_good_in_its_scope() {
        let auth = Authenticator::new(Duration::from_secs(60));
        let now = SystemTime::now();
        let ch = auth.challenge_scoped(now, "r", Algorithm::Md5, false, b"192.0.2.1");
        let creds = Credentials::answer(&ch, "REGISTER", "sip:r", "u", "p", "c", 1).unwrap();
        let ha1 = |_: &str, alg| Some(ha1(alg, "u", "r", "p"));
        assert_eq!(
            auth.verify_scoped(now, &creds, "REGISTER", "r", b"192.0.2.2", ha1),
            Err(AuthFailure::UnknownNonce)
        );
        assert_eq!(
            auth.verify(now, &creds, "REGISTER", "r", ha1),
            Err(AuthFailure::UnknownNonce)
        );
        assert_eq!(
            auth.verify_scoped(now, &creds, "REGISTER", "r", b"192.0.2.1", ha1),
            Ok(())
        );
    }

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    // RFC 2617 §3.5.
    #[test]
    fn rfc2617_example() {
        let h = ha1(
            Algorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
        );
        let r = compute_response(
            Algorithm::Md5,
            &h,
            "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            1,
            "0a4f113b",
            Some("auth"),
            "GET",
            "/dir/index.html",
        );
        assert_eq!(r, "6629fae49393a05397450978507c4ef1");
    }

    // RFC 7616 §3.9.1, both algorithms, through `answer` so the client path is covered.
    #[test]
    fn rfc7616_examples() {
        for (alg, want) in [
            (Algorithm::Md5, "8ca523f5e9506fed4657c9700eebdbec"),
            (
                Algorithm::Sha256,
                "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            ),
        ] {
            let ch = Challenge {
                realm: "http-auth@example.org".into(),
                nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v".into(),
                opaque: Some("FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS".into()),
                algorithm: alg,
                qop: vec![Qop::Auth, Qop::AuthInt],
                stale: false,
            };
            let c = Credentials::answer(
                &ch,
                "GET",
                "/dir/index.html",
                "Mufasa",
                "Circle of Life",
                "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
                1,
            )
            .unwrap();
            assert_eq!(c.response, want, "{alg}");
            assert_eq!(c.qop, Some(Qop::Auth));
            assert_eq!(c.nc, Some(1));
            assert_eq!(c.opaque, ch.opaque);
            assert_eq!(c.algorithm, alg);
            let h = ha1(alg, "Mufasa", "http-auth@example.org", "Circle of Life");
            assert_eq!(c.expected_response(&h.to_ascii_uppercase(), "GET"), want);
        }
    }

    #[test]
    fn rfc2069_form_without_qop() {
        let ch = Challenge::parse(r#"Digest realm="r", nonce="n""#).unwrap();
        assert!(ch.qop.is_empty());
        assert_eq!(ch.algorithm, Algorithm::Md5);
        let c = Credentials::answer(&ch, "REGISTER", "sip:r", "u", "p", "ignored", 7).unwrap();
        assert_eq!((c.qop, c.nc, c.cnonce.as_deref()), (None, None, None));
        let h = ha1(Algorithm::Md5, "u", "r", "p");
        let ha2 = Algorithm::Md5.hash_hex(&[b"REGISTER", b"sip:r"]);
        let want = Algorithm::Md5.hash_hex(&[h.as_bytes(), b"n", ha2.as_bytes()]);
        assert_eq!(c.response, want);
        assert!(!c.to_string().contains("qop"));
    }

    #[test]
    fn answer_refuses_auth_int_only_and_bad_values() {
        let mut ch = Challenge::parse(r#"Digest realm="r", nonce="n", qop="auth-int""#).unwrap();
        assert_eq!(ch.qop, vec![Qop::AuthInt]);
        assert!(matches!(
            Credentials::answer(&ch, "REGISTER", "sip:r", "u", "p", "c", 1),
            Err(DigestError::UnsupportedQop(_))
        ));
        ch.qop = vec![Qop::Auth];
        assert_eq!(
            Credentials::answer(&ch, "REGISTER", "sip:r", "u\r\nX: y", "p", "c", 1),
            Err(DigestError::InvalidValue("username"))
        );
        assert_eq!(
            Credentials::answer(&ch, "REGISTER", "sip:r", "u", "p", "", 1),
            Err(DigestError::InvalidValue("cnonce"))
        );
        assert!(matches!(
            Credentials::answer(&ch, "REGISTER", "sip:r", "u", "p", "c", 0),
            Err(DigestError::InvalidNonceCount(_))
        ));
        assert_eq!(
            Credentials::answer(&ch, "REG ISTER", "sip:r", "u", "p", "c", 1),
            Err(DigestError::InvalidValue("method"))
        );
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = HmacKey::new(b"Jefe").mac(&[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hmac_matches_rfc4231_case_6_and_a_key_serves_many_macs() {
        let key = HmacKey::new(&[0xaa; 131]);
        let data: &[u8] = b"Test Using Larger Than Block-Size Key - Hash Key First";
        let want = "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54";
        assert_eq!(hex::encode(key.mac(&[data])), want);
        assert_eq!(hex::encode(key.mac(&[&data[..10], &data[10..]])), want);
    }

    #[test]
    fn algorithm_names() {
        assert_eq!("md5".parse::<Algorithm>(), Ok(Algorithm::Md5));
        assert_eq!("sha-256".parse::<Algorithm>(), Ok(Algorithm::Sha256));
        for bad in ["MD5-sess", "SHA-256-sess", "SHA-512-256", "AKAv1-MD5", ""] {
            assert!(matches!(
                bad.parse::<Algorithm>(),
                Err(DigestError::UnsupportedAlgorithm(_))
            ));
        }
        assert!(matches!(
            Challenge::parse(r#"Digest realm="r", nonce="n", algorithm=MD5-sess"#),
            Err(DigestError::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn parses_asterisk_authorization() {
        let v = r#"Digest username="1000",realm="asterisk",nonce="1596563284/5a6b6fbc1dc1d4bbd76f06f9a55e7ff3",uri="sip:1000@pbx.example.com",response="9e5c2d1a3b0f4e6d8c7b6a5f4e3d2c1b",algorithm=MD5,cnonce="2c3b6d3c1f2e4a5b",qop=auth,nc=00000001"#;
        let c = Credentials::parse(v).unwrap();
        assert_eq!(c.username, "1000");
        assert_eq!(c.realm, "asterisk");
        assert_eq!(c.nonce, "1596563284/5a6b6fbc1dc1d4bbd76f06f9a55e7ff3");
        assert_eq!(c.uri, "sip:1000@pbx.example.com");
        assert_eq!(c.response, "9e5c2d1a3b0f4e6d8c7b6a5f4e3d2c1b");
        assert_eq!(c.algorithm, Algorithm::Md5);
        assert_eq!(c.cnonce.as_deref(), Some("2c3b6d3c1f2e4a5b"));
        assert_eq!(c.qop, Some(Qop::Auth));
        assert_eq!(c.nc, Some(1));
        assert_eq!(c.opaque, None);
        // Display then parse gives the same credentials.
        assert_eq!(Credentials::parse(&c.to_string()).unwrap(), c);
    }

    #[test]
    fn parses_asterisk_challenge() {
        // PJSIP writes the algorithm in lowercase.
        let v = r#"Digest realm="asterisk",nonce="1596563284/5a6b6fbc1dc1d4bbd76f06f9a55e7ff3",opaque="5d0a2c7f1bd4e0b7",algorithm=md5,qop="auth""#;
        let ch = Challenge::parse(v).unwrap();
        assert_eq!(ch.realm, "asterisk");
        assert_eq!(ch.opaque.as_deref(), Some("5d0a2c7f1bd4e0b7"));
        assert_eq!(ch.algorithm, Algorithm::Md5);
        assert_eq!(ch.qop, vec![Qop::Auth]);
        assert!(!ch.stale);
        assert_eq!(Challenge::parse(&ch.to_string()).unwrap(), ch);
    }

    #[test]
    fn parses_sipp_authorization() {
        // SIPp puts cnonce, nc and qop before nonce.
        let v = r#"Digest username="alice",realm="lifeline.test",cnonce="6b8b4567",nc=00000001,qop=auth,uri="sip:127.0.0.1:5060",nonce="0000018bcfe568000102030405060708",response="0123456789abcdef0123456789abcdef",algorithm=MD5"#;
        let c = Credentials::parse(v).unwrap();
        assert_eq!(c.username, "alice");
        assert_eq!(c.cnonce.as_deref(), Some("6b8b4567"));
        assert_eq!(c.nonce, "0000018bcfe568000102030405060708");
        assert_eq!(c.nc, Some(1));
        assert_eq!(c.uri, "sip:127.0.0.1:5060");
    }

    #[test]
    fn parses_escapes_and_odd_spacing() {
        let v = "  digest \r\n\t realm = \"a \\\"quoted\\\" realm\\\\x\" ,nonce=\"n\\x\",,  \
                 qop = \"auth , auth-int,token\" ,stale=TRUE , domain=\"sip:a sip:b\", \
                 algorithm = SHA-256 ,x-ext=1  ";
        let ch = Challenge::parse(v).unwrap();
        assert_eq!(ch.realm, "a \"quoted\" realm\\x");
        assert_eq!(ch.nonce, "nx");
        assert_eq!(ch.qop, vec![Qop::Auth, Qop::AuthInt]);
        assert!(ch.stale);
        assert_eq!(ch.algorithm, Algorithm::Sha256);
        let shown = ch.to_string();
        assert_eq!(
            shown,
            r#"Digest realm="a \"quoted\" realm\\x", nonce="nx", algorithm=SHA-256, qop="auth,auth-int", stale=true"#
        );
        assert_eq!(Challenge::parse(&shown).unwrap(), ch);
        // Unicode survives, and a lone unquoted qop token is accepted.
        let ch = Challenge::parse("Digest realm=\"réalm ☎\", nonce=abc, qop=auth").unwrap();
        assert_eq!(ch.realm, "réalm ☎");
        assert_eq!(ch.qop, vec![Qop::Auth]);
    }

    #[test]
    fn display_challenge_format() {
        let ch = Challenge {
            realm: "x".into(),
            nonce: "y".into(),
            opaque: Some("z".into()),
            algorithm: Algorithm::Sha256,
            qop: vec![Qop::Auth],
            stale: true,
        };
        assert_eq!(
            ch.to_string(),
            r#"Digest realm="x", nonce="y", opaque="z", algorithm=SHA-256, qop="auth", stale=true"#
        );
    }

    #[test]
    fn display_drops_control_characters() {
        let ch = Challenge {
            realm: "evil\r\nX-Injected: 1".into(),
            nonce: "n".into(),
            opaque: None,
            algorithm: Algorithm::Md5,
            qop: vec![],
            stale: false,
        };
        let s = ch.to_string();
        assert!(!s.contains('\r') && !s.contains('\n'), "{s}");
    }

    #[test]
    fn non_digest_schemes() {
        for v in [
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
            "Bearer abc",
            "Digestx realm=\"r\"",
        ] {
            assert!(
                matches!(Credentials::parse(v), Err(DigestError::NotDigest { .. })),
                "{v}"
            );
        }
        assert_eq!(
            Challenge::parse("NTLM"),
            Err(DigestError::NotDigest {
                scheme: "NTLM".into()
            })
        );
    }

    #[test]
    fn garbage_is_an_error() {
        let cases = [
            "",
            "   ",
            "Digest",
            "Digest ",
            "Digest realm",
            "Digest realm=",
            "Digest realm=\"unterminated",
            "Digest realm=\"x\\",
            "Digest =x",
            "Digest realm=\"r\" nonce=\"n\"",
            "Digest realm=\"r\", nonce=\"n\", Digest realm=\"s\", nonce=\"m\"",
            "Digest realm=\"r\", realm=\"s\", nonce=\"n\"",
            "Digest realm=\"r\", nonce=\"n\", qop=\"bogus\"",
            "Digest\"realm=\"r\"",
            ",,,",
            "\u{0}\u{1}\u{ff}",
            "Digest r\u{e9}alm=\"x\"",
            "Digest realm=\"r\", nonce=\"n\"\"",
        ];
        for v in cases {
            assert!(Challenge::parse(v).is_err(), "challenge {v:?}");
            assert!(Credentials::parse(v).is_err(), "credentials {v:?}");
        }
        let base = r#"Digest username="u", realm="r", nonce="n", uri="sip:x", response="00""#;
        assert!(Credentials::parse(base).is_ok());
        for (extra, want) in [
            (", nc=zz", "nc"),
            (", nc=123456789", "nc"),
            (", nc=+1", "nc"),
            (", qop=auth-conf", "qop"),
            (", userhash=true", "userhash"),
            (", username=\"v\"", "dup"),
        ] {
            let r = Credentials::parse(&format!("{base}{extra}"));
            let ok = matches!(
                (want, &r),
                ("nc", Err(DigestError::InvalidNonceCount(_)))
                    | ("qop", Err(DigestError::UnsupportedQop(_)))
                    | ("userhash", Err(DigestError::UserhashUnsupported))
                    | ("dup", Err(DigestError::DuplicateParam(_)))
            );
            assert!(ok, "{extra}: {r:?}");
        }
        assert_eq!(
            Credentials::parse(r#"Digest username="u", realm="r", nonce="n", uri="sip:x""#),
            Err(DigestError::MissingParam("response"))
        );
        assert_eq!(
            Challenge::parse(r#"Digest nonce="n""#),
            Err(DigestError::MissingParam("realm"))
        );
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC*") {
            let _ = Challenge::parse(&s);
            let _ = Credentials::parse(&s);
            let _ = Challenge::parse(&format!("Digest {s}"));
            let _ = Credentials::parse(&format!("Digest {s}"));
        }

        #[test]
        fn parsers_never_panic_on_near_misses(
            s in "[ \"\\\\,=a-z\r\n\t]{0,40}"
        ) {
            let _ = Challenge::parse(&format!("Digest realm={s}"));
            let _ = Credentials::parse(&format!("Digest username=\"{s}"));
        }

        #[test]
        fn challenge_display_round_trips(
            realm in "[^\\p{Cc}]{0,20}",
            nonce in "[^\\p{Cc}]{0,20}",
            opaque in proptest::option::of("[^\\p{Cc}]{0,20}"),
            sha in proptest::bool::ANY,
            stale in proptest::bool::ANY,
        ) {
            let ch = Challenge {
                realm,
                nonce,
                opaque,
                algorithm: if sha { Algorithm::Sha256 } else { Algorithm::Md5 },
                qop: vec![Qop::Auth],
                stale,
            };
            proptest::prop_assert_eq!(Challenge::parse(&ch.to_string()), Ok(ch));
        }
    }

    const REALM: &str = "lifeline.test";

    fn lookup(password: &'static str) -> impl FnOnce(&str, Algorithm) -> Option<String> {
        move |user, alg| (user == "alice").then(|| ha1(alg, user, REALM, password))
    }

    fn answer(ch: &Challenge, password: &str, nc: u32) -> Credentials {
        Credentials::answer(
            ch,
            "REGISTER",
            "sip:lifeline.test",
            "alice",
            password,
            "c0ffee",
            nc,
        )
        .unwrap()
    }

    #[test]
    fn server_round_trip_replay_and_counting() {
        let auth = Authenticator::new(Duration::from_secs(300));
        let ch = auth.challenge(t0(), REALM, Algorithm::Md5, false);
        assert_eq!(ch.qop, vec![Qop::Auth]);
        assert_eq!(ch.nonce.len(), 64);
        // Through the wire format, as a real exchange would go.
        let ch = Challenge::parse(&ch.to_string()).unwrap();
        let c1 = Credentials::parse(&answer(&ch, "secret", 1).to_string()).unwrap();
        let now = t0() + Duration::from_secs(10);
        assert_eq!(
            auth.verify(now, &c1, "REGISTER", REALM, lookup("secret")),
            Ok(())
        );
        assert_eq!(
            auth.verify(now, &c1, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::Replay)
        );
        let c2 = answer(&ch, "secret", 2);
        assert_eq!(
            auth.verify(now, &c2, "REGISTER", REALM, lookup("secret")),
            Ok(())
        );
        // Skipping counts is fine; going back is not.
        let c5 = answer(&ch, "secret", 5);
        assert_eq!(
            auth.verify(now, &c5, "REGISTER", REALM, lookup("secret")),
            Ok(())
        );
        let c4 = answer(&ch, "secret", 4);
        assert_eq!(
            auth.verify(now, &c4, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::Replay)
        );
        assert_eq!(AuthFailure::Replay.rechallenge(), Some(false));
        // The method is covered by the response.
        let c6 = answer(&ch, "secret", 6);
        assert_eq!(
            auth.verify(now, &c6, "INVITE", REALM, lookup("secret")),
            Err(AuthFailure::BadResponse)
        );
    }

    #[test]
    fn two_clients_same_instant_do_not_collide() {
        let auth = Authenticator::new(Duration::from_secs(300));
        let a = auth.challenge(t0(), REALM, Algorithm::Md5, false);
        let b = auth.challenge(t0(), REALM, Algorithm::Md5, false);
        assert_ne!(a.nonce, b.nonce);
        for ch in [&a, &b] {
            let c = answer(ch, "secret", 1);
            assert_eq!(
                auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
                Ok(())
            );
        }
    }

    #[test]
    fn stale_only_with_right_response() {
        let life = Duration::from_secs(60);
        let auth = Authenticator::new(life);
        let ch = auth.challenge(t0(), REALM, Algorithm::Md5, false);
        let late = t0() + life;
        let good = answer(&ch, "secret", 1);
        assert_eq!(
            auth.verify(late, &good, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::Stale)
        );
        assert_eq!(AuthFailure::Stale.rechallenge(), Some(true));
        let bad = answer(&ch, "wrong", 1);
        assert_eq!(
            auth.verify(late, &bad, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::BadResponse)
        );
        // Just inside the lifetime it is fine.
        let inside = t0() + life - Duration::from_millis(1);
        assert_eq!(
            auth.verify(inside, &good, "REGISTER", REALM, lookup("secret")),
            Ok(())
        );
        // A clock that stepped back by more than a lifetime also makes it stale.
        let good2 = answer(&ch, "secret", 2);
        let before = t0() - life - Duration::from_secs(1);
        assert_eq!(
            auth.verify(before, &good2, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::Stale)
        );
        // And the re-challenge says so on the wire.
        let again = auth.challenge(late, REALM, Algorithm::Md5, true);
        assert!(again.to_string().ends_with(", stale=true"));
    }

    #[test]
    fn wrong_password_unknown_user_and_realm() {
        let auth = Authenticator::new(Duration::from_secs(300));
        let ch = auth.challenge(t0(), REALM, Algorithm::Md5, false);
        let bad = answer(&ch, "wrong", 1);
        assert_eq!(
            auth.verify(t0(), &bad, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::BadResponse)
        );
        assert_eq!(AuthFailure::BadResponse.rechallenge(), None);
        let mut c = answer(&ch, "secret", 1);
        c.username = "mallory".into();
        assert_eq!(
            auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::UnknownUser)
        );
        let c = answer(&ch, "secret", 1);
        assert_eq!(
            auth.verify(t0(), &c, "REGISTER", "other.realm", lookup("secret")),
            Err(AuthFailure::RealmMismatch)
        );
        // A failed attempt does not consume the nonce count.
        assert_eq!(
            auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Ok(())
        );
    }

    #[test]
    fn tampered_or_foreign_nonce_is_not_ours() {
        let auth = Authenticator::new(Duration::from_secs(300));
        let ch = auth.challenge(t0(), REALM, Algorithm::Md5, false);
        // Flip one hex digit in each part: time, salt, MAC.
        for pos in [3, 20, 50] {
            let mut forged = ch.clone();
            let mut bytes = forged.nonce.into_bytes();
            bytes[pos] = if bytes[pos] == b'0' { b'1' } else { b'0' };
            forged.nonce = String::from_utf8(bytes).unwrap();
            let c = answer(&forged, "secret", 1);
            assert_eq!(
                auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
                Err(AuthFailure::UnknownNonce),
                "pos {pos}"
            );
        }
        for nonce in [
            "",
            "xyz",
            &"g".repeat(64),
            &ch.nonce[..62],
            &format!("{}00", ch.nonce),
        ] {
            let mut forged = ch.clone();
            forged.nonce = nonce.to_owned();
            let c = answer(&forged, "secret", 1);
            assert_eq!(
                auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
                Err(AuthFailure::UnknownNonce),
                "{nonce:?}"
            );
        }
        // Another authenticator (another secret) did not issue it.
        let other = Authenticator::new(Duration::from_secs(300));
        let c = answer(&ch, "secret", 1);
        assert_eq!(
            other.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::UnknownNonce)
        );
        // A nonce for another realm does not transfer, even if the user exists there too.
        let elsewhere = auth.challenge(t0(), "elsewhere", Algorithm::Md5, false);
        let mut c = Credentials::answer(&elsewhere, "REGISTER", "sip:x", "alice", "secret", "c", 1)
            .unwrap();
        c.realm = REALM.into();
        c.response =
            c.expected_response(&ha1(Algorithm::Md5, "alice", REALM, "secret"), "REGISTER");
        assert_eq!(
            auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::UnknownNonce)
        );
        assert_eq!(AuthFailure::UnknownNonce.rechallenge(), Some(false));
    }

    #[test]
    fn shared_secret_works_across_instances() {
        let secret = [7u8; 32];
        let a = Authenticator::with_secret(secret, Duration::from_secs(300));
        let b = Authenticator::with_secret(secret, Duration::from_secs(300));
        let ch = a.challenge(t0(), REALM, Algorithm::Md5, false);
        let c = answer(&ch, "secret", 1);
        assert_eq!(
            b.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Ok(())
        );
        assert!(!format!("{a:?}").contains("7, 7"));
    }

    #[test]
    fn sha256_round_trip_and_no_downgrade() {
        let auth = Authenticator::new(Duration::from_secs(300));
        let ch = auth.challenge(t0(), REALM, Algorithm::Sha256, false);
        assert!(ch.to_string().contains("algorithm=SHA-256"));
        let c = answer(&Challenge::parse(&ch.to_string()).unwrap(), "secret", 1);
        assert_eq!(c.algorithm, Algorithm::Sha256);
        assert_eq!(c.response.len(), 64);
        let mut asked = None;
        let r = auth.verify(t0(), &c, "REGISTER", REALM, |u, alg| {
            asked = Some(alg);
            lookup("secret")(u, alg)
        });
        assert_eq!(r, Ok(()));
        assert_eq!(asked, Some(Algorithm::Sha256));
        // Answering a SHA-256 nonce with MD5 (a downgrade by a man in the middle) fails.
        let mut down = ch.clone();
        down.algorithm = Algorithm::Md5;
        let c = answer(&down, "secret", 1);
        assert_eq!(
            auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::UnknownNonce)
        );
    }

    #[test]
    fn rfc2069_credentials_accepted_while_fresh() {
        let life = Duration::from_secs(60);
        let auth = Authenticator::new(life);
        let mut ch = auth.challenge(t0(), REALM, Algorithm::Md5, false);
        ch.qop.clear();
        let c = answer(&ch, "secret", 1);
        assert_eq!(c.qop, None);
        // Without a nonce count there is nothing to replay-check: reuse is accepted...
        assert_eq!(
            auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Ok(())
        );
        assert_eq!(
            auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Ok(())
        );
        // ...until the nonce expires.
        assert_eq!(
            auth.verify(t0() + life, &c, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::Stale)
        );
    }

    #[test]
    fn qop_credentials_need_nc_and_cnonce_and_auth() {
        let auth = Authenticator::new(Duration::from_secs(300));
        let ch = auth.challenge(t0(), REALM, Algorithm::Md5, false);
        let good = answer(&ch, "secret", 1);
        let mut c = good.clone();
        c.nc = None;
        assert_eq!(
            auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::MissingParam("nc"))
        );
        let mut c = good.clone();
        c.cnonce = None;
        assert_eq!(
            auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::MissingParam("cnonce"))
        );
        let mut c = good.clone();
        c.qop = Some(Qop::AuthInt);
        assert_eq!(
            auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::UnsupportedQop)
        );
        // nc=0 with a correct response is never accepted.
        let ch0 = auth.challenge(t0(), REALM, Algorithm::Md5, false);
        let mut c = answer(&ch0, "secret", 1);
        c.nc = Some(0);
        c.response =
            c.expected_response(&ha1(Algorithm::Md5, "alice", REALM, "secret"), "REGISTER");
        assert_eq!(
            auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::Replay)
        );
    }

    #[test]
    fn opaque_is_issued_and_required() {
        let auth = Authenticator::new(Duration::from_secs(300)).with_opaque("op4que");
        let ch = auth.challenge(t0(), REALM, Algorithm::Md5, false);
        assert_eq!(ch.opaque.as_deref(), Some("op4que"));
        let mut c = answer(&ch, "secret", 1);
        assert_eq!(c.opaque.as_deref(), Some("op4que"));
        c.opaque = None;
        assert_eq!(
            auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Err(AuthFailure::UnknownNonce)
        );
        c.opaque = Some("op4que".into());
        assert_eq!(
            auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret")),
            Ok(())
        );
    }

    #[test]
    fn replay_table_stays_bounded_and_safe() {
        let life = Duration::from_secs(60);
        let auth = Authenticator::new(life).with_max_tracked_nonces(16);
        let table_len = |a: &Authenticator| a.replay.lock().unwrap().seen.len();
        // Fill it with live nonces issued a millisecond apart, each used once.
        let mut used = Vec::new();
        for i in 0..40u64 {
            let at = t0() + Duration::from_millis(i);
            let ch = auth.challenge(at, REALM, Algorithm::Md5, false);
            let c = answer(&ch, "secret", 1);
            assert_eq!(
                auth.verify(at, &c, "REGISTER", REALM, lookup("secret")),
                Ok(())
            );
            assert!(table_len(&auth) <= 16);
            used.push(c);
        }
        // A forgotten nonce cannot be replayed: it is stale (or, if still tracked, a replay).
        let now = t0() + Duration::from_millis(40);
        for c in &used {
            let r = auth.verify(now, c, "REGISTER", REALM, lookup("secret"));
            assert!(
                matches!(r, Err(AuthFailure::Stale | AuthFailure::Replay)),
                "{r:?}"
            );
        }
        // Expired nonces are dropped before live ones are forgotten.
        let later = t0() + life + Duration::from_secs(1);
        let ch = auth.challenge(later, REALM, Algorithm::Md5, false);
        for nc in 1..=3 {
            let c = answer(&ch, "secret", nc);
            assert_eq!(
                auth.verify(later, &c, "REGISTER", REALM, lookup("secret")),
                Ok(())
            );
        }
        assert!(table_len(&auth) <= 16);
    }

    #[test]
    fn verify_from_many_threads() {
        let auth = std::sync::Arc::new(Authenticator::new(Duration::from_secs(300)));
        let ch = auth.challenge(t0(), REALM, Algorithm::Md5, false);
        // Eight threads race to use the same nonce counts: each count is accepted once.
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let auth = auth.clone();
                let ch = ch.clone();
                std::thread::spawn(move || {
                    (1..=50)
                        .filter(|&nc| {
                            let c = answer(&ch, "secret", nc);
                            auth.verify(t0(), &c, "REGISTER", REALM, lookup("secret"))
                                .is_ok()
                        })
                        .count()
                })
            })
            .collect();
        let accepted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        // Each count is accepted at most once; counts only go up, so a thread that lost a
        // race may find later counts already passed.
        assert!((1..=50).contains(&accepted), "{accepted}");
    }
}
