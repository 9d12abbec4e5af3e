"""The bench harness cannot rot: ``python -m bench.run --quick`` runs every scenario end to end."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = [
    "iperf3",
    "wrk",
    "haproxy",
    "ssh",
    "ssh-keygen",
    "/usr/sbin/sshd",
    "redis-server",
    "redis-benchmark",
    "pgbench",
]
SCENARIOS = sorted(str(n) for n in range(1, 12))


def _missing() -> list[str]:
    def found(program: str) -> bool:
        if program.startswith("/"):
            return os.access(program, os.X_OK)
        return shutil.which(program) is not None or os.access(f"/usr/sbin/{program}", os.X_OK)

    return [p for p in PROGRAMS if not found(p)]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_quick_bench_runs_every_scenario(tmp_path: Path) -> None:
    missing = _missing()
    if missing:
        pytest.skip(
            f"bench needs {', '.join(missing)} (Debian: openssh-server openssh-client haproxy iperf3 wrk "
            "redis-server redis-tools postgresql)"
        )
    pytest.importorskip("matplotlib", reason="the bench's chart needs matplotlib: pip install -e '.[bench]'")
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path), "--max-seconds", "80"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=85,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    outputs = {p.suffix: p for p in tmp_path.iterdir()}
    assert set(outputs) == {".json", ".md", ".png"}, sorted(outputs)
    assert outputs[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs[".png"].stat().st_size > 20_000
    table = outputs[".md"].read_text()
    assert table in done.stdout  # printed too

    results = json.loads(outputs[".json"].read_text())
    assert results["meta"]["quick"] is True
    assert sorted(results["scenarios"]) == SCENARIOS
    for sid, scenario in results["scenarios"].items():
        assert scenario["figures"], f"scenario {sid} has no figures: {scenario['notes']}"
        assert scenario["checks"] or sid == "6", f"scenario {sid} judged no target"
        assert f"## {sid}. {scenario['title']}" in table
        for figure in scenario["figures"]:
            if figure["metric"] in ("errors", "retries") or figure["metric"].startswith(("added", "bytes per")):
                continue  # zero is the right answer there; differences (added, RSS growth / N) can be anything
            assert figure["runs"] and all(v > 0 for v in figure["runs"]), (sid, figure)
            assert figure["min"] <= figure["median"] <= figure["max"]
    # every path of every mode took part somewhere, and burrow is compared with a peer and direct
    paths = {f["path"] for s in results["scenarios"].values() for f in s["figures"]}
    assert {"direct", "direct-tls", "ssh-gcm", "haproxy+ssh-gcm", "burrow", "burrow-tls"} <= paths
    burrow = next(f for f in results["scenarios"]["1"]["figures"] if f["path"] == "burrow")
    assert burrow["ratio_direct"] > 0 and burrow["ratio_best_peer"] > 0
    assert results["scenarios"]["8"]["extra"]["connections"] == results["scenarios"]["8"]["extra"]["n"]


def _echo_through(sock: socket.socket, payload: bytes, sent_before: bytes = b"") -> bytes:
    """Send ``payload`` from a thread while reading its echo here; return what came back.

    ``sent_before``: bytes already sent, whose echo comes first.
    """
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    got = bytearray()
    while len(got) < len(sent_before) + len(payload):
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    sender.join()
    return bytes(got)


@pytest.mark.timeout(60)
def test_floor_pair_forwards_bytes_both_ways(tmp_path: Path) -> None:
    """``bench.floor``'s pair (the yardstick of bench/README.md) carries bytes whole, plain and TLS."""
    from bench.lab import BENCH_SNI, make_certs
    from bench.procs import Procs, free_port

    from .helpers import ServiceThread

    certs = make_certs(tmp_path / "certs")
    services = ServiceThread()
    procs = Procs(tmp_path)
    try:
        echo = services.echo_server()
        public, public_tls, link = free_port(), free_port(), free_port()
        near = [str(public), str(public_tls), str(link), str(certs.cert), str(certs.key)]
        procs.start("near", [sys.executable, "-m", "bench.floor", "near", *near], cwd=ROOT).wait_for("ready")
        payload = os.urandom(3 * 1024 * 1024)
        with socket.create_connection(("127.0.0.1", public), timeout=20) as sock:
            first = b"sent before far had a link open"
            sock.sendall(first)  # waits in near, then follows near's signal on the first link
            far = [str(link), str(echo.port), str(certs.ca), BENCH_SNI]
            procs.start("far", [sys.executable, "-m", "bench.floor", "far", *far], cwd=ROOT).wait_for("ready")
            assert _echo_through(sock, payload, sent_before=first) == first + payload
        context = ssl.create_default_context(cafile=str(certs.ca))
        with socket.create_connection(("127.0.0.1", public_tls), timeout=20) as raw:
            with context.wrap_socket(raw, server_hostname=BENCH_SNI) as sock:
                assert _echo_through(sock, payload) == payload
    finally:
        procs.stop_all()
        services.stop()


@pytest.mark.timeout(60)
def test_c_floor_pair_forwards_bytes_both_ways(tmp_path: Path) -> None:
    """``bench.floor``'s socat pair (the compiled floor) carries bytes whole, plain and TLS."""
    from bench.floor import start_c_floor
    from bench.lab import BENCH_SNI, make_certs
    from bench.procs import Procs

    from .helpers import ServiceThread

    certs = make_certs(tmp_path / "certs")
    services = ServiceThread()
    procs = Procs(tmp_path)
    try:
        echo = services.echo_server()
        public, public_tls = start_c_floor(procs, certs, echo.port, "test")
        payload = os.urandom(3 * 1024 * 1024)
        with socket.create_connection(("127.0.0.1", public), timeout=20) as sock:
            assert _echo_through(sock, payload) == payload
        context = ssl.create_default_context(cafile=str(certs.ca))
        with socket.create_connection(("127.0.0.1", public_tls), timeout=20) as raw:
            with context.wrap_socket(raw, server_hostname=BENCH_SNI) as sock:
                assert _echo_through(sock, payload) == payload
    finally:
        procs.stop_all()
        services.stop()
