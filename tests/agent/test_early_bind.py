"""BIND right behind HELLO (ALPN burrow/1+early), and both ends still speaking plain burrow/1."""

from __future__ import annotations

import asyncio
import logging

import pytest

from burrow.agent import config
from burrow.agent.config import AgentSettings, RelayAddress
from burrow.agent.relay_connection import AgentTunnel, RelayConnection
from burrow.agent.target import LocalTarget
from burrow.client import client_context
from burrow.errors import AuthenticationFailed
from burrow.relay import Relay, RelayConfig
from burrow.relay.engine import AsyncioPlane
from burrow.relay.tls import AGENT_ALPN, EARLY_ALPN

from ..helpers import RUNNERS, EchoServer


async def _bind_and_echo(relay: Relay, session: RelayConnection, port: int) -> None:
    """Bind a tunnel on ``session`` and echo a byte through its TLS URL."""
    tunnel = AgentTunnel(LocalTarget(port), unencrypted=False, h2=False)
    info = tunnel.address = await session.bind(port, unencrypted=False, h2=False)
    session.tunnels[tunnel.id] = tunnel
    assert relay.ca_path is not None
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", info.port, ssl=client_context(relay.ca_path), server_hostname=info.host
    )
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.close()


async def _tunnel_through(port: int, expect_alpn: str, relay_alpns: list[str] | None = None) -> None:
    """Connect to a new relay (offering ``relay_alpns`` if given), check the handshake, then bind and echo."""
    # an older relay (plain burrow/1 only) is played by the asyncio engine, whose ALPN list a test can set
    relay = await Relay(RelayConfig(port=0, engine="asyncio" if relay_alpns else "native")).start()
    if relay_alpns is not None:
        assert isinstance(relay.plane, AsyncioPlane) and relay.plane.certs is not None
        relay.plane.certs.agent_context.set_alpn_protocols(relay_alpns)
    try:
        session = await RelayConnection.connect(AgentSettings(RelayAddress("localhost", relay.port), token=""))
        sslobj = session.transport.get_extra_info("ssl_object") if session.transport else None
        assert sslobj is not None and sslobj.selected_alpn_protocol() == expect_alpn
        early = expect_alpn == EARLY_ALPN
        # early: HELLO is on its way and connect() did not wait for WELCOME; else it did
        assert session.proto.early_requests is early and session.welcome.done() is not early
        await _bind_and_echo(relay, session, port)
        assert session.welcome.done()
        session.close()
    finally:
        relay.close()


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_the_first_bind_goes_before_welcome(loop: str, echo: EchoServer) -> None:
    RUNNERS[loop](_tunnel_through(echo.port, EARLY_ALPN))


def test_a_relay_without_early_requests_gets_hello_first(echo: EchoServer) -> None:
    """A relay that offers only burrow/1 (an older one): the agent waits for WELCOME, as before."""
    RUNNERS["uvloop"](_tunnel_through(echo.port, AGENT_ALPN, relay_alpns=[AGENT_ALPN]))


def test_an_agent_without_early_requests_is_served(echo: EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent that offers only burrow/1 (an older one) gets burrow/1 from a relay that knows both."""
    monkeypatch.setattr(config, "AGENT_ALPNS", [AGENT_ALPN])
    config._client_context.cache_clear()
    try:
        RUNNERS["uvloop"](_tunnel_through(echo.port, AGENT_ALPN))
    finally:
        config._client_context.cache_clear()


def test_a_refused_token_reaches_the_early_bind(echo: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """The BIND sent behind a HELLO the relay refuses fails with the token's error, not 'session closed'."""

    async def main() -> None:
        relay = await Relay(RelayConfig(port=0, tokens=frozenset({"right"}))).start()
        try:
            settings = AgentSettings(RelayAddress("localhost", relay.port), token="wrong", token_source="a test")
            session = await RelayConnection.connect(settings)
            assert session.proto.early_requests
            with pytest.raises(AuthenticationFailed, match="rejected the token from a test"):
                await session.bind(echo.port, unencrypted=False, h2=False)
        finally:
            relay.close()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        RUNNERS["uvloop"](main())
    assert "never retrieved" not in caplog.text
