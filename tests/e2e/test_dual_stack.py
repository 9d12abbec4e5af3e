"""A relay told to listen on `::` serves IPv4 and IPv6 clients on the same port, its tunnels' raw ports too."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

import burrow
from burrow.relay import Relay, RelayConfig

from ..helpers import EchoServer, echo_through, on_runtime

TOKEN = "dual-stack-test-token"


@pytest.fixture
def relay() -> Iterator[Relay]:
    started = on_runtime(Relay(RelayConfig(host="::", port=0, tokens=frozenset({TOKEN}))).start())
    yield started

    async def close() -> None:
        started.close()

    on_runtime(close())


def test_one_listener_on_every_address_takes_both_stacks(
    relay: Relay, echo: EchoServer, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="burrow")
    context = ssl.create_default_context(cafile=str(ca_file))
    with burrow.forward(echo.port, relay=f"localhost:{relay.port}", token=TOKEN, unencrypted=True) as tunnel:
        assert tunnel.unencrypted_port is not None
        for source in ("127.0.0.1", "::1"):
            with socket.create_connection((source, relay.port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=tunnel.host) as sock:
                    assert echo_through(sock, f"TLS from {source}".encode()) == f"TLS from {source}".encode()
            with socket.create_connection((source, tunnel.unencrypted_port), timeout=10) as sock:
                assert echo_through(sock, f"TCP from {source}".encode()) == f"TCP from {source}".encode()
    # an IPv4 client is named as itself, not as ::ffff:127.0.0.1
    assert "::ffff:" not in caplog.text
