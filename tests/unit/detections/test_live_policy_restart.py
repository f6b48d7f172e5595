"""A policy that arrives after grace amends final calls (flagged late), also when the worker
crashed between reading the policy and sending the amendment.

``consent.policies`` is read whole at each start and nothing is committed for it, so the restarted
worker has the policy in its store but never "receives" it again: :meth:`Stage2.recheck` (run when
a partition's state is loaded) must judge the held calls again. Without it, the amendment is lost
for good and the call's evidence keeps a verdict replay does not give.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from detections.engine import DecisionEngine
from detections.live import LiveConfig
from schemas import BaseEvent, GrantIssued, PolicyPublished, SessionBound, ToolCall
from support.live_sim import LiveSim

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
CONFIG = LiveConfig(grace=timedelta(seconds=15))


def T(s: int) -> datetime:
    return T0 + timedelta(seconds=s)


def eid(n: int) -> str:
    return f"00000000-0000-0000-0000-{n:012d}"


def policy(n: int, s: int, version: str, cedar: str) -> PolicyPublished:
    return PolicyPublished(
        event_id=eid(n),
        event_time=T(s),
        tenant="acme",
        policy_id="p",
        version=version,
        cedar=cedar,
        labels={},
        published_by="ci",
    )


FACTS: list[BaseEvent] = [
    SessionBound(
        event_id=eid(1),
        event_time=T(0),
        tenant="acme",
        session_id="s1",
        principal="alice",
        agent_id="a1",
        valid_from=T(0),
    ),
    GrantIssued(
        event_id=eid(2),
        event_time=T(0),
        tenant="acme",
        grant_id="g1",
        principal="alice",
        agent_id="a1",
        tools=["db/*"],
        not_before=T(0),
        granted_by="alice",
        policies=["p"],
    ),
    policy(3, 0, "v1", "permit(principal, action, resource);"),
]
CALLS = [
    ToolCall(
        event_id=eid(10 + i),
        event_time=T(10 + i),
        tenant="acme",
        call_id=f"c{i}",
        session_id="s1",
        server="db",
        tool="query",
        arguments={"i": i},
        resources=[],
        transport="stdio",
    )
    for i in range(3)
]
LATE = policy(4, 5, "v2", "forbid(principal, action, resource);")  # published before the calls


def final_sim() -> LiveSim:
    """Every call final and in_scope under v1; the state committed."""
    sim = LiveSim(2, CONFIG)
    for event in [*FACTS, *CALLS]:
        sim.deliver(event, NOW)
        sim.drain(NOW)
    sim.tick(NOW + timedelta(seconds=20))
    latest = sim.latest()
    assert {c: (e.verdict, e.final) for c, e in latest.items()} == {f"c{i}": ("in_scope", True) for i in range(3)}
    sim.commit()
    return sim


def replayed() -> dict[str, str]:
    engine = DecisionEngine()
    for fact in [*FACTS, LATE]:
        engine.add_fact(fact)
    decisions = engine.decide_all(CALLS)
    return {call.call_id: d.verdict for call, d in zip(CALLS, decisions, strict=True)}


def test_a_policy_after_grace_amends_final_calls_flagged_late() -> None:
    sim = final_sim()
    later = NOW + timedelta(minutes=1)
    sim.deliver(LATE, later)
    latest = sim.latest()
    assert {c: e.verdict for c, e in latest.items()} == replayed() == {f"c{i}": "out_of_policy" for i in range(3)}
    assert all(e.late and e.kind == "amendment" for e in latest.values())


def test_the_amendment_lost_in_a_crash_is_made_when_the_partition_is_loaded() -> None:
    sim = final_sim()
    later = NOW + timedelta(minutes=1)
    # the worker read the policy and judged the calls again, then died before the evidence was sent
    sim.deliver(LATE, later)
    sim.crash()
    assert {e.verdict for e in sim.latest().values()} == {"in_scope"}
    # the restarted worker read the whole topic at start (the store has it) and loads the partitions
    restarted = later + timedelta(seconds=30)
    for s2 in sim.stage2:
        s2.rebuild()
        sim._collect(s2.recheck(restarted))
    latest = sim.latest()
    assert {c: e.verdict for c, e in latest.items()} == replayed()
    assert all(e.late and e.kind == "amendment" and e.version == 3 for e in latest.values())
    # loading the partitions again changes nothing: only calls whose verdict changed emit
    before = len(sim.evidence)
    for s2 in sim.stage2:
        sim._collect(s2.recheck(restarted + timedelta(seconds=1)))
    assert len(sim.evidence) == before


def test_nothing_to_recheck_without_policies() -> None:
    sim = LiveSim(2, CONFIG)
    for event in [FACTS[0], *CALLS]:
        sim.deliver(event, NOW)
        sim.drain(NOW)
    before = len(sim.evidence)
    for s2 in sim.stage2:
        sim._collect(s2.recheck(NOW))
    assert len(sim.evidence) == before


def test_the_restarted_worker_makes_the_lost_amendment_when_it_loads_the_partitions() -> None:
    """No re-check called by hand: the restarted worker (LiveSim's real runner and stages) reads the
    policies topic from the beginning and re-checks each stage-2 partition as it loads it."""
    sim = final_sim()
    later = NOW + timedelta(minutes=1)
    sim.deliver(LATE, later)
    sim.crash()
    assert {e.verdict for e in sim.latest().values()} == {"in_scope"}
    assert sim.job.stage2.partitions == {}, "nothing loaded yet after the restart"
    sim.tick(later + timedelta(seconds=30))  # the new worker's first timer cycle
    latest = sim.latest()
    assert {c: e.verdict for c, e in latest.items()} == replayed()
    assert all(e.late and e.kind == "amendment" and e.version == 3 for e in latest.values())
    assert sim.restarts == 1
