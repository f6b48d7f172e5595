"""A per-cycle timeline of a stream job, for the latency bench (off unless ``SCOPEWATCH_TRACE_DIR`` is set).

The setting is read in ``main()`` like every other (``Settings.trace_dir`` / ``trace_role``): each
service calls :meth:`Trace.configure` as it starts; nothing is read at import. With it set, each
process appends JSON lines to ``<dir>/<role>-<pid>.jsonl``: one per runner cycle (wall start,
seconds spent taking, processing, on the timer, flushing and committing, records in and messages
out), one per sink insert unit, and one per cyclic-GC collection of generation 1 or 2 (or any
generation taking ≥ 5 ms). ``bench/latency_timeline.py`` lines them up with the per-call
latencies. Writing a line costs a few µs; a job runs tens of cycles per second.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO


class Trace:
    """Where the lines go (``enabled`` False: nothing is written, nothing measured)."""

    def __init__(self, directory: str | Path | None = None, role: str | None = None) -> None:
        self.enabled = False
        self._dir: Path | None = None
        self._role = role
        self._file: TextIO | None = None
        self._gc_start = 0.0
        self.configure(directory, role)

    def configure(self, directory: str | Path | None, role: str | None = None) -> None:
        """Where this process's lines go (None: off); called by each service's entry point."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.enabled = bool(directory)
        self._dir = Path(directory) if directory else None
        self._role = role

    def _out(self) -> TextIO:
        if self._file is None:
            assert self._dir is not None
            self._dir.mkdir(parents=True, exist_ok=True)
            name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "python"
            role = self._role or name
            self._file = (self._dir / f"{role}-{os.getpid()}.jsonl").open("a", buffering=1 << 16)
        return self._file

    def line(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        fields["k"] = kind
        out = self._out()
        out.write(json.dumps(fields, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def watch_gc(self) -> None:
        """Record the cyclic GC's pauses (gen 1 and 2 always, gen 0 when ≥ 5 ms)."""
        if not self.enabled or self._gc_callback in gc.callbacks:
            return
        gc.callbacks.append(self._gc_callback)

    def _gc_callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_start
        gen = info.get("generation", 0)
        if gen or took >= 0.005:
            self.line("gc", t=time.time(), gen=gen, s=round(took, 5), n=info.get("collected", 0))


TRACE = Trace()
"""The process's trace, off until a service's entry point configures it from its settings."""
