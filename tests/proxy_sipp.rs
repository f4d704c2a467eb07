//! The delivery proxy end to end (issue 4, first step: the primary stage on one trunk
//! server): a real `lifeline-carrier`, SIPp (Debian package `sip-tester`) as the upstream
//! caller, and SIPp as the PBX, which registers with digest first and then answers calls.
//!
//! Each test has its own carrier, data folder and 127.0.7x.0/24 block: `.1` the carrier,
//! `.2` the upstream caller, `.3` the PBX, `.5` a stranger. Every SIPp run is bound by
//! `-timeout` and killed after [`SIPP_DEADLINE`]. A missing SIPp fails the tests.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::sipp::*;
use common::{Carrier, admin, provision_trunk_group, start_carrier_in};

const DID: &str = "+15550001111";

/// A carrier on `ip` (UDP, free port) with short transaction timers, accepting new calls from
/// `upstream`, and a trunk group `user` that owns [`DID`].
fn carrier(ip: &str, upstream: &str, user: &str) -> Carrier {
    let dir = tempfile::tempdir().unwrap();
    let tg = provision_trunk_group(dir.path(), user, PASSWORD);
    admin(dir.path(), &["did", "add", DID, "--trunk-group", &tg]);
    let config = format!(
        "[carrier]\nname = \"trunk1\"\nsip_listen = [\"udp:{ip}:0\"]\n\
         t1_ms = 50\nt2_ms = 200\nt4_ms = 250\ntimer_d_ms = 500\n\
         config_poll_ms = 100\nbindings_flush_ms = 50\n\
         upstream = [\"{upstream}\"]\ndelivery_timer_ms = 2000\nsetup_timer_ms = 3000\n"
    );
    start_carrier_in(dir, &config, 1)
}

// === Rows ===

/// Row 1: the PBX registered here answers; INVITE/200/ACK/BYE/200 pass through the carrier.
#[test]
fn row01_registered_pbx_answers_and_bye_passes_through() {
    let (ip, caller, pbx) = ("127.0.70.1", "127.0.70.2", "127.0.70.3");
    let carrier = carrier(ip, caller, "pbx70");
    register_pbx(&carrier, pbx, "pbx70");
    let uas = spawn_sipp(pbx, PBX_PORT, None, Scenario::Xml(answering_pbx_xml()), &[]);
    thread::sleep(Duration::from_millis(300));
    let trace = call(&carrier, caller, DID, 200);
    let pbx_trace = ok(uas.wait(), "PBX", &carrier);
    // The PBX got the DID as the Request-URI user part on its contact, one hop less, our
    // Record-Route, and the upstream's P-Asserted-Identity.
    let port = carrier.addr("udp").port();
    assert!(
        pbx_trace.contains(&format!("INVITE sip:{DID}@{pbx}:{PBX_PORT} SIP/2.0")),
        "{pbx_trace}"
    );
    assert!(
        pbx_trace.contains(&format!("Record-Route: <sip:{ip}:{port};lr;lld=")),
        "{pbx_trace}"
    );
    assert!(pbx_trace.contains("Max-Forwards: 69"), "{pbx_trace}");
    assert!(pbx_trace.contains("P-Asserted-Identity:"), "{pbx_trace}");
    assert!(
        pbx_trace.contains("BYE sip:"),
        "the BYE reached the PBX: {pbx_trace}"
    );
    assert!(trace.contains("SIP/2.0 180"), "ringing relayed: {trace}");
    let log = wait_for_log(&carrier, "call delivery ended");
    let line = delivery_line(&log);
    assert!(
        line.contains("outcome=\"delivered\"") || line.contains("outcome=delivered"),
        "{line}"
    );
    assert!(line.contains(DID) && line.contains("status=200"), "{line}");
}

/// Row 12: the PBX answers 486: the caller gets 486 and no failover follows.
#[test]
fn row12_busy_pbx_is_relayed_without_failover() {
    let (ip, caller, pbx) = ("127.0.71.1", "127.0.71.2", "127.0.71.3");
    let carrier = carrier(ip, caller, "pbx71");
    register_pbx(&carrier, pbx, "pbx71");
    let uas = spawn_sipp(
        pbx,
        PBX_PORT,
        None,
        Scenario::Xml(rejecting_pbx_xml(486, "Busy Here")),
        &[],
    );
    thread::sleep(Duration::from_millis(300));
    call(&carrier, caller, DID, 486);
    ok(uas.wait(), "PBX", &carrier);
    let log = wait_for_log(&carrier, "call delivery ended");
    let line = delivery_line(&log);
    assert!(
        line.contains("status=486") && line.contains("attempts=1"),
        "{line}"
    );
    assert!(line.contains("reached"), "{line}");
}

/// Row 17: a new call from an address that is not upstream gets 403.
#[test]
fn row17_initial_invite_from_a_stranger_is_forbidden() {
    let (ip, caller, stranger) = ("127.0.72.1", "127.0.72.2", "127.0.72.5");
    let carrier = carrier(ip, caller, "pbx72");
    call(&carrier, stranger, DID, 403);
    let log = wait_for_log(&carrier, "initial request refused");
    assert!(log.contains("neither upstream nor a peer"), "{log}");
}

/// An unknown DID from the upstream gets 404 (with or without `+`).
#[test]
fn unknown_did_gets_404() {
    let (ip, caller) = ("127.0.73.1", "127.0.73.2");
    let carrier = carrier(ip, caller, "pbx73");
    call(&carrier, caller, "+15550009999", 404);
    call(&carrier, caller, "15550009999", 404);
    wait_for_log(&carrier, "unknown DID");
}

/// Registered nowhere, no failover, no peers: the caller gets 480 at once.
#[test]
fn not_registered_anywhere_gets_480() {
    let (ip, caller) = ("127.0.74.1", "127.0.74.2");
    let carrier = carrier(ip, caller, "pbx74");
    // The DID without `+` matches too.
    call(&carrier, caller, "15550001111", 480);
    let log = wait_for_log(&carrier, "call delivery ended");
    let line = delivery_line(&log);
    assert!(
        line.contains("status=480") && line.contains("failed"),
        "{line}"
    );
}

/// The caller CANCELs while the PBX rings: 200 for the CANCEL, the PBX gets a CANCEL, the
/// caller gets 487.
#[test]
fn caller_cancel_while_ringing_cancels_the_branch() {
    let (ip, caller, pbx) = ("127.0.75.1", "127.0.75.2", "127.0.75.3");
    let carrier = carrier(ip, caller, "pbx75");
    register_pbx(&carrier, pbx, "pbx75");
    let uas = spawn_sipp(pbx, PBX_PORT, None, Scenario::Xml(ringing_pbx_xml()), &[]);
    thread::sleep(Duration::from_millis(300));
    let run = spawn_sipp(
        caller,
        0,
        Some(carrier.addr("udp").to_string()),
        Scenario::Xml(cancelling_caller_xml(DID)),
        &[],
    )
    .wait();
    ok(run, "caller", &carrier);
    let pbx_trace = ok(uas.wait(), "PBX", &carrier);
    assert!(pbx_trace.contains("CANCEL sip:"), "{pbx_trace}");
    let log = wait_for_log(&carrier, "call delivery ended");
    let line = delivery_line(&log);
    assert!(
        line.contains("status=487") && line.contains("cancelled"),
        "{line}"
    );
}

/// A registered PBX that answers nothing: after the delivery timer the branch has failed,
/// and with no failover and no peers the caller gets 480.
#[test]
fn silent_pbx_fails_after_the_delivery_timer_with_480() {
    let (ip, caller, pbx) = ("127.0.76.1", "127.0.76.2", "127.0.76.3");
    let carrier = carrier(ip, caller, "pbx76");
    register_pbx(&carrier, pbx, "pbx76");
    // The PBX's port is open but nothing answers (a closed port would be an ICMP error, acted
    // on at once).
    let _silent = std::net::UdpSocket::bind((pbx, PBX_PORT)).unwrap();
    let started = Instant::now();
    call(&carrier, caller, DID, 480);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900),
        "480 came before the delivery timer: {elapsed:?}"
    );
    let log = wait_for_log(&carrier, "call delivery ended");
    let line = delivery_line(&log);
    assert!(
        line.contains("status=480") && line.contains("failed"),
        "{line}"
    );
    assert!(log.contains("no response"), "{log}");
}

/// Row 1, the other direction: the PBX (not upstream) hangs up; its BYE passes through the
/// carrier to the caller and the 200 comes back.
#[test]
fn row01_bye_from_the_pbx_passes_through() {
    let (ip, caller, pbx) = ("127.0.77.1", "127.0.77.2", "127.0.77.3");
    let carrier = carrier(ip, caller, "pbx77");
    register_pbx(&carrier, pbx, "pbx77");
    let uas = spawn_sipp(
        pbx,
        PBX_PORT,
        None,
        Scenario::Xml(hanging_up_pbx_xml(DID)),
        &[],
    );
    thread::sleep(Duration::from_millis(300));
    let run = spawn_sipp(
        caller,
        0,
        Some(carrier.addr("udp").to_string()),
        Scenario::Xml(hung_up_caller_xml(DID)),
        &[],
    )
    .wait();
    let trace = ok(run, "caller", &carrier);
    ok(uas.wait(), "PBX", &carrier);
    // The BYE reached the caller with one hop less and the carrier's Via on top.
    let port = carrier.addr("udp").port();
    assert!(trace.contains("BYE sip:caller@127.0.77.2"), "{trace}");
    // The PBX asserted an identity in its BYE: not passed on (it is not upstream).
    assert!(!trace.contains("pbx-claims"), "{trace}");
    assert!(trace.contains("Max-Forwards: 69"), "{trace}");
    assert!(
        trace.contains(&format!("Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK")),
        "{trace}"
    );
}

/// Row 13 in the primary stage: the first binding (highest q) answers 503, a failure to
/// deliver; the next binding gets the call and answers.
#[test]
fn row13_503_fails_over_to_the_next_binding_by_q() {
    let (ip, caller, first, second) = ("127.0.78.1", "127.0.78.2", "127.0.78.3", "127.0.78.4");
    let carrier = carrier(ip, caller, "pbx78");
    register_contact(&carrier, second, "pbx78", ";q=0.5");
    register_contact(&carrier, first, "pbx78", ";q=0.9");
    let busy = spawn_sipp(
        first,
        PBX_PORT,
        None,
        Scenario::Xml(rejecting_pbx_xml(503, "Service Unavailable")),
        &[],
    );
    let answering = spawn_sipp(
        second,
        PBX_PORT,
        None,
        Scenario::Xml(answering_pbx_xml()),
        &[],
    );
    thread::sleep(Duration::from_millis(300));
    call(&carrier, caller, DID, 200);
    ok(busy.wait(), "first PBX", &carrier);
    ok(answering.wait(), "second PBX", &carrier);
    let log = wait_for_log(&carrier, "call delivery ended");
    let line = delivery_line(&log);
    assert!(
        line.contains("status=200") && line.contains("attempts=2") && line.contains(second),
        "{line}"
    );
}

/// Every binding fails with 503: the caller gets the best failure, passed on as 500
/// (RFC 3261 §16.7 step 6).
#[test]
fn only_binding_answers_503_caller_gets_500() {
    let (ip, caller, pbx) = ("127.0.79.1", "127.0.79.2", "127.0.79.3");
    let carrier = carrier(ip, caller, "pbx79");
    register_pbx(&carrier, pbx, "pbx79");
    let uas = spawn_sipp(
        pbx,
        PBX_PORT,
        None,
        Scenario::Xml(rejecting_pbx_xml(503, "Service Unavailable")),
        &[],
    );
    thread::sleep(Duration::from_millis(300));
    let trace = call(&carrier, caller, DID, 500);
    ok(uas.wait(), "PBX", &carrier);
    // The PBX's own answer (its To tag), with the status rewritten.
    assert!(trace.contains("SIPpTag01"), "{trace}");
    let log = wait_for_log(&carrier, "call delivery ended");
    assert!(delivery_line(&log).contains("status=500"), "{log}");
}

// === Caller and PBX as plain UDP sockets ===

/// A carrier on `net`.1 whose PBX (`net`.3, trunk group `user`) registered with SIPp, and the
/// caller (`net`.2) and the PBX as plain UDP sockets of the test.
struct RawCall {
    carrier: Carrier,
    caller: std::net::UdpSocket,
    pbx: std::net::UdpSocket,
}

impl RawCall {
    fn start(net: &str, user: &str) -> RawCall {
        let (ip, caller_ip, pbx_ip) = (format!("{net}.1"), format!("{net}.2"), format!("{net}.3"));
        let carrier = carrier(&ip, &caller_ip, user);
        register_pbx(&carrier, &pbx_ip, user);
        let pbx = std::net::UdpSocket::bind((pbx_ip.as_str(), PBX_PORT)).unwrap();
        let caller = std::net::UdpSocket::bind((caller_ip.as_str(), 0)).unwrap();
        for s in [&pbx, &caller] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        RawCall {
            carrier,
            caller,
            pbx,
        }
    }

    /// Sends the caller's `method` for the call `call_id` (branch `branch`) to the carrier.
    fn caller_sends(&self, method: &str, call_id: &str, branch: &str) {
        let me = self.caller.local_addr().unwrap();
        let to = self.carrier.addr("udp");
        let text = format!(
            "{method} sip:{DID}@{} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch={branch};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:+15557770000@{}>;tag=c1\r\n\
             To: <sip:{DID}@{}>\r\nCall-ID: {call_id}@{}\r\nCSeq: 1 {method}\r\n\
             Contact: <sip:caller@{me}>\r\nContent-Length: 0\r\n\r\n",
            to.ip(),
            me.ip(),
            to.ip(),
            me.ip(),
        );
        self.caller.send_to(text.as_bytes(), to).unwrap();
    }

    /// The first message starting with `start` that `socket` receives within 5 s (others,
    /// such as retransmissions, pass by), and where it came from.
    fn next(&self, socket: &std::net::UdpSocket, start: &str) -> (String, std::net::SocketAddr) {
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                break;
            };
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if text.starts_with(start) {
                return (text, from);
            }
        }
        panic!("no {start} came; log:\n{}", self.carrier.log());
    }
}

/// The PBX's response to `request`, as a UAS builds it: `status` ("200 OK"), Via, From,
/// Call-ID, CSeq (and Record-Route with `contact`) echoed, To with the tag `pbx1`.
fn pbx_response(request: &str, status: &str, contact: Option<&str>) -> String {
    let mut echoed = vec!["via", "v", "from", "f", "call-id", "i", "cseq"];
    if contact.is_some() {
        echoed.push("record-route");
    }
    let mut out = format!("SIP/2.0 {status}\r\n");
    for line in request.lines() {
        let name = line
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if echoed.contains(&name.as_str()) {
            out.push_str(line);
            out.push_str("\r\n");
        } else if name == "to" || name == "t" {
            out.push_str(line);
            out.push_str(";tag=pbx1\r\n");
        }
    }
    if let Some(contact) = contact {
        out.push_str(&format!("Contact: <{contact}>\r\n"));
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out
}

/// A 2xx the PBX retransmits (the caller's ACK was slow) after the caller already has its
/// answer still reaches the caller (RFC 6026), though the call's own state is forgotten once
/// it was answered.
#[test]
fn a_2xx_retransmitted_after_the_answer_still_reaches_the_caller() {
    let t = RawCall::start("127.0.80", "pbx80");
    t.caller_sends("INVITE", "rt2xx", "z9hG4bK-rt2xx");
    // The PBX gets the INVITE and answers 200 (its headers echoed, as a UAS does).
    let (invite, from) = t.next(&t.pbx, "INVITE ");
    let ok = pbx_response(
        &invite,
        "200 OK",
        Some(&format!("sip:pbx@127.0.80.3:{PBX_PORT}")),
    );
    t.pbx.send_to(ok.as_bytes(), from).unwrap();
    let (first, _) = t.next(&t.caller, "SIP/2.0 200");
    assert!(
        first.contains("tag=pbx1") && first.contains("CSeq: 1 INVITE"),
        "{first}"
    );
    // The caller has its answer: the call is over for the delivery. The PBX, hearing no ACK,
    // sends its 200 again, and again it reaches the caller, one Via less.
    wait_for_log(&t.carrier, "call delivery ended");
    t.pbx.send_to(ok.as_bytes(), from).unwrap();
    let (again, _) = t.next(&t.caller, "SIP/2.0 200");
    assert!(again.contains("tag=pbx1"), "{again}");
    assert_eq!(again.matches("Via:").count(), 1, "{again}");
}

/// The caller CANCELs before the PBX said anything: the caller gets its 487 at once, and the
/// branch, which may not be cancelled before it rings (RFC 3261 §9.1), gets its CANCEL when
/// the PBX rings later, though the call's own state is forgotten by then.
#[test]
fn a_branch_that_rings_after_the_caller_cancelled_gets_its_cancel() {
    let t = RawCall::start("127.0.81", "pbx81");
    t.caller_sends("INVITE", "late180", "z9hG4bK-late180");
    let (invite, from) = t.next(&t.pbx, "INVITE ");
    t.caller_sends("CANCEL", "late180", "z9hG4bK-late180");
    t.next(&t.caller, "SIP/2.0 487");
    wait_for_log(&t.carrier, "call delivery ended");
    // Now the PBX rings: 180 for the INVITE it got, its headers echoed.
    let ringing = pbx_response(&invite, "180 Ringing", None);
    t.pbx.send_to(ringing.as_bytes(), from).unwrap();
    let (cancel, _) = t.next(&t.pbx, "CANCEL ");
    let branch = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("Via:"))
            .and_then(|l| l.split("branch=").nth(1))
            .map(|b| b.split(';').next().unwrap_or("").trim().to_string())
    };
    assert_eq!(
        branch(&cancel),
        branch(&invite),
        "the CANCEL of that INVITE:\n{cancel}"
    );
}
