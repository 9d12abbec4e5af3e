//! Accepting: the TLS port (agents and public TLS clients) and the raw TCP
//! tunnels' listeners.
//!
//! Every accepted connection is checked against the descriptor reserve and
//! (on the TLS port) the pending-handshake caps before any work. The TLS
//! port then reads the ClientHello itself ([`crate::sni`]) and routes on it
//! before any TLS work: `<domain>` with ALPN `burrow/1` is an agent; a routed
//! `<id>.<domain>` is a public client of that tunnel; anything else gets an
//! alert and nothing more. Only then does rustls run the handshake, with the
//! bytes already read replayed to it ([`Rewind`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::LazyConfigAcceptor;

use super::events::{DEBUG, INFO, WARNING};
use super::observe::HandshakeFailure;
use super::{format_address, public, session, Shared, Tunnel};
use crate::sni;

/// After accept() fails (out of descriptors), wait this long before trying again.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// TLS alert descriptions sent to refused clients.
const UNRECOGNIZED_NAME: u8 = 112;

/// Reset a connection (SO_LINGER 0): a refused client learns at once, no TIME_WAIT is left here.
pub fn reset(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

/// A listener owned by its accept task, and a token that lives exactly as long: the port
/// is free again once the token is gone (its weak handle no longer upgrades), which an
/// aborted task's drop makes true a moment after `abort()` returns.
pub struct Listening {
    listener: TcpListener, // (dropped before the token: fields drop in this order)
    _alive: Arc<()>,
}

impl Listening {
    pub fn new(listener: TcpListener) -> (Self, std::sync::Weak<()>) {
        let alive = Arc::new(());
        let weak = Arc::downgrade(&alive);
        (Self::sharing(listener, alive), weak)
    }

    /// A listener whose token is shared: the port is free once every listener holding a
    /// clone of `alive` is gone (one port, bound on several addresses).
    pub fn sharing(listener: TcpListener, alive: Arc<()>) -> Self {
        Self {
            listener,
            _alive: alive,
        }
    }
}

/// The TLS port's accept loop; with `pinned`, a tunnel's own loopback TLS port (every
/// connection is that tunnel's, whatever name it asks for: see [`handshake`]).
pub async fn tls_port(shared: Arc<Shared>, listening: Listening, pinned: Option<Arc<Tunnel>>) {
    let listener = &listening.listener;
    loop {
        let (tcp, address) = match listener.accept().await {
            Ok((tcp, address)) => (tcp, canonical(address)),
            Err(error) => {
                shared.log("accept", WARNING, format!("accept failed: {error}"));
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                continue;
            }
        };
        let accepted = Instant::now();
        let refusal = match shared.refuse_descriptor(i64::from(tcp.as_raw_fd())) {
            Some(refusal) => Err(refusal),
            None => shared.admit(address.ip()),
        };
        match refusal {
            Err(refusal) => {
                reset(tcp);
                shared.log(
                    "refused",
                    WARNING,
                    format!("refused {}: {refusal}", format_address(address)),
                );
            }
            Ok(slot) => {
                tokio::spawn(handshake(
                    shared.clone(),
                    tcp,
                    (address, accepted),
                    slot,
                    pinned.clone(),
                ));
            }
        }
    }
}

/// A raw TCP tunnel's accept loop.
pub async fn tcp_port(shared: Arc<Shared>, listening: Listening, tunnel: Arc<Tunnel>) {
    let listener = &listening.listener;
    loop {
        let (tcp, address) = match listener.accept().await {
            Ok((tcp, address)) => (tcp, canonical(address)),
            Err(error) => {
                shared.log("accept", WARNING, format!("accept failed: {error}"));
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                continue;
            }
        };
        if let Some(refusal) = shared.refuse_descriptor(i64::from(tcp.as_raw_fd())) {
            reset(tcp);
            shared.log(
                "refused",
                WARNING,
                format!("refused {}: {refusal}", format_address(address)),
            );
            continue;
        }
        if !tunnel.allows(address.ip()) {
            refuse_outsider(&shared, &tunnel, tcp, address);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        public::limit_unsent(&tcp);
        public::serve(shared.clone(), tunnel.clone(), tcp, address, Instant::now());
    }
}

/// A client from outside the tunnel's allowed networks: reset, and say so (rate-limited).
fn refuse_outsider(shared: &Shared, tunnel: &Tunnel, tcp: TcpStream, address: SocketAddr) {
    reset(tcp);
    shared.log(
        "outsider",
        INFO,
        format!(
            "refused {}: not in tunnel {}'s allowed networks",
            format_address(address),
            tunnel.id
        ),
    );
}

/// Who a ClientHello is for.
enum Target {
    Agent,
    Tunnel(Arc<Tunnel>),
}

async fn send_alert(mut tcp: TcpStream, description: u8) {
    // a fatal alert in a TLS 1.2-framed record: what a server says before any handshake state
    let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description];
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(&alert)).await;
    let _ = tcp.shutdown().await;
}

/// Read the ClientHello, route it, run TLS, hand the connection over (`accepted`: when,
/// for the stream-open latency). A refusal is logged and counted by its reason.
///
/// The slot counts the connection as pending until its TLS is done, or, for
/// an agent, until it is welcomed. A `pinned` tunnel's port (the embedded relay's
/// `https://localhost:PORT`) skips routing and serves the loopback certificate, which
/// names localhost, 127.0.0.1 and ::1: clients that cannot resolve `<id>.localhost`
/// reach it, and a client dialling an IP address sends no server name at all.
async fn handshake(
    shared: Arc<Shared>,
    mut tcp: TcpStream,
    (address, accepted): (SocketAddr, Instant),
    slot: super::PendingSlot,
    pinned: Option<Arc<Tunnel>>,
) {
    let _ = tcp.set_nodelay(true);
    let peer = format_address(address);
    let deadline = accepted + shared.config.handshake_timeout;
    let refused = |why: HandshakeFailure, reason: &str| {
        shared.observed.handshakes.count(why);
        shared.log(
            // (the log's kinds, like the metric's reasons, tell an agent without burrow/1 apart)
            if why == HandshakeFailure::Alpn {
                "alpn"
            } else {
                "handshake"
            },
            INFO,
            format!("refused TLS handshake from {peer}: {reason}"),
        );
    };
    let mut first = Vec::with_capacity(512);
    let hello = loop {
        match sni::peek(&first) {
            Ok(sni::Peek::Hello(hello)) => break hello,
            Ok(sni::Peek::NeedMore) => {}
            Err(not_hello) => {
                refused(HandshakeFailure::NotTls, &not_hello.to_string());
                return;
            }
        }
        first.reserve(2048);
        match timeout_at(deadline, tcp.read_buf(&mut first)).await {
            Err(_) => return refused(HandshakeFailure::Timeout, "no TLS handshake in time"),
            Ok(Ok(0)) => return refused(HandshakeFailure::Closed, "closed before its ClientHello"),
            Ok(Err(error)) => return refused(HandshakeFailure::Closed, &error.to_string()),
            Ok(Ok(_)) => {}
        }
    };
    let domain = &shared.config.domain;
    let loopback = pinned.is_some();
    let target = match hello.server_name.as_deref() {
        _ if loopback => pinned.map(Target::Tunnel),
        None => None,
        // (an agent must ask for ALPN burrow/1; a client that asks for none still gets the
        // handshake, so that scanners see the endpoint's TLS, and is let go after it)
        Some(name) if name == domain => Some(Target::Agent),
        Some(name) => match shared.tunnel_by_host(name) {
            Some(tunnel) if tunnel.route().is_some() => Some(Target::Tunnel(tunnel)),
            _ => {
                shared.log(
                    "host",
                    DEBUG,
                    format!("TLS handshake for unknown host {name:?}"),
                );
                None
            }
        },
    };
    let Some(target) = target else {
        let why = match hello.server_name {
            None => HandshakeFailure::NoServerName,
            Some(_) => HandshakeFailure::UnknownServerName,
        };
        refused(why, "unknown or missing server name");
        send_alert(tcp, UNRECOGNIZED_NAME).await;
        return;
    };
    if let Target::Tunnel(tunnel) = &target {
        if !tunnel.allows(address.ip()) {
            // before any TLS work: an outsider learns nothing, not even the certificate
            return refuse_outsider(&shared, tunnel, tcp, address);
        }
        public::limit_unsent(&tcp);
    }
    let replay = Rewind {
        first,
        offset: 0,
        tcp,
    };
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), replay);
    let started = match timeout_at(deadline, acceptor).await {
        Err(_) => return refused(HandshakeFailure::Timeout, "no TLS handshake in time"),
        Ok(Err(error)) => return refused(HandshakeFailure::of(&error), &error.to_string()),
        Ok(Ok(started)) => started,
    };
    let config = match &target {
        Target::Agent => shared.identities.agent.clone(),
        Target::Tunnel(tunnel) => match tunnel.route() {
            Some(route) => {
                let offered = started.client_hello().alpn().map(|offer| offer.collect());
                let (tunnels, loopback_configs) = match &route.client_auth {
                    Some(auth) => (&auth.tunnels, &auth.loopback),
                    None => (&shared.identities.tunnels, &shared.identities.loopback),
                };
                let configs = match loopback_configs {
                    Some(loopback_configs) if loopback => loopback_configs,
                    _ => tunnels,
                };
                configs.for_alpn(route.h2, offered)
            }
            None => return, // closed meanwhile
        },
    };
    let mut tls = match timeout_at(deadline, started.into_stream(config)).await {
        Err(_) => return refused(HandshakeFailure::Timeout, "no TLS handshake in time"),
        Ok(Err(error)) => return refused(HandshakeFailure::of(&error), &error.to_string()),
        Ok(Ok(tls)) => tls,
    };
    tls.get_mut().0.release_replay();
    match target {
        Target::Agent if tls.get_ref().1.alpn_protocol().is_none() => {
            shared.observed.handshakes.count(HandshakeFailure::Alpn);
            shared.log(
                "alpn",
                INFO,
                format!("refused {peer}: connected to {domain} without ALPN burrow/1"),
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
        }
        // (each in a task of its own: this one, sized for the handshake's states, ~8 KB, ends
        // here, and an idle connection holds only what serving it needs)
        Target::Agent => {
            tokio::spawn(session::Session::serve(shared, tls, peer, slot));
        }
        Target::Tunnel(tunnel) => {
            drop(slot);
            public::serve(shared, tunnel, tls, address, accepted);
        }
    }
}

/// A TCP connection whose first bytes, already read, are read again first.
pub struct Rewind {
    first: Vec<u8>,
    offset: usize,
    tcp: TcpStream,
}

impl Rewind {
    /// The socket itself.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Free the replayed bytes once they are consumed.
    fn release_replay(&mut self) {
        if self.offset >= self.first.len() {
            self.first = Vec::new();
            self.offset = 0;
        }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.offset < this.first.len() {
            let rest = &this.first[this.offset..];
            let take = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..take]);
            this.offset += take;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// An IPv4 client of a dual-stack listener as itself (1.2.3.4, not ::ffff:1.2.3.4): for the
/// per-source caps, the allowlists, the logs and PROXY headers alike.
pub fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// A listening socket on `host:port` with SO_REUSEADDR, not yet registered with the runtime.
pub fn bind_listener(address: SocketAddr) -> io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(address);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        // `::` is every address, IPv4 too (they arrive as ::ffff:a.b.c.d, canonical again at
        // accept): one listener serves both stacks; a given IPv6 address is that address only
        socket.set_only_v6(!address.ip().is_unspecified())?;
    }
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
