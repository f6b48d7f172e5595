"""The SDK middleware publishing to the real broker: in-process over memory streams, and over stdio."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from collectors.sdk import SdkCollector
from schemas import SessionBound, SessionEnded, ToolCall, ToolResult, decode
from scopewatch.stack.kafka import KafkaBroker, create_topics
from stream_jobs.runtime.settings import Settings
from support.kafka import reader
from support.wrap import child_env

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path: Path, kafka_broker: KafkaBroker, cache_dir: Path) -> Settings:
    s = Settings(
        home=tmp_path / "home",
        cache_dir=cache_dir,
        bootstrap=kafka_broker.config.bootstrap,
        topic_prefix=f"sdk{uuid.uuid4().hex[:8]}.",
        partitions=2,
    )
    asyncio.run(create_topics(s.kafka_bootstrap, s.topics.all(), s.partitions))
    return s


def _env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    env = child_env(settings)
    env["SCOPEWATCH_SPOOL_DIR"] = str(tmp_path / "spool")
    env["SCOPEWATCH_REDACTION_KEY"] = "an-integration-test-key-of-32-bytes"
    return env


async def _landed(settings: Settings, want: int, timeout: float = 60.0) -> list[tuple[bytes, Any]]:
    consumer = reader(settings)
    await consumer.start()
    found: list[tuple[bytes, Any]] = []
    try:
        deadline = time.monotonic() + timeout
        while len(found) < want and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                found.extend((m.key, decode(m.value)) for m in messages)
        await asyncio.sleep(1.0)
        for messages in (await consumer.getmany(timeout_ms=500)).values():
            found.extend((m.key, decode(m.value)) for m in messages)
    finally:
        await consumer.stop()
    return found


def _check(found: list[tuple[bytes, Any]], calls: int) -> None:
    events = [e for _k, e in found]
    assert all(key == e.session_id.encode() for key, e in found)
    assert len({e.event_id for e in events}) == len(events) == 2 + 2 * calls
    assert sum(isinstance(e, SessionBound) for e in events) == sum(isinstance(e, SessionEnded) for e in events) == 1
    tool_calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert all(c.transport == "sdk" and c.server == "notes" and c.tenant == "acme" for c in tool_calls)
    assert {r.call_id for r in results} == {c.call_id for c in tool_calls}
    assert sorted(e.collector.seq for e in events) == list(range(1, len(events) + 1))  # one unbroken chain
    assert len({e.collector.id for e in events}) == 1


async def test_in_process_server_events_land_on_kafka(settings: Settings, tmp_path: Path) -> None:
    from mcp import Client
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("notes")

    @server.tool()
    def add_note(text: str) -> str:
        return f"noted: {text}"

    collector = SdkCollector.start(
        tenant="acme", principal="alice", agent_id="agent-1", environ=_env(settings, tmp_path)
    )
    collector.install(server)
    async with Client(server, mode="legacy") as client:
        for i in range(5):
            assert not (await client.call_tool("add_note", {"text": f"n{i}"})).is_error
    stats = await asyncio.to_thread(collector.close, 30)
    assert stats.sent == 12 and stats.lost_queue_full == 0 and stats.spooled_at_close == 0
    _check(await _landed(settings, 12), 5)


SERVER = """
import sys
from mcp.server.mcpserver import MCPServer
from collectors.sdk import SdkCollector

server = MCPServer("notes")

@server.tool()
def add_note(text: str) -> str:
    return "noted: " + text

collector = SdkCollector.start(tenant="acme", principal="bob", agent_id="agent-2")
collector.install(server)
try:
    server.run("stdio")
finally:
    stats = collector.close(10)
    print(f"sdk collector: sent={stats.sent} spooled={stats.spooled_at_close}", file=sys.stderr)
"""


def test_a_stdio_server_with_the_middleware(settings: Settings, tmp_path: Path) -> None:
    from mcp import Client, StdioServerParameters

    script = tmp_path / "notes_server.py"
    script.write_text(textwrap.dedent(SERVER))
    env = _env(settings, tmp_path)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[3])

    async def session() -> None:
        params = StdioServerParameters(command=sys.executable, args=[str(script)], env=env)
        async with Client(params, read_timeout_seconds=60) as client:
            await client.list_tools()
            for i in range(3):
                result = await client.call_tool("add_note", {"text": f"s{i}"})
                assert not result.is_error
            assert (await client.call_tool("add_note", {})).is_error  # invalid arguments: an error result

    asyncio.run(session())
    found = asyncio.run(_landed(settings, 10))
    _check(found, 4)
    results = [e for _k, e in found if isinstance(e, ToolResult)]
    assert sorted(r.status for r in results) == ["error", "ok", "ok", "ok"]
