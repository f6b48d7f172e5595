"""The live protocol's final verdicts equal replay's, whatever the arrival order within grace.

Hypothesis draws a scenario (facts and calls over small domains, so ties and rebinding are common),
an arrival order, how the internal topic's partitions interleave, duplicates (at-least-once) and a
crash with recovery from the stores. Every event arrives within the grace window; then the clock
moves past every deadline. The latest evidence version of every call must be final, not late, and
carry the verdict and matched grant :class:`DecisionEngine` gives over all facts (what
``scopewatch replay`` prints); versions of a call are 1..n without gaps or repeats.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from detections.compact import decode_grants, decode_sessions, encode_grants, encode_sessions
from detections.engine import DecisionEngine, Fact, GrantHistory, SessionHistory
from detections.live import LiveConfig
from schemas import BaseEvent, GrantIssued, GrantRevoked, SessionBound, SessionEnded, ToolCall
from support.live_sim import LiveSim
from support.strategies import calls, fact_sets

ARRIVAL0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
STEP = timedelta(milliseconds=100)  # at most ~40 arrivals: all within 4 s, well inside the 15 s grace


def replay_verdicts(facts: list[Fact], calls_: list[ToolCall]) -> dict[str, tuple[str, str | None]]:
    engine = DecisionEngine()
    for f in facts:
        engine.add_fact(f)
    out = {}
    for c in calls_:
        d = engine.decide(c)
        out[c.call_id] = (d.verdict, d.matched_grant_id)
    return out


def unique_calls(cs: list[ToolCall]) -> list[ToolCall]:
    seen: dict[str, ToolCall] = {}
    for c in cs:
        seen.setdefault(c.call_id, c)
    return list(seen.values())


@settings(max_examples=250, deadline=None)
@given(
    facts=fact_sets(max_size=14),
    calls_=calls(),
    partitions=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**32 - 1),
    duplicates=st.integers(0, 3),
    crash_at=st.none() | st.integers(0, 40),
)
def test_live_final_verdicts_equal_replay(
    facts: list[Fact],
    calls_: list[ToolCall],
    partitions: int,
    seed: int,
    duplicates: int,
    crash_at: int | None,
) -> None:
    rng = random.Random(seed)
    calls_ = unique_calls(calls_)
    events: list[BaseEvent] = [*facts, *calls_]
    rng.shuffle(events)
    for _ in range(duplicates):
        if events:
            events.insert(rng.randrange(len(events) + 1), rng.choice(events))

    sim = LiveSim(partitions)
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

    expected = replay_verdicts(facts, calls_)
    latest = sim.latest()
    assert set(latest) == set(expected)
    for call_id, (verdict, matched) in expected.items():
        e = latest[call_id]
        assert (e.verdict, e.matched_grant_id) == (verdict, matched), e.reasons
        assert e.final and not e.late
    for call_id, versions in sim.versions().items():
        assert sorted(versions) == list(range(1, len(versions) + 1)), (call_id, versions)
    assert all(not e.late for e in sim.evidence)


@settings(max_examples=150, deadline=None)
@given(facts=fact_sets(max_size=12), calls_=calls(), seed=st.integers(0, 2**32 - 1))
def test_facts_after_grace_amend_flagged_late(facts: list[Fact], calls_: list[ToolCall], seed: int) -> None:
    """Calls first, all facts after the deadline but inside the amendment window: finals, then late amendments
    that end on replay's verdict."""
    rng = random.Random(seed)
    calls_ = unique_calls(calls_)
    config = LiveConfig(grace=timedelta(seconds=15), amend_window=timedelta(minutes=10))
    sim = LiveSim(2, config)
    now = ARRIVAL0
    for c in calls_:
        sim.deliver(c, now)
    sim.drain(now)
    sim.tick(now + timedelta(seconds=20))
    first = sim.latest()
    assert all(e.final and not e.late and e.verdict == "unbound_session" for e in first.values())
    now += timedelta(seconds=30)
    rng.shuffle(facts)
    for f in facts:
        sim.deliver(f, now)
        sim.drain(now, rng)
    expected = replay_verdicts(facts, calls_)
    latest = sim.latest()
    for call_id, (verdict, matched) in expected.items():
        e = latest[call_id]
        assert (e.verdict, e.matched_grant_id) == (verdict, matched)
        assert e.final
        if e.version > first[call_id].version:
            assert e.late, "a change after the deadline is an amendment flagged late"


def _same_decisions(a: DecisionEngine, b: DecisionEngine, calls_: list[ToolCall]) -> None:
    for c in calls_:
        assert a.decide(c) == b.decide(c)


@settings(max_examples=200, deadline=None)
@given(facts=fact_sets(max_size=16), calls_=calls())
def test_compact_state_round_trip_keeps_every_decision(facts: list[Fact], calls_: list[ToolCall]) -> None:
    sessions: dict[tuple[str, str], SessionHistory] = {}
    grants: dict[tuple[str, str, str], GrantHistory] = {}
    for f in facts:
        if isinstance(f, (SessionBound, SessionEnded)):
            sessions.setdefault((f.tenant, f.session_id), SessionHistory(f.tenant, f.session_id)).add(f)
        elif isinstance(f, (GrantIssued, GrantRevoked)):
            key = (f.tenant, f.principal, f.agent_id)
            grants.setdefault(key, GrantHistory(*key)).add(f)
    direct, decoded = DecisionEngine(), DecisionEngine()
    for f in facts:
        direct.add_fact(f)
    for (tenant, sid), h in sessions.items():
        for fact in decode_sessions(encode_sessions(h), tenant, sid):
            decoded.add_fact(fact)
    for key, g in grants.items():
        again = decode_grants(encode_grants(g), *key)
        assert encode_grants(again) == encode_grants(g)
        for fact in again:
            decoded.add_fact(fact)
    _same_decisions(direct, decoded, calls_)
