"""The relay's admin page in headless Chromium, against a relay carrying real traffic.

A raw TCP tunnel to an echo service holds one public connection that has
moved 1,000 bytes each way. Chromium opens the page (with the admin token as
the password of HTTP Basic, as its prompt would give it) through a small proxy
of the test's: when the relay has
rendered the page, and before Chromium gets it, the proxy moves 5,000 more
bytes through the connection. So the page as rendered says 1,000, and only a
refresh by the page's own script (fetching ``/api/status``, the browser adding
the credentials, under the page's Content-Security-Policy) can say 6,000.
"""

from __future__ import annotations

import base64
import html.parser
import os
import shutil
import socket
import struct
import subprocess
import threading
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import burrow
from burrow.relay import Relay, RelayConfig, admin

from ..helpers import EchoServer, on_runtime

pytest.importorskip("prometheus_client")
pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")

TOKEN = "page-admin-token-0123456789"
#: Long enough (in Chromium's virtual time, which skips idle waits) for the 2 s refresh to run twice.
VIRTUAL_TIME = 5000
WINDOW = (1280, 800)
#: Chromium's own deadline: a page that never settles must fail the test, not hang it.
CHROMIUM_TIMEOUT = 60


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN)
    config = RelayConfig(port=0, metrics=("127.0.0.1", 0), admin_token_file=token_file)
    started = on_runtime(Relay(config).start())
    yield started

    async def close() -> None:
        started.close()

    on_runtime(close())


class PageProxy:
    """Forwards each HTTP request to the admin listener; after the first page is rendered and
    before it is passed on, runs ``between`` (once). Keeps that first page as it was served."""

    def __init__(self, upstream: int, between: Callable[[], None]) -> None:
        self.upstream = upstream
        self.between: Callable[[], None] | None = between
        self.first_page = b""
        self.paths: list[str] = []
        self.authorizations: list[str] = []  # each request's Authorization header ("" if none)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream), timeout=10) as upstream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            path = head.split(b" ", 2)[1].decode()
            self.paths.append(path)
            fields = [line.partition(b":") for line in head.split(b"\r\n")[1:]]
            self.authorizations.append(
                next((value.strip().decode() for name, _, value in fields if name.lower() == b"authorization"), "")
            )
            upstream.sendall(head)
            answer = b""
            while chunk := upstream.recv(65536):  # (the listener closes after one answer)
                answer += chunk
            # (a browser asks without credentials first, and again with them after the 401)
            if path.split("?")[0] == "/" and answer.startswith(b"HTTP/1.1 200") and self.between is not None:
                self.first_page = answer
                between, self.between = self.between, None
                between()
            client.sendall(answer)

    def close(self) -> None:
        self.listener.close()


def _echo(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk
        got += chunk
    assert got == payload


class _Rows(html.parser.HTMLParser):
    """The cells of each row of ``tbody#connections-body`` and ``tbody#tunnels-body``, and <body>'s data."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, dict[str, str | None]]]]] = {}
        self.body: dict[str, str | None] = {}
        self._table: str | None = None
        self._cell: dict[str, str | None] | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "body":
            self.body = found
        elif tag == "tbody":
            self._table = found.get("id")
            self.tables[self._table or ""] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._table:
            self._cell, self._text = found, ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table:
            self.tables[self._table][-1].append((self._text, self._cell))
            self._cell = None
        elif tag == "tbody":
            self._table = None


def _rows(document: str) -> _Rows:
    parsed = _Rows()
    parsed.feed(document)
    return parsed


def _chromium(home: Path, url: str, *extra: str) -> bytes:
    # --no-sandbox: the tests run as root
    command = [
        "chromium",
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={home / 'profile'}",
        f"--virtual-time-budget={VIRTUAL_TIME}",
        *extra,
        url,
    ]
    done = subprocess.run(
        command, capture_output=True, timeout=CHROMIUM_TIMEOUT, env={**os.environ, "HOME": str(home)}, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _png(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the decompressed scanlines of a PNG file."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    offset, width, height, pixels = 8, 0, 0, b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, chunk = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            pixels += chunk
        offset += 12 + length
    return width, height, zlib.decompress(pixels)


def test_the_page_shows_live_connections_and_refreshes_them_in_place(
    relay: Relay, echo: EchoServer, tmp_path: Path
) -> None:
    assert relay.metrics is not None
    with burrow.forward(echo.port, relay=f"localhost:{relay.port}", unencrypted=True) as tunnel:
        assert tunnel.unencrypted_port is not None
        with socket.create_connection(("127.0.0.1", tunnel.unencrypted_port), timeout=10) as client:
            _echo(client, b"a" * 1000)
            address = "{}:{}".format(*client.getsockname()[:2])
            proxy = PageProxy(relay.metrics.port, lambda: _echo(client, b"b" * 5000))
            try:
                # the URL form of what a browser's password prompt gives: any user, the token as password
                page_url = f"http://admin:{TOKEN}@127.0.0.1:{proxy.port}/"
                dom = _chromium(tmp_path, page_url, "--dump-dom").decode()
                shot = tmp_path / "admin.png"
                _chromium(tmp_path, page_url, f"--screenshot={shot}", "--window-size={},{}".format(*WINDOW))
            finally:
                proxy.close()

        # as the relay rendered it (what a browser without JavaScript shows): 1,000 bytes each way
        served = proxy.first_page.decode()
        assert "Content-Security-Policy: default-src 'none'" in served
        rendered = _rows(served.split("\r\n\r\n", 1)[1])
        assert rendered.body["data-refreshes"] == "0"
        (before,) = rendered.tables["connections-body"]
        assert [text for text, _ in before[:2]] == [tunnel.id, address]
        assert [cell["data-bytes"] for _, cell in before[2:4]] == ["1000", "1000"]

        # after the page's script refreshed it: the same connection, 6,000 bytes each way
        shown = _rows(dom)
        assert int(shown.body["data-refreshes"] or 0) >= 1, dom[:2000]
        (after,) = shown.tables["connections-body"]
        assert [text for text, _ in after[:2]] == [tunnel.id, address]
        assert [cell["data-bytes"] for _, cell in after[2:4]] == ["6000", "6000"]
        assert [text for text, _ in after[2:4]] == ["6.0 kB", "6.0 kB"]
        (tunnel_row,) = shown.tables["tunnels-body"]
        assert [text for text, _ in tunnel_row[:4]] == [tunnel.id, f"tcp:{tunnel.unencrypted_port}", "-", "1/1"]
        # the refreshes asked for the JSON with the browser's credentials, never the token in a URL
        basic = "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()
        refreshes = [a for p, a in zip(proxy.paths, proxy.authorizations, strict=True) if p.startswith("/api/status")]
        assert refreshes and set(refreshes) == {basic}
        assert all(TOKEN not in p for p in proxy.paths)

    width, height, pixels = _png(shot)
    assert (width, height) == WINDOW
    assert 10_000 < shot.stat().st_size < 2_000_000
    # a blank page's scanlines hold a handful of byte values; text and table rules many more
    assert len(set(pixels)) > 32


def test_the_page_escapes_what_peers_can_influence(relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    hostile = "<img src=x onerror=alert(1)>"
    real = admin.status

    def status(relay: Relay, connections: int = admin.CONNECTIONS_LISTED) -> dict[str, object]:
        answer = real(relay, connections)
        answer["tunnels"] = [
            {
                "id": hostile,
                "kind": "https",
                "tenant": hostile,
                "connections_open": 1,
                "connections_total": 1,
                "bytes_in": 1,
                "bytes_out": 2,
                "age": 3.0,
                "connections": [{"client": hostile, "bytes_in": 1, "bytes_out": 2, "age": 3.0}],
                "connections_left_out": 0,
            }
        ]
        return answer

    monkeypatch.setattr(admin, "status", status)
    assert relay.metrics is not None
    request = urllib.request.Request(
        f"http://127.0.0.1:{relay.metrics.port}/", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        page = response.read().decode()
        policy = response.headers["Content-Security-Policy"]
    assert "<img" not in page and page.count("&lt;img src=x onerror=alert(1)&gt;") == 6
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    # the script never parses relay text as HTML
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    assert "innerHTML" not in script and "textContent" in script
