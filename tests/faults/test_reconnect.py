"""The agent's link breaks (reset, blackhole, cut mid-transfer): the tunnel comes back, same URL."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from pathlib import Path

import pytest

import burrow
from burrow.agent.runtime import runtime
from burrow.relay import Relay

from ..helpers import EchoServer, on_runtime
from .conftest import FAST_HEARTBEAT, Transfer, echo_ok, wait_for
from .proxy import FaultProxy

MB = 1024 * 1024


def _forward(echo: EchoServer, proxy: FaultProxy, states: list[burrow.TunnelState]) -> burrow.Forward:
    return burrow.forward(echo.port, unencrypted=True, relay=f"localhost:{proxy.port}", on_state=states.append)


def _reconnected(forward: burrow.Forward, states: list[burrow.TunnelState], before: int) -> float:
    return wait_for(
        lambda: burrow.TunnelState.RECONNECTING in states[before:] and forward.state is burrow.TunnelState.OPEN,
        what="reconnection",
    )


def test_reset_link_comes_back_with_the_same_url(
    echo: EchoServer, proxy: FaultProxy, fast_relay: Relay, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    states: list[burrow.TunnelState] = []
    forward = _forward(echo, proxy, states)
    with forward as tunnel, caplog.at_level(logging.WARNING, logger="burrow"):
        assert echo_ok(tunnel, ca_file)
        before = len(states)
        proxy.reset()
        recovery = _reconnected(forward, states, before)
        assert recovery < 2.0, recovery
        wait_for(lambda: "reconnected to relay" in caplog.text, what="the reconnect reported")
        assert forward.tunnel == tunnel  # same id, URL and TCP port
        assert echo_ok(tunnel, ca_file)
    assert states == [
        burrow.TunnelState.OPEN,
        burrow.TunnelState.RECONNECTING,
        burrow.TunnelState.OPEN,
        burrow.TunnelState.CLOSED,
    ]


def test_blackholed_link_is_found_dead_and_its_streams_reset(
    echo: EchoServer, proxy: FaultProxy, fast_relay: Relay, ca_file: Path
) -> None:
    states: list[burrow.TunnelState] = []
    forward = _forward(echo, proxy, states)
    with forward as tunnel:
        sock = socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=30)
        transfer = Transfer(sock, 2000 * MB)  # far more than can pass before the blackhole
        wait_for(lambda: len(transfer.received) > 4 * MB, what="transfer under way")
        before = len(states)
        proxy.blackhole()  # no FIN, no RST: only heartbeats can tell
        # on_state's record, not forward.state: the reconnect can finish between two polls
        detected = wait_for(lambda: burrow.TunnelState.RECONNECTING in states[before:], what="dead link noticed")
        assert detected <= FAST_HEARTBEAT * 1.25 + 0.5, detected
        transfer.join(FAST_HEARTBEAT * 4)  # the riding stream is reset promptly, not left hanging
        assert transfer.whole_or_reset() == "reset"
        sock.close()
        _reconnected(forward, states, before)
        assert forward.tunnel == tunnel
        assert echo_ok(tunnel, ca_file)
        # the relay dropped the stale session (by heartbeat or by the ticket's takeover)
        wait_for(lambda: len(on_runtime(_sessions(fast_relay))) == 1, what="stale session gone")


@pytest.mark.parametrize("relay_heartbeat", [FAST_HEARTBEAT * 4])
def test_a_stalled_process_keeps_its_session(
    echo: EchoServer, proxy: FaultProxy, fast_relay: Relay, ca_file: Path, relay_heartbeat: float
) -> None:
    """The loop stops for longer than the heartbeat timeout (a C call holding the GIL
    in a notebook, a suspended process): not the peer's fault, so no reconnect.

    The agent is what is tested: it must not take its own stall for a dead relay. The
    relay (a native one runs on its own threads, not on this loop) is given more patience
    than the stall, as a relay elsewhere would have for an agent it heard a moment ago.
    """
    states: list[burrow.TunnelState] = []
    with _forward(echo, proxy, states) as tunnel:
        assert echo_ok(tunnel, ca_file)
        sessions = on_runtime(_sessions(fast_relay))

        async def stall() -> None:
            time.sleep(FAST_HEARTBEAT * 1.5)  # noqa: ASYNC251 (the point: agent and relay share this loop)

        on_runtime(stall())
        time.sleep(FAST_HEARTBEAT / 2)  # two more beats each side, on time now
        assert states == [burrow.TunnelState.OPEN]
        assert on_runtime(_sessions(fast_relay)) == sessions
        assert echo_ok(tunnel, ca_file)


def test_closing_while_reconnecting_is_not_called_a_reconnect(
    echo: EchoServer, proxy: FaultProxy, fast_relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    states: list[burrow.TunnelState] = []
    with caplog.at_level(logging.WARNING, logger="burrow"):
        with _forward(echo, proxy, states):
            proxy.refuse_new = True  # every reconnect attempt fails
            proxy.reset()
            wait_for(lambda: burrow.TunnelState.RECONNECTING in states, what="reconnecting")
            wait_for(lambda: "still reconnecting" in caplog.text, what="a failed attempt")
        wait_for(lambda: burrow.TunnelState.CLOSED in states, what="closed")
        time.sleep(0.3)  # the reconnect loop notices the tunnel is gone
    assert states[-1] is burrow.TunnelState.CLOSED
    assert "reconnected" not in caplog.text


async def _sessions(relay: Relay) -> list[str]:
    assert relay.plane is not None
    return relay.plane.session_ids()


def test_cut_in_the_middle_of_a_transfer(echo: EchoServer, proxy: FaultProxy, fast_relay: Relay, ca_file: Path) -> None:
    states: list[burrow.TunnelState] = []
    forward = _forward(echo, proxy, states)
    with forward as tunnel:
        sock = socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=30)
        transfer = Transfer(sock, 400 * MB)
        wait_for(lambda: len(transfer.received) > MB, what="transfer under way")
        before = len(states)
        proxy.cut_after(3 * MB)
        transfer.join()
        assert transfer.whole_or_reset() == "reset"
        sock.close()
        _reconnected(forward, states, before)
        assert echo_ok(forward.tunnel, ca_file)


@pytest.mark.parametrize("fault", ["latency", "throttle"])
def test_slow_link_still_carries_every_byte(
    fault: str, echo: EchoServer, proxy: FaultProxy, fast_relay: Relay, ca_file: Path
) -> None:
    with _forward(echo, proxy, []) as tunnel:
        if fault == "latency":
            proxy.latency(0.05)  # 50 ms each way on the agent's link
            size = 20 * MB
        else:
            # 8 MB/s each way; the proxy queues without backpressure, so a much slower
            # link would hold heartbeats behind seconds of data (bufferbloat)
            proxy.throttle(8 * MB)
            size = 6 * MB
        with socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=30) as sock:
            transfer = Transfer(sock, size)
            transfer.join(60)
            assert transfer.whole_or_reset() == "whole"
        assert echo_ok(tunnel, ca_file)  # heartbeats got through the slow link: still the same session


def test_blackhole_while_idle_and_reset_during_bulk(
    echo: EchoServer, proxy: FaultProxy, fast_relay: Relay, ca_file: Path
) -> None:
    states: list[burrow.TunnelState] = []
    forward = _forward(echo, proxy, states)
    with forward as tunnel:
        before = len(states)
        proxy.blackhole()
        _reconnected(forward, states, before)
        assert forward.tunnel == tunnel and echo_ok(tunnel, ca_file)
        sock = socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=30)
        transfer = Transfer(sock, 2000 * MB)
        wait_for(lambda: len(transfer.received) > 2 * MB, what="transfer under way")
        before = len(states)
        proxy.reset()
        transfer.join()
        assert transfer.whole_or_reset() == "reset"
        sock.close()
        _reconnected(forward, states, before)
        assert forward.tunnel == tunnel and echo_ok(tunnel, ca_file)


def test_no_leak_after_reconnects(echo: EchoServer, proxy: FaultProxy, fast_relay: Relay, ca_file: Path) -> None:
    async def tasks() -> int:
        return len(asyncio.all_tasks())

    def fds() -> int:
        # uvloop's SSL transports sit in reference cycles that only the cyclic
        # collector frees (with their sockets); count what is really still in use
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    states: list[burrow.TunnelState] = []
    forward = _forward(echo, proxy, states)
    with forward as tunnel:
        assert echo_ok(tunnel, ca_file)
        baseline = (fds(), on_runtime(tasks()))
        for _ in range(5):
            before = len(states)
            proxy.reset()
            _reconnected(forward, states, before)
            assert echo_ok(tunnel, ca_file)

        def settled() -> bool:
            return fds() <= baseline[0] + 2 and on_runtime(tasks()) <= baseline[1] + 1

        try:
            wait_for(settled, what="fds and tasks back to their baseline")
        except AssertionError:
            raise AssertionError(f"baseline {baseline}, now {(fds(), on_runtime(tasks()))}") from None
    assert len(runtime().links) >= 1
