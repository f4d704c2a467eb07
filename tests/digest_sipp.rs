//! Interoperability of `lifeline::sip::digest` with SIPp (Debian package `sip-tester`).
//!
//! - Server side: SIPp registers (as UAC) with a tiny UDP registrar in this file, whose
//!   challenges come from [`Authenticator::challenge`] and which checks SIPp's answers with
//!   [`Authenticator::verify`]; right password → 200, wrong password → 403.
//! - Client side: SIPp (as UAS) challenges a REGISTER sent by this file and checks our
//!   [`Credentials::answer`] with its `verifyauth` action, replying 200 or 403.
//!
//! The registrar handles SIP with plain line splitting on purpose: it must not depend on
//! the project's own message parser. Everything stays on 127.0.0.0/8, every loop is bounded
//! and each SIPp run is killed after at most [`SIPP_DEADLINE`]. A missing SIPp fails the
//! tests (it is a required test tool), it does not skip them.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use lifeline::sip::digest::{
    Algorithm, AuthFailure, Authenticator, Challenge, Credentials, DigestError, Qop, ha1,
};

const SIPP: &str = "sipp";
/// Longest a SIPp run may take before the test kills it and fails.
const SIPP_DEADLINE: Duration = Duration::from_secs(25);
const REALM: &str = "lifeline.test";
const USER: &str = "alice";
const PASSWORD: &str = "correct-horse";

/// SIPp's version as (major, minor, patch); panics (failing the test) if SIPp is missing.
fn sipp_version() -> (u32, u32, u32) {
    // `sipp -v` exits with 99, so only its output matters.
    let out = Command::new(SIPP)
        .arg("-v")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("SIPp is required for this test (apt-get install -y sip-tester): {e}")
        });
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let v = text
        .split_once("SIPp v")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("unexpected `sipp -v` output: {text:?}"));
    let mut nums = v
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (
        nums.next().unwrap_or(0),
        nums.next().unwrap_or(0),
        nums.next().unwrap_or(0),
    )
}

/// A running SIPp, killed on drop; its output and traces go to files in a temp dir.
struct Sipp {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Sipp {
    /// Starts SIPp with scenario `xml` and the extra `args`.
    fn start(xml: &str, args: &[&str]) -> Sipp {
        let dir = tempfile::tempdir().expect("temp dir");
        let scenario = dir.path().join("scenario.xml");
        fs::write(&scenario, xml).expect("write scenario");
        let stdout = fs::File::create(dir.path().join("stdout.log")).expect("stdout log");
        let stderr = fs::File::create(dir.path().join("stderr.log")).expect("stderr log");
        let child = Command::new(SIPP)
            .arg("-sf")
            .arg(&scenario)
            .args(["-m", "1", "-timeout", "20s", "-timeout_error"])
            .args(["-nostdin", "-trace_err", "-trace_msg"])
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run SIPp (apt-get install -y sip-tester): {e}"));
        Sipp {
            child: Some(child),
            dir,
        }
    }

    /// Waits for SIPp to exit, killing it (and failing) after [`SIPP_DEADLINE`].
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + SIPP_DEADLINE;
        let child = self.child.as_mut().expect("SIPp already waited for");
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return status;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.child = None;
                    panic!("SIPp did not finish in time\n{}", self.logs());
                }
                Err(e) => panic!("waiting for SIPp: {e}"),
            }
        }
    }

    /// Everything SIPp wrote (stdout, stderr, error and message traces), for failures.
    fn logs(&self) -> String {
        logs_in(self.dir.path())
    }
}

fn logs_in(dir: &Path) -> String {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let mut out = String::new();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|x| x == "log"))
    {
        let text = fs::read(f).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        // The screen dumps repeat; the tail is what matters.
        let tail: String = {
            let chars: Vec<char> = text.chars().collect();
            chars[chars.len().saturating_sub(6000)..].iter().collect()
        };
        out += &format!("==== {} ====\n{tail}\n", f.display());
    }
    out
}

impl Drop for Sipp {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A SIP message split into start line, headers (name, value) in order, and body.
struct Msg {
    start: String,
    headers: Vec<(String, String)>,
}

impl Msg {
    fn parse(datagram: &[u8]) -> Option<Msg> {
        let text = std::str::from_utf8(datagram).ok()?;
        let head = text.split("\r\n\r\n").next()?;
        let mut lines = head.split("\r\n");
        let start = lines.next()?.to_owned();
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in lines {
            if line.starts_with([' ', '\t']) {
                // A folded continuation line.
                let (_, v) = headers.last_mut()?;
                v.push(' ');
                v.push_str(line.trim());
                continue;
            }
            let (name, value) = line.split_once(':')?;
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
        Some(Msg { start, headers })
    }

    /// Values of the header `name` (or its compact form), in order.
    fn all(&self, name: &str, compact: Option<&str>) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| {
                n.eq_ignore_ascii_case(name) || compact.is_some_and(|c| n.eq_ignore_ascii_case(c))
            })
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, name: &str, compact: Option<&str>) -> Option<&str> {
        self.all(name, compact).into_iter().next()
    }

    /// The status code of a response.
    fn status(&self) -> Option<u16> {
        let rest = self.start.strip_prefix("SIP/2.0 ")?;
        rest.get(..3)?.parse().ok()
    }
}

/// What the registrar saw.
#[derive(Default)]
struct Seen {
    challenges: usize,
    verified: Vec<Credentials>,
    failures: Vec<AuthFailure>,
    parse_errors: Vec<DigestError>,
}

/// A UDP registrar on 127.0.0.1, port chosen by the system, that answers REGISTER with
/// 401 + our challenge, then 200 or 403 depending on [`Authenticator::verify`].
struct Registrar {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Registrar {
    fn start(algorithm: Algorithm) -> Registrar {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind registrar");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let addr = sock.local_addr().expect("registrar address");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let auth = Authenticator::new(Duration::from_secs(30)).with_opaque("lifeline");
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            thread::spawn(move || serve(&sock, &auth, algorithm, &stop, &seen))
        };
        Registrar {
            addr,
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("registrar thread");
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    sock: &UdpSocket,
    auth: &Authenticator,
    algorithm: Algorithm,
    stop: &AtomicBool,
    seen: &Mutex<Seen>,
) {
    // Responses by Via branch and CSeq, so a retransmitted request gets the same answer
    // (re-verifying it would rightly be a replay).
    let mut answered: HashMap<String, Vec<u8>> = HashMap::new();
    let deadline = Instant::now() + SIPP_DEADLINE + Duration::from_secs(2);
    let mut buf = [0u8; 65_535];
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => panic!("registrar recv: {e}"),
        };
        let Some(req) = Msg::parse(&buf[..n]) else {
            continue;
        };
        let mut parts = req.start.split(' ');
        let (Some(method), Some(_uri), Some("SIP/2.0")) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue; // a response or garbage
        };
        let key = format!(
            "{}|{}",
            req.one("Via", Some("v")).unwrap_or(""),
            req.one("CSeq", None).unwrap_or("")
        );
        if let Some(resp) = answered.get(&key) {
            let _ = sock.send_to(resp, peer);
            continue;
        }
        let now = SystemTime::now();
        let (status, extra) = if method != "REGISTER" {
            ("405 Method Not Allowed", "Allow: REGISTER\r\n".to_owned())
        } else {
            match req.one("Authorization", None).map(Credentials::parse) {
                None | Some(Err(DigestError::NotDigest { .. })) => {
                    seen.lock().unwrap().challenges += 1;
                    let ch = auth.challenge(now, REALM, algorithm, false);
                    ("401 Unauthorized", format!("WWW-Authenticate: {ch}\r\n"))
                }
                Some(Err(e)) => {
                    seen.lock().unwrap().parse_errors.push(e);
                    ("400 Bad Authorization", String::new())
                }
                Some(Ok(creds)) => {
                    let r = auth.verify(now, &creds, method, REALM, |user, alg| {
                        (user == USER).then(|| ha1(alg, user, REALM, PASSWORD))
                    });
                    let mut s = seen.lock().unwrap();
                    match r {
                        Ok(()) => {
                            s.verified.push(creds.clone());
                            let contact = req.one("Contact", Some("m")).unwrap_or("*");
                            ("200 OK", format!("Contact: {contact};expires=60\r\n"))
                        }
                        Err(f) => {
                            s.failures.push(f);
                            ("403 Forbidden", String::new())
                        }
                    }
                }
            }
        };
        let resp = response(&req, status, &extra);
        let _ = sock.send_to(resp.as_bytes(), peer);
        answered.insert(key, resp.into_bytes());
    }
}

/// A response to `req` echoing Via, From, To (tagged), Call-ID and CSeq.
fn response(req: &Msg, status: &str, extra: &str) -> String {
    let mut r = format!("SIP/2.0 {status}\r\n");
    for via in req.all("Via", Some("v")) {
        r += &format!("Via: {via}\r\n");
    }
    r += &format!("From: {}\r\n", req.one("From", Some("f")).unwrap_or(""));
    let to = req.one("To", Some("t")).unwrap_or("");
    if to.contains(";tag=") {
        r += &format!("To: {to}\r\n");
    } else {
        r += &format!("To: {to};tag=lifeline-test\r\n");
    }
    r += &format!(
        "Call-ID: {}\r\n",
        req.one("Call-ID", Some("i")).unwrap_or("")
    );
    r += &format!("CSeq: {}\r\n", req.one("CSeq", None).unwrap_or(""));
    r += extra;
    r += "Content-Length: 0\r\n\r\n";
    r
}

/// SIPp UAC scenario: REGISTER, 401, REGISTER with credentials, then `final_status`.
fn uac_scenario(password: &str, final_status: u16) -> String {
    format!(
        r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="lifeline digest register">
  <send retrans="500">
    <![CDATA[
      REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      Max-Forwards: 70
      From: <sip:{USER}@[remote_ip]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:{USER}@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 1 REGISTER
      Contact: <sip:{USER}@[local_ip]:[local_port]>
      Expires: 60
      Content-Length: 0

    ]]>
  </send>
  <recv response="401" auth="true"/>
  <send retrans="500">
    <![CDATA[
      REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      Max-Forwards: 70
      From: <sip:{USER}@[remote_ip]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:{USER}@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 2 REGISTER
      Contact: <sip:{USER}@[local_ip]:[local_port]>
      Expires: 60
      [authentication username={USER} password={password}]
      Content-Length: 0

    ]]>
  </send>
  <recv response="{final_status}"/>
</scenario>
"#
    )
}

/// Runs SIPp as UAC against our registrar; returns what the registrar saw.
fn sipp_registers(password: &str, final_status: u16, local_ip: &str) -> Seen {
    sipp_version(); // fail early and clearly if SIPp is missing
    let registrar = Registrar::start(Algorithm::Md5);
    let target = registrar.addr.to_string();
    let mut sipp = Sipp::start(
        &uac_scenario(password, final_status),
        &[&target, "-i", local_ip, "-bind_local"],
    );
    let status = sipp.wait();
    let seen = registrar.finish();
    assert!(
        status.success(),
        "SIPp failed with {status}; registrar saw {} challenges, verified {:?}, failures {:?}, \
         parse errors {:?}\n{}",
        seen.challenges,
        seen.verified,
        seen.failures,
        seen.parse_errors,
        sipp.logs()
    );
    assert!(seen.parse_errors.is_empty(), "{:?}", seen.parse_errors);
    assert!(seen.challenges >= 1, "registrar never challenged");
    seen
}

#[test]
fn sipp_uac_registers_with_right_password() {
    let seen = sipp_registers(PASSWORD, 200, "127.0.0.2");
    assert!(seen.failures.is_empty(), "{:?}", seen.failures);
    let [creds] = seen.verified.as_slice() else {
        panic!("expected one verified REGISTER, got {:?}", seen.verified);
    };
    // SIPp took the qop=auth path and echoed what we sent.
    assert_eq!(creds.username, USER);
    assert_eq!(creds.realm, REALM);
    assert_eq!(creds.algorithm, Algorithm::Md5);
    assert_eq!(creds.qop, Some(Qop::Auth));
    assert_eq!(creds.nc, Some(1));
    assert_eq!(creds.opaque.as_deref(), Some("lifeline"));
}

#[test]
fn sipp_uac_with_wrong_password_gets_403() {
    let seen = sipp_registers("wrong-horse", 403, "127.0.0.3");
    assert!(seen.verified.is_empty(), "{:?}", seen.verified);
    assert_eq!(seen.failures, vec![AuthFailure::BadResponse]);
}

/// SIPp UAS scenario: 401 with `www_authenticate`, then 200 if `verifyauth` accepts the
/// credentials for (USER, PASSWORD), else 403.
fn uas_scenario(www_authenticate: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="lifeline digest client check">
  <recv request="REGISTER"/>
  <send>
    <![CDATA[
      SIP/2.0 401 Unauthorized
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      WWW-Authenticate: {www_authenticate}
      Content-Length: 0

    ]]>
  </send>
  <recv request="REGISTER">
    <action>
      <verifyauth assign_to="authvalid" username="{USER}" password="{PASSWORD}"/>
    </action>
  </recv>
  <nop hide="true" test="authvalid" next="goodauth"/>
  <send next="done">
    <![CDATA[
      SIP/2.0 403 Forbidden
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
  <label id="goodauth"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: [last_Contact:]
      Content-Length: 0

    ]]>
  </send>
  <label id="done"/>
</scenario>
"#
    )
}

/// A UDP port that was free on `ip` a moment ago.
fn free_udp_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .expect("probe a free port")
        .port()
}

/// Sends `req` to `to` until a final response arrives (bounded), returning it.
fn transact(sock: &UdpSocket, to: SocketAddr, req: &str) -> Msg {
    let mut buf = [0u8; 65_535];
    for _ in 0..40 {
        sock.send_to(req.as_bytes(), to).expect("send REGISTER");
        // A few reads per send: provisional responses or a slow start.
        for _ in 0..2 {
            match sock.recv_from(&mut buf) {
                Ok((n, _)) => {
                    if let Some(m) = Msg::parse(&buf[..n])
                        && m.status().is_some_and(|s| s >= 200)
                    {
                        return m;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
    }
    panic!("no final response from SIPp to:\n{req}");
}

fn register(local: SocketAddr, remote: SocketAddr, cseq: u32, auth: Option<&str>) -> String {
    let mut r = format!(
        "REGISTER sip:{remote} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-lifeline-{cseq}-{}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:{USER}@{remote}>;tag=lifeline-uac\r\n\
         To: <sip:{USER}@{remote}>\r\n\
         Call-ID: digest-client-check@{local}\r\n\
         CSeq: {cseq} REGISTER\r\n\
         Contact: <sip:{USER}@{local}>\r\n\
         Expires: 60\r\n",
        rand::random::<u32>()
    );
    if let Some(a) = auth {
        r += &format!("Authorization: {a}\r\n");
    }
    r += "Content-Length: 0\r\n\r\n";
    r
}

/// Runs SIPp as UAS on `sipp_ip` with challenge `www_authenticate`; REGISTERs with our
/// answer for `password`; returns the final status and the credentials we sent.
fn our_client_against_sipp(
    www_authenticate: &str,
    password: &str,
    sipp_ip: &str,
) -> (u16, Credentials) {
    let port = free_udp_port(sipp_ip);
    let port_s = port.to_string();
    let mut sipp = Sipp::start(
        &uas_scenario(www_authenticate),
        &["-i", sipp_ip, "-p", &port_s, "-bind_local"],
    );
    let remote: SocketAddr = format!("{sipp_ip}:{port}").parse().expect("SIPp address");
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind UAC");
    sock.set_read_timeout(Some(Duration::from_millis(250)))
        .expect("read timeout");
    let local = sock.local_addr().expect("UAC address");

    let first = transact(&sock, remote, &register(local, remote, 1, None));
    assert_eq!(first.status(), Some(401), "{}", sipp.logs());
    let header = first
        .one("WWW-Authenticate", None)
        .unwrap_or_else(|| panic!("401 without WWW-Authenticate\n{}", sipp.logs()));
    let challenge = Challenge::parse(header).expect("parse SIPp's challenge");
    let cnonce = format!("{:016x}", rand::random::<u64>());
    let uri = format!("sip:{remote}");
    let creds = Credentials::answer(&challenge, "REGISTER", &uri, USER, password, &cnonce, 1)
        .expect("answer SIPp's challenge");
    let second = transact(
        &sock,
        remote,
        &register(local, remote, 2, Some(&creds.to_string())),
    );
    let status = sipp.wait();
    assert!(
        status.success(),
        "SIPp failed with {status}\n{}",
        sipp.logs()
    );
    (second.status().unwrap_or(0), creds)
}

/// Whether the installed SIPp has `verifyauth` (SIPp 3.6 and later).
fn sipp_has_verifyauth() -> bool {
    let v = sipp_version();
    if v < (3, 6, 0) {
        // Older SIPp cannot check a client's answer, so the client-side case cannot run.
        eprintln!("SIPp {v:?} lacks <verifyauth>; skipping the client-side interop check");
        return false;
    }
    true
}

const SIPP_CHALLENGE_QOP: &str = r#"Digest realm="sipp.test", nonce="4c1f0e2a9b7d6c5e3f1a0b9c8d7e6f50", opaque="op4que", algorithm=MD5, qop="auth""#;

#[test]
fn our_answer_passes_sipp_verifyauth() {
    if !sipp_has_verifyauth() {
        return;
    }
    let (status, creds) = our_client_against_sipp(SIPP_CHALLENGE_QOP, PASSWORD, "127.0.0.4");
    assert_eq!(status, 200, "SIPp rejected {creds}");
    assert_eq!(creds.opaque.as_deref(), Some("op4que"));
    assert_eq!(creds.nc, Some(1));
}

#[test]
fn our_answer_without_qop_passes_sipp_verifyauth() {
    if !sipp_has_verifyauth() {
        return;
    }
    let challenge = r#"Digest realm="sipp.test", nonce="0f1e2d3c4b5a69788796a5b4c3d2e1f0""#;
    let (status, creds) = our_client_against_sipp(challenge, PASSWORD, "127.0.0.5");
    assert_eq!(status, 200, "SIPp rejected {creds}");
    assert_eq!(creds.qop, None);
}

#[test]
fn our_answer_with_wrong_password_fails_sipp_verifyauth() {
    if !sipp_has_verifyauth() {
        return;
    }
    let (status, creds) = our_client_against_sipp(SIPP_CHALLENGE_QOP, "wrong-horse", "127.0.0.6");
    assert_eq!(status, 403, "SIPp accepted {creds}");
}
