"""The dev relay's pool of ready certificates: refilled in a pause between binds, at once when low.

A new tunnel's first request usually follows its bind at once. Making the
next certificate beside it (2–3 ms of CPU) slowed that request and a cold
``forward()``; so while all contexts but one are ready, the refill waits until
binds pause for ``REFILL_DELAY``. Below that it starts at once, so a burst of
binds finds contexts ready.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import burrow
from burrow.relay import Relay, RelayConfig
from burrow.relay import ready as relay_ready
from burrow.relay.engine import AsyncioPlane

from ..helpers import EchoServer, ServiceThread, on_runtime, tls_connect

DELAY = 1.0  # REFILL_DELAY in this test: long enough to tell "waited" from "at once" on a busy machine


def _wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _echo_through(tunnel: burrow.Tunnel, ca: Path) -> bytes:
    with tls_connect(tunnel, ca) as sock:
        sock.sendall(b"first request")
        return sock.recv(100)


def test_refill_waits_for_a_pause_in_binds_and_starts_at_once_when_low(
    service_loop: ServiceThread, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_ready, "REFILL_DELAY", DELAY)
    relay = on_runtime(Relay(RelayConfig(port=0)).start())
    full = relay_ready.READY_IDS
    assert relay.control is not None and relay.plane is not None
    pool = relay.control.ready
    # where each engine makes a host's TLS identity: an ssl context, or a dev leaf for rustls
    if isinstance(relay.plane, AsyncioPlane):
        maker, name = relay.plane.certs, "make_context"
    else:
        maker, name = relay.plane, "_issue"
    made: list[float] = []  # when each context was started (monotonic)
    lock = threading.Lock()
    forwards: list[burrow.Forward] = []
    services: list[EchoServer] = []
    try:
        _wait_for(lambda: len(pool.ready) == full)
        make = getattr(maker, name)

        def counted(*args: object) -> object:
            with lock:
                made.append(time.monotonic())
            return make(*args)

        monkeypatch.setattr(maker, name, counted)

        def open_one() -> burrow.Tunnel:
            services.append(service_loop.echo_server())  # a port is forwarded once per process
            forward = burrow.forward(services[-1].port, relay=f"localhost:{relay.port}")
            forwards.append(forward)
            return forward.open()

        # one bind: the pool keeps spares, so no certificate is made while the
        # new tunnel takes its first request, nor until binds have paused
        tunnel = open_one()
        bound = pool.last_take
        assert _echo_through(tunnel, ca_file) == b"first request"
        time.sleep(DELAY / 2)
        assert made == [] and len(pool.ready) == full - 1
        _wait_for(lambda: len(pool.ready) == full)
        assert len(made) == 1 and made[0] >= bound + DELAY - relay_ready.TIMER_SLACK

        # a burst that leaves fewer ready refills at once, not after the pause
        made.clear()
        tunnels = [open_one() for _ in range(full)]
        assert made and made[0] < pool.last_take + DELAY / 2
        for tunnel in tunnels:  # every one of them, pool or no pool, serves its URL
            assert _echo_through(tunnel, ca_file) == b"first request"
        _wait_for(lambda: len(pool.ready) == full)
    finally:
        for forward in forwards:
            forward.close()
        for service in services:
            service_loop.close_server(service)

        async def close() -> None:
            relay.close()
            await asyncio.sleep(0)

        on_runtime(close())
