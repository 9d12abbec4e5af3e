"""A link with no tunnel left closes its session after LINK_IDLE and is forgotten.

A web service that opens tunnels on demand with a token per user made one
session per token, kept for good: at the relay (its session cap per token),
and here (a TLS link and its heartbeats each). Now a link lives while it
carries tunnels, plus LINK_IDLE.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import burrow
from burrow.agent import link as link_module
from burrow.agent.runtime import runtime
from burrow.relay import Relay, RelayConfig

from ..helpers import EchoServer, ServiceThread, echo_once, on_runtime

TOKENS = ("user-one-token", "user-two-token")
IDLE = 0.3


@pytest.fixture
def relay() -> Iterator[Relay]:
    relay = on_runtime(Relay(RelayConfig(port=0, tokens=frozenset(TOKENS))).start())
    yield relay

    async def close() -> None:
        relay.close()

    on_runtime(close())


def _links_to(relay: Relay) -> list[object]:
    return [link for link in runtime().links.values() if link.settings.relay and link.settings.relay.port == relay.port]


def _within(seconds: float, check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def test_a_link_without_tunnels_closes_its_session_and_is_forgotten(
    relay: Relay, echo: EchoServer, service_loop: ServiceThread, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link_module, "LINK_IDLE", IDLE)
    assert relay.plane is not None
    address = f"localhost:{relay.port}"
    with burrow.forward(echo.port, relay=address, token=TOKENS[0]) as one:
        # a tunnel that stays open keeps its session well past LINK_IDLE
        (session,) = relay.plane.session_ids()
        time.sleep(IDLE * 3)
        assert relay.plane.session_ids() == [session]
        assert echo_once(one, ca_file) == b"hello burrow"
        other = service_loop.echo_server()
        try:
            with burrow.forward(other.port, relay=address, token=TOKENS[1]) as two:  # another user's token
                assert len(relay.plane.session_ids()) == 2
                assert echo_once(two, ca_file) == b"hello burrow"
        finally:
            service_loop.close_server(other)
    # both tunnels closed: both sessions end once the links stayed idle, and nothing is kept here
    assert _within(5, lambda: relay.plane is not None and relay.plane.session_ids() == [])
    assert _within(2, lambda: _links_to(relay) == [])
    # the next tunnel connects again, and works
    with burrow.forward(echo.port, relay=address, token=TOKENS[0]) as again:
        assert echo_once(again, ca_file) == b"hello burrow"
        assert len(relay.plane.session_ids()) == 1


def test_a_tunnel_opened_within_the_idle_time_reuses_the_session(
    relay: Relay, echo: EchoServer, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link_module, "LINK_IDLE", 2.0)
    assert relay.plane is not None
    address = f"localhost:{relay.port}"
    with burrow.forward(echo.port, relay=address, token=TOKENS[0]):
        (session,) = relay.plane.session_ids()
    time.sleep(0.5)
    with burrow.forward(echo.port, relay=address, token=TOKENS[0]) as again:
        assert relay.plane.session_ids() == [session]  # warm: no new connection, no new HELLO
        assert echo_once(again, ca_file) == b"hello burrow"
    # and the timer starts again from the last close, not the first
    time.sleep(1.0)
    assert relay.plane.session_ids() == [session]
    assert _within(5, lambda: relay.plane is not None and relay.plane.session_ids() == [])
