"""Sample records for the schemas tests (one valid, fully populated dict per kind)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

T0 = "2026-11-21T10:00:00.000Z"
COLLECTOR = {"id": "col-1", "epoch": 3, "seq": 42, "prev_hash": "ab" * 32}

SAMPLES: dict[str, dict[str, Any]] = {
    "tool_call": {
        "event_type": "tool_call",
        "event_id": "0b6f2a4e-2f7e-4a8e-9c2b-1d2e3f4a5b6c",
        "event_time": T0,
        "tenant": "acme",
        "collector": COLLECTOR,
        "call_id": "c-1",
        "session_id": "s-1",
        "server": "fs",
        "tool": "read_file",
        "arguments": {"path": "/data/a.txt", "n": [1, 2.5, None, True]},
        "resources": ["file:/data/a.txt"],
        "transport": "stdio",
        "attested": {"sub": "alice", "client_id": "agent-7"},
        "claimed": {"sub": "root"},
        "tool_digest": "sha256:00ff",
    },
    "tool_result": {
        "event_type": "tool_result",
        "event_id": "1b6f2a4e-2f7e-4a8e-9c2b-1d2e3f4a5b6c",
        "event_time": "2026-11-21T10:00:00.250Z",
        "tenant": "acme",
        "call_id": "c-1",
        "session_id": "s-1",
        "status": "error",
        "duration_ms": 250.5,
        "error": "boom",
        "result_digest": None,
    },
    "session_bound": {
        "event_type": "session_bound",
        "event_id": "2b6f2a4e-2f7e-4a8e-9c2b-1d2e3f4a5b6c",
        "event_time": "2026-11-21T09:00:00.000Z",
        "tenant": "acme",
        "session_id": "s-1",
        "principal": "alice",
        "agent_id": "agent-7",
        "valid_from": "2026-11-21T09:00:00.000Z",
        "valid_until": "2026-11-21T17:00:00.000Z",
        "auth": {"iss": "https://idp.example", "method": "oidc", "jti": "t-9"},
    },
    "session_ended": {
        "event_type": "session_ended",
        "event_id": "3b6f2a4e-2f7e-4a8e-9c2b-1d2e3f4a5b6c",
        "event_time": "2026-11-21T17:00:00.000Z",
        "tenant": "acme",
        "session_id": "s-1",
    },
    "grant_issued": {
        "event_type": "grant_issued",
        "event_id": "4b6f2a4e-2f7e-4a8e-9c2b-1d2e3f4a5b6c",
        "event_time": "2026-11-21T08:00:00.000Z",
        "tenant": "acme",
        "grant_id": "g-1",
        "principal": "alice",
        "agent_id": "agent-7",
        "tools": ["fs/read_*"],
        "resources": ["file:/data/*"],
        "scopes": ["files.read"],
        "not_before": "2026-11-21T08:00:00.000Z",
        "expires_at": None,
        "granted_by": "consent-ui",
        "purpose": "summarise reports",
        "parent_grant_id": None,
        "policies": ["pol/prod"],
        "approval_tools": ["fs/write_*"],
    },
    "grant_revoked": {
        "event_type": "grant_revoked",
        "event_id": "5b6f2a4e-2f7e-4a8e-9c2b-1d2e3f4a5b6c",
        "event_time": "2026-11-21T12:00:00.000Z",
        "tenant": "acme",
        "grant_id": "g-1",
        "principal": "alice",
        "agent_id": "agent-7",
        "revoked_by": "alice",
        "reason": "done",
    },
    "policy_published": {
        "event_type": "policy_published",
        "event_id": "6b6f2a4e-2f7e-4a8e-9c2b-1d2e3f4a5b6c",
        "event_time": "2026-11-21T07:00:00.000Z",
        "tenant": "acme",
        "policy_id": "pol/prod",
        "version": "3f2a9c1",
        "cedar": 'forbid(principal, action, resource) when { context.labels.contains("restricted") };',
        "labels": {"restricted": ["db:prod/*"]},
        "published_by": "ci",
    },
    "approval_decided": {
        "event_type": "approval_decided",
        "event_id": "7b6f2a4e-2f7e-4a8e-9c2b-1d2e3f4a5b6c",
        "event_time": "2026-11-21T09:30:00.000Z",
        "tenant": "acme",
        "approval_id": "ap-1",
        "principal": "alice",
        "agent_id": "agent-7",
        "tool": "fs/write_file",
        "arguments_digest": "ab" * 32,
        "decision": "approve",
        "approver": "bob",
        "expires_at": "2026-11-21T10:30:00.000Z",
        "reason": "change ticket 42",
    },
    "evidence": {
        "evidence_id": "c-1#1",
        "call_id": "c-1",
        "tenant": "acme",
        "session_id": "s-1",
        "principal": "alice",
        "agent_id": "agent-7",
        "server": "fs",
        "tool": "read_file",
        "call_time": T0,
        "verdict": "in_scope",
        "matched_grant_id": "g-1",
        "reasons": ["grant g-1 covers fs/read_file"],
        "version": 1,
        "final": False,
        "late": False,
        "decided_at": "2026-11-21T10:00:01.000Z",
        "facts": {"grants_seen": ["g-1"]},
    },
    "finding": {
        "finding_id": "f-1",
        "dedup_key": "revoked_grant|acme|alice|agent-7|g-1",
        "rule_id": "revoked_grant",
        "rule_version": 1,
        "severity": "high",
        "title": "Tool call under a revoked grant",
        "summary": "agent-7 called fs/read_file for alice under revoked grant g-1",
        "tenant": "acme",
        "principal": "alice",
        "agent_id": "agent-7",
        "call_id": "c-1",
        "call_ids": ["c-1"],
        "session_id": "s-1",
        "grant_id": "g-1",
        "forensic_query": "grant_history",
        "first_call_time": T0,
        "last_call_time": T0,
        "details": {"seconds_after_revocation": 1.5},
        "detected_at": "2026-11-21T10:00:16.000Z",
    },
    "page_attempt": {
        "attempt_id": "9b6f2a4e-2f7e-4a8e-9c2b-1d2e3f4a5b6c",
        "page_key": "revoked_grant|acme|alice|agent-7|g-1#1795255216000",
        "dedup_key": "revoked_grant|acme|alice|agent-7|g-1",
        "finding_id": "f-1",
        "rule_id": "revoked_grant",
        "severity": "high",
        "tenant": "acme",
        "channel": "pagerduty",
        "route": "oncall-pagerduty",
        "attempt": 2,
        "outcome": "retry",
        "http_status": 429,
        "error": "HTTP 429: rate limited",
        "findings_grouped": 3,
        "attempted_at": "2026-11-21T10:00:17.000Z",
        "latency_ms": 12.5,
    },
    "dead_letter": {
        "dead_letter_id": "dl-1",
        "source_topic": "mcp.tool-calls",
        "source_partition": 0,
        "source_offset": 17,
        "key": "s-1",
        "reason": "not Avro single-object encoding",
        "stage": "decode",
        "payload_b64": "e30=",
        "failed_at": T0,
    },
}


@pytest.fixture(scope="session")
def samples() -> dict[str, dict[str, Any]]:
    """All samples (shared: do not mutate; usable from hypothesis tests)."""
    return SAMPLES


@pytest.fixture
def make() -> Callable[..., dict[str, Any]]:
    """make(kind, **overrides) -> a fresh copy of that kind's sample dict."""

    def _make(kind: str, **overrides: Any) -> dict[str, Any]:
        data = copy.deepcopy(SAMPLES[kind])
        data.update(overrides)
        return data

    return _make
