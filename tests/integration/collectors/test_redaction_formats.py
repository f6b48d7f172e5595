"""Issue 17's missed formats through the real ``scopewatch wrap`` around the real npm servers
(server-filesystem and server-memory, the two the issue measured with).

Secrets in arguments (written to a file, nested, in arrays) and in the servers' error texts --
among them a DSN the server prints with one slash (``postgres:/app:pw@db``) -- never reach a Kafka
topic of the pipeline (calls, results, evidence, findings, the stages' internal and changelog
topics), the broker's segment files, ``tool_calls``, ``tool_results`` or ``evidence_current``; the
servers themselves still get the real bytes (the file or the knowledge graph they wrote holds them).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest

from schemas import ToolCall, ToolResult, decode, to_canonical_json
from scopewatch.sqlclient import run_sql
from scopewatch.stack.kafka import KafkaBroker
from scopewatch.stack.npm import server_filesystem_command, server_memory_command
from stream_jobs.runtime.kafka_admin import list_topics
from stream_jobs.runtime.settings import Settings
from support.kafka import reader
from support.mcp_raw import INITIALIZED, call, initialize, run_script
from support.secret_corpus import SAMPLES, Sample, leaks
from support.wrap import child_env, wrap_argv

pytestmark = pytest.mark.integration

BY_FORMAT = {s.format: s for s in SAMPLES}
IN_CONTENT = (  # the 2026-12-05 misses, and more of the same families
    "azure_storage_connection_string",
    "azure_sas_signature",
    "azure_servicebus_shared_access_key",
    "aws_secret_access_key_bare",
    "sendgrid_api_key",
    "twilio_api_key_sid",
    "twilio_auth_token",
    "gcp_oauth_client_secret",
    "slack_webhook_url",
    "anthropic_api_key",
    "dsn_mysql",
)
IN_ERRORS = ("sendgrid_api_key", "twilio_api_key_sid", "azure_entra_client_secret", "github_fine_grained_pat")
NAMED = (  # every format issue 17 names as having leaked on 2026-12-05
    "azure_storage_connection_string",  # AccountKey=
    "azure_sas_signature",  # sig=
    "aws_secret_access_key_bare",
    "sendgrid_api_key",
    "twilio_api_key_sid",
    "dsn_postgres_one_slash",
)


def _collect(settings: Settings, session_id: str, want: int, timeout: float = 60.0) -> list[object]:
    async def run() -> list[object]:
        consumer = reader(settings, settings.topics.tool_calls, settings.topics.tool_results)
        await consumer.start()
        found: list[object] = []
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and len(found) < want:
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    events = (decode(m.value) for m in messages)
                    found.extend(e for e in events if getattr(e, "session_id", None) == session_id)
        finally:
            await consumer.stop()
        return found

    return asyncio.run(run())


def _leaked(samples: list[Sample], text: str) -> list[tuple[str, list[str]]]:
    return [(s.format, found) for s in samples if (found := leaks(s, text))]


def _pipeline_topics(settings: Settings) -> list[str]:
    """Every topic of this pipeline: its prefixed topics and the workers' changelog topics."""
    names = asyncio.run(list_topics(settings.kafka_bootstrap))
    mine = sorted(n for n in names if n.startswith((settings.topic_prefix, settings.worker_group)))
    assert settings.topics.tool_calls in mine and any(n.endswith("-changelog") for n in mine), mine
    return mine


def _topic_bytes(settings: Settings, topics: list[str]) -> bytes:
    """Keys and values of every record of ``topics``, read to their end."""

    async def run() -> bytes:
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:  # every partition of every topic
            described = await admin.describe_topics(topics)
        finally:
            await admin.close()
        tps = [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]
        assert {tp.topic for tp in tps} == set(topics)
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            out: list[bytes] = []
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    out += [(r.key or b"") + b"\n" + (r.value or b"") for r in records]
            return b"\n".join(out)
        finally:
            await consumer.stop()

    return asyncio.run(run())


def _assert_nowhere(
    settings: Settings, broker: KafkaBroker, session_id: str, samples: list[Sample], calls: int
) -> None:
    """None of ``samples``' secrets, in any form, is on a topic of the pipeline, in the broker's
    segment files, or in the session's rows of tool_calls, tool_results and evidence_current."""
    db = settings.clickhouse_database
    deadline = time.monotonic() + 90
    rows: list[object] = []
    while time.monotonic() < deadline:  # evidence: every call has its (provisional) verdict
        rows = [
            run_sql(settings, f"SELECT * FROM {db}.{table} WHERE session_id = '{session_id}'")["rows"]
            for table in ("tool_calls", "tool_results", "evidence_current")
        ]
        if [len(r) for r in rows] == [calls, calls, calls]:
            break
        time.sleep(0.5)
    assert [len(r) for r in rows] == [calls, calls, calls]
    assert _leaked(samples, json.dumps(rows, default=str, ensure_ascii=False)) == []

    topics = _pipeline_topics(settings)
    on_topics = _topic_bytes(settings, topics)
    assert session_id.encode() in on_topics  # the session's records are there, readable
    assert _leaked(samples, on_topics.decode("utf-8", "replace")) == []
    segments = b"".join(
        p.read_bytes() for p in broker.data_dir.rglob("*.log") if p.parent.name.rpartition("-")[0] in topics
    )
    assert session_id.encode() in segments
    assert _leaked(samples, segments.decode("utf-8", "replace")) == []


def test_missed_formats_never_leave_the_host(
    pipeline: Settings, kafka_broker: KafkaBroker, cache_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    server = server_filesystem_command(cache_dir, root)
    dsn = BY_FORMAT["dsn_postgres_one_slash"]
    content_samples = [BY_FORMAT[f] for f in IN_CONTENT]
    error_samples = [BY_FORMAT[f] for f in IN_ERRORS]
    content = "\n".join(s.context for s in content_samples) + "\n"
    dsn_url = f"postgres://app:{dsn.needle}@db.internal:5432/orders"  # the server prints it with one slash
    steps = [
        initialize(0),
        INITIALIZED,
        call(1, "write_file", {"path": str(root / "settings.env"), "content": content}),
        call(2, "read_text_file", {"path": str(root / dsn_url)}),  # ENOENT ... 'postgres:/app:PW@db...'
        call(3, "create_directory", {"path": "/etc/" + " ".join(s.needle for s in error_samples)}),  # denied
        call(4, "read_multiple_files", {"paths": [str(root / "settings.env"), f"/opt/{content_samples[4].needle}"]}),
    ]
    session_id = str(uuid.uuid4())
    result = run_script(wrap_argv(server, session_id=session_id), steps, env=child_env(pipeline))
    assert result.returncode == 0
    everything = [*content_samples, *error_samples, dsn]

    # the server did its work on the real values
    assert (root / "settings.env").read_text() == content
    responses = result.responses()
    assert "postgres:/app:" + dsn.needle + "@" in json.dumps(responses[2])  # the one-slash form, as issue 17 saw it
    assert responses[3]["result"]["isError"] is True

    events = _collect(pipeline, session_id, want=8)
    calls = {e.call_id: e for e in events if isinstance(e, ToolCall)}
    results = {e.call_id: e for e in events if isinstance(e, ToolResult)}
    assert len(calls) == 4 and len(results) == 4
    for event in events:
        assert _leaked(everything, to_canonical_json(event)) == [], event
    by_tool = {c.tool: c for c in calls.values()}
    stored = by_tool["write_file"].arguments["content"]
    for detector in ("azure_storage_account_key", "azure_sas_signature", "aws_secret_key", "sendgrid_api_key"):
        assert f"[redacted:{detector}:hmac-sha256:" in stored, detector
    errors = {c.tool: results[c.call_id].error or "" for c in calls.values()}
    assert "postgres:/app:[redacted:url_credentials:hmac-sha256:" in errors["read_text_file"]
    assert "[redacted:sendgrid_api_key:" in errors["create_directory"]
    assert "[redacted:twilio_api_key:" in errors["create_directory"]
    assert not any(r for r in by_tool["read_text_file"].resources if dsn.needle in r)

    # nor in the broker's segment files (plain Avro: the session id is there, readable)
    segments = b"".join(p.read_bytes() for p in kafka_broker.data_dir.rglob("*.log") if "tool-" in str(p))
    assert session_id.encode() in segments
    assert [s.format for s in everything if s.needle.encode() in segments] == []

    _assert_nowhere(pipeline, kafka_broker, session_id, everything, 4)  # + every topic, evidence_current


def test_named_formats_through_server_memory_never_leave_the_host(
    pipeline: Settings, kafka_broker: KafkaBroker, cache_dir: Path, tmp_path: Path
) -> None:
    """server-memory stores what it is given and names an unknown entity in its error text: each
    format issue 17 names goes in as an argument, nested in objects and arrays, and comes back in
    results and in error texts."""
    samples = [BY_FORMAT[f] for f in NAMED]
    memory = tmp_path / "memory.jsonl"
    entities = [
        {"name": f"config-{i}", "entityType": "config", "observations": [s.context, f"owner: team-{i}"]}
        for i, s in enumerate(samples)
    ]
    steps = [
        initialize(0),
        INITIALIZED,
        call(1, "create_entities", {"entities": entities}),  # nested objects and arrays; echoed in the result
        # "Entity with name <...> not found": each secret in an error text of the server
        *(
            call(2 + i, "add_observations", {"observations": [{"entityName": s.context, "contents": ["x"]}]})
            for i, s in enumerate(samples)
        ),
        call(2 + len(samples), "read_graph", {}),  # every secret in a result
    ]
    session_id = str(uuid.uuid4())
    env = {**child_env(pipeline), "MEMORY_FILE_PATH": str(memory)}
    result = run_script(wrap_argv(server_memory_command(cache_dir), session_id=session_id), steps, env=env)
    assert result.returncode == 0
    calls = len(steps) - 2

    # the server did its work on the real values, and answered with them
    stored = memory.read_text()
    assert all(json.dumps(s.context)[1:-1] in stored for s in samples)
    responses = result.responses()
    for i, s in enumerate(samples):
        answer = responses[2 + i]["result"]
        assert answer["isError"] is True and s.needle in json.dumps(answer, ensure_ascii=False)
    assert all(s.needle in json.dumps(responses[2 + len(samples)], ensure_ascii=False) for s in samples)

    events = _collect(pipeline, session_id, want=2 * calls)
    results = {e.call_id: e for e in events if isinstance(e, ToolResult)}
    assert len(results) == calls
    assert sum(1 for r in results.values() if r.status == "error") == len(samples)
    for event in events:
        assert _leaked(samples, to_canonical_json(event)) == [], event
    errors = " ".join(r.error or "" for r in results.values())
    for detector in ("azure_storage_account_key", "azure_sas_signature", "aws_secret_key", "sendgrid_api_key"):
        assert f"[redacted:{detector}:hmac-sha256:" in errors, detector
    assert "postgres:/app:[redacted:url_credentials:hmac-sha256:" in errors
    assert "[redacted:twilio_api_key:" in errors
    _assert_nowhere(pipeline, kafka_broker, session_id, samples, calls)
