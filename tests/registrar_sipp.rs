//! The registrar end to end: a real `lifeline-carrier` driven by SIPp (Debian package
//! `sip-tester`) as the PBX. SIPp registers with MD5 digest over UDP and TCP; each step of a
//! test is one SIPp run of a scenario built here ([`Register`]), so the test reads as the
//! sequence of REGISTERs it sends and what each 200 must (or must not) list.
//!
//! What the carrier answered is checked twice: by SIPp itself (`ereg` checks in the scenario,
//! the expected status) and here, from SIPp's message trace ([`bindings`]).
//!
//! Each test has its own carrier, data folder and 127.0.6x.0/24 block. Every SIPp run is bound
//! by `-timeout` and killed after [`SIPP_DEADLINE`]; every wait is bounded. A missing SIPp
//! fails the tests, it does not skip them.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Carrier, admin, provision_trunk_group, start_carrier_in, terminate};

const SIPP: &str = "sipp";
/// Longest a SIPp run may take before it is killed and the test fails.
const SIPP_DEADLINE: Duration = Duration::from_secs(25);
const PASSWORD: &str = "s3cret-Pa55";

/// A carrier config on `ip` (UDP and TCP, free ports) with short timers, plus `extra` keys.
fn config(ip: &str, extra: &str) -> String {
    format!(
        "[carrier]\nname = \"t\"\nsip_listen = [\"udp:{ip}:0\", \"tcp:{ip}:0\"]\n\
         t1_ms = 50\nt2_ms = 200\nt4_ms = 250\ntimer_d_ms = 500\n\
         config_poll_ms = 100\nbindings_flush_ms = 50\n{extra}"
    )
}

/// Starts a carrier on `ip` whose store holds one trunk group (`user`, [`PASSWORD`]).
fn carrier_with_trunk_group(ip: &str, user: &str, extra: &str) -> Carrier {
    let dir = tempfile::tempdir().unwrap();
    provision_trunk_group(dir.path(), user, PASSWORD);
    start_carrier_in(dir, &config(ip, extra), 2)
}

// === Scenarios ===

/// One registration as a SIPp UAC scenario: REGISTER, 401 with a challenge, REGISTER with
/// the digest answer, then the final response `status`, on which the `ereg` checks run.
struct Register {
    user: String,
    /// Contact header values; none makes it a query.
    contacts: Vec<String>,
    expires: Option<u32>,
    status: u16,
    /// (POSIX extended regex over the whole final response, whether it must match).
    checks: Vec<(String, bool)>,
}

impl Register {
    fn new(user: &str) -> Register {
        Register {
            user: user.to_string(),
            contacts: Vec::new(),
            expires: None,
            status: 200,
            checks: Vec::new(),
        }
    }

    fn contact(mut self, value: &str) -> Register {
        self.contacts.push(value.to_string());
        self
    }

    /// The Expires header.
    fn expires(mut self, seconds: u32) -> Register {
        self.expires = Some(seconds);
        self
    }

    /// The final status expected after the challenge (200 unless told).
    fn answered(mut self, status: u16) -> Register {
        self.status = status;
        self
    }

    /// The final response must match `regex`.
    fn has(mut self, regex: &str) -> Register {
        self.checks.push((regex.to_string(), true));
        self
    }

    /// The final response must not match `regex`.
    fn lacks(mut self, regex: &str) -> Register {
        self.checks.push((regex.to_string(), false));
        self
    }

    fn request(&self, cseq: u32, authorization: bool) -> String {
        let user = &self.user;
        let mut r = format!(
            "REGISTER sip:[remote_ip]:[remote_port] SIP/2.0\n\
             Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]\n\
             From: <sip:{user}@[remote_ip]>;tag=[pid]SIPpTag00[call_number]\n\
             To: <sip:{user}@[remote_ip]>\n\
             Call-ID: [call_id]\n\
             CSeq: {cseq} REGISTER\n"
        );
        for c in &self.contacts {
            r += &format!("Contact: {c}\n");
        }
        if authorization {
            r += "[authentication]\n";
        }
        if let Some(e) = self.expires {
            r += &format!("Expires: {e}\n");
        }
        r += "Max-Forwards: 70\nContent-Length: 0\n\n";
        r
    }

    fn xml(&self) -> String {
        let mut actions = String::new();
        let mut vars = Vec::new();
        for (i, (regex, present)) in self.checks.iter().enumerate() {
            let check = if *present {
                "check_it"
            } else {
                "check_it_inverse"
            };
            actions += &format!(
                "      <ereg regexp=\"{}\" search_in=\"msg\" {check}=\"true\" assign_to=\"c{i}\"/>\n",
                xml_attr(regex)
            );
            vars.push(format!("c{i}"));
        }
        let final_recv = if vars.is_empty() {
            format!("  <recv response=\"{}\"/>\n", self.status)
        } else {
            // SIPp refuses a variable that is assigned and never used.
            format!(
                "  <recv response=\"{}\">\n    <action>\n{actions}    </action>\n  </recv>\n  \
                 <Reference variables=\"{}\"/>\n",
                self.status,
                vars.join(",")
            )
        };
        format!(
            "<?xml version=\"1.0\" encoding=\"ISO-8859-1\" ?>\n\
             <scenario name=\"lifeline registrar\">\n\
             \x20 <send retrans=\"500\"><![CDATA[\n{}]]></send>\n\
             \x20 <recv response=\"401\" auth=\"true\"/>\n\
             \x20 <send retrans=\"500\"><![CDATA[\n{}]]></send>\n\
             {final_recv}\
             </scenario>\n",
            self.request(1, false),
            self.request(2, true),
        )
    }
}

fn xml_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `s` as a POSIX extended regex matching itself.
fn lit(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.[]()*+?{}|^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

// === Running SIPp ===

#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

/// Every response SIPp received in a run that passed, in order.
struct Exchange {
    responses: Vec<String>,
}

impl Exchange {
    fn last(&self) -> &str {
        self.responses.last().expect("SIPp received a response")
    }
}

/// Runs `calls` calls of `reg` from `ip` (SIPp binds it) to the carrier, answering the
/// challenge with `password`. Err carries SIPp's logs when SIPp failed or timed out.
fn try_sipp(
    carrier: &Carrier,
    transport: Transport,
    ip: &str,
    password: &str,
    reg: &Register,
    calls: u32,
) -> Result<Exchange, String> {
    let (t, target) = match transport {
        Transport::Udp => ("u1", carrier.addr("udp")),
        Transport::Tcp => ("t1", carrier.addr("tcp")),
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let scenario = dir.path().join("reg.xml");
    fs::write(&scenario, reg.xml()).expect("write scenario");
    let out = fs::File::create(dir.path().join("stdout.log")).expect("stdout log");
    let err = fs::File::create(dir.path().join("stderr.log")).expect("stderr log");
    let child = Command::new(SIPP)
        .arg(target.to_string())
        .arg("-sf")
        .arg(&scenario)
        .args(["-i", ip, "-bind_local", "-p", "0", "-t", t])
        .args(["-au", &reg.user, "-ap", password])
        .args(["-m", &calls.to_string()])
        .args(["-timeout", "10s", "-timeout_error", "-nostdin"])
        .args(["-trace_msg", "-trace_err"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("SIPp is required for this test (apt-get install -y sip-tester): {e}")
        });
    let status = wait_bounded(child, dir.path())?;
    let responses = received(dir.path());
    if status.success() {
        Ok(Exchange { responses })
    } else {
        Err(format!(
            "SIPp failed ({status}) for scenario:\n{}\n{}",
            reg.xml(),
            logs_in(dir.path())
        ))
    }
}

/// Like [`try_sipp`] with one call, failing the test (with SIPp's and the carrier's logs)
/// when SIPp fails.
fn sipp(
    carrier: &Carrier,
    transport: Transport,
    ip: &str,
    password: &str,
    reg: &Register,
) -> Exchange {
    try_sipp(carrier, transport, ip, password, reg, 1)
        .unwrap_or_else(|e| panic!("{e}\n==== carrier log ====\n{}", carrier.log()))
}

fn wait_bounded(mut child: Child, dir: &Path) -> Result<std::process::ExitStatus, String> {
    let deadline = Instant::now() + SIPP_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().expect("wait for SIPp") {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "SIPp did not finish within {SIPP_DEADLINE:?}\n{}",
                logs_in(dir)
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|f| f.extension().is_some_and(|x| x == "log"));
    files.sort();
    files
}

/// Everything SIPp wrote (screen, errors, message trace), for failure messages.
fn logs_in(dir: &Path) -> String {
    let mut out = String::new();
    for f in log_files(dir) {
        let text = String::from_utf8_lossy(&fs::read(&f).unwrap_or_default()).into_owned();
        // The screen dumps repeat; the tail is what matters.
        let chars: Vec<char> = text.chars().collect();
        let tail: String = chars[chars.len().saturating_sub(8000)..].iter().collect();
        out += &format!("==== {} ====\n{tail}\n", f.display());
    }
    out
}

/// The messages SIPp's `-trace_msg` log shows as received.
fn received(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for f in log_files(dir)
        .iter()
        .filter(|f| f.to_string_lossy().ends_with("_messages.log"))
    {
        let text = String::from_utf8_lossy(&fs::read(f).unwrap_or_default()).replace('\r', "");
        for section in text.split("-----------------------------------------------") {
            let Some((title, message)) = section.split_once("\n\n") else {
                continue;
            };
            if title.contains("message received") {
                out.push(message.trim().to_string());
            }
        }
    }
    out
}

// === Reading the answers ===

/// One Contact a 200 lists.
#[derive(Debug)]
struct Listed {
    uri: String,
    expires: Option<u32>,
    q: Option<String>,
}

/// The bindings a response lists (its Contact header values).
fn bindings(response: &str) -> Vec<Listed> {
    let mut out = Vec::new();
    for line in response.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if !name.eq_ignore_ascii_case("Contact") && !name.eq_ignore_ascii_case("m") {
            continue;
        }
        for v in split_values(value) {
            let v = v.trim();
            let (uri, params) = match v.strip_prefix('<').and_then(|r| r.split_once('>')) {
                Some((uri, params)) => (uri.to_string(), params),
                None => (v.to_string(), ""),
            };
            let param = |n: &str| {
                params.split(';').find_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    k.trim()
                        .eq_ignore_ascii_case(n)
                        .then(|| v.trim().to_string())
                })
            };
            out.push(Listed {
                uri,
                expires: param("expires").and_then(|e| e.parse().ok()),
                q: param("q"),
            });
        }
    }
    out
}

/// Splits a header value at the commas outside `<…>` and quotes.
fn split_values(value: &str) -> Vec<&str> {
    let (mut out, mut start, mut angle, mut quoted) = (Vec::new(), 0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                out.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&value[start..]);
    out
}

fn uris(list: &[Listed]) -> Vec<&str> {
    let mut v: Vec<&str> = list.iter().map(|l| l.uri.as_str()).collect();
    v.sort();
    v
}

fn find<'a>(list: &'a [Listed], uri: &str) -> &'a Listed {
    list.iter()
        .find(|l| l.uri == uri)
        .unwrap_or_else(|| panic!("{uri} not listed in {list:?}"))
}

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

/// Waits (bounded) until the carrier's log contains `needle`.
fn wait_for_log(carrier: &Carrier, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = carrier.log();
        if log.contains(needle) || Instant::now() >= deadline {
            return log;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// === Tests ===

#[test]
fn udp_register_refresh_second_contact_unregister_and_star() {
    let ip = "127.0.60.1";
    let pbx = "127.0.60.2";
    let user = "pbx-udp";
    let carrier = carrier_with_trunk_group(ip, user, "");
    let a = format!("sip:{user}@127.0.60.2:5071");
    let b = format!("sip:{user}@127.0.60.2:5072");
    let run = |reg: Register| sipp(&carrier, Transport::Udp, pbx, PASSWORD, &reg);

    // Register A for 120 s: the 200 lists A with (nearly) all of it.
    let r = run(Register::new(user)
        .contact(&format!("<{a}>"))
        .expires(120)
        .has(&format!(
            "Contact: <{}>;expires=(1[01][0-9]|120)[^0-9]",
            lit(&a)
        )));
    let list = bindings(r.last());
    assert_eq!(uris(&list), [a.as_str()], "{}", r.last());
    let e = list[0].expires.expect("expires listed");
    assert!((115..=120).contains(&e), "expires={e}\n{}", r.last());
    assert_eq!(list[0].q, None);

    // Refresh (a new Call-ID, as a rebooted PBX would send): still one binding.
    let r = run(Register::new(user)
        .contact(&format!("<{a}>"))
        .expires(120)
        .has(&lit(&a))
        .lacks(&lit(&b)));
    let list = bindings(r.last());
    assert_eq!(uris(&list), [a.as_str()], "{}", r.last());

    // A second contact B with q=0.5: both listed, B with its q.
    let r = run(Register::new(user)
        .contact(&format!("<{b}>;q=0.5"))
        .expires(120)
        .has(&lit(&a))
        .has(&format!("Contact: <{}>[^<>]*;q=0\\.5", lit(&b))));
    let list = bindings(r.last());
    assert_eq!(uris(&list), [a.as_str(), b.as_str()], "{}", r.last());
    assert_eq!(find(&list, &b).q.as_deref(), Some("0.5"), "{}", r.last());
    assert_eq!(find(&list, &a).q, None, "{}", r.last());
    assert!(find(&list, &b).expires.is_some_and(|e| e > 100));

    // Unregister A (expires=0 on its Contact): only B is left.
    let r = run(Register::new(user)
        .contact(&format!("<{a}>;expires=0"))
        .has(&lit(&b))
        .lacks(&lit(&a)));
    let list = bindings(r.last());
    assert_eq!(uris(&list), [b.as_str()], "{}", r.last());

    // `Contact: *` with Expires 0 removes everything.
    let r = run(Register::new(user)
        .contact("*")
        .expires(0)
        .lacks("Contact:"));
    assert!(bindings(r.last()).is_empty(), "{}", r.last());

    // A query (no Contact) confirms: nothing is bound.
    let r = run(Register::new(user).lacks("Contact:"));
    assert!(bindings(r.last()).is_empty(), "{}", r.last());
}

#[test]
fn tcp_register_lists_a_tcp_contact() {
    let ip = "127.0.61.1";
    let pbx = "127.0.61.2";
    let user = "pbx-tcp";
    let carrier = carrier_with_trunk_group(ip, user, "");
    let contact = format!("sip:{user}@127.0.61.2:5071;transport=tcp");
    let r = sipp(
        &carrier,
        Transport::Tcp,
        pbx,
        PASSWORD,
        &Register::new(user)
            .contact(&format!("<{contact}>"))
            .expires(300)
            .has(&format!(
                "Contact: <{}>;expires=(29[0-9]|300)",
                lit(&contact)
            )),
    );
    assert!(r.last().contains("Via: SIP/2.0/TCP "), "{}", r.last());
    let list = bindings(r.last());
    assert_eq!(uris(&list), [contact.as_str()], "{}", r.last());
    assert!(
        list[0].uri.to_ascii_lowercase().contains(";transport=tcp"),
        "{list:?}"
    );

    // A query over TCP from a new connection sees it too.
    let r = sipp(
        &carrier,
        Transport::Tcp,
        pbx,
        PASSWORD,
        &Register::new(user).has(&lit(&contact)),
    );
    assert_eq!(
        uris(&bindings(r.last())),
        [contact.as_str()],
        "{}",
        r.last()
    );
}

#[test]
fn wrong_password_is_refused_and_binds_nothing() {
    let ip = "127.0.62.1";
    let pbx = "127.0.62.2";
    let user = "pbx-wrong";
    let carrier = carrier_with_trunk_group(ip, user, "");
    let contact = format!("sip:{user}@127.0.62.2:5071");

    let r = sipp(
        &carrier,
        Transport::Udp,
        pbx,
        "not-the-password",
        &Register::new(user)
            .contact(&format!("<{contact}>"))
            .expires(120)
            .answered(403)
            .lacks("Contact:"),
    );
    assert!(
        status_line(r.last()).starts_with("SIP/2.0 403"),
        "{}",
        r.last()
    );

    // The right password, querying: no binding was made.
    let r = sipp(
        &carrier,
        Transport::Udp,
        pbx,
        PASSWORD,
        &Register::new(user).lacks("Contact:"),
    );
    assert!(bindings(r.last()).is_empty(), "{}", r.last());
}

#[test]
fn too_brief_an_expiry_gets_423_with_min_expires() {
    let ip = "127.0.63.1";
    let pbx = "127.0.63.2";
    let user = "pbx-brief";
    let carrier = carrier_with_trunk_group(ip, user, "min_expires_s = 60\n");
    let contact = format!("sip:{user}@127.0.63.2:5071");

    let r = sipp(
        &carrier,
        Transport::Udp,
        pbx,
        PASSWORD,
        &Register::new(user)
            .contact(&format!("<{contact}>"))
            .expires(10)
            .answered(423)
            .has("Min-Expires: *60[^0-9]"),
    );
    let resp = r.last();
    assert!(status_line(resp).starts_with("SIP/2.0 423"), "{resp}");
    let min = resp
        .lines()
        .find_map(|l| l.strip_prefix("Min-Expires:"))
        .map(str::trim);
    assert_eq!(min, Some("60"), "{resp}");

    // Nothing was bound by the refused REGISTER.
    let r = sipp(
        &carrier,
        Transport::Udp,
        pbx,
        PASSWORD,
        &Register::new(user).lacks("Contact:"),
    );
    assert!(bindings(r.last()).is_empty(), "{}", r.last());
}

#[test]
fn a_burst_of_wrong_passwords_throttles_that_source_only() {
    let ip = "127.0.64.1";
    let guesser = "127.0.64.2";
    let pbx = "127.0.64.3";
    let user = "pbx-throttle";
    let carrier = carrier_with_trunk_group(
        ip,
        user,
        "auth_failures_allowed = 3\nauth_failure_window_ms = 60000\nauth_throttle_ms = 30000\n",
    );
    let contact = format!("sip:{user}@127.0.64.3:5071");
    let reg = |status: u16| {
        Register::new(user)
            .contact(&format!("<{contact}>"))
            .expires(120)
            .answered(status)
    };

    // Three wrong answers from one source: each is refused, and the third starts the throttle.
    let r = try_sipp(&carrier, Transport::Udp, guesser, "guess", &reg(403), 3)
        .unwrap_or_else(|e| panic!("{e}\n==== carrier log ====\n{}", carrier.log()));
    let refused = r
        .responses
        .iter()
        .filter(|m| status_line(m).starts_with("SIP/2.0 403"))
        .count();
    assert_eq!(refused, 3, "{:#?}", r.responses);

    // Now even the right password from that source is refused, unchecked, with 503 and
    // Retry-After (a 403 would make a real PBX stop registering for good).
    let r = sipp(&carrier, Transport::Udp, guesser, PASSWORD, &reg(503));
    assert!(
        status_line(r.last()).starts_with("SIP/2.0 503"),
        "{}",
        r.last()
    );
    assert!(r.last().contains("Retry-After:"), "{}", r.last());

    // The trunk group's own PBX, from another address, is not slowed.
    let r = sipp(
        &carrier,
        Transport::Udp,
        pbx,
        PASSWORD,
        &reg(200).has(&lit(&contact)),
    );
    assert_eq!(
        uris(&bindings(r.last())),
        [contact.as_str()],
        "{}",
        r.last()
    );

    let log = wait_for_log(&carrier, "throttling this source");
    assert_eq!(
        log.matches("throttling this source").count(),
        1,
        "one warning per burst:\n{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("throttling this source"))
        .unwrap();
    assert!(line.contains(guesser), "{line}");
}

#[test]
fn bindings_survive_a_restart_with_their_remaining_time() {
    let ip = "127.0.65.1";
    let pbx = "127.0.65.2";
    let user = "pbx-restart";
    let extra = "min_expires_s = 1\n";
    let carrier = carrier_with_trunk_group(ip, user, extra);
    let long = format!("sip:{user}@127.0.65.2:5071");
    let short = format!("sip:{user}@127.0.65.2:5072");

    let r = sipp(
        &carrier,
        Transport::Udp,
        pbx,
        PASSWORD,
        &Register::new(user)
            .contact(&format!("<{long}>;expires=120"))
            .contact(&format!("<{short}>;expires=2"))
            .has(&lit(&long))
            .has(&format!("Contact: <{}>;expires=[12][^0-9]", lit(&short))),
    );
    assert_eq!(
        uris(&bindings(r.last())),
        [long.as_str(), short.as_str()],
        "{}",
        r.last()
    );
    // The write-behind (50 ms) has long happened; a shutdown's own flush is tested apart.
    thread::sleep(Duration::from_millis(300));
    let first_log = carrier.log.clone();
    let dir = terminate(carrier);
    let first_log = first_log.lock().unwrap().clone();
    // The short binding expires while the server is down.
    thread::sleep(Duration::from_secs(3));

    let carrier = start_carrier_in(dir, &config(ip, extra), 2);
    let r = sipp(
        &carrier,
        Transport::Udp,
        pbx,
        PASSWORD,
        &Register::new(user)
            .has(&format!(
                "Contact: <{}>;expires=(1[01][0-9]|120)[^0-9]",
                lit(&long)
            ))
            .lacks(&lit(&short)),
    );
    let list = bindings(r.last());
    assert_eq!(
        uris(&list),
        [long.as_str()],
        "{}\n==== first carrier ====\n{first_log}\n==== second carrier ====\n{}",
        r.last(),
        carrier.log()
    );
    let e = list[0].expires.expect("expires listed");
    assert!((100..=120).contains(&e), "expires={e}\n{}", r.last());
    let log = carrier.log();
    assert!(log.contains("bindings loaded bindings=1"), "{log}");
}

#[test]
fn a_clean_shutdown_writes_bindings_not_yet_flushed() {
    let ip = "127.0.67.1";
    let pbx = "127.0.67.2";
    let user = "pbx-shutdown";
    // The periodic write-behind never comes in this test: only the shutdown can write.
    let extra = "bindings_flush_ms = 600000\n";
    let dir = tempfile::tempdir().unwrap();
    provision_trunk_group(dir.path(), user, PASSWORD);
    let config = config(ip, "").replace("bindings_flush_ms = 50\n", extra);
    let carrier = start_carrier_in(dir, &config, 2);
    let contact = format!("sip:{user}@127.0.67.2:5071");

    sipp(
        &carrier,
        Transport::Udp,
        pbx,
        PASSWORD,
        &Register::new(user)
            .contact(&format!("<{contact}>"))
            .expires(600)
            .has(&lit(&contact)),
    );
    let first_log = carrier.log.clone();
    let dir = terminate(carrier);
    let first_log = first_log.lock().unwrap().clone();

    let carrier = start_carrier_in(dir, &config, 2);
    let r = sipp(
        &carrier,
        Transport::Udp,
        pbx,
        PASSWORD,
        &Register::new(user),
    );
    assert_eq!(
        uris(&bindings(r.last())),
        [contact.as_str()],
        "the binding registered before SIGTERM is lost after the restart\n{}\n\
         ==== first carrier ====\n{first_log}\n==== second carrier ====\n{}",
        r.last(),
        carrier.log()
    );
}

#[test]
fn a_trunk_group_added_while_running_can_register() {
    let ip = "127.0.66.1";
    let pbx = "127.0.66.2";
    let user = "pbx-late";
    // Failed attempts before the trunk group exists must not throttle the PBX.
    let carrier = start_carrier_in(
        tempfile::tempdir().unwrap(),
        &config(ip, "auth_failures_allowed = 1000\n"),
        2,
    );
    let contact = format!("sip:{user}@127.0.66.2:5071");
    let reg = |status: u16| {
        Register::new(user)
            .contact(&format!("<{contact}>"))
            .expires(120)
            .answered(status)
    };

    // Unknown yet: refused.
    sipp(&carrier, Transport::Udp, pbx, PASSWORD, &reg(403));

    provision_trunk_group(carrier.dir.path(), user, PASSWORD);
    let listing = admin(carrier.dir.path(), &["trunk-group", "list"]);
    assert!(listing.contains(user), "{listing}");

    // The running server picks it up (config_poll_ms = 100) without a restart.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut attempts = 0;
    let registered = loop {
        attempts += 1;
        match try_sipp(&carrier, Transport::Udp, pbx, PASSWORD, &reg(200), 1) {
            Ok(r) => break Some(r),
            Err(e) if Instant::now() >= deadline => {
                eprintln!("last attempt:\n{e}");
                break None;
            }
            Err(_) => thread::sleep(Duration::from_millis(250)),
        }
    };
    let r = registered.unwrap_or_else(|| {
        panic!(
            "no 200 within 5 s after `admin trunk-group add` ({attempts} attempts)\n{}",
            carrier.log()
        )
    });
    assert_eq!(
        uris(&bindings(r.last())),
        [contact.as_str()],
        "{}",
        r.last()
    );
}
