"""Every bad file and setting is one line on stderr, a non-zero exit, and nothing left behind.

Each case runs ``burrow relay`` or ``burrow forward`` as a user would, with a
fresh ``BURROW_HOME`` and ``TMPDIR``; the run must fail fast, print exactly
one line (no traceback), and leave the temporary directory as it found it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from .helpers import free_port

Setup = Callable[[Path], tuple[list[str], dict[str, str]]]


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _issued(tmp: Path, *names: str, key_of: tuple[str, ...] | None = None) -> list[str]:
    """--cert and --key for a certificate naming ``names`` (with the key of another, if ``key_of``)."""
    ca = trustme.CA()
    cert = ca.issue_cert(*names)
    key = ca.issue_cert(*key_of) if key_of else cert
    return [
        "--domain",
        "r1.example.com",
        "--cert",
        str(_file(tmp / "cert.pem", cert.cert_chain_pems[0].bytes())),
        "--key",
        str(_file(tmp / "key.pem", key.private_key_pem.bytes())),
    ]


def _busy_port() -> tuple[socket.socket, int]:
    sock = socket.create_server(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


_HOLD: list[socket.socket] = []


def _listen_on_busy_port(tmp: Path) -> tuple[list[str], dict[str, str]]:
    sock, port = _busy_port()
    _HOLD.append(sock)
    return ["relay", "--listen", f"127.0.0.1:{port}"], {}


def _damaged_home(tmp: Path) -> str:
    home = tmp / "damaged-home"
    home.mkdir()
    (home / "ca.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\njunk\n-----END CERTIFICATE-----\n")
    (home / "ca-key.pem").write_bytes(b"junk")
    return str(home)


RELAY = ["relay", "--listen", "127.0.0.1:0"]


def _held_port() -> int:
    sock, port = _busy_port()
    _HOLD.append(sock)
    return port


CASES: dict[str, Setup] = {
    "short ticket key": lambda t: ([*RELAY, "--ticket-key", str(_file(t / "k", b"short"))], {}),
    "ticket key is a directory": lambda t: ([*RELAY, "--ticket-key", str(t)], {}),
    "ticket key unwritable": lambda t: ([*RELAY, "--ticket-key", str(_file(t / "f", b"x") / "key")], {}),
    "garbage certificate": lambda t: (
        [*RELAY, "--cert", str(_file(t / "c.pem", b"junk")), "--key", str(_file(t / "k.pem", b"junk"))],
        {},
    ),
    "missing certificate": lambda t: ([*RELAY, "--cert", str(t / "none.pem"), "--key", str(t / "none.pem")], {}),
    "certificate for another domain": lambda t: ([*RELAY, *_issued(t, "other.example.com")], {}),
    "certificate without the wildcard": lambda t: ([*RELAY, *_issued(t, "r1.example.com")], {}),
    "key of another certificate": lambda t: (
        [*RELAY, *_issued(t, "r1.example.com", "*.r1.example.com", key_of=("x.example",))],
        {},
    ),
    "cert without key": lambda t: ([*RELAY, "--cert", str(_file(t / "c.pem", b"junk"))], {}),
    "port in use": _listen_on_busy_port,
    "bad domain": lambda t: ([*RELAY, "--domain", "a..b"], {}),
    "bad port range": lambda t: ([*RELAY, "--tcp-ports", "5-3"], {}),
    "exposed without token": lambda t: (["relay", "--listen", "0.0.0.0:0"], {}),
    "missing token file": lambda t: ([*RELAY, "--token-file", str(t / "none")], {}),
    "metrics port in use": lambda t: ([*RELAY, "--metrics", f"127.0.0.1:{_held_port()}"], {}),
    "metrics not host:port": lambda t: ([*RELAY, "--metrics", "9100"], {}),
    "missing token secret": lambda t: ([*RELAY, "--token-secret", str(t / "none")], {}),
    "short token secret": lambda t: ([*RELAY, "--token-secret", str(_file(t / "s", b"short"))], {}),
    "missing revocation list": lambda t: (
        [*RELAY, "--token-secret", str(_file(t / "s", b"s" * 32)), "--revoked", str(t / "none")],
        {},
    ),
    "revocation list without a secret": lambda t: ([*RELAY, "--revoked", str(_file(t / "r", b""))], {}),
    "bad tenant name": lambda t: (["token", "create", "--tenant", "Acme Corp", "--secret", str(t / "s")], {}),
    "bad token lifetime": lambda t: (["token", "create", "--tenant", "a", "--secret", str(t / "s"), "--ttl", "1y"], {}),
    "zero tunnels for a tenant": lambda t: (
        ["token", "create", "--tenant", "a", "--secret", str(t / "s"), "--max-tunnels", "0"],
        {},
    ),
    "bad allowed network": lambda t: (["forward", "8000", "--allow", "10.0.0.0/40"], {}),
    "window too small": lambda t: ([*RELAY, "--window", "1k"], {}),
    "budget not a size": lambda t: ([*RELAY, "--session-budget", "2x"], {}),
    "zero handshake timeout": lambda t: ([*RELAY, "--handshake-timeout", "0"], {}),
    "home is a file": lambda t: (RELAY, {"BURROW_HOME": str(_file(t / "home", b"x"))}),
    "damaged dev CA": lambda t: (RELAY, {"BURROW_HOME": _damaged_home(t)}),
    "damaged dev CA (embedded relay)": lambda t: (["forward", "8000"], {"BURROW_HOME": _damaged_home(t)}),
    "relay is an IP": lambda t: (["forward", "8000"], {"BURROW_RELAY": "127.0.0.1:4443"}),
    "relay port is junk": lambda t: (["forward", "8000"], {"BURROW_RELAY": "localhost:http"}),
    "relay list with a hole": lambda t: (["forward", "8000", "--relay", "r1.example.com,,r2.example.com"], {}),
    "failover after zero": lambda t: (
        ["forward", "8000", "--relay", "r1.example.com,r2.example.com", "--failover-after", "0"],
        {},
    ),
    "relays file missing": lambda t: (["forward", "8000"], {"BURROW_RELAYS_FILE": str(t / "relays.toml")}),
    "relays file is not TOML": lambda t: (
        ["forward", "8000", "--relay-timeout", "0"],
        {"BURROW_RELAYS_FILE": str(_file(t / "relays.toml", b"[[relay]\n"))},
    ),
    "nobody at the relay": lambda t: (
        ["forward", "8000", "--relay-timeout", "0"],
        {"BURROW_RELAY": f"localhost:{free_port()}"},
    ),
    "negative relay timeout": lambda t: (["forward", "8000", "--relay-timeout", "-1"], {}),
    "missing token file (agent)": lambda t: (["forward", "8000"], {"BURROW_TOKEN_FILE": str(t / "none")}),
    "empty token file": lambda t: (["forward", "8000"], {"BURROW_TOKEN_FILE": str(_file(t / "tok", b""))}),
    "CA is not a file": lambda t: (["forward", "8000"], {"BURROW_CA": str(t)}),
    "CA is garbage": lambda t: (
        ["forward", "8000"],
        {"BURROW_CA": str(_file(t / "ca.pem", b"junk")), "BURROW_RELAY": f"localhost:{free_port()}"},
    ),
    "port out of range": lambda t: (["forward", "70000"], {}),
    "bad heartbeat": lambda t: (["forward", "8000"], {"BURROW_HEARTBEAT_TIMEOUT": "soon"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_setting_is_one_line_and_leaves_nothing(case: str, tmp_path: Path) -> None:
    work, temp, home = tmp_path / "work", tmp_path / "tmp", tmp_path / "home"
    for directory in (work, temp, home):
        directory.mkdir()
    args, extra = CASES[case](work)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
    env |= {"BURROW_HOME": str(home), "TMPDIR": str(temp), **extra}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "burrow", *args], capture_output=True, text=True, timeout=30, env=env
        )
    finally:
        while _HOLD:
            _HOLD.pop().close()
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    command = " ".join(args[:2]) if args[0] == "token" else args[0]  # (token's actions are commands of their own)
    assert lines[0].startswith(f"burrow {command}: error: "), lines[0]
    assert list(temp.iterdir()) == [], "files left in TMPDIR"
