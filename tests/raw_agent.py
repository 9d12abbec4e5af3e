"""An agent spoken by hand, frame by frame: for tests of what a relay does with what agents send."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from burrow.protocol.frames import HEADER, FrameType, encode_json
from burrow.relay.tls import AGENT_ALPN


def agent_socket(port: int, ca: Path, source: str = "127.0.0.1", receive_buffer: int = 0) -> ssl.SSLSocket:
    """A TLS connection to a relay's agent endpoint (ALPN burrow/1) from ``source``, nothing said yet.

    ``receive_buffer`` sets SO_RCVBUF before the connection exists: shrunk after it, the kernel
    drops what it had already let the relay send, and both ends fall into retransmit backoff.
    """
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols([AGENT_ALPN])
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return context.wrap_socket(sock, server_hostname="localhost")


def hello(agent: str = "test", token: str = "") -> bytes:
    """A HELLO frame."""
    return encode_json(FrameType.HELLO, {"versions": [1], "token": token, "window": 1 << 20, "agent": agent})


def read_frames(sock: ssl.SSLSocket, want: FrameType, timeout: float) -> list[tuple[int, int, bytes]]:
    """Read frames until one of type ``want`` has come (or the time is up)."""
    sock.settimeout(timeout)
    data = b""
    frames: list[tuple[int, int, bytes]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(kind == want for kind, _, _ in frames):
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
        while len(data) >= HEADER.size:
            kind, _, stream_id, length = HEADER.unpack_from(data)
            if len(data) < HEADER.size + length:
                break
            frames.append((kind, stream_id, data[HEADER.size : HEADER.size + length]))
            data = data[HEADER.size + length :]
    return frames
