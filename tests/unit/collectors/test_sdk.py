"""The SDK middleware with a real `mcp` server and client in-process (memory streams and direct dispatch)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError

from collectors.redact import Redactor
from collectors.sdk import ScopewatchMiddleware, SdkCollector
from schemas import Event, SessionBound, SessionEnded, ToolCall, ToolResult
from support.canaries import GHP, leaked

KEY = b"k" * 32


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("mcp").setLevel(logging.CRITICAL)


def _server(executed: list[str]) -> MCPServer:
    server = MCPServer("files")

    @server.tool()
    def read_file(path: str) -> str:
        executed.append(path)
        return f"contents of {path}"

    @server.tool()
    def fail(message: str) -> str:
        raise ValueError(message)

    @server.tool()
    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    @server.tool()
    def connect(url: str, password: str) -> str:
        return "connected"

    return server


def _install(server: MCPServer, events: list[Event], **kw: Any) -> ScopewatchMiddleware:
    record = kw.pop("record", events.append)
    middleware = ScopewatchMiddleware(record, tenant="acme", redactor=Redactor(key=KEY), **kw)
    collector = SdkCollector(middleware, publisher=None)  # type: ignore[arg-type]
    collector.install(server)
    return middleware


async def test_a_handshake_session_records_calls_results_and_its_end() -> None:
    events: list[Event] = []
    executed: list[str] = []
    server = _server(executed)
    _install(server, events, principal="alice@example.com", agent_id="agent-1")
    async with Client(server, mode="legacy") as client:  # memory streams, JSON-RPC, initialize
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} >= {"read_file", "fail"}
        ok = await client.call_tool("read_file", {"path": "/data/a.txt"})
        bad = await client.call_tool("fail", {"message": "boom"})
        missing = await client.call_tool("nope", {})
        assert not ok.is_error and bad.is_error and missing.is_error
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["SessionBound", *["ToolCall", "ToolResult"] * 3, "SessionEnded"]
    bound, ended = events[0], events[-1]
    assert isinstance(bound, SessionBound) and isinstance(ended, SessionEnded)
    assert (bound.principal, bound.agent_id, bound.tenant) == ("alice@example.com", "agent-1", "acme")
    calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert {e.session_id for e in events} == {bound.session_id}
    assert [c.tool for c in calls] == ["read_file", "fail", "nope"]
    assert all(c.transport == "sdk" and c.server == "files" for c in calls)
    assert calls[0].resources == ["file:/data/a.txt"] and calls[0].arguments == {"path": "/data/a.txt"}
    assert calls[0].tool_digest and calls[0].tool_digest.startswith("sha256:")  # learned from tools/list
    assert calls[2].tool_digest is None
    assert calls[0].claimed.get("client_name")  # the client's initialize
    assert [r.call_id for r in results] == [c.call_id for c in calls]
    assert [r.status for r in results] == ["ok", "error", "error"]
    assert "Unknown tool" in (results[2].error or "")
    assert executed == ["/data/a.txt"]


async def test_the_stateless_protocol_shares_one_session_per_middleware() -> None:
    events: list[Event] = []
    server = _server([])
    middleware = _install(server, events, session_id="shared-1", principal="svc@example.com", agent_id="batch-7")
    async with Client(server) as client:  # the 2026-07-28 protocol: per-request envelopes, no handshake
        assert client.protocol_version == "2026-07-28"
        await client.list_tools()
        await client.call_tool("read_file", {"path": "/x"})
        await client.call_tool("read_file", {"path": "/y"})
    assert not any(isinstance(e, SessionEnded) for e in events)  # no connection ends it
    middleware.close()
    assert isinstance(events[0], SessionBound) and isinstance(events[-1], SessionEnded)
    assert {e.session_id for e in events} == {"shared-1"}  # type: ignore[attr-defined]
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert len(calls) == 2
    assert all(c.claimed.get("client_name") for c in calls)  # from each request's envelope
    assert all(c.tool_digest for c in calls)


async def test_secrets_in_arguments_never_reach_the_events() -> None:
    events: list[Event] = []
    server = _server([])
    _install(server, events)
    async with Client(server, mode="legacy") as client:
        await client.call_tool("connect", {"url": f"https://x:{GHP}@api.example.com/", "password": "hunter2-secret"})
    [call] = [e for e in events if isinstance(e, ToolCall)]
    assert call.arguments["password"].startswith("[redacted:")
    assert leaked(call.model_dump_json()) == []
    assert "hunter2-secret" not in call.model_dump_json()


async def test_concurrent_calls_are_matched_to_their_results() -> None:
    events: list[Event] = []
    server = _server([])
    _install(server, events)
    async with Client(server, mode="legacy") as client:
        await asyncio.gather(client.call_tool("slow", {"seconds": 0.3}), client.call_tool("slow", {"seconds": 0.0}))
    calls = {e.call_id: e for e in events if isinstance(e, ToolCall)}
    results = [e for e in events if isinstance(e, ToolResult)]
    assert len(calls) == 2 and {r.call_id for r in results} == set(calls)
    durations = sorted(r.duration_ms for r in results)
    assert durations[0] < 200 <= durations[1]


async def test_fail_closed_refuses_a_call_that_could_not_be_recorded() -> None:
    events: list[Event] = []
    executed: list[str] = []
    server = _server(executed)

    def refuse_calls(event: Event) -> bool:
        events.append(event)
        return not isinstance(event, ToolCall)  # as when the spool is full and on_full=fail

    middleware = _install(server, events, record=refuse_calls, fail_closed=True)
    async with Client(server, mode="legacy") as client:
        with pytest.raises(MCPError, match="could not be recorded"):
            await client.call_tool("read_file", {"path": "/secret-plans"})
    assert executed == [] and middleware.refused == 1
    [result] = [e for e in events if isinstance(e, ToolResult)]
    assert result.status == "error" and "fails closed" in (result.error or "")


async def test_a_broken_recorder_never_breaks_the_server() -> None:
    def explode(_event: Event) -> None:
        raise RuntimeError("collector bug")

    server = _server([])
    ScopewatchMiddleware(explode)  # constructing is enough to show the type fits
    server.middleware.append(ScopewatchMiddleware(explode))
    async with Client(server, mode="legacy") as client:
        result = await client.call_tool("read_file", {"path": "/a"})
    assert not result.is_error
