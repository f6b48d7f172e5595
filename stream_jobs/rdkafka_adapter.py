"""The runner's :class:`~stream_jobs.runner.Consumer` over confluent-kafka (librdkafka), the sink's default.

librdkafka fetches, decompresses and checks record batches in its own C threads; this process's
Python only hands each message over as a :class:`~stream_jobs.kafka_adapter.LeanRecord`. Measured
here on the sink's evidence messages: about 2.5 µs of CPU per message for the whole consumer against
about 5 µs for aiokafka with lean records (BENCHMARKS.md, the sink row).

How it stays off the event loop and keeps the runner's contract:

* **Fetching.** ``getmany`` runs ``Consumer.consume(max_records, timeout)`` (one call per batch, up to
  ``max_records`` or ``timeout``) in a thread of its own and awaits it; the loop is never blocked.
* **Rebalances.** librdkafka calls ``on_assign`` / ``on_revoke`` / ``on_lost`` from inside ``consume`` or
  ``close``, in that thread. Each runs the runner's async hook on the loop and waits for it there, so a
  revocation still waits for the batch in flight, which commits first (eager protocol: the partitions
  leave only when ``on_revoke`` returns). Should the runner call ``getmany`` while such a hook waits for
  it (a flush being retried in place holds the runner's lock), ``getmany`` returns nothing after its
  timeout instead of deadlocking; that ``consume`` call's records come with a later ``getmany``.
* **Seeks** take effect at once when no ``consume`` is running, otherwise just before the next one; the
  running call's records of that partition are then dropped (they are from before the seek).
  ``pause``/``resume`` apply at once (librdkafka drops a paused partition's prefetched messages and
  fetches again from the last one handed over); the runner seeks back anything fetched meanwhile.
* **Commits** are explicit and synchronous (``enable.auto.commit`` and ``enable.auto.offset.store``
  off), in another thread; a refusal because the group moved the partitions is :class:`CommitFailed`,
  an outage is retried until it answers (as aiokafka does).
* **Logs** go through Python logging (logger ``librdkafka``, at most notice level from the library;
  ``RepeatFilter`` limits it like the other Kafka libraries); no ``debug`` contexts, which could
  print connection details.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import Consumer as _RdConsumer
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from stream_jobs.kafka_adapter import LeanRecord
from stream_jobs.runner import TP, CommitFailed, Listener, Record

log = logging.getLogger("scopewatch.kafka")
LIBRARY_LOG = logging.getLogger("librdkafka")

LOG_LEVEL = 5
"""librdkafka's own threshold (syslog levels): 5 = notice and worse; 7 (debug) is never set here."""

GROUP_MOVED = frozenset(
    {
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError._ASSIGNMENT_LOST,
        KafkaError._STATE,
    }
)
"""Commit errors that mean the group took the partitions away: the batch is redone (CommitFailed)."""

_new_record = tuple.__new__


def _tps(parts: Iterable[TopicPartition]) -> set[TP]:
    return {(p.topic, p.partition) for p in parts}


class RdKafkaConsumer:
    """A group member over librdkafka with explicit commits (module docstring)."""

    def __init__(
        self,
        bootstrap: str,
        group: str,
        topics: Sequence[str],
        *,
        instance_id: str | None = None,
        session_timeout: float = 30.0,
        fetch_min_bytes: int = 64 * 1024,
        fetch_max_wait_ms: int = 40,
        max_partition_fetch_bytes: int = 4 * 1024 * 1024,
        queued_kbytes: int = 32 * 1024,
        client_id: str = "scopewatch",
    ) -> None:
        self.topics = list(topics)
        session_ms = int(session_timeout * 1000)
        self.config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "client.id": client_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_uncommitted",  # as the aiokafka consumer (its default)
            "partition.assignment.strategy": "roundrobin",  # as the aiokafka consumer (its default)
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": min(3000, session_ms // 3),
            "fetch.min.bytes": fetch_min_bytes,
            "fetch.wait.max.ms": fetch_max_wait_ms,
            "max.partition.fetch.bytes": max_partition_fetch_bytes,
            "queued.max.messages.kbytes": queued_kbytes,
            "log_level": LOG_LEVEL,
            "log.connection.close": False,
            "logger": LIBRARY_LOG,
            "error_cb": _library_error,
        }
        if instance_id is not None:
            self.config["group.instance.id"] = instance_id
        self._consumer: _RdConsumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: Listener | None = None
        self._poller: ThreadPoolExecutor | None = None
        self._caller: ThreadPoolExecutor | None = None
        self._inflight: asyncio.Future[dict[TP, list[Record]]] | None = None
        self._assigned: frozenset[TP] = frozenset()
        self._lock = threading.Lock()  # the poll thread's state below
        self._polling = False
        self._seeks: dict[TP, int] = {}  # seeks waiting for the running consume call to end
        self._stale: set[TP] = set()  # partitions whose records of the running call are from before a seek
        self._tps: dict[TP, TopicPartition] = {}

    @property
    def consumer(self) -> _RdConsumer:
        assert self._consumer is not None, "start() first"
        return self._consumer

    def _tp(self, tp: TP) -> TopicPartition:
        out = self._tps.get(tp)
        if out is None:
            out = self._tps[tp] = TopicPartition(*tp)
        return out

    # -- lifecycle

    async def start(self, listener: Listener) -> None:
        self._loop = asyncio.get_running_loop()
        self._listener = listener
        self._poller = ThreadPoolExecutor(1, thread_name_prefix="rdkafka-poll")
        self._caller = ThreadPoolExecutor(2, thread_name_prefix="rdkafka-call")
        self._consumer = _RdConsumer(self.config)
        self._consumer.subscribe(
            self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    async def stop(self) -> None:
        consumer, loop = self._consumer, self._loop
        if consumer is None or loop is None:
            return
        try:
            if self._inflight is not None:
                await asyncio.wait({self._inflight})
                self._inflight = None
            # close() leaves the group; librdkafka calls on_revoke from it (in the poll thread)
            await loop.run_in_executor(self._poller, consumer.close)
        finally:
            self._consumer = None
            self._assigned = frozenset()
            for pool in (self._poller, self._caller):
                if pool is not None:
                    pool.shutdown(wait=False)

    # -- rebalance callbacks (in the poll thread, from inside consume() or close())

    def _hook(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            future.result()
        except Exception:  # librdkafka must get control back; the runner logs its own failures
            log.exception("a rebalance hook failed")

    def _on_assign(self, consumer: _RdConsumer, parts: list[TopicPartition]) -> None:
        consumer.assign(parts)  # now, so the runner can seek these at once (from the committed offsets)
        tps = _tps(parts)
        self._assigned = self._assigned | tps
        if self._listener is not None:
            self._hook(self._listener.assigned(tps))

    def _on_revoke(self, consumer: _RdConsumer, parts: list[TopicPartition]) -> None:
        tps = _tps(parts)
        if self._listener is not None:
            self._hook(self._listener.revoked(tps))  # the batch in flight commits first
        self._assigned = self._assigned - tps
        consumer.unassign()

    def _on_lost(self, consumer: _RdConsumer, parts: list[TopicPartition]) -> None:
        tps = _tps(parts)
        self._assigned = self._assigned - tps  # already someone else's: nothing of them is committed
        if self._listener is not None:
            self._hook(self._listener.revoked(tps))
        consumer.unassign()

    # -- the Consumer protocol

    async def getmany(self, timeout_ms: int, max_records: int) -> Mapping[TP, Sequence[Record]]:
        assert self._loop is not None
        future = self._inflight
        if future is None:
            future = self._inflight = self._loop.run_in_executor(
                self._poller, self._consume, max_records, timeout_ms / 1000
            )
        if not future.done():
            # a rebalance hook may hold the call beyond its timeout while it waits for the runner
            await asyncio.wait({future}, timeout=timeout_ms / 1000 + 0.1)
            if not future.done():
                return {}
        self._inflight = None
        return future.result()

    def _consume(self, max_records: int, timeout: float) -> dict[TP, list[Record]]:
        """In the poll thread: the deferred seeks, one ``consume`` call, its messages as lean records."""
        consumer = self.consumer
        with self._lock:
            seeks, self._seeks = self._seeks, {}
            self._polling = True
        try:
            for seek in seeks.items():
                self._seek_now(*seek)
            messages = consumer.consume(max_records, timeout)
        finally:
            with self._lock:
                self._polling = False
                stale, self._stale = self._stale, set()
        out: dict[TP, list[Record]] = {}
        new = _new_record
        for msg in messages:
            error = msg.error()
            if error is not None:
                _message_error(error)
                continue
            tp = (msg.topic(), msg.partition())
            records = out.get(tp)  # type: ignore[arg-type]  # a message (no error) has both
            if records is None:
                records = out[tp] = []  # type: ignore[index]
            records.append(new(LeanRecord, (*tp, msg.offset(), msg.key(), msg.value())))
        for gone in stale:
            out.pop(gone, None)
        return out

    async def commit(self, offsets: Mapping[TP, int]) -> None:
        parts = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        assert self._loop is not None
        await self._loop.run_in_executor(self._caller, self._commit, parts)

    def _commit(self, parts: list[TopicPartition]) -> None:
        delay = 0.2
        while True:
            try:
                result = self.consumer.commit(offsets=parts, asynchronous=False)
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
            else:
                failed = [p.error for p in result or () if p.error is not None]
                if not failed:
                    return
                error = failed[0]
            if error.code() in GROUP_MOVED:
                raise CommitFailed(f"{error.name()}: {error.str()}")
            if error.fatal() or not (error.retriable() or _transient(error)):
                raise KafkaException(error)
            log.warning("offset commit failed (%s); retrying in %.1fs", error.str(), delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def seek(self, tp: TP, offset: int) -> None:
        with self._lock:
            if self._polling:  # at the start of the next consume call; this one's records of tp are stale
                self._seeks[tp] = offset
                self._stale.add(tp)
                return
            self._seeks.pop(tp, None)
        self._seek_now(tp, offset)

    def _seek_now(self, tp: TP, offset: int) -> None:
        if tp not in self._assigned:
            return  # given away meanwhile: its next owner starts from the committed offset
        self.consumer.seek(TopicPartition(tp[0], tp[1], offset))

    def pause(self, tps: Iterable[TP]) -> None:
        parts = [self._tp(tp) for tp in tps if tp in self._assigned]
        if parts:
            self.consumer.pause(parts)

    def resume(self, tps: Iterable[TP]) -> None:
        parts = [self._tp(tp) for tp in tps if tp in self._assigned]
        if parts:
            self.consumer.resume(parts)

    def assignment(self) -> set[TP]:
        return set(self._assigned)

    async def committed(self, tp: TP) -> int | None:
        """The group's committed offset of ``tp`` (None: none yet)."""
        return (await self._committed([tp])).get(tp)

    async def _committed(self, tps: list[TP]) -> dict[TP, int | None]:
        assert self._loop is not None
        parts = [TopicPartition(t, p) for t, p in tps]
        result = await self._loop.run_in_executor(self._caller, lambda: self.consumer.committed(parts, timeout=10))
        return {(p.topic, p.partition): (p.offset if p.offset >= 0 else None) for p in result}

    async def lag(self) -> dict[str, int]:
        """Per topic, the high watermark (as of the last fetch) minus the committed offset, over the assigned
        partitions."""
        tps = sorted(self._assigned)
        if not tps:
            return {}
        committed = await self._committed(tps)
        lag: dict[str, int] = {}
        for tp in tps:
            _low, high = self.consumer.get_watermark_offsets(self._tp(tp), cached=True)
            if high < 0:
                continue
            lag[tp[0]] = lag.get(tp[0], 0) + max(0, high - (committed.get(tp) or 0))
        return lag


def _transient(error: KafkaError) -> bool:
    return error.code() in (
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._WAIT_COORD,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.REQUEST_TIMED_OUT,
    )


def _message_error(error: KafkaError) -> None:
    if error.fatal():
        raise KafkaException(error)
    LIBRARY_LOG.warning("consumer error: %s", error.str())


def _library_error(error: KafkaError) -> None:
    """librdkafka's ``error_cb`` (mostly connection trouble, which it retries by itself)."""
    if error.fatal():
        LIBRARY_LOG.error("fatal client error: %s", error.str())
    else:
        LIBRARY_LOG.warning("client error: %s", error.str())
