"""The relay: the TLS listener, SNI routing, tunnels and their TCP listeners.

One TLS port serves everyone. burrow accepts each connection itself (so it
knows the peer and can cap pending handshakes per source), then runs the TLS
handshake with a deadline. The SNI callback routes it:

- ``<domain>`` itself with ALPN ``burrow/1``: an agent; the connection becomes
  a :class:`RelaySession`.
- ``<id>.<domain>`` of an open tunnel: a public client; the connection becomes
  a stream on the session that owns the tunnel.
- anything else (unknown id, no SNI, an IP literal): the handshake is refused
  and nothing is routed.

Raw TCP tunnels get their own listener on a random port of the configured range.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import random
import socket
import ssl
import time
from collections import deque
from pathlib import Path
from typing import Any, cast

from ..connection import LINGER_RESET
from ..errors import ConfigurationError
from ..paths import data_dir
from ..protocol import events as ev
from ..protocol.frames import ErrorCode
from ..protocol.session import SessionState
from .config import TCP_PORT_ATTEMPTS, RelayConfig
from .limits import LogLimiter, PendingHandshakes
from .registry import PublicEndpoint, RelayTunnel, new_tunnel_id
from .session import RelaySession
from .tickets import Claims, TicketInvalid, TicketSigner, default_key_path, load_or_create_key
from .tls import AGENT_ALPN, AGENT_ALPNS, CertificateStore

logger = logging.getLogger("burrow.relay")

#: Pending connections the kernel queues per listener before refusing.
BACKLOG = 1024

#: Tunnel ids kept ready with their dev certificate (a burst of binds beyond
#: this many pays the certificate at the first handshake instead).
READY_CONTEXTS = 4

#: While all contexts but one are ready, the pool is refilled only once binds
#: have paused this long: a tunnel just bound usually takes its first
#: connection at once, and making a certificate beside it slows that down.
REFILL_DELAY = 0.05

#: uvloop's timers have millisecond resolution and may fire this much early.
TIMER_SLACK = 0.002

#: A closing TLS connection waits this long for the peer's close_notify (asyncio's
#: default, 30 s, keeps a dead peer's socket open that long).
TLS_SHUTDOWN_TIMEOUT = 5.0

#: How often a draining relay looks whether its streams have finished.
DRAIN_POLL = 0.05

#: After accept() fails (out of file descriptors), wait this long before trying again.
ACCEPT_RETRY_DELAY = 0.1


def format_address(address: Any) -> str:
    """``host:port``, ``[v6]:port`` for IPv6."""
    if not address:
        return "unknown"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _refusal_reason(exc: BaseException) -> str:
    text = str(exc)
    if "CALLBACK_FAILED" in text:
        return "unknown or missing server name"
    if "taking longer" in text or isinstance(exc, TimeoutError):
        return "no TLS handshake in time"
    return f"{type(exc).__name__}: {text}"[:200]


class _Dispatcher(asyncio.Protocol):
    """First protocol of every TLS connection: hands it to a session or a tunnel."""

    def __init__(self, relay: Relay, peer: str) -> None:
        self.relay = relay
        self.peer = peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        sslobj = transport.get_extra_info("ssl_object")
        host = getattr(sslobj, "burrow_host", None)
        relay = self.relay
        if host == relay.config.domain:
            if sslobj.selected_alpn_protocol() not in AGENT_ALPNS:
                logger.info("refused %s: connected to %s without ALPN %s", self.peer, host, AGENT_ALPN)
                transport.close()
                return
            session = RelaySession(relay, self.peer)
            transport.set_protocol(session)
            session.connection_made(transport)
            return
        tunnel = relay.by_host.get(host) if host else None
        if tunnel is None:  # closed during the handshake
            transport.close()
            return
        relay.attach_public(tunnel, transport, self.peer)


class _TcpAccept(asyncio.Protocol):
    """First protocol of a raw TCP tunnel connection."""

    def __init__(self, relay: Relay, tunnel: RelayTunnel) -> None:
        self.relay = relay
        self.tunnel = tunnel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.relay.attach_public(self.tunnel, transport, format_address(transport.get_extra_info("peername")))


class Relay:
    """A burrow relay. ``async with Relay(config) as relay:`` or ``await relay.start()``."""

    def __init__(self, config: RelayConfig | None = None) -> None:
        self.config = config or RelayConfig()
        self.config.check()
        self.tunnels: dict[str, RelayTunnel] = {}
        self.by_host: dict[str, RelayTunnel] = {}
        self.sessions: set[RelaySession] = set()
        self.port = 0  # the bound TLS port, once started
        self.certs: CertificateStore | None = None
        self.tickets: TicketSigner | None = None
        self.pending = PendingHandshakes(self.config.max_pending_handshakes, self.config.max_pending_per_source)
        self.refusals = LogLimiter(logger)
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self._issued: set[str] = set()  # every id ever handed out: never reused
        self._tokens = [t.encode() for t in self.config.tokens]
        self._tunnels_per_token: dict[str, int] = {}
        self._ready: deque[str] = deque()  # ids whose dev TLS context is made (see _top_up)
        self._filling = False
        self._last_bind = 0.0  # time.monotonic() when the last id was handed out
        self._refill_timer: asyncio.Handle | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> Relay:
        """Bind the TLS listener; returns once connections are accepted."""
        config = self.config
        self.certs = CertificateStore(config)
        self.certs.agent_context.sni_callback = self._on_sni
        key_path = config.ticket_key or default_key_path(config.data_dir or data_dir())
        self.tickets = TicketSigner(load_or_create_key(Path(key_path)), config.domain)
        try:
            first = socket.create_server((config.host, config.port), backlog=BACKLOG, family=_family(config.host))
        except OSError as exc:
            self.certs.close()
            raise ConfigurationError(
                f"cannot listen on {config.host}:{config.port} ({(exc.strerror or str(exc)).lower()}); "
                "choose another --listen"
            ) from None
        self._listeners.append(first)
        self.port = first.getsockname()[1]
        if config.also_ipv6 and config.host == "127.0.0.1" and socket.has_ipv6:
            try:  # so that <id>.localhost works for clients that try ::1 first
                self._listeners.append(
                    socket.create_server(("::1", self.port), backlog=BACKLOG, family=socket.AF_INET6)
                )
            except OSError:
                pass
        for listener in self._listeners:
            listener.setblocking(False)
            self.spawn(self._accept_loop(listener))
        self._top_up()
        logger.info(
            "relay listening on %s:%d for *.%s (%s certificates)",
            config.host,
            self.port,
            config.domain,
            "dev CA" if config.dev else "operator",
        )
        return self

    @property
    def public_port(self) -> int:
        """The TLS port clients are told to use."""
        return self.config.public_port or self.port

    @property
    def ca_path(self) -> Path | None:
        """The dev CA certificate file, when this relay uses the dev CA."""
        return self.certs.ca_path if self.certs is not None else None

    def stop_listening(self) -> None:
        """Accept no new connection: TLS listener and every TCP tunnel listener."""
        if self._refill_timer is not None:
            self._refill_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for tunnel in self.tunnels.values():
            if tunnel.tcp_server is not None:
                tunnel.tcp_server.close()

    async def shutdown(self, grace: float | None = None) -> None:
        """Graceful stop: refuse new connections, GOAWAY to agents, let streams finish, close."""
        grace = self.config.shutdown_grace if grace is None else grace
        self.stop_listening()
        for session in list(self.sessions):
            session.proto.goaway(ErrorCode.SHUTDOWN, "relay shutting down")
            session.flush()
        streams = sum(len(s.endpoints) for s in self.sessions)
        logger.info("relay shutting down: %d open streams get up to %.0f s to finish", streams, grace)
        deadline = time.monotonic() + grace
        # streams end in many places; polling a few times a second during a shutdown is cheap
        while any(s.endpoints for s in self.sessions) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL)
        self.close()

    def close(self) -> None:
        """Stop at once: listeners, tunnels (their connections reset), sessions."""
        self.stop_listening()
        for tunnel in list(self.tunnels.values()):
            self.close_tunnel(tunnel, "relay shutting down", notify=False)
        for session in list(self.sessions):
            session.close(ErrorCode.SHUTDOWN, "relay shutting down")
        if self.certs is not None:
            self.certs.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has run."""
        await self._closed.wait()

    async def __aenter__(self) -> Relay:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` as a task the relay keeps (and cancels when it stops listening)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- accepting

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE/ENFILE: wait for descriptors rather than spin
                if listener.fileno() < 0:
                    return
                self.refusals.log("accept", logging.WARNING, "accept failed: %s", exc)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            source = address[0]
            refusal = self.pending.admit(source)
            if refusal is not None:
                _reset_socket(conn)
                self.refusals.log("pending", logging.WARNING, "refused %s: %s", format_address(address), refusal)
                continue
            self.spawn(self._handshake(conn, address))

    async def _handshake(self, conn: socket.socket, address: Any) -> None:
        peer = format_address(address)
        loop = asyncio.get_running_loop()
        assert self.certs is not None
        try:
            # Nagle off: the tunnel forwards what it reads at once. Every other socket
            # comes from create_server or create_connection, which set it (asyncio and
            # uvloop alike); asyncio's connect_accepted_socket does not (proto is 0)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.connect_accepted_socket(
                lambda: _Dispatcher(self, peer),
                conn,
                ssl=self.certs.agent_context,
                ssl_handshake_timeout=self.config.handshake_timeout,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            conn.close()
            reason = _refusal_reason(exc)
            self.refusals.log("handshake", logging.INFO, "refused TLS handshake from %s: %s", peer, reason)
        except asyncio.CancelledError:
            conn.close()
            raise
        finally:
            self.pending.done(address[0])

    # ------------------------------------------------------------------ routing

    def token_ok(self, token: str) -> bool:
        """True when no token is configured, or ``token`` is one of them (constant time)."""
        if not self._tokens:
            return True
        given = token.encode()
        return any(hmac.compare_digest(given, t) for t in self._tokens)

    def _on_sni(self, sslobj: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> int | None:
        if name is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        host = name.lower().rstrip(".")
        if host != self.config.domain:
            tunnel = self.by_host.get(host)
            if tunnel is None:
                logger.debug("TLS handshake for unknown host %r", host[:253])
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            assert self.certs is not None
            sslobj.context = self.certs.tunnel_context(host, tunnel.h2)
        sslobj.burrow_host = host  # type: ignore[attr-defined]
        return None

    def attach_public(self, tunnel: RelayTunnel, transport: asyncio.Transport, peer: str) -> None:
        """Turn a public connection into a stream on the tunnel's session (within the caps)."""
        session = tunnel.session
        if tunnel.id not in self.tunnels or session.proto.state is not SessionState.OPEN:
            transport.close()
            return
        config = self.config
        if len(tunnel.endpoints) >= config.max_streams_per_tunnel:
            refusal = f"tunnel {tunnel.id} has {len(tunnel.endpoints)} open connections (limit)"
        elif session.proto.stream_count >= config.max_streams_per_session:
            refusal = f"session {session.name} has {session.proto.stream_count} open streams (limit)"
        else:
            refusal = ""
        if refusal:
            transport.close()
            self.refusals.log("streams", logging.WARNING, "refused %s: %s", peer, refusal)
            return
        stream_id = session.proto.open_stream(tunnel.id, peer)
        endpoint = PublicEndpoint(tunnel, stream_id)
        transport.set_protocol(endpoint)
        endpoint.connection_made(transport)
        endpoint.read_now()  # a raw TCP client's first bytes go out with the OPEN
        session.flush()

    # ------------------------------------------------------------------ tunnels

    async def bind(self, session: RelaySession, request: ev.BindRequested) -> None:
        """Open a tunnel for ``session`` (or resume one from a ticket); answer BOUND or BIND_FAILED."""

        def fail(code: str, message: str) -> None:
            logger.info("session %s: bind refused (%s): %s", session.name, code, message)
            if session.proto.state in (SessionState.OPEN, SessionState.CLOSING):
                session.proto.bind_failed(request.request_id, code, message)
                session.flush()

        if session.proto.state is not SessionState.OPEN:
            return fail("shutting-down", "the relay is shutting down; try again shortly")
        if not 1 <= request.port <= 65535:
            return fail("bad-port", f"port {request.port} is outside 1-65535")
        ticket = request.options.get("ticket")
        if ticket is not None:
            assert self.tickets is not None
            try:
                claims = self.tickets.verify(str(ticket), session.token_fp)
            except TicketInvalid as exc:
                return fail("bad-ticket", str(exc))
            if (claims.unencrypted, claims.h2) != (request.unencrypted, request.h2):
                return fail("bad-ticket", "the ticket is for a tunnel of another kind")
            holder = self.tunnels.get(claims.tunnel_id)
            if holder is not None:
                if holder.session is session:
                    return fail("in-use", f"tunnel {claims.tunnel_id} is already bound on this session")
                self._take_over(holder)
        else:
            claims = Claims(self._fresh_id(request.h2), request.unencrypted, request.h2, None)
        count = self._tunnels_per_token.get(session.token_fp, 0)
        if count >= self.config.max_tunnels_per_token:
            return fail("limit", f"this token has {count} tunnels at this relay (the limit); close some first")
        tunnel_id = claims.tunnel_id
        self._issued.add(tunnel_id)
        host = f"{tunnel_id}.{self.config.domain}"
        tunnel = RelayTunnel(tunnel_id, host, session, request.port, request.h2, request.unencrypted)
        if request.unencrypted:
            try:
                await self._listen_tcp(tunnel, claims.tcp_port)
            except OSError as exc:
                logger.warning("session %s: no free TCP port for a tunnel: %s", session.name, exc)
                return fail("no-tcp-port", f"relay has no free TCP port in {self._port_range()}")
        if session.proto.state is not SessionState.OPEN or tunnel_id in self.tunnels:
            if tunnel.tcp_server is not None:  # the session died, or a rival resumed first
                tunnel.tcp_server.close()
            return fail("in-use", f"tunnel {tunnel_id} was bound meanwhile")
        self.tunnels[tunnel_id] = tunnel
        self.by_host[host] = tunnel
        session.tunnels[tunnel_id] = tunnel
        self._tunnels_per_token[session.token_fp] = self._tunnels_per_token.get(session.token_fp, 0) + 1
        info: dict[str, Any] = {"id": tunnel_id, "host": host, "port": self.public_port}
        if tunnel.tcp_port is not None:
            info["unencrypted_host"] = self.config.tcp_public_host or self.config.domain
            info["unencrypted_port"] = tunnel.tcp_port
        assert self.tickets is not None
        claims = Claims(tunnel_id, request.unencrypted, request.h2, tunnel.tcp_port)
        info["ticket"] = self.tickets.issue(session.token_fp, claims)
        session.proto.bound(request.request_id, info)
        session.flush()
        logger.info(
            "tunnel %s %s by session %s: %s%s",
            tunnel_id,
            "resumed" if ticket is not None else "opened",
            session.name,
            host,
            f" and tcp port {tunnel.tcp_port}" if tunnel.tcp_port else "",
        )

    def _fresh_id(self, h2: bool) -> str:
        """A never-issued id; on a dev relay, one whose TLS context is already made if any is ready."""
        tunnel_id = self._ready.popleft() if self._ready and not h2 else self._unused_id()
        self._last_bind = time.monotonic()
        self._top_up()
        return tunnel_id

    def _unused_id(self) -> str:
        while True:
            tunnel_id = new_tunnel_id()
            if tunnel_id not in self._issued:
                self._issued.add(tunnel_id)
                return tunnel_id

    def _top_up(self) -> None:
        """Keep a few ids with their dev certificate ready, made off the loop thread.

        Issuing a certificate and loading it into a context takes ~3.5 ms (most
        of it OpenSSL parsing PEM, which releases the GIL); done at the first
        handshake, it would be the bulk of a new tunnel's first request.
        While all but one are ready, the refill waits for a pause in binds;
        below that it starts at once, so a burst finds two or more ready.
        """
        if self._refill_timer is not None:
            self._refill_timer.cancel()
            self._refill_timer = None
        if self.certs is None or not self.certs.per_host or not self._listeners or self._filling:
            return
        if len(self._ready) >= READY_CONTEXTS:
            return
        if self._refill_waits():
            delay = self._last_bind + REFILL_DELAY - time.monotonic()
            self._refill_timer = asyncio.get_running_loop().call_later(delay, self._top_up)
            return
        self._filling = True
        self.spawn(self._fill())

    def _refill_waits(self) -> bool:
        """All contexts but one are ready, and the last bind was less than REFILL_DELAY ago."""
        recent = time.monotonic() - self._last_bind < REFILL_DELAY - TIMER_SLACK
        return len(self._ready) >= READY_CONTEXTS - 1 and recent

    async def _fill(self) -> None:
        assert self.certs is not None
        loop = asyncio.get_running_loop()
        try:
            while len(self._ready) < READY_CONTEXTS and not self._refill_waits():
                tunnel_id = self._unused_id()
                host = f"{tunnel_id}.{self.config.domain}"
                try:
                    context = await loop.run_in_executor(None, self.certs.make_context, host, False)
                except RuntimeError:  # the interpreter is exiting: its thread pool is gone
                    return
                self.certs.keep(host, False, context)
                self._ready.append(tunnel_id)
        finally:
            self._filling = False
        self._top_up()  # binds came meanwhile: wait for their pause

    def _take_over(self, holder: RelayTunnel) -> None:
        """A reconnected agent (same token, valid ticket) reclaims its tunnel from a stale session."""
        stale = holder.session
        self.close_tunnel(holder, f"taken over from stale session {stale.name}", notify=False)
        if not stale.tunnels:
            # its agent has moved on, so its link is dead or useless: no graceful TLS
            # close, which would wait for a close_notify that never comes
            logger.info("session %s replaced by a reconnected agent", stale.name)
            stale.proto.goaway(ErrorCode.SHUTDOWN, "replaced by a newer session of this agent")
            stale.flush()
            if stale.transport is not None:
                stale.transport.abort()

    def close_tunnel(self, tunnel: RelayTunnel, reason: str, notify: bool = True) -> None:
        """Close a tunnel: unroute it, stop its TCP listener, reset its connections."""
        if self.tunnels.get(tunnel.id) is not tunnel:
            return
        del self.tunnels[tunnel.id]
        self.by_host.pop(tunnel.host, None)
        session = tunnel.session
        session.tunnels.pop(tunnel.id, None)
        self._tunnels_per_token[session.token_fp] -= 1
        if not self._tunnels_per_token[session.token_fp]:
            del self._tunnels_per_token[session.token_fp]
        if tunnel.tcp_server is not None:
            tunnel.tcp_server.close()
        if self.certs is not None:
            self.certs.forget(tunnel.host)
        for endpoint in list(tunnel.endpoints):
            endpoint.abort(ErrorCode.TUNNEL_CLOSED, "tunnel closed")
        if notify and session.proto.state in (SessionState.OPEN, SessionState.CLOSING):
            session.proto.unbound(tunnel.id, reason)
            session.flush()
        stats = tunnel.stats
        logger.info(
            "tunnel %s closed (%s): %d connections, %d bytes in, %d bytes out",
            tunnel.id,
            reason,
            stats.total_connections,
            stats.bytes_in,
            stats.bytes_out,
        )

    def _port_range(self) -> str:
        low, high = self.config.tcp_ports
        return f"{low}-{high}"

    async def _listen_tcp(self, tunnel: RelayTunnel, wanted: int | None) -> None:
        """Listen for the tunnel on ``wanted`` (resuming) or a random port of the range."""
        loop = asyncio.get_running_loop()
        low, high = self.config.tcp_ports
        host = self.config.tcp_host or self.config.host
        last: OSError = OSError(errno.EADDRINUSE, "every port tried was in use")
        candidates = [wanted] if wanted is not None and low <= wanted <= high else []
        candidates += [random.randint(low, high) for _ in range(min(TCP_PORT_ATTEMPTS, high - low + 1))]
        for port in candidates:
            try:
                server = await loop.create_server(
                    lambda: _TcpAccept(self, tunnel), host, port, reuse_address=True, backlog=BACKLOG
                )
            except OSError as exc:
                last = exc
                continue
            tunnel.tcp_server = server
            tunnel.tcp_port = port
            return
        raise last


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _reset_socket(conn: socket.socket) -> None:
    """Close with RST: a refused client learns at once, and no TIME_WAIT is left here."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass
    conn.close()
