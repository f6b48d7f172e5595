"""The stdio collector against the real npm server-everything, the real broker and the pipeline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from schemas import ToolCall, ToolResult, decode, to_canonical_json
from scopewatch.sqlclient import run_sql
from stream_jobs.runtime.settings import Settings
from support.canaries import BEARER, CANARY_TEXTS, CUSTOM_ARGUMENTS, CUSTOM_PATTERNS, GHP, leaked, seeded_arguments
from support.kafka import reader
from support.mcp_raw import INITIALIZED, call, initialize, run_script
from support.wrap import child_env, wrap_argv

pytestmark = pytest.mark.integration


def script() -> list[object]:
    """A real session: handshake, listing, ok/error/invalid calls, progress notifications, a
    server-ignored batch, a line that is not JSON and a 1 MB message."""
    batch = [call(9, "echo", {"message": "b1"}), call(10, "echo", {"message": "b2"})]
    return [
        initialize(0),
        INITIALIZED,
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        call(2, "echo", {"message": "hi"}),
        call(3, "nope", {}),
        {"jsonrpc": "2.0", "id": 4, "method": "no/such/method"},
        {"jsonrpc": "2.0", "id": "s5", "method": "ping"},
        call(6, "trigger-long-running-operation", {"duration": 0.3, "steps": 3}, meta={"progressToken": "p1"}),
        {"jsonrpc": "2.0", "id": 7, "method": "logging/setLevel", "params": {"level": "debug"}},
        call("8", "get-sum", {"a": 1, "b": 2}),
        call(8, "get-sum", {"a": "one", "b": 2}),
        (json.dumps(batch) + "\n").encode(),
        b"this is not json\n",
        call(11, "echo", {"message": "x" * 1_000_000}),
    ]


# calls in script(): 2, 3, 6, "8", 8, 9, 10, 11 -> 8 tool calls; 9 and 10 (a batch) are never answered
EXPECTED_STATUS = {
    "hi": "ok",
    "nope": "error",
    "long": "ok",
    "sum-ok": "ok",
    "sum-bad": "error",
    "b1": "timeout",
    "b2": "timeout",
    "big": "ok",
}


@pytest.mark.usefixtures("wrap_relay")
def test_relay_is_byte_exact(pipeline: Settings, server_everything: list[str]) -> None:
    direct = run_script(server_everything, script())
    wrapped = run_script(wrap_argv(server_everything, session_id=str(uuid.uuid4())), script(), env=child_env(pipeline))
    assert direct.returncode == 0
    assert wrapped.returncode == 0
    assert len(direct.received) > 1_000_000
    assert wrapped.received == direct.received  # every response, error and notification, byte for byte
    assert b"Starting default (STDIO) server" in wrapped.stderr  # the server's stderr passes through


@pytest.mark.usefixtures("wrap_relay")
def test_relay_bytes_reach_the_server_unchanged(
    pipeline: Settings, server_everything: list[str], tmp_path: Path
) -> None:
    seen_in, seen_out = tmp_path / "in.bin", tmp_path / "out.bin"
    teed = ["sh", "-c", f'tee "{seen_in}" | "$@" | tee "{seen_out}"', "sh", *server_everything]
    result = run_script(wrap_argv(teed, session_id=str(uuid.uuid4())), script(), env=child_env(pipeline))
    assert result.returncode == 0
    assert seen_in.read_bytes() == result.sent
    assert seen_out.read_bytes() == result.received


async def _collect(settings: Settings, session_id: str, want: int, timeout: float = 60.0) -> list[object]:
    topics = settings.topics
    consumer = reader(settings, topics.tool_calls, topics.tool_results)
    await consumer.start()
    found: list[object] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(found) < want:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                for msg in messages:
                    event = decode(msg.value)
                    if getattr(event, "session_id", None) == session_id:
                        assert msg.key == session_id.encode()
                        found.append(event)
        await asyncio.sleep(1.0)  # anything extra (a duplicate) would show up now
        for messages in (await consumer.getmany(timeout_ms=500)).values():
            found.extend(e for e in (decode(m.value) for m in messages) if getattr(e, "session_id", None) == session_id)
    finally:
        await consumer.stop()
    return found


def test_every_tools_call_gives_one_call_and_one_result(pipeline: Settings, server_everything: list[str]) -> None:
    session_id = str(uuid.uuid4())
    result = run_script(wrap_argv(server_everything, session_id=session_id), script(), env=child_env(pipeline))
    assert result.returncode == 0

    events = asyncio.run(_collect(pipeline, session_id, want=16))
    calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert len(calls) == 8 and len(results) == 8
    assert len({c.call_id for c in calls}) == 8
    assert {c.call_id for c in calls} == {r.call_id for r in results}
    by_call = {r.call_id: r for r in results}

    def label(c: ToolCall) -> str:
        if isinstance(c.arguments.get("message"), dict):  # the 1 MB message, replaced by size and digest
            return "big"
        if c.tool == "echo":
            return str(c.arguments["message"])
        if c.tool == "get-sum":
            return "sum-ok" if c.arguments.get("a") == 1 else "sum-bad"
        return {"nope": "nope", "trigger-long-running-operation": "long"}[c.tool]

    statuses = {label(c): by_call[c.call_id].status for c in calls}
    assert statuses == EXPECTED_STATUS
    for c in calls:
        assert c.tenant == "acme" and c.server == "everything" and c.transport == "stdio"
        assert c.claimed.get("client_name") == "scopewatch-tests"
        assert c.collector is not None and c.collector.seq >= 1
        if c.tool == "echo":
            assert c.tool_digest and c.tool_digest.startswith("sha256:")  # learned from tools/list
        if label(c) == "big":  # an oversized argument is replaced by its size and digest
            assert c.arguments["message"]["_truncated"] is True
            assert c.arguments["message"]["_size_bytes"] == 1_000_002
    errors = {label(c): by_call[c.call_id].error for c in calls}
    assert "nope not found" in (errors["nope"] or "")
    # the session binding the collector emitted
    assert by_call and all(r.duration_ms >= 0 for r in results)

    db = pipeline.clickhouse_database
    deadline = time.monotonic() + 60
    counts: list[object] = []
    while time.monotonic() < deadline:
        counts = run_sql(
            pipeline,
            f"SELECT (SELECT count() FROM {db}.tool_calls WHERE session_id = '{session_id}'), "
            f"(SELECT count() FROM {db}.tool_results WHERE session_id = '{session_id}'), "
            f"(SELECT countIf(event_type = 'session_bound') FROM {db}.identity_events "
            f"WHERE session_id = '{session_id}')",
        )["rows"][0]
        if counts == [8, 8, 1]:
            break
        time.sleep(0.5)
    assert counts == [8, 8, 1]
    landed = run_sql(pipeline, f"SELECT call_id FROM {db}.tool_calls WHERE session_id = '{session_id}'")["rows"]
    assert {r[0] for r in landed} == {c.call_id for c in calls}


def test_redaction_canaries_never_leave_the_host(pipeline: Settings, server_everything: list[str]) -> None:
    """Fake secrets of every kind in arguments, a tool name and an error: none reach stderr, Kafka or ClickHouse."""
    session_id = str(uuid.uuid4())
    env = child_env(pipeline)
    env.pop("SCOPEWATCH_REDACTION_KEY", None)  # the per-host key under SCOPEWATCH_HOME
    env["SCOPEWATCH_REDACT_PATTERNS"] = json.dumps(CUSTOM_PATTERNS)
    env["SCOPEWATCH_REDACT_ARGUMENTS"] = ",".join(CUSTOM_ARGUMENTS)
    finite = {k: v for k, v in seeded_arguments().items() if k not in ("ratio", "limits")}
    nan_call = b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get-sum","arguments":{"a":NaN,"b":1}}}'
    steps = [
        initialize(0),
        INITIALIZED,
        call(1, "echo", {**finite, "message": " ".join(CANARY_TEXTS)}),
        call(2, f"nope-{GHP}", {"token": BEARER}),  # the error names the tool
        nan_call + b"\n",  # not JSON to the server; the collector still records the call
    ]
    result = run_script(wrap_argv(server_everything, session_id=session_id), steps, env=env)
    assert result.returncode == 0
    assert leaked(result.stderr.decode("utf-8", "replace")) == []
    key_file = pipeline.home / "redaction.key"
    assert key_file.exists() and key_file.stat().st_mode & 0o777 == 0o600

    events = asyncio.run(_collect(pipeline, session_id, want=6))
    calls = {c.tool: c for c in events if isinstance(c, ToolCall)}
    results = [r for r in events if isinstance(r, ToolResult)]
    assert len(calls) == 3 and len(results) == 3
    for event in events:
        assert isinstance(event, ToolCall | ToolResult)
        assert leaked(to_canonical_json(event)) == [], event
    assert calls["get-sum"].arguments == {"a": "NaN", "b": 1}
    assert calls["echo"].arguments["password"].startswith("[redacted:secret_argument:hmac-sha256:")
    assert not any(r.startswith("file:") for r in calls["echo"].resources)  # no file rule for echo
    assert any(r.startswith("url:https://api.example.com/") for r in calls["echo"].resources)
    [nope] = [c for c in calls.values() if c.tool.startswith("nope-")]
    errors = {r.call_id: r.error for r in results}
    assert "[redacted:github_token:" in (errors[nope.call_id] or "")

    db = pipeline.clickhouse_database
    deadline = time.monotonic() + 60
    rows: list[object] = []
    while time.monotonic() < deadline:
        rows = [
            run_sql(pipeline, f"SELECT * FROM {db}.{table} WHERE session_id = '{session_id}'")["rows"]
            for table in ("tool_calls", "tool_results")
        ]
        if [len(r) for r in rows] == [3, 3]:
            break
        time.sleep(0.5)
    assert [len(r) for r in rows] == [3, 3]
    assert leaked(json.dumps(rows, default=str, ensure_ascii=False)) == []


def _wrap_plain(child: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    env = dict(os.environ, SCOPEWATCH_BOOTSTRAP="127.0.0.1:9", SCOPEWATCH_HOME=str(kwargs.pop("home")))
    argv = [sys.executable, "-m", "scopewatch", "wrap", "--flush-timeout", "0.5", "--", *child]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


@pytest.mark.usefixtures("wrap_relay")
def test_exit_code_and_stderr_propagate(tmp_path: Path) -> None:
    p = _wrap_plain(["sh", "-c", "echo to-stderr >&2; printf out; exit 7"], home=tmp_path)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 7
    assert out == b"out"
    assert b"to-stderr" in err


@pytest.mark.usefixtures("wrap_relay")
def test_death_by_signal_propagates(tmp_path: Path) -> None:
    p = _wrap_plain(["sh", "-c", "kill -KILL $$"], home=tmp_path)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL


@pytest.mark.usefixtures("wrap_relay")
def test_signals_are_forwarded_to_the_server(tmp_path: Path) -> None:
    marker = tmp_path / "got-term"
    child = ["sh", "-c", f"trap 'echo term > {marker}; exit 42' TERM; while :; do sleep 0.05; done"]
    p = _wrap_plain(child, home=tmp_path)
    time.sleep(2.0)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert marker.read_text().strip() == "term"
    assert p.returncode == 42
