"""The operator's certificate reloads from disk (a renewal) and on SIGHUP, dropping nothing.

Each test checks, through real TLS clients, which certificate a new
connection gets (by serial number), that connections and the agent's session
that were up before the reload still carry bytes, and that a bad new pair is
refused while the certificate in use stays.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

import burrow
from burrow.relay import Relay, RelayConfig, certwatch
from burrow.tunnel import Tunnel, TunnelState

from ..helpers import EchoServer, connect, echo_through, on_runtime

DOMAIN = "r1.localhost"


class Pair:
    """A relay's --cert and --key files, and the CA clients trust."""

    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA()
        self.cert, self.key, self.ca_file = tmp / "cert.pem", tmp / "key.pem", tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, *names: str) -> tuple[bytes, bytes, int]:
        """A chain and key for ``names`` (default the relay's), and the leaf's serial."""
        issued = self.ca.issue_cert(*(names or (DOMAIN, f"*.{DOMAIN}")))
        chain = b"".join(pem.bytes() for pem in issued.cert_chain_pems)
        return chain, issued.private_key_pem.bytes(), x509.load_pem_x509_certificate(chain).serial_number

    def install(self, chain: bytes, key: bytes) -> None:
        """As certbot does: new files renamed over the old ones."""
        for path, data in ((self.key, key), (self.cert, chain)):
            path.with_suffix(".new").write_bytes(data)
            os.replace(path.with_suffix(".new"), path)


def serial_of(tunnel: Tunnel, ca: Path) -> int:
    """The serial number of the certificate a new connection to the tunnel is served."""
    with connect(tunnel, ca) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def echoes(sock: ssl.SSLSocket, payload: bytes) -> bool:
    return echo_through(sock, payload) == payload


def wait_for_serial(tunnel: Tunnel, ca: Path, serial: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while serial_of(tunnel, ca) != serial:
        assert time.monotonic() < deadline, "the relay still serves the old certificate"
        time.sleep(0.05)


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return Pair(tmp_path)


@pytest.fixture
def relay(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Relay, int]]:
    monkeypatch.setattr(certwatch, "POLL", 0.1)
    chain, key, serial = pair.issue()
    pair.install(chain, key)
    config = RelayConfig(port=0, domain=DOMAIN, cert=pair.cert, key=pair.key)
    started = on_runtime(Relay(config).start())
    yield started, serial

    async def close() -> None:
        started.close()

    on_runtime(close())


def test_a_renewed_certificate_is_served_without_dropping_a_connection(
    relay: tuple[Relay, int], pair: Pair, echo: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    server, first = relay
    with burrow.forward(echo.port, relay=f"{DOMAIN}:{server.port}", ca=pair.ca_file) as tunnel:
        assert serial_of(tunnel, pair.ca_file) == first
        sessions = server.plane.session_ids() if server.plane else []
        with connect(tunnel, pair.ca_file) as before:
            assert echoes(before, b"before the renewal")
            chain, key, second = pair.issue()
            with caplog.at_level(logging.INFO, logger="burrow.relay"):
                pair.install(chain, key)
                wait_for_serial(tunnel, pair.ca_file, second)
            assert "serving the certificate in --cert" in caplog.text
            assert "valid until" in caplog.text
            # nothing dropped: the connection made before, and the agent's session
            assert echoes(before, b"after the renewal" * 1000)
            assert server.plane is not None and server.plane.session_ids() == sessions
            with connect(tunnel, pair.ca_file) as after:
                assert echoes(after, b"a new connection")


@pytest.mark.parametrize(
    "damage",
    [
        "key of another certificate",
        "names another domain",
        "garbage",
        "half-written chain",
    ],
)
def test_a_bad_new_pair_is_refused_and_the_old_one_stays(
    relay: tuple[Relay, int], pair: Pair, echo: EchoServer, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    server, first = relay
    chain, key, _ = pair.issue()
    other_chain, other_key, _ = pair.issue("r2.localhost", "*.r2.localhost")
    bad = {
        "key of another certificate": (chain, other_key),
        "names another domain": (other_chain, other_key),
        "garbage": (b"not a certificate\n", b"not a key\n"),
        "half-written chain": (chain[: len(chain) // 2], key),
    }[damage]
    opened: list[TunnelState] = []
    with burrow.forward(echo.port, relay=f"{DOMAIN}:{server.port}", ca=pair.ca_file, on_state=opened.append) as tunnel:
        with caplog.at_level(logging.WARNING, logger="burrow.relay"):
            pair.install(*bad)
            deadline = time.monotonic() + 10
            while "refused the new --cert" not in caplog.text:
                assert time.monotonic() < deadline, "the bad pair was not refused"
                time.sleep(0.05)
        assert len([r for r in caplog.records if "refused the new --cert" in r.getMessage()]) == 1
        assert serial_of(tunnel, pair.ca_file) == first
        with connect(tunnel, pair.ca_file) as sock:
            assert echoes(sock, b"still the old certificate")
        # the next good pair is taken (a renewal caught half-written is finished later)
        pair.install(chain, key)
        wait_for_serial(tunnel, pair.ca_file, x509.load_pem_x509_certificate(chain).serial_number)
        assert opened == [TunnelState.OPEN]  # the agent never noticed


def _same_stat_rewrite(path: Path, data: bytes) -> None:
    """Replace the file's bytes keeping its inode, size and mtime: only SIGHUP can tell."""
    before = path.stat()
    old = path.read_bytes()
    assert len(data) <= len(old) + 64
    size = max(len(old), len(data))
    # PEM readers skip text outside the BEGIN/END lines: pad both to one size with newlines
    padded = data + b"\n" * (size - len(data))
    with path.open("r+b") as file:
        file.write(padded)
        file.truncate(size)
    if size == before.st_size:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_sighup_reloads_the_certificate(pair: Pair, echo: EchoServer) -> None:
    chain, key, first = pair.issue()
    # room for the renewal to be written over it in place
    pair.install(chain + b"\n" * 64, key + b"\n" * 64)
    process = subprocess.Popen(
        [sys.executable, "-m", "burrow", "relay", "--listen", "127.0.0.1:0", "--domain", DOMAIN]
        + ["--cert", str(pair.cert), "--key", str(pair.key)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        ready = process.stdout.readline()
        assert "burrow relay ready on 127.0.0.1:" in ready, ready + process.stderr.read()
        port = int(ready.split("127.0.0.1:")[1].split()[0])
        with burrow.forward(echo.port, relay=f"{DOMAIN}:{port}", ca=pair.ca_file) as tunnel:
            assert serial_of(tunnel, pair.ca_file) == first
            new_chain, new_key, second = pair.issue()
            _same_stat_rewrite(pair.cert, new_chain)
            _same_stat_rewrite(pair.key, new_key)
            time.sleep(certwatch.POLL + 0.5)  # the files look unchanged: no poll reloads them
            assert serial_of(tunnel, pair.ca_file) == first
            with connect(tunnel, pair.ca_file) as before:
                process.send_signal(signal.SIGHUP)
                wait_for_serial(tunnel, pair.ca_file, second, within=5)
                assert echoes(before, b"across SIGHUP")
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
        assert process.returncode == 0, errors
        assert "(SIGHUP), valid until" in errors
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
