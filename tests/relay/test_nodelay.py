"""Nagle is off on every TCP socket a tunnel uses, under asyncio's loop and uvloop alike.

A tunnel forwards what it reads at once; with Nagle on, a small write that
follows another waits for its ACK (up to 40 ms with delayed ACKs). asyncio's
create_server and create_connection turn Nagle off, but its
connect_accepted_socket does not (an accepted socket's ``proto`` is 0), and
the relay's TLS port accepts that way.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from burrow.agent.config import AgentSettings, RelayAddress
from burrow.agent.relay_connection import AgentTunnel, RelayConnection
from burrow.agent.target import LocalTarget
from burrow.client import client_context
from burrow.relay import Relay, RelayConfig

from ..helpers import RUNNERS, EchoServer


def tcp_sockets(
    ports: set[int | None], option: int = socket.TCP_NODELAY
) -> dict[tuple[int, tuple[str, int], tuple[str, int]], int]:
    """``option`` (TCP_NODELAY) of every connected TCP socket of this process with an end on one of ``ports``."""
    found: dict[tuple[int, tuple[str, int], tuple[str, int]], int] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:  # not a socket (or closed meanwhile)
            continue
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                continue
            try:
                here, there = sock.getsockname(), sock.getpeername()
            except OSError:  # a listener
                continue
            if here[1] in ports or there[1] in ports:
                found[int(name), here[:2], there[:2]] = sock.getsockopt(socket.IPPROTO_TCP, option)
    return found


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_every_socket_of_a_tunnel_has_nagle_off(loop: str, echo: EchoServer) -> None:
    async def main() -> None:
        relay = await Relay(RelayConfig(port=0)).start()
        session = await RelayConnection.connect(AgentSettings(RelayAddress("localhost", relay.port), token=""))
        try:
            tunnel = AgentTunnel(LocalTarget(echo.port), unencrypted=True, h2=False)
            info = tunnel.address = await session.bind(echo.port, unencrypted=True, h2=False)
            session.tunnels[tunnel.id] = tunnel
            assert relay.ca_path is not None
            tls = await asyncio.open_connection(
                "127.0.0.1", info.port, ssl=client_context(relay.ca_path), server_hostname=info.host
            )
            raw = await asyncio.open_connection("127.0.0.1", info.unencrypted_port)
            for reader, writer in (tls, raw):
                await _echo(reader, writer)
            # every TCP socket of this process on a port of the tunnel's: the relay's (whatever its
            # engine) and the agent's, seen through the kernel, not through either's objects
            ports = {relay.port, info.unencrypted_port, echo.port}
            found = tcp_sockets(ports)
            local = [e.transport for e in session.endpoints.values()]
            assert len(local) == 2
            # the relay's ends (agent link, TLS public, raw public), the agent's (link, 2 local),
            # the echo server's 2, and this test's 2 clients: 10 connected sockets
            assert len(found) == 10, found
            assert {name: nodelay for name, nodelay in found.items() if not nodelay} == {}
            for _, writer in (tls, raw):
                writer.close()
        finally:
            session.close()
            relay.close()
            await asyncio.sleep(0)

    RUNNERS[loop](main())
