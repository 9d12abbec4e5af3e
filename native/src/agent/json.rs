//! The one JSON the agent's data plane reads itself: OPEN's flat object (`{"tunnel": "...",
//! "peer": "..."}`). Everything else a relay says in JSON goes up to Python. A relay is a
//! peer like any other: whatever it sends, this returns an answer or `None`, never panics.

/// The string value of `key` in a flat JSON object (`None` if absent, not a string, or the
/// text is not such an object). Values of other keys may be strings, numbers, booleans or null.
pub fn string_field(text: &[u8], key: &str) -> Option<String> {
    let mut parser = Parser { text, at: 0 };
    parser.space();
    parser.eat(b'{')?;
    parser.space();
    let mut found = None;
    if parser.peek() == Some(b'}') {
        return None;
    }
    loop {
        parser.space();
        let name = parser.string()?;
        parser.space();
        parser.eat(b':')?;
        parser.space();
        if parser.peek() == Some(b'"') {
            let value = parser.string()?;
            if name == key && found.is_none() {
                found = Some(value);
            }
        } else {
            parser.scalar()?;
        }
        parser.space();
        match parser.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    parser.space();
    if parser.at != text.len() {
        return None;
    }
    found
}

struct Parser<'a> {
    text: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.at += 1;
        Some(byte)
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    fn space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// A number, true, false or null (checked loosely: only its characters).
    fn scalar(&mut self) -> Option<()> {
        let start = self.at;
        while matches!(
            self.peek(),
            Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E' | b'a'..=b'z')
        ) {
            self.at += 1;
        }
        let word = &self.text[start..self.at];
        let number = word
            .first()
            .is_some_and(|b| b.is_ascii_digit() || *b == b'-');
        (number || matches!(word, b"true" | b"false" | b"null")).then_some(())
    }

    fn string(&mut self) -> Option<String> {
        self.eat(b'"')?;
        let mut out: Vec<u8> = Vec::new();
        loop {
            match self.next()? {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    let escaped = match self.next()? {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let digits = self.text.get(self.at..self.at + 4)?;
                            self.at += 4;
                            let code =
                                u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()?;
                            char::from_u32(code).unwrap_or('\u{fffd}')
                        }
                        _ => return None,
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(escaped.encode_utf8(&mut buf).as_bytes());
                }
                byte if byte < 0x20 => return None,
                byte => out.push(byte),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::string_field;
    use proptest::prelude::*;

    #[test]
    fn reads_what_the_relays_write() {
        let open = br#"{"tunnel": "k3x9-ab", "peer": "127.0.0.1:5555"}"#;
        assert_eq!(string_field(open, "tunnel").as_deref(), Some("k3x9-ab"));
        assert_eq!(
            string_field(open, "peer").as_deref(),
            Some("127.0.0.1:5555")
        );
        assert_eq!(
            string_field(br#"{"tunnel":"a\"b\u0041"}"#, "tunnel").as_deref(),
            Some("a\"bA")
        );
        assert_eq!(
            string_field(
                br#"{"n": 12, "ok": true, "tunnel": "t", "x": null}"#,
                "tunnel"
            )
            .as_deref(),
            Some("t")
        );
    }

    #[test]
    fn refuses_what_is_not_a_flat_object() {
        for bad in [
            &b""[..],
            b"[]",
            b"{}",
            br#"{"tunnel": 5}"#,
            br#"{"tunnel": "t""#,
            br#"{"tunnel": "t"} x"#,
            br#"{"tunnel": {"a": "b"}}"#,
            br#"{"tunnel": "\q"}"#,
            b"{\"tunnel\": \"a\nb\"}",
        ] {
            assert_eq!(
                string_field(bad, "tunnel"),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest! {
        #[test]
        fn any_bytes_are_an_answer_or_none(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = string_field(&bytes, "tunnel");
        }
    }
}
