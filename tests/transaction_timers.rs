//! The transaction table (RFC 3261 §17) driven with synthetic instants: matching of requests
//! and responses, timers, and that every transaction is forgotten once its timers have fired.

use std::time::Duration;

use bytes::Bytes;
use lifeline::sip::message::{HeaderName, Message, Method};
use lifeline::sip::transaction::{
    ClientEvent, ClientState, Event, RequestDisposition, ServerEvent, ServerState, TimerConfig,
    TransactionError, Transactions, ack_for, cancel_for,
};
use tokio::time::Instant;

/// Where a message goes: a name is enough for the table.
type Dest = &'static str;

/// An INVITE from a PBX, as received by the carrier.
const INVITE_IN: &str = "INVITE sip:+15551234567@carrier.example.net SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKpbx1;rport\r\n\
Max-Forwards: 70\r\n\
From: \"Alice\" <sip:1000@pbx.example.com>;tag=a1\r\n\
To: <sip:+15551234567@carrier.example.net>\r\n\
Call-ID: call-1@pbx.example.com\r\n\
CSeq: 20 INVITE\r\n\
Contact: <sip:1000@198.51.100.7:5060>\r\n\
Content-Length: 0\r\n\r\n";

/// The same INVITE forwarded by the carrier to a trunk: our Via on top, a Route to the trunk.
const INVITE_OUT: &str = "INVITE sip:+15551234567@trunk-a.example.org SIP/2.0\r\n\
Via: SIP/2.0/UDP 203.0.113.10:5060;branch=z9hG4bKcar1\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKpbx1;rport=5060;received=198.51.100.7\r\n\
Route: <sip:sbc.trunk-a.example.org;lr>\r\n\
Max-Forwards: 69\r\n\
From: \"Alice\" <sip:1000@pbx.example.com>;tag=a1\r\n\
To: <sip:+15551234567@carrier.example.net>\r\n\
Call-ID: call-1@pbx.example.com\r\n\
CSeq: 20 INVITE\r\n\
Contact: <sip:1000@198.51.100.7:5060>\r\n\
Content-Length: 0\r\n\r\n";

const OPTIONS_IN: &str = "OPTIONS sip:carrier.example.net SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKopt1\r\n\
Max-Forwards: 70\r\n\
From: <sip:pbx@pbx.example.com>;tag=o1\r\n\
To: <sip:carrier.example.net>\r\n\
Call-ID: opt-1@pbx.example.com\r\n\
CSeq: 7 OPTIONS\r\n\
Content-Length: 0\r\n\r\n";

/// An RFC 2543 INVITE: no magic cookie in its Via.
const INVITE_2543: &str = "INVITE sip:+15557654321@carrier.example.net SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.5:5060\r\n\
From: <sip:old@legacy.example.com>;tag=l1\r\n\
To: <sip:+15557654321@carrier.example.net>\r\n\
Call-ID: legacy-1@192.0.2.5\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\r\n";

fn msg(text: &str) -> Message {
    Message::parse(Bytes::copy_from_slice(text.as_bytes())).unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn table() -> Transactions<Dest> {
    Transactions::new(TimerConfig::default())
}

fn transmits(t: &mut Transactions<Dest>) -> Vec<(Dest, Bytes)> {
    std::iter::from_fn(|| t.poll_transmit()).collect()
}

fn events(t: &mut Transactions<Dest>) -> Vec<Event> {
    std::iter::from_fn(|| t.poll_event()).collect()
}

/// Fires each deadline up to `until` exactly when due; returns when each send happened (ms
/// after `t0`), where to and what.
fn run(t: &mut Transactions<Dest>, t0: Instant, until: u64) -> Vec<(u64, Dest, Bytes)> {
    let mut sent = Vec::new();
    while let Some(at) = t.poll_timeout() {
        if at > t0 + ms(until) {
            break;
        }
        t.handle_timeout(at);
        let offset = (at - t0).as_millis() as u64;
        sent.extend(transmits(t).into_iter().map(|(d, b)| (offset, d, b)));
    }
    sent
}

/// Runs every timer out; the table must then be empty.
fn run_out(t: &mut Transactions<Dest>, t0: Instant) -> Vec<(u64, Dest, Bytes)> {
    let sent = run(t, t0, 3_600_000);
    assert!(t.is_empty(), "transactions left: {}", t.len());
    assert_eq!(t.poll_timeout(), None);
    sent
}

fn offsets(sent: &[(u64, Dest, Bytes)]) -> Vec<u64> {
    sent.iter().map(|(t, _, _)| *t).collect()
}

// --- client side ---

#[test]
fn invite_client_486_is_acked_passed_up_once_then_timer_d() {
    let t0 = Instant::now();
    let mut t = table();
    let invite = msg(INVITE_OUT);
    let id = t.new_client(t0, invite.clone(), "trunk-a", false).unwrap();
    assert_eq!(transmits(&mut t), [("trunk-a", invite.to_bytes())]);

    let ringing = invite.response(180, "Ringing", Some("t1"));
    assert_eq!(
        t.handle_response(t0 + ms(100), ringing.clone()).ok(),
        Some((id, Some(ClientEvent::Provisional(ringing))))
    );
    // A response for another branch is a stray: the caller drops it.
    let mut stray = msg(&INVITE_OUT.replace("z9hG4bKcar1", "z9hG4bKcar9"));
    stray = stray.response(486, "Busy Here", Some("t9"));
    assert_eq!(t.handle_response(t0 + ms(150), stray.clone()).ok(), None);

    let busy = invite.response(486, "Busy Here", Some("t1"));
    assert_eq!(
        t.handle_response(t0 + ms(200), busy.clone()).ok(),
        Some((id, Some(ClientEvent::Final(busy.clone()))))
    );
    let sent = transmits(&mut t);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, "trunk-a");
    let ack = msg(std::str::from_utf8(&sent[0].1).unwrap());
    assert_eq!(*ack.method(), Method::Ack);
    assert_eq!(ack.to().tag(), Some("t1"));
    assert_eq!(ack.branch(), Some("z9hG4bKcar1"));
    assert_eq!(ack.vias().len(), 1);
    assert_eq!(ack.cseq().seq, 20);
    assert_eq!(ack.cseq().method, Method::Ack);
    assert_eq!(
        ack.header_values(&HeaderName::Route).unwrap(),
        ["<sip:sbc.trunk-a.example.org;lr>"]
    );
    assert_eq!(sent[0].1, ack_for(&invite, &busy).to_bytes());

    // The 486 again: the ACK again, nothing for the TU.
    assert_eq!(
        t.handle_response(t0 + ms(700), busy.clone()).ok(),
        Some((id, None))
    );
    assert_eq!(transmits(&mut t), sent);
    assert_eq!(t.client(id).unwrap().state(), ClientState::Completed);

    // Timer D (32 s) and the table forgets it; nothing else is sent or reported.
    assert!(run(&mut t, t0, 200 + 31_999).is_empty());
    assert_eq!(t.len(), 1);
    assert!(run_out(&mut t, t0).is_empty());
    assert!(events(&mut t).is_empty());
    assert_eq!(t.handle_response(t0 + ms(40_000), busy.clone()).ok(), None);
}

#[test]
fn timer_a_then_timer_b_reaches_the_tu_through_poll_event() {
    let t0 = Instant::now();
    let mut t = table();
    let invite = msg(INVITE_OUT);
    let id = t.new_client(t0, invite.clone(), "trunk-a", false).unwrap();
    transmits(&mut t);
    let sent = run_out(&mut t, t0);
    assert_eq!(
        offsets(&sent),
        [
            500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
        ]
    );
    assert!(
        sent.iter()
            .all(|(_, d, b)| *d == "trunk-a" && *b == invite.to_bytes())
    );
    assert_eq!(events(&mut t), [Event::Client(id, ClientEvent::Timeout)]);
}

#[test]
fn timer_e_doubles_to_t2_and_timer_f_times_out() {
    let t0 = Instant::now();
    let mut t = table();
    let options = msg(&OPTIONS_IN.replace("z9hG4bKopt1", "z9hG4bKprobe1"));
    let id = t.new_client(t0, options, "trunk-b", false).unwrap();
    transmits(&mut t);
    let sent = run_out(&mut t, t0);
    assert_eq!(
        offsets(&sent),
        [
            500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
        ]
    );
    assert_eq!(events(&mut t), [Event::Client(id, ClientEvent::Timeout)]);
}

#[test]
fn non_invite_client_final_then_timer_k() {
    let t0 = Instant::now();
    let mut t = table();
    let options = msg(OPTIONS_IN);
    let id = t.new_client(t0, options.clone(), "trunk-b", false).unwrap();
    transmits(&mut t);
    let ok = options.response(200, "OK", Some("p1"));
    assert_eq!(
        t.handle_response(t0 + ms(40), ok.clone()).ok(),
        Some((id, Some(ClientEvent::Final(ok.clone()))))
    );
    assert_eq!(
        t.handle_response(t0 + ms(600), ok.clone()).ok(),
        Some((id, None))
    );
    assert_eq!(t.poll_timeout(), Some(t0 + ms(40 + 5000)));
    assert!(run_out(&mut t, t0).is_empty());
}

#[test]
fn reliable_transport_means_no_retransmissions() {
    let t0 = Instant::now();
    let mut t = table();
    let invite = msg(INVITE_OUT);
    let id = t
        .new_client(t0, invite.clone(), "trunk-a-tcp", true)
        .unwrap();
    assert_eq!(transmits(&mut t).len(), 1);
    assert_eq!(t.poll_timeout(), Some(t0 + ms(32_000)));
    assert!(run_out(&mut t, t0).is_empty());
    assert_eq!(events(&mut t), [Event::Client(id, ClientEvent::Timeout)]);

    // Timer D is zero: the 486 is acked and the transaction forgotten at once.
    t.new_client(t0, invite.clone(), "trunk-a-tcp", true)
        .unwrap();
    transmits(&mut t);
    t.handle_response(t0, invite.response(486, "Busy Here", Some("t1")))
        .ok()
        .unwrap();
    assert_eq!(transmits(&mut t).len(), 1);
    assert!(t.is_empty());
}

#[test]
fn cancel_helper_shares_the_branch_and_matches_by_method() {
    let t0 = Instant::now();
    let mut t = table();
    let invite = msg(INVITE_OUT);
    let inv = t.new_client(t0, invite.clone(), "trunk-a", false).unwrap();
    transmits(&mut t);
    t.handle_response(t0 + ms(100), invite.response(180, "Ringing", Some("t1")))
        .ok();

    let can = t.cancel(t0 + ms(200), inv).unwrap();
    assert_ne!(can, inv);
    let sent = transmits(&mut t);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, "trunk-a");
    let cancel = msg(std::str::from_utf8(&sent[0].1).unwrap());
    assert_eq!(sent[0].1, cancel_for(&invite).to_bytes());
    assert_eq!(cancel.branch(), Some("z9hG4bKcar1"));
    assert_eq!(cancel.cseq().method, Method::Cancel);
    assert_eq!(t.cancel(t0, inv), Err(TransactionError::DuplicateBranch));
    assert_eq!(t.cancel(t0, can), Err(TransactionError::NotInvite));

    // Same branch, told apart by the CSeq method.
    let ok = cancel.response(200, "OK", Some("t1"));
    assert_eq!(
        t.handle_response(t0 + ms(250), ok.clone()).ok(),
        Some((can, Some(ClientEvent::Final(ok))))
    );
    let terminated = invite.response(487, "Request Terminated", Some("t1"));
    assert_eq!(
        t.handle_response(t0 + ms(260), terminated.clone()).ok(),
        Some((inv, Some(ClientEvent::Final(terminated))))
    );
    assert_eq!(transmits(&mut t).len(), 1); // the ACK of the 487
    assert!(run_out(&mut t, t0).is_empty());
    assert!(events(&mut t).is_empty());
}

#[test]
fn new_client_refuses_what_it_could_not_match() {
    let t0 = Instant::now();
    let mut t = table();
    let invite = msg(INVITE_OUT);
    let busy = invite.response(486, "Busy Here", Some("t1"));
    assert_eq!(
        t.new_client(t0, ack_for(&invite, &busy), "x", false),
        Err(TransactionError::Ack)
    );
    assert_eq!(
        t.new_client(t0, msg(INVITE_2543), "x", false),
        Err(TransactionError::NoBranch)
    );
    assert!(matches!(
        t.new_client(t0, busy, "x", false),
        Err(TransactionError::WrongKind(_))
    ));
    t.new_client(t0, invite.clone(), "x", false).unwrap();
    assert_eq!(
        t.new_client(t0, invite, "x", false),
        Err(TransactionError::DuplicateBranch)
    );
    assert_eq!(t.len(), 1);
}

// --- server side ---

#[test]
fn non_invite_server_absorbs_then_timer_j_forgets_it() {
    let t0 = Instant::now();
    let mut t = table();
    let options = msg(OPTIONS_IN);
    let RequestDisposition::New(id) = t.handle_request(t0, &options, "pbx", false) else {
        panic!("a new request")
    };
    // Before any response: absorbed, nothing to re-send.
    assert_eq!(
        t.handle_request(t0 + ms(500), &options, "pbx", false),
        RequestDisposition::Absorbed
    );
    assert!(transmits(&mut t).is_empty());
    let trying = options.response(100, "Trying", None);
    t.respond(id, t0 + ms(600), trying.clone()).unwrap();
    assert_eq!(transmits(&mut t), [("pbx", trying.to_bytes())]);
    // After a provisional: the provisional again, to where the copy came from.
    assert_eq!(
        t.handle_request(t0 + ms(1500), &options, "pbx-new-port", false),
        RequestDisposition::Absorbed
    );
    assert_eq!(transmits(&mut t), [("pbx-new-port", trying.to_bytes())]);
    let ok = options.response(200, "OK", Some("s1"));
    t.respond(id, t0 + ms(2000), ok.clone()).unwrap();
    assert_eq!(t.server(id).unwrap().state(), ServerState::Completed);
    transmits(&mut t);
    // After the final: the final again.
    assert_eq!(
        t.handle_request(t0 + ms(5500), &options, "pbx-new-port", false),
        RequestDisposition::Absorbed
    );
    assert_eq!(transmits(&mut t), [("pbx-new-port", ok.to_bytes())]);
    // Timer J = 64·T1 after the final, then the table forgets it...
    assert!(run(&mut t, t0, 2000 + 31_999).is_empty());
    assert_eq!(t.len(), 1);
    assert!(run_out(&mut t, t0).is_empty());
    assert!(events(&mut t).is_empty());
    // ...and the same request is new again.
    assert!(matches!(
        t.handle_request(t0 + ms(40_000), &options, "pbx", false),
        RequestDisposition::New(other) if other != id
    ));
}

#[test]
fn invite_server_404_on_timer_g_until_ack_then_timer_i() {
    let t0 = Instant::now();
    let mut t = table();
    let invite = msg(INVITE_IN);
    let RequestDisposition::New(id) = t.handle_request(t0, &invite, "pbx", false) else {
        panic!("a new request")
    };
    t.respond(id, t0, invite.response(100, "Trying", None))
        .unwrap();
    let not_found = invite.response(404, "Not Found", Some("s1"));
    t.respond(id, t0 + ms(10), not_found.clone()).unwrap();
    assert_eq!(transmits(&mut t).len(), 2);
    let sent = run(&mut t, t0, 20_000);
    assert_eq!(offsets(&sent), [510, 1510, 3510, 7510, 11510, 15510, 19510]);
    assert!(
        sent.iter()
            .all(|(_, d, b)| *d == "pbx" && *b == not_found.to_bytes())
    );

    let ack = ack_for(&invite, &not_found);
    let at = t0 + ms(20_000);
    assert_eq!(
        t.handle_request(at, &ack, "pbx", false),
        RequestDisposition::Absorbed
    );
    assert_eq!(t.server(id).unwrap().state(), ServerState::Confirmed);
    assert_eq!(
        t.handle_request(at + ms(300), &ack, "pbx", false),
        RequestDisposition::Absorbed
    );
    assert!(transmits(&mut t).is_empty());
    // Timer I = T4; no more G.
    assert_eq!(t.poll_timeout(), Some(at + ms(5000)));
    assert!(run_out(&mut t, t0).is_empty());
    assert!(events(&mut t).is_empty());
}

#[test]
fn invite_server_timer_h_without_ack_is_a_timeout_event() {
    let t0 = Instant::now();
    let mut t = table();
    let invite = msg(INVITE_IN);
    let RequestDisposition::New(id) = t.handle_request(t0, &invite, "pbx", false) else {
        panic!("a new request")
    };
    t.respond(
        id,
        t0,
        invite.response(503, "Service Unavailable", Some("s1")),
    )
    .unwrap();
    transmits(&mut t);
    let sent = run_out(&mut t, t0);
    assert_eq!(sent.len(), 10);
    assert_eq!(events(&mut t), [Event::Server(id, ServerEvent::Timeout)]);
    // A late ACK finds no transaction: the core's.
    let ack = ack_for(
        &invite,
        &invite.response(503, "Service Unavailable", Some("s1")),
    );
    assert_eq!(
        t.handle_request(t0 + ms(40_000), &ack, "pbx", false),
        RequestDisposition::Ack
    );
    assert!(t.is_empty());
}

#[test]
fn invite_server_2xx_accepted_absorbs_the_invite_and_leaves_the_ack_to_the_core() {
    let t0 = Instant::now();
    let mut t = table();
    let invite = msg(INVITE_IN);
    let RequestDisposition::New(id) = t.handle_request(t0, &invite, "pbx", false) else {
        panic!("a new request")
    };
    let ok = invite.response(200, "OK", Some("s1"));
    t.respond(id, t0 + ms(10), ok.clone()).unwrap();
    assert_eq!(t.server(id).unwrap().state(), ServerState::Accepted);
    transmits(&mut t);
    // The INVITE retransmission that crossed the 200 is not a new call.
    assert_eq!(
        t.handle_request(t0 + ms(500), &invite, "pbx", false),
        RequestDisposition::Absorbed
    );
    assert!(transmits(&mut t).is_empty());
    // A forwarded 2xx retransmission passes through.
    t.respond(id, t0 + ms(510), ok.clone()).unwrap();
    assert_eq!(transmits(&mut t), [("pbx", ok.to_bytes())]);
    // The 2xx ACK has a branch of its own (§17.1.1.3): not a transaction's.
    let ack = msg(&INVITE_IN
        .replace("INVITE sip:", "ACK sip:")
        .replace("20 INVITE", "20 ACK")
        .replace("z9hG4bKpbx1", "z9hG4bKpbx2"));
    assert_eq!(
        t.handle_request(t0 + ms(520), &ack, "pbx", false),
        RequestDisposition::Ack
    );
    // Timer L, then forgotten.
    assert!(run_out(&mut t, t0).is_empty());
    assert!(events(&mut t).is_empty());
    assert_eq!(
        t.respond(id, t0 + ms(40_000), ok),
        Err(TransactionError::Unknown)
    );
}

#[test]
fn cancel_gets_its_own_transaction_and_finds_the_invite() {
    let t0 = Instant::now();
    let mut t = table();
    let invite = msg(INVITE_IN);
    let RequestDisposition::New(inv) = t.handle_request(t0, &invite, "pbx", false) else {
        panic!("a new request")
    };
    t.respond(inv, t0, invite.response(100, "Trying", None))
        .unwrap();
    let cancel = cancel_for(&invite);
    let RequestDisposition::New(can) = t.handle_request(t0 + ms(50), &cancel, "pbx", false) else {
        panic!("CANCEL is a transaction of its own")
    };
    assert_ne!(can, inv);
    assert_eq!(t.find_invite_for_cancel(&cancel), Some(inv));
    assert_eq!(
        t.handle_request(t0 + ms(60), &cancel, "pbx", false),
        RequestDisposition::Absorbed
    );
    // Another branch, or another sent-by with the same branch: not this INVITE's.
    let other_branch = msg(&INVITE_IN.replace("z9hG4bKpbx1", "z9hG4bKpbx7"));
    assert_eq!(t.find_invite_for_cancel(&cancel_for(&other_branch)), None);
    let other_host = msg(&INVITE_IN.replace("198.51.100.7:5060;", "198.51.100.8:5060;"));
    assert_eq!(t.find_invite_for_cancel(&cancel_for(&other_host)), None);
    // Only an INVITE transaction is found.
    let options = msg(OPTIONS_IN);
    let RequestDisposition::New(opt) = t.handle_request(t0, &options, "pbx", false) else {
        panic!("a new request")
    };
    assert_eq!(t.find_invite_for_cancel(&cancel_for(&options)), None);
    t.respond(opt, t0, options.response(200, "OK", Some("s2")))
        .unwrap();

    // What a UAS does: 200 to the CANCEL, 487 to the INVITE, which the caller ACKs.
    t.respond(can, t0 + ms(70), cancel.response(200, "OK", Some("s1")))
        .unwrap();
    let terminated = invite.response(487, "Request Terminated", Some("s1"));
    t.respond(inv, t0 + ms(70), terminated.clone()).unwrap();
    assert_eq!(
        t.handle_request(t0 + ms(90), &ack_for(&invite, &terminated), "pbx", false),
        RequestDisposition::Absorbed
    );
    assert_eq!(t.server(inv).unwrap().state(), ServerState::Confirmed);
    assert_eq!(t.len(), 3);
    run_out(&mut t, t0);
    assert!(events(&mut t).is_empty());
}

#[test]
fn sent_by_host_names_match_whatever_their_case() {
    // §17.2.3 compares sent-by as a host (§19.1.4: names case-insensitively). The key is filed
    // from the first copy's case; later copies and the CANCEL may differ.
    let t0 = Instant::now();
    let mut t = table();
    let named = INVITE_IN.replace("198.51.100.7:5060;", "PBX.Example.com:5060;");
    let invite = msg(&named);
    let RequestDisposition::New(id) = t.handle_request(t0, &invite, "pbx", false) else {
        panic!("a new request")
    };
    for host in ["pbx.example.com", "PBX.EXAMPLE.COM", "PBX.Example.com"] {
        let copy = msg(&named.replace("PBX.Example.com", host));
        assert_eq!(
            t.handle_request(t0 + ms(100), &copy, "pbx", false),
            RequestDisposition::Absorbed,
            "{host}"
        );
        assert_eq!(
            t.find_invite_for_cancel(&cancel_for(&copy)),
            Some(id),
            "{host}"
        );
    }
    // Another name is another transaction.
    let other = msg(&named.replace("PBX.Example.com", "pbx2.example.com"));
    assert!(matches!(
        t.handle_request(t0 + ms(200), &other, "pbx", false),
        RequestDisposition::New(o) if o != id
    ));
    assert_eq!(
        t.find_invite_for_cancel(&cancel_for(&other))
            .map(|o| o == id),
        Some(false)
    );
}

#[test]
fn rfc2543_requests_are_matched_field_by_field() {
    let t0 = Instant::now();
    let mut t = table();
    let invite = msg(INVITE_2543);
    assert_eq!(invite.branch(), None);
    let RequestDisposition::New(id) = t.handle_request(t0, &invite, "legacy", false) else {
        panic!("a new request")
    };
    let trying = invite.response(100, "Trying", None);
    t.respond(id, t0, trying.clone()).unwrap();
    transmits(&mut t);
    // A retransmission, even with the received parameter our transport layer adds.
    let mut again = msg(INVITE_2543);
    again.set_received("192.0.2.99".parse().unwrap(), 5099);
    assert_eq!(
        t.handle_request(t0 + ms(500), &again, "legacy", false),
        RequestDisposition::Absorbed
    );
    assert_eq!(transmits(&mut t), [("legacy", trying.to_bytes())]);
    // A different CSeq is another request.
    let other = msg(&INVITE_2543.replace("1 INVITE", "2 INVITE"));
    let RequestDisposition::New(second) = t.handle_request(t0, &other, "legacy", false) else {
        panic!("a new request")
    };
    t.respond(second, t0, other.response(480, "Unavailable", Some("x2")))
        .unwrap();

    let busy = invite.response(486, "Busy Here", Some("s9"));
    t.respond(id, t0 + ms(600), busy.clone()).unwrap();
    transmits(&mut t);
    // An ACK with another To tag acknowledges some other response: not ours.
    let stranger = msg(&std::str::from_utf8(&ack_for(&invite, &busy).to_bytes())
        .unwrap()
        .replace("tag=s9", "tag=zz"));
    assert_eq!(
        t.handle_request(t0 + ms(700), &stranger, "legacy", false),
        RequestDisposition::Ack
    );
    assert_eq!(t.server(id).unwrap().state(), ServerState::Completed);
    // The ACK: Request-URI, From tag, Call-ID, CSeq number, top Via, and the To tag we sent.
    let ack = ack_for(&invite, &busy);
    assert_eq!(ack.branch(), None);
    assert_eq!(
        t.handle_request(t0 + ms(800), &ack, "legacy", false),
        RequestDisposition::Absorbed
    );
    assert_eq!(t.server(id).unwrap().state(), ServerState::Confirmed);
    assert_eq!(t.find_invite_for_cancel(&cancel_for(&invite)), Some(id));
    assert!(transmits(&mut t).is_empty());
    run_out(&mut t, t0);
    // Timer H of the second INVITE (never ACKed) is its only event.
    assert_eq!(
        events(&mut t),
        [Event::Server(second, ServerEvent::Timeout)]
    );
}

// --- both ---

#[test]
fn transport_errors_end_transactions_at_once() {
    let t0 = Instant::now();
    let mut t = table();
    let invite = msg(INVITE_OUT);
    let a = t.new_client(t0, invite.clone(), "trunk-a", false).unwrap();
    let RequestDisposition::New(s) = t.handle_request(t0, &msg(INVITE_IN), "pbx", false) else {
        panic!("a new request")
    };
    let b = t
        .new_client(
            t0,
            msg(&INVITE_OUT.replace("z9hG4bKcar1", "z9hG4bKcar2")),
            "trunk-b",
            false,
        )
        .unwrap();
    let c = t
        .new_client(
            t0,
            msg(&INVITE_OUT.replace("z9hG4bKcar1", "z9hG4bKcar3")),
            "trunk-b",
            true,
        )
        .unwrap();
    transmits(&mut t);

    t.handle_transport_error(t0 + ms(5), a).unwrap();
    assert_eq!(
        events(&mut t),
        [Event::Client(a, ClientEvent::TransportError)]
    );
    assert!(t.client(a).is_none());
    assert_eq!(
        t.handle_transport_error(t0 + ms(6), a),
        Err(TransactionError::Unknown)
    );
    assert_eq!(
        t.handle_response(t0, invite.response(180, "Ringing", None))
            .ok(),
        None
    );

    // ICMP unreachable for trunk-b: both its transactions fail.
    assert_eq!(t.handle_unreachable(t0 + ms(7), &"trunk-b"), 2);
    let mut got = events(&mut t);
    got.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        got,
        [
            Event::Client(b, ClientEvent::TransportError),
            Event::Client(c, ClientEvent::TransportError)
        ]
    );

    t.handle_transport_error(t0 + ms(8), s).unwrap();
    assert_eq!(
        events(&mut t),
        [Event::Server(s, ServerEvent::TransportError)]
    );
    assert!(t.is_empty());
    run_out(&mut t, t0);
}

#[test]
fn degenerate_timer_values_neither_loop_nor_panic() {
    let t0 = Instant::now();
    // T2 = 0: every retransmission after the first is due at once. Each call still returns.
    let mut t = Transactions::new(TimerConfig {
        t2: Duration::ZERO,
        ..TimerConfig::default()
    });
    t.new_client(t0, msg(OPTIONS_IN), "x", false).unwrap();
    transmits(&mut t);
    t.handle_timeout(t0 + ms(500));
    assert_eq!(transmits(&mut t).len(), 1);
    t.handle_timeout(t0 + ms(500));
    assert_eq!(transmits(&mut t).len(), 1);
    t.handle_timeout(t0 + ms(32_000));
    assert_eq!(events(&mut t).len(), 1);
    assert!(t.is_empty());

    // All zero: timer B is due at once.
    let mut t = Transactions::new(TimerConfig {
        t1: Duration::ZERO,
        t2: Duration::ZERO,
        t4: Duration::ZERO,
        timer_d: Duration::ZERO,
    });
    let id = t.new_client(t0, msg(INVITE_OUT), "x", false).unwrap();
    assert_eq!(t.poll_timeout(), Some(t0));
    t.handle_timeout(t0);
    assert_eq!(events(&mut t), [Event::Client(id, ClientEvent::Timeout)]);
    assert!(t.is_empty());
}

#[test]
fn a_busy_table_empties_once_every_timer_has_fired() {
    let t0 = Instant::now();
    let mut t = table();
    for n in 0..50u32 {
        let at = t0 + ms(n as u64 * 37);
        let invite = msg(&INVITE_IN.replace("z9hG4bKpbx1", &format!("z9hG4bKpbx1-{n}")));
        let RequestDisposition::New(s) = t.handle_request(at, &invite, "pbx", n % 2 == 0) else {
            panic!("a new request")
        };
        let out = msg(&INVITE_OUT.replace("z9hG4bKcar1", &format!("z9hG4bKcar1-{n}")));
        let c = t
            .new_client(at, out.clone(), "trunk-a", n % 3 == 0)
            .unwrap();
        match n % 4 {
            0 => {
                t.respond(s, at, invite.response(200, "OK", Some("s")))
                    .unwrap();
                t.handle_response(at, out.response(200, "OK", Some("t")))
                    .ok();
            }
            1 => {
                let busy = invite.response(486, "Busy Here", Some("s"));
                t.respond(s, at, busy.clone()).unwrap();
                t.handle_request(at, &ack_for(&invite, &busy), "pbx", false);
                t.handle_response(at, out.response(486, "Busy Here", Some("t")))
                    .ok();
            }
            2 => {
                t.respond(s, at, invite.response(404, "Not Found", Some("s")))
                    .unwrap();
            }
            _ => {
                t.respond(s, at, invite.response(180, "Ringing", Some("s")))
                    .unwrap();
                t.handle_transport_error(at, c).unwrap();
                t.handle_transport_error(at, s).unwrap();
            }
        }
    }
    assert!(!t.is_empty());
    run_out(&mut t, t0);
    events(&mut t);
}

#[test]
fn unreachable_fails_the_transactions_of_where_they_send_now() {
    let t0 = Instant::now();
    let mut t = table();
    let options = msg(OPTIONS_IN);
    let RequestDisposition::New(id) = t.handle_request(t0, &options, "pbx", false) else {
        panic!("a new request")
    };
    // A retransmission from a new port moves where the responses go.
    t.handle_request(t0 + ms(500), &options, "pbx-new-port", false);
    assert_eq!(t.handle_unreachable(t0 + ms(600), &"pbx"), 0);
    assert!(events(&mut t).is_empty());
    assert_eq!(t.handle_unreachable(t0 + ms(700), &"pbx-new-port"), 1);
    assert_eq!(
        events(&mut t),
        [Event::Server(id, ServerEvent::TransportError)]
    );
    // Forgotten: a second ICMP error for it finds nothing.
    assert!(t.is_empty());
    assert_eq!(t.handle_unreachable(t0 + ms(800), &"pbx-new-port"), 0);
}
