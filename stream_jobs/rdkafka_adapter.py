"""The runner's :class:`~stream_jobs.runner.Consumer` over confluent-kafka (librdkafka), the sink's default.

librdkafka fetches, decompresses and checks record batches in its own C threads; this process's
Python only hands each message over as a :class:`~stream_jobs.kafka_adapter.LeanRecord`. Measured
here on the sink's evidence messages: about 2.5 µs of CPU per message for the whole consumer against
about 5 µs for aiokafka with lean records (BENCHMARKS.md, the sink row).

How it stays off the event loop and keeps the runner's contract:

* **One thread owns the client.** confluent-kafka serialises every call on a consumer: a ``seek`` or a
  ``commit`` from another thread waits until a running ``consume`` returns (measured: 3.7 s behind a
  4 s ``consume``). So every call runs in the adapter's own thread, in order, and the event loop only
  awaits them; it is never blocked.
* **Fetching.** ``getmany`` runs ``Consumer.consume(max_records, timeout)`` (up to ``max_records`` or
  ``timeout``) in that thread and awaits it.
* **Rebalances.** librdkafka calls ``on_assign`` / ``on_revoke`` / ``on_lost`` from inside ``consume`` or
  ``close``, in that thread. Each runs the runner's async hook on the loop and waits for it, so a
  revocation still waits for the batch in flight, which commits first (eager protocol: the partitions
  leave only when ``on_revoke`` returns). While it waits, the thread runs the calls the hook (or anyone)
  makes meanwhile -- a commit, a committed-offset lookup -- from inside the callback, the one place
  librdkafka takes them then. Should the runner call ``getmany`` while a hook waits for the runner (a
  flush being retried in place holds its lock), ``getmany`` returns nothing after its timeout instead of
  deadlocking; that ``consume`` call's records come with a later ``getmany``.
* **Seeks, pauses, resumes** (synchronous in the runner's protocol) are queued and applied in order
  just before the next ``consume``; a ``consume`` running when a seek comes has its records of that
  partition dropped (they are from before the seek). librdkafka drops a paused partition's prefetched
  messages and fetches again from the last one handed over.
* **Commits** are explicit and synchronous (``enable.auto.commit`` and ``enable.auto.offset.store``
  off); a refusal because the group moved the partitions is :class:`CommitFailed`, an outage is
  retried until it answers (as aiokafka does).
* **Logs** go through Python logging (logger ``librdkafka``, at most notice level from the library;
  ``RepeatFilter`` limits it like the other Kafka libraries); no ``debug`` contexts, which could
  print connection details.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from confluent_kafka import Consumer as _RdConsumer
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from stream_jobs.kafka_adapter import LeanRecord
from stream_jobs.runner import TP, CommitFailed, Listener, Record

log = logging.getLogger("scopewatch.kafka")
LIBRARY_LOG = logging.getLogger("librdkafka")

LOG_LEVEL = 5
"""librdkafka's own threshold (syslog levels): 5 = notice and worse; 7 (debug) is never set here."""


class _LibraryLog:
    """Takes librdkafka's log lines (confluent-kafka calls ``log(level, "%s [%s] %s", facility, client, text)``)
    into :data:`LIBRARY_LOG` with the facility in the message format, so ``RepeatFilter`` limits each facility
    (``FAIL``, ``OFFSET``, ...) on its own instead of every librdkafka line as one kind."""

    def log(self, level: int, _format: str, facility: str, client: str, text: str) -> None:
        LIBRARY_LOG.log(level, str(facility).replace("%", "%%") + " [%s] %s", client, text)


LIBRARY_ROUTE = _LibraryLog()

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
T = TypeVar("T")


def _tps(parts: Iterable[TopicPartition]) -> set[TP]:
    return {(p.topic, p.partition) for p in parts}


class _Call:
    """A function for the client's thread and the future of its result."""

    __slots__ = ("fn", "polls", "reply")

    def __init__(self, fn: Callable[[], Any], polls: bool) -> None:
        self.fn = fn
        self.polls = polls
        """A ``consume`` or ``close``: never run from inside a rebalance callback (waits for it to end)."""
        self.reply: Future[Any] = Future()

    def run(self) -> None:
        if not self.reply.set_running_or_notify_cancel():
            return
        try:
            self.reply.set_result(self.fn())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the call
            self.reply.set_exception(exc)


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
            "logger": LIBRARY_ROUTE,
            "error_cb": _library_error,
        }
        if instance_id is not None:
            self.config["group.instance.id"] = instance_id
        self._consumer: _RdConsumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: Listener | None = None
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._inflight: Future[dict[TP, list[Record]]] | None = None
        self._assigned: frozenset[TP] = frozenset()
        self._lock = threading.Lock()  # the state below, shared by the loop and the client's thread
        self._polling = False
        self._ops: list[tuple[str, Any]] = []  # seeks, pauses, resumes for the client's thread, in order
        self._stale: set[TP] = set()  # partitions whose records of the running consume are from before a seek

    @property
    def consumer(self) -> _RdConsumer:
        assert self._consumer is not None, "start() first"
        return self._consumer

    # -- the client's thread

    def _serve(self) -> None:
        """The client's thread: run the calls in order until the ``None`` that ``stop`` sends."""
        while True:
            call = self._calls.get()
            if call is None:
                return
            call.run()

    def _submit(self, fn: Callable[[], T], polls: bool = False) -> Future[T]:
        call = _Call(fn, polls)
        self._calls.put(call)
        return call.reply

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the client's thread (from inside a rebalance callback if one is waiting)."""
        return await asyncio.wrap_future(self._submit(fn))

    # -- lifecycle

    async def start(self, listener: Listener) -> None:
        self._loop = asyncio.get_running_loop()
        self._listener = listener
        self._consumer = _RdConsumer(self.config)
        self._thread = threading.Thread(target=self._serve, name="rdkafka-client", daemon=True)
        self._thread.start()
        await self._call(
            lambda: self.consumer.subscribe(
                self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
        )

    async def stop(self) -> None:
        consumer, thread = self._consumer, self._thread
        if consumer is None or thread is None:
            return
        try:
            if self._inflight is not None:
                await asyncio.wait({asyncio.wrap_future(self._inflight)})
                self._inflight = None
            # close() leaves the group; librdkafka calls on_revoke from it (in the client's thread)
            await asyncio.wrap_future(self._submit(consumer.close, polls=True))
        finally:
            self._calls.put(None)
            self._consumer = None
            self._assigned = frozenset()

    # -- rebalance callbacks (in the client's thread, from inside consume() or close())

    def _hook(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a runner hook on the loop; meanwhile run the calls made of this thread (but no consume)."""
        assert self._loop is not None
        done = _Call(lambda: None, polls=False)  # the end marker
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        future.add_done_callback(lambda _f: self._calls.put(done))
        deferred: list[_Call | None] = []
        try:
            while True:
                call = self._calls.get()
                if call is done:
                    break
                if call is None or call.polls:
                    deferred.append(call)  # after the callback
                    continue
                call.run()
        finally:
            for call in deferred:
                self._calls.put(call)
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
        future = self._inflight
        if future is None:
            future = self._inflight = self._submit(lambda: self._consume(max_records, timeout_ms / 1000), polls=True)
        if not future.done():
            # a rebalance hook may hold the call beyond its timeout while it waits for the runner
            await asyncio.wait({asyncio.wrap_future(future)}, timeout=timeout_ms / 1000 + 0.1)
            if not future.done():
                return {}
        self._inflight = None
        return future.result()

    def _apply_ops(self) -> None:
        with self._lock:
            ops, self._ops = self._ops, []
            self._polling = True
        consumer = self.consumer
        for op, arg in ops:
            if op == "seek":
                tp, offset = arg
                if tp in self._assigned:  # else given away meanwhile: its next owner starts from the commit
                    consumer.seek(TopicPartition(tp[0], tp[1], offset))
                continue
            parts = [TopicPartition(*tp) for tp in arg if tp in self._assigned]
            if parts:
                (consumer.pause if op == "pause" else consumer.resume)(parts)

    def _consume(self, max_records: int, timeout: float) -> dict[TP, list[Record]]:
        """In the client's thread: the queued seeks/pauses/resumes, one ``consume``, its messages as lean records."""
        # confluent-kafka's Message objects are tracked by the cyclic GC: 10,000 of them per call set off
        # collections that walk the whole heap (py-spy: most of this thread's time). Nothing here makes
        # cycles, so collecting is held off until the batch is built (as the sink does while absorbing it).
        collecting = gc.isenabled()
        gc.disable()
        try:
            try:
                self._apply_ops()
                messages = self.consumer.consume(max_records, timeout)
            finally:
                with self._lock:
                    self._polling = False
                    stale, self._stale = self._stale, set()
            out: dict[TP, list[Record]] = {}
            new = _new_record
            topic: Any = None
            partition: Any = None
            records: list[Record] = []
            for msg in messages:  # in runs of one partition: look the list up once per run
                error = msg.error()
                if error is not None:
                    _message_error(error)
                    continue
                if msg.partition() != partition or msg.topic() != topic:
                    topic, partition = msg.topic(), msg.partition()
                    records = out.setdefault((topic, partition), [])
                records.append(new(LeanRecord, (topic, partition, msg.offset(), msg.key(), msg.value())))
            del messages
        finally:
            if collecting:
                gc.enable()
        for gone in stale:
            out.pop(gone, None)
        return out

    async def commit(self, offsets: Mapping[TP, int]) -> None:
        parts = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        error = await self._call(lambda: self._commit(parts))
        while error is not None:
            if error.code() in GROUP_MOVED:
                raise CommitFailed(f"{error.name()}: {error.str()}")
            if error.fatal() or not (error.retriable() or _transient(error)):
                raise KafkaException(error)
            log.warning("offset commit failed (%s); retrying", error.str())
            await asyncio.sleep(0.5)
            error = await self._call(lambda: self._commit(parts))

    def _commit(self, parts: list[TopicPartition]) -> KafkaError | None:
        try:
            result = self.consumer.commit(offsets=parts, asynchronous=False)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            return error
        failed = [p.error for p in result or () if p.error is not None]
        return failed[0] if failed else None

    def seek(self, tp: TP, offset: int) -> None:
        with self._lock:
            self._ops.append(("seek", (tp, offset)))
            if self._polling:  # the running consume's records of tp are from before this seek
                self._stale.add(tp)

    def pause(self, tps: Iterable[TP]) -> None:
        with self._lock:
            self._ops.append(("pause", list(tps)))

    def resume(self, tps: Iterable[TP]) -> None:
        with self._lock:
            self._ops.append(("resume", list(tps)))

    def assignment(self) -> set[TP]:
        return set(self._assigned)

    async def committed(self, tp: TP) -> int | None:
        """The group's committed offset of ``tp`` (None: none yet)."""
        return (await self._committed([tp])).get(tp)

    async def _committed(self, tps: list[TP]) -> dict[TP, int | None]:
        parts = [TopicPartition(t, p) for t, p in tps]
        result = await self._call(lambda: self.consumer.committed(parts, timeout=10))
        return {(p.topic, p.partition): (p.offset if p.offset >= 0 else None) for p in result}

    async def lag(self) -> dict[str, int]:
        """Per topic, the high watermark (as of the last fetch) minus the committed offset, over the assigned
        partitions."""
        tps = sorted(self._assigned)
        if not tps:
            return {}
        committed = await self._committed(tps)

        def highs() -> list[int]:
            return [self.consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)[1] for tp in tps]

        lag: dict[str, int] = {}
        for tp, high in zip(tps, await self._call(highs), strict=True):
            if high >= 0:
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
