"""Hostile and broken peers: slowloris, garbage, floods, a dead local service. The relay keeps serving."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest

import burrow
from burrow.protocol.frames import HEADER, MAX_FRAME_PAYLOAD, ErrorCode, FrameType, encode_json
from burrow.relay import Relay, RelayConfig
from burrow.relay.tls import AGENT_ALPN

from ..helpers import EchoServer, free_port, on_runtime, recv_all, tls_connect
from .conftest import RelayProcess, echo_ok, wait_for


def _connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError, OSError):
        return True


def test_slowloris_handshakes_are_cut_at_the_deadline(echo: EchoServer, ca_file: Path) -> None:
    relay = RelayProcess(free_port(), "--handshake-timeout", "2", "--max-pending-per-source", "2000")
    relay.start()
    try:
        with burrow.forward(echo.port, relay=f"localhost:{relay.port}") as tunnel:
            stalled = []
            for _ in range(1000):  # one byte of a ClientHello each, then nothing, from 127.0.0.2
                sock = _connect_from("127.0.0.2", relay.port)
                sock.sendall(b"\x16")
                stalled.append(sock)
            opened = time.monotonic()
            for _ in range(20):  # real clients are served meanwhile, promptly
                started = time.monotonic()
                assert echo_ok(tunnel, ca_file, size=1024)
                assert time.monotonic() - started < 1.0
            for sock in stalled:
                sock.settimeout(max(0.1, opened + 4 - time.monotonic()))
                assert _closed_by_peer(sock)
                sock.close()
            assert time.monotonic() - opened < 4.5
    finally:
        relay.stop()
    refused = [line for line in relay.log if "refused TLS handshake from 127.0.0.2" in line]
    assert refused and any("no TLS handshake in time" in line for line in refused)


def test_pending_handshakes_per_source_are_capped(echo: EchoServer, ca_file: Path) -> None:
    relay = RelayProcess(free_port(), "--max-pending-per-source", "10")
    relay.start()
    try:
        held = [_connect_from("127.0.0.2", relay.port) for _ in range(10)]
        time.sleep(0.3)
        try:
            extra = _connect_from("127.0.0.2", relay.port)
        except ConnectionResetError:
            pass  # the relay's RST came before connect() looked: refused at once too
        else:
            extra.settimeout(2)
            assert _closed_by_peer(extra)  # refused at once, not at the deadline
            extra.close()
        with burrow.forward(echo.port, relay=f"localhost:{relay.port}") as tunnel:
            assert echo_ok(tunnel, ca_file)  # other sources are unaffected
        for sock in held:
            sock.close()
    finally:
        relay.stop()
    assert any("handshakes already pending from it" in line for line in relay.log)


def _agent_socket(port: int, ca: Path) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols([AGENT_ALPN])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(sock, server_hostname="localhost")


def _hello() -> bytes:
    return encode_json(FrameType.HELLO, {"versions": [1], "token": "", "window": 1 << 20, "agent": "test"})


def _goaway_code(data: bytes) -> int | None:
    offset = 0
    while offset + HEADER.size <= len(data):
        kind, _, _, length = HEADER.unpack_from(data, offset)
        if kind == FrameType.GOAWAY:
            return int(struct.unpack_from("!H", data, offset + HEADER.size)[0])
        offset += HEADER.size + length
    return None


@pytest.mark.parametrize(
    "garbage, code",
    [
        (os.urandom(4096), ErrorCode.PROTOCOL_ERROR),  # random bytes instead of HELLO
        (_hello() + HEADER.pack(FrameType.DATA, 0, 1, MAX_FRAME_PAYLOAD + 1), ErrorCode.FRAME_TOO_LARGE),
        (_hello() + HEADER.pack(99, 0, 0, 0), ErrorCode.PROTOCOL_ERROR),  # unknown frame type
        (_hello() + HEADER.pack(FrameType.DATA, 0, 7, 3) + b"abc", ErrorCode.PROTOCOL_ERROR),  # unopened stream
        (HEADER.pack(FrameType.HELLO, 0, 0, 5) + b"[[[[[", ErrorCode.PROTOCOL_ERROR),  # broken JSON
    ],
)
def test_garbage_on_the_agent_endpoint_gets_goaway_and_close(
    garbage: bytes, code: int, fast_relay: Relay, echo: EchoServer, ca_file: Path
) -> None:
    with _agent_socket(fast_relay.port, ca_file) as sock:
        sock.sendall(garbage)
        reply = recv_all(sock)
    got = _goaway_code(reply)
    assert got == code, reply[:64]
    with burrow.forward(echo.port, relay=f"localhost:{fast_relay.port}") as tunnel:
        assert echo_ok(tunnel, ca_file)  # and the relay keeps serving


def test_garbage_and_truncation_on_the_tls_port(fast_relay: Relay, echo: EchoServer, ca_file: Path) -> None:
    for payload in (os.urandom(2048), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01"):
        with socket.create_connection(("127.0.0.1", fast_relay.port), timeout=12) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # truncated: nothing more will come
            assert _closed_by_peer(sock)
    with _agent_socket(fast_relay.port, ca_file) as sock:  # a truncated frame, then EOF
        sock.sendall(_hello()[:7])
        sock.shutdown(socket.SHUT_RDWR)
    with burrow.forward(echo.port, relay=f"localhost:{fast_relay.port}") as tunnel:
        assert echo_ok(tunnel, ca_file)


def test_dead_local_service_fails_only_its_connections(ca_file: Path) -> None:
    port = free_port()
    with burrow.forward(port, unencrypted=True, connect_timeout=0) as tunnel:  # (0: no waiting for it)
        for _ in range(50):
            with tls_connect(tunnel, ca_file) as sock:
                assert recv_all(sock) == b""  # closed cleanly, one by one
        with socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=5) as sock:
            assert _closed_by_peer(sock)
        busy = time.process_time()
        time.sleep(1.0)
        assert time.process_time() - busy < 0.2  # nothing spins
        listener = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=lambda: listener.accept()[0].sendall(b"up"), daemon=True).start()
        with tls_connect(tunnel, ca_file) as sock:
            assert sock.recv(2) == b"up"  # the session and tunnel stayed up
        listener.close()


def test_stream_and_tunnel_caps(echo: EchoServer, service_loop: object, ca_file: Path) -> None:
    config = RelayConfig(port=0, max_streams_per_tunnel=3, max_tunnels_per_token=2)
    relay = on_runtime(Relay(config).start())
    try:
        address = f"localhost:{relay.port}"
        with burrow.forward(echo.port, relay=address) as tunnel:
            held = [tls_connect(tunnel, ca_file) for _ in range(3)]
            for sock in held:
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
            with pytest.raises((ssl.SSLError, ConnectionError)):
                extra = tls_connect(tunnel, ca_file)
                extra.sendall(b"x")
                if extra.recv(1) == b"":
                    raise ConnectionResetError("refused")
            for sock in held:
                sock.close()
            wait_for(lambda: echo_ok(tunnel, ca_file), what="capacity back")
            echo2 = socket.create_server(("127.0.0.1", 0))
            echo3 = socket.create_server(("127.0.0.1", 0))
            with burrow.forward(echo2.getsockname()[1], relay=address):
                with pytest.raises(burrow.TunnelRefused, match="tunnels at this relay"):
                    with burrow.forward(echo3.getsockname()[1], relay=address):
                        pass
            echo2.close()
            echo3.close()
    finally:

        async def close() -> None:
            relay.close()

        on_runtime(close())
