"""The relay reads a raw TCP client's first bytes at accept: they leave with the stream's OPEN.

A client that speaks first has usually sent by the time the relay accepts.
``StreamEndpoint.read_now`` takes those bytes at once, so OPEN and the first
DATA go to the agent in one write; a client that has already reset is passed
on as a reset, as the transport's own read would have.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

import burrow
from burrow.agent.runtime import runtime
from burrow.protocol.frames import Frame, FrameDecoder, FrameType, decode_code, decode_json
from burrow.relay import Relay, RelayConfig

from ..faults.conftest import wait_for
from ..helpers import EchoServer, on_runtime

LINGER_RESET = struct.pack("ii", 1, 0)


@pytest.fixture
def relay() -> Iterator[Relay]:
    # the asyncio engine's read_now, spied on through its protocol object (the native engine
    # queues OPEN and the first DATA together by design: every frame ready at once, one write)
    relay = on_runtime(Relay(RelayConfig(port=0, engine="asyncio")).start())
    yield relay

    async def close() -> None:
        relay.close()

    on_runtime(close())


def _record_flushes(relay: Relay) -> list[list[Frame]]:
    """The frames of each write the relay makes to its (one) agent session."""
    flushes: list[list[Frame]] = []

    async def spy() -> None:
        assert relay.plane is not None
        (session,) = relay.plane.sessions.values()
        take = session.proto.data_to_send

        def recorded() -> list[bytes | memoryview]:
            out = take()
            if out:
                frames = FrameDecoder().feed(b"".join(out))
                flushes.append([Frame(f.type, f.stream_id, bytes(f.payload)) for f in frames])
            return out

        session.proto.data_to_send = recorded  # type: ignore[method-assign]

    on_runtime(spy())
    return flushes


def _while_relay_is_held(act: Callable[[], None]) -> None:
    """Run ``act`` while burrow's loop (the relay's, in this process) is held, then let it go.

    The kernel completes a connection to a listening socket on its own, so the
    client's connect and what it sends are all there when the relay accepts.
    """

    async def hold() -> None:
        time.sleep(0.3)  # noqa: ASYNC251 (blocks the loop on purpose)

    held = runtime().submit(hold())
    act()
    held.result(timeout=10)


def _opening_flush(flushes: list[list[Frame]]) -> list[Frame]:
    return next(frames for frames in flushes if any(f.type is FrameType.OPEN for f in frames))


def test_first_bytes_leave_with_open_in_one_write(relay: Relay, echo: EchoServer) -> None:
    with burrow.forward(echo.port, unencrypted=True, relay=f"localhost:{relay.port}") as tunnel:
        flushes = _record_flushes(relay)
        client = socket.socket()
        client.settimeout(10)

        def connect_and_send() -> None:
            client.connect(("127.0.0.1", tunnel.unencrypted_port or 0))
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")

        with client:
            _while_relay_is_held(connect_and_send)
            assert client.recv(100) == b"GET / HTTP/1.0\r\n\r\n"  # (the echo)
        frames = _opening_flush(flushes)
        (opened,) = [f for f in frames if f.type is FrameType.OPEN]
        assert decode_json(opened)["tunnel"] == tunnel.id
        data = [f for f in frames if f.type is FrameType.DATA and f.stream_id == opened.stream_id]
        assert [f.payload for f in data] == [b"GET / HTTP/1.0\r\n\r\n"]


@pytest.mark.parametrize("sent", [b"", b"half a request"])
def test_a_client_that_reset_before_the_accept_resets_the_stream(relay: Relay, echo: EchoServer, sent: bytes) -> None:
    with burrow.forward(echo.port, unencrypted=True, relay=f"localhost:{relay.port}") as tunnel:
        flushes = _record_flushes(relay)
        assert relay.plane is not None
        stats = relay.plane.stats(tunnel.id)

        def connect_send_and_reset() -> None:
            with socket.create_connection(("127.0.0.1", tunnel.unencrypted_port or 0), timeout=10) as client:
                client.sendall(sent)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)

        _while_relay_is_held(connect_send_and_reset)
        wait_for(lambda: any(f.type is FrameType.RST for flush in flushes for f in flush), what="RST to the agent")
        frames = [f for flush in flushes for f in flush]
        (opened,) = [f for f in frames if f.type is FrameType.OPEN]
        stream = [f for f in frames if f.stream_id == opened.stream_id]
        # Linux hands over what arrived before the reset, then the reset: the bytes
        # go on whole and in order, then the stream is reset (never a clean end)
        assert [f.type for f in stream] == [FrameType.OPEN] + [FrameType.DATA] * bool(sent) + [FrameType.RST]
        assert b"".join(f.payload for f in stream if f.type is FrameType.DATA) == sent
        assert "connection lost" in decode_code(stream[-1])[1]
        if not sent:  # read at accept: the reset goes out with the OPEN, in one write
            assert [f.type for f in _opening_flush(flushes)] == [FrameType.OPEN, FrameType.RST]
            assert decode_code(stream[-1])[1] == "connection lost (Connection reset by peer)"
        wait_for(lambda: stats.open_connections == 0, what="the connection counted closed")
