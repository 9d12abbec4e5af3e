"""Raw TCP tunnels, volume, concurrency and flow control, end to end."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

import burrow
from burrow.agent.native_session import NativeRelayConnection
from burrow.agent.runtime import runtime
from burrow.client import client_context
from burrow.connection import MIN_READ
from burrow.protocol.frames import MAX_FRAME_PAYLOAD
from burrow.protocol.session import DEFAULT_WINDOW

from ..helpers import EchoServer, ServiceThread, embedded_url, on_runtime, recv_all, tls_connect

MB = 1024 * 1024


def _pump(sock: socket.socket, total: int, seed: bytes) -> tuple[str, str]:
    """Send ``total`` pseudo-random bytes while reading the echo; return both SHA-256."""
    sent_hash = hashlib.sha256()
    received_hash = hashlib.sha256()
    received = 0

    def reader() -> None:
        nonlocal received
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            received_hash.update(chunk)
            received += len(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    block = hashlib.sha256(seed).digest() * 8192  # 256 KiB, varied by the seed
    rng = bytearray(block)
    left = total
    counter = 0
    while left:
        counter += 1
        rng[:8] = counter.to_bytes(8, "big")  # no two blocks alike
        chunk = bytes(rng[: min(len(rng), left)])
        sock.sendall(chunk)
        sent_hash.update(chunk)
        left -= len(chunk)
    sock.shutdown(socket.SHUT_WR)
    thread.join(120)
    assert received == total
    return sent_hash.hexdigest(), received_hash.hexdigest()


def test_raw_tcp_200mb_each_way_through_echo(echo: EchoServer) -> None:
    with burrow.forward(echo.port, unencrypted=True) as tunnel:
        host, port = tunnel.tcp_socket
        assert host == "localhost" and 20000 <= port <= 32767
        assert tunnel.url == embedded_url(tunnel)  # an unencrypted tunnel keeps its TLS address
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sent, received = _pump(sock, 200 * MB, os.urandom(16))
        assert sent == received


def test_raw_tcp_half_close_still_gets_the_whole_reply(echo: EchoServer) -> None:
    payload = os.urandom(3 * MB)
    with burrow.forward(echo.port, unencrypted=True) as tunnel:
        with socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=30) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # the client is done talking...
            assert recv_all(sock) == payload  # ...and still hears everything


def test_raw_tcp_bytes_pass_untouched_both_ways(service_loop: ServiceThread) -> None:
    """A server that speaks first (like ssh or a database) and binary in both directions."""
    greeting = bytes(range(256)) * 4

    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(greeting)
            data = recv_all(conn)
            conn.sendall(hashlib.sha256(data).digest())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with burrow.forward(listener.getsockname()[1], unencrypted=True) as tunnel:
        with socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=30) as sock:
            got = b""
            while len(got) < len(greeting):
                got += sock.recv(65536)
            assert got == greeting
            body = os.urandom(MB) + b"\x00\r\n\xff"
            sock.sendall(body)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == hashlib.sha256(body).digest()
    thread.join(5)
    listener.close()


def test_200_concurrent_connections_over_20_tunnels(service_loop: ServiceThread, ca_file: Path) -> None:
    servers = [service_loop.echo_server() for _ in range(20)]
    forwards = [burrow.forward(s.port, unencrypted=(i % 2 == 1)) for i, s in enumerate(servers)]
    tunnels = [f.open() for f in forwards]
    context = client_context(ca_file)

    async def one(index: int) -> None:
        tunnel = tunnels[index % 20]
        if index % 2:  # half over raw TCP, half over TLS
            reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.unencrypted_port)
        else:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", tunnel.port, ssl=context, server_hostname=tunnel.host
            )
        payload = os.urandom(64 * 1024 + index)
        writer.write(payload)
        await writer.drain()
        echoed = await reader.readexactly(len(payload))
        assert echoed == payload
        writer.close()

    async def main() -> None:
        async with asyncio.timeout(60):
            await asyncio.gather(*(one(i) for i in range(200)))

    try:
        asyncio.run(main())
        assert sum(f.stats.total_connections for f in forwards) == 200
    finally:
        for f in forwards:
            f.close()
        for s in servers:
            service_loop.close_server(s)


def test_stalled_reader_does_not_stall_others_nor_grow_memory(
    service_loop: ServiceThread, echo: EchoServer, ca_file: Path
) -> None:
    source = service_loop.source_server(64 * MB)  # would push 64 MB at a reader who never reads
    with burrow.forward(source.port) as stalled_tunnel, burrow.forward(echo.port, unencrypted=True) as busy:
        stalled = tls_connect(stalled_tunnel, ca_file)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        stalled.recv(1)  # the stream is flowing; from now on nobody reads it
        with socket.create_connection(("127.0.0.1", busy.unencrypted_port), timeout=60) as sock:
            sent, received = _pump(sock, 100 * MB, b"busy")
        assert sent == received

        async def buffered() -> tuple[int, int, int]:
            relay = runtime().embedded
            assert relay is not None
            assert relay.plane is not None
            held = relay.plane.buffered(stalled_tunnel.id)
            (session,) = [s for s in runtime().sessions if stalled_tunnel.id in s.tunnels]
            agent_tunnel = session.tunnels[stalled_tunnel.id]
            if isinstance(session, NativeRelayConnection):  # (its streams hold nothing: all waits in the link)
                return held, session.unsent(), agent_tunnel.stats.bytes_out
            (local,) = [e for e in session.endpoints.values() if e.stats is agent_tunnel.stats]
            return (
                held,
                session.proto.buffered(local.stream_id),
                agent_tunnel.stats.bytes_out,
            )

        time.sleep(0.5)
        relay_buffer, agent_buffer, forwarded = on_runtime(buffered())
        # the relay holds at most one window, plus what its TLS and TCP transports take
        # before they say pause (a high-water mark each, overshot by at most one frame);
        # the agent at most its least read beyond its credit; and the source is held back
        bound = DEFAULT_WINDOW + 2 * (MAX_FRAME_PAYLOAD + 64 * 1024)
        assert 0 < relay_buffer <= bound, relay_buffer
        assert agent_buffer <= MIN_READ, agent_buffer
        assert forwarded < 8 * MB, forwarded
        stalled.close()
    service_loop.close_server(source)


@pytest.mark.parametrize("unencrypted", [False, True])
def test_service_closing_first_is_seen_as_eof(service_loop: ServiceThread, ca_file: Path, unencrypted: bool) -> None:
    source = service_loop.source_server(5 * MB + 7)
    with burrow.forward(source.port, unencrypted=unencrypted) as tunnel:
        if unencrypted:
            sock: socket.socket = socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=30)
        else:
            sock = tls_connect(tunnel, ca_file)
        with sock:
            assert len(recv_all(sock)) == 5 * MB + 7
    service_loop.close_server(source)


def test_the_raw_address_answers_on_every_address_its_name_resolves_to(echo: EchoServer) -> None:
    # the embedded relay names it "localhost": a client that tries ::1 first must not be refused
    with burrow.forward(echo.port, unencrypted=True) as tunnel:
        host, port = tunnel.tcp_socket
        assert host == "localhost"
        for address in ("127.0.0.1", "::1"):
            with socket.create_connection((address, port), timeout=10) as sock:
                sock.sendall(f"via {address}".encode())
                assert sock.recv(100) == f"via {address}".encode()
