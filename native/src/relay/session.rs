//! One agent's session at the relay: the multiplexed link, its streams and
//! their flow control, heartbeats and the HELLO deadline.
//!
//! Three parts run per session: the reader (frames from the agent, checked
//! against the state tables of `burrow/protocol/session.py`, the reference
//! model), the writer (everything queued for the agent, all frames ready at
//! once in one TLS write), and the timers. Public connections
//! ([`super::public`]) queue their frames on the session and get the agent's
//! frames for their stream through a channel that the stream's window bounds.
//!
//! Control frames (HELLO, BIND, UNBIND) go up to Python as they are; Python
//! answers with whole frames it encoded (WELCOME, BOUND, ...).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::events::{Event, INFO, WARNING};
use super::{borrow, lock, repay, Budget, PendingSlot, Shared, Tunnel};
use crate::frames::{self, FrameType, HEADER_SIZE};

/// Error codes of GOAWAY and RST (`ErrorCode` in `burrow/protocol/frames.py`).
pub mod code {
    pub const NO_ERROR: u16 = 0;
    pub const PROTOCOL_ERROR: u16 = 1;
    pub const FLOW_CONTROL: u16 = 3;
    pub const REFUSED: u16 = 6;
    pub const TUNNEL_CLOSED: u16 = 7;
    pub const SHUTDOWN: u16 = 9;
    pub const TIMEOUT: u16 = 10;
    pub const CANCELLED: u16 = 11;
}

/// Largest window a peer may grant in total (a signed 31-bit count, as HTTP/2).
const MAX_WINDOW: i64 = (1 << 31) - 1;

/// Bytes read from the agent's link at once.
const READ_SIZE: usize = 256 * 1024;

/// Streams stop reading their public connections while this much is queued for the agent.
pub const OUT_HIGH: usize = 1024 * 1024;

/// Bytes queued for an agent that does not read, beyond one read per open
/// stream, before its link is closed (`MAX_UNSENT` in `burrow/connection.py`).
const MAX_UNSENT: usize = 32 * 1024 * 1024;

/// The writer keeps a buffer this big between writes, and lets a bigger one go.
const KEEP_BUFFER: usize = 256 * 1024;

/// Payloads smaller than this are copied out of the read buffer, so that a
/// stalled stream holds its own bytes, never a whole read buffer.
const COPY_BELOW: usize = 16 * 1024;

/// A closing session waits this long for its last frames (GOAWAY) to leave.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(1);

/// Heartbeats per heartbeat timeout.
const HEARTBEATS_PER_TIMEOUT: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Handshake,
    HelloReceived,
    Open,
    Closing,
    Closed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::HelloReceived => "hello-received",
            Self::Open => "open",
            Self::Closing => "closing",
            Self::Closed => "closed",
        }
    }

    /// Which frames the relay accepts from the agent in this state.
    fn accepts(self, kind: FrameType) -> bool {
        use FrameType::*;
        match self {
            Self::Handshake => matches!(kind, Hello | GoAway),
            Self::HelloReceived => matches!(kind, GoAway | Ping | Pong | Bind),
            Self::Open | Self::Closing => matches!(
                kind,
                Ping | Pong | GoAway | Data | Window | Fin | Rst | Bind | Unbind
            ),
            Self::Closed => false,
        }
    }
}

/// What the agent sends one stream, for its public connection.
pub enum Message {
    Data(Held),
    Fin,
    Reset(u16),
}

/// DATA on its way to a public client, counted in its tunnel's `buffered` until dropped.
pub struct Held {
    pub data: Bytes,
    tunnel: Arc<Tunnel>,
}

impl Held {
    fn new(data: Bytes, tunnel: Arc<Tunnel>) -> Self {
        tunnel
            .stats
            .buffered
            .fetch_add(data.len() as i64, Ordering::Relaxed);
        Self { data, tunnel }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.tunnel
            .stats
            .buffered
            .fetch_sub(self.data.len() as i64, Ordering::Relaxed);
    }
}

/// One stream's shared state.
pub struct Stream {
    pub id: u32,
    tunnel: Arc<Tunnel>,
    /// Credit lent beyond the base window, from the session's and the relay's budgets.
    extra: Mutex<u32>,
    session_budget: Arc<Budget>,
    relay_budget: Arc<Budget>,
    /// Bytes we may still send the agent on it.
    credit: Mutex<i64>,
    credit_changed: Notify,
    /// Bytes the agent may still send us on it.
    recv_credit: AtomicI64,
    remote_fin: AtomicBool,
    reset: AtomicBool,
    /// What the agent sent it, waiting for its public connection (a tokio channel here
    /// allocated ~2 KB per stream up front; an empty deque allocates nothing).
    inbox: Mutex<VecDeque<Message>>,
    arrived: Notify,
}

impl Drop for Stream {
    fn drop(&mut self) {
        let extra = i64::from(*lock(&self.extra));
        repay(&self.budgets(), extra);
    }
}

impl Stream {
    /// Where its credit beyond the base window comes from.
    fn budgets(&self) -> [&Budget; 3] {
        [
            &self.tunnel.budget,
            &self.session_budget,
            &self.relay_budget,
        ]
    }

    /// Wait for send credit; 0 once the stream is reset.
    pub async fn wait_credit(&self) -> usize {
        loop {
            let notified = self.credit_changed.notified();
            {
                let credit = *lock(&self.credit);
                if credit > 0 {
                    return credit as usize;
                }
            }
            if self.reset.load(Ordering::Acquire) {
                return 0;
            }
            notified.await;
        }
    }

    pub fn take_credit(&self, size: usize) {
        *lock(&self.credit) -= size as i64;
    }

    fn add_credit(&self, increment: i64) -> bool {
        let mut credit = lock(&self.credit);
        if *credit + increment > MAX_WINDOW {
            return false;
        }
        *credit += increment;
        drop(credit);
        self.credit_changed.notify_one();
        true
    }

    fn kill(&self, code: u16) {
        self.reset.store(true, Ordering::Release);
        self.deliver(Message::Reset(code));
        self.credit_changed.notify_one();
    }

    fn deliver(&self, message: Message) {
        lock(&self.inbox).push_back(message);
        self.arrived.notify_one();
    }

    /// The next thing the agent sent it (for its one reader: a wake-up for no one is kept).
    pub async fn next_message(&self) -> Message {
        loop {
            if let Some(message) = lock(&self.inbox).pop_front() {
                return message;
            }
            self.arrived.notified().await;
        }
    }
}

struct Inner {
    state: State,
    streams: HashMap<u32, Arc<Stream>>,
    last_stream_id: u32,
    peer_window: u32,
    send_payload: u32,
    slot: Option<PendingSlot>,
}

struct Outbound {
    buf: Vec<u8>,
    /// The bytes the writer took from `buf` and is writing now (still unsent, for the bound).
    writing: usize,
    closed: bool,
}

/// Why a session ended.
enum End {
    Eof,
    Failed(String),
    Protocol(u16, String),
    GoAway,
    Timeout,
    NoHello,
    Killed,
}

pub struct Session {
    pub id: String,
    pub peer: String,
    shared: Arc<Shared>,
    budget: Arc<Budget>,
    inner: Mutex<Inner>,
    out: Mutex<Outbound>,
    out_ready: Notify,
    room: Notify,
    killed: Notify,
    /// Milliseconds since `born` when the agent was last heard.
    heard: AtomicU64,
    born: Instant,
}

fn session_id(shared: &Shared) -> String {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    loop {
        let mut bytes = [0u8; 4];
        if rng.fill(&mut bytes).is_err() {
            // (no system randomness: the id is a name for logs, not a secret)
            bytes = (Instant::now().elapsed().subsec_nanos()).to_be_bytes();
        }
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        if !lock(&shared.sessions).contains_key(&id) {
            return id;
        }
    }
}

/// A frame of ours into `out` (both sessions, the relay's and the agent's).
pub(crate) fn frame(kind: FrameType, stream_id: u32, payload: &[u8], out: &mut Vec<u8>) {
    // (payloads here are ours and small: a u32 length always fits)
    let _ = frames::encode(kind, stream_id, payload, out);
}

/// RST or GOAWAY: a code and a reason cut at 200 bytes on a character boundary.
pub(crate) fn code_frame(
    kind: FrameType,
    stream_id: u32,
    code: u16,
    reason: &str,
    out: &mut Vec<u8>,
) {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    let mut end = reason.len().min(200);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(kind, stream_id, &payload, out);
}

/// JSON string contents for text we write into OPEN (peer addresses, tunnel ids).
fn json_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

impl Session {
    /// Run an agent's session on its TLS connection until it ends.
    pub async fn serve<S>(shared: Arc<Shared>, link: S, peer: String, slot: PendingSlot)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let session = Arc::new(Session {
            id: session_id(&shared),
            peer,
            shared: shared.clone(),
            budget: Arc::new(Budget::new(shared.config.session_budget)),
            inner: Mutex::new(Inner {
                state: State::Handshake,
                streams: HashMap::new(),
                last_stream_id: 0,
                peer_window: 0,
                send_payload: shared.config.max_frame,
                slot: Some(slot),
            }),
            out: Mutex::new(Outbound {
                buf: Vec::new(),
                writing: 0,
                closed: false,
            }),
            out_ready: Notify::new(),
            room: Notify::new(),
            killed: Notify::new(),
            heard: AtomicU64::new(0),
            born: Instant::now(),
        });
        lock(&shared.sessions).insert(session.id.clone(), session.clone());
        let (reader, writer) = tokio::io::split(link);
        let writing = session.clone().write_loop(writer);
        tokio::pin!(writing);
        let mut written = false;
        let end = tokio::select! {
            end = session.read_loop(reader) => end,
            result = &mut writing => {
                written = true;
                match result {
                    Ok(()) => End::Eof,
                    Err(error) => End::Failed(error.to_string()),
                }
            }
            end = session.timers() => end,
            _ = session.killed.notified() => End::Killed,
        };
        session.end(end);
        if !written {
            // (a finished writer is not polled again: that would panic)
            let _ = tokio::time::timeout(FLUSH_ON_CLOSE, writing).await;
        }
    }

    // ------------------------------------------------------------ the writer

    async fn write_loop<W: AsyncWrite>(self: Arc<Self>, writer: W) -> std::io::Result<()> {
        tokio::pin!(writer);
        let mut spare = Vec::new();
        loop {
            let closed = {
                let mut out = lock(&self.out);
                std::mem::swap(&mut out.buf, &mut spare);
                out.writing = spare.len();
                out.closed
            };
            if spare.is_empty() {
                if closed {
                    let _ = writer.shutdown().await;
                    return Ok(());
                }
                self.out_ready.notified().await;
                continue;
            }
            self.room.notify_waiters();
            writer.write_all(&spare).await?;
            writer.flush().await?;
            spare.clear();
            if spare.capacity() > KEEP_BUFFER {
                spare = Vec::new();
            }
        }
    }

    /// Queue bytes for the agent; false if the session is over.
    fn queue(&self, build: impl FnOnce(&mut Vec<u8>)) -> bool {
        let streams = self.stream_count();
        self.queue_locked(streams, build)
    }

    /// [`Self::queue`], for a caller that holds the inner lock (and so knows the stream count).
    fn queue_locked(&self, streams: usize, build: impl FnOnce(&mut Vec<u8>)) -> bool {
        let unsent = {
            let mut out = lock(&self.out);
            if out.closed {
                return false;
            }
            build(&mut out.buf);
            let unsent = out.buf.len() + out.writing;
            if unsent > MAX_UNSENT + streams * READ_SIZE {
                out.buf.clear();
                Some(unsent)
            } else {
                None
            }
        };
        self.out_ready.notify_one();
        if let Some(unsent) = unsent {
            self.shared.log(
                "",
                WARNING,
                format!(
                    "session {}: peer reads nothing ({unsent} bytes unsent); closing the link",
                    self.id
                ),
            );
            self.kill();
        }
        true
    }

    /// Wait while the link is congested (or return at once when the session is over).
    pub async fn wait_room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let out = lock(&self.out);
                if out.closed || out.buf.len() < OUT_HIGH {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Queue a frame Python encoded (BOUND, BIND_FAILED, UNBOUND), while the session may answer.
    pub fn send_control(&self, bytes: &[u8]) {
        let state = lock(&self.inner).state;
        if matches!(state, State::Open | State::Closing) {
            self.queue(|out| out.extend_from_slice(bytes));
        }
    }

    // ------------------------------------------------------------ the reader

    fn heard_now(&self) {
        let millis = self.born.elapsed().as_millis() as u64;
        self.heard.store(millis, Ordering::Relaxed);
    }

    async fn read_loop<R: AsyncRead>(&self, reader: R) -> End {
        tokio::pin!(reader);
        let mut buf = BytesMut::with_capacity(READ_SIZE);
        let max_frame = self.shared.config.max_frame;
        loop {
            if buf.capacity() - buf.len() < READ_SIZE / 4 {
                buf.reserve(READ_SIZE);
            }
            match reader.read_buf(&mut buf).await {
                Ok(0) => return End::Eof,
                Ok(_) => {}
                Err(error) => return End::Failed(error.to_string()),
            }
            self.heard_now();
            loop {
                let header = match frames::parse_header(&buf, max_frame) {
                    Ok(Some(header)) => header,
                    Ok(None) => break,
                    Err(error) => return End::Protocol(error.code() as u16, error.to_string()),
                };
                let total = HEADER_SIZE + header.length as usize;
                if total > buf.len() {
                    buf.reserve(total - buf.len());
                    break;
                }
                let result = if header.kind == FrameType::Data && total - HEADER_SIZE >= COPY_BELOW
                {
                    // a big payload leaves as a slice of the read buffer, not a copy
                    let payload = buf.split_to(total).freeze().slice(HEADER_SIZE..);
                    self.on_frame(
                        header.kind,
                        header.stream_id,
                        &payload.clone(),
                        Some(payload),
                    )
                    .await
                } else {
                    let result = self
                        .on_frame(
                            header.kind,
                            header.stream_id,
                            &buf[HEADER_SIZE..total],
                            None,
                        )
                        .await;
                    buf.advance(total);
                    result
                };
                if let Err(end) = result {
                    return end;
                }
            }
        }
    }

    fn protocol(message: String) -> End {
        End::Protocol(code::PROTOCOL_ERROR, message)
    }

    /// The stream a frame is for; None if it existed once; an error if it never did.
    fn known_stream(&self, kind: FrameType, stream_id: u32) -> Result<Option<Arc<Stream>>, End> {
        let inner = lock(&self.inner);
        match inner.streams.get(&stream_id) {
            Some(stream) => Ok(Some(stream.clone())),
            None if stream_id > inner.last_stream_id => Err(Self::protocol(format!(
                "{kind} on unopened stream {stream_id}"
            ))),
            None => Ok(None),
        }
    }

    async fn on_frame(
        &self,
        kind: FrameType,
        stream_id: u32,
        payload: &[u8],
        shared_payload: Option<Bytes>,
    ) -> Result<(), End> {
        let state = lock(&self.inner).state;
        if !state.accepts(kind) {
            return Err(Self::protocol(format!(
                "relay got {kind} while {}",
                state.name()
            )));
        }
        match kind {
            FrameType::Data => {
                let Some(stream) = self.known_stream(kind, stream_id)? else {
                    return Ok(()); // a stream we already reset: its in-flight data is dropped
                };
                if stream.remote_fin.load(Ordering::Relaxed) {
                    return Err(Self::protocol(format!(
                        "DATA on stream {stream_id} after FIN"
                    )));
                }
                let left = stream
                    .recv_credit
                    .fetch_sub(payload.len() as i64, Ordering::AcqRel)
                    - payload.len() as i64;
                if left < 0 {
                    return Err(End::Protocol(
                        code::FLOW_CONTROL,
                        format!("stream {stream_id} overran its window"),
                    ));
                }
                let data = shared_payload.unwrap_or_else(|| Bytes::copy_from_slice(payload));
                stream.deliver(Message::Data(Held::new(data, stream.tunnel.clone())));
            }
            FrameType::Window => {
                let Ok(increment) = <[u8; 4]>::try_from(payload) else {
                    return Err(Self::protocol("WINDOW payload is not 4 bytes".into()));
                };
                let increment = i64::from(u32::from_be_bytes(increment));
                let Some(stream) = self.known_stream(kind, stream_id)? else {
                    return Ok(());
                };
                if increment == 0 || !stream.add_credit(increment) {
                    return Err(End::Protocol(
                        code::FLOW_CONTROL,
                        format!("bad WINDOW increment {increment} on stream {stream_id}"),
                    ));
                }
            }
            FrameType::Fin => {
                if !payload.is_empty() {
                    return Err(Self::protocol("FIN with a payload".into()));
                }
                let Some(stream) = self.known_stream(kind, stream_id)? else {
                    return Ok(());
                };
                if stream.remote_fin.swap(true, Ordering::AcqRel) {
                    return Err(Self::protocol(format!("second FIN on stream {stream_id}")));
                }
                stream.deliver(Message::Fin);
            }
            FrameType::Rst => {
                if payload.len() < 2 {
                    return Err(Self::protocol("RST payload is too short".into()));
                }
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                if self.known_stream(kind, stream_id)?.is_none() {
                    return Ok(());
                }
                let stream = lock(&self.inner).streams.remove(&stream_id);
                if let Some(stream) = stream {
                    stream.kill(code);
                }
            }
            FrameType::Ping => {
                if payload.len() != 8 {
                    return Err(Self::protocol("PING payload is not 8 bytes".into()));
                }
                self.queue(|out| frame(FrameType::Pong, 0, payload, out));
            }
            FrameType::Pong => {
                if payload.len() != 8 {
                    return Err(Self::protocol("PONG payload is not 8 bytes".into()));
                }
            }
            FrameType::GoAway => {
                if payload.len() < 2 {
                    return Err(Self::protocol("GOAWAY payload is too short".into()));
                }
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                let reason = String::from_utf8_lossy(&payload[2..]);
                let reason: String = reason.chars().take(200).collect();
                let said = if reason.is_empty() {
                    format!("code {code}")
                } else {
                    reason
                };
                self.shared.log(
                    "goodbye",
                    INFO,
                    format!(
                        "session {}: agent said goodbye ({})",
                        self.id,
                        escape(&said)
                    ),
                );
                return Err(End::GoAway);
            }
            FrameType::Hello => {
                lock(&self.inner).state = State::HelloReceived;
                self.shared.events.wait_room().await;
                self.shared.events.control(Event::Hello {
                    session: self.id.clone(),
                    peer: self.peer.clone(),
                    payload: payload.to_vec(),
                });
            }
            FrameType::Bind | FrameType::Unbind => {
                self.shared.events.wait_room().await;
                self.shared.events.control(Event::Request {
                    session: self.id.clone(),
                    kind: kind as u8,
                    payload: payload.to_vec(),
                });
            }
            // (not accepted from an agent in any state: the check above refused them)
            _ => return Err(Self::protocol(format!("relay got {kind}"))),
        }
        Ok(())
    }

    // ------------------------------------------------------------ the timers

    async fn timers(&self) -> End {
        let timeout = self.shared.config.heartbeat_timeout;
        let interval = timeout / HEARTBEATS_PER_TIMEOUT;
        let hello_deadline = tokio::time::Instant::now() + self.shared.config.hello_timeout;
        let mut hello_checked = false;
        let mut next_beat = tokio::time::Instant::now() + interval;
        loop {
            if !hello_checked {
                tokio::select! {
                    _ = tokio::time::sleep_until(hello_deadline) => {
                        hello_checked = true;
                        if lock(&self.inner).state == State::Handshake {
                            let waited = self.shared.config.hello_timeout.as_secs_f64();
                            self.shared.log("hello", INFO, format!("refused agent {}: no HELLO within {waited:.0} s", self.peer));
                            self.queue(|out| code_frame(FrameType::GoAway, 0, code::TIMEOUT, "no HELLO in time", out));
                            return End::NoHello;
                        }
                        continue;
                    }
                    _ = tokio::time::sleep_until(next_beat) => {}
                }
            } else {
                tokio::time::sleep_until(next_beat).await;
            }
            let now = tokio::time::Instant::now();
            if now.duration_since(next_beat) > interval {
                // this beat is late: the machine was stalled; silence counts from now
                self.heard_now();
            }
            next_beat = now + interval;
            let silent =
                self.born.elapsed().as_millis() as u64 - self.heard.load(Ordering::Relaxed);
            if Duration::from_millis(silent) > timeout {
                self.shared.log(
                    "",
                    WARNING,
                    format!(
                        "session {}: no answer for {:.0} s; closing the link",
                        self.id,
                        silent as f64 / 1000.0
                    ),
                );
                self.queue(|out| {
                    code_frame(
                        FrameType::GoAway,
                        0,
                        code::TIMEOUT,
                        "heartbeat timeout",
                        out,
                    )
                });
                return End::Timeout;
            }
            if lock(&self.inner).state != State::Handshake {
                let opaque = self.born.elapsed().as_nanos() as u64;
                self.queue(|out| frame(FrameType::Ping, 0, &opaque.to_be_bytes(), out));
            }
        }
    }

    // ------------------------------------------------------------ its end

    /// End the session now (its GOAWAY, if any, is queued).
    pub fn kill(&self) {
        self.killed.notify_one();
    }

    fn end(&self, end: End) {
        match &end {
            End::Protocol(code, message) => {
                self.shared.log(
                    "protocol",
                    WARNING,
                    format!("session {}: protocol error from peer: {message}", self.id),
                );
                self.queue(|out| code_frame(FrameType::GoAway, 0, *code, message, out));
            }
            End::Failed(error) => {
                self.shared.log(
                    "link",
                    INFO,
                    format!("session {}: link failed: {error}", self.id),
                );
            }
            _ => {}
        }
        let (streams, slot) = {
            let mut inner = lock(&self.inner);
            inner.state = State::Closed;
            (std::mem::take(&mut inner.streams), inner.slot.take())
        };
        for stream in streams.values() {
            stream.kill(code::CANCELLED);
        }
        drop(slot);
        {
            let mut sessions = lock(&self.shared.sessions);
            if sessions
                .get(&self.id)
                .is_some_and(|s| std::ptr::eq(s.as_ref(), self))
            {
                sessions.remove(&self.id);
            }
        }
        lock(&self.out).closed = true;
        self.out_ready.notify_one();
        self.room.notify_waiters();
        self.shared.events.control(Event::SessionClosed {
            session: self.id.clone(),
        });
    }

    // ------------------------------------------------------------ Python's answers

    pub fn state(&self) -> State {
        lock(&self.inner).state
    }

    /// Accept the agent: WELCOME (encoded by Python) goes out; streams may open.
    pub fn welcome(&self, welcome: &[u8], peer_window: u32, send_payload: u32) {
        let mut inner = lock(&self.inner);
        if inner.state != State::HelloReceived {
            return;
        }
        inner.state = State::Open;
        inner.peer_window = peer_window;
        inner.send_payload =
            send_payload.clamp(frames::MIN_FRAME_PAYLOAD, frames::MAX_FRAME_PAYLOAD);
        // the pending slot is free before the WELCOME can reach the agent (the writer
        // runs on another thread): an agent that reads WELCOME may dial again at once
        drop(inner.slot.take());
        // under the lock that opens the session: no OPEN can go out before the WELCOME
        self.queue_locked(0, |out| out.extend_from_slice(welcome));
    }

    /// End the session with a GOAWAY Python encoded; `message` is logged first.
    pub fn close_with(&self, goaway: &[u8]) {
        self.queue(|out| out.extend_from_slice(goaway));
        lock(&self.inner).state = State::Closed;
        self.kill();
    }

    /// Graceful GOAWAY: open streams go on, no new ones start.
    pub fn goaway(&self, goaway: &[u8]) {
        let mut inner = lock(&self.inner);
        if inner.state == State::Closed {
            return;
        }
        if inner.state == State::Open {
            inner.state = State::Closing;
        }
        drop(inner);
        self.queue(|out| out.extend_from_slice(goaway));
    }

    // ------------------------------------------------------------ streams

    pub fn stream_count(&self) -> usize {
        lock(&self.inner).streams.len()
    }

    /// The largest DATA payload the agent takes.
    pub fn send_payload(&self) -> usize {
        lock(&self.inner).send_payload as usize
    }

    /// Open a stream for a public connection of `tunnel`; None unless the session is open.
    pub fn open_stream(&self, tunnel: &Arc<Tunnel>, peer: &str) -> Option<Arc<Stream>> {
        let open = format!(
            "{{\"tunnel\": \"{}\", \"peer\": \"{}\"}}",
            json_text(&tunnel.id),
            json_text(peer)
        );
        let mut inner = lock(&self.inner);
        if inner.state != State::Open || inner.last_stream_id == u32::MAX {
            return None;
        }
        inner.last_stream_id += 1;
        let config = &self.shared.config;
        let base = config.base_window.min(config.window);
        // nothing is lent at the start: a stream borrows once it moves data (at its first grant),
        // so an idle one (a control connection, a keep-alive one) never holds what busy ones need
        let stream = Arc::new(Stream {
            id: inner.last_stream_id,
            tunnel: tunnel.clone(),
            extra: Mutex::new(0),
            session_budget: self.budget.clone(),
            relay_budget: self.shared.budget.clone(),
            credit: Mutex::new(i64::from(inner.peer_window)),
            credit_changed: Notify::new(),
            recv_credit: AtomicI64::new(i64::from(base)),
            remote_fin: AtomicBool::new(false),
            reset: AtomicBool::new(false),
            inbox: Mutex::new(VecDeque::new()),
            arrived: Notify::new(),
        });
        inner.streams.insert(stream.id, stream.clone());
        // queued under the same lock that gave the id: OPENs leave in the order of their ids
        let queued = self.queue_locked(inner.streams.len(), |out| {
            frame(FrameType::Open, stream.id, open.as_bytes(), out);
        });
        drop(inner);
        if !queued {
            return None;
        }
        Some(stream)
    }

    pub fn send_data(&self, stream: &Stream, data: &[u8]) {
        self.queue(|out| frame(FrameType::Data, stream.id, data, out));
    }

    pub fn send_fin(&self, stream: &Stream) {
        self.queue(|out| frame(FrameType::Fin, stream.id, &[], out));
    }

    /// Reset a stream from our side.
    pub fn send_rst(&self, stream: &Stream, code: u16, reason: &str) {
        let known = lock(&self.inner).streams.remove(&stream.id).is_some();
        if known {
            self.queue(|out| code_frame(FrameType::Rst, stream.id, code, reason, out));
        }
    }

    /// The stream's public connection is done with it.
    pub fn forget(&self, stream: &Stream) {
        lock(&self.inner).streams.remove(&stream.id);
    }

    /// `size` bytes of the stream left the process: grant credit back at half its allowance,
    /// its loan moved towards the stream's fair share (see [`fair_extra`]): topped up from
    /// the budgets when they have room, or given back, out of what is granted, when the
    /// tunnel's other streams need their share.
    pub fn consumed(&self, stream: &Stream, unacked: &mut u32, size: usize) {
        *unacked += size as u32;
        let config = &self.shared.config;
        let base = config.base_window.min(config.window);
        let mut extra = lock(&stream.extra);
        if *unacked < (base + *extra) / 2 || stream.remote_fin.load(Ordering::Relaxed) {
            return;
        }
        let open = stream.tunnel.stats.open.load(Ordering::Relaxed);
        let fair = fair_extra(config, &stream.tunnel, open);
        let grant = if *extra > fair {
            let surplus = (*extra - fair).min(*unacked);
            repay(&stream.budgets(), i64::from(surplus));
            *extra -= surplus;
            std::mem::take(unacked) - surplus
        } else {
            let more = borrow(&stream.budgets(), i64::from(fair - *extra)) as u32;
            *extra += more;
            std::mem::take(unacked) + more
        };
        drop(extra);
        if grant == 0 {
            return;
        }
        stream
            .recv_credit
            .fetch_add(i64::from(grant), Ordering::AcqRel);
        self.queue(|out| frame(FrameType::Window, stream.id, &grant.to_be_bytes(), out));
    }
}

/// The most credit one of `open` streams of `tunnel` may borrow beyond its base window:
/// the tunnel's budget shared evenly, so that the first streams cannot hold it all
/// while later ones get their base window only (32 streams of one tunnel with the
/// default budgets: 2 MiB windows for the first 16, 64 KiB for the rest, which then
/// ran at a tenth of the median stream).
fn fair_extra(config: &super::Config, tunnel: &Tunnel, open: i64) -> u32 {
    let most = config.window - config.base_window.min(config.window);
    let share = tunnel.budget.size() / open.max(1);
    share.clamp(0, i64::from(most)) as u32
}

/// Peer text made safe for one log line: control characters escaped.
pub fn escape(text: &str) -> String {
    text.chars().flat_map(char::escape_default).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_accept_what_the_reference_model_accepts() {
        assert!(State::Handshake.accepts(FrameType::Hello));
        assert!(!State::Handshake.accepts(FrameType::Ping));
        assert!(State::HelloReceived.accepts(FrameType::Bind));
        assert!(!State::HelloReceived.accepts(FrameType::Unbind));
        assert!(State::Open.accepts(FrameType::Data));
        assert!(!State::Open.accepts(FrameType::Open));
        assert!(!State::Open.accepts(FrameType::Hello));
        assert!(!State::Closed.accepts(FrameType::Ping));
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        let mut out = Vec::new();
        code_frame(FrameType::GoAway, 0, 1, &"é".repeat(150), &mut out);
        let payload = &out[HEADER_SIZE + 2..];
        assert!(payload.len() <= 200);
        assert!(std::str::from_utf8(payload).is_ok());
    }

    #[test]
    fn escaped_text_keeps_no_control_character() {
        assert_eq!(escape("a\r\nb\x1b[31m"), "a\\r\\nb\\u{1b}[31m");
        assert_eq!(json_text("a\"b\\c\n"), "a\\\"b\\\\c\\u000a");
    }
}
