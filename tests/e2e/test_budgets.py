"""Bounded memory whatever readers do: the relay's budgets for bytes held for clients that stop reading.

The budgets and the kernel's low-water mark are the native engine's (the asyncio engine, on its way
out, has neither): these tests ask for it whatever BURROW_ENGINE says.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import burrow
from burrow.relay import Relay, RelayConfig
from burrow.relay.config import BASE_WINDOW
from burrow.relay.native_plane import NativePlane

from ..helpers import EchoServer, on_runtime, tls_connect
from ..relay.test_nodelay import tcp_sockets
from .test_tcp_tunnels import _pump

MB = 1024 * 1024
CLIENTS = 500
SESSION_BUDGET = 16 * MB


#: A service in its own process (so that its buffers are not counted here): each
#: connection is sent TOTAL bytes as fast as it takes them.
SOURCE = """
import asyncio, socket, sys
TOTAL = int(sys.argv[1])
async def serve(reader, writer):
    # (its own kernel buffers bounded: on one machine they count against the same TCP memory)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    block = b"s" * 65536
    try:
        for _ in range(TOTAL // len(block)):
            writer.write(block)
            await writer.drain()
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _settle(read: Callable[[], int], timeout: float = 30.0) -> int:
    """Poll ``read`` until it holds still for a second (or ``timeout`` passes); its last value."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            break
    return last


def test_the_kernel_holds_little_unsent_for_a_public_client(echo: EchoServer, ca_file: Path) -> None:
    """TCP_NOTSENT_LOWAT on the relay's public sockets: a client that stops reading costs the
    relay's kernel 128 KiB, not ``tcp_wmem``'s maximum (4 MiB on Debian); an agent's link is left alone."""
    relay = on_runtime(Relay(RelayConfig(port=0, engine="native", raise_fd_limit=False)).start())
    try:
        with burrow.forward(echo.port, relay=f"localhost:{relay.port}", unencrypted=True) as tunnel:
            assert tunnel.unencrypted_port is not None
            with (
                socket.create_connection(("127.0.0.1", tunnel.unencrypted_port)) as raw,
                tls_connect(tunnel, ca_file) as tls,
            ):
                for sock in (raw, tls):
                    sock.sendall(b"ping")
                    assert sock.recv(4) == b"ping"
                clients = {raw.getsockname()[:2], tls.getsockname()[:2]}
                relay_ports = {relay.port, tunnel.unencrypted_port}
                relay_ends = {  # the peer of each of the relay's connected sockets -> its low-water mark
                    there: lowat
                    for (_, here, there), lowat in tcp_sockets(relay_ports, socket.TCP_NOTSENT_LOWAT).items()
                    if here[1] in relay_ports
                }
        assert {relay_ends[client] for client in clients} == {128 * 1024}
        agent_links = [lowat for there, lowat in relay_ends.items() if there not in clients]
        assert len(agent_links) == 1 and agent_links[0] != 128 * 1024
    finally:

        async def close() -> None:
            relay.close()
            await asyncio.sleep(0)

        on_runtime(close())


def _echo_seconds(port: int, size: int, seed: bytes) -> float:
    """Pump ``size`` bytes each way through an echo tunnel, every byte checked; the time it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        started = time.monotonic()
        sent, received = _pump(sock, size, seed)
        elapsed = time.monotonic() - started
    assert sent == received
    return elapsed


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_500_clients_that_stop_reading_hold_only_the_budget(echo: EchoServer) -> None:
    config = RelayConfig(port=0, engine="native", session_budget=SESSION_BUDGET, raise_fd_limit=False)
    relay = on_runtime(Relay(config).start())
    assert isinstance(relay.plane, NativePlane) and relay.plane.engine is not None
    engine = relay.plane.engine
    # each client is offered 16 MB: 8 GB in all
    source = subprocess.Popen(
        [sys.executable, "-c", SOURCE, str(16 * MB)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert source.stdout is not None
    source_port = int(source.stdout.readline())
    address = f"localhost:{relay.port}"
    clients: list[socket.socket] = []
    try:
        with (
            burrow.forward(source_port, relay=address, unencrypted=True) as stalled,
            burrow.forward(echo.port, relay=address, unencrypted=True) as busy,
        ):
            assert stalled.unencrypted_port is not None and busy.unencrypted_port is not None
            alone = _echo_seconds(busy.unencrypted_port, 32 * MB, b"alone")
            before = _rss()
            for _ in range(CLIENTS):
                client = socket.socket()
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.connect(("127.0.0.1", stalled.unencrypted_port))
                clients.append(client)  # and never read from
            held = _settle(lambda: relay.plane.buffered(stalled.id))
            # every stream has its base window, and what the tunnel's share of the session's
            # budget (half) lends, split among its streams: no more
            share = SESSION_BUDGET // 2
            assert CLIENTS * BASE_WINDOW // 2 < held <= CLIENTS * BASE_WINDOW + share, held
            assert 0 < config.relay_budget - engine.budget_left <= share
            grown = _rss() - before
            # the relay's part is ``held``; the agent holds a few KiB beyond each stream's
            # credit; the sockets' buffers are the kernel's, outside RSS
            assert grown < CLIENTS * BASE_WINDOW + share + 32 * MB, grown

            # the session's other tunnel still has the rest of the budget: bulk, every byte in order
            beside = _echo_seconds(busy.unencrypted_port, 32 * MB, b"beside the stalled")
            print(
                f"relay holds {held / MB:.1f} MiB for {CLIENTS} stalled clients; RSS +{grown / MB:.1f} MiB; "
                f"32 MB echoed in {alone:.2f} s alone, {beside:.2f} s beside them"
            )

            for client in clients:
                client.close()
            clients.clear()
            # the streams end and give their credit back
            assert _settle(lambda: engine.budget_left) == config.relay_budget
    finally:
        for client in clients:
            client.close()
        source.kill()
        source.wait()

        async def close() -> None:
            relay.close()
            await asyncio.sleep(0)

        on_runtime(close())
