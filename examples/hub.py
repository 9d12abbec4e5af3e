"""A small Jupyter hub: every caller with the hub's token gets a notebook server of their own.

::

    export HUB_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe())')
    python examples/hub.py --port 8000 --idle-timeout 900
    curl -si -X POST -H "Authorization: Bearer $HUB_TOKEN" http://127.0.0.1:8000/notebooks
    # HTTP/1.0 303 See Other
    # Location: https://localhost:41873/?token=...

``POST /notebooks`` starts ``jupyter server`` on a free local port, with a
token of its own, in a fresh temporary directory; opens a burrow tunnel to
that port; and answers 303 to the tunnel's URL at once, while Jupyter is
still starting. That is safe because of burrow's held dials: a connection
that arrives before Jupyter listens waits for it (up to ``connect_timeout``).

A notebook is idle while no connection is open through its tunnel (an open
notebook page keeps its kernel's websocket open, so it counts as busy). One
idle for longer than ``--idle-timeout`` is stopped: its tunnel is closed, its
Jupyter is stopped, its directory removed. Ctrl-C or SIGTERM stops them all.

The hub listens on loopback; ``burrow forward 8000`` makes it public too.
The only line on stdout is the hub's own address; logs go to stderr.
"""

from __future__ import annotations

import argparse
import hmac
import itertools
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from urllib.parse import urlsplit

# the settings a Jupyter server needs behind a tunnel, one place for both examples (this directory is
# sys.path[0] when the hub runs as `python examples/hub.py`)
from jupyter import jupyter_command  # noqa: E402

import burrow

logger = logging.getLogger("hub")

#: Random bytes in each notebook's Jupyter token.
TOKEN_BYTES = 32
#: How long a connection through a notebook's tunnel waits for its Jupyter to listen: the
#: 303 is sent before Jupyter starts, which takes 1-2 s here, more on a loaded machine.
JUPYTER_START_TIMEOUT = 30.0
#: How long a Jupyter may take to shut its kernels and terminals down after SIGTERM.
JUPYTER_STOP_TIMEOUT = 10.0
#: Idle notebooks are looked for this often at most (a quarter of --idle-timeout if shorter),
#: so one is stopped at most this late.
IDLE_CHECK_INTERVAL = 1.0
#: 15 minutes, the reference hub's notebook lifetime.
DEFAULT_IDLE_TIMEOUT = 900.0
#: A client that never finishes its request does not hold a thread, nor the hub's shutdown: each read
#: waits at most REQUEST_TIMEOUT, and a whole request (a slow drip of bytes) at most REQUEST_DEADLINE.
REQUEST_TIMEOUT = 10.0
REQUEST_DEADLINE = 30.0
#: Notebooks running at once: each is a Jupyter server (~100 MB); the token's holders share them.
MAX_NOTEBOOKS = 32
#: What a notebook's kernels and terminals must not inherit from the hub: its own token, and burrow's
#: credentials (a notebook user could open tunnels on the hub's relay account).
PRIVATE_ENV = ("HUB_TOKEN", "BURROW_TOKEN", "BURROW_TOKEN_FILE")
#: A POST needs no body; a larger one is refused rather than read.
MAX_BODY = 64 * 1024


class HubFull(Exception):
    """MAX_NOTEBOOKS are running."""


class HubClosed(Exception):
    """The hub is stopping and starts no more notebooks."""


def free_port() -> int:
    """A loopback port nothing listens on just now (Jupyter fails, rather than moves, if one takes it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(eq=False)
class Notebook:
    """One caller's notebook server: a Jupyter process behind a tunnel of its own."""

    number: int
    port: int
    forward: burrow.Forward
    process: subprocess.Popen[bytes]
    root_dir: str
    url: str  # the tunnel's URL with Jupyter's token: only the caller gets it, logs never do
    last_active: float = field(default_factory=time.monotonic)
    connections_seen: int = 0

    def idle_for(self, now: float) -> float:
        """Seconds since a connection was last seen through the tunnel (or since the start).

        burrow's ``Forward.stats`` counts the tunnel's connections: one open
        now, or one opened since the last look, is activity.
        """
        stats = self.forward.stats
        if stats.open_connections or stats.total_connections != self.connections_seen:
            self.connections_seen = stats.total_connections
            self.last_active = now
        return now - self.last_active


class Hub:
    """The notebooks, and the thread that stops idle ones."""

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self._notebooks: dict[int, Notebook] = {}
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="hub-reaper")

    def start(self) -> None:
        self._reaper.start()

    def open_notebook(self) -> Notebook:
        """Open a tunnel to a free port, start Jupyter there, and return at once (Jupyter still starting).

        The tunnel comes first: its host name is one Jupyter must accept.
        """
        if self._closed.is_set():
            raise HubClosed
        with self._lock:
            if len(self._notebooks) >= MAX_NOTEBOOKS:
                raise HubFull
            number = next(self._numbers)
        port = free_port()
        token = secrets.token_urlsafe(TOKEN_BYTES)
        forward = burrow.forward(port, connect_timeout=JUPYTER_START_TIMEOUT)
        root_dir = tempfile.mkdtemp(prefix=f"hub-notebook-{number}-")
        try:
            tunnel = forward.open()
            env = {name: value for name, value in os.environ.items() if name not in PRIVATE_ENV}
            process = subprocess.Popen(
                # (many servers share the hub's stderr: warnings only)
                jupyter_command(port, root_dir, tunnel, "--ServerApp.log_level=WARN"),
                env={**env, "JUPYTER_TOKEN": token},
                cwd=root_dir,
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr,  # stdout carries the hub's address and nothing else
                start_new_session=True,  # a terminal's Ctrl-C reaches the hub, which stops each one
            )
        except BaseException:
            forward.close()
            shutil.rmtree(root_dir, ignore_errors=True)
            raise
        notebook = Notebook(number, port, forward, process, root_dir, f"{tunnel.url}/?token={token}")
        with self._lock:
            closed = self._closed.is_set()
            if not closed:
                self._notebooks[number] = notebook
        if closed:
            self._stop([(notebook, "the hub is stopping")])
            raise HubClosed
        logger.info("notebook %d: Jupyter (pid %d) on port %d at %s", number, process.pid, port, tunnel.url)
        return notebook

    def close(self) -> None:
        """Stop every notebook and close every tunnel; start no more."""
        self._closed.set()
        if self._reaper.is_alive():
            self._reaper.join()  # it may be stopping some: let it finish them
        with self._lock:
            notebooks, self._notebooks = list(self._notebooks.values()), {}
        self._stop([(notebook, "the hub is stopping") for notebook in notebooks])

    def _reap(self) -> None:
        interval = min(IDLE_CHECK_INTERVAL, self.idle_timeout / 4)
        while not self._closed.wait(interval):
            now = time.monotonic()
            done: list[tuple[Notebook, str]] = []
            with self._lock:
                for notebook in self._notebooks.values():
                    code = notebook.process.poll()
                    if code is not None:
                        done.append((notebook, f"Jupyter exited by itself with code {code}"))
                    elif notebook.idle_for(now) > self.idle_timeout:
                        done.append((notebook, f"idle for more than {self.idle_timeout:g} s"))
                for notebook, _ in done:
                    del self._notebooks[notebook.number]
            self._stop(done)

    @staticmethod
    def _stop(notebooks: list[tuple[Notebook, str]]) -> None:
        """Close the tunnels (the URLs stop answering at once), then stop the Jupyters, all together."""
        for notebook, _ in notebooks:
            notebook.forward.close()
            if notebook.process.poll() is None:
                notebook.process.terminate()  # Jupyter shuts its kernels and terminals down
        for notebook, reason in notebooks:
            try:
                notebook.process.wait(JUPYTER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(notebook.process.pid, signal.SIGKILL)
                notebook.process.wait()
            shutil.rmtree(notebook.root_dir, ignore_errors=True)
            logger.info("notebook %d: stopped (%s)", notebook.number, reason)


class HubServer(ThreadingHTTPServer):
    """The hub's HTTP server: a thread per request, all joined on close."""

    daemon_threads = False  # server_close() waits for requests in flight: none leaves a Jupyter behind

    def __init__(self, address: tuple[str, int], hub: Hub, token: str) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, HubHandler)
        self.hub = hub
        self._token = token.encode()

    def authorized(self, header: str) -> bool:
        """Whether ``Authorization`` is ``Bearer <HUB_TOKEN>`` (compared in constant time)."""
        scheme, _, given = header.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)


class HubHandler(BaseHTTPRequestHandler):
    """``POST /notebooks`` with ``Authorization: Bearer <HUB_TOKEN>``: 303 to a new notebook."""

    server: HubServer
    timeout = REQUEST_TIMEOUT

    def handle(self) -> None:
        # the whole request within REQUEST_DEADLINE: a byte every few seconds cannot hold this thread
        deadline = threading.Timer(REQUEST_DEADLINE, self._cut_off)
        deadline.start()
        try:
            super().handle()
        finally:
            deadline.cancel()

    def _cut_off(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._reply(400, "Content-Length is not a number")
            return
        if not 0 <= length <= MAX_BODY:
            self._reply(413, f"the body is over {MAX_BODY} bytes; POST /notebooks needs none")
            return
        self.rfile.read(length)
        if urlsplit(self.path).path != "/notebooks":
            self._reply(404, "no such path; POST /notebooks")
            return
        if not self.server.authorized(self.headers.get("Authorization", "")):
            self._reply(
                401, "missing or wrong token; send Authorization: Bearer $HUB_TOKEN", {"WWW-Authenticate": "Bearer"}
            )
            return
        try:
            notebook = self.server.hub.open_notebook()
        except HubClosed:
            self._reply(503, "the hub is stopping")
            return
        except HubFull:
            self._reply(503, f"the hub runs {MAX_NOTEBOOKS} notebooks, its limit; try again when one stops")
            return
        except (burrow.BurrowError, OSError) as exc:
            logger.warning("could not start a notebook: %s", exc)
            self._reply(503, f"could not start a notebook: {exc}")
            return
        # Jupyter is still starting: the browser's first request waits for it inside burrow.
        self._reply(303, notebook.url, {"Location": notebook.url})

    def _reply(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # a notebook's URL carries its token
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        logger.info("%s %s", self.address_string(), format % args)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM and SIGHUP stop the hub the way Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Give each caller a Jupyter server of their own behind a tunnel.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free one)")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        help=f"stop a notebook after this many seconds with no connection (default {DEFAULT_IDLE_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    token = os.environ.get("HUB_TOKEN", "")
    if not token:
        sys.exit("hub.py: HUB_TOKEN is not set; set it to the token callers send as Authorization: Bearer <token>")
    if not args.idle_timeout > 0:
        sys.exit(f"hub.py: --idle-timeout {args.idle_timeout:g} is not a positive number of seconds")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("hub: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    # SIGINT too: a program started with `&` from a script inherits SIGINT ignored
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    hub = Hub(args.idle_timeout)
    try:
        server = HubServer((args.host, args.port), hub, token)
    except OSError as exc:
        sys.exit(f"hub.py: cannot listen on {args.host}:{args.port} ({exc.strerror}); pick another --host/--port")
    host, port = str(server.server_address[0]), server.server_address[1]
    hub.start()
    print(f"http://{f'[{host}]' if ':' in host else host}:{port}/notebooks", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the cleanup below is bounded; let it finish
        logger.info("stopping")
        server.server_close()  # no new requests; the ones in flight finish
        hub.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
