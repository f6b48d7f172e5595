"""One sample record of every kind the sink stores."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from schemas import DeadLetter, Evidence, GrantIssued, GrantRevoked, SessionBound, SessionEnded, ToolCall, ToolResult

T = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def uid() -> str:
    return str(uuid.uuid4())


SAMPLES = [
    (
        "tool_calls",
        ToolCall(
            event_id=uid(),
            event_time=T,
            tenant="t",
            call_id="c",
            session_id="s",
            server="fs",
            tool="read",
            arguments={"b": 1, "a": [1]},
            resources=["file:/x"],
            transport="stdio",
            attested={"sub": "alice"},
            claimed={},
            tool_digest=None,
            extra_field="kept",
        ),
    ),
    (
        "tool_results",
        ToolResult(
            event_id=uid(),
            event_time=T,
            tenant="t",
            call_id="c",
            session_id="s",
            status="ok",
            duration_ms=1.5,
            error=None,
            result_digest="sha256:x",
        ),
    ),
    (
        "identity_events",
        SessionBound(
            event_id=uid(),
            event_time=T,
            tenant="t",
            session_id="s",
            principal="p",
            agent_id="a",
            valid_from=T,
            valid_until=None,
            auth={},
        ),
    ),
    ("identity_events", SessionEnded(event_id=uid(), event_time=T, tenant="t", session_id="s")),
    (
        "consent_events",
        GrantIssued(
            event_id=uid(),
            event_time=T,
            tenant="t",
            grant_id="g",
            principal="p",
            agent_id="a",
            tools=["fs/*"],
            resources=[],
            scopes=[],
            not_before=T,
            expires_at=None,
            granted_by="p",
            purpose="",
            parent_grant_id=None,
        ),
    ),
    (
        "consent_events",
        GrantRevoked(
            event_id=uid(),
            event_time=T,
            tenant="t",
            grant_id="g",
            principal="p",
            agent_id="a",
            revoked_by="p",
            reason="done",
        ),
    ),
    (
        "evidence",
        Evidence(
            evidence_id=uid(),
            call_id="c",
            tenant="t",
            session_id="s",
            principal=None,
            agent_id=None,
            server="fs",
            tool="read",
            call_time=T,
            verdict="in_scope",
            matched_grant_id=None,
            reasons=[],
            version=1,
            final=False,
            late=False,
            decided_at=T,
            facts={},
        ),
    ),
    (
        "dead_letters",
        DeadLetter(
            dead_letter_id=uid(),
            source_topic="x",
            source_partition=0,
            source_offset=1,
            key=None,
            reason="bad",
            stage="sink",
            payload_b64="",
            failed_at=T,
        ),
    ),
]
