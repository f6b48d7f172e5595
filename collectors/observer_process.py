"""The observer process of ``scopewatch wrap``: everything the relay must not wait for.

The wrapper (:mod:`collectors.stdio`) forks this process before it starts the MCP server and
hands it a copy of every chunk it relays through a pipe (:mod:`collectors.tap`). Here the chunks
are split into lines, parsed, turned into events by the :class:`~collectors.observer.McpSessionObserver`
(redaction, resource extraction), chain-stamped and published -- to Kafka, or to the local spool
while Kafka is down (:class:`~collectors.publisher.BackgroundPublisher`). None of this shares an
interpreter, a GIL or a core scheduler slot that the relay waits for: the relay only writes to
the pipe.

Lifetime
    The process ends when the copy pipe does: after the end frame (the server exited; the session's
    end and the calls left unanswered are recorded, then the publisher is closed: everything
    undelivered is spooled first, then delivered for at most the flush timeout), or at end of file
    without one (the wrapper died, e.g. ``kill -9``: whatever the pipe held is still read,
    recorded and spooled; no ``session_ended`` is invented). A control socket shared with the
    wrapper tells this process when the wrapper is gone even while it is blocked (a full spool
    in ``block`` mode): it then stops waiting, records what has no room as lost, and exits within
    about a second -- it never outlives the wrapper by more than that. SIGTERM (a client
    terminating the whole process group) has the same effect; SIGINT, SIGHUP, SIGQUIT and
    SIGUSR1/2 are ignored (the wrapper forwards those to the server, whose end then ends this
    process in order).

Loss accounting
    A chunk the relay could not hand over (full pipe, see :mod:`collectors.tap`) arrives as a gap;
    every message it touched is reported to the publisher as lost (a loss record). When the
    wrapper died before it could send a gap frame, the drop counters it shares with this process
    still say what was dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from collectors.chain import ChainStamper
from collectors.jsonrpc import parse_message
from collectors.observer import McpSessionObserver, utc_from_ns
from collectors.tap import C2S, DIRECTION_NAMES, END, GAP, GAP_BODY, S2C, DropCounters, Frame, FrameReader
from collectors.tap import lost_messages as _lost_messages
from schemas import Event
from schemas.topics import Topics

if TYPE_CHECKING:
    from collectors.publisher import BackgroundPublisher
    from collectors.spool import SpoolConfig

__all__ = [
    "MAX_LINE_BYTES",
    "EventSink",
    "KafkaSink",
    "LineAssembler",
    "SessionRecorder",
    "SinkSpec",
    "WrapStats",
    "kafka_emitter",
    "observer_main",
]

MAX_LINE_BYTES = 16 * 1024 * 1024
READ_BYTES = 1 << 20
BATCH_SECONDS = 0.1
"""After handling what the pipe held, wait this long before reading again: one wake-up per batch
of messages instead of one per message, so the observer competes less with the relay, the client
and the server (a relay that finds the pipe full wakes the observer at once). Each read's events
go to the publisher in one hand-over (one lock, at most one wake-up of its thread). At 10 ms, calls
paced at one per 10 ms (as agents make them) meant one read, one hand-over and one producer round
per call; at 50 ms about five calls share them (observer CPU per paced call roughly halved, see
BENCHMARKS.md, 2026-12-05); at 100 ms ten, for at most 100 ms more before an event is published
(most of what is left per hand-over is the Kafka producer's round: its produce request, response
and futures, a few hundred microseconds however few records it carries). The events still
in the pipe are not at risk meanwhile: the kernel holds them, and they are read to the end even
when the wrapper dies."""
IDLE_SECONDS = 0.2
"""The longest wait between reads while nothing arrives (the wait doubles from BATCH_SECONDS)."""
HURRIED_CLOSE = 1.0
"""Seconds the publisher may take to close once the wrapper is gone (undelivered events stay spooled)."""

GAP_REASON = "relayed but not handed to the observer process (its pipe was full, or it was being replaced)"

Emit = Callable[[Event], object]


class EventSink(Protocol):
    """Where the observer process puts events (opened in that process)."""

    def emit(self, event: Event) -> object: ...

    def emit_many(self, events: list[Event], on_error: Callable[[Event, Exception], object]) -> object:
        """Emit ``events`` in order, in one hand-over; an event that cannot be emitted goes to
        ``on_error`` and the others still go."""

    def lost(self, direction: int, messages: int, reason: str) -> None:
        """``messages`` of ``direction`` were relayed but not recorded, because of ``reason``."""

    def hurry(self) -> None:
        """Stop waiting for room (called from a signal handler or another thread)."""

    def close(self, timeout: float) -> None: ...


class SinkSpec(Protocol):
    """What the wrapper is told about the sink; ``open`` runs in the observer process."""

    @property
    def on_full(self) -> Literal["block", "fail"]: ...

    @property
    def block_timeout(self) -> float | None: ...

    @property
    def flush_timeout(self) -> float: ...

    def open(self) -> EventSink: ...

    def restarted(self) -> SinkSpec:
        """The spec for a replacement observer process (e.g. a new collector epoch)."""
        ...


def kafka_emitter(publisher: Any, topics: Any, stamper: ChainStamper) -> Emit:
    """An :data:`Emit` that stamps, encodes and queues events for Kafka (never waiting for the broker)."""
    from collectors.emit import Emitter

    return Emitter(topics, stamper, publisher).emit


@dataclass
class KafkaSink:
    """Chain-stamped events to Kafka through a :class:`~collectors.publisher.BackgroundPublisher`.

    Built in the wrapper, which validates the spool settings here (fail closed, before the server
    starts); the publisher itself is created by :meth:`open` in the observer process.
    """

    bootstrap: str
    topics: Topics
    stamper: ChainStamper
    client_id: str = "scopewatch-wrap"
    flush_timeout: float = 15.0
    spool: SpoolConfig | None = None  # None: SpoolConfig.from_env(os.environ)
    max_queued: int = 50_000  # the publisher's memory bounds (events, bytes)
    max_queued_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        from collectors.publisher import PublisherError
        from collectors.spool import SpoolConfig, SpoolConfigError

        if self.spool is None:
            try:
                self.spool = SpoolConfig.from_env(os.environ)
            except SpoolConfigError as exc:
                raise PublisherError(f"spool settings: {exc}") from None

    @property
    def on_full(self) -> Literal["block", "fail"]:
        assert self.spool is not None
        return self.spool.on_full

    @property
    def block_timeout(self) -> float | None:
        assert self.spool is not None
        return self.spool.block_timeout

    def restarted(self) -> KafkaSink:
        """A new chain epoch: the dead observer's last stamp is unknown here."""
        epoch = max(time.time_ns() // 1_000_000, self.stamper.epoch + 1)
        return dataclasses.replace(self, stamper=ChainStamper(self.stamper.collector_id, epoch=epoch))

    def open(self) -> _KafkaEventSink:
        from collectors.publisher import BackgroundPublisher

        publisher = BackgroundPublisher(
            self.bootstrap,
            client_id=self.client_id,
            # each pipe read's records reach the producer at once, as whole record batches: waiting
            # for more (aiokafka's linger) only cost the producer a timer and a turn per read
            linger_ms=0,
            spool=self.spool,
            max_queued=self.max_queued,
            max_queued_bytes=self.max_queued_bytes,
        ).start()
        from collectors.emit import Emitter

        emitter = Emitter(self.topics, self.stamper, publisher)
        return _KafkaEventSink(publisher, self.topics, emitter.emit, emitter.emit_many)


@dataclass
class _KafkaEventSink:
    publisher: BackgroundPublisher
    topics: Topics
    emit: Emit
    emit_many: Callable[[list[Event], Callable[[Event, Exception], object]], object]

    def lost(self, direction: int, messages: int, reason: str) -> None:
        topic = self.topics.tool_calls if direction == C2S else self.topics.tool_results
        self.publisher.record_loss(topic, reason, messages)

    def hurry(self) -> None:
        self.publisher.stop_waiting()

    def close(self, timeout: float) -> None:
        stats = self.publisher.close(timeout)
        lost = stats.lost_queue_full + stats.lost_at_close + stats.lost_upstream
        if lost:
            _warn(
                f"{lost} events NOT delivered to Kafka "
                f"(queue full {stats.lost_queue_full}, unsent at exit {stats.lost_at_close}, "
                f"not observed {stats.lost_upstream}; last error: {stats.last_error})"
            )


@dataclass
class WrapStats:
    client_bytes: int = 0
    server_bytes: int = 0
    unparsable_lines: int = 0
    oversize_lines: int = 0
    observer_errors: int = 0
    events: int = 0
    lost_messages: int = 0


class LineAssembler:
    """Splits a byte stream into lines; lines longer than ``limit`` are skipped, not parsed."""

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        self._buf = bytearray()
        self._skipping = False
        self.limit = limit
        self.oversize = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        if not self._buf and not self._skipping and chunk.endswith(b"\n") and chunk.count(b"\n") == 1:
            return [chunk[:-1]]  # the common case: one whole message per chunk
        lines: list[bytes] = []
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                self._buf += chunk[start:nl]
                lines.append(bytes(self._buf))
            self._buf.clear()
            start = nl + 1
        if not self._skipping:
            self._buf += chunk[start:]
            if len(self._buf) > self.limit:
                self._buf.clear()
                self._skipping = True
                self.oversize += 1
        return lines

    def gap(self, ends_with_newline: bool) -> None:
        """Bytes were lost here: drop the partial line, and skip to the next newline unless the
        lost bytes ended with one."""
        self._buf.clear()
        self._skipping = not ends_with_newline

    @property
    def partial(self) -> int:
        """Bytes of an unfinished line."""
        return len(self._buf)


@dataclass
class SessionRecorder:
    """Turns the frames of one wrapped session into events for a sink (no I/O of its own)."""

    observer: McpSessionObserver
    sink: EventSink
    stats: WrapStats = field(default_factory=WrapStats)

    def __post_init__(self) -> None:
        self.lines = {C2S: LineAssembler(), S2C: LineAssembler()}
        self.reported = {C2S: [0, 0], S2C: [0, 0]}  # newlines and bytes reported in gap frames
        self.ended = False
        self._handlers = {C2S: self.observer.from_client, S2C: self.observer.from_server}
        self._batch: list[Event] = []

    def start(self, wall_ns: int) -> None:
        self._emit_all(self.observer.start(utc_from_ns(wall_ns)))
        self.flush()

    def handle(self, frame: Frame) -> None:
        self.handle_all((frame,))

    def handle_all(self, frames: Iterable[Frame]) -> None:
        """Record ``frames`` (e.g. all of one pipe read) and hand their events to the sink in one
        batch: one hand-over to the publisher per read, not one per event."""
        try:
            for frame in frames:
                self._handle(frame)
        finally:
            self.flush()

    def flush(self) -> None:
        """Hand the events recorded so far to the sink."""
        if not self._batch:
            return
        events, self._batch = self._batch, []
        failed = 0

        def emit_failed(_event: Event, exc: Exception) -> None:
            nonlocal failed
            failed += 1
            self.stats.observer_errors += 1
            _warn(f"observer error ({type(exc).__name__}): {self._describe(exc)}")

        try:
            self.sink.emit_many(events, emit_failed)
        except Exception as exc:  # noqa: BLE001 - the recording goes on
            emit_failed(events[0], exc)
            failed = len(events)
        self.stats.events += len(events) - failed

    def _handle(self, frame: Frame) -> None:
        try:
            if frame.kind in (C2S, S2C):
                self._data(frame)
            elif frame.kind == GAP:
                self._gap(frame)
            elif frame.kind == END and not self.ended:
                self.ended = True
                self._emit_all(self.observer.finish(utc_from_ns(frame.wall_ns), frame.mono_ns / 1e9))
        except Exception as exc:  # noqa: BLE001 - never let one message stop the recording of the others
            self.stats.observer_errors += 1
            _warn(f"observer error ({type(exc).__name__}): {self._describe(exc)}")

    def cut_off(self, counters: DropCounters | None, torn: int) -> None:
        """The wrapper is gone without an end frame: account for drops it could not report."""
        if counters is not None:
            for direction in (C2S, S2C):
                newlines, nbytes, ends = counters.get(direction)
                newlines -= self.reported[direction][0]
                nbytes -= self.reported[direction][1]
                if nbytes > 0:
                    self._lost(direction, _lost_messages(newlines, ends), nbytes, GAP_REASON)
        if torn:
            _warn(f"the wrapper died while handing over {torn} bytes it had not relayed yet")

    def _data(self, frame: Frame) -> None:
        direction, chunk = frame.kind, frame.body
        if direction == C2S:
            self.stats.client_bytes += len(chunk)
        else:
            self.stats.server_bytes += len(chunk)
        assembler = self.lines[direction]
        lines = assembler.feed(chunk)
        self.stats.oversize_lines = self.lines[C2S].oversize + self.lines[S2C].oversize
        if not lines:
            return
        now = utc_from_ns(frame.wall_ns)
        mono = frame.mono_ns / 1e9
        handler = self._handlers[direction]
        for line in lines:
            if not line.strip():
                continue
            try:
                message: Any = parse_message(line)
            except ValueError:
                self.stats.unparsable_lines += 1
                continue
            try:
                self._emit_all(handler(message, now, mono))
            except Exception as exc:  # noqa: BLE001 - the other lines of the chunk still count
                self.stats.observer_errors += 1
                _warn(f"observer error ({type(exc).__name__}): {self._describe(exc)}")

    def _gap(self, frame: Frame) -> None:
        direction, nbytes, newlines, ends = GAP_BODY.unpack(frame.body)
        self.reported[direction][0] += newlines
        self.reported[direction][1] += nbytes
        self.lines[direction].gap(bool(ends))
        self._lost(direction, _lost_messages(newlines, bool(ends)), nbytes, GAP_REASON)

    def _lost(self, direction: int, messages: int, nbytes: int, reason: str) -> None:
        self.stats.lost_messages += messages
        text = f"{reason}: {messages} messages ({nbytes} bytes) {DIRECTION_NAMES[direction]} not recorded"
        self.sink.lost(direction, messages, text)
        _warn(text)

    def restarted(self, note: str) -> None:
        """This process replaces one that died: say so in a loss record (how much it lost is unknown)."""
        self.stats.lost_messages += 1
        self.sink.lost(C2S, 1, note)
        _warn(note)

    def _describe(self, exc: Exception) -> str:
        """An exception's message, redacted and short (it may quote what the agent sent)."""
        try:
            return self.observer.redact_text(str(exc))[:300]
        except Exception:  # noqa: BLE001 - never let a log line take the observer down
            return "(message withheld)"

    def _emit_all(self, events: list[Event]) -> None:
        self._batch.extend(events)


def observer_main(
    *,
    rfd: int,
    ctl: socket.socket,
    observer: McpSessionObserver,
    spec: SinkSpec,
    started_ns: int,
    counters: DropCounters | None,
    nice: int = 0,
    restart_note: str | None = None,
) -> int:
    """The observer process, from just after the fork to its exit status (the caller ``_exit``\\ s)."""
    _detach({rfd, ctl.fileno()})
    gc.freeze()  # the wrapper's objects, inherited: never worth a collection here
    hurried = threading.Event()
    woken = threading.Event()
    sink_box: list[EventSink] = []

    def hurry(*_: object) -> None:
        hurried.set()
        woken.set()
        if sink_box:
            sink_box[0].hurry()

    signal.signal(signal.SIGTERM, hurry)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    _name_process(b"scopewatch-obs")
    _yield_to_the_relay(nice)
    try:
        sink = spec.open()
    except Exception as exc:  # noqa: BLE001 - reported to the wrapper, which fails closed
        kind = "publisher" if type(exc).__name__ == "PublisherError" else "error"
        with contextlib.suppress(OSError):
            ctl.sendall(f"{kind}:{exc}\n".encode("utf-8", "replace"))
        return 3
    sink_box.append(sink)
    gc.freeze()  # and the publisher's (aiokafka, asyncio, the producer): long-lived, never garbage
    if hurried.is_set():
        sink.hurry()
    with contextlib.suppress(OSError):
        ctl.sendall(b"ok\n")
    threading.Thread(
        target=_watch_wrapper, args=(ctl, hurry, woken.set), name="scopewatch-lifeline", daemon=True
    ).start()

    recorder = SessionRecorder(observer, sink)
    reader = FrameReader()
    # Polled, not read blocking: the relay's writes to the pipe wake nobody up. The wrapper wakes
    # this process through the control socket when it finds the pipe full.
    os.set_blocking(rfd, False)
    try:
        if restart_note is None:
            recorder.start(started_ns)
        else:
            recorder.restarted(restart_note)
        wait = BATCH_SECONDS
        while True:
            try:
                data = os.read(rfd, READ_BYTES)
            except BlockingIOError:
                woken.wait(wait)
                woken.clear()
                wait = min(wait * 2, IDLE_SECONDS)
                continue
            except OSError:
                data = b""
            if not data:
                break  # the wrapper closed the pipe, or died
            recorder.handle_all(reader.feed(data))  # one hand-over to the publisher per read
            if len(data) < READ_BYTES:
                wait = BATCH_SECONDS
                woken.wait(wait)
                woken.clear()
        if not recorder.ended:
            recorder.cut_off(counters, reader.pending)
    except Exception as exc:  # noqa: BLE001 - whatever happens, close the publisher (spooling what it holds)
        _warn(f"observer failed ({type(exc).__name__}); closing")
    finally:
        sink.close(HURRIED_CLOSE if hurried.is_set() else spec.flush_timeout)
    return 0


def _watch_wrapper(ctl: socket.socket, hurry: Callable[[], None], wake: Callable[[], None]) -> None:
    """The wrapper's commands on the control socket: ``w`` (the copy pipe is full: read it now) and
    ``h`` (stop waiting for room in the spool); its end closing (it exited or died) means ``h``."""
    while True:
        try:
            data = ctl.recv(64)
        except OSError:
            data = b""
        if not data or b"h" in data:
            hurry()
        if b"w" in data:
            wake()
        if not data:
            return


def _yield_to_the_relay(nice: int) -> None:
    """Make this process background work: ``SCHED_BATCH`` (its wake-ups never preempt the relay,
    the client or the server) and ``nice`` (their share of a busy CPU is larger)."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)


def _detach(keep: set[int]) -> None:
    """Let go of every file the wrapper had open except stderr and ``keep``.

    The MCP session's stdin and stdout and the server's pipes belong to the wrapper alone: the
    client and the server must see end of file when the wrapper closes them, whatever this
    process is still doing. Each such descriptor is pointed at ``/dev/null`` rather than closed,
    so that its number is not reused while an object of the wrapper's still refers to it.
    """
    null = os.open(os.devnull, os.O_RDWR)
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = [0, 1]
    for fd in fds:
        if fd in keep or fd == 2 or fd == null:
            continue
        with contextlib.suppress(OSError):
            os.fstat(fd)  # skip the listing's own descriptor, closed by now
            os.dup2(null, fd, inheritable=fd < 3)
    os.close(null)


def _name_process(name: bytes) -> None:
    """``scopewatch-obs`` in ``ps -o comm`` / ``/proc/PID/comm`` (best effort, Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME


def _warn(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"scopewatch wrap: {text}\n")
        sys.stderr.flush()


def wait_ready(ctl: socket.socket, timeout: float) -> str | None:
    """The observer's first word: None when it is ready, else its error message."""
    ctl.settimeout(timeout)
    data = b""
    try:
        while not data.endswith(b"\n"):
            part = ctl.recv(4096)
            if not part:
                return data.decode("utf-8", "replace") or "error:the observer process exited at start"
            data += part
    except TimeoutError:
        return "error:the observer process did not start in time"
    finally:
        ctl.settimeout(None)
    text = data.decode("utf-8", "replace").strip()
    return None if text == "ok" else text


def wait_exit(ctl: socket.socket, timeout: float) -> bool:
    """Wait (at most ``timeout`` s) until the observer process closes its end; True if it did."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ctl.settimeout(remaining)
            if not ctl.recv(4096):
                return True
    except TimeoutError:
        return False
    except OSError:
        return True
