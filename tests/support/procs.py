"""Process checks for tests that must leave nothing running."""

from __future__ import annotations

from pathlib import Path


def gone(pid: int) -> bool:
    """True when ``pid`` no longer exists or is a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].startswith("Z")


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
