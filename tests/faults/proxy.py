"""A TCP fault proxy for the tests: sits between agent and relay and misbehaves on demand.

Modes apply to the connections open when they are set; new connections pass
normally unless ``refuse_new`` is set (a dead NAT mapping kills existing
flows, while a fresh connection gets through).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import deque
from dataclasses import dataclass

from ..helpers import ServiceThread


@dataclass(eq=False)
class _Pipe:
    client: asyncio.Transport
    upstream: asyncio.Transport | None = None
    blackholed: bool = False
    delay: float = 0.0
    cut_after: int | None = None
    rate: float = 0.0  # bytes per second each way; 0: unlimited
    forwarded: int = 0


class _Side(asyncio.Protocol):
    def __init__(self, proxy: FaultProxy, pipe: _Pipe | None, upstream: bool) -> None:
        self.proxy = proxy
        self.pipe = pipe
        self.upstream = upstream
        # delayed chunks of this direction, in order: one timer for the head. (A
        # call_later per chunk reorders bytes: two chunks whose release times
        # are a few µs apart can swap when the loop reads its clock late for
        # the first; a reordered TLS stream fails its MAC.)
        self.queue: deque[tuple[float, bytes]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.next_free = 0.0  # when this direction of a throttled link is free again

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.pipe is None:  # a client arrived: dial the relay
            self.pipe = _Pipe(transport)  # type: ignore[arg-type]
            self.proxy.pipes.add(self.pipe)
            if self.proxy.refuse_new:
                transport.close()
                return
            transport.pause_reading()  # type: ignore[attr-defined]
            asyncio.get_running_loop().create_task(self._dial())
        else:
            self.pipe.upstream = transport  # type: ignore[assignment]

    async def _dial(self) -> None:
        assert self.pipe is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: _Side(self.proxy, self.pipe, True), "127.0.0.1", self.proxy.target)
        except OSError:
            self.pipe.client.close()
            return
        self.pipe.client.resume_reading()

    def data_received(self, data: bytes) -> None:
        pipe = self.pipe
        assert pipe is not None
        if pipe.blackholed:
            return  # swallowed: no FIN, no RST, nothing
        other = pipe.client if self.upstream else pipe.upstream
        if other is None:
            return
        pipe.forwarded += len(data)
        if pipe.cut_after is not None and pipe.forwarded >= pipe.cut_after:
            self.proxy.reset_pipe(pipe)
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        release = now + pipe.delay
        if pipe.rate:
            self.next_free = max(self.next_free, now) + len(data) / pipe.rate
            release = self.next_free + pipe.delay
        if release <= now and not self.queue:
            other.write(data)
            return
        self.queue.append((release, data))
        if self.timer is None:
            self.timer = loop.call_at(release, self._release, other)

    def _release(self, other: asyncio.Transport) -> None:
        self.timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self.queue and self.queue[0][0] <= now:
            _write(other, self.queue.popleft()[1])
        if self.queue:
            self.timer = loop.call_at(self.queue[0][0], self._release, other)

    def connection_lost(self, exc: Exception | None) -> None:
        pipe = self.pipe
        if pipe is None:
            return
        if not pipe.blackholed:
            for transport in (pipe.client, pipe.upstream):
                if transport is not None:
                    transport.close()
        self.proxy.pipes.discard(pipe)


def _write(transport: asyncio.Transport, data: bytes) -> None:
    if not transport.is_closing():
        transport.write(data)


class FaultProxy:
    """Listens on a loopback port and forwards to ``target``, with faults on demand."""

    def __init__(self, services: ServiceThread, target: int) -> None:
        self.services = services
        self.target = target
        self.pipes: set[_Pipe] = set()
        self.refuse_new = False

        async def start() -> asyncio.Server:
            return await asyncio.get_running_loop().create_server(lambda: _Side(self, None, False), "127.0.0.1", 0)

        self.server = services.run(start())
        self.port: int = self.server.sockets[0].getsockname()[1]

    def _each(self, action: str, value: object = None) -> None:
        async def apply() -> None:
            for pipe in list(self.pipes):
                if action == "reset":
                    self.reset_pipe(pipe)
                else:
                    setattr(pipe, action, value)

        self.services.run(apply())

    def reset(self) -> None:
        """Abort every open connection with a RST, both ways."""
        self._each("reset")

    def blackhole(self) -> None:
        """Open connections go silent: bytes vanish, no FIN, no RST."""
        self._each("blackholed", True)

    def latency(self, seconds: float) -> None:
        """Delay every chunk of the open connections."""
        self._each("delay", seconds)

    def throttle(self, bytes_per_second: float) -> None:
        """Let the open connections carry at most this many bytes per second each way."""
        self._each("rate", bytes_per_second)

    def cut_after(self, more_bytes: int) -> None:
        """Reset each open connection once it has forwarded ``more_bytes`` more."""

        async def apply() -> None:
            for pipe in self.pipes:
                pipe.cut_after = pipe.forwarded + more_bytes

        self.services.run(apply())

    def reset_pipe(self, pipe: _Pipe) -> None:
        for transport in (pipe.client, pipe.upstream):
            if transport is None:
                continue
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            transport.abort()
        self.pipes.discard(pipe)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for pipe in list(self.pipes):
                self.reset_pipe(pipe)

        self.services.run(stop())
