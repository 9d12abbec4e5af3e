"""A fleet of relays: the nearest is chosen, new tunnels avoid a dead one, open tunnels move.

Three relays on loopback, two of them behind an in-test proxy that delays
every chunk each way (20 ms and 50 ms added to a round trip). The agent must
pick the direct one whatever the order it is given; once that relay stops,
new tunnels open on the 20 ms relay within 2 s, and a tunnel that was open
there moves after ``failover_after`` to a new URL that answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import burrow
from burrow.agent.fleet import Fleet
from burrow.agent.runtime import runtime
from burrow.errors import RelayUnavailable
from burrow.relay import Relay, RelayConfig
from burrow.tunnel import TunnelState

from ..helpers import EchoServer, ServiceThread, echo_once, free_port, on_runtime


@dataclass
class LatencyProxy:
    """A TCP proxy that holds every chunk ``delay`` seconds before passing it on, each way."""

    server: asyncio.Server
    port: int
    tasks: set[asyncio.Task[None]]
    switch: dict[str, bool]

    async def blackhole(self) -> None:
        """From now on connections are taken and never answered (a relay whose packets are
        dropped), and the open ones end (as their heartbeats would find, later)."""
        self.switch["blackholed"] = True
        for task in list(self.tasks):
            task.cancel()

    async def close(self) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    sender = loop.create_task(send())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay, data))
        queue.put_nowait((loop.time() + delay, b""))
        await sender
    except ConnectionError:
        writer.close()
    finally:
        sender.cancel()


def start_proxy(services: ServiceThread, target: int, rtt_added: float) -> LatencyProxy:
    tasks: set[asyncio.Task[None]] = set()
    switch = {"blackholed": False}

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if switch["blackholed"]:
            try:
                while await reader.read(65536):
                    pass
            finally:
                writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(_pump(reader, up_writer, rtt_added / 2), _pump(up_reader, writer, rtt_added / 2))
        finally:
            writer.close()
            up_writer.close()

    def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(relay(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def start() -> LatencyProxy:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return LatencyProxy(server, server.sockets[0].getsockname()[1], tasks, switch)

    return services.run(start())


def start_relay(name: str) -> Relay:
    return on_runtime(Relay(RelayConfig(port=0, domain=f"{name}.localhost")).start())


def stop_relay(relay: Relay) -> None:
    async def close() -> None:
        relay.close()

    on_runtime(close())


@dataclass
class Lab:
    relays: dict[str, Relay]
    addresses: dict[str, str]  # what agents are told: rN.localhost:PORT (a proxy's port for r2, r3)


@pytest.fixture
def lab(service_loop: ServiceThread) -> Iterator[Lab]:
    relays = {name: start_relay(name) for name in ("r1", "r2", "r3")}
    proxies = {
        "r2": start_proxy(service_loop, relays["r2"].port, 0.020),
        "r3": start_proxy(service_loop, relays["r3"].port, 0.050),
    }
    addresses = {
        "r1": f"r1.localhost:{relays['r1'].port}",
        "r2": f"r2.localhost:{proxies['r2'].port}",
        "r3": f"r3.localhost:{proxies['r3'].port}",
    }
    yield Lab(relays, addresses)
    for relay in relays.values():
        stop_relay(relay)

    async def close() -> None:
        for proxy in proxies.values():
            await proxy.close()

    service_loop.run(close())


def fleet_of(relay: str) -> Fleet:
    return next(f for f in runtime().fleets.values() if any(str(r.address) == relay for r in f.relays))


def test_the_nearest_relay_is_chosen_and_a_dead_one_is_left_for_the_next(
    lab: Lab, service_loop: ServiceThread, ca_file: Path
) -> None:
    fleet = ",".join(lab.addresses[name] for name in ("r3", "r2", "r1"))  # (the nearest last)
    echoes = [service_loop.echo_server() for _ in range(3)]
    states: list[TunnelState] = []
    moving = burrow.forward(echoes[0].port, relay=fleet, failover_after=1, on_state=states.append)
    try:
        first = moving.open()
        assert first.relay == lab.addresses["r1"]
        assert first.host.endswith(".r1.localhost")
        assert echo_once(first, ca_file) == b"hello burrow"
        rtt = fleet_of(lab.addresses["r1"]).rtt
        times = {name: rtt[next(a for a in rtt if str(a) == lab.addresses[name])] for name in lab.addresses}
        assert times["r1"] < times["r2"] < times["r3"], times
        assert times["r2"] >= 0.018 and times["r3"] >= 0.045, times  # (one TLS round trip at least)
        for name in ("r2", "r3"):  # measuring is a clean handshake: nothing refused, nothing logged
            plane = lab.relays[name].plane
            assert plane is not None and not plane.refusals.counts, plane.refusals.counts

        with burrow.forward(echoes[1].port, relay=fleet) as second:
            assert second.relay == lab.addresses["r1"]  # (the ranking is kept: no new measurement)

        stop_relay(lab.relays["r1"])
        started = time.monotonic()
        with burrow.forward(echoes[1].port, relay=fleet) as third:
            took = time.monotonic() - started
            assert third.relay == lab.addresses["r2"]
            assert took < 2.0, f"a new tunnel took {took:.2f} s to open on the next relay"
            assert echo_once(third, ca_file, b"on the next relay") == b"on the next relay"

        # the open tunnel tries r1 for failover_after (1 s), then moves to r2 with a new URL
        deadline = time.monotonic() + 10
        while moving.state is not TunnelState.OPEN or moving.tunnel.relay != lab.addresses["r2"]:
            assert time.monotonic() < deadline, f"the tunnel did not move: {moving.state} {states}"
            time.sleep(0.05)
        moved = moving.tunnel
        assert moved.url != first.url and moved.host.endswith(".r2.localhost")
        assert echo_once(moved, ca_file, b"moved") == b"moved"
        assert states == [TunnelState.OPEN, TunnelState.RECONNECTING, TunnelState.OPEN]
    finally:
        moving.close()
    assert states[-1] is TunnelState.CLOSED
    assert lab.relays["r2"].control is not None and len(lab.relays["r2"].control.registry) == 0


def test_a_relays_file_is_read_again_when_it_changes(
    lab: Lab, echo: EchoServer, ca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "relays.toml"
    path.write_text(
        f'[[relay]]\naddress = "{lab.addresses["r2"]}"\nregion = "near"\n\n'
        f'[[relay]]\naddress = "{lab.addresses["r3"]}"\nregion = "far"\n'
    )
    monkeypatch.setenv("BURROW_RELAYS_FILE", str(path))
    with burrow.forward(echo.port) as tunnel:
        assert tunnel.relay == lab.addresses["r2"]
    path.write_text("[[relay]\nbroken")  # (a bad edit: the list read before stays)
    with burrow.forward(echo.port) as tunnel:
        assert tunnel.relay == lab.addresses["r2"]
    path.write_text(f'{{"relays": ["{lab.addresses["r3"]}"]}}')  # (not JSON to a .toml reader)
    with burrow.forward(echo.port) as tunnel:
        assert tunnel.relay == lab.addresses["r2"]
    path.write_text(f'[[relay]]\naddress = "{lab.addresses["r3"]}"\n')
    with burrow.forward(echo.port) as tunnel:
        assert tunnel.relay == lab.addresses["r3"]
        assert echo_once(tunnel, ca_file) == b"hello burrow"


def test_no_relay_of_the_fleet_answering_is_one_error_naming_each(echo: EchoServer) -> None:
    ports = [free_port(), free_port()]
    fleet = f"r1.localhost:{ports[0]},r2.localhost:{ports[1]}"
    with pytest.raises(RelayUnavailable) as raised:
        burrow.forward(echo.port, relay=fleet).open()
    message = str(raised.value)
    assert message.startswith("no relay of 2 took the tunnel: ")
    assert f"r1.localhost:{ports[0]}" in message and f"r2.localhost:{ports[1]}" in message
    assert "\n" not in message


def test_burrow_forward_says_which_relay_and_where_the_tunnel_moved(lab: Lab, echo: EchoServer, ca_file: Path) -> None:
    fleet = f"{lab.addresses['r1']},{lab.addresses['r2']}"
    process = subprocess.Popen(
        [sys.executable, "-m", "burrow", "forward", str(echo.port), "--relay", fleet, "--failover-after", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline().strip()
        assert ".r1.localhost:" in first, first
        stop_relay(lab.relays["r1"])
        moved = process.stdout.readline().strip()
        assert ".r2.localhost:" in moved, moved
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert f"to {first} (relay {lab.addresses['r1']})" in err
    assert f"burrow: moved to relay {lab.addresses['r2']}: {moved}" in err
    assert "Traceback" not in err


def test_the_ranking_is_measured_again_in_the_background_once_old(
    lab: Lab, echo: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from burrow.agent import fleet as fleet_module

    fleet = f"{lab.addresses['r2']},{lab.addresses['r1']}"
    with burrow.forward(echo.port, relay=fleet) as tunnel:
        assert tunnel.relay == lab.addresses["r1"]
    measured = fleet_of(lab.addresses["r1"])
    first = measured.measured_at
    assert first is not None
    monkeypatch.setattr(fleet_module, "RERANK_AFTER", 0.0)
    with burrow.forward(echo.port, relay=fleet) as tunnel:  # (opened on the ranking it has)
        assert tunnel.relay == lab.addresses["r1"]
    deadline = time.monotonic() + 5
    while measured.measured_at == first:
        assert time.monotonic() < deadline, "no measurement in the background"
        time.sleep(0.02)


def restart_relay(name: str, port: int) -> Relay:
    """The relay again on its port (same domain, same ticket key: the tunnels' tickets still hold)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return on_runtime(Relay(RelayConfig(port=port, domain=f"{name}.localhost")).start())
        except Exception:
            assert time.monotonic() < deadline, f"{name} could not listen on {port} again"
            time.sleep(0.1)


def test_a_relay_back_within_failover_after_keeps_its_tunnels_and_urls(
    lab: Lab, echo: EchoServer, ca_file: Path
) -> None:
    fleet = f"{lab.addresses['r2']},{lab.addresses['r1']}"
    states: list[TunnelState] = []
    forward = burrow.forward(echo.port, relay=fleet, failover_after=10, on_state=states.append)
    try:
        first = forward.open()
        assert first.relay == lab.addresses["r1"]
        port = lab.relays["r1"].port
        stop_relay(lab.relays["r1"])
        time.sleep(1.5)  # a while away, but less than failover_after: no move yet
        assert forward.state is TunnelState.RECONNECTING
        lab.relays["r1"] = restart_relay("r1", port)
        deadline = time.monotonic() + 8
        while forward.state is not TunnelState.OPEN:
            assert time.monotonic() < deadline, f"the tunnel did not come back: {states}"
            time.sleep(0.05)
        assert forward.tunnel == first  # same id, URL and relay: resumed by ticket, not moved
        assert echo_once(forward.tunnel, ca_file, b"back home") == b"back home"
        assert lab.relays["r2"].control is not None and len(lab.relays["r2"].control.registry) == 0
    finally:
        forward.close()


def test_closing_a_tunnel_while_no_relay_takes_it_ends_its_move(
    lab: Lab, echo: EchoServer, service_loop: ServiceThread
) -> None:
    fleet = f"{lab.addresses['r1']},{lab.addresses['r2']}"
    forward = burrow.forward(echo.port, relay=fleet, failover_after=0.3)
    assert forward.open().relay == lab.addresses["r1"]
    moves = fleet_of(lab.addresses["r1"])._moves
    r2_port = lab.relays["r2"].port
    stop_relay(lab.relays["r2"])
    stop_relay(lab.relays["r1"])
    deadline = time.monotonic() + 5
    while not moves:  # the link gave the tunnel to the fleet, which finds no relay
        assert time.monotonic() < deadline, "the tunnel was never handed over"
        time.sleep(0.02)
    forward.close()
    assert forward.state is TunnelState.CLOSED
    deadline = time.monotonic() + 5
    while moves:
        assert time.monotonic() < deadline, "the move goes on after close"
        time.sleep(0.02)
    # r2 back (behind its proxy): nothing is opened there for the closed tunnel
    lab.relays["r2"] = restart_relay("r2", r2_port)
    time.sleep(1.0)
    assert lab.relays["r2"].control is not None and len(lab.relays["r2"].control.registry) == 0


def test_a_blackholed_relay_is_left_after_failover_after_not_after_a_connect_timeout(
    lab: Lab, echo: EchoServer, service_loop: ServiceThread, ca_file: Path
) -> None:
    # r1 behind a proxy that adds nothing, until it takes connections and never answers: each
    # attempt to reconnect would wait CONNECT_TIMEOUT (10 s) for a TLS handshake
    hole = start_proxy(service_loop, lab.relays["r1"].port, 0.0)
    try:
        fleet = f"{lab.addresses['r2']},r1.localhost:{hole.port}"
        forward = burrow.forward(echo.port, relay=fleet, failover_after=1)
        try:
            first = forward.open()
            assert first.relay == f"r1.localhost:{hole.port}"
            service_loop.run(hole.blackhole())
            started = time.monotonic()
            while forward.state is not TunnelState.OPEN or forward.tunnel.relay != lab.addresses["r2"]:
                took = time.monotonic() - started
                assert took < 5, f"the tunnel did not move in {took:.1f} s: {forward.state}"
                time.sleep(0.05)
            assert echo_once(forward.tunnel, ca_file, b"moved on time") == b"moved on time"
        finally:
            forward.close()
    finally:
        service_loop.run(hole.close())
