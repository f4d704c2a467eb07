//! `Uri::parse`, `NameAddr::parse` and `Via::parse` on arbitrary UTF-8. What parses must
//! print (as this element writes it when it edits a header) to text that parses back equal.
#![no_main]

use bytestring::ByteString;
use libfuzzer_sys::fuzz_target;
use lifeline::sip::message::Via;
use lifeline::sip::uri::{NameAddr, Uri};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let text = ByteString::from(s);
    if let Ok(u) = Uri::parse(&text) {
        let printed = u.to_string();
        let again = Uri::parse(&ByteString::from(printed.as_str()))
            .unwrap_or_else(|e| panic!("Uri {s:?} prints as {printed:?}, which fails: {e}"));
        assert_eq!(u, again, "Uri {s:?} prints as {printed:?}");
        if let Some(sip) = u.as_sip() {
            let _ = sip.user_unescaped();
            let _ = sip.transport();
        }
    }
    if let Ok(n) = NameAddr::parse(&text) {
        let printed = n.to_string();
        let again = NameAddr::parse(&ByteString::from(printed.as_str()))
            .unwrap_or_else(|e| panic!("NameAddr {s:?} prints as {printed:?}, which fails: {e}"));
        assert_eq!(n, again, "NameAddr {s:?} prints as {printed:?}");
        let _ = n.tag();
    }
    if let Ok(v) = Via::parse(&text) {
        let printed = v.to_string();
        let again = Via::parse(&ByteString::from(printed.as_str()))
            .unwrap_or_else(|e| panic!("Via {s:?} prints as {printed:?}, which fails: {e}"));
        assert_eq!(v, again, "Via {s:?} prints as {printed:?}");
        let _ = (v.branch(), v.rfc3261_branch(), v.received(), v.rport());
        let _ = v.response_host_port(5060);
    }
});
