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
import logging
import random
from collections import Counter
from collections.abc import Coroutine
from typing import Any

from ..connection import TrafficStats
from ..logs import LogLimiter
from ..protocol.frames import ErrorCode
from ..protocol.messages import ANYONE, BindFailure, TunnelAddress
from .admission import Admission, Refusal
from .config import TCP_PORT_ATTEMPTS, RelayConfig
from .descriptors import Descriptors
from .plane import BindRequest, DataPlane, Hello, Route
from .ready import ReadyIds
from .registry import TunnelRecord, TunnelRegistry
from .tickets import Claims, TicketInvalid, TicketSigner
from .tokens import TokenSigner

logger = logging.getLogger("burrow.relay")

#: Where a tunnel's own loopback TLS port is reached (``loopback_urls``).
LOOPBACK_HOST = "localhost"


#: How often revocations and token expiry are checked for open sessions.
TOKEN_SWEEP = 1.0


class BindRefused(Exception):
    """A BIND cannot be honoured; ``code`` and the message go back to the agent."""

    def __init__(self, code: BindFailure, message: str) -> None:
        super().__init__(message)
        self.code = code


class RelayControl:
    """Decides for the relay; the data plane carries out (see the module docstring)."""

    def __init__(
        self,
        config: RelayConfig,
        tickets: TicketSigner,
        descriptors: Descriptors,
        tokens: TokenSigner | None = None,
    ) -> None:
        self.config = config
        self.tickets = tickets
        self.admission = Admission(config, tokens)
        self.descriptors = descriptors
        self.registry = TunnelRegistry()
        # an unauthenticated peer can make us refuse it as often as it likes: those lines are rate-limited
        self.refusals = LogLimiter(logger)
        self.bind_refusals: Counter[str] = Counter()  # by BindFailure code (a fixed set), for metrics
        # what closed tunnels carried, by tenant (operator-issued names, "" for plain tokens): for metrics
        self.closed_stats: dict[str, TrafficStats] = {}
        # for metrics: tunnels reopened under their id by a valid resume ticket, and stale
        # sessions whose every tunnel a reconnected agent took over (the relay had not yet
        # noticed their link die)
        self.resumed_tunnels = 0
        self.replaced_sessions = 0
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
        """The data plane listens: begin preparing ids, and watching tokens."""
        self.ready.top_up()
        self.admission.revocations.refresh()
        self.spawn(self._sweep())

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

    def hello(self, hello: Hello) -> None:
        try:
            admitted = self.admission.hello(hello.session_id, hello.token, hello.peer)
        except Exception:  # a bug must not leave the session waiting for an answer, holding its slot
            logger.exception("relay: admitting session %s failed", hello.session_id)
            self.plane.reject(hello.session_id, ErrorCode.INTERNAL_ERROR, "the relay failed to admit this session")
            return
        if isinstance(admitted, Refusal):
            if admitted.auth:
                self.refusals.log("token", logging.WARNING, "refused agent %s: %s", hello.peer, admitted.reason)
                self.plane.reject(hello.session_id, ErrorCode.AUTH_FAILED, admitted.reason)
            else:
                self.refusals.log("sessions", logging.WARNING, "refused agent %s: %s", hello.peer, admitted.reason)
                self.plane.reject(hello.session_id, ErrorCode.LIMIT, f"{admitted.reason}; close some first")
            return
        self.plane.welcome(hello.session_id)
        # (the agent's name is the peer's text: %r escapes CR, LF and ESC, so it cannot forge log lines)
        logger.info("session %s opened by agent %s (%r)", hello.session_id, hello.peer, hello.agent)

    async def _sweep(self) -> None:
        """Close sessions whose signed token was revoked or has expired."""
        while True:
            await asyncio.sleep(TOKEN_SWEEP)
            try:
                ending = self.admission.sweep()
            except Exception:  # the sweep goes on: revocation must not stop at its first failure
                logger.exception("relay: checking tokens failed")
                continue
            for session_id, admitted, reason in ending:
                tenant = admitted.tenant.name if admitted.tenant is not None else "?"
                logger.warning("session %s of tenant %s closed: %s", session_id, tenant, reason)
                self.admission.closed(session_id)  # (at once: the next sweep must not find it again)
                self.plane.reject(session_id, ErrorCode.AUTH_FAILED, reason)

    def session_closed(self, session_id: str) -> None:
        for record in self.registry.of_session(session_id):
            self.close_tunnel(record, "session ended", notify=False)
        if self.admission.closed(session_id) is not None:
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
            self.bind_refusals[exc.code.value] += 1
            self.refusals.log(
                "bind", logging.INFO, "session %s: bind refused (%s): %s", request.session_id, exc.code.value, exc
            )
            self.plane.bind_failed(request.session_id, request.request_id, exc.code, str(exc))
        except Exception:
            self.plane.bind_failed(request.session_id, request.request_id, BindFailure.OTHER, "relay error")
            raise
        else:
            self.plane.bound(request.session_id, request.request_id, address)

    async def _open(self, request: BindRequest) -> TunnelAddress:
        session_id = request.session_id
        admitted = self.admission.sessions.get(session_id)
        if admitted is None or not self.plane.session_open(session_id):
            raise BindRefused(BindFailure.SHUTTING_DOWN, "the relay is shutting down; try again shortly")
        if not 0 <= request.port <= 65535:  # (0: the agent forwards to a unix socket)
            raise BindRefused(BindFailure.BAD_PORT, f"port {request.port} is outside 0-65535")
        if request.access != ANYONE and not self.plane.access_control:
            raise BindRefused(
                BindFailure.UNSUPPORTED,
                "this relay's engine cannot do allow_cidrs, proxy_protocol or client_ca; "
                "run the relay with --engine native",
            )
        token_fp, tenant = admitted.principal, admitted.tenant
        if tenant is not None and tenant.max_connections and not self.plane.access_control:
            raise BindRefused(
                BindFailure.UNSUPPORTED,
                "this relay's engine cannot cap a tenant's connections; run the relay with --engine native",
            )
        claims, holder = self._claims(request, token_fp)
        count = self.registry.count_for_token(token_fp) - (holder is not None and holder.token_fp == token_fp)
        refusal = self.admission.new_tunnel(admitted, count, resumed=claims is not None)
        if refusal is not None:
            raise BindRefused(BindFailure.LIMIT, refusal)
        shortage = self.descriptors.refuse_tunnel()
        if shortage is not None:
            raise BindRefused(BindFailure.NO_RESOURCES, f"the relay is short of resources ({shortage})")
        if holder is not None:
            self._take_over(holder)
        # every check passed: now allocate, and give back if a later step fails
        tunnel_id = claims.tunnel_id if claims is not None else self.ready.take(request.h2)
        fresh = claims is None
        try:
            address = await self._install(request, token_fp, tunnel_id, claims)
            if fresh:
                self.admission.opened(admitted)  # (only a tunnel that opened counts toward the minute's cap)
            else:
                self.resumed_tunnels += 1
            return address
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
        admitted = self.admission.sessions.get(request.session_id)
        tenant = admitted.tenant if admitted is not None else None
        record = TunnelRecord(
            tunnel_id,
            host,
            request.session_id,
            token_fp,
            request.port,
            request.h2,
            request.unencrypted,
            tcp_port,
            tenant.name if tenant is not None else "",
        )
        quota = (token_fp, tenant.max_connections) if tenant is not None and tenant.max_connections else None
        try:
            plane.add_route(Route(tunnel_id, host, request.session_id, request.h2, tcp_port, request.access, quota))
        except (ValueError, OSError) as exc:  # (the engine's own checks; the protocol's should have caught it)
            plane.remove_route(tunnel_id)  # and the listeners opened for it
            raise BindRefused(BindFailure.UNSUPPORTED, f"the relay cannot route this tunnel ({exc})") from None
        # nothing below may fail: a failure above gives the id back, and this one is now live
        ticket = self.tickets.issue(token_fp, Claims(tunnel_id, request.unencrypted, request.h2, tcp_port, tls_port))
        self.registry.add(record)
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
            self.replaced_sessions += 1
            self.plane.close_session(stale, ErrorCode.SHUTDOWN, "replaced by a newer session of this agent")

    def close_tunnel(self, record: TunnelRecord, reason: str, notify: bool = True) -> None:
        """Close a tunnel: unroute it (which resets its connections) and, if ``notify``, tell its agent."""
        if self.registry.remove(record.id) is None:
            return
        stats = self.plane.stats(record.id)
        closed = self.closed_stats.setdefault(record.tenant, TrafficStats())
        closed.total_connections += stats.total_connections
        closed.bytes_in += stats.bytes_in
        closed.bytes_out += stats.bytes_out
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
