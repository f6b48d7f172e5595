"""A tick during a rebalance must not take a revoked partition back.

aiokafka's consumer names its old partitions until the new assignment arrives. The timer ticked
every partition the consumer named, so a tick between the revocation and the new assignment took a
revoked stage-2 partition's kept state back as ours. When that partition came back after another
worker had owned it (and was SIGKILLed: test_a_worker_killed_mid_story_loses_nothing), its state
was used again without being read from the changelogs: the calls the other worker had left open
were unknown here and never became final (the story's ``c-tenant`` stayed provisional).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from stream_jobs.decisions import changelog_topic
from stream_jobs.runner import MemoryBroker, MemoryConsumer, MemoryProducer
from stream_jobs.runtime.settings import Settings
from stream_jobs.state import MemoryChangelogReader
from stream_jobs.worker import build_worker


def test_a_partition_owned_by_another_worker_meanwhile_is_read_again(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, topic_prefix="m.", partitions=2, worker_group="m-decisions")
    topics = settings.topics
    inputs = [topics.tool_calls, topics.sessions, topics.calls_by_route, topics.grants, topics.approvals]
    everything = {(t, p) for t in inputs for p in range(2)}
    ours = {(t, 1) for t in inputs}
    broker = MemoryBroker(2)
    consumer = MemoryConsumer(broker, settings.worker_group, inputs)
    _runner, job, _stats, ready = build_worker(
        settings, consumer, MemoryProducer(broker), MemoryChangelogReader(broker)
    )
    job.assignor.last_counts = dict.fromkeys(inputs, 2)
    loads = job.stage2.counters

    async def main() -> None:
        ready.set()
        now = datetime(2026, 11, 21, 10, tzinfo=UTC)
        await job.assigned(everything)
        await job.timer(everything, now)  # both stage-2 partitions loaded (empty)
        job.flushed({})
        assert loads["authorize_partition_loads"] == 2
        await job.revoked(everything)  # a second worker joins
        await job.timer(everything, now)  # the consumer still names its old partitions
        job.flushed({})
        await job.assigned(ours)
        # the other worker owns partition 0 and writes its state
        broker.append(changelog_topic(settings, "s2-calls"), b"route|call", b"its open call", 0)
        await job.revoked(ours)  # it is gone: everything comes back here
        await job.assigned(everything)
        await job.timer(everything, now)
        job.flushed({})

    asyncio.run(main())
    assert loads["authorize_partition_loads"] == 3  # partition 0 read again, partition 1 kept
    assert loads["authorize_partition_reuses"] == 1
    assert job.stage2.partitions[0].stores["s2-calls"].get("route|call") == b"its open call"
