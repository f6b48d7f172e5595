"""One sample record of every kind the sink stores."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from schemas import (
    ApprovalDecided,
    DeadLetter,
    Evidence,
    GrantIssued,
    GrantRevoked,
    PolicyPublished,
    SessionBound,
    SessionEnded,
    ToolCall,
    ToolResult,
)

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
        "consent_events",
        GrantIssued(
            event_id=uid(),
            event_time=T,
            tenant="t",
            grant_id="g-gated",
            principal="p",
            agent_id="a",
            tools=["db/*"],
            not_before=T,
            granted_by="p",
            purpose="billing",
            policies=["no-restricted"],
            approval_tools=["db/write_*"],
        ),
    ),
    (
        "policy_events",
        PolicyPublished(
            event_id=uid(),
            event_time=T,
            tenant="t",
            policy_id="no-restricted",
            version="0a1b2c3",
            cedar=(
                "permit(principal, action, resource);\n"
                'forbid(principal, action, resource) when { context.labels.contains("restricted") };'
            ),
            labels={"restricted": ["db:prod/*"]},
            published_by="ci",
        ),
    ),
    (
        "approval_events",
        ApprovalDecided(
            event_id=uid(),
            event_time=T,
            tenant="t",
            approval_id="ap-1",
            principal="p",
            agent_id="a",
            tool="db/write_row",
            arguments_digest=None,
            decision="approve",
            approver="bob",
            expires_at=None,
            reason="change 42",
        ),
    ),
    (
        "evidence",
        Evidence(
            evidence_id=uid(),
            call_id="c-gated",
            tenant="t",
            session_id="s",
            principal="p",
            agent_id="a",
            server="db",
            tool="write_row",
            call_time=T,
            verdict="in_scope",
            matched_grant_id="g-gated",
            reasons=[],
            version=1,
            final=True,
            late=False,
            decided_at=T,
            approval_id="ap-1",
            approver="bob",
            policy_versions=["no-restricted@0a1b2c3"],
            policy_decision="Allow",
            policy_reasons=["no-restricted@0a1b2c3#0"],
            policy_errors=[],
            history_complete=False,
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
