"""One stream over a long link: ``python -m bench.wan [--rtt-ms 100] [--windows 1m,2m,4m]``.

A window-limited transfer carries at most window / RTT per stream. This
measures it: a ``burrow relay`` (one per window, ``--window``), a delay proxy
in front of it (tests/faults/proxy.py, RTT/2 each way on the agent's link),
``burrow forward --unencrypted`` through the proxy to an iperf3 server, and
``iperf3 -R`` through the tunnel's raw TCP port. Loopback only; needs iperf3.
This kernel has no netem, hence the proxy (Python: good for a few hundred
Mbit/s, which is what the windows allow at such RTTs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _size(text: str) -> str:
    if not re.fullmatch(r"\d+[km]?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a window size (e.g. 1m, 512k)")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.wan", description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, default=100.0, help="round-trip time added to the agent's link")
    parser.add_argument("--windows", default="1m,2m,4m", help="relay --window values to compare")
    parser.add_argument("--seconds", type=int, default=8, help="iperf3 -t (after 2 s left out)")
    args = parser.parse_args(argv)
    windows = [_size(w) for w in args.windows.split(",")]
    sys.path.insert(0, str(ROOT))
    from tests.faults.proxy import FaultProxy
    from tests.helpers import ServiceThread

    iperf_port = _free_port()
    iperf = subprocess.Popen(
        ["iperf3", "-s", "-p", str(iperf_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    services = ServiceThread()
    try:
        for window in windows:
            home = tempfile.mkdtemp(prefix="burrow-wan-")
            env = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
            env["BURROW_HOME"] = home
            port = _free_port()
            relay = subprocess.Popen(
                [sys.executable, "-m", "burrow", "relay", "--listen", f"127.0.0.1:{port}", "-q", "--window", window],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            proxy = FaultProxy(services, port)
            agent = None
            try:
                assert relay.stdout is not None and "ready" in relay.stdout.readline()
                agent = subprocess.Popen(
                    [sys.executable, "-m", "burrow", "forward", str(iperf_port), "--unencrypted"]
                    + ["--relay", f"localhost:{proxy.port}"],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                assert agent.stdout is not None
                deadline = time.monotonic() + 30
                tcp_port = 0
                while not tcp_port:
                    assert time.monotonic() < deadline, "the agent did not open its tunnel"
                    if match := re.search(r"tcp\s+\S+:(\d+)", agent.stdout.readline()):
                        tcp_port = int(match[1])
                proxy.latency(args.rtt_ms / 2000)  # (applies to the connections open now: the agent's link)
                argv = ["iperf3", "-c", "127.0.0.1", "-p", str(tcp_port), "-R", "-t", str(args.seconds), "-O", "2"]
                done = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=args.seconds + 60)
                bits = json.loads(done.stdout)["end"]["sum_received"]["bits_per_second"]
                print(f"RTT {args.rtt_ms:.0f} ms, window {window}: {bits / 1e6:.0f} Mbit/s", flush=True)
            finally:
                for proc in (agent, relay):
                    if proc is not None:
                        proc.terminate()
                        proc.wait(10)
                proxy.close()
    finally:
        iperf.terminate()
        services.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
