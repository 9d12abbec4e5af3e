"""A fleet of relays: the nearest healthy one for new tunnels, and failover for open ones.

``BURROW_RELAY=r1.example.com,r2.example.com:8443`` (or ``forward(relay=...)``,
``burrow forward --relay``) names several relays; ``BURROW_RELAYS_FILE`` names
a TOML or JSON file of them, re-read when it changes. A :class:`Fleet` holds
them for every tunnel of the process with those settings:

- **Ranking.** On first use it measures every relay at once: the median of
  :data:`RTT_SAMPLES` TLS handshakes with the relay's agent endpoint (a TCP
  handshake alone would be answered by any proxy or load balancer on the way;
  TLS is answered by the relay, and also proves it is trusted). It keeps the
  ranking and measures again after :data:`RERANK_AFTER` seconds, in the
  background. A relay that failed (a refused connection, a lost session) is
  put behind the others for :data:`DOWN_FOR` seconds.
- **New tunnels** go to the first relay of the ranking that takes them; a
  relay that does not goes down the list at once.
- **Open tunnels** whose relay fails reconnect to it (same URL, resumed by
  ticket) for ``failover_after`` seconds (:class:`~burrow.agent.link.RelayLink`
  does that); then the link hands them here and they move to the nearest
  relay that takes them, with that relay's URL. Their state goes from
  RECONNECTING to OPEN, ``Forward.tunnel`` gives the new URL and relay. If no
  other relay takes them, their own is tried last, with their ticket.

Each relay gets its own :class:`~burrow.agent.link.RelayLink` (one session).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BurrowError, ConfigurationError, RelayUnavailable
from ..tunnel import TunnelState
from .config import AgentSettings, RelayAddress

if TYPE_CHECKING:
    from .link import RelayLink
    from .relay_connection import AgentTunnel

logger = logging.getLogger("burrow")

#: TLS handshakes per relay in a measurement; their median is its round-trip time.
RTT_SAMPLES = 3
#: A handshake slower than this counts the relay as unreachable.
RTT_TIMEOUT = 3.0
#: The ranking is measured again (in the background) once it is this old.
RERANK_AFTER = 300.0
#: A relay that failed goes behind the others for this long.
DOWN_FOR = 30.0
#: A relays file larger than this, or listing more relays, is refused (it is read again and again).
MAX_FILE_BYTES = 256 * 1024
MAX_RELAYS = 256


@dataclass(frozen=True)
class Listed:
    """A relay of a relays file, with its region (a name for people: logs and tunnel.relay)."""

    address: RelayAddress
    region: str = ""


def read_relays_file(path: Path) -> list[Listed]:
    """Parse a relays file (TOML, or JSON when it ends in .json); errors are one line.

    TOML: ``[[relay]]`` tables with ``address = "r1.example.com:443"`` and an
    optional ``region = "eu-west"``. JSON: ``{"relays": [...]}`` or a bare list,
    of such objects or of address strings.
    """
    source = f"BURROW_RELAYS_FILE {path}"
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read {source} ({(exc.strerror or str(exc)).lower()}); check the path"
        ) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigurationError(f"{source} is larger than {MAX_FILE_BYTES // 1024} KiB; list the relays only")
    import json  # (a fleet's only: forward() starts without them)
    import tomllib

    try:
        text = data.decode()
        parsed: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:  # (TOMLDecodeError and JSONDecodeError are ValueErrors)
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigurationError(
            f"{source} is not {kind} ({str(exc).splitlines()[0]}); see docs/operating.md"
        ) from None
    items = parsed.get("relays", parsed.get("relay")) if isinstance(parsed, dict) else parsed
    if not isinstance(items, list) or not items:
        raise ConfigurationError(f'{source} lists no relay; write [[relay]] tables with address = "host:port"')
    if len(items) > MAX_RELAYS:
        raise ConfigurationError(f"{source} lists {len(items)} relays; at most {MAX_RELAYS}")
    relays: list[Listed] = []
    for index, item in enumerate(items, 1):
        if isinstance(item, str):
            item = {"address": item}
        address, region = (item.get("address"), item.get("region", "")) if isinstance(item, dict) else (None, "")
        if not isinstance(address, str) or not isinstance(region, str) or len(region) > 64:
            raise ConfigurationError(
                f'{source}: relay {index} needs address = "host:port" (and region, if any, a short string)'
            )
        relays.append(Listed(RelayAddress.parse(address, f"{source}: relay {index}"), region))
    if len({r.address for r in relays}) != len(relays):
        raise ConfigurationError(f"{source} names a relay twice; list each once")
    return relays


def _file_signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Fleet:
    """The relays one set of agent settings may use (see the module docstring)."""

    def __init__(self, settings: AgentSettings, link_for: Callable[[AgentSettings], RelayLink]) -> None:
        self.settings = settings
        self._link_for = link_for
        self.relays: list[Listed] = [Listed(address) for address in settings.fleet]
        self._file_seen: tuple[int, int, int, int] | None = None
        self.rtt: dict[RelayAddress, float] = {}  # seconds; inf: unreachable at the last measurement
        self.measured_at: float | None = None
        self._measuring: asyncio.Task[None] | None = None
        self.failed_at: dict[RelayAddress, float] = {}
        self._moves: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Fleet {', '.join(str(r.address) for r in self.relays)}>"

    # ------------------------------------------------------------------- ranking

    def _refresh(self) -> bool:
        """Re-read the relays file if it changed; True when the list changed."""
        path = self.settings.relays_file
        if path is None:
            return False
        seen = _file_signature(path)
        if seen == self._file_seen and self.relays:
            return False
        self._file_seen = seen
        try:
            relays = read_relays_file(path)
        except ConfigurationError as exc:
            if not self.relays:
                raise
            logger.warning("burrow: %s; keeping the %d relays read before", exc, len(self.relays))
            return False
        changed = relays != self.relays
        self.relays = relays
        return changed

    async def ranking(self) -> list[RelayAddress]:
        """The relays, nearest healthy first (measured on first use, then every RERANK_AFTER s)."""
        loop = asyncio.get_running_loop()
        changed = self._refresh()
        if (
            changed
            or self.measured_at is None
            or any(r.address not in self.rtt for r in self.relays)
            or all(t == math.inf for t in self.rtt.values())  # (none answered: measure again rather than guess)
        ):
            await self.measure()
        elif loop.time() - self.measured_at > RERANK_AFTER and self._measuring is None:
            self._measuring = loop.create_task(self._measure())
        now = loop.time()
        order = {r.address: index for index, r in enumerate(self.relays)}
        return sorted(order, key=lambda a: (self._down(a, now), self.rtt.get(a, math.inf), order[a]))

    def _down(self, address: RelayAddress, now: float) -> bool:
        failed = self.failed_at.get(address)
        return failed is not None and now - failed < DOWN_FOR

    def failed(self, address: RelayAddress) -> None:
        """``address`` refused a connection or lost its session: behind the others for DOWN_FOR s."""
        self.failed_at[address] = asyncio.get_running_loop().time()

    async def measure(self) -> None:
        """Measure every relay now (callers at the same time share one measurement)."""
        if self._measuring is None:
            self._measuring = asyncio.get_running_loop().create_task(self._measure())
        await asyncio.shield(self._measuring)

    async def _measure(self) -> None:
        try:
            relays = [r.address for r in self.relays]
            times = await asyncio.gather(*(self._round_trip(address) for address in relays))
            self.rtt = dict(zip(relays, times, strict=True))
            self.measured_at = asyncio.get_running_loop().time()
            logger.info(
                "burrow: relays by round trip: %s",
                ", ".join(
                    f"{a} {t * 1000:.1f} ms" if t < math.inf else f"{a} unreachable" for a, t in self.rtt.items()
                ),
            )
        finally:
            self._measuring = None

    async def _round_trip(self, address: RelayAddress) -> float:
        from .relay_connection import dial_hosts  # (a cycle at import time otherwise)

        loop = asyncio.get_running_loop()
        try:
            context = self._settings(address).ssl_context()
        except ConfigurationError:
            return math.inf
        samples = []
        for _ in range(RTT_SAMPLES):
            started = loop.time()
            try:
                async with asyncio.timeout(RTT_TIMEOUT):
                    for host in dial_hosts(address):
                        try:
                            transport, _ = await loop.create_connection(
                                asyncio.Protocol,
                                host,
                                address.port,
                                ssl=context,
                                server_hostname=address.host,
                                ssl_shutdown_timeout=RTT_TIMEOUT,
                            )
                            break
                        except ConnectionRefusedError:
                            if host == dial_hosts(address)[-1]:
                                raise
            except (OSError, TimeoutError, ssl.SSLError, ValueError):  # (ValueError: a name IDNA refuses)
                return math.inf
            samples.append(loop.time() - started)
            # a clean close (the client's Finished, then close_notify): the relay sees a handshake
            # that succeeded and an agent that left before HELLO, not a failure to count and log
            transport.close()
        return sorted(samples)[len(samples) // 2]  # (the median: RTT_SAMPLES is odd)

    # ------------------------------------------------------------------- tunnels

    def _settings(self, address: RelayAddress) -> AgentSettings:
        return replace(self.settings, relay=address)

    def link(self, address: RelayAddress) -> RelayLink:
        """The link to one relay of the fleet (made on first use)."""
        link = self._link_for(self._settings(address))
        link.fleet = self
        return link

    def region(self, address: RelayAddress) -> str:
        return next((r.region for r in self.relays if r.address == address), "")

    async def open(self, tunnel: AgentTunnel, within: float) -> RelayLink:
        """Open ``tunnel`` on the nearest relay that takes it, within ``within`` seconds; its link.

        When every relay refused for a reason that waiting will not fix (a token
        refused everywhere, a certificate not trusted), the first such error is
        raised as it is; otherwise one transient RelayUnavailable naming each.
        """
        problems: list[BurrowError] = []
        ranked: list[RelayAddress] = []
        try:
            async with asyncio.timeout(within):
                ranked = await self.ranking()
                for address in ranked:
                    link = self.link(address)
                    try:
                        await link.open(tunnel)
                        return link
                    except RelayUnavailable as exc:
                        self.failed(address)
                        problems.append(exc)
                    except BurrowError as exc:  # (a refused token or tunnel: other relays may still take it)
                        problems.append(exc)
        except TimeoutError:
            problems.append(RelayUnavailable(f"no answer within {within:.0f} s", transient=True))
        if problems and not any(getattr(p, "transient", False) for p in problems):
            raise problems[0]
        said = [str(p) for p in problems]
        shown = "; ".join(said[:3]) + (f"; and {len(said) - 3} more" if len(said) > 3 else "")
        tried = len(ranked) or len(self.relays)
        raise RelayUnavailable(f"no relay of {tried} took the tunnel: {shown}", transient=True)

    def move(self, tunnel: AgentTunnel, origin: RelayLink, away: float) -> None:
        """Move a tunnel whose relay stayed away ``away`` seconds (its failover_after) to another relay."""
        tunnel.moving = True
        task = asyncio.get_running_loop().create_task(self._move(tunnel, origin, away))
        self._moves.add(task)
        task.add_done_callback(self._moves.discard)

    async def _move(self, tunnel: AgentTunnel, origin: RelayLink, away: float) -> None:
        try:
            await self._place(tunnel, origin, away)
        finally:
            tunnel.moving = False

    async def _place(self, tunnel: AgentTunnel, origin: RelayLink, away: float) -> None:
        from .link import backoff

        home = origin.settings.relay
        assert home is not None
        old_id = tunnel.id
        attempt = 0
        while tunnel.state is TunnelState.RECONNECTING:
            await asyncio.sleep(backoff(attempt))
            attempt += 1
            try:
                ranked = await self.ranking()
            except Exception as exc:  # (a bad relays file edit, a name no resolver takes: try again later)
                logger.warning("burrow: cannot rank the relays to move tunnel %s: %s", old_id, exc)
                continue
            for address in [a for a in ranked if a != home] + [home]:
                if tunnel.state is not TunnelState.RECONNECTING:
                    return
                link = self.link(address)
                try:
                    if address == home:
                        await link.resume(tunnel)
                    else:
                        await link.open(tunnel)
                except RelayUnavailable:
                    self.failed(address)
                    continue
                except (BurrowError, OSError, ValueError):
                    continue
                if tunnel.closed:
                    return
                if address != home and tunnel.address is not None:
                    region = self.region(address)
                    logger.warning(
                        "burrow: relay %s stayed away %.1f s (failover_after): tunnel %s moved to relay %s%s, "
                        "now at https://%s:%d",
                        home,
                        away,
                        old_id,
                        address,
                        f" ({region})" if region else "",
                        tunnel.address.host,
                        tunnel.address.port,
                    )
                return

    @property
    def moving(self) -> bool:
        """Tunnels are being placed on other relays."""
        return bool(self._moves)

    def stop(self) -> None:
        """Process exit (or idle): no more moves."""
        for task in list(self._moves):
            task.cancel()
        if self._measuring is not None:
            self._measuring.cancel()
