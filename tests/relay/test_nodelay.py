"""Nagle is off on every TCP socket a tunnel uses, under asyncio's loop and uvloop alike.

A tunnel forwards what it reads at once; with Nagle on, a small write that
follows another waits for its ACK (up to 40 ms with delayed ACKs). asyncio's
create_server and create_connection turn Nagle off, but its
connect_accepted_socket does not (an accepted socket's ``proto`` is 0), and
the relay's TLS port accepts that way.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from burrow.agent.config import AgentSettings, RelayAddress
from burrow.agent.relay_connection import AgentTunnel, RelayConnection
from burrow.client import client_context
from burrow.relay import Relay, RelayConfig

from ..helpers import RUNNERS, EchoServer


def _nodelay(transport: asyncio.BaseTransport | None) -> int:
    assert transport is not None
    sock = transport.get_extra_info("socket")
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_every_socket_of_a_tunnel_has_nagle_off(loop: str, echo: EchoServer) -> None:
    async def main() -> None:
        relay = await Relay(RelayConfig(port=0)).start()
        session = await RelayConnection.connect(AgentSettings(RelayAddress("localhost", relay.port), token=""))
        try:
            tunnel = AgentTunnel(echo.port, unencrypted=True, h2=False)
            info = tunnel.address = await session.bind(echo.port, unencrypted=True, h2=False)
            session.tunnels[tunnel.id] = tunnel
            assert relay.ca_path is not None
            tls = await asyncio.open_connection(
                "127.0.0.1", info.port, ssl=client_context(relay.ca_path), server_hostname=info.host
            )
            raw = await asyncio.open_connection("127.0.0.1", info.unencrypted_port)
            for reader, writer in (tls, raw):
                await _echo(reader, writer)
            assert relay.plane is not None
            (relay_session,) = relay.plane.sessions.values()
            public = [e.transport for t in relay.plane.tunnels.values() for e in t.endpoints]
            local = [e.transport for e in session.endpoints.values()]
            assert len(public) == 2 and len(local) == 2
            sockets = {"relay: agent link": relay_session.transport, "agent: link": session.transport}
            sockets |= {f"relay: public {i}": t for i, t in enumerate(public)}
            sockets |= {f"agent: local {i}": t for i, t in enumerate(local)}
            assert {name: _nodelay(t) for name, t in sockets.items()} == dict.fromkeys(sockets, 1)
            for _, writer in (tls, raw):
                writer.close()
        finally:
            session.close()
            relay.close()
            await asyncio.sleep(0)

    RUNNERS[loop](main())
