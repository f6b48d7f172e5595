"""Small builders for canonical JSONL scenarios (times as "HH:MM:SS" on one fixed day)."""

from __future__ import annotations

import json
import uuid
from typing import Any

DAY = "2026-11-21"


def ts(hms: str) -> str:
    return f"{DAY}T{hms}.000Z" if len(hms) == 8 else f"{DAY}T{hms}Z"


def _base(event_type: str, at: str, tenant: str) -> dict[str, Any]:
    return {"event_type": event_type, "event_id": str(uuid.uuid4()), "event_time": ts(at), "tenant": tenant}


def bound(at: str, session: str, principal: str, agent: str, tenant: str = "acme") -> dict[str, Any]:
    return {
        **_base("session_bound", at, tenant),
        "session_id": session,
        "principal": principal,
        "agent_id": agent,
        "valid_from": ts(at),
        "valid_until": None,
        "auth": {"method": "test"},
    }


def grant(
    at: str,
    grant_id: str,
    principal: str,
    agent: str,
    tools: list[str],
    resources: list[str] | None = None,
    expires: str | None = None,
    tenant: str = "acme",
) -> dict[str, Any]:
    return {
        **_base("grant_issued", at, tenant),
        "grant_id": grant_id,
        "principal": principal,
        "agent_id": agent,
        "tools": tools,
        "resources": resources or [],
        "scopes": [],
        "not_before": ts(at),
        "expires_at": ts(expires) if expires else None,
        "granted_by": principal,
        "purpose": "test",
        "parent_grant_id": None,
    }


def ended(at: str, session: str, tenant: str = "acme") -> dict[str, Any]:
    return {**_base("session_ended", at, tenant), "session_id": session}


def revoke(at: str, grant_id: str, principal: str, agent: str, tenant: str = "acme") -> dict[str, Any]:
    return {
        **_base("grant_revoked", at, tenant),
        "grant_id": grant_id,
        "principal": principal,
        "agent_id": agent,
        "revoked_by": principal,
        "reason": "test",
    }


def tool_call(
    at: str,
    call_id: str,
    session: str,
    server: str,
    tool: str,
    resources: list[str] | None = None,
    tenant: str = "acme",
) -> dict[str, Any]:
    return {
        **_base("tool_call", at, tenant),
        "call_id": call_id,
        "session_id": session,
        "server": server,
        "tool": tool,
        "arguments": {},
        "resources": resources or [],
        "transport": "sdk",
        "attested": None,
        "claimed": {},
        "tool_digest": None,
    }


def jsonl(events: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(e) + "\n" for e in events)
