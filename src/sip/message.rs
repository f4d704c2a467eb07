//! SIP messages: parsing received bytes, the header index, the few headers routing needs, and
//! serializing (forwarded headers stay byte-exact; new and edited ones are written cleanly).
//!
//! Parsing is lenient where RFC 3261 and real PBXs need it (compact names, folding, any case,
//! white space around separators, RFC 2543 messages) and strict where a wrong guess would
//! mis-route a call (duplicate single-value headers, bad Content-Length, malformed Via,
//! From, To, CSeq). Headers not needed for routing are indexed but never parsed.

use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use super::syntax::{self, Params, SyntaxError, is_lws, is_token, skip_lws};
use super::uri::{Host, NameAddr, Uri, split_hostport};

/// The largest message accepted, head and body together.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The magic cookie of RFC 3261 branches (§8.1.1.7).
pub const BRANCH_MAGIC: &str = "z9hG4bK";

// === Methods ===

/// A request method. Methods are case-sensitive (RFC 3261 §7.1): `invite` is an unknown method.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Options,
    Register,
    Prack,
    Subscribe,
    Notify,
    Publish,
    Info,
    Refer,
    Message,
    Update,
    /// Any other method token, kept verbatim.
    Other(ByteString),
}

impl Method {
    /// Maps a method token; unknown tokens become `Other`.
    pub fn from_token(s: &ByteString) -> Method {
        match &s[..] {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "OPTIONS" => Method::Options,
            "REGISTER" => Method::Register,
            "PRACK" => Method::Prack,
            "SUBSCRIBE" => Method::Subscribe,
            "NOTIFY" => Method::Notify,
            "PUBLISH" => Method::Publish,
            "INFO" => Method::Info,
            "REFER" => Method::Refer,
            "MESSAGE" => Method::Message,
            "UPDATE" => Method::Update,
            _ => Method::Other(s.clone()),
        }
    }

    /// The method token.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Options => "OPTIONS",
            Method::Register => "REGISTER",
            Method::Prack => "PRACK",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Publish => "PUBLISH",
            Method::Info => "INFO",
            Method::Refer => "REFER",
            Method::Message => "MESSAGE",
            Method::Update => "UPDATE",
            Method::Other(s) => s,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === Header names ===

/// A header name: the ones this element reads or writes, and all others verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    MaxForwards,
    Contact,
    ContentLength,
    ContentType,
    Route,
    RecordRoute,
    Expires,
    MinExpires,
    Require,
    ProxyRequire,
    Supported,
    Unsupported,
    Allow,
    Authorization,
    ProxyAuthorization,
    WwwAuthenticate,
    ProxyAuthenticate,
    Server,
    UserAgent,
    Date,
    RetryAfter,
    Timestamp,
    /// Any other header, its name as written.
    Other(ByteString),
}

impl HeaderName {
    /// Maps a header name, case-insensitively, compact forms included (RFC 3261 §7.3.3).
    pub fn parse(name: &ByteString) -> HeaderName {
        HeaderName::known(name.as_bytes()).unwrap_or_else(|| HeaderName::Other(name.clone()))
    }

    /// The header a name denotes, unless it is one this element does not know.
    fn known(name: &[u8]) -> Option<HeaderName> {
        if let [c] = name {
            return Some(match c.to_ascii_lowercase() {
                b'v' => HeaderName::Via,
                b'f' => HeaderName::From,
                b't' => HeaderName::To,
                b'i' => HeaderName::CallId,
                b'm' => HeaderName::Contact,
                b'l' => HeaderName::ContentLength,
                b'c' => HeaderName::ContentType,
                b'k' => HeaderName::Supported,
                _ => return None,
            });
        }
        // By length first: one or two comparisons per name instead of a walk of them all.
        let candidates: &[HeaderName] = match name.len() {
            2 => &[HeaderName::To],
            3 => &[HeaderName::Via],
            4 => &[HeaderName::From, HeaderName::CSeq, HeaderName::Date],
            5 => &[HeaderName::Route, HeaderName::Allow],
            6 => &[HeaderName::Server],
            7 => &[
                HeaderName::CallId,
                HeaderName::Contact,
                HeaderName::Expires,
                HeaderName::Require,
            ],
            9 => &[HeaderName::Supported, HeaderName::Timestamp],
            10 => &[HeaderName::UserAgent],
            11 => &[
                HeaderName::MinExpires,
                HeaderName::Unsupported,
                HeaderName::RetryAfter,
            ],
            12 => &[
                HeaderName::MaxForwards,
                HeaderName::RecordRoute,
                HeaderName::ContentType,
            ],
            13 => &[HeaderName::ProxyRequire, HeaderName::Authorization],
            14 => &[HeaderName::ContentLength],
            16 => &[HeaderName::WwwAuthenticate],
            18 => &[HeaderName::ProxyAuthenticate],
            19 => &[HeaderName::ProxyAuthorization],
            _ => &[],
        };
        candidates
            .iter()
            .find(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
            .cloned()
    }

    /// The name written for a header this element creates.
    pub fn as_str(&self) -> &str {
        match self {
            HeaderName::Via => "Via",
            HeaderName::From => "From",
            HeaderName::To => "To",
            HeaderName::CallId => "Call-ID",
            HeaderName::CSeq => "CSeq",
            HeaderName::MaxForwards => "Max-Forwards",
            HeaderName::Contact => "Contact",
            HeaderName::ContentLength => "Content-Length",
            HeaderName::ContentType => "Content-Type",
            HeaderName::Route => "Route",
            HeaderName::RecordRoute => "Record-Route",
            HeaderName::Expires => "Expires",
            HeaderName::MinExpires => "Min-Expires",
            HeaderName::Require => "Require",
            HeaderName::ProxyRequire => "Proxy-Require",
            HeaderName::Supported => "Supported",
            HeaderName::Unsupported => "Unsupported",
            HeaderName::Allow => "Allow",
            HeaderName::Authorization => "Authorization",
            HeaderName::ProxyAuthorization => "Proxy-Authorization",
            HeaderName::WwwAuthenticate => "WWW-Authenticate",
            HeaderName::ProxyAuthenticate => "Proxy-Authenticate",
            HeaderName::Server => "Server",
            HeaderName::UserAgent => "User-Agent",
            HeaderName::Date => "Date",
            HeaderName::RetryAfter => "Retry-After",
            HeaderName::Timestamp => "Timestamp",
            HeaderName::Other(n) => n,
        }
    }

    /// Whether two names denote the same header (case-insensitive for unknown ones).
    pub fn is(&self, other: &HeaderName) -> bool {
        match (self, other) {
            (HeaderName::Other(a), HeaderName::Other(b)) => a.eq_ignore_ascii_case(b),
            _ => self == other,
        }
    }
}

/// One header line (folds included) of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: HeaderName,
    /// The whole line(s) as received, CRLF included, when `raw`; else the value alone (once
    /// edited, or when created here). One buffer either way: a copy of the header costs one
    /// reference count.
    bytes: Bytes,
    /// Where the value is in `bytes`: with surrounding white space trimmed, folds kept.
    value: std::ops::Range<u32>,
    raw: bool,
}

impl Header {
    /// A header created by this element.
    pub fn new(name: HeaderName, value: impl Into<Bytes>) -> Header {
        let bytes = value.into();
        Header {
            name,
            value: 0..bytes.len() as u32,
            bytes,
            raw: false,
        }
    }

    /// The value, with surrounding white space trimmed; folds inside are kept.
    pub fn value(&self) -> &[u8] {
        &self.bytes[self.value_range()]
    }

    fn value_range(&self) -> std::ops::Range<usize> {
        self.value.start as usize..self.value.end as usize
    }

    /// The value as text (lossy for the rare non-UTF-8 octets).
    pub fn value_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.value())
    }

    fn text(&self) -> ByteString {
        match ByteString::try_from(self.bytes.slice(self.value_range())) {
            Ok(s) => s,
            Err(_) => ByteString::from(String::from_utf8_lossy(self.value()).into_owned()),
        }
    }

    fn write_to(&self, out: &mut BytesMut) {
        match self.raw {
            true => out.put_slice(&self.bytes),
            false => {
                let value = self.value();
                out.put_slice(self.name.as_str().as_bytes());
                out.put_slice(b": ");
                if value.iter().any(|&b| b == b'\r' || b == b'\n') {
                    // Unfold: each fold becomes one space (RFC 3261 §7.3.1).
                    let mut in_fold = false;
                    for &b in value {
                        if is_lws(b) && (in_fold || b == b'\r' || b == b'\n') {
                            if !in_fold {
                                out.put_u8(b' ');
                            }
                            in_fold = true;
                        } else {
                            in_fold = false;
                            out.put_u8(b);
                        }
                    }
                } else {
                    out.put_slice(value);
                }
                out.put_slice(b"\r\n");
            }
        }
    }
}

// === Via, CSeq ===

/// One Via value (RFC 3261 §20.42).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// The transport token as written (`UDP`, `TCP`, `TLS`, `SCTP`, or anything else).
    pub transport: ByteString,
    pub host: Host,
    pub port: Option<u16>,
    pub params: Params,
}

impl Via {
    /// Parses one Via value: `SIP / 2.0 / UDP host:port ;params`, white space allowed around
    /// the slashes and separators.
    pub fn parse(value: &ByteString) -> Result<Via, SyntaxError> {
        let s = value.as_bytes();
        let mut i = skip_lws(s, 0);
        let mut fields = [(0usize, 0usize); 3];
        for (n, field) in fields.iter_mut().enumerate() {
            if n > 0 {
                if i >= s.len() || s[i] != b'/' {
                    return Err("Via: expected '/'");
                }
                i = skip_lws(s, i + 1);
            }
            let start = i;
            while i < s.len() && is_token(s[i]) {
                i += 1;
            }
            if i == start {
                return Err("Via: empty protocol field");
            }
            *field = (start, i);
            i = skip_lws(s, i);
        }
        let name = &value[fields[0].0..fields[0].1];
        let version = &value[fields[1].0..fields[1].1];
        if !name.eq_ignore_ascii_case("SIP") || version != "2.0" {
            return Err("Via: not SIP/2.0");
        }
        let transport = value.slice_ref(&value[fields[2].0..fields[2].1]);
        let host_start = i;
        while i < s.len() && !is_lws(s[i]) && s[i] != b';' {
            i += 1;
        }
        let (host, port) = split_hostport(&value[host_start..i])?;
        let rest = value.slice_ref(&value[i..]);
        let (params, used) = syntax::parse_params(&rest, b"")?;
        if used != rest.len() {
            return Err("Via: junk after parameters");
        }
        Ok(Via {
            transport,
            host,
            port,
            params,
        })
    }

    /// The `branch` parameter.
    pub fn branch(&self) -> Option<&str> {
        self.params.value("branch")
    }

    /// The branch when it is an RFC 3261 one (magic cookie and something after it).
    pub fn rfc3261_branch(&self) -> Option<&str> {
        self.branch()
            .filter(|b| b.len() > BRANCH_MAGIC.len() && b.starts_with(BRANCH_MAGIC))
    }

    /// The `received` address, when valid.
    pub fn received(&self) -> Option<IpAddr> {
        self.params
            .value("received")
            .and_then(|r| r.trim_matches(['[', ']']).parse().ok())
    }

    /// `rport`: `Some(None)` when asked for (no value), `Some(Some(p))` when filled in.
    pub fn rport(&self) -> Option<Option<u16>> {
        self.params
            .get("rport")
            .map(|v| v.and_then(|p| p.parse().ok()))
    }

    /// Where a response to this Via is sent (RFC 3261 §18.2.2, RFC 3581) when the request's
    /// connection is gone or the transport is UDP: the received address and rport, else the
    /// sent-by; `default_port` is that of the transport the response will use. `maddr` is not
    /// honoured: multicast is not served.
    pub fn response_host_port(&self, default_port: u16) -> (Host, u16) {
        let host = self.received().map(Host::from).unwrap_or(self.host.clone());
        let default = default_port;
        let port = match self.rport() {
            Some(Some(p)) => p,
            _ => self.port.unwrap_or(default),
        };
        (host, port)
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} {}", self.transport, self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        let mut params = String::new();
        self.params.write_to(&mut params);
        f.write_str(&params)
    }
}

/// The CSeq header: sequence number and method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    pub seq: u32,
    pub method: Method,
}

impl CSeq {
    fn parse(value: &ByteString) -> Result<CSeq, SyntaxError> {
        let v = syntax::trim_lws(value);
        let split = v
            .find(|c: char| c.is_ascii() && is_lws(c as u8))
            .ok_or("CSeq: no method")?;
        let num = &v[..split];
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            return Err("CSeq: bad number");
        }
        // Leading zeros are legal (`0009`); more than 2^32-1 is not (RFC 3261 §8.1.1.5).
        let seq = num.parse::<u32>().map_err(|_| "CSeq: number too large")?;
        let method = syntax::trim_lws(&v[split..]);
        if !syntax::is_token_str(method) {
            return Err("CSeq: bad method");
        }
        Ok(CSeq {
            seq,
            method: Method::from_token(&value.slice_ref(method)),
        })
    }
}

impl fmt::Display for CSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.seq, self.method)
    }
}

// === Messages ===

/// The first line of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    Request { method: Method, uri: Uri },
    Response { code: u16, reason: Bytes },
}

/// Why a message could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ParseError {
    /// What was wrong, for the log and the 400's reason phrase.
    pub reason: &'static str,
    /// The status a request deserves: 400, 505 (unknown SIP version) or, for an unknown method
    /// whose CSeq disagrees, 501.
    pub status: u16,
    /// What could be read of a request, to build that answer; `None` when no answer can be
    /// formed (responses, unreadable start lines).
    pub request: Option<Box<RawRequest>>,
}

/// The readable part of a rejected request: enough to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRequest {
    pub method: ByteString,
    pub headers: Vec<Header>,
}

impl RawRequest {
    /// Builds the error response for this request: Via, From, To, Call-ID and CSeq copied as
    /// far as they were present (RFC 3261 §8.2.6), a To tag added when To is there.
    pub fn error_response(&self, code: u16, reason: &str, to_tag: &str) -> Bytes {
        let mut out = BytesMut::with_capacity(512);
        let _ = write!(StrOut(&mut out), "SIP/2.0 {code} {reason}\r\n");
        for h in &self.headers {
            match h.name {
                HeaderName::Via | HeaderName::From | HeaderName::CallId | HeaderName::CSeq => {
                    h.write_to(&mut out)
                }
                HeaderName::To => {
                    out.put_slice(b"To: ");
                    out.put_slice(h.value());
                    let has_tag = NameAddr::parse(&h.text()).is_ok_and(|n| n.tag().is_some());
                    if !has_tag {
                        out.put_slice(b";tag=");
                        out.put_slice(to_tag.as_bytes());
                    }
                    out.put_slice(b"\r\n");
                }
                _ => {}
            }
        }
        out.put_slice(b"Content-Length: 0\r\n\r\n");
        out.freeze()
    }

    /// The top Via, when it can be read (to route the error response).
    pub fn top_via(&self) -> Option<Via> {
        let h = self.headers.iter().find(|h| h.name == HeaderName::Via)?;
        let first = syntax::split_commas(&h.text()).ok()?.into_iter().next()?;
        Via::parse(&first).ok()
    }
}

/// Writes formatted text into a byte buffer.
struct StrOut<'a>(&'a mut BytesMut);

impl fmt::Write for StrOut<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}

/// A parsed SIP request or response.
///
/// The routing headers are parsed once, on receipt; every header keeps its received bytes so
/// that a forwarded message changes only what this element edits.
///
/// A clone shares the parsed message (transactions keep a copy of what they handle); the first
/// edit of a shared one copies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message(Arc<Parts>);

/// What a [`Message`] holds; only its own methods see inside.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    start: StartLine,
    /// The Request-URI as received, written back unless the URI is replaced.
    raw_uri: Option<ByteString>,
    headers: Vec<Header>,
    body: Bytes,
    vias: Vec<Via>,
    cseq: CSeq,
    call_id: ByteString,
    from: NameAddr,
    to: NameAddr,
    max_forwards: Option<u32>,
}

impl std::ops::Deref for Message {
    type Target = Parts;

    fn deref(&self) -> &Parts {
        &self.0
    }
}

impl std::ops::DerefMut for Message {
    /// Copies the message first when it is shared.
    fn deref_mut(&mut self) -> &mut Parts {
        Arc::make_mut(&mut self.0)
    }
}

impl Message {
    /// Parses one whole message: a UDP datagram, or a frame cut by [`stream_frame`].
    /// Octets after the body that Content-Length announces are ignored (RFC 4475 §3.1.1.8);
    /// without Content-Length the body is the rest of the datagram.
    pub fn parse(buf: Bytes) -> Result<Message, ParseError> {
        if buf.len() > MAX_MESSAGE {
            return Err(fail("message too large", None));
        }
        // Leading CRLFs are ignored (RFC 3261 §7.5).
        let start = buf
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(buf.len());
        let (line_end, next) = line_at(&buf, start).ok_or_else(|| fail("no start line", None))?;
        let line = &buf[start..line_end];
        let start_line = match parse_start_line(line) {
            Ok(l) => l,
            Err(e) => return Err(answerable(e, line, &buf, next)),
        };
        let method_token = match &start_line {
            Parsed::Request { method, .. } => Some(method.clone()),
            _ => None,
        };

        let (headers, body_start) = match index_headers(&buf, next) {
            Ok(v) => v,
            Err(reason) => {
                return Err(fail(reason, None));
            }
        };
        let raw_request = |headers: &[Header]| {
            method_token.as_ref().map(|m| {
                Box::new(RawRequest {
                    method: m.clone(),
                    headers: headers.to_vec(),
                })
            })
        };
        let bad = |reason: &'static str, status: u16| ParseError {
            reason,
            status,
            request: raw_request(&headers),
        };

        let (start, raw_uri) = match start_line {
            Parsed::Request {
                method,
                uri,
                version_ok,
            } => {
                if !version_ok {
                    return Err(bad("SIP version not supported", 505));
                }
                let raw = ByteString::try_from(buf.slice_ref(uri))
                    .map_err(|_| bad("Request-URI is not UTF-8", 400))?;
                let parsed = Uri::parse(&raw).map_err(|e| bad(e, 400))?;
                // Escaped headers belong in a Contact, never in a Request-URI (RFC 4475 §3.1.2.11).
                if parsed.as_sip().is_some_and(|u| u.headers.is_some()) {
                    return Err(bad("Request-URI carries headers", 400));
                }
                (
                    StartLine::Request {
                        method: Method::from_token(&method),
                        uri: parsed,
                    },
                    Some(raw),
                )
            }
            Parsed::Response { code, reason } => (
                StartLine::Response {
                    code,
                    reason: buf.slice_ref(reason),
                },
                None,
            ),
        };

        let core = parse_core(&headers).map_err(|r| bad(r, 400))?;
        let body = match core.content_length {
            Some(len) => {
                if body_start + len > buf.len() {
                    return Err(bad("Content-Length larger than the message", 400));
                }
                buf.slice(body_start..body_start + len)
            }
            None => buf.slice(body_start.min(buf.len())..),
        };

        if let StartLine::Request { method, .. } = &start
            && core.cseq.method != *method
        {
            let status = if matches!(method, Method::Other(_)) {
                501
            } else {
                400
            };
            return Err(bad("CSeq method does not match the request", status));
        }
        Ok(Message(Arc::new(Parts {
            start,
            raw_uri,
            headers,
            body,
            vias: core.vias,
            cseq: core.cseq,
            call_id: core.call_id,
            from: core.from,
            to: core.to,
            max_forwards: core.max_forwards,
        })))
    }

    /// The start line.
    pub fn start(&self) -> &StartLine {
        &self.start
    }

    /// The method of a request, or of the request a response answers (from CSeq).
    pub fn method(&self) -> &Method {
        match &self.start {
            StartLine::Request { method, .. } => method,
            StartLine::Response { .. } => &self.cseq.method,
        }
    }

    /// Whether this is a request.
    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    /// The status code of a response.
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code, .. } => Some(code),
            StartLine::Request { .. } => None,
        }
    }

    /// The Request-URI of a request.
    pub fn uri(&self) -> Option<&Uri> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(uri),
            StartLine::Response { .. } => None,
        }
    }

    /// Replaces the Request-URI.
    pub fn set_uri(&mut self, new: Uri) {
        if let StartLine::Request { uri, .. } = &mut self.start {
            *uri = new;
            self.raw_uri = None;
        }
    }

    /// All Via values, top first.
    pub fn vias(&self) -> &[Via] {
        &self.vias
    }

    /// The top Via (every parsed message has one).
    pub fn top_via(&self) -> &Via {
        &self.vias[0]
    }

    pub fn cseq(&self) -> &CSeq {
        &self.cseq
    }

    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    pub fn from(&self) -> &NameAddr {
        &self.from
    }

    pub fn to(&self) -> &NameAddr {
        &self.to
    }

    /// Max-Forwards, if present.
    pub fn max_forwards(&self) -> Option<u32> {
        self.max_forwards
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Every header in order.
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// The first header called `name`.
    pub fn header(&self, name: &HeaderName) -> Option<&Header> {
        self.headers.iter().find(|h| h.name.is(name))
    }

    /// Every value of a header that may be repeated or comma-joined (Route, Contact, Require…),
    /// in order, trimmed.
    pub fn header_values(&self, name: &HeaderName) -> Result<Vec<ByteString>, SyntaxError> {
        let mut out = Vec::new();
        for h in self.headers.iter().filter(|h| h.name.is(name)) {
            out.extend(syntax::split_commas(&h.text())?);
        }
        Ok(out)
    }

    /// Every comma-separated token of a header such as Require or Supported.
    pub fn header_tokens(&self, name: &HeaderName) -> Vec<String> {
        self.headers
            .iter()
            .filter(|h| h.name.is(name))
            .flat_map(|h| {
                h.value_str()
                    .split(',')
                    .map(|t| syntax::trim_lws(t).to_string())
                    .filter(|t| !t.is_empty())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Parses the name-addr values of Contact, Route or Record-Route.
    pub fn name_addrs(&self, name: &HeaderName) -> Result<Vec<NameAddr>, SyntaxError> {
        self.header_values(name)?
            .iter()
            .map(NameAddr::parse)
            .collect()
    }

    /// The transaction key of RFC 3261 §17.2.3 for a request (branch with the magic cookie),
    /// or `None` for an RFC 2543 request that needs the older matching.
    pub fn branch(&self) -> Option<&str> {
        self.top_via().rfc3261_branch()
    }

    // --- editing ---

    /// Adds a header after the existing ones (before the body).
    pub fn push_header(&mut self, header: Header) {
        self.headers.push(header);
    }

    /// Inserts a header at the top (used for Via and Record-Route).
    pub fn insert_header_first(&mut self, header: Header) {
        self.headers.insert(0, header);
    }

    /// Removes every header called `name`.
    pub fn remove_headers(&mut self, name: &HeaderName) {
        debug_assert!(
            !matches!(
                name,
                HeaderName::Via
                    | HeaderName::From
                    | HeaderName::To
                    | HeaderName::CallId
                    | HeaderName::CSeq
            ),
            "core headers are edited through their own methods"
        );
        self.headers.retain(|h| !h.name.is(name));
        if *name == HeaderName::MaxForwards {
            self.max_forwards = None;
        }
    }

    /// Puts the Via written `text` on top of the Via list, as written (a proxy forwarding a
    /// request, §16.6 step 8).
    pub fn push_via_text(&mut self, text: ByteString) -> Result<(), SyntaxError> {
        let via = Via::parse(&text)?;
        self.headers
            .insert(0, Header::new(HeaderName::Via, text.into_bytes()));
        self.vias.insert(0, via);
        Ok(())
    }

    /// Removes the top Via value (a proxy forwarding a response, §16.7 step 3). Returns false
    /// when it was the only one.
    pub fn pop_via(&mut self) -> bool {
        if self.vias.len() < 2 {
            return false;
        }
        self.vias.remove(0);
        // Usually the top Via is a line of its own (one value, so no comma): drop the line
        // rather than write every other Via again.
        match self.headers.iter().position(|h| h.name == HeaderName::Via) {
            Some(i) if !self.headers[i].value().contains(&b',') => {
                self.headers.remove(i);
            }
            _ => self.rewrite_vias(),
        }
        true
    }

    /// Records the source of a received request in its top Via (RFC 3261 §18.2.1, RFC 3581).
    pub fn set_received(&mut self, ip: IpAddr, port: u16) {
        let via = &mut self.vias[0];
        let host_is_source = via.host.ip() == Some(ip);
        let has_received = via.params.has("received");
        let has_rport = via.params.has("rport");
        if host_is_source && !has_received && !has_rport {
            return;
        }
        // What the sender wrote in `received` or `rport` is never trusted: it would let anyone
        // aim our responses (and their retransmissions) at a third party.
        if host_is_source {
            via.params.remove("received");
        } else {
            via.params.set("received", Some(&ip.to_string()));
        }
        if has_rport {
            via.params.set("rport", Some(&port.to_string()));
        }
        self.rewrite_vias();
    }

    /// Rewrites the Via headers from `self.vias`: the first Via header line becomes a fresh
    /// line holding every value, later Via lines are removed. Only done when Vias change.
    fn rewrite_vias(&mut self) {
        let joined = self
            .vias
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let first = self.headers.iter().position(|h| h.name == HeaderName::Via);
        self.headers.retain(|h| h.name != HeaderName::Via);
        let at = first.unwrap_or(0).min(self.headers.len());
        self.headers
            .insert(at, Header::new(HeaderName::Via, joined));
    }

    /// Sets Max-Forwards (a proxy decrements it).
    pub fn set_max_forwards(&mut self, n: u32) {
        self.max_forwards = Some(n);
        match self
            .headers
            .iter_mut()
            .find(|h| h.name == HeaderName::MaxForwards)
        {
            Some(h) => *h = Header::new(HeaderName::MaxForwards, n.to_string()),
            None => self.insert_after_vias(Header::new(HeaderName::MaxForwards, n.to_string())),
        }
    }

    fn insert_after_vias(&mut self, header: Header) {
        let at = self
            .headers
            .iter()
            .rposition(|h| h.name == HeaderName::Via)
            .map_or(0, |p| p + 1);
        self.headers.insert(at, header);
    }

    /// Sets the To tag (a UAS answering).
    pub fn set_to_tag(&mut self, tag: &str) {
        self.to.params.set("tag", Some(tag));
        let value = self.to.to_string();
        if let Some(h) = self.headers.iter_mut().find(|h| h.name == HeaderName::To) {
            *h = Header::new(HeaderName::To, value);
        }
    }

    /// Replaces the body (Content-Length follows when serialized).
    pub fn set_body(&mut self, body: Bytes) {
        self.body = body;
    }

    // --- building ---

    /// A response to this request (RFC 3261 §8.2.6): Via, From, To, Call-ID and CSeq copied,
    /// a To tag added when the request had none and `to_tag` is given.
    pub fn response(&self, code: u16, reason: &str, to_tag: Option<&str>) -> Message {
        let copied = self.headers.iter().filter(|h| {
            matches!(
                h.name,
                HeaderName::Via
                    | HeaderName::From
                    | HeaderName::To
                    | HeaderName::CallId
                    | HeaderName::CSeq
            )
        });
        let mut headers: Vec<Header> = copied.cloned().collect();
        // Timestamp is echoed in 100 Trying (RFC 3261 §8.2.6.1).
        if code == 100
            && let Some(ts) = self.header(&HeaderName::Timestamp)
        {
            headers.push(ts.clone());
        }
        let mut msg = Message(Arc::new(Parts {
            start: StartLine::Response {
                code,
                reason: Bytes::copy_from_slice(reason.as_bytes()),
            },
            raw_uri: None,
            headers,
            body: Bytes::new(),
            vias: self.vias.clone(),
            cseq: self.cseq.clone(),
            call_id: self.call_id.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            max_forwards: None,
        }));
        if let Some(tag) = to_tag
            && self.to.tag().is_none()
        {
            msg.set_to_tag(tag);
        }
        msg
    }

    /// A new request (a UAC: OPTIONS probes, REGISTER, ACK, CANCEL).
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        method: Method,
        uri: Uri,
        via: Via,
        from: NameAddr,
        to: NameAddr,
        call_id: &str,
        cseq: u32,
        max_forwards: u32,
    ) -> Message {
        let cseq = CSeq {
            seq: cseq,
            method: method.clone(),
        };
        let headers = vec![
            Header::new(HeaderName::Via, via.to_string()),
            Header::new(HeaderName::MaxForwards, max_forwards.to_string()),
            Header::new(HeaderName::From, from.to_string()),
            Header::new(HeaderName::To, to.to_string()),
            Header::new(HeaderName::CallId, call_id.to_string()),
            Header::new(HeaderName::CSeq, cseq.to_string()),
        ];
        Message(Arc::new(Parts {
            start: StartLine::Request { method, uri },
            raw_uri: None,
            headers,
            body: Bytes::new(),
            vias: vec![via],
            cseq,
            call_id: ByteString::from(call_id),
            from,
            to,
            max_forwards: Some(max_forwards),
        }))
    }

    /// Serializes the message. Content-Length always states the body's length.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(
            self.headers
                .iter()
                .map(|h| h.value().len() + 24)
                .sum::<usize>()
                + self.body.len()
                + 64,
        );
        match &self.start {
            StartLine::Request { method, uri } => {
                out.put_slice(method.as_str().as_bytes());
                out.put_u8(b' ');
                match &self.raw_uri {
                    Some(raw) => out.put_slice(raw.as_bytes()),
                    None => {
                        let _ = write!(StrOut(&mut out), "{uri}");
                    }
                }
                out.put_slice(b" SIP/2.0\r\n");
            }
            StartLine::Response { code, reason } => {
                out.put_slice(b"SIP/2.0 ");
                match code {
                    100..=999 => out.put_slice(&[
                        b'0' + (code / 100) as u8,
                        b'0' + (code / 10 % 10) as u8,
                        b'0' + (code % 10) as u8,
                        b' ',
                    ]),
                    _ => {
                        let _ = write!(StrOut(&mut out), "{code} ");
                    }
                }
                out.put_slice(reason);
                out.put_slice(b"\r\n");
            }
        }
        let mut wrote_length = false;
        for h in &self.headers {
            if h.name == HeaderName::ContentLength {
                if wrote_length {
                    continue;
                }
                wrote_length = true;
                let states_len =
                    syntax::trim_lws(&h.value_str()).parse::<usize>().ok() == Some(self.body.len());
                if !states_len {
                    let _ = write!(StrOut(&mut out), "Content-Length: {}\r\n", self.body.len());
                    continue;
                }
            }
            h.write_to(&mut out);
        }
        if !wrote_length {
            let _ = write!(StrOut(&mut out), "Content-Length: {}\r\n", self.body.len());
        }
        out.put_slice(b"\r\n");
        out.put_slice(&self.body);
        out.freeze()
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.to_bytes()))
    }
}

fn fail(reason: &'static str, request: Option<Box<RawRequest>>) -> ParseError {
    ParseError {
        reason,
        status: 400,
        request,
    }
}

/// A request whose Request-Line is malformed can still be answered with 400 when its headers
/// can be read (RFC 4475 §3.1.2.8–10).
fn answerable(mut err: ParseError, line: &[u8], buf: &Bytes, headers_at: usize) -> ParseError {
    if line.starts_with(b"SIP/") {
        return err;
    }
    let method = &line[..line.iter().position(|&b| b == b' ').unwrap_or(line.len())];
    if method.is_empty() || !method.iter().all(|&b| is_token(b)) {
        return err;
    }
    if let (Ok(method), Ok((headers, _))) = (
        ByteString::try_from(Bytes::copy_from_slice(method)),
        index_headers(buf, headers_at),
    ) {
        err.request = Some(Box::new(RawRequest { method, headers }));
    }
    err
}

/// The end of the line starting at `from` (excluding CRLF or LF) and where the next starts.
fn line_at(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let nl = memchr::memchr(b'\n', &buf[from..])? + from;
    let end = if nl > from && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    Some((end, nl + 1))
}

enum Parsed<'a> {
    Request {
        method: ByteString,
        uri: &'a [u8],
        version_ok: bool,
    },
    Response {
        code: u16,
        reason: &'a [u8],
    },
}

fn parse_start_line(line: &[u8]) -> Result<Parsed<'_>, ParseError> {
    if line.len() >= 8 && line[..8].eq_ignore_ascii_case(b"SIP/2.0 ") {
        let rest = &line[8..];
        let code_end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        let code = &rest[..code_end];
        // Exactly three digits: 4294967301 must not wrap to 5 (RFC 4475 §3.1.2.19).
        if code.len() != 3 || !code.iter().all(u8::is_ascii_digit) || code[0] == b'0' {
            return Err(fail("bad status code", None));
        }
        let code =
            (code[0] - b'0') as u16 * 100 + (code[1] - b'0') as u16 * 10 + (code[2] - b'0') as u16;
        let reason = rest.get(code_end + 1..).unwrap_or(&[]);
        return Ok(Parsed::Response { code, reason });
    }
    // Request-Line: Method SP Request-URI SP SIP-Version, single spaces (RFC 3261 §7.1).
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(fail("malformed Request-Line", None));
    };
    if method.is_empty() || !method.iter().all(|&b| is_token(b)) || uri.is_empty() {
        return Err(fail("malformed Request-Line", None));
    }
    let method = ByteString::try_from(Bytes::copy_from_slice(method))
        .map_err(|_| fail("malformed Request-Line", None))?;
    let version_ok = version.eq_ignore_ascii_case(b"SIP/2.0");
    if !(version_ok || version.len() > 4 && version[..4].eq_ignore_ascii_case(b"SIP/")) {
        return Err(fail("malformed Request-Line", None));
    }
    Ok(Parsed::Request {
        method,
        uri,
        version_ok,
    })
}

/// Indexes header lines from `from` to the empty line. Returns the headers and where the
/// body starts. A datagram that ends without the empty line ends its headers there.
fn index_headers(buf: &Bytes, mut at: usize) -> Result<(Vec<Header>, usize), SyntaxError> {
    let mut headers = Vec::with_capacity(16);
    loop {
        if at >= buf.len() {
            return Ok((headers, buf.len()));
        }
        let (end, mut next) = line_at(buf, at).unwrap_or((buf.len(), buf.len()));
        if end == at {
            return Ok((headers, next));
        }
        if matches!(buf[at], b' ' | b'\t') {
            return Err("continuation line without a header");
        }
        // Line ends: CRLF ones, and all (a line cut off at the end of the datagram has none).
        let crlf = |end: usize, next: usize| usize::from(next - end == 2);
        let (mut crlf_ends, mut lines) = (crlf(end, next), 1);
        let mut value_end = end;
        // Folded lines: the header goes on while the next line starts with SP or HTAB.
        while next < buf.len() && matches!(buf[next], b' ' | b'\t') {
            let (e, n) = line_at(buf, next).unwrap_or((buf.len(), buf.len()));
            crlf_ends += crlf(e, n);
            lines += 1;
            value_end = e;
            next = n;
        }
        let line = &buf[at..value_end];
        let whole = &buf[at..next];
        // A CR is only ever half of a line end: a bare one cannot be written back faithfully.
        if memchr::memchr_iter(b'\r', whole).count() != crlf_ends {
            return Err("bare CR in a header line");
        }
        let colon = memchr::memchr(b':', line).ok_or("header line without ':'")?;
        let name = trim_end_ws(&line[..colon]);
        if name.is_empty() || !name.iter().all(|&b| is_token(b)) {
            return Err("bad header name");
        }
        let name = match HeaderName::known(name) {
            Some(known) => known,
            None => HeaderName::Other(
                ByteString::try_from(buf.slice_ref(name)).map_err(|_| "bad header name")?,
            ),
        };
        let value = trim_lws_bytes(&line[colon + 1..]);
        // Kept byte-exact only when its line ends are CRLF: a line cut off at the end of a
        // datagram, or ended by a bare LF, is written anew so the output frames on streams.
        let crlf_only = crlf_ends == lines;
        // The value's place in the line.
        let from = (value.as_ptr() as usize - line.as_ptr() as usize) as u32;
        headers.push(if crlf_only {
            Header {
                name,
                bytes: buf.slice(at..next),
                value: from..from + value.len() as u32,
                raw: true,
            }
        } else {
            Header::new(name, buf.slice_ref(value))
        });
        at = next;
    }
}

fn trim_end_ws(s: &[u8]) -> &[u8] {
    let end = s
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |p| p + 1);
    &s[..end]
}

fn trim_lws_bytes(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_lws(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|&b| !is_lws(b)).map_or(start, |p| p + 1);
    &s[start..end]
}

struct Core {
    vias: Vec<Via>,
    cseq: CSeq,
    call_id: ByteString,
    from: NameAddr,
    to: NameAddr,
    max_forwards: Option<u32>,
    content_length: Option<usize>,
}

/// Parses the headers routing needs; single-value ones must appear once.
fn parse_core(headers: &[Header]) -> Result<Core, SyntaxError> {
    let mut vias = Vec::new();
    let mut cseq = None;
    let mut call_id = None;
    let mut from = None;
    let mut to = None;
    let mut max_forwards = None;
    let mut content_length = None;
    fn once<T>(slot: &mut Option<T>, v: T, what: &'static str) -> Result<(), SyntaxError> {
        if slot.is_some() {
            return Err(what);
        }
        *slot = Some(v);
        Ok(())
    }
    for h in headers {
        match h.name {
            HeaderName::Via => {
                for v in syntax::split_commas(&h.text())? {
                    vias.push(Via::parse(&v)?);
                }
            }
            HeaderName::CSeq => once(&mut cseq, CSeq::parse(&h.text())?, "more than one CSeq")?,
            HeaderName::CallId => {
                let v = h.text();
                if v.is_empty() || v.bytes().any(is_lws) {
                    return Err("bad Call-ID");
                }
                once(&mut call_id, v, "more than one Call-ID")?
            }
            HeaderName::From => once(&mut from, NameAddr::parse(&h.text())?, "more than one From")?,
            HeaderName::To => once(&mut to, NameAddr::parse(&h.text())?, "more than one To")?,
            HeaderName::MaxForwards => {
                let v = h.text();
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err("bad Max-Forwards");
                }
                let n = v.parse::<u32>().map_err(|_| "Max-Forwards too large")?;
                once(&mut max_forwards, n, "more than one Max-Forwards")?
            }
            HeaderName::ContentLength => {
                let v = h.text();
                if v.is_empty() || v.len() > 6 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err("bad Content-Length");
                }
                let n = v.parse::<usize>().map_err(|_| "bad Content-Length")?;
                once(&mut content_length, n, "more than one Content-Length")?
            }
            _ => {}
        }
    }
    if vias.is_empty() {
        return Err("no Via");
    }
    Ok(Core {
        vias,
        cseq: cseq.ok_or("no CSeq")?,
        call_id: call_id.ok_or("no Call-ID")?,
        from: from.ok_or("no From")?,
        to: to.ok_or("no To")?,
        max_forwards,
        content_length,
    })
}

// === Stream framing ===

/// How a byte stream (TCP, TLS) holds its next message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Not all of it has arrived yet.
    Incomplete,
    /// `n` bytes of CRLF keep-alive (RFC 5626 §3.5.1): answer a double CRLF with one CRLF.
    KeepAlive { len: usize, ping: bool },
    /// A message of `len` bytes is complete at the front of the buffer.
    Message { len: usize },
}

fn incomplete(buf: &[u8]) -> Result<Frame, SyntaxError> {
    if buf.len() > MAX_MESSAGE {
        return Err("headers too large");
    }
    Ok(Frame::Incomplete)
}

/// How far [`stream_frame_resume`] got in a buffer that held no whole message yet, so that the
/// next call goes on from there: a peer that sends its message a byte at a time costs linear
/// time, not quadratic. Start each message with `FrameScan::default()`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrameScan {
    /// Where the next header line to examine starts (0: the start line is not done).
    at: usize,
    /// No line end lies before this offset beyond `at`.
    searched: usize,
    /// Content-Length of the header lines examined.
    length: Option<usize>,
    /// The whole message's length, once the head is complete.
    total: Option<usize>,
}

/// Finds the next message in a stream buffer: the end of the headers, then Content-Length
/// (0 when absent, as streams require it). Errors mean the stream can no longer be framed and
/// the connection must be closed.
pub fn stream_frame(buf: &[u8]) -> Result<Frame, SyntaxError> {
    stream_frame_resume(buf, &mut FrameScan::default())
}

/// As [`stream_frame`], going on from where an earlier call on a shorter prefix of the same
/// buffer stopped.
pub fn stream_frame_resume(buf: &[u8], scan: &mut FrameScan) -> Result<Frame, SyntaxError> {
    if let Some(total) = scan.total {
        return if buf.len() < total {
            Ok(Frame::Incomplete)
        } else {
            Ok(Frame::Message { len: total })
        };
    }
    // The next line end at or after `from`, searching each byte once across calls.
    let find_nl = |scan: &mut FrameScan, from: usize| -> Option<usize> {
        let start = from.max(scan.searched);
        match memchr::memchr(b'\n', &buf[start.min(buf.len())..]) {
            Some(p) => Some(start + p),
            None => {
                scan.searched = buf.len();
                None
            }
        }
    };
    if scan.at == 0 {
        let lead = buf
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(buf.len());
        if lead > 0 {
            let ping = buf[..lead].windows(4).any(|w| w == b"\r\n\r\n");
            return Ok(Frame::KeepAlive { len: lead, ping });
        }
        match find_nl(scan, 0) {
            Some(p) => {
                scan.at = p + 1;
                scan.searched = 0;
            }
            None => return incomplete(buf),
        }
    }
    // Walk the head line by line as the parser does (CRLF or bare LF, folded lines), so the
    // frame boundaries and Content-Length agree with what `Message::parse` will read.
    let body_start = loop {
        let at = scan.at;
        let Some(nl) = find_nl(scan, at) else {
            return incomplete(buf);
        };
        let line_end = if nl > at && buf[nl - 1] == b'\r' {
            nl - 1
        } else {
            nl
        };
        if line_end == at {
            break nl + 1;
        }
        // The header goes on while the next line starts with SP or HTAB.
        let mut next = nl + 1;
        let mut value_end = line_end;
        while next < buf.len() && matches!(buf[next], b' ' | b'\t') {
            // Not `find_nl`: its memory is for the header's first line, which this is not.
            let Some(nl2) = memchr::memchr(b'\n', &buf[next..]).map(|p| next + p) else {
                return incomplete(buf);
            };
            value_end = nl2;
            next = nl2 + 1;
        }
        if next >= buf.len() {
            // A fold may still follow: wait for the next line's first byte.
            return incomplete(buf);
        }
        let line = &buf[at..value_end];
        if let Some(colon) = memchr::memchr(b':', line) {
            let name = trim_end_ws(&line[..colon]);
            if name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l") {
                let v = trim_lws_bytes(&line[colon + 1..]);
                if v.is_empty() || v.len() > 6 || !v.iter().all(u8::is_ascii_digit) {
                    return Err("bad Content-Length");
                }
                let n: usize = std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or("bad Content-Length")?;
                if scan.length.replace(n).is_some() {
                    return Err("more than one Content-Length");
                }
            }
        }
        scan.at = next;
        scan.searched = 0;
    };
    let len = body_start + scan.length.unwrap_or(0);
    if len > MAX_MESSAGE {
        return Err("message too large");
    }
    scan.total = Some(len);
    if buf.len() < len {
        return Ok(Frame::Incomplete);
    }
    Ok(Frame::Message { len })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ASTERISK_INVITE: &str = "INVITE sip:+15551234567@10.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.2:5060;rport;branch=z9hG4bKPj1a2b3c4d\r\n\
From: \"Alice\" <sip:1000@10.0.0.2>;tag=as58f4201b\r\n\
To: <sip:+15551234567@10.0.0.1>\r\n\
Contact: <sip:1000@10.0.0.2:5060>\r\n\
Call-ID: 3848276298220188511@10.0.0.2\r\n\
CSeq: 102 INVITE\r\n\
Max-Forwards: 70\r\n\
User-Agent: FPBX-16.0.40(18.20.0)\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\n";

    #[test]
    fn parses_an_asterisk_invite() {
        let m = Message::parse(Bytes::from_static(ASTERISK_INVITE.as_bytes())).unwrap();
        assert_eq!(*m.method(), Method::Invite);
        assert_eq!(m.call_id(), "3848276298220188511@10.0.0.2");
        assert_eq!(m.cseq().seq, 102);
        assert_eq!(m.from().tag(), Some("as58f4201b"));
        assert_eq!(m.branch(), Some("z9hG4bKPj1a2b3c4d"));
        assert_eq!(m.top_via().rport(), Some(None));
        assert_eq!(m.body().as_ref(), b"v=0\n");
        // Unchanged, it serializes to the same bytes.
        assert_eq!(m.to_bytes().as_ref(), ASTERISK_INVITE.as_bytes());
    }

    #[test]
    fn every_known_header_name_is_recognised_in_any_case() {
        let known = [
            "Via",
            "From",
            "To",
            "Call-ID",
            "CSeq",
            "Max-Forwards",
            "Contact",
            "Content-Length",
            "Content-Type",
            "Route",
            "Record-Route",
            "Expires",
            "Min-Expires",
            "Require",
            "Proxy-Require",
            "Supported",
            "Unsupported",
            "Allow",
            "Authorization",
            "Proxy-Authorization",
            "WWW-Authenticate",
            "Proxy-Authenticate",
            "Server",
            "User-Agent",
            "Date",
            "Retry-After",
            "Timestamp",
        ];
        for name in known {
            for written in [name.to_owned(), name.to_lowercase(), name.to_uppercase()] {
                let parsed = HeaderName::parse(&ByteString::from(written.as_str()));
                assert!(!matches!(parsed, HeaderName::Other(_)), "{written}");
                assert_eq!(parsed.as_str(), name);
            }
        }
        for other in ["Subject", "X-Via", "Tos", "P-Asserted-Identity", "Contacts"] {
            let parsed = HeaderName::parse(&ByteString::from(other));
            assert_eq!(parsed, HeaderName::Other(ByteString::from(other)));
        }
    }

    #[test]
    fn compact_forms_and_comma_joined_vias() {
        let raw = "OPTIONS sip:x@y SIP/2.0\r\nv: SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/TCP [::1]:5070;branch=z9hG4bK2\r\nf: <sip:a@b>;tag=1\r\nt: sip:x@y\r\ni: abc\r\nCSeq: 1 OPTIONS\r\nl: 0\r\n\r\n";
        let m = Message::parse(Bytes::from(raw)).unwrap();
        assert_eq!(m.vias().len(), 2);
        assert_eq!(m.vias()[1].port, Some(5070));
        assert_eq!(m.vias()[1].host, Host::V6("::1".parse().unwrap()));
    }

    #[test]
    fn popping_the_top_via_keeps_the_others_as_written() {
        let raw = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\nCSeq: 1 BYE\r\n\
v: SIP/2.0/UDP b;branch=z9hG4bK2 , SIP/2.0/TCP c;branch=z9hG4bK3\r\nVia: SIP/2.0/UDP d\r\n\
From: <sip:a@b>;tag=1\r\nTo: <sip:x@y>;tag=2\r\nCall-ID: abc\r\nContent-Length: 0\r\n\r\n";
        let mut m = Message::parse(Bytes::from(raw)).unwrap();
        let hosts = |m: &Message| {
            m.vias()
                .iter()
                .map(|v| v.host.to_string())
                .collect::<Vec<_>>()
        };
        let text = |m: &Message| String::from_utf8(m.to_bytes().to_vec()).unwrap();
        // A line of its own goes; the rest stay as they came, compact form included.
        assert!(m.pop_via());
        assert_eq!(hosts(&m), ["b", "c", "d"]);
        assert!(text(&m).starts_with(
            "SIP/2.0 200 OK\r\nCSeq: 1 BYE\r\nv: SIP/2.0/UDP b;branch=z9hG4bK2 , SIP/2.0/TCP"
        ));
        // The first of two values on one line: that line is written again with the second.
        assert!(m.pop_via());
        assert_eq!(hosts(&m), ["c", "d"]);
        let again = Message::parse(m.to_bytes()).unwrap();
        assert_eq!(hosts(&again), ["c", "d"]);
        assert_eq!(again.top_via().branch(), Some("z9hG4bK3"));
        assert!(!text(&m).contains("z9hG4bK2"));
        assert!(m.pop_via());
        assert_eq!(hosts(&m), ["d"]);
        assert!(!m.pop_via(), "the last Via stays");
        assert_eq!(Message::parse(m.to_bytes()).unwrap().vias().len(), 1);
    }

    #[test]
    fn received_and_rport() {
        let mut m = Message::parse(Bytes::from_static(ASTERISK_INVITE.as_bytes())).unwrap();
        m.set_received("192.0.2.7".parse().unwrap(), 40000);
        let again = Message::parse(m.to_bytes()).unwrap();
        assert_eq!(
            again.top_via().received(),
            Some("192.0.2.7".parse().unwrap())
        );
        assert_eq!(again.top_via().rport(), Some(Some(40000)));
        assert_eq!(
            again.top_via().response_host_port(5060),
            (Host::V4("192.0.2.7".parse().unwrap()), 40000)
        );
    }

    #[test]
    fn received_and_rport_written_by_the_sender_are_replaced() {
        let forged = ASTERISK_INVITE.replace(
            "10.0.0.2:5060;rport;branch",
            "10.0.0.2:5060;received=192.0.2.99;rport=9;branch",
        );
        let mut m = Message::parse(Bytes::from(forged)).unwrap();
        m.set_received("10.0.0.2".parse().unwrap(), 40000);
        let (host, port) = m.top_via().response_host_port(5060);
        assert_eq!(host, Host::V4("10.0.0.2".parse().unwrap()));
        assert_eq!(port, 40000);
    }

    #[test]
    fn response_copies_and_tags() {
        let m = Message::parse(Bytes::from_static(ASTERISK_INVITE.as_bytes())).unwrap();
        let r = m.response(486, "Busy Here", Some("t1"));
        let r = Message::parse(r.to_bytes()).unwrap();
        assert_eq!(r.status(), Some(486));
        assert_eq!(r.to().tag(), Some("t1"));
        assert_eq!(r.call_id(), m.call_id());
        assert_eq!(r.top_via(), m.top_via());
        assert!(r.body().is_empty());
    }

    #[test]
    fn resumed_framing_byte_by_byte_agrees_with_a_whole_scan() {
        let folded = ASTERISK_INVITE.replace("User-Agent: FPBX", "User-Agent:\r\n  FPBX");
        let two = format!("{folded}{ASTERISK_INVITE}");
        let bytes = two.as_bytes();
        let whole = stream_frame(bytes).unwrap();
        let mut scan = FrameScan::default();
        let mut got = None;
        for end in 1..=bytes.len() {
            match stream_frame_resume(&bytes[..end], &mut scan).unwrap() {
                Frame::Incomplete => {}
                frame => {
                    got = Some((end, frame));
                    break;
                }
            }
        }
        assert_eq!(got, Some((folded.len(), whole)));
        assert_eq!(whole, Frame::Message { len: folded.len() });
    }

    #[test]
    fn stream_framing() {
        let msg = ASTERISK_INVITE.as_bytes();
        assert_eq!(stream_frame(&msg[..40]), Ok(Frame::Incomplete));
        assert_eq!(stream_frame(&msg[..msg.len() - 1]), Ok(Frame::Incomplete));
        assert_eq!(stream_frame(msg), Ok(Frame::Message { len: msg.len() }));
        assert_eq!(
            stream_frame(b"\r\n\r\nINV"),
            Ok(Frame::KeepAlive { len: 4, ping: true })
        );
        assert!(stream_frame(b"INVITE x SIP/2.0\r\nl: -1\r\n\r\n").is_err());
        // Found by fuzzing: a bare CR inside a header value is refused, not rewritten.
        let bare_cr = ASTERISK_INVITE.replace("User-Agent: FPBX", "User-Agent: F\rPBX");
        assert_eq!(
            Message::parse(Bytes::from(bare_cr)).unwrap_err().reason,
            "bare CR in a header line"
        );
        // Found by fuzzing: a folded Content-Length, and LF-only heads with CRLFs in the body.
        let folded = b"OPTIONS x SIP/2.0\r\nContent-Length:\r\n 4\r\n\r\nabcdNEXT";
        assert_eq!(
            stream_frame(folded),
            Ok(Frame::Message {
                len: folded.len() - 4
            })
        );
        let lf = b"OPTIONS x SIP/2.0\nl: 6\n\nab\r\n\r\nNEXT";
        assert_eq!(stream_frame(lf), Ok(Frame::Message { len: lf.len() - 4 }));
    }

    #[test]
    fn rejects_what_must_not_route() {
        for (raw, why) in [
            (
                "SIP/2.0 4294967301 x\r\nVia: SIP/2.0/UDP a\r\n\r\n",
                "bad status code",
            ),
            (
                "INVITE  sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP a\r\n\r\n",
                "malformed Request-Line",
            ),
        ] {
            assert_eq!(Message::parse(Bytes::from(raw)).unwrap_err().reason, why);
        }
    }
}
