"""``burrow run --port P -- CMD``: start, wait for the port, tunnel, pass signals on, end with CMD."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import free_port
from .test_cli import BURROW, run

#: A service that listens after DELAY seconds, answers every request "hello", and exits
#: 7 on SIGTERM and 5 on SIGINT (each said on stderr); SIGHUP keeps its default (death).
SERVICE = """
import os, signal, socket, sys, time
port, delay = int(sys.argv[1]), float(sys.argv[2])
def bye(sig, frame):
    print(f"service got {signal.Signals(sig).name}", file=sys.stderr, flush=True)
    sys.exit(7 if sig == signal.SIGTERM else 5)
signal.signal(signal.SIGTERM, bye)
signal.signal(signal.SIGINT, bye)
print(f"service pid {os.getpid()}", flush=True)
time.sleep(delay)
server = socket.create_server(("127.0.0.1", port))
while True:
    conn, _ = server.accept()
    conn.recv(65536)
    conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 6\\r\\n\\r\\nhello\\n")
    conn.close()
"""


def _service(port: int, delay: float = 0.5) -> list[str]:
    return [sys.executable, "-c", SERVICE, str(port), str(delay)]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 7), (signal.SIGINT, 5), (signal.SIGHUP, 128 + signal.SIGHUP)])
def test_run_tunnels_the_command_and_ends_with_it(sig: signal.Signals, code: int) -> None:
    port = free_port()
    burrow = subprocess.Popen(
        [*BURROW, "run", "--port", str(port), "--json", "--", *_service(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert burrow.stdout is not None
    line = burrow.stdout.readline()  # waits for the service (0.5 s) and the tunnel
    address = json.loads(line)
    assert address["url"].startswith("https://") and address["tcp_socket"] is None
    host, tls_port = address["tls_socket"]
    assert address["url"] == f"https://{host}:{tls_port}"
    ca = Path(os.environ["BURROW_HOME"]) / "ca.pem"
    result = subprocess.run(
        ["curl", "-sS", "--cacert", str(ca), "--max-time", "10", address["url"] + "/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and result.stdout == "hello\n", result.stderr
    burrow.send_signal(sig)
    out, err = burrow.communicate(timeout=30)
    assert burrow.returncode == code, err
    assert out == ""  # the one JSON line was all: the service's own stdout went to stderr
    assert "service pid" in err and "Traceback" not in err
    if sig != signal.SIGHUP:
        assert err.count(f"service got {sig.name}") == 1  # passed on once
    assert f"exited with code {code}" in err


def test_run_prints_both_addresses_of_an_unencrypted_tunnel() -> None:
    port = free_port()
    burrow = subprocess.Popen(
        [*BURROW, "run", "--port", str(port), "--json", "--unencrypted", "--", *_service(port, 0)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert burrow.stdout is not None
    address = json.loads(burrow.stdout.readline())
    tcp_host, tcp_port = address["tcp_socket"]
    assert tcp_host == "localhost"
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert sock.recv(1024).endswith(b"hello\n")
    burrow.send_signal(signal.SIGTERM)
    burrow.communicate(timeout=30)
    assert burrow.returncode == 7


def test_a_command_that_never_listens_is_stopped() -> None:
    port = free_port()
    started = time.monotonic()
    result = run("run", "--port", str(port), "--ready-timeout", "1", "--", *_service(free_port()))
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        f"burrow run: error: {Path(sys.executable).name} did not listen on port {port} within 1 s "
        "(--ready-timeout); it was stopped. Check the port it listens on"
    )
    pid = int(result.stdout.split("service pid ")[1].split()[0])
    assert _gone(pid)
    assert "service got SIGTERM" in result.stderr


@pytest.mark.parametrize(
    "argv, message, code",
    [
        ([sys.executable, "-c", "raise SystemExit(3)"], "exited with code 3 before listening on port", 3),
        ([sys.executable, "-c", "pass"], "exited with code 0 before listening on port", 1),
        (["/nonexistent/server"], "cannot start '/nonexistent/server' (No such file or directory)", 1),
        ([], "give the command to run after --", 1),
    ],
)
def test_run_failures_are_one_line(argv: list[str], message: str, code: int) -> None:
    result = run("run", "--port", str(free_port()), "--", *argv)
    assert result.returncode == code
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
