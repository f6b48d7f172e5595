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
    not_before: str | None = None,
    policies: list[str] | None = None,
    approval_tools: list[str] | None = None,
) -> dict[str, Any]:
    return {
        **_base("grant_issued", at, tenant),
        "grant_id": grant_id,
        "principal": principal,
        "agent_id": agent,
        "tools": tools,
        "resources": resources or [],
        "scopes": [],
        "not_before": ts(not_before or at),
        "expires_at": ts(expires) if expires else None,
        "granted_by": principal,
        "purpose": "test",
        "parent_grant_id": None,
        "policies": policies or [],
        "approval_tools": approval_tools or [],
    }


def policy(
    at: str, policy_id: str, version: str, cedar: str, labels: dict[str, list[str]] | None = None, tenant: str = "acme"
) -> dict[str, Any]:
    return {
        **_base("policy_published", at, tenant),
        "policy_id": policy_id,
        "version": version,
        "cedar": cedar,
        "labels": labels or {},
        "published_by": "ci",
    }


def approval(
    at: str,
    approval_id: str,
    principal: str,
    agent: str,
    tool: str,
    decision: str = "approve",
    arguments: dict[str, Any] | None = None,
    expires: str | None = None,
    tenant: str = "acme",
) -> dict[str, Any]:
    """An ``approval_decided``; ``arguments`` given: bound to their digest (else to any arguments)."""
    from schemas import arguments_digest

    return {
        **_base("approval_decided", at, tenant),
        "approval_id": approval_id,
        "principal": principal,
        "agent_id": agent,
        "tool": tool,
        "arguments_digest": None if arguments is None else arguments_digest(arguments),
        "decision": decision,
        "approver": "carol@acme.example",
        "expires_at": ts(expires) if expires else None,
        "reason": "test",
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
    attested: dict[str, Any] | None = None,
    arguments: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        **_base("tool_call", at, tenant),
        "call_id": call_id,
        "session_id": session,
        "server": server,
        "tool": tool,
        "arguments": arguments or {},
        "resources": resources or [],
        "transport": "sdk",
        "attested": attested,
        "claimed": {},
        "tool_digest": None,
    }


def jsonl(events: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(e) + "\n" for e in events)


def story(tag: str) -> list[dict[str, Any]]:
    """Every verdict at least once, over three sessions and two tenants (ids unique per ``tag``).

    Returned in a deliberately bad order for a pipeline: calls first, then facts, newest first.
    """
    s1, s2, s3, s4 = (f"{tag}-s{i}" for i in range(1, 5))
    alice, bob = f"alice-{tag}@acme.example", f"bob-{tag}@acme.example"
    facts = [
        bound("10:00:00", s1, alice, "agent-1"),
        bound("10:00:00", s2, bob, "agent-2"),
        bound("10:00:00", s3, alice, "agent-1", tenant="globex"),
        grant("10:00:00", f"{tag}-read", alice, "agent-1", ["fs/read_*"], ["file:/data/*"]),
        grant("10:00:00", f"{tag}-web", alice, "agent-1", ["web/fetch"], expires="10:00:20"),
        grant("10:00:00", f"{tag}-write", alice, "agent-1", ["fs/write_file"]),
        revoke("10:00:30", f"{tag}-write", alice, "agent-1"),
        grant("10:00:00", f"{tag}-later", alice, "agent-1", ["db/*"], not_before="10:05:00"),
        grant("10:00:40", f"{tag}-bob", bob, "agent-2", ["fs/*"]),
        ended("10:00:50", s2),
    ]
    calls = [
        tool_call("10:00:10", f"{tag}-c-in", s1, "fs", "read_file", ["file:/data/a.txt"]),
        tool_call("10:00:11", f"{tag}-c-tool", s1, "shell", "exec"),
        tool_call("10:00:12", f"{tag}-c-res", s1, "fs", "read_file", ["file:/etc/passwd"]),
        tool_call("10:00:25", f"{tag}-c-expired", s1, "web", "fetch", ["url:https://example.com"]),
        tool_call("10:00:29", f"{tag}-c-write-ok", s1, "fs", "write_file", ["file:/data/b.txt"]),
        tool_call("10:00:30", f"{tag}-c-revoked", s1, "fs", "write_file", ["file:/data/b.txt"]),
        tool_call("10:00:31", f"{tag}-c-early", s1, "db", "query"),
        tool_call("10:00:20", f"{tag}-c-nogrant", s2, "fs", "read_file"),
        tool_call("10:00:45", f"{tag}-c-bob", s2, "fs", "read_file"),
        tool_call("10:00:55", f"{tag}-c-ended", s2, "fs", "read_file"),
        tool_call("10:00:10", f"{tag}-c-unbound", s4, "fs", "read_file"),
        tool_call("10:00:10", f"{tag}-c-mismatch", s1, "fs", "read_file", attested={"sub": bob}),
        tool_call("10:00:10", f"{tag}-c-tenant", s3, "fs", "read_file", ["file:/data/a.txt"], tenant="globex"),
    ]
    return [*calls, *reversed(facts)]
