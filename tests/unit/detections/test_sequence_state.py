"""Durable sequence-rule state: each rule's state codec, and stage 2 rebuilt from its stores.

The live job keeps the sequence rules' per-delegation state and the final calls held for them in a
store of its own (``s2-seq``, a compacted changelog per stage-2 partition). A worker killed or a
partition moved in the middle of a sequence (a sensitive read, then the send) must still raise the
finding replay raises: stage 2 rebuilt over the stores as of the last committed batch, fed the rest
of the events, gives the findings of an uninterrupted run and of replay.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detections.casekit import bound, call, grant, revoke
from detections.catalog import Detector, default_catalog, judge
from detections.live import LiveConfig, Stage2
from detections.rulebase import DetectionConfig, Lru, StateDecodeError
from detections.rules import (
    approval_latency,
    exfiltration_chain,
    first_tool_use,
    tool_rug_pull,
    use_after_revocation,
    violation_burst,
)
from schemas import BaseEvent, ToolCall
from support.live_sim import LiveSim

SEQUENCE_RULES = [r for r in default_catalog() if r.meta.kind == "sequence"]
CONFIG = DetectionConfig()

# ------------------------------------------------------------------- codec round trips

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
instants = st.integers(0, 2**53).map(lambda us: _EPOCH + timedelta(microseconds=us))
texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
small_config = st.builds(DetectionConfig, max_entries=st.integers(1, 8), burst_threshold=st.integers(2, 6))


def _lru(cap: int, items: list[tuple[str, Any]]) -> Lru[str, Any]:
    lru: Lru[str, Any] = Lru(cap)
    for k, v in items:
        lru[k] = v
    return lru


def exfiltration_states(config: DetectionConfig) -> st.SearchStrategy[Any]:
    read = st.builds(exfiltration_chain.Read, instants, texts, texts)

    def make(reads: list[exfiltration_chain.Read]) -> exfiltration_chain.RecentReads:
        state = exfiltration_chain.new_state(config)
        state.reads.extend(reads)
        return state

    return st.lists(read, max_size=12).map(make)


def first_use_states(config: DetectionConfig) -> st.SearchStrategy[Any]:
    return st.builds(
        lambda since, tools: first_tool_use.ToolsSeen(_lru(config.max_entries, tools), since),
        st.none() | instants,
        st.lists(st.tuples(texts, instants), max_size=12),
    )


def rug_pull_states(config: DetectionConfig) -> st.SearchStrategy[Any]:
    epoch = st.builds(tool_rug_pull.Epoch, texts, instants, instants, texts)
    return st.builds(
        lambda tools: tool_rug_pull.Digests(_lru(config.max_entries, tools)),
        st.lists(st.tuples(texts, st.lists(epoch, max_size=tool_rug_pull.MAX_EPOCHS)), max_size=10),
    )


def revocation_states(config: DetectionConfig) -> st.SearchStrategy[Any]:
    uses = st.builds(use_after_revocation.Uses, instants, texts, st.integers(0, 2**40))
    return st.builds(
        lambda items: use_after_revocation.RevokedUses(_lru(config.max_entries, items)),
        st.lists(st.tuples(texts, uses), max_size=10),
    )


def burst_states(config: DetectionConfig) -> st.SearchStrategy[Any]:
    violation = st.builds(violation_burst.Violation, instants, texts, texts)

    def make(items: list[violation_burst.Violation]) -> violation_burst.RecentViolations:
        state = violation_burst.new_state(config)
        state.recent.extend(items)
        return state

    return st.lists(violation, max_size=10).map(make)


def latency_states(config: DetectionConfig) -> st.SearchStrategy[Any]:
    stats = st.builds(approval_latency.ToolLatency, st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 2**62))
    return st.builds(
        lambda items: approval_latency.Latencies(_lru(config.max_entries, items)),
        st.lists(st.tuples(texts, stats), max_size=10),
    )


STATES: dict[str, Callable[[DetectionConfig], st.SearchStrategy[Any]]] = {
    "approval_latency": latency_states,
    "exfiltration_chain": exfiltration_states,
    "first_tool_use": first_use_states,
    "tool_rug_pull": rug_pull_states,
    "use_after_revocation": revocation_states,
    "violation_burst": burst_states,
}


def test_every_sequence_rule_has_a_codec_and_a_round_trip_test() -> None:
    assert sorted(STATES) == sorted(r.id for r in SEQUENCE_RULES)
    assert all(r.codec is not None and r.codec.version >= 1 for r in SEQUENCE_RULES)


def _shape(state: Any) -> Any:
    """What must survive a round trip: values, their order (LRU order included) and deque bounds."""
    out = {}
    for name, value in vars(state).items():
        if isinstance(value, Lru):
            out[name] = (value.cap, list(value.items()))
        elif hasattr(value, "maxlen"):
            out[name] = (value.maxlen, list(value))
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("rule_id", sorted(STATES))
@settings(max_examples=150, deadline=None)
@given(data=st.data(), config=small_config)
def test_state_codec_round_trip(rule_id: str, data: st.DataObject, config: DetectionConfig) -> None:
    rule = default_catalog().get(rule_id)
    assert rule.codec is not None
    state = data.draw(STATES[rule_id](config))
    encoded = rule.codec.encode(state)
    assert encoded.startswith(f"[{rule.codec.version},".encode()) or encoded == f"[{rule.codec.version}]".encode()
    assert b"\n" not in encoded, "sequence records frame states by lines"
    decoded = rule.codec.decode(encoded, config)
    assert type(decoded) is type(state)
    assert _shape(decoded) == _shape(state)
    assert rule.codec.encode(decoded) == encoded
    for value in decoded.__dict__.values():  # instants come back as UTC datetimes
        for item in value.values() if isinstance(value, dict) else value if hasattr(value, "__iter__") else [value]:
            if isinstance(item, datetime):
                assert item.tzinfo is UTC


@pytest.mark.parametrize("rule_id", sorted(STATES))
def test_unknown_versions_and_garbage_raise_a_decode_error_never_something_else(rule_id: str) -> None:
    codec = default_catalog().get(rule_id).codec
    assert codec is not None
    with pytest.raises(StateDecodeError) as caught:
        codec.decode(f"[{codec.version + 1}, 1, 2]".encode(), CONFIG)
    assert caught.value.reason == "unknown_version"
    for garbage in (b"", b"not json", b"{}", b"[]", b'["1"]', f"[{codec.version}, 7]".encode(), b"[1, [[1]]]"):
        with pytest.raises(StateDecodeError) as caught:
            codec.decode(garbage, CONFIG)
        assert caught.value.reason == "malformed", garbage


def _sequence_events(rng: random.Random, n: int) -> list[BaseEvent]:
    """Two delegations and an unbound session; reads, sends, violations, digest changes, a revocation."""
    events: list[BaseEvent] = [
        bound("09:00:00"),
        grant("09:00:00", tools=("fs/*", "web/*", "vault/*")),
        bound("09:00:00", session="s2", principal="bob", agent="agent-2"),
        grant("09:00:00", "g2", tools=("fs/*", "web/*"), principal="bob", agent="agent-2"),
    ]
    if rng.random() < 0.5:
        events.append(revoke("10:30:00", "g2", "bob", "agent-2"))
    t = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    tools = ["vault/get_secret", "web/fetch", "fs/read_file", "db/drop_table", "fs/write_file", "fs/read_file"]
    burst: list[str] = []  # a run of violations of one session, one a second
    for i in range(n):
        if not burst and rng.random() < 0.1:
            burst = [rng.choice(["s1", "s2", "s3"])] * rng.randint(3, 6)
        session = burst.pop() if burst else rng.choice(["s1", "s1", "s2", "s3"])
        t += timedelta(seconds=1 if burst else rng.choice([0, 1, 1, 2, 5, 5, 20, 40, 90, 300, 3700]))  # 0: same instant
        digest = rng.choice([None, "sha256:a", "sha256:a", "sha256:b"])
        hms = t.strftime("%H:%M:%S.%f")[:12]
        tool = "db/drop_table" if burst else rng.choice(tools)
        events.append(call(hms, f"c{i:02d}", tool, session=session, digest=digest))
    return events


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40))
def test_a_detector_whose_states_round_trip_after_every_call_fires_as_replay(seed: int, n: int) -> None:
    """Every sequence state encoded and decoded again after each call: the findings do not change."""

    class RoundTrip(Detector):
        def evaluate_with(self, call: Any, decision: Any, by_id: Any) -> Any:
            found = super().evaluate_with(call, decision, by_id)
            for key in list(self._states):
                slots = self.slots(key)
                assert slots is not None
                again = {}
                for rule in SEQUENCE_RULES:
                    assert rule.codec is not None
                    again[rule.id] = rule.codec.decode(rule.codec.encode(slots[rule.id]), self.config)
                self._states[key] = again
            return found

    events = _sequence_events(random.Random(seed), n)
    plain = [[f.finding_id for f in j.findings] for j in judge(events)]
    assert [[f.finding_id for f in j.findings] for j in judge(events, RoundTrip())] == plain


# --------------------------------------------------------------- crash and rebuild

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Act:
    at: datetime
    event: BaseEvent | None = None  # None: a tick of every stage-2 partition


def _acts(events: list[BaseEvent]) -> list[Act]:
    """Facts first, then the calls in event-time order 100 ms apart (all within the 15 s grace), then
    ticks every 100 ms until every deadline and hold is over."""
    facts = [e for e in events if not isinstance(e, ToolCall)]
    calls = sorted((e for e in events if isinstance(e, ToolCall)), key=lambda c: (c.event_time, c.call_id))
    acts = [Act(NOW, f) for f in facts]
    acts += [Act(NOW + timedelta(milliseconds=100 * (i + 1)), c) for i, c in enumerate(calls)]
    end = NOW + timedelta(milliseconds=100 * (len(calls) + 1)) + LiveConfig().grace + timedelta(seconds=2)
    at = NOW + LiveConfig().grace
    while at <= end:
        acts.append(Act(at))
        at += timedelta(milliseconds=100)
    return acts


def _do(sim: LiveSim, act: Act) -> None:
    if act.event is None:
        sim.tick(act.at)
    else:
        sim.deliver(act.event, act.at)
        sim.drain(act.at)


def _run(acts: list[Act], batches: list[int], *, deferred: bool, crash: tuple[int, int] | None) -> LiveSim:
    """Acts in batches of these sizes, each committed; ``crash=(k, m)``: after batch k-1 was committed,
    the first m acts of batch k run, the worker is killed, and a new one redoes batch k from there."""
    sim = LiveSim(partitions=2, deferred=deferred)
    sim.commit()
    i = 0
    for k, size in enumerate(batches):
        batch = acts[i : i + size]
        i += size
        if crash is not None and crash[0] == k:
            for act in batch[: crash[1]]:
                _do(sim, act)
            sim.crash()
        for act in batch:
            _do(sim, act)
        sim.commit()
    assert i == len(acts)
    return sim


def _findings(found: list[Any]) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """finding_id -> (rule, call, evidence call ids); a finding re-sent after a crash has the same id
    and content (the sink keeps one)."""
    out: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    for f in found:
        value = (f.rule_id, f.call_id, tuple(f.call_ids))
        assert out.setdefault(f.finding_id, value) == value
    return out


def _replay(events: list[BaseEvent]) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    return {f.finding_id: (f.rule_id, f.call_id, tuple(f.evidence.call_ids)) for j in judge(events) for f in j.findings}


def _batches(rng: random.Random, total: int) -> list[int]:
    sizes = []
    while total > 0:
        size = min(total, rng.randint(1, 12))
        sizes.append(size)
        total -= size
    return sizes


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 30),
    deferred=st.booleans(),
    crash_at=st.floats(0, 1, exclude_max=True),
    partial=st.floats(0, 1),
)
def test_stage2_rebuilt_mid_sequence_raises_the_findings_of_replay(
    seed: int, n: int, deferred: bool, crash_at: float, partial: float
) -> None:
    rng = random.Random(seed)
    events = _sequence_events(rng, n)
    acts = _acts(events)
    batches = _batches(rng, len(acts))
    k = int(crash_at * len(batches))
    crash = (k, int(partial * batches[k]))
    expected = _replay(events)
    uninterrupted = _findings(_run(acts, batches, deferred=deferred, crash=None).findings)
    assert uninterrupted == expected
    crashed = _run(acts, batches, deferred=deferred, crash=crash)
    assert _findings(crashed.findings) == expected


def _exfiltration_story() -> tuple[list[BaseEvent], ToolCall, ToolCall]:
    read = call("10:00:00", "read", "vault/get_secret")
    send = call("10:05:00", "send", "web/fetch")
    return [bound("09:00:00"), grant("09:00:00", tools=("vault/*", "web/*"))], read, send


@pytest.mark.parametrize("deferred", [False, True], ids=["per-event", "per-batch"])
@pytest.mark.parametrize("when", ["held", "seen"])
def test_a_read_before_the_crash_and_a_send_after_it_is_an_exfiltration_chain(deferred: bool, when: str) -> None:
    """The read is final and held for the rules (``held``) or already seen by them (``seen``) when
    the worker dies; the send comes to the new worker, which must still raise the finding."""
    facts, read, send = _exfiltration_story()
    sim = LiveSim(partitions=2, deferred=deferred)
    for f in facts:
        sim.deliver(f, NOW)
    sim.deliver(read, NOW)
    sim.drain(NOW)
    grace = LiveConfig().grace
    sim.tick(NOW + grace if when == "held" else NOW + grace + timedelta(seconds=1))
    held = sum(s2.held_calls() for s2 in sim.stage2)
    assert held == (1 if when == "held" else 0)
    sim.commit()
    sim.crash()
    assert sum(s2.held_calls() for s2 in sim.stage2) == held, "the held read came back from the store"
    later = NOW + grace + timedelta(seconds=2)
    sim.deliver(send, later)
    sim.drain(later)
    sim.tick(later + grace + timedelta(seconds=1))
    chains = [f for f in sim.findings if f.rule_id == "exfiltration_chain"]
    assert [(f.call_id, list(f.call_ids)) for f in chains] == [("send", ["read", "send"])]
    assert _findings(sim.findings) == _replay([*facts, read, send])


def test_sequence_records_are_written_once_per_batch_and_only_when_changed() -> None:
    """Deferred stage 2: nothing is encoded until the store drains; one record per delegation."""
    from stream_jobs.state import ChangelogStore, deferred_stage2

    facts, read, send = _exfiltration_story()
    sim = LiveSim(partitions=1)
    for f in facts:
        sim.deliver(f, NOW)
    store = ChangelogStore()
    s2 = deferred_stage2(0, sim.s2_grants, sim.s2_calls, store)
    sim.stage2 = [s2]
    for c in (read, send, call("10:06:00", "other", "fs/read_file")):
        sim.deliver(c, NOW)
    sim.drain(NOW)
    sim.tick(NOW + LiveConfig().grace + timedelta(seconds=1))
    assert len(store) == 0, "not written before the drain"
    writes = store.drain()
    assert [k for k, _ in writes] == ["acme/alice/agent-1"]
    assert store.drain() == [], "nothing changed since"
    sim.tick(NOW + LiveConfig().grace + timedelta(seconds=2))
    assert store.drain() == [], "a tick that changes no state writes nothing"


def _record(sim: LiveSim) -> tuple[str, list[bytes]]:
    [(route, raw)] = sim.s2_seq.items()
    return route, raw.split(b"\n")


@pytest.mark.parametrize(
    ("damage", "counter"),
    [
        (lambda lines: [lines[0].replace(b'"q",1,', b'"q",99,'), *lines[1:]], "sequence_records_unknown_version"),
        (lambda lines: [b"garbage", *lines[1:]], "sequence_records_malformed"),
        (lambda lines: [lines[0], b"[99,1,2]", *lines[2:]], "sequence_state_unknown_version"),
        (lambda lines: [lines[0], b"[1,{}]", *lines[2:]], "sequence_state_malformed"),
        (
            lambda lines: [*lines[:-3], lines[-3].replace(b'"h",1,', b'"h",7,'), *lines[-2:]],
            "sequence_held_unknown_version",
        ),
        (lambda lines: [*lines[:-1], b"[1]"], "sequence_held_malformed"),
    ],
    ids=["record version", "record garbage", "state version", "state garbage", "held version", "held garbage"],
)
def test_unreadable_sequence_records_are_counted_never_fatal(
    damage: Callable[[list[bytes]], list[bytes]], counter: str
) -> None:
    facts, read, send = _exfiltration_story()
    sim = LiveSim(partitions=1)
    for f in facts:
        sim.deliver(f, NOW)
    sim.deliver(read, NOW)
    sim.deliver(send, NOW + timedelta(seconds=1))
    sim.drain(NOW + timedelta(seconds=1))
    grace = LiveConfig().grace
    sim.tick(NOW + grace + timedelta(seconds=0.6))  # the read: seen by the rules
    sim.tick(NOW + grace + timedelta(seconds=1))  # the send: final and held
    assert sim.stage2[0].held_calls() == 1
    route, lines = _record(sim)
    assert len(lines) == 1 + len(SEQUENCE_RULES) + 3
    sim.s2_seq[route] = b"\n".join(damage(lines))
    sim.rebuild()
    assert sim.counters.counts.get(counter) == 1, sim.counters.counts
    sim.tick(NOW + LiveConfig().grace + timedelta(seconds=5))  # still runs
    if not counter.startswith("sequence_records_"):  # a record whose head was read is written again
        sim.rebuild()
        assert sim.counters.counts.get(counter) == 1, "the record was written again in full since"


def test_an_evicted_delegation_leaves_no_record_behind() -> None:
    """The detector keeps at most ``max_delegations`` delegations; their records go with them."""
    detector = Detector(config=DetectionConfig(max_delegations=2))
    store: dict[str, bytes] = {}
    sim = LiveSim(partitions=1)
    sim.stage2 = [Stage2(0, sim.s2_grants, sim.s2_calls, sim.config, sim.counters, detector, sequence=store)]
    for i, session in enumerate(string.ascii_lowercase[:5]):
        sim.deliver(call(f"10:00:0{i}", f"c{i}", "fs/read_file", session=session), NOW)
    sim.drain(NOW)
    sim.tick(NOW + LiveConfig().grace + timedelta(seconds=2))
    assert sorted(store) == ["acme/d", "acme/e"]


def test_micros_remembered_by_instant_stay_exact() -> None:
    """State codecs store instants with ``micros``, which remembers them: the value is the formula's
    for every instant, an equal instant in another time zone gives the same value, and a naive
    datetime still raises (it never equals an aware key)."""
    from detections.rulebase import _EPOCH, from_micros, micros

    base = datetime(2026, 12, 6, 3, 0, tzinfo=UTC)
    rng = random.Random(5)
    instants = [base + timedelta(microseconds=rng.randrange(-(10**12), 10**12)) for _ in range(500)]
    for _ in range(2):  # computed, then remembered
        for dt in instants:
            assert micros(dt) == (dt - _EPOCH) // timedelta(microseconds=1)
            assert from_micros(micros(dt)) == dt
            other_zone = dt.astimezone(timezone(timedelta(hours=-7)))
            assert micros(other_zone) == micros(dt)
    with pytest.raises(TypeError):
        micros(base.replace(tzinfo=None))
