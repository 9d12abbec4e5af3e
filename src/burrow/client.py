"""Reaching a tunnel as a public client would: which CA to trust, a verified TLS connection, a request.

Used by ``burrow forward`` (the ``curl --cacert`` hint) and ``burrow demo``
(its own request through the tunnel), and by tests.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path

from .agent.config import AgentSettings
from .paths import dev_ca_path
from .relay.config import is_loopback
from .tunnel import Tunnel


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
