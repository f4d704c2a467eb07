//! URIs (sip, sips, tel and opaque others), hosts, and name-addr / addr-spec values as they
//! appear in From, To, Contact, Route and Record-Route.
//!
//! Every part is kept as written (escapes included), so a URI forwarded unchanged is the same
//! text; comparison and look-ups decode escapes once.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytestring::ByteString;

use super::syntax::{self, Param, Params, SyntaxError, is_lws, is_token, quoted_end, skip_lws};

/// A host: a name, an IPv4 address or an IPv6 reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(ByteString),
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

impl Host {
    /// Parses a host as found in a URI or a Via sent-by. IPv6 must be bracketed in URIs; a
    /// bare IPv6 address is accepted too (some stacks write it in Via `received`).
    pub fn parse(s: &str) -> Result<Host, SyntaxError> {
        if let Some(inner) = s.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or("unterminated IPv6 reference")?;
            return inner.parse().map(Host::V6).map_err(|_| "bad IPv6 address");
        }
        if let Ok(v4) = s.parse::<Ipv4Addr>() {
            return Ok(Host::V4(v4));
        }
        if s.contains(':') {
            return s.parse().map(Host::V6).map_err(|_| "bad IPv6 address");
        }
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !ok {
            return Err("bad host name");
        }
        Ok(Host::Name(ByteString::from(s)))
    }

    /// The address, when the host is numeric.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Name(_) => None,
            Host::V4(a) => Some(IpAddr::V4(*a)),
            Host::V6(a) => Some(IpAddr::V6(*a)),
        }
    }

    /// Appends the host as written in a URI or a Via (IPv6 in brackets), IPv4 without
    /// `core::fmt`.
    pub fn push_to(&self, out: &mut String) {
        match self {
            Host::Name(n) => out.push_str(n),
            Host::V4(a) => out.push_str(V4Text::new(*a).as_str()),
            Host::V6(a) => {
                use std::fmt::Write;
                let _ = write!(out, "[{a}]");
            }
        }
    }

    /// Host names compare case-insensitively, addresses by value.
    pub fn matches(&self, other: &Host) -> bool {
        match (self, other) {
            (Host::Name(a), Host::Name(b)) => a.eq_ignore_ascii_case(b),
            _ => self == other,
        }
    }
}

impl From<IpAddr> for Host {
    fn from(ip: IpAddr) -> Host {
        match ip {
            IpAddr::V4(a) => Host::V4(a),
            IpAddr::V6(a) => Host::V6(a),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::V4(a) => f.write_str(V4Text::new(*a).as_str()),
            Host::V6(a) => write!(f, "[{a}]"),
        }
    }
}

/// An IPv4 address in dotted decimal, written without the formatting machinery (the
/// standard `Display` of `Ipv4Addr` costs about a microsecond, and every message forwarded
/// writes a few).
pub struct V4Text {
    bytes: [u8; 15],
    len: u8,
}

impl V4Text {
    pub fn new(a: std::net::Ipv4Addr) -> V4Text {
        let mut bytes = [0; 15];
        let mut n = 0;
        for (i, o) in a.octets().into_iter().enumerate() {
            if i > 0 {
                bytes[n] = b'.';
                n += 1;
            }
            if o >= 100 {
                bytes[n] = b'0' + o / 100;
                n += 1;
            }
            if o >= 10 {
                bytes[n] = b'0' + o / 10 % 10;
                n += 1;
            }
            bytes[n] = b'0' + o % 10;
            n += 1;
        }
        V4Text {
            bytes,
            len: n as u8,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).expect("digits and dots")
    }
}

/// Appends `host:port` for a socket address (IPv6 in brackets), IPv4 without `core::fmt`.
pub fn push_host_port(out: &mut String, addr: std::net::SocketAddr) {
    Host::from(addr.ip()).push_to(out);
    out.push(':');
    push_decimal(out, addr.port().into());
}

/// Appends `n` in decimal, without `core::fmt`.
pub fn push_decimal(out: &mut String, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[at..]).expect("digits"));
}

/// A `sip:` or `sips:` URI (RFC 3261 §19.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipUri {
    pub secure: bool,
    /// The user part as written, escapes kept.
    pub user: Option<ByteString>,
    pub password: Option<ByteString>,
    pub host: Host,
    pub port: Option<u16>,
    pub params: Params,
    /// The `?headers` part without the `?`, as written.
    pub headers: Option<ByteString>,
}

impl SipUri {
    /// A URI with only a host (and port).
    pub fn new(host: Host, port: Option<u16>) -> SipUri {
        SipUri {
            secure: false,
            user: None,
            password: None,
            host,
            port,
            params: Params::default(),
            headers: None,
        }
    }

    /// The user part with escapes decoded once (`null-%00-null` keeps its NUL).
    pub fn user_unescaped(&self) -> Option<Vec<u8>> {
        self.user.as_deref().map(syntax::unescape)
    }

    /// URI equality of RFC 3261 §19.1.4: user parts compared after unescaping, host
    /// case-insensitively, an absent port differs from an explicit 5060; `user`, `ttl`,
    /// `method`, `maddr` and `transport` must agree when either URI has them, other parameters
    /// only when both do.
    pub fn equivalent(&self, other: &SipUri) -> bool {
        let unescaped = |s: &Option<ByteString>| s.as_deref().map(syntax::unescape);
        if self.secure != other.secure
            || unescaped(&self.user) != unescaped(&other.user)
            || unescaped(&self.password) != unescaped(&other.password)
            || !self.host.matches(&other.host)
            || self.port != other.port
            || self.headers != other.headers
        {
            return false;
        }
        let same = |a: Option<&str>, b: Option<&str>| match (a, b) {
            (Some(a), Some(b)) => syntax::unescape(a).eq_ignore_ascii_case(&syntax::unescape(b)),
            (None, None) => true,
            _ => false,
        };
        for name in ["user", "ttl", "method", "maddr", "transport"] {
            let (a, b) = (self.params.get(name), other.params.get(name));
            if a.is_some() != b.is_some() || !same(a.flatten(), b.flatten()) {
                return false;
            }
        }
        self.params
            .0
            .iter()
            .all(|p| match other.params.get(&p.name) {
                Some(v) => same(p.value.as_deref(), v),
                None => true,
            })
    }

    /// The `transport` parameter, if any.
    pub fn transport(&self) -> Option<&str> {
        self.params.value("transport")
    }
}

impl fmt::Display for SipUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.secure { "sips:" } else { "sip:" })?;
        if let Some(u) = &self.user {
            f.write_str(u)?;
            if let Some(p) = &self.password {
                write!(f, ":{p}")?;
            }
            f.write_str("@")?;
        }
        write!(f, "{}", self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        let mut params = String::new();
        self.params.write_to(&mut params);
        f.write_str(&params)?;
        if let Some(h) = &self.headers {
            write!(f, "?{h}")?;
        }
        Ok(())
    }
}

/// A `tel:` URI (RFC 3966): the number as written and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelUri {
    pub number: ByteString,
    pub params: Params,
}

/// Any URI the element may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    Sip(SipUri),
    Tel(TelUri),
    /// A well-formed URI of another scheme, kept opaque (answered 416 as a Request-URI).
    Other {
        scheme: ByteString,
        raw: ByteString,
    },
}

impl Uri {
    /// Parses a URI; it must not contain white space.
    pub fn parse(text: &ByteString) -> Result<Uri, SyntaxError> {
        if text.bytes().any(is_lws) {
            return Err("white space in URI");
        }
        let colon = text.find(':').ok_or("URI without scheme")?;
        let scheme = &text[..colon];
        let sb = scheme.as_bytes();
        if sb.is_empty()
            || !sb[0].is_ascii_alphabetic()
            || !sb
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        {
            return Err("bad URI scheme");
        }
        let rest = text.slice_ref(&text[colon + 1..]);
        if scheme.eq_ignore_ascii_case("sip") || scheme.eq_ignore_ascii_case("sips") {
            parse_sip(&rest, scheme.len() == 4).map(Uri::Sip)
        } else if scheme.eq_ignore_ascii_case("tel") {
            parse_tel(&rest).map(Uri::Tel)
        } else if rest.is_empty() {
            Err("empty URI")
        } else if rest
            .bytes()
            .any(|b| b.is_ascii_control() || b"<>\"{}|\\^`".contains(&b))
        {
            // RFC 3986 §2: these never appear unescaped in a URI.
            Err("character not allowed in a URI")
        } else {
            Ok(Uri::Other {
                scheme: text.slice_ref(scheme),
                raw: text.clone(),
            })
        }
    }

    /// The SIP URI, if this is one.
    pub fn as_sip(&self) -> Option<&SipUri> {
        match self {
            Uri::Sip(u) => Some(u),
            _ => None,
        }
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uri::Sip(u) => write!(f, "{u}"),
            Uri::Tel(t) => {
                write!(f, "tel:{}", t.number)?;
                let mut p = String::new();
                t.params.write_to(&mut p);
                f.write_str(&p)
            }
            Uri::Other { raw, .. } => f.write_str(raw),
        }
    }
}

fn is_user_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.!~*'()%&=+$,;?/".contains(&b)
}

fn is_password_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.!~*'()%&=+$,".contains(&b)
}

fn parse_sip(s: &ByteString, secure: bool) -> Result<SipUri, SyntaxError> {
    // The user part may hold ';', '?' and ':' (RFC 3261 §19.1.1), but never an unescaped '@'.
    let (user, password, hostpart) = match s.find('@') {
        Some(at) => {
            let userinfo = &s[..at];
            let (u, p) = match userinfo.find(':') {
                Some(c) => (&userinfo[..c], Some(&userinfo[c + 1..])),
                None => (userinfo, None),
            };
            if u.is_empty() || !u.bytes().all(is_user_char) {
                return Err("bad user part in URI");
            }
            if let Some(p) = p
                && !p.bytes().all(is_password_char)
            {
                return Err("bad password in URI");
            }
            (
                Some(s.slice_ref(u)),
                p.map(|p| s.slice_ref(p)),
                s.slice_ref(&s[at + 1..]),
            )
        }
        None => (None, None, s.clone()),
    };
    let end_hostport = hostpart.find([';', '?']).unwrap_or(hostpart.len());
    let (host, port) = split_hostport(&hostpart[..end_hostport])?;
    let rest = &hostpart[end_hostport..];
    let (params_str, headers) = match rest.find('?') {
        Some(q) => (&rest[..q], Some(hostpart.slice_ref(&rest[q + 1..]))),
        None => (rest, None),
    };
    let params = parse_uri_params(&hostpart, params_str)?;
    Ok(SipUri {
        secure,
        user,
        password,
        host,
        port,
        params,
        headers,
    })
}

/// Splits `host[:port]`, with `[v6]:port` for IPv6.
pub fn split_hostport(s: &str) -> Result<(Host, Option<u16>), SyntaxError> {
    let (host, port) = if s.starts_with('[') {
        let close = s.find(']').ok_or("unterminated IPv6 reference")?;
        let after = &s[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err("junk after IPv6 reference"),
        };
        (&s[..=close], port)
    } else {
        match s.rfind(':') {
            Some(c) => (&s[..c], Some(&s[c + 1..])),
            None => (s, None),
        }
    };
    let port = match port {
        Some(p) => Some(parse_port(p)?),
        None => None,
    };
    Ok((Host::parse(host)?, port))
}

fn parse_port(p: &str) -> Result<u16, SyntaxError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err("bad port");
    }
    p.parse().map_err(|_| "port out of range")
}

/// URI parameters: `;name[=value]` with no white space (already excluded by the caller).
fn parse_uri_params(owner: &ByteString, s: &str) -> Result<Params, SyntaxError> {
    let mut params = Vec::new();
    if s.is_empty() {
        return Ok(Params(params));
    }
    let s = s.strip_prefix(';').ok_or("expected ';'")?;
    for part in s.split(';') {
        if part.is_empty() {
            return Err("empty URI parameter");
        }
        let (name, value) = match part.find('=') {
            Some(e) => (&part[..e], Some(&part[e + 1..])),
            None => (part, None),
        };
        if name.is_empty() || value == Some("") {
            return Err("empty URI parameter");
        }
        params.push(Param {
            name: owner.slice_ref(name),
            value: value.map(|v| owner.slice_ref(v)),
        });
    }
    Ok(Params(params))
}

fn parse_tel(s: &ByteString) -> Result<TelUri, SyntaxError> {
    let end = s.find(';').unwrap_or(s.len());
    let number = &s[..end];
    let ok = !number.is_empty()
        && number
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b"+-.()*#".contains(&b));
    if !ok {
        return Err("bad tel number");
    }
    Ok(TelUri {
        number: s.slice_ref(number),
        params: parse_uri_params(s, &s[end..])?,
    })
}

/// A From, To, Contact, Route or Record-Route value: an optional display name, a URI and the
/// header's own parameters (`tag`, `expires`, `q`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    /// The display name as written (quotes kept when quoted).
    pub display: Option<ByteString>,
    pub uri: Uri,
    pub params: Params,
}

impl NameAddr {
    /// A bare `<uri>`.
    pub fn new(uri: Uri) -> NameAddr {
        NameAddr {
            display: None,
            uri,
            params: Params::default(),
        }
    }

    /// Parses one value (not a comma-separated list).
    pub fn parse(value: &ByteString) -> Result<NameAddr, SyntaxError> {
        let s = value.as_bytes();
        let start = skip_lws(s, 0);
        let mut i = start;
        let mut display = None;
        let angle_open;
        if i < s.len() && s[i] == b'"' {
            let end = quoted_end(s, i)?;
            display = Some(value.slice_ref(&value[i..end]));
            i = skip_lws(s, end);
            if i >= s.len() || s[i] != b'<' {
                return Err("display name without <URI>");
            }
            angle_open = Some(i);
        } else {
            angle_open = memchr::memchr(b'<', &s[i..]).map(|p| p + i);
            if let Some(open) = angle_open {
                // An unquoted display name is a sequence of tokens.
                let words = &value[i..open];
                if !words
                    .split(|c: char| c.is_ascii() && is_lws(c as u8))
                    .all(|w| w.bytes().all(is_token))
                {
                    return Err("display name is neither a token list nor quoted");
                }
                let trimmed = syntax::trim_lws(words);
                if !trimmed.is_empty() {
                    display = Some(value.slice_ref(trimmed));
                }
            }
        }
        let (uri_text, after) = match angle_open {
            Some(open) => {
                let close = memchr::memchr(b'>', &s[open..])
                    .map(|p| p + open)
                    .ok_or("unterminated <")?;
                (value.slice_ref(&value[open + 1..close]), close + 1)
            }
            None => {
                // addr-spec: the URI cannot contain ';' or white space here (RFC 3261 §20).
                let end = s[i..]
                    .iter()
                    .position(|&b| b == b';' || is_lws(b))
                    .map_or(s.len(), |p| p + i);
                let uri = &value[i..end];
                if uri.contains(['?', ',']) {
                    return Err("URI with '?' or ',' must be enclosed in <>");
                }
                (value.slice_ref(uri), end)
            }
        };
        let uri = Uri::parse(&uri_text)?;
        let rest = value.slice_ref(&value[after..]);
        let (params, used) = syntax::parse_params(&rest, b"")?;
        if used != rest.len() {
            return Err("junk after header parameters");
        }
        Ok(NameAddr {
            display,
            uri,
            params,
        })
    }

    /// The `tag` parameter.
    pub fn tag(&self) -> Option<&str> {
        self.params.value("tag")
    }
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display {
            write!(f, "{d} ")?;
        }
        write!(f, "<{}>", self.uri)?;
        let mut p = String::new();
        self.params.write_to(&mut p);
        f.write_str(&p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bs(s: &str) -> ByteString {
        ByteString::from(s)
    }

    #[test]
    fn address_text_is_what_the_standard_library_writes() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut samples = vec![
            0,
            u32::MAX,
            0x0a00_0001,
            0x7f00_0001,
            0x6464_6464,
            0x0909_0909,
        ];
        for _ in 0..2000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            samples.push(rng as u32);
        }
        for n in samples {
            let a = std::net::Ipv4Addr::from(n);
            assert_eq!(V4Text::new(a).as_str(), a.to_string());
            assert_eq!(Host::V4(a).to_string(), a.to_string());
            let port = (n >> 16) as u16;
            for addr in [
                std::net::SocketAddr::from((a, port)),
                std::net::SocketAddr::from((a.to_ipv6_mapped(), port)),
            ] {
                let mut text = String::from("x");
                push_host_port(&mut text, addr);
                assert_eq!(text, format!("x{addr}"));
            }
        }
        for n in [0, 9, 10, 99, 100, 65535, u32::MAX] {
            let mut text = String::new();
            push_decimal(&mut text, n);
            assert_eq!(text, n.to_string());
        }
    }

    #[test]
    fn sip_uri_parts() {
        let u = Uri::parse(&bs(
            "sips:alice:pw@[2001:db8::1]:5061;transport=tls;lr?Subject=x",
        ))
        .unwrap();
        let Uri::Sip(u) = u else { panic!() };
        assert!(u.secure);
        assert_eq!(u.user.as_deref(), Some("alice"));
        assert_eq!(u.password.as_deref(), Some("pw"));
        assert_eq!(u.host, Host::V6("2001:db8::1".parse().unwrap()));
        assert_eq!(u.port, Some(5061));
        assert_eq!(u.transport(), Some("tls"));
        assert!(u.params.has("lr"));
        assert_eq!(u.headers.as_deref(), Some("Subject=x"));
        assert_eq!(
            u.to_string(),
            "sips:alice:pw@[2001:db8::1]:5061;transport=tls;lr?Subject=x"
        );
    }

    #[test]
    fn semicolon_in_user_part() {
        let Uri::Sip(u) = Uri::parse(&bs("sip:user;par=u%40example.net@example.com")).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            u.user_unescaped().unwrap(),
            b"user;par=u@example.net".to_vec()
        );
        assert_eq!(u.host, Host::Name(bs("example.com")));
    }

    #[test]
    fn equivalence_of_rfc_3261_19_1_4() {
        let sip = |s: &str| match Uri::parse(&bs(s)).unwrap() {
            Uri::Sip(u) => u,
            _ => panic!(),
        };
        let eq = |a: &str, b: &str| sip(a).equivalent(&sip(b));
        assert!(eq(
            "sip:%61lice@AtLanTa.com;transport=TCP",
            "sip:alice@atlanta.com;transport=tcp"
        ));
        assert!(eq(
            "sip:+19725552222@gw1.example.net;unknownparam",
            "sip:+19725552222@gw1.example.net"
        ));
        assert!(!eq("sip:alice@atlanta.com", "sip:alice@atlanta.com:5060"));
        assert!(!eq("sip:alice@atlanta.com", "sip:ALICE@atlanta.com"));
        assert!(!eq(
            "sip:bob@biloxi.com;transport=udp",
            "sip:bob@biloxi.com"
        ));
        assert!(!eq("sip:a@b;x=1", "sip:a@b;x=2"));
        assert!(eq("sip:a@b;x=1", "sip:a@b;y=2"));
    }

    #[test]
    fn tel_and_other_schemes() {
        assert!(matches!(
            Uri::parse(&bs("tel:+1-201-555-0123;phone-context=x")).unwrap(),
            Uri::Tel(_)
        ));
        assert!(matches!(
            Uri::parse(&bs("nobodyKnowsThisScheme:totallyopaquecontent")).unwrap(),
            Uri::Other { .. }
        ));
        assert!(Uri::parse(&bs("<sip:a@b>")).is_err());
        assert!(Uri::parse(&bs("sip:a@b; lr")).is_err());
        assert!(Uri::parse(&bs("sip:a@b:99999")).is_err());
    }

    #[test]
    fn name_addr_forms() {
        let n = NameAddr::parse(&bs(r#""J Rosenberg \\\""       <sip:jdrosen@example.com>
  ;
  tag = 98asjd8"#))
        .unwrap();
        assert_eq!(n.tag(), Some("98asjd8"));
        let n = NameAddr::parse(&bs(
            "sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n",
        ))
        .unwrap();
        assert_eq!(n.tag(), Some("1918181833n"));
        let n = NameAddr::parse(&bs("caller<sip:caller@example.com>;tag=323")).unwrap();
        assert_eq!(n.display.as_deref(), Some("caller"));
        assert!(NameAddr::parse(&bs(r#""Mr. J. User <sip:j.user@example.com>"#)).is_err());
        assert!(NameAddr::parse(&bs("Bell, Alexander <sip:a.g.bell@example.com>;tag=43")).is_err());
        assert!(NameAddr::parse(&bs(r#""Watson" < sip:t.watson@example.org >"#)).is_err());
        assert!(
            NameAddr::parse(&bs("sip:user@example.com?Route=%3Csip:sip.example.com%3E")).is_err()
        );
    }
}
