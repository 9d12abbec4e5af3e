"""Resume tickets: only the same token, on the same relay domain, within their lifetime."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import burrow
from burrow.agent.config import AgentSettings, RelayAddress
from burrow.agent.relay_connection import RelayConnection
from burrow.protocol.messages import TunnelAddress
from burrow.relay import Relay, RelayConfig
from burrow.relay.tickets import (
    TICKET_LIFETIME,
    Claims,
    TicketInvalid,
    TicketSigner,
    load_or_create_key,
    token_fingerprint,
)

from ..helpers import EchoServer, on_runtime

CLAIMS = Claims("abcdefghijklmn", unencrypted=True, h2=False, tcp_port=23456)


def test_ticket_round_trip_and_every_refusal(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "ticket.key")
    assert load_or_create_key(tmp_path / "ticket.key") == key  # created once, kept
    assert (tmp_path / "ticket.key").stat().st_mode & 0o777 == 0o600
    signer = TicketSigner(key, "r1.example.com")
    mine = token_fingerprint("token-a")
    ticket = signer.issue(mine, CLAIMS, now=1_000_000)
    assert signer.verify(ticket, mine, now=1_000_000 + 60) == CLAIMS
    with pytest.raises(TicketInvalid, match="another token"):
        signer.verify(ticket, token_fingerprint("token-b"), now=1_000_000)
    with pytest.raises(TicketInvalid, match="expired"):
        signer.verify(ticket, mine, now=1_000_000 + TICKET_LIFETIME + 1)
    with pytest.raises(TicketInvalid, match="another relay domain"):
        TicketSigner(key, "r2.example.com").verify(ticket, mine, now=1_000_000)
    with pytest.raises(TicketInvalid, match="not signed by this relay"):
        TicketSigner(b"k" * 32, "r1.example.com").verify(ticket, mine, now=1_000_000)
    body, mac = ticket.split(".")
    tampered = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + mac
    with pytest.raises(TicketInvalid):
        signer.verify(tampered, mine, now=1_000_000)
    for junk in ("", "x", "a.b.c", "!!!.???"):
        with pytest.raises(TicketInvalid):
            signer.verify(junk, mine, now=1_000_000)


def test_only_the_same_token_can_reclaim_a_tunnel(echo: EchoServer) -> None:
    relay = on_runtime(Relay(RelayConfig(port=0, tokens=frozenset({"token-a", "token-b"}))).start())
    address = f"localhost:{relay.port}"
    try:

        async def bind_with(token: str, ticket: str) -> dict[str, object]:
            settings = AgentSettings(RelayAddress("localhost", relay.port), token=token)
            session = await RelayConnection.connect(settings)
            try:
                return await session.bind(echo.port, False, False, ticket)
            finally:
                session.close()

        forward = burrow.forward(echo.port, relay=address, token="token-a")
        tunnel = forward.open()
        ticket = forward._tunnel.ticket
        assert ticket is not None
        with pytest.raises(burrow.TunnelRefused, match="another token"):
            on_runtime(bind_with("token-b", ticket))
        # the rightful owner reclaims it at once from its (here: still live) session
        info = on_runtime(bind_with("token-a", ticket))
        assert info.id == tunnel.id and info.host == tunnel.host
        forward.close()
    finally:

        async def close() -> None:
            relay.close()
            await asyncio.sleep(0)

        on_runtime(close())


@pytest.mark.parametrize("loopback_urls", [False, True])
def test_a_reclaimed_raw_tunnel_keeps_its_ports(echo: EchoServer, loopback_urls: bool) -> None:
    """The ticket's TCP port (and loopback TLS port) come back even while the old listeners close."""
    config = RelayConfig(port=0, tokens=frozenset({"token-a"}), engine="native", loopback_urls=loopback_urls)
    relay = on_runtime(Relay(config).start())
    try:

        async def reclaim(times: int) -> tuple[TunnelAddress, list[tuple[str, int, int | None]]]:
            settings = AgentSettings(RelayAddress("localhost", relay.port), token="token-a")
            sessions = [await RelayConnection.connect(settings)]
            first = await sessions[0].bind(echo.port, True, False)
            ticket, ports = first.ticket, []
            for _ in range(times):
                session = await RelayConnection.connect(settings)
                sessions.append(session)  # kept open: each bind takes over from a live session
                info = await session.bind(echo.port, True, False, ticket)
                ports.append((info.host, info.port, info.unencrypted_port))
                ticket = info.ticket
            for session in sessions:
                session.close()
            return first, ports

        first, ports = on_runtime(reclaim(20))
        assert first.unencrypted_port is not None
        assert (first.host == "localhost") is loopback_urls and (first.port != relay.port) is loopback_urls
        assert ports == [(first.host, first.port, first.unencrypted_port)] * 20
    finally:

        async def close() -> None:
            relay.close()
            await asyncio.sleep(0)

        on_runtime(close())
