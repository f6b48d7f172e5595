"""The copy channel of ``scopewatch wrap``: its relay hands every chunk to the observer process.

The wrapper process only relays bytes. Before it forwards a chunk it read (from the client or
from the server), it writes a *frame* with a copy of that chunk to a pipe; the observer process
at the other end parses, redacts, stamps and publishes (:mod:`collectors.observer_process`).

Frame format (little-endian)::

    kind u8 | length u32 | wall_ns i64 | mono_ns i64 | body (length bytes)

kinds: ``1`` bytes the client sent (body: the chunk), ``2`` bytes the server sent, ``3`` a gap
(body: :data:`GAP_BODY`, the bytes of one direction the wrapper could not hand over), ``4`` the
end of the session (the server exited and its output was relayed; empty body). ``wall_ns`` /
``mono_ns`` are when the wrapper read the chunk (``time.time_ns`` / ``time.monotonic_ns``, the
latter is system-wide on Linux, so durations are measured in the wrapper, not when the observer
gets to them).

Writing never waits on the observer's work, only on the pipe: a frame goes into the pipe's
buffer (:data:`PIPE_BYTES`, 1 MiB where the system allows) with one non-blocking ``write``. When
the buffer is full -- the observer is behind, e.g. because its publisher blocks on a full spool
-- the full-spool policy of :class:`~collectors.spool.SpoolConfig` applies: ``block`` waits for
room (at most ``block_timeout``, None: as long as it takes), ``fail`` waits at most
:data:`FAIL_GRACE`. A chunk that could not be handed over in that time is still relayed, but
recorded as lost: the next frame of its direction is preceded by a gap frame, from which the
observer writes a loss record, and the shared :class:`DropCounters` hold the same numbers, so a
drop is accounted for even if the wrapper is killed before it could send the gap frame. A frame
whose first byte was written is always completed (the observer keeps reading), so frames are
never torn by the writer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = [
    "C2S",
    "DIRECTION_NAMES",
    "END",
    "FAIL_GRACE",
    "GAP",
    "GAP_BODY",
    "HEAD",
    "PIPE_BYTES",
    "S2C",
    "DropCounters",
    "Frame",
    "FrameReader",
    "Tap",
    "lost_messages",
    "set_pipe_size",
]

HEAD = struct.Struct("<BIqq")
GAP_BODY = struct.Struct("<BQQB")  # direction, bytes, newlines, the dropped bytes ended with a newline
C2S = 1
S2C = 2
GAP = 3
END = 4
DIRECTION_NAMES = {C2S: "client to server", S2C: "server to client"}
PIPE_BYTES = 1 << 20
FAIL_GRACE = 1.0
"""``on_full="fail"``: how long the relay waits for room in the pipe before it records a loss."""
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_MAX_FRAME = 1 << 31


class Frame(NamedTuple):
    """One frame read from the copy pipe (immutable; a tuple: built for every chunk relayed)."""

    kind: int
    wall_ns: int
    mono_ns: int
    body: bytes


def lost_messages(newlines: int, ends_with_newline: bool) -> int:
    """Messages (newline-terminated lines) touched by a dropped stretch of bytes.

    Every message that ends inside the stretch, plus the one it cuts off at its end.
    """
    return newlines + (0 if ends_with_newline else 1)


def set_pipe_size(fd: int, size: int = PIPE_BYTES) -> int:
    """Grow a pipe's buffer to ``size`` (or as far as the system allows); its size."""
    for want in (size, size // 2, size // 4):
        with contextlib.suppress(OSError):
            return int(fcntl.fcntl(fd, _F_SETPIPE_SZ, want))
    try:
        return int(fcntl.fcntl(fd, _F_GETPIPE_SZ))
    except OSError:
        return 65536


class DropCounters:
    """What the relay could not hand to the observer, in memory both processes share.

    Created before the observer process is forked (an anonymous shared mapping), written only by
    the wrapper, read by the observer once the wrapper is gone: the last word on what was lost,
    whether or not the wrapper lived to send its last gap frame. Per direction: newlines and
    bytes dropped so far, and whether the last dropped chunk ended with a newline.
    """

    _LAYOUT = struct.Struct("<QQQQQQ")

    def __init__(self) -> None:
        # a memfd, so that the native relay (collectors.native_relay) can map the same counters
        self.fd = os.memfd_create("scopewatch-drops", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self._LAYOUT.size)
        self._map = mmap.mmap(self.fd, self._LAYOUT.size, flags=mmap.MAP_SHARED)

    def add(self, direction: int, chunk: bytes) -> None:
        values = list(self._LAYOUT.unpack_from(self._map, 0))
        i = 0 if direction == C2S else 3
        values[i] += chunk.count(b"\n")
        values[i + 1] += len(chunk)
        values[i + 2] = int(chunk.endswith(b"\n"))
        self._LAYOUT.pack_into(self._map, 0, *values)

    def get(self, direction: int) -> tuple[int, int, bool]:
        """``(newlines, bytes, ends_with_newline)`` dropped in ``direction`` so far."""
        values = self._LAYOUT.unpack_from(self._map, 0)
        i = 0 if direction == C2S else 3
        return values[i], values[i + 1], bool(values[i + 2])

    def close(self) -> None:
        self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class _Gap:
    """What one direction dropped since its last gap frame."""

    nbytes: int = 0
    newlines: int = 0
    ends_with_newline: bool = True

    def add(self, chunk: bytes) -> None:
        self.nbytes += len(chunk)
        self.newlines += chunk.count(b"\n")
        self.ends_with_newline = chunk.endswith(b"\n")

    def frame(self, direction: int) -> bytes:
        body = GAP_BODY.pack(direction, self.nbytes, self.newlines, self.ends_with_newline)
        return HEAD.pack(GAP, len(body), time.time_ns(), time.monotonic_ns()) + body


class Tap:
    """The wrapper's end of the copy pipe (thread-safe: both relay directions write to it).

    ``send`` costs one ``write`` when the pipe has room. Counters: ``waits`` (times the pipe was
    full), ``dropped_chunks`` (chunks relayed but not handed over), ``broken`` (the observer is gone).
    """

    def __init__(
        self,
        fd: int,
        *,
        on_full: Literal["block", "fail"] = "block",
        block_timeout: float | None = None,
        counters: DropCounters | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.fd = fd
        self.wake = wake
        os.set_blocking(fd, False)
        self.on_full = on_full
        self.block_timeout = block_timeout
        self.counters = counters
        self._lock = threading.Lock()
        self._gaps = {C2S: _Gap(), S2C: _Gap()}
        self.waits = 0
        self.dropped_chunks = 0
        self.broken = False
        self.closed = False
        self.gave_up = False  # the wrapper stopped replacing a dead observer

    def reopen(self, fd: int, counters: DropCounters | None) -> None:
        """Go on with a new observer's pipe; what was dropped meanwhile is reported to it first."""
        with self._lock:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            os.set_blocking(fd, False)
            self.fd = fd
            self.counters = counters
            self.broken = False

    def send(self, direction: int, chunk: bytes, wall_ns: int, mono_ns: int) -> bool:
        """Hand over a copy of ``chunk``; False: it is recorded as lost instead."""
        frame = HEAD.pack(direction, len(chunk), wall_ns, mono_ns) + chunk
        with self._lock:
            gap = self._gaps[direction]
            if gap.nbytes:
                frame = gap.frame(direction) + frame
            if not self.closed and self._write(frame, self._patience()):
                if gap.nbytes:
                    self._gaps[direction] = _Gap()
                return True
            self._drop(direction, chunk)
            return False

    def end(self, wall_ns: int, mono_ns: int, timeout: float | None) -> bool:
        """Send the outstanding gaps and the end-of-session frame, then close; False (nothing sent,
        still open) if the pipe had no room for ``timeout`` seconds (or a relay thread is still
        waiting for room that long)."""
        started = time.monotonic()
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            if self.closed:
                return False
            data = b"".join(g.frame(d) for d, g in self._gaps.items() if g.nbytes)
            data += HEAD.pack(END, 0, wall_ns, mono_ns)
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
            if not self._write(data, left) and not self.broken:
                return False
            self._gaps = {C2S: _Gap(), S2C: _Gap()}
            self._close()
            return True
        finally:
            self._lock.release()

    def close(self) -> None:
        """Close without an end frame (the observer treats the session as cut off)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def _patience(self) -> float | None:
        return FAIL_GRACE if self.on_full == "fail" else self.block_timeout

    def _drop(self, direction: int, chunk: bytes) -> None:
        self.dropped_chunks += 1
        self._gaps[direction].add(chunk)
        if self.counters is not None:
            self.counters.add(direction, chunk)

    def _write(self, data: bytes, patience: float | None) -> bool:
        """Write all of ``data``; False (nothing written) if the pipe stayed full for ``patience`` s."""
        if self.broken:
            return False
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            return self._broke(exc)
        if written == len(data):
            return True
        self.waits += 1
        if self.wake is not None:
            self.wake()  # the observer reads the pipe on a timer: tell it not to wait for that
        deadline = None if patience is None else time.monotonic() + patience
        view = memoryview(data)[written:]
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while view:
            if written == 0 and deadline is not None:  # nothing of this frame written yet: may give up
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                events = poller.poll(max(1, int(remaining * 1000)))
            else:  # a frame once started is finished: the observer keeps reading
                events = poller.poll(1000)
            if events and events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                return self._broke(OSError(errno.EPIPE, "the observer closed its end"))
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                continue
            except OSError as exc:
                return self._broke(exc)
            written += n
            view = view[n:]
        return True

    def _broke(self, exc: OSError) -> bool:
        if exc.errno not in (errno.EPIPE, errno.EBADF):
            raise exc
        self.broken = True
        return False


class FrameReader:
    """Splits the observer's end of the pipe back into frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        head = HEAD.size
        while len(buf) - pos >= head:
            kind, length, wall, mono = HEAD.unpack_from(buf, pos)
            if kind not in (C2S, S2C, GAP, END) or length >= _MAX_FRAME:
                raise ValueError(f"bad frame on the copy pipe: kind {kind}, length {length}")
            end = pos + head + length
            if end > len(buf):
                break
            frames.append(Frame(kind, wall, mono, bytes(buf[pos + head : end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame (after EOF: a frame the wrapper did not finish)."""
        return len(self._buf)
