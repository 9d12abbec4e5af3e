"""Test helpers for the sans-I/O protocol: a joined agent/relay pair, frame decoding.

The idea is h11's ``ConnectionPair``: two protocol objects and a "wire" that is
just moving ``data_to_send()`` of one into ``receive_data()`` of the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from burrow.protocol import events as ev
from burrow.protocol.frames import (
    MAX_FRAME_PAYLOAD,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    decode_code,
    encode,
    encode_json,
)
from burrow.protocol.session import DEFAULT_WINDOW, Role, SessionProtocol


def wire_bytes(chunks: Iterable[bytes | memoryview]) -> bytes:
    """The chunks of ``data_to_send()`` as one bytes object."""
    return b"".join(bytes(chunk) for chunk in chunks)


def decode_frames(data: bytes | Iterable[bytes | memoryview], max_payload: int = MAX_FRAME_PAYLOAD) -> list[Frame]:
    """Decode whole frames; fails if ``data`` ends in the middle of one."""
    if not isinstance(data, bytes):
        data = wire_bytes(data)
    decoder = FrameDecoder(max_payload)
    frames = decoder.feed(data)
    assert decoder.buffered == 0, "data_to_send() ended in the middle of a frame"
    return frames


def goaway_code(frames: list[Frame]) -> int | None:
    """The code of the last GOAWAY among ``frames`` (None when there is none)."""
    codes = [decode_code(f)[0] for f in frames if f.type is FrameType.GOAWAY]
    return codes[-1] if codes else None


def data_frame(stream_id: int, payload: bytes) -> bytes:
    return encode(FrameType.DATA, stream_id, payload)


def hello_frame(**overrides: Any) -> bytes:
    message: dict[str, Any] = {"versions": [1], "token": "t", "window": DEFAULT_WINDOW, "agent": "test"}
    message.update(overrides)
    return encode_json(FrameType.HELLO, message)


class Pair:
    """An agent and a relay protocol object joined by an in-memory wire."""

    def __init__(
        self,
        *,
        agent_window: int = DEFAULT_WINDOW,
        relay_window: int = DEFAULT_WINDOW,
        max_payload: int = MAX_FRAME_PAYLOAD,
    ) -> None:
        self.agent = SessionProtocol(Role.AGENT, window=agent_window, max_payload=max_payload)
        self.relay = SessionProtocol(Role.RELAY, window=relay_window, max_payload=max_payload)

    def peer(self, proto: SessionProtocol) -> SessionProtocol:
        return self.relay if proto is self.agent else self.agent

    def send(self, proto: SessionProtocol) -> list[ev.Event]:
        """Move what ``proto`` queued into its peer; return the peer's new events."""
        peer = self.peer(proto)
        data = wire_bytes(proto.data_to_send())
        if data:
            peer.receive_data(data)
        return peer.events_received()

    def exchange(self) -> tuple[list[ev.Event], list[ev.Event]]:
        """Shuttle bytes both ways until neither side has anything to send.

        Returns (events the agent got, events the relay got).
        """
        agent_events: list[ev.Event] = []
        relay_events: list[ev.Event] = []
        for _ in range(1000):
            to_relay = wire_bytes(self.agent.data_to_send())
            if to_relay:
                self.relay.receive_data(to_relay)
            relay_events += self.relay.events_received()
            to_agent = wire_bytes(self.relay.data_to_send())
            if to_agent:
                self.agent.receive_data(to_agent)
            agent_events += self.agent.events_received()
            if not to_relay and not to_agent:
                return agent_events, relay_events
        raise AssertionError("the two sides never went quiet")

    def handshake(self, token: str = "secret-token", session_id: str = "session-1") -> tuple[Any, Any]:
        """HELLO then WELCOME; returns (HelloReceived, Welcomed)."""
        self.agent.hello(token, agent="pytest")
        [hello] = self.send(self.agent)
        assert isinstance(hello, ev.HelloReceived)
        self.relay.welcome(session_id)
        [welcomed] = self.send(self.relay)
        assert isinstance(welcomed, ev.Welcomed)
        return hello, welcomed

    def open_stream(self, tunnel_id: str = "tunnel-1", peer: str = "203.0.113.7:4242") -> int:
        """Relay opens a stream; the agent sees it. Returns the stream id."""
        stream_id = self.relay.open_stream(tunnel_id, peer)
        assert self.send(self.relay) == [ev.StreamOpened(stream_id, tunnel_id, peer)]
        return stream_id


__all__ = [
    "ErrorCode",
    "Pair",
    "data_frame",
    "decode_frames",
    "goaway_code",
    "hello_frame",
    "wire_bytes",
]
