"""Forwarding to more than loopback PORT: HOST:PORT, [v6]:PORT and unix:/path, through real sockets."""

from __future__ import annotations

import re
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import burrow
from burrow.agent.target import LocalTarget

from ..helpers import echo_through, free_port, tls_connect
from ..test_cli import BURROW


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _TCP(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _TCP6(_TCP):
    address_family = socket.AF_INET6


class _Unix(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


def _serving(server: socketserver.BaseServer) -> Iterator[socketserver.BaseServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def echo_on_127_0_0_2() -> Iterator[int]:
    """An echo service on 127.0.0.2 only: loopback PORT (127.0.0.1, ::1) has nothing there."""
    for server in _serving(_TCP(("127.0.0.2", 0), _Echo)):
        yield server.server_address[1]  # type: ignore[index]


@pytest.fixture
def echo_on_unix_socket(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "echo.sock")
    for _ in _serving(_Unix(path, _Echo)):
        yield path


def test_forward_to_another_loopback_address(echo_on_127_0_0_2: int, ca_file: Path) -> None:
    port = echo_on_127_0_0_2
    with burrow.forward(f"127.0.0.2:{port}", unencrypted=True) as tunnel:
        with tls_connect(tunnel, ca_file) as sock:
            assert echo_through(sock, b"over TLS to 127.0.0.2" * 1000) == b"over TLS to 127.0.0.2" * 1000
        assert tunnel.unencrypted_port is not None
        with socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=10) as sock:
            assert echo_through(sock, b"raw to 127.0.0.2") == b"raw to 127.0.0.2"


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_forward_to_an_ipv6_address(ca_file: Path) -> None:
    for server in _serving(_TCP6(("::1", 0), _Echo)):
        port = server.server_address[1]  # type: ignore[index]
        with burrow.forward(f"[::1]:{port}") as tunnel, tls_connect(tunnel, ca_file) as sock:
            assert echo_through(sock, b"to ::1") == b"to ::1"


def test_forward_to_a_unix_socket(echo_on_unix_socket: str, ca_file: Path) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    with burrow.forward(f"unix:{echo_on_unix_socket}", unencrypted=True) as tunnel:
        with tls_connect(tunnel, ca_file) as sock:
            assert echo_through(sock, payload) == payload
        assert tunnel.unencrypted_port is not None
        with socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=10) as sock:
            assert echo_through(sock, b"raw to a unix socket") == b"raw to a unix socket"


def test_the_same_target_is_forwarded_once_per_process(echo_on_unix_socket: str) -> None:
    with burrow.forward(f"unix:{echo_on_unix_socket}"):
        with pytest.raises(burrow.BurrowError, match=f"unix:{echo_on_unix_socket} is already forwarded"):
            burrow.forward(f"unix:{echo_on_unix_socket}").open()


@pytest.mark.parametrize(
    "given, target",
    [
        (8000, LocalTarget(8000)),
        ("8000", LocalTarget(8000)),
        ("127.0.0.2:8000", LocalTarget(8000, "127.0.0.2")),
        ("[::1]:8000", LocalTarget(8000, "::1")),
        ("db:5432", LocalTarget(5432, "db")),
        ("unix:/run/app.sock", LocalTarget(path="/run/app.sock")),
    ],
)
def test_targets_are_parsed(given: object, target: LocalTarget) -> None:
    assert LocalTarget.parse(given) == target


@pytest.mark.parametrize(
    "given, message",
    [
        ("abc", "is not a port, HOST:PORT or unix:PATH"),
        (":8000", "is not a port, HOST:PORT or unix:PATH"),
        ("db:", "is not a port, HOST:PORT or unix:PATH"),
        ("db:99999", "is not a TCP port"),
        ("unix:", "names no socket"),
        (3.5, "is not a TCP port"),
    ],
)
def test_bad_targets_are_one_clear_error(given: object, message: str) -> None:
    with pytest.raises(burrow.ConfigurationError, match=message):
        burrow.forward(given)  # type: ignore[arg-type]


def test_the_cli_forwards_a_unix_socket(echo_on_unix_socket: str) -> None:
    env_relay = subprocess.Popen(
        [*BURROW, "forward", f"unix:{echo_on_unix_socket}", "--unencrypted"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert env_relay.stdout is not None
    try:
        url = env_relay.stdout.readline().strip()
        tcp = env_relay.stdout.readline().strip()
        assert url.startswith("https://") and tcp.startswith("tcp://localhost:")
        with socket.create_connection(("127.0.0.1", int(tcp.rsplit(":", 1)[1])), timeout=10) as sock:
            assert echo_through(sock, b"via the CLI") == b"via the CLI"
    finally:
        env_relay.terminate()
        _, err = env_relay.communicate(timeout=20)
    assert env_relay.returncode == 0
    assert f"burrow: forwarding unix:{echo_on_unix_socket} to {url}" in err


REFERENCE = """
import burrow as modal  # the one line changed

with modal.forward({port}) as tunnel:
    print(f"tunnel.url        = {{tunnel.url}}")
    print(f"tunnel.tls_socket = {{tunnel.tls_socket}}")
    {fetch}
with modal.forward({port}, unencrypted=True) as tunnel:
    print(f"tunnel.tcp_socket = {{tunnel.tcp_socket}}")
    {raw}
with modal.forward({port}, h2_enabled=True) as tunnel:
    print(f"h2 url = {{tunnel.url}}")
"""


def test_the_reference_examples_run_with_one_import_changed(ca_file: Path) -> None:
    """The reference's own examples (http.server on a port, the raw TCP one) with `import burrow as modal`."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        fetch = (
            "import ssl, socket; ctx = ssl.create_default_context(cafile=sys.argv[1]); "
            "s = ctx.wrap_socket(socket.create_connection(('127.0.0.1', tunnel.tls_socket[1])), "
            "server_hostname=tunnel.tls_socket[0]); s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); "
            "print('https:', s.recv(12)[:12])"
        )
        raw = (
            "s = socket.create_connection(('127.0.0.1', tunnel.tcp_socket[1])); "
            "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print('tcp:', s.recv(12)[:12])"
        )
        code = "import sys\n" + REFERENCE.format(port=port, fetch=fetch, raw=raw)
        for _ in range(50):  # http.server starting
            if LocalTarget(port).accepting():
                break
        result = subprocess.run([sys.executable, "-c", code, str(ca_file)], capture_output=True, text=True, timeout=60)
    finally:
        server.terminate()
        server.wait()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"tunnel.url        = https://([0-9a-z]{14}\.)?localhost:\d+", lines[0]), lines
    assert lines[1].startswith("tunnel.tls_socket = ('") and "localhost'" in lines[1]
    assert lines[2] == "https: b'HTTP/1.0 200'"
    assert lines[3].startswith("tunnel.tcp_socket = ('localhost', ")
    assert lines[4] == "tcp: b'HTTP/1.0 200'"
    assert lines[5].startswith("h2 url = https://")
