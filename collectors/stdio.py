"""``scopewatch wrap -- COMMAND ...``: a stdio MCP collector.

The wrapper runs an MCP server as its child and relays stdin and stdout byte for byte
(read a chunk, write the same chunk, nothing reframed or buffered). A copy of each
chunk goes to an observer thread that parses the newline-delimited JSON-RPC messages
and publishes ``tool_call`` / ``tool_result`` events; publishing never blocks the relay.
stderr is inherited, signals are forwarded, and the child's exit status is ours.

Redaction happens in the observer, before an event is handed to the publisher, so no
argument, error text or resource leaves the host unredacted. Its configuration comes from
the environment (``collectors`` may not depend on ``scopewatch.settings``; these variables
share its ``SCOPEWATCH_`` prefix, which the settings ignore):

``SCOPEWATCH_REDACTION_KEY``
    the HMAC key of the fingerprints (at least 16 bytes; e.g. ``openssl rand -hex 32``). Set
    the same key on every host whose fingerprints analysts want to join.
``SCOPEWATCH_REDACTION_KEY`` unset
    a random per-host key, created on first use in ``$SCOPEWATCH_HOME/redaction.key`` --
    or ``~/.scopewatch/redaction.key`` without ``SCOPEWATCH_HOME``: the settings' default home
    (``./.scopewatch``) depends on the working directory, which MCP clients choose, and the
    key must not change between sessions. The file is created atomically with mode 0600 (a
    racing wrapper uses the winner's key); a key file that group or others may access is
    refused, as is a short one.
``SCOPEWATCH_REDACT_PATTERNS``
    extra detectors, a JSON object ``{"name": "regex", ...}``.
``SCOPEWATCH_REDACT_ARGUMENTS``
    extra credential-like argument names, comma-separated.
``SCOPEWATCH_MAX_ARGUMENT_BYTES``
    the size cap of stored arguments (default 64 KiB).
``SCOPEWATCH_RESOURCE_RULES``
    a JSON file with resource rules: a list of ``{"tools": [...], "templates": [...]}``, or
    an object ``{"rules": [...], "defaults": true, "max_resources": 256}``.

Events Kafka cannot take right now are spooled to disk (already redacted) and delivered in order
when it is back -- by the next wrapper started with the same spool directory if this one dies:
``SCOPEWATCH_SPOOL_DIR`` (default: ``spool`` under the key file's folder) and the size limit, fsync
policy and full-spool behaviour of :mod:`collectors.spool`.

A bad setting stops the wrapper before it starts the server (fail closed). Neither the key
nor any unredacted value is ever written to stderr.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretBytes, ValidationError

from collectors.chain import ChainStamper
from collectors.observer import McpSessionObserver, utc_from_ns
from collectors.redact import MIN_KEY_BYTES, Redactor
from collectors.resources import ResourceExtractor
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
        configure_observer(self.observer, os.environ)
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
                _warn(f"observer error ({type(exc).__name__}): {self._describe(exc)}")

    def _describe(self, exc: Exception) -> str:
        """An exception's message, redacted and short (it may quote what the agent sent)."""
        try:
            return self.observer.redact_text(str(exc))[:300]
        except Exception:  # noqa: BLE001 - never let a log line take the observer down
            return "(message withheld)"

    def _emit_all(self, events: list[Event]) -> None:
        for event in events:
            self.emit(event)
            self.stats.events += 1


class WrapError(RuntimeError):
    pass


# -- redaction and resource configuration ----------------------------------------------------
KEY_ENV = "SCOPEWATCH_REDACTION_KEY"
KEY_FILE = "redaction.key"


def configure_observer(observer: McpSessionObserver, environ: Mapping[str, str]) -> None:
    """Give ``observer`` the host's redactor (unless it has one) and any configured resource rules."""
    if observer.redactor is None:
        observer.redactor = redactor_from_env(environ)
    extractor = extractor_from_env(environ)
    if extractor is not None:
        observer.extractor = extractor


def redactor_from_env(environ: Mapping[str, str]) -> Redactor:
    """The redaction policy of this host (see the module docstring)."""
    try:
        patterns = json.loads(environ.get("SCOPEWATCH_REDACT_PATTERNS") or "{}")
    except ValueError as exc:
        raise WrapError(f"SCOPEWATCH_REDACT_PATTERNS is not JSON: {exc.args[0]}") from None
    names = tuple(n.strip() for n in (environ.get("SCOPEWATCH_REDACT_ARGUMENTS") or "").split(",") if n.strip())
    config: dict[str, Any] = {"patterns": patterns, "argument_names": names}
    if environ.get("SCOPEWATCH_MAX_ARGUMENT_BYTES"):
        config["max_argument_bytes"] = environ["SCOPEWATCH_MAX_ARGUMENT_BYTES"]
    try:
        return Redactor.model_validate({**config, "key": SecretBytes(redaction_key(environ))})
    except ValidationError as exc:
        raise WrapError(f"redaction settings: {_errors(exc)}") from None


def extractor_from_env(environ: Mapping[str, str]) -> ResourceExtractor | None:
    """The resource rules of ``SCOPEWATCH_RESOURCE_RULES``, or ``None`` (use the defaults)."""
    where = environ.get("SCOPEWATCH_RESOURCE_RULES")
    if not where:
        return None
    try:
        config = json.loads(Path(where).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WrapError(f"cannot read resource rules {where}: {exc}") from None
    try:
        return ResourceExtractor.model_validate({"rules": config} if isinstance(config, list) else config)
    except ValidationError as exc:
        raise WrapError(f"resource rules {where}: {_errors(exc)}") from None


def redaction_key(environ: Mapping[str, str]) -> bytes:
    """``SCOPEWATCH_REDACTION_KEY``, else the host key file (created on first use)."""
    given = environ.get(KEY_ENV)
    if given:
        key = given.encode("utf-8")
        if len(key) < MIN_KEY_BYTES:
            raise WrapError(f"{KEY_ENV} must have at least {MIN_KEY_BYTES} bytes")
        return key
    return host_key(key_file(environ))


def key_file(environ: Mapping[str, str]) -> Path:
    """Where the per-host key lives: under ``SCOPEWATCH_HOME``, else under ``~/.scopewatch``."""
    home = environ.get("SCOPEWATCH_HOME")
    base = Path(home).expanduser().resolve() if home else Path.home() / ".scopewatch"
    return base / KEY_FILE


def host_key(path: Path) -> bytes:
    """The key stored at ``path``; a new random one if there is none yet (mode 0600)."""
    if not path.exists():
        try:
            _create_key_file(path)
        except OSError as exc:
            raise WrapError(f"cannot create the redaction key {path}: {exc.strerror or exc}") from None
    try:
        mode = path.stat().st_mode
        key = path.read_bytes().strip()
    except OSError as exc:
        raise WrapError(f"cannot read the redaction key {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise WrapError(f"the redaction key {path} is accessible to group or others: chmod 600 it")
    if len(key) < MIN_KEY_BYTES:
        raise WrapError(f"the redaction key in {path} is shorter than {MIN_KEY_BYTES} bytes")
    return key


def _create_key_file(path: Path) -> None:
    """Write a fresh key to a private temporary file, then link it into place unless one exists."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".redaction-key-")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secrets.token_hex(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another wrapper won the race: use its key
            os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _errors(exc: ValidationError) -> str:
    """Validation errors without the input values (which may be secrets)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg'].removeprefix('Value error, ')}"
        for err in exc.errors(include_input=False)
    )


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
