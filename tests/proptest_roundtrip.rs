//! Property tests of the SIP parser: generated, realistic requests and responses (compact and
//! random-case header names, folded values, Via lists comma-joined or on separate lines,
//! sip/sips/tel URIs, unknown methods and extension headers, bodies) parse to what was
//! generated, serialize back byte for byte, and parse again to the same message. Arbitrary
//! input (strings, bytes, damaged messages) never panics.

use std::net::{Ipv4Addr, Ipv6Addr};

use bytes::Bytes;
use bytestring::ByteString;
use lifeline::sip::message::{Frame, HeaderName, Message, Via, stream_frame};
use lifeline::sip::uri::{NameAddr, Uri};
use proptest::prelude::*;
use proptest::sample::select;

// === The model ===

/// One header line as it will be written.
#[derive(Debug, Clone)]
struct Line {
    /// The name as written (compact or full, any case).
    name: String,
    /// White space before and after the colon.
    pre: &'static str,
    post: &'static str,
    /// The value as written (folds included).
    value: String,
    /// The Via values on this line, when it is a Via line: (host as printed, port, branch).
    vias: Vec<ViaModel>,
}

#[derive(Debug, Clone, PartialEq)]
struct ViaModel {
    host: String,
    port: Option<u16>,
    branch: String,
}

#[derive(Debug, Clone)]
enum Start {
    Request { method: String, uri: String },
    Response { code: u16, reason: String },
}

#[derive(Debug, Clone)]
struct Generated {
    start: Start,
    lines: Vec<Line>,
    body: Vec<u8>,
    /// Whether a (correct) Content-Length line is among `lines`.
    has_length: bool,
    call_id: String,
    cseq: (u32, String),
    from_tag: Option<String>,
    to_tag: Option<String>,
}

impl Generated {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.start {
            Start::Request { method, uri } => {
                out.extend_from_slice(format!("{method} {uri} SIP/2.0\r\n").as_bytes())
            }
            Start::Response { code, reason } => {
                out.extend_from_slice(format!("SIP/2.0 {code} {reason}\r\n").as_bytes())
            }
        }
        for l in &self.lines {
            out.extend_from_slice(
                format!("{}{}:{}{}\r\n", l.name, l.pre, l.post, l.value).as_bytes(),
            );
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    fn vias(&self) -> Vec<ViaModel> {
        self.lines.iter().flat_map(|l| l.vias.clone()).collect()
    }
}

/// Header values compared modulo white space: folds and runs of SP/HTAB count as one space.
fn squash(v: &[u8]) -> String {
    String::from_utf8_lossy(v)
        .split([' ', '\t', '\r', '\n'])
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

// === Strategies ===

const KNOWN_METHODS: &[&str] = &[
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "PRACK",
    "SUBSCRIBE",
    "NOTIFY",
    "PUBLISH",
    "INFO",
    "REFER",
    "MESSAGE",
    "UPDATE",
];

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9.!%*_+`'~-]{1,12}"
}

fn method() -> BoxedStrategy<String> {
    prop_oneof![
        3 => select(KNOWN_METHODS).prop_map(str::to_string),
        1 => token(),
    ]
    .boxed()
}

/// `name` with each letter's case chosen at random.
fn random_case(name: &'static str) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<bool>(), name.len()).prop_map(move |up| {
        name.chars()
            .zip(up)
            .map(|(c, u)| {
                if u {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    })
}

/// A header name: as usually written, in random case, or compact (when it has a compact form).
fn header_name(full: &'static str, compact: Option<&'static str>) -> BoxedStrategy<String> {
    let mut choices: Vec<(u32, BoxedStrategy<String>)> = vec![
        (4, Just(full.to_string()).boxed()),
        (1, random_case(full).boxed()),
    ];
    if let Some(c) = compact {
        choices.push((2, random_case(c).boxed()));
    }
    proptest::strategy::Union::new_weighted(choices).boxed()
}

fn pre_colon() -> impl Strategy<Value = &'static str> {
    prop_oneof![8 => Just(""), 1 => Just(" "), 1 => Just("\t")]
}

fn post_colon() -> impl Strategy<Value = &'static str> {
    prop_oneof![8 => Just(" "), 1 => Just(""), 1 => Just("   "), 1 => Just("\t")]
}

fn line(name: BoxedStrategy<String>, value: BoxedStrategy<String>) -> BoxedStrategy<Line> {
    (name, pre_colon(), post_colon(), value)
        .prop_map(|(name, pre, post, value)| Line {
            name,
            pre,
            post,
            value,
            vias: vec![],
        })
        .boxed()
}

fn ipv4() -> impl Strategy<Value = String> {
    any::<[u8; 4]>().prop_map(|a| Ipv4Addr::from(a).to_string())
}

fn ipv6() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<[u16; 8]>().prop_map(Ipv6Addr::from),
        // Realistic: a /64 prefix and a short interface id, compressed when printed.
        (any::<u16>(), any::<u16>())
            .prop_map(|(a, b)| Ipv6Addr::new(0x2001, 0xdb8, a, 0, 0, 0, 0, b)),
    ]
    .prop_map(|a| format!("[{a}]"))
}

fn hostname() -> impl Strategy<Value = String> {
    "([a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\\.){0,3}[a-z]([a-z0-9-]{0,8}[a-z0-9])?"
}

fn host() -> BoxedStrategy<String> {
    prop_oneof![3 => ipv4(), 1 => ipv6(), 2 => hostname()].boxed()
}

fn port() -> impl Strategy<Value = Option<u16>> {
    prop::option::weighted(0.6, prop_oneof![Just(5060u16), Just(5061), 1..=65535u16])
}

fn hostport() -> impl Strategy<Value = String> {
    (host(), port()).prop_map(|(h, p)| match p {
        Some(p) => format!("{h}:{p}"),
        None => h,
    })
}

fn uri_params() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just(";transport=udp".to_string()),
            Just(";transport=TCP".to_string()),
            Just(";lr".to_string()),
            Just(";user=phone".to_string()),
            (
                "[a-z][a-z0-9-]{0,7}",
                prop::option::of("[A-Za-z0-9.-]{1,10}")
            )
                .prop_map(|(n, v)| {
                    match v {
                        Some(v) => format!(";{n}={v}"),
                        None => format!(";{n}"),
                    }
                }),
        ],
        0..3,
    )
    .prop_map(|v| v.concat())
}

/// A sip, sips or tel URI; `params` false leaves out URI parameters (for addr-spec forms).
fn uri(params: bool) -> BoxedStrategy<String> {
    let user = prop_oneof![
        "[A-Za-z0-9_.!~*'()-]{1,12}",
        "\\+?[0-9]{3,15}",
        "[a-z]{1,6}%40[a-z]{1,6}",
    ];
    let password = prop::option::weighted(0.1, "[A-Za-z0-9]{1,8}");
    let scheme = prop_oneof![6 => Just("sip"), 1 => Just("sips"), 1 => Just("SIP")];
    let sip = (
        scheme,
        prop::option::weighted(0.8, (user, password)),
        hostport(),
        if params {
            uri_params().boxed()
        } else {
            Just(String::new()).boxed()
        },
    )
        .prop_map(|(scheme, userinfo, hp, params)| {
            let userinfo = match userinfo {
                Some((u, Some(p))) => format!("{u}:{p}@"),
                Some((u, None)) => format!("{u}@"),
                None => String::new(),
            };
            format!("{scheme}:{userinfo}{hp}{params}")
        });
    let tel = (
        prop_oneof![
            "\\+[1-9][0-9]{4,14}",
            "[0-9]{3,8}",
            "\\+1-[0-9]{3}-555-[0-9]{4}"
        ],
        if params {
            prop::option::of(hostname()).boxed()
        } else {
            Just(None).boxed()
        },
    )
        .prop_map(|(n, ctx)| match ctx {
            Some(c) => format!("tel:{n};phone-context={c}"),
            None => format!("tel:{n}"),
        });
    prop_oneof![5 => sip, 1 => tel].boxed()
}

fn display_name() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(
        0.5,
        prop_oneof![
            "\"[A-Za-z0-9 .,'()-]{0,16}\"",
            "\"[A-Za-z]{1,6} \\\\\"[A-Za-z]{1,6}\\\\\"\"",
            "[A-Za-z0-9]{1,8}( [A-Za-z0-9]{1,8}){0,2}",
        ],
    )
}

/// ` ; name = value` with the separators' white space RFC 3261 allows.
fn header_param(name: &'static str, value: String) -> impl Strategy<Value = String> {
    prop_oneof![6 => Just((";", "=")), 1 => Just((" ; ", " = ")), 1 => Just((" ;", "= "))]
        .prop_map(move |(semi, eq)| format!("{semi}{name}{eq}{value}"))
}

/// A From/To/Contact value; returns the text and the tag written.
fn name_addr(tag: BoxedStrategy<Option<String>>) -> BoxedStrategy<(String, Option<String>)> {
    (display_name(), any::<bool>(), uri(true), uri(false), tag)
        .prop_flat_map(|(display, angle, with_params, bare, tag)| {
            let text = match display {
                Some(d) => format!("{d} <{with_params}>"),
                None if angle => format!("<{with_params}>"),
                None => bare,
            };
            let tag_str = match tag.clone() {
                Some(t) => header_param("tag", t).boxed(),
                None => Just(String::new()).boxed(),
            };
            (Just(text), tag_str, Just(tag))
        })
        .prop_map(|(text, tag_str, tag)| (format!("{text}{tag_str}"), tag))
        .boxed()
}

fn tag() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9]{6,12}",
        "as[0-9a-f]{8}",
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}"
    ]
}

fn via_value() -> impl Strategy<Value = (String, ViaModel)> {
    (
        prop_oneof![Just("SIP/2.0/"), Just("SIP / 2.0 / "), Just("sip/2.0/")],
        select(&["UDP", "TCP", "TLS", "SCTP", "WS", "udp"][..]),
        host(),
        port(),
        prop_oneof![
            8 => "z9hG4bK[A-Za-z0-9.-]{1,24}",
            1 => "z9hG4bKPj[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            1 => "[0-9a-f]{4,12}",
        ],
        prop_oneof![
            Just(""),
            Just(";rport"),
            Just(";rport=40000"),
            Just(";received=192.0.2.9")
        ],
        any::<bool>(),
    )
        .prop_map(
            |(proto, transport, host, port, branch, extra, rport_first)| {
                let hp = match port {
                    Some(p) => format!("{host}:{p}"),
                    None => host.clone(),
                };
                let params = if rport_first {
                    format!("{extra};branch={branch}")
                } else {
                    format!(";branch={branch}{extra}")
                };
                (
                    format!("{proto}{transport} {hp}{params}"),
                    ViaModel { host, port, branch },
                )
            },
        )
}

/// 1–4 Via values, grouped into lines (comma-joined, sometimes folded after the comma).
fn via_lines() -> BoxedStrategy<Vec<Line>> {
    (
        prop::collection::vec(via_value(), 1..=4),
        prop::collection::vec(any::<bool>(), 3),
        prop::collection::vec(
            (
                header_name("Via", Some("v")),
                pre_colon(),
                post_colon(),
                select(&[", ", ",", " , ", ",\r\n ", ",\r\n\t"][..]),
            ),
            4,
        ),
    )
        .prop_map(|(values, join, looks)| {
            let mut lines: Vec<Line> = Vec::new();
            for (i, (text, model)) in values.into_iter().enumerate() {
                let (name, pre, post, comma) = looks[i].clone();
                if i > 0 && join[i - 1] {
                    let l = lines.last_mut().unwrap();
                    l.value = format!("{}{comma}{text}", l.value);
                    l.vias.push(model);
                } else {
                    lines.push(Line {
                        name,
                        pre,
                        post,
                        value: text,
                        vias: vec![model],
                    });
                }
            }
            lines
        })
        .boxed()
}

/// An extension header: a token name that is not one this element knows, and a printable
/// value (UTF-8 included), its words joined by spaces or folds.
fn extension_line() -> BoxedStrategy<Line> {
    let name = prop_oneof![
        "X-[A-Za-z0-9-]{1,12}",
        "P-[A-Z][a-z]{2,8}-[A-Z][a-z]{2,8}",
        token(),
    ]
    .prop_filter("a header this element knows", |n| {
        matches!(
            HeaderName::parse(&ByteString::from(n.as_str())),
            HeaderName::Other(_)
        )
    });
    let word = prop_oneof![8 => "[!-~]{1,10}", 1 => "[!-~é€ü日本]{1,6}"];
    let sep = prop_oneof![6 => Just(" "), 1 => Just("\r\n "), 1 => Just("\r\n\t"), 1 => Just("  \r\n   "), 1 => Just("\t")];
    let value = prop::collection::vec((word, sep), 0..6).prop_map(|ws| {
        let mut v = String::new();
        for (i, (w, s)) in ws.into_iter().enumerate() {
            if i > 0 {
                v.push_str(s);
            }
            v.push_str(&w);
        }
        v
    });
    line(name.boxed(), value.boxed())
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(Vec::new()),
        2 => (ipv4(), 1000u32..65000, 10000u16..20000).prop_map(|(ip, id, port)| {
            format!(
                "v=0\r\no=- {id} {id} IN IP4 {ip}\r\ns=Asterisk\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
                 m=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\n\
                 a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
            )
            .into_bytes()
        }),
        1 => prop::collection::vec(any::<u8>(), 1..300),
    ]
}

fn call_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9.!%*_+`'~()<>:/?{}-]{1,24}",
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        ("[0-9]{6,20}", hostname()).prop_map(|(a, h)| format!("{a}@{h}")),
    ]
}

fn start() -> BoxedStrategy<Start> {
    prop_oneof![
        3 => (method(), uri(true)).prop_map(|(method, uri)| Start::Request { method, uri }),
        2 => (100u16..700, prop_oneof![
            select(&["OK", "Trying", "Ringing", "Session Progress", "Busy Here", "Unauthorized", ""][..])
                .prop_map(str::to_string),
            "[ -~]{0,24}",
            "[A-Za-zé ]{1,16}",
        ])
            .prop_map(|(code, reason)| Start::Response { code, reason }),
    ]
    .boxed()
}

/// Whole messages, most with a Content-Length.
fn message() -> BoxedStrategy<Generated> {
    message_with(prop::bool::weighted(0.9).boxed())
}

/// Whole messages; `has_length` decides whether they carry a Content-Length.
fn message_with(has_length: BoxedStrategy<bool>) -> BoxedStrategy<Generated> {
    (start(), method())
        .prop_flat_map(move |(start, cseq_method)| {
            // A request's CSeq carries its method; a response's may be anything.
            let cseq_method = match &start {
                Start::Request { method, .. } => method.clone(),
                Start::Response { .. } => cseq_method,
            };
            let to_tag = match &start {
                Start::Request { .. } => prop::option::weighted(0.3, tag()).boxed(),
                Start::Response { .. } => prop::option::weighted(0.8, tag()).boxed(),
            };
            let from_tag = prop::option::weighted(0.9, tag()).boxed();
            (
                Just(start),
                Just(cseq_method),
                via_lines(),
                name_addr(from_tag),
                name_addr(to_tag),
                call_id(),
                prop_oneof![9 => any::<u32>().prop_map(|n| n.to_string()), 1 => "0[0-9]{1,4}"],
                (
                    header_name("From", Some("f")),
                    header_name("To", Some("t")),
                    header_name("Call-ID", Some("i")),
                    header_name("CSeq", None),
                    header_name("Contact", Some("m")),
                    header_name("Content-Type", Some("c")),
                    header_name("Supported", Some("k")),
                    header_name("Content-Length", Some("l")),
                ),
                (
                    prop::option::weighted(0.7, 0u8..=255),
                    prop::option::weighted(0.6, name_addr(Just(None).boxed())),
                    prop::option::weighted(0.5, "[a-z]{3,9}(, [a-z]{3,9}){0,4}"),
                    prop::collection::vec(extension_line(), 0..4),
                    body(),
                    has_length.clone(),
                    prop::bool::weighted(0.3),
                    prop::collection::vec((pre_colon(), post_colon()), 9),
                ),
            )
        })
        .prop_flat_map(
            |(
                start,
                cseq_method,
                vias,
                (from, from_tag),
                (to, to_tag),
                call_id,
                seq,
                names,
                (max_forwards, contact, supported, extensions, body, has_length, shuffle, seps),
            )| {
                let (n_from, n_to, n_call_id, n_cseq, n_contact, n_ctype, n_supported, n_length) =
                    names;
                let mut lines = vias;
                let push = |lines: &mut Vec<Line>, name: String, value: String, i: usize| {
                    lines.push(Line {
                        name,
                        pre: seps[i].0,
                        post: seps[i].1,
                        value,
                        vias: vec![],
                    })
                };
                if let Some(mf) = max_forwards {
                    push(&mut lines, "Max-Forwards".into(), mf.to_string(), 0);
                }
                push(&mut lines, n_from, from, 1);
                push(&mut lines, n_to, to, 2);
                push(&mut lines, n_call_id, call_id.clone(), 3);
                push(&mut lines, n_cseq, format!("{seq} {cseq_method}"), 4);
                if let Some((c, _)) = contact {
                    push(&mut lines, n_contact, c, 5);
                }
                if let Some(s) = supported {
                    push(&mut lines, n_supported, s, 6);
                }
                if !body.is_empty() {
                    push(&mut lines, n_ctype, "application/sdp".into(), 7);
                }
                lines.push(Line {
                    name: "User-Agent".into(),
                    pre: "",
                    post: " ",
                    value: "FPBX-16.0.40(18.20.0)".into(),
                    vias: vec![],
                });
                lines.extend(extensions);
                if has_length {
                    push(&mut lines, n_length, body.len().to_string(), 8);
                }
                let generated = Generated {
                    start,
                    lines: lines.clone(),
                    body,
                    has_length,
                    call_id,
                    cseq: (seq.parse().unwrap(), cseq_method),
                    from_tag,
                    to_tag,
                };
                let order = if shuffle {
                    Just(lines).prop_shuffle().boxed()
                } else {
                    Just(lines).boxed()
                };
                (Just(generated), order)
            },
        )
        .prop_map(|(mut g, lines)| {
            g.lines = lines;
            g
        })
        .boxed()
}

// === Checks ===

fn parse(bytes: &[u8]) -> Message {
    match Message::parse(Bytes::copy_from_slice(bytes)) {
        Ok(m) => m,
        Err(e) => panic!(
            "does not parse ({}): {}",
            e.reason,
            String::from_utf8_lossy(bytes)
        ),
    }
}

fn same_routing(a: &Message, b: &Message) {
    assert_eq!(a.start(), b.start());
    assert_eq!(a.method(), b.method());
    assert_eq!(a.status(), b.status());
    assert_eq!(a.call_id(), b.call_id());
    assert_eq!(a.cseq(), b.cseq());
    assert_eq!(a.from(), b.from());
    assert_eq!(a.to(), b.to());
    assert_eq!(a.vias(), b.vias());
    assert_eq!(a.max_forwards(), b.max_forwards());
    assert_eq!(a.body(), b.body());
}

/// The parsed message is what the model says.
fn matches_model(m: &Message, g: &Generated) {
    match &g.start {
        Start::Request { method, uri } => {
            assert_eq!(m.method().as_str(), method);
            assert_eq!(m.status(), None);
            assert_eq!(
                m.uri(),
                Some(&Uri::parse(&ByteString::from(uri.as_str())).unwrap())
            );
        }
        Start::Response { code, .. } => assert_eq!(m.status(), Some(*code)),
    }
    assert_eq!(m.call_id(), g.call_id);
    assert_eq!(m.cseq().seq, g.cseq.0);
    assert_eq!(m.cseq().method.as_str(), g.cseq.1);
    assert_eq!(m.from().tag(), g.from_tag.as_deref());
    assert_eq!(m.to().tag(), g.to_tag.as_deref());
    let vias = g.vias();
    assert_eq!(m.vias().len(), vias.len());
    for (got, want) in m.vias().iter().zip(&vias) {
        assert_eq!(got.host.to_string(), want.host);
        assert_eq!(got.port, want.port);
        assert_eq!(got.branch(), Some(want.branch.as_str()));
    }
    assert_eq!(m.body().as_ref(), g.body.as_slice());
    // Every header line, in order, with its name and value.
    assert_eq!(m.headers().len(), g.lines.len());
    for (h, l) in m.headers().iter().zip(&g.lines) {
        assert_eq!(
            h.name,
            HeaderName::parse(&ByteString::from(l.name.as_str()))
        );
        assert_eq!(
            squash(h.value()),
            squash(l.value.as_bytes()),
            "value of {}",
            l.name
        );
        // Trimmed, folds inside kept.
        assert_eq!(h.value(), l.value.trim_matches([' ', '\t']).as_bytes());
    }
}

fn never_panics(bytes: &[u8]) {
    let _ = Message::parse(Bytes::copy_from_slice(bytes));
    let mut rest = bytes;
    while let Ok(Frame::KeepAlive { len, .. } | Frame::Message { len }) = stream_frame(rest) {
        assert!(
            len > 0 && len <= rest.len(),
            "frame of {len} in {}",
            rest.len()
        );
        let _ = Message::parse(Bytes::copy_from_slice(&rest[..len]));
        rest = &rest[len..];
    }
    if let Ok(s) = std::str::from_utf8(bytes) {
        let s = ByteString::from(s);
        let _ = Uri::parse(&s);
        let _ = NameAddr::parse(&s);
        let _ = Via::parse(&s);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// parse → to_bytes → parse keeps every header and the routing fields; with a correct
    /// Content-Length the bytes are the input's.
    #[test]
    fn generated_messages_round_trip(g in message()) {
        let input = g.bytes();
        let m = parse(&input);
        matches_model(&m, &g);

        let out = m.to_bytes();
        if g.has_length {
            prop_assert_eq!(
                out.as_ref(),
                input.as_slice(),
                "to_bytes() differs from the input:\n{}\n---\n{}",
                String::from_utf8_lossy(&input),
                String::from_utf8_lossy(&out)
            );
        }
        let again = parse(&out);
        same_routing(&m, &again);
        if g.has_length {
            prop_assert_eq!(&m, &again);
        } else {
            // to_bytes() states the length: exactly one Content-Length is added, at the end.
            prop_assert_eq!(again.headers().len(), m.headers().len() + 1);
            let last = again.headers().last().unwrap();
            prop_assert_eq!(&last.name, &HeaderName::ContentLength);
            let stated = g.body.len().to_string();
            prop_assert_eq!(last.value(), stated.as_bytes());
        }
        for (a, b) in m.headers().iter().zip(again.headers()) {
            prop_assert_eq!(&a.name, &b.name);
            prop_assert_eq!(a.value(), b.value());
        }
        // Serializing is then a fixed point.
        prop_assert_eq!(again.to_bytes(), out);
    }

    /// The same messages as a TCP stream, back to back: each frame is one whole message.
    #[test]
    fn stream_frames_generated_messages(
        a in message_with(Just(true).boxed()),
        b in message_with(Just(true).boxed()),
    ) {
        let (a, b) = (a.bytes(), b.bytes());
        let stream = [a.as_slice(), b"\r\n\r\n", b.as_slice()].concat();
        prop_assert_eq!(stream_frame(&stream), Ok(Frame::Message { len: a.len() }));
        prop_assert_eq!(
            stream_frame(&stream[a.len()..]),
            Ok(Frame::KeepAlive { len: 4, ping: true })
        );
        prop_assert_eq!(stream_frame(&stream[a.len() + 4..]), Ok(Frame::Message { len: b.len() }));
        for cut in [1, a.len() / 2, a.len() - 1] {
            prop_assert_eq!(stream_frame(&a[..cut]), Ok(Frame::Incomplete));
        }
    }

    /// Any string: no panic.
    #[test]
    fn any_string_never_panics(s in ".{0,600}") {
        never_panics(s.as_bytes());
    }

    /// Any bytes: no panic.
    #[test]
    fn any_bytes_never_panics(b in prop::collection::vec(any::<u8>(), 0..1200)) {
        never_panics(&b);
    }

    /// Damaged real messages (cut, bytes changed, separators inserted): no panic.
    #[test]
    fn damaged_messages_never_panic(
        g in message(),
        edits in prop::collection::vec(
            (any::<prop::sample::Index>(), 0u8..4, select(&b"\r\n :;,<>\"@[]/=\t0"[..])),
            1..6,
        ),
    ) {
        let mut b = g.bytes();
        for (at, kind, byte) in edits {
            if b.is_empty() {
                break;
            }
            let i = at.index(b.len());
            match kind {
                0 => b.truncate(i),
                1 => b[i] = byte,
                2 => b.insert(i, byte),
                _ => {
                    b.remove(i);
                }
            }
        }
        never_panics(&b);
    }
}

// === Fuzzing findings (fuzz/README.md), kept as regression tests ===

const HEAD: &str = "OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
From: <sip:a@b>;tag=1\r\nTo: <sip:b@b>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS";

/// A datagram whose last header line has no CRLF (no empty line either): `to_bytes()` must not
/// glue Content-Length onto that line.
#[test]
fn unterminated_last_header_survives_to_bytes() {
    for tail in ["\r\nX-Foo: bar", ""] {
        let input = format!("{HEAD}{tail}");
        let m = parse(input.as_bytes());
        let again = parse(&m.to_bytes());
        assert_eq!(again.headers().len(), m.headers().len() + 1, "{input:?}");
        assert_eq!(
            again.header(&HeaderName::ContentLength).unwrap().value(),
            b"0"
        );
        same_routing(&m, &again);
    }
}

/// A head whose last line ends with a bare LF: what `to_bytes()` makes of it must still be
/// framed over a stream (the head must end with CRLF CRLF).
#[test]
fn bare_lf_head_is_framed_after_to_bytes() {
    for input in [
        format!("{HEAD}\r\nContent-Length: 0\n\n"),
        format!("{HEAD}\r\nContent-Length: 0\n"),
        format!("{HEAD}\r\nContent-Length: 0\r\n").replace("\r\n", "\n") + "\n",
    ] {
        let out = parse(input.as_bytes()).to_bytes();
        assert_eq!(
            stream_frame(&out),
            Ok(Frame::Message { len: out.len() }),
            "{input:?} -> {out:?}"
        );
    }
}

/// A To in addr-spec form with a non-SIP URI holding '>': once tagged it could not be written
/// back (`<urn:x>y>`), so such a URI is refused on receipt (RFC 3986 §2 never allows an
/// unescaped '>'), and the request gets its 400.
#[test]
fn a_uri_with_an_angle_bracket_is_refused() {
    let input = HEAD.replace("To: <sip:b@b>", "To: urn:x>y") + "\r\nContent-Length: 0\r\n\r\n";
    let err = Message::parse(Bytes::from(input)).unwrap_err();
    assert_eq!(err.status, 400);
    assert!(err.request.is_some(), "a 400 can still be formed");
}
