//! One public connection (TLS or raw TCP), pumped to and from its stream.
//!
//! Up (client to agent): read only as much as the stream's credit allows
//! and only while the link is not congested, so nothing waits here for
//! credit. Down (agent to client): write each DATA, then grant its credit
//! back once written, so a client that stops reading holds at most one
//! window here. Half-close goes through both ways (a TLS client's
//! close_notify is its FIN; the agent's FIN becomes our close_notify).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BufMut;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use super::accept::{canonical, Rewind};
use super::access::QuotaHeld;
use super::events::WARNING;
use super::observe::Live;
use super::session::{code, Message, Session, State, Stream};
use super::{access, format_address, Shared, Stats, Tunnel};

/// A first read takes this much; busy connections grow to [`MAX_READ`] (x4 at each full
/// read). A connection waiting to read holds no buffer (it waits on a 1-byte read): 10,000
/// idle TLS connections took 23.0 KB each with a 4 KiB buffer held, 19.9 KB with 1 KiB.
const FIRST_READ: usize = 1024;
const MAX_READ: usize = 256 * 1024;

/// A connection closed cleanly gets this long to say its last bytes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes a public socket may hold unsent (TCP_NOTSENT_LOWAT). Without it the kernel lets a
/// client that does not read queue up to `tcp_wmem`'s maximum (4 MiB on Debian) on the
/// relay, outside every budget: 500 such clients held 713 MiB of kernel memory and put the
/// whole machine's TCP under memory pressure. Bytes in flight are not limited by it, so a
/// reading client on a long path keeps its speed.
const MAX_UNSENT: u32 = 128 * 1024;

/// Bound what the kernel holds unsent for a public connection (see [`MAX_UNSENT`]).
pub fn limit_unsent(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(MAX_UNSENT);
}

/// A public connection: its bytes, and the TCP socket under them (to reset it).
pub trait PublicIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn socket(&self) -> &TcpStream;
}

impl PublicIo for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }
}

impl PublicIo for TlsStream<Rewind> {
    fn socket(&self) -> &TcpStream {
        self.get_ref().0.tcp()
    }
}

/// How a stream's pump ended.
enum Ending {
    /// Both directions finished: close normally.
    Finished,
    /// The agent reset the stream: reset the client (or close cleanly if the service refused).
    AgentReset(u16),
    /// The client's connection failed: reset the stream.
    ClientFailed,
    /// The tunnel was closed.
    TunnelClosed,
}

/// Serve a public connection of `tunnel` until it ends (`accepted`: when its socket was
/// accepted, for the stream-open latency).
///
/// The decisions are taken here, at once; the bytes are carried by a task of its own, which
/// holds only the two halves of `io` (a TLS connection is 1.2 KB: the serving task no longer
/// keeps a dead copy of its size).
pub fn serve<S: PublicIo>(
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    io: S,
    client: SocketAddr,
    accepted: Instant,
) {
    // one snapshot of the route serves every decision below
    let route = tunnel.route();
    // the allowlist again, on the route this connection is served by: one accepted while the
    // tunnel had no route yet (its listener opens first) was let through the accept's check
    let peer = format_address(client);
    if let Some(route) = &route {
        if !access::allowed(&route.allow, client.ip()) {
            let _ = io.socket().set_zero_linger();
            return;
        }
    }
    let session = route
        .as_ref()
        .and_then(|route| shared.session(&route.session))
        .filter(|s| s.state() == State::Open);
    let Some(session) = session else {
        // (no route or no session any more: the connection is dropped)
        let state = route
            .as_ref()
            .and_then(|r| shared.session(&r.session))
            .map(|s| s.state());
        shared.log(
            "dropped",
            super::events::DEBUG,
            format!(
                "dropped {peer}: tunnel {} has no open session {route:?} {state:?}",
                tunnel.id
            ),
        );
        return;
    };
    // the tenant's cap on connections open at once, across its tunnels (held until this one ends)
    let quota = route.as_ref().and_then(|route| route.quota.as_ref());
    let _held = match quota.map(|quota| (quota, quota.take())) {
        Some((quota, None)) => {
            shared.log(
                "connections",
                WARNING,
                format!(
                    "refused {peer}: tunnel {}'s tenant has {} connections open (its limit)",
                    tunnel.id,
                    quota.open()
                ),
            );
            return;
        }
        Some((_, held)) => held,
        None => None,
    };
    let open = tunnel.stats.open.load(Ordering::Relaxed);
    let refusal = if open >= shared.config.max_streams_per_tunnel as i64 {
        Some(format!(
            "tunnel {} has {open} open connections (limit)",
            tunnel.id
        ))
    } else if session.stream_count() >= shared.config.max_streams_per_session {
        Some(format!(
            "session {} has {} open streams (limit)",
            session.id,
            session.stream_count()
        ))
    } else {
        None
    };
    if let Some(refusal) = refusal {
        shared.log("streams", WARNING, format!("refused {peer}: {refusal}"));
        return;
    }
    if tunnel.closed.is_set() {
        return;
    }
    let Some(stream) = session.open_stream(&tunnel, &peer) else {
        shared.log(
            "dropped",
            super::events::DEBUG,
            format!("dropped {peer}: session {} takes no stream", session.id),
        );
        return;
    };
    shared.observed.open_latency.observe(accepted.elapsed());
    tunnel.stats.open.fetch_add(1, Ordering::Relaxed);
    tunnel.stats.total.fetch_add(1, Ordering::Relaxed);
    let number = shared.observed.connection_number();
    // the PROXY protocol header, when the owner asked for one: the first bytes the service reads
    let header = route
        .as_ref()
        .filter(|route| route.proxy != 0)
        .and_then(|route| {
            let relay = canonical(io.socket().local_addr().ok()?);
            Some(access::proxy_header(route.proxy, client, relay))
        });
    let (reader, writer) = tokio::io::split(io);
    tokio::spawn(carry(Carried {
        tunnel,
        session,
        stream,
        header,
        number,
        peer,
        _held,
        reader,
        writer,
    }));
}

/// What [`carry`] takes over from [`serve`].
struct Carried<S: PublicIo> {
    tunnel: Arc<Tunnel>,
    session: Arc<Session>,
    stream: Arc<Stream>,
    header: Option<Vec<u8>>,
    number: u64,
    peer: String,
    _held: Option<QuotaHeld>,
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
}

/// Pump a public connection's bytes both ways until it ends, then close or reset it.
async fn carry<S: PublicIo>(carried: Carried<S>) {
    // (what moves out; the rest, the tenant's quota slot among it, is held until the end)
    let Carried {
        mut reader,
        mut writer,
        header,
        peer,
        ..
    } = carried;
    let (tunnel, session, stream) = (&carried.tunnel, &carried.session, &carried.stream);
    let listed = tunnel.connections.list(carried.number, peer);
    let ending = {
        let counted = (&tunnel.stats, &*listed.live);
        let up = up(session, stream, counted, &mut reader, header);
        let down = down(session, stream, counted, &mut writer);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                result = &mut up, if !up_done => match result {
                    Ok(()) => up_done = true,
                    Err(()) => break Ending::ClientFailed,
                },
                result = &mut down, if !down_done => match result {
                    Ok(None) => down_done = true,
                    Ok(Some(code)) => break Ending::AgentReset(code),
                    Err(()) => break Ending::ClientFailed,
                },
                _ = tunnel.closed.wait() => break Ending::TunnelClosed,
            }
            if up_done && down_done {
                break Ending::Finished;
            }
        }
    };
    tunnel.stats.open.fetch_sub(1, Ordering::Relaxed);
    drop(listed);
    // (the halves, not the whole connection, are held across the closing await: a future
    // that kept the TLS stream itself would be 1.2 KB bigger for its whole life)
    let reset = |reader: ReadHalf<S>, writer: WriteHalf<S>| {
        let _ = reader.unsplit(writer).socket().set_zero_linger();
    };
    match ending {
        Ending::Finished => {
            session.forget(stream);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer.shutdown()).await;
        }
        Ending::AgentReset(code::REFUSED) => {
            // nothing came back (nothing listens on the local port): nothing to truncate
            session.forget(stream);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer.shutdown()).await;
        }
        Ending::AgentReset(_) => {
            session.forget(stream);
            reset(reader, writer);
        }
        Ending::ClientFailed => {
            session.send_rst(stream, code::CANCELLED, "connection lost");
            reset(reader, writer);
        }
        Ending::TunnelClosed => {
            session.send_rst(stream, code::TUNNEL_CLOSED, "tunnel closed");
            reset(reader, writer);
        }
    }
}

/// Where a connection's bytes are counted: its tunnel's totals and its own line of the listing.
type Counted<'a> = (&'a Stats, &'a Live);

/// Client to agent, until the client's EOF (then FIN).
async fn up<S: PublicIo>(
    session: &Session,
    stream: &Stream,
    (stats, live): Counted<'_>,
    reader: &mut ReadHalf<S>,
    header: Option<Vec<u8>>,
) -> Result<(), ()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut size = FIRST_READ; // what the next read may take; x4 after each full one
    let most = session.send_payload();
    let mut header = header.unwrap_or_default();
    while !header.is_empty() {
        // (within the stream's credit like any byte: an agent may have announced a tiny window)
        let credit = stream.wait_credit().await;
        if credit == 0 {
            return std::future::pending().await;
        }
        session.wait_room().await;
        let part: Vec<u8> = header.drain(..credit.min(most).min(header.len())).collect();
        stream.take_credit(part.len());
        session.send_data(stream, &part);
    }
    loop {
        let credit = stream.wait_credit().await;
        if credit == 0 {
            // reset: the down side reports it
            return std::future::pending().await;
        }
        session.wait_room().await;
        let want = credit.min(most).min(size);
        buf.clear();
        buf.reserve_exact(size);
        let read = match now(reader.read_buf(&mut (&mut buf).limit(want))).await {
            Some(read) => read.map_err(|_| ())?,
            None => {
                // nothing to read yet: wait for the first byte without holding a buffer (an
                // idle connection keeps none), then take at once whatever came with it
                buf = Vec::new();
                let mut first = [0u8; 1];
                if reader.read(&mut first).await.map_err(|_| ())? == 0 {
                    0
                } else {
                    buf.reserve_exact(size);
                    buf.push(first[0]);
                    if want > 1 {
                        if let Some(more) =
                            now(reader.read_buf(&mut (&mut buf).limit(want - 1))).await
                        {
                            more.map_err(|_| ())?;
                        }
                    }
                    buf.len()
                }
            }
        };
        if read == 0 {
            session.send_fin(stream);
            return Ok(());
        }
        stream.take_credit(read);
        stats.bytes_in.fetch_add(read as u64, Ordering::Relaxed);
        live.bytes_in.fetch_add(read as u64, Ordering::Relaxed);
        session.send_data(stream, &buf[..read]);
        if read == size && size < MAX_READ {
            size *= 4;
        }
    }
}

/// `future`'s output if it is ready at its first poll; None (and the future dropped) if not.
/// (For reads, which are cancel-safe: a read dropped before it was ready took nothing.)
async fn now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        Poll::Ready(match future.as_mut().poll(cx) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => None,
        })
    })
    .await
}

/// Agent to client: Ok(None) after the agent's FIN, Ok(Some(code)) on its RST.
async fn down<S: PublicIo>(
    session: &Session,
    stream: &Stream,
    (stats, live): Counted<'_>,
    writer: &mut WriteHalf<S>,
) -> Result<Option<u16>, ()> {
    let mut unacked = 0u32;
    loop {
        match stream.next_message().await {
            Message::Data(held) => {
                writer.write_all(&held.data).await.map_err(|_| ())?;
                writer.flush().await.map_err(|_| ())?;
                let size = held.data.len();
                drop(held);
                stats.bytes_out.fetch_add(size as u64, Ordering::Relaxed);
                live.bytes_out.fetch_add(size as u64, Ordering::Relaxed);
                session.consumed(stream, &mut unacked, size);
            }
            Message::Fin => {
                writer.shutdown().await.map_err(|_| ())?;
                return Ok(None);
            }
            Message::Reset(code) => return Ok(Some(code)),
        }
    }
}
