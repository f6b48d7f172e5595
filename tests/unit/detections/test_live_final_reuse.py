"""The final verdict at a call's deadline: whatever happened between the provisional and the deadline
(nothing, a revocation, grants that change no verdict or one, a late attribution update), a running
stage 2 gives the same evidence, findings and stored state as a restarted one, which holds nothing of
the provisional decisions in memory (the reference). Written for h16z's reuse of the last provisional
decision at the deadline; that reuse was not taken (h16e: no gain in the whole worker), the cases
guard any such shortcut."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas import Evidence, parse_event
from support.live_sim import LiveSim
from support.scenario import bound, ended, grant, revoke
from support.scenario import tool_call as call

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
GRACE = timedelta(seconds=15)
FACTS = [
    bound("10:00:00", "s1", "alice", "a1"),
    grant("10:00:00", "g1", "alice", "a1", ["fs/*"]),
    bound("10:00:00", "s2", "bob", "b1"),
]
CALLS = [
    call("10:00:05", "c1", "s1", "fs", "read_file"),
    call("10:00:06", "c2", "s1", "net", "fetch"),
    call("10:00:07", "c3", "s2", "fs", "read_file"),
]

BETWEEN: dict[str, list[dict[str, Any]]] = {
    "nothing": [],
    # the verdict changes: a new provisional version, then the final
    "revocation": [revoke("10:00:04", "g1", "alice", "a1")],
    # same verdict, so no new provisional version, but the final rests on one more grant (its fact refs)
    "grant that does not cover": [grant("10:00:01", "g2", "alice", "a1", ["db/*"])],
    "grant that covers": [grant("10:00:01", "g2", "alice", "a1", ["net/*"])],
    # the attribution changes after the provisional (a late update from stage 1)
    "session ended": [ended("10:00:03", "s1")],
    "late binding": [bound("10:00:01", "s2", "alice", "a1")],
}


def run(between: list[dict[str, Any]], restart: bool) -> LiveSim:
    sim = LiveSim()
    for e in FACTS:
        sim.deliver(parse_event(e), NOW)
        sim.drain(NOW)
    for e in CALLS:
        sim.deliver(parse_event(e), NOW)
        sim.drain(NOW)
    later = NOW + timedelta(seconds=3)
    for e in between:
        sim.deliver(parse_event(e), later)
        sim.drain(later)
    if restart:
        sim.rebuild()  # a new worker: every call judged again at its deadline
    sim.tick(NOW + GRACE)
    sim.tick(NOW + GRACE + sim.config.sequence_slack + timedelta(seconds=1))
    return sim


def finals(sim: LiveSim) -> dict[str, Evidence]:
    return {e.call_id: e for e in sim.evidence if e.final}


@pytest.mark.parametrize("name", sorted(BETWEEN))
def test_the_final_of_a_running_stage_equals_the_final_after_a_restart(name: str) -> None:
    reused, judged = run(BETWEEN[name], False), run(BETWEEN[name], True)
    assert set(finals(reused)) == {"c1", "c2", "c3"}
    assert [e.model_dump() for e in reused.evidence] == [e.model_dump() for e in judged.evidence]
    assert [f.model_dump() for f in reused.findings] == [f.model_dump() for f in judged.findings]
    for store in ("s2_calls", "s2_grants", "s2_seq"):
        assert dict(getattr(reused, store).items()) == dict(getattr(judged, store).items()), store


def test_a_revocation_before_the_deadline_changes_the_final_verdict() -> None:
    sim = run(BETWEEN["revocation"], False)
    assert [(e.version, e.verdict, e.final) for e in sim.evidence if e.call_id == "c1"] == [
        (1, "in_scope", False),
        (2, "revoked_grant", False),
        (3, "revoked_grant", True),
    ]
    assert finals(sim)["c1"].kind == "final" and finals(sim)["c1"].trigger == "deadline"


def test_a_grant_that_changes_no_verdict_still_reaches_the_final_evidence() -> None:
    """No new provisional version (same verdict), so the last one's decision is stale: the final
    must not be made of it (its fact references name the new grant too)."""
    sim = run(BETWEEN["grant that does not cover"], False)
    c1 = [e for e in sim.evidence if e.call_id == "c1"]
    assert [(e.version, e.verdict, e.final) for e in c1] == [(1, "in_scope", False), (2, "in_scope", True)]
    g2 = parse_event(BETWEEN["grant that does not cover"][0]).event_id
    assert g2 not in c1[0].fact_ids and g2 in c1[1].fact_ids
    c2 = finals(sim)["c2"]
    assert c2.verdict == "out_of_scope_tool" and g2 in c2.fact_ids


def test_a_late_attribution_update_changes_the_final_verdict() -> None:
    sim = run(BETWEEN["session ended"], False)
    first = next(e for e in sim.evidence if e.call_id == "c1")
    assert first.verdict == "in_scope"
    assert finals(sim)["c1"].verdict != "in_scope"
    moved = run(BETWEEN["late binding"], False)
    assert finals(moved)["c3"].principal == "alice" and finals(moved)["c3"].verdict == "in_scope"
