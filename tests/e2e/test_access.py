"""A tunnel's owner decides who may connect (``allow_cidrs``) and what the service learns of them
(``proxy_protocol``), checked with real clients from several loopback addresses and a real nginx
that speaks the PROXY protocol."""

from __future__ import annotations

import http.client
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import burrow
from burrow.agent.runtime import runtime
from burrow.errors import ConfigurationError, TunnelRefused
from burrow.protocol.messages import TunnelAddress
from burrow.relay.config import RelayConfig

from ..helpers import free_port, page_server

NATIVE = RelayConfig().engine == "native"
native_only = pytest.mark.skipif(not NATIVE, reason="allow_cidrs and proxy_protocol are the native engine's")

BODY = b"inside\n"
INSIDER, OUTSIDER = "127.0.0.2", "127.0.0.1"


@pytest.fixture(scope="module")
def page() -> Iterator[int]:
    with page_server(BODY) as port:
        yield port


def _https_get(port: int, ca: Path, source: str, server_name: str = "localhost") -> tuple[bytes, int]:
    """GET / over TLS from ``source``; the body and the client's own port."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as sock:
            return _get(sock), sock.getsockname()[1]


def _http_get(port: int, source: str) -> tuple[bytes, int]:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        return _get(sock), sock.getsockname()[1]


def _get(sock: socket.socket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
    response.begin()
    assert response.status == 200
    return response.read()


def _answer_to_outsider(port: int, source: str, first: bytes) -> bytes:
    """What a client at ``source`` gets back for ``first``: b"" when shut out (reset, even in connect, or closed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
            sock.sendall(first)
            return sock.recv(4096)
    except (ConnectionResetError, BrokenPipeError):
        return b""


def _client_hello() -> bytes:
    hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), False, "localhost")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    return outgoing.read()


@native_only
def test_only_allowed_networks_reach_the_tls_address(page: int, ca_file: Path) -> None:
    with burrow.forward(page, allow_cidrs=[f"{INSIDER}/32", "2001:db8::/32"]) as tunnel:
        assert _https_get(tunnel.port, ca_file, INSIDER)[0] == BODY
        # not even a ServerHello: no certificate shown
        assert _answer_to_outsider(tunnel.port, OUTSIDER, _client_hello()) == b""
        with pytest.raises(OSError):  # (a reset, in connect or in the handshake)
            _https_get(tunnel.port, ca_file, OUTSIDER)
        # the relay's shared TLS port routes by name: the same check, before the handshake
        shared_port = runtime().embedded.port  # type: ignore[union-attr]
        name = f"{tunnel.id}.localhost"
        assert _https_get(shared_port, ca_file, INSIDER, name)[0] == BODY
        with pytest.raises(OSError):  # (a reset, in connect or in the handshake)
            _https_get(shared_port, ca_file, OUTSIDER, name)


@native_only
def test_only_allowed_networks_reach_the_raw_tcp_address(page: int) -> None:
    with burrow.forward(page, unencrypted=True, allow_cidrs="127.0.0.0/30") as tunnel:  # .0-.3: INSIDER's
        assert _http_get(tunnel.unencrypted_port or 0, INSIDER)[0] == BODY
        assert _answer_to_outsider(tunnel.unencrypted_port or 0, "127.0.0.9", b"GET / HTTP/1.0\r\n\r\n") == b""


@native_only
def test_an_agent_closes_a_tunnel_whose_relay_does_not_say_it_enforces_the_rules(
    page: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older relay ignores BIND's allow and proxy: its BOUND does not echo them, and the agent gives up
    the tunnel rather than leave it open to everyone."""
    bound = TunnelAddress.to_message
    monkeypatch.setattr(
        TunnelAddress,
        "to_message",
        lambda self: {k: v for k, v in bound(self).items() if k not in ("allow", "proxy", "client_ca")},
    )
    forward = burrow.forward(page, allow_cidrs=[f"{INSIDER}/32"])
    with pytest.raises(TunnelRefused, match="does not enforce allow_cidrs, proxy_protocol or client_ca"):
        forward.open()
    assert runtime().embedded is not None
    assert len(runtime().embedded.control.registry) == 0  # type: ignore[union-attr]


def test_bad_access_options_are_one_line_errors() -> None:
    for allow, said in (
        (["10.0.0.0/33"], "'10.0.0.0/33' is not an IP network"),
        (["example.com"], "'example.com' is not an IP network"),
        ([], "would refuse everyone"),
        ([f"10.{n // 256}.{n % 256}.0/24" for n in range(65)], "at most 64"),
    ):
        with pytest.raises(ConfigurationError, match=said):
            burrow.forward(8000, allow_cidrs=allow)
    with pytest.raises(ConfigurationError, match="give 1 .* or 2"):
        burrow.forward(8000, proxy_protocol=3)


@pytest.mark.skipif(NATIVE, reason="the asyncio engine's refusal")
def test_a_relay_that_cannot_enforce_access_refuses_the_tunnel(page: int) -> None:
    with pytest.raises(TunnelRefused, match="--engine native"):
        with burrow.forward(page, allow_cidrs=["127.0.0.0/8"]):
            pass


# ------------------------------------------------------------------ PROXY protocol, with nginx


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """nginx on loopback, expecting a PROXY header (v1 or v2); it answers with the address the header names."""
    if not (Path("/usr/sbin/nginx").exists()):
        pytest.skip("nginx is not installed")
    directory = tmp_path_factory.mktemp("nginx")
    port = free_port()
    (directory / "nginx.conf").write_text(
        f"""daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log;
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    log_format proxied '$proxy_protocol_addr $proxy_protocol_port "$request"';
    access_log {directory}/access.log proxied;
    client_body_temp_path {directory};
    proxy_temp_path {directory};
    fastcgi_temp_path {directory};
    uwsgi_temp_path {directory};
    scgi_temp_path {directory};
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{ return 200 "$proxy_protocol_addr $proxy_protocol_port\\n"; }}
    }}
}}
"""
    )
    process = subprocess.Popen(
        [
            "/usr/sbin/nginx",
            "-e",
            str(directory / "error.log"),
            "-p",
            str(directory),
            "-c",
            str(directory / "nginx.conf"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, (directory / "error.log").read_text()
                time.sleep(0.05)
        yield port
        log = (directory / "access.log").read_text()
        assert "127.0.0.3 " in log  # nginx logged the address the header gave, as operators would see it
    finally:
        process.send_signal(signal.SIGQUIT)
        process.wait(10)


@native_only
@pytest.mark.parametrize("version", [1, 2])
def test_nginx_learns_the_client_address_from_the_proxy_header(version: int, nginx: int, ca_file: Path) -> None:
    with burrow.forward(nginx, unencrypted=True, proxy_protocol=version) as tunnel:
        body, client_port = _https_get(tunnel.port, ca_file, "127.0.0.3")
        assert body == f"127.0.0.3 {client_port}\n".encode()
        body, client_port = _http_get(tunnel.unencrypted_port or 0, "127.0.0.3")
        assert body == f"127.0.0.3 {client_port}\n".encode()


# ------------------------------------------------------------------ mutual TLS


@pytest.fixture(scope="module")
def client_cas(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """A client CA (PEM), a client certificate of it, and one of another CA (each cert+key in one file)."""
    trustme = pytest.importorskip("trustme")
    directory = tmp_path_factory.mktemp("mtls")
    ours, theirs = trustme.CA(), trustme.CA()
    good, stranger = directory / "good.pem", directory / "stranger.pem"
    ours.issue_cert("alice@example.test").private_key_and_cert_chain_pem.write_to_path(str(good))
    theirs.issue_cert("mallory@example.test").private_key_and_cert_chain_pem.write_to_path(str(stranger))
    return ours.cert_pem.bytes().decode(), good, stranger


def _mtls_get(port: int, ca: Path, client: Path | None, server_name: str = "localhost") -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as sock:
            return _get(sock)


@native_only
def test_a_tunnel_with_client_ca_lets_in_only_clients_with_a_certificate_of_it(
    page: int, ca_file: Path, client_cas: tuple[str, Path, Path]
) -> None:
    pem, good, stranger = client_cas
    with burrow.forward(page, client_ca=pem) as tunnel:
        assert _mtls_get(tunnel.port, ca_file, good) == BODY
        for client in (None, stranger):  # no certificate, or one another CA issued
            with pytest.raises(OSError):  # (a TLS alert: certificate required / unknown CA)
                _mtls_get(tunnel.port, ca_file, client)
        # curl, with and without its certificate
        curl = ["curl", "-sS", "--cacert", str(ca_file), tunnel.url + "/"]
        assert subprocess.run([*curl, "--cert", str(good)], capture_output=True, timeout=30).stdout == BODY
        assert subprocess.run(curl, capture_output=True, timeout=30).returncode != 0
        # the shared TLS port, by name: the same rule
        shared_port = runtime().embedded.port  # type: ignore[union-attr]
        assert _mtls_get(shared_port, ca_file, good, f"{tunnel.id}.localhost") == BODY
        with pytest.raises(OSError):
            _mtls_get(shared_port, ca_file, None, f"{tunnel.id}.localhost")
    with burrow.forward(page) as plain:  # other tunnels ask for nothing
        assert _mtls_get(plain.port, ca_file, None) == BODY


def test_a_bad_client_ca_is_a_one_line_error(tmp_path: Path) -> None:
    for given, said in (
        ("-----BEGIN CERTIFICATE-----\njunk\n-----END CERTIFICATE-----\n", "is not PEM CA certificates"),
        (str(tmp_path / "none.pem"), "cannot read client_ca"),
        (b"not pem at all", "cannot read client_ca"),
    ):
        with pytest.raises(ConfigurationError, match=said):
            burrow.forward(8000, client_ca=given)
