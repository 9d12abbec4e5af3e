"""The agent's sessions on the native engine (issue 14, stage 3; the default, ``BURROW_AGENT_ENGINE=asyncio``
selects the pure-Python one while it remains).

Rust (``burrow._native.AgentEngine``, ``native/src/agent/``) owns the link to the
relay (TCP, TLS with rustls, frames, heartbeats) and every stream on it: OPEN
dials the tunnel's service there, and bytes never enter Python. Python keeps the
conversation (:class:`~burrow.agent.relay_connection.AgentControl`: HELLO, BIND,
UNBIND and their answers, through the reference model ``SessionProtocol`` fed
only control frames), tells the engine where each tunnel's streams go
(:meth:`NativeRelayConnection.adopt`) and reads the tunnels' counters.

One engine per process (per PID: a forked child makes its own at first use);
its events wake the runtime's loop through a socket pair, as the relay's do.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import weakref
from typing import TYPE_CHECKING

from ..connection import TrafficStats
from ..errors import RelayUnavailable, RemoteProtocolError
from ..logs import LogLimiter
from ..protocol import events as ev
from ..protocol.frames import MAX_FRAME_PAYLOAD, ErrorCode, FrameType, encode
from ..protocol.session import Role, SessionProtocol
from ..relay.tls import AGENT_ALPNS, EARLY_ALPN
from .config import AgentSettings
from .plane import SessionOwner
from .relay_connection import AGENT_NAME, CONNECT_TIMEOUT, AgentControl, AgentTunnel, dial_hosts
from .target import LOOPBACK

if TYPE_CHECKING:
    from .. import _native

logger = logging.getLogger(__name__)
_logs = LogLimiter(logger, rate=1)

#: ``BURROW_AGENT_ENGINE=asyncio`` puts this process's sessions on the asyncio engine.
ENGINE_VARIABLE = "BURROW_AGENT_ENGINE"
#: The engine's worker threads: one process's tunnels; the relay is elsewhere.
THREADS = 1


def native_enabled() -> bool:
    return os.environ.get(ENGINE_VARIABLE, "").strip().lower() != "asyncio"


class NativeStats(TrafficStats):
    """A tunnel's counters, read from the engine (they move in Rust, never per byte here)."""

    def __init__(self, engine: _native.AgentEngine, key: int) -> None:
        self._engine, self._key = engine, key

    def _read(self, index: int) -> int:
        return int(self._engine.counters(self._key)[index])

    @property
    def open_connections(self) -> int:
        return self._read(0)

    @open_connections.setter
    def open_connections(self, value: int) -> None:
        pass  # (TrafficStats' __init__; the engine counts)

    @property
    def total_connections(self) -> int:
        return self._read(1)

    @total_connections.setter
    def total_connections(self, value: int) -> None:
        pass  # (TrafficStats' __init__; the engine counts)

    @property
    def bytes_in(self) -> int:
        return self._read(2)

    @bytes_in.setter
    def bytes_in(self, value: int) -> None:
        pass  # (TrafficStats' __init__; the engine counts)

    @property
    def bytes_out(self) -> int:
        return self._read(3)

    @bytes_out.setter
    def bytes_out(self, value: int) -> None:
        pass  # (TrafficStats' __init__; the engine counts)

    def __repr__(self) -> str:
        return (
            f"NativeStats(open_connections={self.open_connections}, total_connections={self.total_connections}, "
            f"bytes_in={self.bytes_in}, bytes_out={self.bytes_out})"
        )


class NativePlane:
    """The process's engine and the pump of its events on the runtime's loop."""

    def __init__(self) -> None:
        from .. import _native

        self.engine = _native.AgentEngine(THREADS)
        fd = self.engine.take_watched_fd()
        assert fd is not None
        self._watched = socket.socket(fileno=fd)
        self._watched.setblocking(False)
        asyncio.get_running_loop().add_reader(fd, self._on_events)
        self.links: dict[str, NativeRelayConnection] = {}
        self._dialing: dict[str, asyncio.Future[bytes | None]] = {}
        self._ids = itertools.count(1)
        self._keys: weakref.WeakKeyDictionary[AgentTunnel, int] = weakref.WeakKeyDictionary()
        self._next_key = itertools.count(1)
        self.pid = os.getpid()

    def new_id(self) -> str:
        return f"link-{next(self._ids)}"

    def dial(self, link_id: str) -> asyncio.Future[bytes | None]:
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._dialing[link_id] = future
        return future

    def key_for(self, tunnel: AgentTunnel) -> int:
        """The tunnel's counters' key (the same across its sessions; forgotten with the tunnel)."""
        key = self._keys.get(tunnel)
        if key is None:
            key = self._keys[tunnel] = next(self._next_key)
            weakref.finalize(tunnel, self.engine.forget_counters, key)
        return key

    def _on_events(self) -> None:
        try:
            while self._watched.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        for kind, a, b, c in self.engine.take_events():
            try:
                self._dispatch(kind, a, b, c)
            except Exception:  # (one bad event must not stop the pump)
                logger.exception("burrow: native agent event %s failed", kind)

    def _dispatch(self, kind: str, a: object, b: object, c: object) -> None:
        if kind == "log":
            assert isinstance(c, str) and isinstance(b, int)
            _logs.log(c if a == "refused" else str(a), b, "%s", c)
        elif kind == "connected":
            future = self._dialing.pop(str(a), None)
            if future is not None and not future.done():
                future.set_result(b if isinstance(b, bytes) else None)
            else:  # nobody waits for it any more (the connect was cancelled or timed out)
                self.links.pop(str(a), None)
                self.engine.close(str(a), b"")
        elif kind == "failed":
            future = self._dialing.pop(str(a), None)
            if future is not None and not future.done():
                future.set_exception(_DialFailed(str(b), str(c)))
        elif kind == "request":
            link = self.links.get(str(a))
            if link is not None:
                assert isinstance(b, int) and isinstance(c, bytes)
                link.control_frame(b, c)
        elif kind == "closed":
            link = self.links.pop(str(a), None)
            if link is not None:
                link.session_closed()


class _DialFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


_plane: NativePlane | None = None


def native_plane() -> NativePlane:
    """The process's plane (a forked child's first call makes its own)."""
    global _plane
    if _plane is None or _plane.pid != os.getpid():
        _plane = NativePlane()
    return _plane


class NativeRelayConnection(AgentControl):
    """One session to a relay whose bytes move in Rust; the conversation stays here."""

    def __init__(self, plane: NativePlane, link_id: str, settings: AgentSettings, owner: SessionOwner | None) -> None:
        self.proto = SessionProtocol(Role.AGENT, window=settings.window)
        self.name = str(settings.relay)
        self.plane, self.link_id = plane, link_id
        self._init_control(settings, owner)
        self._over = False

    @classmethod
    async def connect(cls, settings: AgentSettings, owner: SessionOwner | None = None) -> NativeRelayConnection:
        """Dial the relay in Rust, say HELLO, wait for WELCOME (or go early); errors name the cause."""
        address = settings.relay
        assert address is not None
        settings.ssl_context()  # (checks BURROW_CA and the dev CA as the asyncio engine does: one-line errors)
        roots = settings.trust_pem()
        plane = native_plane()
        link_id = plane.new_id()
        session = cls(plane, link_id, settings, owner)
        dialled = plane.dial(link_id)
        plane.links[link_id] = session  # (before any event of the link can come)
        plane.engine.connect(
            link_id,
            dial_hosts(address),
            address.port,
            address.host,
            roots,
            [alpn.encode() for alpn in AGENT_ALPNS],
            CONNECT_TIMEOUT,
            settings.window,
            MAX_FRAME_PAYLOAD,
            settings.heartbeat_timeout,
        )
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT + 1):
                alpn = await dialled
                session.proto.hello(settings.token, AGENT_NAME)
                session.flush()
                if alpn == EARLY_ALPN.encode():
                    session.proto.early_requests = True
                else:
                    await session.welcome
        except _DialFailed as exc:
            plane.links.pop(link_id, None)
            raise _unavailable(settings, exc) from None
        except TimeoutError:
            session._forget()
            raise RelayUnavailable(
                f"relay {address} did not answer within {CONNECT_TIMEOUT:.0f} s", transient=True
            ) from None
        except BaseException:
            session._forget()
            raise
        logger.debug("session to relay %s: HELLO sent (native)", address)
        return session

    # ---------------------------------------------------------------- AgentSession

    @property
    def usable(self) -> bool:
        return not self._over and super().usable

    def adopt(self, tunnel: AgentTunnel) -> None:
        """Serve ``tunnel``'s streams on this session: the engine dials its target for each."""
        self.tunnels[tunnel.id] = tunnel
        key = self.plane.key_for(tunnel)
        if not isinstance(tunnel.stats, NativeStats):
            tunnel.stats = NativeStats(self.plane.engine, key)
        target = tunnel.target
        if target.path is not None:
            self.plane.engine.add_tunnel(self.link_id, tunnel.id, key, tunnel.connect_timeout, [], 0, target.path)
        else:
            hosts = list(LOOPBACK) if target.host is None else [target.host]
            self.plane.engine.add_tunnel(self.link_id, tunnel.id, key, tunnel.connect_timeout, hosts, target.port)

    async def unbind(self, tunnel_id: str) -> None:
        self.plane.engine.remove_tunnel(self.link_id, tunnel_id)
        await super().unbind(tunnel_id)

    def handle_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.Unbound):
            self.plane.engine.remove_tunnel(self.link_id, event.tunnel_id)
        super().handle_event(event)

    def unsent(self) -> int:
        """Bytes the engine holds for the relay (every stream's, frames included)."""
        return self.plane.engine.unsent(self.link_id)

    def flush(self) -> None:
        data = self.proto.data_to_send()
        if data:
            self.plane.engine.send_control(self.link_id, b"".join(data))

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        self.proto.goaway(code, reason)
        data = self.proto.data_to_send()
        self.plane.engine.close(self.link_id, b"".join(data))

    def _hang_up(self) -> None:
        self.plane.engine.close(self.link_id, b"")

    def _forget(self) -> None:
        """A connect given up: the link goes, now or when the engine says it is up."""
        self._over = True
        self.plane.links.pop(self.link_id, None)
        dialing = self.plane._dialing.pop(self.link_id, None)
        if dialing is not None and not dialing.done():
            dialing.cancel()
        self._hang_up()

    # --------------------------------------------------------------- from the engine

    def control_frame(self, kind: int, payload: bytes) -> None:
        """A control frame the engine read (WELCOME, BOUND, BIND_FAILED, UNBOUND, GOAWAY)."""
        try:
            self.proto.receive_data(encode(FrameType(kind), 0, payload))
        except RemoteProtocolError as exc:
            _logs.log("protocol", logging.WARNING, "session %s: protocol error from peer: %s", self.name, exc)
            self.proto.events_received()
            self.flush()
            self._hang_up()
            return
        for event in self.proto.events_received():
            if isinstance(event, ev.Welcomed):
                self.plane.engine.welcomed(self.link_id, self.proto.peer_window, self.proto.send_payload)
            self.handle_event(event)
        self.flush()

    def session_closed(self) -> None:
        self._over = True
        self.proto.connection_lost()
        self._ended()


#: rustls' alert names -> OpenSSL's reasons for the alerts a relay sends.
_OPENSSL_ALERTS = {
    "UnrecognisedName": "TLSV1_UNRECOGNIZED_NAME",
    "HandshakeFailure": "SSLV3_ALERT_HANDSHAKE_FAILURE",
    "NoApplicationProtocol": "TLSV1_ALERT_NO_APPLICATION_PROTOCOL",
    "ProtocolVersion": "TLSV1_ALERT_PROTOCOL_VERSION",
    "InternalError": "TLSV1_ALERT_INTERNAL_ERROR",
    "AccessDenied": "TLSV1_ALERT_ACCESS_DENIED",
    "CertificateRequired": "TLSV13_ALERT_CERTIFICATE_REQUIRED",
}


def _unavailable(settings: AgentSettings, failure: _DialFailed) -> RelayUnavailable:
    """The asyncio engine's one-line errors, from what the engine said."""
    address = settings.relay
    assert address is not None
    kind, message = failure.kind, failure.message
    if kind == "certificate":
        return RelayUnavailable(f"cannot trust relay {address} ({message}); set BURROW_CA to its CA certificate")
    if kind == "not_tls":
        return RelayUnavailable(
            f"relay {address} answered in another protocol than TLS ({message}); check that "
            f"{address.setting} names the relay's TLS port, not another service's"
        )
    if kind == "alert":  # (named as OpenSSL names them, as the asyncio engine says them)
        alert = message.rsplit(": ", 1)[-1]
        message = _OPENSSL_ALERTS.get(alert, message)
    if kind in ("alert", "tls", "alpn"):
        return RelayUnavailable(
            f"relay {address} refused the TLS handshake ({message}); check that {address.setting} names "
            "the relay's domain"
        )
    if kind == "closed":
        return RelayUnavailable(
            f"relay {address} closed the connection during the TLS handshake; check that {address.setting} "
            "names the relay's domain and TLS port (a relay hangs up on names it does not serve)"
        )
    if kind == "timeout":
        return RelayUnavailable(f"relay {address} did not answer within {CONNECT_TIMEOUT:.0f} s", transient=True)
    reason = message.split(" (os error")[0].lower()
    if reason.startswith("failed to lookup address"):
        return RelayUnavailable(
            f"cannot resolve relay {address} ({reason.split(': ', 1)[-1]}); check {address.setting}", transient=True
        )
    return RelayUnavailable(f"cannot reach relay {address} ({reason}); check {address.setting}", transient=True)
