"""Pipeline health metrics for ClickHouse (``pipeline_metrics``, migration 0004).

The sink appends a snapshot every :data:`INTERVAL_SECONDS` through its ``ClickHouseWriter`` (it is
the one process that owns an embedded chDB): its own counters, the counters the workers and the
pager write to the run folder (``worker-*.json``, ``pager-stats.json``) and the depth of the
collectors' spool directories on this host.

:func:`metric_rows` is pure (stats in, rows out); :func:`read_stats_files` reads the files, and the
CLI hands in the spools' figures. One row per value: ``component`` (sink, worker, pager, spool), ``instance``,
``metric``, ``label`` and ``value``. A counter named ``a.b`` (``rows.tool_calls``,
``recorded.delivered``) becomes metric ``a`` with label ``b``; the sink's lag becomes
``consumer_lag`` with the topic as label. Counters are cumulative since their process started.

A stats file older than :data:`STALE_SECONDS` belongs to a process that is gone (its file stays in the
run folder): it is skipped, so a dead worker's frozen counters do not look alive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

__all__ = [
    "INTERVAL_SECONDS",
    "STALE_SECONDS",
    "TABLE",
    "MetricsReporter",
    "SpoolFigures",
    "StatsFiles",
    "instance_name",
    "metric_rows",
    "read_stats_files",
    "snapshot_token",
]

log = logging.getLogger("scopewatch.metrics")

TABLE: Final = "pipeline_metrics"
INTERVAL_SECONDS: Final = 10.0
"""How often the sink appends a snapshot."""
STALE_SECONDS: Final = 60.0
"""Stats files not updated for this long are from processes that are gone."""

SINK_ALWAYS: Final = ("rows", "batches", "retries", "dead_letters", "paused")
"""Sink counters written even while zero (a Counter omits them until they move)."""
WORKER_ALWAYS: Final = ("dead_letters", "open_calls_stage1", "open_calls_stage2")
_NOT_METRICS: Final = frozenset({"at", "pid", "updated_at", "start_ticks"})

Row = dict[str, Any]


def _number(value: Any) -> float | None:
    """A stats value as a metric value; None for what is not a finite number (lists, text)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _split(name: str) -> tuple[str, str]:
    metric, _, label = name.partition(".")
    return metric, label


def _counter_rows(
    at: datetime, component: str, instance: str, values: Mapping[str, Any], always: Iterable[str] = ()
) -> list[Row]:
    found: dict[tuple[str, str], float] = {(name, ""): 0.0 for name in always}
    for name, raw in values.items():
        value = _number(raw)
        if name in _NOT_METRICS or value is None:
            continue
        found[_split(name)] = value
    return [
        {"at": at, "component": component, "instance": instance, "metric": m, "label": lb, "value": v}
        for (m, lb), v in sorted(found.items())
    ]


def _updated_at(stats: Mapping[str, Any]) -> datetime | None:
    """When a stats file was written: ``updated_at`` (ISO, the workers) or ``at`` (epoch seconds)."""
    raw = stats.get("updated_at", stats.get("at"))
    try:
        if isinstance(raw, str):
            when = datetime.fromisoformat(raw)
            return when if when.tzinfo else when.replace(tzinfo=UTC)
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return datetime.fromtimestamp(raw, UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _fresh(stats: Mapping[str, Any], now: datetime, stale_seconds: float) -> bool:
    when = _updated_at(stats)
    return when is None or (now - when).total_seconds() <= stale_seconds


@dataclass(frozen=True)
class SpoolFigures:
    """What one collector spool directory holds, as the metrics table records it.

    The CLI reads the spools (``scopewatch.spools``, on ``collectors.spool``) and hands these in:
    the services do not import the collectors.
    """

    dir: str
    pending_events: int
    pending_bytes: int
    segments: int
    problems: int
    live_writers: int


def _spool_rows(at: datetime, spool: SpoolFigures) -> list[Row]:
    values = {
        "pending_events": spool.pending_events,
        "pending_bytes": spool.pending_bytes,
        "segments": spool.segments,
        "problems": spool.problems,
        "live_writers": spool.live_writers,
    }
    return _counter_rows(at, "spool", spool.dir, values)


def metric_rows(
    *,
    now: datetime,
    instance: str,
    sink: Mapping[str, Any],
    workers: Mapping[str, Mapping[str, Any]] | None = None,
    pager: Mapping[str, Any] | None = None,
    spools: Sequence[SpoolFigures] = (),
    stale_seconds: float = STALE_SECONDS,
) -> list[Row]:
    """One snapshot as ``pipeline_metrics`` rows, all stamped ``now`` (UTC, milliseconds).

    ``sink``: ``ClickHouseSink.stats()`` (plus the service's own counters); ``workers``: worker stats
    file name (its stem, host and pid) -> its content; ``pager``: the pager's stats file, if any;
    ``spools``: the collectors' spools on this host. Stale stats files are skipped.
    """
    at = now.astimezone(UTC).replace(microsecond=now.microsecond // 1000 * 1000)
    rows: list[Row] = []
    sink_counters = {k: v for k, v in sink.items() if k not in ("lag", "lag_by_topic")}
    rows += _counter_rows(at, "sink", instance, sink_counters, SINK_ALWAYS)
    lag_by_topic = sink.get("lag_by_topic") or {}
    for topic, lag in sorted(lag_by_topic.items()):
        value = _number(lag)
        if value is not None:
            rows.append(
                {
                    "at": at,
                    "component": "sink",
                    "instance": instance,
                    "metric": "consumer_lag",
                    "label": str(topic),
                    "value": value,
                }
            )
    for name, stats in sorted((workers or {}).items()):
        if not _fresh(stats, now, stale_seconds):
            continue
        counters = stats.get("counters")
        values: dict[str, Any] = dict(counters) if isinstance(counters, Mapping) else {}
        values.update({k: v for k, v in stats.items() if k.startswith("open_calls_")})
        rows += _counter_rows(at, "worker", name, values, WORKER_ALWAYS)
    if pager is not None and _fresh(pager, now, stale_seconds):
        pid = pager.get("pid")
        rows += _counter_rows(at, "pager", f"pager-{pid}" if pid is not None else "pager", pager)
    for spool in spools:
        rows += _spool_rows(at, spool)
    return rows


def snapshot_token(instance: str, now: datetime) -> str:
    """Insert deduplication token of one snapshot: a retried insert of it lands once."""
    return f"metrics|{instance}|{int(now.timestamp() * 1000)}"


# ----------------------------------------------------------------------------- reading


class StatsFiles:
    """What the run folder holds: worker stats by file stem, the pager's stats, files not readable."""

    def __init__(self) -> None:
        self.workers: dict[str, dict[str, Any]] = {}
        self.pager: dict[str, Any] | None = None
        self.unreadable: list[str] = []
        self.stale: list[str] = []
        """Worker stats files of this host whose process is gone (left by a crash): not read."""


def _read_json(path: Path, out: StatsFiles) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None  # the process removed it between the listing and the read
    except (OSError, ValueError) as exc:
        log.debug("cannot read %s: %s", path, exc)
        out.unreadable.append(path.name)
        return None
    if not isinstance(data, dict):
        out.unreadable.append(path.name)
        return None
    return data


def read_stats_files(run_dir: Path) -> StatsFiles:
    """The workers' ``worker-*.json`` and the pager's ``pager-stats.json`` in ``run_dir``."""
    out = StatsFiles()
    for path in sorted(run_dir.glob("worker-*.json")):
        if worker_stats_stale(path):
            out.stale.append(path.name)
            continue
        data = _read_json(path, out)
        if data is not None:
            out.workers[path.stem] = data
    pager = run_dir / "pager-stats.json"
    if pager.exists():
        out.pager = _read_json(pager, out)
    return out


def worker_stats_stale(path: Path, host: str | None = None) -> bool:
    """Is this a worker stats file (``worker-HOST-PID.json``) of this host whose process is gone?"""
    prefix = f"worker-{host or socket.gethostname()}-"
    if not (path.name.startswith(prefix) and path.suffix == ".json"):
        return False
    try:
        pid = int(path.stem[len(prefix) :])
    except ValueError:
        return False
    return process_gone(pid)


def process_gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped (a killed daemon whose parent is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:  # no /proc here: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return stat[stat.rfind(")") + 2 :].startswith("Z")


def remove_stale_worker_stats(run_dir: Path) -> int:
    """Remove the stats files :func:`worker_stats_stale` names; how many."""
    removed = 0
    for path in run_dir.glob("worker-*.json"):
        if worker_stats_stale(path):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def instance_name(hostname: str | None = None, pid: int | None = None) -> str:
    import socket

    return f"{hostname or socket.gethostname()}-{pid or os.getpid()}"


# ----------------------------------------------------------------------------- writing


class Inserter(Protocol):
    def insert(self, table: str, rows: list[dict[str, Any]], token: str) -> None: ...


class MetricsReporter:
    """Appends a snapshot every ``interval`` seconds through ``writer`` (the sink's ClickHouseWriter).

    :meth:`tick` never raises (except cancellation): a snapshot that cannot be gathered or written is
    logged as a warning and counted in ``failures``, and the sink goes on.
    """

    def __init__(
        self,
        writer: Inserter,
        run_dir: Path,
        spools: Callable[[], Sequence[SpoolFigures]],
        instance: str,
        *,
        interval: float = INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer = writer
        self.run_dir = run_dir
        self.spools = spools
        self.instance = instance
        self.interval = interval
        self.clock = clock
        self.snapshots = 0
        self.failures = 0
        self._next = clock()

    def counters(self) -> dict[str, int]:
        return {"metrics_snapshots": self.snapshots, "metrics_failures": self.failures}

    def gather(self, sink_stats: Mapping[str, Any], now: datetime) -> list[Row]:
        """Read the run folder and the spools; the snapshot's rows."""
        files = read_stats_files(self.run_dir)
        return metric_rows(
            now=now,
            instance=self.instance,
            sink={**sink_stats, **self.counters(), "metrics_unreadable_files": len(files.unreadable)},
            workers=files.workers,
            pager=files.pager,
            spools=self.spools(),
        )

    def write(self, sink_stats: Mapping[str, Any], now: datetime | None = None) -> int:
        """Gather and insert one snapshot now (blocking); returns the rows written. Raises on failure."""
        now = now or datetime.now(UTC)
        rows = self.gather(sink_stats, now)
        self.writer.insert(TABLE, rows, snapshot_token(self.instance, now))
        return len(rows)

    async def tick(self, sink_stats: Mapping[str, Any]) -> bool:
        """Write a snapshot (in a thread) if one is due; True if one was written."""
        if self.clock() < self._next:
            return False
        self._next = self.clock() + self.interval
        try:
            await asyncio.to_thread(self.write, dict(sink_stats))
        except Exception as exc:  # noqa: BLE001 - metrics are best effort; never stop the sink
            self.failures += 1
            log.warning("pipeline metrics not written (%d failures so far): %s", self.failures, exc)
            return False
        self.snapshots += 1
        return True
