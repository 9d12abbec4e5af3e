"""The wire format: encoding, incremental decoding and every way a frame can be malformed."""

from __future__ import annotations

import json

import pytest

from burrow.errors import ProtocolError, RemoteProtocolError
from burrow.protocol.frames import (
    CONTROL,
    CONTROL_JSON,
    GOAWAY_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_FRAME_PAYLOAD,
    PING_PAYLOAD,
    RST_PAYLOAD,
    WINDOW_PAYLOAD,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    code_name,
    decode_code,
    decode_json,
    encode,
    encode_code,
    encode_json,
)

# One sample frame of every type: (bytes on the wire, the frame they decode to).
SAMPLES: dict[FrameType, tuple[bytes, Frame]] = {}


def _sample(kind: FrameType, stream_id: int, payload: bytes, wire: bytes | None = None) -> None:
    SAMPLES[kind] = (encode(kind, stream_id, payload) if wire is None else wire, Frame(kind, stream_id, payload))


def _json_sample(kind: FrameType, message: dict[str, object], stream_id: int = 0) -> None:
    payload = json.dumps(message, separators=(",", ":")).encode()
    _sample(kind, stream_id, payload, encode_json(kind, message, stream_id))


_json_sample(FrameType.HELLO, {"versions": [1], "token": "t0ken", "window": 65536, "agent": "burrow/0.1"})
_json_sample(FrameType.WELCOME, {"version": 1, "session": "s-1", "window": 65536, "domain": "example.test"})
_json_sample(FrameType.BIND, {"request": 1, "port": 8000, "unencrypted": False, "h2": True})
_json_sample(FrameType.BOUND, {"id": "t-1", "url": "https://a.example.test", "request": 1})
_json_sample(FrameType.BIND_FAILED, {"request": 2, "code": "limit", "message": "too many tunnels"})
_json_sample(FrameType.UNBIND, {"id": "t-1"})
_json_sample(FrameType.UNBOUND, {"id": "t-1", "reason": "asked"})
_sample(FrameType.PING, 0, PING_PAYLOAD.pack(2**64 - 1))
_sample(FrameType.PONG, 0, PING_PAYLOAD.pack(12345))
_sample(
    FrameType.GOAWAY,
    0,
    GOAWAY_PAYLOAD.pack(ErrorCode.SHUTDOWN) + "bye ✓".encode(),
    encode_code(FrameType.GOAWAY, 0, ErrorCode.SHUTDOWN, "bye ✓"),
)
_json_sample(FrameType.OPEN, {"tunnel": "t-1", "peer": "198.51.100.2:50000"}, stream_id=7)
_sample(FrameType.DATA, 2**32 - 1, bytes(range(256)) * 3)
_sample(FrameType.WINDOW, 3, WINDOW_PAYLOAD.pack(2**31 - 1))
_sample(FrameType.FIN, 4, b"")
_sample(
    FrameType.RST,
    5,
    RST_PAYLOAD.pack(ErrorCode.REFUSED) + b"connection refused",
    encode_code(FrameType.RST, 5, ErrorCode.REFUSED, "connection refused"),
)


def test_every_frame_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(FrameType)


def test_header_layout() -> None:
    assert HEADER_SIZE == 10
    wire = encode(FrameType.DATA, 0x01020304, b"xyz")
    assert wire == bytes([17, 0, 1, 2, 3, 4, 0, 0, 0, 3]) + b"xyz"


@pytest.mark.parametrize("kind", list(FrameType), ids=lambda k: k.name)
def test_round_trip(kind: FrameType) -> None:
    wire, frame = SAMPLES[kind]
    assert len(wire) == HEADER_SIZE + len(frame.payload)
    decoder = FrameDecoder()
    assert decoder.feed(wire) == [frame]
    assert decoder.buffered == 0


@pytest.mark.parametrize("kind", sorted(CONTROL_JSON | {FrameType.OPEN}), ids=lambda k: k.name)
def test_json_payload_round_trip(kind: FrameType) -> None:
    wire, frame = SAMPLES[kind]
    [decoded] = FrameDecoder().feed(wire)
    assert decode_json(decoded) == json.loads(frame.payload)


@pytest.mark.parametrize("kind", [FrameType.GOAWAY, FrameType.RST], ids=lambda k: k.name)
def test_code_payload_round_trip(kind: FrameType) -> None:
    wire = encode_code(kind, 0 if kind is FrameType.GOAWAY else 9, ErrorCode.TIMEOUT, "no heartbeat: ü")
    [frame] = FrameDecoder().feed(wire)
    assert decode_code(frame) == (ErrorCode.TIMEOUT, "no heartbeat: ü")


def test_code_payload_reason_is_capped_and_bad_utf8_is_replaced() -> None:
    [frame] = FrameDecoder().feed(encode_code(FrameType.RST, 1, 3, "x" * 5000))
    assert decode_code(frame) == (3, "x" * 1024)
    [frame] = FrameDecoder().feed(encode(FrameType.RST, 1, RST_PAYLOAD.pack(1) + b"\xff\xfe"))
    assert decode_code(frame) == (1, "\ufffd\ufffd")


@pytest.mark.parametrize("payload", [b"", b"\x00"])
def test_code_payload_too_short(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_code(Frame(FrameType.RST, 1, payload))
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


def test_all_frames_at_once_and_byte_by_byte_agree() -> None:
    wire = b"".join(w for w, _ in SAMPLES.values())
    expected = [f for _, f in SAMPLES.values()]
    assert FrameDecoder().feed(wire) == expected

    decoder = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(wire)):
        got += decoder.feed(wire[i : i + 1])
        assert decoder.buffered < HEADER_SIZE + MAX_CONTROL_PAYLOAD + 1024
    assert got == expected
    assert decoder.buffered == 0


def test_partial_frame_is_buffered() -> None:
    wire = encode(FrameType.DATA, 1, b"abcdef")
    decoder = FrameDecoder()
    assert decoder.feed(wire[:4]) == []
    assert decoder.buffered == 4
    assert decoder.feed(wire[4:12]) == []
    assert decoder.buffered == 12
    assert decoder.feed(wire[12:] + wire[:3]) == [Frame(FrameType.DATA, 1, b"abcdef")]
    assert decoder.buffered == 3


def test_empty_feed() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.buffered == 0


def test_max_size_frames_are_accepted() -> None:
    decoder = FrameDecoder()
    data = encode(FrameType.DATA, 1, b"d" * MAX_FRAME_PAYLOAD)
    control = encode(FrameType.HELLO, 0, b" " * MAX_CONTROL_PAYLOAD)
    frames = decoder.feed(data + control)
    assert [len(f.payload) for f in frames] == [MAX_FRAME_PAYLOAD, MAX_CONTROL_PAYLOAD]


def _raw(kind: int, flags: int, stream_id: int, length: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, flags, stream_id, length) + payload


def _expect_error(wire: bytes, code: ErrorCode, decoder: FrameDecoder | None = None) -> FrameDecoder:
    decoder = decoder or FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(wire)
    assert info.value.code == code
    assert type(info.value) is RemoteProtocolError  # the peer's fault, not a LocalProtocolError
    return decoder


@pytest.mark.parametrize("kind", [0, 11, 12, 15, 21, 99, 255])
def test_unknown_type(kind: int) -> None:
    _expect_error(_raw(kind, 0, 1, 0), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("flags", [1, 0x80, 0xFF])
@pytest.mark.parametrize("kind", [FrameType.DATA, FrameType.PING, FrameType.HELLO])
def test_non_zero_flags(kind: FrameType, flags: int) -> None:
    stream_id = 0 if kind in CONTROL else 1
    _expect_error(_raw(kind, flags, stream_id, 0), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("kind", sorted(CONTROL), ids=lambda k: k.name)
def test_control_frame_on_a_stream(kind: FrameType) -> None:
    _expect_error(_raw(kind, 0, 1, 0), ErrorCode.PROTOCOL_ERROR)
    _expect_error(_raw(kind, 0, 2**32 - 1, 0), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("kind", sorted(set(FrameType) - CONTROL), ids=lambda k: k.name)
def test_stream_frame_on_stream_zero(kind: FrameType) -> None:
    _expect_error(_raw(kind, 0, 0, 0), ErrorCode.PROTOCOL_ERROR)


def test_oversized_data_frame() -> None:
    # the header alone is enough: the decoder must not wait for (and buffer) the payload
    _expect_error(_raw(FrameType.DATA, 0, 1, MAX_FRAME_PAYLOAD + 1), ErrorCode.FRAME_TOO_LARGE)
    _expect_error(_raw(FrameType.DATA, 0, 1, 2**32 - 1), ErrorCode.FRAME_TOO_LARGE)


@pytest.mark.parametrize("kind", sorted(CONTROL) + [FrameType.OPEN], ids=lambda k: k.name)
def test_oversized_control_frame(kind: FrameType) -> None:
    # OPEN travels on a stream but is bounded by max_payload, not by the control limit
    limit = MAX_FRAME_PAYLOAD if kind is FrameType.OPEN else MAX_CONTROL_PAYLOAD
    stream_id = 0 if kind in CONTROL else 1
    _expect_error(_raw(kind, 0, stream_id, limit + 1), ErrorCode.FRAME_TOO_LARGE)


def test_custom_max_payload() -> None:
    decoder = FrameDecoder(max_payload=100)
    assert decoder.feed(encode(FrameType.DATA, 1, b"x" * 100)) == [Frame(FrameType.DATA, 1, b"x" * 100)]
    _expect_error(_raw(FrameType.DATA, 0, 1, 101), ErrorCode.FRAME_TOO_LARGE, decoder)


def test_frames_before_the_bad_one_are_pending() -> None:
    good = [encode(FrameType.PING, 0, PING_PAYLOAD.pack(1)), encode(FrameType.DATA, 3, b"abc")]
    decoder = _expect_error(b"".join(good) + _raw(200, 0, 0, 0), ErrorCode.PROTOCOL_ERROR)
    assert decoder.pending() == [
        Frame(FrameType.PING, 0, PING_PAYLOAD.pack(1)),
        Frame(FrameType.DATA, 3, b"abc"),
    ]


def test_error_detected_when_header_arrives_in_pieces() -> None:
    wire = _raw(FrameType.DATA, 0, 0, 5, b"hello")
    decoder = FrameDecoder()
    for i in range(HEADER_SIZE - 1):
        assert decoder.feed(wire[i : i + 1]) == []
    _expect_error(wire[HEADER_SIZE - 1 : HEADER_SIZE], ErrorCode.PROTOCOL_ERROR, decoder)


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"{", b'{"a":1', b"\xff\xfe\xfd", b"{'single': 'quotes'}", b'{"a": 1} trailing'],
)
def test_decode_json_not_json(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_json(Frame(FrameType.BIND, 0, payload))
    assert info.value.code == ErrorCode.PROTOCOL_ERROR
    assert "BIND" in str(info.value)


@pytest.mark.parametrize("payload", [b"[]", b"[1, 2]", b"1", b"-0.5", b'"text"', b"null", b"true", b"NaN"])
def test_decode_json_not_an_object(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_json(Frame(FrameType.HELLO, 0, payload))
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


def test_decode_json_deeply_nested() -> None:
    # fits in a control frame, but would blow the JSON parser's recursion limit
    payload = b'{"a":' + b"[" * (MAX_CONTROL_PAYLOAD - 10) + b"}"
    with pytest.raises(ProtocolError) as info:
        decode_json(Frame(FrameType.HELLO, 0, payload))
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


def test_decode_json_huge_integer() -> None:
    payload = b'{"window": ' + b"9" * 5000 + b"}"
    with pytest.raises(ProtocolError):
        decode_json(Frame(FrameType.HELLO, 0, payload))


def test_decode_json_object() -> None:
    frame = Frame(FrameType.UNBIND, 0, '{"id": "tünnel", "n": [1, {"x": null}]}'.encode())
    assert decode_json(frame) == {"id": "tünnel", "n": [1, {"x": None}]}


def test_code_name() -> None:
    assert code_name(ErrorCode.FLOW_CONTROL) == "FLOW_CONTROL"
    assert code_name(5) == "AUTH_FAILED"
    assert code_name(4242) == "4242"
