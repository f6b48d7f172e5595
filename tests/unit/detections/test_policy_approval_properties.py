"""Properties of replay with policies and approvals (the older properties stay in test_engine_properties.py).

* Replay does not depend on the order of the events in the file, nor on duplicated facts.
* Each approval authorises at most one call; an approval_denied names a deny; in_scope through an
  approval names an approve that was a candidate of the call.
* The verdicts agree with a literal, slow reading of DESIGN's Approval rule for one gated grant.
"""

from __future__ import annotations

import fnmatch
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from detections.catalog import Detector, judge
from detections.engine import Decision
from schemas import (
    ApprovalDecided,
    BaseEvent,
    GrantIssued,
    PolicyPublished,
    SessionBound,
    ToolCall,
    arguments_digest,
)

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
TEXTS = [
    'permit(principal, action == Action::"call", resource);',
    'permit(principal, action, resource) unless { resource.tool == "write" && context.arguments.x == 2 };',
    "",
    "permit(",
]
ARGS = [{"x": 1}, {"x": 2}]


def T(s: int) -> datetime:
    return T0 + timedelta(seconds=s)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[BaseEvent], list[ToolCall]]:
    n = iter(range(1, 10_000))

    def eid() -> str:
        return str(uuid.UUID(int=next(n)))

    facts: list[BaseEvent] = [
        SessionBound(
            event_id=eid(),
            event_time=T(0),
            tenant="acme",
            session_id="s1",
            principal="alice",
            agent_id="a1",
            valid_from=T(0),
        )
    ]
    with_policy = draw(st.booleans())
    for gid in draw(st.lists(st.sampled_from(["g1", "g2"]), min_size=1, max_size=2, unique=True)):
        facts.append(
            GrantIssued(
                event_id=eid(),
                event_time=T(draw(st.integers(0, 3))),
                tenant="acme",
                grant_id=gid,
                principal="alice",
                agent_id="a1",
                tools=["fs/*"],
                not_before=T(0),
                granted_by="alice",
                policies=["p"] if with_policy and gid == "g1" else [],
                approval_tools=draw(st.sampled_from([[], ["fs/write"], ["fs/*"]])),
            )
        )
    for _ in range(draw(st.integers(0, 2)) if with_policy else 0):
        facts.append(
            PolicyPublished(
                event_id=eid(),
                event_time=T(draw(st.integers(0, 6))),
                tenant="acme",
                policy_id="p",
                version=f"v{draw(st.integers(0, 9))}",
                cedar=draw(st.sampled_from(TEXTS)),
                published_by="ci",
            )
        )
    for _ in range(draw(st.integers(0, 5))):
        args = draw(st.none() | st.sampled_from(ARGS))
        expires = draw(st.none() | st.integers(0, 9))
        facts.append(
            ApprovalDecided(
                event_id=eid(),
                event_time=T(draw(st.integers(0, 8))),
                tenant="acme",
                approval_id=draw(st.sampled_from(["a0", "a1", "a2", "a3"])),
                principal="alice",
                agent_id="a1",
                tool=draw(st.sampled_from(["fs/write", "fs/read"])),
                arguments_digest=None if args is None else arguments_digest(args),
                decision=draw(st.sampled_from(["approve", "approve", "deny"])),
                approver="bob",
                expires_at=None if expires is None else T(expires),
            )
        )
    calls = [
        ToolCall(
            event_id=eid(),
            event_time=T(draw(st.integers(0, 8))),
            tenant="acme",
            call_id=f"c{i}",
            session_id="s1",
            server="fs",
            tool=draw(st.sampled_from(["write", "read"])),
            arguments=draw(st.sampled_from(ARGS)),
            resources=[],
            transport="stdio",
        )
        for i in range(draw(st.integers(1, 6)))
    ]
    return facts, calls


def replay(events: list[BaseEvent]) -> dict[str, tuple[str, str | None, str | None]]:
    return {
        j.call.call_id: (j.decision.verdict, j.decision.matched_grant_id, j.decision.approval_id)
        for j in judge(events, Detector([]))
    }


@settings(max_examples=150, deadline=None)
@given(scenario=scenarios(), data=st.data())
def test_replay_does_not_depend_on_event_order_or_duplicate_facts(
    scenario: tuple[list[BaseEvent], list[ToolCall]], data: st.DataObject
) -> None:
    facts, calls = scenario
    expected = replay([*facts, *calls])
    shuffled = data.draw(st.permutations([*facts, *calls, *facts[: data.draw(st.integers(0, len(facts)))]]))
    assert replay(list(shuffled)) == expected


def _versions_at(facts: list[BaseEvent], t: datetime) -> dict[str, ApprovalDecided]:
    out: dict[str, ApprovalDecided] = {}
    for f in sorted((f for f in facts if isinstance(f, ApprovalDecided)), key=lambda f: (f.event_time, f.event_id)):
        if f.event_time <= t:
            out[f.approval_id] = f
    return out


def _candidates(facts: list[BaseEvent], c: ToolCall) -> list[ApprovalDecided]:
    t, digest = c.event_time, arguments_digest(c.arguments)
    found = [
        a
        for a in _versions_at(facts, t).values()
        if a.tool == f"{c.server}/{c.tool}"
        and a.arguments_digest in (None, digest)
        and (a.expires_at is None or t < a.expires_at)
    ]
    return sorted(found, key=lambda a: (a.event_time, a.approval_id))


@settings(max_examples=150, deadline=None)
@given(scenario=scenarios())
def test_each_approval_authorises_at_most_one_call_and_names_a_candidate(
    scenario: tuple[list[BaseEvent], list[ToolCall]],
) -> None:
    facts, calls = scenario
    judged = {j.call.call_id: j.decision for j in judge([*facts, *calls], Detector([]))}
    used = [d.approval_id for d in judged.values() if d.verdict == "in_scope" and d.approval_id is not None]
    assert len(used) == len(set(used))
    for c in calls:
        d: Decision = judged[c.call_id]
        names = {a.approval_id: a for a in _candidates(facts, c)}
        if d.verdict == "approval_denied":
            assert d.approval_id in names and names[d.approval_id].decision == "deny"
            assert list(names)[-1] == d.approval_id
        elif d.verdict == "in_scope" and d.approval_id is not None:
            assert names[d.approval_id].decision == "approve"
        elif d.verdict not in ("in_scope", "approval_missing"):
            assert d.approval_id is None


@settings(max_examples=200, deadline=None)
@given(scenario=scenarios())
def test_approval_rule_agrees_with_a_literal_reading(scenario: tuple[list[BaseEvent], list[ToolCall]]) -> None:
    facts, calls = scenario
    # approvals only here: no policies
    facts = [f for f in facts if not isinstance(f, PolicyPublished)]
    facts = [f.model_copy(update={"policies": []}) if isinstance(f, GrantIssued) else f for f in facts]
    grants = [f for f in facts if isinstance(f, GrantIssued)]
    judged = {j.call.call_id: j.decision for j in judge([*facts, *calls], Detector([]))}
    used: set[str] = set()
    for c in sorted(calls, key=lambda c: (c.event_time, c.call_id)):
        active = [g for g in grants if g.event_time <= c.event_time]
        name = f"{c.server}/{c.tool}"
        expected: tuple[str, Any]
        if not active:
            expected = ("no_grant", None)
        elif any(not any(fnmatch.fnmatchcase(name, p) for p in g.approval_tools) for g in active):
            expected = ("in_scope", None)
        else:
            found = _candidates(facts, c)
            if found and found[-1].decision == "deny":
                expected = ("approval_denied", found[-1].approval_id)
            else:
                free = [a for a in found if a.decision == "approve" and a.approval_id not in used]
                if free:
                    expected = ("in_scope", free[0].approval_id)
                    used.add(free[0].approval_id)
                else:
                    expected = ("approval_missing", None)
        d = judged[c.call_id]
        assert (d.verdict, d.approval_id) == expected, c.call_id
