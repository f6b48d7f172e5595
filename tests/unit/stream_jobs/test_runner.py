"""The runner's commit protocol on the in-memory adapter: outputs before commits, a failed flush
commits nothing and the batch is processed again from the job's last durable state."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pytest

from stream_jobs.runner import (
    TP,
    Job,
    MemoryBroker,
    MemoryConsumer,
    MemoryProducer,
    Message,
    Record,
    Runner,
    RunnerConfig,
)


class Counting(Job[Message]):
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


class Batches(Job[Any]):
    """Outputs each cycle's batch as one item: (partition, first offset, last offset) per partition."""

    def __init__(self) -> None:
        self.halted = False
        self.resets = 0

    async def assigned(self, tps: set[TP]) -> None:
        return None

    async def revoked(self, tps: set[TP]) -> None:
        return None

    async def process(self, batch: Mapping[TP, Sequence[Record]], now: datetime) -> list[Any]:
        return [tuple(sorted((p, rs[0].offset, rs[-1].offset) for (_, p), rs in batch.items()))]

    async def timer(self, assignment: set[TP], now: datetime) -> list[Any]:
        return []

    def flushed(self, ends: dict[TP, int]) -> None:
        return None

    def reset(self, tps: set[TP]) -> None:
        self.resets += 1

    def stats(self) -> dict[str, Any]:
        return {}


class Store:
    """An output that is not Kafka (a database): it refuses the first ``failures`` flushes."""

    def __init__(self, consumer: MemoryConsumer, failures: int = 0) -> None:
        self.consumer = consumer
        self.failures = failures
        self.attempts: list[Any] = []
        self.written: list[Any] = []
        self.paused_while_refusing: list[set[TP]] = []
        self.commits: list[dict[TP, int]] = []

    async def flush(self, out: Sequence[Any]) -> dict[TP, int]:
        self.attempts.append(list(out))
        if self.failures:
            self.failures -= 1
            self.paused_while_refusing.append(set(self.consumer.paused))
            raise ConnectionError("store unavailable")
        self.written += out
        return {}

    async def committed(self, offsets: Mapping[TP, int]) -> None:
        self.commits.append(dict(offsets))

    async def stop(self) -> None:
        return None


def test_a_flush_retried_in_place_repeats_the_same_outputs_while_the_runner_holds_back() -> None:
    broker = MemoryBroker(partitions=2)
    for i in range(6):
        broker.append("in", None, str(i).encode(), i % 2)
    consumer = MemoryConsumer(broker, "g", ["in"])
    store = Store(consumer, failures=2)
    config = RunnerConfig(batch_ms=1, retry_in_place=True, min_backoff=0.01, max_backoff=0.02)
    job = Batches()
    runner = Runner(consumer, store, job, config)

    async def late_records() -> None:  # arrive while the store refuses: held back, taken after
        while not store.paused_while_refusing:
            await asyncio.sleep(0.001)
        broker.append("in", None, b"late", 0)

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        extra = asyncio.create_task(late_records())
        for _ in range(500):
            await asyncio.sleep(0.005)
            if broker.committed.get("g", {}).get(("in", 0)) == 4:
                break
        runner.stop()
        await asyncio.gather(task, extra)

    asyncio.run(main())
    first = [((0, 0, 2), (1, 0, 2))]
    assert store.attempts[:3] == [first, first, first]  # the same outputs each time, nothing new mixed in
    assert store.paused_while_refusing[1] == {("in", 0), ("in", 1)}  # held back from the first retry on
    assert store.written[0] == first[0] and store.written[1] == ((0, 3, 3),)
    assert store.commits == [{("in", 0): 3, ("in", 1): 3}, {("in", 0): 4}]
    assert runner.counters.retries == 2 and runner.counters.failed_flushes == 0 and job.resets == 0
    assert not runner.paused and not consumer.paused


def test_fill_takes_fetches_until_max_records() -> None:
    broker = MemoryBroker(partitions=2)
    for i in range(10):
        broker.append("in", None, b"x", i % 2)
    consumer = MemoryConsumer(broker, "g", ["in"])
    store = Store(consumer)
    runner = Runner(consumer, store, Batches(), RunnerConfig(max_records=7, batch_ms=1, fill_seconds=0.3))

    async def small_fetches(timeout_ms: int, max_records: int) -> Any:
        return await MemoryConsumer.getmany(consumer, timeout_ms, min(max_records, 2))

    consumer.getmany = small_fetches  # type: ignore[method-assign]
    run_until(runner, lambda: len(store.written) == 2)
    # fetches of at most 2 records (partition 0 first) up to 7, then the 3 left after 0.3 s
    assert store.written[:2] == [((0, 0, 4), (1, 0, 1)), ((1, 2, 4),)]


def test_an_exact_redo_and_a_refused_commit_take_exactly_the_same_ranges_again() -> None:
    broker = MemoryBroker(partitions=2)
    for i in range(10):
        broker.append("in", None, b"x", i % 2)
    consumer = MemoryConsumer(broker, "g", ["in"])
    store = Store(consumer)
    config = RunnerConfig(max_records=3, batch_ms=1, redo_uncommitted=True)
    runner = Runner(consumer, store, Batches(), config)
    runner.redo({("in", 1): (1, 2)})  # what a crashed flush's intent names
    broker.fail_commits = 2  # the redo's commit, then the next batch's

    run_until(runner, lambda: broker.committed.get("g") == {("in", 0): 5, ("in", 1): 5})
    assert store.written[0] == ((1, 1, 2),)  # only those offsets, though more were there
    # its commit is refused too (a redo is not redone); the next batch's commit is refused: redone exactly
    assert store.written[1] == store.written[2] == ((0, 0, 2),)
    assert runner.counters.commit_failures == 2 and runner.counters.redos == 1


class Holding(Job[Message]):
    """Holds every record until a timer tick releases it as an output (the pager's shape): commits
    only up to the oldest record still held, settles on revocation and on stop."""

    def __init__(self, room: int = 100) -> None:
        self.halted = False
        self.held: dict[TP, list[int]] = {}
        self.next: dict[TP, int] = {}
        self.in_flight: list[tuple[TP, int]] = []
        self.capacity = room
        self.events: list[str] = []

    def room(self) -> int:
        return self.capacity - sum(map(len, self.held.values()))

    async def assigned(self, tps: set[TP]) -> None:
        return None

    async def revoked(self, tps: set[TP]) -> None:
        self.events.append(f"revoked {sorted(tps)}")
        for tp in tps:
            self.held.pop(tp, None)
            self.next.pop(tp, None)

    async def process(self, batch: Mapping[TP, Sequence[Record]], now: datetime) -> list[Message]:
        for tp, records in batch.items():
            self.held.setdefault(tp, []).extend(r.offset for r in records)
            self.next[tp] = records[-1].offset + 1
        return []

    def _release(self, tps: set[TP] | None, every: bool) -> list[Message]:
        for tp, offsets in self.held.items():
            if offsets and (tps is None or tp in tps):
                self.in_flight += [(tp, o) for o in (offsets if every else offsets[:1])]
        return [("out", None, f"{tp[1]}:{o}".encode(), 0) for tp, o in self.in_flight]

    async def timer(self, assignment: set[TP], now: datetime) -> list[Message]:
        return self._release(None, every=False)

    def flushed(self, ends: dict[TP, int]) -> None:
        for tp, offset in self.in_flight:
            self.held[tp].remove(offset)
        self.in_flight = []

    def reset(self, tps: set[TP]) -> None:
        self.in_flight = []

    def to_commit(self, taken: dict[TP, int]) -> dict[TP, int]:
        return {tp: (min(self.held[tp]) if self.held.get(tp) else nxt) for tp, nxt in self.next.items()}

    def committed(self, offsets: Mapping[TP, int]) -> None:
        self.events.append(f"committed {sorted(offsets.items())}")

    async def revoking(self, tps: set[TP]) -> list[Message]:
        self.events.append(f"revoking {sorted(tps)}")
        return self._release(tps, every=True)

    async def drain(self) -> list[Message]:
        self.events.append("drain")
        return self._release(None, every=True)

    def stats(self) -> dict[str, Any]:
        return {}


def test_a_job_holding_records_commits_only_what_its_outputs_cover_and_settles_on_revoke_and_stop() -> None:
    broker = MemoryBroker(partitions=2)
    for i in range(8):
        broker.append("in", None, b"x", i % 2)
    consumer = MemoryConsumer(broker, "g", ["in"])
    job = Holding(room=3)
    runner = Runner(consumer, MemoryProducer(broker), job, RunnerConfig(batch_ms=1, timer_seconds=0.01))
    real_commit = consumer.commit

    async def commit(offsets: Mapping[TP, int]) -> None:
        out = {v.decode() for v in (r.value or b"" for r in broker.read("out"))}
        for (_, p), end in offsets.items():  # every committed record has its output on the broker
            assert all(f"{p}:{o}" in out for o in range(end)), (offsets, out)
        await real_commit(offsets)

    consumer.commit = commit  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        while len(broker.read("out")) < 3:  # room for 3: the rest waits, paused
            await asyncio.sleep(0.005)
        await consumer.rebalance({("in", 0)})  # partition 1 goes: its held records are settled first
        for _ in range(200):
            await asyncio.sleep(0.005)
        runner.stop()
        await task

    asyncio.run(main())
    assert job.events.index("revoking [('in', 0), ('in', 1)]") < job.events.index("revoked [('in', 0), ('in', 1)]")
    settled = job.events[job.events.index("revoking [('in', 0), ('in', 1)]") + 1]
    assert settled.startswith("committed") and "('in', 1)" in settled  # committed before it went
    assert job.events[-1] == "drain" and not any(job.held.values())
    # partition 0 whole; partition 1 up to where it was taken when it went; every output once
    assert broker.committed["g"] == {("in", 0): 4, ("in", 1): 3}
    assert sorted(r.value for r in broker.read("out")) == [b"0:0", b"0:1", b"0:2", b"0:3", b"1:0", b"1:1", b"1:2"]


def test_finish_on_stop_lands_the_batch_being_taken() -> None:
    for finish in (True, False):
        broker = MemoryBroker(partitions=1)
        for _ in range(3):
            broker.append("in", None, b"x", 0)
        consumer = MemoryConsumer(broker, "g", ["in"])
        store = Store(consumer)
        config = RunnerConfig(max_records=100, batch_ms=1, fill_seconds=0.3, finish_on_stop=finish)
        runner = Runner(consumer, store, Batches(), config)

        async def main(runner: Runner[Any]) -> None:
            task = asyncio.create_task(runner.run())
            await asyncio.sleep(0.1)  # the batch is being filled
            runner.stop()
            await task

        asyncio.run(main(runner))
        if finish:
            assert store.written == [((0, 0, 2),)] and broker.committed["g"] == {("in", 0): 3}
        else:  # read again after a restart
            assert store.written == [] and not broker.committed.get("g")


def test_deferred_commits_cover_only_flushed_outputs_and_come_less_often() -> None:
    """``commit_seconds``: one commit for many batches, each commit only of offsets whose outputs
    are on the broker; a stop commits what is pending."""
    broker = MemoryBroker(partitions=2)
    for i in range(40):
        broker.append("in", f"k{i % 3}".encode(), str(i).encode(), i % 2)
    job = Counting(broker)
    consumer = MemoryConsumer(broker, "g", ["in"])
    runner = Runner(consumer, MemoryProducer(broker), job, RunnerConfig(max_records=2, batch_ms=1, commit_seconds=60))
    commits: list[dict[TP, int]] = []
    real_commit = consumer.commit

    async def commit(offsets: Mapping[TP, int]) -> None:
        outs = {p: sum(1 for r in broker.read("out") if r.partition == p) for p in (0, 1)}
        for (_, p), offset in offsets.items():
            assert outs[p] >= offset  # every output of the committed records is already on the broker
        commits.append(dict(offsets))
        await real_commit(offsets)

    consumer.commit = commit  # type: ignore[method-assign]
    run_until(runner, lambda: len(broker.read("out")) == 40)
    assert runner.counters.batches >= 20  # batches of at most 2 records
    # the first batch's commit, then nothing for 60 s, then the stop's: two commits, not twenty
    assert len(commits) == 2
    assert broker.committed["g"] == {("in", 0): 20, ("in", 1): 20}


def test_a_job_may_shorten_the_commit_period() -> None:
    """``Job.commit_period``: the decision worker commits more often while other workers' finals wait for
    its commits (issue 16); a job answering 0 commits after every batch despite ``commit_seconds``."""
    broker = MemoryBroker(partitions=2)
    for i in range(40):
        broker.append("in", f"k{i % 3}".encode(), str(i).encode(), i % 2)

    class Eager(Counting):
        def commit_period(self, configured: float) -> float:
            assert configured == 60
            return 0.0

    consumer = MemoryConsumer(broker, "g", ["in"])
    runner = Runner(
        consumer, MemoryProducer(broker), Eager(broker), RunnerConfig(max_records=2, batch_ms=1, commit_seconds=60)
    )
    run_until(runner, lambda: len(broker.read("out")) == 40)
    assert runner.counters.commits >= 20  # one per batch of at most 2 records, not two in all


def test_a_revocation_commits_the_pending_offsets_of_the_revoked_partitions() -> None:
    broker = MemoryBroker(partitions=2)
    for i in range(8):
        broker.append("in", b"k", str(i).encode(), i % 2)
    job = Counting(broker)
    consumer = MemoryConsumer(broker, "g", ["in"])
    runner = Runner(consumer, MemoryProducer(broker), job, RunnerConfig(max_records=2, batch_ms=1, commit_seconds=60))

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        for _ in range(400):
            await asyncio.sleep(0.005)
            if len(broker.read("out")) == 8:
                break
        first = dict(broker.committed.get("g", {}))
        assert first != {("in", 0): 4, ("in", 1): 4}  # still pending: commits are deferred
        await consumer.rebalance({("in", 0)})  # partition 1 goes to another member
        assert broker.committed["g"][("in", 1)] == 4
        runner.stop()
        await task

    asyncio.run(main())
    assert broker.committed["g"] == {("in", 0): 4, ("in", 1): 4}


def test_deferred_commits_refuse_redo_uncommitted() -> None:
    broker = MemoryBroker(partitions=1)
    with pytest.raises(ValueError):
        Runner(
            MemoryConsumer(broker, "g", ["in"]),
            MemoryProducer(broker),
            Counting(broker),
            RunnerConfig(commit_seconds=1, redo_uncommitted=True),
        )


class SlowStore(Store):
    """A store whose every flush takes ``seconds`` (an insert of a big batch)."""

    def __init__(self, consumer: MemoryConsumer, seconds: float) -> None:
        super().__init__(consumer)
        self.seconds = seconds

    async def flush(self, out: Sequence[Any]) -> dict[TP, int]:
        await asyncio.sleep(self.seconds)
        return await super().flush(out)


@pytest.mark.parametrize("anchored", [True, False])
def test_the_fill_counts_from_the_previous_take_so_a_slow_flush_does_not_add_to_it(anchored: bool) -> None:
    """Records arrive all the time; each flush takes 0.2 s and the fill is 0.3 s. With the fill counted
    from the previous take, a batch is taken 0.3 s after the one before (its records waited at most the
    fill, then their flush); counted from the batch's first fetch, 0.5 s after (the flush, then a whole
    fill: rows waited 0.2 s longer)."""
    broker = MemoryBroker(partitions=1)
    consumer = MemoryConsumer(broker, "g", ["in"])
    store = SlowStore(consumer, 0.2)
    config = RunnerConfig(max_records=10_000, batch_ms=1, fill_seconds=0.3, fill_from_last_take=anchored)
    runner = Runner(consumer, store, Batches(), config)
    taken: list[float] = []
    take = runner.take

    async def timed_take(room: int | None = None) -> Any:
        batch = await take(room)
        if batch:
            taken.append(asyncio.get_running_loop().time())
        return batch

    runner.take = timed_take  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        while len(taken) < 5:
            broker.append("in", None, b"x", 0)
            await asyncio.sleep(0.005)
        runner.stop()
        await task

    asyncio.run(main())
    gaps = [b - a for a, b in itertools.pairwise(taken[1:])]
    if anchored:
        assert all(0.28 <= g <= 0.36 for g in gaps), gaps
    else:
        assert all(g >= 0.48 for g in gaps), gaps
