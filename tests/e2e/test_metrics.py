"""``--metrics``: what a Prometheus scrape of a relay carrying real traffic says, and /healthz."""

from __future__ import annotations

import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import burrow
from burrow.agent.config import AgentSettings, RelayAddress
from burrow.agent.relay_connection import RelayConnection
from burrow.errors import AuthenticationFailed, TunnelRefused
from burrow.relay import Relay, RelayConfig
from burrow.relay.plane import HANDSHAKE_FAILURES, OPEN_LATENCY_BOUNDS
from burrow.relay.tickets import load_or_create_key
from burrow.relay.tokens import TokenSigner

from ..helpers import EchoServer, ServiceThread, echo_once, on_runtime

parser = pytest.importorskip("prometheus_client.parser")

HANDSHAKE_TIMEOUT = 1.0
NATIVE = RelayConfig().engine == "native"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[Relay, TokenSigner]]:
    secret, revoked = tmp_path / "secret", tmp_path / "revoked"
    signer = TokenSigner(load_or_create_key(secret))
    revoked.write_text("")
    # (a short handshake deadline: the timeout case below waits it out)
    config = RelayConfig(
        port=0, token_secret=secret, revoked=revoked, metrics=("127.0.0.1", 0), handshake_timeout=HANDSHAKE_TIMEOUT
    )
    started = on_runtime(Relay(config).start())
    yield started, signer

    async def close() -> None:
        started.close()

    on_runtime(close())


def _scrape(relay: Relay) -> Samples:
    assert relay.metrics is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.metrics.port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in parser.text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_scrape_counts_tunnels_connections_bytes_and_refusals(
    relay: tuple[Relay, TokenSigner], service_loop: ServiceThread, ca_file: Path
) -> None:
    server, signer = relay
    address = f"localhost:{server.port}"
    acme, _ = signer.issue("acme", None, max_tunnels=2)
    echoes = [service_loop.echo_server() for _ in range(3)]
    try:
        with (
            burrow.forward(echoes[0].port, relay=address, token=acme) as one,
            burrow.forward(echoes[1].port, relay=address, token=acme) as two,
        ):
            for tunnel in (one, two, one):
                assert echo_once(tunnel, ca_file, b"x" * 1000) == b"x" * 1000
            with pytest.raises(TunnelRefused):
                burrow.forward(echoes[2].port, relay=address, token=acme).open()  # over the tenant's 2
            for _ in range(3):
                with pytest.raises(AuthenticationFailed):
                    burrow.forward(echoes[2].port, relay=address, token="wrong").open()
            seen = _scrape(server)
            assert seen[("burrow_up", ())] == 1
            # the process's own, for memory and descriptor alerts: this process (the test's), live
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            assert 0.5 * rss < seen[("process_resident_memory_bytes", ())] < 2 * rss
            assert 10 < seen[("process_open_fds", ())] <= seen[("process_max_fds", ())]
            assert seen[("burrow_tunnels_open", (("tenant", "acme"),))] == 2
            assert seen[("burrow_sessions_open", ())] >= 1
            assert seen[("burrow_connections_total", (("tenant", "acme"),))] == 3
            assert seen[("burrow_bytes_total", (("direction", "in"), ("tenant", "acme")))] == 3000
            assert seen[("burrow_refusals_total", (("kind", "token"),))] == 3
            assert seen[("burrow_agent_auth_failures_total", ())] == 3
            # three public connections, each timed from accept to its OPEN: a TLS handshake on loopback
            assert seen[("burrow_stream_open_seconds_count", ())] == 3
            assert seen[("burrow_stream_open_seconds_bucket", (("le", "+Inf"),))] == 3
            assert seen[("burrow_stream_open_seconds_bucket", (("le", "5.0"),))] == 3
            assert 0 < seen[("burrow_stream_open_seconds_sum", ())] < 15
            cumulative = [seen[("burrow_stream_open_seconds_bucket", (("le", repr(b)),))] for b in OPEN_LATENCY_BOUNDS]
            assert cumulative == sorted(cumulative)
            assert seen[("burrow_bind_refusals_total", (("code", "limit"),))] == 1
        # closed tunnels' traffic stays counted (counters never go down)
        after = _scrape(server)
        assert ("burrow_tunnels_open", (("tenant", "acme"),)) not in after
        assert after[("burrow_bytes_total", (("direction", "out"), ("tenant", "acme")))] == 3000
    finally:
        for echo in echoes:
            service_loop.close_server(echo)


def test_healthz_is_200_until_the_relay_drains(relay: tuple[Relay, TokenSigner]) -> None:
    server, _ = relay
    assert server.metrics is not None
    base = f"http://127.0.0.1:{server.metrics.port}"
    with urllib.request.urlopen(base + "/healthz", timeout=10) as response:
        assert (response.status, response.read()) == (200, b"ok\n")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(base + "/nothing", timeout=10)
    assert missing.value.code == 404

    async def drain() -> None:
        await server.shutdown(grace=0)

    server.draining = True  # (what shutdown() sets first; the listener answers until the relay closes)
    with pytest.raises(urllib.error.HTTPError) as draining:
        urllib.request.urlopen(base + "/healthz", timeout=10)
    assert draining.value.code == 503 and draining.value.read() == b"draining\n"
    on_runtime(drain())


def _settle(relay: Relay, expected: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``expected`` holds (the relay counts a refusal when it reads the client's last
    bytes, a moment after the client gave up), or 10 s passed; the last scrape."""
    deadline = time.monotonic() + 10
    while True:
        seen = _scrape(relay)
        if expected(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def _handshakes(seen: Samples) -> dict[str, float]:
    return {
        reason: seen[("burrow_tls_handshake_failures_total", (("reason", reason),))] for reason in HANDSHAKE_FAILURES
    }


def _tls(port: int, context: ssl.SSLContext, name: str | None) -> None:
    """A TLS handshake the relay refuses: it fails, or the relay closes the connection right after."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            with context.wrap_socket(sock, server_hostname=name) as tls:
                # (TLS 1.3: a client hears of its refused certificate at its first read)
                assert tls.recv(1) == b""
        except (ssl.SSLError, OSError):
            pass


def test_tls_handshake_failures_are_counted_by_reason(
    relay: tuple[Relay, TokenSigner], ca_file: Path, service_loop: ServiceThread, echo: EchoServer
) -> None:
    server, signer = relay
    port = server.port
    trusting = ssl.create_default_context(cafile=ca_file)
    expected = dict.fromkeys(HANDSHAKE_FAILURES, 0)
    assert _handshakes(_scrape(server)) == expected
    # not TLS: an HTTP request on the TLS port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.recv(100)
    expected["not_tls"] += 1
    # no server name (an IP literal), and a name nothing is routed for
    blind = ssl.create_default_context(cafile=ca_file)
    blind.check_hostname = False
    _tls(port, blind, None)
    expected["no_server_name"] += 1
    _tls(port, trusting, "nosuch.localhost")
    expected["unknown_server_name"] += 1
    # the agent endpoint asked for another protocol than burrow/1
    h2_only = ssl.create_default_context(cafile=ca_file)
    h2_only.set_alpn_protocols(["h2"])
    _tls(port, h2_only, "localhost")
    expected["alpn"] += 1
    # a client that does not trust the relay's certificate says so with an alert
    _tls(port, ssl.create_default_context(), "localhost")
    expected["client_alert"] += 1
    # a client that hangs up before its ClientHello, and one that says nothing until the deadline
    socket.create_connection(("127.0.0.1", port), timeout=10).close()
    expected["closed"] += 1
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        time.sleep(HANDSHAKE_TIMEOUT + 0.2)
        assert silent.recv(100) == b""  # the relay let it go
    expected["timeout"] += 1
    if NATIVE:
        # a tunnel that wants client certificates, and a client without one
        acme, _ = signer.issue("acme", None)
        address = f"localhost:{port}"
        with burrow.forward(echo.port, relay=address, token=acme, client_ca=ca_file) as tunnel:
            _tls(port, trusting, tunnel.host)
            expected["client_certificate"] += 1
            seen = _settle(server, lambda seen: _handshakes(seen) == expected)
    else:
        seen = _settle(server, lambda seen: _handshakes(seen) == expected)
    assert _handshakes(seen) == expected
    # the same refusals as the rate-limited log counts them, an agent without burrow/1 as kind "alpn"
    logged = {kind: seen.get(("burrow_refusals_total", (("kind", kind),)), 0) for kind in ("handshake", "alpn")}
    assert logged == {"handshake": sum(expected.values()) - expected["alpn"], "alpn": expected["alpn"]}


def test_resumes_and_reconnects_are_counted(relay: tuple[Relay, TokenSigner], ca_file: Path, echo: EchoServer) -> None:
    server, signer = relay
    acme, _ = signer.issue("acme", None)
    settings = AgentSettings(RelayAddress("localhost", server.port), token=acme)

    async def take_over() -> str | None:
        first = await RelayConnection.connect(settings)
        address = await first.bind(echo.port, unencrypted=False, h2=False)
        # a reconnected agent whose old session the relay still holds: its ticket takes the tunnel over
        second = await RelayConnection.connect(settings)
        again = await second.bind(echo.port, unencrypted=False, h2=False, ticket=address.ticket)
        assert again.id == address.id
        second.close()
        return again.ticket

    async def resume(ticket: str | None) -> str:
        third = await RelayConnection.connect(settings)
        last = await third.bind(echo.port, unencrypted=False, h2=False, ticket=ticket)
        third.close()
        return last.id

    before = _scrape(server)
    assert (before[("burrow_tunnel_resumes_total", ())], before[("burrow_session_reconnects_total", ())]) == (0, 0)
    ticket = on_runtime(take_over())
    assert server.control is not None
    deadline = time.monotonic() + 10
    while len(server.control.registry) and time.monotonic() < deadline:  # the relay saw the session end
        time.sleep(0.01)
    # an agent coming back after the relay let its tunnel go: a resume, no take-over
    assert on_runtime(resume(ticket))
    seen = _scrape(server)
    assert seen[("burrow_tunnel_resumes_total", ())] == 2
    assert seen[("burrow_session_reconnects_total", ())] == 1
