"""The process-wide agent runtime: one event-loop thread, one session per relay.

Every tunnel of a process lives on one background event loop owned by
burrow, whatever the caller is: plain synchronous code, several threads, an
asyncio program (which awaits the work without blocking its own loop), or a
Jupyter kernel (whose loop is already running in the caller's thread). The
data path never depends on the caller's loop being responsive.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import logging
import os
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import PortAlreadyForwarded
from ..relay.config import RelayConfig
from .config import AgentSettings, RelayAddress
from .fleet import Fleet
from .link import RelayLink
from .plane import AgentSession
from .relay_connection import AgentTunnel
from .target import LocalTarget

logger = logging.getLogger("burrow")

if TYPE_CHECKING:
    from ..relay.server import Relay

T = TypeVar("T")

#: How long opening a tunnel on a fleet may take (ranking, then relay after relay): inside
#: forward()'s synchronous wait, so a caller gets one line, not a timeout of its own.
FLEET_OPEN_TIMEOUT = 25.0


try:  # imported with burrow, so that the first forward() does not pay for it
    import uvloop
except ImportError:  # pragma: no cover (Windows, exotic platforms)
    uvloop = None  # type: ignore[assignment]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (and not disabled with BURROW_LOOP=asyncio), else asyncio's."""
    if uvloop is not None and os.environ.get("BURROW_LOOP", "").lower() != "asyncio":
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class Runtime:
    """Owns the loop thread, the sessions, the embedded relay and the forwarded ports."""

    def __init__(self) -> None:
        self.generation = 0  # one more in each forked child: what an older one opened is not ours
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.links: dict[tuple[object, ...], RelayLink] = {}
        self.fleets: dict[tuple[object, ...], Fleet] = {}
        self.embedded: Relay | None = None
        self._embedded_starting: asyncio.Future[Relay] | None = None
        self.forwarded: dict[LocalTarget, object] = {}  # target -> whoever forwards it

    def after_fork_in_child(self) -> None:
        """A forked child starts with no runtime of its own (its loop thread did not survive the fork).

        Everything the parent had is dropped, not closed: the sockets are
        shared with the parent, and a GOAWAY or a close_notify from here would
        end the parent's sessions. The child's first ``forward()`` starts a
        new loop thread (and, with no relay configured, its own embedded relay).
        """
        self.generation += 1
        self._reset()

    # -------------------------------------------------------------- the thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the runtime's loop, from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())

    def in_loop_thread(self) -> bool:
        """True when called from the runtime's own thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self.loop is None:
                loop = new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="burrow", daemon=True)
                self._thread.start()
                ready.wait()
                self.loop = loop
                atexit.register(self._shutdown)
            return self.loop

    def _shutdown(self) -> None:
        """At exit: say goodbye to the relays so the URLs stop at once."""
        loop = self.loop
        if loop is None or not loop.is_running():
            return

        async def goodbye() -> None:
            for fleet in list(self.fleets.values()):
                fleet.stop()
            for link in list(self.links.values()):
                link.stop()
            if self.embedded is not None:
                self.embedded.close()

        try:
            asyncio.run_coroutine_threadsafe(goodbye(), loop).result(timeout=2)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        loop.call_soon_threadsafe(loop.stop)

    # --------------------------------------------------------------- sessions

    async def link_for(self, settings: AgentSettings) -> RelayLink:
        """The link to the relay these settings name (the embedded relay if none)."""
        if settings.relay is None:
            settings = dataclasses.replace(settings, relay=await self._embedded_address())
        return self._link(settings)

    def _link(self, settings: AgentSettings) -> RelayLink:
        key = settings.key()
        link = self.links.get(key)
        if link is None:
            link = self.links[key] = RelayLink(settings)
            link.on_idle = self._forget
        return link

    def _forget(self, link: RelayLink) -> None:
        """An idle link is forgotten (LINK_IDLE), and its fleet with its last link."""
        key = link.settings.key()
        if self.links.get(key) is link:
            del self.links[key]
        fleet = link.fleet
        if fleet is not None and not fleet.moving and not any(other.fleet is fleet for other in self.links.values()):
            fleet.stop()
            for fleet_key, known in list(self.fleets.items()):
                if known is fleet:
                    del self.fleets[fleet_key]

    def fleet_for(self, settings: AgentSettings) -> Fleet:
        """The fleet of relays these settings name (several relays, or a relays file)."""
        key = settings.key()
        fleet = self.fleets.get(key)
        if fleet is None:
            fleet = self.fleets[key] = Fleet(settings, self._link)
        return fleet

    @property
    def sessions(self) -> list[AgentSession]:
        """The open sessions (for introspection and tests)."""
        return [link.session for link in self.links.values() if link.session is not None]

    async def _embedded_address(self) -> RelayAddress:
        if self._embedded_starting is None:
            self._embedded_starting = asyncio.get_running_loop().create_future()
            from ..relay.server import Relay  # ~20 ms to import: only for the embedded relay

            try:
                relay = await Relay(RelayConfig(port=0, raise_fd_limit=False, loopback_urls=True)).start()
            except BaseException as exc:
                self._embedded_starting.set_exception(exc)
                self._embedded_starting.exception()
                self._embedded_starting = None
                raise
            self.embedded = relay
            self._embedded_starting.set_result(relay)
            logger.warning(
                "burrow: no BURROW_RELAY set: tunnels go through a relay inside this process, on loopback\n"
                "burrow: trust its CA to open the URLs: curl --cacert %s (or once for all: burrow trust)\n"
                "burrow: for a public relay, set BURROW_RELAY=host:port and BURROW_TOKEN",
                relay.ca_path,
            )
        relay = await asyncio.shield(self._embedded_starting)
        return RelayAddress(relay.config.domain, relay.port, connect_host="127.0.0.1")

    # ---------------------------------------------------------------- tunnels

    async def open(self, owner: object, tunnel: AgentTunnel, settings: AgentSettings) -> RelayLink:
        """Reserve the tunnel's port for ``owner`` and open the tunnel; returns its link."""
        target = tunnel.target
        holder = self.forwarded.get(target)
        if holder is not None:
            raise PortAlreadyForwarded(
                f"{target} is already forwarded by this process ({holder}); close that tunnel or reuse it"
            )
        self.forwarded[target] = owner
        try:
            if settings.is_fleet:
                link = await self.fleet_for(settings).open(tunnel, FLEET_OPEN_TIMEOUT)
            else:
                link = await self.link_for(settings)
                await link.open(tunnel)
        except BaseException:
            del self.forwarded[target]
            raise
        return link

    async def close(self, link: RelayLink, tunnel: AgentTunnel) -> None:
        """Close the tunnel at the relay (its link now: a fleet may have moved it), then release its port."""
        try:
            await (tunnel.link or link).close(tunnel)
        finally:
            self.forwarded.pop(tunnel.target, None)


_runtime = Runtime()
if hasattr(os, "register_at_fork"):  # (not on Windows, which does not fork)
    os.register_at_fork(after_in_child=_runtime.after_fork_in_child)


def runtime() -> Runtime:
    """The process's runtime."""
    return _runtime
