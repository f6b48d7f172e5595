"""Pipeline metrics snapshots (stream_jobs/metrics.py): stats in, pipeline_metrics rows out (no services)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from collectors.spool import KIND_EVENT, KIND_LOSS, Segment, encode_payload, inspect_spool
from scopewatch.spools import figures, reader
from stream_jobs.clickhouse import load_migrations
from stream_jobs.metrics import (
    TABLE,
    MetricsReporter,
    metric_rows,
    read_stats_files,
    snapshot_token,
)

NOW = datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC)
AT = NOW.replace(microsecond=123000)
SINK: dict[str, Any] = {
    "rows": 40,
    "rows.tool_calls": 30,
    "rows.evidence": 10,
    "batches": 4,
    "retries": 2,
    "paused": 1,
    "lag": 7,
    "lag_by_topic": {"mcp.tool-calls": 5, "audit.evidence": 2},
}


def _by(rows: list[dict[str, Any]], component: str) -> dict[tuple[str, str], float]:
    return {(r["metric"], r["label"]): r["value"] for r in rows if r["component"] == component}


def _worker(updated: datetime, **counters: int) -> dict[str, Any]:
    return {
        "pid": 11,
        "updated_at": updated.isoformat(),
        "counters": counters,
        "open_calls_stage1": 3,
        "open_calls_stage2": 1,
    }


def test_sink_counters_become_rows_with_lag_per_topic() -> None:
    rows = metric_rows(now=NOW, instance="host-1", sink=SINK)
    assert {(r["at"], r["component"], r["instance"]) for r in rows} == {(AT, "sink", "host-1")}
    assert set(rows[0]) == {"at", "component", "instance", "metric", "label", "value"}
    assert _by(rows, "sink") == {
        ("batches", ""): 4.0,
        ("dead_letters", ""): 0.0,  # written while zero: the panel shows 0, not "no data"
        ("paused", ""): 1.0,
        ("retries", ""): 2.0,
        ("rows", ""): 40.0,
        ("rows", "tool_calls"): 30.0,
        ("rows", "evidence"): 10.0,
        ("consumer_lag", "mcp.tool-calls"): 5.0,
        ("consumer_lag", "audit.evidence"): 2.0,
    }
    assert all(isinstance(r["value"], float) for r in rows)


def test_worker_pager_and_spool_rows_and_stale_files_are_skipped(tmp_path: Path) -> None:
    seg = Segment.create(tmp_path / "tok-000001.seg")
    placed = seg.append([(KIND_EVENT, encode_payload("t", None, b"x" * 100)) for _ in range(4)])
    seg.mark_acked(*placed[0])
    seg.write_ack()
    seg.append([(KIND_LOSS, encode_payload("dl", None, b"loss"))])
    seg.close()
    report = inspect_spool(tmp_path)
    workers = {
        "worker-a-11": _worker(NOW - timedelta(seconds=5), dead_letters=2, dead_letters_decode=2, evidence_in_scope=9),
        "worker-b-12": _worker(NOW - timedelta(minutes=10), dead_letters=99),  # gone: its file stays
    }
    pager = {"at": NOW.timestamp() - 1, "pid": 13, "pending_pages": 2, "recorded.delivered": 5, "routes": ["a"]}
    rows = metric_rows(
        now=NOW,
        instance="host-1",
        sink={},
        workers=workers,
        pager=pager,
        spools=[figures(report), figures(inspect_spool(tmp_path / "x"))],
    )
    assert {r["instance"] for r in rows if r["component"] == "worker"} == {"worker-a-11"}
    assert _by(rows, "worker") == {
        ("dead_letters", ""): 2.0,
        ("dead_letters_decode", ""): 2.0,
        ("evidence_in_scope", ""): 9.0,
        ("open_calls_stage1", ""): 3.0,
        ("open_calls_stage2", ""): 1.0,
    }
    assert {r["instance"] for r in rows if r["component"] == "pager"} == {"pager-13"}
    assert _by(rows, "pager") == {("pending_pages", ""): 2.0, ("recorded", "delivered"): 5.0}
    spool = {(r["instance"], r["metric"]): r["value"] for r in rows if r["component"] == "spool"}
    assert spool[(str(tmp_path), "pending_events")] == 4.0  # 3 events and 1 loss record not delivered
    assert spool[(str(tmp_path), "segments")] == 1.0 and spool[(str(tmp_path), "problems")] == 0.0
    assert 3 * 100 < spool[(str(tmp_path), "pending_bytes")] < 4 * 100 + 200
    assert spool[(str(tmp_path / "x"), "pending_events")] == 0.0  # a missing spool is an empty one
    stale_pager = metric_rows(now=NOW, instance="h", sink={}, pager={**pager, "at": NOW.timestamp() - 600})
    assert _by(stale_pager, "pager") == {}


def test_stats_files_are_read_and_bad_ones_counted(tmp_path: Path) -> None:
    (tmp_path / "worker-a-11.json").write_text(json.dumps(_worker(NOW, dead_letters=1)))
    (tmp_path / "worker-b-12.json").write_text("{not json")
    (tmp_path / "pager-stats.json").write_text(json.dumps({"at": 1, "pid": 2}))
    (tmp_path / "sink-stats.json").write_text("{}")
    files = read_stats_files(tmp_path)
    assert list(files.workers) == ["worker-a-11"] and files.pager == {"at": 1, "pid": 2}
    assert files.unreadable == ["worker-b-12.json"]
    assert read_stats_files(tmp_path / "missing").workers == {}


def test_snapshot_token_is_unique_per_instance_and_time() -> None:
    assert snapshot_token("h-1", NOW) == f"metrics|h-1|{int(NOW.timestamp() * 1000)}"
    assert snapshot_token("h-1", NOW) != snapshot_token("h-1", NOW + timedelta(seconds=10))
    assert snapshot_token("h-1", NOW) != snapshot_token("h-2", NOW)


class _Writer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[str, list[dict[str, Any]], str]] = []

    def insert(self, table: str, rows: list[dict[str, Any]], token: str) -> None:
        if self.fail:
            raise ConnectionError("ClickHouse unavailable")
        self.calls.append((table, rows, token))


def test_reporter_writes_when_due_and_survives_failures(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = [100.0]
    writer = _Writer()
    reporter = MetricsReporter(
        writer, tmp_path, reader([tmp_path / "spool"]), "h-1", interval=10.0, clock=lambda: clock[0]
    )
    assert asyncio.run(reporter.tick(SINK)) is True
    assert asyncio.run(reporter.tick(SINK)) is False  # not due yet
    [(table, rows, token)] = writer.calls
    assert table == TABLE and token.startswith("metrics|h-1|")
    assert {r["component"] for r in rows} == {"sink", "spool"}
    writer.fail = True
    clock[0] += 10.0
    assert asyncio.run(reporter.tick(SINK)) is False  # no exception: the sink goes on
    assert reporter.counters() == {"metrics_snapshots": 1, "metrics_failures": 1}
    assert "pipeline metrics not written" in caplog.text
    writer.fail = False
    clock[0] += 10.0
    assert asyncio.run(reporter.tick(SINK)) is True
    failures = {(r["metric"], r["value"]) for r in writer.calls[-1][1] if r["metric"].startswith("metrics_")}
    assert failures == {("metrics_failures", 1.0), ("metrics_snapshots", 1.0), ("metrics_unreadable_files", 0.0)}


def test_reporter_counts_a_gathering_failure(tmp_path: Path) -> None:
    writer = _Writer()
    reporter = MetricsReporter(writer, tmp_path, reader([tmp_path]), "h-1")
    bad: dict[str, Any] = {"lag_by_topic": 5}  # not a mapping: gathering fails
    assert asyncio.run(reporter.tick(bad)) is False
    assert reporter.failures == 1 and writer.calls == []


def test_metrics_migration_has_a_ttl_and_the_snapshot_columns() -> None:
    [migration] = [m for m in load_migrations() if m.name == "pipeline_metrics"]
    [statement] = migration.statements
    assert "TTL toDateTime(at) + INTERVAL 30 DAY" in statement
    assert "ORDER BY (component, metric, label, at)" in statement
    rows = metric_rows(now=NOW, instance="h", sink=SINK)
    for column in rows[0]:
        assert f"\n    {column} " in statement


def test_stats_files_of_dead_workers_of_this_host_are_stale(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess

    from stream_jobs.metrics import remove_stale_worker_stats, worker_stats_stale

    host = socket.gethostname()
    child = subprocess.Popen(["true"])  # a pid that existed and is gone
    child.wait()
    live = tmp_path / f"worker-{host}-{os.getpid()}.json"
    gone = tmp_path / f"worker-{host}-{child.pid}.json"
    other = tmp_path / "worker-otherhost-1.json"
    for path in (live, gone, other):
        path.write_text(json.dumps(_worker(NOW)))
    assert not worker_stats_stale(live) and worker_stats_stale(gone) and not worker_stats_stale(other)
    files = read_stats_files(tmp_path)
    assert sorted(files.workers) == sorted([live.stem, other.stem]) and files.stale == [gone.name]
    assert remove_stale_worker_stats(tmp_path) == 1 and not gone.exists() and live.exists()
