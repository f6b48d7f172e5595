"""The decision job and the sink against the real broker and chDB: bad input, provenance, SQL access."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer

from schemas import ToolCall, encode, key_for
from scopewatch.sqlclient import SqlError, run_sql
from stream_jobs.runtime.settings import Settings
from support.pipeline import wait_rows

pytestmark = pytest.mark.integration


async def produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


def a_call(session_id: str) -> ToolCall:
    return ToolCall(
        event_id=str(uuid.uuid4()),
        event_time=datetime.now(UTC),
        tenant="acme",
        call_id=str(uuid.uuid4()),
        session_id=session_id,
        server="fs",
        tool="read_file",
        arguments={"path": "/data/a.txt"},
        resources=["file:/data/a.txt"],
        transport="sdk",
        attested=None,
        claimed={},
        tool_digest=None,
    )


def test_bad_messages_are_dead_lettered_and_the_rest_flows(pipeline: Settings) -> None:
    session_id = str(uuid.uuid4())
    good = a_call(session_id)
    garbage = b"\x00not avro at all " + session_id.encode()
    truncated = encode(a_call(session_id))[:-7]
    asyncio.run(
        produce(
            pipeline,
            pipeline.topics.tool_calls,
            [
                (session_id.encode(), garbage),
                (session_id.encode(), truncated),
                (key_for(good).encode(), encode(good)),
            ],
        )
    )
    db = pipeline.clickhouse_database
    # the good call lands with its Kafka provenance and gets a verdict
    rows = wait_rows(
        pipeline,
        f"SELECT _topic, _partition, _offset, call_id FROM {db}.tool_calls WHERE session_id = '{session_id}'",
        lambda r: len(r) == 1,
    )
    assert rows[0][0] == pipeline.topics.tool_calls and rows[0][3] == good.call_id
    # no session is bound: a provisional, then (after the 3 s grace) a final unbound_session
    verdicts = wait_rows(
        pipeline,
        f"SELECT version, verdict, final FROM {db}.evidence WHERE call_id = '{good.call_id}' ORDER BY version",
        lambda r: len(r) == 2,
    )
    assert verdicts == [[1, "unbound_session", False], [2, "unbound_session", True]]
    # both bad messages are dead-lettered by the decision job and by the sink, with reasons and the raw bytes
    letters = wait_rows(
        pipeline,
        f"SELECT stage, reason, payload_b64 FROM {db}.dead_letters WHERE key = '{session_id}' ORDER BY stage, reason",
        lambda r: len(r) == 4,
    )
    assert sorted(r[0] for r in letters) == ["attribute", "attribute", "sink", "sink"]
    reasons = " | ".join(str(r[1]) for r in letters)
    assert "single-object" in reasons.lower() or "magic" in reasons.lower()
    assert "truncated" in reasons.lower() or "corrupt" in reasons.lower()
    payloads = {base64.b64decode(str(r[2])) for r in letters}
    assert payloads == {garbage, truncated}


def test_sql_endpoint_is_read_only_and_authenticated(pipeline: Settings) -> None:
    db = pipeline.clickhouse_database
    with pytest.raises(SqlError, match=r"(?i)read-?only"):
        run_sql(pipeline, f"DROP TABLE {db}.tool_calls")
    with pytest.raises(SqlError, match=r"(?i)read-?only"):
        run_sql(pipeline, f"INSERT INTO {db}.dead_letters (dead_letter_id) VALUES ('x')")
    with pytest.raises(SqlError, match=r"(?i)syntax"):
        run_sql(pipeline, "SELEC 1")
    assert run_sql(pipeline, f"SELECT count() FROM {db}.schema_migrations")["rows"][0][0] >= 1
    port = json.loads((pipeline.run_dir / "query.json").read_text())["port"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/query",
        data=b'{"sql": "SELECT 1"}',
        headers={"Authorization": "Bearer wrong"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401
    token_file = pipeline.run_dir / "query-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
