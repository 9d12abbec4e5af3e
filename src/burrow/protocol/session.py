"""The session state machine, sans I/O: fed bytes, it returns events and bytes to send.

One :class:`SessionProtocol` is one agent–relay connection. It owns the
session state, every stream's state and both directions of per-stream flow
control. The asyncio adapter (``burrow.connection``) feeds it with
:meth:`~SessionProtocol.receive_view` (or ``receive_data``), drains :meth:`~SessionProtocol.events_received`
and :meth:`~SessionProtocol.data_to_send`, and calls the API methods.

Flow control: each side announces its per-stream receive window in the
handshake. A sender may have at most that many unacknowledged bytes on a
stream; the receiver grants credit back (WINDOW) once the application has
*consumed* half a window, so a stalled reader holds at most one window of
data in flight towards it (plus what its own transport buffers before it
pauses), and the sender buffers at most what it was handed beyond its credit.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..errors import LocalProtocolError, RemoteProtocolError
from . import events as ev
from .buffer import ReceiveBuffer
from .frames import (
    GOAWAY_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    MAX_STREAM_ID,
    MAX_WINDOW,
    MIN_FRAME_PAYLOAD,
    PING_PAYLOAD,
    WINDOW_PAYLOAD,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    decode_code,
    decode_json,
    encode,
    encode_code,
    encode_json,
    fast_hash,
)
from .messages import (
    ANYONE,
    MAX_ID_LENGTH,
    MAX_TEXT_LENGTH,
    MAX_TICKET_LENGTH,
    MAX_TOKEN_LENGTH,
    Access,
    BindFailure,
    TunnelAddress,
    field_of,
    optional_of,
    text_of,
)

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

#: Default per-stream receive window, OpenSSH's channel window: one stream
#: carries ~160 Mbit/s over a 100 ms cross-region link (bandwidth x RTT; 1 MiB
#: gave 80, measured through a delay proxy), while a stalled reader costs at most
#: 2 MiB. On loopback it also keeps the agent busy while the relay grants credit.
DEFAULT_WINDOW = 2 * 1024 * 1024

#: A smaller window would make frames so small that the header dominates.
MIN_WINDOW = 16 * 1024


@fast_hash
class Role(enum.Enum):
    """Which end of the session this protocol object plays."""

    AGENT = "agent"
    RELAY = "relay"


@fast_hash
class SessionState(enum.Enum):
    """Session states; transitions are in ``_SESSION_ACCEPTS`` and the methods below."""

    HANDSHAKE = "handshake"  # agent: HELLO sent; relay: waiting for HELLO
    HELLO_RECEIVED = "hello-received"  # relay: waiting for the application's verdict
    OPEN = "open"
    CLOSING = "closing"  # a graceful GOAWAY went one way: streams finish, none start
    CLOSED = "closed"


@fast_hash
class StreamState(enum.Enum):
    """Stream states; the transitions are in ``_STREAM_TRANSITIONS``."""

    OPEN = "open"
    LOCAL_CLOSED = "local-closed"  # we sent FIN
    REMOTE_CLOSED = "remote-closed"  # we received FIN
    CLOSED = "closed"


@fast_hash
class _Fin(enum.Enum):
    SEND = "send"
    RECEIVE = "receive"


_STREAM_TRANSITIONS: dict[tuple[StreamState, _Fin], StreamState] = {
    (StreamState.OPEN, _Fin.SEND): StreamState.LOCAL_CLOSED,
    (StreamState.OPEN, _Fin.RECEIVE): StreamState.REMOTE_CLOSED,
    (StreamState.LOCAL_CLOSED, _Fin.RECEIVE): StreamState.CLOSED,
    (StreamState.REMOTE_CLOSED, _Fin.SEND): StreamState.CLOSED,
}
_CAN_SEND = frozenset({StreamState.OPEN, StreamState.REMOTE_CLOSED})
_CAN_RECEIVE = frozenset({StreamState.OPEN, StreamState.LOCAL_CLOSED})

_STREAM_FRAMES = frozenset({FrameType.DATA, FrameType.WINDOW, FrameType.FIN, FrameType.RST})
_ANY_TIME = frozenset({FrameType.PING, FrameType.PONG, FrameType.GOAWAY})
_AGENT_RUNNING = (
    _ANY_TIME
    | _STREAM_FRAMES
    | {
        FrameType.BOUND,
        FrameType.BIND_FAILED,
        FrameType.UNBOUND,
        FrameType.OPEN,
    }
)
_RELAY_RUNNING = _ANY_TIME | _STREAM_FRAMES | {FrameType.BIND, FrameType.UNBIND}

#: Which frames each role accepts in each state; anything else is a protocol error.
_SESSION_ACCEPTS: dict[tuple[Role, SessionState], frozenset[FrameType]] = {
    (Role.AGENT, SessionState.HANDSHAKE): frozenset({FrameType.WELCOME} | _ANY_TIME),
    (Role.AGENT, SessionState.OPEN): _AGENT_RUNNING,
    (Role.AGENT, SessionState.CLOSING): _AGENT_RUNNING,
    (Role.RELAY, SessionState.HANDSHAKE): frozenset({FrameType.HELLO, FrameType.GOAWAY}),
    # an agent told it may (``early_requests``) sends its first BINDs right behind HELLO; the
    # application hears them after HelloReceived, so its verdict on the token comes first
    (Role.RELAY, SessionState.HELLO_RECEIVED): frozenset(
        {FrameType.GOAWAY, FrameType.PING, FrameType.PONG, FrameType.BIND}
    ),
    (Role.RELAY, SessionState.OPEN): _RELAY_RUNNING,
    (Role.RELAY, SessionState.CLOSING): _RELAY_RUNNING,
}
_GRACEFUL = frozenset({ErrorCode.NO_ERROR, ErrorCode.SHUTDOWN})


class _Stream:
    """Bookkeeping for one stream; only :class:`SessionProtocol` touches it."""

    __slots__ = ("fin_pending", "pending", "pending_size", "recv_credit", "send_credit", "state", "unacked")

    def __init__(self, send_credit: int, recv_credit: int) -> None:
        self.state = StreamState.OPEN
        self.send_credit = send_credit  # bytes we may still send
        self.recv_credit = recv_credit  # bytes the peer may still send us
        self.unacked = 0  # bytes consumed by the application, not yet granted back
        self.pending: deque[memoryview] = deque()  # data waiting for credit
        self.pending_size = 0
        self.fin_pending = False  # FIN asked for while data was still pending


class SessionProtocol:
    """Sans-I/O state of one agent–relay session (see the module docstring)."""

    def __init__(self, role: Role, window: int = DEFAULT_WINDOW, max_payload: int = MAX_FRAME_PAYLOAD) -> None:
        if not MIN_WINDOW <= window <= MAX_WINDOW:
            raise LocalProtocolError(ErrorCode.INTERNAL_ERROR, f"window {window} outside {MIN_WINDOW}..{MAX_WINDOW}")
        if not MIN_FRAME_PAYLOAD <= max_payload <= MAX_FRAME_PAYLOAD:
            raise LocalProtocolError(
                ErrorCode.INTERNAL_ERROR, f"max frame {max_payload} outside {MIN_FRAME_PAYLOAD}..{MAX_FRAME_PAYLOAD}"
            )
        self.role = role
        self.state = SessionState.HANDSHAKE
        self.window = window  # what we grant each stream
        self.peer_window = 0  # what the peer grants each stream; known after the handshake
        self.max_payload = max_payload  # the largest DATA payload we accept
        self.send_payload = max_payload  # the largest we send: min(ours, the peer's), after the handshake
        self.version = 0
        #: Agent: BIND may go out before WELCOME (the relay said it takes them, by ALPN)
        self.early_requests = False
        self.close_code: int | None = None  # why the session ended, once it has
        self._decoder = FrameDecoder(max_payload)
        self._received: ReceiveBuffer | None = None  # receive_data's copy of the bytes
        self._streams: dict[int, _Stream] = {}
        self._last_stream_id = 0  # relay: last id allocated; agent: last id seen
        self._events: list[ev.Event] = []
        self._out: list[bytes | memoryview] = []
        self._data_left = 0  # payload bytes still to come of a DATA frame whose start was handed over
        self._data_stream = 0  # ... and its stream

    # ---------------------------------------------------------------- I/O side

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the connection.

        Raises :class:`RemoteProtocolError` if the peer broke the protocol; the
        session is then CLOSED and a GOAWAY with the error's code is queued.
        Events decoded before the error stay available.

        ``data`` is copied into a buffer of the protocol's own and handed to
        :meth:`receive_view`, the one way in.
        """
        if self._received is None:
            self._received = ReceiveBuffer()
        self._received.feed(data, self.receive_view)

    def receive_view(self, view: memoryview) -> int:
        """Feed the unread bytes of the caller's read buffer; return how many it may drop.

        The zero-copy twin of :meth:`receive_data`, for a caller that keeps
        its own buffer: the whole frames at the start of ``view`` are handled
        and their size returned; the start of a frame after them stays in the
        caller's buffer, to come back at the start of the next ``view``. DATA
        events carry slices of ``view``, so the caller must not write over
        those bytes while a slice is alive. Use one of the two methods per
        session, not both. Errors as :meth:`receive_data`.

        DATA that keeps every rule on an open stream takes a fast path (no
        frame object, no dispatch): one such frame per read is the common case
        of interactive traffic. Its payload is handed over as it arrives: a
        frame that the end of ``view`` cuts short gives a DataReceived for
        what is there, and the rest comes from the next views, so a caller
        never keeps (nor moves) a partial bulk frame in its buffer. Anything
        else goes through the decoder and the state tables, which also raise
        the errors, whole frames only.
        """
        if self.state is _CLOSED:
            return len(view)
        size = len(view)
        offset = 0
        streams = self._streams
        events = self._events
        if self._data_left:  # the rest of a DATA frame whose start came before
            offset = min(self._data_left, size)
            self._data_left -= offset
            stream = streams.get(self._data_stream)
            if offset and stream is not None and stream.state in _CAN_RECEIVE:  # (else reset since: dropped)
                events.append(ev.DataReceived(self._data_stream, view[:offset]))
            if self._data_left:
                return offset
        fast = self.state in _DATA_STATES
        max_payload = self.max_payload
        try:
            while size - offset >= HEADER_SIZE:
                kind, flags, stream_id, length = _unpack_header(view, offset)
                end = offset + HEADER_SIZE + length
                if kind == _DATA and fast and not flags and length <= max_payload:
                    stream = streams.get(stream_id)
                    if stream is not None and stream.recv_credit >= length and stream.state in _CAN_RECEIVE:
                        stream.recv_credit -= length
                        start = offset + HEADER_SIZE
                        if end <= size:
                            events.append(ev.DataReceived(stream_id, view[start:end]))
                        else:  # cut short: hand over what is here, the rest as it comes
                            self._data_left = end - size
                            self._data_stream = stream_id
                            end = size
                            if end > start:
                                events.append(ev.DataReceived(stream_id, view[start:end]))
                        offset = end
                        continue
                    if stream is None and 0 < stream_id <= self._last_stream_id and end > size:
                        # in flight for a stream that ended here (reset): drop it as it comes, not
                        # once whole (the state tables would drop it then; there is no event)
                        self._data_left = end - size
                        self._data_stream = stream_id
                        offset = size
                        continue
                frame, end = self._decoder.parse_one(view, offset)
                if frame is None:
                    break
                self._dispatch(frame)
                offset = end
                if self.state is _CLOSED:
                    return size
                fast = self.state in _DATA_STATES
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        return offset

    def events_received(self) -> list[ev.Event]:
        """Return and forget the events produced so far."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes | memoryview]:
        """Return and forget the chunks to write to the connection, in order."""
        out, self._out = self._out, []
        return out

    # -------------------------------------------------------------- handshake

    def hello(self, token: str, agent: str = "burrow") -> None:
        """Agent: introduce ourselves (first thing on the connection)."""
        self._require(Role.AGENT, SessionState.HANDSHAKE)
        hello = {
            "versions": list(SUPPORTED_VERSIONS),
            "token": token,
            "window": self.window,
            "max_frame": self.max_payload,
            "agent": agent,
        }
        self._out.append(encode_json(FrameType.HELLO, hello))

    def welcome(self, session_id: str) -> None:
        """Relay: accept the agent that sent HELLO."""
        self._require(Role.RELAY, SessionState.HELLO_RECEIVED)
        message = {
            "version": self.version,
            "session": session_id,
            "window": self.window,
            "max_frame": self.max_payload,
        }
        self._out.append(encode_json(FrameType.WELCOME, message))
        self.state = SessionState.OPEN

    def reject(self, code: ErrorCode, reason: str) -> None:
        """Relay: refuse the agent (wrong token, ...) and close the session."""
        self.goaway(code, reason)

    # ---------------------------------------------------------------- tunnels

    def bind(
        self,
        request_id: int,
        port: int,
        *,
        unencrypted: bool = False,
        h2: bool = False,
        ticket: str | None = None,
        access: Access = ANYONE,
    ) -> None:
        """Agent: ask for a tunnel to local ``port`` (resuming one with ``ticket``); answered by Bound or BindFailed.

        Before WELCOME only with ``early_requests``: the answer then comes after WELCOME.
        """
        if self.early_requests:
            self._require(Role.AGENT, SessionState.HANDSHAKE, SessionState.OPEN)
        else:
            self._require(Role.AGENT, SessionState.OPEN)
        message: dict[str, Any] = {"request": request_id, "port": port, "unencrypted": unencrypted, "h2": h2}
        if ticket is not None:
            message["ticket"] = ticket
        message.update(access.to_message())
        self._out.append(encode_json(FrameType.BIND, message))

    def bound(self, request_id: int, tunnel: TunnelAddress) -> None:
        """Relay: the tunnel is open at ``tunnel``."""
        self._require(Role.RELAY, SessionState.OPEN, SessionState.CLOSING)
        self._out.append(encode_json(FrameType.BOUND, {**tunnel.to_message(), "request": request_id}))

    def bind_failed(self, request_id: int, code: BindFailure, message: str) -> None:
        """Relay: the tunnel could not be opened."""
        self._require(Role.RELAY, SessionState.OPEN, SessionState.CLOSING)
        payload = {"request": request_id, "code": code.value, "message": message}
        self._out.append(encode_json(FrameType.BIND_FAILED, payload))

    def unbind(self, tunnel_id: str) -> None:
        """Agent: close a tunnel; answered by Unbound."""
        self._require(Role.AGENT, SessionState.OPEN, SessionState.CLOSING)
        self._out.append(encode_json(FrameType.UNBIND, {"id": tunnel_id}))

    def unbound(self, tunnel_id: str, reason: str = "closed") -> None:
        """Relay: a tunnel is closed (because the agent asked, or not)."""
        self._require(Role.RELAY, SessionState.OPEN, SessionState.CLOSING)
        self._out.append(encode_json(FrameType.UNBOUND, {"id": tunnel_id, "reason": reason}))

    # ---------------------------------------------------------------- streams

    def open_stream(self, tunnel_id: str, peer: str) -> int:
        """Relay: announce a public connection on ``tunnel_id``; return its stream id."""
        self._require(Role.RELAY, SessionState.OPEN)
        if self._last_stream_id >= MAX_STREAM_ID:
            raise LocalProtocolError(ErrorCode.INTERNAL_ERROR, "stream ids exhausted; start a new session")
        self._last_stream_id += 1
        stream_id = self._last_stream_id
        self._streams[stream_id] = _Stream(self.peer_window, self.window)
        self._out.append(encode_json(FrameType.OPEN, {"tunnel": tunnel_id, "peer": peer}, stream_id))
        return stream_id

    def send_data(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Send ``data`` on a stream, as far as credit allows; buffer the rest.

        Returns True when everything went out, False when some of it waits
        for credit: the caller should stop reading its source until
        :class:`~burrow.protocol.events.StreamWritable` arrives.

        What goes out is queued as it is (a view of ``data``): write
        :meth:`data_to_send` before changing ``data``'s bytes. What waits for
        credit is copied, so a caller may lend its read buffer.
        """
        stream = self._sendable(stream_id)
        if stream.pending_size:
            if len(data):  # an empty view left queued would hold back StreamWritable
                stream.pending.append(memoryview(bytes(data)))
                stream.pending_size += len(data)
            return False
        size = len(data)
        if size <= stream.send_credit and size <= self.send_payload:
            stream.send_credit -= size
            self._out.append(_DATA_HEADER(_DATA, 0, stream_id, size))
            self._out.append(data)
            return True
        view = memoryview(data)
        sent = self._send_within_credit(stream_id, stream, view)
        if sent < size:
            stream.pending.append(memoryview(bytes(view[sent:])))
            stream.pending_size = size - sent
            return False
        return True

    def data_record(self, stream_id: int, data: bytes | memoryview) -> bytes | None:
        """``data`` as one whole DATA frame, when it may go out now and nothing else waits.

        The shortcut of :meth:`send_data` for the common case of interactive
        traffic (a small read on an open stream with credit): the frame comes
        back as one ``bytes`` for the caller to write, instead of going
        through :meth:`data_to_send`. None when anything is queued, or the
        stream cannot take ``data`` at once: then call :meth:`send_data`,
        which also raises the errors.
        """
        stream = self._streams.get(stream_id)
        size = len(data)
        if (
            self._out
            or stream is None
            or stream.pending_size
            or stream.fin_pending
            or size > stream.send_credit
            or size > self.send_payload
            or stream.state not in _CAN_SEND
            or self.state is _CLOSED
        ):
            return None
        stream.send_credit -= size
        return _DATA_HEADER(_DATA, 0, stream_id, size) + data

    def send_fin(self, stream_id: int) -> None:
        """Half-close our direction of the stream (after any buffered data)."""
        stream = self._sendable(stream_id)
        if stream.pending_size:
            stream.fin_pending = True
            return
        self._emit_fin(stream_id, stream)

    def send_rst(self, stream_id: int, code: int = ErrorCode.CANCELLED, reason: str = "") -> None:
        """Abort the stream both ways; unknown or finished streams are ignored."""
        if self._streams.pop(stream_id, None) is None or self.state is _CLOSED:
            return
        self._out.append(encode_code(FrameType.RST, stream_id, code, reason))

    def consumed(self, stream_id: int, size: int) -> None:
        """Report that ``size`` received bytes left this process; may grant credit."""
        stream = self._streams.get(stream_id)
        if stream is None or self.state is _CLOSED:
            return
        stream.unacked += size
        if stream.unacked >= self.window // 2 and stream.state in _CAN_RECEIVE:
            self._out.append(encode(FrameType.WINDOW, stream_id, WINDOW_PAYLOAD.pack(stream.unacked)))
            stream.recv_credit += stream.unacked
            stream.unacked = 0

    def stream_state(self, stream_id: int) -> StreamState:
        """The state of a stream; CLOSED for one that ended or never existed."""
        stream = self._streams.get(stream_id)
        return StreamState.CLOSED if stream is None else stream.state

    def send_room(self, stream_id: int) -> int:
        """Bytes :meth:`send_data` would send on a stream at once (0 while anything waits)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None or stream.pending_size else max(0, stream.send_credit)

    def buffered(self, stream_id: int) -> int:
        """Bytes handed to :meth:`send_data` that still wait for credit."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.pending_size

    @property
    def stream_count(self) -> int:
        """How many streams are open (in any direction)."""
        return len(self._streams)

    # ---------------------------------------------------------------- session

    def ping(self, opaque: int) -> None:
        """Send a heartbeat; the peer answers with PongReceived(opaque)."""
        if self.state is not SessionState.CLOSED:
            self._out.append(encode(FrameType.PING, 0, PING_PAYLOAD.pack(opaque)))

    def goaway(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """End the session: gracefully (NO_ERROR, SHUTDOWN: streams finish) or at once."""
        if self.state is SessionState.CLOSED:
            return
        self._out.append(encode_code(FrameType.GOAWAY, 0, code, reason))
        if code in _GRACEFUL and self.state is SessionState.OPEN:
            self.state = SessionState.CLOSING
        else:
            self._close(code)

    def connection_lost(self) -> None:
        """The connection is gone: every stream is dead."""
        self._close(ErrorCode.CANCELLED if self.close_code is None else self.close_code)

    # ---------------------------------------------------------------- internals

    def _require(self, role: Role, *states: SessionState) -> None:
        if self.role is not role:
            raise LocalProtocolError(ErrorCode.INTERNAL_ERROR, f"only the {role.value} may do that")
        if self.state not in states:
            raise LocalProtocolError(ErrorCode.INTERNAL_ERROR, f"not allowed while the session is {self.state.value}")

    def _sendable(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in _CAN_SEND or stream.fin_pending or self.state is _CLOSED:
            raise LocalProtocolError(ErrorCode.INTERNAL_ERROR, f"stream {stream_id} cannot send")
        return stream

    def _send_within_credit(self, stream_id: int, stream: _Stream, view: memoryview) -> int:
        sent = 0
        size = len(view)
        limit = self.send_payload
        while sent < size and stream.send_credit > 0:
            chunk = min(size - sent, stream.send_credit, limit)
            self._out.append(_DATA_HEADER(_DATA, 0, stream_id, chunk))
            self._out.append(view[sent : sent + chunk])
            stream.send_credit -= chunk
            sent += chunk
        return sent

    def _flush_pending(self, stream_id: int, stream: _Stream) -> None:
        while stream.pending and stream.send_credit > 0:
            view = stream.pending.popleft()
            sent = self._send_within_credit(stream_id, stream, view)
            stream.pending_size -= sent
            if sent < len(view):
                stream.pending.appendleft(view[sent:])
        if not stream.pending:
            self._events.append(ev.StreamWritable(stream_id))
            if stream.fin_pending:
                stream.fin_pending = False
                self._emit_fin(stream_id, stream)

    def _emit_fin(self, stream_id: int, stream: _Stream) -> None:
        self._out.append(encode(FrameType.FIN, stream_id))
        self._advance(stream_id, stream, _Fin.SEND)

    def _advance(self, stream_id: int, stream: _Stream, fin: _Fin) -> None:
        stream.state = _STREAM_TRANSITIONS[(stream.state, fin)]
        if stream.state is StreamState.CLOSED:
            del self._streams[stream_id]

    def _fail(self, exc: RemoteProtocolError) -> None:
        if self.state is not SessionState.CLOSED:
            self._out.append(encode_code(FrameType.GOAWAY, 0, exc.code, str(exc)))
            self._close(exc.code)

    def _close(self, code: int) -> None:
        self.state = SessionState.CLOSED
        if self.close_code is None:
            self.close_code = code
        self._streams.clear()

    def _dispatch(self, frame: Frame) -> None:
        kind = frame.type
        if kind not in _SESSION_ACCEPTS[(self.role, self.state)]:
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"{self.role.value} got {kind.name} while {self.state.value}"
            )
        if kind is FrameType.DATA:
            self._on_data(frame)
        else:
            _HANDLERS[kind](self, frame)

    def _on_data(self, frame: Frame) -> None:
        stream = self._known_stream(frame)
        if stream is None:
            return  # a stream we already reset; its in-flight data is dropped
        if stream.state not in _CAN_RECEIVE:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"DATA on stream {frame.stream_id} after FIN")
        stream.recv_credit -= len(frame.payload)
        if stream.recv_credit < 0:
            raise RemoteProtocolError(ErrorCode.FLOW_CONTROL, f"stream {frame.stream_id} overran its window")
        self._events.append(ev.DataReceived(frame.stream_id, frame.payload))

    def _on_window(self, frame: Frame) -> None:
        if len(frame.payload) != WINDOW_PAYLOAD.size:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW payload is not 4 bytes")
        stream = self._known_stream(frame)
        if stream is None:
            return
        (increment,) = WINDOW_PAYLOAD.unpack(frame.payload)
        if increment == 0 or stream.send_credit + increment > MAX_WINDOW:
            raise RemoteProtocolError(
                ErrorCode.FLOW_CONTROL, f"bad WINDOW increment {increment} on stream {frame.stream_id}"
            )
        stream.send_credit += increment
        if stream.pending:
            self._flush_pending(frame.stream_id, stream)

    def _on_fin(self, frame: Frame) -> None:
        if frame.payload:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "FIN with a payload")
        stream = self._known_stream(frame)
        if stream is None:
            return
        if stream.state not in _CAN_RECEIVE:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"second FIN on stream {frame.stream_id}")
        self._advance(frame.stream_id, stream, _Fin.RECEIVE)
        self._events.append(ev.StreamEnded(frame.stream_id))

    def _on_rst(self, frame: Frame) -> None:
        code, reason = decode_code(frame)
        if self._known_stream(frame) is None:
            return
        del self._streams[frame.stream_id]
        self._events.append(ev.StreamReset(frame.stream_id, code, reason))

    def _on_open(self, frame: Frame) -> None:
        message = decode_json(frame)
        tunnel_id = field_of(message, "tunnel", str, frame.type)
        peer = field_of(message, "peer", str, frame.type)
        if frame.stream_id <= self._last_stream_id:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"OPEN reuses stream id {frame.stream_id}")
        self._last_stream_id = frame.stream_id
        if self.state is SessionState.CLOSING:
            self._out.append(encode_code(FrameType.RST, frame.stream_id, ErrorCode.REFUSED, "session closing"))
            return
        self._streams[frame.stream_id] = _Stream(self.peer_window, self.window)
        self._events.append(ev.StreamOpened(frame.stream_id, tunnel_id, peer))

    def _known_stream(self, frame: Frame) -> _Stream | None:
        """The stream a frame is for; None if it existed once; error if it never did."""
        stream = self._streams.get(frame.stream_id)
        if stream is None and frame.stream_id > self._last_stream_id:
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"{frame.type.name} on unopened stream {frame.stream_id}"
            )
        return stream

    def _on_hello(self, frame: Frame) -> None:
        hello = decode_hello(frame)
        self.version = hello.version
        self.peer_window = hello.window
        self.send_payload = min(self.max_payload, hello.max_frame)
        self.state = SessionState.HELLO_RECEIVED
        self._events.append(ev.HelloReceived(hello.version, hello.token, hello.window, hello.agent))

    def _on_welcome(self, frame: Frame) -> None:
        message = decode_json(frame)
        version = field_of(message, "version", int, frame.type)
        if version not in SUPPORTED_VERSIONS:
            raise RemoteProtocolError(
                ErrorCode.UNSUPPORTED_VERSION, f"relay chose unsupported protocol version {version}"
            )
        session_id = field_of(message, "session", str, frame.type)
        self.version = version
        self.peer_window = _peer_window_from(message, frame.type)
        self.send_payload = min(self.max_payload, _peer_max_frame(message, frame.type))
        self.state = SessionState.OPEN
        self._events.append(ev.Welcomed(version, session_id, self.peer_window))

    def _on_bind(self, frame: Frame) -> None:
        self._events.append(decode_bind(frame))

    def _on_bound(self, frame: Frame) -> None:
        message = decode_json(frame)
        request_id = field_of(message, "request", int, frame.type)
        self._events.append(ev.Bound(request_id, TunnelAddress.from_message(message)))

    def _on_bind_failed(self, frame: Frame) -> None:
        message = decode_json(frame)
        request_id = field_of(message, "request", int, frame.type)
        code = BindFailure.parse(field_of(message, "code", str, frame.type))
        text = field_of(message, "message", str, frame.type)[:MAX_TEXT_LENGTH]
        self._events.append(ev.BindFailed(request_id, code, text))

    def _on_unbind(self, frame: Frame) -> None:
        self._events.append(decode_unbind(frame))

    def _on_unbound(self, frame: Frame) -> None:
        message = decode_json(frame)
        reason = optional_of(message, "reason", str, frame.type) or "closed"
        tunnel_id = text_of(message, "id", frame.type, MAX_ID_LENGTH)
        self._events.append(ev.Unbound(tunnel_id, reason[:MAX_TEXT_LENGTH]))

    def _on_ping(self, frame: Frame) -> None:
        if len(frame.payload) != PING_PAYLOAD.size:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "PING payload is not 8 bytes")
        self._out.append(encode(FrameType.PONG, 0, bytes(frame.payload)))

    def _on_pong(self, frame: Frame) -> None:
        if len(frame.payload) != PING_PAYLOAD.size:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "PONG payload is not 8 bytes")
        self._events.append(ev.PongReceived(PING_PAYLOAD.unpack(frame.payload)[0]))

    def _on_goaway(self, frame: Frame) -> None:
        if len(frame.payload) < GOAWAY_PAYLOAD.size:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY payload is too short")
        code, reason = decode_code(frame)
        self._events.append(ev.GoAwayReceived(code, reason))
        if code in _GRACEFUL and self.state is SessionState.OPEN:
            self.state = SessionState.CLOSING
        else:
            self._close(code)


# ------------------------------------------------------------- control payloads
# (module functions: the native relay hands these payloads up and decodes them here too)


@dataclass(frozen=True, slots=True)
class HelloMessage:
    """An agent's HELLO, checked: the version both speak, its token, window and largest frame."""

    version: int
    token: str  # a secret: never logged
    window: int
    max_frame: int
    agent: str  # peer text, cut at MAX_TEXT_LENGTH


def _encodable(text: str) -> bool:
    """False for a string JSON may carry but UTF-8 cannot (a lone surrogate, ``"\\ud800"``)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def decode_hello(frame: Frame) -> HelloMessage:
    """Check a HELLO; :class:`RemoteProtocolError` if it is malformed or shares no version."""
    message = decode_json(frame)
    versions = field_of(message, "versions", list, frame.type)
    token = field_of(message, "token", str, frame.type)
    if len(token) > MAX_TOKEN_LENGTH or not _encodable(token):
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "HELLO token is not a text of at most 4096 characters")
    window = _peer_window_from(message, frame.type)
    agent = message.get("agent")
    common = [v for v in SUPPORTED_VERSIONS if v in versions]
    if not common:
        offered = [v for v in versions if isinstance(v, int)][:8]
        raise RemoteProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"agent speaks protocol versions {offered}, this relay {list(SUPPORTED_VERSIONS)}; upgrade burrow",
        )
    max_frame = _peer_max_frame(message, frame.type)
    return HelloMessage(max(common), token, window, max_frame, str(agent)[:MAX_TEXT_LENGTH])


def decode_bind(frame: Frame) -> ev.BindRequested:
    """Check a BIND."""
    message = decode_json(frame)
    request_id = field_of(message, "request", int, frame.type)
    port = field_of(message, "port", int, frame.type)
    unencrypted = field_of(message, "unencrypted", bool, frame.type)
    h2 = field_of(message, "h2", bool, frame.type)
    ticket = optional_of(message, "ticket", str, frame.type)
    if ticket is not None and len(ticket) > MAX_TICKET_LENGTH:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"BIND ticket is over {MAX_TICKET_LENGTH} characters")
    return ev.BindRequested(request_id, port, unencrypted, h2, ticket, Access.from_message(message))


def decode_unbind(frame: Frame) -> ev.UnbindRequested:
    """Check an UNBIND."""
    return ev.UnbindRequested(text_of(decode_json(frame), "id", frame.type, MAX_ID_LENGTH))


def _peer_max_frame(message: dict[str, Any], frame_type: FrameType) -> int:
    """The peer's largest acceptable DATA payload (absent: the protocol's maximum)."""
    if "max_frame" not in message:
        return MAX_FRAME_PAYLOAD
    value: int = field_of(message, "max_frame", int, frame_type)
    if not MIN_FRAME_PAYLOAD <= value <= MAX_FRAME_PAYLOAD:
        raise RemoteProtocolError(
            ErrorCode.PROTOCOL_ERROR, f"max_frame {value} outside {MIN_FRAME_PAYLOAD}..{MAX_FRAME_PAYLOAD}"
        )
    return value


def _peer_window_from(message: dict[str, Any], frame_type: FrameType) -> int:
    window: int = field_of(message, "window", int, frame_type)
    if not MIN_WINDOW <= window <= MAX_WINDOW:
        raise RemoteProtocolError(ErrorCode.FLOW_CONTROL, f"window {window} outside {MIN_WINDOW}..{MAX_WINDOW}")
    return window


_DATA_HEADER = HEADER.pack
_unpack_header = HEADER.unpack_from
# enum members looked up once: a class attribute lookup on an Enum is slow (3.11)
_DATA = int(FrameType.DATA)
_CLOSED = SessionState.CLOSED
#: the session states in which both roles accept DATA
_DATA_STATES = frozenset({SessionState.OPEN, SessionState.CLOSING})

_HANDLERS = {
    FrameType.HELLO: SessionProtocol._on_hello,
    FrameType.WELCOME: SessionProtocol._on_welcome,
    FrameType.BIND: SessionProtocol._on_bind,
    FrameType.BOUND: SessionProtocol._on_bound,
    FrameType.BIND_FAILED: SessionProtocol._on_bind_failed,
    FrameType.UNBIND: SessionProtocol._on_unbind,
    FrameType.UNBOUND: SessionProtocol._on_unbound,
    FrameType.PING: SessionProtocol._on_ping,
    FrameType.PONG: SessionProtocol._on_pong,
    FrameType.GOAWAY: SessionProtocol._on_goaway,
    FrameType.OPEN: SessionProtocol._on_open,
    FrameType.WINDOW: SessionProtocol._on_window,
    FrameType.FIN: SessionProtocol._on_fin,
    FrameType.RST: SessionProtocol._on_rst,
}
