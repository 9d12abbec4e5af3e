//! Peeking at a TLS ClientHello: the server name (SNI) and the ALPN list, before any TLS work.
//!
//! The relay routes every connection on its one TLS port by the name the
//! client asks for (the agent endpoint, a tunnel, or nothing: refused before a
//! certificate is sent) and tells agents from browsers by ALPN. The peeker
//! reads only what a client sent first, never allocates more than the
//! ClientHello it was given, and gives one of three answers: the hello's
//! fields, "send more bytes", or "this is not a TLS ClientHello". Nothing a
//! client sends can make it panic (property tests feed it anything).

use thiserror::Error;

/// TLS record header: type u8, version u16, length u16.
const RECORD_HEADER: usize = 5;
/// Handshake message header: type u8, length u24.
const HANDSHAKE_HEADER: usize = 4;
const CONTENT_HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_ALPN: u16 = 16;
const NAME_TYPE_HOST: u8 = 0;
/// A record's plaintext is at most 2^14 bytes (RFC 8446 5.1).
const MAX_RECORD: usize = 1 << 14;
/// A ClientHello longer than this is refused: real ones (post-quantum key shares
/// included) stay well below, and the peeker must bound what it waits for.
pub const MAX_CLIENT_HELLO: usize = 1 << 15;
/// A DNS name.
const MAX_HOST_NAME: usize = 253;

/// What a ClientHello asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The host_name of the SNI extension, lower-cased, without a trailing dot.
    pub server_name: Option<String>,
    /// The ALPN protocol names, in the client's order.
    pub alpn: Vec<Vec<u8>>,
}

/// The peeker's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peek {
    /// The ClientHello is whole: its fields.
    Hello(ClientHello),
    /// Not enough bytes yet for the whole ClientHello.
    NeedMore,
}

/// Why bytes are not a ClientHello this relay will read.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum NotClientHello {
    #[error("not a TLS handshake record")]
    NotHandshake,
    #[error("the first handshake message is not a ClientHello")]
    NotClientHello,
    #[error("a ClientHello of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("a malformed ClientHello ({0})")]
    Malformed(&'static str),
}

/// Look at the first bytes a client sent (see the module docs).
pub fn peek(bytes: &[u8]) -> Result<Peek, NotClientHello> {
    // the handshake message may span records: join their payloads, bounded
    let mut message = Vec::new();
    let mut offset = 0;
    loop {
        let Some(header) = bytes.get(offset..offset + RECORD_HEADER) else {
            return Ok(Peek::NeedMore);
        };
        if header[0] != CONTENT_HANDSHAKE || header[1] != 3 {
            return Err(NotClientHello::NotHandshake);
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length == 0 || length > MAX_RECORD {
            return Err(NotClientHello::Malformed("record length"));
        }
        let start = offset + RECORD_HEADER;
        let Some(payload) = bytes.get(start..start + length) else {
            message.extend_from_slice(&bytes[start..]);
            return check_start(&message).map(|()| Peek::NeedMore);
        };
        message.extend_from_slice(payload);
        offset = start + length;
        check_start(&message)?;
        if let Some(body_length) = body_length(&message) {
            if message.len() >= HANDSHAKE_HEADER + body_length {
                let body = &message[HANDSHAKE_HEADER..HANDSHAKE_HEADER + body_length];
                return parse_body(body).map(Peek::Hello);
            }
        }
    }
}

/// The handshake message so far starts like a ClientHello of an acceptable length.
fn check_start(message: &[u8]) -> Result<(), NotClientHello> {
    if let Some(&kind) = message.first() {
        if kind != CLIENT_HELLO {
            return Err(NotClientHello::NotClientHello);
        }
    }
    match body_length(message) {
        Some(length) if length > MAX_CLIENT_HELLO => Err(NotClientHello::TooLong(length)),
        _ => Ok(()),
    }
}

fn body_length(message: &[u8]) -> Option<usize> {
    let head = message.get(..HANDSHAKE_HEADER)?;
    Some(usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]))
}

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize, what: &'static str) -> Result<&'a [u8], NotClientHello> {
        if count > self.bytes.len() {
            return Err(NotClientHello::Malformed(what));
        }
        let (head, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, NotClientHello> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, NotClientHello> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a u8 length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], NotClientHello> {
        let length = usize::from(self.u8(what)?);
        self.take(length, what)
    }

    /// A vector with a u16 length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], NotClientHello> {
        let length = usize::from(self.u16(what)?);
        self.take(length, what)
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, NotClientHello> {
    let mut r = Reader { bytes: body };
    r.take(2 + 32, "version and random")?;
    r.vec8("session id")?;
    r.vec16("cipher suites")?;
    r.vec8("compression methods")?;
    let mut hello = ClientHello::default();
    if r.is_empty() {
        return Ok(hello); // (no extensions at all: allowed before TLS 1.3)
    }
    let mut extensions = Reader {
        bytes: r.vec16("extensions")?,
    };
    while !extensions.is_empty() {
        let kind = extensions.u16("extension type")?;
        let data = extensions.vec16("extension data")?;
        match kind {
            EXTENSION_SERVER_NAME => hello.server_name = server_name(data)?,
            EXTENSION_ALPN => hello.alpn = alpn(data)?,
            _ => {}
        }
    }
    Ok(hello)
}

fn server_name(data: &[u8]) -> Result<Option<String>, NotClientHello> {
    let mut list = Reader {
        bytes: Reader { bytes: data }.vec16("server name list")?,
    };
    while !list.is_empty() {
        let kind = list.u8("server name type")?;
        let name = list.vec16("server name")?;
        if kind != NAME_TYPE_HOST {
            continue;
        }
        let valid = !name.is_empty()
            && name.len() <= MAX_HOST_NAME + 1
            && name
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_');
        if !valid {
            return Err(NotClientHello::Malformed("server name"));
        }
        let host = String::from_utf8_lossy(name).to_ascii_lowercase();
        return Ok(Some(host.trim_end_matches('.').to_owned()));
    }
    Ok(None)
}

fn alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, NotClientHello> {
    let mut list = Reader {
        bytes: Reader { bytes: data }.vec16("ALPN list")?,
    };
    let mut names = Vec::new();
    while !list.is_empty() {
        let name = list.vec8("ALPN name")?;
        if name.is_empty() {
            return Err(NotClientHello::Malformed("empty ALPN name"));
        }
        names.push(name.to_vec());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal, well-formed ClientHello record with the given extensions.
    fn hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend(kind.to_be_bytes());
            ext.extend((data.len() as u16).to_be_bytes());
            ext.extend(data);
        }
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut message = vec![CLIENT_HELLO];
        message.extend(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend(body);
        let mut record = vec![CONTENT_HANDSHAKE, 3, 1];
        record.extend((message.len() as u16).to_be_bytes());
        record.extend(message);
        record
    }

    fn sni(name: &[u8]) -> (u16, Vec<u8>) {
        let mut entry = vec![NAME_TYPE_HOST];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name);
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend(entry);
        (EXTENSION_SERVER_NAME, data)
    }

    fn alpn_ext(names: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for name in names {
            list.push(name.len() as u8);
            list.extend(*name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend(list);
        (EXTENSION_ALPN, data)
    }

    #[test]
    fn reads_the_name_and_alpn() {
        let wire = hello(&[sni(b"AbC.Localhost."), alpn_ext(&[b"burrow/1", b"h2"])]);
        let expected = ClientHello {
            server_name: Some("abc.localhost".into()),
            alpn: vec![b"burrow/1".to_vec(), b"h2".to_vec()],
        };
        assert_eq!(peek(&wire), Ok(Peek::Hello(expected)));
    }

    #[test]
    fn every_prefix_asks_for_more() {
        let wire = hello(&[sni(b"x.localhost")]);
        for end in 0..wire.len() {
            assert_eq!(
                peek(&wire[..end]),
                Ok(Peek::NeedMore),
                "prefix of {end} bytes"
            );
        }
    }

    #[test]
    fn a_hello_split_over_two_records_is_joined() {
        let wire = hello(&[sni(b"split.localhost")]);
        let message = &wire[RECORD_HEADER..];
        let (first, second) = message.split_at(20);
        let mut split = Vec::new();
        for part in [first, second] {
            split.extend([CONTENT_HANDSHAKE, 3, 3]);
            split.extend((part.len() as u16).to_be_bytes());
            split.extend(part);
        }
        assert_eq!(peek(&split), peek(&wire));
        assert!(
            matches!(peek(&split), Ok(Peek::Hello(h)) if h.server_name.as_deref() == Some("split.localhost"))
        );
    }

    #[test]
    fn other_protocols_are_refused_at_once() {
        assert_eq!(
            peek(b"GET / HTTP/1.1\r\n"),
            Err(NotClientHello::NotHandshake)
        );
        assert_eq!(peek(b"SSH-2.0-OpenSSH"), Err(NotClientHello::NotHandshake));
        let mut not_hello = hello(&[]);
        not_hello[RECORD_HEADER] = 2; // a ServerHello
        assert_eq!(peek(&not_hello), Err(NotClientHello::NotClientHello));
    }

    #[test]
    fn a_huge_announced_hello_is_refused_before_it_arrives() {
        let wire = [
            CONTENT_HANDSHAKE,
            3,
            1,
            0,
            4,
            CLIENT_HELLO,
            0xff,
            0xff,
            0xff,
        ];
        assert_eq!(peek(&wire), Err(NotClientHello::TooLong(0xff_ffff)));
    }

    #[test]
    fn a_bad_name_is_malformed() {
        let wire = hello(&[sni(b"a b\x00")]);
        assert_eq!(peek(&wire), Err(NotClientHello::Malformed("server name")));
    }

    proptest! {
        #[test]
        fn any_bytes_give_an_answer_not_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = peek(&bytes);
        }

        #[test]
        fn a_corrupted_hello_gives_an_answer_not_a_panic(at in 0usize..120, value: u8) {
            let mut wire = hello(&[sni(b"t.localhost"), alpn_ext(&[b"h2"])]);
            let at = at % wire.len();
            wire[at] = value;
            let _ = peek(&wire);
        }
    }
}
