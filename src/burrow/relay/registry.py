"""What the relay knows of a tunnel, and its public connections."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..connection import StreamEndpoint, TrafficStats

if TYPE_CHECKING:
    import asyncio

    from .session import RelaySession

ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
#: 36**14 > 2**72: unguessable (the reference uses the same shape), and a DNS label.
ID_LENGTH = 14


def new_tunnel_id() -> str:
    """14 base36 characters from the OS CSPRNG."""
    value = secrets.randbelow(len(ID_ALPHABET) ** ID_LENGTH)
    chars = []
    for _ in range(ID_LENGTH):
        value, digit = divmod(value, len(ID_ALPHABET))
        chars.append(ID_ALPHABET[digit])
    return "".join(chars)


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
