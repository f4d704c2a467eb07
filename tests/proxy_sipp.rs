//! The delivery proxy end to end (issue 4, first step: the primary stage on one trunk
//! server): a real `lifeline-carrier`, SIPp (Debian package `sip-tester`) as the upstream
//! caller, and SIPp as the PBX, which registers with digest first and then answers calls.
//!
//! Each test has its own carrier, data folder and 127.0.7x.0/24 block: `.1` the carrier,
//! `.2` the upstream caller, `.3` the PBX, `.5` a stranger. Every SIPp run is bound by
//! `-timeout` and killed after [`SIPP_DEADLINE`]. A missing SIPp fails the tests.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Carrier, admin, provision_trunk_group, start_carrier_in};

const SIPP: &str = "sipp";
const SIPP_DEADLINE: Duration = Duration::from_secs(25);
const PASSWORD: &str = "s3cret-Pa55";
const DID: &str = "+15550001111";
const PBX_PORT: u16 = 5071;

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

// === Scenarios ===

fn register_xml(user: &str, contact: &str) -> String {
    let req = |cseq: u32, auth: bool| {
        format!(
            "REGISTER sip:[remote_ip]:[remote_port] SIP/2.0\n\
             Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]\n\
             From: <sip:{user}@[remote_ip]>;tag=[pid]SIPpTag00[call_number]\n\
             To: <sip:{user}@[remote_ip]>\n\
             Call-ID: [call_id]\n\
             CSeq: {cseq} REGISTER\n\
             Contact: {contact}\n{}\
             Expires: 300\nMax-Forwards: 70\nContent-Length: 0\n\n",
            if auth { "[authentication]\n" } else { "" }
        )
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\" ?>\n\
         <scenario name=\"register\">\n\
         <send retrans=\"500\"><![CDATA[\n{}]]></send>\n\
         <recv response=\"401\" auth=\"true\"/>\n\
         <send retrans=\"500\"><![CDATA[\n{}]]></send>\n\
         <recv response=\"200\"/>\n\
         </scenario>\n",
        req(1, false),
        req(2, true)
    )
}

const SDP: &str = "v=0\n\
o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]\n\
s=-\n\
c=IN IP[media_ip_type] [media_ip]\n\
t=0 0\n\
m=audio [media_port] RTP/AVP 0\n\
a=rtpmap:0 PCMU/8000\n";

fn invite(did: &str) -> String {
    format!(
        "INVITE sip:{did}@[remote_ip]:[remote_port] SIP/2.0\n\
         Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]\n\
         From: <sip:caller@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]\n\
         To: <sip:{did}@[remote_ip]:[remote_port]>\n\
         Call-ID: [call_id]\n\
         CSeq: 1 INVITE\n\
         Contact: <sip:caller@[local_ip]:[local_port]>\n\
         P-Asserted-Identity: <sip:+15557770000@[local_ip]>\n\
         Max-Forwards: 70\n\
         Content-Type: application/sdp\n\
         Content-Length: [len]\n\n{SDP}"
    )
}

/// The caller: INVITE, then 200 (ACK and BYE along the recorded route) or a final `status`
/// (ACKed hop by hop).
fn caller_xml(did: &str, status: u16) -> String {
    let common = format!(
        "From: <sip:caller@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]\n\
         To: <sip:{did}@[remote_ip]:[remote_port]>[peer_tag_param]\n\
         Call-ID: [call_id]\n"
    );
    let tail = if status == 200 {
        format!(
            "<recv response=\"200\" rrs=\"true\"/>\n\
             <send><![CDATA[\nACK [next_url] SIP/2.0\n\
             Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]\n{common}\
             CSeq: 1 ACK\n[routes]\nMax-Forwards: 70\nContent-Length: 0\n\n]]></send>\n\
             <pause milliseconds=\"300\"/>\n\
             <send retrans=\"500\"><![CDATA[\nBYE [next_url] SIP/2.0\n\
             Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]\n{common}\
             CSeq: 2 BYE\n[routes]\nMax-Forwards: 70\nContent-Length: 0\n\n]]></send>\n\
             <recv response=\"200\"/>\n"
        )
    } else {
        format!(
            "<recv response=\"{status}\"/>\n\
             <send><![CDATA[\nACK sip:{did}@[remote_ip]:[remote_port] SIP/2.0\n\
             [last_Via:]\n{common}\
             CSeq: 1 ACK\nMax-Forwards: 70\nContent-Length: 0\n\n]]></send>\n"
        )
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\" ?>\n\
         <scenario name=\"caller\">\n\
         <send retrans=\"500\"><![CDATA[\n{}]]></send>\n\
         <recv response=\"100\" optional=\"true\"/>\n\
         <recv response=\"180\" optional=\"true\"/>\n\
         <recv response=\"183\" optional=\"true\"/>\n\
         {tail}</scenario>\n",
        invite(did)
    )
}

/// A PBX that rings, answers 200 (copying Record-Route, as RFC 3261 §12.1.1 asks), takes the
/// ACK and the caller's BYE. (SIPp's built-in `uas` does not copy Record-Route.)
fn answering_pbx_xml() -> String {
    let dialog = "[last_Via:]\n[last_From:]\n[last_To:];tag=[pid]SIPpTag01[call_number]\n\
                  [last_Call-ID:]\n[last_CSeq:]\n";
    format!(
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\" ?>\n\
         <scenario name=\"pbx answers\">\n\
         <recv request=\"INVITE\"/>\n\
         <send><![CDATA[\nSIP/2.0 180 Ringing\n{dialog}[last_Record-Route:]\n\
         Contact: <sip:pbx@[local_ip]:[local_port]>\nContent-Length: 0\n\n]]></send>\n\
         <send retrans=\"500\"><![CDATA[\nSIP/2.0 200 OK\n{dialog}[last_Record-Route:]\n\
         Contact: <sip:pbx@[local_ip]:[local_port]>\nContent-Type: application/sdp\n\
         Content-Length: [len]\n\n{SDP}]]></send>\n\
         <recv request=\"ACK\"/>\n\
         <recv request=\"BYE\"/>\n\
         <send><![CDATA[\nSIP/2.0 200 OK\n[last_Via:]\n[last_From:]\n[last_To:]\n\
         [last_Call-ID:]\n[last_CSeq:]\nContent-Length: 0\n\n]]></send>\n\
         </scenario>\n"
    )
}

/// A PBX that answers, then hangs up itself: its BYE follows the route our Record-Route set.
fn hanging_up_pbx_xml(did: &str) -> String {
    let dialog = "[last_Via:]\n[last_From:]\n[last_To:];tag=[pid]SIPpTag01[call_number]\n\
                  [last_Call-ID:]\n[last_CSeq:]\n";
    format!(
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\" ?>\n\
         <scenario name=\"pbx hangs up\">\n\
         <recv request=\"INVITE\" rrs=\"true\">\n\
         <action><ereg regexp=\".*\" search_in=\"hdr\" header=\"From:\" assign_to=\"from\"/></action>\n\
         </recv>\n\
         <send retrans=\"500\"><![CDATA[\nSIP/2.0 200 OK\n{dialog}[last_Record-Route:]\n\
         Contact: <sip:pbx@[local_ip]:[local_port]>\nContent-Type: application/sdp\n\
         Content-Length: [len]\n\n{SDP}]]></send>\n\
         <recv request=\"ACK\"/>\n\
         <pause milliseconds=\"300\"/>\n\
         <send retrans=\"500\"><![CDATA[\nBYE [next_url] SIP/2.0\n\
         Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]\n\
         From: <sip:{did}@[local_ip]>;tag=[pid]SIPpTag01[call_number]\n\
         To: [$from]\n[last_Call-ID:]\nCSeq: 1 BYE\n[routes]\nMax-Forwards: 70\n\
         Content-Length: 0\n\n]]></send>\n\
         <recv response=\"200\"/>\n\
         </scenario>\n"
    )
}

/// The caller of a call the PBX hangs up: INVITE, 200 (ACK along the route), BYE from the PBX.
fn hung_up_caller_xml(did: &str) -> String {
    let common = format!(
        "From: <sip:caller@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]\n\
         To: <sip:{did}@[remote_ip]:[remote_port]>[peer_tag_param]\n\
         Call-ID: [call_id]\n"
    );
    format!(
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\" ?>\n\
         <scenario name=\"caller hung up\">\n\
         <send retrans=\"500\"><![CDATA[\n{}]]></send>\n\
         <recv response=\"100\" optional=\"true\"/>\n\
         <recv response=\"200\" rrs=\"true\"/>\n\
         <send><![CDATA[\nACK [next_url] SIP/2.0\n\
         Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]\n{common}\
         CSeq: 1 ACK\n[routes]\nMax-Forwards: 70\nContent-Length: 0\n\n]]></send>\n\
         <recv request=\"BYE\"/>\n\
         <send><![CDATA[\nSIP/2.0 200 OK\n[last_Via:]\n[last_From:]\n[last_To:]\n\
         [last_Call-ID:]\n[last_CSeq:]\nContent-Length: 0\n\n]]></send>\n\
         </scenario>\n",
        invite(did)
    )
}

/// A PBX that rings and never answers; the CANCEL gets 200 and the INVITE 487.
fn ringing_pbx_xml() -> String {
    String::from(
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\" ?>\n\
         <scenario name=\"pbx rings\">\n\
         <recv request=\"INVITE\"/>\n\
         <send><![CDATA[\nSIP/2.0 180 Ringing\n[last_Via:]\n[last_From:]\n\
         [last_To:];tag=[pid]SIPpTag01[call_number]\n[last_Call-ID:]\n[last_CSeq:]\n\
         Contact: <sip:pbx@[local_ip]:[local_port]>\nContent-Length: 0\n\n]]></send>\n\
         <recv request=\"CANCEL\"/>\n\
         <send><![CDATA[\nSIP/2.0 200 OK\n[last_Via:]\n[last_From:]\n[last_To:]\n\
         [last_Call-ID:]\n[last_CSeq:]\nContent-Length: 0\n\n]]></send>\n\
         <send><![CDATA[\nSIP/2.0 487 Request Terminated\n[last_Via:]\n[last_From:]\n\
         [last_To:];tag=[pid]SIPpTag01[call_number]\n[last_Call-ID:]\nCSeq: 1 INVITE\n\
         Content-Length: 0\n\n]]></send>\n\
         <recv request=\"ACK\"/>\n\
         </scenario>\n",
    )
}

/// The caller: INVITE, waits for ringing, CANCELs; 200 for the CANCEL, 487 for the INVITE.
fn cancelling_caller_xml(did: &str) -> String {
    let common = format!(
        "From: <sip:caller@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]\n\
         To: <sip:{did}@[remote_ip]:[remote_port]>\n\
         Call-ID: [call_id]\n"
    );
    format!(
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\" ?>\n\
         <scenario name=\"caller cancels\">\n\
         <send retrans=\"500\"><![CDATA[\n{}]]></send>\n\
         <recv response=\"100\" optional=\"true\"/>\n\
         <recv response=\"180\"/>\n\
         <send retrans=\"500\"><![CDATA[\nCANCEL sip:{did}@[remote_ip]:[remote_port] SIP/2.0\n\
         [last_Via:]\n{common}CSeq: 1 CANCEL\nMax-Forwards: 70\nContent-Length: 0\n\n]]></send>\n\
         <recv response=\"200\"/>\n\
         <recv response=\"487\"/>\n\
         <send><![CDATA[\nACK sip:{did}@[remote_ip]:[remote_port] SIP/2.0\n\
         [last_Via:]\n{common}CSeq: 1 ACK\nMax-Forwards: 70\nContent-Length: 0\n\n]]></send>\n\
         </scenario>\n",
        invite(did)
    )
}

/// A PBX that answers every INVITE with `status` (not 2xx) and takes the ACK.
fn rejecting_pbx_xml(status: u16, reason: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\" ?>\n\
         <scenario name=\"pbx rejects\">\n\
         <recv request=\"INVITE\"/>\n\
         <send><![CDATA[\nSIP/2.0 {status} {reason}\n[last_Via:]\n[last_From:]\n\
         [last_To:];tag=[pid]SIPpTag01[call_number]\n[last_Call-ID:]\n[last_CSeq:]\n\
         Content-Length: 0\n\n]]></send>\n\
         <recv request=\"ACK\"/>\n\
         </scenario>\n"
    )
}

// === Running SIPp ===

/// One SIPp process with its own folder (scenario, logs).
struct Sipp {
    child: Child,
    dir: tempfile::TempDir,
}

/// Starts SIPp bound to `ip:port` (0: any) towards `target` (none for a UAS), with the
/// scenario `xml`, `extra` arguments, for one call.
fn spawn_sipp(
    ip: &str,
    port: u16,
    target: Option<String>,
    scenario: Scenario,
    extra: &[&str],
) -> Sipp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(SIPP);
    if let Some(t) = target {
        cmd.arg(t);
    }
    match scenario {
        Scenario::Xml(xml) => {
            let path = dir.path().join("scenario.xml");
            fs::write(&path, xml).unwrap();
            cmd.arg("-sf").arg(path);
        }
    }
    cmd.args(["-i", ip, "-p", &port.to_string(), "-t", "u1", "-m", "1"])
        .args(["-timeout", "15s", "-timeout_error", "-nostdin"])
        .args(["-trace_msg", "-trace_err"])
        .args(extra)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.path().join("stdout.log")).unwrap())
        .stderr(fs::File::create(dir.path().join("stderr.log")).unwrap());
    let child = cmd.spawn().unwrap_or_else(|e| {
        panic!("SIPp is required for this test (apt-get install -y sip-tester): {e}")
    });
    Sipp { child, dir }
}

enum Scenario {
    Xml(String),
}

impl Sipp {
    /// Waits (bounded) for SIPp to end; Err with its logs when it failed.
    fn wait(mut self) -> Result<String, String> {
        let deadline = Instant::now() + SIPP_DEADLINE;
        let status: ExitStatus = loop {
            if let Some(s) = self.child.try_wait().expect("wait for SIPp") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!(
                    "SIPp did not finish within {SIPP_DEADLINE:?}\n{}",
                    logs_in(self.dir.path())
                ));
            }
            thread::sleep(Duration::from_millis(20));
        };
        if status.success() {
            Ok(messages(self.dir.path()))
        } else {
            Err(format!(
                "SIPp failed ({status})\n{}",
                logs_in(self.dir.path())
            ))
        }
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|f| f.extension().is_some_and(|x| x == "log"));
    files.sort();
    files
}

fn logs_in(dir: &Path) -> String {
    let mut out = String::new();
    for f in log_files(dir) {
        let text = String::from_utf8_lossy(&fs::read(&f).unwrap_or_default()).into_owned();
        let chars: Vec<char> = text.chars().collect();
        let tail: String = chars[chars.len().saturating_sub(8000)..].iter().collect();
        out += &format!("==== {} ====\n{tail}\n", f.display());
    }
    out
}

/// SIPp's message trace (everything sent and received).
fn messages(dir: &Path) -> String {
    log_files(dir)
        .iter()
        .filter(|f| f.to_string_lossy().ends_with("_messages.log"))
        .map(|f| String::from_utf8_lossy(&fs::read(f).unwrap_or_default()).replace('\r', ""))
        .collect()
}

fn ok(run: Result<String, String>, what: &str, carrier: &Carrier) -> String {
    run.unwrap_or_else(|e| panic!("{what}: {e}\n==== carrier log ====\n{}", carrier.log()))
}

/// Registers the PBX at `pbx_ip` with contact `sip:user@pbx_ip:PBX_PORT`.
fn register_pbx(carrier: &Carrier, pbx_ip: &str, user: &str) {
    register_contact(carrier, pbx_ip, user, "");
}

/// Registers `<sip:user@pbx_ip:PBX_PORT>` followed by `params` (e.g. `;q=0.5`).
fn register_contact(carrier: &Carrier, pbx_ip: &str, user: &str, params: &str) {
    let contact = format!("<sip:{user}@{pbx_ip}:{PBX_PORT}>{params}");
    let run = spawn_sipp(
        pbx_ip,
        0,
        Some(carrier.addr("udp").to_string()),
        Scenario::Xml(register_xml(user, &contact)),
        &["-au", user, "-ap", PASSWORD],
    )
    .wait();
    ok(run, "REGISTER", carrier);
}

/// Runs the caller from `ip` for `did`, expecting `status`; returns its message trace.
fn call(carrier: &Carrier, ip: &str, did: &str, status: u16) -> String {
    let run = spawn_sipp(
        ip,
        0,
        Some(carrier.addr("udp").to_string()),
        Scenario::Xml(caller_xml(did, status)),
        &[],
    )
    .wait();
    ok(run, "caller", carrier)
}

/// Waits (bounded) until the carrier has logged `needle`; returns the log.
fn wait_for_log(carrier: &Carrier, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = carrier.log();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "carrier never logged `{needle}`:\n{log}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The log line of the call's end.
fn delivery_line(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains("call delivery ended"))
        .expect("a delivery line")
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
    assert!(log.contains("not upstream"), "{log}");
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
