"""The admin view on ``--metrics``: ``/api/status``, ``burrow status``, and the admin token.

A relay carrying real traffic (a raw TCP and a TLS tunnel, each with a
public connection held open after moving bytes) is asked what it carries:
the JSON names each tunnel and each connection with its client address and
the bytes it moved, and ``burrow status`` prints the same as a table.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import burrow
from burrow.cli import main
from burrow.relay import Relay, RelayConfig, admin
from burrow.relay.tickets import load_or_create_key
from burrow.relay.tokens import TokenSigner

from ..helpers import EchoServer, ServiceThread, echo_through, free_port, on_runtime, tls_connect

pytest.importorskip("prometheus_client")

TOKEN = "s3cret-admin-token-0123456789"


def _start(tmp_path: Path, metrics_host: str = "127.0.0.1", token_file: Path | None = None) -> Relay:
    secret = tmp_path / "secret"
    load_or_create_key(secret)
    config = RelayConfig(port=0, token_secret=secret, metrics=(metrics_host, 0), admin_token_file=token_file)
    return on_runtime(Relay(config).start())


def _stop(relay: Relay) -> None:
    async def close() -> None:
        relay.close()

    on_runtime(close())


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    started = _start(tmp_path)
    yield started
    _stop(started)


def _admin(relay: Relay) -> str:
    assert relay.metrics is not None
    return f"http://127.0.0.1:{relay.metrics.port}"


def _get(
    url: str, token: str | None = None, basic: str | None = None, raw: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if basic is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(basic.encode()).decode())
    if raw is not None:
        request.add_header("Authorization", raw)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _status(relay: Relay, query: str = "") -> dict[str, Any]:
    code, headers, body = _get(_admin(relay) + "/api/status" + query)
    assert code == 200 and headers["Content-Type"] == "application/json", (code, body)
    answer: dict[str, Any] = json.loads(body)
    return answer


def _echo(sock: socket.socket, payload: bytes) -> None:
    assert echo_through(sock, payload) == payload


def _client(sock: socket.socket) -> str:
    """The client's address as the relay writes it."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _signer(tmp_path: Path) -> TokenSigner:
    return TokenSigner(load_or_create_key(tmp_path / "secret"))


def test_status_lists_tunnels_and_their_live_connections(
    relay: Relay,
    tmp_path: Path,
    service_loop: ServiceThread,
    ca_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    acme, _ = _signer(tmp_path).issue("acme", None)
    echoes = [service_loop.echo_server() for _ in range(2)]
    address = f"localhost:{relay.port}"
    try:
        with (
            burrow.forward(echoes[0].port, relay=address, token=acme) as web,
            burrow.forward(echoes[1].port, relay=address, token=acme, unencrypted=True) as raw,
        ):
            assert raw.unencrypted_port is not None
            with (
                tls_connect(web, ca_file) as tls,
                socket.create_connection(("127.0.0.1", raw.unencrypted_port), timeout=10) as tcp,
            ):
                _echo(tls, b"w" * 300)
                _echo(tcp, b"t" * 1000)
                _echo(tcp, b"t" * 234)
                answer = _status(relay)
                facts = answer["relay"]
                # (one agent session per process and relay carries both tunnels)
                assert (facts["domain"], facts["tunnels"], facts["sessions"], facts["connections_open"]) == (
                    "localhost",
                    2,
                    1,
                    2,
                )
                assert facts["uptime"] > 0 and facts["draining"] is False and answer["tunnels_left_out"] == 0
                tunnels = {t["id"]: t for t in answer["tunnels"]}
                assert set(tunnels) == {web.id, raw.id}
                https, tcp_tunnel = tunnels[web.id], tunnels[raw.id]
                assert (https["kind"], https["tenant"], https["host"]) == ("https", "acme", f"{web.id}.localhost")
                assert tcp_tunnel["kind"] == f"tcp:{raw.unencrypted_port}"
                assert (https["connections_open"], https["connections_total"]) == (1, 1)
                assert (https["bytes_in"], https["bytes_out"]) == (300, 300)
                assert (tcp_tunnel["bytes_in"], tcp_tunnel["bytes_out"]) == (1234, 1234)
                assert https["connections"] == [
                    {"client": _client(tls), "bytes_in": 300, "bytes_out": 300, "age": https["connections"][0]["age"]}
                ]
                (line,) = tcp_tunnel["connections"]
                assert (line["client"], line["bytes_in"], line["bytes_out"]) == (_client(tcp), 1234, 1234)
                assert 0 <= line["age"] < 30 and tcp_tunnel["connections_left_out"] == 0

                # the command prints the same, as a table; and the JSON as it came
                assert main(["status", "--admin", _admin(relay)]) == 0
                table = capsys.readouterr().out.splitlines()
                assert (
                    table[0].startswith("relay localhost (") and "1 sessions, 2 tunnels, 2 connections open" in table[0]
                )
                assert table[1].split() == ["ID", "KIND", "TENANT", "CONNECTIONS", "IN", "OUT", "AGE"]
                rows = {line.split()[0]: line.split() for line in table[2:]}
                assert rows[web.id][1:7] == ["https", "acme", "1/1", "300", "B", "300"]
                assert rows[raw.id][1:8] == [f"tcp:{raw.unencrypted_port}", "acme", "1/1", "1.2", "kB", "1.2", "kB"]
                assert main(["status", "--admin", _admin(relay), "--json"]) == 0
                printed = json.loads(capsys.readouterr().out)
                assert {t["id"] for t in printed["tunnels"]} == {web.id, raw.id}
            # closed connections leave the listing (once the relay has seen them close); the totals stay
            deadline = time.monotonic() + 10
            while True:
                tcp_after = {t["id"]: t for t in _status(relay)["tunnels"]}[raw.id]
                if not tcp_after["connections_open"] or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            assert (tcp_after["connections"], tcp_after["connections_open"], tcp_after["bytes_in"]) == ([], 0, 1234)
    finally:
        for echo in echoes:
            service_loop.close_server(echo)


def test_the_listing_is_bounded_and_says_how_much_it_left_out(
    relay: Relay, tmp_path: Path, echo: EchoServer, service_loop: ServiceThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    acme, _ = _signer(tmp_path).issue("acme", None)
    address = f"localhost:{relay.port}"
    other = service_loop.echo_server()
    with (
        burrow.forward(echo.port, relay=address, token=acme, unencrypted=True) as first,
        burrow.forward(other.port, relay=address, token=acme) as second,
    ):
        assert first.unencrypted_port is not None
        clients: list[socket.socket] = []
        try:
            for index in range(3):  # one after the other: each one's stream is open once its bytes came back
                clients.append(socket.create_connection(("127.0.0.1", first.unencrypted_port), timeout=10))
                _echo(clients[-1], b"x" * (index + 1))
            (tunnel,) = [t for t in _status(relay, "?connections=2")["tunnels"] if t["id"] == first.id]
            # the oldest two, and the count of the rest
            assert [c["client"] for c in tunnel["connections"]] == [_client(s) for s in clients[:2]]
            assert [c["bytes_in"] for c in tunnel["connections"]] == [1, 2]
            assert (tunnel["connections_open"], tunnel["connections_left_out"]) == (3, 1)
            assert {t["id"] for t in _status(relay)["tunnels"]} == {first.id, second.id}
            monkeypatch.setattr(admin, "MAX_TUNNELS_LISTED", 1)
            answer = _status(relay, "?connections=0")
            assert len(answer["tunnels"]) == 1 and answer["tunnels_left_out"] == 1
            assert answer["relay"]["tunnels"] == 2 and answer["relay"]["connections_open"] == 3
            assert answer["tunnels"][0]["connections"] == [] and answer["tunnels"][0]["connections_left_out"] == 3
        finally:
            for sock in clients:
                sock.close()
            service_loop.close_server(other)


def test_beyond_loopback_the_admin_endpoints_want_a_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    relay = _start(tmp_path, "0.0.0.0", token_file)
    try:
        base = _admin(relay)
        for path, scheme in (("/api/status", "Bearer"), ("/", "Basic")):
            code, headers, body = _get(base + path)
            # the page's challenge makes a browser ask for the token (as a password) once
            assert code == 401 and headers["WWW-Authenticate"].startswith(scheme + " realm="), (path, code)
            assert body.count(b"\n") == 1 and b"token" in body
            assert _get(base + path, "wrong-" + TOKEN)[0] == 401
            assert _get(base + path, TOKEN)[0] == 200
            for user in ("admin", ""):  # HTTP Basic: any user name, the token as password
                assert _get(base + path, basic=f"{user}:{TOKEN}")[0] == 200
            for bad in (f"admin:wrong-{TOKEN}", TOKEN, f"{TOKEN}:"):
                assert _get(base + path, basic=bad)[0] == 401
            assert _get(base + path, raw="Basic not*base64")[0] == 401
            # never in the URL (proxies' logs, browser history, shared links)
            assert _get(base + path + "?token=" + TOKEN)[0] == 401
        # Prometheus and load balancers need no token
        assert _get(base + "/metrics")[0] == 200 and _get(base + "/healthz")[0] == 200

        assert main(["status", "--admin", base]) == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "--token-file" in error and "BURROW_ADMIN_TOKEN" in error
        assert main(["status", "--admin", base, "--token-file", str(token_file)]) == 0
        assert capsys.readouterr().out.startswith("relay localhost")
        monkeypatch.setenv("BURROW_ADMIN_TOKEN", TOKEN)
        assert main(["status", "--admin", base]) == 0
    finally:
        _stop(relay)


def test_beyond_loopback_without_a_token_the_admin_endpoints_are_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    relay = _start(tmp_path, "0.0.0.0")
    try:
        base = _admin(relay)
        for path in ("/api/status", "/"):
            code, _, body = _get(base + path)
            assert code == 403 and body.count(b"\n") == 1 and b"--admin-token-file" in body
            assert _get(base + path, TOKEN)[0] == 403
        assert _get(base + "/metrics")[0] == 200 and _get(base + "/healthz")[0] == 200
        assert main(["status", "--admin", base]) == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "--admin-token-file" in error
    finally:
        _stop(relay)


def test_a_short_admin_token_is_refused_at_start(tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("short\n")
    with pytest.raises(burrow.errors.ConfigurationError, match="--admin-token-file .* 16\\+ characters"):
        _start(tmp_path, "127.0.0.1", token_file)


def test_status_without_a_relay_says_where_it_looked_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "--admin", url]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and url in error and "--metrics" in error and "Traceback" not in error


def test_requests_are_bounded(relay: Relay) -> None:
    assert relay.metrics is not None
    with socket.create_connection(("127.0.0.1", relay.metrics.port), timeout=10) as sock:
        sock.sendall(b"GET /api/status HTTP/1.1\r\nX-Filler: " + b"a" * (10 * 1024))
        assert sock.recv(100) == b""  # (a head over 8 KiB: let go without an answer)
    code, _, _ = _get(_admin(relay) + "/api/status?connections=100000")  # (capped, not refused)
    assert code == 200
    request = urllib.request.Request(_admin(relay) + "/api/status", method="POST", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405
