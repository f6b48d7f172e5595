"""A Kafka publisher that never blocks its caller on the broker and never loses an event silently.

Collectors sit on the agent's call path: they hand encoded events to
:meth:`BackgroundPublisher.publish` and go on. A daemon thread runs an asyncio loop with one
idempotent ``AIOKafkaProducer`` (``acks=all``) and moves events along::

    publish() -> memory (bounded) --healthy--> producer --ack--> done
                                  \\-degraded-> spool (disk) -> producer --ack--> ack marker

*Healthy*: events go from memory to the producer. When the broker stops acknowledging (nothing
acked for ``stall_seconds``), cannot be reached, or memory passes half its bound, the publisher
turns *degraded*: the unacknowledged in-flight events, then everything in memory, then every
new event are appended to the local spool (:mod:`collectors.spool`) in publish order. The
producer keeps retrying what it already holds (same producer id and sequence numbers, so the
broker drops a retry it already has); spooled events are handed to it from the spool in order
and marked delivered as acks arrive. When the spool is fully delivered its files are deleted
and the publisher is healthy again. Per Kafka key (per session) the order is the publish order
throughout: one producer, one ordered pipeline.

A spool left behind by a collector that died (``kill -9`` included) is adopted and replayed
by the next publisher started on the same spool directory (see :class:`~collectors.spool.SpoolDir`).

Bounded memory: at most ``max_queued`` events / ``max_queued_bytes`` wait in memory and at most
``window`` / ``window_bytes`` sit in the producer. When memory *and* spool are full,
``publish`` blocks or fails closed (``SpoolConfig.on_full``); every event refused is counted
and described in a *loss record* -- a :class:`~schemas.DeadLetter` with stage ``collector``
on the dead-letter topic, written to the spool's reserved space and delivered like any other
record -- so a loss is always explicit. Corrupt or torn records found in an adopted spool
produce loss records too, and so do losses a collector reports with :meth:`~BackgroundPublisher.record_loss`
(e.g. traffic the stdio wrapper relayed but could not observe). Losses are counted and written
as one record per topic at most once a second, and not while the spool is full: a burst of
refusals cannot use up the reserve; the final counts are always written at close.

Time in memory: once the broker is unreachable, an event accepted by ``publish`` is in the spool
at most ``stall_seconds`` (``SCOPEWATCH_SPOOL_STALL_SECONDS``, default 1 s) plus one turn of the
publisher loop after it was published: that long it may wait in memory or in the producer for an
acknowledgement that does not come, and that much is what a ``kill -9`` then can lose. (While the
producer is replaced after a non-retriable error, its close can hold the loop up to 5 s more.)

Delivery guarantee: every event accepted by ``publish`` is delivered at least once; across a
broker outage while the collector runs, exactly once (the idempotent producer's retries).
A duplicate is possible only when the producer must be replaced (a non-retriable producer
error) or the collector dies after the broker stored an event but before its ack was
recorded; events carry ``event_id`` and the collector chain stamp, so duplicates are
recognisable downstream.

Configuration: a :class:`~collectors.spool.SpoolConfig` (default: from ``SCOPEWATCH_SPOOL_*``
environment variables, see :mod:`collectors.spool`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
)
from aiokafka.partitioner import DefaultPartitioner

from collectors.spool import (
    KIND_EVENT,
    KIND_LOSS,
    Problem,
    Segment,
    SpoolConfig,
    SpoolConfigError,
    SpoolDir,
    SpoolEntry,
    SpoolFull,
    encode_payload,
)
from schemas import DeadLetter, encode

__all__ = [
    "BATCH_ITEM_MAX",
    "TICK",
    "BackgroundPublisher",
    "Flight",
    "Item",
    "PublisherError",
    "PublisherStats",
    "loss_record",
]

log = logging.getLogger("scopewatch.publisher")

#: errors that concern one record, not the broker: retrying cannot help
POISON = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,
    TopicAuthorizationFailedError,
)
TICK = 0.05
"""Seconds between the publisher thread's checks when nothing wakes it (both clients' loops)."""
_DEGRADED_SEND_TIMEOUT = 0.1
FRESH_GRACE = 5.0
"""``close``: how long a producer connected just now may take for its first acknowledgement before
close stops waiting for progress (a new broker allocates the idempotent producer's id first)."""
FAIL_GRACE = 1.0
"""``on_full="fail"``: how long publish() waits for the thread to move memory to a spool that has room."""
LOSS_RECORD_INTERVAL = 1.0
"""At most one batch of loss records per this many seconds (the counts accumulate meanwhile)."""
_SPILL_BATCH = 1000
_SPILL_BATCH_BYTES = 4 << 20
BATCH_ITEM_MAX = 256 << 10
"""Records larger than this are handed to the producer one by one (``send``), not in a batch."""
_MAX_BATCH_BYTES = 256 << 10
"""The producer's record-batch size (aiokafka's default is 16 KiB): a busy collector's round of
records goes in a few produce requests instead of one per 16 KiB (publisher CPU per back-to-back
call 22 -> 8 us in a bench of this publisher alone); below the broker's 1 MiB message limit."""


class _TooLargeForBatch(Exception):
    """A record does not fit an empty record batch: it goes alone."""


class PublisherError(RuntimeError):
    """The publisher cannot start: bad spool settings or an unusable spool directory (fail closed)."""


@dataclass
class PublisherStats:
    """Counters of one publisher; ``lost_*`` are real losses, each described in a loss record."""

    queued: int = 0
    sent: int = 0
    lost_queue_full: int = 0  # refused by publish(): memory and spool full (or publisher closed)
    lost_upstream: int = 0  # lost before publish(), reported with record_loss()
    send_errors: int = 0
    last_error: str | None = None
    lost_at_close: int = 0  # neither delivered nor spooled when the publisher closed
    spooled: int = 0  # records written to the spool
    replayed: int = 0  # spooled records delivered
    adopted: int = 0  # undelivered records adopted from collectors that died
    loss_records: int = 0
    lost_poison: int = 0  # records Kafka refused for good (e.g. too large)
    spool_problems: int = 0  # torn or corrupt stretches found in the spool
    spooled_at_close: int = 0  # left in the spool for the next start
    blocked: int = 0  # publish() calls that waited for room
    degraded: int = 0  # times the publisher switched to the spool
    spool_full: bool = False

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(slots=True)
class Item:
    """A record on its way: queued in memory, handed to the producer or spooled (both clients)."""

    topic: str
    key: bytes | None
    value: bytes
    kind: int = KIND_EVENT
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.value) + len(self.topic) + (len(self.key) if self.key else 0)


class _Ack(Protocol):
    """The outcome of one send: an asyncio future (aiokafka) or a delivery report (librdkafka)."""

    def done(self) -> bool: ...

    def cancelled(self) -> bool: ...

    def exception(self) -> BaseException | None: ...


@dataclass(slots=True)
class Flight:
    """A record handed to the producer, not yet acknowledged."""

    item: Item
    future: _Ack
    sent_at: float
    segment: Segment | None = None  # where it is spooled (None: only in memory)
    index: int = 0
    end: int = 0


@dataclass
class _Loss:
    count: int = 0
    topics: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    first: datetime | None = None
    last: datetime | None = None

    def add(self, topic: str, reason: str, n: int = 1) -> None:
        now = datetime.now(UTC)
        self.count += n
        self.topics[topic] += n
        self.reasons[reason] += n
        self.first = self.first or now
        self.last = now


def loss_record(
    *,
    publisher: str,
    reason: str,
    detail: dict[str, object],
    source_topic: str = "",
    at: datetime | None = None,
) -> DeadLetter:
    """The explicit record of a loss: stage ``collector``, details as JSON in ``payload_b64``."""
    at = at or datetime.now(UTC)
    body = {"kind": "collector_loss", "publisher": publisher, **detail}
    return DeadLetter(
        dead_letter_id=str(uuid.uuid4()),
        source_topic=source_topic,
        source_partition=0,
        source_offset=0,
        key=publisher,
        reason=reason[:2000],
        stage="collector",
        payload_b64=base64.b64encode(json.dumps(body, sort_keys=True, default=str).encode("utf-8")).decode("ascii"),
        failed_at=at,
    )


@dataclass
class BackgroundPublisher:
    """Publishes ``(topic, key, value)`` records from any thread without waiting for the broker."""

    bootstrap: str
    max_queued: int = 50_000
    linger_ms: int = 5
    client_id: str = "scopewatch-collector"
    stats: PublisherStats = field(default_factory=PublisherStats)
    spool: SpoolConfig | None = None  # None: SpoolConfig.from_env(os.environ)
    max_queued_bytes: int = 64 << 20
    stall_seconds: float | None = None  # None: the spool config's (SCOPEWATCH_SPOOL_STALL_SECONDS, 1 s)
    window: int = 2000
    window_bytes: int = 16 << 20
    request_timeout_ms: int = 60_000
    send_timeout: float = 1.0
    connect_timeout: float = 10.0
    client: str | None = None
    """The Kafka client: ``rdkafka`` (librdkafka, :mod:`collectors.publisher_rdkafka`) or ``aiokafka``;
    None: ``SCOPEWATCH_PUBLISHER_CLIENT`` (:class:`collectors.config.CollectorConfig`, default rdkafka)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> BackgroundPublisher:
        if cls is BackgroundPublisher and _client_of(kwargs.get("client")) == "rdkafka":
            from collectors.publisher_rdkafka import RdkafkaPublisher

            cls = RdkafkaPublisher
        return object.__new__(cls)

    def __post_init__(self) -> None:
        self.client = _client_of(self.client)
        try:
            self.config = self.spool if self.spool is not None else SpoolConfig.from_env(os.environ)
        except SpoolConfigError as exc:
            raise PublisherError(f"spool settings: {exc}") from None
        self._stall = self.config.stall_seconds if self.stall_seconds is None else self.stall_seconds
        self._spool = SpoolDir(self.config)
        self._window_bytes = min(self.window_bytes, self.config.max_bytes // 4)
        self._incoming: deque[Item] = deque()
        self._incoming_bytes = 0
        self._cond = threading.Condition()
        self._loss = _Loss()
        self._sleeping = False
        self._accepting = True
        self._no_wait = False
        self._init_wake()
        self._closing = False
        self._abort = False
        self._idle = threading.Event()
        self._durable = threading.Event()  # nothing accepted is only in memory
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scopewatch-publisher", daemon=True)
        self._started = False
        # owned by the publisher thread
        self._inflight: deque[Flight] = deque()
        self._partitions: dict[tuple[str, bytes | None], int] = {}  # (topic, key) -> partition
        self._inflight_bytes = 0
        self._unspooled = 0  # in-flight records that are only in memory
        self._degraded = False
        self._producer: AIOKafkaProducer | None = None
        self._connecting: asyncio.Task[AIOKafkaProducer] | None = None
        self._connect_failed = False
        self._connect_started = 0.0
        self._fresh = False  # a producer is connected and nothing it sent is acknowledged yet
        self._next_connect = 0.0
        self._backoff = 0.1
        self._send_stalled = False
        self._send_retry_at = 0.0
        self._send_pause = 0.1
        self._broken: BaseException | None = None
        self._last_sync = time.monotonic()
        self._wrote = False
        self._loss_flushed_at = -LOSS_RECORD_INTERVAL

    def _init_wake(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()

    @property
    def spool_dir(self) -> str:
        return str(self.config.dir)

    # -- caller side -------------------------------------------------------------
    def start(self) -> BackgroundPublisher:
        """Take this publisher's share of the spool directory and start the thread."""
        if not self._started:
            try:
                self._spool.lock()
            except OSError as exc:
                raise PublisherError(
                    f"cannot use the spool directory {self.config.dir}: {exc.strerror or exc}"
                ) from None
            self._started = True
            self._thread.start()
        return self

    def publish(self, topic: str, key: bytes | None, value: bytes) -> bool:
        """Queue one record. False: refused (memory and spool full, or closed) -- a counted loss."""
        with self._cond:
            accepted = self._put(Item(topic, key, value))
            wake = self._sleeping
            self._sleeping = False
        if wake:
            self._poke()
        return accepted

    def publish_many(self, records: Iterable[tuple[str, bytes | None, bytes]]) -> int:
        """Queue records in order, as :meth:`publish` would one by one, with one lock and at most
        one wake-up of the publisher thread for all of them (a collector hands over what it parsed
        from one read). Returns how many were accepted; each refused one is a counted loss."""
        accepted = 0
        clear_idle = True
        with self._cond:
            incoming = self._incoming
            for topic, key, value in records:
                item = Item(topic, key, value)
                size = item.size
                if (
                    self._accepting
                    and len(incoming) < self.max_queued
                    and self._incoming_bytes + size <= self.max_queued_bytes
                ):
                    # room (what _put checks first, inline: a round of records costs one call, not one each)
                    incoming.append(item)
                    self._incoming_bytes += size
                    self.stats.queued += 1
                    if clear_idle:
                        self._idle.clear()
                        clear_idle = False
                    accepted += 1
                else:
                    accepted += self._put(item)
                    clear_idle = True  # _put may have waited: the lock was let go meanwhile
            wake = self._sleeping
            self._sleeping = False
        if wake:
            self._poke()
        return accepted

    def _put(self, item: Item) -> bool:
        """Append ``item`` to memory, waiting for room as the spool config says (the caller holds the lock)."""
        size = item.size
        topic = item.topic
        if not self._accepting:
            return self._refuse(topic, "publisher closed")
        if self._is_full(size):
            if not self._started:
                return self._refuse(topic, "publisher not started")
            self.stats.blocked += 1
            fail = self.config.on_full == "fail"
            timeout = FAIL_GRACE if fail else self.config.block_timeout
            deadline = None if timeout is None else time.monotonic() + timeout
            if self._sleeping:  # the thread must run to make room (records queued before this one)
                self._sleeping = False
                self._poke()
            while self._is_full(size):
                remaining = None if deadline is None else deadline - time.monotonic()
                if not self._accepting:
                    return self._refuse(topic, "publisher closed")
                if self._no_wait:
                    return self._refuse(topic, "spool full, collector stopping")
                if (fail and self.stats.spool_full) or (remaining is not None and remaining <= 0):
                    return self._refuse(topic, "spool full" if self.stats.spool_full else "memory full")
                self._cond.wait(0.05 if remaining is None else min(remaining, 0.05))
        self._incoming.append(item)
        self._incoming_bytes += size
        self.stats.queued += 1
        self._idle.clear()
        return True

    def record_loss(self, topic: str, reason: str, count: int = 1) -> None:
        """Count ``count`` events lost before they reached the publisher (e.g. traffic a collector
        could not observe); they are described in the next loss record like any refused event."""
        if count <= 0:
            return
        with self._cond:
            self.stats.lost_upstream += count
            self._loss.add(topic, reason, count)
            self._sleeping = False
        if self._started:
            self._poke()

    def stop_waiting(self) -> None:
        """From now on ``publish`` never waits for room: what does not fit is refused and recorded as
        lost at once. For a collector that must finish now (its process is being stopped).

        Safe to call from a signal handler (takes no lock).
        """
        self._no_wait = True
        if self._started:
            self._poke()

    def _is_full(self, size: int) -> bool:
        if not self._incoming:
            return False
        return len(self._incoming) >= self.max_queued or self._incoming_bytes + size > self.max_queued_bytes

    def _refuse(self, topic: str, reason: str) -> bool:
        """Count one refused event (the caller holds the lock); it goes into the next loss record."""
        self.stats.lost_queue_full += 1
        self._loss.add(topic, reason)
        self._sleeping = False
        if self._started:
            self._poke()
        return False

    def pending(self) -> int:
        """Events accepted but not yet acknowledged by Kafka (in memory, in the producer or spooled)."""
        with self._cond:
            waiting = len(self._incoming)
        return waiting + self._spool.pending() + self._unspooled

    def flush(self, timeout: float) -> bool:
        """Wait until everything accepted so far is acknowledged by Kafka; False on timeout."""
        self._poke()
        return self._idle.wait(timeout)

    def close(self, timeout: float = 10.0) -> PublisherStats:
        """Stop: first make everything pending durable in the spool, then deliver it (waiting at most
        ``timeout`` seconds, less when Kafka makes no progress).

        Spooling first matters: MCP clients kill a server a few seconds after closing its stdin, and
        whatever is in the spool survives that -- the next collector start delivers it.
        """
        if not self._started:
            return self.stats
        self._closing = True
        self._poke()
        deadline = time.monotonic() + timeout
        moved_at, last = time.monotonic(), self.stats.sent
        while not self._idle.wait(0.05):
            now = time.monotonic()
            if now >= deadline:
                break
            if self.stats.sent != last:
                moved_at, last = now, self.stats.sent
            elif self._durable.is_set() and now - moved_at > max(0.5, self._stall, FRESH_GRACE if self._fresh else 0):
                break  # nothing moves and nothing is at risk: the next start delivers the spool
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
        self._abort = True
        self._poke()
        self._thread.join(timeout=60.0)
        if self.stats.spooled_at_close:
            log.warning(
                "%d events are not delivered yet and stay in the spool %s: the next collector started with this "
                "spool directory delivers them",
                self.stats.spooled_at_close,
                self.config.dir,
            )
        stats = self.stats
        if stats.lost_queue_full or stats.lost_at_close or stats.lost_poison or stats.lost_upstream:
            log.warning(
                "events lost: %d refused (spool full), %d at close, %d refused by Kafka, %d before the publisher; "
                "see the loss records (stage 'collector') on %s",
                stats.lost_queue_full,
                stats.lost_at_close,
                stats.lost_poison,
                stats.lost_upstream,
                self.config.loss_topic,
            )
        return self.stats

    def _poke(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop has already stopped
            pass

    # -- publisher thread -----------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException:
            log.exception("the publisher thread failed")
            raise
        finally:
            self._thread_ended()
            self._loop.close()

    def _thread_ended(self) -> None:
        """The publisher thread is gone (stopped or failed): wake every waiter, accept nothing more."""
        self._stopped.set()
        self._idle.set()
        self._durable.set()
        with self._cond:
            self._accepting = False
            self._cond.notify_all()

    async def _main(self) -> None:
        self._recover()
        while not self._abort:
            self._wake.clear()
            now = time.monotonic()
            self._reap()
            if self._broken is not None:
                await self._reset()
                continue
            self._route(now)
            self._connect_step(now)
            await self._send(now)
            self._heal()
            self._sync(now)
            await self._sleep(self._update_idle())
        await self._shutdown()

    def _recover(self) -> None:
        """Adopt what dead collectors left in the spool directory; their records go first."""
        try:
            adopted = self._spool.adopt()
        except OSError as exc:
            self._error(exc)
            log.error("cannot adopt the spool in %s: %s", self.config.dir, exc)
            return
        problems: list[Problem] = [p for seg in adopted for p in seg.problems]
        for seg in adopted:
            self.stats.adopted += seg.pending
        if self.stats.adopted:
            log.warning("delivering %d events a previous collector left in %s", self.stats.adopted, self.config.dir)
        self._spool.drop_delivered()
        if problems:
            self._spool_problems(problems)
        if self._spool.pending():
            self._enter_degraded("undelivered events in the spool")

    def _spool_problems(self, problems: list[Problem]) -> None:
        for problem in problems:
            self.stats.spool_problems += 1
            log.warning("spool: %s", problem.describe())
        items = [
            self._loss_item(
                f"collector spool damaged: {p.describe()}",
                {"problem": p.kind, "segment": p.path.name, "offset": p.offset, "bytes": p.length, "detail": p.detail},
            )
            for p in problems
        ]
        try:
            self._append(items, reserve_ok=True)
        except (SpoolFull, OSError) as exc:
            self._error(exc)
            return
        self._enter_degraded("damaged spool")

    # routing: memory -> producer or spool ----------------------------------------------
    def _route(self, now: float) -> None:
        if not self._degraded:
            reason = "closing: pending events go to the spool first" if self._closing else self._degrade_reason(now)
            if self._closing and not self._unspooled and not self._incoming:
                reason = None
            if reason is not None:
                self._degrade(reason)
        if self._degraded:
            self._spill()
        self._flush_loss()

    def _degrade_reason(self, now: float) -> str | None:
        if self._inflight and now - self._inflight[0].sent_at > self._stall:
            return f"no acknowledgement from Kafka for {self._stall:g}s"
        if self._send_stalled:
            return "the producer accepts no more records"
        if self._producer is None and self._connect_failed:
            return "cannot connect to Kafka"
        if self._is_connecting() and now - self._connect_started > self._stall:
            return f"no connection to Kafka within {self._stall:g}s"
        with self._cond:
            high = len(self._incoming) > self.max_queued // 2 or self._incoming_bytes > self.max_queued_bytes // 2
        if high:
            return "events arrive faster than Kafka acknowledges them"
        return None

    def _is_connecting(self) -> bool:
        return self._connecting is not None

    def _degrade(self, reason: str) -> bool:
        """Spool every in-flight record that is only in memory; True when the publisher is degraded."""
        unspooled = [f for f in self._inflight if f.segment is None]
        try:
            placed = self._append([f.item for f in unspooled], reserve_ok=True) if unspooled else []
        except (SpoolFull, OSError) as exc:
            self._error(exc)
            return False
        for flight, (seg, index, end) in zip(unspooled, placed, strict=True):
            flight.segment, flight.index, flight.end = seg, index, end
            seg.read_index, seg.read_offset = index + 1, end  # already in the producer
        self._unspooled = 0
        self._enter_degraded(reason)
        return True

    def _enter_degraded(self, reason: str) -> None:
        if not self._degraded:
            self._degraded = True
            if self._closing:
                log.debug("%s (%s)", reason, self.config.dir)
                return
            self.stats.degraded += 1
            log.warning("Kafka unavailable (%s): spooling events to %s", reason, self.config.dir)

    def _append(self, items: list[Item], *, reserve_ok: bool = False) -> list[tuple[Segment, int, int]]:
        placed = self._spool.append(
            [(item.kind, encode_payload(item.topic, item.key, item.value)) for item in items], reserve_ok=reserve_ok
        )
        self.stats.spooled += sum(1 for item in items if item.kind == KIND_EVENT)
        self._wrote = True
        return placed

    def _spill(self) -> None:
        """Memory -> spool, in order, as far as the spool has room."""
        while True:
            with self._cond:
                batch: list[Item] = []
                size = 0
                for item in self._incoming:
                    if len(batch) >= _SPILL_BATCH or size >= _SPILL_BATCH_BYTES:
                        break
                    batch.append(item)
                    size += item.size
            if not batch:
                self.stats.spool_full = False
                return
            try:
                self._append(batch)
            except SpoolFull:
                if not self.stats.spool_full:
                    log.error("the spool %s is full (%d bytes)", self.config.dir, self.config.max_bytes)
                self.stats.spool_full = True
                return
            except OSError as exc:  # a disk error: the spool is unusable, treated like a full one
                if not self.stats.spool_full:
                    log.error("cannot write the spool %s: %s", self.config.dir, exc)
                self._error(exc)
                self.stats.spool_full = True
                return
            self.stats.spool_full = False
            with self._cond:
                for _ in batch:
                    self._incoming.popleft()
                self._incoming_bytes -= size
                self._cond.notify_all()

    def _loss_item(self, reason: str, detail: dict[str, object], topic: str = "") -> Item:
        record = loss_record(
            publisher=self.client_id,
            reason=reason,
            detail={**detail, "spool": str(self.config.dir)},
            source_topic=topic,
        )
        self.stats.loss_records += 1
        return Item(self.config.loss_topic, self.client_id.encode("utf-8"), encode(record), KIND_LOSS)

    def _flush_loss(self, *, final: bool = False) -> None:
        """Turn the losses counted so far into loss records (one per topic).

        While the spool is full, and within ``LOSS_RECORD_INTERVAL`` of the last ones, the counts
        keep accumulating instead: a burst of refusals must not use up the spool's reserve with many
        small records and leave no room for the one that matters. ``final``: at close, always.
        """
        if not self._loss.count and not final:
            return  # nothing lost (read without the lock: a loss counted meanwhile waits for the next turn)
        now = time.monotonic()
        if not final and (
            (self._degraded and self.stats.spool_full) or now - self._loss_flushed_at < LOSS_RECORD_INTERVAL
        ):
            return
        with self._cond:
            loss, self._loss = self._loss, _Loss()
        if not loss.count:
            return
        self._loss_flushed_at = now
        items = [
            self._loss_item(
                f"collector lost {n} events for {topic}: " + ", ".join(f"{r} ({c})" for r, c in loss.reasons.items()),
                {
                    "lost": n,
                    "topic": topic,
                    "reasons": dict(loss.reasons),
                    "first_at": loss.first,
                    "last_at": loss.last,
                },
                topic,
            )
            for topic, n in loss.topics.items()
        ]
        if self._degraded:
            try:
                self._append(items, reserve_ok=True)
                return
            except (SpoolFull, OSError) as exc:
                self._error(exc)
                with self._cond:  # keep counting; written as soon as there is room
                    self._loss.count += loss.count
                    self._loss.topics.update(loss.topics)
                    self._loss.reasons.update(loss.reasons)
                    self._loss.first = loss.first
                self.stats.loss_records -= len(items)
                return
        with self._cond:
            self._incoming.extendleft(reversed(items))
            self._incoming_bytes += sum(i.size for i in items)

    # the producer ---------------------------------------------------------------------
    def _connect_step(self, now: float) -> None:
        if self._producer is not None:
            return
        task = self._connecting
        if task is not None:
            if not task.done():
                return
            self._connecting = None
            exc = task.exception() if not task.cancelled() else TimeoutError("connect cancelled")
            if exc is None:
                self._producer = task.result()
                self._fresh = True
                self._connect_failed = False
                self._backoff = 0.1
                self._send_stalled = False
                return
            self._error(exc, prefix="connect")
            self._connect_failed = True
            self._next_connect = now + self._backoff
            self._backoff = min(self._backoff * 2, 5.0)
            return
        if now >= self._next_connect:
            self._connect_started = now
            self._connecting = self._loop.create_task(self._connect())
            self._connecting.add_done_callback(lambda _t: self._wake.set())

    async def _connect(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            linger_ms=self.linger_ms,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=self.request_timeout_ms,
            max_batch_size=_MAX_BATCH_BYTES,
        )
        try:
            await asyncio.wait_for(producer.start(), timeout=self.connect_timeout)
        except BaseException:
            await _close_quietly(producer)
            raise
        return producer

    async def _send(self, now: float) -> None:
        producer = self._producer
        if producer is None or now < self._send_retry_at:
            return
        if not self._degraded and await self._send_batches(producer, now):
            return
        await self._send_each(producer, now)

    async def _send_batches(self, producer: AIOKafkaProducer, now: float) -> bool:
        """Healthy: hand what waits in memory to the producer as record batches, one per partition
        (``send_batch``), under one timeout and with one acknowledgement callback per batch -- not a
        ``send``, a timeout and a callback per record. Per partition (so per key) the records keep
        their publish order; the flights are registered in publish order. Records the producer did
        not take go back to the front of memory, in order, as with :meth:`_send_each`.

        Returns False when the next record must go alone (:meth:`_send_each`): it is large, or a
        batch hit an error that concerns single records (e.g. a record Kafka refuses).
        """
        while len(self._inflight) < self.window and self._inflight_bytes < self._window_bytes:
            room, room_bytes = self.window - len(self._inflight), self._window_bytes - self._inflight_bytes
            items: list[Item] = []
            with self._cond:
                incoming = self._incoming
                taken = 0
                while incoming and len(items) < room and room_bytes > 0:
                    item = incoming[0]
                    size = item.size
                    if size > BATCH_ITEM_MAX:
                        break
                    incoming.popleft()
                    taken += size
                    room_bytes -= size
                    items.append(item)
                self._incoming_bytes -= taken
                if items:
                    self._cond.notify_all()
                alone = bool(incoming) and not items
            if not items:
                return not alone
            futures: dict[int, asyncio.Future[object]] = {}  # id(item) -> its batch's future
            error: BaseException | None = None
            try:
                async with asyncio.timeout(self.send_timeout):
                    groups: dict[tuple[str, int], list[Item]] = {}
                    for item in items:
                        part = self._partitions.get((item.topic, item.key))
                        if part is None:
                            part = await self._partition_of(producer, item.topic, item.key)
                        groups.setdefault((item.topic, part), []).append(item)
                    for (topic, part), group in groups.items():
                        await self._send_group(producer, topic, part, group, futures)
            except (TimeoutError, KafkaError, _TooLargeForBatch) as exc:
                error = exc
            unsent = []
            for item in items:
                future = futures.get(id(item))
                if future is None:
                    unsent.append(item)
                    continue
                self._inflight.append(Flight(item, future, now))
                self._inflight_bytes += item.size
                self._unspooled += 1
            if unsent:
                with self._cond:
                    self._incoming.extendleft(reversed(unsent))
                    self._incoming_bytes += sum(i.size for i in unsent)
            if error is None:
                self._send_stalled = False
                self._send_pause = 0.1
                continue
            if isinstance(error, TimeoutError):
                self._send_stalled = True
                self._send_retry_at = now + self._send_pause
                self._send_pause = min(self._send_pause * 2, 2.0)
                return True
            if isinstance(error, POISON | _TooLargeForBatch):
                return False  # one by one: the record at fault is found and skipped there
            self._error(error)
            self._broken = error
            return True
        return True

    async def _send_group(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        partition: int,
        group: list[Item],
        futures: dict[int, asyncio.Future[object]],
    ) -> None:
        """The records of one partition, in order, in as few batches as fit; ``futures`` learns the
        batch future of each record handed over (a record is handed over only with its batch)."""
        batch, members = producer.create_batch(), list[Item]()
        for item in group:
            if batch.append(key=item.key, value=item.value, timestamp=None) is None:
                if not members:
                    raise _TooLargeForBatch
                self._sent(await producer.send_batch(batch, topic, partition=partition), members, futures)
                batch, members = producer.create_batch(), []
                if batch.append(key=item.key, value=item.value, timestamp=None) is None:
                    raise _TooLargeForBatch
            members.append(item)
        self._sent(await producer.send_batch(batch, topic, partition=partition), members, futures)

    def _sent(
        self, future: asyncio.Future[object], members: list[Item], futures: dict[int, asyncio.Future[object]]
    ) -> None:
        future.add_done_callback(lambda _f: self._wake.set())
        for item in members:
            futures[id(item)] = future

    async def _partition_of(self, producer: AIOKafkaProducer, topic: str, key: bytes | None) -> int:
        """The partition the producer's default partitioner picks for ``key`` (cached per key:
        a collector's records carry a handful of keys, its sessions')."""
        partitions = sorted(await producer.partitions_for(topic))
        part: int = DefaultPartitioner()(key, partitions, partitions)
        if key is not None:
            if len(self._partitions) >= 4096:
                self._partitions.clear()
            self._partitions[(topic, key)] = part
        return part

    async def _send_each(self, producer: AIOKafkaProducer, now: float) -> None:
        """One record at a time (degraded: from the spool; or a record that must go alone)."""
        single = not self._degraded
        while len(self._inflight) < self.window and self._inflight_bytes < self._window_bytes:
            entry: SpoolEntry | None = None
            if self._degraded:
                entry = self._next_spooled()
                if entry is None:
                    return
                item = Item(entry.topic, entry.key, entry.value, entry.kind)
            else:
                with self._cond:
                    if not self._incoming:
                        return
                    item = self._incoming.popleft()
                    self._incoming_bytes -= item.size
                    self._cond.notify_all()
            try:
                # degraded, everything is safe in the spool: never let a stuck producer hold the loop up
                async with asyncio.timeout(_DEGRADED_SEND_TIMEOUT if self._degraded else self.send_timeout):
                    future = await producer.send(item.topic, value=item.value, key=item.key)
            except (TimeoutError, KafkaError) as exc:
                if isinstance(exc, POISON):  # refused at once (e.g. too large): a counted loss
                    if entry is None:
                        self._poisoned(item, exc)
                        continue
                    # from the spool: marked done there in order, once the records before it are acked
                    # (marking it now would move the spool's acked mark past records still in flight)
                    refused: asyncio.Future[object] = asyncio.get_running_loop().create_future()
                    refused.set_exception(exc)
                    flight = Flight(item, refused, now, entry.segment, entry.index, entry.end)
                    self._inflight.append(flight)
                    self._inflight_bytes += item.size
                    continue
                self._unsend(item, entry)
                if isinstance(exc, TimeoutError):
                    self._send_stalled = True
                    self._send_retry_at = now + self._send_pause
                    self._send_pause = min(self._send_pause * 2, 2.0)
                else:
                    self._error(exc)
                    self._broken = exc
                return
            self._send_stalled = False
            self._send_pause = 0.1
            future.add_done_callback(lambda _f: self._wake.set())
            flight = Flight(item, future, now)
            if entry is not None:
                flight.segment, flight.index, flight.end = entry.segment, entry.index, entry.end
            self._inflight.append(flight)
            self._inflight_bytes += item.size
            self._unspooled += entry is None
            if single:
                return  # the next ones go in batches again

    def _next_spooled(self) -> SpoolEntry | None:
        for seg in self._spool.segments:
            if seg.unsent:
                entry = seg.read_next()
                if entry is not None:
                    return entry
        return None

    def _unsend(self, item: Item, entry: SpoolEntry | None) -> None:
        """The producer did not take ``item``: it goes back where it came from."""
        if entry is not None:
            entry.segment.unread(entry)
        else:
            with self._cond:
                self._incoming.appendleft(item)
                self._incoming_bytes += item.size

    def _poisoned(self, item: Item, exc: BaseException) -> None:
        """Kafka refuses this record for good: record the loss, skip the record (a spooled one is
        marked done by the caller, in order)."""
        self._error(exc)
        self.stats.lost_poison += 1
        if item.kind == KIND_LOSS:
            log.error("Kafka refused a loss record: %s", exc)
            return
        with self._cond:
            self._loss.add(item.topic, f"refused by Kafka: {type(exc).__name__}")

    def _reap(self) -> None:
        """Account for the acknowledgements that arrived, in publish order."""
        touched: set[int] = set()
        while self._inflight and self._inflight[0].future.done():
            flight = self._inflight[0]
            future = flight.future
            exc: BaseException | None = (
                asyncio.CancelledError("send cancelled") if future.cancelled() else future.exception()
            )
            if exc is not None and not _is_poison(exc):
                self._error(exc)
                self._broken = exc
                break
            self._inflight.popleft()
            self._inflight_bytes -= flight.item.size
            self._unspooled -= flight.segment is None
            if exc is not None:
                self._poisoned(flight.item, exc)
            else:
                self.stats.sent += 1 if flight.item.kind == KIND_EVENT else 0
                self._fresh = False
            if flight.segment is not None:
                flight.segment.mark_acked(flight.index, flight.end)
                touched.add(id(flight.segment))
                self.stats.replayed += 1 if flight.item.kind == KIND_EVENT and exc is None else 0
        if touched:
            self._record_acks()

    def _record_acks(self) -> None:
        try:
            for seg in self._spool.segments:
                if seg.pending and seg.acked:
                    seg.write_ack()
            self._spool.drop_delivered()
        except OSError as exc:
            self._error(exc)
        self._wrote = True

    def _take_back_unacked(self) -> None:
        """The producer failed for good: what it did not ack is resent from the spool (spooling starts
        now), or, with no room to spool, waits in memory again ahead of what came since."""
        exc, self._broken = self._broken, None
        log.warning("replacing the Kafka producer after %s: %s", type(exc).__name__, exc)
        if not self._degraded and not self._degrade("producer failed"):
            with self._cond:  # no room to spool: the records wait in memory instead
                self._incoming.extendleft(reversed([f.item for f in self._inflight]))
                self._incoming_bytes += sum(f.item.size for f in self._inflight)
            self._inflight.clear()
            self._inflight_bytes = self._unspooled = 0

    async def _reset(self) -> None:
        """The producer failed for good: replace it and resend, from the spool, what it did not ack."""
        self._take_back_unacked()
        producer, self._producer = self._producer, None
        if producer is not None:
            await _close_quietly(producer)
        self._reap()  # what the producer delivered while closing
        self._broken = None
        self._inflight.clear()
        self._inflight_bytes = self._unspooled = 0
        for seg in self._spool.segments:
            seg.rewind()
        self._next_connect = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 5.0)

    def _heal(self) -> None:
        if (
            self._degraded
            and self._producer is not None  # still no connection: new events go straight to the spool
            and not self._inflight
            and self._spool.pending() == 0
            and self._broken is None
        ):
            self._spool.drop_delivered()
            self._degraded = False
            log.log(logging.DEBUG if self._closing else logging.WARNING, "Kafka is back: the spool is delivered")

    def _sync(self, now: float) -> None:
        policy = self.config.fsync
        if policy == "never" or not self._wrote:
            return
        if policy == "always" or now - self._last_sync >= self.config.fsync_interval:
            try:
                for seg in self._spool.segments:
                    seg.sync()
            except OSError as exc:
                self._error(exc)
            self._last_sync = now
            self._wrote = False

    def _update_idle(self) -> float | None:
        """Set or clear the idle flag; returns how long the loop may sleep (None: until woken)."""
        with self._cond:
            waiting = bool(self._incoming)
            losses = bool(self._loss.count)
            empty = not waiting and not losses
            busy = not empty or bool(self._inflight) or self._degraded or self._spool.pending() > 0
            if not busy:
                self._idle.set()
            else:
                self._idle.clear()
            if empty and not self._unspooled:
                self._durable.set()
            else:
                self._durable.clear()
            if empty:
                self._sleeping = True
        if waiting and self._can_progress():
            return 0.0  # more arrived meanwhile: go on at once
        if losses and not waiting:  # loss records held back (see _flush_loss)
            due = self._loss_flushed_at + LOSS_RECORD_INTERVAL - time.monotonic()
            return TICK if self._degraded and self.stats.spool_full else min(TICK, max(0.005, due))
        if self._wrote and self.config.fsync == "interval":
            return max(0.0, min(TICK, self._last_sync + self.config.fsync_interval - time.monotonic()))
        if busy or self._producer is None:
            return TICK * 2 if self._degraded else TICK
        return None

    def _can_progress(self) -> bool:
        if self._degraded:
            return not self.stats.spool_full
        return (
            self._producer is not None and len(self._inflight) < self.window and time.monotonic() >= self._send_retry_at
        )

    async def _sleep(self, seconds: float | None) -> None:
        if seconds is None:
            await self._wake.wait()
            return
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        # a timer that sets the wake event, not wait_for (which wraps the wait in a task each time)
        timer = self._loop.call_later(seconds, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()

    async def _shutdown(self) -> None:
        """Make everything undelivered durable in the spool, then stop the producer and close the files."""
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if not task.cancelled() and task.exception() is None:
                self._producer = task.result()  # connected just now: closed below
        self._reap()
        with self._cond:
            waiting = bool(self._incoming)
        if (waiting or self._unspooled) and not self._degraded:
            self._degrade("closing")
        if self._degraded:
            self._spill()
        producer, self._producer = self._producer, None
        if producer is not None:
            await _close_quietly(producer, timeout=2.0)
            self._broken = None
            self._reap()
        self._finish_shutdown()

    def _finish_shutdown(self) -> None:
        """What is still only in memory is lost (counted); the loss records and acks are written, the files closed."""
        with self._cond:
            left = list(self._incoming)
            self._incoming.clear()
            self._incoming_bytes = 0
            self._cond.notify_all()
        left += [f.item for f in self._inflight if f.segment is None and not _acked(f)]
        for item in left:
            with self._cond:
                self._loss.add(item.topic, "not delivered and no room in the spool at close")
        self.stats.lost_at_close += len(left)
        self._degraded = True  # loss records go to the spool from here on
        self._flush_loss(final=True)
        try:
            for seg in self._spool.segments:
                if seg.acked:
                    seg.write_ack()
                if self.config.fsync != "never":
                    seg.sync()
        except OSError as exc:
            self._error(exc)
        self.stats.spooled_at_close = self._spool.pending()
        self._spool.close(keep=self.stats.spooled_at_close > 0)

    def _error(self, exc: BaseException, prefix: str = "") -> None:
        self.stats.send_errors += 1
        text = f"{type(exc).__name__}: {exc}"
        self.stats.last_error = f"{prefix}: {text}" if prefix else text


def _is_poison(exc: BaseException) -> bool:
    """An error that concerns this record, not the broker (aiokafka's classes, or librdkafka's codes)."""
    return isinstance(exc, POISON) or getattr(exc, "poison", False) is True


def _client_of(client: str | None) -> str:
    if client is None:
        from collectors.config import CollectorConfig, ConfigError

        try:
            client = CollectorConfig.from_env().publisher_client
        except ConfigError as exc:
            raise PublisherError(str(exc)) from None
    if client not in ("rdkafka", "aiokafka"):
        raise PublisherError(f"unknown publisher client {client!r} (rdkafka or aiokafka)")
    return client


def _acked(flight: Flight) -> bool:
    future = flight.future
    return future.done() and not future.cancelled() and future.exception() is None


async def _close_quietly(producer: AIOKafkaProducer, timeout: float = 5.0) -> None:
    try:
        await asyncio.wait_for(producer.stop(), timeout=timeout)
    except Exception:  # closing must not fail the publisher
        log.debug("producer stop failed", exc_info=True)
