"""py-spy profiles of burrow's processes while they carry a scenario's traffic (``--profile``).

py-spy samples the relay and the agent (``--native``: C frames too, so OpenSSL,
uvloop and the kernel-call wrappers show up) during one extra run of the
burrow path, whose numbers are not counted. The raw collapsed stacks are
kept next to the results (``flamegraph.pl`` or speedscope draw them); :func:`summarize` gives the
functions holding the most samples (self and inclusive).
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .procs import Proc, Procs

RATE = 200  # samples per second


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


@dataclass
class Recording:
    name: str
    raw: Path
    seconds: float
    proc: Proc


class Profiler:
    def __init__(self, procs: Procs, outdir: Path, stamp: str) -> None:
        self.procs = procs
        self.outdir = outdir
        self.stamp = stamp
        self.summaries: dict[str, str] = {}

    def start(self, name: str, pid: int, seconds: float) -> Recording:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
        raw = self.outdir / f"{self.stamp}-profile-{name}.txt"
        argv = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(RATE)]
        argv += ["--native", "--format", "raw", "--output", str(raw)]
        return Recording(name, raw, seconds, self.procs.start(f"py-spy-{name}", argv))

    def finish(self, rec: Recording) -> str:
        try:
            rec.proc.popen.wait(timeout=rec.seconds + 60)
        except subprocess.TimeoutExpired:
            pass
        self.procs.stop(rec.proc)
        if not rec.raw.exists():
            summary = f"(py-spy wrote nothing)\n{rec.proc.tail()}"
        else:
            summary = summarize(rec.raw.read_text(), rec.seconds * RATE)
        self.summaries[rec.name] = summary
        (self.outdir / f"{self.stamp}-profile-{rec.name}.summary.txt").write_text(summary + "\n")
        return summary


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*)\)$")
IDLE = {
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "clock_nanosleep", "nanosleep", "select", "poll", "ppoll",
    "futex", "__futex_abstimed_wait_common", "pthread_cond_wait", "pthread_cond_timedwait", "sem_wait",
    "sem_timedwait", "__GI___poll", "do_futex_wait",
}  # fmt: skip
#: A frame anywhere in the stack that means the thread is blocked, not running (an executor
#: thread waiting for work shows up as unresolved libc frames under these).
BLOCKED = {"PyThread_acquire_lock_timed", "PyThread_acquire_lock", "take_gil", "pthread_cond_wait",
           "pthread_cond_timedwait", "sem_clockwait", "sem_timedwait", "sem_wait"}  # fmt: skip
SYSCALLS = {"write", "read", "writev", "readv", "send", "recv", "sendmsg", "recvmsg", "sendto", "recvfrom",
            "__libc_write", "__libc_read", "accept4", "connect", "close", "shutdown"}  # fmt: skip


def _parse(frame: str) -> tuple[str, str]:
    """(function, where) of ``func (file:line)``; unresolved native addresses become ``[lib]``."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), ""
    func, where = match["func"], match["where"]
    if func.startswith("0x"):
        func = f"[{where}]"
    return func, where


def _category(func: str, where: str) -> str:
    if func in SYSCALLS:
        return "kernel: socket read/write syscalls"
    if "libcrypto" in where:
        return "OpenSSL libcrypto (ciphers, hashes)"
    if "libssl" in where:
        return "OpenSSL libssl (TLS records)"
    if where.startswith("libc.so"):
        return "libc (memcpy, malloc, ...)"
    if where.startswith("_ssl.c"):
        return "CPython ssl module (_ssl.c)"
    if where.startswith(("loop.c", "core.c", "linux.c", "stream.c", "tcp.c", "uv")):
        return "uvloop / libuv"
    if where.startswith("burrow/"):
        return "burrow Python code"
    if ".py:" in where or where.startswith("<"):
        return "other Python code (stdlib)"
    return "CPython interpreter and other native"


def _site(where: str) -> str:
    return where.rsplit("/", 1)[-1]


def summarize(raw: str, expected_samples: float, top: int = 15) -> str:
    """Where the on-CPU samples of one process went, from py-spy's collapsed stacks ('raw').

    Samples whose innermost frame waits (epoll, sleep, futex), or that wait for a lock or
    the GIL anywhere in the stack, are idle and left out.
    """
    leaf: collections.Counter[str] = collections.Counter()
    categories: collections.Counter[str] = collections.Counter()
    burrow: collections.Counter[str] = collections.Counter()
    python_site: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_parse(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f[0].startswith(("process ", "thread "))]
        if not frames:
            continue
        func, where = frames[-1]
        if func in IDLE or any(f in BLOCKED for f, _ in frames):
            idle += count
            continue
        busy += count
        leaf[f"{func} ({_site(where)})" if not func.startswith("[") else func] += count
        categories[_category(func, where)] += count
        seen = set()
        for f, w in frames:
            if w.startswith("burrow/"):
                name = f"{f} ({w.rsplit(':', 1)[0]})"
                if name not in seen:
                    seen.add(name)
                    burrow[name] += count
        python = [(f, w) for f, w in frames if ".py:" in w]
        if python:
            f, w = python[-1]
            python_site[f"{f} ({_site(w)})"] += count
    if not busy:
        return f"no on-CPU samples ({idle} idle)"

    def pct(counter: collections.Counter[str], n: int) -> list[str]:
        return [f"  {100 * c / busy:5.1f}%  {name}" for name, c in counter.most_common(n)]

    load = 100 * busy / expected_samples if expected_samples else 0.0
    lines = [f"{busy} on-CPU samples (~{load:.0f}% of one core at {RATE} Hz), {idle} idle", ""]
    lines += ["by kind of code (innermost frame):", *pct(categories, 10), ""]
    lines += ["innermost frames (self):", *pct(leaf, top), ""]
    lines += ["innermost Python frame (the line that led there):", *pct(python_site, top), ""]
    lines += ["burrow functions (inclusive):", *pct(burrow, top)]
    return "\n".join(lines)
