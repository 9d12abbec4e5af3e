"""``burrow.forward()``: expose a local port through a relay, sync or async."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from types import TracebackType

from ..connection import TrafficStats
from ..errors import BurrowError, ConfigurationError, TunnelClosed
from ..tunnel import Tunnel
from .config import AgentSettings
from .runtime import runtime
from .session import CONNECT_TIMEOUT, REQUEST_TIMEOUT, AgentSession, AgentTunnel

#: A synchronous caller never waits longer than connecting plus one request.
SYNC_TIMEOUT = CONNECT_TIMEOUT + 2 * REQUEST_TIMEOUT


def _check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigurationError(f"port {port!r} is not a TCP port; give an int from 1 to 65535")
    return port


class Forward:
    """A tunnel to a local port: a context manager (``with`` or ``async with``).

    Entering opens the tunnel and returns its :class:`~burrow.Tunnel` once
    the relay has confirmed it; leaving closes it at the relay. For tunnels
    whose life is not a block (a web service opening them on demand), call
    :meth:`open` / :meth:`close` or :meth:`aopen` / :meth:`aclose`.
    """

    def __init__(
        self,
        port: int,
        *,
        unencrypted: bool = False,
        h2: bool = False,
        relay: str | None = None,
        token: str | None = None,
        ca: str | os.PathLike[str] | None = None,
    ) -> None:
        self.port = _check_port(port)
        if unencrypted and h2:
            raise ConfigurationError(
                "h2=True negotiates HTTP/2 by TLS ALPN, which a raw TCP address cannot do; "
                "open the unencrypted tunnel without h2 (clients speak HTTP/2 with prior knowledge there)"
            )
        self.unencrypted = bool(unencrypted)
        self.h2 = bool(h2)
        self.settings = AgentSettings.resolve(relay, token, ca)
        self._tunnel: Tunnel | None = None
        self._session: AgentSession | None = None
        self._agent_tunnel: AgentTunnel | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        where = self._tunnel.url if self._tunnel is not None else "not open"
        return f"<burrow.Forward port={self.port} {where}>"

    @property
    def tunnel(self) -> Tunnel:
        """The open tunnel; raises :class:`TunnelClosed` before opening and after closing."""
        if self._tunnel is None or not self.is_open:
            raise TunnelClosed(f"the tunnel to port {self.port} is not open; use it inside its with-block")
        return self._tunnel

    @property
    def is_open(self) -> bool:
        """True from a successful open until close (or until the relay closed it)."""
        return self._agent_tunnel is not None and not self._agent_tunnel.closed

    @property
    def stats(self) -> TrafficStats:
        """Open connections and bytes each way, live."""
        return self._agent_tunnel.stats if self._agent_tunnel is not None else TrafficStats()

    # -------------------------------------------------------------------- async

    async def aopen(self) -> Tunnel:
        """Open the tunnel from asyncio code (any loop; the work runs on burrow's)."""
        return await asyncio.wrap_future(self._submit_open())

    async def aclose(self) -> None:
        """Close the tunnel from asyncio code."""
        future = self._submit_close()
        if future is not None:
            await asyncio.wrap_future(future)

    async def __aenter__(self) -> Tunnel:
        return await self.aopen()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --------------------------------------------------------------------- sync

    def open(self) -> Tunnel:
        """Open the tunnel, blocking until the relay confirms it."""
        if runtime().in_loop_thread():
            raise BurrowError("forward() was used synchronously on burrow's own thread; use `async with` there")
        future = self._submit_open()
        try:
            return future.result(timeout=SYNC_TIMEOUT)
        except BaseException:
            # interrupted (Ctrl-C) or timed out: never leave a tunnel open behind the caller's back
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or self._submit_close())
            raise

    def close(self) -> None:
        """Close the tunnel at the relay (its URL stops answering); idempotent."""
        future = self._submit_close()
        if future is not None:
            try:
                future.result(timeout=REQUEST_TIMEOUT + 1)
            except concurrent.futures.TimeoutError:
                pass

    def __enter__(self) -> Tunnel:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _submit_open(self) -> concurrent.futures.Future[Tunnel]:
        with self._lock:
            if self._agent_tunnel is not None:
                raise BurrowError(f"this forward() of port {self.port} was already opened; call forward() again")
            self._agent_tunnel = _OPENING
        return runtime().submit(self._open())

    async def _open(self) -> Tunnel:
        try:
            session, agent_tunnel = await runtime().open(self, self.port, self.unencrypted, self.h2, self.settings)
        except BaseException:
            self._agent_tunnel = None
            raise
        info = agent_tunnel.info
        self._session, self._agent_tunnel = session, agent_tunnel
        self._tunnel = Tunnel(
            id=info["id"],
            host=info["host"],
            port=int(info["port"]),
            unencrypted_host=info.get("unencrypted_host"),
            unencrypted_port=info.get("unencrypted_port"),
        )
        return self._tunnel

    def _submit_close(self) -> concurrent.futures.Future[None] | None:
        with self._lock:
            session, agent_tunnel = self._session, self._agent_tunnel
            self._session = None
        if session is None or agent_tunnel is None or agent_tunnel is _OPENING:
            return None
        return runtime().submit(runtime().close(self.port, session, agent_tunnel))


#: Placeholder while a Forward is opening, so it cannot be opened twice at once.
_OPENING = AgentTunnel("", 0, {}, closed=True)


def forward(
    port: int,
    *,
    unencrypted: bool = False,
    h2: bool = False,
    relay: str | None = None,
    token: str | None = None,
    ca: str | os.PathLike[str] | None = None,
) -> Forward:
    """Expose local TCP ``port`` to the Internet through a relay.

    ``with burrow.forward(8000) as tunnel: print(tunnel.url)``; ``async with``
    works too. ``unencrypted=True`` adds a raw TCP address on a random port
    (``tunnel.tcp_socket``); ``h2=True`` makes the TLS address negotiate
    HTTP/2 (for services that speak it). ``relay``, ``token`` and ``ca``
    override ``BURROW_RELAY``, ``BURROW_TOKEN``/``BURROW_TOKEN_FILE`` and
    ``BURROW_CA``; with no relay at all, an embedded one on loopback is used.
    """
    return Forward(port, unencrypted=unencrypted, h2=h2, relay=relay, token=token, ca=ca)
