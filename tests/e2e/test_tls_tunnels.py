"""TLS tunnels end to end, with real clients: curl, openssl, http.client, websockets."""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import burrow
from burrow.agent.runtime import runtime
from burrow.client import client_context

from ..helpers import EchoServer, embedded_url, free_port, recv_all, sha256, tls_connect

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """``python -m http.server`` serving one file of 1 MiB of random bytes."""
    payload = os.urandom(1 << 20)
    (tmp_path / "blob.bin").write_bytes(payload)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port, payload
    process.terminate()
    process.wait(timeout=10)


@needs_curl
def test_curl_fetches_through_tls_tunnel(http_server: tuple[int, bytes], ca_file: Path) -> None:
    port, payload = http_server
    with burrow.forward(port) as tunnel:
        assert tunnel.url == embedded_url(tunnel)
        result = subprocess.run(
            ["curl", "--silent", "--show-error", "--fail", "--cacert", str(ca_file), f"{tunnel.url}/blob.bin"],
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert sha256(result.stdout) == sha256(payload)


def test_http_client_fetches_through_tls_tunnel(http_server: tuple[int, bytes], ca_file: Path) -> None:
    port, payload = http_server
    with burrow.forward(port) as tunnel:
        connection = http.client.HTTPSConnection(tunnel.host, tunnel.port, context=client_context(ca_file))
        connection.sock = tls_connect(tunnel, ca_file)
        connection.request("GET", "/blob.bin")
        response = connection.getresponse()
        assert response.status == 200
        assert sha256(response.read()) == sha256(payload)
        connection.close()


def test_tunnel_id_shape_and_uniqueness(echo: EchoServer) -> None:
    ids = set()
    for _ in range(20):
        with burrow.forward(echo.port) as tunnel:
            assert len(tunnel.id) == 14 and tunnel.id.isalnum() and tunnel.id == tunnel.id.lower()
            ids.add(tunnel.id)
    assert len(ids) == 20


def _openssl(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )


@needs_openssl
def test_openssl_unknown_id_and_missing_sni_are_refused(echo: EchoServer, ca_file: Path) -> None:
    with burrow.forward(echo.port) as tunnel:
        good = _openssl(tunnel.port, "-servername", tunnel.host, "-CAfile", str(ca_file), "-showcerts")
        assert good.returncode == 0 and "Verify return code: 0 (ok)" in good.stdout
        # the dev relay sends its leaf alone (the CA is the client's trust anchor)
        assert good.stdout.count("BEGIN CERTIFICATE") == 1
        assert "depth=1 O = burrow development CA" in good.stderr  # the client found the CA itself
        # asyncio drops the unrecognized_name alert on a failed handshake (its SSL
        # protocol does not flush outgoing bytes then), so clients see an EOF; what
        # matters is that no certificate is sent and nothing is routed
        # the relay's shared TLS port (a tunnel's own loopback port serves that tunnel only)
        shared = runtime().embedded.port  # type: ignore[union-attr]
        for refused in (
            _openssl(shared, "-servername", "aaaaaaaaaaaaaa.localhost"),
            _openssl(shared, "-servername", f"x{tunnel.id}.localhost"),
            _openssl(shared, "-noservername"),
            _openssl(shared, "-servername", "127.0.0.1"),
        ):
            assert refused.returncode != 0
            assert "no peer certificate available" in refused.stdout
            assert "unrecognized name" in refused.stderr or "unexpected eof" in refused.stderr


def test_websocket_echo_through_tls_tunnel(ca_file: Path) -> None:
    from websockets.sync.client import connect
    from websockets.sync.server import serve

    def echo_handler(websocket) -> None:  # type: ignore[no-untyped-def]
        for message in websocket:
            websocket.send(message)

    with serve(echo_handler, "127.0.0.1", 0, max_size=None) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        with burrow.forward(port) as tunnel:
            sock = socket.create_connection(("127.0.0.1", tunnel.port), timeout=10)
            url = f"wss://{tunnel.host}:{tunnel.port}/"
            with connect(url, sock=sock, ssl=client_context(ca_file), server_hostname=tunnel.host, max_size=None) as ws:
                for size in (0, 1, 125, 126, 65535, 65536, 1 << 20):
                    message = os.urandom(size)
                    ws.send(message)
                    assert ws.recv(timeout=10) == message
                ws.send("text ✓")
                assert ws.recv(timeout=10) == "text ✓"
        server.shutdown()


def test_connection_while_nothing_listens_closes_and_tunnel_stays(
    ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    # opened first, the service starts later; a connection waits 0.3 s for it, then is closed
    with burrow.forward(port, connect_timeout=0.3) as tunnel:
        with caplog.at_level(logging.WARNING, logger="burrow"):
            with tls_connect(tunnel, ca_file) as sock:
                assert recv_all(sock) == b""  # closed cleanly (close_notify), nothing invented
            # whoever runs the agent learns why (once a second per port, not once per connection;
            # from the native engine the line comes through its events, a moment later)
            said = f"nothing accepts on local port {port} (connection refused)"
            deadline = time.monotonic() + 2
            while said not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
            assert said in caplog.text
        listener = socket.create_server(("127.0.0.1", port))

        def serve_one() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"now I am here")

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        with tls_connect(tunnel, ca_file) as sock:
            assert recv_all(sock) == b"now I am here"
        thread.join(5)
        listener.close()


def test_leaving_forward_stops_the_url_and_closes_connections(echo: EchoServer, ca_file: Path) -> None:
    with burrow.forward(echo.port) as tunnel:
        open_conn = tls_connect(tunnel, ca_file)
        open_conn.sendall(b"ping")
        assert open_conn.recv(4) == b"ping"
    # the open connection is reset, not left hanging
    open_conn.settimeout(5)
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        data = open_conn.recv(1)
        if data == b"":
            raise ConnectionResetError("closed")
    open_conn.close()
    # and the URL no longer answers
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_connect(tunnel, ca_file)
