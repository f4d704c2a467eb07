//! Parser throughput: `Message::parse` and parse + `to_bytes()` on what a carrier mostly sees
//! from Asterisk/FreePBX (chan_pjsip): an INVITE with SDP, a REGISTER, a 200 OK.
//!
//! `cargo bench --bench parse`; criterion prints messages per second (elem/s).

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lifeline::sip::message::Message;

const INVITE: &str = "INVITE sip:+15551234567@trunk.example.net:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 203.0.113.10:5060;rport;branch=z9hG4bKPj6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b\r\n\
From: \"Reception Desk\" <sip:1000@203.0.113.10>;tag=8f2b7c1e-3d4a-4b5c-9e6f-7a8b9c0d1e2f\r\n\
To: <sip:+15551234567@trunk.example.net>\r\n\
Contact: <sip:1000@203.0.113.10:5060>\r\n\
Call-ID: 5c8e2f1a-7b3d-4e6f-a9c0-1d2e3f4a5b6c\r\n\
CSeq: 29871 INVITE\r\n\
Allow: OPTIONS, REGISTER, SUBSCRIBE, NOTIFY, PUBLISH, INVITE, ACK, BYE, CANCEL, UPDATE, PRACK, MESSAGE, REFER\r\n\
Supported: 100rel, timer, replaces, norefersub, histinfo\r\n\
Session-Expires: 1800\r\n\
Min-SE: 90\r\n\
P-Asserted-Identity: \"Reception Desk\" <sip:+15559876543@203.0.113.10>\r\n\
Max-Forwards: 70\r\n\
User-Agent: FPBX-16.0.40(18.20.0)\r\n\
Content-Type: application/sdp\r\n\
Content-Length:   257\r\n\
\r\n\
v=0\r\n\
o=- 1735689600 1735689600 IN IP4 203.0.113.10\r\n\
s=Asterisk\r\n\
c=IN IP4 203.0.113.10\r\n\
t=0 0\r\n\
m=audio 17324 RTP/AVP 0 8 9 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:9 G722/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-16\r\n\
a=sendrecv\r\n";

const REGISTER: &str = "REGISTER sip:trunk.example.net SIP/2.0\r\n\
Via: SIP/2.0/UDP 203.0.113.10:5060;rport;branch=z9hG4bKPj0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d\r\n\
From: <sip:pbx-0042@trunk.example.net>;tag=1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9\r\n\
To: <sip:pbx-0042@trunk.example.net>\r\n\
Call-ID: 9d8c7b6a-5f4e-4d3c-b2a1-0f9e8d7c6b5a\r\n\
CSeq: 4123 REGISTER\r\n\
Contact: <sip:pbx-0042@203.0.113.10:5060;line=xk7q2>\r\n\
Expires: 3600\r\n\
Allow: OPTIONS, REGISTER, SUBSCRIBE, NOTIFY, PUBLISH, INVITE, ACK, BYE, CANCEL, UPDATE, PRACK, MESSAGE, REFER\r\n\
Max-Forwards: 70\r\n\
User-Agent: FPBX-16.0.40(18.20.0)\r\n\
Content-Length:  0\r\n\
\r\n";

const OK_200: &str = "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK7a3f9c21e4.1;received=198.51.100.7, SIP/2.0/UDP 203.0.113.10:5060;rport=5060;received=203.0.113.10;branch=z9hG4bKPj6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b\r\n\
Record-Route: <sip:198.51.100.7;lr>\r\n\
From: \"Reception Desk\" <sip:1000@203.0.113.10>;tag=8f2b7c1e-3d4a-4b5c-9e6f-7a8b9c0d1e2f\r\n\
To: <sip:+15551234567@trunk.example.net>;tag=as4c1f0e2d\r\n\
Call-ID: 5c8e2f1a-7b3d-4e6f-a9c0-1d2e3f4a5b6c\r\n\
CSeq: 29871 INVITE\r\n\
Contact: <sip:+15551234567@192.0.2.55:5060>\r\n\
Server: Carrier SBC 4.2\r\n\
Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY\r\n\
Supported: replaces, timer\r\n\
Content-Length: 0\r\n\
\r\n";

fn bench_parse(c: &mut Criterion) {
    let messages = [
        ("invite", INVITE),
        ("register", REGISTER),
        ("200_ok", OK_200),
    ];
    for (name, text) in messages {
        let bytes = Bytes::from_static(text.as_bytes());
        // The samples are what they claim to be: they parse and serialize back unchanged.
        let m = Message::parse(bytes.clone()).expect("sample parses");
        assert_eq!(m.to_bytes(), bytes, "{name} serializes back unchanged");

        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(1));
        group.bench_function("parse", |b| {
            b.iter(|| Message::parse(black_box(bytes.clone())).unwrap())
        });
        group.bench_function("parse+to_bytes", |b| {
            b.iter(|| Message::parse(black_box(bytes.clone())).unwrap().to_bytes())
        });
        group.finish();
    }
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
