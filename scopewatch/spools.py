"""The collectors' spools on this host, as figures for the sink's metrics (``stream_jobs.metrics``).

The CLI owns this join: the services do not import the collectors, so ``scopewatch sink`` hands
the sink a function that reads the spool directories here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from collectors.config import CollectorConfig, ConfigError
from collectors.spool import SpoolReport, inspect_spool
from stream_jobs.metrics import SpoolFigures

__all__ = ["figures", "reader", "spool_dirs"]

log = logging.getLogger("scopewatch.metrics")


def spool_dirs(environ: Mapping[str, str], home: Path | None = None) -> list[Path]:
    """The collectors' spool directories on this host.

    The one collectors use (:attr:`collectors.config.CollectorConfig.spool_path`:
    ``SCOPEWATCH_SPOOL_DIR``, else ``<state home>/spool``) always, and ``<home>/spool`` when it
    exists and is another directory (the settings' home, when ``SCOPEWATCH_HOME`` is not set).
    """
    dirs: list[Path] = []
    try:
        dirs.append(CollectorConfig.from_env(environ).spool_path)
    except (RuntimeError, ConfigError) as exc:  # no home directory to expand, or invalid settings
        log.warning("no collector spool directory (%s)", exc)
    if home is not None:
        other = (home / "spool").expanduser().resolve()
        if other not in dirs and other.is_dir():
            dirs.append(other)
    return dirs


def figures(report: SpoolReport) -> SpoolFigures:
    """One spool report as the metrics' figures."""
    return SpoolFigures(
        dir=str(report.dir),
        pending_events=report.pending,
        pending_bytes=sum(max(0, s.good_end - s.acked_offset) for s in report.segments if s.pending > 0),
        segments=len(report.segments),
        problems=len(report.problems),
        live_writers=sum(report.locks.values()),
    )


def reader(dirs: Iterable[Path]) -> Callable[[], list[SpoolFigures]]:
    """A function that inspects ``dirs`` (read-only; a missing one is empty) each time it is called."""
    fixed = list(dirs)

    def read() -> list[SpoolFigures]:
        return [figures(inspect_spool(d)) for d in fixed]

    return read
