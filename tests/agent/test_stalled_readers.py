"""Readers that stall hold their own queued bytes, never the session's read buffers.

DATA payloads reach the TCP transports as views of the session link's read
buffer (256 KiB to 1 MiB). A transport that cannot send a view at once used
to keep it, and with it that whole buffer, for as long as its reader stalled:
40 stalled connections pinned 11.6 MiB to queue 3.1 MiB (found by review).
"""

from __future__ import annotations

import asyncio
import gc
import socket
import tracemalloc
from typing import Any

import pytest

from burrow.connection import SessionConnection, StreamEndpoint, TrafficStats
from burrow.protocol.frames import HEADER, ErrorCode, FrameType
from burrow.protocol.session import Role, SessionProtocol

from ..helpers import RUNNERS

WINDOW = 1024 * 1024
STALLED = 20
MiB = 1024 * 1024


class _Link(asyncio.Transport):
    """The session link's transport: what the agent sends back is not looked at."""

    def write(self, data: Any) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def _session() -> tuple[SessionProtocol, SessionConnection]:
    relay, agent = SessionProtocol(Role.RELAY, window=WINDOW), SessionProtocol(Role.AGENT, window=WINDOW)
    agent.hello("token")
    relay.receive_data(b"".join(agent.data_to_send()))
    relay.events_received()
    relay.welcome("session")
    agent.receive_data(b"".join(relay.data_to_send()))
    agent.events_received()
    link = SessionConnection(agent, "test")
    link.connection_made(_Link())
    return relay, link


def _feed(link: SessionConnection, data: bytes) -> None:
    """What the TLS transport does: read into the buffer the link lends, then tell it."""
    done = 0
    while done < len(data):
        room = link.get_buffer(256 * 1024)
        size = min(len(room), len(data) - done)
        room[:size] = data[done : done + size]
        del room
        link.buffer_updated(size)
        done += size


def _credit(link: SessionConnection, stream_id: int) -> int:
    """How much the agent still lets this stream send."""
    return int(link.proto._streams[stream_id].recv_credit)


def _data(stream_id: int, size: int) -> bytes:
    return HEADER.pack(FrameType.DATA, 0, stream_id, size) + b"x" * size


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_stalled_readers_do_not_pin_read_buffers(loop: str) -> None:
    async def main() -> None:
        running = asyncio.get_running_loop()
        stall = socket.create_server(("127.0.0.1", 0), backlog=STALLED + 1)  # never accepts nor reads
        stall.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sink = await running.create_server(asyncio.Protocol, "127.0.0.1", 0)  # reads and drops
        relay, link = _session()
        stats = TrafficStats()

        async def endpoint(listener: socket.socket) -> tuple[int, StreamEndpoint]:
            stream_id = relay.open_stream("tunnel", "peer")
            _feed(link, b"".join(relay.data_to_send()))
            ep = StreamEndpoint(link, stream_id, stats, inbound=False)
            await running.create_connection(lambda: ep, "127.0.0.1", listener.getsockname()[1])
            assert ep.transport is not None
            ep.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            return stream_id, ep

        tracemalloc.start()
        try:
            bulk_id, _ = await endpoint(sink.sockets[0])
            endpoints = []
            for _ in range(STALLED):
                stream_id, ep = await endpoint(stall)
                endpoints.append(ep)
                while not ep.writing_paused:  # DATA until its transport is full
                    _feed(link, _data(stream_id, min(64 * 1024, _credit(link, stream_id))))
                    await asyncio.sleep(0)
                for _ in range(4):  # traffic on another stream moves the read buffer on
                    _feed(link, _data(bulk_id, min(200 * 1024, _credit(link, bulk_id))))
                    await asyncio.sleep(0.001)
            gc.collect()
            snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*buffer.py")])
            pinned = sum(stat.size for stat in snapshot.statistics("filename"))
        finally:
            tracemalloc.stop()
        queued = sum(ep.transport.get_write_buffer_size() for ep in endpoints if ep.transport is not None)
        assert queued > STALLED * 16 * 1024  # the readers really stalled with bytes queued
        assert pinned < 1.5 * MiB, f"{pinned / MiB:.1f} MiB of read buffers held for {queued / MiB:.1f} MiB queued"
        for ep in endpoints:
            ep.abort(ErrorCode.CANCELLED, "test over")
        stall.close()
        sink.close()

    RUNNERS[loop](main())
