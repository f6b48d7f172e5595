"""Process checks for tests that must leave nothing running."""

from __future__ import annotations

from pathlib import Path

from stream_jobs.metrics import process_gone as gone

__all__ = ["gone", "observer_processes"]


def observer_processes(wrapper: int) -> list[int]:
    """The observer process(es) a running `scopewatch wrap` forked (named ``scopewatch-obs``)."""
    found = []
    for children in Path(f"/proc/{wrapper}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "scopewatch-obs":
                    found.append(int(pid))
            except OSError:
                pass
    return found


def relay_processes(wrapper: int) -> list[int]:
    """The native relay process(es) of a running `scopewatch wrap` (``scopewatch-relay``)."""
    found = []
    for children in Path(f"/proc/{wrapper}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "scopewatch-rela":  # comm: 15 characters
                    found.append(int(pid))
            except OSError:
                pass
    return found
