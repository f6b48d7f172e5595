"""The sink's held raw topics (``SinkConfig.raw_seconds``) on the real runner over the in-memory broker:
the fast topic flushed every batch, the others held and flushed less often, each flush one batch whose
offsets alone are committed after it, and a refused commit redone with exactly the flushed ranges."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from stream_jobs.runner import TP, MemoryBroker, MemoryConsumer, Runner
from stream_jobs.runtime.settings import Settings
from stream_jobs.service import sink_config
from stream_jobs.sink import Batch, ClickHouseSink, SinkConfig


class Recording:
    """The sink's output as a record of what each flush wrote (ranges and tokens), in order."""

    def __init__(self) -> None:
        self.flushes: list[dict[str, Any]] = []
        self.written: dict[TP, int] = {}
        """Per partition, the end of what has been written so far."""

    async def flush(self, out: Sequence[Batch]) -> dict[TP, int]:
        for batch in out:
            self.flushes.append(batch.intent())
            for tp, end in batch.offsets().items():
                self.written[tp] = max(self.written.get(tp, 0), end)
        return {}

    async def committed(self, offsets: Mapping[TP, int]) -> None:
        return None

    async def stop(self) -> None:
        return None


def _sink(
    broker: MemoryBroker, raw_seconds: float, batch_rows: int = 1000, backlog_rows: int = 0, backlog_seconds: float = 0
) -> tuple[ClickHouseSink, Runner[Batch], Recording]:
    config = SinkConfig(
        bootstrap="",
        topics=["ev", "raw"],
        group="g",
        batch_rows=batch_rows,
        batch_seconds=0.01,
        lag_interval=60.0,
        raw_seconds=raw_seconds,
        backlog_rows=backlog_rows,
        backlog_seconds=backlog_seconds,
        backlog_idle_ms=50,
        fast_topics=frozenset({"ev"}),
    )
    sink = ClickHouseSink(config, writer=None)  # type: ignore[arg-type]  # the output below writes nothing
    consumer = MemoryConsumer(broker, "g", ["ev", "raw"])
    output = Recording()
    runner = Runner(consumer, output, sink, sink.new_runner(consumer).config)  # type: ignore[arg-type]
    sink.runner, sink._consumer = runner, consumer  # type: ignore[assignment]
    real_commit = consumer.commit

    async def commit(offsets: Mapping[TP, int]) -> None:
        for tp, end in offsets.items():  # commit after write: never past what a flush wrote
            assert end <= output.written.get(tp, 0), (tp, end, output.written)
        await real_commit(offsets)

    consumer.commit = commit  # type: ignore[method-assign]
    return sink, runner, output


def _ranges(flush: dict[str, Any], topic: str) -> list[tuple[int, int, int]]:
    return [(p, a, b) for t, p, a, b in flush["ranges"] if t == topic]


def test_raw_topics_are_held_and_flushed_less_often_with_their_offsets_committed_only_after() -> None:
    broker = MemoryBroker(partitions=2)
    sink, runner, output = _sink(broker, raw_seconds=0.3)

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        for i in range(60):  # 1.2 s: one record per topic every 20 ms
            broker.append("ev", None, b"x", i % 2)
            broker.append("raw", None, b"x", i % 2)
            await asyncio.sleep(0.02)
        sink.stop()
        await task

    asyncio.run(main())
    with_ev = [f for f in output.flushes if _ranges(f, "ev")]
    with_raw = [f for f in output.flushes if _ranges(f, "raw")]
    assert len(with_ev) >= 10  # evidence every batch
    assert 2 <= len(with_raw) <= 6, len(with_raw)  # the raw topic about every 0.3 s, and at the stop
    for topic in ("ev", "raw"):  # every record flushed exactly once, in order
        for p in (0, 1):
            spans = sorted((a, b) for f in output.flushes for q, a, b in _ranges(f, topic) if q == p)
            assert spans[0][0] == 0 and spans[-1][1] == 29
            assert all(nxt[0] == prev[1] + 1 for prev, nxt in itertools.pairwise(spans)), spans
    assert broker.committed["g"] == {("ev", 0): 30, ("ev", 1): 30, ("raw", 0): 30, ("raw", 1): 30}
    assert sink.counters["dead_letters"] == 120  # every record became a row (here: a dead letter)


def test_a_refused_commit_redoes_exactly_the_flushed_batch_held_records_included() -> None:
    broker = MemoryBroker(partitions=1)
    for _ in range(3):
        broker.append("raw", None, b"x", 0)
    sink, runner, output = _sink(broker, raw_seconds=0.2)

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        await asyncio.sleep(0.1)
        assert output.flushes == [] and not broker.committed.get("g")  # held, not committed
        await asyncio.sleep(0.15)
        broker.fail_commits = 1  # the commit of the flush below is refused (a rebalance)
        broker.append("ev", None, b"x", 0)
        broker.append("ev", None, b"x", 0)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if broker.committed.get("g"):
                break
        sink.stop()
        await task

    asyncio.run(main())
    first, again = output.flushes[:2]
    assert first["ranges"] == [["ev", 0, 0, 1], ["raw", 0, 0, 2]]  # the held records went with the batch
    assert again == first  # redone exactly: the same ranges, so the same tokens
    assert runner.counters.redos == 1
    assert broker.committed["g"] == {("ev", 0): 2, ("raw", 0): 3}


def test_without_raw_seconds_every_topic_is_flushed_every_batch() -> None:
    broker = MemoryBroker(partitions=1)
    sink, runner, output = _sink(broker, raw_seconds=0.0)

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        for _ in range(10):
            broker.append("ev", None, b"x", 0)
            broker.append("raw", None, b"x", 0)
            await asyncio.sleep(0.02)
        sink.stop()
        await task

    asyncio.run(main())
    assert all(_ranges(f, "raw") for f in output.flushes) and len(output.flushes) >= 5
    assert broker.committed["g"] == {("ev", 0): 10, ("raw", 0): 10}


def _sizes(output: Recording) -> list[int]:
    return [sum(b - a + 1 for _t, _p, a, b in f["ranges"]) for f in output.flushes]


def test_while_behind_batches_grow_to_backlog_rows_and_shrink_back_once_caught_up() -> None:
    broker = MemoryBroker(partitions=1)
    for _ in range(100):
        broker.append("ev", None, b"x", 0)
    sink, runner, output = _sink(broker, raw_seconds=0.0, batch_rows=5, backlog_rows=20)

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        while broker.committed.get("g", {}).get(("ev", 0)) != 100:
            await asyncio.sleep(0.01)
        assert runner.config.max_records == 5  # the last batch did not fill: back to batch_rows
        for _ in range(3):
            broker.append("ev", None, b"x", 0)
        while broker.committed["g"][("ev", 0)] != 103:
            await asyncio.sleep(0.01)
        sink.stop()
        await task

    asyncio.run(main())
    sizes = _sizes(output)
    assert sizes[0] == 5 and sizes[1:5] == [20, 20, 20, 20], sizes  # full, so behind: bigger batches
    assert sizes[5:] == [15, 3], sizes  # then what was left, and a small batch at batch_rows again
    assert max(sizes) == 20 and sum(sizes) == 103


def test_while_behind_a_batch_fills_past_batch_seconds_until_backlog_rows_or_caught_up() -> None:
    """A backlog's fetches bring a few records each (as a broker does, ~50,000 rows a second here): with
    ``batch_seconds`` alone a backlog batch took what came within it, far below ``backlog_rows``; with
    ``backlog_seconds`` it fills on to ``backlog_rows``, and stops at the first fetch that brings nothing
    (caught up) rather than waiting ``backlog_seconds`` out."""
    broker = MemoryBroker(partitions=1)
    for _ in range(100):
        broker.append("ev", None, b"x", 0)
    sink, runner, output = _sink(broker, raw_seconds=0.0, batch_rows=5, backlog_rows=40, backlog_seconds=30.0)
    sink.config.batch_seconds = 0.05
    fetch = runner.consumer.getmany

    async def three_per_fetch(timeout_ms: int, max_records: int) -> Any:
        await asyncio.sleep(0.01)
        return await fetch(timeout_ms, min(max_records, 3))

    runner.consumer.getmany = three_per_fetch  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        while broker.committed.get("g", {}).get(("ev", 0)) != 100:
            await asyncio.sleep(0.01)
        sink.stop()
        await task

    started = time.monotonic()
    asyncio.run(asyncio.wait_for(main(), 20))
    assert time.monotonic() - started < 10  # the last batch did not wait out backlog_seconds
    assert _sizes(output) == [5, 40, 40, 15]  # full, so behind: filled to backlog_rows; then what was left
    assert runner.config.max_records == 5 and runner.config.fill_idle_ms == 0  # caught up: back to batch_rows


def test_a_flush_writes_evidence_before_the_raw_tables() -> None:
    """A batch carrying held raw rows makes its evidence visible first (``evidence_current`` reads it)."""
    batch = Batch()
    for offset, table in enumerate(["tool_calls", "dead_letters", "evidence", "tool_results"]):
        batch.add(table, (), "t", 0, offset)
    assert batch.units() == ["evidence", "tool_calls", "dead_letters", "tool_results"]


def test_the_service_holds_every_topic_but_evidence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCOPEWATCH_SINK_CRASH_AT", raising=False)
    settings = Settings(home=tmp_path)
    config = sink_config(settings)
    assert config.raw_seconds == 2.0 and config.backlog_rows == 150_000 and config.backlog_seconds == 2.0
    assert config.backlog_idle_ms == max(500, 5 * settings.sink_fetch_wait_ms)
    assert config.fast_topics == frozenset({settings.topics.evidence})
    assert set(config.topics) - config.fast_topics  # the raw topics: held
    off = sink_config(Settings(home=tmp_path, sink_raw_seconds=0, sink_backlog_rows=0))
    assert off.raw_seconds == 0 and off.backlog_rows == 0
