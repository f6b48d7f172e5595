"""Small helpers shared by the evidence-store and collector benchmarks (issues 4 and 6).

Re-uses the conventions of ``decisions_throughput.py`` (its ``say``/``cpu_times`` helpers and its
rich console) and ``benchlib.py`` (``machine``, ``code_fingerprint``), adds percentiles, PASS/MISS
cells, CPU pinning and a wait for a quiet machine.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import code_fingerprint, machine
from decisions_throughput import console, cpu_times, say

__all__ = [
    "add_common_options",
    "code_fingerprint",
    "console",
    "cpu_times",
    "load_text",
    "machine",
    "mark",
    "percentile",
    "pin_to",
    "quiet_load",
    "remove_temp",
    "say",
    "wait_for_quiet",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``, linear between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mark(ok: bool) -> str:
    return "[green]PASS[/]" if ok else "[red]MISS[/]"


def load_text() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def wait_for_quiet(threshold: float, max_wait: float) -> str:
    """Wait (up to ``max_wait`` s) until the 1-minute load average is at most ``threshold``.

    Other people run test suites on this machine; the figures are only worth recording on a quiet
    one. Returns the load average (1/5/15 min) when the wait ended, whatever it is.
    """
    deadline = time.monotonic() + max_wait
    first = True
    while os.getloadavg()[0] > threshold and time.monotonic() < deadline:
        if first:
            say(f"load average {load_text()} > {threshold}: waiting up to {max_wait:.0f}s for a quieter machine")
            first = False
        time.sleep(15)
    if os.getloadavg()[0] > threshold:
        say(f"[yellow]load average still {load_text()} after {max_wait:.0f}s: measuring anyway[/]")
    return load_text()


def pin_to(cpu: int | None) -> str:
    """Restrict this process (and threads it starts later) to one CPU; returns a description."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return f"not pinned ({len(os.sched_getaffinity(0))} CPUs allowed)"
    cpu = cpu % (os.cpu_count() or 1)
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``--max-load``, ``--wait`` and ``--keep``, the same in every script of issues 4 and 6."""
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for this 1-min load average (0: never)")
    parser.add_argument("--wait", type=float, default=600, help="wait at most this many seconds for it")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, data)")


def quiet_load(args: argparse.Namespace) -> str:
    """Wait for a quiet machine as the common options say; the load average measured under."""
    return wait_for_quiet(args.max_load, args.wait) if args.max_load else load_text()


def remove_temp(tmp: Path, keep: bool) -> None:
    if keep:
        say(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
