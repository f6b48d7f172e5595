"""The pure MCP session observer: messages in, events out."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone

import pytest

from collectors.observer import McpSessionObserver, SessionIdentity, canonical_digest
from schemas import SessionBound, SessionEnded, ToolCall, ToolResult

T0 = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)


def observer(principal: str | None = "alice", agent: str | None = "agent-1") -> McpSessionObserver:
    counter = itertools.count()
    ident = SessionIdentity(session_id="s-1", tenant="acme", principal=principal, agent_id=agent)
    return McpSessionObserver(ident, server_label="fs", new_id=lambda: f"00000000-0000-4000-8000-{next(counter):012d}")


def req(i: object, method: str, params: dict[str, object] | None = None) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": i, "method": method, "params": params or {}}


def call(i: object, tool: str, args: object = None) -> dict[str, object]:
    return req(i, "tools/call", {"name": tool, "arguments": args if args is not None else {}})


def test_call_and_ok_result() -> None:
    o = observer()
    [c] = o.from_client(call(1, "read_file", {"path": "/a"}), T0, 10.0)
    assert isinstance(c, ToolCall)
    assert (c.tool, c.server, c.session_id, c.tenant, c.transport) == ("read_file", "fs", "s-1", "acme", "stdio")
    assert c.arguments == {"path": "/a"} and c.event_time == T0 and c.attested is None
    [r] = o.from_server({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}, T0 + timedelta(seconds=1), 10.25)
    assert isinstance(r, ToolResult)
    assert (r.call_id, r.status, r.error, r.duration_ms) == (c.call_id, "ok", None, 250.0)
    assert r.result_digest == canonical_digest({"content": []})


@pytest.mark.parametrize(
    ("response", "status", "error"),
    [
        ({"error": {"code": -32602, "message": "bad args"}}, "error", "-32602: bad args"),
        (
            {"result": {"isError": True, "content": [{"type": "text", "text": "Tool nope not found"}]}},
            "error",
            "Tool nope not found",
        ),
        ({"result": {"isError": False, "content": []}}, "ok", None),
    ],
)
def test_error_results(response: dict[str, object], status: str, error: str | None) -> None:
    o = observer()
    o.from_client(call(7, "x"), T0, 0.0)
    [r] = o.from_server({"jsonrpc": "2.0", "id": 7, **response}, T0, 0.001)
    assert (r.status, r.error) == (status, error)


def test_string_and_number_ids_are_distinct_and_unknown_responses_ignored() -> None:
    o = observer()
    [a] = o.from_client(call(1, "a"), T0, 0.0)
    [b] = o.from_client(call("1", "b"), T0, 0.0)
    assert o.from_server({"jsonrpc": "2.0", "id": 99, "result": {}}, T0, 0.0) == []
    [rb] = o.from_server({"jsonrpc": "2.0", "id": "1", "result": {}}, T0, 0.0)
    [ra] = o.from_server({"jsonrpc": "2.0", "id": 1, "result": {}}, T0, 0.0)
    assert (ra.call_id, rb.call_id) == (a.call_id, b.call_id)
    assert o.from_server({"jsonrpc": "2.0", "id": 1, "result": {}}, T0, 0.0) == []  # answered once only


def test_batches_notifications_and_server_requests() -> None:
    o = observer()
    events = o.from_client([call(1, "a"), call(2, "b"), {"jsonrpc": "2.0", "method": "notifications/x"}], T0, 0.0)
    assert [e.tool for e in events if isinstance(e, ToolCall)] == ["a", "b"]
    # a server->client request with a colliding id is not a response
    assert o.from_server({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage"}, T0, 0.0) == []
    assert (
        len(
            o.from_server(
                [{"jsonrpc": "2.0", "id": 1, "result": {}}, {"jsonrpc": "2.0", "id": 2, "result": {}}], T0, 0.0
            )
        )
        == 2
    )


def test_tool_digests_from_tools_list_and_server_label_from_initialize() -> None:
    o = McpSessionObserver(SessionIdentity("s", "t"))
    o.from_client(req(0, "initialize", {"clientInfo": {"name": "claude", "version": "9"}}), T0, 0.0)
    o.from_server({"jsonrpc": "2.0", "id": 0, "result": {"serverInfo": {"name": "srv"}}}, T0, 0.0)
    tool = {"name": "echo", "inputSchema": {"type": "object"}}
    o.from_client(req(1, "tools/list"), T0, 0.0)
    o.from_server({"jsonrpc": "2.0", "id": 1, "result": {"tools": [tool]}}, T0, 0.0)
    [c] = o.from_client(call(2, "echo"), T0, 0.0)
    [d] = o.from_client(call(3, "unlisted"), T0, 0.0)
    assert c.server == "srv" and c.tool_digest == canonical_digest(tool) and d.tool_digest is None
    assert c.claimed == {"client_name": "claude", "client_version": "9"}
    # a changed definition gives a different digest (what a rug-pull rule compares)
    o.from_client(req(4, "tools/list"), T0, 0.0)
    o.from_server({"jsonrpc": "2.0", "id": 4, "result": {"tools": [{**tool, "description": "now evil"}]}}, T0, 0.0)
    [e] = o.from_client(call(5, "echo"), T0, 0.0)
    assert e.tool_digest != c.tool_digest


def test_session_start_and_finish() -> None:
    o = observer()
    [bound] = o.start(T0)
    assert isinstance(bound, SessionBound)
    assert (bound.principal, bound.agent_id, bound.valid_from, bound.valid_until) == ("alice", "agent-1", T0, None)
    [c] = o.from_client(call(1, "slow"), T0, 0.0)
    end = o.finish(T0 + timedelta(seconds=3), 3.0)
    assert isinstance(end[0], ToolResult) and end[0].status == "timeout" and end[0].call_id == c.call_id
    assert isinstance(end[1], SessionEnded) and end[1].event_time == T0 + timedelta(seconds=3)


def test_unbound_session_emits_no_binding() -> None:
    o = observer(principal=None)
    assert o.start(T0) == []
    assert o.finish(T0, 0.0) == []


def test_arguments_are_stored_as_an_object() -> None:
    o = observer()
    [none, listed] = o.from_client([req(1, "tools/call", {"name": "a"}), call(2, "b", [1, 2])], T0, 0.0)
    assert none.arguments == {} and listed.arguments == {"_value": [1, 2]}


def test_random_ids_are_distinct_version_4_uuids() -> None:
    import uuid

    from collectors.observer import random_uuid

    ids = [random_uuid() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text


def test_calls_and_results_built_without_validation_equal_validated_ones() -> None:
    """Tool calls and results skip pydantic's validation (trusted values): each must be exactly the
    event validation makes of it -- every field set, the time truncated to milliseconds in UTC."""
    o = observer()
    at = datetime(2026, 11, 21, 11, 0, 0, 123_456, tzinfo=timezone(timedelta(hours=1)))
    [c] = o.from_client(call(1, "read_file", {"path": "/a", "n": [1, 2.5, None]}), at, 10.0)
    [r] = o.from_server({"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "no"}}, at, 10.5)
    for event in (c, r):
        again = type(event).model_validate(event.model_dump())
        assert event == again and event.model_dump() == again.model_dump()
        assert event.event_time == datetime(2026, 11, 21, 10, 0, 0, 123_000, tzinfo=UTC)
        assert set(event.__dict__) == set(type(event).model_fields) and event.model_extra == {}
    with pytest.raises(ValueError, match="naive"):
        o.from_client(call(2, "x"), datetime(2026, 1, 1), 11.0)
