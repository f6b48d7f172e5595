"""``scopewatch wrap -- COMMAND ...``: a stdio MCP collector.

The wrapper runs an MCP server as its child and relays stdin and stdout byte for byte
(read a chunk, write the same chunk, nothing reframed or buffered). A copy of each
chunk goes to an observer thread that parses the newline-delimited JSON-RPC messages
and publishes ``tool_call`` / ``tool_result`` events; publishing never blocks the relay.
stderr is inherited, signals are forwarded, and the child's exit status is ours.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from collectors.chain import ChainStamper
from collectors.observer import McpSessionObserver, utc_from_ns
from schemas import Event

CHUNK = 1 << 16
MAX_LINE_BYTES = 16 * 1024 * 1024
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

Emit = Callable[[Event], None]


@dataclass
class WrapStats:
    client_bytes: int = 0
    server_bytes: int = 0
    unparsable_lines: int = 0
    oversize_lines: int = 0
    observer_errors: int = 0
    events: int = 0


class LineAssembler:
    """Splits a byte stream into lines; lines longer than ``limit`` are skipped, not parsed."""

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        self._buf = bytearray()
        self._skipping = False
        self.limit = limit
        self.oversize = 0

    def feed(self, chunk: bytes) -> list[bytes]:
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


@dataclass
class StdioWrapper:
    """Relays one MCP stdio session and observes it."""

    argv: list[str]
    observer: McpSessionObserver
    emit: Emit
    stdin_fd: int = 0
    stdout_fd: int = 1
    stats: WrapStats = field(default_factory=WrapStats)

    def __post_init__(self) -> None:
        self._inbox: queue.SimpleQueue[tuple[str, int, float, bytes] | None] = queue.SimpleQueue()
        self._proc: subprocess.Popen[bytes] | None = None

    # -- relay ----------------------------------------------------------------------
    def _pump(self, src: int, dst: int | None, direction: str, close_dst: Callable[[], None]) -> None:
        """Copy ``src`` to ``dst`` chunk by chunk, handing each chunk to the observer."""
        inbox = self._inbox
        while True:
            try:
                chunk = os.read(src, CHUNK)
            except OSError:
                chunk = b""
            if not chunk:
                break
            # Hand the copy to the observer *before* forwarding: a request must be seen before
            # the server can possibly answer it, or the observer could not match the response.
            inbox.put((direction, time.time_ns(), time.monotonic(), chunk))
            if dst is not None:
                try:
                    _write_all(dst, chunk)
                except OSError as exc:
                    if exc.errno not in (errno.EPIPE, errno.EBADF, errno.ECONNRESET):
                        raise
                    dst = None  # the other side is gone: keep draining so the child never blocks
                    close_dst()
        close_dst()

    def run(self) -> int:
        """Run the child to completion; returns its exit code (negative: killed by that signal)."""
        observer_thread = threading.Thread(target=self._observe, name="scopewatch-observer", daemon=True)
        observer_thread.start()
        self._emit_all(self.observer.start(utc_from_ns(time.time_ns())))
        try:
            proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, process_group=0
            )
        except OSError as exc:
            self._inbox.put(None)
            observer_thread.join(timeout=5)
            raise WrapError(f"cannot start {self.argv[0]!r}: {exc.strerror or exc}") from exc
        self._proc = proc
        previous = {sig: signal.signal(sig, self._forward) for sig in FORWARDED_SIGNALS}
        assert proc.stdin is not None and proc.stdout is not None
        child_in, child_out = proc.stdin, proc.stdout
        to_server = threading.Thread(
            target=self._pump, args=(self.stdin_fd, child_in.fileno(), "c2s", _closer(child_in)), daemon=True
        )
        to_client = threading.Thread(
            target=self._pump, args=(child_out.fileno(), self.stdout_fd, "s2c", lambda: None), daemon=True
        )
        to_server.start()
        to_client.start()
        try:
            code = proc.wait()
            to_client.join()  # everything the server wrote reaches the client before we finish
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self._inbox.put(("end", time.time_ns(), time.monotonic(), b""))
        self._inbox.put(None)
        observer_thread.join(timeout=30)
        return code

    def _forward(self, signum: int, _frame: object) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signum)

    # -- observer ---------------------------------------------------------------------
    def _observe(self) -> None:
        lines = {"c2s": LineAssembler(), "s2c": LineAssembler()}
        handlers = {"c2s": self.observer.from_client, "s2c": self.observer.from_server}
        while True:
            item = self._inbox.get()
            if item is None:
                return
            direction, wall, mono, chunk = item
            try:
                if direction == "end":
                    self._emit_all(self.observer.finish(utc_from_ns(wall), mono))
                    continue
                if direction == "c2s":
                    self.stats.client_bytes += len(chunk)
                else:
                    self.stats.server_bytes += len(chunk)
                assembler = lines[direction]
                for line in assembler.feed(chunk):
                    if not line.strip():
                        continue
                    try:
                        message: Any = json.loads(line)
                    except ValueError:
                        self.stats.unparsable_lines += 1
                        continue
                    self._emit_all(handlers[direction](message, utc_from_ns(wall), mono))
                self.stats.oversize_lines = lines["c2s"].oversize + lines["s2c"].oversize
            except Exception as exc:  # noqa: BLE001 - the relay must outlive any observer bug
                self.stats.observer_errors += 1
                _warn(f"observer error ({type(exc).__name__}): {exc}")

    def _emit_all(self, events: list[Event]) -> None:
        for event in events:
            self.emit(event)
            self.stats.events += 1


class WrapError(RuntimeError):
    pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _closer(stream: Any) -> Callable[[], None]:
    def close() -> None:
        with contextlib.suppress(OSError):
            stream.close()

    return close


def _warn(text: str) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.write(f"scopewatch wrap: {text}\n")
        sys.stderr.flush()


def kafka_emitter(publisher: Any, topics: Any, stamper: ChainStamper) -> Emit:
    """An :data:`Emit` that stamps, encodes and queues events for Kafka (never blocking)."""
    from schemas import encode, key_for, topic_for

    def emit(event: Event) -> None:
        stamped = stamper.stamp(event)
        publisher.publish(topic_for(stamped, topics), key_for(stamped).encode("utf-8"), encode(stamped))

    return emit


def exit_like(code: int) -> None:
    """Leave the way the child left: same exit code, or killed by the same signal."""
    if code < 0:
        sig = -code
        with contextlib.suppress(OSError, ValueError):  # SIGKILL/SIGSTOP have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os.kill(os.getpid(), sig)
        time.sleep(1.0)  # a signal whose default is to ignore (e.g. SIGCHLD) falls through to an exit code
        raise SystemExit(128 + sig)
    raise SystemExit(code)
