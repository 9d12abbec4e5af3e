"""ReceiveBuffer: reads come out in order, and no byte a view can see is written over."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from burrow.protocol import events as ev
from burrow.protocol.buffer import DEFAULT_READ, MAX_BUFFER, MAX_READ, SHRINK_AFTER, ReceiveBuffer
from burrow.protocol.frames import FrameType, encode
from burrow.protocol.session import Role, SessionProtocol

PATTERN = bytes(range(251)) * (2 * MAX_READ // 251 + 2)

# one step: read some bytes (with a hint), then consume some of the unread ones and
# maybe keep a view of what was consumed, or drop the views kept so far
steps = st.lists(
    st.tuples(
        st.integers(min_value=-1, max_value=3 * MAX_READ),  # the transport's hint
        st.integers(min_value=0, max_value=2 * MAX_READ),  # bytes it reads
        st.floats(min_value=0, max_value=1),  # share of the unread bytes consumed
        st.sampled_from(["keep", "drop", "none"]),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_reads_come_out_in_order_and_kept_views_never_change(script: list[tuple[int, int, float, str]]) -> None:
    buffer = ReceiveBuffer()
    written = bytearray()  # the whole stream, as read
    consumed = 0
    kept: list[tuple[memoryview, bytes]] = []
    counter = 0
    for hint, size, share, keep in script:
        room = buffer.room(hint)
        assert len(room) >= 1
        want = min(hint, MAX_READ) if hint > 0 else DEFAULT_READ
        assert len(room) >= want
        size = min(size, len(room))
        chunk = PATTERN[counter % 251 : counter % 251 + size]
        counter += size
        room[:size] = chunk
        del room
        buffer.filled(size)
        written += chunk
        unread = buffer.unread()
        assert unread == written[consumed:]
        take = int(len(unread) * share)
        if keep == "keep" and take:
            kept.append((unread[:take], bytes(unread[:take])))
        elif keep == "drop":
            kept.clear()
        del unread
        buffer.consume(take)
        consumed += take
        assert buffer.pending == len(written) - consumed
        for view, expected in kept:
            assert view == expected


def test_a_viewed_buffer_is_left_alone_and_reused_once_unviewed() -> None:
    buffer = ReceiveBuffer(1024)
    kept = []
    for round_ in range(6):
        room = buffer.room(1000)
        assert len(room) >= 1000
        room[:1000] = bytes([round_]) * 1000
        del room
        buffer.filled(1000)
        kept.append(buffer.unread()[:10])
        buffer.consume(1000)
        if round_ % 2:
            kept.clear()  # the transports wrote them out
        for view in kept:
            assert bytes(view) == bytes([view[0]]) * 10
    assert buffer.capacity == 1024  # two buffers took turns; none grew


def test_a_frame_bigger_than_the_reads_grows_the_buffer_geometrically() -> None:
    buffer = ReceiveBuffer(1024)
    capacities = []
    for _ in range(40):
        room = buffer.room(1000)
        buffer.filled(min(1000, len(room)))
        del room
        capacities.append(buffer.capacity)
    assert buffer.pending == 40_000
    assert len(set(capacities)) <= 7  # 1 KiB doubling to 64 KiB, not a new size per read


def test_a_buffer_grown_by_bulk_shrinks_once_reads_stay_small() -> None:
    buffer = ReceiveBuffer()

    def read(hint: int, size: int) -> None:
        room = buffer.room(hint)
        buffer.filled(min(size, len(room)))
        del room
        buffer.consume(buffer.pending)

    for _ in range(40):  # bulk: reads of up to 256 KiB, with part of a frame left each time
        room = buffer.room(MAX_READ)
        buffer.filled(min(len(room), MAX_READ))
        del room
        buffer.consume(max(0, buffer.pending - 200_000))
    grown = buffer.capacity
    assert MAX_READ < grown <= MAX_BUFFER
    buffer.consume(buffer.pending)
    for _ in range(SHRINK_AFTER - 1):
        read(300, 100)
    assert buffer.capacity == grown  # a lull between bursts keeps it
    read(300, 100)
    assert buffer.capacity == DEFAULT_READ
    read(MAX_READ, MAX_READ)  # and bulk grows it again
    assert buffer.capacity >= MAX_READ


def _session_pair() -> tuple[SessionProtocol, SessionProtocol]:
    relay = SessionProtocol(Role.RELAY)
    agent = SessionProtocol(Role.AGENT)
    agent.hello("token")
    for chunk in agent.data_to_send():
        relay.receive_data(bytes(chunk))
    [hello] = relay.events_received()
    assert isinstance(hello, ev.HelloReceived)
    relay.welcome("s1")
    for chunk in relay.data_to_send():
        agent.receive_data(bytes(chunk))
    agent.events_received()
    return relay, agent


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=12), st.data())
def test_receive_view_through_a_buffer_matches_the_bytes_sent(payloads: list[bytes], data: st.DataObject) -> None:
    relay, agent = _session_pair()
    stream_id = relay.open_stream("t1", "peer")
    wire = b"".join(bytes(c) for c in relay.data_to_send())
    for payload in payloads:
        assert relay.send_data(stream_id, payload)
    wire += b"".join(bytes(c) for c in relay.data_to_send())
    buffer = ReceiveBuffer(512)
    received = bytearray()
    offset = 0
    while offset < len(wire):
        room = buffer.room(data.draw(st.integers(min_value=-1, max_value=4000)))
        size = min(len(room), data.draw(st.integers(min_value=1, max_value=4000)), len(wire) - offset)
        room[:size] = wire[offset : offset + size]
        del room
        offset += size
        buffer.filled(size)
        buffer.consume(agent.receive_view(buffer.unread()))
        for event in agent.events_received():
            if isinstance(event, ev.DataReceived):
                received += event.data
    assert received == b"".join(payloads)
    assert buffer.pending == 0


def test_receive_view_leaves_a_partial_frame_unconsumed() -> None:
    _, agent = _session_pair()
    frame = encode(FrameType.PING, 0, b"12345678")
    assert agent.receive_view(memoryview(frame[:7])) == 0
    assert agent.receive_view(memoryview(frame + frame[:3])) == len(frame)
    assert agent.events_received() == []  # a PING is answered, not reported
    assert len(agent.data_to_send()) == 1
