"""`scopewatch publish` onto the real broker: topics, keys, file order, bad lines."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import decode, delegation_key
from stream_jobs.runtime.settings import Settings
from support.kafka import reader
from support.scenario import bound, grant, jsonl, revoke, tool_call
from support.wrap import child_env

pytestmark = pytest.mark.integration


async def consume_all(settings: Settings, want: int) -> list[tuple[str, bytes, object]]:
    t = settings.topics
    consumer = reader(settings, t.tool_calls, t.sessions, t.grants)
    await consumer.start()
    out: list[tuple[str, bytes, object]] = []
    try:
        for _ in range(60):
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                out += [(m.topic, m.key, decode(m.value)) for m in messages]
            if len(out) >= want:
                break
    finally:
        await consumer.stop()
    return out


def test_publish_routes_keys_and_keeps_order(pipeline: Settings, tmp_path: Path) -> None:
    session = "pub-session-1"
    events = [
        bound("10:00:00", session, "carol@acme.example", "agent/x"),
        grant("10:00:01", "g-pub-1", "carol@acme.example", "agent/x", ["fs/*"]),
        *[tool_call(f"10:00:{i + 2:02d}", f"pub-call-{i}", session, "fs", "read_file") for i in range(5)],
        revoke("10:00:09", "g-pub-1", "carol@acme.example", "agent/x"),
    ]
    text = jsonl(events[:3]) + "{not json\n" + jsonl(events[3:]) + '{"event_type": "tool_call"}\n'
    path = tmp_path / "events.jsonl"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "scopewatch", "publish", str(path)],
        env=child_env(pipeline),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "line 4:" in result.stderr and "line 10:" in result.stderr
    assert "published" in result.stderr

    got = [
        (topic, key, ev)
        for topic, key, ev in asyncio.run(consume_all(pipeline, 8))
        if getattr(ev, "session_id", None) == session or getattr(ev, "grant_id", None) == "g-pub-1"
    ]
    t = pipeline.topics
    calls = [ev.call_id for topic, _, ev in got if topic == t.tool_calls]  # type: ignore[attr-defined]
    assert calls == [f"pub-call-{i}" for i in range(5)]  # one key, one partition: file order
    assert all(key == session.encode() for topic, key, _ in got if topic in (t.tool_calls, t.sessions))
    grants = [(key, ev.event_type) for topic, key, ev in got if topic == t.grants]  # type: ignore[attr-defined]
    dkey = delegation_key("acme", "carol@acme.example", "agent/x").encode()
    assert grants == [(dkey, "grant_issued"), (dkey, "grant_revoked")]


def test_an_event_too_large_for_kafka_is_a_bad_line_not_a_crash(pipeline: Settings, tmp_path: Path) -> None:
    big = tool_call("10:00:00", "pub-big", "pub-session-big", "fs", "write_file")
    big["arguments"] = {"content": "x" * 1_500_000}  # under the 4 MiB line limit, over Kafka's 1 MB message limit
    after = tool_call("10:00:01", "pub-after-big", "pub-session-big", "fs", "read_file")
    path = tmp_path / "big.jsonl"
    path.write_text(jsonl([big, after]))
    result = subprocess.run(
        [sys.executable, "-m", "scopewatch", "publish", str(path)],
        env=child_env(pipeline),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "line 1: too large for Kafka" in result.stderr
    assert f"published 1 to {pipeline.topics.tool_calls}" in result.stderr
