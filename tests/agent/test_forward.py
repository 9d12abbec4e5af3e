"""``burrow.forward()``: sync, async, threads, Jupyter-style, errors, tokens, certificates."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

import burrow
from burrow.client import client_context
from burrow.relay import Relay, RelayConfig

from ..helpers import EchoServer, ServiceThread, echo_once, embedded_url, free_port, on_runtime


@pytest.fixture
def token_relay() -> Iterator[Relay]:
    relay = on_runtime(Relay(RelayConfig(port=0, tokens=frozenset({"right-token"}))).start())
    yield relay

    async def close() -> None:
        relay.close()

    on_runtime(close())


def test_sync_forward_returns_an_immutable_tunnel(echo: EchoServer, ca_file: Path) -> None:
    forward = burrow.forward(echo.port)
    with forward as tunnel:
        assert isinstance(tunnel, burrow.Tunnel)
        assert forward.is_open and forward.tunnel == tunnel and forward.state is burrow.TunnelState.OPEN
        assert tunnel.tls_socket == (tunnel.host, tunnel.port)
        assert tunnel.url == embedded_url(tunnel)
        assert tunnel.unencrypted_port is None
        with pytest.raises(burrow.ConfigurationError, match="unencrypted=True"):
            tunnel.tcp_socket  # noqa: B018
        with pytest.raises(AttributeError):
            tunnel.port = 1  # type: ignore[misc]
        assert echo_once(tunnel, ca_file) == b"hello burrow"
    assert not forward.is_open
    with pytest.raises(burrow.TunnelClosed):
        forward.tunnel  # noqa: B018


def test_forwarding_a_port_twice_fails_clearly(echo: EchoServer) -> None:
    with burrow.forward(echo.port) as first:
        with pytest.raises(burrow.PortAlreadyForwarded, match=f"port {echo.port} is already forwarded"):
            with burrow.forward(echo.port):
                pass
        assert first.id
    with burrow.forward(echo.port) as again:  # released on exit
        assert again.id != first.id


@pytest.mark.parametrize("port", [0, -1, 65536, 70000, "70000", 8000.0, True, None])
def test_bad_ports_are_refused(port: object) -> None:
    with pytest.raises(burrow.ConfigurationError, match="not a TCP port"):
        burrow.forward(port)  # type: ignore[arg-type]


def test_h2_with_unencrypted_makes_no_sense() -> None:
    with pytest.raises(burrow.ConfigurationError, match="h2"):
        burrow.forward(8000, unencrypted=True, h2=True)


@pytest.mark.parametrize(
    "h2, offered, expected",
    [
        (True, ["h2", "http/1.1"], "h2"),
        (True, ["http/1.1"], "http/1.1"),
        (False, ["h2", "http/1.1"], "http/1.1"),  # ALPN is always answered when it can be
        (False, ["http/1.1"], "http/1.1"),
        (True, ["postgresql"], None),  # a protocol the tunnel does not name: no ALPN, no refusal
        (False, ["postgresql"], None),
        (False, [], None),
    ],
)
def test_tls_tunnels_negotiate_alpn(
    echo: EchoServer, ca_file: Path, h2: bool, offered: list[str], expected: str | None
) -> None:
    with burrow.forward(echo.port, h2=h2) as tunnel:
        context = client_context(ca_file)  # (the dev CA exists once a relay started)
        if offered:
            context.set_alpn_protocols(offered)
        raw = socket.create_connection(("127.0.0.1", tunnel.port), timeout=10)
        with context.wrap_socket(raw, server_hostname=tunnel.host) as sock:
            assert sock.selected_alpn_protocol() == expected
            sock.sendall(b"through")  # and the tunnel carries bytes
            assert sock.recv(7) == b"through"


def test_async_forward_on_the_callers_loop(echo: EchoServer, ca_file: Path) -> None:
    async def main() -> bytes:
        async with burrow.forward(echo.port) as tunnel:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", tunnel.port, ssl=client_context(ca_file), server_hostname=tunnel.host
            )
            writer.write(b"from asyncio")
            data = await reader.readexactly(12)
            writer.close()
            return data

    assert asyncio.run(main()) == b"from asyncio"


def test_sync_forward_inside_a_running_loop_like_jupyter(echo: EchoServer, ca_file: Path) -> None:
    async def cell() -> bytes:
        # a notebook cell runs synchronous code while the kernel's loop is running
        with burrow.forward(echo.port) as tunnel:
            return echo_once(tunnel, ca_file, b"from a notebook")

    assert asyncio.run(cell()) == b"from a notebook"


def test_many_threads_forward_at_once(service_loop: ServiceThread, ca_file: Path) -> None:
    servers = [service_loop.echo_server() for _ in range(8)]
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for round_ in range(3):
                with burrow.forward(servers[index].port) as tunnel:
                    payload = f"thread {index} round {round_}".encode()
                    results[index * 10 + round_] = echo_once(tunnel, ca_file, payload)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert results == {i * 10 + r: f"thread {i} round {r}".encode() for i in range(8) for r in range(3)}
    for server in servers:
        service_loop.close_server(server)


def test_wrong_token_is_refused_with_its_cause(token_relay: Relay, echo: EchoServer, ca_file: Path) -> None:
    relay = f"localhost:{token_relay.port}"
    with pytest.raises(
        burrow.AuthenticationFailed, match="rejected the token from token=: wrong token; check it"
    ) as info:
        with burrow.forward(echo.port, relay=relay, token="wrong-token"):
            pass
    assert "wrong-token" not in str(info.value)
    with pytest.raises(burrow.AuthenticationFailed, match="requires a token; set BURROW_TOKEN or BURROW_TOKEN_FILE"):
        with burrow.forward(echo.port, relay=relay):  # no token at all
            pass
    with burrow.forward(echo.port, relay=relay, token="right-token") as tunnel:
        assert tunnel.port == token_relay.port
        assert echo_once(tunnel, ca_file) == b"hello burrow"


def test_token_from_environment_file(
    token_relay: Relay, echo: EchoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("right-token\n")
    monkeypatch.setenv("BURROW_RELAY", f"localhost:{token_relay.port}")
    monkeypatch.setenv("BURROW_TOKEN_FILE", str(token_file))
    with burrow.forward(echo.port) as tunnel:
        assert tunnel.port == token_relay.port
    token_file.write_text("stale-token\n")
    with pytest.raises(
        burrow.AuthenticationFailed, match=f"from BURROW_TOKEN_FILE \\({token_file}\\): wrong token; check it"
    ):
        with burrow.forward(echo.port):
            pass


def test_unreachable_relay_says_so() -> None:
    port = free_port()
    with pytest.raises(
        burrow.RelayUnavailable, match=rf"cannot reach relay localhost:{port} .*check forward\(relay=\.\.\.\)"
    ):
        with burrow.forward(8000, relay=f"localhost:{port}"):
            pass


@pytest.mark.parametrize(
    "value, message",
    [("127.0.0.1:4443", "IP address"), ("localhost:http", "bad port"), ("localhost:99999", "bad port"), (" ", "")],
)
def test_bad_relay_setting(value: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURROW_RELAY", value)
    if not message:  # blank means unset: the embedded relay
        burrow.forward(8000)
        return
    with pytest.raises(burrow.ConfigurationError, match=message):
        burrow.forward(8000)


def test_operator_certificate_relay(echo: EchoServer, tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("relay.localhost", "*.relay.localhost")
    cert, key, ca_pem = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    ca.cert_pem.write_to_path(str(ca_pem))
    config = RelayConfig(domain="relay.localhost", port=0, cert=cert, key=key, tokens=frozenset({"t"}))
    relay = on_runtime(Relay(config).start())
    try:
        # without the operator's CA the agent refuses to trust the relay
        with pytest.raises(burrow.RelayUnavailable, match="cannot trust relay .*BURROW_CA"):
            with burrow.forward(echo.port, relay=f"relay.localhost:{relay.port}", token="t"):
                pass
        with burrow.forward(echo.port, relay=f"relay.localhost:{relay.port}", token="t", ca=ca_pem) as tunnel:
            assert tunnel.host == f"{tunnel.id}.relay.localhost"
            assert echo_once(tunnel, ca_pem) == b"hello burrow"
            with pytest.raises(ssl.SSLCertVerificationError):
                echo_once(tunnel, Path(os.environ["BURROW_HOME"]) / "ca.pem")  # the dev CA does not vouch
    finally:

        async def close() -> None:
            relay.close()

        on_runtime(close())


def test_relay_beyond_loopback_requires_a_token() -> None:
    with pytest.raises(burrow.ConfigurationError, match="without a token; set BURROW_TOKEN"):
        Relay(RelayConfig(host="0.0.0.0", port=0))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_relay_refusing_the_name_says_which_setting_to_check(
    loop: str, echo: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a relay for *.localhost refuses an agent that asks for another name of its own domain in SNI:
    # the native engine with an unrecognized_name alert; the asyncio one hangs up, which both loops
    # report as a ConnectionResetError with no message at all
    monkeypatch.setenv("BURROW_LOOP", loop)
    code = (
        "import burrow, sys\n"
        "try:\n"
        f"    burrow.forward({echo.port}, relay='nosuch.localhost:' + sys.argv[1]).open()\n"
        "except burrow.RelayUnavailable as exc:\n"
        "    print(exc)\n"
    )
    relay = on_runtime(Relay(RelayConfig(port=0)).start())
    try:
        done = subprocess.run([sys.executable, "-c", code, str(relay.port)], capture_output=True, text=True, timeout=60)
    finally:

        async def close() -> None:
            relay.close()

        on_runtime(close())
    if relay.config.engine == "native":  # it says why, with an alert
        expected = (
            f"relay nosuch.localhost:{relay.port} refused the TLS handshake (TLSV1_UNRECOGNIZED_NAME); "
            "check that forward(relay=...) names the relay's domain\n"
        )
    else:
        expected = (
            f"relay nosuch.localhost:{relay.port} closed the connection during the TLS handshake; check that "
            "forward(relay=...) names the relay's domain and TLS port (a relay hangs up on names it does not serve)\n"
        )
    assert done.stdout == expected, done.stderr


@pytest.mark.parametrize("greeting", [b"SSH-2.0-OpenSSH_9.2p1\r\n", b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_relay_setting_naming_another_service_says_so(greeting: bytes) -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:  # what sshd or a web server says to a TLS ClientHello
        conn, _ = listener.accept()
        with conn:
            conn.sendall(greeting)
            conn.recv(4096)

    threading.Thread(target=answer, daemon=True).start()
    port = listener.getsockname()[1]
    try:
        with pytest.raises(burrow.RelayUnavailable) as caught:
            burrow.forward(8000, relay=f"localhost:{port}").open()
    finally:
        listener.close()
    # (OpenSSL 3.0 says WRONG_VERSION_NUMBER, 3.2 and later RECORD_LAYER_FAILURE; the native
    # engine's rustls, a corrupt message)
    assert re.fullmatch(
        rf"relay localhost:{port} answered in another protocol than TLS "
        r"\((WRONG_VERSION_NUMBER|RECORD_LAYER_FAILURE|received corrupt message of type \w+)\); "
        r"check that forward\(relay=\.\.\.\) names the relay's TLS port, not another service's",
        str(caught.value),
    ), caught.value
