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


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py:123)``; native frames as they are."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    where = match["where"].rsplit("/", 1)[-1]
    return f"{match['func']} ({where})"


def summarize(raw: str, expected_samples: float, top: int = 18) -> str:
    """Top frames by self and inclusive samples, from py-spy's collapsed-stack ('raw') output."""
    self_count: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        self_count[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples"
    busy = 100 * total / expected_samples if expected_samples else 0
    lines = [f"{total} samples with a thread on CPU (~{busy:.0f}% of one core at {RATE} Hz)", "", "self:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_count.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(top)]
    return "\n".join(lines)
