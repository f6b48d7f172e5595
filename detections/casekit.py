"""Builders of canonical events for rule cases (pure, deterministic).

Times are written ``"10:00:05"`` or ``"10:00:05.250"`` on :data:`DAY` (UTC). Defaults: tenant
``acme``, session ``s1``, principal ``alice``, agent ``agent-1``, grant ``g1``. Event ids are UUIDv5
over the event's content, so the same case always gives the same events (and finding ids).
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time
from typing import Any, Final

from schemas import (
    ApprovalDecided,
    BaseEvent,
    GrantIssued,
    GrantRevoked,
    PolicyPublished,
    SessionBound,
    SessionEnded,
    ToolCall,
    arguments_digest,
)

__all__ = ["DAY", "approval", "at", "bound", "call", "delegation", "ended", "grant", "policy", "revoke"]

DAY: Final = date(2026, 11, 21)
_NS: Final = uuid.UUID("0f0c1d6e-3c55-4b7e-8f0e-6a3d5b1c2e90")


def at(hms: str) -> datetime:
    """``"10:00:05"`` or ``"10:00:05.250"`` on :data:`DAY`, UTC."""
    return datetime.combine(DAY, time.fromisoformat(hms), tzinfo=UTC)


def _eid(kind: str, *parts: object) -> str:
    return str(uuid.uuid5(_NS, repr((kind, *parts))))


def bound(
    hms: str, session: str = "s1", principal: str = "alice", agent: str = "agent-1", until: str | None = None
) -> SessionBound:
    return SessionBound(
        event_id=_eid("bound", hms, session, principal, agent, until),
        event_time=at(hms),
        tenant="acme",
        session_id=session,
        principal=principal,
        agent_id=agent,
        valid_from=at(hms),
        valid_until=None if until is None else at(until),
    )


def ended(hms: str, session: str = "s1") -> SessionEnded:
    return SessionEnded(event_id=_eid("ended", hms, session), event_time=at(hms), tenant="acme", session_id=session)


def grant(
    hms: str,
    grant_id: str = "g1",
    tools: tuple[str, ...] = ("fs/*", "web/*"),
    resources: tuple[str, ...] = (),
    not_before: str | None = None,
    expires: str | None = None,
    principal: str = "alice",
    agent: str = "agent-1",
    policies: tuple[str, ...] = (),
    approval_tools: tuple[str, ...] = (),
) -> GrantIssued:
    conditions = (policies, approval_tools) if policies or approval_tools else ()  # older ids unchanged
    return GrantIssued(
        event_id=_eid("grant", hms, grant_id, tools, resources, not_before, expires, principal, agent, *conditions),
        event_time=at(hms),
        tenant="acme",
        grant_id=grant_id,
        principal=principal,
        agent_id=agent,
        tools=list(tools),
        resources=list(resources),
        not_before=at(not_before or hms),
        expires_at=None if expires is None else at(expires),
        granted_by=principal,
        purpose="rule case",
        policies=list(policies),
        approval_tools=list(approval_tools),
    )


def revoke(hms: str, grant_id: str = "g1", principal: str = "alice", agent: str = "agent-1") -> GrantRevoked:
    return GrantRevoked(
        event_id=_eid("revoke", hms, grant_id, principal, agent),
        event_time=at(hms),
        tenant="acme",
        grant_id=grant_id,
        principal=principal,
        agent_id=agent,
        revoked_by="security@acme.example",
        reason="consent withdrawn",
    )


def policy(
    hms: str, cedar: str, policy_id: str = "p1", version: str = "v1", labels: dict[str, list[str]] | None = None
) -> PolicyPublished:
    """A ``policy_published`` of tenant acme."""
    return PolicyPublished(
        event_id=_eid("policy", hms, policy_id, version, cedar),
        event_time=at(hms),
        tenant="acme",
        policy_id=policy_id,
        version=version,
        cedar=cedar,
        labels=labels or {},
        published_by="ci",
    )


def approval(
    hms: str,
    approval_id: str,
    tool: str = "fs/write_file",
    decision: str = "approve",
    arguments: dict[str, Any] | None = None,
    expires: str | None = None,
    principal: str = "alice",
    agent: str = "agent-1",
) -> ApprovalDecided:
    """An ``approval_decided`` by bob (``arguments``: bind it to those arguments; None: any)."""
    return ApprovalDecided.model_validate(
        {
            "event_id": _eid("approval", hms, approval_id, tool, decision, repr(arguments), expires, principal, agent),
            "event_time": at(hms),
            "tenant": "acme",
            "approval_id": approval_id,
            "principal": principal,
            "agent_id": agent,
            "tool": tool,
            "arguments_digest": None if arguments is None else arguments_digest(arguments),
            "decision": decision,
            "approver": "bob@acme.example",
            "expires_at": None if expires is None else at(expires),
        }
    )


def call(
    hms: str,
    call_id: str,
    tool: str = "fs/read_file",
    resources: tuple[str, ...] = (),
    session: str = "s1",
    digest: str | None = None,
    attested: dict[str, Any] | None = None,
) -> ToolCall:
    """A tool call; ``tool`` is ``server/tool``."""
    server, _, name = tool.partition("/")
    return ToolCall(
        event_id=_eid("call", call_id, hms),
        event_time=at(hms),
        tenant="acme",
        call_id=call_id,
        session_id=session,
        server=server,
        tool=name,
        arguments={},
        resources=list(resources),
        transport="stdio",
        attested=attested,
        tool_digest=digest,
    )


def delegation(hms: str = "09:00:00", tools: tuple[str, ...] = ("fs/*", "web/*")) -> tuple[BaseEvent, ...]:
    """Session ``s1`` bound to alice/agent-1 and grant ``g1`` over ``tools``, both at ``hms``."""
    return (bound(hms), grant(hms, tools=tools))
