"""Every client reaches the embedded default's URL, on a stock machine, with no system change.

Stock Debian resolves ``<id>.localhost`` for curl and Chromium only: Python's
clients, wget and ``openssl s_client -connect`` say "Name or service not
known". So the embedded relay gives each tunnel a TLS port of its own on
loopback, ``https://localhost:PORT``, with a certificate for localhost,
127.0.0.1 and ::1 (native engine; the pure-Python engine, on its way out,
keeps the SNI URL and is not asked).
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import burrow
from burrow.relay.config import RelayConfig

from ..helpers import free_port, page_server

pytestmark = pytest.mark.skipif(
    RelayConfig().engine != "native", reason="https://localhost:PORT is the native engine's (BURROW_ENGINE)"
)

BODY = b"served through burrow\n" * 100


@pytest.fixture(scope="module")
def tunnel() -> Iterator[burrow.Tunnel]:
    with page_server(BODY) as port, burrow.forward(port) as opened:
        yield opened


@pytest.fixture(scope="module")
def cafile(tunnel: burrow.Tunnel) -> str:
    return str(Path(os.environ["BURROW_HOME"]) / "ca.pem")


def _urllib(url: str, cafile: str) -> bytes:
    context = ssl.create_default_context(cafile=cafile)
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        return bytes(response.read())


def _http_client(url: str, cafile: str) -> bytes:
    host, port = url.removeprefix("https://").rstrip("/").rsplit(":", 1)
    connection = http.client.HTTPSConnection(
        host.strip("[]"), int(port), context=ssl.create_default_context(cafile=cafile), timeout=10
    )
    try:
        connection.request("GET", "/")
        return connection.getresponse().read()
    finally:
        connection.close()


def _requests(url: str, cafile: str) -> bytes:
    requests = pytest.importorskip("requests")
    return bytes(requests.get(url, verify=cafile, timeout=10).content)


def _httpx(url: str, cafile: str) -> bytes:
    httpx = pytest.importorskip("httpx")
    return bytes(httpx.get(url, verify=ssl.create_default_context(cafile=cafile), timeout=10).content)


def _aiohttp(url: str, cafile: str) -> bytes:
    aiohttp = pytest.importorskip("aiohttp")

    async def get() -> bytes:
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=cafile))
        async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as response:
            return bytes(await response.read())

    return asyncio.run(get())


def _program(argv: list[str], env: dict[str, str] | None = None) -> bytes:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    result = subprocess.run(argv, capture_output=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def _curl(url: str, cafile: str) -> bytes:
    return _program(["curl", "-sS", "--fail", "--cacert", cafile, url])


def _wget(url: str, cafile: str) -> bytes:
    return _program(["wget", "-q", "-O", "-", f"--ca-certificate={cafile}", url])


def _chromium(url: str, cafile: str) -> bytes:
    """Headless Chromium, trusting the CA through an NSS store of its own (as `burrow trust` makes one)."""
    for program in ("chromium", "certutil"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed")
    home = Path(cafile).parent / "chromium-home"
    nssdb = home / ".pki" / "nssdb"
    if not nssdb.exists():
        nssdb.mkdir(parents=True)
        _program(["certutil", "-N", "-d", f"sql:{nssdb}", "--empty-password"])
        _program(["certutil", "-A", "-d", f"sql:{nssdb}", "-t", "C,,", "-n", "burrow test CA", "-i", cafile])
    dom = _program(
        # --no-sandbox: the tests run as root; HOME: Chromium on Linux reads $HOME/.pki/nssdb
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={home / 'profile'}",
            "--dump-dom",
            url,
        ],
        env={**os.environ, "HOME": str(home)},
    )
    # a text/plain page arrives as <pre>BODY</pre>; a certificate error page would not carry it
    found = re.search(rb"<pre[^>]*>(.*?)</pre>", dom, re.S)
    assert found is not None, dom[:500]
    return found.group(1)


CLIENTS: dict[str, Callable[[str, str], bytes]] = {
    "urllib": _urllib,
    "http.client": _http_client,
    "requests": _requests,
    "httpx": _httpx,
    "aiohttp": _aiohttp,
    "curl": _curl,
    "wget": _wget,
    "chromium": _chromium,
}


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_every_client_gets_the_page_at_the_url(client: str, tunnel: burrow.Tunnel, cafile: str) -> None:
    assert tunnel.url == f"https://localhost:{tunnel.port}" and tunnel.tls_socket == ("localhost", tunnel.port)
    assert CLIENTS[client](tunnel.url + "/", cafile) == BODY


@pytest.mark.parametrize("address", ["127.0.0.1", "[::1]"])
def test_the_loopback_addresses_answer_too(address: str, tunnel: burrow.Tunnel, cafile: str) -> None:
    if address == "[::1]" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    assert _urllib(f"https://{address}:{tunnel.port}/", cafile) == BODY


def test_openssl_s_client_connects_to_the_tls_socket(tunnel: burrow.Tunnel, cafile: str) -> None:
    host, port = tunnel.tls_socket
    result = subprocess.run(
        ["openssl", "s_client", "-ign_eof", "-connect", f"{host}:{port}", "-CAfile", cafile, "-verify_hostname", host],
        input=b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n",
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert b"Verify return code: 0 (ok)" in result.stdout
    assert BODY in result.stdout


def test_each_tunnel_has_its_own_port_and_keeps_it_private(tunnel: burrow.Tunnel, cafile: str) -> None:
    """Another tunnel's port serves that tunnel only, whatever name a client asks for."""
    with page_server(b"the other one\n") as other, burrow.forward(other) as second:
        assert second.port != tunnel.port
        assert _urllib(second.url + "/", cafile) == b"the other one\n"
        assert _urllib(tunnel.url + "/", cafile) == BODY
    # closed: its port no longer answers
    with pytest.raises(OSError):
        _urllib(second.url + "/", cafile)


def test_h2load_drives_an_h2_tunnel(tmp_path: Path, cafile: str) -> None:
    """h2load (nghttp2) negotiates h2 through the tunnel and gets every byte of every response."""
    for program in ("h2load", "nghttpd"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed")
    (tmp_path / "page.txt").write_bytes(BODY)
    port = free_port()
    # nghttpd without TLS speaks h2 with prior knowledge: the tunnel's TLS carries ALPN h2 to the client
    server = subprocess.Popen(
        ["nghttpd", "--no-tls", "-a", "127.0.0.1", "-d", str(tmp_path), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with burrow.forward(port, h2=True) as tunnel:
            requests = 200
            report = _program(["h2load", "-n", str(requests), "-c", "4", "-m", "10", f"{tunnel.url}/page.txt"])
            assert b"Application protocol: h2\n" in report
            assert f"{requests} succeeded, 0 failed".encode() in report and f"{requests} 2xx".encode() in report
            assert f"({requests * len(BODY)}) data".encode() in report  # every body, whole
            # and the bytes themselves, with curl speaking h2 through the same tunnel
            out = _program(
                ["curl", "-sS", "--http2", "--cacert", cafile, "-w", "%{http_version}", f"{tunnel.url}/page.txt"]
            )
            assert out == BODY + b"2"
    finally:
        server.terminate()
        server.wait(10)
