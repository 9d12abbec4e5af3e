"""The asyncio side of a session: a thin adapter around :class:`SessionProtocol`.

:class:`SessionConnection` is the ``asyncio.BufferedProtocol`` of the agent–relay
connection; :class:`StreamEndpoint` is the ``asyncio.BufferedProtocol`` of one TCP
connection at either end of a stream (a public connection at the relay, a
connection to the local service at the agent). They are peered the way
asyncssh peers its forwarders: the endpoint's reads become DATA frames and
pause when the stream's credit runs out; DATA frames become writes to the
endpoint, and credit is granted back only once those writes have left the
process (the transport is not paused), so a slow reader holds at most one
window of data here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import cast

from .errors import RemoteProtocolError
from .logs import LogLimiter
from .protocol import events as ev
from .protocol.buffer import MAX_READ, ReceiveBuffer
from .protocol.frames import ErrorCode
from .protocol.session import Role, SessionProtocol, SessionState

logger = logging.getLogger(__name__)
#: a peer may break the protocol as often as it can connect: those lines are rate-limited
_protocol_errors = LogLimiter(logger)

#: Silence after which the link is declared dead (no FIN or RST needed). Each
#: side PINGs every quarter of it, so a dead link is noticed within 1.25x: 10 s.
HEARTBEAT_TIMEOUT = 8.0
HEARTBEATS_PER_TIMEOUT = 4


#: The least room a stream's read gets, even with no credit left: what a stream whose
#: reader stopped may hold here beyond its credit.
MIN_READ = 4096

#: Queued chunks smaller than this in all are joined into one write (one TLS record).
JOIN_BELOW = 16 * 1024

#: Bytes a session may have queued for a peer that does not read, beyond one read
#: (MAX_READ) per open stream, before the link is closed. DATA stays within the
#: per-stream part: endpoints stop reading once the link is congested, and a stream
#: out of credit holds at most one read, which a burst of WINDOW frames may release
#: at once. What can pass it is a peer that sends without reading (every PING asks
#: for a PONG, every UNBIND for an UNBOUND).
MAX_UNSENT = 32 * 1024 * 1024

#: DATA payloads smaller than this are copied before a transport gets them (TLS,
#: or a socket that is behind), rather than handed over as views that could keep
#: a whole read buffer alive. An idle plain TCP socket gets any size at once.
COPY_BELOW = 16 * 1024

#: (an enum member is a slow attribute lookup on Python 3.11: ~0.2 µs, on every DATA)
_SESSION_CLOSED = SessionState.CLOSED
_SESSION_HANDSHAKE = SessionState.HANDSHAKE

#: struct linger {on, 0 seconds}: close() sends RST instead of FIN.
LINGER_RESET = struct.pack("ii", 1, 0)


def reset_transport(transport: asyncio.BaseTransport | None) -> None:
    """Close with a TCP RST (SO_LINGER 0), so the peer cannot take it for a clean end."""
    if transport is None or transport.is_closing():
        if transport is not None:
            transport.abort()  # type: ignore[attr-defined]
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except OSError:
            pass
    transport.abort()  # type: ignore[attr-defined]


_per_thread = threading.local()


def stream_reads() -> ReceiveBuffer:
    """The read buffer of this thread's event loop, lent to one endpoint's read at a time.

    uvloop and asyncio call ``get_buffer`` and then ``buffer_updated`` for the
    same read with nothing in between, and each read leaves as DATA before the
    next starts, so one buffer per loop serves every connection of every session.
    """
    try:
        return _per_thread.stream_reads  # type: ignore[no-any-return]
    except AttributeError:
        _per_thread.stream_reads = ReceiveBuffer()
        return _per_thread.stream_reads  # type: ignore[no-any-return]


@dataclass
class TrafficStats:
    """Counters a tunnel keeps: open connections and bytes each way."""

    open_connections: int = 0
    total_connections: int = 0
    bytes_in: int = 0  # from public clients towards the service
    bytes_out: int = 0  # from the service towards public clients


class StreamEndpoint(asyncio.BufferedProtocol):
    """One TCP connection peered with one stream of a :class:`SessionConnection`.

    Reads land in a buffer shared by every endpoint of this thread's event
    loop and go out as DATA at once (a read is consumed before the next one
    starts), so 10,000 idle connections cost no read buffer each.

    ``inbound`` says which way this endpoint's reads travel in the stats:
    True for the relay's public connections (bytes_in), False for the agent's
    connections to the local service (bytes_out).
    """

    def __init__(self, session: SessionConnection, stream_id: int, stats: TrafficStats, inbound: bool) -> None:
        self.session = session
        self.stream_id = stream_id
        self.stats = stats
        self.inbound = inbound
        self.transport: asyncio.Transport | None = None
        self.credit_blocked = False  # the stream has no credit: stop reading
        self.writing_paused = False  # our transport's buffer is full: stop granting credit
        self.held = 0  # bytes written while paused, granted back on resume
        self.sent_fin = False
        self.got_fin = False
        self.done = False
        self._reads = stream_reads()  # the buffer of the thread that reads: set again per read
        self._fd = -1  # a plain TCP transport's socket, written to directly by deliver()
        stats.open_connections += 1
        stats.total_connections += 1
        session.endpoints[stream_id] = self

    # ----------------------------------------------------------- transport side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            self._fd = sock.fileno()  # TLS encrypts what it is given at once: no view kept
        self.update_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        # ask for the most, not for the transport's hint (uvloop: 64 KiB): a read is
        # a frame, and fewer, bigger frames cost less Python per byte; but no more than
        # the stream's credit, so that what the peer cannot take yet stays in the socket
        # (a few KiB at most is held here for a stream whose reader stopped)
        self._reads = stream_reads()
        size = self.session.proto.send_room(self.stream_id)
        size = MIN_READ if size < MIN_READ else size if size < MAX_READ else MAX_READ
        return self._reads.room(size)[:size]

    def buffer_updated(self, nbytes: int) -> None:
        data = self._reads.take(nbytes)
        if self.done or self.sent_fin:
            return
        if self.inbound:
            self.stats.bytes_in += len(data)
        else:
            self.stats.bytes_out += len(data)
        if not self.session.send_data(self.stream_id, data):
            self.credit_blocked = True
            self.update_reading()

    def read_now(self) -> None:
        """Take at once what a plain TCP peer has already sent, without waiting for the loop to poll.

        A client that speaks first (HTTP, most databases) sends right after
        connecting. Read here, at accept, its first bytes leave with the
        stream's OPEN in one record, and the agent has them when its dial to
        the service completes, instead of a poll of the relay's loop later
        (which, on a busy machine, may come only after the agent has run).
        """
        if self._fd < 0 or self.transport is None or self.transport.is_closing():
            return
        if self.credit_blocked or self.session.writing_paused:
            return
        buffer = self.get_buffer(MAX_READ)
        try:
            size = os.readv(self._fd, [buffer])
        except (BlockingIOError, InterruptedError):
            return  # nothing yet: the transport reads it when it comes
        except OSError as exc:  # reset already: what the transport would have reported
            self.abort(ErrorCode.CANCELLED, f"connection lost ({exc.strerror or exc})")
            return
        if size:  # (0: an immediate EOF, which the transport's own read meets again)
            self.buffer_updated(size)
            if self.credit_blocked:  # (a window below one read) pause again once uvloop has
                asyncio.get_running_loop().call_soon(self.update_reading)  # started reading

    def eof_received(self) -> bool:
        if self.done:
            return False
        if self.transport is not None and not self.transport.can_write_eof() and not self.got_fin:
            # TLS: asyncio answers the client's close_notify by closing the whole
            # connection, so the reply still to come would be cut short. Reset
            # rather than let the client take a truncated reply for a whole one.
            self.abort(ErrorCode.CANCELLED, "client closed its TLS write side")
            return False
        self.sent_fin = True
        self.session.send_fin(self.stream_id)
        self._close_if_finished()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            # a peer that resets or vanishes mid-stream: tell the other end the same
            finished = self.sent_fin and self.got_fin
            self._finish()
            if not finished:
                self.session.send_rst(self.stream_id, ErrorCode.CANCELLED, "connection lost")

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.held:
            held, self.held = self.held, 0
            self.session.consumed(self.stream_id, held)

    # -------------------------------------------------------------- stream side

    def deliver(self, data: bytes | bytearray | memoryview) -> None:
        """DATA from the stream: write it; grant credit unless the transport is full.

        ``data`` is a view of the session's read buffer; a transport that
        cannot send it at once would keep the view, and with it the whole
        buffer (up to 1 MiB) for as long as its reader stalls. So for an idle
        plain TCP transport the payload goes to its socket at once, and only
        what the socket does not take is copied into the transport; for TLS,
        a small payload, or one for a transport that is already behind, is
        copied. A slow reader then holds its own bytes, never a read buffer.
        """
        transport = self.transport
        assert transport is not None
        if self.inbound:
            self.stats.bytes_out += len(data)
        else:
            self.stats.bytes_in += len(data)
        idle = not self.writing_paused and not transport.get_write_buffer_size()
        if self._fd >= 0 and idle and not transport.is_closing():  # (closing: the descriptor may be reused)
            # the transport holds nothing, so writing its socket first keeps the order
            try:
                sent = os.write(self._fd, data)
            except OSError:  # full, or broken: the transport meets the error and reports it
                sent = 0
            if sent < len(data):
                transport.write(bytes(data[sent:]))
        elif len(data) < COPY_BELOW or not idle:
            transport.write(bytes(data))
        else:
            transport.write(data)
        if self.writing_paused:
            self.held += len(data)
        else:
            self.session.proto.consumed(self.stream_id, len(data))

    def peer_fin(self) -> None:
        """FIN from the stream: half-close our transport (after what is buffered)."""
        assert self.transport is not None
        self.got_fin = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._close_if_finished()
        else:
            # TLS cannot half-close in asyncio: close_notify after the buffered data,
            # and we read no more, so our direction of the stream ends too
            if not self.sent_fin:
                self.sent_fin = True
                self.session.send_fin(self.stream_id)
            self._finish()
            self.transport.close()

    def peer_reset(self, code: int = ErrorCode.CANCELLED) -> None:
        """RST from the stream: reset our connection too.

        A stream refused before anything came back (nothing listens on the
        local port) is closed cleanly instead: there is nothing to truncate.
        """
        self._finish()
        if code == ErrorCode.REFUSED and self.transport is not None and not self.got_fin:
            self.transport.close()
        else:
            reset_transport(self.transport)

    def abort(self, code: ErrorCode, reason: str) -> None:
        """Reset both our connection and the stream."""
        if not self.done:
            self._finish()
            self.session.send_rst(self.stream_id, code, reason)
        reset_transport(self.transport)

    def update_reading(self) -> None:
        """Read while the stream has credit and the session link is not congested."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.credit_blocked:
            transport.pause_reading()
        elif self.session.writing_paused:
            transport.pause_reading()
            self.session.held_back[self.stream_id] = self  # resumed with the link
        else:
            transport.resume_reading()

    def writable(self) -> None:
        """The stream has credit again."""
        self.credit_blocked = False
        self.update_reading()

    def _close_if_finished(self) -> None:
        if self.sent_fin and self.got_fin and self.transport is not None:
            self._finish()
            self.transport.close()

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.stats.open_connections -= 1
            self.session.endpoints.pop(self.stream_id, None)


class SessionConnection(asyncio.BufferedProtocol):
    """The asyncio adapter of one agent–relay session; subclassed per role.

    The link is read into a :class:`ReceiveBuffer` (TLS decrypts straight
    into it) and frames are parsed in place: DATA payloads reach the
    endpoints' transports as slices of that buffer, with no copy.

    Subclasses handle the control events in :meth:`handle_event` and learn the
    end of the session in :meth:`session_closed`.
    """

    def __init__(self, proto: SessionProtocol, name: str = "", heartbeat_timeout: float = HEARTBEAT_TIMEOUT) -> None:
        self.proto = proto
        self.heartbeat_timeout = heartbeat_timeout
        self.name = name  # for logs: the session id, or the relay address
        self.transport: asyncio.Transport | None = None
        self.endpoints: dict[int, StreamEndpoint] = {}
        self.writing_paused = False
        self.held_back: dict[int, StreamEndpoint] = {}  # endpoints paused while the link is full
        self._received = ReceiveBuffer()
        self._resume_turn = 0
        self.last_received = time.monotonic()
        self.rtt: float | None = None
        self._heartbeat: asyncio.TimerHandle | None = None
        self._beat_due = 0.0

    # ----------------------------------------------------------- asyncio side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._schedule_heartbeat()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._received.room(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_received = time.monotonic()
        received = self._received
        received.filled(nbytes)
        try:
            received.consume(self.proto.receive_view(received.unread()))
        except RemoteProtocolError as exc:
            # the session is CLOSED: what came before the error in this read no longer
            # matters (connection_lost resets every stream); send GOAWAY and hang up
            _protocol_errors.log(
                "protocol", logging.WARNING, "session %s: protocol error from peer: %s", self.name, exc
            )
            self.proto.events_received()
            self.flush()
            # the streams end now, not when the link's TLS close is done (up to
            # TLS_SHUTDOWN_TIMEOUT): their clients must not wait on a dead session
            self._reset_streams()
            if self.transport is not None:
                self.transport.close()
            return
        self._handle_events()
        self.flush()

    def eof_received(self) -> bool:
        return False  # the peer closed the session link: close ours

    def connection_lost(self, exc: Exception | None) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()

        self.proto.connection_lost()
        self._reset_streams()
        self.session_closed(exc)

    def _reset_streams(self) -> None:
        """Reset the connection of every stream (the session is over)."""
        for endpoint in list(self.endpoints.values()):
            endpoint.peer_reset()
        self.endpoints.clear()

    def pause_writing(self) -> None:
        self.writing_paused = True
        for endpoint in self.endpoints.values():
            if not endpoint.credit_blocked:  # (those wait for credit, not for the link)
                endpoint.update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        # only the endpoints the link held back: streams waiting for credit (a client
        # that stopped reading, by the hundred) cost nothing here
        endpoints = list(self.held_back.values())
        self.held_back.clear()
        # resume in a rotating order: the first streams resumed read first and can
        # fill the link again before the last ones get a turn, so no stream may
        # always come first (32 parallel streams starved one to 0.04x the median)
        if endpoints:
            self._resume_turn = (self._resume_turn + 1) % len(endpoints)
            for endpoint in endpoints[self._resume_turn :] + endpoints[: self._resume_turn]:
                endpoint.update_reading()

    # ------------------------------------------------------------- to the peer

    def flush(self) -> None:
        """Write whatever the protocol queued.

        The TLS transport makes a record of every chunk it is handed, so small
        chunks (a frame header and a short payload) are joined into one write:
        one record, one encryption, one syscall. Big payloads are handed over
        as they are (joining would copy them for the sake of one header).
        """
        out = self.proto.data_to_send()
        transport = self.transport
        if not out or transport is None or transport.is_closing():
            return
        if len(out) == 1:
            transport.write(out[0])
        elif sum(map(len, out)) <= JOIN_BELOW:
            transport.write(b"".join(out))
        else:
            transport.writelines(out)
        if self.writing_paused and transport.get_write_buffer_size() > MAX_UNSENT + len(self.endpoints) * MAX_READ:
            # a peer that never reads (while it sends PINGs, say) would grow this without bound
            unsent = transport.get_write_buffer_size()
            logger.warning("session %s: peer reads nothing (%d bytes unsent); closing the link", self.name, unsent)
            self._reset_streams()
            transport.abort()

    def send_data(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Send on a stream; False when the stream ran out of credit."""
        proto = self.proto
        if proto.state is _SESSION_CLOSED:
            return True
        if len(data) <= JOIN_BELOW:
            record = proto.data_record(stream_id, data)
            if record is not None:  # (one TLS record, as flush would have made it)
                transport = self.transport
                if transport is not None and not transport.is_closing():
                    transport.write(record)
                return True
        sent_all = proto.send_data(stream_id, data)
        self.flush()
        return sent_all

    def send_fin(self, stream_id: int) -> None:
        """Half-close a stream."""
        if self.proto.state is not _SESSION_CLOSED:
            self.proto.send_fin(stream_id)
            self.flush()

    def send_rst(self, stream_id: int, code: ErrorCode, reason: str) -> None:
        """Reset a stream."""
        self.proto.send_rst(stream_id, code, reason)
        self.flush()

    def consumed(self, stream_id: int, size: int) -> None:
        """Received bytes left the process; may grant credit."""
        self.proto.consumed(stream_id, size)
        self.flush()

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """End the session now (GOAWAY, then close the link)."""
        self.proto.goaway(code, reason)
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------- from the peer

    def _handle_events(self) -> None:
        for event in self.proto.events_received():
            if isinstance(event, ev.DataReceived):
                endpoint = self.endpoints.get(event.stream_id)
                if endpoint is not None:
                    endpoint.deliver(event.data)
                else:
                    # the endpoint is gone (its connection just closed): the bytes
                    # have nowhere to go, but the credit must still come back
                    self.proto.consumed(event.stream_id, len(event.data))
            elif isinstance(event, ev.StreamWritable):
                endpoint = self.endpoints.get(event.stream_id)
                if endpoint is not None:
                    endpoint.writable()
            elif isinstance(event, ev.StreamEnded):
                endpoint = self.endpoints.get(event.stream_id)
                if endpoint is not None:
                    endpoint.peer_fin()
            elif isinstance(event, ev.StreamReset):
                endpoint = self.endpoints.get(event.stream_id)
                if endpoint is not None:
                    endpoint.peer_reset(event.code)
            elif isinstance(event, ev.PongReceived):
                self.rtt = time.monotonic() - event.opaque / 1e9
            else:
                self.handle_event(event)

    def handle_event(self, event: ev.Event) -> None:
        """Control events, per role; the base class has none to handle."""
        logger.debug("session %s: ignoring %s", self.name, type(event).__name__)

    def session_closed(self, exc: Exception | None) -> None:
        """The link is gone; every stream has been reset."""

    # -------------------------------------------------------------- heartbeats

    def _schedule_heartbeat(self) -> None:
        interval = self.heartbeat_timeout / HEARTBEATS_PER_TIMEOUT
        self._beat_due = time.monotonic() + interval
        self._heartbeat = asyncio.get_running_loop().call_later(interval, self._beat)

    def _beat(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        now = time.monotonic()
        if now - self._beat_due > self.heartbeat_timeout / HEARTBEATS_PER_TIMEOUT:
            # this beat is late: our own loop was stalled (a C call holding the GIL,
            # a suspended process). The peer's pings may be sitting unread (uvloop
            # runs due timers before it polls the sockets), or were never sent if the
            # peer shares this process: silence counts from when we can hear again
            self.last_received = max(self.last_received, now)
        silent = now - self.last_received
        if silent > self.heartbeat_timeout:
            logger.warning("session %s: no answer for %.0f s; closing the link", self.name, silent)
            self.proto.goaway(ErrorCode.TIMEOUT, "heartbeat timeout")
            self.flush()
            self.transport.abort()
            return
        if self.proto.state is not _SESSION_HANDSHAKE or self.proto.role is not Role.RELAY:
            # (a relay does not PING an agent that has not said HELLO: its HELLO deadline
            # covers that time, and a PONG before HELLO is not in the protocol)
            self.proto.ping(int(time.monotonic() * 1e9))
            self.flush()
        self._schedule_heartbeat()
