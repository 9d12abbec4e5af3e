"""The local services the tunnels lead to, run as their own processes.

``python -m bench.services echo|source [--tls CERT KEY] [--count N --ports-file F]``

- ``echo`` sends back every byte (1-byte ping-pong, new connections, scale).
- ``source`` sends an endless stream to every client (bulk throughput over TLS,
  where iperf3 cannot go): the client counts what arrives.

Prints ``ready tcp=PORT [tls=PORT]`` once listening (with ``--count N``: N
plain listeners on ephemeral ports, written one per line to ``--ports-file``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import ssl
import sys
from pathlib import Path

CHUNK = b"\xa5" * (256 * 1024)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        # close rather than half-close: uvloop 0.23 aborts ("double free or corruption")
        # under load when write_eof() is called here and True returned
        return False

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


class Source(asyncio.Protocol):
    """Writes CHUNK after CHUNK while the transport takes them; ignores what it reads.

    At most BURST chunks per turn of the loop: a TLS transport whose peer is gone
    silently drops writes without ever pausing us, and must not starve the loop.
    """

    BURST = 16

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.paused = False
        self.lost = False
        self.scheduled = False
        self.transport.set_write_buffer_limits(high=1 << 20)
        self._schedule()

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self.scheduled = False
        for _ in range(self.BURST):
            if self.paused or self.lost or self.transport.is_closing():
                return
            self.transport.write(CHUNK)
        self._schedule()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._schedule()

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    factory = {"echo": Echo, "source": Source}[args.kind]
    servers = []
    if args.count > 1:
        ports = []
        for _ in range(args.count):
            server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
            servers.append(server)
            ports.append(server.sockets[0].getsockname()[1])
        Path(args.ports_file).write_text("".join(f"{p}\n" for p in ports))  # noqa: ASYNC240 (startup, once)
        print(f"ready count={len(ports)}", flush=True)
    else:
        server = await loop.create_server(factory, "127.0.0.1", args.port, backlog=1024, reuse_address=True)
        servers.append(server)
        line = f"ready tcp={server.sockets[0].getsockname()[1]}"
        if args.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(args.tls[0], args.tls[1])
            tls_server = await loop.create_server(
                factory, "127.0.0.1", args.tls_port, ssl=context, backlog=1024, reuse_address=True
            )
            servers.append(tls_server)
            line += f" tls={tls_server.sockets[0].getsockname()[1]}"
        print(line, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.services")
    parser.add_argument("kind", choices=["echo", "source"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="also listen with TLS")
    parser.add_argument("--tls-port", type=int, default=0)
    parser.add_argument("--count", type=int, default=1, help="N plain listeners on ephemeral ports")
    parser.add_argument("--ports-file", help="where --count writes its ports")
    args = parser.parse_args(argv)
    loop = new_loop()
    try:
        loop.run_until_complete(serve(args))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
