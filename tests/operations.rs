//! Running the programs as an operator does (issue 7): Prometheus metrics of both programs
//! after real calls, the carrier's SIGHUP reload with a call in progress, and the structured
//! fields its log events carry to journald.
//!
//! Addresses: 127.0.131.0/24 (metrics), 127.0.132.0/24 and 127.0.134.0/24 (reload),
//! 127.0.133.0/24 (journal);
//! `.10` trunk1, `.11` the PBX, `.12` the agent, `.13` the gateway, `.14` the caller.

mod common;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::http::request;
use common::sipp::*;
use common::uas::MiniPbx;
use common::{Carrier, admin, provision_trunk_group, spawn, start_carrier};

const DID: &str = "+15550001311";
const FAILOVER_NUMBER: &str = "+15559991311";
const USER: &str = "ops131";

fn ip(net: u8, host: u8) -> String {
    format!("127.0.{net}.{host}")
}

/// Waits (bounded) until `done` holds.
fn wait(what: &str, deadline: Duration, mut done: impl FnMut() -> bool, log: impl Fn() -> String) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < deadline,
            "{what}: not within {deadline:?}\n{}",
            log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The address a process logged after `metrics served at /metrics addr=`.
fn metrics_addr(p: &Carrier) -> std::net::SocketAddr {
    let mut found = None;
    wait(
        "metrics address logged",
        Duration::from_secs(10),
        || {
            found = p.log().lines().find_map(|l| {
                let rest = &l[l.find("metrics served at /metrics")?..];
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))?
                    .parse()
                    .ok()
            });
            found.is_some()
        },
        || p.log(),
    );
    found.unwrap()
}

/// The value of the series `name{labels}` (labels exactly as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn scrape(addr: std::net::SocketAddr) -> String {
    let r = request(addr, "GET", "/metrics", None, None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        r.headers
    );
    r.text
}

#[test]
fn both_programs_metrics_move_with_registrations_calls_and_failovers() {
    let net = 131;
    let config = format!(
        "[carrier]\nname = \"trunk1\"\nsip_listen = [\"udp:{me}:5060\"]\n\
         api_listen = \"{me}:0\"\nmetrics_listen = \"{me}:0\"\n\
         t1_ms = 50\nt2_ms = 200\nt4_ms = 250\ntimer_d_ms = 500\nmin_expires_s = 1\n\
         config_poll_ms = 100\nbindings_flush_ms = 50\ndelivery_timer_ms = 3000\n\
         probe_interval_ms = 0\nupstream = [\"{caller}\"]\npstn_gateway = \"sip:{gw}:5060\"\n",
        me = ip(net, 10),
        caller = ip(net, 14),
        gw = ip(net, 13),
    );
    let t1 = start_carrier(&config, 1);
    let dir = t1.dir.path().to_path_buf();
    let group = provision_trunk_group(&dir, USER, PASSWORD);
    admin(&dir, &["did", "add", DID, "--trunk-group", &group]);
    admin(&dir, &["did", "failover", DID, "--number", FAILOVER_NUMBER]);
    // The agent may REGISTER before the carrier has read the new group (a 403, retried soon).
    let carrier_metrics = metrics_addr(&t1);

    let pbx = MiniPbx::start(&format!("{}:5071", ip(net, 11)));
    let agent_dir = tempfile::tempdir().unwrap();
    let agent_config = format!(
        "[agent]\nusername = \"{USER}\"\npassword = \"{PASSWORD}\"\n\
         servers = [\"sip:{t1}:5060\"]\nsip_listen = \"udp:{me}:0\"\n\
         metrics_listen = \"{me}:0\"\nregister_expires_s = 4\nretry_min_ms = 200\n\
         retry_max_ms = 1000\nfatal_retry_ms = 500\nt1_ms = 50\nstatus_socket = \"{sock}\"\n\
         [agent.pbx]\naddress = \"{pbx}:5071\"\ncontact = \"sip:{pbx}:5071\"\n\
         check_interval_ms = 200\ncheck_timeout_ms = 150\ndown_after = 2\nup_after = 2\n",
        t1 = ip(net, 10),
        me = ip(net, 12),
        pbx = ip(net, 11),
        sock = agent_dir.path().join("agent.sock").display(),
    );
    std::fs::write(agent_dir.path().join("agent.toml"), agent_config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lifeline-agent"));
    cmd.arg("run")
        .arg("--config")
        .arg(agent_dir.path().join("agent.toml"));
    let agent = spawn(cmd, 0, agent_dir);
    let agent_metrics = metrics_addr(&agent);

    // Registered: the agent shows it, and the carrier counted the REGISTERs (401, then 200)
    // and, within its 1 s tick, the binding.
    let server = format!("sip:{}:5060", ip(net, 10));
    let registered = format!("lifeline_agent_registered{{server=\"{server}\"}}");
    wait(
        "the agent's metrics show it registered",
        Duration::from_secs(20),
        || sample(&scrape(agent_metrics), &registered) == Some(1.0),
        || agent.log(),
    );
    let text = scrape(agent_metrics);
    assert_eq!(
        sample(&text, "lifeline_agent_pbx_state{state=\"up\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "lifeline_agent_sync_pending"),
        Some(0.0),
        "{text}"
    );
    wait(
        "the carrier's metrics show the binding",
        Duration::from_secs(10),
        || {
            sample(
                &scrape(carrier_metrics),
                "lifeline_bindings{server=\"trunk1\"}",
            ) == Some(1.0)
        },
        || t1.log(),
    );
    let text = scrape(carrier_metrics);
    let registers = |status: &str| {
        sample(
            &text,
            &format!("lifeline_register_responses_total{{server=\"trunk1\",status=\"{status}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(registers("200") >= 1.0 && registers("401") >= 1.0, "{text}");
    assert_eq!(
        sample(&text, "lifeline_store_reachable{server=\"trunk1\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(
        !text.contains("lifeline_calls_total{"),
        "no call yet:\n{text}"
    );

    // A call delivered to the PBX.
    call(&t1, &ip(net, 14), DID, 200);
    assert_eq!(pbx.seen("INVITE").len(), 1);
    let text = scrape(carrier_metrics);
    let delivered =
        "lifeline_calls_total{server=\"trunk1\",outcome=\"delivered\",delivered_by=\"primary\"}";
    assert_eq!(sample(&text, delivered), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "lifeline_delivery_delay_seconds_count{server=\"trunk1\",stage=\"primary\"}"
        ),
        Some(1.0),
        "{text}"
    );

    // The PBX dies: the agent withdraws it, the next call fails over to the gateway.
    pbx.fall_silent();
    wait(
        "the agent's metrics show the PBX down and the binding withdrawn",
        Duration::from_secs(20),
        || {
            let t = scrape(agent_metrics);
            sample(&t, "lifeline_agent_pbx_state{state=\"down\"}") == Some(1.0)
                && sample(&t, &registered) == Some(0.0)
        },
        || agent.log(),
    );
    let gateway = answering_uas(&ip(net, 13), 5060);
    call(&t1, &ip(net, 14), DID, 200);
    ok(gateway.wait(), "gateway", &t1);
    let text = scrape(carrier_metrics);
    let by_number = "lifeline_calls_total{server=\"trunk1\",outcome=\"delivered\",delivered_by=\"failover_number\"}";
    assert_eq!(sample(&text, by_number), Some(1.0), "{text}");
    assert_eq!(sample(&text, delivered), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "lifeline_failovers_total{server=\"trunk1\",stage=\"failover_number\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.contains("# TYPE lifeline_delivery_delay_seconds histogram"),
        "{text}"
    );
    // A call may ring for minutes: the setup histogram has buckets that far.
    assert!(
        text.contains(
            "lifeline_call_setup_seconds_bucket{server=\"trunk1\",outcome=\"delivered\",le=\"180\"} 2"
        ),
        "{text}"
    );
}

fn hangup(p: &Carrier) {
    let st = Command::new("kill")
        .args(["-HUP", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Waits until the log holds `needle` `count` times.
fn wait_for_count(p: &Carrier, needle: &str, count: usize) {
    wait(
        &format!("{count} × `{needle}` in the log"),
        Duration::from_secs(10),
        || p.log().matches(needle).count() >= count,
        || p.log(),
    );
}

/// The certificate the TLS listener at `addr` presents (DER), whatever it is.
fn presented_certificate(addr: std::net::SocketAddr) -> Vec<u8> {
    use std::sync::Arc;
    #[derive(Debug)]
    struct AnyCert(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("TLS handshake");
    }
    conn.peer_certificates().expect("a certificate")[0].to_vec()
}

#[test]
fn sighup_reloads_the_carrier_without_dropping_the_call_in_progress() {
    let net = 132;
    let (me, pbx_ip, caller, newcomer) = (ip(net, 10), ip(net, 11), ip(net, 14), ip(net, 15));
    let work = tempfile::tempdir().unwrap();
    let write_cert = |name: &str| {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let (cert, key) = (
            work.path().join(format!("{name}.crt")),
            work.path().join(format!("{name}.key")),
        );
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (cert, key, c.cert.der().to_vec())
    };
    let (cert_a, key_a, der_a) = write_cert("reload-a.test");
    let (cert_b, key_b, der_b) = write_cert("reload-b.test");
    let config = |upstream: &str, listen: &str, cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "[carrier]\nname = \"trunk1\"\napi_listen = \"\"\n\
             sip_listen = [\"udp:{me}:5060\", \"tls:{me}:5061\"{listen}]\n\
             tls_certificate = \"{}\"\ntls_private_key = \"{}\"\n\
             t1_ms = 50\nt2_ms = 200\nt4_ms = 250\ntimer_d_ms = 500\nmin_expires_s = 1\n\
             config_poll_ms = 100\nbindings_flush_ms = 50\nprobe_interval_ms = 0\n\
             upstream = [{upstream}]\n",
            cert.display(),
            key.display()
        )
    };
    let mut t1 = start_carrier(&config(&format!("\"{caller}\""), "", &cert_a, &key_a), 2);
    let dir = t1.dir.path().to_path_buf();
    let group = provision_trunk_group(&dir, USER, PASSWORD);
    admin(&dir, &["did", "add", DID, "--trunk-group", &group]);
    thread::sleep(Duration::from_millis(300));
    register_pbx(&t1, &pbx_ip, USER);
    assert_eq!(presented_certificate(t1.addr("tls")), der_a);

    // Not yet upstream: refused.
    call(&t1, &newcomer, DID, 403);

    // A call in progress: answered, its BYE comes 3 s later.
    let pbx = answering_uas(&pbx_ip, PBX_PORT);
    let long_call = spawn_sipp(
        &caller,
        0,
        Some(t1.addr("udp").to_string()),
        Scenario::Xml(caller_xml(DID, 200).replace(
            "<pause milliseconds=\"300\"/>",
            "<pause milliseconds=\"3000\"/>",
        )),
        &[],
    );
    // (The refused call never reached delivery.)
    wait_for_count(&t1, "call delivery ended", 1);

    // The new file: another upstream address and another certificate (applied), another
    // listener (needs a restart: named, not applied).
    let path = dir.join("carrier.toml");
    std::fs::write(
        &path,
        config(
            &format!("\"{caller}\", \"{newcomer}\""),
            &format!(", \"udp:{me}:5070\""),
            &cert_b,
            &key_b,
        ),
    )
    .unwrap();
    hangup(&t1);
    wait_for_count(&t1, "configuration reloaded, except keys", 1);
    assert!(
        t1.log().contains("restart_needed=sip_listen"),
        "{}",
        t1.log()
    );
    assert_eq!(presented_certificate(t1.addr("tls")), der_b);

    // The call in progress ends normally: its BYE passed through the reloaded server.
    ok(long_call.wait(), "the call in progress", &t1);
    ok(pbx.wait(), "the PBX of the call in progress", &t1);
    // The new upstream address is accepted.
    let pbx = answering_uas(&pbx_ip, PBX_PORT);
    call(&t1, &newcomer, DID, 200);
    ok(pbx.wait(), "the PBX", &t1);
    // The listener that needs a restart was not opened.
    assert!(std::net::UdpSocket::bind(format!("{me}:5070")).is_ok());

    // A broken file is refused, naming the key; the settings in force stay.
    std::fs::write(&path, "[carrier]\nt1_ms = \"fast\"\n").unwrap();
    hangup(&t1);
    wait_for_count(&t1, "configuration refused; the settings in force stay", 1);
    assert!(t1.log().contains("t1_ms"), "{}", t1.log());
    // A certificate that does not load refuses the whole reload.
    std::fs::write(&path, config(&format!("\"{caller}\""), "", &cert_a, &key_b)).unwrap();
    hangup(&t1);
    wait_for_count(&t1, "configuration refused; the settings in force stay", 2);
    assert!(t1.alive(), "{}", t1.log());
    assert_eq!(presented_certificate(t1.addr("tls")), der_b);
    let pbx = answering_uas(&pbx_ip, PBX_PORT);
    call(&t1, &newcomer, DID, 200);
    ok(pbx.wait(), "the PBX", &t1);
    // The binding made before the reloads is the one that took every call.
    assert_eq!(
        t1.log().matches("call delivery ended").count(),
        3,
        "{}",
        t1.log()
    );
}

/// A journal entry: its fields in order (a key may repeat).
type Entry = Vec<(String, String)>;

/// One journal entry as journald's native protocol carries it: `KEY=value` lines, or `KEY`,
/// a little-endian u64 length and the value, for values that may hold newlines.
fn journal_entry(mut d: &[u8]) -> Entry {
    let mut fields = Vec::new();
    while let Some(nl) = d.iter().position(|&b| b == b'\n') {
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            let key = String::from_utf8_lossy(&line[..eq]).into_owned();
            fields.push((key, String::from_utf8_lossy(&line[eq + 1..]).into_owned()));
            d = &d[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = &d[nl + 9..nl + 9 + len];
            fields.push((key, String::from_utf8_lossy(value).into_owned()));
            d = &d[nl + 9 + len + 1..];
        }
    }
    fields
}

fn field<'a>(entry: &'a [(String, String)], key: &str) -> Option<&'a str> {
    entry
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[test]
fn under_systemd_a_calls_events_reach_the_journal_with_its_fields() {
    use std::os::unix::net::UnixDatagram;
    use std::sync::{Arc, Mutex};
    let net = 133;
    let (me, pbx_ip, caller) = (ip(net, 10), ip(net, 11), ip(net, 14));
    // journald's socket, as the carrier will see it at /run/systemd/journal/socket in a
    // mount namespace of its own.
    let journal = tempfile::tempdir().unwrap();
    let socket = UnixDatagram::bind(journal.path().join("socket")).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("carrier.toml"),
        format!(
            "[carrier]\nname = \"trunk1\"\napi_listen = \"\"\nsip_listen = [\"udp:{me}:5060\"]\n\
             log_level = \"info\"\nmin_expires_s = 1\nconfig_poll_ms = 100\n\
             probe_interval_ms = 0\nupstream = [\"{caller}\"]\n"
        ),
    )
    .unwrap();
    let group = provision_trunk_group(dir.path(), USER, PASSWORD);
    admin(dir.path(), &["did", "add", DID, "--trunk-group", &group]);
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs lifeline-test /run && mkdir -p /run/systemd/journal && \
             mount --bind \"$0\" /run/systemd/journal && exec \"$@\"",
        )
        .arg(journal.path())
        .arg(common::carrier_bin())
        .arg("--config")
        .arg(dir.path().join("carrier.toml"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        // What systemd sets when standard error goes to the journal.
        .env("JOURNAL_STREAM", "8:12345")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("unshare (util-linux); the test needs root for a mount namespace");
    // Killed on drop, whatever happens next.
    let t1 = Carrier {
        child,
        bound: vec![("udp".into(), format!("{me}:5060").parse().unwrap())],
        log: Arc::new(Mutex::new(String::new())),
        dir,
    };
    // Read at once, as journald does: a full socket buffer would block the carrier's logging.
    let received: Arc<Mutex<Vec<Entry>>> = Arc::default();
    let reader = {
        let received = received.clone();
        let socket = socket.try_clone().unwrap();
        thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(120) && Arc::strong_count(&received) > 1 {
                if let Ok(n @ 1..) = socket.recv(&mut buf) {
                    received.lock().unwrap().push(journal_entry(&buf[..n]));
                }
            }
        })
    };
    let mut entries: Vec<Entry> = Vec::new();
    let receive = |entries: &mut Vec<Entry>| {
        thread::sleep(Duration::from_millis(20));
        *entries = received.lock().unwrap().clone();
    };
    let messages = |entries: &[Entry]| {
        entries
            .iter()
            .map(|e| format!("{e:?}\n"))
            .collect::<String>()
    };
    let start = Instant::now();
    let listening = loop {
        receive(&mut entries);
        if let Some(e) = entries
            .iter()
            .find(|e| field(e, "MESSAGE").is_some_and(|m| m.contains("listening")))
        {
            break e.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nothing reached the journal socket:\n{}",
            messages(&entries)
        );
    };
    assert_eq!(
        field(&listening, "SYSLOG_IDENTIFIER"),
        Some("lifeline-carrier")
    );
    // tracing-journald's level for info.
    assert_eq!(field(&listening, "PRIORITY"), Some("5"), "{listening:?}");
    thread::sleep(Duration::from_millis(300));
    register_pbx(&t1, &pbx_ip, USER);
    let pbx = MiniPbx::start(&format!("{pbx_ip}:{PBX_PORT}"));
    let run = spawn_sipp(
        &caller,
        0,
        Some(t1.addr("udp").to_string()),
        Scenario::Xml(caller_xml(DID, 200)),
        &[],
    )
    .wait();
    if let Err(e) = run {
        receive(&mut entries);
        panic!(
            "the call failed: {e}\n==== PBX saw ====\n{:?}\n==== journal ====\n{}",
            pbx.seen("BYE"),
            messages(&entries)
        );
    }
    assert_eq!(pbx.seen("INVITE").len(), 1);

    // `journalctl CALL_ID=…` finds the call's story: each of its events carries the call's
    // fields, and the last says how it ended.
    let start = Instant::now();
    let story = loop {
        receive(&mut entries);
        let ended = entries
            .iter()
            .find(|e| field(e, "MESSAGE") == Some("call delivery ended"));
        if let Some(ended) = ended {
            let call_id = field(ended, "CALL_ID").expect("CALL_ID").to_string();
            break entries
                .iter()
                .filter(|e| field(e, "CALL_ID") == Some(call_id.as_str()))
                .cloned()
                .collect::<Vec<_>>();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the call's end never reached the journal:\n{}",
            messages(&entries)
        );
    };
    let said: Vec<&str> = story.iter().filter_map(|e| field(e, "MESSAGE")).collect();
    for step in [
        "inbound call",
        "delivery plan",
        "branch started",
        "call delivery ended",
    ] {
        assert!(said.contains(&step), "{step} missing from {said:?}");
    }
    // Delivery events name the DID and trunk group; the in-dialog requests that follow (ACK,
    // BYE) are routed without them, but by the same Call-ID.
    let ended_at = said
        .iter()
        .position(|m| *m == "call delivery ended")
        .unwrap();
    for (i, e) in story.iter().enumerate() {
        assert_eq!(field(e, "TRUNK_SERVER"), Some("trunk1"), "{e:?}");
        // Our fields do not collide with the journal's own (TARGET is the module).
        assert_eq!(e.iter().filter(|(k, _)| k == "TARGET").count(), 1, "{e:?}");
        if i <= ended_at {
            assert_eq!(field(e, "DID"), Some(DID), "{e:?}");
            assert_eq!(field(e, "TRUNK_GROUP"), Some(group.as_str()), "{e:?}");
        }
    }
    assert!(
        said[ended_at + 1..].contains(&"in-dialog request"),
        "{said:?}"
    );
    let ended = &story[ended_at];
    assert_eq!(field(ended, "OUTCOME"), Some("delivered"), "{ended:?}");
    drop(t1);
    drop(received);
    reader.join().unwrap();
}

#[test]
fn a_reload_during_delivery_leaves_the_calls_later_stages_alone() {
    let net = 134;
    let (me, pbx_ip, gw, caller) = (ip(net, 10), ip(net, 11), ip(net, 13), ip(net, 14));
    let config = |gateway: &str| {
        format!(
            "[carrier]\nname = \"trunk1\"\napi_listen = \"\"\nsip_listen = [\"udp:{me}:5060\"]\n\
             t1_ms = 50\nt2_ms = 200\nt4_ms = 250\ntimer_d_ms = 500\nmin_expires_s = 1\n\
             config_poll_ms = 100\nbindings_flush_ms = 50\nprobe_interval_ms = 0\n\
             delivery_timer_ms = 1500\nupstream = [\"{caller}\"]\n{gateway}"
        )
    };
    let mut t1 = start_carrier(&config(&format!("pstn_gateway = \"sip:{gw}:5060\"\n")), 1);
    let dir = t1.dir.path().to_path_buf();
    let group = provision_trunk_group(&dir, USER, PASSWORD);
    admin(&dir, &["did", "add", DID, "--trunk-group", &group]);
    admin(&dir, &["did", "failover", DID, "--number", FAILOVER_NUMBER]);
    thread::sleep(Duration::from_millis(300));
    register_pbx(&t1, &pbx_ip, USER);
    // The PBX is there but silent: the call waits out the delivery timer.
    let pbx = MiniPbx::start(&format!("{pbx_ip}:{PBX_PORT}"));
    pbx.fall_silent();
    let gateway = answering_uas(&gw, 5060);
    let the_call = spawn_sipp(
        &caller,
        0,
        Some(t1.addr("udp").to_string()),
        Scenario::Xml(caller_xml(DID, 200)),
        &[],
    );
    wait(
        "the INVITE at the silent PBX",
        Duration::from_secs(10),
        || !pbx.seen("INVITE").is_empty(),
        || t1.log(),
    );
    // Meanwhile the gateway leaves the configuration.
    std::fs::write(dir.join("carrier.toml"), config("")).unwrap();
    hangup(&t1);
    wait_for_count(&t1, "configuration reloaded", 1);
    // The call started with a gateway: its failover number still goes there.
    ok(the_call.wait(), "the caller", &t1);
    let trace = ok(gateway.wait(), "the gateway", &t1);
    assert!(
        trace.contains(&format!("INVITE sip:{FAILOVER_NUMBER}@")),
        "{trace}"
    );
    // A new call has no gateway to fail over to.
    call(&t1, &caller, DID, 480);
    assert!(t1.alive());
}
