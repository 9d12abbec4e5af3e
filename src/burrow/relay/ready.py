"""Tunnel ids kept ready with their TLS identity made, so a new tunnel's first handshake does not pay for it.

On a dev relay every tunnel host has a certificate of its own. Issuing one and
loading it takes ~3 ms (mostly OpenSSL parsing PEM, in a worker thread); done
at the first handshake, it would be the bulk of a new tunnel's first request.
So the pool keeps :data:`READY_IDS` ids whose identity the data plane has
already prepared. While all but one are ready, the refill waits for a pause
in binds: a tunnel just bound usually takes its first connection at once,
and making a certificate beside it slows that down. Below that it refills at
once, so a burst of binds finds two or more ready.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from .plane import DataPlane
from .registry import new_tunnel_id

#: Tunnel ids kept ready (a burst of binds beyond this many pays the certificate
#: at the first handshake instead).
READY_IDS = 4

#: While all ids but one are ready, the pool is refilled only once binds have
#: paused this long.
REFILL_DELAY = 0.05

#: uvloop's timers have millisecond resolution and may fire this much early.
TIMER_SLACK = 0.002


class ReadyIds:
    """Hands out fresh tunnel ids, prepared ones first (see the module docstring)."""

    def __init__(
        self,
        plane: DataPlane,
        domain: str,
        in_use: Callable[[str], bool],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.plane = plane
        self.domain = domain
        self.in_use = in_use  # is this id taken by an open tunnel?
        self.spawn = spawn
        self.ready: deque[str] = deque()
        self.last_take = 0.0  # time.monotonic() of the last take()
        self._filling = False
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False

    def take(self, h2: bool) -> str:
        """A fresh id; a prepared one if any is ready (h2 tunnels need an identity of their own)."""
        tunnel_id = self.ready.popleft() if self.ready and not h2 else self._unused_id()
        self.last_take = time.monotonic()
        self.top_up()
        return tunnel_id

    def give_back(self, tunnel_id: str, h2: bool) -> None:
        """An id from :meth:`take` that was not used after all (a later step of the bind failed)."""
        if not h2 and len(self.ready) < READY_IDS and self.plane.per_host_certificates:
            self.ready.appendleft(tunnel_id)  # (its prepared identity is still cached)

    def stop(self) -> None:
        """No more refills."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _unused_id(self) -> str:
        # 36**14 ids: a collision with an open or ready id is all but impossible, but cheap to rule out
        while True:
            tunnel_id = new_tunnel_id()
            if not self.in_use(tunnel_id) and tunnel_id not in self.ready:
                return tunnel_id

    def top_up(self) -> None:
        """Refill the pool: at once when it is low, after a pause in binds when only one is missing."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stopped or not self.plane.per_host_certificates or self._filling or len(self.ready) >= READY_IDS:
            return
        if self._waits():
            delay = self.last_take + REFILL_DELAY - time.monotonic()
            self._timer = asyncio.get_running_loop().call_later(delay, self.top_up)
            return
        self._filling = True
        self.spawn(self._fill())

    def _waits(self) -> bool:
        """All ids but one are ready, and the last take was less than REFILL_DELAY ago."""
        recent = time.monotonic() - self.last_take < REFILL_DELAY - TIMER_SLACK
        return len(self.ready) >= READY_IDS - 1 and recent

    async def _fill(self) -> None:
        try:
            while len(self.ready) < READY_IDS and not self._waits() and not self._stopped:
                tunnel_id = self._unused_id()
                try:
                    await self.plane.prepare_host(f"{tunnel_id}.{self.domain}")
                except RuntimeError:  # the interpreter is exiting: its thread pool is gone
                    return
                self.ready.append(tunnel_id)
        finally:
            self._filling = False
        self.top_up()  # binds came meanwhile: wait for their pause
