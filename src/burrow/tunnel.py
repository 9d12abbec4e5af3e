"""The :class:`Tunnel` value: where the public Internet reaches a forwarded port."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import ConfigurationError

HTTPS_PORT = 443


class TunnelState(enum.Enum):
    """Where a tunnel stands; ``Forward.state`` and the ``on_state`` callback report it."""

    OPENING = "opening"
    OPEN = "open"
    RECONNECTING = "reconnecting"  # the link to the relay dropped; the same URL comes back
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Tunnel:
    """An open tunnel's public addresses. Immutable; compare and hash by value.

    ``host``/``port`` is the TLS address (``https://<id>.<relay domain>``);
    ``unencrypted_host``/``unencrypted_port`` is the raw TCP address, present
    only for tunnels opened with ``unencrypted=True``.
    """

    id: str
    host: str
    port: int = HTTPS_PORT
    unencrypted_host: str | None = None
    unencrypted_port: int | None = None
    relay: str = ""  # the relay that serves it, host:port (another one after a fleet's failover)

    @property
    def url(self) -> str:
        """``https://<host>``, with ``:<port>`` unless the port is 443."""
        if self.port == HTTPS_PORT:
            return f"https://{self.host}"
        return f"https://{self.host}:{self.port}"

    @property
    def tls_socket(self) -> tuple[str, int]:
        """``(host, port)`` of the TLS address."""
        return (self.host, self.port)

    @property
    def tcp_socket(self) -> tuple[str, int]:
        """``(host, port)`` of the raw TCP address; only for unencrypted tunnels."""
        if self.unencrypted_host is None or self.unencrypted_port is None:
            raise ConfigurationError(
                f"tunnel {self.id} has no raw TCP address; open it with forward(port, unencrypted=True)"
            )
        return (self.unencrypted_host, self.unencrypted_port)
