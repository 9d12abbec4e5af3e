"""Tenant tokens end to end: made by ``burrow token create``, checked by a relay holding the secret, with
quotas, revocation, expiry, and tenants kept apart; no token ever in a log line or an error."""

from __future__ import annotations

import logging
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import burrow
from burrow.errors import AuthenticationFailed, TunnelRefused
from burrow.protocol.frames import FrameType, encode_json
from burrow.relay import Relay, RelayConfig
from burrow.relay.tickets import load_or_create_key
from burrow.relay.tokens import TokenSigner

from ..helpers import EchoServer, ServiceThread, echo_once, forward_process, on_runtime
from ..raw_agent import agent_socket, hello, read_frames

NATIVE = RelayConfig().engine == "native"


@dataclass
class TenantRelay:
    relay: Relay
    secret: Path
    revoked: Path

    @property
    def address(self) -> str:
        return f"localhost:{self.relay.port}"

    def token(self, *args: str) -> str:
        """A token made the way an operator makes one."""
        done = subprocess.run(
            [sys.executable, "-m", "burrow", "token", "create", "--secret", str(self.secret), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert "id " in done.stderr and done.stdout.count("\n") == 1
        return done.stdout.strip()

    def token_id(self, token: str) -> str:
        return TokenSigner(load_or_create_key(self.secret)).verify(token).token_id


@pytest.fixture
def tenants(tmp_path: Path) -> Iterator[TenantRelay]:
    secret, revoked = tmp_path / "token-secret", tmp_path / "revoked"
    TokenSigner(load_or_create_key(secret))  # (the file the relays share)
    revoked.write_text("")  # (none revoked yet)
    config = RelayConfig(port=0, token_secret=secret, revoked=revoked, max_tunnels_per_minute=6)
    relay = on_runtime(Relay(config).start())
    yield TenantRelay(relay, secret, revoked)

    async def close() -> None:
        relay.close()

    on_runtime(close())


@pytest.fixture
def ports(service_loop: ServiceThread) -> Iterator[list[int]]:
    """Three echo services: a process forwards a local port once."""
    servers = [service_loop.echo_server() for _ in range(3)]
    yield [server.port for server in servers]
    for server in servers:
        service_loop.close_server(server)


@pytest.fixture
def relay_log() -> Iterator[list[str]]:
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("burrow")
    level, disabled = log.level, log.disabled
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.disabled = False
    yield lines
    log.removeHandler(handler)
    log.setLevel(level)
    log.disabled = disabled


def test_a_tenant_token_opens_tunnels_up_to_its_quota(tenants: TenantRelay, ports: list[int], ca_file: Path) -> None:
    token = tenants.token("--tenant", "acme", "--max-tunnels", "2")
    with (
        burrow.forward(ports[0], relay=tenants.address, token=token) as one,
        burrow.forward(ports[1], relay=tenants.address, token=token) as two,
    ):
        assert echo_once(one, ca_file) == echo_once(two, ca_file) == b"hello burrow"
        # the count is the tenant's, across its tokens (each token carries the quota it was made with)
        renewed = tenants.token("--tenant", "acme", "--max-tunnels", "2")
        with pytest.raises(TunnelRefused, match="tenant acme has 2 tunnels at this relay"):
            burrow.forward(ports[2], relay=tenants.address, token=renewed).open()
        with burrow.forward(ports[2], relay=tenants.address, token=tenants.token("--tenant", "globex")) as other:
            assert echo_once(other, ca_file) == b"hello burrow"  # another tenant is not counted


def test_bad_tokens_are_refused_with_a_reason_and_never_written_down(
    tenants: TenantRelay, echo: EchoServer, relay_log: list[str]
) -> None:
    signer = TokenSigner(load_or_create_key(tenants.secret))
    expired, _ = signer.issue("acme", 60, now=time.time() - 3600)
    good = tenants.token("--tenant", "acme")
    tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    foreign, _ = TokenSigner(b"another relay's secret!!").issue("acme", None)
    for token, reason in (
        (expired, "token expired"),
        (tampered, "token not signed with this relay's secret"),
        (foreign, "token not signed with this relay's secret"),
        ("a-plain-guess", "wrong token"),
    ):
        with pytest.raises(AuthenticationFailed, match=reason) as info:
            burrow.forward(echo.port, relay=tenants.address, token=token).open()
        assert token not in str(info.value)
    with burrow.forward(echo.port, relay=tenants.address, token=good):
        pass
    assert relay_log and not [line for line in relay_log for t in (expired, tampered, good) if t in line]
    assert sum("refused agent" in line for line in relay_log) == 4


def test_revoking_a_token_closes_its_sessions_and_refuses_it(
    tenants: TenantRelay, ports: list[int], ca_file: Path
) -> None:
    token, kept = tenants.token("--tenant", "acme"), tenants.token("--tenant", "acme")
    with (
        burrow.forward(ports[0], relay=tenants.address, token=token) as revoked,
        burrow.forward(ports[1], relay=tenants.address, token=kept) as survivor,
    ):
        assert echo_once(revoked, ca_file) == b"hello burrow"
        tenants.revoked.write_text(f"# leaked 2026-12-05\n{tenants.token_id(token)}\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _answers(revoked, ca_file):
            time.sleep(0.1)
        assert not _answers(revoked, ca_file)  # closed at the relay within a sweep
        assert echo_once(survivor, ca_file) == b"hello burrow"  # the tenant's other token goes on
        with pytest.raises(AuthenticationFailed, match="token revoked"):
            burrow.forward(ports[2], relay=tenants.address, token=token).open()


def _answers(tunnel: burrow.Tunnel, ca: Path) -> bool:
    try:
        return echo_once(tunnel, ca) == b"hello burrow"
    except OSError:
        return False


def test_a_tenant_cannot_reclaim_another_tenants_tunnel(tenants: TenantRelay, ca_file: Path) -> None:
    acme, globex = tenants.token("--tenant", "acme"), tenants.token("--tenant", "globex")
    bind = {"request": 1, "port": 9, "unencrypted": False, "h2": False}
    with agent_socket(tenants.relay.port, ca_file) as first:
        first.sendall(hello(token=acme) + encode_json(FrameType.BIND, bind))
        (bound,) = [p for kind, _, p in read_frames(first, FrameType.BOUND, 5) if kind == FrameType.BOUND]
        ticket = bound.split(b'"ticket":"')[1].split(b'"')[0].decode()
        with agent_socket(tenants.relay.port, ca_file, "127.0.0.2") as thief:
            thief.sendall(hello(token=globex) + encode_json(FrameType.BIND, {**bind, "ticket": ticket}))
            frames = read_frames(thief, FrameType.BIND_FAILED, 5)
            (failed,) = [p for kind, _, p in frames if kind == FrameType.BIND_FAILED]
            assert b'"code":"bad-ticket"' in failed and b"another token" in failed
        # a renewed token of the same tenant takes its tunnel back (the same id)
        with agent_socket(tenants.relay.port, ca_file, "127.0.0.3") as renewed:
            renewed.sendall(
                hello(token=tenants.token("--tenant", "acme")) + encode_json(FrameType.BIND, {**bind, "ticket": ticket})
            )
            (again,) = [p for kind, _, p in read_frames(renewed, FrameType.BOUND, 5) if kind == FrameType.BOUND]
            assert again.split(b'"id":"')[1][:14] == bound.split(b'"id":"')[1][:14]


def test_tunnels_opened_a_minute_are_capped(tenants: TenantRelay, echo: EchoServer) -> None:
    token = tenants.token("--tenant", "busy")
    for _ in range(6):  # the relay's --max-tunnels-per-minute
        with burrow.forward(echo.port, relay=tenants.address, token=token):
            pass
    with pytest.raises(TunnelRefused, match="tenant busy opened 6 tunnels in the last minute"):
        burrow.forward(echo.port, relay=tenants.address, token=token).open()


@pytest.mark.skipif(not NATIVE, reason="a tenant's connection cap is the native engine's")
def test_a_tenants_open_connections_are_capped_across_its_tunnels(
    tenants: TenantRelay, ports: list[int], ca_file: Path
) -> None:
    token = tenants.token("--tenant", "acme", "--max-connections", "2")
    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        burrow.forward(ports[0], relay=tenants.address, token=token) as one,
        burrow.forward(ports[1], relay=tenants.address, token=token) as two,
    ):
        held = [_echoing(context, one), _echoing(context, two)]  # the tenant's two places, one per tunnel
        with pytest.raises(OSError):
            _echoing(context, one)  # a third is refused, on either tunnel
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # (the relay sees the close a moment later)
            try:
                held.append(_echoing(context, two))
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        for sock in held:
            sock.close()


def _echoing(context: ssl.SSLContext, tunnel: burrow.Tunnel) -> ssl.SSLSocket:
    """A TLS connection through ``tunnel`` that has echoed once, left open; OSError if refused."""
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", tunnel.port), timeout=5), server_hostname=tunnel.host
    )
    try:
        sock.sendall(b"ping")
        if sock.recv(4) != b"ping":
            raise ConnectionResetError("closed by the relay")
    except BaseException:
        sock.close()
        raise
    return sock


def test_a_revoked_token_closes_its_tunnels_at_the_next_reconnect(tenants: TenantRelay, ports: list[int]) -> None:
    """No retry will pass a refused token: the tunnel closes, saying why, instead of reconnecting forever."""
    token = tenants.token("--tenant", "acme")
    states: list[burrow.TunnelState] = []
    forward = burrow.forward(ports[0], relay=tenants.address, token=token, on_state=states.append)
    with forward:
        tenants.revoked.write_text(f"{tenants.token_id(token)}\n")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and forward.state is not burrow.TunnelState.CLOSED:
            time.sleep(0.05)
        assert forward.state is burrow.TunnelState.CLOSED
        assert re.fullmatch(
            r"relay localhost:\d+ rejected the token from token=: token revoked; check it", forward.closed_reason
        )
        assert states[-2:] == [burrow.TunnelState.RECONNECTING, burrow.TunnelState.CLOSED]


def test_burrow_forward_exits_with_one_line_when_its_token_is_revoked(tenants: TenantRelay, ports: list[int]) -> None:
    token = tenants.token("--tenant", "acme")
    process = forward_process(ports[0], tenants.address, token)
    try:
        assert process.stdout is not None and process.stdout.readline().startswith("https://")
        tenants.revoked.write_text(f"{tenants.token_id(token)}\n")
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, err
    said = [line for line in err.splitlines() if "rejected the token" in line]
    assert len(said) == 1 and said[0].endswith(
        "rejected the token from BURROW_TOKEN: token revoked; check it; closing 1 tunnel(s)"
    ), err
    assert "Traceback" not in err and "still reconnecting" not in err
