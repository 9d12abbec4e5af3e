"""The relay's attack surface, as a hostile stranger sees it: ids that cannot be guessed, names that
route nowhere, listeners fed random bytes, and secrets that never show in what a process exposes."""

from __future__ import annotations

import os
import random
import socket
import ssl
import subprocess
import sys
from collections import Counter
from pathlib import Path

import burrow
from burrow.agent.runtime import runtime
from burrow.relay import Relay, RelayConfig
from burrow.relay.registry import ID_ALPHABET, ID_LENGTH, new_tunnel_id

from ..helpers import EchoServer, echo_once, forward_process, on_runtime

#: Chi-square bound for 35 degrees of freedom (36 symbols) at p ~ 1e-7: a fair generator passes every
#: position's test all but always; a biased one (a symbol at 1.5x its share) fails by hundreds.
CHI_SQUARE_BOUND = 90.0


def test_100k_tunnel_ids_neither_collide_nor_lean() -> None:
    ids = [new_tunnel_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == ID_LENGTH and set(i) <= set(ID_ALPHABET) for i in ids)
    expected = len(ids) / len(ID_ALPHABET)
    for position in range(ID_LENGTH):
        counts = Counter(i[position] for i in ids)
        chi_square = sum((counts[c] - expected) ** 2 / expected for c in ID_ALPHABET)
        assert chi_square < CHI_SQUARE_BOUND, (position, chi_square, counts.most_common(3))


def _alert(port: int, server_hostname: str | None, ca: Path) -> str:
    """What the relay says to a ClientHello with this name (or none): the TLS error, or "handshake"."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=server_hostname):
                return "handshake"
    except ssl.SSLError as exc:
        return exc.reason or str(exc)
    except OSError as exc:
        return type(exc).__name__


def test_no_name_an_ip_literal_and_unknown_names_route_nowhere(echo: EchoServer, ca_file: Path) -> None:
    with burrow.forward(echo.port) as tunnel:
        relay = runtime().embedded
        assert relay is not None
        port = relay.port  # the shared TLS port, routed by name
        assert _alert(port, f"{tunnel.id}.localhost", ca_file) == "handshake"
        for name in (None, "127.0.0.1", "zzzzzzzzzzzzzz.localhost", f"{tunnel.id}x.localhost", "localhost.evil"):
            # (the native engine says unrecognized_name; the asyncio one hangs up: either way no certificate)
            assert _alert(port, name, ca_file) in (
                "TLSV1_UNRECOGNIZED_NAME",
                "UNEXPECTED_EOF_WHILE_READING",
                "ConnectionResetError",
            ), name


def test_every_listener_shrugs_off_random_bytes(echo: EchoServer, ca_file: Path) -> None:
    """Random bytes (and random-length cuts of a real ClientHello) at the agent/TLS port, a tunnel's own
    TLS port and its raw TCP port; then the tunnel still carries a clean echo."""
    rng = random.Random(20261205)
    with burrow.forward(echo.port, unencrypted=True) as tunnel:
        relay = runtime().embedded
        assert relay is not None
        for port in (relay.port, tunnel.port):
            for _ in range(60):
                payload = rng.randbytes(rng.choice([1, 5, 64, 517, 4096, 16 * 1024]))
                if rng.random() < 0.3:
                    payload = b"\x16\x03\x01" + payload  # looks like a TLS record: goes deeper into the parser
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    try:
                        sock.sendall(payload)
                        # (done talking: a cut-short record would otherwise wait out the handshake deadline)
                        sock.shutdown(socket.SHUT_WR)
                        sock.settimeout(5)
                        while sock.recv(65536):  # the relay answers (an alert at most) and hangs up
                            pass
                    except OSError:  # (reset, or gone before our FIN)
                        pass
        with socket.create_connection(("127.0.0.1", tunnel.unencrypted_port or 0), timeout=10) as sock:
            payload = os.urandom(64 * 1024)  # a raw TCP tunnel passes any bytes, untouched
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += sock.recv(65536)
            assert got == payload
        assert echo_once(tunnel, ca_file) == b"hello burrow"


def test_no_token_in_what_a_process_shows(tmp_path: Path, echo: EchoServer) -> None:
    """A token reaches burrow from the environment or a file: never its command line, title or output."""
    token = "tok-" + os.urandom(12).hex()
    relay = on_runtime(Relay(RelayConfig(port=0, tokens=frozenset({token}))).start())
    try:
        env = {**os.environ, "BURROW_RELAY": f"localhost:{relay.port}", "BURROW_TOKEN": token}
        process = forward_process(echo.port, f"localhost:{relay.port}", token, "-v")
        try:
            assert process.stdout is not None and process.stdout.readline().startswith("https://")
            shown = Path(f"/proc/{process.pid}/cmdline").read_bytes() + Path(f"/proc/{process.pid}/comm").read_bytes()
            assert token.encode() not in shown
        finally:
            process.terminate()
            out, err = process.communicate(timeout=20)
        assert process.returncode == 0, err
        assert token not in out + err
        wrong = subprocess.run(
            [sys.executable, "-m", "burrow", "forward", str(echo.port), "--relay-timeout", "0"],
            env={**env, "BURROW_TOKEN": token + "x"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert wrong.returncode == 1 and "rejected the token from BURROW_TOKEN" in wrong.stderr
        assert token not in wrong.stdout + wrong.stderr
    finally:

        async def close() -> None:
            relay.close()

        on_runtime(close())
