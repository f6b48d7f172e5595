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
