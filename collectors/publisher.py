"""A Kafka publisher that never blocks its caller.

Collectors sit on the agent's call path: they hand encoded events to
:class:`BackgroundPublisher` and go on. A daemon thread runs an asyncio loop with an
``AIOKafkaProducer`` and drains a bounded in-memory queue. When the broker is
unreachable the thread keeps retrying with backoff; when the queue is full the event
is counted as lost and reported, never dropped silently (a disk spool replaces the
loss path in the production collectors).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

log = logging.getLogger("scopewatch.publisher")


@dataclass
class PublisherStats:
    queued: int = 0
    sent: int = 0
    lost_queue_full: int = 0
    send_errors: int = 0
    last_error: str | None = None
    lost_at_close: int = 0

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class _Item:
    topic: str
    key: bytes | None
    value: bytes


@dataclass
class BackgroundPublisher:
    """Publishes ``(topic, key, value)`` records from any thread without waiting for the broker."""

    bootstrap: str
    max_queued: int = 100_000
    linger_ms: int = 5
    client_id: str = "scopewatch-collector"
    stats: PublisherStats = field(default_factory=PublisherStats)

    def __post_init__(self) -> None:
        self._queue: deque[_Item] = deque()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._closing = False
        self._abort = False
        self._drained = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scopewatch-publisher", daemon=True)
        self._started = False

    # -- caller side -------------------------------------------------------------
    def start(self) -> BackgroundPublisher:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def publish(self, topic: str, key: bytes | None, value: bytes) -> bool:
        """Queue one record; returns False (and counts a loss) if the queue is full."""
        with self._lock:
            if len(self._queue) >= self.max_queued:
                self.stats.lost_queue_full += 1
                return False
            self._queue.append(_Item(topic, key, value))
            self.stats.queued += 1
        self._loop.call_soon_threadsafe(self._wake.set)
        return True

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def close(self, timeout: float = 10.0) -> PublisherStats:
        """Flush what is queued (waiting at most ``timeout`` seconds) and stop."""
        if not self._started:
            return self.stats
        self._closing = True
        self._poke()
        self._drained.wait(timeout)
        self._abort = True
        self._poke()
        self._thread.join(timeout=10.0)
        with self._lock:
            self.stats.lost_at_close = len(self._queue)
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
        finally:
            self._drained.set()
            self._loop.close()

    async def _main(self) -> None:
        producer: AIOKafkaProducer | None = None
        backoff = 0.1
        while not self._abort:
            if producer is None:
                producer = await self._connect()
                if producer is None:
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.1
            batch = self._take(500)
            if not batch:
                if self._closing:
                    break
                self._wake.clear()
                if not self.pending():
                    await self._wake.wait()
                continue
            if not await self._send_batch(producer, batch):
                await _close_quietly(producer)
                producer = None
                await self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        if producer is not None:
            await _close_quietly(producer)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early when close() gives up waiting."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _connect(self) -> AIOKafkaProducer | None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            linger_ms=self.linger_ms,
            acks="all",
            request_timeout_ms=10_000,
        )
        try:
            await producer.start()
            return producer
        except (KafkaError, OSError) as exc:
            self.stats.last_error = f"connect: {exc}"
            await _close_quietly(producer)
            return None

    def _take(self, n: int) -> list[_Item]:
        with self._lock:
            out: list[_Item] = []
            while self._queue and len(out) < n:
                out.append(self._queue.popleft())
            return out

    async def _send_batch(self, producer: AIOKafkaProducer, batch: list[_Item]) -> bool:
        """Send a batch; whatever did not get acknowledged goes back to the queue's head."""
        futures: list[asyncio.Future[object]] = []
        for item in batch:
            try:
                futures.append(await producer.send(item.topic, value=item.value, key=item.key))
            except (KafkaError, OSError) as exc:
                self._error(exc)
                break
        retry: list[_Item] = []
        for item, fut in zip(batch, futures, strict=False):
            try:
                await fut
                self.stats.sent += 1
            except (KafkaError, OSError) as exc:
                self._error(exc)
                retry.append(item)
        retry.extend(batch[len(futures) :])
        if retry:
            with self._lock:
                self._queue.extendleft(reversed(retry))
        return not retry

    def _error(self, exc: BaseException) -> None:
        self.stats.send_errors += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"


async def _close_quietly(producer: AIOKafkaProducer) -> None:
    try:
        await asyncio.wait_for(producer.stop(), timeout=5.0)
    except Exception:
        log.debug("producer stop failed", exc_info=True)
