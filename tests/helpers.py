"""Local services and clients for the tests (real sockets, loopback only)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from burrow import Tunnel
from burrow.agent.runtime import runtime
from burrow.client import connect

T = TypeVar("T")

#: Both event loops burrow runs on, for tests that must hold on each.
RUNNERS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


class EchoProtocol(asyncio.Protocol):
    """Echoes everything; half-closes after the client does; respects backpressure."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


class SourceProtocol(asyncio.Protocol):
    """Sends ``total`` bytes as fast as the client takes them, then closes."""

    CHUNK = 64 * 1024

    def __init__(self, total: int) -> None:
        self.left = total
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self._pump()

    def _pump(self) -> None:
        while self.left > 0 and not self.paused:
            size = min(self.CHUNK, self.left)
            self.left -= size
            self.transport.write(b"s" * size)
        if self.left == 0:
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()


@dataclass
class EchoServer:
    server: asyncio.Server
    port: int


class ServiceThread:
    """An event loop in a thread, hosting local services for tunnels to reach."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-services", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def _serve(self, factory: Any) -> EchoServer:
        async def start() -> EchoServer:
            server = await self.loop.create_server(factory, "127.0.0.1", 0)
            return EchoServer(server, server.sockets[0].getsockname()[1])

        return self.run(start())

    def echo_server(self) -> EchoServer:
        return self._serve(EchoProtocol)

    def source_server(self, total: int) -> EchoServer:
        return self._serve(lambda: SourceProtocol(total))

    def close_server(self, server: EchoServer) -> None:
        async def close() -> None:
            server.server.close()

        self.run(close())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def on_runtime(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on burrow's own loop (to look at relay or agent state safely)."""
    return runtime().submit(coro).result(timeout=30)


def embedded_url(tunnel: Tunnel) -> str:
    """The URL the embedded relay gives a tunnel: ``https://localhost:PORT`` (a TLS port of its
    own, native engine) or ``https://<id>.localhost:PORT`` (the asyncio engine, SNI routed)."""
    from burrow.relay.config import RelayConfig

    if RelayConfig().engine == "native":
        return f"https://localhost:{tunnel.port}"
    return f"https://{tunnel.id}.localhost:{tunnel.port}"


def free_port() -> int:
    """A loopback port nothing listens on (just now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tls_connect(tunnel: Tunnel, ca: Path, timeout: float = 10.0) -> ssl.SSLSocket:
    """A TLS client connection to the tunnel's URL."""
    return connect(tunnel, ca, timeout)


def echo_once(tunnel: Tunnel, ca: Path, payload: bytes = b"hello burrow") -> bytes:
    """Send ``payload`` through the tunnel's TLS address to an echo service; what came back."""
    with tls_connect(tunnel, ca) as sock:
        return echo_through(sock, payload)


def echo_through(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` on a connection to an echo service; what came back (short if it closed)."""
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def recv_all(sock: socket.socket) -> bytes:
    """Read until EOF."""
    chunks = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def page_server(body: bytes) -> Iterator[int]:
    """An HTTP/1.1 server on loopback answering every GET with ``body`` (text/plain); yields its port."""

    class Page(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def forward_process(port: int, relay: str, token: str, *args: str) -> subprocess.Popen[str]:
    """``burrow forward PORT ARGS`` in a process of its own, its relay and token from the
    environment as an operator's agent gets them; its URL is the first line of its stdout."""
    return subprocess.Popen(
        [sys.executable, "-m", "burrow", "forward", str(port), *args],
        env={**os.environ, "BURROW_RELAY": relay, "BURROW_TOKEN": token},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
