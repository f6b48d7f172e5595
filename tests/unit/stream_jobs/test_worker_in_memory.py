"""The aiokafka engine's decision job on the real runner with the in-memory adapter (no broker):
the story's final verdicts equal replay's, and a failed flush in the middle changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from schemas import Evidence, decode, encode, key_for, parse_event
from schemas.topics import topic_for
from scopewatch.replay import replay
from stream_jobs.runner import MemoryBroker, MemoryConsumer, MemoryProducer
from stream_jobs.runtime.settings import Settings
from stream_jobs.state import MemoryChangelogReader
from stream_jobs.worker import build_worker
from support.scenario import story


def finals(broker: MemoryBroker, settings: Settings) -> dict[str, tuple[str, str | None]]:
    latest: dict[str, Evidence] = {}
    for record in broker.read(settings.topics.evidence):
        ev = decode(record.value or b"")
        assert isinstance(ev, Evidence)
        if ev.final and (ev.call_id not in latest or ev.version > latest[ev.call_id].version):
            latest[ev.call_id] = ev
    return {c: (e.verdict, e.matched_grant_id) for c, e in latest.items()}


@pytest.mark.parametrize("fail_at", [set(), {0, 1}, {2, 5}, {4}])
def test_the_decision_job_on_the_memory_runner_equals_replay(tmp_path: Path, fail_at: set[int]) -> None:
    settings = Settings(
        home=tmp_path,
        topic_prefix="m.",
        partitions=2,
        worker_group="m-decisions",
        grace_seconds=0.3,
        sequence_slack_seconds=0.0,
        tick_seconds=0.05,
        worker_batch_size=7,  # many small batches, each committed on its own
    )
    events = [parse_event(e) for e in story("mem")]
    expected = {call.call_id: (d.verdict, d.matched_grant_id) for call, d in replay(enumerate(events)).decisions}
    broker = MemoryBroker(settings.partitions)
    for event in events:
        broker.append(topic_for(event, settings.topics), key_for(event).encode(), encode(event))
    topics = settings.topics
    inputs = [topics.tool_calls, topics.sessions, topics.calls_by_route, topics.grants, topics.approvals]
    consumer = MemoryConsumer(broker, settings.worker_group, inputs)
    runner, job, stats, ready = build_worker(settings, consumer, MemoryProducer(broker), MemoryChangelogReader(broker))
    stats.path = None
    job.assignor.last_counts = dict.fromkeys(inputs, settings.partitions)  # what the leader would send
    broker.fail_at = fail_at  # flushes that fail: nothing of them is sent, the batch is read again

    async def main() -> None:
        ready.set()
        task = asyncio.create_task(runner.run())
        for _ in range(400):
            await asyncio.sleep(0.025)
            if len(finals(broker, settings)) >= len(expected):
                break
        runner.stop()
        await task

    asyncio.run(main())
    assert finals(broker, settings) == expected
    assert len({v for v, _ in expected.values()}) == 10
    assert runner.counters.failed_flushes == len(fail_at)
    # every input record was committed, after its outputs were on the "broker"
    committed = broker.committed[settings.worker_group]
    assert all(
        committed.get(tp, 0) == broker.end(tp) for tp in broker.logs if tp[0] in (topics.tool_calls, topics.grants)
    )
