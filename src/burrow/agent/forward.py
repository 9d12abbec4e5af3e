"""``burrow.forward()``: expose a local port through a relay, sync or async."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import os
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from ..connection import TrafficStats
from ..errors import BurrowError, ConfigurationError, TunnelClosed
from ..protocol.messages import (
    MAX_CLIENT_CA_LENGTH,
    PEM_CERTIFICATE,
    PROXY_PROTOCOL_VERSIONS,
    Access,
    networks,
)
from ..tunnel import Tunnel, TunnelState
from .config import AgentSettings, RelayAddress
from .link import RelayLink
from .relay_connection import CONNECT_TIMEOUT, LOCAL_CONNECT_TIMEOUT, REQUEST_TIMEOUT, AgentTunnel
from .runtime import runtime
from .target import LocalTarget

#: A synchronous caller never waits longer than connecting plus one request.
SYNC_TIMEOUT = CONNECT_TIMEOUT + 2 * REQUEST_TIMEOUT


def _check_connect_timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ConfigurationError(
            f"connect_timeout {value!r} is not a number of seconds; give 0 or more (0: reset at once)"
        )
    return float(value)


def _check_h2(h2: bool, h2_enabled: bool | None) -> bool:
    """``h2_enabled=`` is the reference API's spelling of ``h2=``."""
    if h2_enabled is None:
        return bool(h2)
    if h2 and not h2_enabled:
        raise ConfigurationError("h2=True and h2_enabled=False disagree; give one of them")
    return bool(h2_enabled)


def _read_client_ca(client_ca: str | bytes | os.PathLike[str] | None) -> str | None:
    """``client_ca=``: PEM text (str or bytes), or a file holding it; checked here, one line if bad."""
    if client_ca is None:
        return None
    if isinstance(client_ca, bytes):
        client_ca = client_ca.decode(errors="replace")
    if isinstance(client_ca, str) and PEM_CERTIFICATE in client_ca:
        pem, source = client_ca, "client_ca"
    else:
        try:
            pem, source = Path(client_ca).read_text(), f"client_ca file {client_ca}"
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(
                f"cannot read client_ca {client_ca} ({exc}); give PEM text or a PEM file"
            ) from None
    try:
        if len(pem) > MAX_CLIENT_CA_LENGTH or PEM_CERTIFICATE not in pem:
            raise ValueError(pem[:0])
        ssl.create_default_context(cadata=pem)  # every certificate parsed, as a verifier will
    except (ssl.SSLError, ValueError):
        raise ConfigurationError(f"{source} is not PEM CA certificates (of at most 12 KiB)") from None
    return pem


def _check_access(allow_cidrs: Iterable[str] | None, proxy_protocol: int | None) -> Access:
    if isinstance(allow_cidrs, str):  # a lone "10.0.0.0/8" would otherwise be read character by character
        allow_cidrs = [allow_cidrs]
    try:
        allow = networks(allow_cidrs or ())
    except ValueError as exc:
        raise ConfigurationError(f"allow_cidrs: {exc}") from None
    if allow_cidrs is not None and not allow:
        raise ConfigurationError("allow_cidrs=[] would refuse everyone; leave it out to allow anyone")
    if proxy_protocol not in (None, 0, *PROXY_PROTOCOL_VERSIONS):
        raise ConfigurationError(f"proxy_protocol={proxy_protocol!r}: give 1 (text header) or 2 (binary header)")
    return Access(allow, proxy_protocol or 0)


class Forward:
    """A tunnel to a local port: a context manager (``with`` or ``async with``).

    Entering opens the tunnel and returns its :class:`~burrow.Tunnel` once
    the relay has confirmed it; leaving closes it at the relay. For tunnels
    whose life is not a block (a web service opening them on demand), call
    :meth:`open` / :meth:`close` or :meth:`aopen` / :meth:`aclose`.
    """

    def __init__(
        self,
        port: int | str,
        *,
        unencrypted: bool = False,
        h2: bool = False,
        h2_enabled: bool | None = None,
        relay: str | RelayAddress | tuple[RelayAddress, ...] | None = None,
        token: str | None = None,
        ca: str | os.PathLike[str] | None = None,
        on_state: Callable[[TunnelState], None] | None = None,
        connect_timeout: float = LOCAL_CONNECT_TIMEOUT,
        allow_cidrs: Iterable[str] | None = None,
        proxy_protocol: int | None = None,
        client_ca: str | bytes | os.PathLike[str] | None = None,
        failover_after: float | None = None,
    ) -> None:
        self.target = LocalTarget.parse(port)
        self.port = self.target.port  # (0 for a unix socket)
        h2 = _check_h2(h2, h2_enabled)
        self.connect_timeout = _check_connect_timeout(connect_timeout)
        if unencrypted and h2:
            raise ConfigurationError(
                "h2=True negotiates HTTP/2 by TLS ALPN, which a raw TCP address cannot do; "
                "open the unencrypted tunnel without h2 (clients speak HTTP/2 with prior knowledge there)"
            )
        self.unencrypted = bool(unencrypted)
        self.h2 = bool(h2)
        self.settings = AgentSettings.resolve(relay, token, ca, failover_after)
        self.access = dataclasses.replace(
            _check_access(allow_cidrs, proxy_protocol), client_ca=_read_client_ca(client_ca)
        )
        self._tunnel = AgentTunnel(
            self.target,
            self.unencrypted,
            self.h2,
            access=self.access,
            on_state=on_state,
            connect_timeout=self.connect_timeout,
            failover_after=self.settings.failover_after,
        )
        self._link: RelayLink | None = None
        self._opened = False
        self._generation = -1  # the runtime generation (process, across forks) that opened it
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        address = self._tunnel.address
        where = _tunnel_from(self._tunnel).url if address is not None else "not open"
        return f"<burrow.Forward {self.target} {self.state.value} {where}>"

    @property
    def tunnel(self) -> Tunnel:
        """The tunnel's addresses; raises :class:`TunnelClosed` before opening and after closing.

        The value stays the same across reconnects (same id and URL); only a
        raw TCP port that the relay could not take back may change, and with
        a fleet of relays, a tunnel moved to another relay (``relay``, ``url``).
        """
        if self._tunnel.address is None or self._tunnel.closed:
            raise TunnelClosed(f"the tunnel to {self.target} is not open; use it inside its with-block")
        return _tunnel_from(self._tunnel)

    @property
    def state(self) -> TunnelState:
        """OPENING, OPEN, RECONNECTING (the link dropped; the URL comes back) or CLOSED."""
        return self._tunnel.state

    @property
    def closed_reason(self) -> str:
        """Why the tunnel closed without its owner closing it, in one line: the relay closed it, or
        refused the token when the agent reconnected (revoked, expired). "" otherwise."""
        return self._tunnel.closed_reason

    @property
    def is_open(self) -> bool:
        """True from a successful open until close, reconnections included."""
        return self._tunnel.state in (TunnelState.OPEN, TunnelState.RECONNECTING)

    @property
    def stats(self) -> TrafficStats:
        """Open connections and bytes each way, live, across reconnects."""
        return self._tunnel.stats

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
            if self._opened:
                raise BurrowError(f"this forward() of {self.target} was already opened; call forward() again")
            self._opened = True
        self._generation = runtime().generation
        return runtime().submit(self._open())

    async def _open(self) -> Tunnel:
        try:
            self._link = await runtime().open(self, self._tunnel, self.settings)
        except BaseException:
            self._tunnel.set_state(TunnelState.CLOSED)
            raise
        assert self._tunnel.address is not None
        return _tunnel_from(self._tunnel)

    def _submit_close(self) -> concurrent.futures.Future[None] | None:
        with self._lock:
            link, self._link = self._link, None
        if link is None:
            return None
        if self._generation != runtime().generation:
            # opened before this process was forked: the tunnel is the parent's to close
            self._tunnel.set_state(TunnelState.CLOSED)
            return None
        return runtime().submit(runtime().close(link, self._tunnel))


def _tunnel_from(tunnel: AgentTunnel) -> Tunnel:
    address = tunnel.address
    assert address is not None
    return Tunnel(
        address.id, address.host, address.port, address.unencrypted_host, address.unencrypted_port, tunnel.relay
    )


def forward(
    port: int | str,
    *,
    unencrypted: bool = False,
    h2: bool = False,
    h2_enabled: bool | None = None,
    relay: str | None = None,
    token: str | None = None,
    ca: str | os.PathLike[str] | None = None,
    on_state: Callable[[TunnelState], None] | None = None,
    connect_timeout: float = LOCAL_CONNECT_TIMEOUT,
    allow_cidrs: Iterable[str] | None = None,
    proxy_protocol: int | None = None,
    client_ca: str | bytes | os.PathLike[str] | None = None,
    failover_after: float | None = None,
) -> Forward:
    """Expose local TCP ``port`` to the Internet through a relay.

    ``with burrow.forward(8000) as tunnel: print(tunnel.url)``; ``async with``
    works too. ``port`` may also be ``"HOST:PORT"`` (a host this machine
    reaches, e.g. ``"127.0.0.2:8000"`` or a sibling container) or
    ``"unix:/path/to.sock"``; the agent dials only that. ``unencrypted=True``
    adds a raw TCP address on a random port (``tunnel.tcp_socket``);
    ``h2=True`` (or ``h2_enabled=True``) makes the TLS address negotiate
    HTTP/2 (for services that speak it). ``relay``, ``token`` and ``ca``
    override ``BURROW_RELAY``, ``BURROW_TOKEN``/``BURROW_TOKEN_FILE`` and
    ``BURROW_CA``; with no relay at all, an embedded one on loopback is used.

    A public connection that arrives while nothing listens on ``port`` yet
    waits up to ``connect_timeout`` seconds (default 10) for the service, its
    bytes kept and delivered first; after that it is closed.

    ``allow_cidrs=["203.0.113.0/24", "2001:db8::/32"]`` lets only clients
    from those networks in (the relay refuses others before any TLS work).
    ``proxy_protocol=1`` or ``2`` has the relay put a PROXY protocol header of
    that version before each connection's bytes, so the service learns the
    client's address (nginx: ``listen ... proxy_protocol``). ``client_ca=`` (PEM
    text or a file) makes the TLS address require a client certificate issued
    by one of those CAs (mutual TLS); the raw TCP address is not covered.

    If the link to the relay drops, burrow reconnects by itself and the
    tunnel comes back with the same URL; ``on_state`` (called on burrow's
    thread) and ``Forward.state`` report RECONNECTING, then OPEN again.

    ``relay="r1.example.com,r2.example.com:8443"`` (or ``BURROW_RELAY``, or a
    file named by ``BURROW_RELAYS_FILE``) is a fleet: the tunnel opens on the
    nearest relay that answers (``tunnel.relay``). If that relay stays away
    ``failover_after`` seconds (default 30, ``BURROW_FAILOVER_AFTER``), the
    tunnel moves to the next nearest, with that relay's URL: the state goes
    RECONNECTING, then OPEN, and ``Forward.tunnel`` gives the new URL.
    """
    return Forward(
        port,
        unencrypted=unencrypted,
        h2=h2,
        h2_enabled=h2_enabled,
        relay=relay,
        token=token,
        ca=ca,
        on_state=on_state,
        connect_timeout=connect_timeout,
        allow_cidrs=allow_cidrs,
        proxy_protocol=proxy_protocol,
        client_ca=client_ca,
        failover_after=failover_after,
    )
