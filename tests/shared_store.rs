//! Two trunk servers sharing one configuration in PostgreSQL (issue 5): two real
//! `lifeline-carrier` processes on one database of the test's own cluster, SIPp as the PBX, the
//! PSTN gateway and the caller. A change made through trunk1's API is used by trunk2 for the
//! next call; the status of a group registered on trunk1 only carries the single-registration
//! warning; with PostgreSQL stopped both servers still route from their last copy, and they
//! pick up changes once it is back.
//!
//! Addresses: 127.0.118.0/24 — `.10` trunk1, `.20` trunk2, `.11` the PBX, `.13` the gateway,
//! `.14` the caller, `.30` PostgreSQL.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::http::{Reply, request};
use common::postgres::Postgres;
use common::sipp::*;
use common::{Carrier, admin, start_carrier_in};
use serde_json::{Value, json};

const NET: &str = "127.0.118";
const DID: &str = "+15550001181";
const FIRST_NUMBER: &str = "+15559991181";
const SECOND_NUMBER: &str = "+15559991182";
const GATEWAY_PORT: u16 = 5060;

fn ip(host: u8) -> String {
    format!("{NET}.{host}")
}

/// Trunk server `n` (1 or 2) on the shared store, with short timers. The store is polled only
/// once a minute: changes and outages must reach the servers through LISTEN/NOTIFY.
fn trunk(n: u8, store_url: &str) -> Carrier {
    let me = ip(if n == 1 { 10 } else { 20 });
    let config = format!(
        "[carrier]\nname = \"trunk{n}\"\nsip_listen = [\"udp:{me}:5060\"]\n\
         api_listen = \"{me}:0\"\nstore_url = \"{store_url}\"\n\
         t1_ms = 50\nt2_ms = 200\nt4_ms = 250\ntimer_d_ms = 500\n\
         config_poll_ms = 60000\nbindings_flush_ms = 50\ndelivery_timer_ms = 1000\n\
         upstream = [\"{caller}\"]\npstn_gateway = \"sip:{gw}:{GATEWAY_PORT}\"\n\
         failover_number_prefixes = [\"+1555\"]\n\
         [[carrier.peers]]\nname = \"trunk1\"\nuri = \"sip:{t1}:5060\"\n\
         [[carrier.peers]]\nname = \"trunk2\"\nuri = \"sip:{t2}:5060\"\n",
        caller = ip(14),
        gw = ip(13),
        t1 = ip(10),
        t2 = ip(20),
    );
    start_carrier_in(tempfile::tempdir().unwrap(), &config, 1)
}

fn api(c: &Carrier, method: &str, path: &str, token: &str, body: Option<Value>) -> Reply {
    let body = body.map(|b| b.to_string());
    request(c.api_addr(), method, path, Some(token), body.as_deref())
}

fn expect(r: &Reply, status: u16) {
    assert_eq!(r.status, status, "{} {}", r.status, r.text);
}

/// `GET /v1/server` (no token).
fn server(c: &Carrier) -> Reply {
    request(c.api_addr(), "GET", "/v1/server", None, None)
}

/// Waits (bounded) until `done` holds for the server's `/v1/server` answer; returns it.
fn wait_server(c: &Carrier, what: &str, done: impl Fn(&Reply) -> bool) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = server(c);
        if done(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} {}\n{}",
            r.status,
            r.text,
            c.log()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (bounded) until `done` holds for trunk group `g`'s status on `c`; returns it.
fn wait_status(c: &Carrier, op: &str, g: i64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = api(c, "GET", &format!("/v1/trunk-groups/{g}/status"), op, None).json;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn version(c: &Carrier) -> i64 {
    server(c).json["configuration_version"].as_i64().unwrap()
}

/// A SIPp UAS on `host:port` that answers one call.
fn uas(host: &str, port: u16) -> Sipp {
    let s = spawn_sipp(host, port, None, Scenario::Xml(answering_pbx_xml()), &[]);
    // SIPp binds its socket right after it starts.
    thread::sleep(Duration::from_millis(300));
    s
}

/// The Request-URI of the first INVITE in a UAS trace.
fn request_uri(trace: &str) -> &str {
    let start = trace.find("INVITE sip:").expect("an INVITE in the trace");
    trace[start..].split(' ').nth(1).unwrap()
}

/// Calls [`DID`] at `trunk` and expects the gateway to get the call for `number`.
fn call_reaches_gateway(trunk: &Carrier, number: &str) {
    let gateway = uas(&ip(13), GATEWAY_PORT);
    call(trunk, &ip(14), DID, 200);
    let trace = ok(gateway.wait(), "gateway", trunk);
    assert!(
        request_uri(&trace).starts_with(&format!("sip:{number}@")),
        "{}",
        request_uri(&trace)
    );
}

/// Calls [`DID`] at `trunk` and expects the PBX to answer it.
fn call_reaches_pbx(trunk: &Carrier) {
    let pbx = uas(&ip(11), PBX_PORT);
    call(trunk, &ip(14), DID, 200);
    let trace = ok(pbx.wait(), "PBX", trunk);
    assert!(
        request_uri(&trace).starts_with(&format!("sip:{DID}@{}", ip(11))),
        "{}",
        request_uri(&trace)
    );
}

#[test]
fn two_servers_share_one_postgres_configuration() {
    let mut pg = Postgres::start(ip(30).parse().unwrap());
    let url = pg.url();
    // Both servers start at once on the empty database: the migrations run once.
    let (t1, t2) = thread::scope(|s| {
        let a = s.spawn(|| trunk(1, &url));
        let b = s.spawn(|| trunk(2, &url));
        (a.join().unwrap(), b.join().unwrap())
    });
    for c in [&t1, &t2] {
        let r = server(c);
        expect(&r, 200);
        assert_eq!(r.json["store"]["backend"], "postgres", "{}", r.text);
    }

    // Provision through trunk1's API, with an operator token made by trunk1's admin command.
    let v0 = version(&t1);
    let op = admin(
        t1.dir.path(),
        &["token", "create", "--operator", "--label", "ops"],
    );
    let op = op.trim().split('\t').nth(1).unwrap().to_string();
    let r = api(
        &t1,
        "POST",
        "/v1/accounts",
        &op,
        Some(json!({"name": "acme"})),
    );
    expect(&r, 201);
    let account = r.json["id"].as_i64().unwrap();
    let r = api(
        &t1,
        "POST",
        "/v1/trunk-groups",
        &op,
        Some(
            json!({"account_id": account, "name": "main", "username": "pbx118", "password": PASSWORD}),
        ),
    );
    expect(&r, 201);
    let g = r.json["id"].as_i64().unwrap();
    let r = api(
        &t1,
        "POST",
        "/v1/dids",
        &op,
        Some(json!({"number": DID, "trunk_group": g})),
    );
    expect(&r, 201);
    // trunk2 reads what trunk1 wrote: the same objects through its own API.
    let r = api(&t2, "GET", &format!("/v1/trunk-groups/{g}"), &op, None);
    expect(&r, 200);
    assert_eq!(r.json["username"], "pbx118");

    // The PBX registers on trunk1 only, once trunk1's copy has the new group: three rows
    // written since `v0` (account, trunk group, DID).
    wait_server(&t1, "trunk1 has the DID", |r| {
        r.json["configuration_version"].as_i64() >= Some(v0 + 3)
    });
    register_pbx(&t1, &ip(11), "pbx118");

    // A failover number set through trunk1's API reaches trunk2's copy.
    let before = version(&t2);
    let plan = json!({"global_number": null, "pbx": null, "dids": {DID: FIRST_NUMBER}});
    let r = api(
        &t1,
        "PUT",
        &format!("/v1/trunk-groups/{g}/failover"),
        &op,
        Some(plan),
    );
    expect(&r, 200);
    let put_done = Instant::now();
    wait_server(&t2, "trunk2 reloads", |r| {
        r.json["configuration_version"].as_i64() > Some(before)
    });
    eprintln!(
        "a change made through trunk1's API was in force on trunk2 after {:.1} ms",
        put_done.elapsed().as_secs_f64() * 1000.0
    );

    // trunk2's status (presence comes from the shared store): registered on trunk1 only, with
    // failover configured — the single-registration warning names trunk2.
    let status = wait_status(&t2, &op, g, "registered on trunk1", |s| {
        s["registered_on"] == json!(["trunk1"])
    });
    assert_eq!(status["failover_configured"], true);
    let warning = status["warnings"][0].as_str().unwrap_or("");
    assert!(
        warning.contains("1 of 2") && warning.contains("trunk2"),
        "{status}"
    );

    // trunk2 holds no binding: the next call there goes to the failover number.
    call_reaches_gateway(&t2, FIRST_NUMBER);
    // Its call record shows the path, through trunk2's API.
    let calls = api(
        &t2,
        "GET",
        &format!("/v1/trunk-groups/{g}/calls"),
        &op,
        None,
    );
    expect(&calls, 200);
    let record = &calls.json[0];
    assert_eq!(record["server"], "trunk2", "{}", calls.text);
    assert_eq!(record["did"], DID);
    assert_eq!(record["status"], 200);
    assert_eq!(
        record["attempts"][0]["stage"], "failover number",
        "{}",
        calls.text
    );
    // trunk1 handled no call of the group yet.
    let calls = api(
        &t1,
        "GET",
        &format!("/v1/trunk-groups/{g}/calls"),
        &op,
        None,
    );
    assert_eq!(calls.json, json!([]));

    // PostgreSQL stops: both servers say so, and keep routing from their last copy.
    pg.stop();
    for c in [&t1, &t2] {
        let r = wait_server(c, "store unreachable", |r| r.status == 503);
        assert_eq!(r.json["store"]["reachable"], false, "{}", r.text);
        assert!(r.json["store"]["unreachable_since_ms"].as_i64().unwrap() > 0);
        // The status can be read before the line reaches the log file.
        wait_for_log(c, "store unreachable");
    }
    // The API answers a clear error, not a hang.
    let r = api(&t1, "GET", &format!("/v1/trunk-groups/{g}"), &op, None);
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.code(), "store_unavailable");
    call_reaches_pbx(&t1);
    call_reaches_gateway(&t2, FIRST_NUMBER);

    // PostgreSQL is back: both servers notice, and a change made then reaches trunk2.
    pg.restart();
    for c in [&t1, &t2] {
        wait_server(c, "store reachable again", |r| r.status == 200);
    }
    let before = version(&t2);
    let r = api(
        &t1,
        "PATCH",
        &format!("/v1/dids/{DID}"),
        &op,
        Some(json!({"failover_number": SECOND_NUMBER})),
    );
    expect(&r, 200);
    wait_server(&t2, "trunk2 reloads after the outage", |r| {
        r.json["configuration_version"].as_i64() > Some(before)
    });
    call_reaches_gateway(&t2, SECOND_NUMBER);
    // The presence rows outlived the outage.
    wait_status(&t2, &op, g, "still on trunk1", |s| {
        s["registered_on"] == json!(["trunk1"])
    });

    // Registered on both; then trunk2 crashes. Its rows stay in the database, but without its
    // heartbeat they stop counting: the status says so, and warns again.
    register_pbx(&t2, &ip(11), "pbx118");
    wait_status(&t1, &op, g, "registered on both", |s| {
        s["registered_on"] == json!(["trunk1", "trunk2"])
    });
    let mut t2 = t2;
    t2.child.kill().unwrap();
    let crashed = Instant::now();
    let s = wait_status(&t1, &op, g, "trunk2 silent", |s| {
        s["silent_servers"] == json!(["trunk2"])
    });
    eprintln!(
        "a crashed trunk2 stopped counting {:?} after it died",
        crashed.elapsed()
    );
    assert_eq!(s["registered_on"], json!(["trunk1"]), "{s}");
    let warnings = s["warnings"].to_string();
    assert!(warnings.contains("trunk2 has not been heard from"), "{s}");
    assert!(warnings.contains("1 of 2"), "{s}");
}
