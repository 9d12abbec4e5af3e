"""The examples run as a user runs them: Jupyter behind a tunnel (a kernel, a web terminal), and the hub.

Each example is a real subprocess (``sys.executable examples/...``) on the
embedded relay; BURROW_HOME (set by conftest, inherited) makes its dev CA the
test session's. Jupyter's own files go to a temporary directory. The clients
are real: httpx, http.client and the websockets package, trusting that CA.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from burrow.paths import dev_ca_path
from burrow.relay.config import RelayConfig

from ..helpers import free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

#: Jupyter starts in 1-2 s here; a loaded CI machine gets ten times that.
START_TIMEOUT = 30.0
#: Each exchange with Jupyter (a REST call, a kernel's answer, a shell's echo).
REPLY_TIMEOUT = 20.0
#: The hub's --idle-timeout in these tests: short, but longer than a request takes.
IDLE_TIMEOUT = 3.0

pytestmark = pytest.mark.timeout(90)

#: https://localhost:PORT is the native engine's; the asyncio one gives <id>.localhost, which
#: Python's resolver does not know (tests/e2e/test_clients.py).
native_only = pytest.mark.skipif(
    RelayConfig().engine != "native", reason="https://localhost:PORT is the native engine's (BURROW_ENGINE)"
)


class Program:
    """A command in the background; threads collect its stdout and stderr lines as they come."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.out: list[str] = []
        self.err: list[str] = []
        self._ended: list[list[str]] = []  # the streams at EOF: no more lines will come
        self._changed = threading.Condition()
        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    def _read(self, stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended.append(lines)
            self._changed.notify_all()

    def wait_for(self, pattern: str, *, stdout: bool = False, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first line of stderr (or stdout) that ``pattern`` matches, waiting for it."""
        lines = self.out if stdout else self.err
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in lines:
                    if match := re.search(pattern, line):
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or any(ended is lines for ended in self._ended):
                    raise AssertionError(f"{pattern!r} not in {'stdout' if stdout else 'stderr'}\n{self}")
                self._changed.wait(left)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, as a service manager stops it; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def __str__(self) -> str:
        with self._changed:
            return "\n".join(["stdout:", *self.out, "stderr:", *self.err])


def assert_clean(program: Program) -> None:
    """No traceback anywhere in a stopped program's output."""
    assert "Traceback" not in str(program), str(program)


def example(script: str, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / script), *args]


def tls_context() -> ssl.SSLContext:
    """A client context trusting the embedded relay's dev CA (it exists once an example printed a URL)."""
    return ssl.create_default_context(cafile=str(dev_ca_path()))


def refused(port: int) -> bool:
    """Whether nothing accepts on loopback ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture(scope="module")
def jupyter_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tests' environment, with Jupyter's config, data and runtime files in a temporary directory."""
    home = tmp_path_factory.mktemp("jupyter-home")
    names = ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR")
    return {**os.environ, **{name: str(home / name.lower()) for name in names}}


# ------------------------------------------------------------------ examples/jupyter.py


@dataclass
class Jupyter:
    """examples/jupyter.py running: its tunnel's base URL and Jupyter's token."""

    base: str
    token: str
    program: Program
    listening_when_printed: bool  # whether Jupyter accepted on its port when the URL came out

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def wss(self, path: str) -> str:
        """A websocket URL through the tunnel, with a client session id as Jupyter's own pages send."""
        return f"wss://{self.base.removeprefix('https://')}{path}?session_id={uuid.uuid4().hex}"


def start_jupyter_example(env: dict[str, str], root_dir: Path) -> tuple[Jupyter, int]:
    """Run examples/jupyter.py; its URL line, parsed; and the local port Jupyter listens on."""
    port = free_port()
    program = Program(example("jupyter.py", "--port", str(port), "--root-dir", str(root_dir)), env)
    try:
        match = program.wait_for(r"^(https://\S+)/\?token=([\w-]+)$", stdout=True)
    except BaseException:
        program.stop()
        raise
    return Jupyter(match.group(1), match.group(2), program, not refused(port)), port


@pytest.fixture(scope="module")
def jupyter(jupyter_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jupyter]:
    """One Jupyter behind one tunnel for the module's Jupyter tests (it takes a second or two to start)."""
    server, _ = start_jupyter_example(jupyter_env, tmp_path_factory.mktemp("notebooks"))
    try:
        yield server
    finally:
        assert server.program.stop() == 0, str(server.program)
        assert server.program.out == [f"{server.base}/?token={server.token}"]  # stdout: the URL, nothing else
        assert_clean(server.program)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(verify=tls_context(), timeout=REPLY_TIMEOUT, trust_env=False) as opened:
        yield opened


def ws_connect(url: str, **kwargs: Any) -> ClientConnection:
    opened: ClientConnection = connect(url, ssl=tls_context(), proxy=None, open_timeout=REPLY_TIMEOUT, **kwargs)
    return opened


def execute_request(code: str) -> dict[str, Any]:
    """A Jupyter messaging protocol ``execute_request`` on the shell channel (JSON websocket framing)."""
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": "execute_request",
        "username": "test",
        "session": uuid.uuid4().hex,
        "date": datetime.now(UTC).isoformat(),
        "version": "5.3",
    }
    content = {"code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False}
    return {"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell"}


def replies_to(ws: ClientConnection, request: dict[str, Any], *msg_types: str) -> dict[str, dict[str, Any]]:
    """Read the kernel's messages until one of each of ``msg_types`` answering ``request`` came, in
    whatever order: they come on different channels (iopub, shell), which the server does not order."""
    deadline = time.monotonic() + REPLY_TIMEOUT
    got: dict[str, dict[str, Any]] = {}
    while len(got) < len(msg_types):
        message: dict[str, Any] = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        kind = message["msg_type"]
        if kind in msg_types and message["parent_header"].get("msg_id") == request["header"]["msg_id"]:
            got.setdefault(kind, message)
    return got


@pytest.fixture(scope="module")
def kernel(jupyter: Jupyter) -> Iterator[str]:
    """A Python kernel started over REST through the tunnel; its id."""
    with httpx.Client(verify=tls_context(), timeout=REPLY_TIMEOUT, trust_env=False) as http:
        before = http.get(f"{jupyter.base}/api/kernels", headers=jupyter.auth)
        assert before.status_code == 200, before.text
        started = http.post(f"{jupyter.base}/api/kernels", headers=jupyter.auth, json={"name": "python3"})
        assert started.status_code == 201, started.text
        kernel_id = started.json()["id"]
        assert kernel_id not in [k["id"] for k in before.json()]
        listed = http.get(f"{jupyter.base}/api/kernels", headers=jupyter.auth).json()
        assert kernel_id in [k["id"] for k in listed]
        yield kernel_id
        assert http.delete(f"{jupyter.base}/api/kernels/{kernel_id}", headers=jupyter.auth).status_code == 204


@native_only
def test_jupyter_answers_through_the_tunnel_with_its_token_only(jupyter: Jupyter, client: httpx.Client) -> None:
    # the URL comes out before Jupyter listens (tunnel first); a request waits for it inside burrow
    assert not jupyter.listening_when_printed
    page = client.get(f"{jupyter.base}/?token={jupyter.token}")  # the printed URL, as a browser opens it
    assert page.status_code == 200
    assert "<title>Jupyter Server</title>" in page.text
    status = client.get(f"{jupyter.base}/api/status", headers=jupyter.auth)
    assert status.status_code == 200
    assert {"started", "last_activity", "kernels"} <= status.json().keys()
    client.cookies.clear()  # the page's login cookie would let the next two in
    assert client.get(f"{jupyter.base}/api/status", headers={"Authorization": "token wrong"}).status_code == 403
    assert client.get(f"{jupyter.base}/api/status").status_code == 403


@native_only
def test_a_kernel_runs_code_over_its_websocket_through_the_tunnel(jupyter: Jupyter, kernel: str) -> None:
    with ws_connect(jupyter.wss(f"/api/kernels/{kernel}/channels"), additional_headers=jupyter.auth) as ws:
        request = execute_request("1+1")
        ws.send(json.dumps(request))
        got = replies_to(ws, request, "execute_result", "execute_reply")
        assert got["execute_result"]["content"]["data"]["text/plain"] == "2"
        assert got["execute_reply"]["content"]["status"] == "ok"


@native_only
def test_a_web_terminal_runs_a_shell_command_through_the_tunnel(jupyter: Jupyter, client: httpx.Client) -> None:
    created = client.post(f"{jupyter.base}/api/terminals", headers=jupyter.auth)
    assert created.status_code == 200, created.text
    name = created.json()["name"]
    try:
        with ws_connect(jupyter.wss(f"/terminals/websocket/{name}"), additional_headers=jupyter.auth) as ws:
            ws.send(json.dumps(["stdin", "echo burrow-$((6*7))\r"]))  # the echo of the line itself says 6*7
            seen = ""
            deadline = time.monotonic() + REPLY_TIMEOUT
            while "burrow-42" not in seen:
                kind, *data = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                if kind == "stdout":
                    seen += data[0]
            assert "burrow-$((6*7))" in seen  # the shell's echo of what was typed came back too
    finally:
        assert client.delete(f"{jupyter.base}/api/terminals/{name}", headers=jupyter.auth).status_code == 204


@native_only
def test_a_page_from_another_site_cannot_use_the_login_cookie_on_a_kernel(
    jupyter: Jupyter, kernel: str, client: httpx.Client
) -> None:
    """Why the example sets no ``allow_origin='*'`` (the reference does): the browser's cookie stays
    usable by the notebook's own page only, since burrow passes the Host header on untouched."""
    login = client.get(f"{jupyter.base}/?token={jupyter.token}")
    cookie = "; ".join(f"{name}={value}" for name, value in login.cookies.items())
    assert "username-" in cookie  # Jupyter's login cookie: what a browser would send from now on
    url = jupyter.wss(f"/api/kernels/{kernel}/channels")
    with ws_connect(url, origin=Origin(jupyter.base), additional_headers={"Cookie": cookie}) as ws:
        request = execute_request("6*7")
        ws.send(json.dumps(request))
        assert replies_to(ws, request, "execute_result")["execute_result"]["content"]["data"]["text/plain"] == "42"
    with pytest.raises(InvalidStatus) as refusal:
        ws_connect(url, origin=Origin("https://elsewhere.example"), additional_headers={"Cookie": cookie})
    assert refusal.value.response.status_code == 403


def _get(address: tuple[str, int], sni: str, host: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """GET over TLS to ``address``, with ``sni`` in the handshake and ``host`` in the Host header."""
    sock = tls_context().wrap_socket(socket.create_connection(address, timeout=REPLY_TIMEOUT), server_hostname=sni)
    connection = http.client.HTTPSConnection(sni, address[1], timeout=REPLY_TIMEOUT)
    connection.sock = sock
    try:
        connection.request("GET", path, headers={"Host": host, **headers})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@native_only  # (the asyncio engine ends an unknown name with an EOF, not the alert this checks)
def test_behind_a_relay_with_a_domain_jupyter_accepts_the_tunnels_host_and_stops_on_sigterm(
    jupyter_env: dict[str, str], tmp_path: Path
) -> None:
    """A real relay's tunnel is ``https://<id>.DOMAIN``: a Host Jupyter calls non-local (403) unless told.

    ``burrow relay`` on loopback serves ``<id>.localhost`` (SNI routed), as a
    production relay serves ``<id>.r1.example.com``; the client dials
    127.0.0.1, which Python cannot resolve ``<id>.localhost`` to.
    """
    relay = Program([sys.executable, "-m", "burrow", "relay", "--listen", "127.0.0.1:0", "--grace", "1"], jupyter_env)
    try:
        relay_port = int(relay.wait_for(r"ready on 127\.0\.0\.1:(\d+)", stdout=True).group(1))
        env = {**jupyter_env, "BURROW_RELAY": f"localhost:{relay_port}"}
        server, jupyter_port = start_jupyter_example(env, tmp_path)
        try:
            match = re.fullmatch(rf"https://([0-9a-z]+\.localhost):{relay_port}", server.base)
            assert match, server.base
            name = match.group(1)
            address = ("127.0.0.1", relay_port)
            status, body = _get(address, name, f"{name}:{relay_port}", "/api/status", server.auth)
            assert status == 200 and b'"started"' in body, body
            # the DNS-rebinding check stays on for every other name (allow_remote_access=True would drop it)
            status, body = _get(address, name, f"elsewhere.example:{relay_port}", "/api/status", server.auth)
            assert status == 403, body
        finally:
            code = server.program.stop()
        assert code == 0, str(server.program)
        assert server.program.out == [f"{server.base}/?token={server.token}"]  # stdout: the URL, nothing else
        assert_clean(server.program)
        assert refused(jupyter_port)  # Jupyter stopped with the example
        # the tunnel is closed at the relay: its name is unknown there now
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            _get(address, name, f"{name}:{relay_port}", "/api/status", server.auth)
    finally:
        relay.stop()


# ---------------------------------------------------------------------- examples/hub.py


@dataclass
class Hub:
    """examples/hub.py running: its endpoint and token."""

    endpoint: str
    token: str
    program: Program


def start_hub(env: dict[str, str], idle_timeout: float) -> Hub:
    token = secrets.token_urlsafe()
    program = Program(
        example("hub.py", "--port", "0", "--idle-timeout", str(idle_timeout)), {**env, "HUB_TOKEN": token}
    )
    try:
        endpoint = program.wait_for(r"^http://127\.0\.0\.1:\d+/notebooks$", stdout=True).group(0)
    except BaseException:
        program.stop()
        raise
    return Hub(endpoint, token, program)


@pytest.fixture(scope="module")
def hub(jupyter_env: dict[str, str]) -> Iterator[Hub]:
    started = start_hub(jupyter_env, IDLE_TIMEOUT)
    try:
        yield started
    finally:
        assert started.program.stop() == 0, str(started.program)
        assert_clean(started.program)


def post_notebook(hub: Hub, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(hub.endpoint, headers=headers, follow_redirects=False, timeout=REPLY_TIMEOUT, trust_env=False)


@dataclass
class Started:
    """A notebook the hub started, as its 303 and its log line tell."""

    url: str
    number: int
    pid: int
    port: int
    posted_at: float
    answered_in: float


def start_notebook(hub: Hub) -> Started:
    posted_at = time.monotonic()
    response = post_notebook(hub, hub.token)
    answered_in = time.monotonic() - posted_at
    assert response.status_code == 303, response.text
    url = response.headers["Location"]
    assert re.fullmatch(r"https://\S+/\?token=[\w-]{43}", url), url
    base = url.split("/?token=")[0]
    line = hub.program.wait_for(rf"notebook (\d+): Jupyter \(pid (\d+)\) on port (\d+) at {re.escape(base)}$")
    number, pid, port = (int(group) for group in line.groups())
    return Started(url, number, pid, port, posted_at, answered_in)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_hub_refuses_a_missing_or_wrong_token(hub: Hub) -> None:
    for token in (None, "wrong", hub.token + "x", hub.token[:-1]):
        response = post_notebook(hub, token)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "Location" not in response.headers
    basic = httpx.post(hub.endpoint, headers={"Authorization": f"Basic {hub.token}"}, trust_env=False)
    assert basic.status_code == 401
    assert not any(re.search(r"notebook \d+:", line) for line in hub.program.err)  # no Jupyter was started


@native_only
def test_the_hub_answers_303_at_once_and_stops_notebooks_left_idle(hub: Hub) -> None:
    first = start_notebook(hub)
    # answered before its Jupyter listens: the browser's request waits for it inside burrow
    assert refused(first.port)
    assert first.answered_in < 2.0, first.answered_in
    with httpx.Client(verify=tls_context(), timeout=START_TIMEOUT, trust_env=False) as browser:
        page = browser.get(first.url)
        assert page.status_code == 200
        assert "<title>Jupyter Server</title>" in page.text
        second = start_notebook(hub)  # each caller gets a server (and a URL, and a token) of their own
        assert second.url != first.url and second.pid != first.pid
        assert second.url.split("/?token=")[1] != first.url.split("/?token=")[1]
        # the browser's connection stays open (keep-alive): notebook 1 is busy while 2, never opened, idles
        hub.program.wait_for(rf"notebook {second.number}: stopped \(idle for more than 3 s\)")
        assert gone(second.pid)
        assert time.monotonic() - first.posted_at > IDLE_TIMEOUT
        status = browser.get(first.url.replace("/?", "/api/status?"))
        assert status.status_code == 200 and "started" in status.json()
    closed_at = time.monotonic()
    hub.program.wait_for(rf"notebook {first.number}: stopped \(idle for more than 3 s\)")
    # counted from its last connection (seen at most a quarter of the timeout before it closed)
    assert time.monotonic() - closed_at > IDLE_TIMEOUT * 3 / 4
    assert gone(first.pid)
    assert refused(first.port)
    with httpx.Client(verify=tls_context(), timeout=REPLY_TIMEOUT, trust_env=False) as late:
        for started in (first, second):
            with pytest.raises(httpx.ConnectError):  # the tunnel is closed: its URL no longer answers
                late.get(started.url)


@native_only
def test_stopping_the_hub_stops_every_notebook(jupyter_env: dict[str, str]) -> None:
    hub = start_hub(jupyter_env, idle_timeout=600)
    try:
        notebook = start_notebook(hub)
        with httpx.Client(verify=tls_context(), timeout=START_TIMEOUT, trust_env=False) as browser:
            assert browser.get(notebook.url).status_code == 200
    finally:
        code = hub.program.stop()
    assert code == 0, str(hub.program)
    hub.program.wait_for(rf"notebook {notebook.number}: stopped \(the hub is stopping\)", timeout=5)
    assert_clean(hub.program)
    assert gone(notebook.pid)
    with pytest.raises(httpx.ConnectError):
        httpx.get(notebook.url, verify=tls_context(), timeout=REPLY_TIMEOUT, trust_env=False)


def test_the_hub_says_in_one_line_that_hub_token_is_unset(jupyter_env: dict[str, str]) -> None:
    env = {name: value for name, value in jupyter_env.items() if name != "HUB_TOKEN"}
    result = subprocess.run(example("hub.py", "--port", "0"), capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "hub.py: HUB_TOKEN is not set; set it to the token callers send as Authorization: Bearer <token>\n"
    )
