"""What ``burrow demo`` serves and how it checks its own tunnel."""

from __future__ import annotations

import http.client
import http.server
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from .agent.config import AgentSettings
from .paths import dev_ca_path
from .relay.config import is_loopback
from .tunnel import Tunnel

PAGE = """<!doctype html>
<title>burrow demo</title>
<h1>Hello from burrow</h1>
<p>This page comes from a small web app on 127.0.0.1:{port}, through a burrow tunnel.</p>
<p>Requests served: {count}</p>
"""


@dataclass
class SampleApp:
    """The demo's web app, in a thread."""

    server: http.server.ThreadingHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_sample_app() -> SampleApp:
    """Serve :data:`PAGE` on a free loopback port."""
    count = 0
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            nonlocal count
            with lock:
                count += 1
                body = PAGE.format(port=self.server.server_address[1], count=count).encode()  # type: ignore[index]
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the demo prints its own lines

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="burrow-demo-app", daemon=True)
    thread.start()
    return SampleApp(server, thread)


def ca_for(tunnel: Tunnel) -> Path | None:
    """The CA file a client needs for this tunnel: BURROW_CA, the dev CA for loopback, else none."""
    settings = AgentSettings.resolve()
    if settings.ca is not None:
        return settings.ca
    if is_loopback(tunnel.host):
        return dev_ca_path()
    return None


def client_context(cafile: Path | None) -> ssl.SSLContext:
    """A client TLS context trusting ``cafile`` (else the system store)."""
    return ssl.create_default_context(cafile=str(cafile) if cafile else None)


def connect(tunnel: Tunnel, cafile: Path | None, timeout: float = 10.0) -> ssl.SSLSocket:
    """A TLS connection to the tunnel's URL (``*.localhost`` is dialled on 127.0.0.1)."""
    host, port = tunnel.tls_socket
    address = "127.0.0.1" if is_loopback(host) else host
    sock = socket.create_connection((address, port), timeout=timeout)
    # an EOF without close_notify is a cut, not an end: say so instead of returning b""
    return client_context(cafile).wrap_socket(sock, server_hostname=host, suppress_ragged_eofs=False)


def fetch(tunnel: Tunnel, cafile: Path | None, path: str = "/") -> tuple[int, bytes]:
    """GET ``path`` through the tunnel over HTTPS; returns (status, body)."""
    connection = http.client.HTTPSConnection(tunnel.host, tunnel.port, timeout=10, context=client_context(cafile))
    connection.sock = connect(tunnel, cafile)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
