"""The runner's commit protocol on the in-memory adapter: outputs before commits, a failed flush
commits nothing and the batch is processed again from the job's last durable state."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from stream_jobs.runner import (
    TP,
    MemoryBroker,
    MemoryConsumer,
    MemoryProducer,
    Message,
    Record,
    Runner,
    RunnerConfig,
)


class Counting:
    """Counts values per key; its state is a changelog topic written with every batch."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.halted = False
        self.state: dict[int, dict[bytes, int]] = {}
        self.events: list[str] = []

    def _load(self, p: int) -> dict[bytes, int]:
        if p not in self.state:
            self.state[p] = {r.key or b"": int(r.value or b"0") for r in self.broker.logs.get(("counts", p), [])}
            self.events.append(f"load {p}")
        return self.state[p]

    async def assigned(self, tps: set[TP]) -> None:
        self.events.append(f"assigned {sorted(tps)}")

    async def revoked(self, tps: set[TP]) -> None:
        for _, p in tps:
            self.state.pop(p, None)

    async def process(self, batch: Mapping[TP, Sequence[Record]], now: datetime) -> list[Message]:
        out: list[Message] = []
        for (_, p), records in batch.items():
            state = self._load(p)
            for r in records:
                key = r.key or b""
                state[key] = state.get(key, 0) + 1
                out.append(("out", key, r.value, p))
            out += [("counts", k, str(v).encode(), p) for k, v in state.items()]
        return out

    async def timer(self, assignment: set[TP], now: datetime) -> list[Message]:
        return []

    def flushed(self, ends: dict[TP, int]) -> None:
        self.events.append("flushed")

    def reset(self, tps: set[TP]) -> None:
        for _, p in tps:
            self.state.pop(p, None)

    def stats(self) -> dict[str, Any]:
        return {}


def run_until(runner: Runner, done: Any) -> None:
    async def main() -> None:
        task = asyncio.create_task(runner.run())
        for _ in range(500):
            await asyncio.sleep(0.005)
            if done():
                break
        runner.stop()
        await task

    asyncio.run(main())


def test_outputs_are_acknowledged_before_offsets_are_committed() -> None:
    broker = MemoryBroker(partitions=2)
    for i in range(10):
        broker.append("in", f"k{i % 3}".encode(), str(i).encode(), i % 2)
    job = Counting(broker)
    consumer = MemoryConsumer(broker, "g", ["in"])
    runner = Runner(consumer, MemoryProducer(broker), job, RunnerConfig(max_records=4, batch_ms=1))

    commits: list[dict[TP, int]] = []
    real_commit = consumer.commit

    async def commit(offsets: Mapping[TP, int]) -> None:
        # at each commit, every output of the committed records is already on the broker
        assert len(broker.read("out")) >= sum(offsets.values())
        commits.append(dict(offsets))
        await real_commit(offsets)

    consumer.commit = commit  # type: ignore[method-assign]
    run_until(runner, lambda: broker.committed.get("g", {}).get(("in", 1)) == 5)
    assert broker.committed["g"] == {("in", 0): 5, ("in", 1): 5}
    assert len(broker.read("out")) == 10
    assert len(commits) >= 3  # batches of at most 4 records
    assert consumer.stopped


def test_a_failed_flush_commits_nothing_and_the_batch_is_processed_again() -> None:
    broker = MemoryBroker(partitions=1)
    for key in (b"a", b"a", b"b"):
        broker.append("in", key, b"x", 0)
    job = Counting(broker)
    broker.fail_sends = 1
    runner = Runner(MemoryConsumer(broker, "g", ["in"]), MemoryProducer(broker), job, RunnerConfig(batch_ms=1))
    run_until(runner, lambda: broker.committed.get("g", {}).get(("in", 0)) == 3)
    assert runner.counters.failed_flushes == 1
    assert broker.committed["g"] == {("in", 0): 3}
    # the state the failed batch built in memory was dropped and reloaded: counts are not doubled
    final = {r.key: r.value for r in broker.read("counts")}
    assert final == {b"a": b"2", b"b": b"1"}
    assert job.events.count("load 0") == 2
    assert len(broker.read("out")) == 3  # nothing of the failed flush reached the broker


def test_a_halted_job_processes_nothing() -> None:
    broker = MemoryBroker(partitions=1)
    broker.append("in", b"a", b"x", 0)
    job = Counting(broker)

    async def refuse(tps: set[TP]) -> None:
        job.halted = True

    job.assigned = refuse  # type: ignore[method-assign]
    runner = Runner(MemoryConsumer(broker, "g", ["in"]), MemoryProducer(broker), job, RunnerConfig(batch_ms=1))
    run_until(runner, lambda: False)
    assert runner.stopping
    assert broker.read("out") == []
    assert not broker.committed.get("g")
