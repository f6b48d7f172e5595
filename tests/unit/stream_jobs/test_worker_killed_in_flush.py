"""The decision worker killed in the middle of a flush and restarted (``LiveSim(kill_at=...)``: the
real runner and job, restarted from the committed offsets and the changelog topics).

The runner commits a batch's offsets only once its flush was acknowledged. If it committed first, a
worker killed in the flush would never read that batch again: a call's forward, or its verdict,
would be lost, and these tests fail (checked by swapping the two steps in ``Runner.cycle``).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from detections.engine import DecisionEngine, Fact
from schemas import BaseEvent, GrantIssued, SessionBound, SessionEnded, ToolCall, parse_event
from scopewatch.replay import replay
from support.live_sim import LiveSim
from support.scenario import story
from support.strategies import T, _eid, calls, fact_sets

ARRIVAL0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
STEP = timedelta(milliseconds=100)


def replay_verdicts(facts: list[Fact], calls_: list[ToolCall]) -> dict[str, tuple[str, str | None]]:
    engine = DecisionEngine()
    for f in facts:
        engine.add_fact(f)
    return {c.call_id: (d.verdict, d.matched_grant_id) for c in calls_ for d in [engine.decide(c)]}


def finals(sim: LiveSim) -> dict[str, tuple[str, str | None]]:
    latest = sim.latest()
    assert all(e.final for e in latest.values()), [e.call_id for e in latest.values() if not e.final]
    return {c: (e.verdict, e.matched_grant_id) for c, e in latest.items()}


@pytest.mark.parametrize("landed", [0.0, 0.5, 0.99], ids=["nothing landed", "half landed", "all but one landed"])
def test_a_worker_killed_in_every_other_flush_still_gives_every_verdict_of_replay(landed: float) -> None:
    events: list[BaseEvent] = [parse_event(e) for e in story("kill")]
    expected = {call.call_id: (d.verdict, d.matched_grant_id) for call, d in replay(enumerate(events)).decisions}
    sim = LiveSim(2, kill_at={k: landed for k in range(0, 400, 2)})
    now = ARRIVAL0
    for event in events:
        sim.deliver(event, now)
        sim.drain(now)
        now += STEP
    sim.tick(now + timedelta(seconds=16))
    assert finals(sim) == expected
    assert sim.kills >= 20, sim.kills
    assert len({v for v, _ in expected.values()}) == 10


def _bound(n: int, session: str) -> SessionBound:
    return SessionBound(
        event_id=_eid(n),
        event_time=T(0),
        tenant="acme",
        session_id=session,
        principal="alice",
        agent_id="a1",
        valid_from=T(0),
    )


def _call(n: int, call_id: str, at: int) -> ToolCall:
    return ToolCall(
        event_id=_eid(n),
        event_time=T(at),
        tenant="acme",
        call_id=call_id,
        session_id="s1",
        server="fs",
        tool="read_file",
        arguments={},
        resources=[],
        transport="sdk",
    )


# Found by Hypothesis: flush 14 lands c1's new evidence version and the grant's changelog record but not
# c1's stored record. The restarted worker read the grant again as a duplicate and judged nothing, so c1's
# final took the version number its landed provisional already had (and that evidence id).
REGRANT_EXAMPLE = {
    "facts": [
        _bound(5, "s1"),
        SessionEnded(event_id=_eid(1), event_time=T(1), tenant="acme", session_id="s1"),
        _bound(2, "s1"),
        _bound(3, "s2"),
        GrantIssued(
            event_id=_eid(4),
            event_time=T(0),
            tenant="acme",
            grant_id="g1",
            principal="alice",
            agent_id="a1",
            not_before=T(0),
            granted_by="alice",
            tools=[],
        ),
    ],
    "calls_": [_call(10000, "c0", 1), _call(10000, "c0", 0), _call(10001, "c1", 0)],
    "partitions": 1,
    "seed": 58535,
    "kills": {14: 0.75, 0: 0.0, 1: 0.0},
}


@settings(max_examples=60, deadline=None)
@example(**REGRANT_EXAMPLE)  # type: ignore[arg-type]
@given(
    facts=fact_sets(max_size=10),
    calls_=calls(),
    partitions=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
    kills=st.dictionaries(st.integers(0, 50), st.floats(0, 1, exclude_max=True), min_size=1, max_size=6),
)
def test_kills_at_any_point_of_any_flush_keep_live_equal_to_replay(
    facts: list[Fact], calls_: list[ToolCall], partitions: int, seed: int, kills: dict[int, float]
) -> None:
    rng = random.Random(seed)
    calls_ = list({c.call_id: c for c in reversed(calls_)}.values())[::-1]  # the first of each call id
    events: list[BaseEvent] = [*facts, *calls_]
    rng.shuffle(events)
    sim = LiveSim(partitions, kill_at=kills)
    now = ARRIVAL0
    for event in events:
        sim.deliver(event, now)
        while rng.random() < 0.6 and sim.step(now, rng):
            pass
        now += STEP
    sim.drain(now, rng)
    sim.tick(now + timedelta(seconds=16))
    assert finals(sim) == replay_verdicts(facts, calls_)
