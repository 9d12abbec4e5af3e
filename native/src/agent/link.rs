//! One link to a relay: the reader (frames checked against the agent's state table), the
//! writer (all ready frames in one TLS write; the unsent bound) and the heartbeats; the
//! relay's session (`relay/session.rs`) with the roles swapped and no budgets to lend.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::stream::{self, Message, Received, Stream};
use super::{json, LinkConfig, Shared, Tunnel};
use crate::frames::{self, FrameType, HEADER_SIZE};
use crate::relay::events::{Event, INFO, WARNING};
use crate::relay::lock;
use crate::relay::session::{code, code_frame, frame};

/// Bytes read from the link at once.
const READ_SIZE: usize = 256 * 1024;
/// The queue towards a relay that reads nothing is cut here (plus one read per stream).
const MAX_UNSENT: usize = 32 * 1024 * 1024;
/// Streams stop reading their services while this much waits for the relay.
pub const OUT_HIGH: usize = 1024 * 1024;
/// A writer's spare buffer above this is freed, not kept (a process has a link or a few:
/// keeping what a busy one needs spares a big allocation, and its page faults, per write).
const KEEP_BUFFER: usize = 4 * 1024 * 1024;
/// DATA smaller than this is copied out of the read buffer; larger leaves as a slice of it.
const COPY_BELOW: usize = 16 * 1024;
/// How long a closing link may take to flush its last frames.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(1);
const HEARTBEATS_PER_TIMEOUT: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// HELLO sent, no WELCOME yet.
    Handshake,
    Open,
    /// The relay said GOAWAY gracefully: open streams finish, new ones are refused.
    Closing,
    Closed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Open => "open",
            Self::Closing => "closing",
            Self::Closed => "closed",
        }
    }

    /// What an agent accepts from a relay (as `protocol/session.py`'s table for the agent).
    fn accepts(self, kind: FrameType) -> bool {
        use FrameType::*;
        let any_time = matches!(kind, Ping | Pong | GoAway);
        match self {
            Self::Handshake => any_time || kind == Welcome,
            Self::Open | Self::Closing => {
                any_time
                    || matches!(
                        kind,
                        Data | Window | Fin | Rst | Bound | BindFailed | Unbound | Open
                    )
            }
            Self::Closed => false,
        }
    }
}

struct Inner {
    state: State,
    streams: HashMap<u32, Arc<Stream>>,
    last_stream_id: u32,
    peer_window: u32,
    send_payload: u32,
    tunnels: HashMap<String, Arc<Tunnel>>,
}

struct Outbound {
    buf: Vec<u8>,
    writing: usize,
    closed: bool,
}

enum End {
    Eof,
    Failed(String),
    Protocol(u16, String),
    GoAway,
    Timeout,
    Killed,
}

pub struct Link {
    pub id: String,
    shared: Arc<Shared>,
    pub config: LinkConfig,
    inner: Mutex<Inner>,
    out: Mutex<Outbound>,
    out_ready: Notify,
    room: Notify,
    killed: Notify,
    welcomed: Notify,
    /// Python's first frame (HELLO) went out: no PING before it (a relay refuses one).
    hello_sent: AtomicBool,
    heard: AtomicU64,
    born: Instant,
}

impl Link {
    pub fn new(id: String, shared: Arc<Shared>, config: LinkConfig) -> Arc<Self> {
        Arc::new(Self {
            id,
            shared,
            config,
            inner: Mutex::new(Inner {
                state: State::Handshake,
                streams: HashMap::new(),
                last_stream_id: 0,
                peer_window: 0,
                send_payload: frames::MIN_FRAME_PAYLOAD,
                tunnels: HashMap::new(),
            }),
            out: Mutex::new(Outbound {
                buf: Vec::new(),
                writing: 0,
                closed: false,
            }),
            out_ready: Notify::new(),
            room: Notify::new(),
            killed: Notify::new(),
            welcomed: Notify::new(),
            hello_sent: AtomicBool::new(false),
            heard: AtomicU64::new(0),
            born: Instant::now(),
        })
    }

    /// Run the link on its TLS connection until it ends.
    pub async fn serve<S>(self: Arc<Self>, tls: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(tls);
        let writing = self.clone().write_loop(writer);
        tokio::pin!(writing);
        let mut written = false;
        let end = tokio::select! {
            end = self.clone().read_loop(reader) => end,
            result = &mut writing => {
                written = true;
                match result {
                    Ok(()) => End::Eof,
                    Err(error) => End::Failed(error.to_string()),
                }
            }
            end = self.timers() => end,
            _ = self.killed.notified() => End::Killed,
        };
        self.end(end);
        if !written {
            // (a finished writer is not polled again)
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

    /// Queue bytes for the relay; false if the link is over.
    fn queue(&self, build: impl FnOnce(&mut Vec<u8>)) -> bool {
        let streams = self.stream_count();
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
                    "burrow: relay link {} reads nothing ({unsent} bytes unsent); closing it",
                    self.id
                ),
            );
            self.kill();
        }
        true
    }

    /// The link is not congested (streams may read their services).
    pub fn has_room(&self) -> bool {
        let out = lock(&self.out);
        out.closed || out.buf.len() < OUT_HIGH
    }

    /// Wait while the link is congested (or return at once when it is over).
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

    pub fn send_control(&self, bytes: &[u8]) -> bool {
        if lock(&self.inner).state == State::Closed {
            return false;
        }
        let queued = self.queue(|out| out.extend_from_slice(bytes));
        self.hello_sent.store(true, Ordering::Release);
        queued
    }

    // ------------------------------------------------------------ the reader

    fn heard_now(&self) {
        let millis = self.born.elapsed().as_millis() as u64;
        self.heard.store(millis, Ordering::Relaxed);
    }

    async fn read_loop<R: AsyncRead>(self: Arc<Self>, reader: R) -> End {
        tokio::pin!(reader);
        let mut buf = BytesMut::with_capacity(READ_SIZE);
        let max_frame = self.config.max_frame;
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
        self: &Arc<Self>,
        kind: FrameType,
        stream_id: u32,
        payload: &[u8],
        shared_payload: Option<Bytes>,
    ) -> Result<(), End> {
        let state = lock(&self.inner).state;
        if !state.accepts(kind) {
            return Err(Self::protocol(format!(
                "agent got {kind} while {}",
                state.name()
            )));
        }
        match kind {
            FrameType::Data => {
                let Some(stream) = self.known_stream(kind, stream_id)? else {
                    return Ok(());
                };
                match stream.receive(payload.len()) {
                    Received::Ok => {}
                    Received::AfterFin => {
                        return Err(Self::protocol(format!(
                            "DATA on stream {stream_id} after FIN"
                        )))
                    }
                    Received::Overrun => {
                        return Err(End::Protocol(
                            code::FLOW_CONTROL,
                            format!("stream {stream_id} overran its window"),
                        ))
                    }
                }
                let data = shared_payload.unwrap_or_else(|| Bytes::copy_from_slice(payload));
                stream.deliver(Message::Data(data));
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
                if !stream.remote_fin() {
                    return Err(Self::protocol(format!("second FIN on stream {stream_id}")));
                }
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
            FrameType::Open => self.on_open(stream_id, payload)?,
            FrameType::Welcome => {
                // Python checks it (version, window, largest frame) and answers with
                // `welcomed`; nothing after it is read until then (an OPEN needs the window)
                let waiting = self.welcomed.notified();
                tokio::pin!(waiting);
                waiting.as_mut().enable();
                self.up(kind, payload).await;
                tokio::select! {
                    _ = &mut waiting => {}
                    _ = self.killed.notified() => return Err(End::Killed),
                }
                if lock(&self.inner).state != State::Open {
                    return Err(End::Killed);
                }
            }
            FrameType::Bound | FrameType::BindFailed | FrameType::Unbound => {
                self.up(kind, payload).await;
            }
            FrameType::GoAway => {
                if payload.len() < 2 {
                    return Err(Self::protocol("GOAWAY payload is too short".into()));
                }
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                self.up(kind, payload).await;
                let mut inner = lock(&self.inner);
                if matches!(code, code::NO_ERROR | code::SHUTDOWN) && inner.state == State::Open {
                    inner.state = State::Closing; // open streams finish; the relay closes the link
                } else {
                    return Err(End::GoAway);
                }
            }
            _ => return Err(Self::protocol(format!("agent got {kind}"))),
        }
        Ok(())
    }

    /// A control frame for Python.
    async fn up(&self, kind: FrameType, payload: &[u8]) {
        self.shared.events.wait_room().await;
        self.shared.events.control(Event::Request {
            session: self.id.clone(),
            kind: kind as u8,
            payload: payload.to_vec(),
        });
    }

    fn on_open(self: &Arc<Self>, stream_id: u32, payload: &[u8]) -> Result<(), End> {
        let Some(tunnel_id) = json::string_field(payload, "tunnel") else {
            return Err(Self::protocol("OPEN without a tunnel".into()));
        };
        let mut inner = lock(&self.inner);
        if stream_id <= inner.last_stream_id {
            return Err(Self::protocol(format!("OPEN reuses stream id {stream_id}")));
        }
        inner.last_stream_id = stream_id;
        let refusal = match (inner.state, inner.tunnels.get(&tunnel_id)) {
            (State::Closing, _) => Some((code::REFUSED, "session closing")),
            (_, None) => Some((code::TUNNEL_CLOSED, "no such tunnel here")),
            _ => None,
        };
        if let Some((code, reason)) = refusal {
            drop(inner);
            self.queue(|out| code_frame(FrameType::Rst, stream_id, code, reason, out));
            return Ok(());
        }
        let tunnel = inner.tunnels[&tunnel_id].clone();
        let stream = Stream::new(
            stream_id,
            i64::from(inner.peer_window),
            i64::from(self.config.window),
            tunnel.counters.clone(),
        );
        inner.streams.insert(stream_id, stream.clone());
        drop(inner);
        tokio::spawn(stream::serve(self.clone(), stream, tunnel));
        Ok(())
    }

    // ------------------------------------------------------------ the timers

    async fn timers(&self) -> End {
        let timeout = self.config.heartbeat_timeout;
        let interval = timeout / HEARTBEATS_PER_TIMEOUT;
        let mut next_beat = tokio::time::Instant::now() + interval;
        loop {
            tokio::time::sleep_until(next_beat).await;
            let now = tokio::time::Instant::now();
            if now.duration_since(next_beat) > interval {
                self.heard_now(); // a stalled machine: silence counts from now
            }
            next_beat = now + interval;
            let silent =
                self.born.elapsed().as_millis() as u64 - self.heard.load(Ordering::Relaxed);
            if Duration::from_millis(silent) > timeout {
                self.shared.log(
                    "",
                    WARNING,
                    format!(
                        "burrow: relay link {}: no answer for {:.0} s; closing it",
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
            if self.hello_sent.load(Ordering::Acquire) {
                let opaque = self.born.elapsed().as_nanos() as u64;
                self.queue(|out| frame(FrameType::Ping, 0, &opaque.to_be_bytes(), out));
            }
        }
    }

    // ------------------------------------------------------------ its end

    pub fn kill(&self) {
        self.killed.notify_one();
    }

    pub fn log(&self, kind: &'static str, level: u8, message: String) {
        self.shared.log(kind, level, message);
    }

    fn end(&self, end: End) {
        match &end {
            End::Protocol(code, message) => {
                self.shared.log(
                    "protocol",
                    WARNING,
                    format!(
                        "burrow: relay link {}: protocol error from the relay: {message}",
                        self.id
                    ),
                );
                self.queue(|out| code_frame(FrameType::GoAway, 0, *code, message, out));
            }
            End::Failed(error) => {
                self.shared.log(
                    "link",
                    INFO,
                    format!("burrow: relay link {} failed: {error}", self.id),
                );
            }
            _ => {}
        }
        let streams = {
            let mut inner = lock(&self.inner);
            inner.state = State::Closed;
            inner.tunnels.clear();
            std::mem::take(&mut inner.streams)
        };
        for stream in streams.values() {
            stream.kill(code::CANCELLED);
        }
        {
            let mut links = lock(&self.shared.links);
            if links
                .get(&self.id)
                .is_some_and(|l| std::ptr::eq(l.as_ref(), self))
            {
                links.remove(&self.id);
            }
        }
        lock(&self.out).closed = true;
        self.out_ready.notify_one();
        self.room.notify_waiters();
        self.welcomed.notify_one();
        self.shared.events.control(Event::SessionClosed {
            session: self.id.clone(),
        });
    }

    // ------------------------------------------------------------ Python's answers

    pub fn welcomed(&self, peer_window: u32, send_payload: u32) {
        {
            let mut inner = lock(&self.inner);
            if inner.state != State::Handshake {
                return;
            }
            inner.state = State::Open;
            inner.peer_window = peer_window;
            inner.send_payload =
                send_payload.clamp(frames::MIN_FRAME_PAYLOAD, frames::MAX_FRAME_PAYLOAD);
        }
        self.welcomed.notify_one();
    }

    pub fn close_with(&self, goaway: &[u8]) {
        if !goaway.is_empty() {
            self.queue(|out| out.extend_from_slice(goaway));
        }
        self.kill();
    }

    pub fn add_tunnel(&self, tunnel_id: &str, tunnel: Arc<Tunnel>) {
        let mut inner = lock(&self.inner);
        if inner.state != State::Closed {
            inner.tunnels.insert(tunnel_id.to_owned(), tunnel);
        }
    }

    pub fn remove_tunnel(&self, tunnel_id: &str) {
        lock(&self.inner).tunnels.remove(tunnel_id);
    }

    // ------------------------------------------------------------ streams

    /// Bytes queued for the relay, the chunk being written included.
    pub fn unsent(&self) -> usize {
        let out = lock(&self.out);
        out.buf.len() + out.writing
    }

    pub fn stream_count(&self) -> usize {
        lock(&self.inner).streams.len()
    }

    pub fn send_payload(&self) -> usize {
        lock(&self.inner).send_payload as usize
    }

    pub fn send_data(&self, stream: &Stream, data: &[u8]) {
        self.queue(|out| frame(FrameType::Data, stream.id, data, out));
    }

    pub fn send_fin(&self, stream: &Stream) {
        self.queue(|out| frame(FrameType::Fin, stream.id, &[], out));
    }

    pub fn send_rst(&self, stream: &Stream, code: u16, reason: &str) {
        let known = lock(&self.inner).streams.remove(&stream.id).is_some();
        if known {
            self.queue(|out| code_frame(FrameType::Rst, stream.id, code, reason, out));
        }
    }

    pub fn forget(&self, stream: &Stream) {
        lock(&self.inner).streams.remove(&stream.id);
    }

    /// `size` bytes of the stream reached the service: credit back at half the window.
    pub fn consumed(&self, stream: &Stream, unacked: &mut u32, size: usize) {
        *unacked += size as u32;
        if *unacked < self.config.window / 2 || stream.is_remote_fin() {
            return;
        }
        let grant = std::mem::take(unacked);
        stream.grant(grant);
        self.queue(|out| frame(FrameType::Window, stream.id, &grant.to_be_bytes(), out));
    }
}
