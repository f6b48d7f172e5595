"""Verdicts with Cedar policies and human approvals (DESIGN.md, "Policy", "Approval", verdicts 4-13).

Each test judges canonical events as ``scopewatch replay`` does (:func:`detections.catalog.judge`).
Times are "10:00:05" on 2026-11-21 (a Saturday), UTC; tenant acme, session s1, principal alice,
agent agent-1.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import datetime
from typing import Any

import pytest

from detections.catalog import Detector, judge
from detections.engine import Decision
from detections.policy import cedar_context, cedar_value, compile_text, split_statements
from schemas import (
    ApprovalDecided,
    BaseEvent,
    GrantIssued,
    PolicyPublished,
    SessionBound,
    ToolCall,
    arguments_digest,
    parse_timestamp,
)

_ids = itertools.count(1)


def at(hms: str, day: int = 21) -> datetime:
    return parse_timestamp(f"2026-11-{day:02d}T{hms}.000Z")


def _eid() -> str:
    return str(uuid.UUID(int=next(_ids)))


def bound(time: str = "09:00:00") -> SessionBound:
    return SessionBound(
        event_id=_eid(),
        event_time=at(time),
        tenant="acme",
        session_id="s1",
        principal="alice",
        agent_id="agent-1",
        valid_from=at(time),
    )


def grant(
    time: str = "09:00:00",
    gid: str = "g1",
    tools: tuple[str, ...] = ("fs/*",),
    resources: tuple[str, ...] = (),
    policies: tuple[str, ...] = (),
    approval_tools: tuple[str, ...] = (),
    not_before: str | None = None,
    purpose: str = "triage",
) -> GrantIssued:
    return GrantIssued(
        event_id=_eid(),
        event_time=at(time),
        tenant="acme",
        grant_id=gid,
        principal="alice",
        agent_id="agent-1",
        tools=list(tools),
        resources=list(resources),
        not_before=at(not_before or time),
        granted_by="alice",
        purpose=purpose,
        policies=list(policies),
        approval_tools=list(approval_tools),
    )


def policy(
    time: str, cedar: str, pid: str = "p1", version: str = "v1", labels: dict[str, list[str]] | None = None
) -> PolicyPublished:
    return PolicyPublished(
        event_id=_eid(),
        event_time=at(time),
        tenant="acme",
        policy_id=pid,
        version=version,
        cedar=cedar,
        labels=labels or {},
        published_by="ci",
    )


def approval(
    time: str,
    aid: str,
    decision: str = "approve",
    tool: str = "fs/write_file",
    arguments: dict[str, Any] | None = None,
    expires_at: str | None = None,
) -> ApprovalDecided:
    return ApprovalDecided.model_validate(
        {
            "event_id": _eid(),
            "event_time": at(time),
            "tenant": "acme",
            "approval_id": aid,
            "principal": "alice",
            "agent_id": "agent-1",
            "tool": tool,
            "arguments_digest": None if arguments is None else arguments_digest(arguments),
            "decision": decision,
            "approver": "bob",
            "expires_at": None if expires_at is None else at(expires_at),
        }
    )


def call(
    time: str,
    tool: str = "fs/write_file",
    arguments: dict[str, Any] | None = None,
    resources: tuple[str, ...] = (),
    cid: str | None = None,
    day: int = 21,
    attested: dict[str, Any] | None = None,
) -> ToolCall:
    server, _, name = tool.partition("/")
    return ToolCall(
        event_id=_eid(),
        event_time=at(time, day),
        tenant="acme",
        call_id=cid or f"c-{next(_ids)}",
        session_id="s1",
        server=server,
        tool=name,
        arguments=arguments if arguments is not None else {"path": "/data/a"},
        resources=list(resources),
        transport="stdio",
        attested=attested,
    )


def decide(*events: BaseEvent) -> list[Decision]:
    return [j.decision for j in judge(list(events), Detector([]))]


def verdicts(*events: BaseEvent) -> list[tuple[str, str | None, str | None]]:
    return [(d.verdict, d.matched_grant_id, d.approval_id) for d in decide(*events)]


PERMIT_ALL = 'permit(principal, action == Action::"call", resource);'
GATED = grant(approval_tools=("fs/write_*",))


# ------------------------------------------------------------------------------ approvals


def test_approval_at_the_call_instant_authorises() -> None:
    assert verdicts(bound(), GATED, approval("10:00:00", "a1"), call("10:00:00")) == [("in_scope", "g1", "a1")]


def test_approval_after_the_call_does_not() -> None:
    assert verdicts(bound(), GATED, approval("10:00:01", "a1"), call("10:00:00")) == [("approval_missing", "g1", None)]


def test_approval_expired_at_the_call_instant_does_not_authorise() -> None:
    events = (bound(), GATED, approval("09:59:00", "a1", expires_at="10:00:00"))
    assert verdicts(*events, call("10:00:00")) == [("approval_missing", "g1", None)]
    assert verdicts(*events, call("09:59:59")) == [("in_scope", "g1", "a1")]


def test_deny_then_approve_authorises_and_approve_then_deny_denies() -> None:
    assert verdicts(
        bound(), GATED, approval("09:50:00", "a1", "deny"), approval("09:55:00", "a2"), call("10:00:00")
    ) == [("in_scope", "g1", "a2")]
    assert verdicts(
        bound(), GATED, approval("09:50:00", "a1"), approval("09:55:00", "a2", "deny"), call("10:00:00")
    ) == [("approval_denied", "g1", "a2")]


def test_deny_and_approve_at_the_same_instant_larger_approval_id_is_later() -> None:
    both = (approval("09:50:00", "a1", "deny"), approval("09:50:00", "a2"))
    assert verdicts(bound(), GATED, *both, call("10:00:00")) == [("in_scope", "g1", "a2")]
    both = (approval("09:50:00", "a2", "deny"), approval("09:50:00", "a1"))
    assert verdicts(bound(), GATED, *both, call("10:00:00")) == [("approval_denied", "g1", "a2")]


def test_approval_bound_to_other_arguments_does_not_authorise() -> None:
    bound_to = {"path": "/data/a", "mode": "w"}
    events = (bound(), GATED, approval("09:50:00", "a1", arguments=bound_to))
    assert verdicts(*events, call("10:00:00", arguments={"path": "/data/b", "mode": "w"})) == [
        ("approval_missing", "g1", None)
    ]
    # the same arguments in another key order (and 1.0 for 1) hash the same (RFC 8785)
    assert verdicts(*events, call("10:00:00", arguments={"mode": "w", "path": "/data/a"})) == [("in_scope", "g1", "a1")]


def test_approval_for_another_tool_does_not_authorise() -> None:
    events = (bound(), GATED, approval("09:50:00", "a1", tool="fs/write_other"))
    assert verdicts(*events, call("10:00:00")) == [("approval_missing", "g1", None)]


def test_two_calls_and_one_approval_the_earlier_call_takes_it() -> None:
    later, earlier = call("10:00:05", cid="c-b"), call("10:00:01", cid="c-a")
    # input order is not judging order: the earlier event_time takes the approval
    assert verdicts(bound(), GATED, approval("09:50:00", "a1"), later, earlier) == [
        ("approval_missing", "g1", None),
        ("in_scope", "g1", "a1"),
    ]


def test_same_instant_calls_use_approvals_in_call_id_order_earliest_issued_first() -> None:
    events = (bound(), GATED, approval("09:55:00", "a0"), approval("09:50:00", "a9"))
    second, first = call("10:00:00", cid="c-2"), call("10:00:00", cid="c-1")
    assert verdicts(*events, second, first) == [("in_scope", "g1", "a0"), ("in_scope", "g1", "a9")]


def test_a_call_not_needing_approval_does_not_use_one() -> None:
    free = grant(gid="g0", tools=("fs/write_file",))  # no approval tools: preferred over g1
    first, second = call("10:00:00"), call("10:00:01")
    assert verdicts(bound(), GATED, free, approval("09:50:00", "a1"), first, second) == [
        ("in_scope", "g0", None),
        ("in_scope", "g0", None),
    ]


def test_grant_needing_no_approval_preferred_even_with_earlier_not_before() -> None:
    free = grant(gid="g2", tools=("fs/write_file",), not_before="08:00:00", time="08:00:00")
    gated = grant(gid="g1", approval_tools=("fs/*",), not_before="09:30:00", time="09:30:00")
    assert verdicts(bound(), free, gated, approval("09:50:00", "a1"), call("10:00:00")) == [("in_scope", "g2", None)]


def test_denied_approval_is_not_used_and_a_later_approve_works() -> None:
    events = (bound(), GATED, approval("09:50:00", "a1", "deny"), approval("10:00:02", "a2"))
    assert verdicts(*events, call("10:00:01", cid="x1"), call("10:00:03", cid="x2")) == [
        ("approval_denied", "g1", "a1"),
        ("in_scope", "g1", "a2"),
    ]


def test_calls_with_other_verdicts_do_not_use_approvals() -> None:
    events = (bound(), GATED, approval("09:50:00", "a1"))
    outside = call("10:00:00", tool="web/fetch")  # out_of_scope_tool
    assert verdicts(*events, outside, call("10:00:01")) == [("out_of_scope_tool", None, None), ("in_scope", "g1", "a1")]


def test_approval_evidence_names_approver_and_event() -> None:
    events = (bound(), GATED, approval("09:50:00", "a1"))
    (d,) = decide(*events, call("10:00:00"))
    assert (d.approval_id, d.approver) == ("a1", "bob")
    facts = d.facts["approval"]
    assert isinstance(facts, dict) and facts["approval_id"] == "a1" and facts["candidates"] == 1
    assert any("approved by bob" in r for r in d.reasons)


# ------------------------------------------------------------------------------- policies


def pgrant(*pids: str, **kw: Any) -> GrantIssued:
    return grant(policies=pids or ("p1",), **kw)


def test_policy_permits() -> None:
    (d,) = decide(bound(), pgrant(), policy("08:00:00", PERMIT_ALL), call("10:00:00"))
    assert (d.verdict, d.matched_grant_id) == ("in_scope", "g1")
    assert d.policy is not None and d.policy.versions == ("p1@v1",) and d.policy.decision == "Allow"
    assert d.policy.determining == ("p1@v1#0",)


def test_empty_policy_set_denies_out_of_policy() -> None:
    (d,) = decide(bound(), pgrant(), policy("08:00:00", "// nothing"), call("10:00:00"))
    assert (d.verdict, d.matched_grant_id) == ("out_of_policy", "g1")
    assert d.policy is not None and d.policy.decision == "Deny"


def test_policy_published_after_the_call_does_not_count() -> None:
    events = (bound(), pgrant(), policy("10:00:01", PERMIT_ALL))
    (d,) = decide(*events, call("10:00:00"))
    assert d.verdict == "out_of_policy"
    assert d.policy is not None and d.policy.decision is None
    assert any("no version published" in e for e in d.policy.errors)
    assert [x.verdict for x in decide(*events, call("10:00:01"))] == ["in_scope"]


def test_latest_version_at_t_decides() -> None:
    forbid_all = "forbid(principal, action, resource);" + PERMIT_ALL
    events = (bound(), pgrant(), policy("08:00:00", PERMIT_ALL), policy("09:30:00", forbid_all, version="v2"))
    d1, d2 = decide(*events, call("09:00:00"), call("10:00:00"))
    assert d1.verdict == "in_scope"
    assert d2.verdict == "out_of_policy"
    assert d2.policy is not None and d2.policy.versions == ("p1@v2",) and d2.policy.determining == ("p1@v2#0",)


def test_missing_policy_fails_closed() -> None:
    events = (bound(), pgrant("p1", "p2"), policy("08:00:00", PERMIT_ALL))
    (d,) = decide(*events, call("10:00:00"))
    assert d.verdict == "out_of_policy"
    assert d.policy is not None and any("policy p2" in e for e in d.policy.errors)


def test_unparseable_policy_fails_closed_with_the_error() -> None:
    events = (bound(), pgrant("p1", "p2"), policy("08:00:00", PERMIT_ALL), policy("08:00:00", "permit(", pid="p2"))
    (d,) = decide(*events, call("10:00:00"))
    assert d.verdict == "out_of_policy"
    assert d.policy is not None and any("does not parse" in e for e in d.policy.errors)


def test_an_erroring_forbid_is_skipped_by_cedar_and_the_error_recorded() -> None:
    text = PERMIT_ALL + "\nforbid(principal, action, resource) when { context.arguments.amount > 10 };"
    events = (bound(), pgrant(), policy("08:00:00", text))
    (d,) = decide(*events, call("10:00:00", arguments={"amount": 12.5}))  # a decimal compared with a Long
    assert d.verdict == "in_scope"  # DESIGN: permitted iff Cedar answers Allow
    assert d.policy is not None and d.policy.errors and "p1@v1#1" in d.policy.errors[0]
    (d,) = decide(*events, call("10:00:00", arguments={"amount": 12}))
    assert d.verdict == "out_of_policy" and d.policy is not None and d.policy.determining == ("p1@v1#1",)


def test_labels_from_resource_globs() -> None:
    text = PERMIT_ALL + '\nforbid(principal, action, resource) when { context.labels.contains("restricted") };'
    events = (bound(), pgrant(), policy("08:00:00", text, labels={"restricted": ["db:prod/*"], "other": ["x:*"]}))
    d1, d2 = decide(*events, call("10:00:00", resources=("db:prod/users",)), call("10:00:01", resources=("db:dev/u",)))
    assert (d1.verdict, d2.verdict) == ("out_of_policy", "in_scope")


def test_decimals_in_arguments() -> None:
    text = (
        PERMIT_ALL
        + '\nforbid(principal, action, resource) when { context.arguments.amount.greaterThan(decimal("10.5")) };'
    )
    events = (bound(), pgrant(), policy("08:00:00", text))
    got = [
        d.verdict
        for d in decide(*events, *(call("10:00:00", arguments={"amount": a}) for a in (10.50001, 10.50005, 10.6)))
    ]
    # 10.50001 -> 10.5000; 10.50005 -> 10.5000 (half to even); 10.6 > 10.5
    assert got == ["in_scope", "in_scope", "out_of_policy"]


def test_hour_and_weekday() -> None:
    text = (
        "permit(principal, action, resource) when { context.hour >= 9 && context.hour < 18 && context.weekday <= 5 };"
    )
    events = (bound(), pgrant(), policy("08:00:00", text, version="office"))
    monday, saturday = 23, 21
    got = [
        d.verdict
        for d in decide(
            *events,
            call("10:00:00", day=monday),
            call("18:00:00", day=monday),
            call("10:00:00", day=saturday),
        )
    ]
    assert got == ["in_scope", "out_of_policy", "out_of_policy"]


def test_request_principal_parent_resource_and_context() -> None:
    text = (
        'permit(principal in User::"alice", action == Action::"call", resource == Tool::"fs/write_file") '
        'when { resource.server == "fs" && resource.tool == "write_file" && context.tenant == "acme" '
        '&& context.grant_id == "g1" && context.purpose == "triage" && context.session_id == "s1" '
        '&& context.transport == "stdio" && context.attested && context.resources.contains("file:/a") };'
    )
    events = (bound(), pgrant(), policy("08:00:00", text))
    d1, d2 = decide(
        *events,
        call("10:00:00", resources=("file:/a",), attested={"sub": "alice"}),
        call("10:00:01", resources=("file:/a",), attested={"sub": None}),
    )
    assert (d1.verdict, d2.verdict) == ("in_scope", "out_of_policy")


def test_out_of_policy_comes_after_no_grant_and_before_revoked() -> None:
    events = (bound(), pgrant(), policy("08:00:00", "// none"), grant(gid="g2", time="09:00:00", not_before="11:00:00"))
    (d,) = decide(*events, call("10:00:00"))
    assert (d.verdict, d.matched_grant_id) == ("out_of_policy", "g1")


def test_policy_permitting_grant_with_approval_then_approval_rules() -> None:
    events = (bound(), pgrant(approval_tools=("fs/write_*",)), policy("08:00:00", PERMIT_ALL))
    assert verdicts(*events, call("10:00:00")) == [("approval_missing", "g1", None)]
    assert verdicts(*events, approval("09:00:00", "a1", "deny"), call("10:00:00")) == [("approval_denied", "g1", "a1")]


def test_a_grant_not_permitting_does_not_need_its_approval() -> None:
    events = (bound(), pgrant(approval_tools=("fs/write_*",)), policy("08:00:00", "// none"))
    assert verdicts(*events, approval("09:00:00", "a1"), call("10:00:00")) == [("out_of_policy", "g1", None)]


# --------------------------------------------------------------------- context conversion


def test_cedar_value_conversion() -> None:
    errors: list[str] = []
    value = {
        "i": 3,
        "f1": 1.0,
        "d": 2.25,
        "half": 0.00005,
        "big": 2**63,
        "huge": 1e300,
        "neg": -(2**63),
        "n": None,
        "l": [1, None, "x"],
        "o": {"a": None, "b": True},
        "esc": {"__entity": {"type": "User", "id": "admin"}},
    }
    got = cedar_value(value, "arguments", errors)
    assert got == {
        "i": 3,
        "f1": 1,
        "d": {"__extn": {"fn": "decimal", "arg": "2.2500"}},
        "half": {"__extn": {"fn": "decimal", "arg": "0.0000"}},
        "neg": -(2**63),
        "l": [1, "x"],
        "o": {"b": True},
    }
    assert len(errors) == 3 and any("big" in e for e in errors) and any("huge" in e for e in errors)
    assert any("__entity" in e for e in errors)


def test_context_hour_weekday_and_attested() -> None:
    errors: list[str] = []
    ctx = cedar_context(call("23:30:00", day=22, attested={}), "g1", "p", {"b", "a"}, errors)
    assert (ctx["hour"], ctx["weekday"], ctx["attested"], ctx["labels"]) == (23, 7, False, ["a", "b"])


def test_policies_are_annotated_with_policy_id_version_and_index() -> None:
    text, ids, error = compile_text(
        "p1", "abc", '@id("mine") permit(principal, action, resource);\nforbid(principal, action, resource);'
    )
    assert error is None and ids == ("p1@abc#0", "p1@abc#1")
    assert '@id("p1@abc#0")' in text and '@id("p1@abc#1")' in text and "mine" not in text


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        (
            "permit(principal, action, resource);\n\n// c;\nforbid(principal, action, resource)\n"
            ' when { "a;b" == "x" };',
            [1, 4],
        ),
        ("permit(", [1]),
    ],
)
def test_split_statements_lines(text: str, lines: list[int]) -> None:
    assert [line for line, _ in split_statements(text)] == lines


def test_live_state_keeps_policies_approval_tools_and_purpose_of_a_grant() -> None:
    from detections.compact import decode_grants, encode_grants
    from detections.engine import GrantHistory

    history = GrantHistory("acme", "alice", "agent-1")
    history.add(pgrant(approval_tools=("fs/write_*",)))
    history.add(grant(gid="g2"))
    back = decode_grants(encode_grants(history), "acme", "alice", "agent-1")
    (g1, g2) = back.grants_at(at("10:00:00"))
    assert (g1.version.policies, g1.version.approval_tools, g1.version.purpose) == (["p1"], ["fs/write_*"], "triage")
    assert (g2.version.policies, g2.version.approval_tools) == ([], [])
