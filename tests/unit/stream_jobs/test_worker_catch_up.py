"""A worker that takes partitions over finalizes nothing before it has read what they already held.

The failure (seen in ``test_a_worker_killed_mid_story_loses_nothing`` runs): worker A decides a
call (provisional) and dies; a revocation of its grant reaches Kafka within grace; worker B takes
the partitions over after the call's deadline. B's first timer cycle finalized the call on what A
had stored (``in_scope``), and only then read the revocation: a wrong final verdict, corrected
by a late amendment. Replay says ``revoked_grant``: the fact was on the broker before the deadline.

With the catch-up hold (``stream_jobs.worker.CatchUp``) stage 2 marks nothing final until B has
read its inputs up to where they ended after the assignment (and stage 2's up to where they ended
once stage 1 had caught up): the revocation corrects the provisional verdict and the final one
equals replay, with no amendment.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from schemas import Evidence, decode, encode, key_for, parse_event
from schemas.topics import topic_for
from scopewatch.replay import replay
from stream_jobs.runner import MemoryBroker, MemoryConsumer, MemoryProducer, Runner
from stream_jobs.runtime.settings import Settings
from stream_jobs.state import MemoryChangelogReader
from stream_jobs.worker import build_worker
from support.scenario import bound, grant, revoke
from support.scenario import tool_call as call

T0 = datetime(2026, 11, 21, 10, 0, 10, tzinfo=UTC)


def _settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, topic_prefix="m.", partitions=1, worker_group="m-decisions", grace_seconds=15)


def _publish(broker: MemoryBroker, settings: Settings, events: list[dict[str, Any]]) -> None:
    for raw in events:
        event = parse_event(raw)
        broker.append(topic_for(event, settings.topics), key_for(event).encode(), encode(event))


def _worker(broker: MemoryBroker, settings: Settings, clock: list[datetime]) -> tuple[Runner[Any], Any]:
    topics = settings.topics
    inputs = [topics.tool_calls, topics.sessions, topics.calls_by_route, topics.grants, topics.approvals]
    consumer = MemoryConsumer(broker, settings.worker_group, inputs)
    runner, job, stats, ready = build_worker(settings, consumer, MemoryProducer(broker), MemoryChangelogReader(broker))
    stats.path = None
    runner.config.max_records = 1  # one record per cycle: the test orders timer cycles between them
    runner.config.batch_ms = 0
    runner.clock = lambda: clock[0]
    job.assignor.last_counts = dict.fromkeys(inputs, settings.partitions)
    ready.set()
    return runner, consumer


async def _until_idle(runner: Runner[Any]) -> None:
    for _ in range(100):
        batch = await runner.take()
        if not batch:
            return
        await runner.cycle(batch)
    raise AssertionError("the worker never caught up")


def _evidence(broker: MemoryBroker, settings: Settings) -> list[Evidence]:
    out = []
    for record in broker.read(settings.topics.evidence):
        ev = decode(record.value or b"")
        assert isinstance(ev, Evidence)
        out.append(ev)
    return out


def test_a_survivor_reads_the_facts_that_came_within_grace_before_finalizing(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    broker = MemoryBroker(1)
    clock = [T0]
    before = [
        bound("10:00:00", "s1", "alice@acme.example", "agent-1"),
        grant("10:00:00", "g1", "alice@acme.example", "agent-1", ["fs/read_*"]),
        call("10:00:10", "c1", "s1", "fs", "read_file"),
    ]
    within_grace = [revoke("10:00:05", "g1", "alice@acme.example", "agent-1")]
    expected = {c.call_id: d.verdict for c, d in replay(enumerate(map(parse_event, before + within_grace))).decisions}
    assert expected == {"c1": "revoked_grant"}

    async def main() -> None:
        runner_a, consumer_a = _worker(broker, settings, clock)
        await consumer_a.start(runner_a)
        _publish(broker, settings, before)
        await _until_idle(runner_a)
        await runner_a.cycle({}, timer=True)
        assert [(e.verdict, e.final) for e in _evidence(broker, settings)] == [("in_scope", False)]
        # worker A dies; the revocation reaches Kafka 5 s later, within grace; nobody reads it
        clock[0] = T0 + timedelta(seconds=5)
        _publish(broker, settings, within_grace)
        # worker B takes the partitions over after the call's deadline; its timer runs first
        clock[0] = T0 + timedelta(seconds=20)
        runner_b, consumer_b = _worker(broker, settings, clock)
        await consumer_b.start(runner_b)
        await runner_b.cycle({}, timer=True)
        assert not any(e.final for e in _evidence(broker, settings)), "final before the backlog was read"
        await _until_idle(runner_b)
        await runner_b.cycle({}, timer=True)

    asyncio.run(main())
    evidence = _evidence(broker, settings)
    finals = [e for e in evidence if e.final]
    assert [e.verdict for e in finals] == ["revoked_grant"], [(e.version, e.verdict, e.final, e.late) for e in evidence]
    assert not any(e.late for e in finals)


def test_the_hold_ends_under_steady_load(tmp_path: Path) -> None:
    """Records keep arriving while the survivor catches up: the hold's targets are fixed offsets,
    so it ends once what was there at the assignment is read (not when the inputs are empty)."""
    settings = _settings(tmp_path)
    broker = MemoryBroker(1)
    clock = [T0]
    _publish(
        broker,
        settings,
        [
            bound("10:00:00", "s1", "alice@acme.example", "agent-1"),
            grant("10:00:00", "g1", "alice@acme.example", "agent-1", ["fs/read_*"]),
            call("10:00:10", "c0", "s1", "fs", "read_file"),
        ],
    )

    async def main() -> None:
        runner, consumer = _worker(broker, settings, clock)
        await consumer.start(runner)
        await _until_idle(runner)  # c0 provisional, its deadline 15 s on
        clock[0] = T0 + timedelta(seconds=20)
        await consumer.rebalance(consumer.assignment())  # a rebalance: the hold again
        calls = (settings.topics.tool_calls, 0)
        _publish(broker, settings, [call("10:00:30", "c1", "s1", "fs", "read_file")])
        for i in range(2, 30):  # at every timer cycle one call waits unread: the inputs are never empty
            _publish(broker, settings, [call("10:00:30", f"c{i}", "s1", "fs", "read_file")])
            await runner.cycle(await runner.take())  # the oldest call waiting
            consumer.pause({calls})
            await _until_idle(runner)  # its forward to stage 2
            consumer.resume({calls})
            assert broker.end(calls) - consumer.positions[calls] == 1
            await runner.cycle({}, timer=True)

    asyncio.run(main())
    finals = {e.call_id: e.verdict for e in _evidence(broker, settings) if e.final}
    assert finals.get("c0") == "in_scope"
