//! One stream the relay opened: dialled to its tunnel's service, then carried both ways.
//!
//! The dial retries (50 ms, doubling to 1 s) until the tunnel's connect timeout, so a service
//! started right after its tunnel gets the connection once it listens; what the client sent
//! meanwhile waits in the stream's inbox (at most one window: no credit is granted for it
//! until it is written) and goes first. Nothing listening by then: RST `refused`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::link::Link;
use super::{Counters, Target, Tunnel};
use crate::relay::events::WARNING;
use crate::relay::lock;
use crate::relay::session::code;

const MAX_WINDOW: i64 = (1 << 31) - 1;
const DIAL_RETRY_FIRST: Duration = Duration::from_millis(50);
const DIAL_RETRY_CAP: Duration = Duration::from_secs(1);
/// Reads of the service start small and grow while it keeps them full.
const FIRST_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;

pub enum Received {
    Ok,
    AfterFin,
    Overrun,
}

pub enum Message {
    Data(Bytes),
    Fin,
    Reset(u16),
}

pub struct Stream {
    pub id: u32,
    credit: Mutex<i64>,
    credit_changed: Notify,
    recv_credit: AtomicI64,
    remote_fin: AtomicBool,
    reset: AtomicBool,
    /// Wakes everyone waiting on the stream when it is reset (its own: `credit_changed`
    /// wakes one waiter, and several wait for a reset at once).
    was_reset: Notify,
    inbox: Mutex<VecDeque<Message>>,
    arrived: Notify,
    counters: Arc<Counters>,
}

impl Stream {
    pub fn new(id: u32, credit: i64, window: i64, counters: Arc<Counters>) -> Arc<Self> {
        Arc::new(Self {
            id,
            credit: Mutex::new(credit),
            credit_changed: Notify::new(),
            recv_credit: AtomicI64::new(window),
            remote_fin: AtomicBool::new(false),
            reset: AtomicBool::new(false),
            was_reset: Notify::new(),
            inbox: Mutex::new(VecDeque::new()),
            arrived: Notify::new(),
            counters,
        })
    }

    /// `size` bytes arrived on it: within the window or not, before a FIN or not.
    pub fn receive(&self, size: usize) -> Received {
        if self.remote_fin.load(Ordering::Relaxed) {
            return Received::AfterFin;
        }
        let left = self.recv_credit.fetch_sub(size as i64, Ordering::AcqRel) - size as i64;
        if left < 0 {
            return Received::Overrun;
        }
        Received::Ok
    }

    pub fn grant(&self, increment: u32) {
        self.recv_credit
            .fetch_add(i64::from(increment), Ordering::AcqRel);
    }

    pub fn add_credit(&self, increment: i64) -> bool {
        let mut credit = lock(&self.credit);
        if *credit + increment > MAX_WINDOW {
            return false;
        }
        *credit += increment;
        drop(credit);
        self.credit_changed.notify_one();
        true
    }

    async fn wait_credit(&self) -> usize {
        loop {
            let notified = self.credit_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.reset.load(Ordering::Acquire) {
                return 0; // (credit left or not: a reset stream sends nothing more)
            }
            {
                let credit = *lock(&self.credit);
                if credit > 0 {
                    return credit as usize;
                }
            }
            notified.await;
        }
    }

    fn take_credit(&self, size: usize) {
        *lock(&self.credit) -= size as i64;
    }

    /// The relay's FIN; false if it was the second.
    pub fn remote_fin(&self) -> bool {
        if self.remote_fin.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.deliver(Message::Fin);
        true
    }

    pub fn is_remote_fin(&self) -> bool {
        self.remote_fin.load(Ordering::Relaxed)
    }

    pub fn kill(&self, code: u16) {
        self.reset.store(true, Ordering::Release);
        self.deliver(Message::Reset(code));
        self.credit_changed.notify_one();
        self.was_reset.notify_waiters();
    }

    pub fn deliver(&self, message: Message) {
        lock(&self.inbox).push_back(message);
        self.arrived.notify_one();
    }

    async fn next_message(&self) -> Message {
        loop {
            if let Some(message) = lock(&self.inbox).pop_front() {
                return message;
            }
            self.arrived.notified().await;
        }
    }

    fn is_reset(&self) -> bool {
        self.reset.load(Ordering::Acquire)
    }
}

/// A stream's life: dial, carry, forget.
pub async fn serve(link: Arc<Link>, stream: Arc<Stream>, tunnel: Arc<Tunnel>) {
    let counters = &tunnel.counters;
    counters.open.fetch_add(1, Ordering::Relaxed);
    counters.total.fetch_add(1, Ordering::Relaxed);
    match dial(&link, &stream, &tunnel).await {
        Some(Local::Tcp(tcp)) => {
            let _ = tcp.set_nodelay(true);
            carry(&link, &stream, tcp).await;
        }
        Some(Local::Unix(unix)) => carry(&link, &stream, unix).await,
        None => {}
    }
    link.forget(&stream);
    counters.open.fetch_sub(1, Ordering::Relaxed);
}

enum Local {
    Tcp(TcpStream),
    Unix(UnixStream),
}

async fn connect(target: &Target) -> std::io::Result<Local> {
    match target {
        Target::Unix(path) => Ok(Local::Unix(UnixStream::connect(path).await?)),
        Target::Tcp { hosts, port } => {
            let mut last = None;
            for host in hosts {
                match TcpStream::connect((host.as_str(), *port)).await {
                    Ok(tcp) => return Ok(Local::Tcp(tcp)),
                    Err(error) => last = Some(error),
                }
            }
            Err(last.unwrap_or_else(|| std::io::Error::other("no address to dial")))
        }
    }
}

async fn dial(link: &Link, stream: &Stream, tunnel: &Tunnel) -> Option<Local> {
    let deadline = Instant::now() + tunnel.connect_timeout;
    let mut delay = DIAL_RETRY_FIRST;
    let mut error;
    loop {
        if stream.is_reset() {
            return None;
        }
        match connect(&tunnel.target).await {
            Ok(local) => return Some(local),
            Err(e) => error = e,
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let pause = delay.min(deadline - now);
        let _ = tokio::time::timeout(pause, reset(stream)).await; // (a reset ends the wait)
        delay = (delay * 2).min(DIAL_RETRY_CAP);
    }
    if stream.is_reset() {
        return None;
    }
    let reason = describe(&error);
    link.log(
        "refused",
        WARNING,
        format!(
            "burrow: nothing accepts on {} ({reason}) after {:.1} s: a public connection was closed; \
             start the service there, or forward the port it listens on",
            tunnel.target,
            tunnel.connect_timeout.as_secs_f64()
        ),
    );
    link.send_rst(
        stream,
        code::REFUSED,
        &format!("{} refused the connection", tunnel.target),
    );
    None
}

/// An OS error as Python's `strerror` says it, lower-cased ("connection refused").
fn describe(error: &std::io::Error) -> String {
    let text = error.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    text.to_lowercase()
}

/// A connection to a service, split in owned halves: the read half waits for readiness,
/// so a stream whose service says nothing holds no buffer (an idle keep-alive connection,
/// a client that stopped reading: a few hundred bytes each, not a read buffer).
trait LocalIo {
    type Read: Readable;
    type Write: AsyncWrite + Unpin;
    fn halves(self) -> (Self::Read, Self::Write);
    /// Cut the connection with a reset (TCP; a unix socket just closes), never a FIN first:
    /// the halves are put back together, so the write half's drop does not shut it down.
    fn abort(read: Self::Read, write: Self::Write);
}

trait Readable {
    async fn readable(&self) -> std::io::Result<()>;
    fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> std::io::Result<usize>;
}

impl LocalIo for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn abort(read: Self::Read, write: Self::Write) {
        if let Ok(tcp) = read.reunite(write) {
            let _ = tcp.set_zero_linger();
        }
    }
}

impl Readable for tokio::net::tcp::OwnedReadHalf {
    async fn readable(&self) -> std::io::Result<()> {
        tokio::net::tcp::OwnedReadHalf::readable(self).await
    }
    fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> std::io::Result<usize> {
        tokio::net::tcp::OwnedReadHalf::try_read_buf(self, buf)
    }
}

impl LocalIo for UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn abort(read: Self::Read, write: Self::Write) {
        drop(read.reunite(write)); // (a unix socket has no reset: it closes, without a shutdown first)
    }
}

impl Readable for tokio::net::unix::OwnedReadHalf {
    async fn readable(&self) -> std::io::Result<()> {
        tokio::net::unix::OwnedReadHalf::readable(self).await
    }
    fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> std::io::Result<usize> {
        tokio::net::unix::OwnedReadHalf::try_read_buf(self, buf)
    }
}

/// Bytes both ways between the service and the stream until both sides are done, or a reset.
async fn carry<S: LocalIo>(link: &Link, stream: &Stream, local: S) {
    let (reader, mut writer) = local.halves();
    let failed = {
        let up = up(link, stream, &reader);
        let down = down(link, stream, &mut writer);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let result = tokio::select! {
                result = &mut up, if !up_done => { up_done = true; result }
                result = &mut down, if !down_done => { down_done = true; result }
                // (a reset ends both at once, even a write stuck on a service that reads nothing)
                () = reset(stream) => Err(None),
            };
            if let Err(reason) = result {
                break Some(reason);
            }
            if up_done && down_done {
                break None;
            }
        }
    };
    if let Some(reason) = failed {
        if let Some(reason) = reason {
            link.send_rst(stream, code::CANCELLED, &reason);
        }
        S::abort(reader, writer); // the service sees a reset
    }
}

/// Service → relay: read only as much as the stream's credit, while the link has room, and
/// only once the service has something to say (the buffer lives for one read).
/// Err(Some(reason)) to reset the stream; Err(None) when the relay reset it.
async fn up<R: Readable>(link: &Link, stream: &Stream, reader: &R) -> Result<(), Option<String>> {
    let mut size = FIRST_READ;
    // kept while the service keeps it busy, dropped while it waits (for the service or credit)
    let mut buf = BytesMut::new();
    loop {
        if *lock(&stream.credit) <= 0 || !link.has_room() {
            buf = BytesMut::new(); // (a stalled reader's stream waits holding nothing)
        }
        let credit = stream.wait_credit().await;
        if credit == 0 {
            return Err(None);
        }
        link.wait_room().await;
        let want = credit.min(size).min(link.send_payload());
        if buf.capacity() < want {
            buf = BytesMut::with_capacity(want.max(buf.capacity()));
        }
        let read = match reader.try_read_buf(&mut (&mut buf).limit(want)) {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                buf = BytesMut::new();
                let ready = tokio::select! {
                    ready = reader.readable() => ready,
                    _ = reset(stream) => return Err(None),
                };
                if let Err(error) = ready {
                    return Err(Some(format!("local read failed: {}", describe(&error))));
                }
                continue;
            }
            read => read,
        };
        match read {
            Ok(0) => {
                link.send_fin(stream);
                return Ok(());
            }
            Ok(n) => {
                stream.take_credit(n);
                stream
                    .counters
                    .bytes_out
                    .fetch_add(n as u64, Ordering::Relaxed);
                link.send_data(stream, &buf[..n]);
                buf.clear();
                // let the writer start on it: the relay works on this read while we read the next
                tokio::task::yield_now().await;
                if n == want && size < MAX_READ {
                    size *= 4;
                }
            }
            Err(error) => return Err(Some(format!("local read failed: {}", describe(&error)))),
        }
    }
}

/// Wait until the stream is reset.
async fn reset(stream: &Stream) {
    loop {
        let notified = stream.was_reset.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if stream.is_reset() {
            return;
        }
        notified.await;
    }
}

/// Relay → service: write each DATA, then grant its credit back; FIN is the service's EOF.
async fn down<W: AsyncWrite + Unpin>(
    link: &Link,
    stream: &Stream,
    mut writer: W,
) -> Result<(), Option<String>> {
    let mut unacked = 0u32;
    loop {
        match stream.next_message().await {
            Message::Data(data) => {
                if let Err(error) = writer.write_all(&data).await {
                    return Err(Some(format!("local write failed: {}", describe(&error))));
                }
                stream
                    .counters
                    .bytes_in
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                link.consumed(stream, &mut unacked, data.len());
            }
            Message::Fin => {
                let _ = writer.shutdown().await;
                return Ok(());
            }
            Message::Reset(_) => return Err(None),
        }
    }
}
