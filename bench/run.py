"""Run the bench: ``python -m bench.run [--quick] [--scenarios 1,2,...] [--profile]``.

Starts every server on loopback (free ports, a throwaway directory), runs the
chosen scenarios for burrow and each peer in this one run, writes
``bench/results/<timestamp>.{json,md,png}``, prints the Markdown table, and
stops every process it started, whatever happens (error, Ctrl-C, SIGTERM, the
time limit). Exit status: 0 when every scenario ran (targets may still fail:
see the table), 1 when one could not run, 3 when a required program is missing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report  # noqa: E402
from bench.lab import Lab, default_ssh_cipher  # noqa: E402
from bench.procs import BenchError, Procs, become_subreaper, raise_nofile  # noqa: E402
from bench.profile import Profiler  # noqa: E402
from bench.scenarios import FULL, QUICK, SCENARIOS, TITLES, Context  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

#: Debian packages that provide what the harness drives (``make bench`` installs them).
PROGRAMS = {
    "iperf3": "iperf3",
    "wrk": "wrk",
    "haproxy": "haproxy",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "/usr/sbin/sshd": "openssh-server",
    "redis-server": "redis-server",
    "redis-benchmark": "redis-tools",
    "pgbench": "postgresql",
}


def missing_programs() -> dict[str, str]:
    """{program: Debian package} for every required program not installed."""
    found = {}
    for program, package in PROGRAMS.items():
        if program.startswith("/"):
            ok = os.access(program, os.X_OK)
        else:
            ok = shutil.which(program) is not None or os.access(f"/usr/sbin/{program}", os.X_OK)
        if not ok:
            found[program] = package
    return found


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def machine() -> str:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} × {model}, Linux {platform.release()}"


def metadata(args: argparse.Namespace, stamp: str, runs: int) -> dict[str, Any]:
    def git(*cmd: str) -> str:
        return _version(["git", "-C", str(ROOT), *cmd])

    return {
        "timestamp": stamp,
        "load_average_at_start": os.getloadavg()[0],
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "quick": args.quick,
        "runs": runs,
        "machine": machine(),
        "git": f"{git('rev-parse', '--short', 'HEAD')}{' (dirty)' if git('status', '--porcelain') != '?' else ''}",
        "versions": {
            "burrow": _version([sys.executable, "-m", "burrow", "--version"]),
            "python": sys.version.split()[0],
            "openssh": _version(["ssh", "-V"]),
            "ssh default cipher": default_ssh_cipher(),
            "haproxy": _version(["haproxy", "-v"]),
            "iperf3": _version(["iperf3", "--version"]),
            "wrk": _version(["wrk", "-v"]),
            "openssl": _version(["openssl", "version"]),
        },
    }


class TimeLimit(BaseException):
    """The run took longer than --max-seconds."""


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _raise_time_limit(signum: int, frame: FrameType | None) -> None:
    raise TimeLimit()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per scenario, one run (CI smoke test)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, e.g. 1,2,7 (default: all)")
    parser.add_argument("--runs", type=int, help="runs per figure (default: 3, --quick: 1)")
    parser.add_argument("--profile", action="store_true", help="py-spy the relay and agent during 1 and 2")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results directory (default {RESULTS})")
    parser.add_argument("--max-seconds", type=int, help="stop everything after this long (default 3600, quick 120)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.chosen = chosen
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_programs()
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        print(f"bench: missing {', '.join(missing)}; run `make bench` or `apt-get install {packages}`", file=sys.stderr)
        return 3
    settings = QUICK if args.quick else FULL
    if args.runs:
        settings = type(settings)(**{**settings.__dict__, "runs": args.runs})
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    raise_nofile(65536)
    become_subreaper()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`cmd &`)
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGALRM, _raise_time_limit)
    signal.alarm(args.max_seconds or (120 if args.quick else 3600))

    workdir = Path(tempfile.mkdtemp(prefix="burrow-bench-"))
    procs = Procs(workdir)
    done: list[report.Scenario] = []
    failed = False
    started = time.monotonic()

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        meta = metadata(args, stamp, settings.runs)
        log(f"burrow bench {stamp}: scenarios {','.join(args.chosen)}, {settings.runs} run(s) each, work dir {workdir}")
        if meta["load_average_at_start"] > 0.5:
            log(f"bench: WARNING: load average {meta['load_average_at_start']:.2f}: other work shares these cores")
        lab = Lab(workdir, procs)
        profiler = Profiler(procs, args.out, stamp) if args.profile else None
        if profiler is not None:
            args.out.mkdir(parents=True, exist_ok=True)
        ctx = Context(lab, procs, settings, workdir, log, profiler)
        for sid in args.chosen:
            log(f"[{time.monotonic() - started:6.1f} s] scenario {sid}: {TITLES[sid]} (load {os.getloadavg()[0]:.2f})")
            try:
                scenario = SCENARIOS[sid](ctx)
            except (BenchError, OSError, RuntimeError, ValueError, KeyError) as exc:
                failed = True
                log(f"    scenario {sid} FAILED: {exc}")
                traceback.print_exc()
                scenario = report.Scenario(sid, TITLES[sid], "could not run")
                scenario.notes.append(f"ERROR: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            ctx.done[sid] = scenario
            done.append(scenario)
        meta["seconds"] = round(time.monotonic() - started, 1)
        meta["load_average_at_end"] = os.getloadavg()[0]
        if profiler is not None:
            meta["profiles"] = profiler.summaries
        paths = report.write(args.out, stamp, meta, done)
        from bench.chart import draw  # matplotlib: imported only when a run has something to draw

        paths["png"] = args.out / f"{stamp}.png"
        draw(paths["png"], meta, done)
        print(paths["md"].read_text())
        if profiler is not None:
            for name, summary in profiler.summaries.items():
                print(f"--- py-spy {name}\n{summary}\n")
        for kind, path in paths.items():
            log(f"wrote {kind}: {path}")
        return 1 if failed else 0
    except KeyboardInterrupt:
        log("bench: interrupted; stopping everything")
        return 130
    except TimeLimit:
        log("bench: time limit reached; stopping everything")
        return 1
    finally:
        signal.alarm(0)
        procs.stop_all()
        if args.keep:
            log(f"bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
