"""Live equals replay with policies and approvals, whatever the arrival order within grace.

Like ``test_live_properties`` (which stays as it was, for the facts of the first contract), with
policies (``consent.policies``, every stage-2 partition sees all of them) and approvals
(``consent.approvals``, co-partitioned with the grants) and several calls competing for few
approvals: a later call loses its approval to an earlier-event-time call that arrives after it, a
late approval or policy corrects provisional verdicts. Hypothesis draws the scenario, the arrival
order, how the internal topic's partitions interleave, duplicates and a crash. The latest evidence
of every call must be final, not late, and carry replay's verdict, matched grant and approval.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import example, given, settings
from hypothesis import strategies as st

from detections.engine import DecisionEngine
from schemas import (
    ApprovalDecided,
    BaseEvent,
    GrantIssued,
    PolicyPublished,
    SessionBound,
    ToolCall,
    arguments_digest,
)
from support.live_sim import LiveSim

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
ARRIVAL0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
STEP = timedelta(milliseconds=100)
TEXTS = [
    'permit(principal, action == Action::"call", resource);',
    'permit(principal, action, resource) unless { resource.tool == "write" && context.arguments.x == 2 };',
    'permit(principal, action, resource) unless { context.labels.contains("restricted") };',
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

    facts: list[BaseEvent] = []
    for sid, agent in (("s1", "a1"), ("s2", "a1"), ("s3", "a2")):
        facts.append(
            SessionBound(
                event_id=eid(),
                event_time=T(0),
                tenant="acme",
                session_id=sid,
                principal="alice",
                agent_id=agent,
                valid_from=T(0),
            )
        )
    for agent in ("a1", "a2"):
        size = 1 if agent == "a1" else 0
        for gid in draw(st.lists(st.sampled_from(["g1", "g2"]), min_size=size, max_size=2, unique=True)):
            facts.append(
                GrantIssued(
                    event_id=eid(),
                    event_time=T(draw(st.integers(0, 3))),
                    tenant="acme",
                    grant_id=gid,
                    principal="alice",
                    agent_id=agent,
                    tools=["fs/*"],
                    resources=draw(st.sampled_from([[], ["file:*"]])),
                    not_before=T(0),
                    granted_by="alice",
                    policies=draw(st.sampled_from([[], [], ["p"], ["p", "q"]])),
                    approval_tools=draw(st.sampled_from([["fs/write"], ["fs/*"], []])),
                )
            )
    for _ in range(draw(st.integers(0, 3))):
        facts.append(
            PolicyPublished(
                event_id=eid(),
                event_time=T(draw(st.integers(0, 6))),
                tenant="acme",
                policy_id=draw(st.sampled_from(["p", "q"])),
                version=f"v{draw(st.integers(0, 9))}",
                cedar=draw(st.sampled_from(TEXTS)),
                labels={"restricted": ["file:/secret/*"]},
                published_by="ci",
            )
        )
    for _ in range(draw(st.integers(1, 5))):
        args = draw(st.sampled_from([None, None, *ARGS]))
        expires = draw(st.sampled_from([None, None, *range(10)]))
        facts.append(
            ApprovalDecided(
                event_id=eid(),
                event_time=T(draw(st.integers(0, 8))),
                tenant="acme",
                approval_id=draw(st.sampled_from(["ap0", "ap1", "ap2"])),
                principal="alice",
                agent_id=draw(st.sampled_from(["a1", "a1", "a2"])),
                tool=draw(st.sampled_from(["fs/write", "fs/write", "fs/read"])),
                arguments_digest=None if args is None else arguments_digest(args),
                decision=draw(st.sampled_from(["approve", "approve", "approve", "deny"])),
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
            session_id=draw(st.sampled_from(["s1", "s2", "s1", "s2", "s3", "s9"])),
            server="fs",
            tool=draw(st.sampled_from(["write", "write", "read"])),
            arguments=draw(st.sampled_from(ARGS)),
            resources=draw(st.sampled_from([[], [], ["file:/a"], ["file:/secret/k"]])),
            transport="stdio",
        )
        for i in range(draw(st.integers(2, 7)))
    ]
    return facts, calls


def replay(facts: list[BaseEvent], calls: list[ToolCall]) -> dict[str, tuple[str, str | None, str | None]]:
    engine = DecisionEngine()
    for f in facts:
        engine.add_fact(f)
    return {
        c.call_id: (d.verdict, d.matched_grant_id, d.approval_id)
        for c, d in zip(calls, engine.decide_all(calls), strict=True)
    }


@settings(max_examples=200, deadline=None)
@given(
    scenario=scenarios(),
    partitions=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**32 - 1),
    duplicates=st.integers(0, 3),
    crash_at=st.none() | st.integers(0, 30),
    deferred=st.booleans(),
)
def test_live_final_verdicts_equal_replay_with_policies_and_approvals(
    scenario: tuple[list[BaseEvent], list[ToolCall]],
    partitions: int,
    seed: int,
    duplicates: int,
    crash_at: int | None,
    deferred: bool,
) -> None:
    facts, calls = scenario
    rng = random.Random(seed)
    events: list[BaseEvent] = [*facts, *calls]
    rng.shuffle(events)
    for _ in range(duplicates):
        events.insert(rng.randrange(len(events) + 1), rng.choice(events))

    sim = LiveSim(partitions, deferred=deferred)
    now = ARRIVAL0
    for i, event in enumerate(events):
        sim.deliver(event, now)
        while rng.random() < 0.6 and sim.step(now, rng):
            pass
        if crash_at == i:
            sim.rebuild()
        now += STEP
    sim.drain(now, rng)
    sim.tick(now + timedelta(seconds=16))

    expected = replay(facts, calls)
    latest = sim.latest()
    assert set(latest) == set(expected)
    for call_id, want in expected.items():
        e = latest[call_id]
        assert (e.verdict, e.matched_grant_id, e.approval_id) == want, (call_id, e.reasons)
        assert e.final and not e.late
        assert e.history_complete
    for call_id, versions in sim.versions().items():
        assert sorted(versions) == list(range(1, len(versions) + 1)), (call_id, versions)
    assert all(not e.late for e in sim.evidence)
    # approval ids are the delegation's (DESIGN: the call's delegation's approval_decided)
    used = [
        (e.tenant, e.principal, e.agent_id, e.approval_id)
        for e in latest.values()
        if e.verdict == "in_scope" and e.approval_id is not None
    ]
    assert len(used) == len(set(used)), "an approval authorises at most one call"


def _one_id_two_tools() -> tuple[list[BaseEvent], list[ToolCall]]:
    """Approval ap0 re-decided for another tool: one id, one use, across tools (live once grouped
    the calls competing for approvals by tool and let c1 use ap0 again: in_scope, not replay's
    approval_missing)."""
    t0, t1 = T(0), T(1)
    common = {"tenant": "acme", "principal": "alice", "agent_id": "a1"}
    ids = iter(range(1, 100))

    def eid() -> str:
        return str(uuid.UUID(int=next(ids)))

    facts: list[BaseEvent] = [
        SessionBound(event_id=eid(), event_time=t0, session_id="s1", valid_from=t0, **common),
        *(
            GrantIssued(
                event_id=eid(),
                event_time=t0,
                grant_id=g,
                tools=["fs/*"],
                not_before=t0,
                granted_by="alice",
                approval_tools=["fs/*"],
                **common,
            )
            for g in ("g1", "g2")
        ),
        *(
            ApprovalDecided(
                event_id=eid(),
                event_time=at,
                approval_id="ap0",
                tool=tool,
                arguments_digest=None,
                decision="approve",
                approver="bob",
                **common,
            )
            for at, tool in ((t1, "fs/read"), (t0, "fs/write"), (t0, "fs/write"))
        ),
    ]
    calls = [
        ToolCall(
            event_id=eid(),
            event_time=at,
            tenant="acme",
            call_id=c,
            session_id="s1",
            server="fs",
            tool=tool,
            arguments={"x": 1},
            resources=[],
            transport="stdio",
        )
        for at, c, tool in ((t0, "c0", "write"), (t1, "c1", "read"))
    ]
    return facts, calls


@settings(max_examples=150, deadline=None)
@given(scenario=scenarios(), partitions=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
@example(scenario=_one_id_two_tools(), partitions=1, seed=0)
def test_provisional_verdicts_follow_every_arrival(
    scenario: tuple[list[BaseEvent], list[ToolCall]], partitions: int, seed: int
) -> None:
    """Within grace, after each arrival (and the internal topic drained), the latest evidence of
    every call that arrived is replay's verdict over what arrived so far: a late approval or policy,
    or an earlier call taking a later call's approval, corrects the provisional verdicts at once."""
    facts, calls = scenario
    rng = random.Random(seed)
    events: list[BaseEvent] = [*facts, *calls]
    rng.shuffle(events)
    sim = LiveSim(partitions)
    now = ARRIVAL0
    for i, event in enumerate(events):
        sim.deliver(event, now)
        sim.drain(now, rng)
        seen = events[: i + 1]
        arrived = [e for e in seen if isinstance(e, ToolCall)]
        expected = replay([e for e in seen if not isinstance(e, ToolCall)], arrived)
        latest = sim.latest()
        for call_id, want in expected.items():
            e = latest[call_id]
            assert (e.verdict, e.matched_grant_id, e.approval_id) == want, (call_id, e.reasons)
            assert not e.final
        now += STEP


@settings(max_examples=100, deadline=None)
@given(scenario=scenarios(), seed=st.integers(0, 2**32 - 1))
def test_approvals_and_policies_after_grace_amend_flagged_late(
    scenario: tuple[list[BaseEvent], list[ToolCall]], seed: int
) -> None:
    """Sessions, grants and calls first; approvals and policies after every deadline (inside the
    amendment window): every change is an amendment flagged late, and the end is replay's verdict."""
    facts, calls = scenario
    rng = random.Random(seed)
    early = [f for f in facts if not isinstance(f, (ApprovalDecided, PolicyPublished))]
    late = [f for f in facts if isinstance(f, (ApprovalDecided, PolicyPublished))]
    sim = LiveSim(2)
    now = ARRIVAL0
    for e in [*early, *calls]:
        sim.deliver(e, now)
    sim.drain(now)
    sim.tick(now + timedelta(seconds=20))
    first = sim.latest()
    assert all(e.final and not e.late for e in first.values())
    now += timedelta(seconds=30)
    rng.shuffle(late)
    for f in late:
        sim.deliver(f, now)
        sim.drain(now, rng)
    expected = replay(facts, calls)
    latest = sim.latest()
    for call_id, want in expected.items():
        e = latest[call_id]
        assert (e.verdict, e.matched_grant_id, e.approval_id) == want, (call_id, e.reasons)
        assert e.final
        if e.version > first[call_id].version:
            assert e.late and e.kind == "amendment", "a change after the deadline is an amendment flagged late"
