"""The decision stream job (faust-streaming), built by :func:`create_app`.

Two agents, each over a pair of co-partitioned topics, run the pure processors of
``detections.live`` and send what they return:

* ``attribute`` (stage 1) reads ``mcp.tool-calls`` and ``identity.sessions`` (key: session_id).
  Its state holds session histories and open calls; it forwards each call, with its attribution,
  to the internal topic ``scopewatch.calls-by-route`` keyed by the call's route (delegation key,
  or the session route when the session names nobody).
* ``authorize`` (stage 2) reads ``scopewatch.calls-by-route`` and ``consent.grants`` (key: the
  delegation key). Its state holds grant histories and the calls it owns; every verdict version
  goes to ``audit.evidence``.

Faust assigns topics with the same partition count and the same subscribers together, so
partition p of both inputs of an agent lives on one worker. The internal topic is written with the
partition Kafka's default partitioner (murmur2) gives the key, which is how the grants topic is
keyed by its producers. A timer sends a tick to each assigned partition of the internal topic so
idle partitions still finalize calls at their deadline.

State is not kept in Faust tables (see ``stream_jobs.state`` for why): each stage keeps, per
partition, stores loaded from compacted changelog topics of its own on first use after an
assignment and dropped on revocation. Agents take events in batches (``take_events``: up to
``SCOPEWATCH_WORKER_BATCH_SIZE`` events or ``SCOPEWATCH_WORKER_BATCH_SECONDS``), run the pure
processors of ``detections.live`` on each event, then send the batch's outputs and changelog
writes (one per changed key) through the worker's own producer and wait for every acknowledgement
of exactly that batch's messages (each stage and the tick timer collect into their own buffer)
before the batch is acked. So an input offset is committed only after everything it produced is on the
broker: at-least-once, and the processors ignore redelivered events (evidence ids are
deterministic).

Agents only decode, call the core and emit. Raw bytes are decoded with our own Avro codec (not
``faust.Record``); an event that does not decode, is of the wrong type or makes the core fail
goes to the dead-letter topic with the reason, and is counted. Agents run with
``concurrency=1`` (faust-streaming#606). An input offset that jumps (events never delivered, the
faust-streaming#596 symptom) is logged and counted (``offset_gaps``, ``offsets_skipped``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal as signal_module
import socket
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from faust.transport.drivers import aiokafka as faust_aiokafka

from detections.live import LiveCounters, Output, Stage1, Stage2, tick_message
from schemas import (
    CodecError,
    GrantIssued,
    GrantRevoked,
    SessionBound,
    SessionEnded,
    ToolCall,
    decode,
    encode,
)
from schemas.topics import partition_for
from scopewatch.runtime import StopTimer, kafka_or_exit, limit_repeats
from scopewatch.settings import Settings
from scopewatch.stack.kafka import create_topics
from scopewatch.stack.proc import atomic_write
from stream_jobs.assignor import CoPartitionedAssignor, by_topic, check, describe
from stream_jobs.dead_letters import dead_letter_for
from stream_jobs.metrics import remove_stale_worker_stats
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


class StageRunner:
    """Runs one stage's processors over batches of Faust events: decode, decide, write state, emit.

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
        self.halted = asyncio.Event()
        """Set when this worker's assignment is not co-partitioned: it judges nothing from then on."""

    async def partition(self, p: int) -> _Partition:
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

    async def run(self, events: Sequence[Any]) -> None:
        if self.halted.is_set():
            # never judge on half the facts, never ack: the worker is stopping (see on_assigned)
            await asyncio.Event().wait()
        now = datetime.now(UTC)
        self.counters[f"{self.name}_batches"] += 1
        touched: dict[int, _Partition] = {}
        for event in events:
            m = event.message
            part = touched.get(m.partition)
            if part is None:
                part = touched[m.partition] = await self.partition(m.partition)
            last = part.offsets.get(m.topic)
            if last is not None and m.offset > last + 1:
                # Kafka offsets of these (non-compacted, non-transactional) topics are contiguous:
                # a jump means events we were never given (the faust-streaming#596 symptom).
                self.counters["offset_gaps"] += 1
                self.counters["offsets_skipped"] += m.offset - last - 1
                log.warning("%s: %s[%d] jumped from offset %d to %d", self.name, m.topic, m.partition, last, m.offset)
            if last is None or m.offset > last:
                part.offsets[m.topic] = m.offset
            try:
                out = self.handle(part.proc, m, now)
            except Exception as exc:  # noqa: BLE001 - every bad event is dead-lettered, never fatal
                self.sender.dead_letter(m, self.name, exc, now)
                continue
            self.counters[f"{self.name}_events"] += 1
            self.sender.emit(out)
        for p, part in touched.items():
            for name, store in part.stores.items():
                for key, value in store.drain():
                    self.sender.changelog(self.tables[name], key, value, p)
        ends = await self.sender.flush()
        for p, part in touched.items():
            for topic in self.tables.values():
                end = ends.get((topic, p))
                if end is not None:
                    part.ends[topic] = end


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
        for topic, key, value, part in out:
            if part is None:
                part = partition_for(key or b"", await self._partition_count(producer, topic))
            groups.setdefault((topic, part), []).append((key, value))
        pending, counts = [], []
        for (topic, part), messages in groups.items():
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
        return ends


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

    def emit(self, out: Output) -> None:
        add, counters = self._out.append, self.counters
        for fwd in out.forwards:
            key = fwd.route.encode("utf-8")
            add((self.topics.calls_by_route, key, fwd.payload, partition_for(key, self.partitions)))
        for evidence in out.evidence:
            add((self.topics.evidence, evidence.call_id.encode("utf-8"), encode(evidence), None))
            counters[f"evidence_{evidence.verdict}"] += 1
        for finding in out.findings:
            # keyed by dedup key: one pager partition sees every finding of a dedup key
            add((self.topics.findings, finding.dedup_key.encode("utf-8"), encode(finding), None))
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


FETCH_MIN_BYTES = 64 * 1024
FETCH_WAIT_MS = 40


class _FetchTunedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, whose fetches wait in the broker for ``FETCH_MIN_BYTES`` or
    ``FETCH_WAIT_MS``, whichever comes first.

    Faust builds its aiokafka consumer with the 1-byte default (no setting reaches it), so a busy
    worker sent a fetch request for every few messages: about a tenth of its CPU went to fetch
    requests (py-spy at 490 calls/s). The values are set before the consumer starts, which is when
    aiokafka hands them to its fetcher; the wait adds at most ``FETCH_WAIT_MS`` per stage.
    """

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_min_bytes = FETCH_MIN_BYTES
        consumer._fetch_max_wait_ms = FETCH_WAIT_MS
        # Faust passes aiokafka's round robin when an app has no changelog tables (ours has none),
        # which splits partition p of a stage's two inputs across workers: use ours instead. The
        # coordinator is built at start() from this attribute.
        assignor = self.app.scopewatch_assignor  # type: ignore[attr-defined]
        consumer._partition_assignment_strategy = (assignor,)
        self._assignor = assignor
        return consumer

    async def on_thread_stop(self) -> None:
        # A static member (group instance id set) does not leave the group on stop in aiokafka, so
        # its partitions would wait a whole session timeout for the next owner. Leave anyway on an
        # orderly stop; a restart after a crash still reclaims the slot at once by its instance id.
        consumer = getattr(self, "_consumer", None)
        coordinator = getattr(consumer, "_coordinator", None)
        if coordinator is not None:
            coordinator._group_instance_id = None
        await super().on_thread_stop()


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _FetchTunedConsumerThread:
        return _FetchTunedConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class _App(faust.App):
    """A Faust app whose consumer transport is :class:`_Transport` (the ``kafka://`` driver with
    tuned fetches); everything else is Faust's."""

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)


def changelog_topic(settings: Settings, table: str) -> str:
    """The compacted topic holding one state table (the name Faust gave its table changelogs)."""
    return f"{settings.worker_group}-{table}-changelog"


STAGE1_TABLES = ("s1-sessions", "s1-calls")
STAGE2_TABLES = ("s2-grants", "s2-calls", "s2-seq")


def create_app(settings: Settings, *, app_id: str | None = None) -> faust.App:
    """A fresh Faust app for one worker process (never shared at module level)."""
    topics = settings.topics
    config = settings.live_config
    n = settings.partitions
    slot = settings.worker_slot
    groups = stage_groups(settings)
    app = _App(
        app_id or settings.worker_group,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        datadir=str(settings.home / "faust"),
        web_enabled=False,
        topic_partitions=n,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        table_standby_replicas=0,
        broker_session_timeout=settings.worker_session_timeout_seconds,
        consumer_group_instance_id=slot,
    )
    assignor = CoPartitionedAssignor(groups, slot=slot or "")
    app.scopewatch_assignor = assignor  # type: ignore[attr-defined]
    counters: Counter[str] = Counter()
    live_counters = LiveCounters()
    app.scopewatch_counters = counters  # type: ignore[attr-defined]
    app.scopewatch_live_counters = live_counters  # type: ignore[attr-defined]

    def raw_topic(*names: str) -> Any:
        return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    stage1_in = raw_topic(topics.tool_calls, topics.sessions)
    stage2_in = raw_topic(topics.calls_by_route, topics.grants)

    producer = BatchProducer(settings.kafka_bootstrap, counters)
    ticks = Sender(producer, settings, counters)
    reader = ChangelogReader(settings.kafka_bootstrap)
    ready = asyncio.Event()
    changelogs = {name: changelog_topic(settings, name) for name in (*STAGE1_TABLES, *STAGE2_TABLES)}
    app.scopewatch_changelogs = changelogs  # type: ignore[attr-defined]

    def handle_stage1(proc: Stage1, m: Any, now: datetime) -> Output:
        obj = decode(m.value)
        if m.topic == topics.tool_calls and isinstance(obj, ToolCall):
            return proc.on_call(obj, now)
        if m.topic == topics.sessions and isinstance(obj, (SessionBound, SessionEnded)):
            return proc.on_fact(obj, now)
        raise CodecError(f"unexpected {type(obj).__name__} on {m.topic}")

    def handle_stage2(proc: Stage2, m: Any, now: datetime) -> Output:
        if m.topic == topics.calls_by_route:
            return proc.on_message((m.key or b"").decode("utf-8"), m.value, now)
        obj = decode(m.value)
        if not isinstance(obj, (GrantIssued, GrantRevoked)):
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

    stage1 = runner("attribute", STAGE1_TABLES, Stage1, handle_stage1)
    stage2 = runner("authorize", STAGE2_TABLES, deferred_stage2, handle_stage2)
    app.scopewatch_stages = (stage1, stage2)  # type: ignore[attr-defined]
    batch, within = settings.worker_batch_size, settings.worker_batch_seconds

    @app.task  # type: ignore[untyped-decorator]
    async def prepare() -> None:
        # Runs once the worker has set up logging, which leaves aiokafka at DEBUG: about ten log
        # records per call, a tenth of the worker's time (bench/profile_decisions.py).
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
        await create_topics(
            settings.kafka_bootstrap, list(changelogs.values()), n, configs={"cleanup.policy": "compact"}
        )
        ready.set()

    @app.agent(stage1_in, concurrency=1, name="attribute")
    async def attribute_agent(stream: Any) -> None:
        async for events in stream.take_events(batch, within=within):
            await stage1.run(events)

    @app.agent(stage2_in, concurrency=1, name="authorize")
    async def authorize_agent(stream: Any) -> None:
        async for events in stream.take_events(batch, within=within):
            await stage2.run(events)

    assignment: dict[str, Any] = {"generation": 0, "held": {}, "ok": None, "problems": []}
    app.scopewatch_assignment = assignment  # type: ignore[attr-defined]

    @app.on_partitions_assigned.connect
    async def on_assigned(sender_app: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        assigned: set[Any] = args[0] if args else kwargs.get("assigned", set())
        verdict = check(((tp.topic, tp.partition) for tp in assigned), assignor.last_counts, groups)
        assignment.update(
            generation=assignment["generation"] + 1,
            held=by_topic(assigned),
            ok=verdict.ok,
            problems=verdict.problems,
        )
        write_stats()
        for line in verdict.waiting:
            log.warning("assignment: %s", line)
        if not verdict.ok:
            for stage in (stage1, stage2):
                stage.halted.set()
            log.critical(
                "stopping: this worker's partition assignment is not co-partitioned (%s); it judges nothing"
                " rather than decide on half the facts",
                "; ".join(verdict.problems),
            )
            os.kill(os.getpid(), signal_module.SIGTERM)  # the orderly, bounded stop (run_worker exits 78)
            return
        log.info("partitions assigned: %s", describe(assignment["held"]) or "none (more workers than partitions)")

    @app.on_partitions_revoked.connect
    async def on_revoked(sender_app: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        revoked: set[Any] = args[0] if args else kwargs.get("revoked", set())
        if revoked:
            log.info("partitions revoked: %s", describe(by_topic(revoked)))
        # Faust has waited for in-flight batches (ours send and await everything before acking):
        # forget the state, the next owner (maybe us again) reads it back from the changelogs.
        stage1.revoke({tp.partition for tp in revoked if tp.topic in (topics.tool_calls, topics.sessions)})
        stage2.revoke({tp.partition for tp in revoked if tp.topic in (topics.calls_by_route, topics.grants)})

    @app.on_before_shutdown.connect
    async def close_producer(sender_app: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        await producer.stop()  # Faust has stopped its consumer: no batch is in flight any more

    @app.timer(interval=settings.tick_seconds)  # type: ignore[untyped-decorator]
    async def tick() -> None:
        for tp in app.consumer.assignment():
            if tp.topic == topics.calls_by_route:
                await ticks.send(topics.calls_by_route, b"", tick_message(), tp.partition)

    stats_file = settings.run_dir / f"worker-{socket.gethostname()}-{os.getpid()}.json"

    def write_stats() -> None:
        data = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "slot": slot,
            "assignment": assignment,
            "updated_at": datetime.now(UTC).isoformat(),
            "counters": dict(counters) | live_counters.counts,
            "open_calls_stage1": stage1.open_calls(),
            "open_calls_stage2": stage2.open_calls(),
        }
        try:
            atomic_write(stats_file, json.dumps(data, indent=1, sort_keys=True))
        except OSError as exc:  # stats are best effort; never stop the job
            log.warning("cannot write %s: %s", stats_file, exc)

    @app.timer(interval=max(settings.tick_seconds, 1.0))  # type: ignore[untyped-decorator]
    async def stats_timer() -> None:
        write_stats()

    app.scopewatch_stats_file = stats_file  # type: ignore[attr-defined]
    return app


def stage_groups(settings: Settings) -> list[tuple[str, str]]:
    """The co-partition groups: the two input topics of each stage."""
    topics = settings.topics
    return [(topics.tool_calls, topics.sessions), (topics.calls_by_route, topics.grants)]


def run_worker(settings: Settings, loglevel: str = "WARNING") -> None:
    """Run one decision worker until it is stopped (SIGTERM/SIGINT).

    The stop is bounded by ``settings.stop_seconds`` and Faust's Kafka logging is rate-limited
    (:mod:`scopewatch.runtime`).
    """
    from faust.worker import Worker

    class _Worker(Worker):
        stop_timer = StopTimer(settings.stop_seconds, "decision worker")

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not self.stdout.isatty():  # the spinner wrote cursor codes into the log file
                self.spinner = None

        def _on_sigterm(self) -> None:
            self.stop_timer.arm()
            super()._on_sigterm()

        def _on_sigint(self) -> None:
            self.stop_timer.arm()
            super()._on_sigint()

        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            super().on_setup_root_logger(logger, level)
            limit_repeats(logger)
            # Our own lifecycle lines (start, assignment, revocation, stop) at INFO; the libraries stay at `level`.
            for name in ("faust", "mode", "aiokafka", "kafka"):
                logging.getLogger(name).setLevel(level)
            for handler in logger.handlers:
                handler.setLevel(min(handler.level or logging.INFO, logging.INFO))
            log.setLevel(logging.INFO)
            log.info(
                "decision worker starting: pid %d, group %s, slot %s, %d partitions per topic%s",
                os.getpid(),
                settings.worker_group,
                settings.worker_slot or "none (dynamic membership)",
                settings.partitions,
                f"; removed {removed} stats files of stopped workers" if removed else "",
            )

    settings.home.mkdir(parents=True, exist_ok=True)  # Faust's workdir: a missing one made it exit 1, silently
    kafka_or_exit(settings.kafka_bootstrap, "decision worker", settings.kafka_wait_seconds, own_handler=True)
    removed = remove_stale_worker_stats(settings.run_dir)
    app = create_app(settings)
    worker = _Worker(app, loglevel=loglevel, quiet=True, workdir=str(settings.home))
    stages = app.scopewatch_stages  # type: ignore[attr-defined]
    code: int | str | None = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code
    finally:
        app.scopewatch_stats_file.unlink(missing_ok=True)  # type: ignore[attr-defined]
    if any(stage.halted.is_set() for stage in stages):
        log.critical("decision worker stopped: its assignment was not co-partitioned (exit 78)")
        sys.exit(EXIT_NOT_COPARTITIONED)
    log.info("decision worker stopped (exit %s)", code)
    sys.exit(code)
