"""The agent's end of a session: connect, bind tunnels, dial the local service per stream."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..connection import SessionConnection, StreamEndpoint, TrafficStats
from ..errors import AuthenticationFailed, RelayUnavailable, SessionClosed, TunnelRefused
from ..logs import LogLimiter
from ..protocol import events as ev
from ..protocol.frames import ErrorCode, code_name
from ..protocol.messages import ANYONE, Access, BindFailure, TunnelAddress
from ..protocol.session import Role, SessionProtocol, SessionState
from ..relay.tls import EARLY_ALPN
from ..tunnel import TunnelState
from .config import FAILOVER_AFTER, AgentSettings, RelayAddress
from .plane import SessionOwner
from .target import LOOPBACK, LocalTarget

if TYPE_CHECKING:
    from .link import RelayLink

logger = logging.getLogger(__name__)

#: A dead local service is said once a second per port, not once per connection.
_refused = LogLimiter(logger, rate=1)

#: How long connecting (TCP, TLS and HELLO) to a relay may take.
CONNECT_TIMEOUT = 10.0
#: How long the relay has to answer a BIND or UNBIND.
REQUEST_TIMEOUT = 10.0

#: How long a public connection waits for the local service to accept, by default
#: (``forward(connect_timeout=)``): long enough for a notebook or dev server started
#: right after the tunnel (a web service that answers 303 to a fresh URL).
LOCAL_CONNECT_TIMEOUT = 10.0

#: Between dials nobody answered: doubling from the first, capped at the last.
DIAL_RETRY_FIRST = 0.05
DIAL_RETRY_CAP = 1.0

#: A relay named localhost (RFC 6761) is loopback, IPv4 or IPv6, whatever the resolver says.
LOCAL_HOSTS = LOOPBACK

AGENT_NAME = "burrow-python"

#: OpenSSL's reasons for a handshake answered with bytes that are not TLS (an SSH
#: banner, an HTTP reply): BURROW_RELAY names some other service's port. (OpenSSL
#: 3.2 and later say RECORD_LAYER_FAILURE where 3.0 says WRONG_VERSION_NUMBER.)
NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"})


def dial_hosts(address: RelayAddress) -> list[str]:
    """What to dial for a relay, in order (the next one if the first refuses)."""
    host = address.connect_host or address.host
    # RFC 6761: localhost names are loopback whatever the resolver says (and need no lookup)
    return list(LOCAL_HOSTS) if host == "localhost" or host.endswith(".localhost") else [host]


@dataclass(eq=False)
class AgentTunnel:
    """The agent's record of one tunnel; it outlives sessions (reconnects keep it)."""

    target: LocalTarget
    unencrypted: bool
    h2: bool
    address: TunnelAddress | None = None  # the latest BOUND: id, addresses, ticket
    access: Access = ANYONE  # who may connect, and whether the service gets PROXY headers
    connect_timeout: float = LOCAL_CONNECT_TIMEOUT  # how long a connection waits for the service
    stats: TrafficStats = field(default_factory=TrafficStats)
    state: TunnelState = TunnelState.OPENING
    on_state: Callable[[TunnelState], None] | None = None
    link: RelayLink | None = None  # the link that carries it (another one after a failover)
    failover_after: float = FAILOVER_AFTER  # with a fleet: how long its relay may stay away before it moves
    moving: bool = False  # a fleet is placing it on a relay (its own link's reconnect leaves it alone)
    closed_reason: str = ""  # why it closed when its owner did not close it (one line)

    @property
    def relay(self) -> str:
        """The relay that serves the tunnel (``host:port``), "" before it is open."""
        return str(self.link.settings.relay) if self.link is not None else ""

    @property
    def local_port(self) -> int:
        """The port named in BIND (0 for a unix socket: the relay only records it)."""
        return self.target.port

    @property
    def id(self) -> str:
        """The tunnel's id at the relay ("" before it is bound)."""
        return self.address.id if self.address is not None else ""

    @property
    def ticket(self) -> str | None:
        """The resume ticket of the latest BOUND."""
        return self.address.ticket if self.address is not None else None

    @property
    def closed(self) -> bool:
        return self.state is TunnelState.CLOSED

    def set_state(self, state: TunnelState) -> None:
        """Move to ``state`` and tell the caller's callback (its errors are logged, not raised)."""
        if state is self.state or self.closed:
            return
        self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:
                logger.exception("tunnel %s: the on_state callback failed", self.id)


class LocalEndpoint(StreamEndpoint):
    """A connection to the local service, dialled when the relay opens a stream.

    Until the dial completes, DATA is kept (at most one window: no credit is
    granted for it until it is written) and a FIN is remembered.
    """

    def __init__(self, session: RelayConnection, stream_id: int, tunnel: AgentTunnel) -> None:
        super().__init__(session, stream_id, tunnel.stats, inbound=False)
        self.early: list[bytes | bytearray | memoryview] = []
        self.early_fin = False
        self.dial: asyncio.Task[None] | None = None

    def deliver(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is None:
            self.early.append(bytes(data))  # not a view: it may wait a while
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

    async def connect(self, target: LocalTarget, give_up_after: float) -> None:
        """Dial the service, again and again for up to ``give_up_after`` s; then reset the stream.

        A service that is not listening yet (started right after the tunnel)
        gets the connection once it is: what the client sent meanwhile waits
        here (at most one window: no credit is granted for it) and goes first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + give_up_after
        delay = DIAL_RETRY_FIRST
        error: OSError | None = None
        while not self.done:
            try:
                await target.dial(lambda: self)
                return
            except OSError as exc:
                error = exc
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, DIAL_RETRY_CAP)
        if not self.done:
            reason = (error.strerror or str(error)).lower() if error is not None else "refused"
            _refused.log(
                str(target),
                logging.WARNING,
                "burrow: nothing accepts on %s (%s) after %.1f s: a public connection was closed; "
                "start the service there, or forward the port it listens on",
                target,
                reason,
                give_up_after,
            )
            self.abort(ErrorCode.REFUSED, f"{target} refused the connection")


class AgentControl:
    """The session's conversation with its relay, whichever engine moves the bytes.

    HELLO, BIND and UNBIND go out through ``proto`` (the protocol's reference
    model; the native engine feeds it only control frames) and :meth:`flush`;
    WELCOME, BOUND, BIND_FAILED, UNBOUND and GOAWAY come back as events to
    :meth:`handle_event`. :class:`RelayConnection` (asyncio) and
    :class:`~burrow.agent.native_session.NativeRelayConnection` share it.
    """

    proto: SessionProtocol
    name: str

    def _init_control(self, settings: AgentSettings, owner: SessionOwner | None) -> None:
        self.settings = settings
        self.owner = owner
        self.tunnels: dict[str, AgentTunnel] = {}
        self.welcome: asyncio.Future[ev.Welcomed] = asyncio.get_running_loop().create_future()
        self._requests: dict[int, asyncio.Future[TunnelAddress]] = {}
        self._unbinds: dict[str, asyncio.Future[None]] = {}
        self._ids = itertools.count(1)
        self.close_reason = ""

    if TYPE_CHECKING:  # (each engine's class has these)

        def flush(self) -> None:
            """Send what ``proto`` has queued."""

        def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
            """End the session now (GOAWAY, then close the link)."""

    def _hang_up(self) -> None:
        """Close the link: the session is over on our side."""
        raise NotImplementedError

    def adopt(self, tunnel: AgentTunnel) -> None:
        """Serve the (bound) tunnel's streams on this session."""
        self.tunnels[tunnel.id] = tunnel

    def _on_stream(self, event: ev.StreamOpened) -> None:
        """A stream the relay opened (the asyncio engine's; the native one keeps its streams)."""
        raise NotImplementedError

    @property
    def usable(self) -> bool:
        """Requests may go out: the session is OPEN, or early requests are allowed before WELCOME."""
        state = self.proto.state
        return state is SessionState.OPEN or (state is SessionState.HANDSHAKE and self.proto.early_requests)

    # ------------------------------------------------------------------ tunnels

    async def bind(
        self, port: int, unencrypted: bool, h2: bool, ticket: str | None = None, access: Access = ANYONE
    ) -> TunnelAddress:
        """Ask the relay for a tunnel to local ``port`` (resuming with ``ticket``); return its address."""
        self._check_open()
        request_id = next(self._ids)
        future: asyncio.Future[TunnelAddress] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        self.proto.bind(request_id, port, unencrypted=unencrypted, h2=h2, ticket=ticket, access=access)
        self.flush()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                address = await future
        except TimeoutError:
            raise RelayUnavailable(f"relay {self.name} did not answer within {REQUEST_TIMEOUT:.0f} s") from None
        except SessionClosed:
            # an early request: the session may have ended on its HELLO (a refused token), say why
            if self.welcome.done() and not self.welcome.cancelled() and self.welcome.exception() is not None:
                raise self.welcome.exception() from None  # type: ignore[misc]
            raise
        finally:
            self._requests.pop(request_id, None)
        if address.access != access:
            # a relay that does not enforce what was asked (an older one ignores the fields): never
            # leave such a tunnel open, it would let in everyone the owner meant to keep out
            await self.unbind(address.id)
            raise TunnelRefused(
                f"relay {self.name} does not enforce allow_cidrs, proxy_protocol or client_ca (an older burrow); "
                "upgrade it",
                BindFailure.UNSUPPORTED,
            )
        return address

    async def unbind(self, tunnel_id: str) -> None:
        """Close a tunnel at the relay and wait (boundedly) for it to confirm."""
        self.tunnels.pop(tunnel_id, None)
        if self.proto.state not in (SessionState.OPEN, SessionState.CLOSING):
            return
        future = self._unbinds.get(tunnel_id)
        if future is None:
            future = self._unbinds[tunnel_id] = asyncio.get_running_loop().create_future()
            self.proto.unbind(tunnel_id)
            self.flush()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await asyncio.shield(future)
        except (TimeoutError, SessionClosed):
            pass
        finally:
            self._unbinds.pop(tunnel_id, None)

    def _check_open(self) -> None:
        if not self.usable:
            raise SessionClosed(f"session to relay {self.name} is closed ({self.close_reason or 'link lost'})")

    # ------------------------------------------------------------------- events

    def handle_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.StreamOpened):
            self._on_stream(event)
        elif isinstance(event, ev.Welcomed):
            if not self.welcome.done():
                self.welcome.set_result(event)
            logger.debug("session %s: welcomed by relay %s", event.session_id, self.name)
        elif isinstance(event, ev.Bound):
            self._resolve(event.request_id, event.tunnel, None)
        elif isinstance(event, ev.BindFailed):
            error = TunnelRefused(f"relay {self.name} refused the tunnel: {event.message}", event.code)
            self._resolve(event.request_id, None, error)
        elif isinstance(event, ev.Unbound):
            future = self._unbinds.get(event.tunnel_id)
            if future is not None:
                if not future.done():
                    future.set_result(None)
            elif event.tunnel_id in self.tunnels:
                self.tunnels.pop(event.tunnel_id)
                if self.owner is not None:
                    self.owner.tunnel_unbound(self, event.tunnel_id, event.reason)
        elif isinstance(event, ev.GoAwayReceived):
            self._on_goaway(event)

    def _on_goaway(self, event: ev.GoAwayReceived) -> None:
        self.close_reason = event.reason or code_name(event.code)
        if not self.welcome.done():
            if event.code == ErrorCode.AUTH_FAILED:
                error: Exception = AuthenticationFailed(
                    f"relay {self.name} {self.settings.token_problem(event.reason)}"
                )
            else:
                error = RelayUnavailable(f"relay {self.name} refused the session: {self.close_reason}")
            self.welcome.set_exception(error)
            self.welcome.exception()  # early requests report it; nobody else must be warned
        if self.proto.state is SessionState.CLOSED:
            self._hang_up()
        elif self.owner is not None:  # graceful: open streams finish here, new tunnels go elsewhere
            logger.info("relay %s is going away (%s); moving on", self.name, self.close_reason)
            self.owner.session_draining(self)

    def _resolve(self, request_id: int, address: TunnelAddress | None, error: Exception | None) -> None:
        future = self._requests.get(request_id)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        elif address is not None:
            future.set_result(address)

    def _ended(self) -> None:
        """The link is gone: fail whoever waits, and tell the owner."""
        reason = self.close_reason or "link lost"
        error = SessionClosed(f"session to relay {self.name} ended ({reason})")
        if not self.welcome.done():
            self.welcome.set_exception(error)
            self.welcome.exception()  # whoever awaited it has it; nobody else must be warned
        futures: list[asyncio.Future[Any]] = [*self._requests.values(), *self._unbinds.values()]
        for future in futures:
            if not future.done():
                future.set_exception(error)
                future.exception()
        if self.owner is not None:
            self.owner.session_lost(self)


class RelayConnection(AgentControl, SessionConnection):
    """One authenticated session to a relay, carrying every tunnel of this process there."""

    def __init__(self, settings: AgentSettings, owner: SessionOwner | None = None) -> None:
        super().__init__(
            SessionProtocol(Role.AGENT, window=settings.window),
            name=str(settings.relay),
            heartbeat_timeout=settings.heartbeat_timeout,
        )
        self._init_control(settings, owner)

    @classmethod
    async def connect(cls, settings: AgentSettings, owner: SessionOwner | None = None) -> RelayConnection:
        """Open the TLS connection, say HELLO, wait for WELCOME; errors name the cause."""
        address = settings.relay
        assert address is not None
        loop = asyncio.get_running_loop()
        context = settings.ssl_context()
        hosts = dial_hosts(address)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                for index, dial in enumerate(hosts):
                    try:
                        _, session = await loop.create_connection(
                            lambda: cls(settings, owner), dial, address.port, ssl=context, server_hostname=address.host
                        )
                        break
                    except ConnectionRefusedError:
                        if index == len(hosts) - 1:
                            raise
                session.proto.hello(settings.token, AGENT_NAME)
                session.flush()
                sslobj = session.transport.get_extra_info("ssl_object") if session.transport else None
                if sslobj is not None and sslobj.selected_alpn_protocol() == EARLY_ALPN:
                    # the relay takes requests right behind HELLO: the first BIND saves a
                    # round trip, and its answer (or the token's refusal) comes after WELCOME
                    session.proto.early_requests = True
                else:
                    await session.welcome
        except ssl.SSLCertVerificationError as exc:
            raise RelayUnavailable(
                f"cannot trust relay {address} ({exc.verify_message}); set BURROW_CA to its CA certificate"
            ) from None
        except ssl.SSLError as exc:
            if exc.reason in NOT_TLS:
                raise RelayUnavailable(
                    f"relay {address} answered in another protocol than TLS ({exc.reason}); check that "
                    f"{address.setting} names the relay's TLS port, not another service's"
                ) from None
            raise RelayUnavailable(
                f"relay {address} refused the TLS handshake ({exc.reason}); check that {address.setting} names "
                "the relay's domain"
            ) from None
        except socket.gaierror as exc:
            raise RelayUnavailable(
                f"cannot resolve relay {address} ({exc.strerror}); check {address.setting}", transient=True
            ) from None
        except TimeoutError:
            raise RelayUnavailable(
                f"relay {address} did not answer within {CONNECT_TIMEOUT:.0f} s", transient=True
            ) from None
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            if not reason:  # a bare ConnectionResetError: the relay hung up inside the TLS handshake
                raise RelayUnavailable(
                    f"relay {address} closed the connection during the TLS handshake; check that {address.setting} "
                    "names the relay's domain and TLS port (a relay hangs up on names it does not serve)"
                ) from None
            raise RelayUnavailable(
                f"cannot reach relay {address} ({reason}); check {address.setting}", transient=True
            ) from None
        logger.debug("session to relay %s: HELLO sent%s", address, "" if session.welcome.done() else " (early)")
        return session

    def _on_stream(self, event: ev.StreamOpened) -> None:
        tunnel = self.tunnels.get(event.tunnel_id)
        if tunnel is None or tunnel.closed:
            self.proto.send_rst(event.stream_id, ErrorCode.TUNNEL_CLOSED, "no such tunnel here")
            return
        endpoint = LocalEndpoint(self, event.stream_id, tunnel)
        dial = endpoint.connect(tunnel.target, tunnel.connect_timeout)
        endpoint.dial = asyncio.get_running_loop().create_task(dial)

    def session_closed(self, exc: Exception | None) -> None:
        self._ended()

    def _hang_up(self) -> None:
        if self.transport is not None:
            self.transport.close()
