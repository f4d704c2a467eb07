//! Low-level SIP grammar helpers (RFC 3261 §25): character classes, linear white space,
//! quoted strings, comma-separated lists and `;name=value` parameters.
//!
//! Header values are scanned in place, folds included: inside a header value every CR or LF is
//! part of a fold (a line end that is not a fold ends the header), so they count as white space.

use bytestring::ByteString;

/// Why a piece of SIP text was refused.
pub type SyntaxError = &'static str;

/// White space inside a header value, folds included.
pub fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// `token` characters of RFC 3261 §25.1.
pub fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

/// Whether `s` is a non-empty token.
pub fn is_token_str(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token)
}

/// Trims white space (folds included) at both ends.
pub fn trim_lws(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_ascii() && is_lws(c as u8))
}

/// Index of the first byte at or after `i` that is not white space.
pub fn skip_lws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_lws(s[i]) {
        i += 1;
    }
    i
}

/// Given `s[start] == b'"'`, the index just past the closing quote.
pub fn quoted_end(s: &[u8], start: usize) -> Result<usize, SyntaxError> {
    let mut i = start + 1;
    while i < s.len() {
        match s[i] {
            b'\\' => i += 2,
            b'"' => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err("unterminated quoted string")
}

/// Splits a comma-separated header value into its elements, trimmed, ignoring commas inside
/// quoted strings and `<…>`. Empty elements are an error (`;;,,` in a Via).
pub fn split_commas(value: &ByteString) -> Result<Vec<ByteString>, SyntaxError> {
    let s = value.as_bytes();
    // Most values hold one element and no quoted string: then only `<` … `>` needs a look.
    if memchr::memchr2(b',', b'"', s).is_none() {
        if memchr::memrchr2(b'<', b'>', s).is_some_and(|i| s[i] == b'<') {
            return Err("unterminated <");
        }
        return Ok(vec![element(value, 0, s.len())?]);
    }
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    let mut in_angle = false;
    while i < s.len() {
        match s[i] {
            b'"' => {
                i = quoted_end(s, i)?;
                continue;
            }
            b'<' => in_angle = true,
            b'>' => in_angle = false,
            b',' if !in_angle => {
                out.push(element(value, start, i)?);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if in_angle {
        return Err("unterminated <");
    }
    out.push(element(value, start, s.len())?);
    Ok(out)
}

fn element(value: &ByteString, start: usize, end: usize) -> Result<ByteString, SyntaxError> {
    let t = trim_lws(&value[start..end]);
    if t.is_empty() {
        return Err("empty list element");
    }
    Ok(value.slice_ref(t))
}

/// One `;name[=value]` parameter. Names keep their case; look-ups ignore it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub name: ByteString,
    /// The value as written: quotes kept for a quoted string.
    pub value: Option<ByteString>,
}

/// An ordered parameter list, as on a Via, a URI or a name-addr.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(pub Vec<Param>);

impl Params {
    /// The parameter named `name` (case-insensitive): `Some(None)` when present without value.
    pub fn get(&self, name: &str) -> Option<Option<&str>> {
        self.0
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
            .map(|p| p.value.as_deref())
    }

    /// The value of `name`, if present with a value.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.get(name).flatten()
    }

    /// Whether `name` is present, with or without value.
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Sets `name` to `value`, replacing an existing one in place or appending.
    pub fn set(&mut self, name: &str, value: Option<&str>) {
        let value = value.map(ByteString::from);
        match self
            .0
            .iter_mut()
            .find(|p| p.name.eq_ignore_ascii_case(name))
        {
            Some(p) => p.value = value,
            None => self.0.push(Param {
                name: ByteString::from(name),
                value,
            }),
        }
    }

    /// Removes every parameter called `name`.
    pub fn remove(&mut self, name: &str) {
        self.0.retain(|p| !p.name.eq_ignore_ascii_case(name));
    }

    /// Writes the list as `;name=value…`.
    pub fn write_to(&self, out: &mut String) {
        for p in &self.0 {
            out.push(';');
            out.push_str(&p.name);
            if let Some(v) = &p.value {
                out.push('=');
                out.push_str(v);
            }
        }
    }
}

/// Parses `;a=b;c` (leading `;` included) from `text`, tolerating white space around `;` and
/// `=`. Returns the parameters and how many bytes were consumed; parsing stops at the first
/// byte in `stop` outside a quoted string.
pub fn parse_params(text: &ByteString, stop: &[u8]) -> Result<(Params, usize), SyntaxError> {
    let s = text.as_bytes();
    let mut params = Vec::new();
    let mut i = skip_lws(s, 0);
    while i < s.len() && !stop.contains(&s[i]) {
        if s[i] != b';' {
            return Err("expected ';' before a parameter");
        }
        i = skip_lws(s, i + 1);
        let name_start = i;
        while i < s.len() && is_param_char(s[i]) {
            i += 1;
        }
        if i == name_start {
            return Err("empty parameter");
        }
        let name = text.slice_ref(&text[name_start..i]);
        i = skip_lws(s, i);
        let mut value = None;
        if i < s.len() && s[i] == b'=' {
            i = skip_lws(s, i + 1);
            let v_start = i;
            if i < s.len() && s[i] == b'"' {
                i = quoted_end(s, i)?;
            } else {
                while i < s.len() && is_param_char(s[i]) {
                    i += 1;
                }
            }
            if i == v_start {
                return Err("empty parameter value");
            }
            value = Some(text.slice_ref(&text[v_start..i]));
            i = skip_lws(s, i);
        }
        params.push(Param { name, value });
    }
    Ok((Params(params), i))
}

/// Characters allowed in parameter names and unquoted values: tokens, plus the IPv6
/// reference and URI-parameter characters (`[`, `]`, `:`, `/`, `&`, `$`, `@`, `?`).
fn is_param_char(b: u8) -> bool {
    is_token(b) || matches!(b, b'[' | b']' | b':' | b'/' | b'&' | b'$' | b'@' | b'?')
}

/// Decodes `%XX` escapes once (RFC 3261 §19.1.2); invalid escapes are kept literally.
/// NULs survive as characters: the result is bytes, not a C string.
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_respect_quotes_and_angles() {
        let v = ByteString::from(r#""a, b" <sip:x@y;p=1,2>, <sip:z@w>"#);
        let parts = split_commas(&v).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(&parts[1][..], "<sip:z@w>");
        assert!(split_commas(&ByteString::from("a,,b")).is_err());
    }

    #[test]
    fn a_single_element_is_checked_as_a_list_would_be() {
        let one = |s: &str| split_commas(&ByteString::from(s));
        assert_eq!(
            one("  <sip:a@b;lr> ").unwrap(),
            vec![ByteString::from("<sip:a@b;lr>")]
        );
        assert_eq!(one("sip:a@b>").unwrap().len(), 1);
        for bad in ["<sip:a@b", "<a> <b", "", "   "] {
            assert!(one(bad).is_err(), "{bad:?}");
        }
        // The same with a second element: the list rules agree.
        assert!(split_commas(&ByteString::from("<sip:a@b, <c>")).is_ok());
        assert!(split_commas(&ByteString::from("<a>, <b")).is_err());
    }

    #[test]
    fn params_tolerate_lws() {
        let v = ByteString::from(" ;   tag    = 1918181833n ; lr");
        let (p, used) = parse_params(&v, b"").unwrap();
        assert_eq!(used, v.len());
        assert_eq!(p.value("TAG"), Some("1918181833n"));
        assert!(p.has("lr"));
        assert!(parse_params(&ByteString::from(";;"), b"").is_err());
    }

    #[test]
    fn unescape_once() {
        assert_eq!(unescape("n%61me=v%61lue%25%34%31"), b"name=value%41");
        assert_eq!(unescape("null-%00-null"), b"null-\0-null");
        assert_eq!(unescape("%Z%45"), b"%ZE");
        assert_eq!(unescape("100%"), b"100%");
    }
}
