"""Soak: minutes of tunnel and connection churn with forced reconnects; RSS, fds and tasks must stay flat.

    python -m bench.soak --minutes 30            # print samples every few seconds
    python -m bench.soak --minutes 1 --assert-flat   # what the test suite runs

A relay runs as its own process; this process is the agent, with an echo
service and a fault proxy between agent and relay. Each cycle opens a few
tunnels, checks echoed bytes through TLS and raw TCP connections, resets the
agent's link now and then (the tunnels must come back with the same URL), and
closes the tunnels. Samples: relay RSS and fds (from /proc), agent RSS, fds
and asyncio tasks on burrow's loop.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: Samples taken before this are warm-up (imports, first sessions, caches)...
WARMUP_SECONDS = 12.0
#: ...or before half the run, up to WARMUP_MAX: the relay's RSS climbs for ~3
#: minutes of churn (42 -> ~120 MB: OpenSSL and the allocator; Python's own
#: traced memory stays at ~26 MB) and then stays within 111-126 MB (16-minute
#: soak, 18,476 cycles, 3,695 reconnects), so growth after that is what counts.
WARMUP_MAX = 180.0
SAMPLE_EVERY = 4.0
#: What "flat" allows between the warm sample and the end (noise, allocator slack).
RSS_SLACK = 24 * 1024 * 1024
FD_SLACK = 12
TASK_SLACK = 6


@dataclass
class Sample:
    at: float
    relay_rss: int
    relay_fds: int
    agent_rss: int
    agent_fds: int
    agent_tasks: int

    def line(self) -> str:
        mb = 1024 * 1024
        return (
            f"{self.at:7.1f}s  relay rss {self.relay_rss / mb:6.1f} MB fds {self.relay_fds:4d}   "
            f"agent rss {self.agent_rss / mb:6.1f} MB fds {self.agent_fds:4d} tasks {self.agent_tasks:3d}"
        )


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--assert-flat", action="store_true", help="exit 1 unless RSS, fds and tasks stay flat")
    args = parser.parse_args(argv)

    home = tempfile.mkdtemp(prefix="burrow-soak-")
    os.environ["BURROW_HOME"] = home
    os.environ["BURROW_HEARTBEAT_TIMEOUT"] = "2"
    for name in ("BURROW_RELAY", "BURROW_TOKEN", "BURROW_TOKEN_FILE", "BURROW_CA"):
        os.environ.pop(name, None)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    from tests.faults.proxy import FaultProxy
    from tests.helpers import ServiceThread, tls_connect

    import burrow
    from burrow.agent.runtime import runtime

    port = _free_port()
    relay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "burrow",
            "relay",
            "--listen",
            f"127.0.0.1:{port}",
            "-q",
            "--heartbeat-timeout",
            "2",
            # churn is the point here: thousands of tunnels a minute, far beyond a tenant's default cap
            "--max-tunnels-per-minute",
            "1000000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert relay.stdout is not None
    if "ready" not in relay.stdout.readline():
        print("soak: the relay did not start", file=sys.stderr)
        return 1
    services = ServiceThread()
    echo = services.echo_server()
    proxy = FaultProxy(services, port)
    ca = Path(home) / "ca.pem"
    address = f"localhost:{proxy.port}"

    async def task_count() -> int:
        return len(asyncio.all_tasks())

    def sample(started: float) -> Sample:
        # uvloop's SSL transports are freed by the cyclic collector: count what is held, not what awaits it
        gc.collect()
        tasks = runtime().submit(task_count()).result(timeout=10)
        me = os.getpid()
        return Sample(time.monotonic() - started, _rss(relay.pid), _fds(relay.pid), _rss(me), _fds(me), tasks)

    def echo_round(tunnel: burrow.Tunnel) -> None:
        payload = random.randbytes(random.randint(1, 256 * 1024))
        with tls_connect(tunnel, ca) as sock:
            sock.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
            if bytes(got) != payload:
                raise AssertionError("TLS echo corrupted")
        with socket.create_connection(("127.0.0.1", tunnel.unencrypted_port or 0), timeout=10) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            got = bytearray()
            while chunk := sock.recv(65536):
                got += chunk
            if bytes(got) != payload:
                raise AssertionError("TCP echo corrupted")

    started = time.monotonic()
    deadline = started + args.minutes * 60
    samples: list[Sample] = []
    cycles = reconnects = connections = 0
    next_sample = started
    try:
        while time.monotonic() < deadline:
            cycles += 1
            states: list[burrow.TunnelState] = []
            forward = burrow.forward(echo.port, unencrypted=True, relay=address, on_state=states.append)
            with forward as tunnel:
                for _ in range(5):
                    echo_round(tunnel)
                    connections += 2
                if cycles % 5 == 0:  # the agent's link breaks; the tunnel must come back as it was
                    proxy.reset()
                    limit = time.monotonic() + 10
                    while burrow.TunnelState.RECONNECTING not in states or forward.state is not burrow.TunnelState.OPEN:
                        if time.monotonic() > limit:
                            raise AssertionError("tunnel did not come back within 10 s")
                        time.sleep(0.01)
                    reconnects += 1
                    if forward.tunnel != tunnel:
                        raise AssertionError(f"tunnel came back as {forward.tunnel}, not {tunnel}")
                    echo_round(tunnel)
            if time.monotonic() >= next_sample:
                samples.append(sample(started))
                print(samples[-1].line(), flush=True)
                next_sample += SAMPLE_EVERY
    finally:
        proxy.close()
        relay.terminate()
        relay.wait(15)
        services.stop()
    print(f"soak: {cycles} cycles, {connections} connections, {reconnects} reconnects, no error", flush=True)
    if not args.assert_flat:
        return 0
    warm_up = max(WARMUP_SECONDS, min(WARMUP_MAX, samples[-1].at / 2)) if samples else WARMUP_SECONDS
    warm = [s for s in samples if s.at >= warm_up]
    if len(warm) < 3:
        print("soak: too few samples to judge flatness", file=sys.stderr)
        return 1
    first, tail = warm[0], warm[-max(1, len(warm) // 3) :]
    worst = Sample(
        tail[-1].at,
        max(s.relay_rss for s in tail),
        max(s.relay_fds for s in tail),
        max(s.agent_rss for s in tail),
        max(s.agent_fds for s in tail),
        max(s.agent_tasks for s in tail),
    )
    problems = []
    for name, slack in (
        ("relay_rss", RSS_SLACK),
        ("agent_rss", RSS_SLACK),
        ("relay_fds", FD_SLACK),
        ("agent_fds", FD_SLACK),
        ("agent_tasks", TASK_SLACK),
    ):
        grew = getattr(worst, name) - getattr(first, name)
        if grew > slack:
            problems.append(f"{name} grew by {grew} (allowed {slack})")
    if problems:
        print("soak: NOT flat: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("soak: flat (RSS, fds and tasks within slack of the warm sample)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
