"""Properties of the decision engine over random fact sets (hypothesis).

* The engine agrees with a literal, brute-force reading of DESIGN.md's "Decision semantics".
* The decision does not depend on the order facts were added, nor on duplicates.
* Compaction at a horizon leaves every decision for calls at or after the horizon unchanged,
  also when more (late or duplicate) facts arrive after compacting.

Small domains (two tenants, sessions, principals, agents, three grant ids, nine instants) make
ties and collisions frequent.
"""

from __future__ import annotations

import fnmatch
import json
from datetime import datetime

from hypothesis import event, given, settings
from hypothesis import strategies as st

from detections.engine import Decision, DecisionEngine, Fact
from schemas import GrantIssued, GrantRevoked, SessionBound, SessionEnded, ToolCall
from support.strategies import T, calls, fact_sets, instants


def engine_with(facts: list[Fact]) -> DecisionEngine:
    engine = DecisionEngine()
    for f in facts:
        engine.add_fact(f)
    return engine


# --------------------------------------------------------- a literal reading of DESIGN


def oracle(facts: list[Fact], call: ToolCall) -> tuple[str, str | None]:
    """DESIGN.md "Decision semantics", line by line, by brute force (verdict, matched_grant_id)."""
    t = call.event_time

    def session_order(f: SessionBound | SessionEnded) -> tuple[datetime, bool, str]:
        return (f.event_time, isinstance(f, SessionEnded), f.event_id)  # tie: session_ended wins

    session_facts = [
        f
        for f in facts
        if isinstance(f, (SessionBound, SessionEnded))
        and (f.tenant, f.session_id) == (call.tenant, call.session_id)
        and f.event_time <= t
    ]
    if not session_facts:
        return ("unbound_session", None)
    latest = max(session_facts, key=session_order)
    earlier_bindings = [
        f for f in session_facts if isinstance(f, SessionBound) and session_order(f) <= session_order(latest)
    ]
    binding = max(earlier_bindings, key=session_order, default=None)
    assert binding is None or isinstance(binding, SessionBound)
    attested = call.attested or {}
    if binding is not None and (
        (attested.get("sub") is not None and attested["sub"] != binding.principal)
        or (attested.get("client_id") is not None and attested["client_id"] != binding.agent_id)
    ):
        return ("identity_mismatch", None)
    if isinstance(latest, SessionEnded):
        return ("session_expired", None)
    if not (latest.valid_from <= t and (latest.valid_until is None or t < latest.valid_until)):
        return ("session_expired", None)

    def ours(f: GrantIssued | GrantRevoked) -> bool:
        return (f.tenant, f.principal, f.agent_id) == (call.tenant, latest.principal, latest.agent_id)

    issued = [f for f in facts if isinstance(f, GrantIssued) and ours(f) and f.event_time <= t]
    revoked = [f for f in facts if isinstance(f, GrantRevoked) and ours(f)]
    versions = {
        gid: max((f for f in issued if f.grant_id == gid), key=lambda f: (f.event_time, f.event_id))
        for gid in {f.grant_id for f in issued}
    }
    name = f"{call.server}/{call.tool}"

    def tools_ok(g: GrantIssued) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in g.tools)

    def covers(g: GrantIssued) -> bool:
        resources_ok = all(any(fnmatch.fnmatchcase(r, p) for p in g.resources) for r in call.resources)
        return tools_ok(g) and (not g.resources or resources_ok)

    def is_revoked(g: GrantIssued) -> bool:
        return any(r.grant_id == g.grant_id and g.event_time <= r.event_time <= t for r in revoked)

    def is_expired(g: GrantIssued) -> bool:
        return g.expires_at is not None and t >= g.expires_at

    def is_active(g: GrantIssued) -> bool:
        return not is_revoked(g) and g.not_before <= t and not is_expired(g)

    def pick(gs: list[GrantIssued]) -> str:
        latest_nb = max(g.not_before for g in gs)
        return min(g.grant_id for g in gs if g.not_before == latest_nb)

    covering = [g for g in versions.values() if covers(g)]
    if active := [g for g in covering if is_active(g)]:
        return ("in_scope", pick(active))
    if not versions:
        return ("no_grant", None)
    if rev := [g for g in covering if is_revoked(g)]:
        return ("revoked_grant", pick(rev))
    if exp := [g for g in covering if is_expired(g)]:
        return ("expired_grant", pick(exp))
    if early := [g for g in covering if g.not_before > t]:
        return ("not_yet_valid", pick(early))
    if not any(tools_ok(g) for g in versions.values()):
        return ("out_of_scope_tool", None)
    return ("out_of_scope_resource", None)


# ---------------------------------------------------------------------------- properties


@settings(max_examples=600, deadline=None)
@given(facts=fact_sets(), calls=calls())
def test_engine_agrees_with_a_literal_reading_of_design(facts: list[Fact], calls: list[ToolCall]) -> None:
    engine = engine_with(facts)
    for c in calls:
        d = engine.decide(c)
        assert (d.verdict, d.matched_grant_id) == oracle(facts, c), d.reasons
        event(d.verdict)


@settings(max_examples=300, deadline=None)
@given(facts=fact_sets(), calls=calls(), data=st.data())
def test_decision_does_not_depend_on_fact_order_or_duplicates(
    facts: list[Fact], calls: list[ToolCall], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(facts))
    duplicates = data.draw(st.lists(st.sampled_from(facts), max_size=5)) if facts else []
    reference = engine_with(facts)
    other = DecisionEngine()
    added = [other.add_fact(f) for f in [*shuffled, *duplicates]]
    assert added == [True] * len(shuffled) + [False] * len(duplicates)
    for c in calls:
        assert other.decide(c) == reference.decide(c)


def _same_after_horizon(reference: DecisionEngine, compacted: DecisionEngine, calls: list[ToolCall]) -> None:
    for c in calls:
        assert compacted.decide(c) == reference.decide(c)


@settings(max_examples=300, deadline=None)
@given(facts=fact_sets(max_size=20), horizon=instants, data=st.data())
def test_compaction_keeps_decisions_at_or_after_the_horizon(
    facts: list[Fact], horizon: int, data: st.DataObject
) -> None:
    later_calls = data.draw(calls(min_time=horizon))
    reference = engine_with(facts)
    compacted = engine_with(facts)
    compacted.compact(T(horizon))
    _same_after_horizon(reference, compacted, later_calls)
    # A second, later compaction, then replays of old facts (some were forgotten): still the same.
    second = data.draw(st.integers(horizon, 8))
    compacted.compact(T(second))
    for f in data.draw(st.lists(st.sampled_from(facts), max_size=8)) if facts else []:
        compacted.add_fact(f)
    _same_after_horizon(reference, compacted, [c for c in later_calls if c.event_time >= T(second)])


@settings(max_examples=300, deadline=None)
@given(facts=fact_sets(max_size=20), horizon=instants, data=st.data())
def test_compaction_then_late_facts_keeps_decisions(facts: list[Fact], horizon: int, data: st.DataObject) -> None:
    """The live pattern: compact with the facts known so far, then late facts arrive."""
    split = data.draw(st.integers(0, len(facts)))
    later_calls = data.draw(calls(min_time=horizon))
    compacted = engine_with(facts[:split])
    compacted.compact(T(horizon))
    for f in facts[split:]:
        compacted.add_fact(f)
    _same_after_horizon(engine_with(facts), compacted, later_calls)


@settings(max_examples=100, deadline=None)
@given(facts=fact_sets(), calls=calls())
def test_decision_is_json_ready_and_deterministic(facts: list[Fact], calls: list[ToolCall]) -> None:
    engine = engine_with(facts)
    for c in calls:
        d: Decision = engine.decide(c)
        json.dumps(d.facts)
        assert d.reasons and all(isinstance(r, str) for r in d.reasons)
        assert d == engine.decide(c)
