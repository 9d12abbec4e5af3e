"""``burrow run --port P -- CMD ...``: start a service, tunnel it once it listens, end with it.

For programs that spawn a server and want its public URL (``--json``: one
line on stdout), and for people who would otherwise start the server, wait,
and start ``burrow forward`` by hand.

- CMD is started first. burrow waits until loopback ``P`` accepts connections
  (``--ready-timeout``, default 30 s). If CMD exits first, or the time runs
  out (CMD is then terminated), that is one line on stderr and a non-zero exit.
- Then the tunnel opens and its address is printed; with ``--json``, exactly
  one line on stdout, ``{"url", "tls_socket", "tcp_socket"}``, and CMD's own
  stdout goes to stderr so that the line stays alone.
- SIGINT, SIGTERM and SIGHUP sent to burrow go to CMD, once: a Ctrl-C at a
  terminal reaches CMD directly (it is in the terminal's process group), so
  burrow forwards a SIGINT only when someone sent it with kill(). burrow
  waits for CMD, closes the tunnel, and exits with CMD's exit code
  (128 + N when a signal N ended it).
- If the relay closes the tunnel for good, CMD is terminated and burrow exits 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from .agent.forward import Forward
from .errors import ConfigurationError

#: Signals burrow passes on to CMD.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: How often burrow looks at CMD and its port while waiting.
POLL = 0.05

#: After SIGTERM, how long CMD has before SIGKILL (when burrow is the one stopping it).
TERMINATE_GRACE = 5.0

#: si_code of a signal the kernel sent for a terminal (Ctrl-C, hang-up), as opposed to kill().
SI_KERNEL = 0x80


class RunFailed(ConfigurationError):
    """CMD could not be started, or never listened; carries the exit code to use."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def exit_code(returncode: int) -> int:
    """A child's ``returncode`` as a shell would report it (128 + N for signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def _unblock() -> None:  # (in the child, before exec: it must not inherit burrow's blocked signals)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)


def start(command: Sequence[str], json_output: bool) -> subprocess.Popen[bytes]:
    """Start CMD, with burrow's own handling of the forwarded signals set up first."""
    # blocked here, before any thread starts, so every thread inherits it and the signals
    # wait for wait_for_exit(): it learns who sent each one (sigtimedwait gives si_code)
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        return subprocess.Popen(
            list(command),
            stdout=sys.stderr.fileno() if json_output else None,
            preexec_fn=_unblock,  # (no thread of burrow runs yet)
        )
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        raise RunFailed(f"cannot start {command[0]!r} ({exc.strerror or exc}); check the command after --") from None


def wait_until_listening(
    child: subprocess.Popen[bytes], port: int, timeout: float, listening: Callable[[int], bool]
) -> None:
    """Return once ``port`` accepts; RunFailed (CMD stopped) if CMD ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    name = _name(child)
    while True:
        code = child.poll()
        if code is not None:
            raise RunFailed(
                f"{name} exited with code {exit_code(code)} before listening on port {port}", exit_code(code) or 1
            )
        if listening(port):
            return
        if time.monotonic() >= deadline:
            stop(child)
            raise RunFailed(
                f"{name} did not listen on port {port} within {timeout:g} s (--ready-timeout); it was stopped. "
                "Check the port it listens on"
            )
        _forward_signals(child, POLL)


def pause(child: subprocess.Popen[bytes], seconds: float) -> None:
    """Wait ``seconds`` passing signals on to CMD; RunFailed if CMD ends meanwhile."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        _forward_signals(child, min(left, POLL))
        code = child.poll()
        if code is not None:
            raise RunFailed(f"{_name(child)} exited with code {exit_code(code)}", exit_code(code) or 1)


def _name(child: subprocess.Popen[bytes]) -> str:
    return os.path.basename(str(child.args[0])) if isinstance(child.args, list) else str(child.args)


def _forward_signals(child: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait up to ``timeout`` for a forwarded signal, and pass it on to CMD."""
    info = signal.sigtimedwait(FORWARDED, timeout)
    if info is None or child.poll() is not None:
        return
    if info.si_signo == signal.SIGINT and info.si_code == SI_KERNEL:
        return  # Ctrl-C at the terminal: CMD, in the same process group, has it already
    child.send_signal(info.si_signo)


def stop(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after a grace period; reaped."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(TERMINATE_GRACE)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def address_line(forward: Forward) -> str:
    """The ``--json`` line: where the public Internet reaches the tunnel."""
    tunnel = forward.tunnel
    tcp = list(tunnel.tcp_socket) if tunnel.unencrypted_port is not None else None
    return json.dumps({"url": tunnel.url, "tls_socket": list(tunnel.tls_socket), "tcp_socket": tcp})


def serve(child: subprocess.Popen[bytes], forward: Forward) -> int:
    """Pass signals on until CMD ends (its exit code) or the relay closes the tunnel (1)."""
    while child.poll() is None:
        if not forward.is_open:
            print("burrow run: the relay closed the tunnel; stopping the command", file=sys.stderr, flush=True)
            stop(child)
            return 1
        _forward_signals(child, 0.2)
    return exit_code(child.returncode)
