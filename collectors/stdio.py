"""``scopewatch wrap -- COMMAND ...``: a stdio MCP collector.

The wrapper runs an MCP server as its child and relays stdin and stdout byte for byte
(read a chunk, write the same chunk, nothing reframed or buffered): two threads, one per
direction, each a tight loop of blocking ``read`` / ``write``. Those threads run in the native
relay, ``scopewatch-relay`` (:mod:`collectors.native_relay`, C), when it is built, else here in
Python (``SCOPEWATCH_WRAP_RELAY``: auto, native, python); both write the same copy frames and
account for losses alike. stderr is inherited, signals are forwarded, and the child's exit status
is ours.

Everything else happens in a separate *observer process* (:mod:`collectors.observer_process`),
forked before the server starts: parsing the newline-delimited JSON-RPC messages, building,
redacting and chain-stamping ``tool_call`` / ``tool_result`` events, publishing them to Kafka
and spooling them while Kafka is down. Before the relay forwards a chunk it hands a copy to
that process with one non-blocking write to a pipe (:mod:`collectors.tap`), so the relay never
waits for the broker, the spool, redaction or parsing, and shares no interpreter lock with the
threads that do that work. If the pipe is full (the observer is behind, e.g. blocked on a full
spool), the full-spool policy applies -- ``block`` waits for room, ``fail`` waits at most a
second -- and a chunk not handed over is still relayed but recorded in a loss record, never
dropped silently. The pipe (1 MiB) and the publisher's memory bound what is in flight.

Guarantees when the wrapper is killed (``kill -9``): every chunk it relayed was written to the
pipe first, and the observer process reads the pipe to its end, records those messages and
spools what Kafka has not acknowledged before it exits (a partial message the wrapper had not
finished relaying is not a call that reached the server); no ``session_ended`` is invented and
calls left unanswered get no result. Copies the relay had to drop (``fail`` mode, or a
``block_timeout``) are counted in memory the two processes share, so their loss record is written
even if the wrapper died before it could report them. Order per session is the relay order
throughout: one pipe, one observer, one producer, one spool. The observer process exits when the
wrapper does -- after it flushed, which the wrapper waits for (at most the flush timeout plus
30 s), or about a second after it read what the pipe held when the wrapper died, even if it was
blocked on a full spool (it then records what has no room as lost). If the observer process
dies, the wrapper starts another (at most three times) whose first record is a loss record: the
events the dead one had not spooled yet, and copies still in its pipe, are lost -- how many is
not known. Killing both at once (``kill -9`` of the process group) loses what the observer had
not spooled, as killing a collector always did; events already spooled survive either way.

Redaction happens in the observer, before an event is handed to the publisher, so no
argument, error text or resource leaves the host unredacted. Its configuration -- the HMAC key
(``SCOPEWATCH_REDACTION_KEY``, else a per-host key file created on first use), extra detectors
and argument names, the argument size cap, resource rules -- and the Kafka and spool settings
are those of every collector: :mod:`collectors.config`. The per-host key lives under
``$SCOPEWATCH_HOME``, else ``~/.scopewatch`` (not the settings' default ``./.scopewatch``: MCP
clients choose the working directory, and the key must not change between sessions).

Events Kafka cannot take right now are spooled to disk (already redacted) and delivered in order
when it is back -- by the next wrapper started with the same spool directory if this one dies
(:mod:`collectors.spool`).

A bad setting stops the wrapper before it starts the server (fail closed). Neither the key
nor any unredacted value is ever written to stderr.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collectors.config import KEY_FILE, CollectorConfig, ConfigError
from collectors.native_relay import NativeRelay, NativeTap, find_binary, patience_ms
from collectors.observer import McpSessionObserver
from collectors.observer_process import (
    MAX_LINE_BYTES,
    EventSink,
    KafkaSink,
    LineAssembler,
    SinkSpec,
    WrapStats,
    kafka_emitter,
    observer_main,
    wait_exit,
    wait_ready,
)
from collectors.tap import C2S, S2C, DropCounters, Tap, set_pipe_size

__all__ = [
    "CHUNK",
    "KEY_FILE",
    "MAX_LINE_BYTES",
    "EventSink",
    "KafkaSink",
    "LineAssembler",
    "SinkSpec",
    "StdioWrapper",
    "WrapError",
    "WrapStats",
    "configure_observer",
    "exit_like",
    "kafka_emitter",
]

CHUNK = 1 << 16
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
OBSERVER_START_TIMEOUT = 60.0
END_GRACE = 30.0
"""Seconds the end of a session may wait for room in the copy pipe before the observer is told to hurry."""
OBSERVER_EXIT_MARGIN = 30.0
"""Seconds the wrapper waits for the observer beyond the flush timeout before it leaves anyway."""
MAX_OBSERVER_RESTARTS = 3


@dataclass
class StdioWrapper:
    """Relays one MCP stdio session; a forked observer process records it (see the module docstring).

    ``sink`` says where events go; :meth:`SinkSpec.open` runs in the observer process.
    ``observer_nice``: niceness added to the observer process (default ``SCOPEWATCH_OBSERVER_NICE``,
    else 19), so that on a busy machine the relay, the client and the server come first. The cost:
    while every CPU is saturated by other work, the observer gets little time and falls behind; the
    copy pipe then fills and ``block`` mode slows the session down (``fail`` mode records losses).
    Set 0 to give it a full share.
    """

    argv: list[str]
    observer: McpSessionObserver
    sink: SinkSpec
    stdin_fd: int = 0
    stdout_fd: int = 1
    observer_nice: int | None = None

    def __post_init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._tap: Tap | None = None
        self._ctl: socket.socket | None = None
        self.observer_pid: int | None = None
        self.observer_restarts = 0
        self._restart_lock = threading.Lock()
        self._gone: list[int] = []  # observer processes that died or were replaced (reaped at the end)
        self._output_relayed: Callable[[float | None], bool] = lambda _timeout: True
        self.relay: str | None = None
        """Which relay ran the session: ``native`` or ``python``."""

    # -- relay ----------------------------------------------------------------------
    def _pump(self, src: int, dst: int | None, direction: int, close_dst: Callable[[], None]) -> None:
        """Copy ``src`` to ``dst`` chunk by chunk; a copy of each chunk goes to the observer first.

        The copy is handed over *before* the chunk is forwarded: a request is in the pipe before
        the server can possibly answer it, so the observer sees every exchange in causal order,
        and whatever was relayed is in the pipe if the wrapper dies right after.
        """
        tap = self._tap
        assert tap is not None
        send = tap.send
        read = os.read
        wall = time.time_ns
        mono = time.monotonic_ns
        while True:
            try:
                chunk = read(src, CHUNK)
            except OSError:
                chunk = b""
            if not chunk:
                break
            if not send(direction, chunk, wall(), mono()) and tap.broken:
                self._observer_died(tap)
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
        config = CollectorConfig.from_env(os.environ)
        configure_observer(self.observer, config)
        native = relay_binary(config)
        if self.observer_nice is None:
            self.observer_nice = config.observer_nice
        wfd, counters = self._start_observer(time.time_ns(), restart_note=None)
        # What is alive now (imports, configuration) stays: keep the garbage collector from walking it
        # again and again -- a full collection of it would pause the relay for milliseconds.
        gc.freeze()
        try:
            proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, process_group=0
            )
        except OSError as exc:
            os.close(wfd)  # no end frame: the session never started
            self._wait_observer()
            raise WrapError(f"cannot start {self.argv[0]!r}: {exc.strerror or exc}") from exc
        self._proc = proc
        self.relay = "native" if native is not None else "python"
        previous = {sig: signal.signal(sig, self._forward) for sig in FORWARDED_SIGNALS}
        assert proc.stdin is not None and proc.stdout is not None
        relay: NativeRelay | None = None
        tap: Tap | NativeTap
        try:
            if native is not None:
                relay, tap = self._start_native(native, proc, wfd, counters)
            else:
                tap = self._start_threads(proc, wfd, counters)
            code = proc.wait()
            # everything the server wrote reaches the client before we finish
            if not self._output_relayed(END_GRACE):  # e.g. waiting for room in the copy pipe a full spool keeps full
                self._hurry_observer()
                self._output_relayed(None)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        with self._restart_lock:
            self._end_session(tap)
            if relay is not None:
                relay.quit()
            self._wait_observer()
        return code

    def _start_threads(self, proc: subprocess.Popen[bytes], wfd: int, counters: DropCounters) -> Tap:
        """The Python relay: one thread per direction."""
        tap = self._tap = Tap(
            wfd,
            on_full=self.sink.on_full,
            block_timeout=self.sink.block_timeout,
            counters=counters,
            wake=self._wake_observer,
        )
        assert proc.stdin is not None and proc.stdout is not None
        child_in, child_out = proc.stdin, proc.stdout
        to_server = threading.Thread(
            target=self._pump, args=(self.stdin_fd, child_in.fileno(), C2S, _closer(child_in)), daemon=True
        )
        to_client = threading.Thread(
            target=self._pump, args=(child_out.fileno(), self.stdout_fd, S2C, lambda: None), daemon=True
        )
        to_server.start()
        to_client.start()
        self._output_relayed = lambda timeout: _joined(to_client, timeout)
        return tap

    def _start_native(
        self, binary: Path, proc: subprocess.Popen[bytes], wfd: int, counters: DropCounters
    ) -> tuple[NativeRelay, NativeTap]:
        """The native relay (collectors.native_relay): this process keeps none of the relayed pipes."""
        assert proc.stdin is not None and proc.stdout is not None
        try:
            relay = NativeRelay(
                binary,
                stdin_fd=self.stdin_fd,
                stdout_fd=self.stdout_fd,
                child_in=proc.stdin.fileno(),
                child_out=proc.stdout.fileno(),
                tap_fd=wfd,
                counters=counters,
                patience=patience_ms(self.sink.on_full, self.sink.block_timeout),
                on_broken=self._observer_died,
                on_wake=self._wake_observer,
            )
        finally:
            # the relay holds them now: the server sees EOF on its stdin when the relay closes it, and
            # the observer sees the end of its pipe when the relay closes that
            os.close(wfd)
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()
            proc.stdin = proc.stdout = None
        self._output_relayed = relay.output_done.wait
        return relay, relay.tap

    def _end_session(self, tap: Tap | NativeTap) -> None:
        """Hand over the end of the session. If the observer cannot take it (blocked on a full spool
        for ``END_GRACE`` s), tell it to stop waiting: what has no room is then recorded as lost."""
        wall, mono = time.time_ns(), time.monotonic_ns()
        if tap.end(wall, mono, timeout=END_GRACE):
            return
        self._hurry_observer()
        if not tap.end(wall, mono, timeout=self._exit_timeout()):
            tap.close()

    def _wake_observer(self) -> None:
        """The copy pipe is full: have the observer read it now rather than at its next tick."""
        ctl = self._ctl
        if ctl is not None:
            with contextlib.suppress(OSError):
                ctl.send(b"w", socket.MSG_DONTWAIT)

    def _hurry_observer(self) -> None:
        """Tell the observer to stop waiting for room in the spool (it records what has none as lost)."""
        if self._ctl is not None:
            with contextlib.suppress(OSError):
                self._ctl.send(b"h")

    def _forward(self, signum: int, _frame: object) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signum)

    # -- the observer process -------------------------------------------------------------
    def _start_observer(self, started_ns: int, restart_note: str | None) -> tuple[int, DropCounters]:
        """Fork an observer process and wait until its sink is open (fail closed if it cannot be).

        Returns the write end of its copy pipe and the drop counters it shares.
        """
        rfd, wfd = os.pipe()
        set_pipe_size(wfd)
        mine, theirs = socket.socketpair()
        counters = DropCounters()
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the observer process
            status = 70
            try:
                os.close(wfd)
                mine.close()
                status = observer_main(
                    rfd=rfd,
                    ctl=theirs,
                    observer=self.observer,
                    spec=self.sink,
                    started_ns=started_ns,
                    counters=counters,
                    nice=self.observer_nice or 0,
                    restart_note=restart_note,
                )
            except BaseException as exc:  # noqa: BLE001 - never return into the wrapper's code
                with contextlib.suppress(Exception):
                    _warn(f"observer process failed: {type(exc).__name__}")
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os._exit(status)
        os.close(rfd)
        theirs.close()
        self.observer_pid = pid
        self._ctl = mine
        problem = wait_ready(mine, OBSERVER_START_TIMEOUT)
        if problem is not None:
            os.close(wfd)
            self._wait_observer()
            kind, _, message = problem.partition(":")
            if kind == "publisher":
                from collectors.publisher import PublisherError

                raise PublisherError(message)
            raise WrapError(f"the observer process cannot start: {message}")
        return wfd, counters

    def _observer_died(self, tap: Tap | NativeTap) -> None:
        """The observer process stopped reading (it died): start a new one, which first records
        the loss, and hand the pipe over to it. At most ``MAX_OBSERVER_RESTARTS`` times."""
        if tap.gave_up:
            return
        with self._restart_lock:
            if not tap.broken or tap.closed or tap.gave_up:
                return  # another relay thread restarted it already, or the session is over
            old = self.observer_pid
            status = _reap(old) if old is not None else None
            if old is not None and status is None:
                self._gone.append(old)
            if self._ctl is not None:
                self._ctl.close()
                self._ctl = None
            if self.observer_restarts >= MAX_OBSERVER_RESTARTS:
                if not tap.gave_up:
                    tap.gave_up = True
                    _warn("the observer process keeps dying: the rest of this session is NOT recorded")
                return
            self.observer_restarts += 1
            how = f"exit status {status}" if status is not None else "stopped reading"
            _warn(f"the observer process died ({how}); starting a new one")
            self.sink = self.sink.restarted()
            note = (
                f"the observer process of this session died ({how}): the events it had not spooled or delivered "
                "yet are lost, and the calls in flight then get no result"
            )
            try:
                wfd, counters = self._start_observer(time.time_ns(), restart_note=note)
            except (WrapError, OSError) as exc:
                tap.gave_up = True
                _warn(f"cannot restart the observer process ({exc}): the rest of this session is NOT recorded")
                return
            except Exception as exc:  # noqa: BLE001 - e.g. PublisherError: the relay goes on regardless
                tap.gave_up = True
                _warn(f"cannot restart the observer process ({exc}): the rest of this session is NOT recorded")
                return
            tap.reopen(wfd, counters)

    def _exit_timeout(self) -> float:
        return self.sink.flush_timeout + OBSERVER_EXIT_MARGIN

    def _wait_observer(self) -> None:
        """Wait until the observer has recorded and spooled or delivered everything (bounded)."""
        if self._ctl is not None and self.observer_pid is not None:
            if wait_exit(self._ctl, self._exit_timeout()):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.observer_pid, 0)
            else:
                _warn("the observer process is still flushing; leaving it to finish on its own")
            self._ctl.close()
            self._ctl = None
        for pid in self._gone:
            _reap(pid)


def _reap(pid: int) -> int | None:
    """The exit status of an observer process that is gone (negative: its signal); None if it is not."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if not done:
        time.sleep(0.05)  # it closed its end of the pipe: usually on its way out
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if not done:
            return None
    return os.waitstatus_to_exitcode(status)


class WrapError(ConfigError):
    """The wrapper cannot start or run as configured."""


# -- redaction and resource configuration (collectors.config) ----------------------------------
def configure_observer(observer: McpSessionObserver, settings: Mapping[str, str] | CollectorConfig) -> None:
    """Give ``observer`` the host's redactor (unless it has one) and any configured resource rules."""
    config = CollectorConfig.of(settings)
    if observer.redactor is None:
        observer.redactor = config.redactor()
    extractor = config.extractor()
    if extractor is not None:
        observer.extractor = extractor


def relay_binary(settings: Mapping[str, str] | CollectorConfig) -> Path | None:
    """The native relay to use per ``SCOPEWATCH_WRAP_RELAY`` (auto, native, python); None: the Python relay.

    ``native`` without a built relay stops the wrapper before it starts the server."""
    config = CollectorConfig.of(settings)
    mode = config.wrap_relay
    if mode == "python":
        return None
    binary = find_binary(config.cache_path)
    if binary is None and mode == "native":
        raise WrapError("SCOPEWATCH_WRAP_RELAY=native, but the native relay is not built (run `make install`)")
    return binary


def _joined(thread: threading.Thread, timeout: float | None) -> bool:
    thread.join(timeout)
    return not thread.is_alive()


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
