"""Table-driven verdicts of the decision engine (DESIGN.md, "Decision semantics").

Each row is: the facts known (in any order), one call, the expected verdict and matched_grant_id.
Times are written "10:00:05" (2026-11-21, UTC); defaults: tenant acme, session s1, principal
alice, agent agent-1, tool fs/read_file.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest

from detections.engine import (
    VERDICTS,
    DecisionEngine,
    Fact,
    GrantHistory,
    SessionHistory,
    attribute,
    authorize,
)
from schemas import GrantIssued, GrantRevoked, SessionBound, SessionEnded, ToolCall, parse_timestamp

# ------------------------------------------------------------------------------ builder

_ids = itertools.count(1)


def at(hms: str) -> datetime:
    """'10:00:05' or '10:00:05.250' on 2026-11-21, UTC."""
    return parse_timestamp(f"2026-11-21T{hms}{'' if '.' in hms else '.000'}Z")


def _eid() -> str:
    return str(uuid.UUID(int=next(_ids)))


def bound(
    time: str,
    session: str = "s1",
    principal: str = "alice",
    agent: str = "agent-1",
    valid_from: str | None = None,
    valid_until: str | None = None,
    tenant: str = "acme",
) -> SessionBound:
    return SessionBound(
        event_id=_eid(),
        event_time=at(time),
        tenant=tenant,
        session_id=session,
        principal=principal,
        agent_id=agent,
        valid_from=at(valid_from or time),
        valid_until=None if valid_until is None else at(valid_until),
    )


def ended(time: str, session: str = "s1", tenant: str = "acme") -> SessionEnded:
    return SessionEnded(event_id=_eid(), event_time=at(time), tenant=tenant, session_id=session)


def grant(
    time: str,
    gid: str = "g1",
    tools: tuple[str, ...] = ("fs/read_*",),
    resources: tuple[str, ...] = (),
    not_before: str | None = None,
    expires_at: str | None = None,
    principal: str = "alice",
    agent: str = "agent-1",
    tenant: str = "acme",
) -> GrantIssued:
    return GrantIssued(
        event_id=_eid(),
        event_time=at(time),
        tenant=tenant,
        grant_id=gid,
        principal=principal,
        agent_id=agent,
        tools=list(tools),
        resources=list(resources),
        not_before=at(not_before or time),
        expires_at=None if expires_at is None else at(expires_at),
        granted_by="alice",
    )


def revoke(
    time: str,
    gid: str = "g1",
    by: str = "alice",
    reason: str = "",
    principal: str = "alice",
    agent: str = "agent-1",
    tenant: str = "acme",
) -> GrantRevoked:
    return GrantRevoked(
        event_id=_eid(),
        event_time=at(time),
        tenant=tenant,
        grant_id=gid,
        principal=principal,
        agent_id=agent,
        revoked_by=by,
        reason=reason,
    )


def call(
    time: str,
    tool: str = "fs/read_file",
    resources: tuple[str, ...] = (),
    session: str = "s1",
    attested: dict[str, Any] | None = None,
    claimed: dict[str, Any] | None = None,
    tenant: str = "acme",
) -> ToolCall:
    server, _, name = tool.partition("/")
    return ToolCall(
        event_id=_eid(),
        event_time=at(time),
        tenant=tenant,
        call_id=f"c-{next(_ids)}",
        session_id=session,
        server=server,
        tool=name,
        arguments={},
        resources=list(resources),
        transport="stdio",
        attested=attested,
        claimed=claimed or {},
    )


def engine_with(*facts: Fact) -> DecisionEngine:
    engine = DecisionEngine()
    for fact in facts:
        assert engine.add_fact(fact)
    return engine


# -------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Row:
    facts: tuple[Fact, ...]
    call: ToolCall
    verdict: str
    matched: str | None = None


B0 = bound("10:00:00")  # the usual binding: acme/s1 -> alice/agent-1 from 10:00:00, no expiry

CASES: dict[str, Row] = {
    # 1 unbound_session
    "no facts at all": Row((), call("10:00:05"), "unbound_session"),
    "bound only after the call": Row((bound("10:00:06"), grant("10:00:00")), call("10:00:05"), "unbound_session"),
    "another session is bound": Row(
        (bound("10:00:00", session="s2"), grant("10:00:00")), call("10:00:05"), "unbound_session"
    ),
    "ended after the call, bound after too": Row(
        (bound("10:00:06"), ended("10:00:07")), call("10:00:05"), "unbound_session"
    ),
    # 2 identity_mismatch
    "attested sub differs from principal": Row(
        (B0, grant("10:00:00")), call("10:00:05", attested={"sub": "mallory"}), "identity_mismatch"
    ),
    "attested client_id differs from agent_id": Row(
        (B0, grant("10:00:00")), call("10:00:05", attested={"client_id": "agent-9"}), "identity_mismatch"
    ),
    "attested sub matches, client_id differs": Row(
        (B0, grant("10:00:00")),
        call("10:00:05", attested={"sub": "alice", "client_id": "agent-9"}),
        "identity_mismatch",
    ),
    "mismatch wins over session_expired (binding not valid yet)": Row(
        (bound("10:00:00", valid_from="10:01:00"),), call("10:00:05", attested={"sub": "mallory"}), "identity_mismatch"
    ),
    "mismatch against the binding an end closed": Row(
        (B0, ended("10:00:03")), call("10:00:05", attested={"sub": "mallory"}), "identity_mismatch"
    ),
    "attested sub and client_id match": Row(
        (B0, grant("10:00:00")),
        call("10:00:05", attested={"sub": "alice", "client_id": "agent-1", "jti": "x"}),
        "in_scope",
        "g1",
    ),
    "attested null claims are absent": Row(
        (B0, grant("10:00:00")), call("10:00:05", attested={"sub": None, "client_id": None}), "in_scope", "g1"
    ),
    "attested without sub/client_id": Row(
        (B0, grant("10:00:00")), call("10:00:05", attested={"iss": "https://idp"}), "in_scope", "g1"
    ),
    # claimed never matters
    "claimed identity differing is ignored": Row(
        (B0, grant("10:00:00")),
        call("10:00:05", claimed={"sub": "root", "client_id": "x"}),
        "in_scope",
        "g1",
    ),
    "claimed identity never grants": Row(
        (B0, grant("10:00:00", principal="mallory")), call("10:00:05", claimed={"sub": "mallory"}), "no_grant"
    ),
    "claimed identity cannot rescue an unbound session": Row(
        (grant("10:00:00"),), call("10:00:05", claimed={"sub": "alice", "client_id": "agent-1"}), "unbound_session"
    ),
    # 3 session_expired
    "session ended before the call": Row(
        (B0, grant("10:00:00"), ended("10:00:04")), call("10:00:05"), "session_expired"
    ),
    "session ended at the call instant": Row(
        (B0, grant("10:00:00"), ended("10:00:05")), call("10:00:05"), "session_expired"
    ),
    "session ended after the call": Row((B0, grant("10:00:00"), ended("10:00:06")), call("10:00:05"), "in_scope", "g1"),
    "ended and rebound at the same instant: ended wins": Row(
        (B0, grant("10:00:00"), ended("10:00:03"), bound("10:00:03")), call("10:00:05"), "session_expired"
    ),
    "bound and ended at the same instant (no earlier binding)": Row(
        (grant("10:00:00"), bound("10:00:03"), ended("10:00:03")), call("10:00:05"), "session_expired"
    ),
    "ended then rebound later": Row(
        (B0, grant("10:00:00"), ended("10:00:02"), bound("10:00:04")), call("10:00:05"), "in_scope", "g1"
    ),
    "call between end and rebind": Row(
        (B0, grant("10:00:00"), ended("10:00:02"), bound("10:00:06")), call("10:00:05"), "session_expired"
    ),
    "rebound to another principal uses their grants": Row(
        (B0, grant("10:00:00"), ended("10:00:02"), bound("10:00:04", principal="bob")), call("10:00:05"), "no_grant"
    ),
    "ended without any binding": Row((ended("10:00:01"),), call("10:00:05"), "session_expired"),
    "valid_from in the future": Row(
        (bound("10:00:00", valid_from="10:00:06"), grant("10:00:00")), call("10:00:05"), "session_expired"
    ),
    "valid_from exactly at the call": Row(
        (bound("10:00:00", valid_from="10:00:05"), grant("10:00:00")), call("10:00:05"), "in_scope", "g1"
    ),
    "valid_until passed": Row(
        (bound("10:00:00", valid_until="10:00:04"), grant("10:00:00")), call("10:00:05"), "session_expired"
    ),
    "valid_until exactly at the call": Row(
        (bound("10:00:00", valid_until="10:00:05"), grant("10:00:00")), call("10:00:05"), "session_expired"
    ),
    "valid_until 1 ms after the call": Row(
        (bound("10:00:00", valid_until="10:00:05.001"), grant("10:00:00")), call("10:00:05"), "in_scope", "g1"
    ),
    # 4 in_scope
    "active grant covers": Row((B0, grant("10:00:00")), call("10:00:05"), "in_scope", "g1"),
    "grant issued at the call instant": Row((B0, grant("10:00:05")), call("10:00:05"), "in_scope", "g1"),
    "not_before exactly at the call": Row(
        (B0, grant("10:00:00", not_before="10:00:05")), call("10:00:05"), "in_scope", "g1"
    ),
    "expires 1 ms after the call": Row(
        (B0, grant("10:00:00", expires_at="10:00:05.001")), call("10:00:05"), "in_scope", "g1"
    ),
    "resources inside the patterns": Row(
        (B0, grant("10:00:00", resources=("file:/data/*", "repo:acme/*"))),
        call("10:00:05", resources=("file:/data/a.txt", "repo:acme/web")),
        "in_scope",
        "g1",
    ),
    "empty grant resources = unrestricted": Row(
        (B0, grant("10:00:00")), call("10:00:05", resources=("file:/etc/passwd",)), "in_scope", "g1"
    ),
    "call without resources under a restricted grant": Row(
        (B0, grant("10:00:00", resources=("file:/data/*",))), call("10:00:05"), "in_scope", "g1"
    ),
    "glob is case sensitive": Row((B0, grant("10:00:00", tools=("FS/*",))), call("10:00:05"), "out_of_scope_tool"),
    "glob character class": Row(
        (B0, grant("10:00:00", tools=("fs/read_[fd]*",))), call("10:00:05", tool="fs/read_dir"), "in_scope", "g1"
    ),
    # 5 no_grant
    "delegation never had a grant": Row((B0,), call("10:00:05"), "no_grant"),
    "grant issued after the call never authorises": Row((B0, grant("10:00:06")), call("10:00:05"), "no_grant"),
    "grant for another agent": Row((B0, grant("10:00:00", agent="agent-2")), call("10:00:05"), "no_grant"),
    "revocation alone is not a grant": Row((B0, revoke("10:00:01")), call("10:00:05"), "no_grant"),
    "later grant after call, earlier uncovering grant": Row(
        (B0, grant("10:00:00", gid="g1", tools=("web/*",)), grant("10:00:06", gid="g2")),
        call("10:00:05"),
        "out_of_scope_tool",
    ),
    # 6 revoked_grant
    "revoked before the call": Row(
        (B0, grant("10:00:00"), revoke("10:00:03")), call("10:00:05"), "revoked_grant", "g1"
    ),
    "revoked at the call instant": Row(
        (B0, grant("10:00:00"), revoke("10:00:05")), call("10:00:05"), "revoked_grant", "g1"
    ),
    "revoked 1 ms after the call": Row(
        (B0, grant("10:00:00"), revoke("10:00:05.001")), call("10:00:05"), "in_scope", "g1"
    ),
    "revoked at the same instant as issued": Row(
        (B0, grant("10:00:02"), revoke("10:00:02")), call("10:00:05"), "revoked_grant", "g1"
    ),
    "re-issued after revocation": Row(
        (B0, grant("10:00:00"), revoke("10:00:02"), grant("10:00:03")), call("10:00:05"), "in_scope", "g1"
    ),
    "re-issued at the revocation instant: revocation wins": Row(
        (B0, grant("10:00:00"), revoke("10:00:02"), grant("10:00:02")), call("10:00:05"), "revoked_grant", "g1"
    ),
    "re-issued after the call: the revoked version decides": Row(
        (B0, grant("10:00:00"), revoke("10:00:02"), grant("10:00:06")), call("10:00:05"), "revoked_grant", "g1"
    ),
    "revocation of another grant id": Row(
        (B0, grant("10:00:00"), revoke("10:00:02", gid="g2")), call("10:00:05"), "in_scope", "g1"
    ),
    "revocation in another delegation": Row(
        (B0, grant("10:00:00"), revoke("10:00:02", agent="agent-2")), call("10:00:05"), "in_scope", "g1"
    ),
    "revoked covering beats active non-covering": Row(
        (B0, grant("10:00:00", gid="g1", tools=("web/*",)), grant("10:00:00", gid="g2"), revoke("10:00:01", gid="g2")),
        call("10:00:05"),
        "revoked_grant",
        "g2",
    ),
    "active covering beats revoked with later not_before": Row(
        (B0, grant("10:00:00", gid="g2"), grant("10:00:01", gid="g1"), revoke("10:00:02", gid="g1")),
        call("10:00:05"),
        "in_scope",
        "g2",
    ),
    "revoked and expired covering grant": Row(
        (B0, grant("10:00:00", expires_at="10:00:04"), revoke("10:00:02")), call("10:00:05"), "revoked_grant", "g1"
    ),
    "several revoked: latest not_before": Row(
        (
            B0,
            grant("10:00:00", gid="g1", not_before="10:00:00"),
            grant("10:00:00", gid="g2", not_before="10:00:01"),
            revoke("10:00:02", gid="g1"),
            revoke("10:00:02", gid="g2"),
        ),
        call("10:00:05"),
        "revoked_grant",
        "g2",
    ),
    "revoked beats expired with later not_before": Row(
        (
            B0,
            grant("10:00:00", gid="g1", not_before="10:00:00"),
            grant("10:00:00", gid="g2", not_before="10:00:02", expires_at="10:00:03"),
            revoke("10:00:02", gid="g1"),
        ),
        call("10:00:05"),
        "revoked_grant",
        "g1",
    ),
    # 7 expired_grant
    "expired before the call": Row(
        (B0, grant("10:00:00", expires_at="10:00:04")), call("10:00:05"), "expired_grant", "g1"
    ),
    "expires exactly at the call": Row(
        (B0, grant("10:00:00", expires_at="10:00:05")), call("10:00:05"), "expired_grant", "g1"
    ),
    "several expired: same not_before, smallest grant_id": Row(
        (
            B0,
            grant("10:00:00", gid="g9", expires_at="10:00:04"),
            grant("10:00:00", gid="g10", expires_at="10:00:03"),
        ),
        call("10:00:05"),
        "expired_grant",
        "g10",
    ),
    "several expired: latest not_before": Row(
        (
            B0,
            grant("10:00:00", gid="a", not_before="10:00:01", expires_at="10:00:04"),
            grant("10:00:00", gid="b", not_before="10:00:02", expires_at="10:00:03"),
        ),
        call("10:00:05"),
        "expired_grant",
        "b",
    ),
    "expired and not yet valid at once: expired": Row(
        (B0, grant("10:00:00", not_before="10:00:09", expires_at="10:00:04")), call("10:00:05"), "expired_grant", "g1"
    ),
    "expired covering beats not-yet-valid covering": Row(
        (B0, grant("10:00:00", gid="g1", expires_at="10:00:04"), grant("10:00:00", gid="g2", not_before="10:00:09")),
        call("10:00:05"),
        "expired_grant",
        "g1",
    ),
    "updated in place with a later expiry": Row(
        (B0, grant("10:00:00", expires_at="10:00:04"), grant("10:00:03", expires_at="10:00:10")),
        call("10:00:05"),
        "in_scope",
        "g1",
    ),
    # 8 not_yet_valid
    "not_before after the call": Row(
        (B0, grant("10:00:00", not_before="10:00:06")), call("10:00:05"), "not_yet_valid", "g1"
    ),
    "several not yet valid: latest not_before": Row(
        (B0, grant("10:00:00", gid="g1", not_before="10:00:07"), grant("10:00:00", gid="g2", not_before="10:00:06")),
        call("10:00:05"),
        "not_yet_valid",
        "g1",
    ),
    # 9 out_of_scope_tool
    "tool not in any grant": Row((B0, grant("10:00:00")), call("10:00:05", tool="fs/write_file"), "out_of_scope_tool"),
    "tool pattern over server/tool": Row(
        (B0, grant("10:00:00", tools=("read_*",))), call("10:00:05"), "out_of_scope_tool"
    ),
    "grant with no tools": Row((B0, grant("10:00:00", tools=())), call("10:00:05"), "out_of_scope_tool"),
    "updated in place to other tools": Row(
        (B0, grant("10:00:00", tools=("fs/read_*",)), grant("10:00:03", tools=("fs/write_*",))),
        call("10:00:05"),
        "out_of_scope_tool",
    ),
    "in place update after the call does not apply": Row(
        (B0, grant("10:00:00", tools=("fs/read_*",)), grant("10:00:06", tools=("fs/write_*",))),
        call("10:00:05"),
        "in_scope",
        "g1",
    ),
    "in place update adds the tool": Row(
        (B0, grant("10:00:00", tools=("fs/read_*",)), grant("10:00:03", tools=("fs/*",))),
        call("10:00:05", tool="fs/write_file"),
        "in_scope",
        "g1",
    ),
    # 10 out_of_scope_resource
    "resource outside the patterns": Row(
        (B0, grant("10:00:00", resources=("file:/data/*",))),
        call("10:00:05", resources=("file:/etc/passwd",)),
        "out_of_scope_resource",
    ),
    "one of two resources outside": Row(
        (B0, grant("10:00:00", resources=("file:/data/*",))),
        call("10:00:05", resources=("file:/data/a.txt", "file:/etc/passwd")),
        "out_of_scope_resource",
    ),
    "resources split over two grants do not combine": Row(
        (
            B0,
            grant("10:00:00", gid="g1", resources=("file:/data/*",)),
            grant("10:00:00", gid="g2", resources=("file:/etc/*",)),
        ),
        call("10:00:05", resources=("file:/data/a.txt", "file:/etc/passwd")),
        "out_of_scope_resource",
    ),
    "revoked grant with matching tools counts for 9/10": Row(
        (B0, grant("10:00:00", resources=("file:/data/*",)), revoke("10:00:01")),
        call("10:00:05", resources=("file:/etc/passwd",)),
        "out_of_scope_resource",
    ),
    # tenants kept apart
    "same ids in another tenant: session": Row(
        (bound("10:00:00", tenant="globex"), grant("10:00:00", tenant="globex")), call("10:00:05"), "unbound_session"
    ),
    "same ids in another tenant: grant": Row((B0, grant("10:00:00", tenant="globex")), call("10:00:05"), "no_grant"),
    "same ids in another tenant: revocation": Row(
        (B0, grant("10:00:00"), revoke("10:00:01", tenant="globex")), call("10:00:05"), "in_scope", "g1"
    ),
    "same ids in another tenant: end": Row(
        (B0, grant("10:00:00"), ended("10:00:01", tenant="globex")), call("10:00:05"), "in_scope", "g1"
    ),
    # matched_grant_id tie-break among active grants
    "several active: latest not_before": Row(
        (B0, grant("10:00:00", gid="g1", not_before="10:00:02"), grant("10:00:00", gid="g2", not_before="10:00:01")),
        call("10:00:05"),
        "in_scope",
        "g1",
    ),
    "several active: same not_before, smallest grant_id": Row(
        (B0, grant("10:00:00", gid="g2"), grant("10:00:00", gid="g1"), grant("10:00:00", gid="g3")),
        call("10:00:05"),
        "in_scope",
        "g1",
    ),
    "several active: not_before beats grant_id": Row(
        (B0, grant("10:00:00", gid="a"), grant("10:00:01", gid="z")),
        call("10:00:05"),
        "in_scope",
        "z",
    ),
    "non-covering grant ignored for the tie-break": Row(
        (B0, grant("10:00:00", gid="g2"), grant("10:00:04", gid="g1", tools=("web/*",))),
        call("10:00:05"),
        "in_scope",
        "g2",
    ),
}


@pytest.mark.parametrize("row", list(CASES.values()), ids=list(CASES))
def test_verdict(row: Row) -> None:
    decision = engine_with(*row.facts).decide(row.call)
    assert (decision.verdict, decision.matched_grant_id) == (row.verdict, row.matched), decision.reasons


@pytest.mark.parametrize("row", list(CASES.values()), ids=list(CASES))
def test_verdict_same_in_reverse_order_and_via_the_two_stages(row: Row) -> None:
    engine = DecisionEngine()
    for fact in reversed(row.facts):
        engine.add_fact(fact)
    for fact in row.facts:
        assert not engine.add_fact(fact)  # duplicates
    decision = engine.decide(row.call)
    assert decision == engine_with(*row.facts).decide(row.call)

    # Stage 1 keyed by session, stage 2 keyed by delegation, as the live pipeline runs them.
    c = row.call
    sessions = SessionHistory(c.tenant, c.session_id)
    for f in row.facts:
        if isinstance(f, (SessionBound, SessionEnded)) and (f.tenant, f.session_id) == (c.tenant, c.session_id):
            sessions.add(f)
    attribution = attribute(c, sessions.state_at(c.event_time))
    grants = []
    if not attribution.terminal:
        assert attribution.principal is not None and attribution.agent_id is not None
        history = GrantHistory(c.tenant, attribution.principal, attribution.agent_id)
        for f in row.facts:
            if isinstance(f, (GrantIssued, GrantRevoked)) and (f.tenant, f.principal, f.agent_id) == (
                c.tenant,
                attribution.principal,
                attribution.agent_id,
            ):
                history.add(f)
        grants = history.grants_at(c.event_time)
    assert authorize(c, attribution, grants) == decision


def test_every_verdict_has_a_row() -> None:
    # approval_denied, approval_missing and out_of_policy need policies or approvals: their rows are
    # in test_policy_approval_verdicts.py
    new = {"approval_denied", "approval_missing", "out_of_policy"}
    assert {row.verdict for row in CASES.values()} == set(VERDICTS) - new


def test_matched_grant_id_only_for_verdicts_4_and_6_to_8() -> None:
    for name, row in CASES.items():
        with_grant = row.verdict in ("in_scope", "revoked_grant", "expired_grant", "not_yet_valid")
        assert (row.matched is not None) == with_grant, name


def test_verdicts_in_design_order() -> None:
    assert VERDICTS == (
        "unbound_session",
        "identity_mismatch",
        "session_expired",
        "in_scope",
        "approval_denied",
        "approval_missing",
        "no_grant",
        "out_of_policy",
        "revoked_grant",
        "expired_grant",
        "not_yet_valid",
        "out_of_scope_tool",
        "out_of_scope_resource",
    )


# ------------------------------------------------------------------ reasons and facts


def test_reasons_name_each_grant_and_why() -> None:
    b = bound("10:00:00")
    g1 = grant("10:00:00", gid="g1", tools=("fs/*",), resources=("file:/data/*",))
    r1 = revoke("10:00:02", gid="g1", by="bob", reason="left the team")
    g2 = grant("10:00:00", gid="g2", tools=("fs/read_*",))
    g3 = grant("10:00:00", gid="g3", tools=("fs/*",), resources=("file:/data/*",), expires_at="10:00:04")
    c = call("10:00:05", tool="fs/write_file", resources=("file:/etc/passwd",))
    decision = engine_with(b, g1, r1, g2, g3).decide(c)
    assert decision.verdict == "out_of_scope_resource"
    assert decision.matched_grant_id is None
    assert (decision.principal, decision.agent_id) == ("alice", "agent-1")
    reasons = "\n".join(decision.reasons)
    assert "session 's1': bound to principal 'alice', agent 'agent-1'" in reasons
    assert "grant g1: resource 'file:/etc/passwd' outside ['file:/data/*']" in reasons
    assert "revoked at 2026-11-21T10:00:02.000Z by bob (left the team)" in reasons
    assert "grant g2: tools ['fs/read_*'] do not match 'fs/write_file'" in reasons
    assert (
        "grant g3: resource 'file:/etc/passwd' outside ['file:/data/*']; also expired at 2026-11-21T10:00:04.000Z"
        in (reasons)
    )


def test_reasons_for_a_revoked_covering_grant() -> None:
    decision = engine_with(B0, grant("10:00:00"), revoke("10:00:03", by="alice", reason="done")).decide(
        call("10:00:05")
    )
    assert decision.verdict == "revoked_grant"
    assert "grant g1: revoked at 2026-11-21T10:00:03.000Z by alice (done); it covers 'fs/read_file'" in decision.reasons


def test_reasons_for_identity_mismatch_and_session_states() -> None:
    d = engine_with(B0).decide(call("10:00:05", attested={"sub": "mallory", "client_id": "agent-9"}))
    assert "attested sub 'mallory' differs from the binding's principal 'alice'" in d.reasons
    assert "attested client_id 'agent-9' differs from the binding's agent_id 'agent-1'" in d.reasons
    assert d.facts["attested"] == {"sub": "mallory", "client_id": "agent-9"}

    d = engine_with(bound("10:00:00", valid_until="10:00:04")).decide(call("10:00:05"))
    assert "expired at 2026-11-21T10:00:04.000Z" in d.reasons[0]
    d = engine_with(bound("10:00:00", valid_from="10:00:09")).decide(call("10:00:05"))
    assert "not valid until 2026-11-21T10:00:09.000Z" in d.reasons[0]
    d = engine_with().decide(call("10:00:05"))
    assert d.reasons[0].startswith("session 's1': unbound at 2026-11-21T10:00:05.000Z")
    assert (d.principal, d.agent_id) == (None, None)


def test_facts_record_the_event_ids_used() -> None:
    b, e, b2 = bound("10:00:00"), ended("10:00:01"), bound("10:00:02")
    g1, r1, g1b = grant("10:00:00", gid="g1"), revoke("10:00:01", gid="g1"), grant("10:00:03", gid="g1")
    g2, r2 = grant("10:00:00", gid="g2", tools=("web/*",)), revoke("10:00:04", gid="g2")
    decision = engine_with(b, e, b2, g1, r1, g1b, g2, r2).decide(call("10:00:05"))
    assert decision.verdict == "in_scope"
    assert decision.facts == {
        "as_of": "2026-11-21T10:00:05.000Z",
        "session_id": "s1",
        "session": {"status": "bound", "valid": True, "event_id": b2.event_id, "binding_event_id": b2.event_id},
        "grants": [
            {
                "grant_id": "g1",
                "version_event_id": g1b.event_id,
                "revocation_event_id": None,
                "status": "active",
                "tools_match": True,
                "covers": True,
            },
            {
                "grant_id": "g2",
                "version_event_id": g2.event_id,
                "revocation_event_id": r2.event_id,
                "status": "revoked",
                "tools_match": False,
                "covers": False,
            },
        ],
    }


def test_ended_session_reports_the_binding_it_closed() -> None:
    b, e = bound("10:00:00", principal="bob", agent="agent-2"), ended("10:00:03")
    d = engine_with(b, e).decide(call("10:00:05"))
    assert d.verdict == "session_expired"
    assert (d.principal, d.agent_id) == ("bob", "agent-2")
    assert d.facts["session"] == {
        "status": "ended",
        "valid": False,
        "event_id": e.event_id,
        "binding_event_id": b.event_id,
    }
    assert d.facts["grants"] == []


# ------------------------------------------------------------------------- histories


def test_session_history_state_and_idempotence() -> None:
    h = SessionHistory("acme", "s1")
    b = bound("10:00:00", valid_until="10:00:09")
    e = ended("10:00:05")
    assert h.add(b) and h.add(e)
    assert not h.add(b) and not h.add(e)
    assert len(h) == 2 and list(h) == [b, e]

    s = h.state_at(at("09:59:59"))
    assert (s.status, s.valid, s.event_id, s.principal) == ("unbound", False, None, None)
    s = h.state_at(at("10:00:04"))
    assert (s.status, s.valid, s.event_id, s.principal, s.agent_id) == ("bound", True, b.event_id, "alice", "agent-1")
    assert (s.valid_from, s.valid_until) == (at("10:00:00"), at("10:00:09"))
    s = h.state_at(at("10:00:05"))
    assert (s.status, s.valid, s.event_id, s.binding_event_id) == ("ended", False, e.event_id, b.event_id)


def test_histories_reject_foreign_keys_and_non_facts() -> None:
    with pytest.raises(ValueError, match="globex"):
        SessionHistory("acme", "s1").add(bound("10:00:00", tenant="globex"))
    with pytest.raises(ValueError, match="s2"):
        SessionHistory("acme", "s1").add(ended("10:00:00", session="s2"))
    with pytest.raises(ValueError, match="bob"):
        GrantHistory("acme", "alice", "agent-1").add(grant("10:00:00", principal="bob"))
    with pytest.raises(TypeError):
        SessionHistory("acme", "s1").add(grant("10:00:00"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        GrantHistory("acme", "alice", "agent-1").add(bound("10:00:00"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DecisionEngine().add_fact(call("10:00:00"))


def test_grant_history_versions_and_flags() -> None:
    h = GrantHistory("acme", "alice", "agent-1")
    v1 = grant("10:00:00", tools=("fs/read_*",), expires_at="10:00:20")
    r = revoke("10:00:02")
    v2 = grant("10:00:04", tools=("fs/*",), not_before="10:00:06", expires_at="10:00:08")
    for f in (v2, r, v1):
        assert h.add(f)
    assert not h.add(r)

    assert h.grants_at(at("09:00:00")) == []
    (g,) = h.grants_at(at("10:00:01"))
    assert (g.version, g.revoked, g.active) == (v1, False, True)
    (g,) = h.grants_at(at("10:00:02"))
    assert (g.version, g.revocation, g.revoked, g.active, g.status) == (v1, r, True, False, "revoked")
    (g,) = h.grants_at(at("10:00:05"))
    assert (g.version, g.revoked, g.not_yet_valid, g.active, g.status) == (v2, False, True, False, "not_yet_valid")
    (g,) = h.grants_at(at("10:00:06"))
    assert (g.version, g.active) == (v2, True)
    (g,) = h.grants_at(at("10:00:08"))
    assert (g.version, g.expired, g.active, g.status) == (v2, True, False, "expired")


def test_compaction_drops_superseded_facts() -> None:
    s = SessionHistory("acme", "s1")
    b1, e1, b2, e2, b3 = bound("10:00:00"), ended("10:00:01"), bound("10:00:02"), ended("10:00:03"), bound("10:00:09")
    for f in (b1, e1, b2, e2, b3):
        s.add(f)
    assert s.compact(at("10:00:05")) == 2  # b1, e1 go; e2 and the binding it closed (b2) stay
    assert list(s) == [b2, e2, b3]
    assert s.add(b1)  # a forgotten duplicate is accepted again, and changes nothing at/after the horizon
    assert s.state_at(at("10:00:05")).binding_event_id == b2.event_id

    g = GrantHistory("acme", "alice", "agent-1")
    v1, r_old, v2, r_new, r_late, v3 = (
        grant("10:00:00"),
        revoke("10:00:01"),
        grant("10:00:02"),
        revoke("10:00:04"),
        revoke("10:00:07"),
        grant("10:00:08"),
    )
    stray = revoke("10:00:01", gid="g-never-issued")
    for gf in (v1, r_old, v2, r_new, r_late, v3, stray):
        g.add(gf)
    assert g.compact(at("10:00:05")) == 2  # v1, r_old; stray stays (its grant_issued may be late)
    assert list(g) == [stray, v2, r_new, r_late, v3]
    assert g.compact(at("10:00:05")) == 0


def test_engine_compaction_keeps_verdicts_after_horizon() -> None:
    facts = (bound("10:00:00"), grant("10:00:00"), revoke("10:00:02"), grant("10:00:03"), ended("10:00:08"))
    engine = engine_with(*facts)
    calls = [call(t) for t in ("10:00:04", "10:00:05", "10:00:08")]
    before = [engine.decide(c) for c in calls]
    assert engine.compact(at("10:00:04")) == 2  # the first version and its revocation
    assert [engine.decide(c) for c in calls] == before
    assert [d.verdict for d in before] == ["in_scope", "in_scope", "session_expired"]


@pytest.mark.parametrize("module", ["engine", "approvals", "policy"])
def test_engine_is_pure(module: str) -> None:
    """No clock reads and no Kafka/Faust/ClickHouse client in the decision core (engine, approvals,
    policies; Cedar runs in-process through cedarpy)."""
    import ast
    import importlib
    from pathlib import Path

    source = importlib.import_module(f"detections.{module}").__file__
    assert source is not None
    tree = ast.parse(Path(source).read_text(encoding="utf-8"))
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
    }
    assert imported <= {
        "__future__",
        "bisect",
        "fnmatch",
        "collections",
        "dataclasses",
        "datetime",
        "typing",
        "schemas",
        "detections",
        "cedarpy",
        "decimal",
        "json",
        "re",
    }
    called = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not called & {"now", "utcnow", "today", "time", "monotonic", "perf_counter"}
