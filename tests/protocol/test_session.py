"""The session state machine, driven through a joined agent/relay pair (no I/O anywhere)."""

from __future__ import annotations

import sys

import pytest

from burrow.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from burrow.protocol import events as ev
from burrow.protocol.frames import (
    MAX_WINDOW,
    PING_PAYLOAD,
    WINDOW_PAYLOAD,
    ErrorCode,
    FrameType,
    decode_code,
    encode,
    encode_code,
    encode_json,
)
from burrow.protocol.messages import MAX_TEXT_LENGTH, Access, BindFailure, TunnelAddress
from burrow.protocol.session import (
    DEFAULT_WINDOW,
    MIN_WINDOW,
    PROTOCOL_VERSION,
    Role,
    SessionProtocol,
    SessionState,
    StreamState,
)

from .protocol_pair import Pair, data_frame, decode_frames, goaway_code, hello_frame, wire_bytes

W = MIN_WINDOW  # a small window keeps the flow-control tests cheap


@pytest.fixture
def pair() -> Pair:
    p = Pair()
    p.handshake()
    return p


@pytest.fixture
def small() -> Pair:
    """A handshaken pair where both sides grant a window of W bytes."""
    p = Pair(agent_window=W, relay_window=W)
    p.handshake()
    return p


def expect_protocol_error(proto: SessionProtocol, data: bytes, code: ErrorCode) -> ProtocolError:
    """Feed ``data``; it must raise ProtocolError(code), close the session and queue GOAWAY(code)."""
    with pytest.raises(ProtocolError) as info:
        proto.receive_data(data)
    exc = info.value
    assert type(exc) is RemoteProtocolError
    assert exc.code == code
    assert proto.state is SessionState.CLOSED
    assert proto.close_code == code
    assert proto.stream_count == 0
    frames = decode_frames(proto.data_to_send())
    assert frames and frames[-1].type is FrameType.GOAWAY
    assert goaway_code(frames) == code
    # a closed session ignores whatever else arrives
    proto.receive_data(encode(FrameType.PING, 0, PING_PAYLOAD.pack(1)))
    assert proto.data_to_send() == []
    return exc


def payload_of(events: list[ev.Event], stream_id: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ev.DataReceived) and e.stream_id == stream_id)


# ------------------------------------------------------------------ handshake


def test_constructor_validates_the_window() -> None:
    for window in (MIN_WINDOW - 1, MAX_WINDOW + 1, 0):
        with pytest.raises(LocalProtocolError):
            SessionProtocol(Role.AGENT, window=window)
    assert SessionProtocol(Role.RELAY, window=MIN_WINDOW).state is SessionState.HANDSHAKE


def test_handshake() -> None:
    p = Pair(agent_window=W, relay_window=2 * W)
    assert p.agent.state is p.relay.state is SessionState.HANDSHAKE
    p.agent.hello("s3cret", agent="pytest/1.0")
    assert p.agent.state is SessionState.HANDSHAKE
    [hello] = p.send(p.agent)
    assert hello == ev.HelloReceived(PROTOCOL_VERSION, "s3cret", W, "pytest/1.0")
    assert "s3cret" not in repr(hello)
    assert p.relay.state is SessionState.HELLO_RECEIVED
    assert p.relay.peer_window == W

    p.relay.welcome("sess-42")
    assert p.relay.state is SessionState.OPEN
    [welcomed] = p.send(p.relay)
    assert isinstance(welcomed, ev.Welcomed)
    assert (welcomed.version, welcomed.session_id, welcomed.window) == (PROTOCOL_VERSION, "sess-42", 2 * W)
    assert p.agent.state is SessionState.OPEN
    assert p.agent.peer_window == 2 * W and p.agent.version == p.relay.version == PROTOCOL_VERSION
    assert p.exchange() == ([], [])


def test_reject_with_auth_failed() -> None:
    p = Pair()
    p.agent.hello("wrong")
    p.send(p.agent)
    p.relay.reject(ErrorCode.AUTH_FAILED, "bad token")
    assert p.relay.state is SessionState.CLOSED
    assert p.relay.close_code == ErrorCode.AUTH_FAILED
    assert p.send(p.relay) == [ev.GoAwayReceived(ErrorCode.AUTH_FAILED, "bad token")]
    assert p.agent.state is SessionState.CLOSED
    assert p.agent.close_code == ErrorCode.AUTH_FAILED
    with pytest.raises(LocalProtocolError):
        p.agent.bind(1, 8000)


def test_unsupported_version_from_agent() -> None:
    relay = SessionProtocol(Role.RELAY)
    exc = expect_protocol_error(relay, hello_frame(versions=[2, 3, "x"]), ErrorCode.UNSUPPORTED_VERSION)
    assert "[2, 3]" in str(exc)


def test_unsupported_version_reaches_the_agent() -> None:
    p = Pair()
    p.agent.hello("t")
    p.agent.data_to_send()
    with pytest.raises(ProtocolError):
        p.relay.receive_data(hello_frame(versions=[99]))
    [goaway] = p.send(p.relay)
    assert isinstance(goaway, ev.GoAwayReceived)
    assert goaway.code == ErrorCode.UNSUPPORTED_VERSION
    assert "upgrade" in goaway.reason
    assert p.agent.state is SessionState.CLOSED
    assert p.agent.close_code == ErrorCode.UNSUPPORTED_VERSION


def test_unsupported_version_from_relay() -> None:
    agent = SessionProtocol(Role.AGENT)
    agent.hello("t")
    agent.data_to_send()
    welcome = encode_json(FrameType.WELCOME, {"version": 7, "session": "s", "window": DEFAULT_WINDOW})
    expect_protocol_error(agent, welcome, ErrorCode.UNSUPPORTED_VERSION)


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"versions": "1"}, ErrorCode.PROTOCOL_ERROR),
        ({"token": None}, ErrorCode.PROTOCOL_ERROR),
        ({"token": 5}, ErrorCode.PROTOCOL_ERROR),
        ({"token": "\ud800"}, ErrorCode.PROTOCOL_ERROR),  # JSON can say it, UTF-8 cannot: never reaches admission
        ({"token": "t" * 4097}, ErrorCode.PROTOCOL_ERROR),
        ({"window": True}, ErrorCode.PROTOCOL_ERROR),  # a bool is not an int here
        ({"window": 65536.0}, ErrorCode.PROTOCOL_ERROR),
        ({"window": MIN_WINDOW - 1}, ErrorCode.FLOW_CONTROL),
        ({"window": MAX_WINDOW + 1}, ErrorCode.FLOW_CONTROL),
    ],
)
def test_bad_hello_fields(overrides: dict[str, object], code: ErrorCode) -> None:
    expect_protocol_error(SessionProtocol(Role.RELAY), hello_frame(**overrides), code)


def test_hello_with_deeply_nested_json_is_a_protocol_error() -> None:
    payload = b'{"agent":' + b"[" * 16000 + b"}"
    expect_protocol_error(SessionProtocol(Role.RELAY), encode(FrameType.HELLO, 0, payload), ErrorCode.PROTOCOL_ERROR)


def test_nesting_right_under_the_recursion_limit_is_survived() -> None:
    # whatever depth the JSON parser still accepts, the session must not crash on it afterwards
    head = b'{"versions":[1],"token":"t","window":%d,"agent":' % DEFAULT_WINDOW
    limit = sys.getrecursionlimit()
    accepted = 0
    for depth in range(limit - 200, limit + 10):
        relay = SessionProtocol(Role.RELAY)
        try:
            relay.receive_data(encode(FrameType.HELLO, 0, head + b"[" * depth + b"]" * depth + b"}"))
        except ProtocolError:
            assert relay.state is SessionState.CLOSED
        else:
            [hello] = relay.events_received()
            assert len(hello.agent) <= 200
            accepted += 1
    assert accepted  # the loop did reach the interesting region


def test_frames_out_of_state_during_handshake() -> None:
    # the relay wants HELLO first
    expect_protocol_error(
        SessionProtocol(Role.RELAY), encode_json(FrameType.BIND, {"request": 1}), ErrorCode.PROTOCOL_ERROR
    )
    expect_protocol_error(SessionProtocol(Role.RELAY), data_frame(1, b"x"), ErrorCode.PROTOCOL_ERROR)
    # the agent wants WELCOME first
    agent = SessionProtocol(Role.AGENT)
    agent.hello("t")
    agent.data_to_send()
    expect_protocol_error(agent, encode_json(FrameType.OPEN, {"tunnel": "t", "peer": "p"}, 1), ErrorCode.PROTOCOL_ERROR)


def test_second_hello_and_wrong_direction_frames(pair: Pair) -> None:
    expect_protocol_error(pair.relay, hello_frame(), ErrorCode.PROTOCOL_ERROR)
    p = Pair()
    p.handshake()
    # BOUND only goes relay -> agent
    expect_protocol_error(p.relay, encode_json(FrameType.BOUND, {"id": "x", "request": 1}), ErrorCode.PROTOCOL_ERROR)
    p = Pair()
    p.handshake()
    expect_protocol_error(p.agent, encode_json(FrameType.BIND, {"request": 1}), ErrorCode.PROTOCOL_ERROR)


def test_api_role_and_state_checks() -> None:
    p = Pair()
    with pytest.raises(LocalProtocolError):
        p.relay.hello("t")
    with pytest.raises(LocalProtocolError):
        p.agent.welcome("s")
    with pytest.raises(LocalProtocolError):
        p.relay.welcome("s")  # no HELLO yet
    with pytest.raises(LocalProtocolError):
        p.agent.bind(1, 80)  # not open yet
    with pytest.raises(LocalProtocolError):
        p.relay.open_stream("t", "p")
    p.handshake()
    with pytest.raises(LocalProtocolError):
        p.agent.hello("t")
    with pytest.raises(LocalProtocolError):
        p.relay.bind(1, 80)
    with pytest.raises(LocalProtocolError):
        p.agent.bound(1, TunnelAddress("t", "t.example.test", 443))
    with pytest.raises(LocalProtocolError):
        p.agent.open_stream("t", "p")
    # misuse changes nothing
    assert p.agent.data_to_send() == [] and p.relay.data_to_send() == []
    assert p.agent.state is p.relay.state is SessionState.OPEN


# -------------------------------------------------------------------- tunnels


def test_bind_bound(pair: Pair) -> None:
    pair.agent.bind(7, 8080, unencrypted=True, ticket="abc.def")
    [request] = pair.send(pair.agent)
    assert isinstance(request, ev.BindRequested)
    assert (request.request_id, request.port, request.unencrypted, request.h2) == (7, 8080, True, False)
    assert request.ticket == "abc.def"
    address = TunnelAddress("tun1", "tun1.example.test", 443, "tick.et", "example.test", 20001)
    pair.relay.bound(7, address)
    [bound] = pair.send(pair.relay)
    assert bound == ev.Bound(7, address)


def test_bind_carries_the_owners_access_rules(pair: Pair) -> None:
    access = Access(("203.0.113.0/24", "2001:db8::/32"), 2, "-----BEGIN CERTIFICATE-----\n...")
    pair.agent.bind(3, 8000, access=access)
    [request] = pair.send(pair.agent)
    assert isinstance(request, ev.BindRequested) and request.access == access
    pair.agent.bind(4, 8000)  # none asked: none sent, anyone allowed
    [request] = pair.send(pair.agent)
    assert isinstance(request, ev.BindRequested) and request.access == Access()


@pytest.mark.parametrize(
    "change",
    [
        {"allow": "10.0.0.0/8"},
        {"allow": [8]},
        {"allow": ["10.0.0.0/33"]},
        {"allow": ["example.com"]},
        {"allow": [f"10.0.{n}.0/24" for n in range(65)]},
        {"proxy": 3},
        {"proxy": True},
        {"proxy": "1"},
        {"client_ca": 5},
        {"client_ca": "not a certificate"},
        {"client_ca": "-----BEGIN CERTIFICATE-----" + "A" * 13_000},
    ],
)
def test_a_bind_with_malformed_access_rules_is_a_protocol_error(pair: Pair, change: dict[str, object]) -> None:
    message = {"request": 1, "port": 80, "unencrypted": False, "h2": False, **change}
    pair.agent._out.append(encode_json(FrameType.BIND, message))
    with pytest.raises(RemoteProtocolError) as info:
        pair.send(pair.agent)
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


GOOD_BOUND = {"request": 1, "id": "abc", "host": "abc.example.test", "port": 443, "ticket": "t.t"}


@pytest.mark.parametrize(
    "change",
    [
        {"id": None},
        {"id": 5},
        {"id": "a.b"},
        {"id": "x" * 64},
        {"host": None},
        {"host": "a b"},
        {"host": "h" * 254},
        {"port": "443"},
        {"port": 0},
        {"port": 70000},
        {"port": True},
        {"ticket": 5},
        {"ticket": "t" * 3000},
        {"unencrypted_port": 20000},
        {"unencrypted_host": "example.test"},
        {"unencrypted_host": "example.test", "unencrypted_port": -1},
        {"request": "1"},
    ],
)
def test_a_malformed_bound_is_a_protocol_error_not_a_key_error(pair: Pair, change: dict[str, object]) -> None:
    message = {k: v for k, v in {**GOOD_BOUND, **change}.items() if v is not None}
    pair.relay._out.append(encode_json(FrameType.BOUND, message))
    with pytest.raises(RemoteProtocolError) as info:
        pair.send(pair.relay)
    assert info.value.code == ErrorCode.PROTOCOL_ERROR
    assert pair.agent.state is SessionState.CLOSED


def test_a_well_formed_bound_decodes_to_its_address(pair: Pair) -> None:
    pair.relay._out.append(encode_json(FrameType.BOUND, {**GOOD_BOUND, "future_field": [1]}))
    [bound] = pair.send(pair.relay)
    assert bound == ev.Bound(1, TunnelAddress("abc", "abc.example.test", 443, "t.t"))


def test_bind_failed(pair: Pair) -> None:
    pair.agent.bind(8, 22, h2=True)
    [request] = pair.send(pair.agent)
    assert request.h2 is True and request.unencrypted is False
    pair.relay.bind_failed(8, BindFailure.LIMIT, "too many tunnels")
    assert pair.send(pair.relay) == [ev.BindFailed(8, BindFailure.LIMIT, "too many tunnels")]


def test_a_bind_failure_code_from_a_newer_relay_is_other(pair: Pair) -> None:
    pair.relay._out.append(encode_json(FrameType.BIND_FAILED, {"request": 2, "code": "quota-x", "message": "m" * 999}))
    [failed] = pair.send(pair.relay)
    assert failed == ev.BindFailed(2, BindFailure.OTHER, "m" * MAX_TEXT_LENGTH)


def test_unbind_unbound(pair: Pair) -> None:
    pair.agent.unbind("tun-1")
    assert pair.send(pair.agent) == [ev.UnbindRequested("tun-1")]
    pair.relay.unbound("tun-1", "asked")
    assert pair.send(pair.relay) == [ev.Unbound("tun-1", "asked")]
    pair.relay.unbound("tun-2")
    assert pair.send(pair.relay) == [ev.Unbound("tun-2", "closed")]


@pytest.mark.parametrize(
    ("kind", "message", "side"),
    [
        (FrameType.BIND, {"request": "1", "port": 1, "unencrypted": False, "h2": False}, "relay"),
        (FrameType.BIND, {"request": 1, "port": 1, "unencrypted": 0, "h2": False}, "relay"),
        (FrameType.UNBIND, {}, "relay"),
        (FrameType.BOUND, {"request": 1}, "agent"),
        (FrameType.BIND_FAILED, {"request": 1, "code": 5, "message": "m"}, "agent"),
        (FrameType.UNBOUND, {"id": 5}, "agent"),
    ],
)
def test_bad_tunnel_messages(pair: Pair, kind: FrameType, message: dict[str, object], side: str) -> None:
    expect_protocol_error(getattr(pair, side), encode_json(kind, message), ErrorCode.PROTOCOL_ERROR)


# -------------------------------------------------------------------- streams


def test_open_stream_and_data_both_ways(pair: Pair) -> None:
    first = pair.open_stream("tun-1", "198.51.100.1:1000")
    second = pair.open_stream("tun-2", "198.51.100.2:2000")
    assert (first, second) == (1, 2)
    assert pair.agent.stream_count == pair.relay.stream_count == 2
    for sid in (first, second):
        assert pair.agent.stream_state(sid) is pair.relay.stream_state(sid) is StreamState.OPEN

    assert pair.relay.send_data(first, b"GET / HTTP/1.1\r\n\r\n") is True
    assert pair.send(pair.relay) == [ev.DataReceived(first, b"GET / HTTP/1.1\r\n\r\n")]
    assert pair.agent.send_data(second, memoryview(b"HTTP/1.1 200 OK\r\n")) is True
    assert pair.agent.send_data(first, b"reply") is True
    assert pair.send(pair.agent) == [
        ev.DataReceived(second, b"HTTP/1.1 200 OK\r\n"),
        ev.DataReceived(first, b"reply"),
    ]


def test_large_write_is_split_into_max_payload_frames() -> None:
    p = Pair(max_payload=1000)
    p.handshake()
    sid = p.open_stream()
    data = bytes(range(256)) * 20
    assert p.relay.send_data(sid, data) is True
    frames = decode_frames(p.relay.data_to_send(), max_payload=1000)
    assert [len(f.payload) for f in frames] == [1000] * 5 + [120]
    assert b"".join(f.payload for f in frames) == data


def test_fin_both_ways_ends_the_stream(pair: Pair) -> None:
    sid = pair.open_stream()
    pair.agent.send_fin(sid)
    assert pair.agent.stream_state(sid) is StreamState.LOCAL_CLOSED
    assert pair.send(pair.agent) == [ev.StreamEnded(sid)]
    assert pair.relay.stream_state(sid) is StreamState.REMOTE_CLOSED
    # the other direction still works after a half-close
    pair.relay.send_data(sid, b"still talking")
    assert pair.send(pair.relay) == [ev.DataReceived(sid, b"still talking")]
    pair.relay.send_fin(sid)
    assert pair.relay.stream_state(sid) is StreamState.CLOSED
    assert pair.send(pair.relay) == [ev.StreamEnded(sid)]
    assert pair.agent.stream_state(sid) is StreamState.CLOSED
    assert pair.agent.stream_count == pair.relay.stream_count == 0
    for side in (pair.agent, pair.relay):
        with pytest.raises(LocalProtocolError):
            side.send_data(sid, b"x")
        with pytest.raises(LocalProtocolError):
            side.send_fin(sid)


def test_fin_crossing_on_the_wire(pair: Pair) -> None:
    sid = pair.open_stream()
    pair.agent.send_fin(sid)
    pair.relay.send_fin(sid)
    agent_events, relay_events = pair.exchange()
    assert agent_events == relay_events == [ev.StreamEnded(sid)]
    assert pair.agent.stream_count == pair.relay.stream_count == 0


def test_send_after_own_fin_is_a_local_error(pair: Pair) -> None:
    sid = pair.open_stream()
    pair.relay.send_fin(sid)
    with pytest.raises(LocalProtocolError):
        pair.relay.send_data(sid, b"late")
    with pytest.raises(LocalProtocolError):
        pair.relay.send_fin(sid)
    assert pair.relay.state is SessionState.OPEN


def test_rst(pair: Pair) -> None:
    sid = pair.open_stream()
    pair.relay.send_rst(sid, ErrorCode.TUNNEL_CLOSED, "tunnel gone")
    assert pair.relay.stream_state(sid) is StreamState.CLOSED
    assert pair.send(pair.relay) == [ev.StreamReset(sid, ErrorCode.TUNNEL_CLOSED, "tunnel gone")]
    assert pair.agent.stream_state(sid) is StreamState.CLOSED
    assert pair.agent.stream_count == pair.relay.stream_count == 0
    # resetting again, or an unknown stream, does nothing
    pair.relay.send_rst(sid)
    pair.agent.send_rst(999)
    assert pair.relay.data_to_send() == [] and pair.agent.data_to_send() == []


def test_rst_default_code_and_from_the_agent(pair: Pair) -> None:
    sid = pair.open_stream()
    pair.agent.send_rst(sid)
    assert pair.send(pair.agent) == [ev.StreamReset(sid, ErrorCode.CANCELLED, "")]


def test_rst_crossing_on_the_wire(pair: Pair) -> None:
    sid = pair.open_stream()
    pair.agent.send_rst(sid, ErrorCode.REFUSED)
    pair.relay.send_rst(sid, ErrorCode.CANCELLED)
    assert pair.exchange() == ([], [])
    assert pair.agent.state is pair.relay.state is SessionState.OPEN


def test_data_after_fin_is_a_protocol_error(pair: Pair) -> None:
    sid = pair.open_stream()
    pair.agent.send_fin(sid)
    pair.send(pair.agent)
    expect_protocol_error(pair.relay, data_frame(sid, b"sneaky"), ErrorCode.PROTOCOL_ERROR)


def test_second_fin_is_a_protocol_error(pair: Pair) -> None:
    sid = pair.open_stream()
    pair.relay.send_fin(sid)
    pair.send(pair.relay)
    expect_protocol_error(pair.agent, encode(FrameType.FIN, sid), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "frame",
    [
        encode(FrameType.FIN, 1, b"x"),
        encode(FrameType.WINDOW, 1, b"\x00\x00\x01"),
        encode(FrameType.WINDOW, 1, WINDOW_PAYLOAD.pack(0)),
        encode(FrameType.RST, 1, b"\x00"),
        encode(FrameType.PING, 0, b"short"),
        encode(FrameType.PONG, 0, b"123456789"),
        encode(FrameType.GOAWAY, 0, b"\x00"),
    ],
)
def test_malformed_frames(pair: Pair, frame: bytes) -> None:
    pair.open_stream()
    with pytest.raises(ProtocolError) as info:
        pair.agent.receive_data(frame)
    assert info.value.code in (ErrorCode.PROTOCOL_ERROR, ErrorCode.FLOW_CONTROL)
    assert pair.agent.state is SessionState.CLOSED


# --------------------------------------------------------------- flow control


def relay_to_agent(p: Pair, sid: int) -> tuple[bytes, list[FrameType]]:
    """Deliver what the relay queued; return (the DATA bytes on the wire, frame types in order).

    Also checks the agent reports exactly those bytes as DataReceived.
    """
    chunks = p.relay.data_to_send()
    frames = decode_frames(chunks)
    on_wire = b"".join(f.payload for f in frames if f.type is FrameType.DATA and f.stream_id == sid)
    if chunks:
        p.agent.receive_data(wire_bytes(chunks))
    assert payload_of(p.agent.events_received(), sid) == on_wire
    return on_wire, [f.type for f in frames]


def test_sender_stops_at_the_window_and_resumes_on_credit(small: Pair) -> None:
    sid = small.open_stream()
    data = bytes(i % 251 for i in range(3 * W))
    assert small.relay.send_data(sid, data) is False
    assert small.relay.buffered(sid) == 2 * W
    got, _ = relay_to_agent(small, sid)
    assert len(got) == W
    received = bytearray(got)

    # a blocked stream queues further writes behind the pending ones, in order
    assert small.relay.send_data(sid, b"tail") is False
    assert small.relay.buffered(sid) == 2 * W + 4
    assert small.relay.data_to_send() == []

    writable = 0
    while got:
        small.agent.consumed(sid, len(got))
        relay_events = small.send(small.agent)  # the WINDOW frame
        assert all(isinstance(e, ev.StreamWritable) for e in relay_events)
        writable += len(relay_events)
        got, _ = relay_to_agent(small, sid)
        assert len(got) <= W
        received += got
    assert writable == 1  # once, when the buffer emptied
    assert small.relay.buffered(sid) == 0
    assert bytes(received) == data + b"tail"
    assert small.relay.send_data(sid, b"more") is True


def test_data_record_is_send_data_in_one_piece_only_when_nothing_waits(small: Pair) -> None:
    sid, ended = small.open_stream(), small.open_stream()
    small.relay.send_fin(ended)
    small.send(small.relay)
    assert small.relay.data_record(ended, b"z") is None  # after FIN: send_data raises
    assert small.relay.data_record(99, b"z") is None  # unknown stream

    record = small.relay.data_record(sid, memoryview(b"hello"))
    assert record == data_frame(sid, b"hello")
    small.agent.receive_data(record)
    assert payload_of(small.agent.events_received(), sid) == b"hello"
    # it spends credit like send_data: W - 5 left, so W bytes do not fit
    assert small.relay.data_record(sid, bytes(W)) is None
    assert small.relay.data_record(sid, bytes(W - 5)) == data_frame(sid, bytes(W - 5))
    assert small.relay.data_record(sid, b"x") is None  # no credit left
    assert small.relay.send_data(sid, b"x") is False  # which send_data queues
    small.agent.consumed(sid, W)
    small.send(small.agent)  # the WINDOW frame: the pending byte goes out, queued
    assert small.relay.data_record(sid, b"y") is None  # behind what is queued, not before it
    assert decode_frames(small.relay.data_to_send())[-1].payload == b"x"


def test_a_cut_data_frame_is_handed_over_as_its_bytes_come(pair: Pair) -> None:
    """A reader's buffer never keeps (nor moves) the start of a bulk frame: only a cut header stays."""
    sid, other = pair.open_stream(), pair.open_stream()
    payload = bytes(i % 251 for i in range(200_000))
    wire = data_frame(sid, payload) + data_frame(other, b"next")
    agent = pair.agent
    kept, got, sizes = b"", [], []
    for start, end in ((0, 5), (5, 70_000), (70_000, 70_000), (70_000, 150_000), (150_000, len(wire))):
        view = kept + wire[start:end]  # what a caller's buffer holds: what it kept, then the new read
        kept = view[agent.receive_view(memoryview(view)) :]
        assert len(kept) == (5 if end == 5 else 0)
        events = agent.events_received()
        sizes.append(len(payload_of(events, sid)))
        got += events
    assert sizes == [0, 70_000 - 10, 0, 80_000, 200_000 - 149_990]
    assert payload_of(got, sid) == payload
    assert payload_of(got, other) == b"next"
    assert agent._streams[sid].recv_credit == DEFAULT_WINDOW - len(payload)  # charged once, for the frame


def test_a_stream_reset_in_the_middle_of_a_data_frame_drops_the_rest(pair: Pair) -> None:
    sid, other = pair.open_stream(), pair.open_stream()
    wire = data_frame(sid, bytes(1000)) + data_frame(other, b"after")
    agent = pair.agent
    assert agent.receive_view(memoryview(wire)[:400]) == 400
    assert payload_of(agent.events_received(), sid) == bytes(390)
    agent.send_rst(sid)
    assert agent.receive_view(memoryview(wire)[400:]) == len(wire) - 400
    events = agent.events_received()
    assert payload_of(events, sid) == b""
    assert payload_of(events, other) == b"after"


def test_a_cut_data_frame_over_the_window_is_not_handed_over(small: Pair) -> None:
    sid = small.open_stream()
    wire = data_frame(sid, bytes(W + 1))
    agent = small.agent
    assert agent.receive_view(memoryview(wire)[:100]) == 0  # kept whole for the state tables
    assert agent.events_received() == []
    expect_protocol_error(agent, wire, ErrorCode.FLOW_CONTROL)  # once all of it is there
    assert agent.events_received() == []


def test_data_in_flight_for_a_reset_stream_is_dropped_as_it_comes(pair: Pair) -> None:
    sid, other = pair.open_stream(), pair.open_stream()
    pair.agent.send_rst(sid)
    wire = data_frame(sid, bytes(100_000)) + data_frame(other, b"after")
    agent = pair.agent
    assert agent.receive_view(memoryview(wire)[:30_000]) == 30_000  # nothing kept back
    assert agent.events_received() == []
    assert agent.receive_view(memoryview(wire)[30_000:]) == len(wire) - 30_000
    assert [(e.stream_id, bytes(e.data)) for e in agent.events_received()] == [(other, b"after")]


def test_empty_write_while_blocked(small: Pair) -> None:
    sid = small.open_stream()
    assert small.relay.send_data(sid, b"e" * (2 * W)) is False
    assert small.relay.send_data(sid, b"") is False  # still blocked; queues nothing
    assert small.relay.buffered(sid) == W
    relay_to_agent(small, sid)
    small.agent.consumed(sid, W)  # grants exactly the W bytes still pending
    assert small.send(small.agent) == [ev.StreamWritable(sid)]
    assert small.relay.buffered(sid) == 0
    got, _ = relay_to_agent(small, sid)
    assert len(got) == W


def test_flow_control_from_the_agent_side(small: Pair) -> None:
    sid = small.open_stream()
    data = bytes(range(256)) * (3 * W // 256)
    assert small.agent.send_data(sid, data) is False
    assert small.agent.buffered(sid) == 2 * W
    got = payload_of(small.send(small.agent), sid)
    assert len(got) == W
    received = bytearray(got)
    while small.agent.buffered(sid):
        small.relay.consumed(sid, W)
        agent_events, relay_events = small.exchange()
        received += payload_of(relay_events, sid)
    assert ev.StreamWritable(sid) in agent_events
    assert bytes(received) == data


def test_unconsumed_data_never_exceeds_the_window(small: Pair) -> None:
    sid = small.open_stream()
    assert small.relay.send_data(sid, b"z" * (10 * W)) is False
    agent_events, _ = small.exchange()
    assert len(payload_of(agent_events, sid)) == W  # nothing consumed: the sender stalls at W
    small.agent.consumed(sid, W // 2)
    agent_events, _ = small.exchange()
    assert len(payload_of(agent_events, sid)) == W // 2


def test_window_refills_at_half(small: Pair) -> None:
    sid = small.open_stream()
    small.relay.send_data(sid, b"a" * W)
    small.send(small.relay)
    small.agent.consumed(sid, W // 2 - 1)
    assert small.agent.data_to_send() == []
    small.agent.consumed(sid, 1)
    [frame] = decode_frames(small.agent.data_to_send())
    assert (frame.type, frame.stream_id) == (FrameType.WINDOW, sid)
    assert WINDOW_PAYLOAD.unpack(frame.payload) == (W // 2,)
    # small consumptions accumulate again until the next half window
    small.agent.consumed(sid, 100)
    assert small.agent.data_to_send() == []


def test_no_window_after_the_peer_finished(small: Pair) -> None:
    sid = small.open_stream()
    small.relay.send_data(sid, b"a" * W)
    small.relay.send_fin(sid)
    small.send(small.relay)
    assert small.agent.stream_state(sid) is StreamState.REMOTE_CLOSED
    small.agent.consumed(sid, W)
    assert small.agent.data_to_send() == []  # no more data can come: no credit needed


def test_peer_overrunning_its_window(small: Pair) -> None:
    sid = small.open_stream()
    small.agent.receive_data(data_frame(sid, b"x" * (W - 1)))
    small.agent.receive_data(data_frame(sid, b"x"))  # exactly the window: fine
    assert len(payload_of(small.agent.events_received(), sid)) == W
    expect_protocol_error(small.agent, data_frame(sid, b"x"), ErrorCode.FLOW_CONTROL)


def test_peer_overrunning_its_window_in_one_frame(small: Pair) -> None:
    sid = small.open_stream()
    expect_protocol_error(small.relay, data_frame(sid, b"y" * (W + 1)), ErrorCode.FLOW_CONTROL)


def test_credit_granted_is_honoured(small: Pair) -> None:
    sid = small.open_stream()
    small.agent.receive_data(data_frame(sid, b"x" * W))
    small.agent.consumed(sid, W)
    small.send(small.agent)  # WINDOW W to the relay
    small.agent.receive_data(data_frame(sid, b"x" * W))  # the new credit, used up exactly
    expect_protocol_error(small.agent, data_frame(sid, b"x"), ErrorCode.FLOW_CONTROL)


def test_window_increment_overflow(small: Pair) -> None:
    sid = small.open_stream()
    frame = encode(FrameType.WINDOW, sid, WINDOW_PAYLOAD.pack(MAX_WINDOW))
    expect_protocol_error(small.agent, frame, ErrorCode.FLOW_CONTROL)


def test_send_fin_waits_for_pending_data(small: Pair) -> None:
    sid = small.open_stream()
    data = b"q" * (2 * W + 10)
    small.relay.send_data(sid, data)
    small.relay.send_fin(sid)
    assert small.relay.stream_state(sid) is StreamState.OPEN  # FIN not sent yet
    with pytest.raises(LocalProtocolError):
        small.relay.send_data(sid, b"after fin")
    kinds_seen: list[FrameType] = []
    received = b""
    for _ in range(10):
        chunks = small.relay.data_to_send()
        kinds_seen += [f.type for f in decode_frames(chunks)]
        small.agent.receive_data(wire_bytes(chunks))
        events = small.agent.events_received()
        got = payload_of(events, sid)
        received += got
        if ev.StreamEnded(sid) in events:
            assert events[-1] == ev.StreamEnded(sid)
            break
        small.agent.consumed(sid, len(got))
        small.send(small.agent)
    assert received == data
    assert kinds_seen[-1] is FrameType.FIN and kinds_seen.count(FrameType.FIN) == 1
    assert small.relay.stream_state(sid) is StreamState.LOCAL_CLOSED
    assert small.agent.stream_state(sid) is StreamState.REMOTE_CLOSED


def test_rst_drops_pending_data(small: Pair) -> None:
    sid = small.open_stream()
    small.relay.send_data(sid, b"p" * (2 * W))
    small.relay.send_rst(sid)
    assert small.relay.buffered(sid) == 0
    agent_events, _ = small.exchange()
    assert agent_events[-1] == ev.StreamReset(sid, ErrorCode.CANCELLED, "")


# ------------------------------------------------------------ session control


def test_ping_pong(pair: Pair) -> None:
    pair.agent.ping(42)
    assert pair.send(pair.agent) == []  # the relay answers on its own
    assert pair.send(pair.relay) == [ev.PongReceived(42)]
    pair.relay.ping(2**64 - 1)
    agent_events, relay_events = pair.exchange()
    assert agent_events == [] and relay_events == [ev.PongReceived(2**64 - 1)]


def test_an_early_bind_rides_behind_hello_and_is_answered_after_welcome() -> None:
    """ALPN burrow/1+early: the agent's first BIND goes in the same flight as HELLO."""
    p = Pair()
    p.agent.hello("t")
    with pytest.raises(LocalProtocolError, match="handshake"):
        p.agent.bind(1, 8000)  # not without the relay's word
    p.agent.early_requests = True
    p.agent.bind(1, 8000, h2=True)
    assert p.agent.state is SessionState.HANDSHAKE
    hello, bind = p.send(p.agent)  # one read at the relay: both frames, in order
    assert isinstance(hello, ev.HelloReceived) and isinstance(bind, ev.BindRequested)
    assert (bind.request_id, bind.port, bind.h2) == (1, 8000, True)
    p.relay.welcome("s")
    address = TunnelAddress("abc", "abc.example.test", 443)
    p.relay.bound(1, address)
    welcomed, bound = p.send(p.relay)
    assert isinstance(welcomed, ev.Welcomed) and bound == ev.Bound(1, address)
    assert p.agent.state is SessionState.OPEN


def test_a_bind_before_hello_is_still_a_protocol_error() -> None:
    p = Pair()
    p.agent.early_requests = True
    p.agent.bind(1, 8000)
    expect_protocol_error(p.relay, b"".join(bytes(b) for b in p.agent.data_to_send()), ErrorCode.PROTOCOL_ERROR)


def test_ping_during_the_handshake() -> None:
    p = Pair()
    p.agent.hello("t")
    p.agent.ping(1)
    p.send(p.agent)
    assert p.relay.state is SessionState.HELLO_RECEIVED
    assert p.send(p.relay) == [ev.PongReceived(1)]


def test_unsolicited_pong_is_reported(pair: Pair) -> None:
    pair.agent.receive_data(encode(FrameType.PONG, 0, PING_PAYLOAD.pack(5)))
    assert pair.agent.events_received() == [ev.PongReceived(5)]


@pytest.mark.parametrize("code", [ErrorCode.NO_ERROR, ErrorCode.SHUTDOWN])
def test_graceful_goaway(pair: Pair, code: ErrorCode) -> None:
    sid = pair.open_stream()
    pair.agent.goaway(code, "bye")
    assert pair.agent.state is SessionState.CLOSING
    assert pair.send(pair.agent) == [ev.GoAwayReceived(code, "bye")]
    assert pair.relay.state is SessionState.CLOSING
    assert pair.relay.close_code is None
    # existing streams finish
    pair.relay.send_data(sid, b"last words")
    pair.relay.send_fin(sid)
    assert pair.send(pair.relay) == [ev.DataReceived(sid, b"last words"), ev.StreamEnded(sid)]
    pair.agent.send_data(sid, b"ok")
    assert pair.send(pair.agent) == [ev.DataReceived(sid, b"ok")]
    # no new ones start
    with pytest.raises(LocalProtocolError):
        pair.relay.open_stream("tun", "peer")
    with pytest.raises(LocalProtocolError):
        pair.agent.bind(1, 80)
    pair.agent.unbind("tun")  # tearing down is still allowed
    assert pair.send(pair.agent) == [ev.UnbindRequested("tun")]


def test_open_racing_a_graceful_goaway_is_refused(pair: Pair) -> None:
    pair.agent.goaway(ErrorCode.SHUTDOWN)
    sid = pair.relay.open_stream("tun", "peer")  # the relay has not seen the GOAWAY yet
    agent_events, relay_events = pair.exchange()
    assert agent_events == []
    assert relay_events == [
        ev.GoAwayReceived(ErrorCode.SHUTDOWN, ""),
        ev.StreamReset(sid, ErrorCode.REFUSED, "session closing"),
    ]
    assert pair.agent.stream_count == pair.relay.stream_count == 0


def test_error_goaway(pair: Pair) -> None:
    pair.open_stream()
    pair.relay.goaway(ErrorCode.INTERNAL_ERROR, "boom")
    assert pair.relay.state is SessionState.CLOSED
    assert pair.relay.close_code == ErrorCode.INTERNAL_ERROR
    assert pair.relay.stream_count == 0
    assert pair.send(pair.relay) == [ev.GoAwayReceived(ErrorCode.INTERNAL_ERROR, "boom")]
    assert pair.agent.state is SessionState.CLOSED
    assert pair.agent.close_code == ErrorCode.INTERNAL_ERROR
    assert pair.agent.stream_count == 0
    # a closed session stays quiet
    pair.relay.goaway(ErrorCode.NO_ERROR)
    pair.relay.ping(1)
    assert pair.relay.data_to_send() == []


def test_second_graceful_goaway_closes(pair: Pair) -> None:
    pair.agent.goaway()
    pair.send(pair.agent)
    pair.relay.goaway()
    assert pair.relay.state is SessionState.CLOSED
    assert pair.send(pair.relay) == [ev.GoAwayReceived(ErrorCode.NO_ERROR, "")]
    assert pair.agent.state is SessionState.CLOSED


def test_connection_lost(pair: Pair) -> None:
    pair.open_stream()
    pair.agent.connection_lost()
    assert pair.agent.state is SessionState.CLOSED
    assert pair.agent.close_code == ErrorCode.CANCELLED
    assert pair.agent.stream_count == 0


def test_frames_for_a_reset_stream_are_ignored(pair: Pair) -> None:
    sid = pair.open_stream()
    pair.agent.send_rst(sid)
    pair.agent.data_to_send()  # the RST is still in flight; the relay keeps talking
    for frame in (
        data_frame(sid, b"in flight"),
        encode(FrameType.WINDOW, sid, WINDOW_PAYLOAD.pack(100)),
        encode(FrameType.FIN, sid),
        encode_code(FrameType.RST, sid, ErrorCode.CANCELLED),
    ):
        pair.agent.receive_data(frame)
    assert pair.agent.events_received() == []
    assert pair.agent.state is SessionState.OPEN
    assert pair.agent.data_to_send() == []
    pair.agent.consumed(sid, 10**6)  # consuming for a dead stream is harmless too
    assert pair.agent.data_to_send() == []


def test_frames_for_a_finished_stream_are_ignored(pair: Pair) -> None:
    sid = pair.open_stream()
    pair.agent.send_fin(sid)
    pair.relay.send_fin(sid)
    pair.exchange()
    pair.relay.receive_data(encode(FrameType.WINDOW, sid, WINDOW_PAYLOAD.pack(10)))
    assert pair.relay.state is SessionState.OPEN


@pytest.mark.parametrize(
    "frame",
    [
        data_frame(5, b"x"),
        encode(FrameType.WINDOW, 5, WINDOW_PAYLOAD.pack(1)),
        encode(FrameType.FIN, 5),
        encode_code(FrameType.RST, 5, ErrorCode.CANCELLED),
    ],
)
@pytest.mark.parametrize("side", ["agent", "relay"])
def test_frames_for_a_never_opened_stream(pair: Pair, frame: bytes, side: str) -> None:
    pair.open_stream()  # stream 1 exists; 5 never did
    expect_protocol_error(getattr(pair, side), frame, ErrorCode.PROTOCOL_ERROR)


def test_open_reusing_an_id(pair: Pair) -> None:
    sid = pair.open_stream()
    again = encode_json(FrameType.OPEN, {"tunnel": "t", "peer": "p"}, sid)
    expect_protocol_error(pair.agent, again, ErrorCode.PROTOCOL_ERROR)


def test_open_reusing_a_finished_id(pair: Pair) -> None:
    first = pair.open_stream()
    pair.open_stream()
    pair.relay.send_rst(first)
    pair.exchange()
    again = encode_json(FrameType.OPEN, {"tunnel": "t", "peer": "p"}, first)
    expect_protocol_error(pair.agent, again, ErrorCode.PROTOCOL_ERROR)


def test_open_with_a_bad_payload(pair: Pair) -> None:
    expect_protocol_error(
        pair.agent, encode_json(FrameType.OPEN, {"tunnel": 1, "peer": "p"}, 1), ErrorCode.PROTOCOL_ERROR
    )


def test_open_to_the_relay_is_a_protocol_error(pair: Pair) -> None:
    frame = encode_json(FrameType.OPEN, {"tunnel": "t", "peer": "p"}, 1)
    expect_protocol_error(pair.relay, frame, ErrorCode.PROTOCOL_ERROR)


def test_after_a_protocol_error(pair: Pair) -> None:
    sid = pair.open_stream()
    exc = expect_protocol_error(pair.agent, data_frame(sid + 10, b"?"), ErrorCode.PROTOCOL_ERROR)
    assert str(exc)
    # the API refuses to use the dead session; state-free calls are no-ops
    with pytest.raises(LocalProtocolError):
        pair.agent.send_data(sid, b"x")
    with pytest.raises(LocalProtocolError):
        pair.agent.send_fin(sid)
    pair.agent.send_rst(sid)
    pair.agent.consumed(sid, 10)
    pair.agent.ping(3)
    pair.agent.goaway()
    assert pair.agent.data_to_send() == []
    assert pair.agent.stream_state(sid) is StreamState.CLOSED


def test_the_goaway_of_a_protocol_error_reaches_the_peer(pair: Pair) -> None:
    with pytest.raises(ProtocolError):
        pair.agent.receive_data(data_frame(77, b"?"))
    [goaway] = pair.send(pair.agent)
    assert isinstance(goaway, ev.GoAwayReceived) and goaway.code == ErrorCode.PROTOCOL_ERROR
    assert pair.relay.state is SessionState.CLOSED
    assert pair.relay.close_code == ErrorCode.PROTOCOL_ERROR


def test_frames_before_a_malformed_one_are_processed(pair: Pair) -> None:
    sid = pair.open_stream()
    good = encode(FrameType.PING, 0, PING_PAYLOAD.pack(9)) + data_frame(sid, b"ok")
    expect_pending = good + bytes([200, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ProtocolError):
        pair.agent.receive_data(expect_pending)
    assert pair.agent.events_received() == [ev.DataReceived(sid, b"ok")]
    frames = decode_frames(pair.agent.data_to_send())
    assert [f.type for f in frames] == [FrameType.PONG, FrameType.GOAWAY]
    assert decode_code(frames[-1])[0] == ErrorCode.PROTOCOL_ERROR


def test_frames_after_a_bad_one_are_not_processed(pair: Pair) -> None:
    sid = pair.open_stream()
    data = data_frame(sid + 5, b"bad") + encode(FrameType.PING, 0, PING_PAYLOAD.pack(9)) + data_frame(sid, b"x")
    expect_protocol_error(pair.agent, data, ErrorCode.PROTOCOL_ERROR)
    assert pair.agent.events_received() == []


def test_byte_by_byte_delivery(small: Pair) -> None:
    sid = small.open_stream()
    small.relay.send_data(sid, b"hello world")
    small.relay.ping(77)
    small.relay.send_fin(sid)
    data = wire_bytes(small.relay.data_to_send())
    events: list[ev.Event] = []
    for i in range(len(data)):
        small.agent.receive_data(data[i : i + 1])
        events += small.agent.events_received()
    assert payload_of(events, sid) == b"hello world"
    assert events[-1] == ev.StreamEnded(sid)
    assert small.send(small.agent) == [ev.PongReceived(77)]


def test_each_side_sends_frames_no_larger_than_the_peer_accepts() -> None:
    pair = Pair()
    pair.relay = SessionProtocol(Role.RELAY, max_payload=4096)  # a relay run with --max-frame 4k
    pair.handshake()
    assert pair.agent.send_payload == 4096 and pair.relay.send_payload == 4096
    sid = pair.open_stream()
    payload = bytes(range(256)) * 400  # 100 KiB
    assert pair.agent.send_data(sid, payload)
    frames = decode_frames(pair.agent.data_to_send(), max_payload=4096)
    assert all(len(f.payload) <= 4096 for f in frames) and len(frames) == 25
    assert b"".join(bytes(f.payload) for f in frames) == payload


def test_max_frame_out_of_range_is_a_protocol_error() -> None:
    relay = SessionProtocol(Role.RELAY)
    with pytest.raises(ProtocolError):
        relay.receive_data(hello_frame(max_frame=10))
    assert goaway_code(decode_frames(relay.data_to_send())) == ErrorCode.PROTOCOL_ERROR
