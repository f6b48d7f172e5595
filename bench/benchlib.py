"""Shared by the benchmark scripts: what machine and what code a result belongs to."""

from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The sources whose speed or size the benchmarks measure.
CODE = (
    "detections/live.py",
    "detections/compact.py",
    "detections/engine.py",
    "schemas/codec.py",
    "schemas/events.py",
    "stream_jobs/app.py",
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores (nproc), {cpu_model()}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; load average now {load}; "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )


def code_fingerprint(paths: tuple[str, ...] = CODE) -> str:
    """``file sha256[:10]`` of each measured source (there is no commit to name while it changes)."""
    parts = []
    for rel in paths:
        try:
            digest = hashlib.sha256((ROOT / rel).read_bytes()).hexdigest()[:10]
        except OSError:
            digest = "missing"
        parts.append(f"{rel} {digest}")
    return ", ".join(parts)
