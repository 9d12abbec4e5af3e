"""What a :class:`~burrow.protocol.session.SessionProtocol` reports after being fed bytes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .messages import ANYONE, Access

if TYPE_CHECKING:
    from .messages import BindFailure, TunnelAddress


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """Relay side: an agent introduced itself; call ``welcome()`` or ``reject()``."""

    version: int
    token: str = field(repr=False)  # a secret: never in a repr, log or error
    window: int
    agent: str


@dataclass(frozen=True, slots=True)
class Welcomed:
    """Agent side: the relay accepted the session."""

    version: int
    session_id: str
    window: int


@dataclass(frozen=True, slots=True)
class BindRequested:
    """Relay side: the agent asks for a tunnel."""

    request_id: int
    port: int
    unencrypted: bool
    h2: bool
    ticket: str | None = field(default=None, repr=False)  # resume this tunnel (burrow.relay.tickets)
    access: Access = ANYONE  # who may connect, and what the service learns of them


@dataclass(frozen=True, slots=True)
class Bound:
    """Agent side: the tunnel asked for with ``request_id`` is open."""

    request_id: int
    tunnel: TunnelAddress


@dataclass(frozen=True, slots=True)
class BindFailed:
    """Agent side: the relay would not open the tunnel."""

    request_id: int
    code: BindFailure
    message: str


@dataclass(frozen=True, slots=True)
class UnbindRequested:
    """Relay side: the agent closes a tunnel."""

    tunnel_id: str


@dataclass(frozen=True, slots=True)
class Unbound:
    """Agent side: the relay closed a tunnel (asked for or not)."""

    tunnel_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """Agent side: a public connection arrived on ``tunnel_id``."""

    stream_id: int
    tunnel_id: str
    peer: str


@dataclass(slots=True)
class DataReceived:
    """Bytes for a stream; report ``SessionProtocol.consumed(stream_id, len(data))`` once they have left the process.

    Not frozen, unlike the other events: one is made per DATA frame, and a
    frozen dataclass takes three times as long to make.
    """

    stream_id: int
    data: bytes | bytearray | memoryview  # often a zero-copy view of the read it came in


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (FIN): no more data will come."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset the stream; it is gone."""

    stream_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class StreamWritable:
    """The peer granted credit: data buffered for the stream has been sent."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The answer to one of our PINGs."""

    opaque: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer is ending the session (gracefully when ``code`` is NO_ERROR/SHUTDOWN)."""

    code: int
    reason: str


Event = (
    HelloReceived
    | Welcomed
    | BindRequested
    | Bound
    | BindFailed
    | UnbindRequested
    | Unbound
    | StreamOpened
    | DataReceived
    | StreamEnded
    | StreamReset
    | StreamWritable
    | PongReceived
    | GoAwayReceived
)
