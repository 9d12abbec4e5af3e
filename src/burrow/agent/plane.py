"""The seam of the agent: what link management above needs from the byte path below.

:class:`~burrow.agent.link.RelayLink` (and ``forward()`` above it) decides:
which relay, when to reconnect, resuming tunnels by ticket, tunnel states. It
reaches the byte path only through :class:`AgentSession` (one authenticated
session to a relay; today :class:`~burrow.agent.relay_connection.RelayConnection`
on asyncio) and hears back through :class:`SessionOwner`. A native agent
engine implements the same two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..protocol.messages import ANYONE, Access

if TYPE_CHECKING:
    from ..protocol.messages import TunnelAddress
    from .relay_connection import AgentTunnel


class AgentSession(Protocol):
    """One session to a relay, carrying every tunnel of this process there."""

    #: the tunnels this session serves, by id: streams for other ids are reset
    tunnels: dict[str, AgentTunnel]
    #: why the session ended (the relay's GOAWAY reason), for messages
    close_reason: str

    @property
    def usable(self) -> bool:
        """Requests may go out (open, or early requests allowed before WELCOME)."""

    async def bind(
        self, port: int, unencrypted: bool, h2: bool, ticket: str | None = None, access: Access = ANYONE
    ) -> TunnelAddress:
        """Open a tunnel to local ``port`` (resuming one with ``ticket``); TunnelRefused if refused."""

    def adopt(self, tunnel: AgentTunnel) -> None:
        """Serve the (bound) tunnel's streams on this session."""

    async def unbind(self, tunnel_id: str) -> None:
        """Close a tunnel at the relay and wait (boundedly) for it to confirm."""

    def close(self) -> None:
        """End the session now."""


class SessionOwner(Protocol):
    """Who learns what happens to a session (the agent's link to its relay)."""

    def session_lost(self, session: AgentSession) -> None:
        """The session ended; its streams were reset."""

    def session_draining(self, session: AgentSession) -> None:
        """The relay said GOAWAY gracefully: open streams finish, new tunnels go elsewhere."""

    def tunnel_unbound(self, session: AgentSession, tunnel_id: str, reason: str) -> None:
        """The relay closed a tunnel on its own."""
