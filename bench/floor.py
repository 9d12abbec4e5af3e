"""What any Python tunnel could do here: ``python -m bench.floor [--runs 3]``.

The *floor* is the least a Python reverse tunnel must do per byte and per
message, built as two small processes on uvloop and the ``ssl`` module, the
stack burrow uses:

- ``near`` (the relay's part) accepts public connections (plain TCP, or TLS
  it terminates) and TLS links;
- ``far`` (the agent's part) keeps a pool of TLS links open to ``near``.

Each public connection takes a link of its own from the pool, so there is no
multiplexing, no framing, no flow-control window, no stream table, no
handshake per connection: ``near`` decrypts what ``far`` sends and writes it to
the client, and the other way round. When a public connection takes a link,
``near`` sends one byte on it, and ``far`` dials the service.
Reads go into reused buffers (``BufferedProtocol``), writes are handed over
as views, backpressure pauses the other side's reads. An EOF either way
closes both sides (no half-close: bulk and ping-pong need none). Whatever burrow adds on
top (one multiplexed session, DATA frames, credit, the registry) costs more
than this, never less; a target this pair misses is out of reach for a tunnel
written in Python on this machine.

A second floor is compiled code: a pair of ``socat`` processes with OpenSSL
(``cfloor``), TLS 1.2 AES-128-GCM between them, 256 KiB buffers, one forked
process per connection, no multiplexing either. It shows what a naive C
forwarder gets on this machine, beside ``ssh -R`` and burrow.

The command starts a floor pair per service beside ``ssh -R`` (aes128-gcm),
HAProxy → ``ssh -R`` and burrow, and measures, alternating the order of the
paths from run to run: scenario 1 (``iperf3 -R``, one stream), 2 (one TLS
stream) and 4 (1-byte ping-pong). Not 5: a new connection costs the floor a
TLS handshake for the link it takes from the pool, which a multiplexed
session like burrow's does not pay, so there it is no floor.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import socket
import ssl
import statistics
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.lab import BenchCerts
    from bench.procs import Procs

#: Room lent for one read (burrow's stream reads ask for the same).
READ_SIZE = 256 * 1024

#: What ``near`` sends on a link when a public connection takes it (the only
#: byte of protocol there is): ``far`` then dials the service.
SIGNAL = b"!"

#: TLS links ``far`` keeps open and unused.
POOL = 4

#: socat's transfer buffer: burrow's read size, and the size the C floor was first measured with.
SOCAT_BUFFER = 256 * 1024

#: The C floor's link: TLS 1.2 with AES-128-GCM (the cipher of the ssh -R it is compared with;
#: socat 1.7 cannot choose a TLS 1.3 suite).
SOCAT_TLS = "cipher=ECDHE-ECDSA-AES128-GCM-SHA256,openssl-max-proto-version=TLS1.2"


class Pipe(asyncio.BufferedProtocol):
    """One side of a forwarded connection: what it reads is written to ``peer``'s transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Pipe | None = None
        self.buffer = memoryview(bytearray(READ_SIZE))
        self.held = bytearray()  # read before there was a peer to write to

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.held += self.buffer[:nbytes]
            return
        out = peer.transport
        out.write(self.buffer[:nbytes])
        if out.get_write_buffer_size():
            # the transport holds a view of the bytes it could not write yet: read on elsewhere
            self.buffer = memoryview(bytearray(READ_SIZE))

    def pair(self, peer: Pipe) -> None:
        self.peer, peer.peer = peer, self
        for side, other in ((self, peer), (peer, self)):
            if side.held and other.transport is not None:
                other.transport.write(bytes(side.held))
                side.held.clear()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def eof_received(self) -> bool:
        self._close_peer()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_peer()

    def _close_peer(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


# ------------------------------------------------------------------ near


class Near:
    """The relay's part: a public connection takes the oldest idle link, or waits for one."""

    def __init__(self) -> None:
        self.idle: collections.deque[Pipe] = collections.deque()  # links, their TLS handshake done
        self.waiting: collections.deque[Pipe] = collections.deque()  # public connections

    def link(self) -> Pipe:
        return NearLink(self)

    def public(self) -> Pipe:
        return Public(self)

    def link_ready(self, link: Pipe) -> None:
        if self.waiting:
            self.join(self.waiting.popleft(), link)
        else:
            self.idle.append(link)

    def join(self, public: Pipe, link: Pipe) -> None:
        assert link.transport is not None
        link.transport.write(SIGNAL)  # first: what the client sent while it waited follows it
        public.pair(link)


class NearLink(Pipe):
    def __init__(self, near: Near) -> None:
        super().__init__()
        self.near = near

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # (after the TLS handshake)
        super().connection_made(transport)
        self.near.link_ready(self)


class Public(Pipe):
    def __init__(self, near: Near) -> None:
        super().__init__()
        self.near = near

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.near.idle:
            self.near.join(self, self.near.idle.popleft())
        else:
            self.near.waiting.append(self)  # what it sends meanwhile is held


async def run_near(public_port: int, public_tls_port: int, link_port: int, cert: str, key: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    near = Near()
    loop = asyncio.get_running_loop()
    await loop.create_server(near.link, "127.0.0.1", link_port, ssl=context)
    await loop.create_server(near.public, "127.0.0.1", public_port)
    await loop.create_server(near.public, "127.0.0.1", public_tls_port, ssl=context)
    print("floor near ready", flush=True)
    await asyncio.Event().wait()


# ------------------------------------------------------------------- far


class FarLink(Pipe):
    """A TLS link of ``far``'s pool: ``near``'s signal makes it dial the service and leave the pool."""

    def __init__(self, far: Far) -> None:
        super().__init__()
        self.far = far
        self.dialing = False

    def buffer_updated(self, nbytes: int) -> None:
        if self.dialing:
            super().buffer_updated(nbytes)
            return
        self.dialing = True  # the first byte is the signal; the client's bytes follow it
        self.held += self.buffer[len(SIGNAL) : nbytes]
        asyncio.get_running_loop().create_task(self.far.dial(self))


class Far:
    def __init__(self, link_port: int, service_port: int, cafile: str, server_name: str) -> None:
        self.link_port = link_port
        self.service_port = service_port
        self.server_name = server_name
        self.context = ssl.create_default_context(cafile=cafile)

    async def open_link(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(
            lambda: FarLink(self), "127.0.0.1", self.link_port, ssl=self.context, server_hostname=self.server_name
        )

    async def dial(self, link: FarLink) -> None:
        loop = asyncio.get_running_loop()
        loop.create_task(self.open_link())  # keep the pool full
        try:
            _, service = await loop.create_connection(Pipe, "127.0.0.1", self.service_port)
        except OSError:
            if link.transport is not None:
                link.transport.close()
            return
        service.pair(link)


async def run_far(link_port: int, service_port: int, cafile: str, server_name: str) -> None:
    far = Far(link_port, service_port, cafile, server_name)
    await asyncio.gather(*(far.open_link() for _ in range(POOL)))
    print("floor far ready", flush=True)
    await asyncio.Event().wait()


# ---------------------------------------------------------------- the run


def _main_near(args: argparse.Namespace) -> None:
    _run(run_near(args.public_port, args.public_tls_port, args.link_port, args.cert, args.key))


def _main_far(args: argparse.Namespace) -> None:
    _run(run_far(args.link_port, args.service_port, args.ca, args.server_name))


def _run(coro: object) -> None:
    import uvloop

    try:
        uvloop.run(coro)  # type: ignore[arg-type]
    except KeyboardInterrupt:  # Ctrl-C on a half started by hand: stop without a traceback
        return


def _measure(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from bench import clients
    from bench.lab import BENCH_SNI, Lab
    from bench.procs import Procs, free_port

    work = Path(tempfile.mkdtemp(prefix="burrow-floor-"))
    procs = Procs(work)
    lab = Lab(work, procs)
    # (metric, target, paths): scenario 1 and 4 through plain TCP, 2 through TLS
    plan = [
        (THROUGHPUT, "iperf", ["ssh-gcm", "burrow", "floor", "cfloor"]),
        (TLS_THROUGHPUT, "source", ["haproxy+ssh-gcm", "burrow-tls", "floor-tls", "cfloor-tls"]),
        (RTT, "echo", ["direct", "ssh-gcm", "burrow", "floor", "cfloor"]),
    ]
    try:
        lab.prepare((key, target) for _, target, keys in plan for key in keys if "floor" not in key)
        floor: dict[tuple[str, str], clients.Endpoint] = {}
        for _, target, _ in plan:
            public, public_tls, link = free_port(), free_port(), free_port()
            argv = ["near", str(public), str(public_tls), str(link), str(lab.certs.cert), str(lab.certs.key)]
            near = procs.start(f"floor-near-{target}", [sys.executable, "-m", "bench.floor", *argv], cwd=root)
            near.wait_for("floor near ready")
            argv = ["far", str(link), str(lab.targets[target].tcp_port), str(lab.certs.ca), BENCH_SNI]
            procs.start(f"floor-far-{target}", [sys.executable, "-m", "bench.floor", *argv], cwd=root).wait_for(
                "floor far ready"
            )
            floor["floor", target] = clients.Endpoint("127.0.0.1", public)
            floor["floor-tls", target] = clients.Endpoint("127.0.0.1", public_tls, BENCH_SNI, str(lab.certs.ca))
            public, public_tls = start_c_floor(procs, lab.certs, lab.targets[target].tcp_port, target)
            floor["cfloor", target] = clients.Endpoint("127.0.0.1", public)
            floor["cfloor-tls", target] = clients.Endpoint("127.0.0.1", public_tls, BENCH_SNI, str(lab.certs.ca))

        def measure(metric: str, endpoint: clients.Endpoint) -> float:
            if metric == THROUGHPUT:
                return clients.iperf3(endpoint, args.seconds, omit=1, ready=lab.iperf_ready).bits_per_second / 1e9
            if metric == TLS_THROUGHPUT:
                return clients.recv_throughput(endpoint, args.seconds, 1.0) / 1e9
            return statistics.median(clients.ping_pong(endpoint, args.pings)) * 1e6

        results: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        for run in range(args.runs):
            for metric, target, keys in plan:
                for key in keys if run % 2 == 0 else keys[::-1]:
                    endpoint = floor.get((key, target)) or lab.endpoint(key, target)
                    results[metric, key].append(measure(metric, endpoint))
            print(f"run {run + 1} of {args.runs} done", flush=True)
        print(_report(results, plan))
    finally:
        procs.stop_all()
    return 0


def start_c_floor(procs: Procs, certs: BenchCerts, service_port: int, name: str) -> tuple[int, int]:
    """The socat pair in front of ``service_port``; its (plain TCP, TLS) public ports."""
    from bench.procs import free_port

    link, public, public_tls = free_port(), free_port(), free_port()
    buffer = ["-b", str(SOCAT_BUFFER)]
    far_listen = f"OPENSSL-LISTEN:{link},bind=127.0.0.1,reuseaddr,fork,cert={certs.cert},key={certs.key}"
    far_listen += f",verify=0,nodelay,{SOCAT_TLS}"
    to_far = f"OPENSSL:127.0.0.1:{link},verify=0,nodelay,{SOCAT_TLS}"
    starts = [
        ("far", [far_listen, f"TCP:127.0.0.1:{service_port},nodelay"], link),
        ("near", [f"TCP-LISTEN:{public},bind=127.0.0.1,reuseaddr,fork,nodelay", to_far], public),
        (
            "near-tls",
            [
                f"OPENSSL-LISTEN:{public_tls},bind=127.0.0.1,reuseaddr,fork,nodelay,verify=0,"
                f"cert={certs.cert},key={certs.key}",
                to_far,
            ],
            public_tls,
        ),
    ]
    for role, addresses, port in starts:
        procs.start(f"cfloor-{role}-{name}", ["socat", *buffer, *addresses]).wait_listening(port)
    return public, public_tls


THROUGHPUT = "1. raw TCP, `iperf3 -R`, Gbit/s"
TLS_THROUGHPUT = "2. TLS, one stream, Gbit/s"
RTT = "4. 1-byte round trip p50, µs"


def _report(results: dict[tuple[str, str], list[float]], plan: list[tuple[str, str, list[str]]]) -> str:
    def med(metric: str, key: str) -> float:
        return statistics.median(results[metric, key])

    lines = ["| metric | path | median | min – max |", "|---|---|---:|---:|"]
    for metric, _, keys in plan:
        for key in keys:
            values = results[metric, key]
            lines.append(f"| {metric} | {key} | {med(metric, key):.3g} | {min(values):.3g} – {max(values):.3g} |")
    lines.append("")
    for metric, peer, target in ((THROUGHPUT, "ssh-gcm", 1.2), (TLS_THROUGHPUT, "haproxy+ssh-gcm", 1.0)):
        keys = next(keys for m, _, keys in plan if m == metric)
        peer_figure = med(metric, peer)
        ratios = ", ".join(f"{key} {med(metric, key) / peer_figure:.2f}×" for key in keys if key != peer)
        lines.append(f"- {metric[0]} (target ≥ {target}× {peer}): {ratios}")
    direct = med(RTT, "direct")
    ssh = med(RTT, "ssh-gcm") - direct
    added = ", ".join(f"{key} {med(RTT, key) - direct:.0f} µs" for key in ("burrow", "floor", "cfloor"))
    lines.append(f"- 4 (target: added ≤ 0.75× ssh-gcm's = {0.75 * ssh:.0f} µs): added by {added}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.floor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role")
    near = sub.add_parser("near", help="(started by the run) the relay's part")
    near.add_argument("public_port", type=int)
    near.add_argument("public_tls_port", type=int)
    near.add_argument("link_port", type=int)
    near.add_argument("cert")
    near.add_argument("key")
    far = sub.add_parser("far", help="(started by the run) the agent's part")
    far.add_argument("link_port", type=int)
    far.add_argument("service_port", type=int)
    far.add_argument("ca")
    far.add_argument("server_name")
    parser.add_argument("--runs", type=int, default=3, help="runs, alternating the order of the paths")
    parser.add_argument("--seconds", type=int, default=10, help="seconds per throughput test")
    parser.add_argument("--pings", type=int, default=20000, help="1-byte round trips per run")
    args = parser.parse_args(argv)
    if args.role == "near":
        _main_near(args)
        return 0
    if args.role == "far":
        _main_far(args)
        return 0
    return _measure(args)


if __name__ == "__main__":
    sys.exit(main())
