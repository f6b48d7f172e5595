"""``scopewatch publish``: canonical JSONL events onto their Kafka topics, keyed, in file order.

Kafka outages (issue 14)
------------------------
* **Position.** Sends complete out of order (one batch per partition), so the position reported is
  the contiguous acknowledged prefix kept by :class:`AckTracker`: every event line before
  :attr:`AckTracker.resume_line` is on Kafka (acknowledged with ``acks=all``); that line is the first
  one that is not.  ``--from-line`` of that number resumes exactly there.
* **Outage.** One idempotent producer sends everything, so a broker that comes back within seconds
  costs nothing.  When a send fails or no acknowledgement arrives for ``stall_seconds``, the producer
  is discarded (without its flush, which would wait for the broker forever), Kafka is awaited like
  the services await it at start (:func:`stream_jobs.runtime.lifecycle.wait_for_kafka`, the wait budget counting
  from the outage) and a new producer resends every unacknowledged event in line order.  A new
  producer is also the cure for aiokafka#1017 (a producer stuck on ``OutOfOrderSequenceNumber``
  after an outage).  When the budget runs out, :class:`PublishInterrupted` carries the position.
* **Guarantee: at least once.** A message whose acknowledgement was lost with the connection is on
  Kafka without publish knowing it; resending it (after a reconnect, or with ``--from-line``)
  duplicates it.  Duplicates are therefore only ever of lines at or after the reported resume line,
  and they carry the same ``event_id``: the raw ClickHouse tables are ReplacingMergeTree tables whose
  sorting key ends with ``event_id`` (read them with ``FINAL``), and the decision worker ignores an
  event id or call it has already seen.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
)

from schemas import Event, Topics, encode, key_for, topic_for
from scopewatch.jsonl import BadLine
from stream_jobs.runtime.lifecycle import KafkaUnreachable, wait_for_kafka

log = logging.getLogger("scopewatch.publish")

SERVICE = "scopewatch publish"
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: Kafka was gone too long; the printed command resumes
STALL_SECONDS = 10.0  # no acknowledgement for this long while events wait: treat Kafka as gone
START_SECONDS = 30.0  # longest wait for a new producer to start (bootstrap + producer id)
DISCARD_SECONDS = 5.0  # longest wait for a discarded producer's sender task to end
# Errors after which a new producer is worth trying (the rest, e.g. authorization, end the run).
RECOVERABLE = (
    KafkaConnectionError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    InvalidProducerEpoch,
    ProducerFenced,
)


# -- the position: pure ----------------------------------------------------------------------
@dataclass
class AckTracker:
    """Which input lines Kafka acknowledged, and where a later run must start again.

    ``read`` every line the reader handed over (event or bad line), ``sent`` every event handed to the
    producer, ``acked`` every acknowledgement (in any order).  Lines before ``start_line`` were
    skipped with ``--from-line``.
    """

    start_line: int = 1
    acknowledged: int = 0
    _unacked: set[int] = field(default_factory=set)
    _next_line: int = 0

    def __post_init__(self) -> None:
        if self.start_line < 1:
            raise ValueError("line numbers start at 1")
        self._next_line = self.start_line

    def read(self, line_no: int) -> None:
        if line_no < self._next_line:
            raise ValueError(f"line {line_no} read after line {self._next_line - 1}")
        self._next_line = line_no + 1

    def sent(self, line_no: int) -> None:
        self.read(line_no)
        self._unacked.add(line_no)

    def acked(self, line_no: int) -> bool:
        """Record an acknowledgement; False when the line was not waiting for one (a late duplicate)."""
        if line_no not in self._unacked:
            return False
        self._unacked.remove(line_no)
        self.acknowledged += 1
        return True

    def dropped(self, line_no: int) -> None:
        """A sent line that will never be on Kafka (reported as a bad line): it no longer holds the position."""
        self._unacked.discard(line_no)

    @property
    def unacknowledged(self) -> int:
        return len(self._unacked)

    @property
    def resume_line(self) -> int:
        """The first line not known to be on Kafka: ``--from-line`` of it loses nothing."""
        return min(self._unacked) if self._unacked else self._next_line

    @property
    def acked_through(self) -> int:
        """Every line from ``start_line`` to this one is done (0 or ``start_line - 1``: none yet)."""
        return self.resume_line - 1

    def position(self) -> str:
        """``"4328 events acknowledged; every line up to 4401 is on Kafka"`` (or what is true)."""
        count = f"{self.acknowledged} event{'' if self.acknowledged == 1 else 's'} acknowledged"
        if self.acked_through < self.start_line:
            return f"{count}; no line from {self.start_line} on is known to be on Kafka"
        return f"{count}; every line up to {self.acked_through} is on Kafka"


def resume_command(source: str, line: int) -> str:
    """The command that publishes ``source`` from ``line`` on (``-``: the same input again on stdin)."""
    return f"scopewatch publish {shlex.quote(source)} --from-line {line}"


# -- the outage-tolerant sender ----------------------------------------------------------------
class Stalled(KafkaError):  # type: ignore[misc]
    """No acknowledgement for ``stall_seconds`` while events wait for one."""

    retriable = True


class PublishInterrupted(Exception):
    """Kafka was gone longer than the wait budget (or refused for good); ``tracker`` has the position."""

    def __init__(self, reason: str, tracker: AckTracker, sent: Counter[str], bad: list[BadLine]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tracker = tracker
        self.sent = sent
        self.bad = bad


def new_producer(bootstrap: str) -> AIOKafkaProducer:
    # idempotent (forces acks=all): retries within one producer never duplicate or reorder
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)


async def discard_producer(producer: AIOKafkaProducer, seconds: float = DISCARD_SECONDS) -> None:
    """Stop a producer without waiting for its unacknowledged batches; they are never sent after this.

    ``stop()`` flushes first, which waits for the broker forever during an outage.  Cancelling the
    sender task (aiokafka 0.14 internals: ``_sender.sender_task``) ends delivery: after it has ended,
    no batch of this producer can reach the broker, so resending them with a new producer keeps the
    per-key order.  Its futures stay unresolved.
    """
    sender = getattr(producer, "_sender", None)
    task: asyncio.Task[None] | None = getattr(sender, "sender_task", None)
    deadline = time.monotonic() + seconds
    while task is not None and not task.done() and time.monotonic() < deadline:
        task.cancel()  # again if it is still awaiting an in-flight request
        await asyncio.wait({task}, timeout=min(1.0, max(0.01, deadline - time.monotonic())))
    if task is not None and not task.done():
        log.warning("%s: a discarded Kafka producer did not stop within %.0fs", SERVICE, seconds)
    producer._closed = True  # no flush-on-stop later (and no unclosed-producer warning)
    try:
        await asyncio.wait_for(producer.client.close(), timeout=seconds)
    except (TimeoutError, KafkaError, OSError):
        pass


class Publisher:
    """Sends events, keeps the acknowledged prefix, rides out outages shorter than ``wait_seconds``."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        *,
        wait_seconds: float,
        start_line: int = 1,
        stall_seconds: float = STALL_SECONDS,
        producer_factory: Callable[[str], AIOKafkaProducer] = new_producer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.wait_seconds = wait_seconds
        self.stall_seconds = stall_seconds
        self.producer_factory = producer_factory
        self.clock = clock
        self.tracker = AckTracker(start_line)
        self.sent: Counter[str] = Counter()  # acknowledged events per topic
        self.bad: list[BadLine] = []
        self.recoveries = 0
        self._pending: dict[int, tuple[str, bytes, bytes]] = {}  # line -> (topic, key, value), unacknowledged
        self._producer: AIOKafkaProducer | None = None
        self._generation = 0
        self._trouble: BaseException | None = None
        self._troubled = asyncio.Event()
        self._last_progress = clock()
        self._outage_deadline: float | None = None

    # -- public
    async def run(self, items: Iterable[tuple[int, Event | BadLine]]) -> tuple[Counter[str], list[BadLine]]:
        """Publish every event; :class:`PublishInterrupted` when Kafka stays away longer than the budget."""
        watchdog = asyncio.create_task(self._watch())
        try:
            self._outage_deadline = self.clock() + self.wait_seconds
            self._producer = await self._connect()
            self._outage_deadline = None
            for line_no, item in items:
                if isinstance(item, BadLine):
                    self.tracker.read(line_no)
                    self.bad.append(item)
                    continue
                topic = topic_for(item, self.topics)
                self._pending[line_no] = (topic, key_for(item).encode("utf-8"), encode(item))
                if len(self._pending) == 1:
                    self._last_progress = self.clock()
                self.tracker.sent(line_no)
                if self._trouble is not None or not await self._send(line_no):
                    await self._recover()
            while self._pending:
                if self._trouble is not None:
                    await self._recover()
                    continue
                try:
                    await asyncio.wait_for(self._troubled.wait(), timeout=0.05)
                except TimeoutError:
                    pass
        except BaseException:  # PublishInterrupted, or anything else: nothing more is sent
            await self._discard()
            raise
        finally:
            watchdog.cancel()
        if self._producer is not None:
            await self._producer.stop()  # everything is acknowledged: a quick, orderly stop
            self._producer = None
        return self.sent, self.bad

    # -- sending
    async def _send(self, line_no: int) -> bool:
        """Hand one event to the producer; False on trouble (the caller recovers)."""
        producer = self._producer
        assert producer is not None
        topic, key, value = self._pending[line_no]
        send = asyncio.ensure_future(producer.send(topic, value=value, key=key))
        if not send.done():
            trouble = asyncio.ensure_future(self._troubled.wait())
            await asyncio.wait({send, trouble}, return_when=asyncio.FIRST_COMPLETED)
            trouble.cancel()
            if not send.done():  # blocked on a full buffer while Kafka is gone
                send.cancel()
                await asyncio.wait({send})
                return False
        try:
            future = send.result()
        except asyncio.CancelledError:
            return False
        except MessageSizeTooLargeError as exc:  # this event alone: a bad line, not an outage
            self._pending.pop(line_no)
            self.tracker.dropped(line_no)
            self.bad.append(BadLine(line_no, f"too large for Kafka ({exc})"))
            return True
        except KafkaError as exc:
            self._set_trouble(exc)
            return False
        generation = self._generation
        future.add_done_callback(lambda f: self._delivered(line_no, generation, f))
        return True

    def _delivered(self, line_no: int, generation: int, future: asyncio.Future[object]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            entry = self._pending.pop(line_no, None)
            if entry is not None and self.tracker.acked(line_no):
                self.sent[entry[0]] += 1
            self._last_progress = self.clock()
            self._outage_deadline = None  # Kafka answers: a later outage gets the whole budget again
        elif generation == self._generation:
            self._set_trouble(exc)

    def _set_trouble(self, exc: BaseException) -> None:
        if self._trouble is None:
            self._trouble = exc
            self._troubled.set()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.stall_seconds / 4))
            if self._pending and self._producer is not None and self._trouble is None:
                if self.clock() - self._last_progress > self.stall_seconds:
                    self._set_trouble(Stalled(f"no acknowledgement for {self.stall_seconds:.0f}s"))

    # -- outages
    async def _recover(self) -> None:
        """Discard the producer, wait for Kafka, resend every unacknowledged event with a new one."""
        while self._trouble is not None:
            reason = self._trouble
            if not isinstance(reason, RECOVERABLE) and not getattr(reason, "retriable", False):
                raise self._interrupted(f"Kafka refused: {describe(reason)}")
            if self._outage_deadline is None:
                self._outage_deadline = self.clock() + self.wait_seconds
                log.warning(
                    "%s: Kafka at %s stopped acknowledging (%s); %s; waiting up to %.0fs for it",
                    SERVICE,
                    self.bootstrap,
                    describe(reason),
                    self.tracker.position(),
                    self.wait_seconds,
                )
            await self._discard()
            self._trouble = None
            self._troubled.clear()
            self._producer = await self._connect()
            self.recoveries += 1
            self._last_progress = self.clock()
            log.warning(
                "%s: new Kafka producer; resending %d unacknowledged events from line %d",
                SERVICE,
                len(self._pending),
                self.tracker.resume_line,
            )
            for line_no in sorted(self._pending):
                if self._trouble is not None or not await self._send(line_no):
                    break

    async def _connect(self) -> AIOKafkaProducer:
        """A started producer, or :class:`PublishInterrupted` once the outage deadline has passed."""
        while True:
            assert self._outage_deadline is not None
            remaining = max(0.0, self._outage_deadline - self.clock())
            try:
                await asyncio.to_thread(wait_for_kafka, self.bootstrap, SERVICE, remaining)
            except KafkaUnreachable as exc:
                raise self._interrupted(str(exc).removeprefix(f"{SERVICE}: ")) from None
            producer = self.producer_factory(self.bootstrap)
            try:
                await asyncio.wait_for(producer.start(), timeout=max(1.0, min(START_SECONDS, remaining)))
                return producer
            except (KafkaError, TimeoutError, OSError) as exc:
                await discard_producer(producer)
                if self.clock() >= self._outage_deadline:
                    raise self._interrupted(f"Kafka at {self.bootstrap}: {describe(exc)}") from None
                await asyncio.sleep(0.5)

    async def _discard(self) -> None:
        producer, self._producer = self._producer, None
        self._generation += 1
        if producer is not None:
            await discard_producer(producer)

    def _interrupted(self, reason: str) -> PublishInterrupted:
        return PublishInterrupted(reason, self.tracker, self.sent, self.bad)


def describe(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    if not text or text.startswith(name):  # aiokafka's errors name themselves
        return text or name
    return f"{name}: {text}"


async def publish_events(
    bootstrap: str,
    topics: Topics,
    items: Iterable[tuple[int, Event | BadLine]],
    *,
    wait_seconds: float = 300.0,
    start_line: int = 1,
    stall_seconds: float = STALL_SECONDS,
) -> tuple[Counter[str], list[BadLine]]:
    """Send every good event (one producer at a time, so per-key order is file order); report bad lines.

    Raises :class:`PublishInterrupted` (with the resumable position) when Kafka is gone longer than
    ``wait_seconds``.
    """
    publisher = Publisher(
        bootstrap, topics, wait_seconds=wait_seconds, start_line=start_line, stall_seconds=stall_seconds
    )
    return await publisher.run(items)
