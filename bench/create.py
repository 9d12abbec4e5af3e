"""Scenario 7's driver: how long a new tunnel takes, from entering forward() to the first echo.

``python -m bench.create MODE --count N --port ECHO_PORT [...]`` prints one JSON
object per sample (seconds): ``{"total", "open", "first_request", "retries"}``.

- ``warm``: one process, its agent session to the relay already up (a keeper
  tunnel on another port holds it); each sample is ``burrow.forward(port,
  relay=...)``, ``open()``, then a TLS connection to the new URL (SNI
  ``<id>.localhost``, verified against the dev CA) sending one byte and reading
  its echo. ``close()`` happens after the clock stops.
- ``cold``: from nothing: each sample is a new Python process that imports
  burrow (timed, reported beside the figures, outside the clock) and nothing
  else, then starts the clock: no loop thread, no session, no TLS context
  yet, so the clock includes starting burrow's loop thread, OpenSSL's
  once-per-process set-up, TCP + TLS to the relay, HELLO, BIND and the
  request. The measuring client makes its own context after ``open()``, and
  that step is left out.
- ``fork``: the same in a child forked from a process that has imported
  burrow and nothing more (a pre-fork server's worker opening its first
  tunnel). A forked child
  pays for its first writes to the parent's pages (copy-on-write faults, ~1,100
  during ``open()``, and a garbage-collector pass over the parent's young
  objects): 3–4 ms more than a new process on this machine.
- ``direct-tls``: no tunnel: the same client's TLS connection straight to the
  echo service's own TLS listener (``--tls-port``, SNI ``--sni``), the floor
  under the warm figure: the client's connection alone costs this much.
- ``ssh-cold``: the peer: a new ``ssh -N -R`` process per sample, until one
  byte echoes through its remote port (plain TCP: ssh -R has no TLS URL).
- ``ssh-warm``: a ControlMaster connection is up; each sample is ``ssh -O
  forward -R ...`` on it, until one byte echoes (then ``-O cancel``).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

clock = time.perf_counter
RETRY_FOR = 5.0  # s a sample may retry its first request before it counts as an error


def echo_once(connect: Callable[[], socket.socket]) -> int:
    """Connect, send a byte, read it back; retry until it works. The number of retries."""
    retries = 0
    deadline = clock() + RETRY_FOR
    while True:
        try:
            with connect() as sock:
                sock.sendall(b"c")
                if sock.recv(16) == b"c":
                    return retries
        except OSError:
            pass
        retries += 1
        if clock() > deadline:
            raise RuntimeError(f"no echo after {retries} tries")
        time.sleep(0.0005)


#: The client's names go to ``socket`` and ``ssl`` as ASCII bytes: given a str, both
#: run the IDNA codec, whose first use imports ``encodings.idna`` (2.5-5 ms), and the
#: measuring client would pay that lazy import of its own inside the clock, or not,
#: depending on whether burrow happened to import it first.
LOOPBACK: Any = b"127.0.0.1"


def tcp_connect(port: int) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.create_connection((LOOPBACK, port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return connect


def tls_connect(context: ssl.SSLContext, host: str, port: int) -> Callable[[], socket.socket]:
    # ASCII names as bytes (see LOOPBACK)
    name: Any = host.encode("ascii")

    def connect() -> socket.socket:
        sock = tcp_connect(port)()
        try:
            return context.wrap_socket(sock, server_hostname=name)
        except BaseException:
            sock.close()
            raise

    return connect


# ------------------------------------------------------------------- burrow


def burrow_sample(relay: str, port: int, context: ssl.SSLContext | None, ca: str) -> dict[str, float]:
    """One tunnel: forward(), open(), then the client's first request.

    ``context`` None (cold): the client makes its context after ``open()`` and
    that step is left out of the figures. Made before the clock, it would pay
    OpenSSL's once-per-process set-up (the first ``SSLContext()`` of a process
    costs ~2.6 ms, a later one ~0.4) that a process running only burrow pays
    in ``open()``.
    """
    import burrow

    start = clock()
    forward = burrow.forward(port, relay=relay)
    tunnel = forward.open()
    opened = clock()
    if context is None:
        context = ssl.create_default_context(cafile=ca)
    ready = clock()
    host, tls_port = tunnel.tls_socket
    retries = echo_once(tls_connect(context, host, tls_port))
    done = clock()
    forward.close()
    return {
        "total": (opened - start) + (done - ready),
        "open": opened - start,
        "first_request": done - ready,
        "retries": retries,
    }


def run_direct_tls(args: argparse.Namespace, context: ssl.SSLContext, emit: Callable[[dict[str, float]], None]) -> None:
    connect = tls_connect(context, args.sni, args.tls_port)
    for _ in range(args.count):
        start = clock()
        retries = echo_once(connect)
        done = clock()
        emit({"total": done - start, "open": 0.0, "first_request": done - start, "retries": retries})


def run_warm(args: argparse.Namespace, context: ssl.SSLContext, emit: Callable[[dict[str, float]], None]) -> None:
    import burrow

    keeper = burrow.forward(args.keeper_port, relay=args.relay)
    keeper.open()  # the session is up from here on
    try:
        for _ in range(args.count):
            emit(burrow_sample(args.relay, args.port, context, args.ca))
    finally:
        keeper.close()


#: A cold sample's process: ``import burrow`` first (timed, reported beside the
#: figures), then :func:`run_cold_sample` by way of :func:`main`.
COLD_SAMPLE = (
    "import time; t = time.perf_counter(); import burrow; t = time.perf_counter() - t; import sys; "
    "from bench.create import main; sys.exit(main([*sys.argv[1:], '--import-seconds', repr(t)]))"
)


def run_cold(args: argparse.Namespace, emit: Callable[[dict[str, float]], None]) -> None:
    argv = [sys.executable, "-c", COLD_SAMPLE, "cold-sample", "--count", "1", "--port", str(args.port)]
    argv += ["--relay", args.relay, "--ca", args.ca]
    for _ in range(args.count):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise RuntimeError("cold sample failed: no answer within 60 s") from None
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"cold sample failed: {(done.stderr or done.stdout)[-500:]}")
        emit(json.loads(lines[-1]))


def run_cold_sample(args: argparse.Namespace, emit: Callable[[dict[str, float]], None]) -> None:
    """One cold sample in this new process (``run_cold`` starts one per sample)."""
    sample = burrow_sample(args.relay, args.port, None, args.ca)
    emit({**sample, "import": args.import_seconds})


def run_fork(args: argparse.Namespace, emit: Callable[[dict[str, float]], None]) -> None:
    import burrow  # noqa: F401  (imported once here; each child starts from this state)

    for _ in range(args.count):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one sample, then exit without running the parent's cleanup
            os.close(read_end)
            code = 0
            try:
                result = burrow_sample(args.relay, args.port, None, args.ca)
                os.write(write_end, json.dumps(result).encode())
            except BaseException as exc:  # noqa: BLE001
                os.write(write_end, json.dumps({"error": repr(exc)}).encode())
                code = 1
            os._exit(code)
        os.close(write_end)
        ready, _, _ = select.select([read_end], [], [], 60)
        data = os.read(read_end, 65536) if ready else b""
        os.close(read_end)
        if not data:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        result = json.loads(data or b'{"error": "timeout"}')
        if "error" in result:
            raise RuntimeError(f"forked sample failed: {result['error']}")
        emit(result)


# ---------------------------------------------------------------------- ssh


def ssh_base(args: argparse.Namespace) -> list[str]:
    return [
        "ssh", "-F", "/dev/null", "-T",
        "-i", args.ssh_key, "-p", str(args.sshd_port),
        "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ssh_cold(args: argparse.Namespace, emit: Callable[[dict[str, float]], None]) -> None:
    for _ in range(args.count):
        remote = free_port()
        forward = f"127.0.0.1:{remote}:127.0.0.1:{args.port}"
        start = clock()
        proc = subprocess.Popen(
            [*ssh_base(args), "-N", "-R", forward, f"{args.user}@127.0.0.1"], stdin=subprocess.DEVNULL
        )
        try:
            retries = echo_once(tcp_connect(remote))
            done = clock()
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        emit({"total": done - start, "open": 0.0, "first_request": 0.0, "retries": retries})


def run_ssh_warm(args: argparse.Namespace, emit: Callable[[dict[str, float]], None]) -> None:
    control = Path(args.control_dir) / "master.sock"
    target = f"{args.user}@127.0.0.1"
    master = subprocess.Popen([*ssh_base(args), "-N", "-M", "-S", str(control), target], stdin=subprocess.DEVNULL)
    try:
        deadline = clock() + 20
        while subprocess.run(["ssh", "-S", str(control), "-O", "check", target], capture_output=True).returncode:
            if clock() > deadline or master.poll() is not None:
                raise RuntimeError("the ssh ControlMaster did not come up")
            time.sleep(0.01)
        for _ in range(args.count):
            remote = free_port()
            forward = f"127.0.0.1:{remote}:127.0.0.1:{args.port}"
            start = clock()
            subprocess.run(["ssh", "-S", str(control), "-O", "forward", "-R", forward, target], check=True,
                           capture_output=True)  # fmt: skip
            opened = clock()
            retries = echo_once(tcp_connect(remote))
            done = clock()
            subprocess.run(["ssh", "-S", str(control), "-O", "cancel", "-R", forward, target], capture_output=True)
            emit({"total": done - start, "open": opened - start, "first_request": done - opened, "retries": retries})
    finally:
        master.terminate()
        master.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.create")
    parser.add_argument("mode", choices=["warm", "cold", "cold-sample", "fork", "direct-tls", "ssh-cold", "ssh-warm"])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="the local echo service")
    parser.add_argument("--relay", help="burrow relay host:port")
    parser.add_argument("--ca", help="CA to verify the relay's tunnel certificates")
    parser.add_argument("--tls-port", type=int, help="direct-tls: the echo service's TLS listener")
    parser.add_argument("--sni", help="direct-tls: the name its certificate is for")
    parser.add_argument("--keeper-port", type=int, default=1, help="warm: port of the tunnel holding the session")
    parser.add_argument("--sshd-port", type=int)
    parser.add_argument("--ssh-key")
    parser.add_argument("--user", default="root")
    parser.add_argument("--control-dir", default="/tmp")
    parser.add_argument("--import-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    needs = {"direct-tls": ("tls_port", "sni", "ca"), "ssh-cold": ("sshd_port", "ssh_key")}
    needs["ssh-warm"] = needs["ssh-cold"]
    for name in needs.get(args.mode, ("relay", "ca")):
        if getattr(args, name) is None:
            parser.error(f"mode {args.mode} needs --{name.replace('_', '-')}")

    def emit(sample: dict[str, float]) -> None:
        print(json.dumps(sample), flush=True)

    if args.mode == "cold":
        run_cold(args, emit)
    elif args.mode == "cold-sample":
        run_cold_sample(args, emit)
    elif args.mode == "fork":
        run_fork(args, emit)
    elif args.mode in ("warm", "direct-tls"):
        context = ssl.create_default_context(cafile=args.ca)
        (run_warm if args.mode == "warm" else run_direct_tls)(args, context, emit)
    elif args.mode == "ssh-cold":
        run_ssh_cold(args, emit)
    else:
        run_ssh_warm(args, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
