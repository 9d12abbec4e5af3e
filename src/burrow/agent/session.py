"""The agent's end of a session: connect, bind tunnels, dial the local service per stream."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from ..connection import SessionConnection, StreamEndpoint, TrafficStats
from ..errors import AuthenticationFailed, RelayUnavailable, SessionClosed, TunnelRefused
from ..protocol import events as ev
from ..protocol.frames import ErrorCode, code_name
from ..protocol.session import Role, SessionProtocol, SessionState
from .config import AgentSettings

logger = logging.getLogger(__name__)

#: How long connecting (TCP, TLS and HELLO) to a relay may take.
CONNECT_TIMEOUT = 10.0
#: How long the relay has to answer a BIND or UNBIND.
REQUEST_TIMEOUT = 10.0

#: The service may listen on IPv4 or IPv6 loopback; nothing else is ever dialled.
LOCAL_HOSTS = ("127.0.0.1", "::1")

AGENT_NAME = "burrow-python"


@dataclass(eq=False)
class AgentTunnel:
    """The agent's record of one open tunnel."""

    id: str
    local_port: int
    info: dict[str, Any]
    stats: TrafficStats = field(default_factory=TrafficStats)
    closed: bool = False


class LocalEndpoint(StreamEndpoint):
    """A connection to the local service, dialled when the relay opens a stream.

    Until the dial completes, DATA is kept (at most one window: no credit is
    granted for it until it is written) and a FIN is remembered.
    """

    def __init__(self, session: AgentSession, stream_id: int, tunnel: AgentTunnel) -> None:
        super().__init__(session, stream_id, tunnel.stats, inbound=False)
        self.early: list[bytes] = []
        self.early_fin = False
        self.dial: asyncio.Task[None] | None = None

    def deliver(self, data: bytes) -> None:
        if self.transport is None:
            self.early.append(data)
        else:
            super().deliver(data)

    def peer_fin(self) -> None:
        if self.transport is None:
            self.early_fin = True
        else:
            super().peer_fin()

    def peer_reset(self, code: int = ErrorCode.CANCELLED) -> None:
        if self.dial is not None:
            self.dial.cancel()
        super().peer_reset(code)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        early, self.early = self.early, []
        for data in early:
            super().deliver(data)
        if self.early_fin:
            super().peer_fin()

    async def connect(self, port: int) -> None:
        """Dial the service on loopback; reset the stream if nothing listens."""
        loop = asyncio.get_running_loop()
        error: OSError | None = None
        for host in LOCAL_HOSTS:
            try:
                await loop.create_connection(lambda: self, host, port)
                return
            except OSError as exc:
                error = exc
        if not self.done:
            logger.info("stream %d: nothing accepts on local port %d (%s)", self.stream_id, port, error)
            self.abort(ErrorCode.REFUSED, f"local port {port} refused the connection")


class AgentSession(SessionConnection):
    """One authenticated session to a relay, carrying every tunnel of this process there."""

    def __init__(self, settings: AgentSettings) -> None:
        super().__init__(SessionProtocol(Role.AGENT, window=settings.window), name=str(settings.relay))
        self.settings = settings
        self.tunnels: dict[str, AgentTunnel] = {}
        self.welcome: asyncio.Future[ev.Welcomed] = asyncio.get_running_loop().create_future()
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._unbinds: dict[str, asyncio.Future[None]] = {}
        self._ids = itertools.count(1)
        self.close_reason = ""

    @classmethod
    async def connect(cls, settings: AgentSettings) -> AgentSession:
        """Open the TLS connection, say HELLO, wait for WELCOME; errors name the cause."""
        address = settings.relay
        assert address is not None
        loop = asyncio.get_running_loop()
        context = settings.ssl_context()
        host = address.connect_host or address.host
        if host.endswith(".localhost"):  # RFC 6761: localhost names are loopback, resolver or not
            host = "127.0.0.1"
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, session = await loop.create_connection(
                    lambda: cls(settings), host, address.port, ssl=context, server_hostname=address.host
                )
                session.proto.hello(settings.token, AGENT_NAME)
                session.flush()
                await session.welcome
        except ssl.SSLCertVerificationError as exc:
            raise RelayUnavailable(
                f"cannot trust relay {address} ({exc.verify_message}); set BURROW_CA to its CA certificate"
            ) from None
        except ssl.SSLError as exc:
            raise RelayUnavailable(
                f"relay {address} refused the TLS handshake ({exc.reason}); check that BURROW_RELAY names "
                "the relay's domain"
            ) from None
        except socket.gaierror as exc:
            raise RelayUnavailable(f"cannot resolve relay {address} ({exc.strerror}); check BURROW_RELAY") from None
        except TimeoutError:
            raise RelayUnavailable(f"relay {address} did not answer within {CONNECT_TIMEOUT:.0f} s") from None
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise RelayUnavailable(f"cannot reach relay {address} ({reason}); check BURROW_RELAY") from None
        logger.debug("session %s: connected to relay %s", session.welcome.result().session_id, address)
        return session

    # ------------------------------------------------------------------ tunnels

    async def bind(self, port: int, unencrypted: bool, h2: bool) -> AgentTunnel:
        """Ask the relay for a tunnel to local ``port``."""
        self._check_open()
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        self.proto.bind(request_id, port, unencrypted=unencrypted, h2=h2)
        self.flush()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                info = await future
        except TimeoutError:
            raise RelayUnavailable(f"relay {self.name} did not answer within {REQUEST_TIMEOUT:.0f} s") from None
        finally:
            self._requests.pop(request_id, None)
        tunnel = AgentTunnel(info["id"], port, info)
        self.tunnels[tunnel.id] = tunnel
        return tunnel

    async def unbind(self, tunnel: AgentTunnel) -> None:
        """Close a tunnel at the relay and wait for it to confirm."""
        if tunnel.closed or self.proto.state not in (SessionState.OPEN, SessionState.CLOSING):
            self._forget(tunnel)
            return
        future = self._unbinds.get(tunnel.id)
        if future is None:
            future = self._unbinds[tunnel.id] = asyncio.get_running_loop().create_future()
            self.proto.unbind(tunnel.id)
            self.flush()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await asyncio.shield(future)
        except (TimeoutError, SessionClosed):
            pass
        self._forget(tunnel)

    def _forget(self, tunnel: AgentTunnel) -> None:
        tunnel.closed = True
        self.tunnels.pop(tunnel.id, None)
        self._unbinds.pop(tunnel.id, None)

    def _check_open(self) -> None:
        if self.proto.state is not SessionState.OPEN:
            raise SessionClosed(f"session to relay {self.name} is closed ({self.close_reason or 'link lost'})")

    # ------------------------------------------------------------------- events

    def handle_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.StreamOpened):
            self._on_stream(event)
        elif isinstance(event, ev.Welcomed):
            if not self.welcome.done():
                self.welcome.set_result(event)
        elif isinstance(event, ev.Bound):
            self._resolve(event.request_id, event.tunnel, None)
        elif isinstance(event, ev.BindFailed):
            self._resolve(
                event.request_id, None, TunnelRefused(f"relay {self.name} refused the tunnel: {event.message}")
            )
        elif isinstance(event, ev.Unbound):
            tunnel = self.tunnels.get(event.tunnel_id)
            if tunnel is not None:
                tunnel.closed = True
            future = self._unbinds.get(event.tunnel_id)
            if future is not None and not future.done():
                future.set_result(None)
            elif tunnel is not None:
                logger.warning("tunnel %s closed by the relay: %s", event.tunnel_id, event.reason)
        elif isinstance(event, ev.GoAwayReceived):
            self.close_reason = event.reason or code_name(event.code)
            if event.code == ErrorCode.AUTH_FAILED and not self.welcome.done():
                self.welcome.set_exception(
                    AuthenticationFailed(f"relay {self.name} rejected the token; check BURROW_TOKEN")
                )
            elif event.code == ErrorCode.UNSUPPORTED_VERSION and not self.welcome.done():
                self.welcome.set_exception(RelayUnavailable(f"relay {self.name}: {event.reason}"))
            if self.transport is not None and self.proto.state is SessionState.CLOSED:
                self.transport.close()

    def _resolve(self, request_id: int, info: dict[str, Any] | None, error: Exception | None) -> None:
        future = self._requests.get(request_id)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(info or {})

    def _on_stream(self, event: ev.StreamOpened) -> None:
        tunnel = self.tunnels.get(event.tunnel_id)
        if tunnel is None or tunnel.closed:
            self.proto.send_rst(event.stream_id, ErrorCode.TUNNEL_CLOSED, "no such tunnel here")
            return
        endpoint = LocalEndpoint(self, event.stream_id, tunnel)
        endpoint.dial = asyncio.get_running_loop().create_task(endpoint.connect(tunnel.local_port))

    def session_closed(self, exc: Exception | None) -> None:
        reason = self.close_reason or "link lost"
        error = SessionClosed(f"session to relay {self.name} ended ({reason})")
        if not self.welcome.done():
            self.welcome.set_exception(error)
        futures: list[asyncio.Future[Any]] = [*self._requests.values(), *self._unbinds.values()]
        for future in futures:
            if not future.done():
                future.set_exception(error)
        for tunnel in self.tunnels.values():
            tunnel.closed = True
        if self.tunnels:
            logger.warning(
                "session to relay %s ended (%s); its %d tunnel(s) are closed", self.name, reason, len(self.tunnels)
            )
