//! The running carrier on real sockets, driven by a plain-text SIP peer that does not use the
//! project's SIP code: OPTIONS over UDP, TCP, TLS and IPv6, retransmissions, garbage on
//! streams, configuration errors.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::{header_of, start_carrier, status_of};

const WAIT: Duration = Duration::from_secs(5);

fn config(ip: &str) -> String {
    format!(
        "[carrier]\nname = \"t\"\nsip_listen = [\"udp:{ip}:0\", \"tcp:{ip}:0\"]\nt1_ms = 50\nt2_ms = 200\nt4_ms = 250\ntimer_d_ms = 500\n"
    )
}

fn options(target: &str, via: &str, branch: &str) -> String {
    format!(
        "OPTIONS sip:{target} SIP/2.0\r\nVia: SIP/2.0/{via};branch=z9hG4bK{branch}\r\nMax-Forwards: 70\r\nFrom: <sip:probe@example.com>;tag=p1\r\nTo: <sip:{target}>\r\nCall-ID: {branch}@test\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
}

fn udp_exchange(sock: &UdpSocket, to: SocketAddr, msg: &str) -> String {
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.send_to(msg.as_bytes(), to).unwrap();
    let mut buf = [0u8; 65535];
    let (n, _) = sock
        .recv_from(&mut buf)
        .expect("a response within the deadline");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Reads one response from a stream (headers and Content-Length body), keeping whatever
/// follows it in `pending` for the next call.
fn read_response_buffered(s: &mut TcpStream, pending: &mut Vec<u8>) -> Option<String> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            let len: usize = header_of(&head, "Content-Length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if pending.len() >= end + 4 + len {
                let msg: Vec<u8> = pending.drain(..end + 4 + len).collect();
                return Some(String::from_utf8_lossy(&msg).into_owned());
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads one response from a stream that carries one answer at a time.
fn read_response(s: &mut TcpStream) -> Option<String> {
    let mut pending = Vec::new();
    let r = read_response_buffered(s, &mut pending);
    assert!(pending.is_empty(), "unexpected extra data");
    r
}

/// True when the peer closes the connection within the deadline.
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut chunk = [0u8; 4096];
    let start = Instant::now();
    while start.elapsed() < WAIT {
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
    false
}

#[test]
fn answers_options_over_udp_with_allow_and_supported() {
    let carrier = start_carrier(&config("127.0.41.1"), 2);
    let sock = UdpSocket::bind("127.0.41.2:0").unwrap();
    let me = sock.local_addr().unwrap();
    let resp = udp_exchange(
        &sock,
        carrier.addr("udp"),
        &options("127.0.41.1", &format!("UDP {me}"), "u1"),
    );
    assert_eq!(status_of(resp.as_bytes()), Some(200), "{resp}");
    let allow = header_of(&resp, "Allow").expect("Allow");
    for m in ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER"] {
        assert!(allow.contains(m), "Allow lacks {m}: {allow}");
    }
    assert!(header_of(&resp, "Supported").is_some(), "{resp}");
    assert!(header_of(&resp, "To").unwrap().contains("tag="), "{resp}");
    assert!(
        header_of(&resp, "Via")
            .unwrap()
            .contains("branch=z9hG4bKu1")
    );
}

#[test]
fn a_retransmitted_request_gets_the_same_answer() {
    let carrier = start_carrier(&config("127.0.41.3"), 2);
    let sock = UdpSocket::bind("127.0.41.4:0").unwrap();
    let me = sock.local_addr().unwrap();
    let msg = options("127.0.41.3", &format!("UDP {me};rport"), "retrans");
    let first = udp_exchange(&sock, carrier.addr("udp"), &msg);
    let second = udp_exchange(&sock, carrier.addr("udp"), &msg);
    // The server transaction answers the retransmission with the very same response.
    assert_eq!(first, second);
    assert!(
        header_of(&first, "Via").unwrap().contains("rport="),
        "{first}"
    );
}

#[test]
fn answers_on_the_connection_the_request_came_in_on() {
    let carrier = start_carrier(&config("127.0.41.5"), 2);
    let mut s = TcpStream::connect(carrier.addr("tcp")).unwrap();
    let me = s.local_addr().unwrap();
    // The Via names a port nobody listens on: the answer must still come on this connection.
    s.write_all(options("127.0.41.5", "TCP 127.0.41.6:1", "t1").as_bytes())
        .unwrap();
    let resp = read_response(&mut s).expect("a response on the same connection");
    assert_eq!(status_of(resp.as_bytes()), Some(200), "{resp}");
    assert!(
        header_of(&resp, "Via")
            .unwrap()
            .contains(&format!("received={}", me.ip()))
    );
    // Two requests in one write, then one split across writes: framing by Content-Length.
    let two = format!(
        "{}{}",
        options("127.0.41.5", "TCP x", "t2"),
        options("127.0.41.5", "TCP x", "t3")
    );
    s.write_all(two.as_bytes()).unwrap();
    let mut pending = Vec::new();
    let first = read_response_buffered(&mut s, &mut pending).unwrap();
    let second = read_response_buffered(&mut s, &mut pending).unwrap();
    assert!(first.contains("z9hG4bKt2"), "{first}");
    assert!(second.contains("z9hG4bKt3"), "{second}");
    let split = options("127.0.41.5", "TCP x", "t4");
    s.write_all(&split.as_bytes()[..30]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(&split.as_bytes()[30..]).unwrap();
    assert!(read_response(&mut s).unwrap().contains("z9hG4bKt4"));
}

#[test]
fn garbage_or_oversized_data_closes_only_that_connection() {
    let carrier = start_carrier(&config("127.0.41.7"), 2);
    let addr = carrier.addr("tcp");
    let mut bystander = TcpStream::connect(addr).unwrap();

    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage
        .write_all(b"\x16\x03\x01 this is not SIP at all\r\n\r\n")
        .unwrap();
    assert!(
        closed_by_peer(&mut garbage),
        "garbage must close the connection"
    );

    let mut huge = TcpStream::connect(addr).unwrap();
    let blob = vec![b'a'; 70 * 1024];
    let _ = huge.write_all(&blob);
    assert!(
        closed_by_peer(&mut huge),
        "70 KiB without a header end must close the connection"
    );

    let mut liar = TcpStream::connect(addr).unwrap();
    let _ = liar.write_all(b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 99999999\r\n\r\n");
    assert!(
        closed_by_peer(&mut liar),
        "an impossible Content-Length must close the connection"
    );

    bystander
        .write_all(options("127.0.41.7", "TCP x", "b1").as_bytes())
        .unwrap();
    let resp = read_response(&mut bystander).expect("the other connection still works");
    assert_eq!(status_of(resp.as_bytes()), Some(200));
    let mut fresh = TcpStream::connect(addr).unwrap();
    fresh
        .write_all(options("127.0.41.7", "TCP x", "f1").as_bytes())
        .unwrap();
    assert_eq!(
        status_of(read_response(&mut fresh).unwrap().as_bytes()),
        Some(200)
    );
}

#[test]
fn a_malformed_request_on_tcp_gets_400_and_the_connection_stays() {
    let carrier = start_carrier(&config("127.0.41.8"), 2);
    let mut s = TcpStream::connect(carrier.addr("tcp")).unwrap();
    let bad = "OPTIONS sip:u@x SIP/2.0\r\nVia: SIP/2.0/TCP x;branch=z9hG4bKm1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:u@x>\r\nCall-ID: m1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
    s.write_all(bad.as_bytes()).unwrap();
    assert_eq!(
        status_of(read_response(&mut s).unwrap().as_bytes()),
        Some(400)
    );
    s.write_all(options("127.0.41.8", "TCP x", "m2").as_bytes())
        .unwrap();
    assert_eq!(
        status_of(read_response(&mut s).unwrap().as_bytes()),
        Some(200)
    );
}

#[test]
fn listens_on_ipv6() {
    let cfg = "[carrier]\nsip_listen = [\"udp:[::1]:0\", \"tcp:[::1]:0\"]\n";
    let carrier = start_carrier(cfg, 2);
    let sock = UdpSocket::bind("[::1]:0").unwrap();
    let me = sock.local_addr().unwrap();
    let resp = udp_exchange(
        &sock,
        carrier.addr("udp"),
        &options("[::1]", &format!("UDP {me}"), "v6"),
    );
    assert_eq!(status_of(resp.as_bytes()), Some(200), "{resp}");
    let mut s = TcpStream::connect(carrier.addr("tcp")).unwrap();
    s.write_all(options("[::1]", "TCP [::1]", "v6t").as_bytes())
        .unwrap();
    assert_eq!(
        status_of(read_response(&mut s).unwrap().as_bytes()),
        Some(200)
    );
}

#[test]
fn a_broken_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[carrier]\nt1_msec = 5\n", "t1_msec"),
        ("[carrier]\nsip_listen = [\"udp:nowhere\"]\n", "sip_listen"),
        ("[carrier\n", "carrier"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(common::carrier_bin())
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{err}");
        assert!(err.contains(key), "the error should name `{key}`: {err}");
    }
}

#[test]
fn without_a_config_it_serves_loopback_5060() {
    // 127.0.0.1:5060 may be taken on the host: run in a private network namespace.
    if !common::in_private_netns("without_a_config_it_serves_loopback_5060") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(common::carrier_bin());
    cmd.current_dir(dir.path());
    let carrier = common::spawn(cmd, 2, tempfile::tempdir().unwrap());
    let mut bound: Vec<String> = carrier
        .bound
        .iter()
        .map(|(t, a)| format!("{t}:{a}"))
        .collect();
    bound.sort();
    assert_eq!(bound, ["tcp:127.0.0.1:5060", "udp:127.0.0.1:5060"]);
    // And the provisioning API on 127.0.0.1:8080, plain HTTP (loopback only).
    let deadline = Instant::now() + WAIT;
    while !carrier
        .log()
        .contains("API listening scheme=http addr=127.0.0.1:8080")
    {
        assert!(Instant::now() < deadline, "{}", carrier.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        dir.path().join("lifeline-data").is_dir(),
        "state in ./lifeline-data"
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let me = sock.local_addr().unwrap();
    let resp = udp_exchange(
        &sock,
        "127.0.0.1:5060".parse().unwrap(),
        &options("127.0.0.1", &format!("UDP {me}"), "d1"),
    );
    assert_eq!(status_of(resp.as_bytes()), Some(200));
}

#[test]
fn answers_over_tls() {
    use std::sync::Arc;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let cfg = format!(
        "[carrier]\nsip_listen = [\"tls:127.0.41.9:0\"]\ntls_certificate = \"{}\"\ntls_private_key = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    );
    let carrier = start_carrier(&cfg, 1);

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap()).unwrap();
    let tcp = TcpStream::connect(carrier.addr("tls")).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(options("127.0.41.9", "TLS client.invalid", "tls1").as_bytes())
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf).expect("a response over TLS");
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        status_of(&got),
        Some(200),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn a_peer_that_never_reads_loses_its_connection() {
    let carrier = start_carrier(&config("127.0.41.10"), 2);
    let addr = carrier.addr("tcp");
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut greedy: TcpStream = sock.into();
    greedy
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Requests, never reading the answers: the carrier's queue for this peer must not grow
    // without bound; it closes the connection. Bounded: at most 100 000 requests or 60 s.
    let start = Instant::now();
    let mut sent = 0;
    let closed = loop {
        let msg = options("127.0.41.10", "TCP x", &format!("g{sent}"));
        if greedy.write_all(msg.as_bytes()).is_err() {
            break true;
        }
        sent += 1;
        if sent >= 100_000 || start.elapsed() > Duration::from_secs(60) {
            break false;
        }
    };
    assert!(closed, "still open after {sent} unread requests");
    let mut fresh = TcpStream::connect(addr).unwrap();
    fresh
        .write_all(options("127.0.41.10", "TCP x", "after").as_bytes())
        .unwrap();
    assert_eq!(
        status_of(read_response(&mut fresh).unwrap().as_bytes()),
        Some(200)
    );
    assert!(
        carrier.log().contains("peer not reading"),
        "{}",
        carrier.log()
    );
}

#[test]
fn a_forged_mid_dialog_request_is_not_relayed() {
    // Not an open relay: a request with a To tag and a Route naming the carrier is forwarded
    // only with the dialog token of a call this carrier set up (RFC 3261 §16.4 loose routing).
    let carrier = start_carrier(&config("127.0.41.11"), 2);
    let us = carrier.addr("udp");
    let victim = UdpSocket::bind("127.0.41.12:0").unwrap();
    let target = victim.local_addr().unwrap();
    let attacker = UdpSocket::bind("127.0.41.13:0").unwrap();
    let me = attacker.local_addr().unwrap();
    for route in [
        format!("<sip:{us};lr>"),
        format!("<sip:{us};lr;lld=00112233445566778899aabb>"),
    ] {
        let forged = format!(
            "INVITE sip:+19005551234@{target} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{}\r\nRoute: {route}\r\nMax-Forwards: 70\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:+19005551234@x>;tag=fake\r\nCall-ID: relay-{}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
            route.len(),
            route.len()
        );
        let answer = udp_exchange(&attacker, us, &forged);
        assert!(
            status_of(answer.as_bytes()).is_some_and(|c| c >= 400),
            "{answer}"
        );
    }
    victim
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 2048];
    assert!(
        victim.recv_from(&mut buf).is_err(),
        "the carrier relayed a forged request"
    );
}
