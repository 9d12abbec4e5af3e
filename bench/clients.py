"""The measuring clients. Each takes an :class:`Endpoint` and returns raw numbers.

Python clients (bulk over TLS, ping-pong, new connections) run in the harness
process, blocking sockets, one at a time; iperf3 and wrk are driven as
subprocesses. The same client measures every path, so its own cost is the
same for burrow and for each peer.
"""

from __future__ import annotations

import functools
import json
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .procs import BenchError


@dataclass(frozen=True)
class Endpoint:
    """Where a client connects: plain TCP, or TLS with a server name (SNI) and a CA to verify it."""

    host: str
    port: int
    sni: str | None = None  # set: speak TLS with this server name
    cafile: str | None = None

    @property
    def tls(self) -> bool:
        return self.sni is not None

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.sni is None:
            return sock
        try:
            return client_context(self.cafile).wrap_socket(sock, server_hostname=self.sni)
        except BaseException:
            sock.close()
            raise

    def url(self, scheme: str = "http") -> str:
        """``http://127.0.0.1:PORT`` or ``https://SNI:PORT`` (resolve SNI to ``host`` yourself)."""
        if self.sni is None:
            return f"{scheme}://{self.host}:{self.port}"
        return f"{scheme}s://{self.sni}:{self.port}"


@functools.cache
def client_context(cafile: str | None) -> ssl.SSLContext:
    """A verifying client context (hostname checked) trusting ``cafile``."""
    return ssl.create_default_context(cafile=cafile)


# ---------------------------------------------------------------- throughput


def recv_throughput(endpoint: Endpoint, seconds: float, warmup: float) -> float:
    """Bits/s received from an endless source, counted after ``warmup`` seconds."""
    buf = bytearray(1 << 20)
    with endpoint.connect() as sock:
        sock.settimeout(10.0)
        start = time.perf_counter()
        end_warmup = start + warmup
        while time.perf_counter() < end_warmup:
            if not sock.recv_into(buf):
                raise BenchError(f"{endpoint}: the source closed during warm-up")
        total = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            got = sock.recv_into(buf)
            if not got:
                raise BenchError(f"{endpoint}: the source closed after {total} bytes")
            total += got
            now = time.perf_counter()
            if now >= deadline:
                return total * 8 / (now - start)


@dataclass
class IperfResult:
    bits_per_second: float  # receiver side, all streams
    streams: list[float]  # receiver side, per stream
    retransmits: int


def iperf3(
    endpoint: Endpoint, seconds: int, omit: int = 0, parallel: int = 1, ready: Callable[[], bool] | None = None
) -> IperfResult:
    """iperf3 in reverse mode (the service sends, the public client receives) through ``endpoint``.

    ``ready``: the lab's :meth:`~bench.lab.Lab.iperf_ready`, called before each try: it waits until
    the server is between tests, and restarts one that exited (True when it did); a test that
    failed because the server was gone is then run again.
    """
    argv = ["iperf3", "-c", endpoint.host, "-p", str(endpoint.port), "-R", "--json"]
    argv += ["-t", str(max(1, int(seconds))), "-O", str(omit), "-P", str(parallel)]
    deadline = time.monotonic() + 15
    while True:
        if ready is not None:
            ready()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + omit + 30)
        except subprocess.TimeoutExpired:
            raise BenchError(f"iperf3 through {endpoint} did not finish in time") from None
        try:
            data = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise BenchError(f"iperf3 through {endpoint}: {done.stdout[-400:]} {done.stderr[-400:]}") from None
        error = data.get("error", "")
        # the server takes a moment to wind down the previous test (its connections closing); through a
        # tunnel its refusal can arrive as a reset of the new control connection instead of "busy"
        refused = "busy" in error or "control message" in error or "cookie" in error
        # iperf3 3.12's server is not listening for a moment after a test of many streams: the
        # full run of 20261205-220316 lost scenario 3 to one "Connection refused" on the direct path
        refused = refused or ("unable to connect to server" in error and "refused" in error.lower())
        # a closed or refused control connection counts against the path, unless the server itself was gone
        gone = ("control socket" in error or "Connection refused" in error) and ready is not None and ready()
        if (refused or gone) and time.monotonic() < deadline:
            print(f"    (iperf3 through {endpoint.host}:{endpoint.port} refused: {error}; retrying)", flush=True)
            time.sleep(0.3)
            continue
        if error:
            raise BenchError(f"iperf3 through {endpoint}: {error}")
        break
    end = data["end"]
    streams = [s["receiver"]["bits_per_second"] for s in end["streams"]]
    return IperfResult(end["sum_received"]["bits_per_second"], streams, int(end["sum_sent"].get("retransmits", 0)))


# ------------------------------------------------------------------- latency


def ping_pong(endpoint: Endpoint, count: int, warmup: int = 200) -> list[float]:
    """Round-trip times (s) of a 1-byte ping-pong on one established connection."""
    samples = []
    clock = time.perf_counter_ns
    with endpoint.connect() as sock:
        for i in range(warmup + count):
            start = clock()
            sock.sendall(b"p")
            if sock.recv(16) != b"p":
                raise BenchError(f"{endpoint}: ping-pong got a wrong echo")
            if i >= warmup:
                samples.append((clock() - start) / 1e9)
    return samples


def new_connections(endpoint: Endpoint, count: int, warmup: int = 20) -> list[float]:
    """Per new connection (s): connect (and TLS handshake), send one byte, read its echo."""
    samples = []
    clock = time.perf_counter_ns
    for i in range(warmup + count):
        start = clock()
        sock = endpoint.connect()
        try:
            sock.sendall(b"n")
            if sock.recv(16) != b"n":
                raise BenchError(f"{endpoint}: no echo on a new connection")
            elapsed = clock() - start
        finally:
            sock.close()
        if i >= warmup:
            samples.append(elapsed / 1e9)
    return samples


# ---------------------------------------------------------------------- wrk

# wrk resolves the URL's host itself (getaddrinfo knows no *.localhost) and sends
# it as SNI: keep the name for SNI, dial 127.0.0.1.
WRK_RESOLVE = 'wrk.resolve = function(host, service) wrk.addrs = wrk.lookup("127.0.0.1", service) end\n'
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass
class WrkResult:
    requests_per_second: float
    p50: float  # s
    p99: float  # s
    errors: int


def wrk(endpoint: Endpoint, seconds: int, connections: int, threads: int, workdir: Path) -> WrkResult:
    """wrk (HTTP/1.1 keep-alive) through ``endpoint`` for ``seconds``."""
    script = workdir / "wrk-resolve.lua"
    script.write_text(WRK_RESOLVE)
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, int(seconds))}s", "--latency"]
    argv += ["-s", str(script), endpoint.url() + "/"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk through {endpoint} did not finish in time") from None
    out = done.stdout
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if done.returncode != 0 or rps is None:
        raise BenchError(f"wrk through {endpoint} failed: {out[-600:]} {done.stderr[-300:]}")
    rows = re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    latency = {int(p): float(v) * _UNITS[u] for p, v, u in rows}
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    if 50 not in latency or 99 not in latency:
        raise BenchError(f"wrk through {endpoint}: no latency distribution in {out[-600:]}")
    return WrkResult(float(rps.group(1)), latency[50], latency[99], errors)


# ------------------------------------------------------------ real programs


def redis_benchmark(endpoint: Endpoint, requests: int, clients: int, pipeline: int = 1) -> dict[str, float]:
    """``redis-benchmark -t set,get`` through ``endpoint``: {"SET": requests/s, "GET": requests/s}."""
    argv = ["redis-benchmark", "-h", endpoint.host, "-p", str(endpoint.port), "-c", str(clients)]
    argv += ["-n", str(requests), "-P", str(pipeline), "-t", "set,get", "--csv"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"redis-benchmark through {endpoint} did not finish in 300 s") from None
    rates = {test: float(rps) for test, rps in re.findall(r'^"(SET|GET)","([\d.]+)"', done.stdout, re.M)}
    if done.returncode != 0 or set(rates) != {"SET", "GET"}:
        raise BenchError(f"redis-benchmark through {endpoint} failed: {done.stdout[-400:]} {done.stderr[-400:]}")
    return rates


@dataclass
class PgbenchResult:
    tps: float  # transactions per second, without the initial connection time
    latency: float  # s, average


def pgbench(endpoint: Endpoint, seconds: int, clients: int) -> PgbenchResult:
    """``pgbench -S`` (select-only: one indexed SELECT per transaction) through ``endpoint``."""
    argv = ["pgbench", "-S", "-n", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(max(1, int(seconds)))]
    argv += ["-h", endpoint.host, "-p", str(endpoint.port), "-U", "postgres", "postgres"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"pgbench through {endpoint} did not finish in time") from None
    tps = re.search(r"^tps = ([\d.]+) \(without initial connection time\)", done.stdout, re.M)
    latency = re.search(r"^latency average = ([\d.]+) ms", done.stdout, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", done.stdout, re.M)
    if done.returncode != 0 or tps is None or latency is None or (failed and int(failed.group(1))):
        raise BenchError(f"pgbench through {endpoint} failed: {done.stdout[-400:]} {done.stderr[-400:]}")
    return PgbenchResult(float(tps.group(1)), float(latency.group(1)) / 1e3)
