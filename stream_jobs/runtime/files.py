"""Files the services keep on this host: written atomically (stats, pid and token files), and the
identity of a process (its start time), so a stats or pid file names one process, not a reused pid."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write", "process_start_time", "read_stat"]


def read_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` starting at field 3 (state), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces or ')'.
    end = raw.rfind(")")
    if end < 0:
        return None
    return raw[end + 1 :].split()


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22).

    Returns None when the process does not exist.
    """
    fields = read_stat(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3
    except ValueError:
        return None


def atomic_write(path: Path, text: str, *, durable: bool = False) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new file, never half (parents created).

    ``durable`` also fsyncs the file and its folder, so the new content survives a power loss.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
