"""Property tests: hostile bytes never crash the protocol; honest peers never break it."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, multiple, rule

from burrow.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from burrow.protocol import events as ev
from burrow.protocol.frames import (
    HEADER,
    MAX_CONTROL_PAYLOAD,
    PING_PAYLOAD,
    RST_PAYLOAD,
    WINDOW_PAYLOAD,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    encode,
)
from burrow.protocol.session import DEFAULT_WINDOW, MIN_WINDOW, Role, SessionProtocol, SessionState, StreamState

from .protocol_pair import Pair, decode_frames, wire_bytes

# No example database: nothing is written outside the test tree.
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------- strategies

# latin-1 decoding keeps text generation away from Hypothesis' unicode tables (and their disk cache)
texts = st.binary(max_size=12).map(lambda b: b.decode("latin-1"))
json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | texts
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
windows = st.sampled_from([0, 1, MIN_WINDOW - 1, MIN_WINDOW, DEFAULT_WINDOW, 2**31 - 1, 2**31, 2**32])

# plausible values for every field a control message has, mixed with junk
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "versions": st.lists(st.sampled_from([0, 1, 2, 1.0, True, "1"]), max_size=3),
    "token": texts,
    "window": windows,
    "agent": texts,
    "version": st.sampled_from([0, 1, 2, True, 1.0]),
    "session": texts,
    "request": st.integers(-1, 5),
    "port": st.integers(-1, 70000),
    "unencrypted": st.booleans(),
    "h2": st.booleans(),
    "id": texts,
    "code": texts,
    "message": texts,
    "reason": texts,
    "tunnel": texts,
    "peer": texts,
}
messages = st.fixed_dictionaries({}, optional={k: v | json_values for k, v in FIELDS.items()})


def _json_payload(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


nested = st.integers(1, MAX_CONTROL_PAYLOAD - 20).map(lambda n: b'{"agent":' + b"[" * n + b"]" * (n % 7) + b"}")
json_payloads = messages.map(_json_payload) | json_values.map(_json_payload) | st.binary(max_size=40) | nested
u32 = st.sampled_from([0, 1, 2, 3, 4, 5, 100, 2**31 - 1, 2**32 - 1])
binary_payloads = {
    FrameType.PING: st.builds(PING_PAYLOAD.pack, st.integers(0, 2**64 - 1)) | st.binary(max_size=10),
    FrameType.PONG: st.builds(PING_PAYLOAD.pack, st.integers(0, 2**64 - 1)) | st.binary(max_size=10),
    FrameType.GOAWAY: st.builds(lambda c, r: RST_PAYLOAD.pack(c) + r, st.integers(0, 65535), st.binary(max_size=8))
    | st.binary(max_size=3),
    FrameType.RST: st.builds(lambda c, r: RST_PAYLOAD.pack(c) + r, st.integers(0, 65535), st.binary(max_size=8))
    | st.binary(max_size=3),
    FrameType.WINDOW: st.builds(WINDOW_PAYLOAD.pack, u32) | st.binary(max_size=6),
    FrameType.FIN: st.just(b"") | st.binary(max_size=2),
    FrameType.DATA: st.binary(max_size=64) | st.integers(0, 70000).map(lambda n: b"d" * n),
}
stream_ids = st.sampled_from([0, 1, 2, 3, 4, 7, 2**32 - 1])


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame, mostly well formed (so it gets past the decoder into the session)."""
    kind = draw(st.sampled_from(list(FrameType)))
    if kind in binary_payloads:
        payload = draw(binary_payloads[kind])
    else:
        payload = draw(json_payloads)
    control = kind in (
        set(FrameType) - {FrameType.OPEN, FrameType.DATA, FrameType.WINDOW, FrameType.FIN, FrameType.RST}
    )
    stream_id = 0 if control else draw(st.sampled_from([1, 2, 3, 4, 7]))
    if draw(st.integers(0, 19)) == 0:  # now and then, break the header
        bad_type = draw(st.sampled_from([int(kind), 0, 11, 21, 255]))
        return HEADER.pack(bad_type, draw(st.integers(0, 255)), draw(stream_ids), len(payload)) + payload
    return encode(kind, stream_id, payload)


garbage = st.binary(max_size=200) | st.lists(frames() | st.binary(max_size=12), max_size=8).map(b"".join)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)] or [b""]


cut_lists = st.lists(st.integers(0, 2**16), max_size=6)

EVENT_TYPES = tuple(t for t in vars(ev).values() if isinstance(t, type) and t.__module__ == ev.__name__)


# ------------------------------------------------------------ hostile bytes


@FUZZ
@given(data=garbage, cuts=cut_lists)
def test_decoder_raises_only_protocol_error(data: bytes, cuts: list[int]) -> None:
    whole = FrameDecoder()
    try:
        expected = whole.feed(data)
        expected_error = None
    except ProtocolError as exc:
        expected = whole.pending()
        expected_error = exc.code

    chunked = FrameDecoder()
    got: list[Frame] = []
    error = None
    for chunk in split(data, cuts):
        try:
            got += chunked.feed(chunk)
        except ProtocolError as exc:
            got += chunked.pending()
            error = exc.code
            break
    # how the bytes are cut changes nothing
    assert got == expected
    assert error == expected_error
    if error is None:
        assert chunked.buffered == whole.buffered == len(data) - sum(10 + len(f.payload) for f in got)


def _fresh(role: Role) -> SessionProtocol:
    proto = SessionProtocol(role, window=MIN_WINDOW)
    if role is Role.AGENT:
        proto.hello("token")
        proto.data_to_send()
    return proto


def _running(role: Role) -> SessionProtocol:
    pair = Pair(agent_window=MIN_WINDOW, relay_window=MIN_WINDOW)
    pair.handshake()
    first = pair.open_stream()
    pair.open_stream()
    pair.relay.send_rst(pair.open_stream())  # stream 3: known, and reset
    pair.relay.send_data(first, b"r" * (MIN_WINDOW + 5))
    pair.agent.send_data(first, b"a" * 100)
    pair.exchange()
    return pair.agent if role is Role.AGENT else pair.relay


def _hello_received() -> SessionProtocol:
    relay = SessionProtocol(Role.RELAY, window=MIN_WINDOW)
    relay.receive_data(encode(FrameType.HELLO, 0, b'{"versions":[1],"token":"t","window":16384}'))
    relay.events_received()
    return relay


SETUPS: dict[str, Callable[[], SessionProtocol]] = {
    "agent-handshake": lambda: _fresh(Role.AGENT),
    "relay-handshake": lambda: _fresh(Role.RELAY),
    "relay-hello-received": _hello_received,
    "agent-open": lambda: _running(Role.AGENT),
    "relay-open": lambda: _running(Role.RELAY),
}


def _feed_hostile(proto: SessionProtocol, data: bytes, cuts: list[int]) -> None:
    failed = False
    for chunk in split(data, cuts):
        try:
            proto.receive_data(chunk)
        except ProtocolError as exc:
            assert not failed, "a closed session raised again"
            assert type(exc) is RemoteProtocolError  # LocalProtocolError would blame us for the peer's bytes
            assert isinstance(exc.code, int) and 0 <= exc.code <= 65535
            assert proto.state is SessionState.CLOSED
            assert proto.close_code is not None
            failed = True
        for event in proto.events_received():
            assert isinstance(event, EVENT_TYPES)
        out = proto.data_to_send()
        decode_frames(out)  # whatever the session writes is whole, valid frames
        if proto.state is SessionState.CLOSED:
            assert proto.stream_count == 0
    # the API stays usable (or refuses with LocalProtocolError) afterwards
    proto.ping(1)
    proto.goaway()
    decode_frames(proto.data_to_send())


@pytest.mark.parametrize("setup", list(SETUPS))
@FUZZ
@given(data=garbage, cuts=cut_lists)
def test_session_raises_only_protocol_error(setup: str, data: bytes, cuts: list[int]) -> None:
    _feed_hostile(SETUPS[setup](), data, cuts)


@settings(FUZZ, max_examples=100)
@given(data=st.lists(frames(), min_size=1, max_size=20).map(b"".join), cuts=cut_lists)
def test_frame_storm_after_handshake(data: bytes, cuts: list[int]) -> None:
    for role in Role:
        _feed_hostile(_running(role), data, cuts)


# ------------------------------------------------------------ honest peers

SIDES = ("agent", "relay")
W_AGENT = MIN_WINDOW
W_RELAY = 2 * MIN_WINDOW
MAX_PAYLOAD = 6000  # smaller than the windows: credit and frame splitting interact

sides = st.sampled_from(SIDES)
bulk_sizes = st.sampled_from([W_AGENT + 1, 2 * W_RELAY + 3, 3 * W_RELAY]) | st.integers(W_AGENT, 3 * W_RELAY)
dice = st.integers(0, 2)
parts = st.sampled_from(["all", "half", "one", "none"]) | st.integers(0, 2 * W_RELAY)
sizes = (
    st.integers(0, 64)
    | st.sampled_from([W_AGENT // 2, W_AGENT, W_AGENT + 1, MAX_PAYLOAD + 1, W_RELAY, 2 * W_RELAY + 3])
    | st.integers(0, 3 * W_RELAY)
)


def note(what: str) -> None:
    """Hypothesis statistics (pytest --hypothesis-show-statistics) show how often each path ran."""
    hypothesis_event(what)


class HonestPeers(RuleBasedStateMachine):
    """An agent and a relay used correctly, with the wire cut at arbitrary points.

    Model: what each side handed to ``send_data`` per stream, what the other
    side got, what it consumed; which FIN/RST/PING went where.
    """

    streams = Bundle("streams")

    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair(agent_window=W_AGENT, relay_window=W_RELAY, max_payload=MAX_PAYLOAD)
        self.proto = {"agent": self.pair.agent, "relay": self.pair.relay}
        self.wire = {side: bytearray() for side in SIDES}  # written by side, not delivered yet
        self.opened: dict[int, tuple[str, str]] = {}
        self.sent: dict[tuple[str, int], bytearray] = {}
        self.received: dict[tuple[str, int], bytearray] = {}
        self.unconsumed: dict[tuple[str, int], int] = {}
        self.fin_asked: set[tuple[str, int]] = set()
        self.fin_got: set[tuple[str, int]] = set()
        self.blocked: set[tuple[str, int]] = set()  # send_data said False, StreamWritable not seen yet
        self.reset: set[int] = set()
        self.pings: dict[str, list[int]] = {side: [] for side in SIDES}
        self.goaway_by: str | None = None

    @staticmethod
    def other(side: str) -> str:
        return "relay" if side == "agent" else "agent"

    # ------------------------------------------------------------ plumbing

    def queue(self, side: str) -> None:
        self.wire[side] += wire_bytes(self.proto[side].data_to_send())

    def deliver_bytes(self, side: str, count: int | None) -> int:
        """Deliver up to ``count`` (all when None) bytes that ``side`` wrote; return how many."""
        self.queue(side)
        buffer = self.wire[side]
        count = len(buffer) if count is None else min(count, len(buffer))
        if count:
            chunk = bytes(buffer[:count])
            del buffer[:count]
            peer = self.other(side)
            self.proto[peer].receive_data(chunk)  # any ProtocolError fails the test
            self.handle(peer, self.proto[peer].events_received())
        return count

    def handle(self, side: str, events: list[ev.Event]) -> None:
        proto, peer = self.proto[side], self.other(side)
        for event in events:
            if isinstance(event, ev.StreamOpened):
                assert side == "agent"
                assert self.opened[event.stream_id] == (event.tunnel_id, event.peer)
            elif isinstance(event, ev.DataReceived):
                key = (side, event.stream_id)
                assert key not in self.fin_got, "data after FIN"
                self.received.setdefault(key, bytearray()).extend(event.data)
                self.unconsumed[key] = self.unconsumed.get(key, 0) + len(event.data)
            elif isinstance(event, ev.StreamEnded):
                key = (side, event.stream_id)
                assert (peer, event.stream_id) in self.fin_asked
                assert key not in self.fin_got
                self.fin_got.add(key)
                note("a FIN arrived")
                # FIN comes after every byte the peer sent
                assert self.received.get(key, b"") == self.sent.get((peer, event.stream_id), b"")
            elif isinstance(event, ev.StreamReset):
                self.reset.add(event.stream_id)
            elif isinstance(event, ev.StreamWritable):
                note("a blocked stream became writable")
                assert proto.buffered(event.stream_id) == 0
                self.blocked.discard((side, event.stream_id))
            elif isinstance(event, ev.PongReceived):
                assert self.pings[side], f"unexpected PONG {event.opaque}"
                assert event.opaque == self.pings[side].pop(0)
            elif isinstance(event, ev.GoAwayReceived):
                assert self.goaway_by == peer
                assert event.code in (ErrorCode.NO_ERROR, ErrorCode.SHUTDOWN)
            else:
                raise AssertionError(f"{side} got an unexpected {event!r}")

    def can_send(self, side: str, sid: int) -> bool:
        proto = self.proto[side]
        return (
            proto.state is not SessionState.CLOSED
            and proto.stream_state(sid) in (StreamState.OPEN, StreamState.REMOTE_CLOSED)
            and (side, sid) not in self.fin_asked
        )

    # --------------------------------------------------------------- rules

    @initialize(target=streams, delivered=st.booleans())
    def handshake(self, delivered: bool) -> Any:
        """Start with a session and two streams (delivered to the agent, or still on the wire)."""
        self.pair.handshake()
        first, second = self.open(), self.open()
        if delivered:
            self.deliver_bytes("relay", None)
        return multiple(first, second)

    def open(self, tunnel: str = "t1", peer: str = "p1") -> int:
        relay = self.proto["relay"]
        sid = relay.open_stream(tunnel, peer)
        assert sid not in self.opened and sid > max(self.opened, default=0)
        self.opened[sid] = (tunnel, peer)
        return sid

    # (no preconditions: they make Hypothesis reject rule draws; a rule that
    # cannot act returns without doing anything instead)

    @rule(target=streams, tunnel=st.sampled_from(["t1", "t2"]), peer=st.sampled_from(["p1", "p2"]))
    def open_stream(self, tunnel: str, peer: str) -> Any:
        if len(self.opened) >= 8:
            return multiple()
        if self.proto["relay"].state is not SessionState.OPEN:
            with pytest.raises(LocalProtocolError):
                self.proto["relay"].open_stream(tunnel, peer)
            return multiple()
        return self.open(tunnel, peer)

    def send(self, side: str, sid: int, size: int, seed: int) -> None:
        proto = self.proto[side]
        data = random.Random(seed).randbytes(size)
        if not self.can_send(side, sid):
            with pytest.raises(LocalProtocolError):
                proto.send_data(sid, data)
            return
        before = proto.buffered(sid)
        all_sent = proto.send_data(sid, data)
        self.sent.setdefault((side, sid), bytearray()).extend(data)
        assert all_sent == (proto.buffered(sid) == 0)
        if not all_sent:
            note("send_data had to buffer")
            self.blocked.add((side, sid))
        if before:
            assert not all_sent and proto.buffered(sid) == before + size  # queued behind the rest

    @rule(side=sides, sid=streams, size=sizes, seed=st.integers(0, 2**32))
    def send_data(self, side: str, sid: int, size: int, seed: int) -> None:
        self.send(side, sid, size, seed)

    @rule(side=sides, sid=streams, size=bulk_sizes, seed=st.integers(0, 2**32))
    def send_bulk(self, side: str, sid: int, size: int, seed: int) -> None:
        self.send(side, sid, size, seed)

    @rule(side=sides, sid=streams, size=bulk_sizes, seed=st.integers(0, 2**32))
    def send_last(self, side: str, sid: int, size: int, seed: int) -> None:
        """What a proxied HTTP/1.0 reply does: a big write, then FIN right away."""
        self.send(side, sid, size, seed)
        self.finish(side, sid)

    @rule(side=sides, sid=streams, go=dice)
    def send_fin(self, side: str, sid: int, go: int) -> None:
        if not go:  # FIN only one time in three, or few streams would stay open for data
            self.finish(side, sid)

    def finish(self, side: str, sid: int) -> None:
        proto = self.proto[side]
        if not self.can_send(side, sid):
            with pytest.raises(LocalProtocolError):
                proto.send_fin(sid)
            return
        if proto.buffered(sid):
            note("FIN asked for behind buffered data")
        proto.send_fin(sid)
        self.fin_asked.add((side, sid))

    @rule(side=sides, sid=streams, code=st.sampled_from([ErrorCode.CANCELLED, ErrorCode.REFUSED, 4242]), go=dice)
    def send_rst(self, side: str, sid: int, code: int, go: int) -> None:
        if go:  # resets only one time in three: they end streams for good
            return
        proto = self.proto[side]
        live = proto.stream_state(sid) is not StreamState.CLOSED
        proto.send_rst(sid, code, "test")
        assert proto.stream_state(sid) is StreamState.CLOSED and proto.buffered(sid) == 0
        if live:
            self.reset.add(sid)

    def consume_part(self, side: str, sid: int, part: str | int) -> None:
        """The application consumed ``part`` of what it received and has not consumed yet."""
        key = (side, sid)
        available = self.unconsumed.get(key, 0)
        if isinstance(part, int):
            count = min(part, available)
        else:
            count = {"all": available, "half": available // 2, "one": min(1, available), "none": 0}[part]
        self.proto[side].consumed(sid, count)
        self.unconsumed[key] = available - count

    @rule(side=sides, sid=streams, part=parts)
    def consume(self, side: str, sid: int, part: str | int) -> None:
        self.consume_part(side, sid, part)

    @rule(part=parts)
    def round_trip(self, part: str | int) -> None:
        """Both wires delivered, every stream consumed by ``part``, the answers delivered."""
        for side in SIDES:
            self.deliver_bytes(side, None)
        for side, sid in list(self.unconsumed):
            self.consume_part(side, sid, part)
        for side in SIDES:
            self.deliver_bytes(side, None)

    @rule(side=sides, opaque=st.integers(0, 2**64 - 1))
    def ping(self, side: str, opaque: int) -> None:
        self.proto[side].ping(opaque)
        self.pings[side].append(opaque)  # the PONG comes back to the side that pinged

    @rule(side=sides, code=st.sampled_from([ErrorCode.NO_ERROR, ErrorCode.SHUTDOWN]), go=dice)
    def goaway(self, side: str, code: ErrorCode, go: int) -> None:
        if go or self.goaway_by is not None:  # a graceful GOAWAY, once, late or never
            return
        self.proto[side].goaway(code, "bye")
        assert self.proto[side].state is SessionState.CLOSING
        self.goaway_by = side

    @rule(side=sides, count=st.integers(0, 40) | st.integers(0, 200_000))
    def deliver_some(self, side: str, count: int) -> None:
        self.deliver_bytes(side, count)

    @rule(side=sides)
    def deliver_all(self, side: str) -> None:
        self.deliver_bytes(side, None)

    @rule()
    def settle(self) -> None:
        """Deliver and consume everything until the wire is quiet; then every stream is complete."""
        for _ in range(1000):
            moved = sum(self.deliver_bytes(side, None) for side in SIDES)
            consumed = False
            for (side, sid), count in list(self.unconsumed.items()):
                if count:
                    self.proto[side].consumed(sid, count)
                    self.unconsumed[(side, sid)] = 0
                    consumed = True
            if not moved and not consumed:
                break
        else:
            raise AssertionError("the wire never went quiet")
        assert self.pings == {side: [] for side in SIDES}
        for (side, sid), sent in self.sent.items():
            if sid in self.reset:
                continue
            assert self.proto[side].buffered(sid) == 0, "data stuck although the receiver consumed everything"
            assert (side, sid) not in self.blocked, "all data went out, but no StreamWritable said so"
            assert self.received.get((self.other(side), sid), b"") == sent
            if (side, sid) in self.fin_asked:
                assert (self.other(side), sid) in self.fin_got
            if len(sent) > W_AGENT:
                note("settled a stream that needed credit")

    # ---------------------------------------------------------- invariants

    @invariant()
    def no_session_failed(self) -> None:
        for side in SIDES:
            proto = self.proto[side]
            assert proto.state is not SessionState.CLOSED
            assert proto.close_code is None

    @invariant()
    def received_is_a_prefix_of_sent(self) -> None:
        for (side, sid), got in self.received.items():
            sent = self.sent.get((self.other(side), sid), b"")
            assert len(got) <= len(sent) and sent[: len(got)] == got

    @invariant()
    def unconsumed_fits_in_the_window(self) -> None:
        for (side, _), count in self.unconsumed.items():
            assert count <= self.proto[side].window


HonestPeers.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
TestHonestPeers = HonestPeers.TestCase


# ------------------------------------------------- the DATA fast path


def _general_path(proto: SessionProtocol, decoder: FrameDecoder, chunk: bytes) -> None:
    """What receive_view does without its DATA fast path: decode, then the state tables."""
    if proto.state is SessionState.CLOSED:
        return
    try:
        frames = decoder.feed(chunk)
    except ProtocolError as exc:
        frames, error = decoder.pending(), exc
    else:
        error = None
    try:
        for frame in frames:
            proto._dispatch(frame)
            if proto.state is SessionState.CLOSED:
                return
        if error is not None:
            raise error
    except ProtocolError as exc:
        proto._fail(exc)
        raise


class _Trace:
    """What a session said, in order, with the chunking folded away.

    The fast path hands a DATA payload over as its bytes come (a frame cut by
    a chunk's end arrives in pieces); the state tables, whole. So payloads of
    one stream that follow each other are joined before comparing, and the
    wire bytes are compared whole.
    """

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.wire = b""

    def feed(self, proto: SessionProtocol, chunk: bytes, feed: Callable[[bytes], None]) -> None:
        error = None
        try:
            feed(chunk)
        except ProtocolError as exc:
            error = ("error", exc.code)
        for event in proto.events_received():  # (made before the error, if any)
            item = (type(event).__name__, *(bytes(v) if isinstance(v, memoryview) else v for v in vars_of(event)))
            last = self.items[-1] if self.items else None
            if item[0] == "DataReceived" and last is not None and last[:2] == item[:2]:
                self.items[-1] = (*last[:2], last[2] + item[2])
            else:
                self.items.append(item)
        if error is not None:
            self.items.append(error)
        self.wire += wire_bytes(proto.data_to_send())

    def end(self, proto: SessionProtocol) -> list[Any]:
        streams = sorted((i, s.state, s.recv_credit, s.send_credit) for i, s in proto._streams.items())
        return [self.items, self.wire, proto.state, streams]


def _level_or_ahead(slow: list[Any], fast: list[Any], stream_id: int) -> bool:
    """``fast`` is ``slow`` plus the start of a cut DATA frame's payload on ``stream_id`` (maybe none yet)."""
    if fast == slow:
        return True  # (cut right after its header, or a dropped stream's: nothing handed over)
    if not fast:
        return False
    *last_fast, ahead = fast
    if ahead[:2] != ("DataReceived", stream_id):
        return False
    if last_fast == slow:
        return True  # the cut frame's start is the fast path's newest item
    # or joined to the slow path's last DataReceived of the same stream
    return (
        last_fast == slow[:-1]
        and slow[-1][:2] == ahead[:2]
        and len(ahead[2]) > len(slow[-1][2])
        and ahead[2].startswith(slow[-1][2])
    )


def vars_of(event: Any) -> tuple[Any, ...]:
    return tuple(getattr(event, name) for name in event.__slots__)


# mostly DATA the fast path takes (stream 2 has credit; stream 3 was reset, so its DATA is
# dropped), mixed with DATA it must leave to the state tables (stream 1 has no credit left,
# stream 4 was never opened) and anything else
good_data = st.binary(max_size=300).map(lambda payload: encode(FrameType.DATA, 2, payload))
reset_data = st.binary(max_size=300).map(lambda payload: encode(FrameType.DATA, 3, payload))
odd_data = st.tuples(st.sampled_from([0, 1, 4, 2**32 - 1]), st.binary(max_size=20)).map(
    lambda sp: encode(FrameType.DATA, sp[0], sp[1])
)
flagged_data = st.integers(1, 255).map(lambda flags: HEADER.pack(FrameType.DATA, flags, 2, 3) + b"abc")
data_storms = st.lists(
    st.one_of(good_data, good_data, good_data, reset_data, odd_data, flagged_data, frames(), st.binary(max_size=12)),
    min_size=1,
    max_size=20,
).map(b"".join)


@pytest.mark.parametrize("setup", ["agent-open", "relay-open", "agent-handshake"])
@settings(FUZZ, max_examples=150)
@given(data=data_storms, cuts=cut_lists)
def test_the_data_fast_path_does_what_the_state_tables_do(setup: str, data: bytes, cuts: list[int]) -> None:
    chunks = split(data, cuts)
    fast = SETUPS[setup]()
    slow = SETUPS[setup]()
    decoder = FrameDecoder(slow.max_payload)
    fast_trace, slow_trace = _Trace(), _Trace()
    for chunk in chunks:
        fast_trace.feed(fast, chunk, fast.receive_data)
        slow_trace.feed(slow, chunk, lambda c: _general_path(slow, decoder, c))
        if fast._data_left:
            # a DATA frame is cut: the fast path is ahead by its start, on its stream
            assert _level_or_ahead(slow_trace.items, fast_trace.items, fast._data_stream)
        else:  # level: the same events, bytes out, states and credit
            assert fast_trace.end(fast) == slow_trace.end(slow)
    if fast._data_left:
        # the input ends in a cut DATA frame: its start went out already, the state tables wait
        # for all of it. The rest of its payload (any bytes) ends the frame for both.
        rest = bytes(fast._data_left)
        fast_trace.feed(fast, rest, fast.receive_data)
        slow_trace.feed(slow, rest, lambda c: _general_path(slow, decoder, c))
        assert fast_trace.end(fast) == slow_trace.end(slow)
