"""The relay's data plane on asyncio: sockets, TLS, SNI routing, sessions and streams.

:class:`AsyncioPlane` is the first implementation of
:class:`~burrow.relay.plane.DataPlane`. One TLS port serves everyone. The
plane accepts each connection itself (so it knows the peer and can cap
pending handshakes per source), then runs the TLS handshake with a deadline.
The SNI callback routes it:

- ``<domain>`` itself with ALPN ``burrow/1``: an agent; the connection becomes
  an :class:`~burrow.relay.agent_connection.AgentConnection`, whose control
  requests go up to the control plane.
- ``<id>.<domain>`` of a route: a public client; the connection becomes a
  stream on the session that carries the tunnel.
- anything else (unknown id, no SNI, an IP literal): the handshake is refused
  and nothing is routed.

Raw TCP tunnels get a listener of their own, on a port the control plane
chose. The plane decides nothing about tunnels: it routes what it was told to.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import heapq
import ipaddress
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ..connection import LINGER_RESET, StreamEndpoint, TrafficStats
from ..errors import ConfigurationError
from ..logs import LogLimiter
from ..protocol.frames import ErrorCode
from ..protocol.messages import BindFailure, TunnelAddress
from ..protocol.session import SessionState
from .agent_connection import AgentConnection
from .config import RelayConfig
from .descriptors import Descriptors
from .limits import PendingHandshakes
from .plane import (
    HANDSHAKE_FAILURES,
    OPEN_LATENCY_BOUNDS,
    Census,
    ControlPlane,
    LatencyHistogram,
    LiveConnection,
    Route,
)
from .tls import AGENT_ALPN, AGENT_ALPNS, CertificateStore

logger = logging.getLogger("burrow.relay")

#: Pending connections the kernel queues per listener before refusing.
BACKLOG = 1024

#: A closing TLS connection waits this long for the peer's close_notify (asyncio's
#: default, 30 s, keeps a dead peer's socket open that long).
TLS_SHUTDOWN_TIMEOUT = 5.0

#: After accept() fails (out of file descriptors), wait this long before trying again.
ACCEPT_RETRY_DELAY = 0.1


def format_address(address: Any) -> str:
    """``host:port``, ``[v6]:port`` for IPv6."""
    if not address:
        return "unknown"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: OpenSSL's reasons for a handshake that never was TLS.
_NOT_TLS = ("HTTP_REQUEST", "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE")

UNKNOWN_NAME = "unknown or missing server name"


def _failure_kind(exc: BaseException) -> str:
    """Which of :data:`~burrow.relay.plane.HANDSHAKE_FAILURES` a failed handshake is."""
    text = str(exc)
    if "taking longer" in text or isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLEOFError | ConnectionError) or not isinstance(exc, ssl.SSLError):
        return "closed"
    reason = exc.reason or ""
    if reason == "NO_APPLICATION_PROTOCOL":
        return "alpn"
    if "ALERT" in reason:
        return "client_alert"
    if reason in _NOT_TLS:
        return "not_tls"
    return "protocol"


def _refusal_reason(exc: BaseException) -> str:
    text = str(exc)
    if "CALLBACK_FAILED" in text:
        return UNKNOWN_NAME
    if "taking longer" in text or isinstance(exc, TimeoutError):
        return "no TLS handshake in time"
    return f"{type(exc).__name__}: {text}"[:200]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _both_stacks(host: str) -> bool:
    """``::`` is every address, IPv4 too: one listener serves both stacks (a given IPv6 address
    is that address only), as in the native engine."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # (a name)
        return False
    return address.version == 6 and address.is_unspecified


def _canonical(address: Any) -> Any:
    """An IPv4 client of a dual-stack listener as itself (1.2.3.4, not ::ffff:1.2.3.4)."""
    if address and isinstance(address[0], str) and address[0].startswith("::ffff:") and "." in address[0]:
        return (address[0][len("::ffff:") :], *address[1:2])
    return address


def reset_socket(conn: socket.socket) -> None:
    """Close with RST: a refused client learns at once, and no TIME_WAIT is left here."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass
    conn.close()


@dataclass(eq=False)
class RoutedTunnel:
    """What the data plane holds for one tunnel: its route, listener, connections and counters."""

    tunnel_id: str
    route: Route | None = None  # None while only its TCP listener exists (bind in progress)
    tcp_listeners: list[socket.socket] = field(default_factory=list)  # its raw TCP port (v4, and v6 on dev)
    tcp_accepting: list[asyncio.Task[None]] = field(default_factory=list)

    def stop_listening(self) -> None:
        """Close the raw TCP listeners, if any."""
        for task in self.tcp_accepting:
            task.cancel()
        for listener in self.tcp_listeners:
            listener.close()
        self.tcp_accepting.clear()
        self.tcp_listeners.clear()

    stats: TrafficStats = field(default_factory=TrafficStats)
    endpoints: set[PublicEndpoint] = field(default_factory=set)


class PublicEndpoint(StreamEndpoint):
    """A public client's connection, peered with a stream to the agent; its own bytes counted
    too, for the operator's listing."""

    def __init__(self, session: AgentConnection, stream_id: int, tunnel: RoutedTunnel, peer: str) -> None:
        super().__init__(session, stream_id, tunnel.stats, inbound=True)
        self.tunnel = tunnel
        self.peer = peer
        self.opened = time.monotonic()
        self.bytes_in = self.bytes_out = 0
        tunnel.endpoints.add(self)

    def buffer_updated(self, nbytes: int) -> None:
        if not (self.done or self.sent_fin):
            self.bytes_in += nbytes
        super().buffer_updated(nbytes)

    def deliver(self, data: bytes | bytearray | memoryview) -> None:
        self.bytes_out += len(data)
        super().deliver(data)

    def _finish(self) -> None:
        super()._finish()
        self.tunnel.endpoints.discard(self)


class _Dispatcher(asyncio.Protocol):
    """First protocol of every TLS connection: hands it to a session or a tunnel."""

    def __init__(self, plane: AsyncioPlane, peer: str, release: Callable[[], None], accepted: float) -> None:
        self.plane = plane
        self.peer = peer
        self.accepted = accepted
        self.release = release  # frees the connection's pending-handshake slot
        self.keeps_slot = False  # an agent keeps it until it is welcomed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        sslobj = transport.get_extra_info("ssl_object")
        host = getattr(sslobj, "burrow_host", None)
        plane = self.plane
        if host == plane.config.domain:
            if sslobj.selected_alpn_protocol() not in AGENT_ALPNS:
                plane.handshake_counts["alpn"] += 1
                plane.refusals.log(
                    "alpn", logging.INFO, "refused %s: connected to %s without ALPN %s", self.peer, host, AGENT_ALPN
                )
                transport.close()
                return
            session = AgentConnection(plane.config, plane.control, plane.sessions, self.peer, self.release)
            self.keeps_slot = True
            transport.set_protocol(session)
            session.connection_made(transport)
            return
        tunnel = plane.by_host.get(host) if host else None
        if tunnel is None:  # closed during the handshake
            transport.close()
            return
        plane.attach_public(tunnel, transport, self.peer, self.accepted)


class _TcpAccept(asyncio.Protocol):
    """First protocol of a raw TCP tunnel connection."""

    def __init__(self, plane: AsyncioPlane, tunnel: RoutedTunnel, peer: str, accepted: float) -> None:
        self.plane = plane
        self.tunnel = tunnel
        self.peer = peer
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.plane.attach_public(self.tunnel, cast(asyncio.Transport, transport), self.peer, self.accepted)


class AsyncioPlane:
    """The relay's data plane on one asyncio event loop (see the module docstring)."""

    def __init__(self, config: RelayConfig, control: ControlPlane, descriptors: Descriptors) -> None:
        self.config = config
        self.control = control
        self.descriptors = descriptors
        self.sessions: dict[str, AgentConnection] = {}
        self.tunnels: dict[str, RoutedTunnel] = {}
        self.by_host: dict[str, RoutedTunnel] = {}
        self.certs: CertificateStore | None = None
        self.pending = PendingHandshakes(config.max_pending_handshakes, config.max_pending_per_source)
        self.refusals = LogLimiter(logger)
        self.handshake_counts: Counter[str] = Counter()  # by HANDSHAKE_FAILURES reason
        self._latency_counts = [0] * (len(OPEN_LATENCY_BOUNDS) + 1)
        self._latency_sum = 0.0
        self._listeners: list[socket.socket] = []
        self._ports: list[int] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- lifecycle

    @property
    def ports(self) -> Sequence[int]:
        return self._ports

    @property
    def per_host_certificates(self) -> bool:
        return self.certs is not None and self.certs.per_host

    @property
    def access_control(self) -> bool:
        return False  # (the native engine's: this engine is on its way out)

    @property
    def ca_path(self) -> Path | None:
        return self.certs.ca_path if self.certs is not None else None

    async def start(self) -> None:
        config = self.config
        self.certs = CertificateStore(config)
        self.certs.agent_context.sni_callback = self._on_sni
        try:
            first = socket.create_server(
                (config.host, config.port),
                backlog=BACKLOG,
                family=_family(config.host),
                dualstack_ipv6=_both_stacks(config.host),
            )
        except OSError as exc:
            self.certs.close()
            raise ConfigurationError(
                f"cannot listen on {config.host}:{config.port} ({(exc.strerror or str(exc)).lower()}); "
                "choose another --listen"
            ) from None
        self._listeners.append(first)
        port = first.getsockname()[1]
        self._ports.append(port)
        if config.also_ipv6 and config.host == "127.0.0.1" and socket.has_ipv6:
            try:  # so that <id>.localhost works for clients that try ::1 first
                self._listeners.append(socket.create_server(("::1", port), backlog=BACKLOG, family=socket.AF_INET6))
            except OSError:
                pass
        for listener in self._listeners:
            listener.setblocking(False)
            self.spawn(self._accept_loop(listener))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task the plane keeps (cancelled when it stops listening); its failure is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)  # (a tunnel's accept loop is not in it: its tunnel holds it)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.error("relay task failed: %s: %s", type(exc).__name__, exc, exc_info=exc)

    def reload_certificate(self, chain: bytes, key: bytes) -> None:
        if self.certs is not None:
            self.certs.reload(chain, key)

    def stop_listening(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for tunnel in self.tunnels.values():
            tunnel.stop_listening()

    def goaway(self, code: ErrorCode, reason: str) -> None:
        for session in list(self.sessions.values()):
            session.proto.goaway(code, reason)
            session.flush()

    def open_streams(self) -> int:
        return sum(len(s.endpoints) for s in self.sessions.values())

    def session_ids(self) -> list[str]:
        return list(self.sessions)

    def census(self) -> Census:
        identities = len(self.certs._cache) if self.certs is not None else 0
        return Census(len(self.sessions), len(self.tunnels), identities)

    def buffered(self, tunnel_id: str) -> int:
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None:
            return 0
        return sum(e.transport.get_write_buffer_size() for e in tunnel.endpoints if e.transport is not None)

    def handshake_failures(self) -> dict[str, int]:
        return {reason: self.handshake_counts[reason] for reason in HANDSHAKE_FAILURES}

    def open_latency(self) -> LatencyHistogram:
        return LatencyHistogram(OPEN_LATENCY_BOUNDS, tuple(self._latency_counts), self._latency_sum)

    def connections(self, tunnel_id: str, limit: int) -> tuple[int, list[LiveConnection]]:
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None:
            return 0, []
        now = time.monotonic()
        oldest = heapq.nsmallest(limit, tunnel.endpoints, key=lambda e: e.opened)
        listed = [LiveConnection(e.peer, e.bytes_in, e.bytes_out, now - e.opened) for e in oldest]
        return len(tunnel.endpoints), listed

    def close(self) -> None:
        self.stop_listening()
        for tunnel_id in list(self.tunnels):
            self.remove_route(tunnel_id)
        for session in list(self.sessions.values()):
            session.close(ErrorCode.SHUTDOWN, "relay shutting down")
        if self.certs is not None:
            self.certs.close()

    # ---------------------------------------------------------------- accepting

    async def _accept_loop(self, listener: socket.socket, tunnel: RoutedTunnel | None = None) -> None:
        """Accept on the TLS port (``tunnel`` None) or on a raw TCP tunnel's port.

        Our own loop, not ``create_server``: uvloop closes a server's listener
        for good when accept() fails for want of descriptors, and a tunnel would
        keep a port nobody listens on. Here the loop waits and tries again.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(listener)
                address = _canonical(address)
                accepted = time.monotonic()
            except OSError as exc:  # EMFILE/ENFILE: wait for descriptors rather than spin
                if listener.fileno() < 0:
                    return
                self.refusals.log("accept", logging.WARNING, "accept failed: %s", exc)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            refusal = self.descriptors.refuse_connection(conn.fileno())
            if refusal is None and tunnel is None:
                refusal = self.pending.admit(address[0])
            if refusal is not None:
                reset_socket(conn)
                self.refusals.log("refused", logging.WARNING, "refused %s: %s", format_address(address), refusal)
                continue
            if tunnel is None:
                self.spawn(self._handshake(conn, address, accepted))
                continue
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (see _handshake)
                peer = format_address(address)
                await loop.connect_accepted_socket(lambda: _TcpAccept(self, tunnel, peer, accepted), conn)  # noqa: B023
            except OSError as exc:
                conn.close()
                self.refusals.log("accept", logging.INFO, "dropped %s: %s", format_address(address), exc)

    async def _handshake(self, conn: socket.socket, address: Any, accepted: float) -> None:
        """TLS, then hand the connection over; its pending slot is freed here, or at its WELCOME.

        An agent's connection stays counted as pending until it is welcomed
        (or goes), so connections that finish TLS and then say nothing (or
        send a refused token) are capped with the handshakes, overall and per
        source.
        """
        peer = format_address(address)
        loop = asyncio.get_running_loop()
        assert self.certs is not None
        pending, source = self.pending, address[0]
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                pending.done(source)

        dispatcher = _Dispatcher(self, peer, release, accepted)
        try:
            # Nagle off: the tunnel forwards what it reads at once. Every other socket
            # comes from create_server or create_connection, which set it (asyncio and
            # uvloop alike); asyncio's connect_accepted_socket does not (proto is 0)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.connect_accepted_socket(
                lambda: dispatcher,
                conn,
                ssl=self.certs.agent_context,
                ssl_handshake_timeout=self.config.handshake_timeout,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            conn.close()
            reason = _refusal_reason(exc)
            if reason != UNKNOWN_NAME:  # (_on_sni counted it, telling a missing name from an unknown one)
                self.handshake_counts[_failure_kind(exc)] += 1
            self.refusals.log("handshake", logging.INFO, "refused TLS handshake from %s: %s", peer, reason)
        except asyncio.CancelledError:
            conn.close()
            raise
        finally:
            if not dispatcher.keeps_slot:
                release()

    def _on_sni(self, sslobj: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> int | None:
        if name is None:
            self.handshake_counts["no_server_name"] += 1
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        host = name.lower().rstrip(".")
        if host != self.config.domain:
            tunnel = self.by_host.get(host)
            if tunnel is None or tunnel.route is None:
                logger.debug("TLS handshake for unknown host %r", host[:253])
                self.handshake_counts["unknown_server_name"] += 1
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            assert self.certs is not None
            sslobj.context = self.certs.tunnel_context(host, tunnel.route.h2)
        sslobj.burrow_host = host  # type: ignore[attr-defined]
        return None

    def attach_public(self, tunnel: RoutedTunnel, transport: asyncio.Transport, peer: str, accepted: float) -> None:
        """Turn a public connection into a stream on the tunnel's session (within the caps)."""
        route = tunnel.route
        session = self.sessions.get(route.session_id) if route is not None else None
        if route is None or session is None or session.proto.state is not SessionState.OPEN:
            transport.close()
            return
        config = self.config
        if len(tunnel.endpoints) >= config.max_streams_per_tunnel:
            refusal = f"tunnel {route.tunnel_id} has {len(tunnel.endpoints)} open connections (limit)"
        elif session.proto.stream_count >= config.max_streams_per_session:
            refusal = f"session {session.name} has {session.proto.stream_count} open streams (limit)"
        else:
            refusal = ""
        if refusal:
            transport.close()
            self.refusals.log("streams", logging.WARNING, "refused %s: %s", peer, refusal)
            return
        stream_id = session.proto.open_stream(route.tunnel_id, peer)
        waited = time.monotonic() - accepted
        self._latency_counts[bisect.bisect_left(OPEN_LATENCY_BOUNDS, waited)] += 1
        self._latency_sum += waited
        endpoint = PublicEndpoint(session, stream_id, tunnel, peer)
        transport.set_protocol(endpoint)
        endpoint.connection_made(transport)
        endpoint.read_now()  # a raw TCP client's first bytes go out with the OPEN
        session.flush()

    # ------------------------------------------------------------------ routes

    async def prepare_host(self, host: str) -> None:
        assert self.certs is not None
        certs = self.certs
        # issuing a certificate and loading it costs ~3 ms, mostly OpenSSL parsing PEM,
        # which releases the GIL: a worker thread keeps the loop free meanwhile
        context = await asyncio.get_running_loop().run_in_executor(None, certs.make_context, host, False)
        certs.keep(host, False, context)

    async def listen_tcp(self, tunnel_id: str, ports: Sequence[int]) -> int:
        if tunnel_id in self.tunnels:  # a rival bind for the same id got here first
            raise OSError(errno.EADDRINUSE, f"tunnel {tunnel_id} already has a route or a listener")
        tunnel = self.tunnels[tunnel_id] = RoutedTunnel(tunnel_id)
        host = self.config.tcp_host or self.config.host
        hosts = [host]
        if self.config.also_ipv6 and host == "127.0.0.1" and socket.has_ipv6:
            # the address given is "localhost" (the domain): it must answer on ::1 too,
            # for the clients that try IPv6 first
            hosts.append("::1")
        last: OSError = OSError("no port to try")
        loop = asyncio.get_running_loop()
        for port in ports:
            try:
                # sockets of our own: create_server(host, port) would skip an address
                # whose socket() fails (EMFILE) and return a server holding nothing
                for address in hosts:
                    tunnel.tcp_listeners.append(_tcp_listener(address, port))
            except OSError as exc:  # (this port is taken on one of them: try the next)
                tunnel.stop_listening()
                last = exc
                continue
            for listener in tunnel.tcp_listeners:
                task = loop.create_task(self._accept_loop(listener, tunnel))
                task.add_done_callback(self._task_done)
                tunnel.tcp_accepting.append(task)
            return port
        if tunnel.route is None:
            self.tunnels.pop(tunnel_id, None)
        raise last

    async def listen_tls(self, tunnel_id: str, ports: Sequence[int]) -> int:
        # (the embedded relay's https://localhost:PORT is the native engine's; this one gives
        # tunnels their SNI URL only, as before)
        raise OSError(errno.EOPNOTSUPP, "the asyncio engine gives no tunnel a TLS port of its own")

    def add_route(self, route: Route) -> None:
        tunnel = self.tunnels.setdefault(route.tunnel_id, RoutedTunnel(route.tunnel_id))
        tunnel.route = route
        self.by_host[route.host] = tunnel

    def remove_route(self, tunnel_id: str) -> None:
        tunnel = self.tunnels.pop(tunnel_id, None)
        if tunnel is None:
            return
        tunnel.stop_listening()
        if tunnel.route is not None:
            self.by_host.pop(tunnel.route.host, None)
            if self.certs is not None:
                self.certs.forget(tunnel.route.host)
        for endpoint in list(tunnel.endpoints):
            endpoint.abort(ErrorCode.TUNNEL_CLOSED, "tunnel closed")

    def stats(self, tunnel_id: str) -> TrafficStats:
        tunnel = self.tunnels.get(tunnel_id)
        return tunnel.stats if tunnel is not None else TrafficStats()

    # ---------------------------------------------------------------- sessions

    def session_open(self, session_id: str) -> bool:
        session = self.sessions.get(session_id)
        return session is not None and session.proto.state is SessionState.OPEN

    def _answering(self, session_id: str) -> AgentConnection | None:
        """The session, if it may still be answered (OPEN or CLOSING)."""
        session = self.sessions.get(session_id)
        if session is None or session.proto.state not in (SessionState.OPEN, SessionState.CLOSING):
            return None
        return session

    def welcome(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None and session.proto.state is SessionState.HELLO_RECEIVED:
            session.proto.welcome(session_id)
            session.flush()
            # (a refused agent keeps its slot until its link is gone: a flood of bad
            # tokens stays within the pending caps while each closes)
            session.release()

    def reject(self, session_id: str, code: ErrorCode, reason: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.proto.reject(code, reason)
            session.flush()
            if session.transport is not None:
                session.transport.close()

    def bound(self, session_id: str, request_id: int, tunnel: TunnelAddress) -> None:
        session = self._answering(session_id)
        if session is not None:
            session.proto.bound(request_id, tunnel)
            session.flush()

    def bind_failed(self, session_id: str, request_id: int, code: BindFailure, message: str) -> None:
        session = self._answering(session_id)
        if session is not None:
            session.proto.bind_failed(request_id, code, message)
            session.flush()

    def unbound(self, session_id: str, tunnel_id: str, reason: str) -> None:
        session = self._answering(session_id)
        if session is not None:
            session.proto.unbound(tunnel_id, reason)
            session.flush()

    def close_session(self, session_id: str, code: ErrorCode, reason: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.proto.goaway(code, reason)
            session.flush()
            if session.transport is not None:
                session.transport.abort()


def _tcp_listener(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or OSError (in use, out of descriptors)."""
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets that say they are TCP
    sock = socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if _both_stacks(host) else 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
