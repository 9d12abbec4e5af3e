"""Child processes of a bench run: each in its own process group, all killed at the end.

Every process is started with ``start_new_session`` (so its whole group can be
signalled, sshd's per-connection children included) and with
``PR_SET_PDEATHSIG`` (so it dies with the harness even if the harness is
SIGKILLed). :meth:`Procs.stop_all` runs from a ``finally`` in ``bench.run``.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not glibc: no death signal, stop_all still cleans up
    _libc = None


class BenchError(RuntimeError):
    """A bench step failed; the message says which and shows the relevant log."""


def become_subreaper() -> None:
    """Orphans of our children (sshd's session processes) come to us to be reaped, not to init."""
    if _libc is not None:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1)


def reap_orphans() -> None:
    """Reap the descendants that outlived their parents (we are their subreaper; stop_all killed them)."""
    for _ in range(100):
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.02)


def raise_nofile(limit: int) -> int:
    """Raise RLIMIT_NOFILE to at least ``limit`` (the hard limit too, when allowed); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= limit:
        return soft
    if hard == resource.RLIM_INFINITY or hard >= limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        return limit
    try:  # root (CAP_SYS_RESOURCE) may raise the hard limit up to fs.nr_open
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        return limit
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard


def _preexec(nofile: int | None) -> Callable[[], None]:
    def run() -> None:
        if _libc is not None:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if nofile:
            raise_nofile(nofile)

    return run


@dataclass
class Proc:
    """One started process, its log file, and how to wait on what it prints."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with code {code}: {' '.join(self.argv)}\n{self.tail()}")

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait until the log matches ``pattern`` (multi-line regex)."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text())
            if match:
                return match
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {pattern!r} within {timeout:.0f} s\n{self.tail()}")
            time.sleep(0.01)

    def wait_listening(self, port: int, timeout: float = 20.0) -> None:
        """Wait until something listens on TCP ``port`` (read from /proc: nothing connects)."""
        deadline = time.monotonic() + timeout
        while not is_listening(port):
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: nothing listens on port {port} after {timeout:.0f} s\n{self.tail()}")
            time.sleep(0.01)


class Procs:
    """Starts processes with logs in one directory; stops them all, whatever happened."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[Proc] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str | None] | None = None,
        nofile: int | None = None,
        stdin: int | None = subprocess.DEVNULL,
        cwd: Path | None = None,
        user: str | None = None,
    ) -> Proc:
        log = self.logdir / f"{name}.log"
        serial = 1
        while log.exists():  # one log per process, even when a name comes back
            serial += 1
            log = self.logdir / f"{name}-{serial}.log"
        merged = dict(os.environ)
        for key, value in (env or {}).items():  # None: remove from the environment
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=merged,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_preexec(nofile),
                user=user,
                group=user,
                extra_groups=[] if user else None,
            )
        proc = Proc(name, popen, log, list(argv))
        self.running.append(proc)
        return proc

    def run(self, name: str, argv: Sequence[str], *, timeout: float, **kwargs: object) -> str:
        """Start, wait for exit (at most ``timeout`` s), stop its group; its output. Raises on failure."""
        proc = self.start(name, argv, **kwargs)  # type: ignore[arg-type]
        try:
            code = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{name} did not finish within {timeout:.0f} s\n{proc.tail()}") from None
        finally:
            self.stop(proc)
        if code != 0:
            raise BenchError(f"{name} failed (exit {code}): {' '.join(argv)}\n{proc.tail()}")
        return proc.text()

    def stop(self, proc: Proc, grace: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds."""
        if proc in self.running:
            self.running.remove(proc)
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, signal.SIGKILL)
        try:
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        if proc.popen.stdin is not None:
            proc.popen.stdin.close()

    def stop_all(self) -> None:
        """Stop everything, most recent first (clients before their servers)."""
        procs, self.running = list(reversed(self.running)), []
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for proc in procs:
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)
            try:
                proc.popen.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                pass
            if proc.popen.stdin is not None:
                proc.popen.stdin.close()
        reap_orphans()


def _signal_group(proc: Proc, sig: int) -> None:
    try:
        os.killpg(proc.popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


#: Ports the harness hands out: below burrow's raw TCP range (20000-32767) and Linux's
#: ephemeral range (32768-60999), so that no port-0 bind (services, outgoing connections)
#: can take a port between our choosing it and the server binding it.
PORT_RANGE = (10000, 19999)
_next_port = [PORT_RANGE[0] + random.randrange(PORT_RANGE[1] - PORT_RANGE[0])]


def free_port() -> int:
    """A loopback TCP port nothing uses just now, never the same twice in a run."""
    low, high = PORT_RANGE
    for _ in range(high - low):
        port = _next_port[0]
        _next_port[0] = low if port >= high else port + 1
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            if not is_listening(port):
                return port
    raise BenchError(f"no free port in {low}-{high}")


def is_listening(port: int) -> bool:
    """True when a socket listens on ``port`` (any address), per /proc/net/tcp{,6}."""
    hexport = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    parts = line.split(None, 4)
                    if parts[1].endswith(hexport) and parts[3] == "0A":
                        return True
        except OSError:
            continue
    return False


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int, descendants: bool = False) -> float:
    """User + system CPU seconds of a running process (/proc/PID/stat), and of its live descendants."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # (gone meanwhile)
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if descendants:
        for child in _children(pid):
            total += cpu_seconds(child, True)
    return total


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found
