"""The HTTP collector's session tracker: exchanges in, events out (no sockets, explicit clocks)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretBytes

from collectors.http_tracker import PROXY_ERROR_CODE, ExchangeStart, HttpSessionTracker
from collectors.jwt_verify import TokenCheck
from collectors.redact import Redactor
from schemas import Event, SessionBound, SessionEnded, ToolCall, ToolResult, to_canonical_json

T0 = 1_900_000_000_000_000_000  # ns
EXP = 1_900_000_600
GHP = "ghp_" + "C4n4ryGithubT0kenQRSTUVWXYZabcdefghij"


def verified(sub: str = "alice", client: str = "agent-1", jti: str = "t1", not_after: float = EXP + 30) -> TokenCheck:
    attested = {"iss": "https://idp", "sub": sub, "client_id": client, "jti": jti, "exp": int(not_after) - 30}
    return TokenCheck(status="verified", attested=attested, not_after=not_after)


EXPIRED = TokenCheck(status="invalid", reason="expired", hints={"sub": "alice", "alg": "RS256"})
ABSENT = TokenCheck(status="absent")


class Harness:
    def __init__(self, **kwargs: Any) -> None:
        self.events: list[Event] = []
        self.tracker = HttpSessionTracker(
            emit=self.events.append,
            key=b"k" * 32,
            upstream="http://127.0.0.1:9/mcp",
            tenant="acme",
            redactor=Redactor(key=SecretBytes(b"r" * 32)),
            **kwargs,
        )
        self.ids = iter(range(1, 10_000))

    def exchange(
        self,
        body: Any = None,
        *,
        method: str = "POST",
        sid: str | None = None,
        check: TokenCheck | None = None,
        credential: str = "bearer:aaa",
        t: float = 0.0,
        status: int = 200,
        ctype: str = "text/event-stream",
        assigned: str | None = None,
        reply: bytes | list[bytes] = b"",
        note: str | None = None,
        broke: str | None = None,
        open_only: bool = False,
    ) -> int:
        ex = next(self.ids)
        raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        start = ExchangeStart(method, sid, check or verified(), credential, raw, T0 + int(t * 1e9), t)
        self.tracker.open(ex, start)
        if open_only:
            return ex
        self.tracker.head(ex, status, ctype, assigned, note)
        for i, chunk in enumerate(reply if isinstance(reply, list) else [reply]):
            if chunk:
                self.tracker.data(ex, chunk, T0 + int((t + 0.1 + i / 100) * 1e9), t + 0.1 + i / 100)
        self.tracker.end(ex, T0 + int((t + 0.2) * 1e9), t + 0.2, broke)
        return ex

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def sse(*messages: Any) -> bytes:
    return b"".join(b"event: message\r\ndata: " + json.dumps(m).encode() + b"\r\n\r\n" for m in messages)


def call(msg_id: Any, tool: str, arguments: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"name": tool, "arguments": arguments or {}}
    if meta:
        params["_meta"] = meta
    return {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": params}


def ok(msg_id: Any, text: str = "ok") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": {"content": [{"type": "text", "text": text}]}}


INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "cli", "version": "1"}},
}
INIT_OK = {"jsonrpc": "2.0", "id": 0, "result": {"serverInfo": {"name": "upstream-x", "version": "2"}}}
PROGRESS = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 2, "progress": 1}}


def handshake(h: Harness, sid: str = "sid-A", check: TokenCheck | None = None) -> None:
    h.exchange(INIT, check=check, assigned=sid, reply=sse(INIT_OK))


def test_a_handshake_era_session_binds_and_records_calls() -> None:
    h = Harness()
    handshake(h)
    h.exchange(call(2, "read_file", {"path": "/data/a.txt"}), sid="sid-A", t=1, reply=[sse(PROGRESS), sse(ok(2))])
    h.exchange(method="DELETE", sid="sid-A", t=2, ctype="application/json")
    [bound] = h.of(SessionBound)
    [tool_call] = h.of(ToolCall)
    [result] = h.of(ToolResult)
    [ended] = h.of(SessionEnded)
    session_id = h.tracker.session_id("mcp:sid-A")
    assert str(uuid.UUID(session_id)) == session_id and "sid-A" not in session_id
    assert {e.session_id for e in h.events} == {session_id}  # type: ignore[attr-defined]
    assert (bound.principal, bound.agent_id, bound.tenant) == ("alice", "agent-1", "acme")
    assert bound.valid_until == datetime.fromtimestamp(EXP + 30, tz=UTC)
    assert bound.auth == {"method": "bearer_jwt", "issuer": "https://idp", "token_id": "t1"}
    assert tool_call.transport == "http" and tool_call.server == "upstream-x" and tool_call.tool == "read_file"
    assert tool_call.attested == verified().attested
    assert tool_call.claimed == {"client_name": "cli", "client_version": "1", "auth": {"status": "verified"}}
    assert tool_call.resources == ["file:/data/a.txt"]
    assert tool_call.event_time == datetime.fromtimestamp(T0 / 1e9 + 1, tz=UTC).replace(microsecond=0)
    assert (result.call_id, result.status, result.duration_ms) == (tool_call.call_id, "ok", 110.0)
    assert ended.event_time > result.event_time
    assert h.tracker.sessions == 0


def test_the_session_id_is_stable_and_keyed() -> None:
    a, b = Harness(), Harness()
    assert a.tracker.session_id("mcp:x") == b.tracker.session_id("mcp:x") != a.tracker.session_id("mcp:y")
    other_key = HttpSessionTracker(emit=lambda e: None, key=b"z" * 32, upstream="http://127.0.0.1:9/mcp")
    assert other_key.session_id("mcp:x") != a.tracker.session_id("mcp:x")


def test_batches_in_requests_and_json_responses() -> None:
    h = Harness()
    handshake(h)
    batch = [call(5, "echo", {"m": "a"}), call(6, "echo", {"m": "b"}), {"jsonrpc": "2.0", "method": "x/notify"}]
    answer = json.dumps([ok(6, "b"), {"jsonrpc": "2.0", "id": 5, "error": {"code": -32602, "message": "bad"}}])
    h.exchange(batch, sid="sid-A", ctype="application/json", reply=[answer.encode()[:7], answer.encode()[7:]])
    calls = {c.arguments["m"]: c for c in h.of(ToolCall)}
    results = {r.call_id: r for r in h.of(ToolResult)}
    assert results[calls["a"].call_id].status == "error" and results[calls["a"].call_id].error == "-32602: bad"
    assert results[calls["b"].call_id].status == "ok"


def test_single_exchange_requests_scope_ids_to_the_exchange() -> None:
    """2026-07-28 requests reuse ids freely: each exchange's answer goes to its own call."""
    h = Harness()
    first = h.exchange(call(1, "echo", {"m": "first"}), ctype="application/json", open_only=True)
    second = h.exchange(call(1, "echo", {"m": "second"}), ctype="application/json", open_only=True)
    tracker = h.tracker
    tracker.head(second, 200, "application/json", None)
    tracker.head(first, 200, "application/json", None)
    tracker.data(second, json.dumps({"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "no"}}).encode(), T0, 1)
    tracker.end(second, T0, 1.0)
    tracker.data(first, json.dumps(ok(1)).encode(), T0, 2)
    tracker.end(first, T0, 2.0)
    calls = {c.arguments["m"]: c for c in h.of(ToolCall)}
    results = {r.call_id: r for r in h.of(ToolResult)}
    assert results[calls["first"].call_id].status == "ok"
    assert results[calls["second"].call_id].status == "error"
    assert calls["first"].session_id == calls["second"].session_id == tracker.session_id("bearer:aaa")


def test_a_single_exchange_without_its_answer_gets_an_error_result() -> None:
    h = Harness()
    h.exchange(call(1, "slow"), reply=sse(PROGRESS), broke="the client went away")
    [result] = h.of(ToolResult)
    assert result.status == "error"
    assert result.error == f"{PROXY_ERROR_CODE}: scopewatch proxy: no response: the client went away"


def test_a_handshake_era_stream_may_resume_so_the_call_waits_for_the_session_end() -> None:
    h = Harness()
    handshake(h)
    h.exchange(call(2, "slow"), sid="sid-A", reply=sse(PROGRESS))
    assert h.of(ToolResult) == []
    h.tracker.close(T0 + 10**10, 10.0)
    [result] = h.of(ToolResult)
    assert result.status == "timeout"
    assert len(h.of(SessionEnded)) == 1


def test_the_answer_may_come_on_the_get_stream() -> None:
    h = Harness()
    handshake(h)
    get = h.exchange(method="GET", sid="sid-A", open_only=True)
    h.tracker.head(get, 200, "text/event-stream", None)
    h.exchange(call(2, "slow"), sid="sid-A", reply=sse(PROGRESS))
    h.tracker.data(get, sse(ok(2)), T0 + 10**9, 1.0)
    [result] = h.of(ToolResult)
    assert result.status == "ok"


def test_rejected_and_failed_requests_are_recorded_with_the_reason() -> None:
    h = Harness()
    note = "rejected: expired (HTTP 401)"
    h.exchange(call(1, "echo", {"m": "x"}), check=EXPIRED, status=401, ctype="application/json", note=note)
    [rejected] = h.of(ToolCall)
    [result] = h.of(ToolResult)
    assert rejected.attested is None
    assert rejected.claimed["auth"] == {
        "status": "invalid",
        "reason": "expired",
        "unverified": {"sub": "alice", "alg": "RS256"},
    }
    assert result.error == f"{PROXY_ERROR_CODE}: scopewatch proxy: {note}"
    assert h.of(SessionBound) == []  # an invalid token never binds
    h.exchange(call(2, "echo"), check=ABSENT, credential="anon", status=502, note="the upstream is unreachable")
    assert h.of(ToolCall)[-1].claimed["auth"] == {"status": "absent"}
    assert h.of(ToolResult)[-1].error.endswith("the upstream is unreachable")  # type: ignore[union-attr]
    h.exchange(call(3, "echo"), status=202, ctype="application/json")
    assert h.of(ToolResult)[-1].error.endswith("the upstream answered HTTP 202 without a response")  # type: ignore[union-attr]


def test_an_exchange_that_ends_before_the_upstream_answers_is_recorded() -> None:
    h = Harness()
    ex = h.exchange(call(1, "echo"), open_only=True)
    h.tracker.end(ex, T0, 1.0, "the client went away")
    [tool_call] = h.of(ToolCall)
    [result] = h.of(ToolResult)
    assert result.call_id == tool_call.call_id and result.error is not None and "client went away" in result.error


def test_refreshed_tokens_rebind_other_identities_do_not() -> None:
    h = Harness()
    handshake(h)
    later = verified(jti="t2", not_after=EXP + 3600)
    h.exchange(call(2, "echo"), sid="sid-A", check=later, reply=sse(ok(2)))
    h.exchange(call(3, "echo"), sid="sid-A", check=verified(jti="t3", not_after=EXP), reply=sse(ok(3)))
    mallory = verified(sub="mallory", jti="t4", not_after=EXP + 7200)
    h.exchange(call(4, "echo"), sid="sid-A", check=mallory, reply=sse(ok(4)))
    bindings = h.of(SessionBound)
    assert [b.auth["token_id"] for b in bindings] == ["t1", "t2"]
    assert bindings[1].valid_until == datetime.fromtimestamp(EXP + 3600, tz=UTC)
    assert [c.attested["sub"] for c in h.of(ToolCall)] == ["alice", "alice", "mallory"]


def test_tokens_without_sub_or_client_do_not_bind() -> None:
    h = Harness()
    no_client = TokenCheck(status="verified", attested={"sub": "svc", "exp": EXP}, not_after=EXP + 30)
    handshake(h, check=no_client)
    h.exchange(call(2, "echo"), sid="sid-A", check=no_client, reply=sse(ok(2)))
    assert h.of(SessionBound) == []
    assert h.of(ToolCall)[0].attested == {"sub": "svc", "exp": EXP}


def test_upstream_404_ends_the_session() -> None:
    h = Harness()
    handshake(h)
    h.exchange(call(2, "echo"), sid="sid-A", status=404, ctype="text/plain", reply=b"Session not found")
    assert [type(e).__name__ for e in h.events] == ["SessionBound", "ToolCall", "ToolResult", "SessionEnded"]
    assert h.of(ToolResult)[0].error.endswith("the upstream answered HTTP 404 without a response")  # type: ignore[union-attr]


def test_sessions_are_evicted_when_idle_or_too_many() -> None:
    h = Harness(max_sessions=1, session_idle_seconds=60)
    handshake(h, sid="A")
    handshake(h, sid="B")
    assert [type(e).__name__ for e in h.events] == ["SessionBound", "SessionEnded", "SessionBound"]
    assert h.events[1].session_id == h.tracker.session_id("mcp:A")  # type: ignore[attr-defined]
    h.tracker.tick(T0 + 30 * 10**9, 30.0)
    assert h.tracker.sessions == 1
    h.tracker.tick(T0 + 90 * 10**9, 90.0)
    assert h.tracker.sessions == 0 and len(h.of(SessionEnded)) == 2
    handshake(h, sid="A")  # seen again with a verified token: bound again
    assert h.of(SessionBound)[-1].session_id == h.tracker.session_id("mcp:A")


def test_single_exchange_server_and_client_info_from_meta() -> None:
    h = Harness()
    info = {"io.modelcontextprotocol/clientInfo": {"name": "modern-client", "version": "3"}}
    discover = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": info}}
    meta = {"_meta": {"io.modelcontextprotocol/serverInfo": {"name": "modern-up", "version": ""}}}
    h.exchange(
        discover, ctype="application/json", reply=json.dumps({"jsonrpc": "2.0", "id": 1, "result": meta}).encode()
    )
    h.exchange(call(1, "echo", **info), ctype="application/json", reply=json.dumps(ok(1)).encode())
    [tool_call] = h.of(ToolCall)
    assert tool_call.server == "modern-up"
    assert tool_call.claimed["client_name"] == "modern-client"


def test_a_configured_server_label_wins() -> None:
    h = Harness(server_label="fs")
    handshake(h)
    h.exchange(call(2, "echo"), sid="sid-A", reply=sse(ok(2)))
    assert h.of(ToolCall)[0].server == "fs"


def test_secrets_are_redacted_in_arguments_and_in_untrusted_token_hints() -> None:
    h = Harness()
    leaky = TokenCheck(status="invalid", reason="bad_signature", hints={"sub": GHP})
    h.exchange(call(1, "echo", {"password": "hunter2-canary", "note": GHP}), check=leaky, status=401, note="rejected")
    text = "\n".join(to_canonical_json(e) for e in h.events)
    assert GHP not in text and "hunter2-canary" not in text
    assert "[redacted:github_token:" in text


def test_unparsable_bodies_are_counted_not_fatal() -> None:
    h = Harness()
    h.exchange(b"{not json", ctype="application/json", reply=b"also not json")
    h.exchange(call(1, "echo"), reply=b"event: message\ndata: {oops\n\n" + sse(ok(1)))
    assert h.tracker.stats.unparsable == 3
    assert [r.status for r in h.of(ToolResult)] == ["ok"]


def test_rejected_requests_with_unknown_session_ids_do_not_open_sessions() -> None:
    h = Harness(max_sessions=2)
    handshake(h, sid="real")
    for i in range(5):
        h.exchange(call(i, "echo"), sid=f"made-up-{i}", check=EXPIRED, credential="bearer:bad", status=401, note="no")
    assert h.tracker.sessions == 2  # the real session and the bad token's one
    assert h.of(SessionEnded) == []
    assert {c.session_id for c in h.of(ToolCall)} == {h.tracker.session_id("bearer:bad")}
    h.exchange(call(9, "echo"), sid="real", check=EXPIRED, status=401, note="no")  # a known session: recorded there
    assert h.of(ToolCall)[-1].session_id == h.tracker.session_id("mcp:real")


def test_the_observer_thread_takes_requests_in_batches_and_hands_their_events_over_at_once() -> None:
    """The relay's put() wakes nobody: the thread takes what queued once per batch interval (or
    at once past its byte budget), and each batch's events reach the publisher in one flush."""
    import threading
    import time

    from collectors.http_tracker import ObserverThread

    h = Harness()
    flushed: list[int] = []
    done = threading.Event()

    def flush() -> None:
        flushed.append(len(h.events))
        done.set()

    thread = ObserverThread(h.tracker, budget_bytes=1 << 20, batch_seconds=0.3, flush=flush)
    thread.start()
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "arguments": {}}})
    start = ExchangeStart("POST", None, ABSENT, "anon", body.encode(), T0, 0.0)
    reply = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}).encode()
    t0 = time.monotonic()
    for ex_id in (1, 2):
        thread.put(("open", ex_id, start), len(body))
        thread.put(("head", ex_id, 200, "application/json", None, None))
        thread.put(("data", ex_id, reply, T0, 0.001), len(reply))
        thread.put(("end", ex_id, T0, 0.002, None))
    assert done.wait(5) and time.monotonic() - t0 >= 0.2  # taken with the batch, not item by item
    assert flushed == [4] and [e.event_type for e in h.events].count("tool_result") == 2
    done.clear()
    thread.budget_bytes = 10
    thread.put(("open", 3, start), len(body))  # past the budget: taken at once
    assert done.wait(0.25) and not thread.over_budget
    thread.stop(5)  # the call left open gets its result at shutdown, flushed too
    last = h.events[-1]
    assert isinstance(last, ToolResult) and "shut down" in (last.error or "")
