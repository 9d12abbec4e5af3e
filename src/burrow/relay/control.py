"""The relay's control plane: who may connect, which tunnels exist, every limit, resume tickets.

:class:`RelayControl` implements :class:`~burrow.relay.plane.ControlPlane`:
the data plane hands it each HELLO, BIND, UNBIND and session end, and it
answers through the :class:`~burrow.relay.plane.DataPlane`. It never touches
a socket or a byte of a stream.

A BIND runs its checks cheapest first and allocates last: the session is
open, the port is a port, the ticket (if any) is genuine, the token is under
its tunnel limit, the relay has descriptors to spare; only then is an id
taken (from the ready pool), a raw TCP port held, and the route installed.
A step that fails gives back what the steps before it took, so refused binds
leave nothing behind.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
from collections import Counter
from collections.abc import Coroutine
from typing import Any

from ..logs import LogLimiter
from ..protocol.frames import ErrorCode
from ..protocol.messages import ANYONE, BindFailure, TunnelAddress
from .config import TCP_PORT_ATTEMPTS, RelayConfig
from .descriptors import Descriptors
from .plane import BindRequest, DataPlane, Hello, Route
from .ready import ReadyIds
from .registry import TunnelRecord, TunnelRegistry
from .tickets import Claims, TicketInvalid, TicketSigner, token_fingerprint

logger = logging.getLogger("burrow.relay")

#: Where a tunnel's own loopback TLS port is reached (``loopback_urls``).
LOOPBACK_HOST = "localhost"


def _source_of(peer: str) -> str:
    """The address of ``peer`` ("203.0.113.5:4711" or "[2001:db8::5]:4711"), without its port."""
    return peer.rpartition(":")[0].strip("[]") or peer


def _release(counts: Counter[str], key: str) -> None:
    """One less for ``key``; a key at zero is dropped, so the counter holds only live ones."""
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


class BindRefused(Exception):
    """A BIND cannot be honoured; ``code`` and the message go back to the agent."""

    def __init__(self, code: BindFailure, message: str) -> None:
        super().__init__(message)
        self.code = code


class RelayControl:
    """Decides for the relay; the data plane carries out (see the module docstring)."""

    def __init__(self, config: RelayConfig, tickets: TicketSigner, descriptors: Descriptors) -> None:
        self.config = config
        self.tickets = tickets
        self.descriptors = descriptors
        self.registry = TunnelRegistry()
        self.token_fps: dict[str, str] = {}  # session id -> its token's fingerprint, once welcomed
        self._session_sources: dict[str, str] = {}  # session id -> its agent's address, once welcomed
        self._token_sessions: Counter[str] = Counter()  # token fingerprint -> its welcomed sessions
        self._source_sessions: Counter[str] = Counter()  # agent address -> its welcomed sessions
        # an unauthenticated peer can make us refuse it as often as it likes: those lines are rate-limited
        self.refusals = LogLimiter(logger)
        self._tokens = [t.encode() for t in config.tokens]
        self._tasks: set[asyncio.Task[None]] = set()
        self._plane: DataPlane | None = None
        self._ready: ReadyIds | None = None

    def attach(self, plane: DataPlane) -> None:
        """Work through ``plane`` (before it starts)."""
        self._plane = plane
        self._ready = ReadyIds(plane, self.config.domain, self.registry.__contains__, self.spawn)

    @property
    def plane(self) -> DataPlane:
        assert self._plane is not None, "attach() a data plane first"
        return self._plane

    @property
    def ready(self) -> ReadyIds:
        assert self._ready is not None, "attach() a data plane first"
        return self._ready

    def start(self) -> None:
        """The data plane listens: begin preparing ids."""
        self.ready.top_up()

    def stop(self) -> None:
        """No more background work."""
        self.ready.stop()
        for task in list(self._tasks):
            task.cancel()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task kept until it ends; a failure is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.error("relay task failed: %s: %s", type(exc).__name__, exc, exc_info=exc)

    # --------------------------------------------------------------- sessions

    def token_ok(self, token: str) -> bool:
        """True when no token is configured, or ``token`` is one of them (constant time)."""
        if not self._tokens:
            return True
        given = token.encode()
        return any(hmac.compare_digest(given, t) for t in self._tokens)

    def hello(self, hello: Hello) -> None:
        if not self.token_ok(hello.token):
            self.refusals.log("token", logging.WARNING, "refused agent %s: wrong token", hello.peer)
            self.plane.reject(hello.session_id, ErrorCode.AUTH_FAILED, "the relay rejected the token")
            return
        token_fp, source = token_fingerprint(hello.token), _source_of(hello.peer)
        refusal = None
        if self._token_sessions[token_fp] >= self.config.max_sessions_per_token:
            refusal = f"this token has {self.config.max_sessions_per_token} sessions at this relay (the limit)"
        elif self._source_sessions[source] >= self.config.max_sessions_per_source:
            refusal = f"{self.config.max_sessions_per_source} sessions come from {source} already (the limit)"
        if refusal is not None:
            self.refusals.log("sessions", logging.WARNING, "refused agent %s: %s", hello.peer, refusal)
            self.plane.reject(hello.session_id, ErrorCode.LIMIT, f"{refusal}; close some first")
            return
        self.token_fps[hello.session_id] = token_fp
        self._session_sources[hello.session_id] = source
        self._token_sessions[token_fp] += 1
        self._source_sessions[source] += 1
        self.plane.welcome(hello.session_id)
        # (the agent's name is the peer's text: %r escapes CR, LF and ESC, so it cannot forge log lines)
        logger.info("session %s opened by agent %s (%r)", hello.session_id, hello.peer, hello.agent)

    def session_closed(self, session_id: str) -> None:
        for record in self.registry.of_session(session_id):
            self.close_tunnel(record, "session ended", notify=False)
        token_fp = self.token_fps.pop(session_id, None)
        if token_fp is not None:
            _release(self._token_sessions, token_fp)
            _release(self._source_sessions, self._session_sources.pop(session_id))
            logger.info("session %s closed", session_id)

    def unbind(self, session_id: str, tunnel_id: str) -> None:
        record = self.registry.get(tunnel_id)
        if record is not None and record.session_id == session_id:
            self.close_tunnel(record, "closed by the agent")
        else:
            self.plane.unbound(session_id, tunnel_id, "unknown tunnel")

    # ---------------------------------------------------------------- tunnels

    def bind(self, request: BindRequest) -> None:
        self.spawn(self._bind(request))

    async def _bind(self, request: BindRequest) -> None:
        try:
            address = await self._open(request)
        except BindRefused as exc:
            logger.info("session %s: bind refused (%s): %s", request.session_id, exc.code.value, exc)
            self.plane.bind_failed(request.session_id, request.request_id, exc.code, str(exc))
        except Exception:
            self.plane.bind_failed(request.session_id, request.request_id, BindFailure.OTHER, "relay error")
            raise
        else:
            self.plane.bound(request.session_id, request.request_id, address)

    async def _open(self, request: BindRequest) -> TunnelAddress:
        session_id = request.session_id
        token_fp = self.token_fps.get(session_id)
        if token_fp is None or not self.plane.session_open(session_id):
            raise BindRefused(BindFailure.SHUTTING_DOWN, "the relay is shutting down; try again shortly")
        if not 0 <= request.port <= 65535:  # (0: the agent forwards to a unix socket)
            raise BindRefused(BindFailure.BAD_PORT, f"port {request.port} is outside 0-65535")
        if request.access != ANYONE and not self.plane.access_control:
            raise BindRefused(
                BindFailure.UNSUPPORTED,
                "this relay's engine cannot do allow_cidrs or proxy_protocol; run the relay with --engine native",
            )
        claims, holder = self._claims(request, token_fp)
        count = self.registry.count_for_token(token_fp) - (holder is not None and holder.token_fp == token_fp)
        if count >= self.config.max_tunnels_per_token:
            raise BindRefused(
                BindFailure.LIMIT, f"this token has {count} tunnels at this relay (the limit); close some first"
            )
        shortage = self.descriptors.refuse_tunnel()
        if shortage is not None:
            raise BindRefused(BindFailure.NO_RESOURCES, f"the relay is short of resources ({shortage})")
        if holder is not None:
            self._take_over(holder)
        # every check passed: now allocate, and give back if a later step fails
        tunnel_id = claims.tunnel_id if claims is not None else self.ready.take(request.h2)
        fresh = claims is None
        try:
            return await self._install(request, token_fp, tunnel_id, claims)
        except BaseException:
            if fresh:
                self.ready.give_back(tunnel_id, request.h2)
            raise

    def _claims(self, request: BindRequest, token_fp: str) -> tuple[Claims | None, TunnelRecord | None]:
        """A resume ticket's claims and the tunnel now holding its id, if any."""
        if request.ticket is None:
            return None, None
        try:
            claims = self.tickets.verify(request.ticket, token_fp)
        except TicketInvalid as exc:
            raise BindRefused(BindFailure.BAD_TICKET, str(exc)) from None
        if (claims.unencrypted, claims.h2) != (request.unencrypted, request.h2):
            raise BindRefused(BindFailure.BAD_TICKET, "the ticket is for a tunnel of another kind")
        holder = self.registry.get(claims.tunnel_id)
        if holder is not None and holder.session_id == request.session_id:
            raise BindRefused(BindFailure.IN_USE, f"tunnel {claims.tunnel_id} is already bound on this session")
        return claims, holder

    async def _install(
        self, request: BindRequest, token_fp: str, tunnel_id: str, claims: Claims | None
    ) -> TunnelAddress:
        plane = self.plane
        tcp_port: int | None = None
        if request.unencrypted:
            try:
                tcp_port = await plane.listen_tcp(tunnel_id, self._tcp_candidates(claims))
            except OSError as exc:
                logger.warning("session %s: no TCP port for a tunnel: %s", request.session_id, exc)
                message = f"relay has no free TCP port in {self._port_range()}"
                raise BindRefused(BindFailure.NO_TCP_PORT, message) from None
        tls_port = await self._loopback_port(tunnel_id, claims) if self.config.loopback_urls else None
        if not plane.session_open(request.session_id) or tunnel_id in self.registry:
            if tunnel_id not in self.registry:  # (a rival's route is the rival's)
                plane.remove_route(tunnel_id)  # the session died meanwhile: drop our listener
            raise BindRefused(BindFailure.IN_USE, f"tunnel {tunnel_id} was bound meanwhile")
        host = f"{tunnel_id}.{self.config.domain}"
        record = TunnelRecord(
            tunnel_id, host, request.session_id, token_fp, request.port, request.h2, request.unencrypted, tcp_port
        )
        # nothing below may fail: a failure above gives the id back, and this one is now live
        ticket = self.tickets.issue(token_fp, Claims(tunnel_id, request.unencrypted, request.h2, tcp_port, tls_port))
        self.registry.add(record)
        plane.add_route(Route(tunnel_id, host, request.session_id, request.h2, tcp_port, request.access))
        logger.info(
            "tunnel %s %s by session %s: %s%s",
            tunnel_id,
            "resumed" if claims is not None else "opened",
            request.session_id,
            host,
            f" and tcp port {tcp_port}" if tcp_port else "",
        )
        public_host, public_port = host, self.config.public_port or plane.ports[0]
        if tls_port is not None:  # https://localhost:PORT: every client resolves it
            public_host, public_port = LOOPBACK_HOST, tls_port
        if tcp_port is None:
            return TunnelAddress(tunnel_id, public_host, public_port, ticket, access=request.access)
        tcp_host = self.config.tcp_public_host or self.config.domain
        return TunnelAddress(tunnel_id, public_host, public_port, ticket, tcp_host, tcp_port, request.access)

    async def _loopback_port(self, tunnel_id: str, claims: Claims | None) -> int | None:
        """The tunnel's own loopback TLS port (the ticket's when resuming); None: its SNI URL serves."""
        low, high = self.config.tcp_ports
        wanted = [claims.tls_port] if claims is not None and claims.tls_port is not None else []
        candidates = wanted + [random.randint(low, high) for _ in range(min(TCP_PORT_ATTEMPTS, high - low + 1))]
        try:
            return await self.plane.listen_tls(tunnel_id, candidates)
        except OSError as exc:
            logger.warning("tunnel %s keeps only its name's URL (no loopback TLS port: %s)", tunnel_id, exc)
            return None

    def _tcp_candidates(self, claims: Claims | None) -> list[int]:
        """The ticket's port first (when resuming), then random ports of the range."""
        low, high = self.config.tcp_ports
        wanted = claims.tcp_port if claims is not None else None
        candidates = [wanted] if wanted is not None and low <= wanted <= high else []
        return candidates + [random.randint(low, high) for _ in range(min(TCP_PORT_ATTEMPTS, high - low + 1))]

    def _port_range(self) -> str:
        low, high = self.config.tcp_ports
        return f"{low}-{high}"

    def _take_over(self, holder: TunnelRecord) -> None:
        """A reconnected agent (same token, valid ticket) reclaims its tunnel from a stale session."""
        stale = holder.session_id
        self.close_tunnel(holder, f"taken over from stale session {stale}", notify=False)
        if not self.registry.of_session(stale):
            # its agent has moved on, so its link is dead or useless: no graceful TLS
            # close, which would wait for a close_notify that never comes
            logger.info("session %s replaced by a reconnected agent", stale)
            self.plane.close_session(stale, ErrorCode.SHUTDOWN, "replaced by a newer session of this agent")

    def close_tunnel(self, record: TunnelRecord, reason: str, notify: bool = True) -> None:
        """Close a tunnel: unroute it (which resets its connections) and, if ``notify``, tell its agent."""
        if self.registry.remove(record.id) is None:
            return
        stats = self.plane.stats(record.id)
        self.plane.remove_route(record.id)
        if notify:
            self.plane.unbound(record.session_id, record.id, reason)
        logger.info(
            "tunnel %s closed (%s): %d connections, %d bytes in, %d bytes out",
            record.id,
            reason,
            stats.total_connections,
            stats.bytes_in,
            stats.bytes_out,
        )

    def close_all(self, reason: str) -> None:
        """Close every tunnel (the relay is stopping)."""
        for record in self.registry:
            self.close_tunnel(record, reason, notify=False)
