"""The seam between the relay's control plane and its data plane.

The *control plane* (:class:`~burrow.relay.control.RelayControl`, Python)
decides: which agents are let in, which tunnels exist under which ids, every
limit, resume tickets, logs. The *data plane* (:class:`DataPlane`; today
:class:`~burrow.relay.engine.AsyncioPlane`, tomorrow native code) moves
bytes: it accepts connections, runs TLS, routes by SNI or TCP port, carries
the agent sessions and their streams, and counts.

What crosses the seam is rare and typed: a session's HELLO, a BIND, an
UNBIND, a session's end (upwards, to :class:`ControlPlane`); a route added or
removed, an answer to a request, a session closed, a counter read
(downwards, to :class:`DataPlane`). Sessions and tunnels are named by their
ids, never by objects, so either side can live in another language. Nothing
crosses per byte or per public connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..connection import TrafficStats
from ..logs import LogLimiter
from ..protocol.frames import ErrorCode
from ..protocol.messages import ANYONE, Access, BindFailure, TunnelAddress


@dataclass(frozen=True, slots=True)
class Route:
    """Where public connections for a tunnel go: its SNI name (and TCP port) → its agent session."""

    tunnel_id: str
    host: str  # <id>.<domain>: SNI routes TLS clients here
    session_id: str  # the agent session that carries the tunnel's streams
    h2: bool  # the TLS address offers ALPN h2
    tcp_port: int | None = None  # the raw TCP listener, opened before by DataPlane.listen_tcp
    access: Access = ANYONE  # allowed networks, PROXY protocol header
    quota: tuple[str, int] | None = None  # (key, cap): public connections open at once, shared by the key's routes


@dataclass(frozen=True, slots=True)
class Hello:
    """An agent's HELLO, handed up once its TLS handshake and HELLO frame are done."""

    session_id: str
    peer: str  # the agent's address, for logs
    token: str  # a secret: never logged
    agent: str  # what the agent says it is (peer text, escape before logging)


@dataclass(frozen=True, slots=True)
class BindRequest:
    """An agent's BIND: a tunnel to its local ``port``, maybe resuming one by ``ticket``."""

    session_id: str
    request_id: int
    port: int
    unencrypted: bool
    h2: bool
    ticket: str | None
    access: Access = ANYONE


@dataclass(frozen=True, slots=True)
class Census:
    """What a data plane holds: sessions, tunnels (routes or listeners) and TLS identities."""

    sessions: int
    tunnels: int
    identities: int  # per-host TLS identities (dev CA leaves or contexts) kept


#: Upper bounds (seconds) of the stream-open latency histogram's buckets, the native engine's too
#: (``OPEN_LATENCY_BOUNDS`` in ``native/src/relay/observe.rs``): from half a millisecond (a raw
#: TCP connection on loopback) to the 10 s handshake deadline.
OPEN_LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: The TLS handshake failures a data plane tells apart (``burrow_tls_handshake_failures_total{reason}``).
HANDSHAKE_FAILURES = (
    "timeout",  # no ClientHello, or no finished handshake, within the deadline
    "closed",  # the client hung up (or its connection failed) first
    "not_tls",  # the first bytes are not a ClientHello (plain HTTP, a scanner)
    "no_server_name",  # no SNI (an IP literal)
    "unknown_server_name",  # neither the agent endpoint nor a routed tunnel
    "alpn",  # no ALPN protocol in common (the agent endpoint without burrow/1)
    "client_certificate",  # a mutual-TLS tunnel got no client certificate, or one it refuses
    "client_alert",  # the client gave up with an alert (often: it does not trust our certificate)
    "protocol",  # any other TLS error
)


@dataclass(frozen=True, slots=True)
class LatencyHistogram:
    """A histogram as a data plane keeps it: a count per bucket of ``bounds`` (not cumulative), one
    more for what is above them all, and the sum of the observed seconds."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float


@dataclass(frozen=True, slots=True)
class LiveConnection:
    """One open public connection of a tunnel, for the operator's listing."""

    client: str  # host:port, [v6]:port
    bytes_in: int  # from the client towards the service
    bytes_out: int  # from the service towards the client
    age: float  # seconds since its stream opened


class ControlPlane(Protocol):
    """What the data plane hands up; each call returns at once (slow work is spawned)."""

    def hello(self, hello: Hello) -> None:
        """Answer with :meth:`DataPlane.welcome` or :meth:`DataPlane.reject`."""

    def bind(self, request: BindRequest) -> None:
        """Answer with :meth:`DataPlane.bound` or :meth:`DataPlane.bind_failed`."""

    def unbind(self, session_id: str, tunnel_id: str) -> None:
        """The agent closes a tunnel: remove its route."""

    def session_closed(self, session_id: str) -> None:
        """The session is gone (its streams were reset): forget its tunnels."""


class DataPlane(Protocol):
    """What the control plane asks of the engine that moves bytes."""

    #: its refusals' log lines, rate-limited, and their counts (metrics)
    refusals: LogLimiter

    @property
    def ports(self) -> Sequence[int]:
        """The TLS ports listened on (after :meth:`start`)."""

    @property
    def per_host_certificates(self) -> bool:
        """True when each tunnel host needs a certificate of its own (dev CA)."""

    @property
    def access_control(self) -> bool:
        """True when routes may carry an :class:`Access` (allowed networks, PROXY headers)."""

    @property
    def ca_path(self) -> Path | None:
        """The dev CA certificate clients trust, when the relay uses one."""

    async def start(self) -> None:
        """Listen on the TLS port; raises ConfigurationError when it cannot."""

    async def prepare_host(self, host: str) -> None:
        """Make ``host``'s TLS identity ahead of its route, so its first handshake does not pay for it."""

    async def listen_tcp(self, tunnel_id: str, ports: Sequence[int]) -> int:
        """Hold a raw TCP listener for the tunnel on the first free port of ``ports``; OSError if none."""

    async def listen_tls(self, tunnel_id: str, ports: Sequence[int]) -> int:
        """Hold a TLS listener of the tunnel's own (``https://localhost:PORT``, the loopback
        certificate); OSError if none is free, or the engine cannot (``loopback_urls``)."""

    def add_route(self, route: Route) -> None:
        """Route public connections for the tunnel (SNI name and, if any, TCP port) to its session."""

    def remove_route(self, tunnel_id: str) -> None:
        """Unroute a tunnel: stop its TCP listener, reset its connections, forget its TLS identity."""

    def session_open(self, session_id: str) -> bool:
        """True while the session is open (it may take requests and streams)."""

    def welcome(self, session_id: str) -> None:
        """Accept the agent of a HELLO."""

    def reject(self, session_id: str, code: ErrorCode, reason: str) -> None:
        """Refuse the agent of a HELLO, and close its session."""

    def bound(self, session_id: str, request_id: int, tunnel: TunnelAddress) -> None:
        """Answer a BIND: the tunnel is open."""

    def bind_failed(self, session_id: str, request_id: int, code: BindFailure, message: str) -> None:
        """Answer a BIND: refused."""

    def unbound(self, session_id: str, tunnel_id: str, reason: str) -> None:
        """Tell the agent a tunnel is closed."""

    def close_session(self, session_id: str, code: ErrorCode, reason: str) -> None:
        """End a session at once (GOAWAY, then abort the link: no graceful TLS close)."""

    def stats(self, tunnel_id: str) -> TrafficStats:
        """The tunnel's live counters."""

    def stop_listening(self) -> None:
        """Accept nothing new: the TLS port and every raw TCP listener."""

    def reload_certificate(self, chain: bytes, key: bytes) -> None:
        """Serve this operator certificate chain and key (PEM) from the next TLS handshake on.

        Connections already up keep theirs. ValueError (the pair in use kept) if
        they are not a chain and its key.
        """

    def goaway(self, code: ErrorCode, reason: str) -> None:
        """Tell every agent to move on (GOAWAY); their open streams go on."""

    def open_streams(self) -> int:
        """Streams open across all sessions (for draining)."""

    def session_ids(self) -> list[str]:
        """The ids of the sessions the plane carries (for status and tests)."""

    def census(self) -> Census:
        """What the plane holds, counted (for status and leak tests)."""

    def buffered(self, tunnel_id: str) -> int:
        """Bytes held for the tunnel's public clients, not yet written to them."""

    def handshake_failures(self) -> dict[str, int]:
        """TLS handshakes that failed, by reason (every one of :data:`HANDSHAKE_FAILURES`)."""

    def open_latency(self) -> LatencyHistogram:
        """How long public connections waited from accept to their stream's OPEN being sent."""

    def connections(self, tunnel_id: str, limit: int) -> tuple[int, list[LiveConnection]]:
        """How many public connections the tunnel has open, and the ``limit`` oldest of them."""

    def close(self) -> None:
        """Close everything now."""
