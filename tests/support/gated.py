"""A scenario with Cedar policies and human approvals (issue 18), as canonical JSON events.

Builders in the style of :mod:`support.scenario` (times ``"HH:MM:SS"`` on its fixed day), and
:func:`gated_story`: one delegation whose grant is conditioned on a labelled policy (two versions)
and needs approval for two tools, with a call for each of the new verdicts and approvals used,
missing, denied, left unused. :data:`EXPECTED` is what replay says of each call.
"""

from __future__ import annotations

from typing import Any

from support.scenario import _base, bound, grant, tool_call, ts

AGENT = "agent-7"
ALLOW_UNLESS_RESTRICTED = (
    "permit(principal, action, resource);\n"
    'forbid(principal, action, resource) when { context.labels.contains("restricted") };\n'
)


def policy(
    at: str,
    policy_id: str,
    version: str,
    labels: dict[str, list[str]],
    cedar: str = ALLOW_UNLESS_RESTRICTED,
    tenant: str = "acme",
) -> dict[str, Any]:
    return {
        **_base("policy_published", at, tenant),
        "policy_id": policy_id,
        "version": version,
        "cedar": cedar,
        "labels": labels,
        "published_by": "ci@acme.example",
    }


def approval(
    at: str,
    approval_id: str,
    principal: str,
    agent: str,
    tool: str,
    decision: str = "approve",
    expires: str | None = None,
    tenant: str = "acme",
) -> dict[str, Any]:
    return {
        **_base("approval_decided", at, tenant),
        "approval_id": approval_id,
        "principal": principal,
        "agent_id": agent,
        "tool": tool,
        "arguments_digest": None,
        "decision": decision,
        "approver": "bob@acme.example",
        "expires_at": ts(expires) if expires else None,
        "reason": "change ticket",
    }


def result(at: str, call_id: str, session: str, status: str = "ok", tenant: str = "acme") -> dict[str, Any]:
    return {
        **_base("tool_result", at, tenant),
        "call_id": call_id,
        "session_id": session,
        "status": status,
        "duration_ms": 5.0,
        "error": None,
        "result_digest": None,
    }


def gated_story(tag: str) -> list[dict[str, Any]]:
    """Alice's agent-7 on session ``<tag>-gs1`` (apart from :func:`support.scenario.story`'s delegations)
    under grant ``<tag>-gated`` (db/*, policy ``<tag>-labels``, approval for db/write_row and db/drop_table).
    Policy v1 labels db:prod/* restricted; v2 (10:05) also db:hr/*. Calls (ids ``<tag>-c-...``) and their
    verdicts: :data:`EXPECTED`."""
    alice, agent, s1 = f"alice-{tag}@acme.example", AGENT, f"{tag}-gs1"
    labels = f"{tag}-labels"
    gated = grant("10:00:00", f"{tag}-gated", alice, agent, ["db/*"])
    gated.update(policies=[labels], approval_tools=["db/write_row", "db/drop_table"], purpose="billing fixes")
    facts = [
        bound("10:00:00", s1, alice, agent),
        policy("10:00:00", labels, "v1", {"restricted": ["db:prod/*"]}),
        policy("10:05:00", labels, "v2", {"restricted": ["db:prod/*", "db:hr/*"]}),
        gated,
        approval("10:01:00", f"{tag}-ap-1", alice, agent, "db/write_row"),
        approval("10:03:00", f"{tag}-ap-2", alice, agent, "db/drop_table", decision="deny"),
        approval("10:07:00", f"{tag}-ap-3", alice, agent, "db/write_row", expires="10:30:00"),
        approval("10:08:00", f"{tag}-ap-4", alice, agent, "db/write_row"),
    ]
    calls = [
        tool_call("10:01:30", f"{tag}-c-approved", s1, "db", "write_row", ["db:dev/t"]),
        tool_call("10:02:00", f"{tag}-c-missing", s1, "db", "write_row", ["db:dev/t"]),
        tool_call("10:03:10", f"{tag}-c-denied", s1, "db", "drop_table", ["db:dev/t"]),
        tool_call("10:04:00", f"{tag}-c-restricted", s1, "db", "query", ["db:prod/users"]),
        tool_call("10:06:00", f"{tag}-c-hr", s1, "db", "query", ["db:hr/salaries"]),
        tool_call("10:06:30", f"{tag}-c-open", s1, "db", "query", ["db:dev/x"]),
        tool_call("10:09:00", f"{tag}-c-late", s1, "db", "write_row", ["db:dev/t"]),
    ]
    results = [
        result("10:01:30.200", f"{tag}-c-approved", s1),
        result("10:03:10.300", f"{tag}-c-denied", s1),  # denied, and executed anyway
    ]
    return [*calls, *results, *reversed(facts)]


EXPECTED: dict[str, tuple[str, str | None]] = {
    "c-approved": ("in_scope", "ap-1"),
    "c-missing": ("approval_missing", None),
    "c-denied": ("approval_denied", "ap-2"),
    "c-restricted": ("out_of_policy", None),
    "c-hr": ("out_of_policy", None),
    "c-open": ("in_scope", None),
    "c-late": ("in_scope", "ap-3"),
}
"""Call id suffix -> (verdict, approval id suffix) that replay gives."""
