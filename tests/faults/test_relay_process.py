"""The relay process dies, restarts, or is told to stop: tunnels keep their URL, streams end honestly."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

import burrow

from ..helpers import EchoServer, ServiceThread, recv_all, tls_connect
from .conftest import RelayProcess, Transfer, echo_ok, wait_for

MB = 1024 * 1024


def _forward(echo_port: int, relay: RelayProcess, states: list[burrow.TunnelState]) -> burrow.Forward:
    return burrow.forward(echo_port, unencrypted=True, relay=f"localhost:{relay.port}", on_state=states.append)


def test_relay_restart_while_idle_keeps_the_url(echo: EchoServer, relay_process: RelayProcess, ca_file: Path) -> None:
    states: list[burrow.TunnelState] = []
    forward = _forward(echo.port, relay_process, states)
    with forward as tunnel:
        assert echo_ok(tunnel, ca_file)
        relay_process.kill()
        wait_for(lambda: forward.state is burrow.TunnelState.RECONNECTING, what="loss noticed")
        time.sleep(1.0)  # the relay stays down a while; the agent keeps trying
        ready = relay_process.start()
        wait_for(lambda: forward.state is burrow.TunnelState.OPEN, what="tunnel back")
        recovery = time.monotonic() - ready
        assert recovery < 2.0, recovery
        assert forward.tunnel == tunnel  # same id, URL and raw TCP port, from a relay with no memory of it
        assert echo_ok(tunnel, ca_file)


def test_relay_killed_during_bulk_transfer(
    echo: EchoServer, service_loop: ServiceThread, relay_process: RelayProcess, ca_file: Path
) -> None:
    states: list[burrow.TunnelState] = []
    forward = _forward(echo.port, relay_process, states)
    source = service_loop.source_server(2000 * MB)
    with forward as tunnel, burrow.forward(source.port, relay=f"localhost:{relay_process.port}") as downloads:
        tls = tls_connect(downloads, ca_file, timeout=30)
        raw = socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=30)
        transfers = [Transfer(tls, 2000 * MB, echo=False), Transfer(raw, 2000 * MB)]
        wait_for(lambda: all(len(t.received) > 2 * MB for t in transfers), what="transfers under way")
        relay_process.kill()
        for transfer in transfers:
            transfer.join()
            assert transfer.whole_or_reset() == "reset"  # cut, and the client can tell
        tls.close()
        raw.close()
        relay_process.start()
        wait_for(lambda: forward.state is burrow.TunnelState.OPEN, what="tunnel back")
        assert forward.tunnel == tunnel
        assert echo_ok(tunnel, ca_file, size=4 * MB)
    service_loop.close_server(source)


class _SlowSource(asyncio.Protocol):
    """Sends 64 KiB every 50 ms, 30 times (~1.9 MB over 1.5 s), then closes."""

    CHUNKS = 30

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.sent = 0
        self._tick()

    def _tick(self) -> None:
        if self.sent == self.CHUNKS:
            self.transport.close()
            return
        self.transport.write(bytes([self.sent]) * 65536)
        self.sent += 1
        asyncio.get_running_loop().call_later(0.05, self._tick)


def test_sigterm_drains_open_streams_and_refuses_new_ones(
    service_loop: ServiceThread, relay_process: RelayProcess, ca_file: Path
) -> None:
    relay_process.stop()
    relay = RelayProcess(relay_process.port, "--heartbeat-timeout", "1.5", "--grace", "5")
    relay.start()
    source = service_loop._serve(_SlowSource)
    states: list[burrow.TunnelState] = []
    try:
        forward = _forward(source.port, relay, states)
        with forward as tunnel:
            tls = tls_connect(tunnel, ca_file, timeout=30)
            raw = socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=30)
            first = tls.recv(1)  # both streams are flowing
            assert first and raw.recv(1)
            started = time.monotonic()
            relay.terminate()
            time.sleep(0.3)
            with pytest.raises(ConnectionRefusedError):  # no new connection is accepted
                socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=5)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", relay.port), timeout=5)
            expected = b"".join(bytes([i]) * 65536 for i in range(_SlowSource.CHUNKS))
            assert first + recv_all(tls) == expected  # the open streams finish, whole
            rest = recv_all(raw)
            assert len(rest) == len(expected) - 1 and rest == expected[1:]
            assert relay.wait(timeout=5) == 0
            elapsed = time.monotonic() - started
            assert elapsed < 5 + 1, elapsed
            assert forward.state is burrow.TunnelState.RECONNECTING  # the agent moves on
            tls.close()
            raw.close()
            relay.start()
            wait_for(lambda: forward.state is burrow.TunnelState.OPEN, what="tunnel back")
            assert forward.tunnel == tunnel
    finally:
        relay.stop()
        service_loop.close_server(source)
    assert any("shutting down" in line for line in relay.log)
