"""Helpers for tests that drive the running pipeline: CLI runs and waiting on ClickHouse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from scopewatch.sqlclient import run_sql
from scopewatch.stack import proc
from stream_jobs.runtime.settings import Settings
from support.wrap import child_env


def wait_rows(
    settings: Settings, sql: str, predicate: Callable[[list[list[object]]], bool], timeout: float = 60.0
) -> list[list[object]]:
    """Poll a query until ``predicate(rows)`` holds; AssertionError with the last rows on timeout."""
    deadline = time.monotonic() + timeout
    rows: list[list[object]] = []
    while time.monotonic() < deadline:
        rows = run_sql(settings, sql)["rows"]
        if predicate(rows):
            return rows
        time.sleep(0.3)
    raise AssertionError(f"timed out; last rows: {rows}")


def stack_env(home: Path, cache_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a whole local stack (its own broker, free ports) in ``home``; ``extra`` without the prefix."""
    env = dict(
        os.environ,
        SCOPEWATCH_HOME=str(home),
        SCOPEWATCH_CACHE_DIR=str(cache_dir),
        SCOPEWATCH_KAFKA_PORT=str(proc.free_port()),
        SCOPEWATCH_KAFKA_CONTROLLER_PORT=str(proc.free_port()),
        SCOPEWATCH_QUERY_PORT=str(proc.free_port()),
        SCOPEWATCH_PARTITIONS="2",
        SCOPEWATCH_GRACE_SECONDS="3",
    )
    env.update({f"SCOPEWATCH_{k.upper()}": v for k, v in extra.items()})
    env.pop("SCOPEWATCH_BOOTSTRAP", None)
    return env


def cli_env(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m scopewatch ARGS`` with exactly this environment; its output captured."""
    argv = [sys.executable, "-m", "scopewatch", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def cli(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return cli_env(child_env(settings), *args, timeout=timeout)


def replay_output(settings: Settings, path: Path) -> list[dict[str, object]]:
    """``scopewatch replay`` on a file: its lines, parsed."""
    result = cli(settings, "replay", str(path))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def replay_lines(settings: Settings, path: Path) -> dict[str, tuple[str, str | None]]:
    """``scopewatch replay`` on a file: call_id -> (verdict, matched_grant_id)."""
    return {str(d["call_id"]): (str(d["verdict"]), d["matched_grant_id"]) for d in replay_output(settings, path)}  # type: ignore[misc]


def wait_findings(
    settings: Settings, call_ids: list[str], expected: int, timeout: float = 120.0
) -> dict[str, list[str]]:
    """Wait until ``expected`` findings of these calls are in ClickHouse; call_id -> sorted rule ids."""
    ids = ",".join(f"'{c}'" for c in call_ids)
    sql = (
        f"SELECT call_id, arraySort(groupUniqArray(rule_id)) FROM {settings.clickhouse_database}.findings"
        f" WHERE call_id IN ({ids}) GROUP BY call_id"
    )
    rows = wait_rows(settings, sql, lambda r: sum(len(row[1]) for row in r) >= expected, timeout)  # type: ignore[arg-type,misc]
    return {str(r[0]): list(r[1]) for r in rows}  # type: ignore[call-overload]


def current_verdicts(settings: Settings, call_ids: list[str], timeout: float = 180.0) -> dict[str, list[object]]:
    """Wait until every call has a final verdict in ClickHouse; call_id -> [verdict, matched, version, late].

    The current version of a call is picked as ``evidence_current`` does: the highest version, the
    last ingested of that version. (A worker killed mid-flush may have sent a version's evidence
    without the state that numbered it; the survivor then sends that version again, e.g. final
    where the first was provisional. ``argMax(x, version)`` alone picks either row of the tie.)"""
    ids = ",".join(f"'{c}'" for c in call_ids)
    db = settings.clickhouse_database
    latest = "(version, _ingested_at)"
    sql = (
        f"SELECT call_id, argMax(verdict, {latest}), argMax(matched_grant_id, {latest}), max(version),"
        f" argMax(final, {latest}), argMax(late, {latest}) FROM {db}.evidence WHERE call_id IN ({ids})"
        " GROUP BY call_id"
    )
    rows = wait_rows(settings, sql, lambda r: len(r) == len(call_ids) and all(row[4] for row in r), timeout)
    return {str(r[0]): [r[1], r[2], r[3], r[5]] for r in rows}
