"""Scenario 8's drivers: many tunnels on one relay, and many idle connections through them.

``python -m bench.scale agent --relay HOST:PORT --ports-file F [--ports-file F2 ...] --out hosts.json``
    opens one TLS tunnel per listed local port (``Forward.aopen``, 64 at a
    time, one agent session), writes the tunnel hosts, prints ``ready
    tunnels=N seconds=T errors=E`` and holds them until stdin closes.

``python -m bench.scale client --port RELAY_PORT --hosts hosts.json --ca CA``
    opens one TLS connection per tunnel (SNI ``<id>.localhost``, verified),
    sends a byte and reads its echo, prints ``ready conns=N seconds=T errors=E``
    and keeps them idle. Each ``verify`` line on stdin echoes one byte on every
    connection again (``verified ok=N errors=E``); EOF closes everything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
CONCURRENCY = 64  # the relay refuses more than 128 handshakes pending from one address


async def bounded(items: list[Any], work: Callable[[Any], Awaitable[T]]) -> list[T | BaseException]:
    """``work(item)`` for every item, CONCURRENCY at a time; exceptions are returned, not raised."""
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(item: Any) -> T | BaseException:
        async with semaphore:
            try:
                return await work(item)
            except Exception as exc:  # noqa: BLE001
                return exc

    return await asyncio.gather(*(one(item) for item in items))


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def first_error(results: list[Any]) -> str:
    errors = [r for r in results if isinstance(r, BaseException)]
    return f" first_error={errors[0]!r}" if errors else ""


async def agent(args: argparse.Namespace) -> None:
    import burrow

    ports = args.ports
    forwards = [burrow.forward(port, relay=args.relay) for port in ports]
    start = time.perf_counter()
    results = await bounded(forwards, lambda f: f.aopen())
    elapsed = time.perf_counter() - start
    hosts = [r.host for r in results if not isinstance(r, BaseException)]
    Path(args.out).write_text(json.dumps(hosts))  # noqa: ASYNC240 (small, and nothing else runs yet)
    errors = len(results) - len(hosts)
    print(f"ready tunnels={len(hosts)} seconds={elapsed:.3f} errors={errors}{first_error(results)}", flush=True)
    reader = await stdin_lines()
    while await reader.readline():
        pass
    await bounded([f for f in forwards if f.is_open], lambda f: f.aclose())


async def client(args: argparse.Namespace) -> None:
    context = ssl.create_default_context(cafile=args.ca)
    hosts = args.host_list

    async def connect(host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", args.port, ssl=context, server_hostname=host), 30
        )
        writer.write(b"s")
        if await asyncio.wait_for(reader.readexactly(1), 30) != b"s":
            raise RuntimeError("wrong echo")
        return reader, writer

    start = time.perf_counter()
    results = await bounded(hosts, connect)
    elapsed = time.perf_counter() - start
    conns = [r for r in results if not isinstance(r, BaseException)]
    errors = len(results) - len(conns)
    print(f"ready conns={len(conns)} seconds={elapsed:.3f} errors={errors}{first_error(results)}", flush=True)

    async def verify(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
        reader, writer = conn
        writer.write(b"v")
        return await asyncio.wait_for(reader.readexactly(1), 30) == b"v"

    commands = await stdin_lines()
    while (await commands.readline()).strip() == b"verify":
        checked = await bounded(conns, verify)
        ok = sum(1 for r in checked if r is True)
        print(f"verified ok={ok} errors={len(checked) - ok}{first_error(checked)}", flush=True)
    for _, writer in conns:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    sub = parser.add_subparsers(dest="role", required=True)
    a = sub.add_parser("agent")
    a.add_argument("--relay", required=True)
    a.add_argument("--ports-file", action="append", required=True)
    a.add_argument("--out", required=True)
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--hosts", required=True)
    c.add_argument("--ca", required=True)
    args = parser.parse_args(argv)
    if args.role == "agent":
        args.ports = [int(line) for name in args.ports_file for line in Path(name).read_text().split()]
    else:
        args.host_list = json.loads(Path(args.hosts).read_text())
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(agent(args) if args.role == "agent" else client(args))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
