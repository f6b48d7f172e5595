"""Small process helpers for the local stack launcher.

Everything here is plain functions plus one small record type; nothing runs at
import time and no module-level state is kept.

Processes are started detached (own session and process group, stdin from
``/dev/null``, stdout/stderr appended to a log file) and tracked through a JSON
pid record.  The record stores the kernel's start time of the process
(``/proc/<pid>/stat`` field 22, clock ticks since boot) next to the pid, so a
later ``stop`` never signals an unrelated process that happens to have
recycled the pid.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stream_jobs.runtime.files import atomic_write, process_start_time
from stream_jobs.runtime.files import read_stat as _read_stat

__all__ = [
    "PidRecord",
    "free_port",
    "is_running",
    "port_is_free",
    "process_start_time",
    "read_pid_record",
    "spawn_daemon",
    "stop_process",
    "tail",
    "write_pid_record",
]

# Runs inside a short-lived intermediate interpreter: starts the real process in
# its own session and reports its pid (or the exec error) as JSON on stdout, then
# exits at once.  The daemon is therefore re-parented to init (or the nearest
# subreaper) and never lingers as a zombie of the calling process.
_LAUNCHER = r"""
import json, os, subprocess, sys
argv = json.loads(sys.argv[1])
log_path = sys.argv[2]
try:
    with open(os.devnull, "rb") as devnull, open(log_path, "ab", buffering=0) as log:
        proc = subprocess.Popen(argv, stdin=devnull, stdout=log, stderr=subprocess.STDOUT,
                                close_fds=True, start_new_session=True)
    out = {"pid": proc.pid}
except OSError as exc:
    out = {"error": f"{type(exc).__name__}: {exc}"}
sys.stdout.write(json.dumps(out))
sys.stdout.flush()
os._exit(0)
"""


def port_is_free(host: str, port: int) -> bool:
    """Return True when a TCP listener could bind ``host:port`` right now.

    The probe uses ``SO_REUSEADDR`` like most servers (including the JVM) do, so
    sockets lingering in TIME_WAIT after a restart do not count as "in use",
    while a socket that is bound or listening does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port the kernel considers free on ``host`` (for tests).

    The port is released before returning, so another process could grab it in
    between; good enough for tests that start a server right away.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def _process_state(pid: int) -> str | None:
    fields = _read_stat(pid)
    if not fields:
        return None
    return fields[0]


@dataclass(frozen=True)
class PidRecord:
    """What is needed to find (and safely signal) a process again later.

    Attributes:
        pid: Process id.
        name: Human-readable service name, e.g. ``"kafka"``.
        argv: Command line the process was started with.
        started_at: Wall-clock start time (seconds since the epoch).
        start_ticks: Kernel start time from ``/proc/<pid>/stat`` (field 22);
            None when the process was already gone when the record was made.
        extra: Free-form extra data (ports, paths, ...), JSON-serialisable.
    """

    pid: int
    name: str
    argv: list[str]
    started_at: float
    start_ticks: int | None
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def for_pid(
        cls,
        pid: int,
        name: str,
        argv: Sequence[str],
        extra: Mapping[str, object] | None = None,
    ) -> PidRecord:
        """Build a record for a running ``pid``, capturing its kernel start time."""
        return cls(
            pid=pid,
            name=name,
            argv=list(argv),
            started_at=time.time(),
            start_ticks=process_start_time(pid),
            extra=dict(extra or {}),
        )

    def to_json(self) -> str:
        """Serialise to a JSON document."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PidRecord:
        """Parse a document written by :meth:`to_json`.

        Raises:
            ValueError: when the document is not a valid record.
        """
        try:
            data = json.loads(text)
            ticks = data.get("start_ticks")
            return cls(
                pid=int(data["pid"]),
                name=str(data.get("name", "")),
                argv=[str(a) for a in data.get("argv", [])],
                started_at=float(data.get("started_at", 0.0)),
                start_ticks=None if ticks is None else int(ticks),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"invalid pid record: {exc}") from exc


def write_pid_record(path: Path, record: PidRecord) -> None:
    """Atomically write ``record`` as JSON to ``path`` (parent dirs are created)."""
    atomic_write(path, record.to_json() + "\n")


def read_pid_record(path: Path) -> PidRecord | None:
    """Read a pid record; None when the file is missing or unreadable/corrupt."""
    try:
        return PidRecord.from_json(path.read_text())
    except (OSError, ValueError):
        return None


def is_running(record: PidRecord) -> bool:
    """True when the recorded process is alive and is still the same process.

    The pid must exist, its kernel start time must match the record (so a
    recycled pid is not mistaken for ours) and it must not be a zombie.
    """
    if record.start_ticks is None or record.pid <= 0:
        return False
    if process_start_time(record.pid) != record.start_ticks:
        return False
    state = _process_state(record.pid)
    return state is not None and state not in ("Z", "X", "x")


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, if given, started at ``start_ticks`` (not recycled)."""
    if pid <= 0 or (start_ticks is not None and process_start_time(pid) != start_ticks):
        return False
    state = _process_state(pid)
    return state is not None and state not in ("Z", "X", "x")


def _reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is our (exited) child."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    except OSError:
        pass


def _signal_group(record: PidRecord, sig: signal.Signals) -> None:
    """Send ``sig`` to the record's process group (or just the pid) if it is ours."""
    if not is_running(record):
        return
    try:
        pgid = os.getpgid(record.pid)
    except ProcessLookupError:
        return
    try:
        if pgid == record.pid:
            os.killpg(pgid, sig)
        else:  # not a group leader: do not signal a group that is not ours
            os.kill(record.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        raise PermissionError(f"not allowed to signal {record.name or 'process'} pid {record.pid}: {exc}") from exc


def _wait_gone(record: PidRecord, timeout: float) -> bool:
    """Wait until the process is gone (reaping it if it is our child)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        _reap(record.pid)
        if not is_running(record):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def stop_process(record: PidRecord, timeout: float = 20.0) -> bool:
    """Stop the recorded process: SIGTERM its process group, then SIGKILL.

    Nothing is signalled unless the pid still belongs to the recorded process
    (see :func:`is_running`).  After ``timeout`` seconds the group is killed
    with SIGKILL.  An exited child of the caller is reaped.

    Returns:
        True if the process was running when called, False otherwise.
    """
    if not is_running(record):
        _reap(record.pid)
        return False
    _signal_group(record, signal.SIGTERM)
    if not _wait_gone(record, timeout):
        _signal_group(record, signal.SIGKILL)
        if not _wait_gone(record, 10.0):
            raise TimeoutError(f"{record.name or 'process'} pid {record.pid} survived SIGKILL")
    return True


def spawn_daemon(
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start ``argv`` as a detached daemon and return its pid.

    The process gets its own session and process group (so its pid is also
    its process-group id), stdin from ``/dev/null``, and stdout+stderr appended
    to ``log_path`` (parent dirs are created).  It is started through a
    short-lived intermediate interpreter, so it is not a child of the caller
    and outlives it without becoming a zombie.

    Raises:
        FileNotFoundError / OSError: when the program cannot be executed.
    """
    if not argv:
        raise ValueError("argv must not be empty")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    launcher = [
        sys.executable,
        "-I",
        "-S",
        "-c",
        _LAUNCHER,
        json.dumps([str(a) for a in argv]),
        str(log_path),
    ]
    result = subprocess.run(
        launcher,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=dict(env) if env is not None else None,
        cwd=str(cwd) if cwd is not None else None,
        timeout=60,
        check=False,
    )
    try:
        out = json.loads(result.stdout.decode() or "{}")
    except json.JSONDecodeError:
        out = {}
    if "pid" in out:
        return int(out["pid"])
    detail = out.get("error") or result.stderr.decode(errors="replace").strip()
    if detail.startswith("FileNotFoundError"):
        raise FileNotFoundError(errno.ENOENT, f"cannot execute {argv[0]!r}: {detail}")
    raise OSError(f"cannot start {argv[0]!r}: {detail or f'launcher exit {result.returncode}'}")


def tail(path: Path, lines: int = 40) -> str:
    """Last ``lines`` lines of a text file ("" when it does not exist)."""
    if lines <= 0:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            block = 8192
            data = b""
            pos = size
            while pos > 0 and data.count(b"\n") <= lines:
                step = min(block, pos)
                pos -= step
                fh.seek(pos)
                data = fh.read(step) + data
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
