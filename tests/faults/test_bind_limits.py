"""Refused binds leave nothing behind, and a relay short of descriptors never misroutes.

Tried as a hostile agent would: binds over the token's limit, and raw TCP
binds against a relay whose descriptor limit is low. Before the control plane
checked limits first and took its own sockets, 50 refused binds minted 51
certificates, and under ``ulimit -n`` a BOUND could name a port another
tunnel held, or one where nothing listened.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from burrow.agent.config import AgentSettings, RelayAddress
from burrow.agent.relay_connection import AgentTunnel, RelayConnection
from burrow.agent.target import LocalTarget
from burrow.errors import TunnelRefused
from burrow.protocol import events as ev
from burrow.protocol.messages import BindFailure, TunnelAddress
from burrow.relay import Relay, RelayConfig

from ..helpers import EchoServer, free_port
from .conftest import RelayProcess

REFUSED_BINDS = 1000

#: The relay's descriptor limit in the hostile test: low enough that 200 raw TCP
#: tunnels cannot all have a listener.
LOW_LIMIT = 200
HOSTILE_BINDS = 200


async def _bind_all(session: RelayConnection, count: int, unencrypted: bool) -> list[TunnelAddress | TunnelRefused]:
    results = await asyncio.gather(
        *(session.bind(8000 + i % 1000, unencrypted=unencrypted, h2=False) for i in range(count)),
        return_exceptions=True,
    )
    for result in results:
        if not isinstance(result, TunnelAddress | TunnelRefused):
            raise result
    return results  # type: ignore[return-value]


def test_a_thousand_refused_binds_leave_no_certificate_id_or_memory_behind() -> None:
    async def main() -> None:
        # tracemalloc slows this loop (agent and relay control) tenfold under some pytest plugins
        # (hypothesis 6.170's: ~10 s for the traced binds): heartbeats must not end the session meanwhile
        config = RelayConfig(port=0, max_tunnels_per_token=1, raise_fd_limit=False, heartbeat_timeout=120)
        relay = await Relay(config).start()
        settings = AgentSettings(RelayAddress("localhost", relay.port), heartbeat_timeout=120)
        session = await RelayConnection.connect(settings)
        try:
            assert relay.plane is not None and relay.control is not None
            first = await session.bind(8000, unencrypted=False, h2=False)
            assert isinstance(first, TunnelAddress)
            # warm-up at the same scale: tables (asyncio's task set, ours) grow to their high-water mark once
            await _bind_all(session, REFUSED_BINDS, unencrypted=False)
            await asyncio.sleep(0.5)  # the ready pool has refilled after the first bind
            plane, pool = relay.plane, relay.control.ready
            before = (plane.census(), list(pool.ready), len(relay.control.registry))
            gc.collect()
            tracemalloc.start(12)
            results = await _bind_all(session, REFUSED_BINDS, unencrypted=False)
            codes = {r.code for r in results if isinstance(r, TunnelRefused)}
            assert codes == {BindFailure.LIMIT} and len(results) == REFUSED_BINDS
            assert "1 tunnels at this relay (the limit)" in str(results[0])
            del results
            gc.collect()
            # what the relay's code allocated and still holds (the agent side, which
            # keeps this test's 1,000 exceptions, is left out)
            relay_side = tracemalloc.Filter(True, "*/burrow/relay/*", all_frames=True)
            traces = tracemalloc.take_snapshot().filter_traces([relay_side]).traces
            tracemalloc.stop()
            # counted in blocks, not bytes: a table that grows once (a set or dict resized
            # for this batch's concurrency) is one block; anything kept per bind is 1,000+
            kept = len(traces)
            after = (plane.census(), list(pool.ready), len(relay.control.registry))
            assert after == before
            assert kept < REFUSED_BINDS // 20, f"{kept} blocks kept by {REFUSED_BINDS} refused binds"
        finally:
            session.close()
            relay.close()
            await asyncio.sleep(0)

    asyncio.run(main())


def _echoes(port: int | None) -> bool:
    """A connection to ``port`` echoes (blocking: run it off the agent's loop)."""
    assert port is not None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"again")
            return sock.recv(5) == b"again"
    except ConnectionResetError:  # refused while the relay is still short of descriptors (even
        return False  # before connect() returned: the relay's RST can beat it)


class _RecordingConnection(RelayConnection):
    """An agent that notes which tunnel the relay says each public connection is for."""

    opened: dict[str, str]  # public peer "127.0.0.1:port" -> tunnel id of its OPEN

    def handle_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.StreamOpened):
            self.opened[event.peer] = event.tunnel_id
        super().handle_event(event)


@pytest.fixture
def starved_relay(fast_heartbeat: float) -> Iterator[RelayProcess]:
    relay = RelayProcess(free_port(), "--heartbeat-timeout", str(fast_heartbeat), fd_limit=(LOW_LIMIT, LOW_LIMIT))
    relay.start()
    yield relay
    relay.stop()


def test_a_relay_short_of_descriptors_refuses_in_one_line_and_never_misroutes(
    starved_relay: RelayProcess, echo: EchoServer
) -> None:
    async def main() -> None:
        settings = AgentSettings(RelayAddress("localhost", starved_relay.port))
        session = await _RecordingConnection.connect(settings)
        assert isinstance(session, _RecordingConnection)
        session.opened = {}
        try:
            results = await _bind_all(session, HOSTILE_BINDS, unencrypted=True)
            bound = [r for r in results if isinstance(r, TunnelAddress)]
            refused = [r for r in results if isinstance(r, TunnelRefused)]
            assert {r.code for r in refused} == {BindFailure.NO_RESOURCES}
            assert "file descriptors left" in str(refused[0]) and "\n" not in str(refused[0])
            assert len(bound) >= HOSTILE_BINDS // 4 and refused
            ports = [b.unencrypted_port for b in bound]
            assert len(set(ports)) == len(ports), "two tunnels were given one port"
            for address in bound:  # the agent serves each tunnel from the echo service
                session.tunnels[address.id] = AgentTunnel(
                    LocalTarget(echo.port), unencrypted=True, h2=False, address=address
                )

            # every BOUND port listens, and its connections reach its own tunnel
            for address in bound:
                with socket.create_connection(("127.0.0.1", address.unencrypted_port), timeout=10) as sock:
                    await asyncio.to_thread(sock.sendall, b"ping")
                    assert await asyncio.to_thread(sock.recv, 4) == b"ping"
                    peer = f"127.0.0.1:{sock.getsockname()[1]}"
                    assert session.opened.get(peer) == address.id

            # connections beyond the reserve are reset at once; those held keep working
            held: list[socket.socket] = []
            try:
                for _ in range(LOW_LIMIT):
                    try:  # (the relay's RST may even beat connect())
                        sock = await asyncio.to_thread(
                            socket.create_connection, ("127.0.0.1", bound[0].unencrypted_port), 10
                        )
                    except ConnectionResetError:
                        break
                    held.append(sock)
                    try:
                        await asyncio.to_thread(sock.sendall, b"x")
                        reply = await asyncio.to_thread(sock.recv, 1)
                    except ConnectionResetError:
                        reply = b""
                    if reply != b"x":
                        break
                else:
                    raise AssertionError(f"the relay took {LOW_LIMIT} connections with a limit of {LOW_LIMIT}")
                assert len(held) > 2
                await asyncio.to_thread(held[0].sendall, b"still")
                assert await asyncio.to_thread(held[0].recv, 5) == b"still"
            finally:
                for sock in held:
                    sock.close()
            deadline = time.monotonic() + 10
            while not await asyncio.to_thread(_echoes, bound[-1].unencrypted_port):
                # once they are closed, the relay takes connections again
                assert time.monotonic() < deadline, "the relay did not recover its descriptors"
                await asyncio.sleep(0.1)
        finally:
            session.close()
            await asyncio.sleep(0)

    asyncio.run(main())
    assert starved_relay.process is not None and starved_relay.process.poll() is None
    log = "".join(starved_relay.log)
    assert "Traceback" not in log
    assert "file descriptors left" in log


def test_the_relay_raises_its_soft_descriptor_limit_to_the_hard_one(fast_heartbeat: float) -> None:
    relay = RelayProcess(free_port(), fd_limit=(64, 4096))
    relay.start()
    try:
        assert relay.process is not None
        limits = Path(f"/proc/{relay.process.pid}/limits").read_text()
        (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert line.split()[3:5] == ["4096", "4096"]
    finally:
        relay.stop()
