"""Agents that misbehave on purpose: silent after TLS, answering before HELLO, never reading, breaking the protocol.

Each was tried against the relay and found wanting; each is now a bound or
a prompt ending, whatever engine carries the bytes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from burrow import connection
from burrow.logs import LOG_LINES_PER_SECOND
from burrow.protocol.frames import HEADER, PING_PAYLOAD, ErrorCode, Frame, FrameType, decode_code, encode, encode_json
from burrow.relay import Relay, RelayConfig, agent_connection, native_plane

from ..helpers import free_port, on_runtime
from ..raw_agent import agent_socket as _agent
from ..raw_agent import hello as _hello
from ..raw_agent import read_frames as _frames
from .conftest import RelayProcess

PER_SOURCE = 10


def _refused_at_once(port: int, source: str) -> bool:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(2)
    try:
        sock.connect(("127.0.0.1", port))
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError, OSError):
        return True
    finally:
        sock.close()


def test_connections_silent_after_tls_count_as_pending_until_welcomed(ca_file: Path) -> None:
    relay = RelayProcess(free_port(), "--max-pending-per-source", str(PER_SOURCE))
    relay.start()
    silent: list[ssl.SSLSocket] = []
    try:
        silent = [_agent(relay.port, ca_file, "127.0.0.2") for _ in range(PER_SOURCE)]  # TLS done, no HELLO
        time.sleep(0.3)
        started = time.monotonic()
        assert _refused_at_once(relay.port, "127.0.0.2")
        assert time.monotonic() - started < 1.5  # refused, not left to a deadline
        with _agent(relay.port, ca_file, "127.0.0.1") as other:  # other sources are unaffected
            other.sendall(_hello())
            assert any(kind == FrameType.WELCOME for kind, _, _ in _frames(other, FrameType.WELCOME, 5))
        silent[0].sendall(_hello())  # a HELLO with a good token frees its slot
        assert any(kind == FrameType.WELCOME for kind, _, _ in _frames(silent[0], FrameType.WELCOME, 5))
        with _agent(relay.port, ca_file, "127.0.0.2") as again:
            again.sendall(_hello())
            assert any(kind == FrameType.WELCOME for kind, _, _ in _frames(again, FrameType.WELCOME, 5))
    finally:
        for sock in silent:
            sock.close()
        relay.stop()
    assert any("handshakes already pending from it" in line for line in relay.log)


def test_the_relay_does_not_ping_before_hello_and_takes_pongs_after(fast_relay: Relay, ca_file: Path) -> None:
    with _agent(fast_relay.port, ca_file) as sock:
        interval = fast_relay.config.heartbeat_timeout / connection.HEARTBEATS_PER_TIMEOUT
        assert _frames(sock, FrameType.PING, interval * 2.5) == []  # two beats' time: silence
        sock.sendall(_hello())
        frames = _frames(sock, FrameType.PING, interval * 3)
        assert [kind for kind, _, _ in frames] == [FrameType.WELCOME, FrameType.PING]
        sock.sendall(encode(FrameType.PONG, 0, frames[-1][2]))  # answered as the protocol says
        sock.sendall(encode(FrameType.PING, 0, PING_PAYLOAD.pack(42)))
        answers = _frames(sock, FrameType.PONG, interval * 3)
        assert (FrameType.PONG, 0, PING_PAYLOAD.pack(42)) in answers
        assert all(kind != FrameType.GOAWAY for kind, _, _ in answers)


def test_a_protocol_error_resets_the_sessions_public_clients_at_once(fast_relay: Relay, ca_file: Path) -> None:
    with _agent(fast_relay.port, ca_file) as agent:
        agent.sendall(_hello())
        agent.sendall(encode_json(FrameType.BIND, {"request": 1, "port": 9, "unencrypted": True, "h2": False}))
        (bound,) = [p for kind, _, p in _frames(agent, FrameType.BOUND, 5) if kind == FrameType.BOUND]
        tcp_port = int(bound.split(b'"unencrypted_port":')[1].split(b"}")[0].split(b",")[0])
        with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as client:
            client.sendall(b"hello?")
            assert any(kind == FrameType.OPEN for kind, _, _ in _frames(agent, FrameType.OPEN, 5))
            agent.sendall(HEADER.pack(99, 0, 0, 0))  # garbage: the session dies
            started = time.monotonic()
            try:
                ended = client.recv(100)
            except ConnectionResetError:
                ended = b""
            assert ended == b"" and time.monotonic() - started < 1.0  # not after the TLS close's 5 s


def test_an_agent_that_never_reads_is_cut_off(
    fast_relay: Relay, ca_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(connection, "MAX_UNSENT", 1024 * 1024)  # the bound, made small for the test
    caplog.set_level(logging.WARNING, logger="burrow.connection")
    pings = encode(FrameType.PING, 0, PING_PAYLOAD.pack(7)) * 4096  # 72 KiB asking for as many PONGs
    with _agent(fast_relay.port, ca_file, receive_buffer=4096) as sock:
        sock.sendall(_hello())
        sent = 0
        with pytest.raises(OSError):  # the relay hangs up (reset, or a send that finds it gone)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                sock.sendall(pings)
                sent += len(pings)
            raise AssertionError(f"sent {sent} bytes of PINGs without reading and the relay took them all")
    assert sent < 64 * 1024 * 1024
    assert any("peer reads nothing" in r.getMessage() for r in caplog.records)


@contextlib.contextmanager
def _logged(*names: str) -> Iterator[list[str]]:
    """The lines the relay's loggers emit meanwhile, at INFO and above.

    (A handler of our own: caplog lost records when the whole faults directory ran,
    whatever earlier tests did to logging.)
    """
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    saved = []
    for name in names or ("burrow.relay", "burrow.connection"):
        log = logging.getLogger(name)
        saved.append((log, log.level, log.disabled))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.disabled = False
    try:
        yield lines
    finally:
        for log, level, disabled in saved:
            log.removeHandler(handler)
            log.setLevel(level)
            log.disabled = disabled


def test_an_agent_cannot_forge_log_lines_with_its_name(fast_relay: Relay, ca_file: Path) -> None:
    forged = "x\r\n2026-12-05 INFO burrow.relay: tunnel abc opened\x1b[2J"
    with _logged() as lines, _agent(fast_relay.port, ca_file) as sock:
        sock.sendall(_hello(forged))
        assert [kind for kind, _, _ in _frames(sock, FrameType.WELCOME, 5)] == [FrameType.WELCOME]
    (line,) = [line for line in lines if "opened by agent" in line]
    assert not any(c in line for c in "\r\n\x1b"), line
    assert "\\r\\n2026-12-05 INFO" in line and "\\x1b[2J" in line


# ---------------------------------------------------------------- refusals cannot flood the log

FLOOD = 120  # attempts per refusal path: several times the lines a second may log


def _until_closed(sock: ssl.SSLSocket) -> None:
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    sock.close()


def _wrong_token(port: int, ca: Path, source: str) -> None:
    sock = _agent(port, ca, source)
    sock.sendall(encode_json(FrameType.HELLO, {"versions": [1], "token": "wrong", "window": 1 << 20, "agent": "t"}))
    _until_closed(sock)


def _no_alpn(port: int, ca: Path, source: str) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    _until_closed(context.wrap_socket(sock, server_hostname="localhost"))


def _garbage_frame(port: int, ca: Path, source: str) -> None:
    sock = _agent(port, ca, source)
    sock.sendall(_hello("t", token="right") + HEADER.pack(99, 0, 0, 0))  # an unknown frame type
    _until_closed(sock)


def _bad_bind(port: int, ca: Path, source: str) -> None:
    sock = _agent(port, ca, source)
    sock.sendall(_hello("t", token="right") + encode(FrameType.BIND, 0, b"{not json"))
    _until_closed(sock)


def _no_hello(port: int, ca: Path, source: str) -> None:
    _until_closed(_agent(port, ca, source))  # TLS, then silence until the relay gives up


REFUSALS: dict[str, tuple[Callable[[int, Path, str], None], str]] = {
    "wrong token": (_wrong_token, "wrong token"),
    "no ALPN": (_no_alpn, "without ALPN burrow/1"),
    "garbage frame": (_garbage_frame, "protocol error from peer"),
    "bad BIND": (_bad_bind, "protocol error from peer"),
    "no HELLO": (_no_hello, "no HELLO within"),
}


def _accounted(lines: list[str], marker: str) -> tuple[int, int]:
    """How many refusals were logged, and how many the summary lines say were left out."""
    logged = sum(marker in line for line in lines)
    left_out = sum(
        int(line.split()[0])
        for line, following in zip(lines, lines[1:], strict=False)
        if line.endswith("more like the next line in the last second") and marker in following
    )
    return logged, left_out


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_a_flood_of_refusals_logs_a_bounded_number_of_lines(
    refusal: str, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refusal an unauthenticated (or broken) peer can cause is logged at most
    LOG_LINES_PER_SECOND times a second; the rest are counted, and the count is logged."""
    for module in (native_plane, agent_connection):
        monkeypatch.setattr(module, "HELLO_TIMEOUT", 0.3)  # (read when the relay starts)
    relay = on_runtime(Relay(RelayConfig(port=0, tokens=frozenset({"right"}))).start())
    attempt, marker = REFUSALS[refusal]
    try:
        with _logged() as lines:
            started = time.monotonic()
            # in parallel, from 100 sources: the no-HELLO ones wait out the relay's patience together
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                sources = [f"127.0.3.{1 + n % 100}" for n in range(FLOOD)]
                list(pool.map(lambda source: attempt(relay.port, ca_file, source), sources))
            elapsed = time.monotonic() - started
            time.sleep(1.1)  # a new second: the next refusal first says how many were left out
            attempt(relay.port, ca_file, "127.0.3.200")
            deadline = time.monotonic() + 5  # (the relay logs from its own loop)
            while time.monotonic() < deadline and sum(_accounted(lines, marker)) < FLOOD + 1:
                time.sleep(0.05)
    finally:

        async def close() -> None:
            relay.close()

        on_runtime(close())
    logged, left_out = _accounted(lines, marker)
    assert logged + left_out == FLOOD + 1, (logged, left_out)  # each one logged or counted
    assert logged <= LOG_LINES_PER_SECOND * (int(elapsed) + 2), (logged, elapsed)
    assert left_out, "nothing was left out: the flood was not one"


# ---------------------------------------------------------------- sessions per token and per source


def _session(port: int, ca: Path, source: str) -> tuple[ssl.SSLSocket, int, str]:
    """An agent session from ``source``: its socket and the relay's answer (WELCOME: code 0)."""
    sock = _agent(port, ca, source)
    sock.sendall(_hello())
    for kind, stream_id, payload in _frames(sock, FrameType.WELCOME, 5):
        if kind == FrameType.WELCOME:
            return sock, 0, ""
        if kind == FrameType.GOAWAY:
            return (sock, *decode_code(Frame(FrameType.GOAWAY, stream_id, payload)))
    raise AssertionError("neither WELCOME nor GOAWAY")


def test_sessions_per_token_and_per_source_are_capped(ca_file: Path) -> None:
    relay = on_runtime(Relay(RelayConfig(port=0, max_sessions_per_token=3, max_sessions_per_source=2)).start())
    opened: list[ssl.SSLSocket] = []

    def session(source: str) -> tuple[int, str]:
        sock, code, reason = _session(relay.port, ca_file, source)
        opened.append(sock)
        return code, reason

    try:
        assert session("127.0.4.1") == session("127.0.4.1") == (0, "")
        assert session("127.0.4.1") == (
            ErrorCode.LIMIT,
            "2 sessions come from 127.0.4.1 already (the limit); close some first",
        )
        assert session("127.0.4.2") == (0, "")  # the token's third
        assert session("127.0.4.3") == (
            ErrorCode.LIMIT,
            "this token has 3 sessions at this relay (the limit); close some first",
        )
        opened.pop(0).close()  # one of 127.0.4.1's ends: the token has room again
        deadline = time.monotonic() + 5
        while (answer := session("127.0.4.3"))[0] == ErrorCode.LIMIT and time.monotonic() < deadline:
            time.sleep(0.05)  # (until the relay has seen the close)
        assert answer == (0, "")
    finally:
        for sock in opened:
            sock.close()

        async def close() -> None:
            relay.close()

        on_runtime(close())
