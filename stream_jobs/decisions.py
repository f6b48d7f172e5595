"""The decision job's parts that do not depend on the engine running it.

Both engines (``SCOPEWATCH_WORKER_ENGINE``) run the same stages over the same per-partition state:

* ``aiokafka`` (default, :mod:`stream_jobs.worker`): the job is a :class:`DecisionJob` run by
  :class:`stream_jobs.runner.Runner` over an aiokafka consumer (``getmany`` batches, the
  co-partitioning assignor, static membership) and :class:`BatchProducer`; one cycle takes a batch
  of both stages' inputs, runs both, sends everything in per-partition record batches, awaits the
  acks and commits. Stage 2's ticks run in process (no tick messages).
* ``faust`` (:mod:`stream_jobs.app`): two Faust agents, each calling :meth:`StageRunner.run` on its
  ``take_events`` batches; ticks go through the internal topic.

:class:`StageRunner` runs one stage's processors (``detections.live``) over records: decode,
decide, write state, emit into its :class:`Sender`. Per-partition state is loaded from the stage's
changelog topics on first use after an assignment (``stream_jobs.state``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from detections.live import LiveConfig, LiveCounters, Output, Stage1, Stage2, tick_message
from detections.policy import PolicyStore
from schemas import (
    ApprovalDecided,
    CodecError,
    GrantIssued,
    GrantRevoked,
    PolicyPublished,
    SessionBound,
    SessionEnded,
    ToolCall,
    decode,
    encode,
)
from schemas.avro_writer import fast_encode
from schemas.topics import partition_for
from stream_jobs.assignor import CoPartitionedAssignor, check, describe
from stream_jobs.call_reader import call_reader
from stream_jobs.dead_letters import dead_letter_for
from stream_jobs.runtime.settings import Settings
from stream_jobs.state import ChangelogReader, ChangelogStore, deferred_stage2

log = logging.getLogger("scopewatch.stream")

EXIT_NOT_COPARTITIONED = 78  # EX_CONFIG: the worker refused an assignment that is not co-partitioned


class _Partition:
    """One partition of one stage: its stores, its processor, the last offset seen per input topic,
    and the end offset of each changelog partition as far as this worker knows it."""

    __slots__ = ("ends", "offsets", "proc", "stores")

    def __init__(self, proc: Any, stores: dict[str, ChangelogStore], ends: dict[str, int]) -> None:
        self.proc = proc
        self.stores = stores
        self.offsets: dict[str, int] = {}
        self.ends = ends


class PolicyFeed:
    """``consent.policies`` read whole by every worker (DESIGN: a small topic, like a global table).

    Its own consumer without a group: every partition assigned, read from the beginning at each
    start (nothing is committed, so a restart restores every policy), then polled before each batch
    of stage 2 so policies are applied in topic order before the calls of that batch are decided.
    New policies go into :attr:`store` (shared by the worker's stage-2 partitions); :meth:`poll`
    returns them, the caller re-judges the calls they may change. A record that does not decode is
    counted and logged (``policy_decode_errors``) and skipped; it never stops the worker.
    """

    def __init__(self, bootstrap: str, topic: str, counters: Counter[str]) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.counters = counters
        self.store = PolicyStore()
        self.bad: list[tuple[Any, Exception]] = []
        """Records that did not decode since the last :meth:`take_bad` (the caller dead-letters them)."""
        self._consumer: AIOKafkaConsumer | None = None
        self._assigned = False
        self._next_look = 0.0

    async def _start(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                metadata_max_age_ms=5000,  # a topic created after the start is seen within seconds
            )
            await consumer.start()
            # Without a group, a subscription is assigned every partition of the topic as the
            # consumer's metadata names them (aiokafka's NoGroupCoordinator); nothing is committed,
            # so each start reads from the beginning. (An explicit assign() needs the partition ids
            # first, and consumer.topics() does not put them in the consumer's own metadata: the
            # first version of this feed never found the topic and judged without any policy.)
            consumer.subscribe([self.topic])
            self._consumer = consumer
        return self._consumer

    async def _assign(self, consumer: AIOKafkaConsumer, wait: float) -> bool:
        if self._assigned:
            return True
        loop = asyncio.get_running_loop()
        until = loop.time() + wait
        while not consumer.assignment():
            if loop.time() >= until:
                if loop.time() >= self._next_look:
                    self._next_look = loop.time() + 60.0
                    log.warning("policies: topic %s has no partitions yet; judging without policies", self.topic)
                return False
            await asyncio.sleep(0.05)
        self._assigned = True
        return True

    async def catch_up(self) -> list[PolicyPublished]:
        """Read up to the end offsets as of now (at start: every policy published so far)."""
        consumer = await self._start()
        if not await self._assign(consumer, 10.0):
            return []
        tps = list(consumer.assignment())
        ends = await consumer.end_offsets(tps)
        found: list[PolicyPublished] = []
        while True:
            behind = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
            if not behind:
                return found
            found += self._apply(await consumer.getmany(*behind, timeout_ms=200, max_records=10_000))

    async def poll(self) -> list[PolicyPublished]:
        """Policies published since the last poll (none waited for)."""
        consumer = await self._start()
        if not await self._assign(consumer, 0.0):
            return []
        return self._apply(await consumer.getmany(timeout_ms=0, max_records=10_000))

    def _apply(self, batch: Mapping[Any, Sequence[Any]]) -> list[PolicyPublished]:
        found: list[PolicyPublished] = []
        for _tp, records in sorted(batch.items(), key=lambda kv: kv[0].partition):
            for m in records:
                try:
                    obj = decode(m.value)
                    if not isinstance(obj, PolicyPublished):
                        raise CodecError(f"unexpected {type(obj).__name__} on {m.topic}")
                except Exception as exc:  # noqa: BLE001 - a bad policy record never stops the worker
                    self.counters["policy_decode_errors"] += 1
                    self.bad.append((m, exc))
                    continue
                if self.store.add(obj):
                    self.counters["policies_read"] += 1
                    found.append(obj)
        return found

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()


class MemoryPolicyFeed(PolicyFeed):
    """:class:`PolicyFeed` over an in-memory ``consent.policies`` (``stream_jobs.runner.MemoryBroker``):
    read whole from the beginning by each new feed (a restarted worker), then polled for what was added."""

    def __init__(self, broker: Any, topic: str, counters: Counter[str]) -> None:
        super().__init__("memory", topic, counters)
        self.broker = broker
        self._positions: dict[int, int] = {}

    async def catch_up(self) -> list[PolicyPublished]:
        return await self.poll()

    async def poll(self) -> list[PolicyPublished]:
        batch: dict[Any, list[Any]] = {}
        for p in range(self.broker.partitions):
            records = self.broker.logs.get((self.topic, p), [])
            at = self._positions.get(p, 0)
            if at < len(records):
                batch[_MemoryTp(self.topic, p)] = records[at:]
                self._positions[p] = len(records)
        return self._apply(batch) if batch else []

    async def stop(self) -> None:
        return None


class _MemoryTp:
    __slots__ = ("partition", "topic")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic, self.partition = topic, partition


class StageRunner:
    """Runs one stage's processors over batches of records: decode, decide, write state, emit.

    Each partition's state is loaded from its changelog partitions on first use after an
    assignment and dropped when the partition is revoked (another worker may change it).
    """

    def __init__(
        self,
        name: str,
        tables: dict[str, str],
        make: Callable[[int, dict[str, ChangelogStore]], Any],
        handle: Callable[[Any, Any, datetime], Output],
        sender: Sender,
        reader: ChangelogReader,
        ready: asyncio.Event,
        counters: Counter[str],
    ) -> None:
        self.name = name
        self.tables = tables  # store name -> changelog topic
        self.make = make
        self.handle = handle
        self.sender = sender
        self.reader = reader
        self.ready = ready
        self.counters = counters
        self.partitions: dict[int, _Partition] = {}
        self.revoked: dict[int, _Partition] = {}
        self._touched: dict[int, _Partition] = {}
        self.halted = asyncio.Event()
        """Set when this worker's assignment is not co-partitioned: it judges nothing from then on."""
        self.policies: PolicyFeed | None = None
        """Stage 2: the policies feed, polled before each batch and tick (see :meth:`_policies`)."""
        self._policies_loaded = False
        self.on_load: Callable[[Any, datetime], Output] | None = None
        """Run on a partition's processor when its state is loaded or taken back (stage 2:
        :meth:`~detections.live.Stage2.recheck`, the calls the policies read so far may change)."""
        self.freeze_gc = False
        """After each state load, move every object alive to the cyclic GC's permanent generation
        (``gc.freeze``): the loaded state and the process's start-up objects are no longer walked by
        each full collection (35 ms each in the paced profile). The worker process sets it."""
        self.prepare: Callable[[Any, list[Any]], None] | None = None
        """Run on a partition's processor with the batch's records of that partition, just before
        the first of them is handled (stage 2: :meth:`~detections.live.Stage2.prepare`, Cedar asked
        for the batch's calls at once). A failure is counted and logged; the records are handled."""
        self._finality_held = False
        self._final_horizon: int | None = None

    def hold_finality(self, held: bool) -> None:
        """Stage 2: let no call of any partition (loaded now or later) become final while ``held``
        (the worker's catch-up after an assignment: :class:`stream_jobs.worker.CatchUp`)."""
        self._finality_held = held
        for part in (*self.partitions.values(), *self.revoked.values()):
            if hasattr(part.proc, "finality_held"):
                part.proc.finality_held = held

    def final_horizon(self, horizon_us: int | None) -> None:
        """Stage 2: only calls whose deadline is at most ``horizon_us`` may become final (None: no
        bound), in every partition loaded now or later (:class:`stream_jobs.worker.Frontier`)."""
        self._final_horizon = horizon_us
        for part in (*self.partitions.values(), *self.revoked.values()):
            if hasattr(part.proc, "final_horizon_us"):
                part.proc.final_horizon_us = horizon_us

    def due_by(self, limit_us: int, cap: int) -> int:
        """Stage 2: calls not final whose deadline is at most ``limit_us``, over the loaded partitions,
        counted up to about ``cap`` (:meth:`~detections.live.Stage2.due_by`)."""
        n = 0
        for part in self.partitions.values():
            if n > cap:
                break
            due_by = getattr(part.proc, "due_by", None)
            if due_by is not None:
                n += due_by(limit_us, cap - n)
        return n

    async def _policies(self, now: datetime) -> None:
        """Apply the policies published since the last batch (all of them the first time) and
        re-judge, in every loaded partition, the calls they may change."""
        feed = self.policies
        if feed is None:
            return
        if not self._policies_loaded:
            await self.ready.wait()
            await feed.catch_up()  # before any partition is loaded or any call decided
            self._policies_loaded = True
            new: list[PolicyPublished] = []
        else:
            new = await feed.poll()
        for m, exc in feed.bad:
            self.sender.dead_letter(m, "policies", exc, now)
        feed.bad.clear()
        if not new:
            return
        for p, part in self.partitions.items():
            self._touched.setdefault(p, part)
            for fact in new:
                self.sender.emit(part.proc.on_policy(fact, now, stored=True))
        self._drain()

    async def partition(self, p: int, now: datetime) -> _Partition:
        part = self.partitions.get(p)
        if part is None:
            part = await self._activate(p)
            if hasattr(part.proc, "finality_held"):
                part.proc.finality_held = self._finality_held
                part.proc.final_horizon_us = self._final_horizon
            if self.on_load is not None:
                try:
                    self.sender.emit(self.on_load(part.proc, now))
                except Exception:  # a failed re-check never stops the worker
                    self.counters[f"{self.name}_load_check_errors"] += 1
                    log.exception("%s: partition %d: re-checking its held calls failed", self.name, p)
        return part

    async def _activate(self, p: int) -> _Partition:
        part = self.partitions.get(p)
        if part is None:
            await self.ready.wait()
            topics = list(self.tables.values())
            kept = self.revoked.pop(p, None)
            if kept is not None and await self.reader.end_offsets(topics, p) == kept.ends:
                # Back after a rebalance and nobody wrote its changelogs meanwhile: what we hold
                # is exactly what a load would give (eager rebalances revoke everything each time).
                self.partitions[p] = kept
                self.counters[f"{self.name}_partition_reuses"] += 1
                return kept
            loaded, stats = await self.reader.load(topics, p)
            stores = {name: ChangelogStore(loaded[topic]) for name, topic in self.tables.items()}
            part = _Partition(self.make(p, stores), stores, stats.ends)
            part.proc.rebuild()
            self.partitions[p] = part
            if self.freeze_gc:
                gc.freeze()
            self.counters[f"{self.name}_partition_loads"] += 1
            self.counters[f"{self.name}_state_records_read"] += stats.records
            log.info(
                "%s: partition %d state loaded in %.2fs (%s records, keys %s)",
                self.name,
                p,
                stats.seconds,
                stats.records,
                stats.per_topic,
            )
        return part

    def revoke(self, partitions: set[int]) -> None:
        """Stop using these partitions; keep their state in case they come back unchanged."""
        for p in partitions:
            part = self.partitions.pop(p, None)
            if part is not None:
                part.offsets.clear()  # another worker may process events before it comes back
                self.revoked[p] = part

    def open_calls(self) -> int:
        return sum(part.proc.open_calls() for part in self.partitions.values())

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget these partitions' state for good (their last batch was not committed): the next
        use reads them back from the changelogs."""
        for p in partitions:
            self.partitions.pop(p, None)
            self.revoked.pop(p, None)
            self._touched.pop(p, None)

    async def process(self, records: Iterable[Any], now: datetime) -> None:
        """Run the processors over these records (anything with topic, partition, offset, key and
        value, in offset order per partition); outputs and the changelog writes of every partition
        touched go into :attr:`sender`. Call :meth:`settle` with the flush's end offsets after."""
        self.counters[f"{self.name}_batches"] += 1
        await self._policies(now)
        touched = self._touched
        counters, handle, sender, name = self.counters, self.handle, self.sender, self.name
        events = 0
        prepare = self.prepare
        pending: dict[int, list[Any]] = {}  # partition -> its records, until prepared
        if prepare is not None:
            records = list(records)
            for m in records:
                pending.setdefault(m.partition, []).append(m)
        for m in records:
            part = touched.get(m.partition)
            if part is None:
                part = touched[m.partition] = await self.partition(m.partition, now)
            if prepare is not None and (batch := pending.pop(m.partition, None)) is not None:
                try:
                    prepare(part.proc, batch)
                except Exception:  # a failed preparation costs time, never a verdict
                    counters[f"{name}_prepare_errors"] += 1
                    log.exception("%s: partition %d: preparing a batch failed", name, m.partition)
            last = part.offsets.get(m.topic)
            if last is not None and m.offset > last + 1:
                # Kafka offsets of these (non-compacted, non-transactional) topics are contiguous:
                # a jump means events we were never given (the faust-streaming#596 symptom).
                counters["offset_gaps"] += 1
                counters["offsets_skipped"] += m.offset - last - 1
                log.warning("%s: %s[%d] jumped from offset %d to %d", name, m.topic, m.partition, last, m.offset)
            if last is None or m.offset > last:
                part.offsets[m.topic] = m.offset
            try:
                out = handle(part.proc, m, now)
            except Exception as exc:  # noqa: BLE001 - every bad event is dead-lettered, never fatal
                sender.dead_letter(m, name, exc, now)
                continue
            events += 1
            sender.emit(out)
        counters[f"{name}_events"] += events
        self._drain()

    async def tick(self, partitions: Iterable[int], now: datetime) -> None:
        """Advance these partitions' clock without a message (stage 2: deadlines pass)."""
        await self._policies(now)
        for p in partitions:
            part = self._touched.get(p)
            if part is None:
                part = self._touched[p] = await self.partition(p, now)
            self.sender.emit(part.proc.on_message("", tick_message(), now))
        self._drain()

    def _drain(self) -> None:
        for p, part in self._touched.items():
            for name, store in part.stores.items():
                for key, value in store.drain():
                    self.sender.changelog(self.tables[name], key, value, p)

    def settle(self, ends: Mapping[tuple[str, int], int]) -> None:
        """The touched partitions' changelog writes are on the broker: remember their end offsets."""
        for p, part in self._touched.items():
            for topic in self.tables.values():
                end = ends.get((topic, p))
                if end is not None:
                    part.ends[topic] = end
        self._touched = {}

    async def run(self, records: Sequence[Any]) -> None:
        """One batch of the Faust engine: process, send and await this stage's messages."""
        if self.halted.is_set():
            # never judge on half the facts, never ack: the worker is stopping (see on_assigned)
            await asyncio.Event().wait()
        await self.process(records, datetime.now(UTC))
        self.settle(await self.sender.flush())


Message = tuple[str, bytes | None, bytes | None, int | None]  # topic, key, value, partition (None: by key)


class BatchProducer:
    """The worker's own idempotent aiokafka producer (acks=all), shared by every :class:`Sender`.

    It is used instead of Faust's per-message ``send``: a batch of a few hundred events produces a
    few thousand messages, and building one record batch per topic-partition costs a fraction of
    as many sends. Nothing relies on Faust's flush-before-commit for these messages.
    """

    def __init__(self, bootstrap: str, counters: Counter[str]) -> None:
        self.bootstrap = bootstrap
        self.counters = counters
        self._producer: AIOKafkaProducer | None = None
        self._partition_counts: dict[str, int] = {}
        self.sent_to: Counter[str] = Counter()
        """Messages sent per topic (the worker's stats file: ``sent_to``)."""

    async def _get(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                enable_idempotence=True,
                linger_ms=2,
                max_batch_size=1024 * 1024,
                max_request_size=4 * 1024 * 1024,
            )
            await producer.start()
            self._producer = producer
        return self._producer

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def _partition_count(self, producer: AIOKafkaProducer, topic: str) -> int:
        count = self._partition_counts.get(topic)
        if count is None:
            count = self._partition_counts[topic] = len(await producer.partitions_for(topic))
        return count

    async def send_all(self, out: Sequence[Message]) -> dict[tuple[str, int], int]:
        """Send these messages and wait until the broker has acknowledged every one; returns the
        end offset (last offset + 1) each topic-partition written to has after these writes.

        Keyed messages without a partition go where Kafka's default partitioner (murmur2) puts
        them, as with any other producer of these topics. A failed send raises.
        """
        if not out:
            return {}
        producer = await self._get()
        groups: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = {}
        counts_of = self._partition_counts
        for topic, key, value, part in out:
            if part is None:
                count = counts_of.get(topic)  # no coroutine per message once the topic is known
                if count is None:
                    count = await self._partition_count(producer, topic)
                part = partition_for(key or b"", count)
            group = groups.get((topic, part))
            if group is None:
                group = groups[(topic, part)] = []
            group.append((key, value))
        pending, counts = [], []
        sent_to = self.sent_to
        for (topic, part), messages in groups.items():
            sent_to[topic] += len(messages)
            batch, count = producer.create_batch(), 0
            for key, value in messages:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    pending.append(await producer.send_batch(batch, topic, partition=part))
                    counts.append(count)
                    batch, count = producer.create_batch(), 0
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise ValueError(f"a message for {topic} is larger than a whole record batch")
                count += 1
            pending.append(await producer.send_batch(batch, topic, partition=part))
            counts.append(count)
        ends: dict[tuple[str, int], int] = {}
        for meta, count in zip(await asyncio.gather(*pending), counts, strict=True):
            tp = (meta.topic, meta.partition)
            ends[tp] = max(ends.get(tp, 0), meta.offset + count)  # a batch's metadata names its first offset
        self.counters["messages_sent"] += len(out)
        self.counters["produce_flushes"] += 1
        self.counters["record_batches_sent"] += len(pending)
        return ends

    async def flush(self, out: Sequence[Message]) -> dict[tuple[str, int], int]:
        """The runner's :class:`~stream_jobs.runner.Output` step: :meth:`send_all`."""
        return await self.send_all(out)

    async def committed(self, offsets: Mapping[tuple[str, int], int]) -> None:
        return None


_EVIDENCE_COUNTERS: dict[str, str] = {}
"""verdict -> its counter's name (``evidence_<verdict>``), made once per verdict."""


class Sender:
    """Collects the messages of ONE producer of work (a stage, or the tick timer) and sends them
    through the shared :class:`BatchProducer`.

    Each stage has its own Sender: the two agents and the timer interleave at every ``await``, and
    with one shared buffer a stage's flush could take (and the other stage then ack events before)
    messages the other stage had collected but not yet seen acknowledged. :meth:`flush` returns
    only once the broker has acknowledged exactly this Sender's messages, and the agent acks its
    events after that.
    """

    def __init__(self, producer: BatchProducer, settings: Settings, counters: Counter[str]) -> None:
        self.producer = producer
        self.topics = settings.topics
        self.partitions = settings.partitions
        self.counters = counters
        self._out: list[Message] = []
        self._routes: dict[bytes, int] = {}  # route -> partition (a delegation's route recurs with each call)

    def emit(self, out: Output) -> None:
        add, counters = self._out.append, self.counters
        routes = self._routes
        for fwd in out.forwards:
            key = fwd.route.encode("utf-8")
            part = routes.get(key)
            if part is None:
                if len(routes) > 100_000:
                    routes.clear()
                part = routes[key] = partition_for(key, self.partitions)
            add((self.topics.calls_by_route, key, fwd.payload, part))
        if out.evidence:
            topic, names = self.topics.evidence, _EVIDENCE_COUNTERS
            for evidence in out.evidence:
                add((topic, evidence.call_id.encode("utf-8"), fast_encode(evidence), None))
                verdict = evidence.verdict
                name = names.get(verdict)
                if name is None:
                    name = names[verdict] = f"evidence_{verdict}"
                counters[name] += 1
        for finding in out.findings:
            # keyed by dedup key: one pager partition sees every finding of a dedup key
            add((self.topics.findings, finding.dedup_key.encode("utf-8"), fast_encode(finding), None))
            counters["findings"] += 1

    def changelog(self, topic: str, key: str, value: bytes | None, partition: int) -> None:
        self._out.append((topic, key.encode("utf-8"), value, partition))
        self.counters["changelog_writes"] += 1

    def dead_letter(self, m: Any, stage: str, exc: Exception, now: datetime) -> None:
        self.counters["dead_letters"] += 1
        self.counters[f"dead_letters_{stage}"] += 1
        record = dead_letter_for(
            m.topic, m.partition, m.offset, m.key, m.value, stage, f"{type(exc).__name__}: {exc}", now
        )
        self._out.append((self.topics.dead_letter, m.key, encode(record), None))
        log.warning("dead-lettered %s[%s]@%s: %s", m.topic, m.partition, m.offset, record.reason)

    def take(self) -> list[Message]:
        """Everything collected so far, handed over (the runner sends it)."""
        out, self._out = self._out, []
        return out

    def pending(self) -> int:
        """Messages collected and not yet handed to :meth:`flush`."""
        return len(self._out)

    async def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None) -> None:
        self._out.append((topic, key, value, partition))
        await self.flush()

    async def flush(self) -> dict[tuple[str, int], int]:
        """Send everything this Sender collected and wait until the broker has acknowledged all of
        it; returns the end offset each topic-partition written to has after these writes.

        A failed send raises: the batch is then not acked, the agent crashes and the worker stops,
        and its events are redelivered (at-least-once) instead of being committed past.
        """
        out, self._out = self._out, []
        return await self.producer.send_all(out)


def changelog_topic(settings: Settings, table: str) -> str:
    """The compacted topic holding one state table (the name Faust gave its table changelogs)."""
    return f"{settings.worker_group}-{table}-changelog"


STAGE1_TABLES = ("s1-sessions", "s1-calls")
STAGE2_TABLES = ("s2-grants", "s2-calls", "s2-seq", "s2-approvals")


def stage_groups(settings: Settings) -> list[tuple[str, ...]]:
    """The co-partition groups: the input topics of each stage (stage 2: the internal topic, the
    grants and the approvals, all keyed by delegation). ``consent.policies`` is in no group: every
    worker reads all of it (:class:`PolicyFeed`)."""
    topics = settings.topics
    return [(topics.tool_calls, topics.sessions), (topics.calls_by_route, topics.grants, topics.approvals)]


def build_stages(
    settings: Settings,
    producer: BatchProducer,
    counters: Counter[str],
    live_counters: LiveCounters,
    ready: asyncio.Event,
    reader: Any = None,
    *,
    feed: PolicyFeed | None = None,
    config: LiveConfig | None = None,
) -> tuple[StageRunner, StageRunner, dict[str, str]]:
    """Both stages over their changelog stores, each with its own :class:`Sender` over ``producer``;
    and the changelog topic of every store. ``feed``: stage 2's policies (default: a
    :class:`PolicyFeed` on the settings' broker); ``config``: the processors' (default: the settings')."""
    topics = settings.topics
    config = config or settings.live_config
    reader = reader or ChangelogReader(settings.kafka_bootstrap)
    changelogs = {name: changelog_topic(settings, name) for name in (*STAGE1_TABLES, *STAGE2_TABLES)}
    tool_calls, sessions, calls_by_route = topics.tool_calls, topics.sessions, topics.calls_by_route
    approvals = topics.approvals
    feed = feed or PolicyFeed(settings.kafka_bootstrap, topics.policies, counters)

    read_call = call_reader()  # decode's result for a call, without validating it twice

    def handle_stage1(proc: Stage1, m: Any, now: datetime) -> Output:
        topic = m.topic
        obj = read_call(m.value) if topic == tool_calls else decode(m.value)
        if topic == tool_calls and isinstance(obj, ToolCall):
            return proc.on_call(obj, now)
        if topic == sessions and isinstance(obj, (SessionBound, SessionEnded)):
            return proc.on_fact(obj, now)
        raise CodecError(f"unexpected {type(obj).__name__} on {topic}")

    def handle_stage2(proc: Stage2, m: Any, now: datetime) -> Output:
        if m.topic == calls_by_route:
            return proc.on_message((m.key or b"").decode("utf-8"), m.value, now)
        obj = decode(m.value)
        if m.topic == approvals and isinstance(obj, ApprovalDecided):
            return proc.on_approval(obj, now)
        if m.topic == approvals or not isinstance(obj, (GrantIssued, GrantRevoked)):
            raise CodecError(f"unexpected {type(obj).__name__} on {m.topic}")
        return proc.on_fact(obj, now)

    def runner(
        name: str, tables: tuple[str, ...], make: Callable[..., Any], handle: Callable[..., Output]
    ) -> StageRunner:
        stores = {table: changelogs[table] for table in tables}
        return StageRunner(
            name,
            stores,
            lambda p, s: make(p, *(s[t] for t in tables), config, live_counters),
            handle,
            Sender(producer, settings, counters),  # one buffer per stage: a flush waits for its own only
            reader,
            ready,
            counters,
        )

    def make_stage2(
        p: int,
        grants: ChangelogStore,
        calls: ChangelogStore,
        sequence: ChangelogStore,
        approvals: ChangelogStore,
        config: LiveConfig,
        counters: LiveCounters,
    ) -> Stage2:
        return deferred_stage2(p, grants, calls, sequence, config, counters, approvals=approvals, policies=feed.store)

    stage1 = runner("attribute", STAGE1_TABLES, Stage1, handle_stage1)
    stage2 = runner("authorize", STAGE2_TABLES, make_stage2, handle_stage2)
    stage2.policies = feed
    stage2.on_load = lambda proc, now: proc.recheck(now)
    stage2.prepare = lambda proc, records: proc.prepare(
        [((m.key or b"").decode("utf-8"), m.value) for m in records if m.topic == calls_by_route]
    )
    return stage1, stage2, changelogs


def new_assignment() -> dict[str, Any]:
    """What the stats file says about the assignment (``scopewatch up`` waits for ``generation``)."""
    return {"generation": 0, "held": {}, "ok": None, "problems": []}


def check_assignment(
    assignment: dict[str, Any], tps: Iterable[tuple[str, int]], assignor: CoPartitionedAssignor, settings: Settings
) -> bool:
    """Check this worker's new assignment, record it in ``assignment`` and log it; False: refuse it
    (the caller stops the worker, which judges nothing and exits 78)."""
    tps = list(tps)
    verdict = check(tps, assignor.last_counts, stage_groups(settings))
    held: dict[str, list[int]] = {}
    for topic, p in tps:
        held.setdefault(topic, []).append(p)
    assignment.update(
        generation=assignment["generation"] + 1,
        held={topic: sorted(parts) for topic, parts in sorted(held.items())},
        ok=verdict.ok,
        problems=verdict.problems,
    )
    for line in verdict.waiting:
        log.warning("assignment: %s", line)
    if not verdict.ok:
        log.critical(
            "stopping: this worker's partition assignment is not co-partitioned (%s); it judges nothing"
            " rather than decide on half the facts",
            "; ".join(verdict.problems),
        )
        return False
    log.info("partitions assigned: %s", describe(assignment["held"]) or "none (more workers than partitions)")
    return True


def worker_stats(
    settings: Settings,
    assignment: dict[str, Any],
    counters: Counter[str],
    live_counters: LiveCounters,
    stages: Sequence[StageRunner],
    engine: str,
) -> dict[str, Any]:
    stage1, stage2 = stages
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "slot": settings.worker_slot,
        "engine": engine,
        "assignment": assignment,
        "counters": dict(counters) | live_counters.counts,
        "sent_to": dict(stage1.sender.producer.sent_to),
        "open_calls_stage1": stage1.open_calls(),
        "open_calls_stage2": stage2.open_calls(),
    }


def stats_path(settings: Settings) -> Any:
    return settings.run_dir / f"worker-{socket.gethostname()}-{os.getpid()}.json"


def log_start(settings: Settings, engine: str, removed_stats: int) -> None:
    """The decision worker's start line (both engines)."""
    log.info(
        "decision worker starting (%s engine): pid %d, group %s, slot %s, %d partitions per topic%s",
        engine,
        os.getpid(),
        settings.worker_group,
        settings.worker_slot or "none (dynamic membership)",
        settings.partitions,
        f"; removed {removed_stats} stats files of stopped workers" if removed_stats else "",
    )


def exit_worker(halted: bool, code: int | str | None = 0) -> NoReturn:
    """The decision worker's stop line and exit code: 78 when it refused its assignment (both engines)."""
    if halted:
        log.critical("decision worker stopped: its assignment was not co-partitioned (exit 78)")
        sys.exit(EXIT_NOT_COPARTITIONED)
    log.info("decision worker stopped (exit %s)", code)
    sys.exit(code)
