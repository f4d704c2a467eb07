//! `Message::parse` on arbitrary bytes. A message that parses must survive `to_bytes()` and a
//! second parse with the same routing fields and headers; the stream framer must not panic,
//! must make progress, and the frames it cuts are parsed too. Edited messages (what a proxy
//! does before forwarding) must re-parse as well.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use lifeline::sip::message::{Frame, HeaderName, Message, stream_frame};
use lifeline::sip::uri::Uri;

fn same_routing(a: &Message, b: &Message, what: &str) {
    assert_eq!(a.method(), b.method(), "{what}: method");
    assert_eq!(a.status(), b.status(), "{what}: status");
    assert_eq!(a.uri(), b.uri(), "{what}: Request-URI");
    assert_eq!(a.call_id(), b.call_id(), "{what}: Call-ID");
    assert_eq!(a.cseq(), b.cseq(), "{what}: CSeq");
    assert_eq!(a.from().tag(), b.from().tag(), "{what}: From tag");
    assert_eq!(a.to().tag(), b.to().tag(), "{what}: To tag");
    // A rewritten header is unfolded: display names compare modulo folding.
    for (x, y, which) in [(a.from(), b.from(), "From"), (a.to(), b.to(), "To")] {
        assert_eq!(x.uri, y.uri, "{what}: {which} URI");
        assert_eq!(x.params, y.params, "{what}: {which} parameters");
        let display = |n: &lifeline::sip::uri::NameAddr| n.display.as_ref().map(|d| unfold(d.as_bytes()));
        assert_eq!(display(x), display(y), "{what}: {which} display name");
    }
    assert_eq!(a.vias(), b.vias(), "{what}: Via list");
    assert_eq!(a.max_forwards(), b.max_forwards(), "{what}: Max-Forwards");
    assert_eq!(a.body(), b.body(), "{what}: body");
}

fn reparse(m: &Message, what: &str) -> Message {
    let out = m.to_bytes();
    match Message::parse(out.clone()) {
        Ok(again) => again,
        Err(e) => panic!(
            "{what}: to_bytes() does not re-parse ({}): {out:?}",
            e.reason
        ),
    }
}

/// A header value with each fold (a line end and the white space after it) as one space:
/// a header rewritten by this element is unfolded (RFC 3261 §7.3.1), which keeps its meaning.
fn unfold(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut in_fold = false;
    for &b in v {
        let lws = matches!(b, b' ' | b'\t' | b'\r' | b'\n');
        if lws && (in_fold || b == b'\r' || b == b'\n') {
            if !in_fold {
                out.push(b' ');
            }
            in_fold = true;
        } else {
            in_fold = false;
            out.push(b);
        }
    }
    out
}

fn check_message(data: &[u8]) {
    let Ok(m) = Message::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    let out = m.to_bytes();
    let again = reparse(&m, "round trip");
    same_routing(&m, &again, "round trip");

    // Same headers, in order, with the same values. to_bytes() always states Content-Length,
    // so a message without one gains exactly one.
    let is_cl = |h: &&lifeline::sip::message::Header| h.name == HeaderName::ContentLength;
    let had_cl = m.headers().iter().filter(is_cl).count();
    assert!(
        had_cl <= 1,
        "parsed a message with {had_cl} Content-Length headers"
    );
    assert_eq!(
        again.headers().iter().filter(is_cl).count(),
        1,
        "Content-Length after to_bytes"
    );
    assert_eq!(
        again.headers().len(),
        m.headers().len() + (1 - had_cl),
        "header count changed: {out:?}"
    );
    let others = |m: &Message| {
        m.headers()
            .iter()
            .filter(|h| h.name != HeaderName::ContentLength)
            .map(|h| (h.name.clone(), unfold(&h.value)))
            .collect::<Vec<_>>()
    };
    assert_eq!(others(&m), others(&again), "headers changed: {out:?}");
    // Serializing is a fixed point after one round.
    assert_eq!(again.to_bytes(), out, "second to_bytes() differs");
    // What this element sends over TCP/TLS, its own stream framer (and any peer's) frames as
    // exactly one message.
    assert_eq!(
        stream_frame(&out),
        Ok(Frame::Message { len: out.len() }),
        "stream framing of to_bytes(): {out:?}"
    );

    // What a proxy does before forwarding, and a UAS answering: the result must re-parse.
    let mut edited = m.clone();
    edited.set_received("192.0.2.1".parse().unwrap(), 5062);
    edited.set_max_forwards(m.max_forwards().unwrap_or(70).saturating_sub(1));
    let popped = edited.pop_via();
    edited.set_to_tag("fz1");
    let e2 = reparse(&edited, "edited");
    assert_eq!(e2.vias(), edited.vias(), "edited: Via list");
    assert_eq!(
        e2.vias().len(),
        m.vias().len() - popped as usize,
        "edited: Via count"
    );
    assert_eq!(e2.to().tag(), Some("fz1"), "edited: To tag");
    assert_eq!(e2.call_id(), m.call_id(), "edited: Call-ID");
    if m.is_request() {
        let r = m.response(180, "Ringing", Some("fz2"));
        let r2 = reparse(&r, "response");
        assert_eq!(r2.status(), Some(180));
        assert_eq!(r2.vias(), m.vias(), "response: Via list");
        assert_eq!(r2.call_id(), m.call_id(), "response: Call-ID");
        assert_eq!(r2.cseq(), m.cseq(), "response: CSeq");
    }
}

fuzz_target!(|data: &[u8]| {
    check_message(data);

    // The same bytes as a TCP/TLS stream: cut frames until more input is needed.
    let mut rest = data;
    loop {
        match stream_frame(rest) {
            Ok(Frame::Incomplete) | Err(_) => break,
            Ok(Frame::KeepAlive { len, .. }) => {
                assert!(
                    len > 0 && len <= rest.len(),
                    "keep-alive of {len} in {}",
                    rest.len()
                );
                rest = &rest[len..];
            }
            Ok(Frame::Message { len }) => {
                assert!(
                    len > 0 && len <= rest.len(),
                    "frame of {len} in {}",
                    rest.len()
                );
                check_message(&rest[..len]);
                rest = &rest[len..];
            }
        }
    }
});
