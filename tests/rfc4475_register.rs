//! The REG rows of the RFC 4475 torture corpus, completed: each REGISTER file goes to a running
//! carrier over UDP (inside a private network namespace, as in rfc4475_wire.rs: the Vias name
//! arbitrary hosts and answers go to 127.0.0.1:5060), is challenged with 401, and is sent again
//! as a new transaction with Digest credentials of a trunk group provisioned for its AOR user.
//! The 200 must list exactly the bindings the corpus README names.
//!
//! Everything on the test side is independent of the project's SIP code: requests are edited
//! with plain byte operations, answers are read with plain string handling, and the Digest
//! response is computed here with the `md-5` crate (RFC 2617 / RFC 3261 §22.4, qop=auth).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Carrier, header_of, in_private_netns, provision_trunk_group, rfc4475, status_of};
use md5::{Digest, Md5};

const REALM: &str = "lifeline";
const PASSWORD: &str = "t0rture-Passw0rd";

/// T1 = 2 ms, so Timer J (64·T1) is 128 ms: files sharing a transaction key (cparam01 and
/// cparam02) are not absorbed as retransmissions of one another when spaced 300 ms apart.
const CONFIG: &str = "[carrier]\nsip_listen = [\"udp:127.0.0.2:5060\"]\nt1_ms = 2\nt2_ms = 8\nt4_ms = 10\ntimer_d_ms = 20\n";

/// Longest wait for any answer.
const WAIT: Duration = Duration::from_secs(2);

/// A carrier with trunk groups provisioned, and the socket its answers reach.
struct Harness {
    carrier: Carrier,
    sock: UdpSocket,
    to: SocketAddr,
}

impl Harness {
    /// Provisions one trunk group per username (password [`PASSWORD`], realm "lifeline"),
    /// then starts the carrier on that data folder.
    fn new(usernames: &[&str]) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        for u in usernames {
            provision_trunk_group(dir.path(), u, PASSWORD);
        }
        let carrier = common::start_carrier_in(dir, CONFIG, 1);
        // Answers go to the Via's sent-by port, 5060 when absent: listen there.
        let sock = UdpSocket::bind("127.0.0.1:5060").unwrap();
        let to = carrier.addr("udp");
        Harness { carrier, sock, to }
    }

    /// Sends one datagram and collects what arrives until 150 ms after the first final
    /// response (at most [`WAIT`]), then for `linger` more.
    fn exchange(&self, datagram: &[u8], linger: Duration) -> Vec<String> {
        self.sock.send_to(datagram, self.to).unwrap();
        let mut got = Vec::new();
        let start = Instant::now();
        let mut final_at: Option<Instant> = None;
        let mut buf = [0u8; 65535];
        while start.elapsed() < WAIT
            && final_at.is_none_or(|t| t.elapsed() < Duration::from_millis(150) + linger)
        {
            self.sock
                .set_read_timeout(Some(Duration::from_millis(10)))
                .unwrap();
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if final_at.is_none() && status_of(text.as_bytes()).is_some_and(|c| c >= 200) {
                    final_at = Some(Instant::now());
                }
                got.push(text);
            }
        }
        got
    }

    /// Sends `datagram` and returns the one final response to it (by Call-ID and CSeq).
    fn request(&self, datagram: &[u8]) -> String {
        let got = self.exchange(datagram, Duration::ZERO);
        let call_id = call_id_of(datagram);
        let cseq = cseq_of(datagram);
        let finals: Vec<&String> = got
            .iter()
            .filter(|r| status_of(r.as_bytes()).is_some_and(|c| c >= 200))
            .filter(|r| call_id_of(r.as_bytes()) == call_id && cseq_of(r.as_bytes()) == cseq)
            .collect();
        assert_eq!(
            finals.len(),
            1,
            "expected one final response to\n{}\ngot {got:#?}\ncarrier log:\n{}",
            String::from_utf8_lossy(datagram),
            self.carrier.log()
        );
        finals[0].clone()
    }

    /// Sends `request` and expects 401 with a Digest challenge; returns it.
    fn challenged(&self, request: &[u8]) -> Challenge {
        let r = self.request(request);
        assert_eq!(
            status_of(r.as_bytes()),
            Some(401),
            "expected 401 to\n{}\ngot\n{r}",
            String::from_utf8_lossy(request)
        );
        Challenge::of(&r)
    }

    /// The full Digest round: `request` is challenged, then sent again (new branch, CSeq + 1,
    /// Authorization as `username`) and its final response returned.
    fn register(&self, request: &[u8], username: &str) -> String {
        let challenge = self.challenged(request);
        let retry = authorized_retry(request, 1, &challenge, username);
        self.request(&retry)
    }

    /// A REGISTER without Contact for `user@example.com` (a fetch of its bindings), with
    /// Digest credentials: returns the 200's bindings.
    fn fetch(&self, user: &str) -> Vec<Binding> {
        let n = next_id();
        let request = format!(
            "REGISTER sip:example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKfetch{n}\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{user}@example.com>;tag=fetch{n}\r\n\
             To: <sip:{user}@example.com>\r\n\
             Call-ID: fetch-{n}@127.0.0.1\r\n\
             CSeq: 1 REGISTER\r\n\
             Content-Length: 0\r\n\r\n"
        );
        let r = self.register(request.as_bytes(), user);
        assert_eq!(status_of(r.as_bytes()), Some(200), "fetch for {user}: {r}");
        bindings_of(&r)
    }

    fn finish(mut self) {
        assert!(
            self.carrier.alive(),
            "carrier died:\n{}",
            self.carrier.log()
        );
        let log = self.carrier.log();
        assert!(!log.contains("panicked"), "{log}");
    }
}

fn next_id() -> u32 {
    static N: AtomicU32 = AtomicU32::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

// === Reading messages (plain string handling) ===

/// The header section of a message (up to the first empty line), as text.
fn head_of(msg: &[u8]) -> String {
    let end = find(msg, b"\r\n\r\n").unwrap_or(msg.len());
    String::from_utf8_lossy(&msg[..end]).into_owned()
}

/// The values of every header line whose name is one of `names` (case-insensitive), each
/// line split at the commas that are outside quotes and `<>`.
fn values_of(msg: &str, names: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for line in head_of(msg.as_bytes()).split("\r\n").skip(1) {
        let Some((n, v)) = line.split_once(':') else {
            continue;
        };
        if !names.iter().any(|x| n.trim().eq_ignore_ascii_case(x)) {
            continue;
        }
        let (mut quoted, mut angle, mut cur) = (false, false, String::new());
        for ch in v.chars() {
            match ch {
                '"' if !angle => quoted = !quoted,
                '<' if !quoted => angle = true,
                '>' if !quoted => angle = false,
                ',' if !quoted && !angle => {
                    out.push(cur.trim().to_string());
                    cur.clear();
                    continue;
                }
                _ => {}
            }
            cur.push(ch);
        }
        if !cur.trim().is_empty() {
            out.push(cur.trim().to_string());
        }
    }
    out
}

fn call_id_of(msg: &[u8]) -> Option<String> {
    values_of(&String::from_utf8_lossy(msg), &["call-id", "i"])
        .into_iter()
        .next()
}

fn cseq_of(msg: &[u8]) -> Option<String> {
    values_of(&String::from_utf8_lossy(msg), &["cseq"])
        .into_iter()
        .next()
}

/// One Contact value of a 200: the URI inside `<>` and what follows the `>`.
#[derive(Debug, Clone, PartialEq)]
struct Binding {
    uri: String,
    params: String,
}

/// The bindings a 200 lists (Contact or `m`).
fn bindings_of(response: &str) -> Vec<Binding> {
    values_of(response, &["contact", "m"])
        .into_iter()
        .map(|v| {
            let lt = v
                .find('<')
                .unwrap_or_else(|| panic!("Contact without <>: {v}"));
            let gt = lt + v[lt..].find('>').unwrap_or_else(|| panic!("no >: {v}"));
            Binding {
                uri: v[lt + 1..gt].to_string(),
                params: v[gt + 1..].to_string(),
            }
        })
        .collect()
}

/// A Digest challenge, read from a 401's WWW-Authenticate (the MD5 one).
#[derive(Debug)]
struct Challenge {
    nonce: String,
    opaque: Option<String>,
}

impl Challenge {
    fn of(response: &str) -> Challenge {
        let head = head_of(response.as_bytes());
        let values = head.split("\r\n").filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case("www-authenticate")
                .then_some(v.trim())
        });
        for v in values {
            let Some(rest) = v.strip_prefix("Digest ") else {
                continue;
            };
            let params = auth_params(rest);
            let get = |k: &str| {
                params
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(k))
                    .map(|(_, v)| v.clone())
            };
            let alg = get("algorithm").unwrap_or_else(|| "MD5".into());
            if !alg.eq_ignore_ascii_case("MD5") {
                continue;
            }
            assert_eq!(get("realm").as_deref(), Some(REALM), "challenge: {v}");
            let qop = get("qop").unwrap_or_default();
            assert!(
                qop.split(',').any(|q| q.trim() == "auth"),
                "challenge without qop=auth: {v}"
            );
            assert!(
                get("stale").is_none(),
                "a first challenge is not stale: {v}"
            );
            let nonce = get("nonce").unwrap_or_default();
            assert!(!nonce.is_empty(), "challenge without a nonce: {v}");
            return Challenge {
                nonce,
                opaque: get("opaque"),
            };
        }
        panic!("no MD5 Digest challenge in\n{response}");
    }
}

/// `a="x", b=y` → [(a, x), (b, y)].
fn auth_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let eq = rest.find('=').expect("auth-param without =");
        let name = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(q) = rest.strip_prefix('"') {
            let end = q.find('"').expect("unterminated quoted auth-param");
            value = q[..end].to_string();
            rest = &q[end + 1..];
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest.trim_start().trim_start_matches(',').trim_start();
        out.push((name, value));
    }
    out
}

// === Writing the retry (plain byte operations) ===

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn md5_hex(s: &str) -> String {
    Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The same request as a new transaction: a new top Via branch (magic cookie kept), CSeq
/// number + `bump`, and a Digest `Authorization` for `username` answering `challenge`
/// inserted before the empty line that ends the headers. Every other octet is kept,
/// including anything after that empty line.
fn authorized_retry(original: &[u8], bump: u64, challenge: &Challenge, username: &str) -> Vec<u8> {
    let head_end = find(original, b"\r\n\r\n").expect("no end of headers");
    let head = std::str::from_utf8(&original[..head_end]).expect("ASCII headers");
    let mut lines: Vec<String> = head.split("\r\n").map(str::to_string).collect();
    let request_uri = lines[0].split(' ').nth(1).unwrap().to_string();

    let via = lines
        .iter()
        .position(|l| {
            l.split_once(':').is_some_and(|(n, _)| {
                n.trim().eq_ignore_ascii_case("via") || n.trim().eq_ignore_ascii_case("v")
            })
        })
        .expect("no Via");
    let at = lines[via].find("branch=").expect("no branch") + "branch=".len();
    let len = lines[via][at..]
        .find([';', ',', ' ', '\t'])
        .unwrap_or(lines[via].len() - at);
    assert!(lines[via][at..].starts_with("z9hG4bK"), "{}", lines[via]);
    lines[via].replace_range(
        at..at + len,
        &format!("z9hG4bKretry{}x{}", next_id(), std::process::id()),
    );

    let cseq = lines
        .iter()
        .position(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case("cseq"))
        })
        .expect("no CSeq");
    let colon = lines[cseq].find(':').unwrap() + 1;
    let start = colon
        + lines[cseq][colon..]
            .find(|c: char| c.is_ascii_digit())
            .unwrap();
    let end = start
        + lines[cseq][start..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap();
    let number: u64 = lines[cseq][start..end].parse().unwrap();
    lines[cseq].replace_range(start..end, &(number + bump).to_string());

    let nc = "00000001";
    let cnonce = format!("cn{}", next_id());
    let ha1 = md5_hex(&format!("{username}:{REALM}:{PASSWORD}"));
    let ha2 = md5_hex(&format!("REGISTER:{request_uri}"));
    let response = md5_hex(&format!(
        "{ha1}:{}:{nc}:{cnonce}:auth:{ha2}",
        challenge.nonce
    ));
    let mut auth = format!(
        "Authorization: Digest username=\"{username}\", realm=\"{REALM}\", nonce=\"{}\", \
         uri=\"{request_uri}\", response=\"{response}\", algorithm=MD5, qop=auth, nc={nc}, \
         cnonce=\"{cnonce}\"",
        challenge.nonce
    );
    if let Some(opaque) = &challenge.opaque {
        auth.push_str(&format!(", opaque=\"{opaque}\""));
    }
    lines.push(auth);

    let mut out = lines.join("\r\n").into_bytes();
    out.extend_from_slice(&original[head_end..]);
    out
}

fn uris(bindings: &[Binding]) -> Vec<&str> {
    bindings.iter().map(|b| b.uri.as_str()).collect()
}

// === The REG rows ===

/// escnull (§3.1.1.4): two distinct contacts `%00` and `%00%00`; the AOR `null-%00-null` is
/// not truncated at the NUL.
#[test]
fn escnull_binds_two_nul_contacts() {
    if !in_private_netns("escnull_binds_two_nul_contacts") {
        return;
    }
    // `null-` is the AOR truncated at its NUL: its credentials must not register it.
    let h = Harness::new(&["null-%00-null", "null-"]);
    let file = rfc4475("escnull");
    let challenge = h.challenged(&file);
    let wrong = h.request(&authorized_retry(&file, 1, &challenge, "null-"));
    assert_eq!(
        status_of(wrong.as_bytes()),
        Some(403),
        "authenticated as `null-`, the AOR `null-%00-null` must be refused:\n{wrong}"
    );
    // The file again, past Timer J (128 ms here), so that it is a new transaction with a
    // fresh challenge rather than a retransmission answered with the first 401.
    std::thread::sleep(Duration::from_millis(300));
    let challenge = h.challenged(&file);
    let ok = h.request(&authorized_retry(&file, 2, &challenge, "null-%00-null"));
    assert_eq!(status_of(ok.as_bytes()), Some(200), "{ok}");
    assert!(
        header_of(&ok, "To").is_some_and(|t| t.contains("sip:null-%00-null@example.com")),
        "{ok}"
    );
    let mut got = uris(&bindings_of(&ok))
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    got.sort();
    assert_eq!(
        got,
        ["sip:%00%00@host5.example.com", "sip:%00@host5.example.com"],
        "{ok}"
    );
    assert!(h.fetch("null-").is_empty(), "nothing bound for `null-`");
    h.finish();
}

/// dblreq (§3.1.1.8): the REGISTER binds one contact; the INVITE look-alike after its empty
/// body is noise, never answered, on the first send nor on the authorized retry.
#[test]
fn dblreq_binds_once_and_ignores_trailing_octets() {
    if !in_private_netns("dblreq_binds_once_and_ignores_trailing_octets") {
        return;
    }
    let h = Harness::new(&["j.user"]);
    let file = rfc4475("dblreq");
    let head_end = find(&file, b"\r\n\r\n").unwrap();
    assert_eq!(file.len() - head_end - 4, 450, "450 trailing octets");
    let quiet = Duration::from_millis(400);

    let first = h.exchange(&file, quiet);
    assert_eq!(first.len(), 1, "one answer, the 401: {first:#?}");
    assert_eq!(status_of(first[0].as_bytes()), Some(401), "{}", first[0]);
    let challenge = Challenge::of(&first[0]);

    let retry = authorized_retry(&file, 1, &challenge, "j.user");
    assert!(
        retry.ends_with(&file[head_end..]),
        "the trailing octets are kept byte-exact"
    );
    let second = h.exchange(&retry, quiet);
    assert_eq!(second.len(), 1, "one answer, the 200: {second:#?}");
    let ok = &second[0];
    assert_eq!(status_of(ok.as_bytes()), Some(200), "{ok}");
    assert!(
        ok.contains("dblreq.0ha0isndaksdj99sdfafnl3lk233412"),
        "{ok}"
    );
    assert!(ok.contains("CSeq: 9 REGISTER"), "{ok}");
    assert_eq!(
        uris(&bindings_of(ok)),
        ["sip:j.user@host.example.com"],
        "{ok}"
    );
    for r in first.iter().chain(&second) {
        assert!(
            !r.contains("dblreq.0ha0isnda977644900765") && status_of(r.as_bytes()) != Some(100),
            "the trailing INVITE was answered: {r}"
        );
    }
    h.finish();
}

/// cparam01 (§3.3.12): `unknownparam` is a contact parameter, never inside the bound URI.
#[test]
fn cparam01_contact_param_stays_outside_the_uri() {
    if !in_private_netns("cparam01_contact_param_stays_outside_the_uri") {
        return;
    }
    let h = Harness::new(&["watson"]);
    let ok = h.register(&rfc4475("cparam01"), "watson");
    assert_eq!(status_of(ok.as_bytes()), Some(200), "{ok}");
    let b = bindings_of(&ok);
    assert_eq!(uris(&b), ["sip:+19725552222@gw1.example.net"], "{ok}");
    assert!(!b[0].uri.contains("unknownparam"), "{ok}");
    // A later fetch shows the same.
    let fetched = h.fetch("watson");
    assert_eq!(uris(&fetched), ["sip:+19725552222@gw1.example.net"]);
    h.finish();
}

/// cparam02 (§3.3.13): `unknownparam` is a URI parameter and stays in the binding.
#[test]
fn cparam02_uri_param_stays_in_the_binding() {
    if !in_private_netns("cparam02_uri_param_stays_in_the_binding") {
        return;
    }
    let h = Harness::new(&["watson"]);
    let ok = h.register(&rfc4475("cparam02"), "watson");
    assert_eq!(status_of(ok.as_bytes()), Some(200), "{ok}");
    assert_eq!(
        uris(&bindings_of(&ok)),
        ["sip:+19725552222@gw1.example.net;unknownparam"],
        "{ok}"
    );
    assert!(
        !bindings_of(&ok)[0].params.contains("unknownparam"),
        "a URI parameter, not a contact parameter: {ok}"
    );
    let fetched = h.fetch("watson");
    assert_eq!(
        uris(&fetched),
        ["sip:+19725552222@gw1.example.net;unknownparam"]
    );
    h.finish();
}

/// cparam01 then cparam02 on one registrar: the contacts are equal under RFC 3261 §19.1.4
/// (a URI parameter present in only one URI is ignored), so the second updates the first.
#[test]
fn cparam01_then_cparam02_update_one_binding() {
    if !in_private_netns("cparam01_then_cparam02_update_one_binding") {
        return;
    }
    let h = Harness::new(&["watson"]);
    let first = h.register(&rfc4475("cparam01"), "watson");
    assert_eq!(status_of(first.as_bytes()), Some(200), "{first}");
    assert_eq!(bindings_of(&first).len(), 1, "{first}");
    // Same transaction key as cparam01's first send: wait past Timer J (128 ms here).
    std::thread::sleep(Duration::from_millis(300));
    let second = h.register(&rfc4475("cparam02"), "watson");
    assert_eq!(status_of(second.as_bytes()), Some(200), "{second}");
    let b = bindings_of(&second);
    assert_eq!(b.len(), 1, "still one binding: {second}");
    assert!(
        [
            "sip:+19725552222@gw1.example.net",
            "sip:+19725552222@gw1.example.net;unknownparam"
        ]
        .contains(&b[0].uri.as_str()),
        "{second}"
    );
    assert_eq!(h.fetch("watson").len(), 1);
    h.finish();
}

/// regescrt (§3.3.14): the escaped Route header stays in the bound contact URI.
#[test]
fn regescrt_keeps_the_escaped_header() {
    if !in_private_netns("regescrt_keeps_the_escaped_header") {
        return;
    }
    let h = Harness::new(&["user"]);
    let ok = h.register(&rfc4475("regescrt"), "user");
    assert_eq!(status_of(ok.as_bytes()), Some(200), "{ok}");
    let b = bindings_of(&ok);
    assert_eq!(
        uris(&b),
        ["sip:user@example.com?Route=%3Csip:sip.example.com%3E"],
        "{ok}"
    );
    assert!(!ok.contains("\r\nRoute:"), "never made a header: {ok}");
    h.finish();
}

/// regaut01 (§3.3.7): an Authorization of an unknown scheme gets a fresh Digest challenge
/// (not 400); a Digest retry (the unknown one still there) is a fetch: 200 with no Contact.
#[test]
fn regaut01_unknown_scheme_is_challenged() {
    if !in_private_netns("regaut01_unknown_scheme_is_challenged") {
        return;
    }
    let h = Harness::new(&["j.user"]);
    let file = rfc4475("regaut01");
    let ok = h.register(&file, "j.user");
    assert_eq!(status_of(ok.as_bytes()), Some(200), "{ok}");
    assert!(bindings_of(&ok).is_empty(), "no Contact: {ok}");
    h.finish();
}

/// regbadct (§3.1.2.13), unksm2 (§3.3.4), scalar02 (§3.1.2.4): 400 before any challenge,
/// and nothing bound, even when regbadct carries valid credentials.
#[test]
fn malformed_registers_get_400_and_bind_nothing() {
    if !in_private_netns("malformed_registers_get_400_and_bind_nothing") {
        return;
    }
    let h = Harness::new(&["user"]);
    for file in ["regbadct", "unksm2", "scalar02"] {
        let r = h.request(&rfc4475(file));
        assert_eq!(status_of(r.as_bytes()), Some(400), "{file}: {r}");
        assert!(
            header_of(&r, "WWW-Authenticate").is_none(),
            "{file}: no challenge: {r}"
        );
        assert!(bindings_of(&r).is_empty(), "{file}: {r}");
    }
    // regbadct again, with valid credentials for `user` (a nonce from another request).
    let fetch = "REGISTER sip:example.com SIP/2.0\r\n\
                 Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKnonce\r\n\
                 Max-Forwards: 70\r\n\
                 From: <sip:user@example.com>;tag=n\r\n\
                 To: <sip:user@example.com>\r\n\
                 Call-ID: nonce@127.0.0.1\r\n\
                 CSeq: 1 REGISTER\r\n\
                 Content-Length: 0\r\n\r\n";
    let challenge = h.challenged(fetch.as_bytes());
    let r = h.request(&authorized_retry(
        &rfc4475("regbadct"),
        1,
        &challenge,
        "user",
    ));
    assert_eq!(
        status_of(r.as_bytes()),
        Some(400),
        "regbadct authorized: {r}"
    );
    assert!(bindings_of(&r).is_empty(), "{r}");
    assert!(h.fetch("user").is_empty(), "nothing bound for `user`");
    h.finish();
}
