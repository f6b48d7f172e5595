"""Topic names, message keys and delegation keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from schemas import (
    APPROVALS,
    CALLS_BY_ROUTE,
    DEAD_LETTER,
    EVIDENCE,
    FINDINGS,
    GRANTS,
    PAGES,
    POLICIES,
    SESSIONS,
    TOOL_CALLS,
    TOOL_RESULTS,
    DeadLetter,
    Evidence,
    PageAttempt,
    Topics,
    delegation_key,
    key_for,
    parse_delegation_key,
    parse_event,
    topic_for,
)
from schemas.topics import partition_for

Make = Callable[..., dict[str, Any]]


def test_topic_names() -> None:
    t = Topics()
    assert t.all() == [
        "mcp.tool-calls",
        "mcp.tool-results",
        "identity.sessions",
        "consent.grants",
        "audit.evidence",
        "audit.findings",
        "audit.pages",
        "audit.dead-letter",
        "scopewatch.calls-by-route",
        "consent.policies",
        "consent.approvals",
    ]
    assert t.all() == [
        TOOL_CALLS,
        TOOL_RESULTS,
        SESSIONS,
        GRANTS,
        EVIDENCE,
        FINDINGS,
        PAGES,
        DEAD_LETTER,
        CALLS_BY_ROUTE,
        POLICIES,
        APPROVALS,
    ]


def test_with_prefix() -> None:
    t = Topics.with_prefix("t123.")
    assert t.tool_calls == "t123.mcp.tool-calls"
    assert t.dead_letter == "t123.audit.dead-letter"
    assert t.all() == ["t123." + name for name in Topics().all()]
    with pytest.raises(AttributeError):
        t.tool_calls = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kind", "field", "key"),
    [
        ("tool_call", "tool_calls", "s-1"),
        ("tool_result", "tool_results", "s-1"),
        ("session_bound", "sessions", "s-1"),
        ("session_ended", "sessions", "s-1"),
        ("grant_issued", "grants", "acme/alice/agent-7"),
        ("grant_revoked", "grants", "acme/alice/agent-7"),
        ("policy_published", "policies", "acme/pol%2Fprod"),
        ("approval_decided", "approvals", "acme/alice/agent-7"),
    ],
)
def test_topic_and_key_per_event(kind: str, field: str, key: str, make: Make) -> None:
    event = parse_event(make(kind))
    assert topic_for(event) == getattr(Topics(), field)
    prefixed = Topics.with_prefix("p.")
    assert topic_for(event, prefixed) == getattr(prefixed, field)
    assert key_for(event) == key


def test_topic_for_output_records(make: Make) -> None:
    assert topic_for(Evidence.model_validate(make("evidence"))) == EVIDENCE
    assert topic_for(DeadLetter.model_validate(make("dead_letter"))) == DEAD_LETTER
    assert topic_for(PageAttempt.model_validate(make("page_attempt"))) == PAGES
    assert topic_for(PageAttempt.model_validate(make("page_attempt")), Topics.with_prefix("p.")) == "p.audit.pages"
    with pytest.raises(TypeError):
        key_for(Evidence.model_validate(make("evidence")))  # type: ignore[arg-type]


def test_delegation_key_escapes_separators(make: Make) -> None:
    key = delegation_key("a/b", "100%", "x%2Fy")
    assert key == "a%2Fb/100%25/x%252Fy"
    assert parse_delegation_key(key) == ("a/b", "100%", "x%2Fy")
    assert delegation_key("a/b", "c", "d") != delegation_key("a", "b/c", "d")
    grant = parse_event(make("grant_issued", principal="team/ops", tenant="t%1"))
    assert parse_delegation_key(key_for(grant)) == ("t%1", "team/ops", "agent-7")


@given(st.text(), st.text(), st.text())
def test_delegation_key_round_trip(tenant: str, principal: str, agent_id: str) -> None:
    key = delegation_key(tenant, principal, agent_id)
    assert key.count("/") == 2
    assert parse_delegation_key(key) == (tenant, principal, agent_id)


@pytest.mark.parametrize("key", ["", "a/b", "a/b/c/d", "a%2Fb"])
def test_parse_delegation_key_rejects_malformed(key: str) -> None:
    with pytest.raises(ValueError, match="not a delegation key"):
        parse_delegation_key(key)


def test_partition_for_is_kafkas_default_partitioner() -> None:
    partitioner = DefaultPartitioner()
    for i in range(200):
        key = delegation_key("acme", f"user-{i}@example.com", f"agent-{i % 7}").encode()
        for n in (1, 2, 4, 12):
            parts = list(range(n))
            assert partition_for(key, n) == partitioner(key, parts, parts)
