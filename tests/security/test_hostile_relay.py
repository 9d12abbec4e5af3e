"""A relay is hostile until checked, from the agent's side too: whatever a relay asks for in OPEN, the
agent dials the one target its owner named, and nothing else on the machine."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import burrow
from burrow.certs import DevCA
from burrow.protocol import events as ev
from burrow.protocol.frames import FrameType, encode_json
from burrow.protocol.messages import TunnelAddress
from burrow.protocol.session import Role, SessionProtocol
from burrow.relay.tls import AGENT_ALPN

from ..helpers import EchoServer

TUNNEL = "abcdefghijklmn"


class Canary:
    """A listener the agent must never connect to."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]

    def dialed(self) -> bool:
        try:
            self.sock.accept()[0].close()
            return True
        except TimeoutError:
            return False


def _hostile_relay(listener: ssl.SSLSocket, canary: int, done: threading.Event) -> None:
    """Welcome the agent, bind its tunnel, then ask it to open streams to elsewhere."""
    conn, _ = listener.accept()
    proto = SessionProtocol(Role.RELAY)
    conn.settimeout(0.2)
    asked = False
    while not done.is_set():
        try:
            data = conn.recv(65536)
        except TimeoutError:
            data = b""
        except OSError:
            return
        if asked:
            continue  # (what the agent answers, RST for the stream of a tunnel not its own, is not parsed)
        if data:
            proto.receive_data(data)
        bound = False
        for event in proto.events_received():
            if isinstance(event, ev.HelloReceived):
                proto.welcome("s1")
            elif isinstance(event, ev.BindRequested):
                proto.bound(event.request_id, TunnelAddress(TUNNEL, f"{TUNNEL}.localhost", 443))
                bound = True
        for chunk in proto.data_to_send():
            conn.sendall(chunk)
        if bound and not asked:  # the tunnel is the agent's now: ask for streams to elsewhere
            asked = True
            elsewhere = {"port": canary, "host": "127.0.0.1", "target": f"127.0.0.1:{canary}", "unix": "/etc/passwd"}
            conn.sendall(encode_json(FrameType.OPEN, {"tunnel": TUNNEL, "peer": "198.51.100.9:1", **elsewhere}, 1))
            conn.sendall(encode_json(FrameType.OPEN, {"tunnel": "notours0000000", "peer": "x", **elsewhere}, 2))
    conn.close()


@pytest.fixture
def hostile_relay(tmp_path: Path) -> Iterator[tuple[int, Canary, threading.Event]]:
    leaf = DevCA.load_or_create().issue("localhost")
    (tmp_path / "leaf.pem").write_bytes(leaf.cert_pem + leaf.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(tmp_path / "leaf.pem"))
    context.set_alpn_protocols([AGENT_ALPN])
    listener = context.wrap_socket(socket.create_server(("127.0.0.1", 0)), server_side=True)
    canary, done = Canary(), threading.Event()
    thread = threading.Thread(target=_hostile_relay, args=(listener, canary.port, done), daemon=True)
    thread.start()
    yield listener.getsockname()[1], canary, done
    done.set()
    thread.join(5)
    listener.close()
    canary.sock.close()


def test_the_agent_dials_only_its_target_whatever_open_says(
    hostile_relay: tuple[int, Canary, threading.Event], echo: EchoServer
) -> None:
    port, canary, _ = hostile_relay
    served: list[int] = []
    target = socket.create_server(("127.0.0.1", 0))
    target.settimeout(0.2)
    with burrow.forward(target.getsockname()[1], relay=f"localhost:{port}", token="t") as tunnel:
        assert tunnel.id == TUNNEL
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                conn, _ = target.accept()
                served.append(1)
                conn.close()
            except TimeoutError:
                pass
            assert not canary.dialed()  # never the port, host, target or socket the relay named
    target.close()
    assert served == [1]  # the stream of its own tunnel went to its own target, once; the other was refused
