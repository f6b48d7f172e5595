"""The live protocol, case by case: provisional, corrections, final, late amendments, handoffs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from detections.catalog import Detector
from detections.live import LiveConfig, Stage2, evidence_id_for, tick_message
from schemas import Finding, ToolCall, parse_event, record_hash
from support.live_sim import LiveSim
from support.scenario import bound, ended, grant, revoke
from support.scenario import tool_call as call

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
GRACE = timedelta(seconds=15)


def run(sim: LiveSim, *events: dict[str, Any], at: datetime = NOW) -> None:
    for e in events:
        sim.deliver(parse_event(e), at)
        sim.drain(at)


def history(sim: LiveSim, call_id: str) -> list[tuple[int, str, bool, bool]]:
    return [(e.version, e.verdict, e.final, e.late) for e in sim.evidence if e.call_id == call_id]


def test_in_scope_call_is_provisional_then_final_at_the_deadline() -> None:
    sim = LiveSim()
    facts = [bound("10:00:00", "s1", "alice", "a1"), grant("10:00:00", "g1", "alice", "a1", ["fs/*"])]
    run(sim, *facts)
    run(sim, call("10:00:05", "c1", "s1", "fs", "read_file"))
    assert history(sim, "c1") == [(1, "in_scope", False, False)]
    sim.tick(NOW + GRACE - timedelta(milliseconds=1))
    assert len(history(sim, "c1")) == 1
    sim.tick(NOW + GRACE)
    assert history(sim, "c1") == [(1, "in_scope", False, False), (2, "in_scope", True, False)]
    e = sim.evidence[-1]
    assert e.matched_grant_id == "g1" and e.principal == "alice" and e.agent_id == "a1"
    assert e.evidence_id == evidence_id_for("acme", "s1", "c1", 2)
    assert e.kind == "final" and e.trigger == "deadline" and e.facts == {}
    # the facts by reference: the binding, then the grant version, each with its record hash
    assert e.fact_ids == [f["event_id"] for f in facts]
    assert e.fact_hashes == [record_hash(parse_event(f)) for f in facts]


def test_binding_and_grant_arriving_after_the_call_correct_it_within_grace() -> None:
    sim = LiveSim()
    run(sim, call("10:00:05", "c1", "s1", "fs", "read_file"))
    run(sim, bound("10:00:00", "s1", "alice", "a1"), at=NOW + timedelta(seconds=2))
    run(sim, grant("10:00:00", "g1", "alice", "a1", ["fs/*"]), at=NOW + timedelta(seconds=3))
    sim.tick(NOW + GRACE)
    assert history(sim, "c1") == [
        (1, "unbound_session", False, False),
        (2, "no_grant", False, False),  # moved from the session route to alice/a1 with its version counter
        (3, "in_scope", False, False),
        (4, "in_scope", True, False),
    ]
    assert sim.counters.counts["stage2_handoffs_out"] == 1


def test_revocation_after_grace_is_a_late_amendment_of_the_final_verdict() -> None:
    sim = LiveSim()
    run(sim, bound("10:00:00", "s1", "alice", "a1"), grant("10:00:00", "g1", "alice", "a1", ["fs/*"]))
    run(sim, call("10:00:05", "c1", "s1", "fs", "read_file"))
    sim.tick(NOW + GRACE)
    run(sim, revoke("10:00:04", "g1", "alice", "a1"), at=NOW + timedelta(seconds=40))
    assert history(sim, "c1")[-1] == (3, "revoked_grant", True, True)
    assert sim.evidence[-1].kind == "amendment" and sim.evidence[-1].trigger == "fact"
    assert len(sim.evidence[-1].fact_ids) == 3, "binding, grant version and its revocation"


def test_facts_after_the_amendment_window_change_nothing() -> None:
    sim = LiveSim(config=LiveConfig(grace=GRACE, amend_window=timedelta(minutes=1)))
    run(sim, call("10:00:05", "c1", "s1", "fs", "read_file"))
    sim.tick(NOW + GRACE)
    later = NOW + GRACE + timedelta(minutes=1)
    run(sim, bound("10:00:00", "s1", "alice", "a1"), at=later)
    sim.tick(later)
    assert history(sim, "c1") == [(1, "unbound_session", False, False), (2, "unbound_session", True, False)]
    assert sim.s1_calls == {} and sim.s2_calls == {}, "closed calls leave no state behind"


def test_a_fact_before_the_call_instant_does_not_touch_calls_after_it_and_vice_versa() -> None:
    sim = LiveSim()
    run(sim, bound("10:00:00", "s1", "alice", "a1"), grant("10:00:00", "g1", "alice", "a1", ["fs/*"]))
    run(sim, call("10:00:05", "c1", "s1", "fs", "read_file"))
    run(sim, revoke("10:00:06", "g1", "alice", "a1"))  # after the call: consent withdrawn later
    assert history(sim, "c1") == [(1, "in_scope", False, False)]


def test_duplicate_deliveries_emit_nothing_new() -> None:
    sim = LiveSim()
    b, g = bound("10:00:00", "s1", "alice", "a1"), grant("10:00:00", "g1", "alice", "a1", ["fs/*"])
    c = call("10:00:05", "c1", "s1", "fs", "read_file")
    run(sim, b, g, c, b, g, c)
    assert history(sim, "c1") == [(1, "in_scope", False, False)]


def test_rebinding_to_another_principal_hands_the_call_over_and_back() -> None:
    sim = LiveSim()
    first = bound("10:00:00", "s1", "alice", "a1")
    run(sim, first, grant("10:00:00", "g1", "alice", "a1", ["fs/*"]))
    run(sim, call("10:00:05", "c1", "s1", "fs", "read_file"))
    rebound = bound("10:00:03", "s1", "bob", "a1")
    run(sim, rebound)
    assert history(sim, "c1")[-1][1] == "no_grant"  # bob has no grant
    run(sim, ended("10:00:04", "s1"))
    assert history(sim, "c1")[-1][1] == "session_expired"
    sim.tick(NOW + GRACE)
    assert [v for v, *_ in history(sim, "c1")] == [1, 2, 3, 4]
    assert history(sim, "c1")[-1] == (4, "session_expired", True, False)


def test_recovery_from_the_stores_keeps_open_calls() -> None:
    sim = LiveSim()
    run(sim, call("10:00:05", "c1", "s1", "fs", "read_file"))
    sim.rebuild()  # a worker restarts: only the stores (changelogs) survive
    run(sim, bound("10:00:00", "s1", "alice", "a1"), at=NOW + timedelta(seconds=1))
    sim.tick(NOW + GRACE)
    assert history(sim, "c1") == [
        (1, "unbound_session", False, False),
        (2, "no_grant", False, False),
        (3, "no_grant", True, False),
    ]


def test_bad_internal_messages_raise_for_the_dead_letter_path() -> None:
    s2 = Stage2(0, {}, {})
    with pytest.raises(ValueError, match="format"):
        s2.on_message("r", b'{"v": 99, "type": "tick"}', NOW)
    with pytest.raises(ValueError):
        s2.on_message("r", b"[1]", NOW)
    assert s2.on_message("r", tick_message(), NOW).evidence == []


def test_config_rejects_negative_durations() -> None:
    with pytest.raises(ValueError, match="grace"):
        LiveConfig(grace=timedelta(seconds=-1))


def test_final_verdicts_raise_the_same_findings_as_replay() -> None:
    from scopewatch.replay import replay
    from support.scenario import story

    events = [parse_event(e) for e in story("f")]
    assert len(events) < 100, "all of them arrive within the first second"
    sim = LiveSim(config=LiveConfig(sequence_slack=timedelta(seconds=2)))
    for i, e in enumerate(events):
        sim.deliver(e, NOW + timedelta(milliseconds=10 * i))
        sim.drain(NOW)
    assert sim.findings == [], "provisional verdicts raise nothing"
    sim.tick(NOW + GRACE + timedelta(seconds=1))
    assert sim.findings and {f.rule_id for f in sim.findings} <= PER_CALL_RULES, "sequence rules wait for the slack"
    sim.tick(NOW + GRACE + timedelta(seconds=5))
    live: dict[str, list[str]] = {}
    for f in sim.findings:
        live.setdefault(f.call_id, []).append(f.rule_id)
    expected: dict[str, list[str]] = {}
    for f in replay(enumerate(events)).findings:
        expected.setdefault(f.call_id, []).append(f.rule_id)
    expected = {c: sorted(r) for c, r in expected.items()}
    assert {c: sorted(r) for c, r in live.items()} == expected
    assert all(f.finding_id for f in sim.findings) and len({f.finding_id for f in sim.findings}) == len(sim.findings)


def test_an_amendment_raises_the_per_call_finding_of_its_new_verdict() -> None:
    sim = LiveSim()
    run(sim, bound("10:00:00", "s1", "alice", "a1"), grant("10:00:00", "g1", "alice", "a1", ["fs/*"]))
    run(sim, call("10:00:05", "c1", "s1", "fs", "read_file"))
    sim.tick(NOW + GRACE)
    assert sim.findings == []
    run(sim, revoke("10:00:04", "g1", "alice", "a1"), at=NOW + timedelta(seconds=40))
    assert [f.rule_id for f in sim.findings] == ["revoked_grant"]


PER_CALL_RULES = {r.id for r in Detector().rules if r.meta.kind == "per_call"}


def _findings_by_call(findings: Sequence[Finding]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in findings:
        out.setdefault(f.call_id, []).append(f.rule_id)
    return {c: sorted(r) for c, r in out.items()}


def test_sequence_rules_see_calls_in_event_time_order_when_they_finalize_apart() -> None:
    """Calls arrive (so reach their deadlines) in reverse event-time order, 50 ms apart, and a tick
    every 20 ms finalizes them one by one: the sequence rules must still see each delegation's calls
    in event-time order, as replay does (else the burst fires on another call)."""
    from scopewatch.replay import replay
    from support.scenario import story

    events = [parse_event(e) for e in story("o")]
    facts = [e for e in events if not isinstance(e, ToolCall)]
    calls = sorted(
        (e for e in events if isinstance(e, ToolCall)), key=lambda c: (c.event_time, c.call_id), reverse=True
    )
    sim = LiveSim()
    for e in facts:
        sim.deliver(e, NOW)
    for i, c in enumerate(calls):
        sim.deliver(c, NOW + timedelta(milliseconds=50 * i))
        sim.drain(NOW + timedelta(milliseconds=50 * i))
    end = NOW + GRACE + timedelta(milliseconds=50 * len(calls)) + 2 * LiveConfig().sequence_slack
    at = NOW + GRACE
    while at <= end:
        sim.tick(at)
        at += timedelta(milliseconds=20)
    expected = _findings_by_call(replay(enumerate(facts + calls)).findings)
    assert any(r not in PER_CALL_RULES for rules in expected.values() for r in rules), "the story has sequence findings"
    assert _findings_by_call(sim.findings) == expected


def test_a_held_call_waits_at_most_twice_the_slack_behind_an_earlier_one() -> None:
    """A (10:00:05) arrives first, B (10:00:01) 0.8 s later, C (10:00:00) 1.5 s later, slack 1 s.
    Each waits for the earlier-in-event-time calls finalized within its slack; A is let go (after
    C and B, in event-time order) once it has waited a second slack, not when C's hold ends."""
    sim = LiveSim(partitions=1, config=LiveConfig(sequence_slack=timedelta(seconds=1)))
    s2 = sim.stage2[0]
    run(sim, bound("10:00:00", "s1", "alice", "a1"))
    for at, (hms, cid) in ((0.0, ("10:00:05", "A")), (0.8, ("10:00:01", "B")), (1.5, ("10:00:00", "C"))):
        run(sim, call(hms, cid, "s1", "db", "drop_table"), at=NOW + timedelta(seconds=at))
    seen: list[tuple[float, int]] = []
    for tenth in range(0, 40):
        sim.tick(NOW + GRACE + timedelta(seconds=tenth / 10))
        seen.append((tenth / 10, s2.held_calls()))
    held = dict(seen)
    assert held[0.0] == 1 and held[0.8] == 2 and held[1.5] == 3
    assert held[1.9] == 3, "B's hold is over but C (earlier) is held and A is not overdue: nothing goes"
    assert held[2.0] == 0, "A is overdue (deadline + 2 slack): C, B and A go, in event-time order"
    assert [e.call_id for e in sim.evidence if e.final] == ["A", "B", "C"]
