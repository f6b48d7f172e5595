"""Stage 2 asks Cedar ahead for a batch of calls (``Stage2.prepare``) without changing a verdict.

The same internal messages (made by a real stage 1 from sessions and calls) go through two stage-2
processors in the same batches: one prepared before each batch, one not. Their evidence must be the
same record for record (every version, provisional and final), while the prepared one asks Cedar
once per delegation and policy set per batch instead of once per call. The scenarios mix
delegations with and without policies, a grant naming a policy that has no version yet at some
calls (fail closed, Cedar not asked), a second policy version published between batches (an
outcome asked ahead with another version must not be taken), approval tools, duplicates and
terminal attributions (unbound sessions).
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import cedarpy
import pytest

from detections.live import Stage1, Stage2
from detections.live.common import LiveConfig, LiveCounters, Output
from detections.policy import PolicyStore
from schemas import Evidence, GrantIssued, PolicyPublished, SessionBound, ToolCall

T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
V1 = """
permit(principal, action == Action::"call", resource) when { context.attested || context.hour >= 0 };
forbid(principal, action, resource) when { context.labels.contains("restricted") };
"""
V2 = "permit(principal, action, resource) unless { context.arguments has x && context.arguments.x == 2 };"
LABELS = {"restricted": ["file:/data/restricted/*"]}


def _scenario(seed: int) -> tuple[list[Any], list[PolicyPublished], list[ToolCall]]:
    rng = random.Random(seed)

    def eid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128)))

    facts: list[Any] = []
    policies = [
        PolicyPublished(
            event_id=eid(),
            event_time=T0 - timedelta(days=1),
            tenant="acme",
            policy_id="data",
            version="v1",
            cedar=V1,
            labels=LABELS,
            published_by="t",
        ),
        PolicyPublished(  # applies to calls from T0 + 30 min on; published between batches
            event_id=eid(),
            event_time=T0 + timedelta(minutes=30),
            tenant="acme",
            policy_id="data",
            version="v2",
            cedar=V2,
            published_by="t",
        ),
    ]
    for d in range(6):
        facts.append(
            SessionBound(
                event_id=eid(),
                event_time=T0 - timedelta(hours=1),
                tenant="acme",
                session_id=f"s{d}",
                principal=f"u{d}",
                agent_id=f"a{d % 2}",
                valid_from=T0 - timedelta(hours=1),
            )
        )
        facts.append(
            GrantIssued(
                event_id=eid(),
                event_time=T0 - timedelta(hours=1),
                tenant="acme",
                grant_id=f"g{d}",
                principal=f"u{d}",
                agent_id=f"a{d % 2}",
                tools=["fs/*", "db/*"],
                resources=["file:/data/*", "db:*"],
                not_before=T0 - timedelta(hours=1),
                granted_by=f"u{d}",
                # d 0-2: the policy; d 3: a policy never published (fail closed); d 4: the policy and
                # an approval tool; d 5: none
                policies=[["data"], ["data"], ["data"], ["missing"], ["data"], []][d],
                approval_tools=["db/write*"] if d == 4 else [],
            )
        )
    calls = []
    for i in range(120):
        d = rng.randrange(7)  # 6: a session never bound (terminal attribution)
        server, tool = rng.choice([("fs", "read_file"), ("db", "query"), ("db", "write_rows")])
        calls.append(
            ToolCall(
                event_id=eid(),
                event_time=T0 + timedelta(seconds=rng.randrange(3600)),
                tenant="acme",
                call_id=f"c{i}",
                session_id=f"s{d}",
                server=server,
                tool=tool,
                arguments={"x": rng.choice([1, 2, 2.5])},
                resources=[rng.choice(["file:/data/a.txt", "file:/data/restricted/b.csv", "db:dev"])],
                transport="sdk",
            )
        )
    calls += [c.model_copy() for c in rng.sample(calls, 15)]  # duplicates
    rng.shuffle(calls)
    return facts, policies, calls


class _Counted:
    """Counts ``cedarpy.is_authorized_batch`` calls (the real function still answers)."""

    def __init__(self) -> None:
        self.calls = 0
        self.requests = 0
        self.real = cedarpy.is_authorized_batch

    def __call__(self, requests: list[Any], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.requests += len(requests)
        return self.real(requests, *args, **kwargs)


def _run(seed: int, batch: int, prepared: bool, counted: _Counted) -> tuple[list[Evidence], int, dict[str, int]]:
    facts, policies, calls = _scenario(seed)
    config = LiveConfig()
    counters = LiveCounters()
    store = PolicyStore()
    store.add(policies[0])
    s1 = Stage1(0, {}, {}, config, counters)
    s2 = Stage2(0, {}, {}, config, counters, sequence={}, approvals={}, policies=store)
    evidence: list[Evidence] = []

    def collect(out: Output) -> list[tuple[str, bytes]]:
        evidence.extend(out.evidence)
        return [(f.route, f.payload) for f in out.forwards]

    for fact in facts:
        if isinstance(fact, SessionBound):
            collect(s1.on_fact(fact, NOW))
        else:
            collect(s2.on_fact(fact, NOW))
    messages: list[tuple[str, bytes]] = []
    for call in calls:
        messages += collect(s1.on_call(call, NOW))
    before = counted.calls
    now = NOW
    for n, start in enumerate(range(0, len(messages), batch)):
        if n == 2:  # the second policy version arrives between batches
            collect(s2.on_policy(policies[1], now))
        chunk = messages[start : start + batch]
        if prepared:
            s2.prepare(chunk)
        for route, payload in chunk:
            assert not collect(s2.on_message(route, payload, now))
        now += timedelta(milliseconds=100)
    collect(s2.advance(now + config.grace + timedelta(seconds=1)))
    return evidence, counted.calls - before, counters.counts


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch", [1, 7, 50])
def test_prepared_batches_give_the_same_evidence_with_fewer_cedar_calls(
    seed: int, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = _Counted()
    monkeypatch.setattr(cedarpy, "is_authorized_batch", counted)
    plain, plain_calls, _ = _run(seed, batch, False, counted)
    ahead, ahead_calls, counts = _run(seed, batch, True, counted)
    assert ahead == plain
    verdicts = {e.verdict for e in plain}
    assert {"in_scope", "out_of_policy"} <= verdicts, verdicts
    assert counts.get("stage2_policy_checks_ahead", 0) > 0
    # one request batch per delegation and policy set (4 delegations ask Cedar, 2 policy versions)
    if batch == 50:
        assert ahead_calls < plain_calls / 2, (ahead_calls, plain_calls)
    elif batch > 1:
        assert ahead_calls < plain_calls, (ahead_calls, plain_calls)


def test_no_policy_grants_ask_nothing_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """A route whose grants name no policy is not parsed or asked for (only a store lookup)."""
    counted = _Counted()
    monkeypatch.setattr(cedarpy, "is_authorized_batch", counted)
    store = PolicyStore()
    facts, policies, calls = _scenario(1)
    store.add(policies[0])
    config, counters = LiveConfig(), LiveCounters()
    s1 = Stage1(0, {}, {}, config, counters)
    s2 = Stage2(0, {}, {}, config, counters, sequence={}, approvals={}, policies=store)
    for fact in facts:
        if isinstance(fact, SessionBound):
            s1.on_fact(fact, NOW)
        elif not fact.policies and not fact.approval_tools:
            s2.on_fact(fact, NOW)
    messages = [(f.route, f.payload) for c in calls for f in s1.on_call(c, NOW).forwards]
    s2.prepare(messages)
    assert counted.calls == 0
    assert counters.counts.get("stage2_policy_checks_ahead", 0) == 0
