"""Fixtures for the fault suite: a relay with fast heartbeats and a fault proxy in front of it."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import burrow
from burrow.relay import Relay, RelayConfig

from ..helpers import ServiceThread, free_port, on_runtime, recv_all, sha256, tls_connect
from .proxy import FaultProxy

#: Heartbeat timeout used by the fault tests on both sides: dead links are found fast, yet
#: not falsely while agent, relay, proxy and clients share one busy process (the GIL).
FAST_HEARTBEAT = 3.0


@pytest.fixture(autouse=True, scope="session")
def _more_file_descriptors() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@pytest.fixture
def fast_heartbeat(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setenv("BURROW_HEARTBEAT_TIMEOUT", str(FAST_HEARTBEAT))
    return FAST_HEARTBEAT


@pytest.fixture
def relay_heartbeat(fast_heartbeat: float) -> float:
    """The relay's heartbeat timeout (a test may give the relay more patience than its agent)."""
    return fast_heartbeat


@pytest.fixture
def fast_relay(relay_heartbeat: float) -> Iterator[Relay]:
    """An in-process relay (on burrow's loop) with fast heartbeats."""
    relay = on_runtime(Relay(RelayConfig(port=0, heartbeat_timeout=relay_heartbeat)).start())
    yield relay

    async def close() -> None:
        relay.close()

    on_runtime(close())


@pytest.fixture
def proxy(service_loop: ServiceThread, fast_relay: Relay) -> Iterator[FaultProxy]:
    """A fault proxy in front of ``fast_relay``: agents dial ``localhost:<proxy.port>``."""
    fault_proxy = FaultProxy(service_loop, fast_relay.port)
    yield fault_proxy
    fault_proxy.close()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    """Poll until ``condition()``; return how long it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - started


def echo_ok(tunnel: burrow.Tunnel, ca: Path, size: int = 64 * 1024) -> bool:
    """One TLS and (if any) one raw TCP round trip through the tunnel, bytes checked."""
    payload = os.urandom(size)
    with tls_connect(tunnel, ca) as sock:
        sock.sendall(payload)
        got = bytearray()
        while len(got) < size:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            got += chunk
        if bytes(got) != payload:
            return False
    if tunnel.unencrypted_port is not None:
        with socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=10) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            if recv_all(sock) != payload:
                return False
    return True


class Transfer:
    """A bulk transfer in a thread; records whether it ended whole or with an error.

    ``echo=True``: send ``total`` bytes and read them back (a second thread
    writes). ``echo=False``: only read what a ``source_server(total)`` sends,
    ``total`` bytes of ``b"s"``; use it for TLS sockets, which must not be read
    and written from two threads at once (OpenSSL objects are not thread-safe).
    """

    def __init__(self, sock: socket.socket, total: int, echo: bool = True) -> None:
        self.sock = sock
        self.total = total
        self.echo = echo
        self.sent = os.urandom(1 << 20) if echo else b"s" * (1 << 20)
        self.received = bytearray()
        self.error: BaseException | None = None
        self.write_error: BaseException | None = None
        self.clean_eof = False
        self.writer = threading.Thread(target=self._write, daemon=True) if echo else None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.writer is not None:
            self.writer.start()
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    self.clean_eof = True
                    return
                self.received += chunk
        except (OSError, ValueError) as exc:
            self.error = exc

    def _write(self) -> None:
        try:
            left = self.total
            while left > 0:
                size = min(left, len(self.sent))
                self.sock.sendall(self.sent[:size])
                left -= size
            self.sock.shutdown(socket.SHUT_WR)
        except (OSError, ValueError) as exc:
            # Linux reports a RST to the first call that looks: maybe this one, not recv()
            self.write_error = exc

    def expected(self, size: int | None = None) -> bytes:
        """The first ``size`` bytes sent (all of them by default).

        Only as many as asked: the blackhole test sends "2000 MB", and building
        that much in one bytes object holds the GIL for seconds, which starved
        the agent's and relay's loop past their heartbeat timeout.
        """
        size = self.total if size is None else size
        whole, rest = divmod(size, len(self.sent))
        return self.sent * whole + self.sent[:rest]

    def join(self, timeout: float = 30) -> None:
        # the writer too: when a RST arrives, the writer's send may be the call that
        # reports it (the reader then sees a plain EOF), and its error must be recorded
        # before whole_or_reset() looks, or a reset would pass for a silent cut
        deadline = time.monotonic() + timeout
        for thread in (self.thread, self.writer):
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
                assert not thread.is_alive(), "transfer hung"

    def whole_or_reset(self) -> str:
        """'whole' if every byte came back intact, 'reset' if it ended in an error; never a silent cut."""
        if self.error is not None or isinstance(self.write_error, (ConnectionResetError, BrokenPipeError)):
            assert self.received == self.expected(len(self.received)), "bytes corrupted before the reset"
            return "reset"
        assert self.clean_eof
        assert len(self.received) == self.total, f"silently truncated at {len(self.received)} of {self.total}"
        assert sha256(bytes(self.received)) == sha256(self.expected())
        return "whole"


class RelayProcess:
    """``burrow relay`` as a child process on a fixed port, to kill and restart."""

    def __init__(self, port: int, *args: str, fd_limit: tuple[int, int] | None = None) -> None:
        self.port = port
        self.args = args
        self.fd_limit = fd_limit  # (soft, hard) RLIMIT_NOFILE for the process
        self.process: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    def start(self) -> float:
        """Start and wait until it listens; returns the time it became ready."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "burrow", "relay", "--listen", f"127.0.0.1:{self.port}", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=self._limit if self.fd_limit else None,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.log.append(line)
            if "burrow relay ready" in line:
                threading.Thread(target=self._drain, args=(self.process,), daemon=True).start()
                return time.monotonic()
        raise AssertionError(f"relay did not start: {self.log}")

    def _limit(self) -> None:
        assert self.fd_limit is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, self.fd_limit)

    def _drain(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.log.append(line)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def relay_process(fast_heartbeat: float) -> Iterator[RelayProcess]:
    relay = RelayProcess(free_port(), "--heartbeat-timeout", str(fast_heartbeat))
    relay.start()
    yield relay
    relay.stop()
