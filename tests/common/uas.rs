//! A minimal PBX over UDP, written from scratch for the tests (it uses none of the project's
//! SIP code): it answers OPTIONS with 200, INVITE with 180 and 200 (echoing Record-Route),
//! BYE and CANCEL with 200, and ignores ACK. It can be told to fall silent and to answer
//! again, and it records every request it received.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A request as received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub text: String,
    pub at: Instant,
}

pub struct MiniPbx {
    pub addr: SocketAddr,
    answering: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// When it last answered an OPTIONS.
    last_answer: Arc<Mutex<Option<Instant>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl MiniPbx {
    pub fn start(addr: &str) -> MiniPbx {
        let socket = UdpSocket::bind(addr).expect("bind the mini PBX");
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let answering = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let last_answer = Arc::new(Mutex::new(None));
        let thread = {
            let (answering, stop, seen, last_answer) = (
                answering.clone(),
                stop.clone(),
                seen.clone(),
                last_answer.clone(),
            );
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let mut first = text.lines().next().unwrap_or("").split(' ');
                    let method = first.next().unwrap_or("").to_string();
                    let uri = first.next().unwrap_or("").to_string();
                    if method.starts_with("SIP/") {
                        continue;
                    }
                    seen.lock().unwrap().push(Seen {
                        method: method.clone(),
                        uri,
                        text: text.clone(),
                        at: Instant::now(),
                    });
                    if !answering.load(Ordering::Relaxed) {
                        continue;
                    }
                    let replies: Vec<String> = match method.as_str() {
                        "OPTIONS" => {
                            *last_answer.lock().unwrap() = Some(Instant::now());
                            vec![response(&text, "200 OK", false, addr)]
                        }
                        "INVITE" => vec![
                            response(&text, "180 Ringing", true, addr),
                            response(&text, "200 OK", true, addr),
                        ],
                        "BYE" | "CANCEL" => vec![response(&text, "200 OK", false, addr)],
                        _ => Vec::new(),
                    };
                    for r in replies {
                        let _ = socket.send_to(r.as_bytes(), from);
                    }
                }
            })
        };
        MiniPbx {
            addr,
            answering,
            stop,
            seen,
            last_answer,
            thread: Some(thread),
        }
    }

    /// Stops answering (requests are still recorded).
    pub fn fall_silent(&self) {
        self.answering.store(false, Ordering::Relaxed);
    }

    pub fn answer_again(&self) {
        self.answering.store(true, Ordering::Relaxed);
    }

    pub fn last_answer(&self) -> Option<Instant> {
        *self.last_answer.lock().unwrap()
    }

    /// The requests of `method` received so far.
    pub fn seen(&self, method: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == method)
            .cloned()
            .collect()
    }
}

impl Drop for MiniPbx {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The headers of `request` with `name` (full or compact form), as written.
fn headers<'a>(request: &'a str, names: &[&str]) -> Vec<&'a str> {
    request
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .lines()
        .skip(1)
        .filter(|l| {
            let name = l.split(':').next().unwrap_or("").trim();
            names.iter().any(|n| n.eq_ignore_ascii_case(name))
        })
        .collect()
}

/// A response to `request`: its Via, From, To (with a tag), Call-ID and CSeq copied.
fn response(request: &str, status: &str, dialog: bool, me: SocketAddr) -> String {
    let mut out = format!("SIP/2.0 {status}\r\n");
    for h in headers(request, &["Via", "v"]) {
        out.push_str(h);
        out.push_str("\r\n");
    }
    for h in headers(request, &["From", "f", "Call-ID", "i", "CSeq"]) {
        out.push_str(h);
        out.push_str("\r\n");
    }
    for h in headers(request, &["To", "t"]) {
        out.push_str(h);
        if !h.contains("tag=") {
            out.push_str(";tag=minipbx");
        }
        out.push_str("\r\n");
    }
    if dialog {
        for h in headers(request, &["Record-Route"]) {
            out.push_str(h);
            out.push_str("\r\n");
        }
        out.push_str(&format!("Contact: <sip:pbx@{me}>\r\n"));
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out
}
