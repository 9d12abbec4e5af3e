"""The agent's link to one relay: a session that comes back, and tunnels that keep their URL.

A :class:`RelayLink` owns the current session (:class:`~burrow.agent.plane.AgentSession`) to a relay and
every tunnel opened through it. When the session drops (relay restart,
network blip, laptop sleep, a dead link found by heartbeats) or the relay
says GOAWAY, the link reconnects on its own with jittered exponential
backoff, never giving up while a tunnel is open, and resumes each tunnel with
its ticket: same id, same URL. A stale session the relay still holds is
replaced at once by the ticket (the relay hands the tunnel over).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..errors import AuthenticationFailed, BurrowError, TunnelRefused
from ..protocol.messages import BindFailure, TunnelAddress
from ..tunnel import TunnelState
from .config import AgentSettings
from .plane import AgentSession
from .relay_connection import AgentTunnel, RelayConnection

if TYPE_CHECKING:
    from .fleet import Fleet

logger = logging.getLogger("burrow")

#: Backoff between reconnection attempts: full jitter over BASE * 2**n, capped.
#: The cap keeps recovery within ~2 s of the relay coming back.
RECONNECT_BASE = 0.05
RECONNECT_CAP = 1.5

#: A link with no tunnel for this long closes its session and is forgotten: a web service
#: that opens tunnels on demand, with a token per user, does not keep a session per token
#: for good. A tunnel opened within it reuses the warm session.
LINK_IDLE = 60.0


def backoff(attempt: int) -> float:
    """Seconds to wait before reconnection attempt ``attempt`` (0: at once)."""
    if attempt == 0:
        return 0.0
    return random.uniform(0, min(RECONNECT_CAP, RECONNECT_BASE * 2**attempt))


class RelayLink:
    """Every tunnel of this process on one relay, and the session carrying them."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.session: AgentSession | None = None
        self.tunnels: list[AgentTunnel] = []
        self._connecting: asyncio.Future[AgentSession] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._stopped = False
        self.fleet: Fleet | None = None  # set when the relay is one of a fleet: failover to the others
        self.on_idle: Callable[[RelayLink], None] | None = None  # the runtime forgets an idle link
        self._idle: asyncio.TimerHandle | None = None
        self._busy = 0  # opens and resumes under way (the link is not idle while one is)

    # ------------------------------------------------------------------ sessions

    async def current_session(self) -> AgentSession:
        """The open session, connecting once for all concurrent callers."""
        if self.session is not None and self.session.usable:
            return self.session
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_future()
            try:
                session: AgentSession = await connect_session(self.settings, self)
            except BaseException as exc:
                self._connecting.set_exception(exc)
                self._connecting.exception()
                raise
            else:
                self.session = session
                self._connecting.set_result(session)
            finally:
                self._connecting = None
            return session
        return await asyncio.shield(self._connecting)

    # ------------------------------------------------------------------- tunnels

    async def open(self, tunnel: AgentTunnel) -> None:
        """Open ``tunnel`` at the relay; it is then kept open across reconnects until :meth:`close`."""
        with self._in_use():
            await self._open(tunnel)

    async def _open(self, tunnel: AgentTunnel) -> None:
        session = await self.current_session()
        address = await session.bind(tunnel.local_port, tunnel.unencrypted, tunnel.h2, access=tunnel.access)
        if tunnel.closed:  # closed by its owner while it was moving here (a fleet's failover)
            await session.unbind(address.id)
            return
        tunnel.address, tunnel.link = address, self
        session.adopt(tunnel)
        self.tunnels.append(tunnel)
        tunnel.set_state(TunnelState.OPEN)

    async def resume(self, tunnel: AgentTunnel) -> None:
        """Take back a tunnel this link carried before (a fleet found no other relay): by its ticket."""
        with self._in_use():
            await self._take_back(tunnel)

    async def _take_back(self, tunnel: AgentTunnel) -> None:
        session = await self.current_session()
        if tunnel.closed:  # closed by its owner while the session was connecting
            return
        self.tunnels.append(tunnel)
        try:
            await self._resume(session, tunnel)
        except BaseException:
            if tunnel in self.tunnels:
                self.tunnels.remove(tunnel)
            raise
        tunnel.link = self

    async def close(self, tunnel: AgentTunnel) -> None:
        """Close ``tunnel`` at the relay (waiting for the relay to confirm) and forget it."""
        if tunnel in self.tunnels:
            self.tunnels.remove(tunnel)
        self._maybe_idle()
        was_open = tunnel.state is TunnelState.OPEN
        tunnel.set_state(TunnelState.CLOSED)
        session = self.session
        if was_open and session is not None and session.tunnels.get(tunnel.id) is tunnel:
            await session.unbind(tunnel.id)

    def stop(self) -> None:
        """Process exit (or idle): close the session, no reconnecting."""
        self._stopped = True
        if self._idle is not None:
            self._idle.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self.session is not None:
            self.session.close()

    # ----------------------------------------------------------------------- idle

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[None]:
        self._busy += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            yield
        finally:
            self._busy -= 1
            self._maybe_idle()

    def _maybe_idle(self) -> None:
        """With no tunnel left (closed, unbound, given up, moved away): forget the link in LINK_IDLE s."""
        if self.tunnels or self._busy or self._stopped or self._idle is not None:
            return
        self._idle = asyncio.get_running_loop().call_later(LINK_IDLE, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle = None
        if self.tunnels or self._busy or self._stopped:
            return
        logger.debug("burrow: no tunnel on relay %s for %.0f s; closing its session", self.settings.relay, LINK_IDLE)
        self.stop()
        if self.on_idle is not None:
            self.on_idle(self)

    # --------------------------------------------------- SessionOwner callbacks

    def session_lost(self, session: AgentSession) -> None:
        if session is self.session:
            if self.fleet is not None and self.settings.relay is not None:
                self.fleet.failed(self.settings.relay)  # (not for a stale session: the relay may be back)
            self.session = None
            self._start_reconnecting(session.close_reason or "link lost")

    def session_draining(self, session: AgentSession) -> None:
        # the relay is going away: its open streams finish on the old session,
        # while tunnels move to a new one (the same relay once it is back)
        if session is self.session:
            self.session = None
            self._start_reconnecting(session.close_reason or "relay going away")

    def tunnel_unbound(self, session: AgentSession, tunnel_id: str, reason: str) -> None:
        for tunnel in list(self.tunnels):
            if tunnel.id == tunnel_id:
                logger.warning("burrow: the relay closed tunnel %s (%s)", tunnel_id, reason)
                self.tunnels.remove(tunnel)
                tunnel.closed_reason = f"the relay closed the tunnel ({reason})"
                tunnel.set_state(TunnelState.CLOSED)
        self._maybe_idle()

    # ----------------------------------------------------------------- reconnect

    def _start_reconnecting(self, reason: str) -> None:
        if self._stopped or not self.tunnels:
            return
        for tunnel in self.tunnels:
            tunnel.set_state(TunnelState.RECONNECTING)
        if self._reconnecting is not None:
            return  # the running loop picks them up
        logger.warning(
            "burrow: lost the session to relay %s (%s); reconnecting %d tunnel(s)",
            self.settings.relay,
            reason,
            len(self.tunnels),
        )
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())
        self._reconnecting.add_done_callback(self._reconnect_done)

    def _reconnect_done(self, task: asyncio.Task[None]) -> None:
        self._reconnecting = None
        if not task.cancelled() and task.exception() is not None:
            logger.error("burrow: reconnecting failed: %s", task.exception())
        if any(t.state is TunnelState.RECONNECTING for t in self.tunnels):
            self._start_reconnecting("lost again")  # lost after the loop's last look

    async def _reconnect(self) -> None:
        attempt = 0
        warned: set[str] = set()
        loop = asyncio.get_running_loop()
        lost_at = loop.time()
        while not self._stopped and any(t.state is TunnelState.RECONNECTING for t in self.tunnels):
            await asyncio.sleep(backoff(attempt))
            attempt += 1
            if self.fleet is not None:
                away = loop.time() - lost_at
                for tunnel in [t for t in self.tunnels if t.state is TunnelState.RECONNECTING and not t.moving]:
                    if away >= tunnel.failover_after:
                        self.tunnels.remove(tunnel)
                        self.fleet.move(tunnel, self, away)
                self._maybe_idle()
                if not any(t.state is TunnelState.RECONNECTING and not t.moving for t in self.tunnels):
                    break
            try:
                left = self._until_failover(lost_at)
                if left is None:
                    session = await self.current_session()
                else:
                    # a relay that takes the connection and never answers (blackholed) would hold this
                    # attempt for CONNECT_TIMEOUT: past failover_after, the tunnels move on meanwhile
                    attempt_task = loop.create_task(self.current_session())
                    attempt_task.add_done_callback(_retrieved)
                    await asyncio.wait({attempt_task}, timeout=left)
                    if not attempt_task.done():
                        continue  # (still connecting: the next look finds it under way, not a second one)
                    session = attempt_task.result()
                for tunnel in list(self.tunnels):
                    if tunnel.state is TunnelState.RECONNECTING and not tunnel.moving:  # (a fleet's move resumes it)
                        await self._resume(session, tunnel)
            except AuthenticationFailed as exc:
                # (a token revoked or expired, or a relay that no longer knows it: no retry will pass,
                # and no other relay of a fleet sharing its secret would take it either)
                self._give_up(str(exc))
                break
            except (BurrowError, OSError) as exc:
                message = str(exc)
                if message not in warned:
                    logger.warning("burrow: still reconnecting to relay %s: %s", self.settings.relay, message)
                    warned.add(message)
                continue
        # the loop also ends when the owners closed every reconnecting tunnel: no reconnect then
        if not self._stopped and any(t.state is TunnelState.OPEN for t in self.tunnels):
            logger.warning("burrow: reconnected to relay %s after %d attempt(s)", self.settings.relay, attempt)

    def _until_failover(self, lost_at: float) -> float | None:
        """Seconds until the first waiting tunnel of a fleet moves (None: not a fleet, none waits)."""
        if self.fleet is None:
            return None
        waits = [t.failover_after for t in self.tunnels if t.state is TunnelState.RECONNECTING and not t.moving]
        if not waits:
            return None
        return max(0.0, lost_at + min(waits) - asyncio.get_running_loop().time())

    def _give_up(self, reason: str) -> None:
        """Close the tunnels waiting for this relay, saying why once."""
        waiting = [t for t in self.tunnels if t.state is TunnelState.RECONNECTING and not t.moving]
        logger.error("burrow: %s; closing %d tunnel(s)", reason, len(waiting))
        for tunnel in waiting:
            self.tunnels.remove(tunnel)
            tunnel.closed_reason = reason
            tunnel.set_state(TunnelState.CLOSED)
        self._maybe_idle()

    async def _resume(self, session: AgentSession, tunnel: AgentTunnel) -> None:
        old_id, old_url = tunnel.id, _url(tunnel.address)
        try:
            address = await session.bind(tunnel.local_port, tunnel.unencrypted, tunnel.h2, tunnel.ticket, tunnel.access)
        except TunnelRefused as exc:
            if exc.code is not BindFailure.BAD_TICKET:
                raise
            # the relay cannot honour the ticket (its key changed): a new URL beats none
            logger.warning("burrow: tunnel %s cannot keep its URL (%s); opening a new one", old_id, exc)
            address = await session.bind(tunnel.local_port, tunnel.unencrypted, tunnel.h2, access=tunnel.access)
        if tunnel.closed or tunnel not in self.tunnels:  # closed by its owner meanwhile
            await session.unbind(address.id)
            return
        tunnel.address = address
        session.adopt(tunnel)
        if _url(address) != old_url:
            logger.warning("burrow: tunnel %s is now %s", old_id, _url(address))
        tunnel.set_state(TunnelState.OPEN)


async def connect_session(settings: AgentSettings, owner: RelayLink) -> AgentSession:
    """A session to the relay on this process's engine (``BURROW_AGENT_ENGINE``)."""
    from .native_session import NativeRelayConnection, native_enabled

    if native_enabled():
        return await NativeRelayConnection.connect(settings, owner)
    return await RelayConnection.connect(settings, owner)


def _retrieved(task: asyncio.Task[AgentSession]) -> None:
    """A connection attempt nobody waited for to the end: its error was seen (or will be) elsewhere."""
    if not task.cancelled():
        task.exception()


def _url(address: TunnelAddress | None) -> str:
    if address is None:
        return ""
    return f"{address.host}:{address.port}/{address.unencrypted_port}"
