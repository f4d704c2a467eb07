//! The RFC 4475 torture corpus at the parser level: each message's verdict (parses, or is
//! rejected with which status) matches the corpus README's row.

use std::path::PathBuf;

use bytes::Bytes;
use lifeline::sip::message::Message;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata/rfc4475")
}

/// `None`: parses. `Some(status)`: rejected; 0 when no answer can be formed (responses).
const EXPECTED: &[(&str, Option<u16>)] = &[
    ("wsinv", None),
    ("intmeth", None),
    ("esc01", None),
    ("escnull", None),
    ("esc02", None),
    ("lwsdisp", None),
    ("longreq", None),
    ("dblreq", None),
    ("semiuri", None),
    ("transports", None),
    ("mpart01", None),
    ("unreason", None),
    ("noreason", None),
    ("badinv01", Some(400)),
    ("clerr", Some(400)),
    ("ncl", Some(400)),
    ("scalar02", Some(400)),
    ("scalarlg", Some(0)),
    ("quotbal", Some(400)),
    ("ltgtruri", Some(400)),
    ("lwsruri", Some(400)),
    ("lwsstart", Some(400)),
    ("trws", Some(400)),
    ("escruri", Some(400)),
    ("baddate", None),
    // Contact is the registrar's to judge (400 there); the message itself parses.
    ("regbadct", None),
    ("badaspec", Some(400)),
    ("baddn", Some(400)),
    ("badvers", Some(505)),
    ("mismatch01", Some(400)),
    ("mismatch02", Some(501)),
    ("bigcode", Some(0)),
    ("badbranch", None),
    ("insuf", Some(400)),
    ("unkscm", None),
    ("novelsc", None),
    ("unksm2", None),
    ("bext01", None),
    ("invut", None),
    ("regaut01", None),
    ("multi01", Some(400)),
    ("mcl01", Some(400)),
    ("bcast", None),
    ("zeromf", None),
    ("cparam01", None),
    ("cparam02", None),
    ("regescrt", None),
    ("sdp01", None),
    ("inv2543", None),
];

#[test]
fn every_file_is_in_the_table() {
    let mut files: Vec<String> = std::fs::read_dir(corpus())
        .expect("the corpus is at ../shared/testdata/rfc4475")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".dat").map(str::to_string)
        })
        .collect();
    files.sort();
    let mut table: Vec<String> = EXPECTED.iter().map(|(f, _)| f.to_string()).collect();
    table.sort();
    assert_eq!(files, table);
    assert_eq!(files.len(), 49);
}

#[test]
fn parser_verdicts_match_the_readme() {
    let mut wrong = Vec::new();
    for (file, expected) in EXPECTED {
        let bytes = std::fs::read(corpus().join(format!("{file}.dat"))).unwrap();
        let got = match Message::parse(Bytes::from(bytes)) {
            Ok(_) => None,
            Err(e) if e.request.is_some() => Some(e.status),
            Err(_) => Some(0),
        };
        if got != *expected {
            wrong.push(format!("{file}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn valid_messages_keep_their_details() {
    let parse = |f: &str| {
        Message::parse(Bytes::from(
            std::fs::read(corpus().join(format!("{f}.dat"))).unwrap(),
        ))
        .unwrap()
    };
    let wsinv = parse("wsinv");
    assert_eq!(wsinv.max_forwards(), Some(68));
    assert_eq!(wsinv.cseq().seq, 9);
    assert_eq!(wsinv.vias().len(), 3);
    assert_eq!(wsinv.top_via().branch(), Some("390skdjuw"));
    assert_eq!(wsinv.branch(), None, "no magic cookie: RFC 2543 matching");
    let unusual = wsinv
        .headers()
        .iter()
        .find(|h| h.name.as_str() == "UnknownHeaderWithUnusualValue")
        .unwrap();
    assert_eq!(unusual.value(), b";;,,;;,;");
    assert_eq!(wsinv.body().len(), 150);

    let longreq = parse("longreq");
    assert_eq!(longreq.vias().len(), 34);

    let esc02 = parse("esc02");
    assert_eq!(esc02.method().as_str(), "RE%47IST%45R");
    assert_eq!(
        esc02
            .name_addrs(&lifeline::sip::message::HeaderName::Contact)
            .unwrap()
            .len(),
        2
    );

    let escnull = parse("escnull");
    let lifeline::sip::uri::Uri::Sip(to) = &escnull.to().uri else {
        panic!()
    };
    assert_eq!(to.user_unescaped().unwrap(), b"null-\0-null");

    let mpart = parse("mpart01");
    assert_eq!(mpart.body().len(), 553);

    let dblreq = parse("dblreq");
    assert!(dblreq.body().is_empty(), "trailing octets are not a body");

    let inv2543 = parse("inv2543");
    assert_eq!(inv2543.body().len(), 105);
    assert_eq!(inv2543.max_forwards(), None);
}
