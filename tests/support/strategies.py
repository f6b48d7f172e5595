"""Hypothesis strategies for random fact sets and calls (small domains make ties frequent)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from detections.engine import Fact
from schemas import GrantIssued, GrantRevoked, SessionBound, SessionEnded, ToolCall

BASE = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
# Repetition skews the draws towards acme/s1/alice/a1, so grant verdicts come up often.
TENANTS = ("acme", "acme", "acme", "globex")
SESSIONS = ("s1", "s1", "s1", "s2")
PRINCIPALS = ("alice", "alice", "alice", "bob")
AGENTS = ("a1", "a1", "a1", "a2")
GRANT_IDS = ("g1", "g2", "g3")
TOOLS = ("fs/read_file", "fs/write_file", "web/fetch")
RESOURCES = ("file:/data/a", "file:/etc/passwd", "repo:acme/web")

instants = st.integers(0, 8)
maybe_instant = st.none() | instants


def T(seconds: int) -> datetime:
    return BASE + timedelta(seconds=seconds)


def _eid(n: int) -> str:
    return str(uuid.UUID(int=n))


@st.composite
def a_fact(draw: st.DrawFn, n: int) -> Fact:
    kind = draw(st.sampled_from(["bound", "ended", *["issued"] * 5, "revoked", "revoked", "revoked"]))
    common: dict[str, Any] = {
        "event_id": _eid(n),
        "event_time": T(draw(instants)),
        "tenant": draw(st.sampled_from(TENANTS)),
    }
    if kind == "bound":
        valid_until = draw(maybe_instant)
        return SessionBound(
            **common,
            session_id=draw(st.sampled_from(SESSIONS)),
            principal=draw(st.sampled_from(PRINCIPALS)),
            agent_id=draw(st.sampled_from(AGENTS)),
            valid_from=draw(st.sampled_from([common["event_time"], T(0), T(draw(instants))])),
            valid_until=None if valid_until is None else T(valid_until),
        )
    if kind == "ended":
        return SessionEnded(**common, session_id=draw(st.sampled_from(SESSIONS)))
    delegation = {
        "grant_id": draw(st.sampled_from(GRANT_IDS)),
        "principal": draw(st.sampled_from(("alice",) * 5 + ("bob",))),
        "agent_id": draw(st.sampled_from(("a1",) * 5 + ("a2",))),
    }
    if kind == "revoked":
        return GrantRevoked(**common, **delegation, revoked_by="alice", reason=draw(st.sampled_from(["", "done"])))
    expires_at = draw(maybe_instant)
    return GrantIssued(
        **common,
        **delegation,
        tools=draw(st.lists(st.sampled_from(["fs/read_*", "fs/*", "web/fetch", "*", "web/*"]), max_size=2)),
        resources=draw(st.sampled_from([[], ["file:/data/*"], ["file:/etc/*"], ["file:/data/*", "repo:*"]])),
        not_before=draw(st.sampled_from([common["event_time"], T(0), T(draw(instants))])),
        expires_at=None if expires_at is None else T(expires_at),
        granted_by="alice",
    )


@st.composite
def fact_sets(draw: st.DrawFn, max_size: int = 16) -> list[Fact]:
    n = draw(st.integers(0, max_size))
    facts = [draw(a_fact(i + 1)) for i in range(n)]
    if draw(
        st.sampled_from([True, True, True, True, False])
    ):  # usually a plain binding of acme/s1 to alice/a1 from the start
        facts.insert(
            draw(st.integers(0, n)),
            SessionBound(
                event_id=_eid(n + 1),
                event_time=T(0),
                tenant="acme",
                session_id="s1",
                principal="alice",
                agent_id="a1",
                valid_from=T(0),
            ),
        )
    return facts


@st.composite
def a_call(draw: st.DrawFn, n: int = 0, min_time: int = 0) -> ToolCall:
    server, _, tool = draw(st.sampled_from(TOOLS)).partition("/")
    return ToolCall(
        event_id=_eid(10_000 + n),
        event_time=T(draw(st.integers(min_time, 9))),
        tenant=draw(st.sampled_from(("acme",) * 9 + ("globex",))),
        call_id=f"c{n}",
        session_id=draw(st.sampled_from(("s1",) * 9 + ("s2",))),
        server=server,
        tool=tool,
        arguments={},
        resources=draw(st.lists(st.sampled_from(RESOURCES), max_size=2, unique=True)),
        transport="sdk",
        attested=draw(
            st.sampled_from(
                [None, None, None, {}, {"sub": "alice"}, {"client_id": "a1"}, {"sub": "bob", "client_id": "a2"}]
            )
        ),
        claimed=draw(st.sampled_from([{}, {"sub": "alice", "client_id": "a1"}, {"sub": "bob"}])),
    )


def calls(min_time: int = 0) -> st.SearchStrategy[list[ToolCall]]:
    return st.lists(st.integers(0, 10**6), min_size=1, max_size=4).flatmap(
        lambda ns: st.tuples(*(a_call(n, min_time) for n in ns)).map(list)
    )
