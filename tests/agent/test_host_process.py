"""Living inside someone else's Python process: threads, asyncio, Ctrl-C and exit.

The agent runs in notebooks, web services and scripts it does not control.
Whatever engine carries the bytes, these hold: many threads and an asyncio
loop can open and close tunnels at once; Ctrl-C while a tunnel is opening
raises KeyboardInterrupt at once; and the interpreter's exit closes the
tunnels at the relay without hanging.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import burrow

from ..helpers import EchoServer, ServiceThread, echo_once, on_runtime

THREADS = 8
ROUNDS = 5


def test_threads_and_an_asyncio_loop_open_and_close_tunnels_at_once(service_loop: ServiceThread, ca_file: Path) -> None:
    services = [service_loop.echo_server() for _ in range(THREADS + 1)]  # a port is forwarded once per process
    failures: list[BaseException] = []
    served = 0
    lock = threading.Lock()

    def worker(port: int, index: int) -> None:
        nonlocal served
        try:
            for round_ in range(ROUNDS):
                payload = f"thread {index} round {round_}".encode()
                with burrow.forward(port) as tunnel:
                    assert echo_once(tunnel, ca_file, payload) == payload
                with lock:
                    served += 1
        except BaseException as exc:  # reported below, with the others
            failures.append(exc)

    async def in_asyncio(port: int) -> None:
        nonlocal served
        for round_ in range(ROUNDS):
            payload = f"asyncio round {round_}".encode()
            async with burrow.forward(port) as tunnel:
                started = time.monotonic()
                assert await asyncio.to_thread(echo_once, tunnel, ca_file, payload) == payload
                await asyncio.sleep(0)
                assert time.monotonic() - started < 10
            with lock:
                served += 1

    def loop_thread() -> None:
        try:
            asyncio.run(in_asyncio(services[-1].port))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(s.port, i)) for i, s in enumerate(services[:THREADS])]
    threads.append(threading.Thread(target=loop_thread))
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(t.is_alive() for t in threads), "a thread hangs"
        assert failures == []
        assert served == (THREADS + 1) * ROUNDS
    finally:
        for service in services:
            service_loop.close_server(service)


def test_ctrl_c_while_opening_raises_keyboard_interrupt_at_once() -> None:
    # a "relay" that accepts and never answers: the TLS handshake would wait its 10 s deadline
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    code = (
        "import burrow, sys, time\n"
        "print('opening', flush=True)\n"
        "started = time.monotonic()\n"
        "try:\n"
        f"    burrow.forward(8000, relay='localhost:{port}').open()\n"
        "except KeyboardInterrupt:\n"
        "    print(f'interrupted after {time.monotonic() - started:.2f} s', flush=True)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "opening\n"
        time.sleep(1.0)  # well inside the connect
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
        assert time.monotonic() - sent < 3.0, "the interrupt waited for the connect to time out"
        assert out.startswith("interrupted after"), (out, err)
        assert process.returncode == 0, err
    finally:
        process.kill()
        silent.close()


def test_interpreter_exit_closes_the_tunnels_at_the_relay_without_hanging(
    echo: EchoServer, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from burrow.relay import Relay, RelayConfig

    caplog.set_level(logging.INFO, logger="burrow.relay")
    relay = on_runtime(Relay(RelayConfig(port=0)).start())
    try:
        code = (
            "import burrow, sys\n"
            f"tunnel = burrow.forward({echo.port}, relay='localhost:{relay.port}').open()\n"
            "print(tunnel.id, flush=True)\n"
            "sys.exit(0)  # no close(): leaving is the owner's only word\n"
        )
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 10
        tunnel_id = done.stdout.strip()
        assert relay.control is not None
        deadline = time.monotonic() + 5
        while tunnel_id in relay.control.registry:  # gone at once, not at a heartbeat timeout
            assert time.monotonic() < deadline, "the relay still holds the tunnel of an exited process"
            time.sleep(0.05)
        # said, not just noticed: the process's exit sent GOAWAY (a killed one only drops its socket)
        assert any("agent said goodbye" in r.getMessage() for r in caplog.records)
    finally:

        async def close() -> None:
            relay.close()

        on_runtime(close())
