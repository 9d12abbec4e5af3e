"""The native frame codec against the Python reference model: same bytes, same frames, same errors.

``burrow.protocol.frames`` is the model; ``burrow._native`` (Rust) is the
codec the data plane will run. Hypothesis feeds both the same bytes, whole
and cut at the same places, valid streams and hostile garbage alike, and
every frame, every buffered count, every error code and message must agree.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from burrow import _native
from burrow.errors import ProtocolError, RemoteProtocolError
from burrow.protocol.frames import (
    CONTROL,
    HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_FRAME_PAYLOAD,
    FrameDecoder,
    FrameType,
    encode,
)

Outcome = tuple[list[tuple[int, int, bytes]], int | None, str | None, int]


def _python(data: bytes, cuts: list[int], max_payload: int) -> Outcome:
    decoder = FrameDecoder(max_payload)
    frames: list[tuple[int, int, bytes]] = []
    for chunk in _split(data, cuts):
        try:
            got = decoder.feed(chunk)
        except ProtocolError as exc:
            frames += [(int(f.type), f.stream_id, bytes(f.payload)) for f in decoder.pending()]
            return frames, exc.code, str(exc), decoder.buffered
        frames += [(int(f.type), f.stream_id, bytes(f.payload)) for f in got]
    return frames, None, None, decoder.buffered


def _native_outcome(data: bytes, cuts: list[int], max_payload: int) -> Outcome:
    decoder = _native.FrameDecoder(max_payload)
    frames: list[tuple[int, int, bytes]] = []
    for chunk in _split(data, cuts):
        try:
            frames += decoder.feed(chunk)
        except RemoteProtocolError as exc:  # burrow's own exception, raised from Rust
            frames += decoder.pending()
            return frames, exc.code, str(exc), decoder.buffered
    return frames, None, None, decoder.buffered


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for end in [*points, len(data)]:
        pieces.append(data[start:end])
        start = end
    return pieces


def _agree(data: bytes, cuts: list[int], max_payload: int) -> None:
    python, native = _python(data, cuts, max_payload), _native_outcome(data, cuts, max_payload)
    assert native[:3] == python[:3]
    if python[1] is None:  # (after an error the session is over; what stays buffered then is moot)
        assert native[3] == python[3]


frame_types = st.sampled_from(list(FrameType))


@st.composite
def frame_bytes(draw: st.DrawFn) -> bytes:
    """A well-formed frame of any type (its payload need not parse: the codec does not look)."""
    kind = draw(frame_types)
    stream_id = 0 if kind in CONTROL else draw(st.integers(1, 2**32 - 1))
    return encode(kind, stream_id, draw(st.binary(max_size=600)))


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    """Good frames, then one byte of one header changed, then more frames."""
    frames = draw(st.lists(frame_bytes(), min_size=1, max_size=6))
    wire = bytearray(b"".join(frames))
    starts, offset = [], 0
    for frame in frames:
        starts.append(offset)
        offset += len(frame)
    at = draw(st.sampled_from(starts)) + draw(st.integers(0, HEADER_SIZE - 1))
    wire[at] = draw(st.integers(0, 255))
    return bytes(wire)


cut_lists = st.lists(st.integers(0, 4000), max_size=8)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000), cuts=cut_lists, max_payload=st.sampled_from([512, 1000, MAX_FRAME_PAYLOAD]))
def test_garbage_gives_the_same_frames_and_errors(data: bytes, cuts: list[int], max_payload: int) -> None:
    _agree(data, cuts, max_payload)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(frame_bytes(), max_size=12), cuts=cut_lists)
def test_valid_streams_decode_alike(frames: list[bytes], cuts: list[int]) -> None:
    data = b"".join(frames)
    _agree(data, cuts, MAX_FRAME_PAYLOAD)
    assert len(_native_outcome(data, cuts, MAX_FRAME_PAYLOAD)[0]) == len(frames)


@settings(max_examples=300, deadline=None)
@given(data=corrupted(), cuts=cut_lists, max_payload=st.sampled_from([512, MAX_FRAME_PAYLOAD]))
def test_a_corrupted_header_is_the_same_error_after_the_same_frames(
    data: bytes, cuts: list[int], max_payload: int
) -> None:
    _agree(data, cuts, max_payload)


@settings(max_examples=200, deadline=None)
@given(kind=frame_types, stream_id=st.integers(0, 2**32 - 1), payload=st.binary(max_size=2000))
def test_encoding_is_byte_for_byte_the_same(kind: FrameType, stream_id: int, payload: bytes) -> None:
    assert _native.encode(int(kind), stream_id, payload) == encode(kind, stream_id, payload)


def test_the_limits_are_the_models() -> None:
    assert (_native.HEADER_SIZE, _native.MAX_FRAME_PAYLOAD, _native.MAX_CONTROL_PAYLOAD) == (
        HEADER_SIZE,
        MAX_FRAME_PAYLOAD,
        MAX_CONTROL_PAYLOAD,
    )


def test_an_oversized_header_is_refused_before_its_payload_arrives() -> None:
    decoder = _native.FrameDecoder(1000)
    with pytest.raises(RemoteProtocolError, match="DATA frame of 1001 bytes exceeds 1000") as info:
        decoder.feed(encode(FrameType.DATA, 1, b"x" * 1001)[:HEADER_SIZE])
    assert info.value.code == 2  # FRAME_TOO_LARGE


def test_bad_arguments_are_value_errors_not_crashes() -> None:
    with pytest.raises(ValueError, match="max_payload 100 is outside"):
        _native.FrameDecoder(100)
    with pytest.raises(ValueError, match="unknown frame type 99"):
        _native.encode(99, 0, b"")
    with pytest.raises(OverflowError):
        _native.encode(17, 2**32, b"")
