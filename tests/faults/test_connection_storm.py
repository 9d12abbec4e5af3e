"""Thousands of short connections, ending every way a client can end one, through relay and agent processes.

Clients close at once, half-close and read the reply, read the echo and
close, reset (SO_LINGER 0) before or after sending, or close with the echo
unread, over the raw TCP address and the TLS URL, from several threads at
once. uvloop has been seen to abort ("double free or corruption") in a
process whose protocol half-closed inside ``eof_received`` under such a
stream (bench/README.md), and burrow's endpoints half-close as well. So the
relay and the agent run as their own processes, as users run them, and must
come out alive, with no traceback in their logs, every echo that was read
whole, and the tunnel still serving.
"""

from __future__ import annotations

import os
import random
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers import free_port
from .conftest import RelayProcess

SECONDS = 6.0
THREADS = 6
ENDINGS = ("close-now", "half-close", "echo-close", "reset", "reset-after-send", "close-unread")
LINGER_RESET = struct.pack("ii", 1, 0)


@pytest.fixture
def plain_echo() -> Iterator[int]:
    """A blocking, threaded echo service with no event loop in it: it cannot be what breaks."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # clients reset on purpose

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture
def relay() -> Iterator[RelayProcess]:
    """A relay process with the default heartbeat: two busy cores must not look like a dead link."""
    process = RelayProcess(free_port())
    process.start()
    yield process
    process.stop()


def _start_agent(port: int, relay: RelayProcess) -> tuple[subprocess.Popen[str], str, int, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "BURROW_HEARTBEAT_TIMEOUT"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "burrow", "forward", str(port), "--unencrypted", "--relay", f"localhost:{relay.port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(agent.stdout or ()), daemon=True).start()
    deadline = time.monotonic() + 30
    while True:
        text = "".join(log)
        url, tcp = re.search(r"^https://([^:/\s]+):\d+$", text, re.M), re.search(r"^tcp://\S+:(\d+)$", text, re.M)
        if url and tcp:
            return agent, url[1], int(tcp[1]), log
        if agent.poll() is not None or time.monotonic() > deadline:
            agent.kill()
            raise AssertionError(f"the agent did not open its tunnel: {log}")
        time.sleep(0.01)


def test_short_connections_ending_every_way_leave_relay_and_agent_serving(
    relay: RelayProcess, plain_echo: int, ca_file: Path
) -> None:
    relay_process = relay
    agent, host, tcp_port, agent_log = _start_agent(plain_echo, relay_process)
    context = ssl.create_default_context(cafile=str(ca_file))
    counts = [Counter[str]() for _ in range(THREADS)]  # one per thread: no lost updates
    broken: list[str] = []
    stop = time.monotonic() + SECONDS

    def connect(tls: bool) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", relay_process.port if tls else tcp_port), timeout=10)
        return context.wrap_socket(sock, server_hostname=host) if tls else sock

    def read(sock: socket.socket, size: int) -> bytes:
        got = bytearray()
        while len(got) < size and (chunk := sock.recv(65536)):
            got += chunk
        return bytes(got)

    def client(seed: int) -> None:
        rnd = random.Random(seed)
        done = counts[seed]
        while time.monotonic() < stop:
            tls, ending = rnd.random() < 0.3, rnd.choice(ENDINGS)
            data = rnd.randbytes(rnd.choice((1, 100, 70_000)))
            try:
                with connect(tls) as sock:
                    if ending.startswith("reset") and ending != "reset":
                        sock.sendall(data)
                    if ending.startswith("reset"):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                    elif ending == "close-now":
                        sock.sendall(data)
                    elif ending == "close-unread":
                        sock.sendall(data)
                        time.sleep(0.001)
                    elif ending == "half-close" and not tls:  # (TLS in Python cannot half-close)
                        sock.sendall(data)
                        sock.shutdown(socket.SHUT_WR)
                        reply = read(sock, len(data) + 1)
                        if reply != data:
                            broken.append(f"half-close: {len(reply)} of {len(data)} bytes")
                    else:
                        sock.sendall(data)
                        reply = read(sock, len(data))
                        if reply != data:
                            broken.append(f"echo over {'TLS' if tls else 'TCP'}: {len(reply)} of {len(data)} bytes")
                done[ending] += 1
            except OSError as exc:
                broken.append(f"{ending} over {'TLS' if tls else 'TCP'}: {exc!r}")

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(THREADS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SECONDS + 30)
        assert broken == []
        done = sum(counts, Counter[str]())
        assert min(done[e] for e in ENDINGS) >= 20, done  # every ending really happened, many times
        assert relay_process.process is not None and relay_process.process.poll() is None, relay_process.log[-20:]
        assert agent.poll() is None, agent_log[-20:]
        for tls in (False, True):
            with connect(tls) as sock:
                sock.sendall(b"still serving")
                assert read(sock, 13) == b"still serving"
        for log in (relay_process.log, agent_log):
            assert not [line for line in log if "Traceback" in line or "corruption" in line], log[-20:]
    finally:
        agent.kill()
        agent.wait(10)
