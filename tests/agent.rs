//! `lifeline-agent` with real processes on loopback (issue 6): two `lifeline-carrier` servers
//! sharing one PostgreSQL database (a cluster of the test's own), one agent, a minimal PBX
//! written for the tests (`common::uas`, none of the project's SIP code) answering OPTIONS and
//! INVITE, SIPp as the caller and the PSTN gateway, short timers from config.
//!
//! Addresses: 127.0.121.0/24 (and .122 for the credentials test) — `.10` trunk1, `.20`
//! trunk2, `.11` the PBX, `.12` the agent, `.13` the gateway, `.14` the caller, `.30`
//! PostgreSQL.

mod common;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::http::request;
use common::postgres::Postgres;
use common::sipp::*;
use common::uas::MiniPbx;
use common::{Carrier, admin, provision_trunk_group, spawn, start_carrier_in, terminate};
use serde_json::{Value, json};

const DID: &str = "+15550001211";
const FAILOVER_NUMBER: &str = "+15559991211";
const USER: &str = "agent121";

fn ip(net: u8, host: u8) -> String {
    format!("127.0.{net}.{host}")
}

fn trunk_config(net: u8, n: u8, store: &str) -> String {
    let me = ip(net, if n == 1 { 10 } else { 20 });
    format!(
        "[carrier]\nname = \"trunk{n}\"\nsip_listen = [\"udp:{me}:5060\"]\n\
         api_listen = \"{me}:0\"\n{store}\
         t1_ms = 50\nt2_ms = 200\nt4_ms = 250\ntimer_d_ms = 500\nmin_expires_s = 1\n\
         config_poll_ms = 100\nbindings_flush_ms = 50\ndelivery_timer_ms = 3000\n\
         probe_interval_ms = 0\n\
         upstream = [\"{caller}\"]\npstn_gateway = \"sip:{gw}:5060\"\n\
         failover_number_prefixes = [\"+1555\"]\n\
         [[carrier.peers]]\nname = \"trunk1\"\nuri = \"sip:{t1}:5060\"\n\
         [[carrier.peers]]\nname = \"trunk2\"\nuri = \"sip:{t2}:5060\"\n",
        caller = ip(net, 14),
        gw = ip(net, 13),
        t1 = ip(net, 10),
        t2 = ip(net, 20),
    )
}

/// Both trunk servers, started at once (on a new shared database their migrations race).
fn start_both(t1: &str, t2: &str) -> (Carrier, Carrier) {
    thread::scope(|s| {
        let a = s.spawn(|| start_carrier_in(tempfile::tempdir().unwrap(), t1, 1));
        let b = s.spawn(|| start_carrier_in(tempfile::tempdir().unwrap(), t2, 1));
        (a.join().unwrap(), b.join().unwrap())
    })
}

/// The agent's configuration: both trunk servers, the mini PBX, short timers.
fn agent_config(net: u8, password: &str) -> String {
    format!(
        "[agent]\nusername = \"{USER}\"\npassword = \"{password}\"\n\
         servers = [\"sip:{t1}:5060\", \"sip:{t2}:5060\"]\n\
         sip_listen = \"udp:{me}:0\"\nregister_expires_s = 4\n\
         retry_min_ms = 200\nretry_max_ms = 1000\nfatal_retry_ms = 1500\nt1_ms = 50\n\
         status_socket = \"{{DIR}}/agent.sock\"\nlog_level = \"debug\"\n\
         [agent.pbx]\naddress = \"{pbx}:5071\"\ncontact = \"sip:{pbx}:5071\"\n\
         check_interval_ms = 200\ncheck_timeout_ms = 150\ndown_after = 2\nup_after = 2\n",
        t1 = ip(net, 10),
        t2 = ip(net, 20),
        me = ip(net, 12),
        pbx = ip(net, 11),
    )
}

/// Starts `lifeline-agent run` with `config` in a folder of its own (the [`Carrier`] handle
/// serves any of our processes: the child, its log, its folder).
fn start_agent(config: &str) -> Carrier {
    let dir = tempfile::tempdir().unwrap();
    let text = config.replace("{DIR}", &dir.path().display().to_string());
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lifeline-agent"));
    cmd.arg("run").arg("--config").arg(&path);
    spawn(cmd, 0, dir)
}

/// `lifeline-agent status --json` of the running agent.
fn agent_status(agent: &Carrier) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_lifeline-agent"))
        .args(["status", "--json", "--socket"])
        .arg(agent.dir.path().join("agent.sock"))
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Waits (bounded) until `done` holds; returns how long it took.
fn wait(
    what: &str,
    deadline: Duration,
    mut done: impl FnMut() -> bool,
    log: impl Fn() -> String,
) -> Duration {
    let start = Instant::now();
    loop {
        if done() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < deadline,
            "{what}: not within {deadline:?}\n{}",
            log()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The trunk servers the group is registered on, as trunk1's API says (the shared presence).
fn registered_on(t: &Carrier, token: &str, group: i64) -> Value {
    let r = request(
        t.api_addr(),
        "GET",
        &format!("/v1/trunk-groups/{group}/status"),
        Some(token),
        None,
    );
    r.json["registered_on"].clone()
}

#[test]
fn the_agent_keeps_the_pbx_registered_on_both_servers_and_withdraws_it_when_the_pbx_dies() {
    let net = 121;
    let pg = Postgres::start(ip(net, 30).parse().unwrap());
    let store = format!("store_url = \"{}\"\n", pg.url());
    let (t1, t2) = start_both(&trunk_config(net, 1, &store), &trunk_config(net, 2, &store));
    let dir = t1.dir.path();
    let group: i64 = provision_trunk_group(dir, USER, PASSWORD).parse().unwrap();
    admin(
        dir,
        &["did", "add", DID, "--trunk-group", &group.to_string()],
    );
    admin(dir, &["did", "failover", DID, "--number", FAILOVER_NUMBER]);
    let op = admin(dir, &["token", "create", "--operator", "--label", "ops"]);
    let op = op.trim().split('\t').nth(1).unwrap().to_string();
    let pbx = MiniPbx::start(&format!("{}:5071", ip(net, 11)));

    // The agent registers the PBX on both servers.
    let agent = start_agent(&agent_config(net, PASSWORD));
    let took = wait(
        "registered on both servers",
        Duration::from_secs(20),
        || registered_on(&t1, &op, group) == json!(["trunk1", "trunk2"]),
        || agent.log(),
    );
    eprintln!("registered on both servers {took:?} after the agent started");
    let status = agent_status(&agent);
    assert_eq!(status["servers"][0]["registered"], true, "{status}");
    assert_eq!(status["servers"][1]["registered"], true, "{status}");
    assert_eq!(status["pbx"], "up", "{status}");

    // A call for the DID arrives at the PBX, straight from the trunk server.
    call(&t1, &ip(net, 14), DID, 200);
    let invites = pbx.seen("INVITE");
    assert_eq!(invites.len(), 1, "{invites:?}");
    assert!(
        invites[0]
            .uri
            .starts_with(&format!("sip:{DID}@{}", ip(net, 11))),
        "{}",
        invites[0].uri
    );

    // The PBX stops answering: both servers drop the binding.
    pbx.fall_silent();
    let silent_since = Instant::now();
    wait(
        "bindings withdrawn on both servers",
        Duration::from_secs(20),
        || registered_on(&t1, &op, group) == json!([]),
        || agent.log(),
    );
    let last_answer = pbx.last_answer().unwrap();
    eprintln!(
        "bindings gone from both servers {:?} after the PBX's last answer ({:?} after it fell silent)",
        last_answer.elapsed(),
        silent_since.elapsed()
    );
    assert!(agent.log().contains("PBX down"), "{}", agent.log());
    // Withdrawn by the agent (a 200 to its expires=0 from each server), not expired.
    for server in [ip(net, 10), ip(net, 20)] {
        assert!(
            agent
                .log()
                .lines()
                .any(|l| l.contains("registration withdrawn")
                    && l.contains(&format!("server=sip:{server}:5060"))),
            "{}",
            agent.log()
        );
    }
    // A call to the DID now goes to its failover number at once: no delivery timer spent.
    let gateway = answering_uas(&ip(net, 13), 5060);
    let started = Instant::now();
    call(&t2, &ip(net, 14), DID, 200);
    let trace = ok(gateway.wait(), "gateway", &t2);
    assert!(
        trace.contains(&format!("INVITE sip:{FAILOVER_NUMBER}@")),
        "{trace}"
    );
    eprintln!(
        "the failover call was answered through the gateway in {:?}",
        started.elapsed()
    );
    assert!(!t2.log().contains("delivery timer"), "{}", t2.log());
    assert_eq!(pbx.seen("INVITE").len(), 1, "the silent PBX got no call");

    // The PBX answers again: registered on both servers again.
    pbx.answer_again();
    let took = wait(
        "registered again on both servers",
        Duration::from_secs(20),
        || registered_on(&t1, &op, group) == json!(["trunk1", "trunk2"]),
        || agent.log(),
    );
    eprintln!("registered again on both servers {took:?} after the PBX answered again");

    // trunk2 stops: the registration with trunk1 is untouched; trunk2 is retried with
    // backoff and registered again when it returns.
    let trunk1_row = |t: &Carrier| {
        let r = request(
            t.api_addr(),
            "GET",
            &format!("/v1/trunk-groups/{group}/status"),
            Some(&op),
            None,
        );
        r.json["servers"][0].clone()
    };
    let before = trunk1_row(&t1);
    assert_eq!(before["server"], "trunk1", "{before}");
    let to_trunk2 = |agent: &Carrier| {
        agent
            .log()
            .lines()
            .filter(|l| l.contains("sending REGISTER") && l.contains("127.0.121.20"))
            .count()
    };
    let sent_before = to_trunk2(&agent);
    let t2_dir = terminate(t2);
    // The next refresh (every 2 s: 4 s granted) finds trunk2 gone.
    wait(
        "trunk2's failure noticed",
        Duration::from_secs(20),
        || agent_status(&agent)["servers"][1]["last_error"] != Value::Null,
        || agent.log(),
    );
    thread::sleep(Duration::from_secs(1));
    let status = agent_status(&agent);
    assert_eq!(status["servers"][0]["registered"], true, "{status}");
    assert_eq!(status["servers"][0]["last_error"], Value::Null, "{status}");
    // trunk1's binding was not disturbed: its presence row is the one written before.
    assert_eq!(trunk1_row(&t1), before);
    // Retried with backoff (200 ms doubling to 1 s): a handful of attempts, not a flood.
    let retries = to_trunk2(&agent) - sent_before;
    eprintln!("{retries} REGISTERs to trunk2 while it was stopped");
    assert!((2..=20).contains(&retries), "{}", agent.log());
    let t2 = start_carrier_in(t2_dir, &trunk_config(net, 2, &store), 1);
    let returned = Instant::now();
    // The agent's own view: its last error clears only on a 200 from trunk2.
    wait(
        "registered on trunk2 again",
        Duration::from_secs(20),
        || {
            let s = agent_status(&agent);
            s["servers"][1]["registered"] == true && s["servers"][1]["last_error"] == Value::Null
        },
        || agent.log(),
    );
    eprintln!(
        "registered on trunk2 again {:?} after it returned",
        returned.elapsed()
    );
    drop(t2);
}

#[test]
fn wrong_credentials_are_logged_and_retried_slowly() {
    let net = 122;
    let t1 = start_carrier_in(tempfile::tempdir().unwrap(), &trunk_config(net, 1, ""), 1);
    let dir = t1.dir.path();
    provision_trunk_group(dir, USER, PASSWORD);
    let _pbx = MiniPbx::start(&format!("{}:5071", ip(net, 11)));
    let config =
        agent_config(net, "wrong-password").replace(&format!(", \"sip:{}:5060\"", ip(net, 20)), "");
    let agent = start_agent(&config);
    wait(
        "a loud log line",
        Duration::from_secs(10),
        || agent.log().contains("registration refused"),
        || agent.log(),
    );
    // For 4 s, with fatal_retry_ms = 1500: about 3 attempts, never a tight loop.
    thread::sleep(Duration::from_secs(4));
    let refused = agent.log().matches("registration refused").count();
    assert!(
        (2..=5).contains(&refused),
        "{refused} refusals:\n{}",
        agent.log()
    );
    let line = agent
        .log()
        .lines()
        .find(|l| l.contains("registration refused"))
        .unwrap()
        .to_string();
    assert!(line.contains("wrong username or password"), "{line}");
    let status = agent_status(&agent);
    assert_eq!(status["servers"][0]["registered"], false, "{status}");
    assert!(
        status["servers"][0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("wrong username or password"),
        "{status}"
    );
}

/// Replaces the agent's configuration file as an editor does (write aside, rename over).
fn edit_config(agent: &Carrier, text: &str) {
    let path = agent.dir.path().join("agent.toml");
    let aside = agent.dir.path().join("agent.toml.new");
    let text = text.replace("{DIR}", &agent.dir.path().display().to_string());
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, &path).unwrap();
}

#[test]
fn failover_settings_in_the_agents_file_reach_both_servers() {
    let net = 123;
    let pg = Postgres::start(ip(net, 30).parse().unwrap());
    let store = format!("store_url = \"{}\"\n", pg.url());
    // trunk1's API on a fixed port, so it comes back at the same address after a restart.
    let t1_config = trunk_config(net, 1, &store).replace(
        &format!("{}:0", ip(net, 10)),
        &format!("{}:8080", ip(net, 10)),
    );
    let (t1, t2) = start_both(&t1_config, &trunk_config(net, 2, &store));
    let dir = t1.dir.path();
    let group: i64 = provision_trunk_group(dir, USER, PASSWORD).parse().unwrap();
    for did in ["+15550001231", "+15550001232"] {
        admin(
            dir,
            &["did", "add", did, "--trunk-group", &group.to_string()],
        );
    }
    let token = admin(
        dir,
        &["token", "create", "--trunk-group", &group.to_string()],
    );
    let token = token.trim().split('\t').nth(1).unwrap().to_string();
    let op = admin(dir, &["token", "create", "--operator"]);
    let op = op.trim().split('\t').nth(1).unwrap().to_string();
    let _pbx = MiniPbx::start(&format!("{}:5071", ip(net, 11)));

    let config = |failover: &str| {
        format!(
            "{}[agent.api]\nurl = \"http://{}:8080\"\ntoken = \"{token}\"\nreport_interval_ms = 1000\n\
             [agent.failover]\n{failover}",
            agent_config(net, PASSWORD),
            ip(net, 10)
        )
    };
    // trunk2's view of the plan (what it routes from comes from the same database).
    let plan_on_trunk2 = || {
        request(
            t2.api_addr(),
            "GET",
            &format!("/v1/trunk-groups/{group}/failover"),
            Some(&op),
            None,
        )
        .json
    };
    let agent = start_agent(&config(
        "global_number = \"+15559990001\"\n[agent.failover.dids]\n\"+15550001231\" = \"+15559991231\"\n",
    ));
    let took = wait(
        "the plan pushed at start",
        Duration::from_secs(20),
        || plan_on_trunk2()["dids"] == json!({"+15550001231": "+15559991231"}),
        || agent.log(),
    );
    eprintln!("the agent's plan was on trunk2's API {took:?} after the agent started");
    assert_eq!(plan_on_trunk2()["global_number"], "+15559990001");

    // An edit of the file: the new number reaches the API.
    let edited = Instant::now();
    edit_config(
        &agent,
        &config(
            "global_number = \"+15559990001\"\n[agent.failover.dids]\n\"+15550001231\" = \"+15559991239\"\n",
        ),
    );
    wait(
        "the edit pushed",
        Duration::from_secs(20),
        || plan_on_trunk2()["dids"] == json!({"+15550001231": "+15559991239"}),
        || agent.log(),
    );
    eprintln!(
        "an edit of the agent's file was on trunk2's API {:?} after the file was written",
        edited.elapsed()
    );

    // A broken edit changes nothing, and the log names the key.
    edit_config(
        &agent,
        &config(
            "global_number = \"+15559990001\"\n[agent.failover.dids]\n\"+15550001231\" = \"call me\"\n",
        ),
    );
    wait(
        "the broken edit refused",
        Duration::from_secs(20),
        || agent.log().contains("agent.failover.dids.\"+15550001231\""),
        || agent.log(),
    );
    let line = agent
        .log()
        .lines()
        .find(|l| l.contains("configuration refused"))
        .unwrap()
        .to_string();
    assert!(line.contains("agent.failover.dids"), "{line}");
    assert_eq!(
        plan_on_trunk2()["dids"],
        json!({"+15550001231": "+15559991239"})
    );

    // With the API down, an edit waits, and arrives once the API is back.
    let t1_dir = terminate(t1);
    edit_config(
        &agent,
        &config("[agent.failover.dids]\n\"+15550001232\" = \"+15559991232\"\n"),
    );
    wait(
        "the push failing while the API is down",
        Duration::from_secs(20),
        || {
            let s = agent_status(&agent);
            s["sync"]["pending"] == true && s["sync"]["last_error"] != Value::Null
        },
        || agent.log(),
    );
    assert_eq!(
        plan_on_trunk2()["dids"],
        json!({"+15550001231": "+15559991239"})
    );
    let t1 = start_carrier_in(t1_dir, &t1_config, 1);
    let back = Instant::now();
    wait(
        "the edit pushed after the API returned",
        Duration::from_secs(30),
        || plan_on_trunk2()["dids"] == json!({"+15550001232": "+15559991232"}),
        || agent.log(),
    );
    eprintln!(
        "the waiting edit reached the API {:?} after it returned",
        back.elapsed()
    );
    // The whole plan: the global number is gone with it.
    assert_eq!(plan_on_trunk2()["global_number"], Value::Null);
    // Health reports arrive too.
    let status = request(
        t1.api_addr(),
        "GET",
        &format!("/v1/trunk-groups/{group}/status"),
        Some(&op),
        None,
    )
    .json;
    assert!(
        status["last_health"]["report"]["pbx"].is_string(),
        "{status}"
    );
}

/// A trunk server given by name: RFC 3263 through SRV from a DNS server on loopback. The
/// first target is dead (its port closed): the agent moves to the next one.
#[test]
fn a_server_name_with_several_targets_is_registered_through_the_live_one() {
    let net = 124;
    let zone = format!(
        "$ORIGIN example.test.\n$TTL 300\n\
         @ IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 30\n\
         @ IN NS ns\nns IN A {dns}\n\
         _sip._udp.trunk1 IN SRV 10 0 5060 dead.trunk1\n\
         _sip._udp.trunk1 IN SRV 20 0 5060 live.trunk1\n\
         dead.trunk1 IN A {dead}\nlive.trunk1 IN A {live}\n",
        dns = ip(net, 53),
        dead = ip(net, 15),
        live = ip(net, 10),
    );
    let dns = common::dns::BackgroundDns::start_on(&ip(net, 53), &zone);
    let t1 = start_carrier_in(tempfile::tempdir().unwrap(), &trunk_config(net, 1, ""), 1);
    let dir = t1.dir.path();
    provision_trunk_group(dir, USER, PASSWORD);
    let _pbx = MiniPbx::start(&format!("{}:5071", ip(net, 11)));
    let config = agent_config(net, PASSWORD)
        .replace(
            &format!(
                "servers = [\"sip:{}:5060\", \"sip:{}:5060\"]",
                ip(net, 10),
                ip(net, 20)
            ),
            "servers = [\"sip:trunk1.example.test\"]",
        )
        .replace(
            "[agent.pbx]",
            &format!("dns_servers = [\"{}\"]\n[agent.pbx]", dns.addr),
        );
    let agent = start_agent(&config);
    wait(
        "registered through the live target",
        Duration::from_secs(20),
        || agent_status(&agent)["servers"][0]["registered"] == true,
        || agent.log(),
    );
    let log = agent.log();
    let dead = log
        .find(&format!("server_target=UDP {}:5060", ip(net, 15)))
        .expect("the dead target tried");
    let live = log
        .find(&format!(
            "registered server=sip:trunk1.example.test expires=4 server_target=UDP {}:5060",
            ip(net, 10)
        ))
        .unwrap_or_else(|| panic!("registered through the live target:\n{log}"));
    assert!(dead < live, "{log}");
}

#[test]
fn check_config_names_the_wrong_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        Command::new(env!("CARGO_BIN_EXE_lifeline-agent"))
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap()
    };
    let good = agent_config(125, PASSWORD);
    let out = check(&good);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("good"));
    let out = check(&format!(
        "{good}[agent.failover]\nglobal_number = \"premium\"\n"
    ));
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent.failover.global_number"), "{err}");
    let out = check(&good.replace("contact = ", "contcat = "));
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("contcat"));
}

/// A change of a SIP setting restarts the registrations from what the agent knew: a reload
/// while the PBX is down does not register the dead PBX again.
#[test]
fn a_reload_restarts_registrations_without_forgetting_a_dead_pbx() {
    let net = 126;
    let t1 = start_carrier_in(tempfile::tempdir().unwrap(), &trunk_config(net, 1, ""), 1);
    let group: i64 = provision_trunk_group(t1.dir.path(), USER, PASSWORD)
        .parse()
        .unwrap();
    let op = admin(t1.dir.path(), &["token", "create", "--operator"]);
    let op = op.trim().split('\t').nth(1).unwrap().to_string();
    let pbx = MiniPbx::start(&format!("{}:5071", ip(net, 11)));
    let one_server = |text: String| text.replace(&format!(", \"sip:{}:5060\"", ip(net, 20)), "");
    let agent = start_agent(&one_server(agent_config(net, PASSWORD)));
    wait(
        "registered",
        Duration::from_secs(20),
        || registered_on(&t1, &op, group) == json!(["trunk1"]),
        || agent.log(),
    );
    // A new expiry: the registrations restart, and register again.
    edit_config(
        &agent,
        &one_server(agent_config(net, PASSWORD))
            .replace("register_expires_s = 4", "register_expires_s = 5"),
    );
    wait(
        "restarted",
        Duration::from_secs(20),
        || {
            agent
                .log()
                .contains("SIP settings changed: restarting registrations")
        },
        || agent.log(),
    );
    wait(
        "registered again with the new expiry",
        Duration::from_secs(20),
        || {
            agent
                .log()
                .contains("registered server=sip:127.0.126.10:5060 expires=5")
        },
        || agent.log(),
    );
    // The PBX dies, then the file changes again: the restarted side keeps it withdrawn.
    pbx.fall_silent();
    wait(
        "withdrawn",
        Duration::from_secs(20),
        || registered_on(&t1, &op, group) == json!([]),
        || agent.log(),
    );
    edit_config(
        &agent,
        &one_server(agent_config(net, PASSWORD))
            .replace("register_expires_s = 4", "register_expires_s = 6"),
    );
    wait(
        "restarted again",
        Duration::from_secs(20),
        || agent.log().matches("SIP settings changed").count() == 2,
        || agent.log(),
    );
    thread::sleep(Duration::from_secs(1));
    let status = agent_status(&agent);
    assert_eq!(status["pbx"], "down", "{status}");
    assert_eq!(status["servers"][0]["registered"], false, "{status}");
    assert_eq!(registered_on(&t1, &op, group), json!([]));
    assert!(!agent.log().contains("expires=6 target"), "{}", agent.log());
    // And once the PBX answers, it registers with the new settings.
    pbx.answer_again();
    wait(
        "registered with the newest settings",
        Duration::from_secs(20),
        || {
            agent
                .log()
                .contains("registered server=sip:127.0.126.10:5060 expires=6")
        },
        || agent.log(),
    );
}
