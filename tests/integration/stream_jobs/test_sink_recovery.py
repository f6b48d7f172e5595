"""The ClickHouse sink under crashes and outages: nothing lost, nothing visible twice.

The sink runs as its own process on its own chDB folder, consuming a fixed input. It is killed
(``os._exit``) at each point of the flush cycle in turn and restarted; then ClickHouse is made
unreachable for a while during a run. The raw tables must hold exactly the input (plain
``count()``, no ``FINAL``: the deduplication tokens, not background merges, keep duplicates out)
and ``evidence_current`` exactly one current verdict per call. After every crash, no evidence row is
stored without its reason and fact lists (migration 0010: the lists are written first).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from schemas import Evidence, ToolCall, ToolResult, encode, key_for, topic_for
from scopewatch.stack import proc
from scopewatch.stack.kafka import KafkaBroker, create_topics
from stream_jobs.runtime.settings import Settings
from support.pipeline import cli
from support.wrap import child_env

pytestmark = pytest.mark.integration

CALLS = 240
T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


def inputs(tag: str) -> list[ToolCall | ToolResult | Evidence]:
    out: list[ToolCall | ToolResult | Evidence] = []
    for i in range(CALLS):
        t = T0 + timedelta(milliseconds=i)
        call_id, session = f"{tag}-c{i}", f"{tag}-s{i % 7}"
        out.append(
            ToolCall(
                event_id=str(uuid.uuid4()),
                event_time=t,
                tenant="acme",
                call_id=call_id,
                session_id=session,
                server="fs",
                tool="read_file",
                arguments={"path": f"/data/{i}"},
                resources=[f"file:/data/{i}"],
                transport="stdio",
            )
        )
        out.append(
            ToolResult(
                event_id=str(uuid.uuid4()),
                event_time=t,
                tenant="acme",
                call_id=call_id,
                session_id=session,
                status="ok",
                duration_ms=1.5,
            )
        )
        for version in (1, 2):
            out.append(
                Evidence(
                    evidence_id=f"{call_id}#{version}",
                    call_id=call_id,
                    tenant="acme",
                    session_id=session,
                    server="fs",
                    tool="read_file",
                    call_time=t,
                    verdict="in_scope",
                    reasons=[f"grant g-{i % 7} covers fs/read_file", f"resource file:/data/{i}"],
                    fact_ids=[f"g-{i % 7}"],
                    fact_hashes=[f"sha256:{i % 7:064d}"],
                    version=version,
                    final=version == 2,
                    late=False,
                    decided_at=t,
                )
            )
    return out


async def produce(settings: Settings, records: list[ToolCall | ToolResult | Evidence]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = []
        for r in records:
            key = r.call_id if isinstance(r, Evidence) else key_for(r)
            futures.append(await producer.send(topic_for(r, settings.topics), encode(r), key=key.encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def start_sink(settings: Settings, log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "scopewatch", "sink"],
        env={**child_env(settings), **env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)


def serving(settings: Settings, sink: subprocess.Popen[bytes]) -> bool:
    """Whether ``sink`` itself serves SQL now. A ``query.json`` left by a crashed sink does not count:
    `scopewatch sql` would then open the chDB folder directly and could hold it just when the new
    sink opens it (the new sink then exits: folder in use)."""
    try:
        return int(json.loads((settings.run_dir / "query.json").read_text())["pid"]) == sink.pid
    except (OSError, ValueError, KeyError):
        return False


def wait_final(settings: Settings, sink: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Poll through a `scopewatch sql` subprocess (never open chDB in this process: the sink owns it)."""
    db = settings.clickhouse_database
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        assert sink.poll() is None, f"the sink exited ({sink.returncode})"
        if serving(settings, sink):
            # the raw tables too: a sink started after the evidence is all in would otherwise stop before them
            sql = (
                f"SELECT least((SELECT count() FROM {db}.evidence_current WHERE final),"
                f" (SELECT count() FROM {db}.tool_calls), (SELECT count() FROM {db}.tool_results)) AS n"
            )
            result = cli(settings, "sql", sql, "--format", "json")
            seen = result.stdout + result.stderr
            if result.returncode == 0 and int(json.loads(result.stdout)[0]["n"]) == CALLS:
                return
        time.sleep(0.5)
    raise AssertionError(f"never saw {CALLS} final verdicts, calls and results; last: {seen[-500:]}")


def _one_row_of_counts(settings: Settings, sql: str) -> dict[str, int]:
    """``sql``'s one row of counts, read through ``scopewatch sql`` (the sink is not running: the folder is free)."""
    result = cli(settings, "sql", sql, "--format", "json")
    assert result.returncode == 0, result.stderr
    return {k: int(v) for k, v in json.loads(result.stdout)[0].items()}


def counts(settings: Settings) -> dict[str, int]:
    db = settings.clickhouse_database
    sql = (
        f"SELECT (SELECT count() FROM {db}.tool_calls) AS calls, (SELECT count() FROM {db}.tool_results) AS results,"
        f" (SELECT count() FROM {db}.evidence) AS evidence, (SELECT count() FROM {db}.evidence_current) AS current,"
        f" (SELECT countIf(version = 2 AND final) FROM {db}.evidence_current) AS final"
    )
    return _one_row_of_counts(settings, sql)


def orphans(settings: Settings) -> dict[str, int]:
    """Evidence rows stored without their lists, and the lists stored (the sink is not running: the folder is free)."""
    db = settings.clickhouse_database
    sql = (
        f"SELECT (SELECT count() FROM {db}.evidence_rows) AS rows,"
        f" (SELECT countIf(reason_key NOT IN (SELECT id FROM {db}.evidence_reason_lists))"
        f"  + countIf(fact_key NOT IN (SELECT id FROM {db}.evidence_fact_lists)) FROM {db}.evidence_rows) AS orphans,"
        f" (SELECT count() FROM (SELECT DISTINCT id FROM {db}.evidence_reason_lists)) AS reason_lists"
    )
    return _one_row_of_counts(settings, sql)


EXPECTED = {"calls": CALLS, "results": CALLS, "evidence": 2 * CALLS, "current": CALLS, "final": CALLS}


def _settings(kafka_broker: KafkaBroker, tmp_path: Path, cache_dir: Path) -> Settings:
    run = uuid.uuid4().hex[:8]
    settings = Settings(
        home=tmp_path / "home",
        cache_dir=cache_dir,
        bootstrap=kafka_broker.config.bootstrap,
        topic_prefix=f"sr{run}.",
        partitions=2,
        query_port=proc.free_port(),
        sink_group=f"sr{run}-sink",
        sink_batch_rows=50,
        sink_backlog_rows=100,  # batches grow while behind, yet enough flushes for every drill
        sink_batch_seconds=0.3,
    )
    asyncio.run(create_topics(settings.kafka_bootstrap, settings.topics.all(), settings.partitions))
    return settings


def test_killed_at_every_point_of_the_flush_cycle_nothing_is_lost_or_doubled(
    kafka_broker: KafkaBroker, tmp_path: Path, cache_dir: Path
) -> None:
    settings = _settings(kafka_broker, tmp_path, cache_dir)
    asyncio.run(produce(settings, inputs("k")))
    log = tmp_path / "sink.log"
    drills = [
        ("after_lists", 1),
        ("after_insert", 2),
        ("after_first_table", 2),
        ("before_insert", 3),
        ("after_commit", 2),
        ("after_insert", 1),
    ]
    for point, batch in drills:
        crashed = start_sink(settings, log, SCOPEWATCH_SINK_CRASH_AT=point, SCOPEWATCH_SINK_CRASH_BATCH=str(batch))
        try:
            assert crashed.wait(timeout=120) == 137, log.read_text()[-3000:]
        finally:
            stop(crashed)
        stored = orphans(settings)
        assert stored["orphans"] == 0, (point, batch, stored)
        if point == "after_lists" and batch == 1:  # the first batch's lists are in, its rows not yet
            assert stored["reason_lists"] > 0 and stored["rows"] == 0, stored
    text = log.read_text()
    assert text.count("found an unfinished batch") >= 3, text[-3000:]
    # every restart says where it resumes, and the redo names its offset ranges
    assert text.count("sink starting: group") >= 4 and "resuming at the committed offsets" in text, text[-3000:]
    assert "re-reading " in text and "@" in text.split("re-reading ", 1)[1].split("\n", 1)[0], text[-3000:]
    sink = start_sink(settings, log)
    try:
        wait_final(settings, sink)
        time.sleep(1.0)  # anything doubled would have landed by now
    finally:
        stop(sink)
    assert counts(settings) == EXPECTED
    assert orphans(settings) == {"rows": 2 * CALLS, "orphans": 0, "reason_lists": CALLS}
    assert "sink stopped: " in log.read_text()


def test_clickhouse_unavailable_for_a_while_nothing_lost_and_it_resumes_by_itself(
    kafka_broker: KafkaBroker, tmp_path: Path, cache_dir: Path
) -> None:
    settings = _settings(kafka_broker, tmp_path, cache_dir)
    outage = tmp_path / "clickhouse-down"
    log = tmp_path / "sink.log"
    sink = start_sink(settings, log, SCOPEWATCH_SINK_FAULT_FILE=str(outage))
    try:
        stats_file = settings.run_dir / "sink-stats.json"
        deadline = time.monotonic() + 60
        while not stats_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        outage.touch()
        asyncio.run(produce(settings, inputs("o")))
        deadline = time.monotonic() + 60
        stats: dict[str, object] = {}
        while time.monotonic() < deadline:
            stats = json.loads(stats_file.read_text())
            if int(str(stats.get("retries", 0))) >= 3:
                break
            time.sleep(0.3)
        assert int(str(stats.get("retries", 0))) >= 3 and stats.get("paused") == 1, stats
        assert sink.poll() is None, "the sink waits out the outage"
        outage.unlink()
        wait_final(settings, sink)
        deadline = time.monotonic() + 15  # the stats file is rewritten every 2 s
        while time.monotonic() < deadline:
            stats = json.loads(stats_file.read_text())
            if stats.get("paused") == 0 and stats.get("lag") == 0:
                break
            time.sleep(0.5)
        assert stats.get("paused") == 0 and stats.get("lag") == 0, stats
    finally:
        stop(sink)
    assert counts(settings) == EXPECTED
