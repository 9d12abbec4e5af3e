"""A read buffer for :meth:`SessionProtocol.receive_view`: reads land in place, views stay valid.

The session link is the data path's busiest reader. Reading into a fresh
``bytes`` per read costs an allocation and, for every frame that straddles
two reads, a copy into a reassembly buffer. :class:`ReceiveBuffer` instead
lends the transport room at the end of one ``bytearray``
(``asyncio.BufferedProtocol.get_buffer``) and hands the unread bytes to the
protocol as a view; DATA payloads are slices of it, written to their
destination without a copy.

One rule keeps the slices valid: a byte that a view can still see is never
written over. Whether a view is alive is asked of the bytearray itself: it
refuses to change size while any buffer export (any memoryview, a slice of a
slice included) is alive. Reads only ever append. When the room runs out, the start of a
frame still unread moves to the front of the same buffer if nothing views it
any more, and to a new buffer otherwise (the old one lives on while a slice
of it is queued in some transport, then is freed).
"""

from __future__ import annotations

from collections.abc import Callable

#: The room lent for one read when the transport gives no hint (plain sockets).
DEFAULT_READ = 64 * 1024

#: The most room lent for one read: a TLS transport asks for what it holds
#: encrypted, which can be more.
MAX_READ = 256 * 1024

#: Buffers grow (doubling) to this size when frames outgrow them: the start of
#: a frame is then moved about once per MAX_BUFFER read. (DATA on an open stream,
#: or on one reset here, does not wait here whole: the session hands its payload
#: over, or drops it, as it comes. What waits is a cut header, a control frame, or
#: DATA the state tables must see whole to refuse it.) Two per busy session
#: (the current one and a spare).
MAX_BUFFER = 1024 * 1024

#: A new buffer's size: a session link that carries no bulk stays this small
#: (a bytearray is zero-filled, so all of it is resident from the start).
INITIAL_SIZE = 16 * 1024

#: After this many reads in a row that wanted little, a grown buffer goes back
#: to DEFAULT_READ bytes and the spare is dropped: a session that once carried
#: bulk does not keep 2 MiB for the rest of its life.
SHRINK_AFTER = 64


class ReceiveBuffer:
    """Room to read into, and the bytes read but not yet consumed."""

    def __init__(self, size: int = INITIAL_SIZE) -> None:
        self._buffer = bytearray(size)
        self._start = 0  # the first byte not consumed
        self._end = 0  # the end of what was read
        self._spare: bytearray | None = None  # the previous buffer, for when its views are gone
        self._small_reads = 0  # reads in a row that wanted at most DEFAULT_READ

    def room(self, hint: int = -1) -> memoryview:
        """Writable room after the bytes read: about ``hint`` bytes, at least one."""
        want = DEFAULT_READ if hint <= 0 else hint if hint < MAX_READ else MAX_READ  # (min() is slower)
        if self._start == self._end and self._end and not _viewed(self._buffer):
            self._start = self._end = 0  # all consumed, nothing views it: start over
            if want > DEFAULT_READ or len(self._buffer) <= DEFAULT_READ:
                self._small_reads = 0
            else:
                self._small_reads += 1
                if self._small_reads >= SHRINK_AFTER:
                    self._buffer = bytearray(DEFAULT_READ)
                    self._spare = None
                    self._small_reads = 0
        if len(self._buffer) - self._end < want:
            self._make_room(want)
        return memoryview(self._buffer)[self._end :]

    def filled(self, size: int) -> None:
        """``size`` bytes were read into the room."""
        self._end += size

    def unread(self) -> memoryview:
        """The bytes read and not consumed (valid until :meth:`consume` moves past them)."""
        return memoryview(self._buffer)[self._start : self._end]

    def take(self, size: int) -> memoryview:
        """``size`` bytes were read into the room: all that is unread, consumed at once."""
        start = self._start
        self._start = self._end = end = self._end + size
        return memoryview(self._buffer)[start:end]

    def consume(self, size: int) -> None:
        """The first ``size`` unread bytes are handled (their views may still live)."""
        self._start += size

    def feed(self, data: bytes | bytearray | memoryview, take: Callable[[memoryview], int]) -> None:
        """Copy ``data`` in, and after each part hand the unread bytes to ``take``, which returns how many it used.

        For callers given bytes rather than a transport to lend room to.
        """
        rest = memoryview(data).cast("B")
        while True:
            room = self.room(len(rest))
            size = min(len(room), len(rest))
            room[:size] = rest[:size]
            del room  # a live view would keep this buffer from being reused
            self.filled(size)
            self.consume(take(self.unread()))
            rest = rest[size:]
            if not rest:
                return

    @property
    def pending(self) -> int:
        """Bytes read and not consumed."""
        return self._end - self._start

    @property
    def capacity(self) -> int:
        return len(self._buffer)

    def _make_room(self, want: int) -> None:
        """Move the unread bytes to the front of a buffer with ``want`` bytes of room after them."""
        pending = self._end - self._start
        needed = pending + want
        if needed <= len(self._buffer) and not _viewed(self._buffer):
            self._buffer[:pending] = self._buffer[self._start : self._end]
        else:
            old = self._buffer
            if self._spare is not None and needed <= len(self._spare) and not _viewed(self._spare):
                self._buffer, self._spare = self._spare, None
            else:
                # grow geometrically: a frame bigger than the reads would otherwise be
                # copied once per read until it is whole
                size = len(old) if needed <= len(old) else max(needed, min(2 * len(old), MAX_BUFFER))
                self._buffer = bytearray(size)
            self._buffer[:pending] = old[self._start : self._end]
            if self._spare is None or len(old) >= len(self._spare):
                self._spare = old  # reused once its views are gone (bulk: by the next turn)
        self._start, self._end = 0, pending


def _viewed(buffer: bytearray) -> bool:
    """Whether a view of ``buffer`` is alive: a bytearray will not resize while one is."""
    try:
        buffer.append(0)
    except BufferError:
        return True
    del buffer[-1]  # (no shrink: the spare byte stays allocated, so this costs no copy next time)
    return False
