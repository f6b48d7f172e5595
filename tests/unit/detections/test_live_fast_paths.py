"""The shortcuts the live processors take for speed give exactly what the plain code gives.

Each fast path (pattern matching with one regex, models built without validation, memoized
decisions, keys quoted only when needed, ids without UUID objects) is compared here with the
straightforward computation it replaces, on drawn inputs.
"""

from __future__ import annotations

import fnmatch
import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import detections.live as live
from detections.catalog import Detector, default_catalog
from detections.engine import VERDICTS, Decision, DecisionEngine, Fact, GrantHistory, _ts, authorize, decision_of
from detections.findings import FINDING_NAMESPACE, Finding, FindingEvidence, new_finding, trusted_model, uuid5_text
from detections.live import common, evidence, wire
from detections.rulebase import RuleContext, glob_matcher, matches
from schemas import (
    Evidence,
    GrantIssued,
    GrantRevoked,
    SessionBound,
    SessionEnded,
    ToolCall,
    format_timestamp,
    record_hash,
)
from schemas import Finding as FindingRecord
from support.live_sim import LiveSim
from support.strategies import BASE, calls, fact_sets


def tool_call(**fields: Any) -> ToolCall:
    """A validated call of acme's session s1 (fs/read_file by default); ``fields`` override."""
    values: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "event_time": BASE,
        "tenant": "acme",
        "call_id": "c1",
        "session_id": "s1",
        "server": "fs",
        "tool": "read_file",
        "arguments": {},
        "resources": [],
        "transport": "sdk",
    }
    return ToolCall(**(values | fields))


GLOB_ALPHABET = "ab/*?[]!-.:\\"
globs = st.text(alphabet=GLOB_ALPHABET, max_size=6)
names = st.text(alphabet="ab/-.:[]!*?\\", max_size=6)


@settings(max_examples=400, deadline=None)
@given(patterns=st.lists(globs, max_size=4), name=names)
def test_one_regex_per_pattern_list_is_fnmatchcase(patterns: list[str], name: str) -> None:
    expected = any(fnmatch.fnmatchcase(name, p) for p in patterns)
    assert (glob_matcher(tuple(patterns))(name) is not None) == expected
    assert matches(tuple(patterns), name) == expected
    assert matches(list(patterns), name) == expected


@settings(max_examples=300, deadline=None)
@given(part=st.text(max_size=12))
def test_keys_are_quoted_as_urllib_quotes_them(part: str) -> None:
    assert wire.quote_part(part) == quote(part, safe="")
    assert live.session_key(part, "s-1") == f"{quote(part, safe='')}/s-1"
    assert wire.route_of(part, "s", "p/1", part) == "/".join(quote(x, safe="") for x in (part, "p/1", part))


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=40))
def test_uuid5_text_is_uuid5(name: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return
    for ns in (live.EVIDENCE_NAMESPACE, FINDING_NAMESPACE, uuid.NAMESPACE_URL):
        assert uuid5_text(ns.bytes, name) == str(uuid.uuid5(ns, name))


@settings(max_examples=300, deadline=None)
@given(
    micros=st.integers(-(10**15), 10**16),
    offset=st.sampled_from([None, 0, 60, -330, 14 * 60]),
)
def test_instants_format_as_format_timestamp(micros: int, offset: int | None) -> None:
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    if offset is not None:
        dt = dt.astimezone(timezone(timedelta(minutes=offset)))
    assert _ts(dt) == format_timestamp(dt)
    assert common.at(micros) == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)


def _state(model: Any) -> tuple[Any, ...]:
    return (
        type(model),
        list(model.__dict__.items()),
        model.__pydantic_fields_set__,
        model.__pydantic_extra__,
        model.__pydantic_private__,
    )


def test_trusted_evidence_is_what_model_construct_builds() -> None:
    decision = Decision("in_scope", "g1", ("a", "b"), "alice", "a1", {"as_of": "x", "grants": []})
    call = tool_call(resources=["file:/a"])
    now = datetime.now(UTC)
    fast = live.build_evidence(call, decision, 2, True, False, now, 3, "deadline", "final", "acme/s1/c1")
    slow = Evidence.model_construct(
        evidence_id=str(uuid.uuid5(live.EVIDENCE_NAMESPACE, "acme/s1/c1#2")),
        call_id="c1",
        tenant="acme",
        session_id="s1",
        principal="alice",
        agent_id="a1",
        server="fs",
        tool="read_file",
        call_time=BASE,
        verdict="in_scope",
        matched_grant_id="g1",
        reasons=["a", "b"],
        version=2,
        final=True,
        late=False,
        decided_at=now,
        facts={},
        fact_ids=[],
        fact_hashes=[],
        kind="final",
        trigger="deadline",
        approval_id=None,
        approver=None,
        policy_versions=[],
        policy_decision=None,
        policy_reasons=[],
        policy_errors=[],
        history_complete=True,
    )
    assert _state(fast) == _state(slow)
    assert fast == slow


def test_the_rules_call_is_the_stripped_call_of_earlier_snapshots() -> None:
    line = [str(uuid.uuid4()), "acme", "c1", "s1", "fs", "read_file", ["file:/a"], "sdk", 0, {"sub": "x"}, "sha256:1"]
    t = common.at(1_700_000_000_123_000)
    fields = {
        "event_id": line[0],
        "tenant": "acme",
        "call_id": "c1",
        "session_id": "s1",
        "server": "fs",
        "tool": "read_file",
        "resources": ["file:/a"],
        "transport": "sdk",
        "event_time": t,
        "attested": {"sub": "x"},
        "tool_digest": "sha256:1",
    }
    old = ToolCall.model_construct(arguments={}, claimed={}, **fields)
    assert _state(evidence.tool_call(wire.CallLine(line), t)) == _state(old)


def test_decisions_built_fast_equal_the_dataclass() -> None:
    facts: dict[str, object] = {"a": 1}
    fast = decision_of(BASE, "in_scope", "g1", ("r",), "p", "a", facts, ({"grant_id": "g1"},))
    slow = Decision("in_scope", "g1", ("r",), "p", "a", {"as_of": _ts(BASE), "a": 1, "grants": [{"grant_id": "g1"}]})
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)


@pytest.mark.parametrize("rule", list(default_catalog()), ids=lambda r: r.id)
def test_findings_and_records_equal_the_validated_models(rule: Any) -> None:
    from detections.catalog import judge

    now = datetime(2026, 11, 21, 12, 0, 0, 123456, tzinfo=UTC)
    for case in rule.cases:
        for judged in judge(case.events, Detector([rule], case.config)):
            for f in judged.findings:
                validated = Finding(
                    **{k: getattr(f, k) for k in Finding.model_fields if k != "evidence"},
                    evidence=FindingEvidence(**f.evidence.model_dump()),
                )
                assert _state(f) == _state(validated)
                assert _state(f.evidence) == _state(validated.evidence)
                record = f.to_record(now)
                slow = FindingRecord(**record.model_dump())
                assert _state(record) == _state(slow)
                assert record.detected_at == datetime(2026, 11, 21, 12, 0, 0, 123000, tzinfo=UTC)


def test_odd_finding_values_still_go_through_validation() -> None:
    common: dict[str, Any] = {
        "finding_id": "f",
        "dedup_key": "k",
        "rule_id": "r",
        "rule_version": 1,
        "severity": "low",
        "title": "t",
        "summary": "s",
        "tenant": "acme",
        "principal": None,
        "agent_id": None,
        "call_id": "c",
        "first_call_time": BASE + timedelta(microseconds=1500),
        "last_call_time": BASE,
        "call_ids": ("c",),
        "session_id": "s",
        "grant_id": None,
        "query": "call_evidence",
        "details": {},
    }
    f = new_finding(**common)
    assert f.first_call_time == BASE + timedelta(milliseconds=1)
    with pytest.raises(ValueError):
        new_finding(**{**common, "dedup_key": ""})
    with pytest.raises(ValueError):
        new_finding(**{**common, "severity": "huge"})
    with pytest.raises(ValueError):
        new_finding(**{**common, "first_call_time": datetime(2026, 1, 1)})  # naive
    nan = new_finding(**{**common, "details": {"x": float("nan")}})
    with pytest.raises(ValueError):
        nan.to_record(BASE)
    assert trusted_model(
        FindingEvidence, {"call_ids": ("c",), "session_id": "s", "grant_id": None, "query": "call_evidence"}, None
    ) == (FindingEvidence(call_ids=("c",), session_id="s", query="call_evidence"))


@pytest.mark.parametrize("rule", [r for r in default_catalog() if r.verdicts is not None], ids=lambda r: r.id)
def test_rules_skipped_on_other_verdicts_would_not_fire_nor_change_state(rule: Any) -> None:
    call = tool_call(
        server="web", tool="fetch", resources=["file:/etc/passwd"], attested={"sub": "mallory"}, tool_digest="sha256:x"
    )
    config = Detector().config
    for verdict in VERDICTS:
        if verdict in rule.verdicts:
            continue
        for matched in (None, "g1"):
            state = rule.new_state(config)
            before = repr(state)
            decision = Decision(verdict, matched, (f"{verdict}: x",), "alice", "a1", {})
            assert rule.evaluate(call, decision, RuleContext(rule.meta, config, state, {})) == []
            assert repr(state) == before


def _facts_by_delegation(facts: list[Fact]) -> dict[tuple[str, str, str], GrantHistory]:
    out: dict[tuple[str, str, str], GrantHistory] = {}
    for f in facts:
        if isinstance(f, (GrantIssued, GrantRevoked)):
            key = (f.tenant, f.principal, f.agent_id)
            out.setdefault(key, GrantHistory(*key)).add(f)
    return out


@settings(max_examples=200, deadline=None)
@given(facts=fact_sets(max_size=14), calls_=calls(), seed=st.integers(0, 2**32 - 1))
def test_live_final_evidence_carries_replays_reasons_and_facts(
    facts: list[Fact], calls_: list[ToolCall], seed: int
) -> None:
    """Stronger than verdicts: every final evidence record has the engine's reasons and facts
    (the shared decision parts, slot memos and compiled patterns change nothing)."""
    rng = random.Random(seed)
    unique = {c.call_id: c for c in calls_}
    events: list[Any] = [*facts, *unique.values()]
    rng.shuffle(events)
    sim = LiveSim(rng.choice([1, 2, 4]))
    now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    for e in events:
        sim.deliver(e, now)
        sim.drain(now, rng)
        now += timedelta(milliseconds=100)
    sim.tick(now + timedelta(seconds=16))
    engine = DecisionEngine()
    for f in facts:
        engine.add_fact(f)
    hashes = {f.event_id: record_hash(f) for f in facts}
    latest = sim.latest()
    for c in unique.values():
        decision = engine.decide(c)
        e = latest[c.call_id]
        assert e.final
        assert (e.verdict, e.matched_grant_id, e.principal, e.agent_id) == (
            decision.verdict,
            decision.matched_grant_id,
            decision.principal,
            decision.agent_id,
        )
        assert tuple(e.reasons) == decision.reasons
        # the facts by reference: replay's facts (ids), each with the record hash of the event itself
        ids, _ = live.fact_refs(decision.facts)
        assert e.fact_ids == ids
        assert e.fact_hashes == [hashes[i] for i in ids]


@settings(max_examples=200, deadline=None)
@given(facts=fact_sets(max_size=16), calls_=calls())
def test_grant_slots_give_grants_at(facts: list[Fact], calls_: list[ToolCall]) -> None:
    for history in _facts_by_delegation(facts).values():
        for c in calls_:
            for t in (c.event_time, BASE, BASE + timedelta(seconds=3, milliseconds=500)):
                slot = history.slot_at(t)
                states = history.grants_at(t)
                assert [(v.version, r) for v, r in slot.pairs] == [(g.version, g.revocation) for g in states]
                assert [s for _v, _r, s in slot.grants] == [g.status for g in states]


def test_records_of_an_earlier_format_are_ignored_not_fatal() -> None:
    old_s1 = (
        b'{"p": 0, "sk": "acme/s1", "tenant": "acme", "sid": "s1", "cid": "c1", "t": 0, "q": 1, "h": "x",'
        b' "r": "acme/s1", "d": 0, "k": 9}'
    )
    old_s2 = b'{"p": 0, "route": "acme/s1", "ck": "acme/s1/c1", "moved": null, "fin": false, "d": 0, "k": 9, "q": 1}'
    sim = LiveSim(1)
    sim.s1_calls["acme/s1/c1"] = old_s1
    sim.s2_calls["acme/s1|acme/s1/c1"] = old_s2
    sim.s2_calls["acme/s1|acme/s1/c2"] = b"not json"
    sim.rebuild()
    assert sim.stage1[0].open_calls() == 0 and sim.stage2[0].open_calls() == 0
    call = tool_call()
    now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    sim.deliver(call, now)
    sim.drain(now)
    sim.tick(now + timedelta(seconds=16))
    assert [(e.version, e.verdict, e.final) for e in sim.evidence] == [
        (1, "unbound_session", False),
        (2, "unbound_session", True),
    ]


def test_session_facts_of_every_kind_still_feed_the_memo() -> None:
    """The attribution memo is dropped when the session history changes."""
    sim = LiveSim(1)
    now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)

    def call(n: int, sub: str | None = None) -> ToolCall:
        return tool_call(
            event_time=BASE + timedelta(seconds=n), call_id=f"c{n}", attested=None if sub is None else {"sub": sub}
        )

    bound = SessionBound(
        event_id=str(uuid.uuid4()),
        event_time=BASE,
        tenant="acme",
        session_id="s1",
        principal="alice",
        agent_id="a1",
        valid_from=BASE,
    )
    ended = SessionEnded(
        event_id=str(uuid.uuid4()), event_time=BASE + timedelta(seconds=5), tenant="acme", session_id="s1"
    )
    sim.deliver(bound, now)
    for n, sub in ((1, None), (2, "alice"), (3, "bob"), (4, None)):
        sim.deliver(call(n, sub), now)
        sim.drain(now)
    sim.deliver(ended, now)
    sim.deliver(call(6), now)
    sim.drain(now)
    sim.tick(now + timedelta(seconds=16))
    verdicts = {e.call_id: e.verdict for e in sim.evidence if e.final}
    assert verdicts == {
        "c1": "no_grant",
        "c2": "no_grant",
        "c3": "identity_mismatch",
        "c4": "no_grant",
        "c6": "session_expired",
    }
    engine = DecisionEngine()
    engine.add_fact(bound)
    engine.add_fact(ended)
    for e in sim.evidence:
        if e.final:
            c = call(int(e.call_id[1:]), {"c2": "alice", "c3": "bob"}.get(e.call_id))
            assert tuple(e.reasons) == engine.decide(c).reasons


def test_authorize_takes_the_same_path_as_the_live_pipeline() -> None:
    grant = GrantIssued(
        event_id=str(uuid.uuid4()),
        event_time=BASE,
        tenant="acme",
        grant_id="g1",
        principal="alice",
        agent_id="a1",
        tools=["fs/read_*", "fs/[lm]ist"],
        resources=["file:/data/*"],
        not_before=BASE,
        granted_by="alice",
    )
    history = GrantHistory("acme", "alice", "a1")
    history.add(grant)
    bound = SessionBound(
        event_id=str(uuid.uuid4()),
        event_time=BASE,
        tenant="acme",
        session_id="s1",
        principal="alice",
        agent_id="a1",
        valid_from=BASE,
    )
    engine = DecisionEngine()
    engine.add_fact(bound)
    engine.add_fact(grant)
    for tool, resources in (("read_file", ["file:/data/a"]), ("list", ["file:/etc/x", "file:/data/b"]), ("write", [])):
        call = tool_call(event_time=BASE + timedelta(seconds=1), tool=tool, resources=resources)
        decision = engine.decide(call)
        from detections.engine import attribute

        attribution = attribute(call, engine.session_state("acme", "s1", call.event_time))
        assert authorize(call, attribution, history.grants_at(call.event_time)) == decision
