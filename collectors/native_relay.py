"""The native relay of ``scopewatch wrap``: ``collectors/native/relay.c``, so no Python is on the call path.

The wrapper (:mod:`collectors.stdio`) still starts the server, forwards signals, owns the observer
process and returns the server's exit status; only the byte copying moves into a small C program,
``scopewatch-relay``, which writes the same copy frames to the observer's pipe as
:class:`collectors.tap.Tap` does and keeps the same loss accounting (gap frames and the shared
:class:`~collectors.tap.DropCounters`). ``make install`` builds it with gcc into the virtualenv's
``bin``; without it (no gcc) ``wrap`` relays in Python. ``SCOPEWATCH_WRAP_RELAY`` chooses:
``auto`` (the native relay when it is built), ``native`` (fail closed without it) or ``python``.

The wrapper and the relay talk over a ``SOCK_SEQPACKET`` socket pair (see the C source for the
messages). :class:`NativeTap` is the wrapper's handle on the relay's copy pipe: the interface of
:class:`~collectors.tap.Tap` that :class:`~collectors.stdio.StdioWrapper` uses at the end of a session
and when it replaces a dead observer process.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from collectors.tap import FAIL_GRACE, DropCounters

__all__ = ["BINARY_NAME", "SOURCE", "NativeRelay", "NativeTap", "build", "find_binary"]

BINARY_NAME = "scopewatch-relay"
SOURCE = Path(__file__).resolve().parent / "native" / "relay.c"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-pthread")
_END = struct.Struct("<cqqq")
QUIT_TIMEOUT = 5.0


def find_binary(cache: Path | None = None) -> Path | None:
    """The built relay: in this virtualenv's ``bin`` (``make install``), else in ``cache/bin``
    (default: the collector settings' cache, ``SCOPEWATCH_CACHE_DIR`` or ``~/.cache/scopewatch``);
    None if neither exists."""
    if cache is None:
        from collectors.config import CollectorConfig

        cache = CollectorConfig.from_env().cache_path
    for folder in (Path(sys.prefix) / "bin", cache / "bin"):
        candidate = folder / BINARY_NAME
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def build(dest: Path, cc: str = "gcc") -> Path:
    """Compile the relay into ``dest`` (a file path); CalledProcessError/OSError if it cannot be."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    subprocess.run([shutil.which(cc) or cc, *CFLAGS, "-o", str(tmp), str(SOURCE)], check=True, capture_output=True)
    tmp.replace(dest)
    return dest


def patience_ms(on_full: Literal["block", "fail"], block_timeout: float | None) -> int:
    """How long the relay waits for room in the copy pipe before it counts a chunk as lost (-1: no limit)."""
    patience = FAIL_GRACE if on_full == "fail" else block_timeout
    return -1 if patience is None else max(0, int(patience * 1000))


class NativeTap:
    """The wrapper's handle on the native relay's copy pipe (the parts of :class:`~collectors.tap.Tap`
    that :class:`~collectors.stdio.StdioWrapper` uses)."""

    def __init__(self, relay: NativeRelay) -> None:
        self._relay = relay
        self.broken = False
        self.closed = False
        self._gave_up = False

    @property
    def gave_up(self) -> bool:
        return self._gave_up

    @gave_up.setter
    def gave_up(self, value: bool) -> None:
        if value and not self._gave_up:
            self._relay.send(b"G")  # the relay stops waiting for a new observer
        self._gave_up = value

    def reopen(self, fd: int, counters: DropCounters | None) -> None:
        """Hand a new observer's pipe (and its drop counters) to the relay."""
        fds = [fd] + ([counters.fd] if counters is not None else [])
        try:
            if len(fds) == 2:
                self._relay.send(b"R", fds)
        finally:
            os.close(fd)  # the relay holds it now: the observer must see EOF when the relay closes it
        self.broken = False

    def end(self, wall_ns: int, mono_ns: int, timeout: float | None) -> bool:
        """Outstanding gaps and the end frame, then the pipe is closed; False if there was no room."""
        if self.closed:
            return False
        ms = -1 if timeout is None else int(timeout * 1000)
        reply = self._relay.request(_END.pack(b"E", wall_ns, mono_ns, ms), None if timeout is None else timeout + 5)
        if reply is not None and reply[:1] == b"e" and reply[1:2] == b"\x01":
            self.closed = True
            return True
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._relay.request(b"C", 10.0)


class NativeRelay:
    """A running ``scopewatch-relay`` between the client, the server and the observer's copy pipe."""

    def __init__(
        self,
        binary: Path,
        *,
        stdin_fd: int,
        stdout_fd: int,
        child_in: int,
        child_out: int,
        tap_fd: int,
        counters: DropCounters,
        patience: int,
        on_broken: Callable[[NativeTap], None],
        on_wake: Callable[[], None],
    ) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = mine
        self._replies: queue.Queue[bytes | None] = queue.Queue()
        self._send_lock = threading.Lock()
        self._request_lock = threading.Lock()
        self.output_done = threading.Event()
        self._gone = threading.Event()
        self.tap = NativeTap(self)
        self._on_broken = on_broken
        self._on_wake = on_wake
        fds = (theirs.fileno(), stdin_fd, stdout_fd, child_in, child_out, tap_fd, counters.fd)
        argv = [str(binary), str(os.getpid()), *(str(fd) for fd in fds), str(patience)]
        try:
            self.proc = subprocess.Popen(argv, pass_fds=fds)  # fds 0-2 inherited: they may be the relayed ones
        finally:
            theirs.close()
        self._reader = threading.Thread(target=self._read, name="scopewatch-relay-ctl", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                msg = self._sock.recv(64)
            except OSError:
                msg = b""
            if not msg:
                break
            kind = msg[:1]
            if kind == b"W":
                self._on_wake()
            elif kind == b"B":
                self.tap.broken = True
                # not in this thread: the end of the session may be waiting here for the relay's answer
                threading.Thread(target=self._on_broken, args=(self.tap,), daemon=True).start()
            elif kind == b"S":
                self.output_done.set()
            else:
                self._replies.put(msg)
        self._gone.set()
        self.output_done.set()
        self._replies.put(None)

    def send(self, msg: bytes, fds: list[int] | None = None) -> None:
        with self._send_lock, contextlib.suppress(OSError):
            if fds:
                socket.send_fds(self._sock, [msg], fds)
            else:
                self._sock.send(msg)

    def request(self, msg: bytes, timeout: float | None) -> bytes | None:
        """Send ``msg`` and wait for the relay's answer (None: no answer, the relay is gone)."""
        with self._request_lock:
            if self._gone.is_set():
                return None
            self.send(msg)
            try:
                return self._replies.get(timeout=timeout)
            except queue.Empty:
                return None

    def quit(self) -> None:
        """Stop the relay (its reading of the client may still be blocked) and reap it."""
        self.send(b"Q")
        try:
            self.proc.wait(QUIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._sock.close()
