"""One runner for a stream job: the commit protocol, spelled out once.

Every cycle of :meth:`Runner.run`:

1. **take** a batch: up to ``max_records`` records, per partition, from the consumer;
2. **process** it: the job turns records into output messages and state changes (changelog
   writes), all returned as :data:`Message` tuples, and may also emit on a timer;
3. **produce** them through the :class:`Producer`, which sends per-partition record batches,
   **flushes and awaits the broker's acknowledgement of every one**;
4. **commit** the batch's input offsets (last offset + 1 per partition).

A failed flush aborts the commit: the runner then drops the batch's partitions' state (the job's
``reset``), seeks every partition of the batch back to the first offset it did not commit, waits
(backoff doubling to ``max_backoff``) and goes on; what the job had done in memory is rebuilt from
its changelogs, so the batch is processed again exactly as after a crash (at-least-once).

The runner also owns the rest of what a job's process does the same way: the partition
assigned/revoked hooks (a revocation waits for the batch in flight, which commits first), the
periodic stats file, a bounded stop (``scopewatch.runtime.StopTimer`` on SIGTERM/SIGINT), and the
Kafka-outage behaviour (``kafka_or_exit`` before start, ``limit_repeats`` on the library logs:
see :func:`serve`).

Adapters: :mod:`stream_jobs.kafka_adapter` (aiokafka, used by the decision worker) and
:class:`MemoryConsumer`/:class:`MemoryProducer` here (the real runner in unit tests, no broker).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("scopewatch.runner")

TP = tuple[str, int]
"""A topic partition as (topic, partition)."""
Message = tuple[str, bytes | None, bytes | None, int | None]
"""topic, key, value, partition (None: Kafka's default partitioner on the key)."""


class Record(Protocol):
    """What a consumer hands over per message (aiokafka's ``ConsumerRecord`` is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class Listener(Protocol):
    async def assigned(self, tps: set[TP]) -> None: ...
    async def revoked(self, tps: set[TP]) -> None: ...


class Consumer(Protocol):
    async def start(self, listener: Listener) -> None: ...
    async def getmany(self, timeout_ms: int, max_records: int) -> Mapping[TP, Sequence[Record]]: ...
    async def commit(self, offsets: Mapping[TP, int]) -> None: ...
    def seek(self, tp: TP, offset: int) -> None: ...
    def assignment(self) -> set[TP]: ...
    async def stop(self) -> None: ...


class Producer(Protocol):
    async def send_all(self, out: Sequence[Message]) -> dict[TP, int]:
        """Send and await the acknowledgement of every message; the end offset per partition written."""
        ...

    async def stop(self) -> None: ...


class Job(Protocol):
    """A stream job's part: pure processing between the runner's take and produce."""

    halted: bool
    """Set by the job (e.g. from ``assigned``) when it must process nothing more: the runner stops."""

    async def assigned(self, tps: set[TP]) -> None: ...
    async def revoked(self, tps: set[TP]) -> None: ...
    async def process(self, batch: Mapping[TP, Sequence[Record]], now: datetime) -> list[Message]: ...
    async def timer(self, assignment: set[TP], now: datetime) -> list[Message]: ...
    def flushed(self, ends: dict[TP, int]) -> None: ...
    def reset(self, tps: set[TP]) -> None:
        """Forget the state of these partitions (their batch was not committed)."""
        ...

    def stats(self) -> dict[str, Any]: ...


class StatsFile:
    """A JSON file of the job's stats, rewritten atomically (best effort, never fatal)."""

    def __init__(self, path: Path | None, collect: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.collect = collect

    def write(self) -> None:
        if self.path is None:
            return
        from scopewatch.stack.proc import atomic_write

        data = self.collect() | {"updated_at": datetime.now(UTC).isoformat()}
        try:
            atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True, default=str))
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


@dataclass
class RunnerConfig:
    max_records: int = 1000
    batch_ms: int = 20
    timer_seconds: float = 0.5
    stats_seconds: float = 1.0
    max_backoff: float = 5.0


@dataclass
class RunnerCounters:
    batches: int = 0
    records: int = 0
    messages: int = 0
    commits: int = 0
    failed_flushes: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Runner:
    """Runs one :class:`Job` over one :class:`Consumer` and one :class:`Producer` (module docstring)."""

    def __init__(
        self,
        consumer: Consumer,
        producer: Producer,
        job: Job,
        config: RunnerConfig | None = None,
        stats: StatsFile | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.job = job
        self.config = config or RunnerConfig()
        self.stats = stats
        self.clock = clock
        self.counters = RunnerCounters()
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._backoff = 0.0

    # -- the consumer's rebalance hooks (the batch in flight finishes, and commits, first)

    async def assigned(self, tps: set[TP]) -> None:
        async with self._lock:
            await self.job.assigned(tps)
        if self.job.halted:
            self.stop()
        if self.stats is not None:
            self.stats.write()

    async def revoked(self, tps: set[TP]) -> None:
        async with self._lock:
            await self.job.revoked(tps)

    # -- the loop

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """Until :meth:`stop` (or the job halts): take, process, produce and await, commit."""
        await self.consumer.start(self)
        cfg = self.config
        next_timer = time.monotonic() + cfg.timer_seconds
        next_stats = time.monotonic()
        try:
            while not self._stop.is_set():
                batch = await self.consumer.getmany(cfg.batch_ms, cfg.max_records)
                if self._stop.is_set() or self.job.halted:
                    break  # a halted job judges nothing more; these records are read again later
                mono = time.monotonic()
                timer_due = mono >= next_timer
                if batch or timer_due:
                    await self.cycle(batch, timer_due)
                    if timer_due:
                        next_timer = mono + cfg.timer_seconds
                if mono >= next_stats and self.stats is not None:
                    self.stats.write()
                    next_stats = mono + cfg.stats_seconds
                if self._backoff:
                    await asyncio.wait([asyncio.ensure_future(self._stop.wait())], timeout=self._backoff)
        finally:
            await self.close()

    async def cycle(self, batch: Mapping[TP, Sequence[Record]], timer: bool = False) -> bool:
        """One cycle over one batch; False when its flush failed (nothing committed, seeked back)."""
        async with self._lock:
            # records of partitions revoked while this batch was fetched are not ours to process
            held = self.consumer.assignment()
            batch = {tp: records for tp, records in batch.items() if records and tp in held}
            now = self.clock()
            out = await self.job.process(batch, now) if batch else []
            if timer:
                out += await self.job.timer(held, now)
            try:
                ends = await self.producer.send_all(out)
            except Exception as exc:  # noqa: BLE001 - any failed flush: nothing is committed
                self._flush_failed(batch, exc)
                return False
            self.job.flushed(ends)
            offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
            if offsets:
                await self.consumer.commit(offsets)
                self.counters.commits += 1
            self.counters.batches += 1
            self.counters.records += sum(map(len, batch.values()))
            self.counters.messages += len(out)
            self._backoff = 0.0
            return True

    def _flush_failed(self, batch: Mapping[TP, Sequence[Record]], exc: Exception) -> None:
        self.counters.failed_flushes += 1
        self._backoff = min(self.config.max_backoff, max(0.25, self._backoff * 2))
        tps = set(batch)
        # the job's state of every held partition may hold effects of unsent writes (a timer
        # touches partitions without input): forget all of it, reload from the changelogs
        self.job.reset(tps | self.consumer.assignment())
        for tp, records in batch.items():
            self.consumer.seek(tp, records[0].offset)
        log.warning(
            "flush failed (%s: %s): nothing committed; %d partitions seeked back, retrying in %.2fs",
            type(exc).__name__,
            exc,
            len(tps),
            self._backoff,
        )

    async def close(self) -> None:
        try:
            await self.consumer.stop()
        finally:
            await self.producer.stop()


# ----------------------------------------------------------------------------- in memory


@dataclass(frozen=True)
class MemoryRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class MemoryBroker:
    """Topics as lists of records per partition, and committed offsets per group (unit tests)."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.logs: dict[TP, list[MemoryRecord]] = {}
        self.committed: dict[str, dict[TP, int]] = {}
        self.fail_sends = 0
        """The next this many ``send_all`` calls raise (a broker that went away)."""
        self.fail_at: set[int] = set()
        """These ``send_all`` calls (numbered from 0 over every producer) raise."""
        self.sends = 0

    def append(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> int:
        if partition is None:
            from schemas.topics import partition_for

            partition = partition_for(key or b"", self.partitions)
        log_ = self.logs.setdefault((topic, partition), [])
        log_.append(MemoryRecord(topic, partition, len(log_), key, value))
        return partition

    def read(self, topic: str) -> list[MemoryRecord]:
        return [r for (t, _), records in sorted(self.logs.items()) if t == topic for r in records]

    def end(self, tp: TP) -> int:
        return len(self.logs.get(tp, ()))


class MemoryConsumer:
    """A group member of one process: holds the partitions it is given by :meth:`rebalance`."""

    def __init__(self, broker: MemoryBroker, group: str, topics: Iterable[str]) -> None:
        self.broker = broker
        self.group = group
        self.topics = list(topics)
        self.positions: dict[TP, int] = {}
        self.listener: Listener | None = None
        self.stopped = False

    async def start(self, listener: Listener) -> None:
        self.listener = listener
        await self.rebalance({(t, p) for t in self.topics for p in range(self.broker.partitions)})

    async def rebalance(self, tps: set[TP]) -> None:
        assert self.listener is not None
        old = set(self.positions)
        await self.listener.revoked(old)
        committed = self.broker.committed.setdefault(self.group, {})
        self.positions = {tp: committed.get(tp, 0) for tp in tps}
        await self.listener.assigned(set(tps))

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TP, list[MemoryRecord]]:
        out: dict[TP, list[MemoryRecord]] = {}
        left = max_records
        for tp, position in sorted(self.positions.items()):
            records = self.broker.logs.get(tp, [])[position : position + left]
            if records:
                out[tp] = records
                self.positions[tp] = position + len(records)
                left -= len(records)
            if left <= 0:
                break
        if not out:
            await asyncio.sleep(timeout_ms / 1000)
        return out

    async def commit(self, offsets: Mapping[TP, int]) -> None:
        self.broker.committed.setdefault(self.group, {}).update(offsets)

    def seek(self, tp: TP, offset: int) -> None:
        self.positions[tp] = offset

    def assignment(self) -> set[TP]:
        return set(self.positions)

    async def stop(self) -> None:
        self.stopped = True


class MemoryProducer:
    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.sent = 0

    async def send_all(self, out: Sequence[Message]) -> dict[TP, int]:
        self.broker.sends += 1
        if self.broker.sends - 1 in self.broker.fail_at:
            raise ConnectionError("broker unreachable")
        if self.broker.fail_sends:
            self.broker.fail_sends -= 1
            raise ConnectionError("broker unreachable")
        ends: dict[TP, int] = {}
        for topic, key, value, partition in out:
            p = self.broker.append(topic, key, value, partition)
            ends[(topic, p)] = self.broker.end((topic, p))
        self.sent += len(out)
        return ends

    async def stop(self) -> None:
        return None
