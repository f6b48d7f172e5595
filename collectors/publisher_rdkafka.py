"""The publisher on librdkafka: records go into librdkafka's C queue, delivery reports drive the spool.

:class:`RdkafkaPublisher` is :class:`~collectors.publisher.BackgroundPublisher` (same routing, spool,
loss records, bounds and guarantees, see there) with a confluent-kafka ``Producer``
(``enable.idempotence``, ``acks=all``, Java's murmur2 partitioner as aiokafka's default one) in
place of the asyncio loop and aiokafka producer. It is the default client
(``SCOPEWATCH_PUBLISHER_CLIENT=rdkafka``; ``aiokafka`` selects the asyncio publisher).

Why: the aiokafka round of a paced collector (a hand-over every 100 ms) cost ≈ 1–1.3 ms of CPU,
in asyncio wake-ups, the Python record-batch build, request/response handling and futures. Here the
publisher thread wakes once per hand-over (``produce()`` of each record into librdkafka's queue,
which lingers 5 ms in C so a hand-over makes one batch per partition); while healthy it serves the
previous hand-over's delivery reports then, with ``poll(0)``, instead of waking for them (at the
latest it wakes at the first in-flight record's stall deadline). When someone waits for the
acknowledgements (``flush``, ``close``), when degraded, or with the window half full, it serves them
as they come, blocking in ``poll()`` (the GIL released). The batching, requests and retries run in
librdkafka's C threads.

The bookkeeping is the base class's: a record counts as delivered, and is marked acknowledged in
the spool, only once its delivery report says so (:meth:`_Report.__call__` then ``_reap``); a
failed report that concerns the record alone (too large, topic refused) is a loss with a loss
record; any other failed report, or a fatal producer error, replaces the producer and resends
from the spool what it did not acknowledge. Records the producer holds when the broker stops
acknowledging are spooled after ``stall_seconds``, as with aiokafka; librdkafka keeps retrying them
(same producer id and sequence numbers) and their reports mark them delivered in the spool.

While the thread waits in ``poll()`` (at most ``TICK``, 0.05 s; twice that while degraded, as the
asyncio publisher's loop), a hand-over that arrives meanwhile waits for the next delivery report or
that tick: the bound on the time an event spends in memory once the broker is unreachable
(``stall_seconds`` plus one turn) grows by at most that wait.

Measured (``bench/collector_latency.py``, observer process CPU per call, broker up / down, side by
side with the aiokafka publisher of main): paced at one call per 10 ms 127 / 127 vs 173 / 132 µs,
back to back 77 / 77 vs 86 / 82 µs (bench/HISTORY.md, 2026-12-06, branch h17p): the round's fixed
cost is gone; per record librdkafka's ``produce()`` and delivery report cost about what aiokafka's
Python record batch did.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from collectors.publisher import (
    BATCH_ITEM_MAX,
    TICK,
    BackgroundPublisher,
    Flight,
    Item,
)
from collectors.spool import SpoolEntry

__all__ = ["RdkafkaPublisher"]

log = logging.getLogger("scopewatch.publisher")

#: delivery errors that concern one record, not the broker: retrying cannot help
POISON_CODES = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.INVALID_RECORD,
    }
)
#: errors librdkafka reports while it cannot reach any broker (a connection attempt fails at once)
_UNREACHABLE = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE})
RDKAFKA_MIN_LINGER_MS = 5
"""librdkafka's ``linger.ms`` is at least this (the publisher's ``linger_ms`` may ask for more)."""
_PRODUCE_BATCH = 1000
"""Records taken from memory under one lock before they are produced."""


class RdkafkaError(Exception):
    """A librdkafka error as an exception; ``poison``: it concerns this record only."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__(f"{error.name()}: {error.str()}")
        self.code = error.code()
        self.poison = self.code in POISON_CODES
        self.fatal = bool(error.fatal())


class _Report:
    """The delivery report of one record (the producer's ``on_delivery`` callback): an ack for ``_reap``."""

    __slots__ = ("_done", "_error")

    def __init__(self) -> None:
        self._done = False
        self._error: BaseException | None = None

    def __call__(self, error: KafkaError | None, _msg: object) -> None:
        if error is not None:
            self._error = RdkafkaError(error)
        self._done = True

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def exception(self) -> BaseException | None:
        return self._error


class _Connection:
    """One producer and what its error callback saw (served by ``poll()`` in the polling thread)."""

    def __init__(self) -> None:
        self.candidate: Producer | None = None  # created, not yet known to reach the cluster
        self.producer: Producer | None = None  # connected
        self.error: BaseException | None = None
        self.fatal: BaseException | None = None
        self.unreachable: BaseException | None = None
        self.done = threading.Event()

    def on_error(self, error: KafkaError) -> None:
        exc = RdkafkaError(error)
        if error.fatal():
            self.fatal = exc
        elif error.code() in _UNREACHABLE:
            self.unreachable = exc
        log.debug("librdkafka: %s", exc)


class _LibrdkafkaLog:
    """librdkafka's log lines at DEBUG: connection failures are the publisher's to report (stats, warnings)."""

    def log(self, _level: int, fmt: str, *args: object) -> None:
        log.debug("librdkafka: " + fmt, *args)


_LIBRDKAFKA_LOG = _LibrdkafkaLog()


class RdkafkaPublisher(BackgroundPublisher):
    """:class:`~collectors.publisher.BackgroundPublisher` on a librdkafka producer (no asyncio)."""

    def _init_wake(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._conn: _Connection | None = None  # the connection being made (its thread runs)
        self._eager_until = 0.0  # until then the delivery reports are served as they come (a flush waits)
        self._current: _Connection | None = None  # the producer's

    def _poke(self) -> None:
        # a pipe write: safe from a signal handler, takes no lock
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # full (a wake-up is pending anyway) or closed
            pass

    def _is_connecting(self) -> bool:
        return self._conn is not None

    # -- the publisher thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._main_sync()
        except BaseException:
            log.exception("the publisher thread failed")
            raise
        finally:
            self._thread_ended()
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _main_sync(self) -> None:
        self._recover()
        while not self._abort:
            now = time.monotonic()
            if self._producer is not None:
                self._rd.poll(0)  # delivery reports that arrived meanwhile
                current = self._current
                if current is not None and current.fatal is not None and self._broken is None:
                    self._error(current.fatal)
                    self._broken = current.fatal
            self._reap()
            if self._broken is not None:
                self._reset_sync()
                continue
            self._route(now)
            self._connect_step(now)
            self._produce(now)
            self._heal()
            self._sync(now)
            self._wait(self._update_idle())
        self._shutdown_sync()

    @property
    def _rd(self) -> Any:
        producer = self._producer
        assert producer is not None
        return producer

    def _wait(self, seconds: float | None) -> None:
        """Sleep until poked, a delivery report arrives (records in flight) or ``seconds`` pass."""
        if seconds is not None and seconds <= 0:
            self._drain_wake()
            return
        if self._inflight and self._producer is not None and self._lazy():
            # healthy, nobody waits: the reports are served at the next turn -- the next hand-over, or
            # the first record's stall deadline, whichever comes first -- not by a wake-up of their own
            # (``TICK`` is the base loop's busy tick, not needed here: a loss record may wait that long too)
            head = self._inflight[0].sent_at + self._stall - time.monotonic()
            seconds = max(0.0, head if seconds is None or seconds == TICK else min(seconds, head))
            self._select(seconds + 0.001)
            return
        if self._inflight and self._producer is not None:
            # the delivery reports wake this thread: poll() blocks in librdkafka with the GIL released.
            # It goes on polling (not through a whole turn of the loop) until every record in flight is
            # reported, it is poked, or the time is up: a hand-over's records go to several partitions,
            # whose reports come one response at a time.
            poll, last = self._rd.poll, self._inflight[-1].future
            deadline = time.monotonic() + (TICK if seconds is None else seconds)  # degraded: 2 ticks
            while not self._drain_wake():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not poll(remaining) or last.done():
                    return
            return
        self._select(seconds)

    def _select(self, seconds: float | None) -> None:
        try:
            readable, _, _ = select.select([self._wake_r], [], [], seconds)
        except InterruptedError:  # pragma: no cover - PEP 475 retries select itself
            readable = []
        if readable:
            self._drain_wake()

    def _lazy(self) -> bool:
        """May the delivery reports wait for the next turn? Only while healthy (spooled records' acks are
        written as they come: a ``kill -9`` replays fewer), with room in the window, nothing waiting in
        memory and nobody waiting for the acknowledgements (``flush``, ``close``)."""
        return (
            not self._degraded
            and not self._closing
            and time.monotonic() >= self._eager_until
            and len(self._inflight) < self.window // 2
            and self._inflight_bytes < self._window_bytes // 2
            and not self._incoming
        )

    def flush(self, timeout: float) -> bool:
        self._eager_until = time.monotonic() + timeout
        return super().flush(timeout)

    def _drain_wake(self) -> bool:
        """Consume pending pokes; True if there were any."""
        try:
            return bool(os.read(self._wake_r, 4096))
        except BlockingIOError:
            return False

    # -- connecting --------------------------------------------------------------------
    def _connect_step(self, now: float) -> None:
        if self._producer is not None:
            return
        conn = self._conn
        if conn is not None:
            if not conn.done.is_set():
                return
            self._conn = None
            if conn.error is None:
                self._producer = conn.producer
                self._current = conn
                self._fresh = True
                self._connect_failed = False
                self._backoff = 0.1
                self._send_stalled = False
                return
            self._error(conn.error, prefix="connect")
            self._connect_failed = True
            self._next_connect = now + self._backoff
            self._backoff = min(self._backoff * 2, 5.0)
            return
        if now >= self._next_connect:
            self._connect_started = now
            self._conn = _Connection()
            threading.Thread(
                target=self._connect_thread, args=(self._conn,), name="scopewatch-publisher-connect", daemon=True
            ).start()

    def _config(self, conn: _Connection) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap,
            "client.id": self.client_id,
            "enable.idempotence": True,
            "acks": "all",
            # librdkafka lingers in C (no Python wake-up): a hand-over's records make one batch per
            # partition, not a request for the first record and another for the rest
            "linger.ms": max(self.linger_ms, RDKAFKA_MIN_LINGER_MS),
            "partitioner": "murmur2_random",  # Java's (and aiokafka's) default: same partition per key
            "request.timeout.ms": self.request_timeout_ms,
            "message.max.bytes": 1_000_000,
            "error_cb": conn.on_error,
            "logger": _LIBRDKAFKA_LOG,  # served by poll(), never to stderr (the MCP client's)
        }

    def _connect_thread(self, conn: _Connection) -> None:
        """Create the producer and fetch the cluster's metadata (what aiokafka's ``start()`` does)."""
        try:
            # a new producer per attempt, closed when it fails: an idle librdkafka producer that cannot
            # reach its broker costs ≈ 1 ms of CPU per second (reconnects, the idempotent producer's id
            # requests), more than creating one per attempt at the publisher's backoff (≤ 5 s)
            conn.candidate = Producer(self._config(conn))
            producer = conn.candidate
            last = ""
            deadline = time.monotonic() + self.connect_timeout
            while True:
                try:
                    producer.list_topics(timeout=0.25)
                    break
                except KafkaException as exc:
                    last = str(exc)
                producer.poll(0)  # the error callback: connection refused, name not resolved
                if conn.fatal is not None or conn.unreachable is not None:
                    raise ConnectionError(str(conn.fatal or conn.unreachable))
                if self._abort:
                    raise ConnectionError("publisher closing")
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no Kafka metadata within {self.connect_timeout:g}s: {last}")
            conn.unreachable = None
            conn.producer, conn.candidate = producer, None
        except Exception as exc:  # noqa: BLE001 - reported to the publisher thread as the connect error
            conn.error = exc.with_traceback(None)  # no frame (and producer) kept alive by the traceback
            candidate, conn.candidate = conn.candidate, None
            if candidate is not None:
                _close_quietly(candidate, flush=0.0)
            del candidate  # the last reference: the producer and its threads go now
        finally:
            conn.done.set()
            self._poke()

    # -- sending -----------------------------------------------------------------------
    def _produce(self, now: float) -> None:
        """Hand records to librdkafka, in publish order: from memory (healthy) or the spool (degraded)."""
        producer = self._producer
        if producer is None or now < self._send_retry_at:
            return
        while len(self._inflight) < self.window and self._inflight_bytes < self._window_bytes:
            if self._degraded:
                entry = self._next_spooled()
                if entry is None:
                    return
                if not self._produce_one(producer, Item(entry.topic, entry.key, entry.value, entry.kind), entry, now):
                    return
                continue
            room, room_bytes = (
                min(self.window - len(self._inflight), _PRODUCE_BATCH),
                (self._window_bytes - self._inflight_bytes),
            )
            items: list[Item] = []
            with self._cond:
                incoming = self._incoming
                taken = 0
                while incoming and len(items) < room and (room_bytes > 0 or not items):
                    item = incoming.popleft()
                    taken += item.size
                    room_bytes -= item.size
                    items.append(item)
                    if item.size > BATCH_ITEM_MAX:
                        break
                self._incoming_bytes -= taken
                if items:
                    self._cond.notify_all()
            if not items:
                return
            for n, item in enumerate(items):
                if not self._produce_one(producer, item, None, now):
                    rest = items[n:]
                    with self._cond:
                        self._incoming.extendleft(reversed(rest))
                        self._incoming_bytes += sum(i.size for i in rest)
                    return

    def _produce_one(self, producer: Any, item: Item, entry: SpoolEntry | None, now: float) -> bool:
        """One record into librdkafka's queue; False: stop sending this turn (the caller puts it back)."""
        report = _Report()
        try:
            producer.produce(item.topic, item.value, item.key, on_delivery=report)
        except BufferError:  # librdkafka's queue is full: try again later
            if entry is not None:
                entry.segment.unread(entry)
            self._send_stalled = True
            self._send_retry_at = now + self._send_pause
            self._send_pause = min(self._send_pause * 2, 2.0)
            return False
        except KafkaException as exc:
            error = RdkafkaError(exc.args[0]) if exc.args and isinstance(exc.args[0], KafkaError) else exc
            if getattr(error, "poison", False):  # refused at once (e.g. too large): a counted loss
                if entry is None:
                    self._poisoned(item, error)
                    return True
                # from the spool: it is marked done there in order, after the records before it are acked
                report = _Report()
                report._error, report._done = error, True
                self._track(item, report, entry, now)
                return True
            if entry is not None:
                entry.segment.unread(entry)
            self._error(error)
            self._broken = error
            return False
        self._send_stalled = False
        self._send_pause = 0.1
        self._track(item, report, entry, now)
        return True

    def _track(self, item: Item, report: _Report, entry: SpoolEntry | None, now: float) -> None:
        flight = Flight(item, report, now)
        if entry is not None:
            flight.segment, flight.index, flight.end = entry.segment, entry.index, entry.end
        self._inflight.append(flight)
        self._inflight_bytes += item.size
        self._unspooled += entry is None

    # -- failures and the end ----------------------------------------------------------
    def _reset_sync(self) -> None:
        """The producer failed for good: replace it and resend, from the spool, what it did not ack."""
        self._take_back_unacked()
        producer, self._producer = self._producer, None
        self._current = None
        if producer is not None:
            _close_quietly(producer, flush=0.0)  # what it delivered meanwhile is reported now
        self._reap()
        self._broken = None
        self._inflight.clear()
        self._inflight_bytes = self._unspooled = 0
        for seg in self._spool.segments:
            seg.rewind()
        self._next_connect = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 5.0)

    def _shutdown_sync(self) -> None:
        """Make everything undelivered durable in the spool, then stop the producer and close the files."""
        conn, self._conn = self._conn, None
        if conn is not None and conn.done.wait(1.0) and conn.error is None and conn.producer is not None:
            self._producer, self._current = conn.producer, conn  # connected just now: closed below
        if conn is not None and conn.candidate is not None:  # still connecting: its thread closes it
            conn.candidate = None
        if self._producer is not None:
            self._rd.poll(0)
        self._reap()
        with self._cond:
            waiting = bool(self._incoming)
        if (waiting or self._unspooled) and not self._degraded:
            self._degrade("closing")
        if self._degraded:
            self._spill()
        producer, self._producer = self._producer, None
        self._current = None
        if producer is not None:
            _close_quietly(producer, flush=2.0)
            self._broken = None
            self._reap()
        self._finish_shutdown()


def _close_quietly(producer: Any, flush: float = 5.0) -> None:
    """Wait up to ``flush`` seconds for outstanding deliveries, then drop the rest and close.

    Delivery reports are served here, in the calling thread: a record dropped reports a failure
    (it stays in the spool), a delivered one its success.
    """
    try:
        if flush > 0:
            producer.flush(flush)
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        producer.poll(0)
        producer.flush(0)
    except Exception:  # closing must not fail the publisher
        log.debug("producer close failed", exc_info=True)
