"""The wire format: frames with a fixed 10-byte header.

::

    0      1      2             6             10
    +------+------+-------------+-------------+---------------------+
    | type | flags| stream id   | length      | payload (length B)  |
    +------+------+-------------+-------------+---------------------+
      u8     u8     u32 big-end.  u32 big-end.

Stream 0 carries the session's control frames (HELLO, WELCOME, BIND, ...,
whose payload is a small JSON object); every other stream id is one public
connection. Flags are reserved and must be zero in version 1.

This module does no I/O.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import RemoteProtocolError
from .buffer import ReceiveBuffer

HEADER = struct.Struct("!BBII")
HEADER_SIZE = HEADER.size

#: Largest payload one frame may carry. Big frames mean fewer Python-level
#: operations per byte on the data path; 256 KiB matches the largest read
#: asyncio hands us, so one read becomes one frame.
MAX_FRAME_PAYLOAD = 256 * 1024

#: The smallest maximum a side may announce: below it, headers would dominate.
MIN_FRAME_PAYLOAD = 512

#: Control payloads are tiny JSON objects; anything bigger is an attack or a bug.
MAX_CONTROL_PAYLOAD = 16 * 1024

#: Largest window a peer may grant in total (a signed 31-bit count, as HTTP/2).
MAX_WINDOW = 2**31 - 1

#: Stream ids are u32 and never reused within a session.
MAX_STREAM_ID = 2**32 - 1

WINDOW_PAYLOAD = struct.Struct("!I")
RST_PAYLOAD = struct.Struct("!H")
PING_PAYLOAD = struct.Struct("!Q")
GOAWAY_PAYLOAD = struct.Struct("!H")


E = TypeVar("E", bound=type[enum.Enum])


def fast_hash(cls: E) -> E:
    """Hash an enum's members with their type's C hash, not ``Enum.__hash__``.

    ``Enum.__hash__`` is Python code (it hashes the member's name) and the
    data path hashes members several times per frame (set and dict lookups):
    a fifth of the protocol's time per 1-byte frame. Members are singletons
    compared by identity (or as ints, for ``IntEnum``), so this hash agrees
    with their equality.
    """
    cls.__hash__ = int.__hash__ if issubclass(cls, int) else object.__hash__  # type: ignore[assignment,method-assign]
    return cls


@fast_hash
class FrameType(enum.IntEnum):
    """Every frame type of protocol version 1."""

    # control, stream 0, JSON payload
    HELLO = 1  # agent -> relay: versions, token, window
    WELCOME = 2  # relay -> agent: version, session id, window
    BIND = 3  # agent -> relay: open a tunnel
    BOUND = 4  # relay -> agent: the tunnel is open, here are its addresses
    BIND_FAILED = 5  # relay -> agent: the tunnel could not be opened
    UNBIND = 6  # agent -> relay: close a tunnel
    UNBOUND = 7  # relay -> agent: the tunnel is closed
    # control, stream 0, binary payload
    PING = 8  # either way: u64 opaque
    PONG = 9  # either way: the PING's u64
    GOAWAY = 10  # either way: u16 code + UTF-8 reason; the session ends
    # streams, stream id != 0
    OPEN = 16  # relay -> agent: a public connection arrived (JSON payload)
    DATA = 17  # either way: bytes
    WINDOW = 18  # either way: u32 credit increment
    FIN = 19  # either way: no more DATA from the sender (half-close)
    RST = 20  # either way: u16 code + UTF-8 reason; the stream is gone


CONTROL_JSON = frozenset(
    {
        FrameType.HELLO,
        FrameType.WELCOME,
        FrameType.BIND,
        FrameType.BOUND,
        FrameType.BIND_FAILED,
        FrameType.UNBIND,
        FrameType.UNBOUND,
    }
)
CONTROL = CONTROL_JSON | {FrameType.PING, FrameType.PONG, FrameType.GOAWAY}
_KNOWN = frozenset(int(t) for t in FrameType)
_TYPES = {int(t): t for t in FrameType}  # faster than FrameType(n) on the data path


@fast_hash
class ErrorCode(enum.IntEnum):
    """Codes carried by GOAWAY (session) and RST (stream) frames."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1  # malformed or out-of-order frame
    FRAME_TOO_LARGE = 2
    FLOW_CONTROL = 3  # the peer sent more than its credit
    UNSUPPORTED_VERSION = 4
    AUTH_FAILED = 5
    REFUSED = 6  # stream: the local service refused the connection
    TUNNEL_CLOSED = 7  # stream: its tunnel was closed
    INTERNAL_ERROR = 8
    SHUTDOWN = 9  # session: the peer is going away on purpose
    TIMEOUT = 10  # session: the peer stopped answering heartbeats
    CANCELLED = 11  # stream: one end closed abruptly
    LIMIT = 12  # session: a cap of the relay's is reached (sessions per token or per source)


def code_name(code: int) -> str:
    """``ErrorCode`` name for logs; the number itself for codes from a newer peer."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


@dataclass(slots=True)
class Frame:
    """One decoded frame (not frozen: a frozen dataclass costs ~1 us more to make, per frame)."""

    type: FrameType
    stream_id: int
    payload: bytes | bytearray | memoryview  # a view or bytearray only for DATA


def encode(frame_type: FrameType, stream_id: int, payload: bytes = b"") -> bytes:
    """Return the bytes of one frame (header and payload joined)."""
    return HEADER.pack(frame_type, 0, stream_id, len(payload)) + payload


def encode_json(frame_type: FrameType, message: dict[str, Any], stream_id: int = 0) -> bytes:
    """Return a frame (a control frame, or OPEN) whose payload is ``message`` as compact JSON."""
    return encode(frame_type, stream_id, json.dumps(message, separators=(",", ":")).encode())


def decode_json(frame: Frame) -> dict[str, Any]:
    """Parse a JSON control payload, raising :class:`RemoteProtocolError` if it is not an object."""
    try:
        message = json.loads(bytes(frame.payload))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{frame.type.name} payload is not JSON") from exc
    if not isinstance(message, dict):
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{frame.type.name} payload is not a JSON object")
    return message


def encode_code(frame_type: FrameType, stream_id: int, code: int, reason: str = "") -> bytes:
    """Return a GOAWAY or RST frame: a u16 code and a UTF-8 reason."""
    return encode(frame_type, stream_id, RST_PAYLOAD.pack(code) + reason.encode()[:1024])


def decode_code(frame: Frame) -> tuple[int, str]:
    """Parse the (code, reason) payload of a GOAWAY or RST frame."""
    if len(frame.payload) < RST_PAYLOAD.size:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{frame.type.name} payload is too short")
    (code,) = RST_PAYLOAD.unpack_from(frame.payload)
    reason = bytes(frame.payload[RST_PAYLOAD.size :]).decode("utf-8", "replace")
    return code, reason


class FrameDecoder:
    """Turns a byte stream into frames; keeps at most one frame's bytes buffered."""

    def __init__(self, max_payload: int = MAX_FRAME_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buffer: ReceiveBuffer | None = None  # made by the first feed()
        self._frames: list[Frame] = []

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add ``data`` and return every frame it completes, in order.

        ``data`` is copied into the decoder's :class:`ReceiveBuffer`; DATA
        payloads are views of that buffer, which never writes over bytes a
        view can see. Other payloads are bytes. (The session link reads
        straight into a buffer and calls :meth:`parse` instead.)

        Raises :class:`RemoteProtocolError` on an unknown type, non-zero flags, a
        control frame on a stream, a stream frame on stream 0, or an
        oversized length. Frames before the bad one are returned by the
        next call to :meth:`pending` (the caller stops reading anyway).
        """
        frames: list[Frame] = []
        self._frames = frames
        if self._buffer is None:
            self._buffer = ReceiveBuffer()
        self._buffer.feed(data, lambda view: self.parse(view, frames))
        return frames

    def parse(self, view: memoryview, frames: list[Frame]) -> int:
        """Append the whole frames at the start of ``view`` to ``frames``; return the bytes they took.

        DATA payloads are slices of ``view``: the caller must not change those
        bytes while the frames are in use. What follows the last whole frame
        is left to the caller, to present again with the rest of it. On a
        :class:`RemoteProtocolError`, ``frames`` holds the frames before the bad one.
        """
        self._frames = frames
        offset = 0
        while True:
            frame, end = self.parse_one(view, offset)
            if frame is None:
                return offset
            frames.append(frame)
            offset = end

    def parse_one(self, view: memoryview, offset: int) -> tuple[Frame | None, int]:
        """The frame at ``offset`` in ``view`` and where it ends; None if it is not whole yet."""
        if len(view) - offset < HEADER_SIZE:
            return None, offset
        kind, stream_id, length = self._header(view, offset)
        end = offset + HEADER_SIZE + length
        if end > len(view):
            return None, offset
        payload = view[offset + HEADER_SIZE : end]
        return Frame(kind, stream_id, payload if kind is FrameType.DATA else bytes(payload)), end

    def _header(self, data: bytes | bytearray | memoryview, offset: int) -> tuple[FrameType, int, int]:
        frame_type, flags, stream_id, length = HEADER.unpack_from(data, offset)
        if frame_type not in _KNOWN:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"unknown frame type {frame_type}")
        kind = _TYPES[frame_type]
        if flags:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{kind.name} frame with flags {flags:#x}")
        if (kind in CONTROL) != (stream_id == 0):
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{kind.name} frame on the wrong stream ({stream_id})")
        limit = MAX_CONTROL_PAYLOAD if kind in CONTROL else self.max_payload
        if length > limit:
            raise RemoteProtocolError(ErrorCode.FRAME_TOO_LARGE, f"{kind.name} frame of {length} bytes exceeds {limit}")
        return kind, stream_id, length

    def pending(self) -> list[Frame]:
        """Frames decoded by the last :meth:`feed` (useful after it raised)."""
        return self._frames

    @property
    def buffered(self) -> int:
        """How many bytes wait for the rest of their frame."""
        return 0 if self._buffer is None else self._buffer.pending
