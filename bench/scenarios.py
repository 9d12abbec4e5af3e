"""The scenarios (issue 3's eight; issue 14's real programs and relay threads): what each runs, on
which paths, and its targets.

Every scenario measures each of its paths ``settings.runs`` times, interleaved
(run 1 of every path, then run 2, ...) so that drift hits all paths alike, and
returns a :class:`~bench.report.Scenario` of figures (median, min, max) and checks.
"""

from __future__ import annotations

import concurrent.futures
import getpass
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import clients
from .clients import Endpoint
from .lab import BENCH_RELAY_FLAGS, BENCH_SNI, RELAY_READY, TCP_PATHS, TLS_PATHS, Lab, PathSpec
from .procs import BenchError, Procs, cpu_seconds, free_port, rss_bytes
from .profile import Profiler
from .report import Check, Figure, Scenario

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    quick: bool
    runs: int
    bulk_seconds: int  # iperf3 -t (whole seconds)
    bulk_omit: int  # iperf3 -O: slow start left out
    tls_seconds: float
    tls_warmup: float
    rtt_count: int
    newconn_count: int
    wrk_seconds: int
    wrk_connections: int
    newconn_warmup: int
    create_count: int
    ssh_create_count: int
    scale_n: int
    redis_requests: int  # redis-benchmark -n, one request at a time per client
    redis_pipelined: int  # redis-benchmark -n with -P 16
    pgbench_seconds: int
    pgbench_scale: int
    both_ciphers: bool  # False (--quick): ssh -R with aes128-gcm only


FULL = Settings(
    quick=False,
    runs=3,
    bulk_seconds=10,
    bulk_omit=1,
    tls_seconds=10.0,
    tls_warmup=1.0,
    rtt_count=20_000,
    newconn_count=500,  # ssh -R takes ~44 ms per new connection: 500 x 3 runs x 4 ssh paths is 4 min already
    wrk_seconds=10,
    wrk_connections=32,
    newconn_warmup=20,
    create_count=200,
    ssh_create_count=50,  # a new ssh process per sample: ~0.3 s each
    scale_n=10_000,
    redis_requests=100_000,
    redis_pipelined=1_000_000,
    pgbench_seconds=10,
    pgbench_scale=10,
    both_ciphers=True,
)
QUICK = Settings(
    quick=True,
    runs=1,
    bulk_seconds=1,
    bulk_omit=0,
    tls_seconds=0.5,
    tls_warmup=0.2,
    rtt_count=300,
    newconn_count=20,
    wrk_seconds=1,
    wrk_connections=32,
    newconn_warmup=3,
    create_count=15,
    ssh_create_count=3,
    scale_n=200,
    redis_requests=2_000,
    redis_pipelined=20_000,
    pgbench_seconds=1,
    pgbench_scale=1,
    both_ciphers=False,
)


@dataclass
class Context:
    lab: Lab
    procs: Procs
    settings: Settings
    workdir: Path
    log: Callable[[str], None]
    profiler: Profiler | None = None
    done: dict[str, Scenario] = field(default_factory=dict)


def tcp_paths(ctx: Context) -> list[str]:
    return [k for k in TCP_PATHS if ctx.settings.both_ciphers or k != "ssh"]


def tls_paths(ctx: Context) -> list[str]:
    return [k for k in TLS_PATHS if ctx.settings.both_ciphers or k != "haproxy+ssh"]


def best_of(s: Scenario, keys: tuple[str, ...], metric: str, pick: Callable[..., str]) -> str:
    """The key among ``keys`` (those measured) with the best ``metric`` (pick: max or min)."""
    measured = [k for k in keys if s.get(k, metric) is not None]
    return pick(measured, key=lambda k: s.value(k, metric))


Measure = Callable[[str, Endpoint], dict[str, float]]  # (path key, where to connect) -> {metric: value}


def role(spec: PathSpec) -> str:
    return {"direct": "direct", "burrow": "burrow"}.get(spec.kind, "peer")


def run_paths(ctx: Context, keys: list[str], target: str, measure: Measure) -> dict[str, dict[str, list[float]]]:
    """``measure`` each path ``runs`` times, interleaved; {path: {metric: [value per run]}}."""
    data: dict[str, dict[str, list[float]]] = {key: {} for key in keys}
    runs = ctx.settings.runs
    for run in range(runs):
        for key in keys:
            values = measure(key, ctx.lab.endpoint(key, target))
            for metric, value in values.items():
                data[key].setdefault(metric, []).append(value)
            shown = ", ".join(f"{m} {v:.4g}" for m, v in values.items())
            ctx.log(f"    run {run + 1}/{runs}  {ctx.lab.paths[key].label:34} {shown}")
    return data


def add_figures(
    ctx: Context, scenario: Scenario, data: dict[str, dict[str, list[float]]], specs: list[tuple[str, str, str]]
) -> None:
    """One figure per (metric, path), grouped by metric, in the order of ``specs``."""
    for metric, unit, better in specs:
        for key, metrics in data.items():
            if metric in metrics:
                spec = ctx.lab.paths[key]
                mode = "tls" if spec.tls else "tcp"
                scenario.add(Figure(metric, unit, key, spec.label, metrics[metric], better, mode, role(spec)))


def add_added(data: dict[str, dict[str, list[float]]], metric: str) -> None:
    """``added <metric>``: each run's value minus direct's (of the same mode) in the same run."""
    for key, metrics in data.items():
        base = "direct-tls" if key in TLS_PATHS else "direct"
        if base in data and metric in metrics and key != base:
            metrics[f"added {metric}"] = [v - d for v, d in zip(metrics[metric], data[base][metric], strict=True)]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def profiled(ctx: Context, scenario_id: str, target: str, seconds: float, measure: Callable[[], object]) -> None:
    """One extra, uncounted burrow run with py-spy on the relay and on the target's agent."""
    if ctx.profiler is None or ctx.lab.relay is None or target not in ctx.lab.agents:
        return
    ctx.log(f"    profiling the relay and the agent during one extra run ({seconds:.0f} s)")
    recordings = [
        ctx.profiler.start(f"s{scenario_id}-relay", ctx.lab.relay.pid, seconds),
        ctx.profiler.start(f"s{scenario_id}-agent", ctx.lab.agents[target].proc.pid, seconds),
    ]
    time.sleep(0.5)  # py-spy attaches
    measure()
    for rec in recordings:
        ctx.profiler.finish(rec)


# ------------------------------------------------------------------------ 1-3


def s1_tcp_throughput(ctx: Context) -> Scenario:
    st = ctx.settings
    s = Scenario(
        "1",
        TITLES["1"],
        f"`iperf3 -R -t {st.bulk_seconds} -O {st.bulk_omit}` (the service sends, the public client receives; "
        "one TCP stream; receiver-side Gbit/s) through each path's plain TCP address: direct, `ssh -R` with "
        "each cipher, burrow's raw TCP tunnel (public TCP → relay → TLS session → agent → service). "
        "CPU s/GB: user + system seconds (/proc) of the processes that carry the bytes (burrow: relay and "
        "agent; ssh: sshd's tree and the ssh client) per GB received.",
        chart=["throughput"],
    )
    keys = tcp_paths(ctx)
    ctx.lab.prepare((key, "iperf") for key in keys)

    def measure(key: str, ep: Endpoint) -> dict[str, float]:
        carriers = ctx.lab.tunnel_processes(key, "iperf")
        before = {role: cpu_seconds(pid, tree) for role, (pid, tree) in carriers.items()}
        result = clients.iperf3(ep, st.bulk_seconds, st.bulk_omit, ready=ctx.lab.iperf_ready)
        values = {"throughput": result.bits_per_second / 1e9}
        if carriers:  # (the bytes of the omitted first seconds are estimated at the measured rate)
            gigabytes = result.bits_per_second / 8 * (st.bulk_seconds + st.bulk_omit) / 1e9
            spent = {role: cpu_seconds(pid, tree) - before[role] for role, (pid, tree) in carriers.items()}
            values["CPU s/GB"] = sum(spent.values()) / gigabytes
            values |= {f"{role} CPU s/GB": seconds / gigabytes for role, seconds in spent.items()}
        return values

    data = run_paths(ctx, keys, "iperf", measure)
    cpu = [(f"{who}CPU s/GB", "s", "lower") for who in ("", "relay ", "agent ", "sshd ", "ssh ")]
    add_figures(ctx, s, data, [("throughput", "Gbit/s", "higher"), *cpu])
    relay_cpu, ssh_cpu = s.value("burrow", "relay CPU s/GB"), s.value("ssh-gcm", "CPU s/GB")
    s.checks.append(
        Check(
            "burrow relay CPU per GB ≤ 0.5 × sshd + ssh -R aes128-gcm's",
            f"{relay_cpu:.3f} vs 0.5 × {ssh_cpu:.3f} = {0.5 * ssh_cpu:.3f} s/GB ({relay_cpu / ssh_cpu:.2f}×; "
            f"relay + agent {s.value('burrow', 'CPU s/GB'):.3f})",
            relay_cpu <= 0.5 * ssh_cpu,
        )
    )
    ours, gcm = s.value("burrow", "throughput"), s.value("ssh-gcm", "throughput")
    s.checks.append(
        Check(
            "burrow ≥ 1.2 × ssh -R aes128-gcm",
            f"{ours:.2f} vs 1.2 × {gcm:.2f} = {1.2 * gcm:.2f} Gbit/s ({ours / gcm:.2f}×)",
            ours >= 1.2 * gcm,
        )
    )
    seconds = st.bulk_seconds + st.bulk_omit
    profiled(ctx, "1", "iperf", seconds, lambda: measure("burrow", ctx.lab.endpoint("burrow", "iperf")))
    return s


def s2_tls_throughput(ctx: Context) -> Scenario:
    st = ctx.settings
    s = Scenario(
        "2",
        TITLES["2"],
        f"The client speaks TLS (verified, SNI) to each path's TLS address and reads an endless stream from "
        f"the `source` service for {st.tls_seconds:g} s after {st.tls_warmup:g} s of warm-up; Gbit/s of "
        "plaintext received. `direct, TLS` is the service's own TLS listener (Python/uvloop); HAProxy "
        "terminates TLS in front of `ssh -R`; burrow's is its TLS URL (`https://<id>.localhost:PORT`).",
        chart=["throughput"],
    )
    keys = tls_paths(ctx)
    ctx.lab.prepare((key, "source") for key in keys)

    def measure(_: str, ep: Endpoint) -> dict[str, float]:
        return {"throughput": clients.recv_throughput(ep, st.tls_seconds, st.tls_warmup) / 1e9}

    data = run_paths(ctx, keys, "source", measure)
    add_figures(ctx, s, data, [("throughput", "Gbit/s", "higher")])
    ours = s.value("burrow-tls", "throughput")
    best_key = best_of(s, ("haproxy+ssh", "haproxy+ssh-gcm"), "throughput", max)
    best = s.value(best_key, "throughput")
    s.checks.append(
        Check(
            "burrow TLS ≥ 1.0 × HAProxy → ssh -R (its faster cipher)",
            f"{ours:.2f} vs {best:.2f} Gbit/s ({ctx.lab.paths[best_key].label}; {ours / best:.2f}×)",
            ours >= best,
        )
    )
    seconds = st.tls_seconds + st.tls_warmup
    burrow = ctx.lab.endpoint("burrow-tls", "source")
    profiled(ctx, "2", "source", max(seconds, 1), lambda: measure("burrow-tls", burrow))
    return s


def s3_parallel(ctx: Context) -> Scenario:
    st = ctx.settings
    streams = 32
    s = Scenario(
        "3",
        TITLES["3"],
        f"`iperf3 -R -P {streams} -t {st.bulk_seconds} -O {st.bulk_omit}` through each path's plain TCP "
        "address: the sum over the streams, and the slowest and fastest stream as a multiple of the median "
        "stream (starvation shows as a small `slowest/median`).",
        chart=["aggregate"],
    )
    keys = tcp_paths(ctx)
    ctx.lab.prepare((key, "iperf") for key in keys)
    per_stream: dict[str, list[list[float]]] = {key: [] for key in keys}

    def measure(key: str, ep: Endpoint) -> dict[str, float]:
        result = clients.iperf3(ep, st.bulk_seconds, st.bulk_omit, parallel=streams, ready=ctx.lab.iperf_ready)
        per_stream[key].append([b / 1e9 for b in result.streams])
        middle = statistics.median(result.streams)
        return {
            "aggregate": result.bits_per_second / 1e9,
            "slowest/median": min(result.streams) / middle,
            "fastest/median": max(result.streams) / middle,
        }

    data = run_paths(ctx, keys, "iperf", measure)
    add_figures(
        ctx,
        s,
        data,
        [("aggregate", "Gbit/s", "higher"), ("slowest/median", "×", "higher"), ("fastest/median", "×", "lower")],
    )
    s.extra["per_stream_gbit_s"] = per_stream
    single_fig = ctx.done["1"].get("burrow", "throughput") if "1" in ctx.done else None
    if single_fig is not None:
        single = single_fig.median
    else:
        endpoint = ctx.lab.endpoint("burrow", "iperf")
        single = clients.iperf3(endpoint, st.bulk_seconds, st.bulk_omit, ready=ctx.lab.iperf_ready).bits_per_second
        single /= 1e9
        s.notes.append(f"burrow single-stream reference measured here (scenario 1 not run): {single:.2f} Gbit/s")
    ours = s.value("burrow", "aggregate")
    s.checks.append(
        Check(
            "burrow 32-stream aggregate ≥ its single-stream figure",
            f"{ours:.2f} vs {single:.2f} Gbit/s",
            ours >= single,
        )
    )
    worst_low = min(data["burrow"]["slowest/median"])
    worst_high = max(data["burrow"]["fastest/median"])
    s.checks.append(
        Check(
            "no burrow stream starved (each within 3× of the median stream, every run)",
            f"slowest {worst_low:.2f}×, fastest {worst_high:.2f}× the median",
            worst_low >= 1 / 3 and worst_high <= 3,
        )
    )
    return s


# ------------------------------------------------------------------------ 4-6


def s4_rtt(ctx: Context) -> Scenario:
    st = ctx.settings
    s = Scenario(
        "4",
        TITLES["4"],
        f"One established connection (TCP_NODELAY) through each path to the echo service; {st.rtt_count} "
        "round trips of one byte after 200 warm-up. p50/p99 per run; `added` = the path's figure minus "
        "direct's (TLS rows: minus `direct, TLS`) in the same run.",
        chart=["p50", "p99"],
    )
    keys = tcp_paths(ctx) + tls_paths(ctx)
    ctx.lab.prepare((key, "echo") for key in keys)

    def measure(_: str, ep: Endpoint) -> dict[str, float]:
        samples = clients.ping_pong(ep, st.rtt_count)
        return {"p50": percentile(samples, 50) * 1e6, "p99": percentile(samples, 99) * 1e6}

    data = run_paths(ctx, keys, "echo", measure)
    add_added(data, "p50")
    add_added(data, "p99")
    metrics = ["p50", "p99", "added p50", "added p99"]
    add_figures(ctx, s, data, [(m, "µs", "lower") for m in metrics])
    ours = s.value("burrow", "added p50")
    ssh_key = best_of(s, ("ssh", "ssh-gcm"), "added p50", min)
    theirs = s.value(ssh_key, "added p50")
    s.checks.append(
        Check(
            "burrow added RTT p50 ≤ 0.75 × what ssh -R adds (its better cipher)",
            f"{ours:.0f} vs 0.75 × {theirs:.0f} = {0.75 * theirs:.0f} µs ({ctx.lab.paths[ssh_key].label})",
            ours <= 0.75 * theirs,
        )
    )
    return s


def s5_new_connection(ctx: Context) -> Scenario:
    st = ctx.settings
    s = Scenario(
        "5",
        TITLES["5"],
        f"{st.newconn_count} times per run (after {st.newconn_warmup} warm-up): connect (TLS rows: and the TLS "
        "handshake, verified), send one byte, read its echo, close. p50/p99 per run; `added` as in 4.",
        chart=["p50", "p99"],
        log_scale=True,
    )
    keys = tcp_paths(ctx) + tls_paths(ctx)
    ctx.lab.prepare((key, "echo") for key in keys)

    def measure(_: str, ep: Endpoint) -> dict[str, float]:
        samples = clients.new_connections(ep, st.newconn_count, st.newconn_warmup)
        return {"p50": percentile(samples, 50) * 1e3, "p99": percentile(samples, 99) * 1e3}

    data = run_paths(ctx, keys, "echo", measure)
    add_added(data, "p50")
    add_added(data, "p99")
    add_figures(ctx, s, data, [(m, "ms", "lower") for m in ["p50", "p99", "added p50", "added p99"]])
    for q, limit in (("p50", 0.5), ("p99", 2.0)):
        ours, direct = s.value("burrow", q), s.value("direct", q)
        s.checks.append(
            Check(
                f"burrow raw TCP {q} ≤ direct + {limit:g} ms",
                f"{ours:.2f} vs {direct:.2f} + {limit:g} = {direct + limit:.2f} ms",
                ours <= direct + limit,
            )
        )
    return s


def s6_http(ctx: Context) -> Scenario:
    st = ctx.settings
    s = Scenario(
        "6",
        TITLES["6"],
        f"`wrk -t1 -c{st.wrk_connections} -d{st.wrk_seconds}s --latency` (HTTP/1.1 keep-alive) against HAProxy "
        "answering a 28-byte body (`http-request return`), through each path; TLS rows: wrk speaks TLS to the "
        "path (SNI set, not verified). No target in the issue: reported for comparison.",
        chart=["requests/s"],
    )
    keys = tcp_paths(ctx) + tls_paths(ctx)
    if ctx.settings.quick:  # wrk runs whole seconds: keep the smoke run short
        keys = ["direct", "ssh-gcm", "burrow", "burrow-tls"]
    ctx.lab.prepare((key, "http") for key in keys)

    def measure(_: str, ep: Endpoint) -> dict[str, float]:
        result = clients.wrk(ep, st.wrk_seconds, st.wrk_connections, 1, ctx.workdir)
        if result.errors:
            raise BenchError(f"wrk through {ep}: {result.errors} socket errors or non-2xx responses")
        return {"requests/s": result.requests_per_second, "p50": result.p50 * 1e3, "p99": result.p99 * 1e3}

    data = run_paths(ctx, keys, "http", measure)
    add_figures(ctx, s, data, [("requests/s", "req/s", "higher"), ("p50", "ms", "lower"), ("p99", "ms", "lower")])
    return s


# -------------------------------------------------------------------------- 7


CREATE_MODES = [  # (figure key, bench.create mode, label, role, compared within)
    ("direct-tls", "direct-tls", "direct, TLS (no tunnel: the floor)", "direct", "floor"),
    ("burrow-warm", "warm", "burrow, warm session", "burrow", "warm"),
    ("ssh-warm", "ssh-warm", "ssh -O forward (ControlMaster up)", "peer", "warm"),
    ("burrow-cold", "cold", "burrow, cold (new process)", "burrow", "cold"),
    ("burrow-fork", "fork", "burrow, cold (forked child)", "burrow", "cold"),
    ("ssh-cold", "ssh-cold", "ssh -R (new process)", "peer", "cold"),
]


def s7_creation(ctx: Context) -> Scenario:
    st = ctx.settings
    s = Scenario(
        "7",
        TITLES["7"],
        f"From entering `forward()` to the first successful request through the new URL (a verified TLS "
        f"connection with SNI `<id>.localhost` that echoes one byte), {st.create_count} tunnels per run. "
        "warm: one process whose agent session is already up (a keeper tunnel holds it). cold: each sample "
        "is a new Python process that has imported burrow and nothing more (no loop thread, no session, no TLS "
        "context yet: OpenSSL's once-per-process set-up is inside the clock); the measuring client makes its own "
        "TLS context after open() returns, outside the clock. forked child: the same in a child forked from a "
        "process that imported burrow (a pre-fork server's worker), which also pays copy-on-write faults on the "
        "parent's pages. Peers (plain "
        f"TCP, {st.ssh_create_count} per run): `ssh -O forward -R` on an open ControlMaster (warm) and a new "
        "`ssh -N -R` process (cold), until one byte echoes through the new remote port.",
        chart=["p50", "p99"],
        log_scale=True,
    )
    lab = ctx.lab
    lab.prepare([("direct", "echo")], sshd=True, relay=True)
    echo, tls_echo = lab.targets["echo"].tcp_port, lab.targets["echo"].tls_port
    common = ["--port", str(echo), "--relay", f"localhost:{lab.relay_port}"]
    common += ["--keeper-port", str(free_port()), "--sshd-port", str(lab.sshd_port)]
    common += ["--ssh-key", str(lab.workdir / "ssh" / "user_key"), "--user", getpass.getuser()]
    common += ["--control-dir", str(ctx.workdir)]
    samples: dict[str, dict[str, list[float]]] = {key: {} for key, *_ in CREATE_MODES}
    for run in range(st.runs):
        for key, mode, label, _, _ in CREATE_MODES:
            count = st.ssh_create_count if key.startswith("ssh") else st.create_count
            argv = [sys.executable, "-m", "bench.create", mode, "--count", str(count), *common]
            if mode == "direct-tls":
                argv += ["--tls-port", str(tls_echo), "--sni", BENCH_SNI, "--ca", str(lab.certs.ca)]
            elif key.startswith("burrow"):
                argv += ["--ca", str(lab.burrow_home / "ca.pem")]
            out = ctx.procs.run(f"create-{mode}", argv, timeout=60 + count * 2, env=lab.burrow_env(), cwd=ROOT)
            rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            if len(rows) != count:
                raise BenchError(f"bench.create {mode}: {len(rows)} samples of {count}\n{out[-800:]}")
            totals = [r["total"] * 1e3 for r in rows]
            values = {
                "p50": percentile(totals, 50),
                "p99": percentile(totals, 99),
                "open() p50": statistics.median(r["open"] * 1e3 for r in rows),
                "first request p50": statistics.median(r["first_request"] * 1e3 for r in rows),
                "retries": float(sum(r["retries"] for r in rows)),
            }
            if "import" in rows[0]:
                values["import burrow p50"] = statistics.median(r["import"] * 1e3 for r in rows)
            for metric, value in values.items():
                samples[key].setdefault(metric, []).append(value)
            shown = ", ".join(f"{m} {v:.4g}" for m, v in values.items())
            ctx.log(f"    run {run + 1}/{st.runs}  {label:34} {shown}")
    metrics = ("p50", "p99", "open() p50", "first request p50", "import burrow p50")
    for metric in metrics:
        for key, _, label, who, within in CREATE_MODES:
            if metric not in samples[key] or (key in ("ssh-cold", "direct-tls") and metric not in ("p50", "p99")):
                continue  # no separate open step there; only a new process imports burrow
            s.add(Figure(metric, "ms", key, label, samples[key][metric], "lower", within, who))
    warm, cold = s.value("burrow-warm", "p50"), s.value("burrow-cold", "p50")
    floor = s.value("direct-tls", "p50")
    s.checks.append(
        Check(
            "burrow warm p50 ≤ 2 ms",
            f"{warm:.2f} ms (no tunnel, the same client's TLS connection alone: {floor:.2f} ms)",
            warm <= 2.0,
        )
    )
    s.checks.append(Check("burrow cold p50 ≤ 15 ms", f"{cold:.2f} ms", cold <= 15.0))
    s.notes.append(
        "`open() p50` is entering forward() until open() returns (the relay confirmed the tunnel); "
        "`first request p50` the rest (ssh: `-O forward` returning, then the echo). A new ssh -R process "
        "has no separate open() step. `direct, TLS` is no tunnel at all: the same client's verified TLS "
        "connection and echo straight to the echo service's own TLS listener, the floor under burrow's figures. "
        "`import burrow p50` is the new process's `import burrow`, its first import, before the clock. "
        "The client passes host names to `socket` and `ssl` as ASCII bytes, so that it never imports the IDNA codec "
        "inside the clock."
    )
    return s


# -------------------------------------------------------------------------- 8


SERVICE_BATCH = 4000  # listeners per echo process: 2 fds per tunnel (listener + accepted) under 20k


def s8_scale(ctx: Context) -> Scenario:
    st = ctx.settings
    n = st.scale_n
    s = Scenario(
        "8",
        TITLES["8"],
        f"A fresh `burrow relay` process; one `burrow.forward()` agent process opens {n:,} TLS tunnels over its "
        f"one session (64 `aopen()` at a time), each to its own local echo listener; then a client opens one "
        f"verified TLS connection per tunnel ({n:,} in all, 64 handshakes at a time), echoes one byte on each, "
        "keeps them idle and echoes again on every one. Relay RSS (VmRSS) before, after the tunnels and after "
        "the connections; bytes per tunnel and per connection are those differences divided by N.",
        chart=["relay RSS"],
        extra={"limit_line": 1024.0, "n": n},
    )
    lab, procs = ctx.lab, ctx.procs
    started = []
    try:
        port = free_port()
        argv = [sys.executable, "-m", "burrow", "relay", "--listen", f"127.0.0.1:{port}", *BENCH_RELAY_FLAGS]
        relay = procs.start("scale-relay", argv, env=lab.burrow_env(), nofile=65536)
        started.append(relay)
        relay.wait_for(r"burrow relay ready")
        services = []
        for i in range(math.ceil(n / SERVICE_BATCH)):
            count = min(SERVICE_BATCH, n - i * SERVICE_BATCH)
            ports_file = ctx.workdir / f"scale-ports-{i}.txt"
            argv = [sys.executable, "-m", "bench.services", "echo", "--count", str(count), "--ports-file"]
            service = procs.start(f"scale-echo-{i}", [*argv, str(ports_file)], nofile=65536, cwd=ROOT)
            started.append(service)
            services.append((service, ports_file))
        for service, _ in services:
            service.wait_for(r"ready count=", timeout=120)
        time.sleep(0.5)
        rss0 = rss_bytes(relay.pid)
        hosts = ctx.workdir / "scale-hosts.json"
        argv = [sys.executable, "-m", "bench.scale", "agent", "--relay", f"localhost:{port}", "--out", str(hosts)]
        for _, ports_file in services:
            argv += ["--ports-file", str(ports_file)]
        agent = procs.start("scale-agent", argv, env=lab.burrow_env(), nofile=65536, stdin=subprocess.PIPE, cwd=ROOT)
        started.append(agent)
        match = agent.wait_for(r"ready tunnels=(\d+) seconds=([\d.]+) errors=(\d+)(.*)", timeout=60 + n / 20)
        tunnels, tunnel_seconds, tunnel_errors = int(match[1]), float(match[2]), int(match[3])
        ctx.log(f"    {tunnels:,} tunnels in {tunnel_seconds:.2f} s, {tunnel_errors} errors{match[4]}")
        time.sleep(1.0)
        rss1 = rss_bytes(relay.pid)
        argv = [sys.executable, "-m", "bench.scale", "client", "--port", str(port), "--hosts", str(hosts)]
        argv += ["--ca", str(lab.burrow_home / "ca.pem")]
        client = procs.start("scale-client", argv, nofile=65536, stdin=subprocess.PIPE, cwd=ROOT)
        started.append(client)
        match = client.wait_for(r"ready conns=(\d+) seconds=([\d.]+) errors=(\d+)(.*)", timeout=60 + n / 10)
        conns, conn_seconds, conn_errors = int(match[1]), float(match[2]), int(match[3])
        ctx.log(f"    {conns:,} connections in {conn_seconds:.2f} s, {conn_errors} errors{match[4]}")
        time.sleep(1.0)
        rss2 = rss_bytes(relay.pid)
        assert client.popen.stdin is not None
        client.popen.stdin.write(b"verify\n")
        client.popen.stdin.flush()
        match = client.wait_for(r"verified ok=(\d+) errors=(\d+)(.*)", timeout=60 + n / 50)
        verified, verify_errors = int(match[1]), int(match[2])
        ctx.log(f"    echoed again on {verified:,} idle connections, {verify_errors} errors{match[3]}")
        rss3 = rss_bytes(relay.pid)
        agent_rss = rss_bytes(agent.pid)
        if relay.popen.poll() is not None:
            raise BenchError(f"the scale relay died\n{relay.tail()}")
    finally:
        for proc in reversed(started):
            procs.stop(proc)
    peak = max(rss2, rss3)
    errors = (n - tunnels) + (tunnels - conns) + (conns - verified) + verify_errors
    figures = [
        ("relay RSS", "MiB", peak / MiB),
        ("relay RSS, idle", "MiB", rss0 / MiB),
        ("bytes per tunnel", "bytes", (rss1 - rss0) / max(tunnels, 1)),
        ("bytes per connection", "bytes", (rss2 - rss1) / max(conns, 1)),
        ("time to open tunnels", "s", tunnel_seconds),
        ("time to open connections", "s", conn_seconds),
        ("errors", "", float(errors)),
        ("agent RSS", "MiB", agent_rss / MiB),
    ]
    for metric, unit, value in figures:
        s.add(Figure(metric, unit, "burrow", "burrow relay", [value], "lower", "", "burrow"))
    s.extra.update(
        rss_bytes={"idle": rss0, "tunnels": rss1, "connections": rss2, "after_verify": rss3},
        tunnels=tunnels,
        connections=conns,
        verified=verified,
    )
    judged = None if n < 10_000 else True
    ok = peak < 1024 * MiB and errors == 0
    s.checks.append(
        Check(
            f"{n:,} tunnels + {n:,} connections under 1 GiB relay RSS, no error",
            f"{peak / MiB:.0f} MiB, {errors} errors" + ("" if judged else " (N < 10,000: not judged)"),
            ok if judged else None,
        )
    )
    if st.quick and not ok:
        raise BenchError(f"scale: {errors} errors, {peak / MiB:.0f} MiB")
    s.extra["annotation"] = (
        f"{tunnels:,} tunnels: {(rss1 - rss0) / max(tunnels, 1):,.0f} B each, opened in {tunnel_seconds:.1f} s\n"
        f"{conns:,} TLS connections: {(rss2 - rss1) / max(conns, 1):,.0f} B each, opened in {conn_seconds:.1f} s\n"
        f"relay RSS {rss0 / MiB:.0f} MiB idle → {peak / MiB:.0f} MiB; errors: {errors}"
    )
    s.notes.append("One run (it is the expensive one): min = median = max.")
    return s


# ----------------------------------------------------------------------- 9-11


REDIS_CLIENTS = 50
REDIS_METRICS = ("SET", "GET", "SET -P 16", "GET -P 16")


def against_ssh(ctx: Context, s: Scenario, metric: str, unit: str, times: float = 1.5) -> Check:
    """burrow's raw TCP tunnel ≥ ``times`` × ssh -R's faster cipher on ``metric``, with the ratio to direct."""
    ours, direct = s.value("burrow", metric), s.value("direct", metric)
    ssh_key = best_of(s, ("ssh", "ssh-gcm"), metric, max)
    theirs = s.value(ssh_key, metric)
    return Check(
        f"burrow {metric} ≥ {times:g} × ssh -R (its faster cipher)",
        f"{ours:,.0f} vs {times:g} × {theirs:,.0f} = {times * theirs:,.0f} {unit} ({ours / theirs:.2f}× "
        f"{ctx.lab.paths[ssh_key].label}; {ours / direct:.2f}× direct)",
        ours >= times * theirs,
    )


def s9_redis(ctx: Context) -> Scenario:
    st = ctx.settings
    s = Scenario(
        "9",
        TITLES["9"],
        f"`redis-benchmark -c {REDIS_CLIENTS} -t set,get -n {st.redis_requests}` (one request at a time per "
        f"client) and `-P 16 -n {st.redis_pipelined}` (16 in flight per client) against redis-server through "
        "each path's plain TCP address; requests/s as redis-benchmark reports them.",
        chart=["GET", "GET -P 16"],
    )
    keys = tcp_paths(ctx)
    ctx.lab.prepare((key, "redis") for key in keys)

    def measure(_: str, ep: Endpoint) -> dict[str, float]:
        one = clients.redis_benchmark(ep, st.redis_requests, REDIS_CLIENTS)
        sixteen = clients.redis_benchmark(ep, st.redis_pipelined, REDIS_CLIENTS, pipeline=16)
        return {"SET": one["SET"], "GET": one["GET"], "SET -P 16": sixteen["SET"], "GET -P 16": sixteen["GET"]}

    data = run_paths(ctx, keys, "redis", measure)
    add_figures(ctx, s, data, [(m, "req/s", "higher") for m in REDIS_METRICS])
    s.checks.extend(against_ssh(ctx, s, metric, "req/s") for metric in REDIS_METRICS)
    return s


PGBENCH_CLIENTS = 8


def s10_pgbench(ctx: Context) -> Scenario:
    st = ctx.settings
    s = Scenario(
        "10",
        TITLES["10"],
        f"`pgbench -S -c {PGBENCH_CLIENTS} -j 2 -T {st.pgbench_seconds}` (select-only: one indexed SELECT per "
        f"transaction) against a PostgreSQL cluster (`pgbench -i -s {st.pgbench_scale}`, fsync off) through each "
        "path's plain TCP address; tps without the initial connection time, and pgbench's average latency.",
        chart=["tps"],
    )
    ctx.lab.pgbench_scale = st.pgbench_scale
    keys = tcp_paths(ctx)
    ctx.lab.prepare((key, "postgres") for key in keys)

    def measure(_: str, ep: Endpoint) -> dict[str, float]:
        result = clients.pgbench(ep, st.pgbench_seconds, PGBENCH_CLIENTS)
        return {"tps": result.tps, "latency": result.latency * 1e3}

    data = run_paths(ctx, keys, "postgres", measure)
    add_figures(ctx, s, data, [("tps", "tps", "higher"), ("latency", "ms", "lower")])
    s.checks.append(against_ssh(ctx, s, "tps", "tps"))
    return s


THREAD_TUNNELS = 8


def s11_relay_threads(ctx: Context) -> Scenario:
    st = ctx.settings
    s = Scenario(
        "11",
        TITLES["11"],
        f"{THREAD_TUNNELS} raw TCP tunnels, each its own `burrow forward` agent process and its own iperf3 "
        f"server, all {THREAD_TUNNELS} `iperf3 -R -t {st.bulk_seconds}` at once; the sum. Two relays side by side, "
        "`--threads 1` and `--threads 2`, measured in turn; relay CPU seconds (user + system, /proc) per GB "
        "moved. Everything (agents, iperf3, relay) shares this machine's cores.",
        chart=["aggregate"],
    )
    lab, procs = ctx.lab, ctx.procs
    servers = []
    for i in range(THREAD_TUNNELS):
        port = free_port()
        servers.append((procs.start(f"threads-iperf-{i}", ["iperf3", "-s", "-p", str(port)]), port))
    relays: dict[str, tuple[int, list[int]]] = {}  # key -> (relay pid, tunnel ports)
    for threads in (1, 2):
        relay, relay_port = lab.start_relay(f"threads-relay-{threads}", ["--threads", str(threads)])
        relay.wait_for(RELAY_READY)
        agents = [
            lab.start_agent(f"threads-agent-{threads}-{i}", port, relay_port) for i, (_, port) in enumerate(servers)
        ]
        relays[f"threads-{threads}"] = (relay.pid, [agent().tcp_port for agent in agents])
    for proc, port in servers:
        proc.wait_listening(port)
    data: dict[str, dict[str, list[float]]] = {key: {} for key in relays}

    def one(port: int) -> float:
        return clients.iperf3(clients.Endpoint("127.0.0.1", port), st.bulk_seconds).bits_per_second

    for run in range(st.runs):
        for key, (pid, ports) in relays.items():
            cpu = cpu_seconds(pid)
            with concurrent.futures.ThreadPoolExecutor(len(ports)) as pool:
                rates = list(pool.map(one, ports))
            cpu = cpu_seconds(pid) - cpu
            gigabytes = sum(rates) / 8 * st.bulk_seconds / 1e9
            values = {"aggregate": sum(rates) / 1e9, "relay CPU s/GB": cpu / gigabytes}
            for metric, value in values.items():
                data[key].setdefault(metric, []).append(value)
            ctx.log(f"    run {run + 1}/{st.runs}  {key:34} " + ", ".join(f"{m} {v:.4g}" for m, v in values.items()))
    for metric, unit, better in (("aggregate", "Gbit/s", "higher"), ("relay CPU s/GB", "s", "lower")):
        for key, threads in (("threads-1", 1), ("threads-2", 2)):
            label = f"burrow relay --threads {threads}"
            s.add(Figure(metric, unit, key, label, data[key][metric], better, "tcp", "burrow"))
    one_thread, two = s.value("threads-1", "aggregate"), s.value("threads-2", "aggregate")
    s.checks.append(
        Check(
            "2 relay threads ≥ 1.6 × 1 thread",
            f"{two:.2f} vs 1.6 × {one_thread:.2f} = {1.6 * one_thread:.2f} Gbit/s ({two / one_thread:.2f}×)",
            two >= 1.6 * one_thread,
        )
    )
    s.notes.append(
        f"This machine has {os.cpu_count()} CPUs for the relay, {THREAD_TUNNELS} agents (Python) and "
        f"{THREAD_TUNNELS} iperf3 pairs together: the relay's second thread can only show where the relay, not "
        "the agents, is what waits."
    )
    return s


TITLES = {
    "1": "Bulk throughput, one stream, raw TCP",
    "2": "Bulk throughput, one stream, TLS",
    "3": "Aggregate throughput, 32 parallel streams",
    "4": "Round-trip time, 1-byte ping-pong",
    "5": "New connection: connect, one byte, echo",
    "6": "HTTP keep-alive (wrk)",
    "7": "Tunnel creation",
    "8": "Scale: tunnels and idle connections on one relay",
    "9": "Redis: redis-benchmark SET/GET, 50 clients, and 16 pipelined",
    "10": "PostgreSQL: pgbench select-only, 8 clients",
    "11": "Relay threads: 8 tunnels at once, relay on 1 vs 2 threads",
}

SCENARIOS: dict[str, Callable[[Context], Scenario]] = {
    "1": s1_tcp_throughput,
    "2": s2_tls_throughput,
    "3": s3_parallel,
    "4": s4_rtt,
    "5": s5_new_connection,
    "6": s6_http,
    "7": s7_creation,
    "8": s8_scale,
    "9": s9_redis,
    "10": s10_pgbench,
    "11": s11_relay_threads,
}
