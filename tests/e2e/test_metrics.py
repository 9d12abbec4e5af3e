"""``--metrics``: what a Prometheus scrape of a relay carrying real traffic says, and /healthz."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import burrow
from burrow.errors import AuthenticationFailed, TunnelRefused
from burrow.relay import Relay, RelayConfig
from burrow.relay.tickets import load_or_create_key
from burrow.relay.tokens import TokenSigner

from ..helpers import ServiceThread, echo_once, on_runtime

parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[Relay, TokenSigner]]:
    secret, revoked = tmp_path / "secret", tmp_path / "revoked"
    signer = TokenSigner(load_or_create_key(secret))
    revoked.write_text("")
    config = RelayConfig(port=0, token_secret=secret, revoked=revoked, metrics=("127.0.0.1", 0))
    started = on_runtime(Relay(config).start())
    yield started, signer

    async def close() -> None:
        started.close()

    on_runtime(close())


def _scrape(relay: Relay) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
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
            assert seen[("burrow_tunnels_open", (("tenant", "acme"),))] == 2
            assert seen[("burrow_sessions_open", ())] >= 1
            assert seen[("burrow_connections_total", (("tenant", "acme"),))] == 3
            assert seen[("burrow_bytes_total", (("direction", "in"), ("tenant", "acme")))] == 3000
            assert seen[("burrow_refusals_total", (("kind", "token"),))] == 3
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
