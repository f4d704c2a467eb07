//! SIPp (Debian package `sip-tester`) as an independent peer: scenarios for callers, PBXs
//! and gateways, and running them with bounded time. A missing SIPp fails the test.
#![allow(dead_code)]

use std::fs;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::Carrier;

pub const SIPP: &str = "sipp";
pub const SIPP_DEADLINE: Duration = Duration::from_secs(25);
pub const PASSWORD: &str = "s3cret-Pa55";
pub const PBX_PORT: u16 = 5071;

// === Scenarios ===

pub fn register_xml(user: &str, contact: &str) -> String {
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

pub const SDP: &str = "v=0\n\
o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]\n\
s=-\n\
c=IN IP[media_ip_type] [media_ip]\n\
t=0 0\n\
m=audio [media_port] RTP/AVP 0\n\
a=rtpmap:0 PCMU/8000\n";

pub fn invite(did: &str) -> String {
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
pub fn caller_xml(did: &str, status: u16) -> String {
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
pub fn answering_pbx_xml() -> String {
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
pub fn hanging_up_pbx_xml(did: &str) -> String {
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
         P-Asserted-Identity: <sip:pbx-claims@[local_ip]>\n\
         Content-Length: 0\n\n]]></send>\n\
         <recv response=\"200\"/>\n\
         </scenario>\n"
    )
}

/// The caller of a call the PBX hangs up: INVITE, 200 (ACK along the route), BYE from the PBX.
pub fn hung_up_caller_xml(did: &str) -> String {
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
pub fn ringing_pbx_xml() -> String {
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
pub fn cancelling_caller_xml(did: &str) -> String {
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
pub fn rejecting_pbx_xml(status: u16, reason: &str) -> String {
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
pub struct Sipp {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

/// Starts SIPp bound to `ip:port` (0: any) towards `target` (none for a UAS), with the
/// scenario `xml`, `extra` arguments, for one call.
pub fn spawn_sipp(
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

pub enum Scenario {
    Xml(String),
}

impl Sipp {
    /// Waits (bounded) for SIPp to end; Err with its logs when it failed.
    pub fn wait(mut self) -> Result<String, String> {
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

pub fn log_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|f| f.extension().is_some_and(|x| x == "log"));
    files.sort();
    files
}

pub fn logs_in(dir: &Path) -> String {
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
pub fn messages(dir: &Path) -> String {
    log_files(dir)
        .iter()
        .filter(|f| f.to_string_lossy().ends_with("_messages.log"))
        .map(|f| String::from_utf8_lossy(&fs::read(f).unwrap_or_default()).replace('\r', ""))
        .collect()
}

pub fn ok(run: Result<String, String>, what: &str, carrier: &Carrier) -> String {
    run.unwrap_or_else(|e| panic!("{what}: {e}\n==== carrier log ====\n{}", carrier.log()))
}

/// SIPp answering one call at `ip:port` (a PBX, the gateway), given time to bind.
pub fn answering_uas(ip: &str, port: u16) -> Sipp {
    let uas = spawn_sipp(ip, port, None, Scenario::Xml(answering_pbx_xml()), &[]);
    thread::sleep(Duration::from_millis(300));
    uas
}

/// Registers the PBX at `pbx_ip` with contact `sip:user@pbx_ip:PBX_PORT`.
pub fn register_pbx(carrier: &Carrier, pbx_ip: &str, user: &str) {
    register_contact(carrier, pbx_ip, user, "");
}

/// Registers `<sip:user@pbx_ip:PBX_PORT>` followed by `params` (e.g. `;q=0.5`).
pub fn register_contact(carrier: &Carrier, pbx_ip: &str, user: &str, params: &str) {
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
pub fn call(carrier: &Carrier, ip: &str, did: &str, status: u16) -> String {
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
pub fn wait_for_log(carrier: &Carrier, needle: &str) -> String {
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
pub fn delivery_line(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains("call delivery ended"))
        .expect("a delivery line")
}
