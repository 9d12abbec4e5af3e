"""A Jupyter server behind a burrow tunnel: its URL, with a fresh token, on stdout.

::

    python examples/jupyter.py                 # port 8888, notebooks from the current directory
    python examples/jupyter.py --port 9999 --root-dir ~/notebooks

The URL (``https://.../?token=...``) is the only line on stdout, so a script
can take it with ``URL=$(python examples/jupyter.py | head -1)``; Jupyter's
own log goes to stderr. Ctrl-C or SIGTERM stops Jupyter (its kernels and
terminals with it), then closes the tunnel.

The tunnel is opened first and Jupyter started after: the URL is known before
Jupyter starts (Jupyter is told to accept its host name), and a browser that
follows the URL at once waits, inside burrow, until Jupyter listens (a "held
dial", up to ``connect_timeout``). docs/examples.md explains each setting.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from types import FrameType

import burrow

#: Random bytes in Jupyter's token (the reference uses 13; 32 is what ``secrets`` itself suggests).
TOKEN_BYTES = 32
#: How long a connection through the tunnel waits for Jupyter to listen: it starts in 1-2 s
#: here, but a cold disk or a big environment can take many times that.
JUPYTER_START_TIMEOUT = 30.0
#: How long Jupyter may take to shut its kernels and terminals down after SIGTERM.
JUPYTER_STOP_TIMEOUT = 10.0


def jupyter_command(port: int, root_dir: str, tunnel: burrow.Tunnel, *extra: str) -> list[str]:
    """``jupyter server`` on loopback ``port``, for browsers that reach it through ``tunnel`` (and ``extra``
    settings of the caller's; examples/hub.py uses it too).

    The token is not here: it goes in the ``JUPYTER_TOKEN`` environment
    variable, because every local user can read a command line (``ps``).
    """
    command = [
        sys.executable,
        "-m",
        "jupyter_server",
        # loopback only: the tunnel's agent dials 127.0.0.1, nobody else needs to reach it
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        # the tunnel points at this port: fail if it is taken rather than move to the next one
        "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False",
        f"--ServerApp.root_dir={root_dir}",
        # Jupyter answers 403 to a Host header that is not local (DNS-rebinding protection).
        # The browser sends the tunnel's host name: accept that one name, keep the check for
        # all others (allow_remote_access=True would turn it off). No allow_origin: burrow
        # leaves the Host header alone, so the page's Origin matches it and websockets pass.
        f"--ServerApp.local_hostnames={json.dumps(['localhost', tunnel.host])}",
        f"--ServerApp.custom_display_url={tunnel.url}",  # Jupyter's log shows the public URL, not 127.0.0.1
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--ServerApp.allow_root=True")  # containers often run as root; Jupyter refuses by default
    return [*command, *extra]


def start_jupyter(port: int, root_dir: str, tunnel: burrow.Tunnel, token: str) -> subprocess.Popen[bytes]:
    """Start Jupyter in its own session: a terminal's Ctrl-C is ours to handle, not Jupyter's
    (on SIGINT it would ask "Shutdown this Jupyter server (y/[n])?" on the terminal)."""
    return subprocess.Popen(
        jupyter_command(port, root_dir, tunnel),
        # (without burrow's credentials: code in a notebook must not open tunnels on this account)
        env={
            **{k: v for k, v in os.environ.items() if k not in ("BURROW_TOKEN", "BURROW_TOKEN_FILE")},
            "JUPYTER_TOKEN": token,
        },
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr,  # stdout carries our URL and nothing else
        start_new_session=True,
    )


def stop_jupyter(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (Jupyter shuts its kernels down), then SIGKILL if it takes too long or we are asked twice."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(JUPYTER_STOP_TIMEOUT)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def port_is_free(port: int) -> bool:
    """Whether nothing listens on loopback ``port`` (else the tunnel would reach that instead)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM and SIGHUP end the program the way Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a Jupyter server behind a burrow tunnel; print its URL.")
    parser.add_argument("--port", type=int, default=8888, help="local port for Jupyter (default 8888)")
    parser.add_argument("--root-dir", default=os.getcwd(), help="where notebooks live (default: here)")
    args = parser.parse_args(argv)
    if not port_is_free(args.port):
        sys.exit(f"jupyter.py: local port {args.port} is in use; pick another with --port")
    # SIGINT too: a program started with `&` from a script inherits SIGINT ignored
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    jupyter: subprocess.Popen[bytes] | None = None
    try:
        with burrow.forward(args.port, connect_timeout=JUPYTER_START_TIMEOUT) as tunnel:
            try:
                jupyter = start_jupyter(args.port, args.root_dir, tunnel, token)
                print(f"{tunnel.url}/?token={token}", flush=True)
                code = jupyter.wait()
                print(f"jupyter.py: Jupyter exited with code {code}", file=sys.stderr)
                return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says
            finally:
                if jupyter is not None:
                    stop_jupyter(jupyter)
    except KeyboardInterrupt:
        return 0
    except burrow.BurrowError as exc:
        sys.exit(f"jupyter.py: {exc}")


if __name__ == "__main__":
    sys.exit(main())
