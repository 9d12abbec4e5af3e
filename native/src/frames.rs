//! The wire format of protocol version 1: frames with a fixed 10-byte header.
//!
//! ```text
//!  0      1      2             6             10
//!  +------+------+-------------+-------------+---------------------+
//!  | type | flags| stream id   | length      | payload (length B)  |
//!  +------+------+-------------+-------------+---------------------+
//!    u8     u8     u32 big-end.  u32 big-end.
//! ```
//!
//! Stream 0 carries the session's control frames; every other stream id is
//! one public connection. Flags are reserved and must be zero. This module is
//! sans-I/O and mirrors `burrow/protocol/frames.py`, the reference model: the
//! same bytes give the same frames, and the same error with the same message
//! (a differential test in `tests/protocol/test_native_frames.py` holds them
//! to it). Nothing a peer sends can make it panic or buffer more than one frame.

use std::fmt;

use thiserror::Error;

/// Bytes in a frame header.
pub const HEADER_SIZE: usize = 10;

/// Largest DATA payload: 256 KiB, the largest read the runtime hands over at once.
pub const MAX_FRAME_PAYLOAD: u32 = 256 * 1024;

/// The smallest maximum a side may announce: below it, headers would dominate.
pub const MIN_FRAME_PAYLOAD: u32 = 512;

/// Control payloads are tiny JSON objects; anything bigger is an attack or a bug.
pub const MAX_CONTROL_PAYLOAD: u32 = 16 * 1024;

/// Every frame type of protocol version 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// agent -> relay: versions, token, window (JSON)
    Hello = 1,
    /// relay -> agent: version, session id, window (JSON)
    Welcome = 2,
    /// agent -> relay: open a tunnel (JSON)
    Bind = 3,
    /// relay -> agent: the tunnel is open, its addresses (JSON)
    Bound = 4,
    /// relay -> agent: the tunnel could not be opened (JSON)
    BindFailed = 5,
    /// agent -> relay: close a tunnel (JSON)
    Unbind = 6,
    /// relay -> agent: the tunnel is closed (JSON)
    Unbound = 7,
    /// either way: u64 opaque
    Ping = 8,
    /// either way: the PING's u64
    Pong = 9,
    /// either way: u16 code + UTF-8 reason; the session ends
    GoAway = 10,
    /// relay -> agent: a public connection arrived (JSON), on a new stream
    Open = 16,
    /// either way: bytes
    Data = 17,
    /// either way: u32 credit increment
    Window = 18,
    /// either way: no more DATA from the sender (half-close)
    Fin = 19,
    /// either way: u16 code + UTF-8 reason; the stream is gone
    Rst = 20,
}

impl FrameType {
    /// The type for a wire byte, if protocol version 1 has one.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Bind,
            4 => Self::Bound,
            5 => Self::BindFailed,
            6 => Self::Unbind,
            7 => Self::Unbound,
            8 => Self::Ping,
            9 => Self::Pong,
            10 => Self::GoAway,
            16 => Self::Open,
            17 => Self::Data,
            18 => Self::Window,
            19 => Self::Fin,
            20 => Self::Rst,
            _ => return None,
        })
    }

    /// Control frames travel on stream 0; all others on a stream of their own.
    pub fn is_control(self) -> bool {
        (self as u8) <= Self::GoAway as u8
    }

    /// The name the Python model uses (`FrameType.name`), for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "HELLO",
            Self::Welcome => "WELCOME",
            Self::Bind => "BIND",
            Self::Bound => "BOUND",
            Self::BindFailed => "BIND_FAILED",
            Self::Unbind => "UNBIND",
            Self::Unbound => "UNBOUND",
            Self::Ping => "PING",
            Self::Pong => "PONG",
            Self::GoAway => "GOAWAY",
            Self::Open => "OPEN",
            Self::Data => "DATA",
            Self::Window => "WINDOW",
            Self::Fin => "FIN",
            Self::Rst => "RST",
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Codes carried by GOAWAY (session) and RST (stream) frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// a malformed or out-of-order frame
    ProtocolError = 1,
    /// a frame longer than the receiver accepts
    FrameTooLarge = 2,
}

/// A frame the peer should not have sent: the session ends with its code.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// a type byte protocol version 1 does not know
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// reserved flag bits set
    #[error("{kind} frame with flags {flags:#x}")]
    Flags { kind: FrameType, flags: u8 },
    /// a control frame off stream 0, or a stream frame on it
    #[error("{kind} frame on the wrong stream ({stream_id})")]
    WrongStream { kind: FrameType, stream_id: u32 },
    /// a length over the limit for its kind
    #[error("{kind} frame of {length} bytes exceeds {limit}")]
    TooLarge {
        kind: FrameType,
        length: u32,
        limit: u32,
    },
}

impl FrameError {
    /// The code the session's GOAWAY carries for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::ProtocolError,
        }
    }
}

/// A checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameType,
    pub stream_id: u32,
    pub length: u32,
}

/// Read and check the header at the start of `bytes`; `Ok(None)` until all 10 bytes are there.
///
/// A bad header is an error as soon as the header is whole, before its payload arrives.
pub fn parse_header(bytes: &[u8], max_payload: u32) -> Result<Option<Header>, FrameError> {
    let Some(head) = bytes.get(..HEADER_SIZE) else {
        return Ok(None);
    };
    let kind = FrameType::from_u8(head[0]).ok_or(FrameError::UnknownType(head[0]))?;
    let flags = head[1];
    if flags != 0 {
        return Err(FrameError::Flags { kind, flags });
    }
    let stream_id = u32::from_be_bytes([head[2], head[3], head[4], head[5]]);
    if kind.is_control() != (stream_id == 0) {
        return Err(FrameError::WrongStream { kind, stream_id });
    }
    let length = u32::from_be_bytes([head[6], head[7], head[8], head[9]]);
    let limit = if kind.is_control() {
        MAX_CONTROL_PAYLOAD
    } else {
        max_payload
    };
    if length > limit {
        return Err(FrameError::TooLarge {
            kind,
            length,
            limit,
        });
    }
    Ok(Some(Header {
        kind,
        stream_id,
        length,
    }))
}

/// One decoded frame; its payload borrows the bytes it was parsed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: FrameType,
    pub stream_id: u32,
    pub payload: &'a [u8],
}

/// Append the whole frames at the start of `bytes` to `frames`; return how many bytes they took.
///
/// What follows the last whole frame is left for the caller to present
/// again with the rest of it. On an error, `frames` holds the frames before
/// the bad one.
pub fn parse<'a>(
    bytes: &'a [u8],
    max_payload: u32,
    frames: &mut Vec<Frame<'a>>,
) -> Result<usize, FrameError> {
    let mut offset = 0;
    while let Some(header) = parse_header(&bytes[offset..], max_payload)? {
        let start = offset + HEADER_SIZE;
        // (u32 to usize cannot truncate on the 32- and 64-bit targets we build for)
        let end = start + header.length as usize;
        let Some(payload) = bytes.get(start..end) else {
            break;
        };
        frames.push(Frame {
            kind: header.kind,
            stream_id: header.stream_id,
            payload,
        });
        offset = end;
    }
    Ok(offset)
}

/// A payload too long for the u32 length field (a bug of ours, never a peer's doing).
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("a frame payload of {0} bytes does not fit the 32-bit length field")]
pub struct PayloadTooLong(pub usize);

/// Append one frame's bytes to `out`.
pub fn encode(
    kind: FrameType,
    stream_id: u32,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), PayloadTooLong> {
    let length = u32::try_from(payload.len()).map_err(|_| PayloadTooLong(payload.len()))?;
    out.reserve(HEADER_SIZE + payload.len());
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// A frame that owns its payload (what [`Decoder::feed`] returns).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedFrame {
    pub kind: FrameType,
    pub stream_id: u32,
    pub payload: Vec<u8>,
}

impl From<Frame<'_>> for OwnedFrame {
    fn from(frame: Frame<'_>) -> Self {
        Self {
            kind: frame.kind,
            stream_id: frame.stream_id,
            payload: frame.payload.to_vec(),
        }
    }
}

/// Turns a byte stream cut anywhere into frames; keeps at most one unfinished frame.
#[derive(Debug)]
pub struct Decoder {
    max_payload: u32,
    waiting: Vec<u8>,
}

impl Decoder {
    /// A decoder accepting DATA payloads up to `max_payload` bytes.
    pub fn new(max_payload: u32) -> Self {
        Self {
            max_payload,
            waiting: Vec::new(),
        }
    }

    /// Add `data`; append every frame it completes to `frames`, in order.
    ///
    /// On an error, `frames` holds the frames before the bad one, and the
    /// decoder should not be fed again (the session is over).
    pub fn feed(&mut self, data: &[u8], frames: &mut Vec<OwnedFrame>) -> Result<(), FrameError> {
        self.waiting.extend_from_slice(data);
        let mut parsed = Vec::new();
        let result = parse(&self.waiting, self.max_payload, &mut parsed);
        frames.extend(parsed.into_iter().map(OwnedFrame::from));
        let used = result?;
        self.waiting.drain(..used);
        Ok(())
    }

    /// Bytes waiting for the rest of their frame.
    pub fn buffered(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn raw(kind: u8, flags: u8, stream_id: u32, length: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![kind, flags];
        out.extend_from_slice(&stream_id.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_frame_round_trips() {
        let mut wire = Vec::new();
        encode(FrameType::Data, 7, b"hello", &mut wire).expect("short payload");
        assert_eq!(wire, raw(17, 0, 7, 5, b"hello"));
        let mut frames = Vec::new();
        assert_eq!(parse(&wire, MAX_FRAME_PAYLOAD, &mut frames), Ok(15));
        assert_eq!(
            frames,
            vec![Frame {
                kind: FrameType::Data,
                stream_id: 7,
                payload: b"hello"
            }]
        );
    }

    #[test]
    fn an_unfinished_frame_waits() {
        let wire = raw(17, 0, 1, 4, b"ab");
        let mut frames = Vec::new();
        assert_eq!(parse(&wire, MAX_FRAME_PAYLOAD, &mut frames), Ok(0));
        assert!(frames.is_empty());
        assert_eq!(parse(&wire[..9], MAX_FRAME_PAYLOAD, &mut frames), Ok(0));
    }

    #[test]
    fn each_bad_header_has_its_message_and_code() {
        let cases: [(Vec<u8>, &str, ErrorCode); 6] = [
            (
                raw(0, 0, 1, 0, b""),
                "unknown frame type 0",
                ErrorCode::ProtocolError,
            ),
            (
                raw(17, 4, 1, 0, b""),
                "DATA frame with flags 0x4",
                ErrorCode::ProtocolError,
            ),
            (
                raw(8, 0, 3, 8, b""),
                "PING frame on the wrong stream (3)",
                ErrorCode::ProtocolError,
            ),
            (
                raw(17, 0, 0, 1, b""),
                "DATA frame on the wrong stream (0)",
                ErrorCode::ProtocolError,
            ),
            (
                raw(1, 0, 0, MAX_CONTROL_PAYLOAD + 1, b""),
                "HELLO frame of 16385 bytes exceeds 16384",
                ErrorCode::FrameTooLarge,
            ),
            (
                raw(17, 0, 1, 101, b""),
                "DATA frame of 101 bytes exceeds 100",
                ErrorCode::FrameTooLarge,
            ),
        ];
        for (wire, message, code) in cases {
            let error = parse(&wire, 100, &mut Vec::new()).unwrap_err();
            assert_eq!(error.to_string(), message);
            assert_eq!(error.code(), code);
        }
    }

    #[test]
    fn frames_before_a_bad_one_are_kept() {
        let mut wire = raw(8, 0, 0, 8, &[0; 8]);
        wire.extend(raw(17, 0, 3, 3, b"abc"));
        wire.extend(raw(200, 0, 0, 0, b""));
        let mut frames = Vec::new();
        assert!(parse(&wire, MAX_FRAME_PAYLOAD, &mut frames).is_err());
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1].payload, b"abc");
    }

    fn frame_strategy() -> impl Strategy<Value = (FrameType, u32, Vec<u8>)> {
        let stream = (
            prop::sample::select(vec![
                FrameType::Open,
                FrameType::Data,
                FrameType::Window,
                FrameType::Fin,
                FrameType::Rst,
            ]),
            1u32..,
            prop::collection::vec(any::<u8>(), 0..300),
        );
        let control = (
            prop::sample::select(vec![FrameType::Hello, FrameType::Ping, FrameType::GoAway]),
            Just(0u32),
            prop::collection::vec(any::<u8>(), 0..300),
        );
        prop_oneof![stream, control]
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic_and_cuts_change_nothing(
            data in prop::collection::vec(any::<u8>(), 0..2000),
            cuts in prop::collection::vec(0usize..2000, 0..8),
        ) {
            let mut whole = Vec::new();
            let expected = parse(&data, 1000, &mut whole);
            let mut decoder = Decoder::new(1000);
            let mut got = Vec::new();
            let mut error = None;
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            points.sort_unstable();
            let mut start = 0;
            for end in points.into_iter().chain([data.len()]) {
                if let Err(e) = decoder.feed(&data[start..end], &mut got) {
                    error = Some(e);
                    break;
                }
                start = end;
            }
            let whole: Vec<OwnedFrame> = whole.into_iter().map(OwnedFrame::from).collect();
            prop_assert_eq!(got, whole);
            prop_assert_eq!(error, expected.clone().err());
            if let Ok(used) = expected {
                prop_assert_eq!(decoder.buffered(), data.len() - used);
                prop_assert!(decoder.buffered() < HEADER_SIZE + 1000);
            }
        }

        #[test]
        fn encoded_frames_decode_to_themselves(frames in prop::collection::vec(frame_strategy(), 0..20)) {
            let mut wire = Vec::new();
            for (kind, stream_id, payload) in &frames {
                encode(*kind, *stream_id, payload, &mut wire).expect("short payload");
            }
            let mut decoded = Vec::new();
            prop_assert_eq!(parse(&wire, MAX_FRAME_PAYLOAD, &mut decoded), Ok(wire.len()));
            let decoded: Vec<(FrameType, u32, Vec<u8>)> =
                decoded.into_iter().map(|f| (f.kind, f.stream_id, f.payload.to_vec())).collect();
            prop_assert_eq!(decoded, frames);
        }
    }
}
