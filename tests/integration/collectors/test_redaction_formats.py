"""Issue 17's missed formats through the real ``scopewatch wrap`` around the real npm server-filesystem.

Secrets in arguments (written to a file, nested, in arrays) and in the server's error texts --
among them a DSN the server prints with one slash (``postgres:/app:pw@db``) -- never reach the
Kafka topics, the broker's segment files or ClickHouse; the server itself still gets the real
bytes (the file it wrote holds them).
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
from scopewatch.stack.npm import server_filesystem_command
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

    db = pipeline.clickhouse_database
    deadline = time.monotonic() + 60
    rows: list[object] = []
    while time.monotonic() < deadline:
        rows = [
            run_sql(pipeline, f"SELECT * FROM {db}.{table} WHERE session_id = '{session_id}'")["rows"]
            for table in ("tool_calls", "tool_results")
        ]
        if [len(r) for r in rows] == [4, 4]:
            break
        time.sleep(0.5)
    assert [len(r) for r in rows] == [4, 4]
    assert _leaked(everything, json.dumps(rows, default=str, ensure_ascii=False)) == []
