"""A public connection that arrives before the service listens waits for it, and loses nothing.

A web service opens a tunnel and answers 303 to its URL before the notebook
behind it listens; the browser's first request must not get an empty reply.
The agent retries the dial with backoff for ``connect_timeout`` seconds
(default 10), keeps what the client sent meanwhile (within the stream's
window: no credit is granted for it), and delivers it first.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import burrow

from ..helpers import free_port, recv_all, tls_connect

MB = 1024 * 1024


def _echo_later(port: int, delay: float) -> threading.Thread:
    """After ``delay`` s, listen on ``port`` and echo one connection until its EOF."""

    def run() -> None:
        time.sleep(delay)
        with socket.create_server(("127.0.0.1", port)) as listener:
            conn, _ = listener.accept()
            with conn:
                try:
                    while data := conn.recv(1 << 16):
                        conn.sendall(data)
                except ConnectionResetError:
                    pass  # the test's client left without a TLS close: the tunnel resets this side

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_tls_connection_waits_for_the_service_and_its_bytes_go_first(ca_file: Path) -> None:
    port = free_port()
    with burrow.forward(port) as tunnel:
        service = _echo_later(port, 1.0)
        with tls_connect(tunnel, ca_file, timeout=20) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # the browser's request, before anyone listens
            time.sleep(1.5)
            sock.sendall(b"and after")
            got = b""
            while len(got) < len(b"GET / HTTP/1.1\r\n\r\nand after"):
                got += sock.recv(100)
            assert got == b"GET / HTTP/1.1\r\n\r\nand after"
        service.join(5)


def test_a_megabyte_sent_before_the_service_listens_arrives_whole(ca_file: Path) -> None:
    port = free_port()
    payload = os.urandom(3 * MB)  # over the stream's 2 MiB window: the rest waits at the client
    with burrow.forward(port, unencrypted=True) as tunnel:
        service = _echo_later(port, 1.5)
        with socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=30) as sock:
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            got = bytearray()
            while len(got) < len(payload):
                chunk = sock.recv(1 << 20)
                assert chunk, f"closed after {len(got)} bytes"
                got += chunk
            sender.join(10)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
        service.join(5)


def test_after_connect_timeout_the_connection_is_closed(ca_file: Path) -> None:
    port = free_port()
    with burrow.forward(port, connect_timeout=0.8) as tunnel:
        started = time.monotonic()
        with tls_connect(tunnel, ca_file) as sock:
            assert recv_all(sock) == b""  # closed cleanly: nothing came back, nothing is cut
        waited = time.monotonic() - started
        assert 0.7 < waited < 4, waited


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "5", True])
def test_a_bad_connect_timeout_is_a_configuration_error(bad: object) -> None:
    with pytest.raises(burrow.ConfigurationError, match="connect_timeout .* is not a number of seconds"):
        burrow.forward(8000, connect_timeout=bad)  # type: ignore[arg-type]


def test_burrow_forward_warns_when_nothing_listens_yet() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "burrow", "forward", str(port), "--connect-timeout", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 20
        line = ""
        while "nothing accepts" not in line and time.monotonic() < deadline:
            line = process.stderr.readline()
        assert line.strip() == (
            f"burrow: nothing accepts on local port {port} yet; public connections wait up to 2 s for it "
            "(--connect-timeout)"
        )
    finally:
        process.terminate()
        process.wait(10)
