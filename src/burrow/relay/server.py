"""The relay: public TLS and TCP listeners, the agent endpoint, the tunnel registry.

One TLS listener serves everyone. The SNI callback routes each handshake:

- ``<domain>`` itself with ALPN ``burrow/1``: an agent; the connection becomes
  a :class:`RelaySession`.
- ``<id>.<domain>`` of an open tunnel: a public client; the connection becomes
  a stream on the session that owns the tunnel.
- anything else (unknown id, no SNI, an IP literal): the handshake is refused
  with ``unrecognized_name`` and nothing is routed.

Raw TCP tunnels get their own listener on a random port of the configured range.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import random
import secrets
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, cast

from ..connection import SessionConnection, StreamEndpoint, TrafficStats
from ..errors import ConfigurationError
from ..protocol import events as ev
from ..protocol.frames import ErrorCode
from ..protocol.session import Role, SessionProtocol, SessionState
from .config import HELLO_TIMEOUT, TCP_PORT_ATTEMPTS, RelayConfig
from .tls import AGENT_ALPN, CertificateStore

logger = logging.getLogger(__name__)

ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
#: 36**14 > 2**72: unguessable (the reference uses the same shape), and a DNS label.
ID_LENGTH = 14

#: Pending connections the kernel queues per listener before refusing.
BACKLOG = 1024


def new_tunnel_id() -> str:
    """14 base36 characters from the OS CSPRNG."""
    value = secrets.randbelow(len(ID_ALPHABET) ** ID_LENGTH)
    chars = []
    for _ in range(ID_LENGTH):
        value, digit = divmod(value, len(ID_ALPHABET))
        chars.append(ID_ALPHABET[digit])
    return "".join(chars)


def format_peer(transport: asyncio.BaseTransport) -> str:
    """``host:port`` of the remote end, ``[v6]:port`` for IPv6."""
    peer = transport.get_extra_info("peername")
    if not peer:
        return "unknown"
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(eq=False)
class RelayTunnel:
    """One open tunnel at the relay."""

    id: str
    host: str  # <id>.<domain>
    session: RelaySession
    local_port: int  # the agent's port, for logs
    h2: bool
    unencrypted: bool
    tcp_server: asyncio.Server | None = None
    tcp_port: int | None = None
    stats: TrafficStats = field(default_factory=TrafficStats)
    endpoints: set[PublicEndpoint] = field(default_factory=set)


class PublicEndpoint(StreamEndpoint):
    """A public client's connection, peered with a stream to the agent."""

    def __init__(self, tunnel: RelayTunnel, stream_id: int) -> None:
        super().__init__(tunnel.session, stream_id, tunnel.stats, inbound=True)
        self.tunnel = tunnel
        tunnel.endpoints.add(self)

    def _finish(self) -> None:
        super()._finish()
        self.tunnel.endpoints.discard(self)


class RelaySession(SessionConnection):
    """The relay's end of one agent session."""

    def __init__(self, relay: Relay, peer: str) -> None:
        super().__init__(SessionProtocol(Role.RELAY, window=relay.config.window), name=secrets.token_hex(4))
        self.relay = relay
        self.peer = peer
        self.tunnels: dict[str, RelayTunnel] = {}
        self._hello_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.relay.sessions.add(self)
        loop = asyncio.get_running_loop()
        self._hello_timer = loop.call_later(HELLO_TIMEOUT, self._hello_timeout)

    def _hello_timeout(self) -> None:
        if self.proto.state is SessionState.HANDSHAKE:
            logger.info("refused agent %s: no HELLO within %.0f s", self.peer, HELLO_TIMEOUT)
            self.close(ErrorCode.TIMEOUT, "no HELLO in time")

    def handle_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.HelloReceived):
            self._on_hello(event)
        elif isinstance(event, ev.BindRequested):
            asyncio.get_running_loop().create_task(self.relay.bind(self, event))
        elif isinstance(event, ev.UnbindRequested):
            tunnel = self.tunnels.get(event.tunnel_id)
            if tunnel is not None:
                self.relay.close_tunnel(tunnel, "closed by the agent")
            else:
                self.proto.unbound(event.tunnel_id, "unknown tunnel")
        elif isinstance(event, ev.GoAwayReceived):
            logger.info("session %s: agent said goodbye (%s)", self.name, event.reason or event.code)
            if self.transport is not None:
                self.transport.close()

    def _on_hello(self, event: ev.HelloReceived) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if not self.relay.token_ok(event.token):
            logger.warning("refused agent %s: wrong token", self.peer)
            self.proto.reject(ErrorCode.AUTH_FAILED, "the relay rejected the token")
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        self.proto.welcome(self.name, {"domain": self.relay.config.domain, "tls_port": self.relay.public_port})
        logger.info("session %s opened by agent %s (%s)", self.name, self.peer, event.agent)

    def session_closed(self, exc: Exception | None) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self.relay.sessions.discard(self)
        for tunnel in list(self.tunnels.values()):
            self.relay.close_tunnel(tunnel, "session ended", notify=False)
        if self.proto.state is not SessionState.HANDSHAKE:
            logger.info("session %s closed", self.name)


class _Dispatcher(asyncio.Protocol):
    """First protocol of every TLS connection: hands it to a session or a tunnel."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        sslobj = transport.get_extra_info("ssl_object")
        host = getattr(sslobj, "burrow_host", None)
        relay = self.relay
        if host == relay.config.domain:
            if sslobj.selected_alpn_protocol() != AGENT_ALPN:
                logger.info("refused %s: connected to %s without ALPN %s", format_peer(transport), host, AGENT_ALPN)
                transport.close()
                return
            session = RelaySession(relay, format_peer(transport))
            transport.set_protocol(session)
            session.connection_made(transport)
            return
        tunnel = relay.by_host.get(host) if host else None
        if tunnel is None:  # closed during the handshake
            transport.close()
            return
        relay.attach_public(tunnel, transport)


class _TcpAccept(asyncio.Protocol):
    """First protocol of a raw TCP tunnel connection."""

    def __init__(self, relay: Relay, tunnel: RelayTunnel) -> None:
        self.relay = relay
        self.tunnel = tunnel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.relay.attach_public(self.tunnel, transport)


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
        self._servers: list[asyncio.Server] = []
        self._issued: set[str] = set()  # every id ever handed out: never reused
        self._tokens = [t.encode() for t in self.config.tokens]

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> Relay:
        """Bind the TLS listener; returns once connections are accepted."""
        loop = asyncio.get_running_loop()
        config = self.config
        self.certs = CertificateStore(config)
        context = self.certs.agent_context
        context.sni_callback = self._on_sni
        try:
            server = await loop.create_server(
                lambda: _Dispatcher(self),
                config.host,
                config.port,
                ssl=context,
                ssl_handshake_timeout=config.handshake_timeout,
                reuse_address=True,
                backlog=BACKLOG,
            )
        except OSError as exc:
            self.certs.close()
            raise ConfigurationError(
                f"cannot listen on {config.host}:{config.port} ({exc.strerror or exc}); choose another --listen"
            ) from None
        self._servers.append(server)
        self.port = server.sockets[0].getsockname()[1]
        if config.also_ipv6 and config.host == "127.0.0.1" and socket.has_ipv6:
            try:  # so that <id>.localhost works for clients that try ::1 first
                self._servers.append(
                    await loop.create_server(
                        lambda: _Dispatcher(self),
                        "::1",
                        self.port,
                        ssl=context,
                        ssl_handshake_timeout=config.handshake_timeout,
                        reuse_address=True,
                        backlog=BACKLOG,
                    )
                )
            except OSError:
                pass
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
    def ca_path(self) -> Any:
        """The dev CA certificate file, when this relay uses the dev CA."""
        return self.certs.ca_path if self.certs is not None else None

    def close(self) -> None:
        """Stop listening, close every tunnel and session."""
        for server in self._servers:
            server.close()
        for tunnel in list(self.tunnels.values()):
            self.close_tunnel(tunnel, "relay shutting down")
        for session in list(self.sessions):
            session.close(ErrorCode.SHUTDOWN, "relay shutting down")
        if self.certs is not None:
            self.certs.close()

    async def wait_closed(self) -> None:
        """Wait until the listeners are closed."""
        for server in self._servers:
            await server.wait_closed()

    async def __aenter__(self) -> Relay:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    # ------------------------------------------------------------------ routing

    def token_ok(self, token: str) -> bool:
        """True when no token is configured, or ``token`` is one of them (constant time)."""
        if not self._tokens:
            return True
        given = token.encode()
        return any(hmac.compare_digest(given, t) for t in self._tokens)

    def _on_sni(self, sslobj: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> int | None:
        if name is None:
            logger.info("refused TLS handshake: no SNI")
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        host = name.lower().rstrip(".")
        if host != self.config.domain:
            tunnel = self.by_host.get(host)
            if tunnel is None:
                logger.info("refused TLS handshake for unknown host %r", host[:253])
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            assert self.certs is not None
            sslobj.context = self.certs.tunnel_context(host, tunnel.h2)
        sslobj.burrow_host = host  # type: ignore[attr-defined]
        return None

    def attach_public(self, tunnel: RelayTunnel, transport: asyncio.Transport) -> None:
        """Turn a public connection into a stream on the tunnel's session."""
        session = tunnel.session
        if tunnel.id not in self.tunnels or session.proto.state is not SessionState.OPEN:
            transport.close()
            return
        stream_id = session.proto.open_stream(tunnel.id, format_peer(transport))
        session.flush()
        endpoint = PublicEndpoint(tunnel, stream_id)
        transport.set_protocol(endpoint)
        endpoint.connection_made(transport)

    # ------------------------------------------------------------------ tunnels

    async def bind(self, session: RelaySession, request: ev.BindRequested) -> None:
        """Open a tunnel for ``session`` and answer BOUND or BIND_FAILED."""
        if not 1 <= request.port <= 65535:
            session.proto.bind_failed(request.request_id, "bad-port", f"port {request.port} is outside 1-65535")
            session.flush()
            return
        tunnel_id = self._new_id()
        host = f"{tunnel_id}.{self.config.domain}"
        tunnel = RelayTunnel(tunnel_id, host, session, request.port, request.h2, request.unencrypted)
        if request.unencrypted:
            try:
                await self._listen_tcp(tunnel)
            except OSError as exc:
                logger.warning("session %s: no free TCP port for a tunnel: %s", session.name, exc)
                session.proto.bind_failed(
                    request.request_id, "no-tcp-port", f"relay has no free TCP port in {self._port_range()}"
                )
                session.flush()
                return
        if session.proto.state is not SessionState.OPEN:  # the session died while we listened
            if tunnel.tcp_server is not None:
                tunnel.tcp_server.close()
            return
        self.tunnels[tunnel_id] = tunnel
        self.by_host[host] = tunnel
        session.tunnels[tunnel_id] = tunnel
        info: dict[str, Any] = {"id": tunnel_id, "host": host, "port": self.public_port}
        if tunnel.tcp_port is not None:
            info["unencrypted_host"] = self.config.tcp_public_host or self.config.domain
            info["unencrypted_port"] = tunnel.tcp_port
        session.proto.bound(request.request_id, info)
        session.flush()
        logger.info(
            "tunnel %s opened by session %s: %s%s",
            tunnel_id,
            session.name,
            host,
            f" and tcp port {tunnel.tcp_port}" if tunnel.tcp_port else "",
        )

    def close_tunnel(self, tunnel: RelayTunnel, reason: str, notify: bool = True) -> None:
        """Close a tunnel: unroute it, stop its TCP listener, reset its connections."""
        if self.tunnels.pop(tunnel.id, None) is None:
            return
        self.by_host.pop(tunnel.host, None)
        tunnel.session.tunnels.pop(tunnel.id, None)
        if tunnel.tcp_server is not None:
            tunnel.tcp_server.close()
        if self.certs is not None:
            self.certs.forget(tunnel.host)
        for endpoint in list(tunnel.endpoints):
            endpoint.abort(ErrorCode.TUNNEL_CLOSED, "tunnel closed")
        session = tunnel.session
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

    def _new_id(self) -> str:
        while True:
            tunnel_id = new_tunnel_id()
            if tunnel_id not in self._issued:
                self._issued.add(tunnel_id)
                return tunnel_id

    def _port_range(self) -> str:
        low, high = self.config.tcp_ports
        return f"{low}-{high}"

    async def _listen_tcp(self, tunnel: RelayTunnel) -> None:
        loop = asyncio.get_running_loop()
        low, high = self.config.tcp_ports
        host = self.config.tcp_host or self.config.host
        last: OSError = OSError(errno.EADDRINUSE, "every port tried was in use")
        started = time.monotonic()
        for _ in range(min(TCP_PORT_ATTEMPTS, high - low + 1)):
            port = random.randint(low, high)
            try:
                server = await loop.create_server(
                    lambda: _TcpAccept(self, tunnel), host, port, reuse_address=True, backlog=BACKLOG
                )
            except OSError as exc:
                last = exc
                continue
            tunnel.tcp_server = server
            tunnel.tcp_port = port
            logger.debug("tunnel %s: tcp port %d after %.1f ms", tunnel.id, port, (time.monotonic() - started) * 1e3)
            return
        raise last
