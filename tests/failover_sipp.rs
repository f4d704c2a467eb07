//! The delivery rule end to end across two trunk servers (issue 4): two real
//! `lifeline-carrier` processes as trunk1 and trunk2, each with its own data folder provisioned
//! the same way with `lifeline-carrier admin`; SIPp (`sip-tester`) as the upstream caller, the
//! PBX, the backup PBX and the PSTN gateway; plain UDP sockets as silent or watching peers.
//!
//! Each test has its own 127.0.N.0/24 block (DESIGN.md's roles): `.10` trunk1, `.20` trunk2,
//! `.11` the PBX, `.12` the backup PBX, `.13` the PSTN gateway, `.14` the caller, `.15` a
//! PBX contact that never answers. Fixed ports are safe because no two tests share a block.

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::thread;
use std::time::Duration;

use common::sipp::*;
use common::{Carrier, admin, start_carrier_in};

const DID: &str = "+15550001111";
const OWN_NUMBER: &str = "+15559990001";
const GLOBAL_NUMBER: &str = "+15559990002";
const GATEWAY_PORT: u16 = 5060;

/// One test's addresses.
#[derive(Clone, Copy)]
struct Net(u8);

impl Net {
    fn ip(self, host: u8) -> String {
        format!("127.0.{}.{host}", self.0)
    }
    fn trunk1(self) -> String {
        self.ip(10)
    }
    fn trunk2(self) -> String {
        self.ip(20)
    }
    fn pbx(self) -> String {
        self.ip(11)
    }
    fn backup(self) -> String {
        self.ip(12)
    }
    fn gateway(self) -> String {
        self.ip(13)
    }
    fn caller(self) -> String {
        self.ip(14)
    }
    fn silent(self) -> String {
        self.ip(15)
    }
}

/// The customer configuration, the same on both servers.
#[derive(Default, Clone)]
struct Customer {
    /// The DID's own failover number.
    did_number: Option<&'static str>,
    /// The trunk group's global failover number.
    global_number: Option<String>,
    /// The failover PBX as a SIP URI.
    pbx_uri: Option<String>,
    /// The failover PBX is the account's second trunk group, `backupN`.
    pbx_group: bool,
    /// Extra DIDs of the trunk group, each with its own failover number.
    more_dids: Vec<(&'static str, &'static str)>,
}

/// Provisions an account with trunk group `pbxN` (and `backupN`) owning [`DID`].
fn provision(dir: &Path, net: Net, c: &Customer) {
    let account = admin(dir, &["account", "add", "acme"]);
    let account = account.trim();
    let group = |user: &str| {
        admin(
            dir,
            &[
                "trunk-group",
                "add",
                "--account",
                account,
                "--name",
                user,
                "--username",
                user,
                "--password",
                PASSWORD,
            ],
        )
        .trim()
        .to_string()
    };
    let tg = group(&format!("pbx{}", net.0));
    admin(dir, &["did", "add", DID, "--trunk-group", &tg]);
    for (did, number) in &c.more_dids {
        admin(dir, &["did", "add", did, "--trunk-group", &tg]);
        admin(dir, &["did", "failover", did, "--number", number]);
    }
    if let Some(n) = c.did_number {
        admin(dir, &["did", "failover", DID, "--number", n]);
    }
    if let Some(n) = &c.global_number {
        admin(dir, &["trunk-group", "failover", &tg, "--number", n]);
    }
    if let Some(uri) = &c.pbx_uri {
        admin(dir, &["trunk-group", "failover", &tg, "--pbx", uri]);
    }
    if c.pbx_group {
        let backup = group(&format!("backup{}", net.0));
        admin(
            dir,
            &["trunk-group", "failover", &tg, "--pbx-trunk-group", &backup],
        );
    }
}

/// Starts trunk `n` (1 or 2) of `net` with short timers, trunk1 and trunk2 as its ordered
/// peers, the gateway at `.13`, and `extra` config lines.
fn trunk(net: Net, n: u8, c: &Customer, extra: &str) -> Carrier {
    let dir = tempfile::tempdir().unwrap();
    provision(dir.path(), net, c);
    let ip = if n == 1 { net.trunk1() } else { net.trunk2() };
    // Defaults for the keys `extra` does not set itself.
    let defaults: String = [
        "t1_ms = 50",
        "t2_ms = 200",
        "t4_ms = 250",
        "timer_d_ms = 500",
        "config_poll_ms = 100",
        "bindings_flush_ms = 50",
        "delivery_timer_ms = 1000",
        "setup_timer_ms = 2000",
    ]
    .iter()
    .filter(|line| {
        let key = line.split(' ').next().unwrap();
        !extra.lines().any(|l| l.starts_with(key))
    })
    .map(|line| format!("{line}\n"))
    .collect();
    let config = format!(
        "[carrier]\nname = \"trunk{n}\"\nsip_listen = [\"udp:{ip}:5060\"]\n{defaults}\
         upstream = [\"{caller}\"]\npstn_gateway = \"sip:{gw}:{GATEWAY_PORT}\"\n{extra}\n\
         [[carrier.peers]]\nname = \"trunk1\"\nuri = \"sip:{t1}:5060\"\n\
         [[carrier.peers]]\nname = \"trunk2\"\nuri = \"sip:{t2}:5060\"\n",
        caller = net.caller(),
        gw = net.gateway(),
        t1 = net.trunk1(),
        t2 = net.trunk2(),
    );
    start_carrier_in(dir, &config, 1)
}

/// Both trunk servers.
fn trunks(net: Net, c: &Customer) -> (Carrier, Carrier) {
    (trunk(net, 1, c, ""), trunk(net, 2, c, ""))
}

/// Registers `user` on `carrier` from `from_ip` with the contact `sip:user@contact_ip:5071`.
fn register(carrier: &Carrier, from_ip: &str, user: &str, contact_ip: &str) {
    let contact = format!("<sip:{user}@{contact_ip}:{PBX_PORT}>");
    let run = spawn_sipp(
        from_ip,
        0,
        Some(carrier.addr("udp").to_string()),
        Scenario::Xml(register_xml(user, &contact)),
        &["-au", user, "-ap", PASSWORD],
    )
    .wait();
    ok(run, "REGISTER", carrier);
}

/// A UDP socket that takes whatever is sent to it and never answers: a silent PBX, or a
/// watch on an address that must see nothing.
struct Silent(UdpSocket);

impl Silent {
    fn bind(ip: &str, port: u16) -> Silent {
        let s = UdpSocket::bind((ip, port)).unwrap();
        s.set_nonblocking(true).unwrap();
        Silent(s)
    }

    /// Everything received so far, as text.
    fn received(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok((n, _)) = self.0.recv_from(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }
}

/// A UAS (PBX or gateway) that answers `status` on `ip:port`.
fn uas(ip: &str, port: u16, scenario: String) -> Sipp {
    let s = spawn_sipp(ip, port, None, Scenario::Xml(scenario), &[]);
    // SIPp binds its socket right after it starts.
    thread::sleep(Duration::from_millis(300));
    s
}

/// Calls [`DID`] at trunk1 from the caller, expecting `status`.
fn call_trunk1(net: Net, t1: &Carrier, status: u16) -> String {
    call_did(net, t1, DID, status)
}

fn call_did(net: Net, t1: &Carrier, did: &str, status: u16) -> String {
    let run = spawn_sipp(
        &net.caller(),
        0,
        Some(t1.addr("udp").to_string()),
        Scenario::Xml(caller_xml(did, status)),
        &[],
    )
    .wait();
    ok(run, "caller", t1)
}

/// A PBX that rings, then answers `status` (not 2xx).
fn ringing_then_rejecting_pbx_xml(status: u16, reason: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\" ?>\n\
         <scenario name=\"pbx rings then rejects\">\n\
         <recv request=\"INVITE\"/>\n\
         <send><![CDATA[\nSIP/2.0 180 Ringing\n[last_Via:]\n[last_From:]\n\
         [last_To:];tag=[pid]SIPpTag01[call_number]\n[last_Call-ID:]\n[last_CSeq:]\n\
         Content-Length: 0\n\n]]></send>\n\
         <pause milliseconds=\"200\"/>\n\
         <send><![CDATA[\nSIP/2.0 {status} {reason}\n[last_Via:]\n[last_From:]\n\
         [last_To:];tag=[pid]SIPpTag01[call_number]\n[last_Call-ID:]\n[last_CSeq:]\n\
         Content-Length: 0\n\n]]></send>\n\
         <recv request=\"ACK\"/>\n\
         </scenario>\n"
    )
}

/// The last "call delivery ended" line of a carrier.
fn ended(carrier: &Carrier) -> String {
    let log = wait_for_log(carrier, "call delivery ended");
    log.lines()
        .rfind(|l| l.contains("call delivery ended"))
        .unwrap()
        .to_string()
}

fn saw_call(carrier: &Carrier) -> bool {
    carrier.log().contains("inbound call")
}

/// The INVITE a UAS received (its trace starts with what it received first).
fn first_invite(trace: &str) -> &str {
    let start = trace.find("INVITE sip:").expect("an INVITE in the trace");
    let rest = &trace[start..];
    &rest[..rest.find("\n\n").unwrap_or(rest.len())]
}

// === Rows ===

/// Row 2: the PBX is registered only on trunk2 and the DID has no failover: trunk1 passes the
/// call to trunk2, which delivers it; the PBX never sees the servers' mark.
#[test]
fn row02_registered_only_on_trunk2_is_passed_and_delivered() {
    let net = Net(82);
    let (t1, t2) = trunks(net, &Customer::default());
    register(&t2, &net.pbx(), "pbx82", &net.pbx());
    let pbx = uas(&net.pbx(), PBX_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    let trace = ok(pbx.wait(), "PBX", &t2);
    let invite = first_invite(&trace);
    assert!(
        invite.starts_with(&format!("INVITE sip:{DID}@{}:{PBX_PORT}", net.pbx())),
        "{invite}"
    );
    assert!(!invite.contains("Lifeline-Tried-By"), "{invite}");
    // Both servers recorded the route (BYE passed through both).
    assert_eq!(invite.matches("Record-Route:").count(), 2, "{invite}");
    let line1 = ended(&t1);
    assert!(
        line1.contains("passed to peer") && line1.contains("trunk2"),
        "{line1}"
    );
    let line2 = ended(&t2);
    assert!(
        line2.contains("delivered") && line2.contains("status=200"),
        "{line2}"
    );
    assert!(t2.log().contains("from_peer=trunk1"), "{}", t2.log());
}

/// Row 3: registered nowhere, no failover: both servers try, the caller gets 480, and trunk2
/// does not pass the call back to trunk1.
#[test]
fn row03_registered_nowhere_both_try_then_480() {
    let net = Net(83);
    let (t1, t2) = trunks(net, &Customer::default());
    call_trunk1(net, &t1, 480);
    let line2 = ended(&t2);
    assert!(
        line2.contains("failed") && line2.contains("status=480"),
        "{line2}"
    );
    let line1 = ended(&t1);
    assert!(line1.contains("status=480"), "{line1}");
    assert!(t2.log().contains("tried_by=trunk1"), "{}", t2.log());
    // trunk1 saw the call once: from the caller, never back from trunk2.
    assert_eq!(t1.log().matches("inbound call").count(), 1, "{}", t1.log());
}

/// Row 4: registered on trunk1 but silent, no failover: after the delivery timer trunk1
/// passes the call to trunk2, which delivers it.
#[test]
fn row04_silent_on_trunk1_passes_to_trunk2_after_the_delivery_timer() {
    let net = Net(84);
    let (t1, t2) = trunks(net, &Customer::default());
    let silent = Silent::bind(&net.silent(), PBX_PORT);
    register(&t1, &net.pbx(), "pbx84", &net.silent());
    register(&t2, &net.pbx(), "pbx84", &net.pbx());
    let pbx = uas(&net.pbx(), PBX_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    ok(pbx.wait(), "PBX", &t2);
    assert!(
        !silent.received().is_empty(),
        "trunk1 tried its binding first"
    );
    assert!(
        t1.log().contains("no response (delivery timer)"),
        "{}",
        t1.log()
    );
    let line1 = ended(&t1);
    assert!(
        line1.contains("passed to peer") && line1.contains("attempts=2"),
        "{line1}"
    );
}

/// Row 5: a per-DID failover number and the PBX down: the gateway gets the INVITE for that
/// number with the DID in Diversion; trunk2 never sees the call.
#[test]
fn row05_did_number_goes_to_the_gateway_with_diversion() {
    let net = Net(85);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        ..Customer::default()
    };
    let (t1, t2) = trunks(net, &c);
    let gw = uas(&net.gateway(), GATEWAY_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    let trace = ok(gw.wait(), "gateway", &t1);
    let invite = first_invite(&trace);
    assert!(
        invite.starts_with(&format!(
            "INVITE sip:{OWN_NUMBER}@{}:{GATEWAY_PORT}",
            net.gateway()
        )),
        "{invite}"
    );
    assert!(
        invite.contains(&format!("Diversion: <sip:{DID}@")),
        "{invite}"
    );
    assert!(invite.contains("reason=unavailable"), "{invite}");
    // The caller's From and the original To are kept.
    assert!(
        invite.contains(&format!("From: <sip:caller@{}", net.caller())),
        "{invite}"
    );
    assert!(invite.contains(&format!("To: <sip:{DID}@")), "{invite}");
    assert!(!saw_call(&t2), "trunk2 saw the call:\n{}", t2.log());
    let line = ended(&t1);
    assert!(
        line.contains("delivered") && line.contains(OWN_NUMBER),
        "{line}"
    );
}

/// Row 6: only a global failover number: the gateway gets that number.
#[test]
fn row06_global_number_goes_to_the_gateway() {
    let net = Net(86);
    let c = Customer {
        global_number: Some(GLOBAL_NUMBER.into()),
        ..Customer::default()
    };
    let (t1, t2) = trunks(net, &c);
    let gw = uas(&net.gateway(), GATEWAY_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    let trace = ok(gw.wait(), "gateway", &t1);
    assert!(
        first_invite(&trace).starts_with(&format!("INVITE sip:{GLOBAL_NUMBER}@")),
        "{trace}"
    );
    assert!(!saw_call(&t2));
}

/// Row 7: the DID's own number and a global one: the DID's own wins.
#[test]
fn row07_the_dids_own_number_wins() {
    let net = Net(87);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        global_number: Some(GLOBAL_NUMBER.into()),
        ..Customer::default()
    };
    let (t1, _t2) = trunks(net, &c);
    let gw = uas(&net.gateway(), GATEWAY_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    let trace = ok(gw.wait(), "gateway", &t1);
    assert!(
        first_invite(&trace).starts_with(&format!("INVITE sip:{OWN_NUMBER}@")),
        "{trace}"
    );
    assert!(!trace.contains(GLOBAL_NUMBER), "{trace}");
}

/// Row 8: a failover PBX (IP) and a number, the PBX down: the backup PBX is tried first and
/// answers; the gateway never sees the call.
#[test]
fn row08_failover_pbx_first() {
    let net = Net(88);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        pbx_uri: Some(format!("sip:{}:{PBX_PORT}", net.backup())),
        ..Customer::default()
    };
    let (t1, t2) = trunks(net, &c);
    let gw = Silent::bind(&net.gateway(), GATEWAY_PORT);
    let backup = uas(&net.backup(), PBX_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    let trace = ok(backup.wait(), "backup PBX", &t1);
    assert!(
        first_invite(&trace).starts_with(&format!("INVITE sip:{DID}@{}:{PBX_PORT}", net.backup())),
        "{trace}"
    );
    assert!(gw.received().is_empty(), "the gateway saw the call");
    assert!(!saw_call(&t2));
    let line = ended(&t1);
    assert!(
        line.contains("delivered") && line.contains(&net.backup()),
        "{line}"
    );
}

/// Row 9: the failover PBX is down too (silent): after its delivery timer, the number.
#[test]
fn row09_failover_pbx_down_then_the_number() {
    let net = Net(89);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        pbx_uri: Some(format!("sip:{}:{PBX_PORT}", net.backup())),
        ..Customer::default()
    };
    let (t1, t2) = trunks(net, &c);
    let backup = Silent::bind(&net.backup(), PBX_PORT);
    let gw = uas(&net.gateway(), GATEWAY_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    let trace = ok(gw.wait(), "gateway", &t1);
    assert!(
        first_invite(&trace).starts_with(&format!("INVITE sip:{OWN_NUMBER}@")),
        "{trace}"
    );
    assert!(
        !backup.received().is_empty(),
        "the backup PBX was tried first"
    );
    assert!(!saw_call(&t2));
    let line = ended(&t1);
    assert!(line.contains("attempts=2"), "{line}");
}

/// Row 10: the failover PBX is another trunk group of the account: its contact registered on
/// trunk1 gets the call.
#[test]
fn row10_failover_pbx_is_another_trunk_group() {
    let net = Net(90);
    let c = Customer {
        pbx_group: true,
        global_number: Some(GLOBAL_NUMBER.into()),
        ..Customer::default()
    };
    let (t1, _t2) = trunks(net, &c);
    register(&t1, &net.backup(), "backup90", &net.backup());
    let gw = Silent::bind(&net.gateway(), GATEWAY_PORT);
    let backup = uas(&net.backup(), PBX_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    let trace = ok(backup.wait(), "backup PBX", &t1);
    assert!(
        first_invite(&trace).starts_with(&format!("INVITE sip:{DID}@{}:{PBX_PORT}", net.backup())),
        "{trace}"
    );
    assert!(gw.received().is_empty(), "the gateway saw the call");
}

/// Row 13: the PBX answers 503: failover (to the number).
#[test]
fn row13_503_fails_over_to_the_number() {
    let net = Net(91);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        ..Customer::default()
    };
    let (t1, _t2) = trunks(net, &c);
    register(&t1, &net.pbx(), "pbx91", &net.pbx());
    let pbx = uas(
        &net.pbx(),
        PBX_PORT,
        rejecting_pbx_xml(503, "Service Unavailable"),
    );
    let gw = uas(&net.gateway(), GATEWAY_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    ok(pbx.wait(), "PBX", &t1);
    ok(gw.wait(), "gateway", &t1);
    let line = ended(&t1);
    assert!(
        line.contains("delivered") && line.contains(OWN_NUMBER),
        "{line}"
    );
}

/// Row 14: the caller CANCELs while the failover PBX rings: 487, and the backup gets the
/// CANCEL (no branch left ringing); the number is never tried.
#[test]
fn row14_cancel_during_failover() {
    let net = Net(92);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        pbx_uri: Some(format!("sip:{}:{PBX_PORT}", net.backup())),
        ..Customer::default()
    };
    let (t1, _t2) = trunks(net, &c);
    let gw = Silent::bind(&net.gateway(), GATEWAY_PORT);
    let backup = uas(&net.backup(), PBX_PORT, ringing_pbx_xml());
    let run = spawn_sipp(
        &net.caller(),
        0,
        Some(t1.addr("udp").to_string()),
        Scenario::Xml(cancelling_caller_xml(DID)),
        &[],
    )
    .wait();
    ok(run, "caller", &t1);
    let trace = ok(backup.wait(), "backup PBX", &t1);
    assert!(trace.contains("CANCEL sip:"), "{trace}");
    let line = ended(&t1);
    assert!(
        line.contains("cancelled") && line.contains("status=487"),
        "{line}"
    );
    thread::sleep(Duration::from_millis(300));
    assert!(gw.received().is_empty(), "the gateway saw the call");
}

/// Row 15 (the seed's "important detail"): failover is set and the PBX is registered only on
/// trunk2; a call at trunk1 goes to the failover, not to trunk2, and the log says why.
#[test]
fn row15_failover_wins_over_a_registration_on_trunk2() {
    let net = Net(93);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        ..Customer::default()
    };
    let (t1, t2) = trunks(net, &c);
    register(&t2, &net.pbx(), "pbx93", &net.pbx());
    let pbx = Silent::bind(&net.pbx(), PBX_PORT);
    let gw = uas(&net.gateway(), GATEWAY_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    ok(gw.wait(), "gateway", &t1);
    assert!(
        pbx.received().is_empty(),
        "the PBX got the call through trunk2"
    );
    assert!(!saw_call(&t2), "trunk2 saw the call");
    let log = t1.log();
    assert!(
        log.contains("so trunk1 does not pass the call to trunk2"),
        "the plan says why:\n{log}"
    );
}

/// Row 16: a failover number that leads back into the carrier (the gateway routes it to
/// trunk1, and that number's own failover leads back): the call ends, it does not loop.
#[test]
fn row16_failover_number_back_into_the_carrier_does_not_loop() {
    let net = Net(94);
    const OTHER: &str = "+15550002222";
    let c = Customer {
        did_number: Some(OTHER),
        more_dids: vec![(OTHER, DID)],
        ..Customer::default()
    };
    // trunk1 is its own PSTN gateway, and takes new calls from itself.
    let dir = tempfile::tempdir().unwrap();
    provision(dir.path(), net, &c);
    let t1 = start_carrier_in(
        dir,
        &format!(
            "[carrier]\nname = \"trunk1\"\nsip_listen = [\"udp:{t1}:5060\"]\n\
             t1_ms = 50\nt2_ms = 200\nt4_ms = 250\ntimer_d_ms = 500\n\
             upstream = [\"{caller}\", \"{t1}\"]\ndelivery_timer_ms = 1000\n\
             pstn_gateway = \"sip:{t1}:5060\"\n",
            t1 = net.trunk1(),
            caller = net.caller()
        ),
        1,
    );
    call_trunk1(net, &t1, 480);
    let log = t1.log();
    // DID -> OTHER (diverted from DID) -> DID would be the loop: that number is not tried.
    assert!(
        log.contains("is not tried: the call was already diverted"),
        "{log}"
    );
    assert_eq!(log.matches("inbound call").count(), 2, "{log}");
}

/// Row 20: the PBX rings, then answers 480: reached, so the caller gets 480 and no failover
/// follows.
#[test]
fn row20_ringing_then_480_is_relayed_without_failover() {
    let net = Net(95);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        ..Customer::default()
    };
    let (t1, _t2) = trunks(net, &c);
    register(&t1, &net.pbx(), "pbx95", &net.pbx());
    let gw = Silent::bind(&net.gateway(), GATEWAY_PORT);
    let pbx = uas(
        &net.pbx(),
        PBX_PORT,
        ringing_then_rejecting_pbx_xml(480, "Temporarily Unavailable"),
    );
    let trace = call_trunk1(net, &t1, 480);
    ok(pbx.wait(), "PBX", &t1);
    assert!(trace.contains("SIP/2.0 180"), "{trace}");
    let line = ended(&t1);
    assert!(
        line.contains("reached") && line.contains("attempts=1"),
        "{line}"
    );
    thread::sleep(Duration::from_millis(300));
    assert!(gw.received().is_empty(), "the gateway saw the call");
}

/// Row 18: the PBX's port is closed (ICMP port unreachable) and a failover number is set: the
/// gateway gets the call without waiting for the delivery timer, which is set far beyond the
/// caller's patience here (the caller gives up after 15 s).
#[test]
fn row18_icmp_unreachable_fails_over_at_once() {
    let net = Net(96);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        ..Customer::default()
    };
    let t1 = trunk(net, 1, &c, "delivery_timer_ms = 60000");
    // The contact names a port where nothing listens.
    register(&t1, &net.pbx(), "pbx96", &net.silent());
    let gw = uas(&net.gateway(), GATEWAY_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    ok(gw.wait(), "gateway", &t1);
    let log = t1.log();
    assert!(log.contains("ICMP error: destination unreachable"), "{log}");
    assert!(log.contains("transport error"), "{log}");
    let line = ended(&t1);
    assert!(
        line.contains("delivered") && line.contains(OWN_NUMBER),
        "{line}"
    );
}

/// A UAS that answers OPTIONS probes with 200, `count` times.
fn options_answering_xml(count: usize) -> String {
    let one = "<recv request=\"OPTIONS\"/>\n\
               <send><![CDATA[\nSIP/2.0 200 OK\n[last_Via:]\n[last_From:]\n\
               [last_To:];tag=[pid]SIPpTag01[call_number]\n[last_Call-ID:]\n[last_CSeq:]\n\
               Content-Length: 0\n\n]]></send>\n";
    format!(
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\" ?>\n\
         <scenario name=\"answers probes\">\n{}</scenario>\n",
        one.repeat(count)
    )
}

/// Row 19: the PBX is registered but fails its OPTIONS probes: it is skipped and the call goes
/// to the failover number at once (the delivery timer is far beyond the caller's patience).
/// Once it answers probes again it is used again.
#[test]
fn row19_binding_failing_its_probes_is_skipped() {
    let net = Net(97);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        ..Customer::default()
    };
    let t1 = trunk(
        net,
        1,
        &c,
        "delivery_timer_ms = 60000\nprobe_interval_ms = 200\nprobe_timeout_ms = 300\n\
         probe_failures = 2",
    );
    let silent = Silent::bind(&net.silent(), PBX_PORT);
    register(&t1, &net.pbx(), "pbx97", &net.silent());
    wait_for_log(&t1, "binding failing its probes");
    let gw = uas(&net.gateway(), GATEWAY_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    ok(gw.wait(), "gateway", &t1);
    let seen = silent.received();
    assert!(
        seen.iter().any(|m| m.starts_with("OPTIONS sip:pbx97@")),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|m| m.starts_with("INVITE")),
        "the skipped PBX got the call"
    );
    // The PBX comes back: it answers probes, and is used again.
    drop(silent);
    let pbx = uas(&net.silent(), PBX_PORT, options_answering_xml(1));
    ok(pbx.wait(), "PBX answering a probe", &t1);
    wait_for_log(&t1, "binding answers its probes again");
}

/// Row 11: the failover PBX is an FQDN: RFC 3263 through SRV from a DNS server on loopback;
/// the first target is dead (its port closed), the second answers.
#[test]
fn row11_failover_pbx_fqdn_tries_every_srv_target() {
    let net = Net(98);
    let zone = format!(
        "$ORIGIN example.test.\n$TTL 300\n\
         @ IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 30\n\
         @ IN NS ns\nns IN A {dns}\n\
         _sip._udp.backup IN SRV 20 0 {PBX_PORT} live.backup\n\
         _sip._udp.backup IN SRV 10 0 {PBX_PORT} dead.backup\n\
         dead.backup IN A {dead}\nlive.backup IN A {live}\n",
        dns = net.ip(53),
        dead = net.silent(),
        live = net.backup(),
    );
    let dns = common::dns::BackgroundDns::start_on(&net.ip(53), &zone);
    let c = Customer {
        global_number: Some(GLOBAL_NUMBER.into()),
        pbx_uri: Some("sip:backup.example.test".into()),
        ..Customer::default()
    };
    let t1 = trunk(net, 1, &c, &format!("dns_servers = [\"{}\"]", dns.addr));
    let gw = Silent::bind(&net.gateway(), GATEWAY_PORT);
    let backup = uas(&net.backup(), PBX_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    let trace = ok(backup.wait(), "backup PBX", &t1);
    assert!(
        first_invite(&trace).starts_with(&format!("INVITE sip:{DID}@backup.example.test")),
        "{trace}"
    );
    let log = t1.log();
    assert!(log.contains("failover PBX resolved"), "{log}");
    let line = ended(&t1);
    // The dead target first (transport error), then the live one.
    assert!(
        line.contains("attempts=2") && line.contains(&net.backup()),
        "{line}"
    );
    assert!(gw.received().is_empty(), "the gateway saw the call");
}

/// Runs `lifeline-carrier ARGS` with the carrier's config and data folder; returns (exit
/// code, standard output, standard error).
fn carrier_cmd(carrier: &Carrier, args: &[&str]) -> (i32, String, String) {
    let dir = carrier.dir.path();
    let config = dir.join("carrier.toml");
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = common::run_carrier(&dir.join("data"), &all);
    (out.code, out.stdout, out.stderr)
}

/// The record of a call lists each target tried with its outcome, and what the caller got
/// (`lifeline-carrier calls` on the running server's data folder).
#[test]
fn every_call_is_recorded_with_its_targets() {
    let net = Net(99);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        pbx_uri: Some(format!("sip:{}:{PBX_PORT}", net.backup())),
        ..Customer::default()
    };
    let t1 = trunk(net, 1, &c, "");
    let backup = Silent::bind(&net.backup(), PBX_PORT);
    let gw = uas(&net.gateway(), GATEWAY_PORT, answering_pbx_xml());
    call_trunk1(net, &t1, 200);
    ok(gw.wait(), "gateway", &t1);
    assert!(!backup.received().is_empty());
    // Written behind: wait (bounded) until the record is there.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let out = loop {
        let (code, out, err) = carrier_cmd(&t1, &["calls", "--did", "15550001111"]);
        assert_eq!(code, 0, "{err}");
        if !out.is_empty() {
            break out;
        }
        assert!(std::time::Instant::now() < deadline, "no call record");
        thread::sleep(Duration::from_millis(50));
    };
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let call: Vec<&str> = lines[0].split('\t').collect();
    assert_eq!(call[2], DID, "{out}");
    assert_eq!(call[3], "200", "{out}");
    assert_eq!(call[4], "delivered", "{out}");
    assert!(call[5].contains(OWN_NUMBER), "{out}");
    assert!(
        lines[1].contains("failover PBX") && lines[1].contains("no response"),
        "{out}"
    );
    assert!(
        lines[2].contains("failover number") && lines[2].contains("answered 200"),
        "{out}"
    );
}

/// `explain` prints the plan a call to the DID would follow right now, with the reasons.
#[test]
fn explain_prints_the_plan() {
    let net = Net(100);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        pbx_uri: Some(format!("sip:{}:{PBX_PORT}", net.backup())),
        ..Customer::default()
    };
    let t1 = trunk(net, 1, &c, "");
    register(&t1, &net.pbx(), "pbx100", &net.pbx());
    // The binding reaches the bindings file within bindings_flush_ms.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let out = loop {
        let (code, out, err) = carrier_cmd(&t1, &["explain", "15550001111"]);
        assert_eq!(code, 0, "{err}");
        if out.contains("bindings on trunk1: 1") {
            break out;
        }
        assert!(std::time::Instant::now() < deadline, "{out}");
        thread::sleep(Duration::from_millis(50));
    };
    let stage = |n: &str| {
        out.lines()
            .find(|l| l.starts_with(n))
            .unwrap_or_else(|| panic!("no line {n}:\n{out}"))
            .to_string()
    };
    assert!(
        stage("1. primary:").contains(&format!("{}:{PBX_PORT}", net.pbx())),
        "{out}"
    );
    assert!(stage("2. failover PBX:").contains(&net.backup()), "{out}");
    assert!(stage("3. failover number:").contains(OWN_NUMBER), "{out}");
    assert!(
        stage("4. next trunk server:").contains("does not pass the call to trunk2"),
        "{out}"
    );
    // An unknown DID: a clear error, exit 1.
    let (code, _, err) = carrier_cmd(&t1, &["explain", "+15550009999"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("+15550009999") && err.contains("not a DID"),
        "{err}"
    );
}

/// `explain` for a DID without failover on a server where it is not registered: the next
/// trunk server.
#[test]
fn explain_without_failover_names_the_next_server() {
    let net = Net(101);
    let t1 = trunk(net, 1, &Customer::default(), "");
    let (code, out, err) = carrier_cmd(&t1, &["explain", DID]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bindings on trunk1: 0"), "{out}");
    assert!(out.contains("1. primary: none"), "{out}");
    assert!(out.contains("4. next trunk server: trunk2"), "{out}");
    assert!(out.contains("peer trunk2 at sip:"), "{out}");
}

/// A PBX that rings and answers with a P-Asserted-Identity of its own (which the carrier must
/// not pass on: only the upstream and peers assert identities), then takes ACK and BYE.
fn asserting_pbx_xml() -> String {
    let dialog = "[last_Via:]\n[last_From:]\n[last_To:];tag=[pid]SIPpTag01[call_number]\n\
                  [last_Call-ID:]\n[last_CSeq:]\n";
    format!(
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\" ?>\n\
         <scenario name=\"pbx asserts\">\n\
         <recv request=\"INVITE\"/>\n\
         <send><![CDATA[\nSIP/2.0 180 Ringing\n{dialog}[last_Record-Route:]\n\
         P-Asserted-Identity: <sip:pbx-claims@[local_ip]>\n\
         Contact: <sip:pbx@[local_ip]:[local_port]>\nContent-Length: 0\n\n]]></send>\n\
         <send retrans=\"500\"><![CDATA[\nSIP/2.0 200 OK\n{dialog}[last_Record-Route:]\n\
         P-Asserted-Identity: <sip:pbx-claims@[local_ip]>\n\
         Contact: <sip:pbx@[local_ip]:[local_port]>\nContent-Type: application/sdp\n\
         Content-Length: [len]\n\nv=0\no=- 1 1 IN IP4 [local_ip]\ns=-\nc=IN IP4 [local_ip]\n\
         t=0 0\nm=audio 4000 RTP/AVP 0\n]]></send>\n\
         <recv request=\"ACK\"/>\n\
         <recv request=\"BYE\"/>\n\
         <send><![CDATA[\nSIP/2.0 200 OK\n[last_Via:]\n[last_From:]\n[last_To:]\n\
         [last_Call-ID:]\n[last_CSeq:]\nContent-Length: 0\n\n]]></send>\n\
         </scenario>\n"
    )
}

/// Row 1 with both servers: the PBX registered on trunk1 answers; trunk1 delivers, trunk2
/// never sees the call, the BYE passes through; the caller's P-Asserted-Identity reaches the
/// PBX, the PBX's own does not reach the caller.
#[test]
fn row01_delivered_by_trunk1_with_identities_only_from_trusted_sources() {
    let net = Net(102);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        ..Customer::default()
    };
    let (t1, t2) = trunks(net, &c);
    register(&t1, &net.pbx(), "pbx102", &net.pbx());
    let gw = Silent::bind(&net.gateway(), GATEWAY_PORT);
    let pbx = uas(&net.pbx(), PBX_PORT, asserting_pbx_xml());
    let trace = call_trunk1(net, &t1, 200);
    let pbx_trace = ok(pbx.wait(), "PBX", &t1);
    assert!(
        first_invite(&pbx_trace).contains("P-Asserted-Identity: <sip:+15557770000@"),
        "{pbx_trace}"
    );
    assert!(
        pbx_trace.contains("BYE sip:"),
        "the BYE passed: {pbx_trace}"
    );
    assert!(trace.contains("SIP/2.0 200"), "{trace}");
    assert!(
        !trace.contains("pbx-claims"),
        "the PBX's identity reached the caller: {trace}"
    );
    assert!(!saw_call(&t2), "trunk2 saw the call");
    assert!(gw.received().is_empty(), "the gateway saw the call");
    let line = ended(&t1);
    assert!(
        line.contains("delivered") && line.contains(&net.pbx()),
        "{line}"
    );
}

/// Row 12 with failover set: the PBX answers 486: the caller gets 486, the gateway never sees
/// the call.
#[test]
fn row12_busy_is_relayed_and_not_failed_over() {
    let net = Net(103);
    let c = Customer {
        did_number: Some(OWN_NUMBER),
        ..Customer::default()
    };
    let (t1, t2) = trunks(net, &c);
    register(&t1, &net.pbx(), "pbx103", &net.pbx());
    let gw = Silent::bind(&net.gateway(), GATEWAY_PORT);
    let pbx = uas(&net.pbx(), PBX_PORT, rejecting_pbx_xml(486, "Busy Here"));
    call_trunk1(net, &t1, 486);
    ok(pbx.wait(), "PBX", &t1);
    let line = ended(&t1);
    assert!(
        line.contains("reached") && line.contains("attempts=1"),
        "{line}"
    );
    thread::sleep(Duration::from_millis(300));
    assert!(gw.received().is_empty(), "the gateway saw the call");
    assert!(!saw_call(&t2));
}
