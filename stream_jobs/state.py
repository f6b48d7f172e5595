"""Per-partition state of the decision job, backed by compacted changelog topics we write ourselves.

Why not Faust tables: every table write is one changelog message sent through Faust's producer
buffer, one at a time (about a tenth of the worker's CPU in ``BENCHMARKS.md``); recovering a
table after a rebalance on a backlog races with the stream and leaves gaps in the acked offsets
(faust-streaming#596: calls never decided, commits stuck); recovery after a SIGKILL can hang;
and a fresh cluster could miss a changelog's metadata for minutes. The state here is the same
idea, kept explicitly:

* one :class:`ChangelogStore` (a ``str -> bytes`` mapping) per table and partition, holding only
  that partition's keys. Writes are remembered as dirty keys and written to the table's changelog
  partition once per batch (the last value of each key wins, so a key written five times in a
  batch costs one message; a deleted key becomes a tombstone);
* :class:`ChangelogReader` loads a partition's stores from the changelog topics (beginning to the
  end offset) when the partition is first used after an assignment.

Stage 2's sequence store (``s2-seq``: the sequence rules' per-delegation state and the calls held
for them) is written once per batch rather than per event: :func:`deferred_stage2` makes the
store call the processor's ``flush`` just before it drains.

The agent sends the changelog writes of a batch together with the batch's outputs and waits for
all of them before the batch is acked, so an offset is committed only after the state and outputs
it produced are on the broker (at-least-once; the processors ignore redelivered events).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from detections.live import LiveConfig, LiveCounters, Stage2
from detections.policy import PolicyStore

log = logging.getLogger("scopewatch.stream.state")


class ChangelogStore(MutableMapping[str, bytes]):
    """A dict that remembers which keys changed since the last :meth:`drain`.

    ``before_drain``, if set, is called at the start of every :meth:`drain`: a processor that
    writes this store once per batch (:func:`deferred_stage2`) writes it then.
    """

    __slots__ = ("before_drain", "data", "dirty")

    def __init__(self, data: dict[str, bytes] | None = None) -> None:
        self.data: dict[str, bytes] = data if data is not None else {}
        self.dirty: set[str] = set()
        self.before_drain: Callable[[], None] | None = None

    def __getitem__(self, key: str) -> bytes:
        return self.data[key]

    def get(self, key: str, default: bytes | None = None) -> bytes | None:  # type: ignore[override]
        return self.data.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def __setitem__(self, key: str, value: bytes) -> None:
        self.data[key] = value
        self.dirty.add(key)

    def __delitem__(self, key: str) -> None:
        del self.data[key]
        self.dirty.add(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def items(self):  # type: ignore[no-untyped-def]
        return self.data.items()

    def drain(self) -> list[tuple[str, bytes | None]]:
        """The changed keys with their current value (``None``: deleted), forgetting them."""
        if self.before_drain is not None:
            self.before_drain()
        if not self.dirty:
            return []
        data = self.data
        out = [(key, data.get(key)) for key in self.dirty]
        self.dirty = set()
        return out


def deferred_stage2(
    partition: int,
    grants: MutableMapping[str, bytes],
    calls: MutableMapping[str, bytes],
    sequence: ChangelogStore,
    config: LiveConfig | None = None,
    counters: LiveCounters | None = None,
    *,
    approvals: MutableMapping[str, bytes] | None = None,
    policies: PolicyStore | None = None,
) -> Stage2:
    """A :class:`~detections.live.Stage2` over these stores whose sequence records are written once
    per batch: ``sequence`` calls its ``flush`` just before each drain (one encoding and at most one
    changelog message per changed delegation and batch, however many of its calls the batch had)."""
    stage = Stage2(
        partition,
        grants,
        calls,
        config,
        counters,
        sequence=sequence,
        deferred=True,
        approvals=approvals,
        policies=policies,
    )
    sequence.before_drain = stage.flush
    return stage


@dataclass
class LoadStats:
    records: int = 0
    tombstones: int = 0
    seconds: float = 0.0
    per_topic: dict[str, int] = field(default_factory=dict)
    ends: dict[str, int] = field(default_factory=dict)  # topic -> end offset the load read up to


class ChangelogReader:
    """Reads changelog partitions from the beginning to their end offset (no consumer group)."""

    def __init__(self, bootstrap: str, *, timeout: float = 120.0) -> None:
        self.bootstrap = bootstrap
        self.timeout = timeout

    async def load(self, topics: list[str], partition: int) -> tuple[dict[str, dict[str, bytes]], LoadStats]:
        """Each topic's partition ``partition`` folded into a dict (last value wins, tombstones delete)."""
        started = time.monotonic()
        # A consumer per load: loads happen once per partition and assignment, and nothing is left
        # open (or prefetching) between them.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        try:
            out, stats = await self._read(consumer, topics, partition, started)
        finally:
            await consumer.stop()
        stats.seconds = time.monotonic() - started
        return out, stats

    async def _read(
        self, consumer: AIOKafkaConsumer, topics: list[str], partition: int, started: float
    ) -> tuple[dict[str, dict[str, bytes]], LoadStats]:
        tps = [TopicPartition(topic, partition) for topic in topics]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: dict[str, dict[str, bytes]] = {topic: {} for topic in topics}
        stats = LoadStats()
        pending = {tp for tp in tps if ends[tp] > 0}
        for tp in list(pending):
            if await consumer.position(tp) >= ends[tp]:
                pending.discard(tp)
        while pending:
            if time.monotonic() - started > self.timeout:
                raise TimeoutError(f"changelog {sorted(map(str, pending))} not read within {self.timeout}s")
            batch = await consumer.getmany(*pending, timeout_ms=500, max_records=50_000)
            for tp, messages in batch.items():
                store = out[tp.topic]
                for m in messages:
                    if m.offset >= ends[tp]:
                        break  # written after we looked: ours to write, not to read
                    key = (m.key or b"").decode("utf-8")
                    if m.value is None:
                        store.pop(key, None)
                        stats.tombstones += 1
                    else:
                        store[key] = m.value
                    stats.records += 1
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        stats.per_topic = {topic: len(d) for topic, d in out.items()}
        stats.ends = {tp.topic: ends[tp] for tp in tps}
        return out, stats

    async def end_offsets(self, topics: list[str], partition: int) -> dict[str, int]:
        """The current end offset of each topic's partition ``partition``."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, partition) for topic in topics]
            ends = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
        return {tp.topic: ends[tp] for tp in tps}


class MemoryChangelogReader:
    """:class:`ChangelogReader` over in-memory topic logs (``stream_jobs.runner.MemoryBroker``)."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker

    async def load(self, topics: list[str], partition: int) -> tuple[dict[str, dict[str, bytes]], LoadStats]:
        out: dict[str, dict[str, bytes]] = {}
        stats = LoadStats()
        for topic in topics:
            store = out[topic] = {}
            for m in self.broker.logs.get((topic, partition), []):
                key = (m.key or b"").decode("utf-8")
                if m.value is None:
                    store.pop(key, None)
                    stats.tombstones += 1
                else:
                    store[key] = m.value
                stats.records += 1
        stats.per_topic = {topic: len(d) for topic, d in out.items()}
        stats.ends = await self.end_offsets(topics, partition)
        return out, stats

    async def end_offsets(self, topics: list[str], partition: int) -> dict[str, int]:
        return {topic: len(self.broker.logs.get((topic, partition), [])) for topic in topics}
