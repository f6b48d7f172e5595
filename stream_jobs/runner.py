"""One runner for a stream job: the commit protocol, spelled out once.

Every cycle of :meth:`Runner.run`:

1. **take** a batch: up to ``max_records`` records, per partition, from the consumer;
2. **process** it: the job turns records into output messages and state changes (changelog
   writes), all returned as :data:`Message` tuples, and may also emit on a timer;
3. **flush** them through the job's :class:`Output` and await it: a :class:`Producer` sends
   per-partition record batches and **awaits the broker's acknowledgement of every one**; the
   ClickHouse sink's output inserts each table with its deduplication token
   (:mod:`stream_jobs.sink`);
4. **commit** the batch's input offsets (last offset + 1 per partition), then tell the output
   (``committed``).

What a failed flush does is the job's choice (``RunnerConfig.retry_in_place``):

* **redo** (default, the decision worker): the commit is aborted, the runner drops the batch's
  partitions' state (the job's ``reset``), seeks every partition of the batch back to the first
  offset it did not commit, waits (backoff doubling to ``max_backoff``) and goes on; what the job
  had done in memory is rebuilt from its changelogs, so the batch is processed again exactly as
  after a crash (at-least-once);
* **retry in place** (the sink): the same outputs are flushed again, with backoff, until they land
  -- a retry must repeat exactly what was tried (the same insert deduplication tokens) -- while the
  runner holds back (:meth:`Runner.hold`: every assigned partition paused, polling on so the group
  keeps it, anything fetched seeked back). On a stop it gives up like a redo.

Taking a batch is one fetch, or (``fill_seconds``) fetches until ``max_records`` records or
``fill_seconds`` after the first record (with ``fill_idle_ms``: or two fetches in a row that bring
nothing). A batch can also be taken **exactly** again (:meth:`Runner.redo`: these offset ranges,
no more, no fewer, other partitions paused meanwhile): the sink does so at start for a flush a
crash interrupted (its intent file), and the runner does so after a commit that failed because
the group took the partitions away (``RunnerConfig.redo_uncommitted``; :class:`CommitFailed`).

The runner also owns the rest of what a job's process does the same way: the partition
assigned/revoked hooks (a revocation waits for the batch in flight, which commits first), the
periodic stats file, a bounded stop (``stream_jobs.runtime.lifecycle.StopTimer`` on SIGTERM/SIGINT), and the
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
from typing import Any, Generic, Protocol, TypeVar

from stream_jobs.trace import TRACE

log = logging.getLogger("scopewatch.runner")

TP = tuple[str, int]
"""A topic partition as (topic, partition)."""
Message = tuple[str, bytes | None, bytes | None, int | None]
"""topic, key, value, partition (None: Kafka's default partitioner on the key)."""
M = TypeVar("M")
"""What a job's cycle outputs: :data:`Message` for Kafka, a batch of rows for the ClickHouse sink."""
M_contra = TypeVar("M_contra", contravariant=True)


class CommitFailed(Exception):
    """An offset commit the group refused (the partitions went to another member meanwhile)."""


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
    def pause(self, tps: Iterable[TP]) -> None: ...
    def resume(self, tps: Iterable[TP]) -> None: ...
    def assignment(self) -> set[TP]: ...
    async def stop(self) -> None: ...


class Output(Protocol[M_contra]):
    """Where a cycle's outputs go; the runner commits the batch's offsets only after :meth:`flush` returned."""

    async def flush(self, out: Sequence[M_contra]) -> dict[TP, int]:
        """Write every output durably (raise if not all of it); the end offset per partition written, if any."""
        ...

    async def committed(self, offsets: Mapping[TP, int]) -> None:
        """The batch whose outputs were flushed last is committed at these offsets."""
        ...

    async def stop(self) -> None: ...


class Producer(Output[Message], Protocol):
    """The Kafka output: its ``flush`` is :meth:`send_all`."""

    async def send_all(self, out: Sequence[Message]) -> dict[TP, int]:
        """Send and await the acknowledgement of every message; the end offset per partition written."""
        ...


class Job(Protocol[M]):
    """A stream job's part: pure processing between the runner's take and flush."""

    halted: bool
    """Set by the job (e.g. from ``assigned``) when it must process nothing more: the runner stops."""

    async def assigned(self, tps: set[TP]) -> None: ...
    async def revoked(self, tps: set[TP]) -> None: ...
    async def process(self, batch: Mapping[TP, Sequence[Record]], now: datetime) -> list[M]: ...
    async def timer(self, assignment: set[TP], now: datetime) -> list[M]: ...
    def flushed(self, ends: dict[TP, int]) -> None: ...
    def reset(self, tps: set[TP]) -> None:
        """Forget the state of these partitions (their batch was not committed)."""
        ...

    def stats(self) -> dict[str, Any]: ...

    # -- with defaults (a job subclassing Job inherits them): what a job that holds records back
    #    beyond one cycle (the pager: a finding is held until its deliveries are on the ledger) needs

    def room(self) -> int | None:
        """How many records the job can take now: None, ``max_records``; 0 or less, none (the runner
        holds back -- every partition paused, polling on -- and the timer goes on)."""
        return None

    def to_commit(self, taken: dict[TP, int]) -> dict[TP, int]:
        """The offsets to commit once the cycle's outputs are flushed. ``taken``: the batch's last offset
        + 1 per partition (the default). A job holding records back commits less, and on a timer cycle
        may commit what earlier cycles held (the runner keeps only assigned partitions)."""
        return taken

    def committed(self, offsets: Mapping[TP, int]) -> None:
        """These offsets are committed."""
        return None

    def commit_period(self, configured: float) -> float:
        """``commit_seconds``: how long after this commit the next one may come (the configured period,
        or a shorter one: the decision worker commits more often while another worker's finals wait
        for its commits, :data:`stream_jobs.worker.FRONTIER_COMMIT_SECONDS`)."""
        return configured

    async def revoking(self, tps: set[TP]) -> list[M]:
        """A revocation is coming: outputs to flush first; then the runner commits what
        :meth:`to_commit` gives for ``tps``, then calls :meth:`revoked`."""
        return []

    async def drain(self) -> list[M]:
        """The runner is stopping: last outputs to flush; then it commits what :meth:`to_commit` gives."""
        return []

    def redo_ranges(self, batch: Mapping[TP, Sequence[Record]]) -> dict[TP, tuple[int, int]]:
        """``redo_uncommitted``: the offset ranges (first, last) of what the cycle whose commit failed
        flushed, to take again exactly. The default: the cycle's batch."""
        return {tp: (records[0].offset, records[-1].offset) for tp, records in batch.items() if records}


class StatsFile:
    """A JSON file of the job's stats, rewritten atomically (best effort, never fatal)."""

    def __init__(self, path: Path | None, collect: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.collect = collect

    def write(self) -> None:
        if self.path is None:
            return
        from stream_jobs.runtime.files import atomic_write

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
    """How long one fetch waits for records."""
    fill_seconds: float = 0.0
    """Above 0: after the first record, fetch on until ``max_records`` or this long (the sink's batches)."""
    fill_from_last_take: bool = False
    """With ``fill_seconds``: the fill ends ``fill_seconds`` after the previous batch was taken, if that
    comes first: the next batch's records gather from then on, so the time the previous batch spent in
    its flush counts toward this one's fill instead of adding to it (the sink: a row waited for the
    flush before its batch, then a whole fill, then its own flush)."""
    fill_idle_ms: int = 0
    """Above 0 (with ``fill_seconds``): each fetch of the fill waits at most this long, and the fill stops at
    the second fetch in a row that brings nothing (caught up) instead of waiting out ``fill_seconds``. (One
    empty fetch is not enough: librdkafka's adapter returns nothing when its consume call, records already
    in hand, has not handed them over within the wait; they come with the next fetch.)"""
    timer_seconds: float = 0.5
    stats_seconds: float = 1.0
    min_backoff: float = 0.25
    max_backoff: float = 5.0
    finish_on_stop: bool = False
    """A batch taken when the stop came is still processed, flushed and committed (the sink's last rows)."""
    retry_in_place: bool = False
    """A failed flush is retried with the same outputs while the runner holds back (module docstring)."""
    redo_uncommitted: bool = False
    """After a :class:`CommitFailed`, take the same offset ranges again exactly (:meth:`Runner.redo`)."""
    redo_timeout: float = 60.0
    """How long a redo waits for its partitions to be assigned here (then gives up) and to read them."""
    settle_commits_all: bool = False
    """On a revocation, commit every assigned partition's offset :meth:`Job.to_commit` gives after the
    last outputs' flush, not only the revoked partitions' (the sink: a flush of held rows covers
    partitions that stay; their offsets must be committed with it, or a crash would insert them again
    under other tokens)."""
    commit_seconds: float = 0.0
    """Above 0: a cycle's offsets (its outputs flushed and acknowledged) are committed with those of the
    next cycles, at most this often, instead of one commit request per cycle; a revocation and a stop
    commit what is pending first. Commit-after-flush still holds: only offsets whose outputs are on the
    broker are ever pending. Not with ``redo_uncommitted`` (a failed commit then covers several batches)."""


@dataclass
class RunnerCounters:
    batches: int = 0
    records: int = 0
    messages: int = 0
    commits: int = 0
    failed_flushes: int = 0
    retries: int = 0
    commit_failures: int = 0
    redos: int = 0
    redos_abandoned: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Runner(Generic[M]):
    """Runs one :class:`Job` over one :class:`Consumer` and one :class:`Output` (module docstring)."""

    def __init__(
        self,
        consumer: Consumer,
        producer: Output[M],
        job: Job[M],
        config: RunnerConfig | None = None,
        stats: StatsFile | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.consumer = consumer
        self.producer = self.output = producer
        self.job = job
        self.config = config or RunnerConfig()
        self.stats = stats
        self.clock = clock
        self.counters = RunnerCounters()
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._backoff = 0.0
        self._redo: dict[TP, tuple[int, int]] | None = None
        self._lost: set[TP] = set()  # partitions revoked since the last fetch of the batch being taken
        self.paused = False
        """True while the runner holds back (a flush being retried in place)."""
        self._full = False  # the job had no room: every partition paused
        if self.config.commit_seconds > 0 and self.config.redo_uncommitted:
            raise ValueError("commit_seconds and redo_uncommitted do not go together")
        self._pending: dict[TP, int] = {}
        """Offsets of cycles whose outputs are flushed, not committed yet (``commit_seconds``)."""
        self._next_commit = 0.0
        self.redoing = False
        """True during the cycle of a batch taken again exactly (:meth:`redo`)."""
        self._took = (0.0, 0.0)  # perf_counter before and after the last take (the trace's timeline)
        self._last_taken: float | None = None
        """When the last take returned (monotonic): ``fill_from_last_take``."""
        TRACE.watch_gc()

    # -- the consumer's rebalance hooks (the batch in flight finishes, and commits, first)

    async def assigned(self, tps: set[TP]) -> None:
        async with self._lock:
            await self.job.assigned(tps)
        if self.job.halted:
            self.stop()
        if self.stats is not None:
            self.stats.write()

    async def revoked(self, tps: set[TP]) -> None:
        self._lost |= tps  # records of these in a batch being taken are someone else's now
        async with self._lock:
            if tps:
                await self._settle(await self.job.revoking(tps), tps)
            await self.job.revoked(tps)

    async def _settle(self, out: list[M], only: set[TP] | None) -> None:
        """Flush these last outputs (once) and commit the job's offsets (of ``only``): a revocation, a stop."""
        if out:
            try:
                ends = await self.output.flush(out)
            except Exception as exc:  # noqa: BLE001 - nothing more is committed; the records are read again
                log.warning("flush failed (%s: %s): nothing more committed", type(exc).__name__, exc)
                self.job.reset(only or set())
                return
            self.job.flushed(ends)
        held = self.consumer.assignment()
        pending = self._pending
        flushed = self.job.to_commit({})
        wanted = {**pending, **flushed}
        every = self.config.settle_commits_all
        offsets = {
            tp: o
            for tp, o in wanted.items()
            if tp in held and (only is None or tp in only or (every and tp in flushed))
        }
        for tp in list(pending):
            if tp not in held or only is None or tp in only:
                del pending[tp]  # committed below, or no longer ours to commit
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except Exception as exc:  # noqa: BLE001 - a revocation or a stop goes on; the records are read again
            self.counters.commit_failures += 1
            log.warning("offset commit failed (%s); the records are read again", exc)
            return
        self.counters.commits += 1
        self.job.committed(offsets)
        await self.output.committed(offsets)

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
                if self._redo is not None:
                    await self._take_again(self._redo)
                    continue
                room = self.job.room()
                if room is not None and room <= 0:
                    batch = await self._held_back()
                else:
                    if self._full:
                        self._full = False
                        self.consumer.resume(self.consumer.assignment())
                    taking = time.perf_counter()
                    batch = await self.take(room)
                    self._took = (taking, time.perf_counter())
                if self.job.halted:
                    break  # a halted job judges nothing more; these records are read again later
                if self._stop.is_set():
                    if batch and cfg.finish_on_stop:
                        await self.cycle(batch)
                    break  # otherwise these records are read again after a restart
                mono = time.monotonic()
                timer_due = mono >= next_timer
                if batch or timer_due:
                    await self.cycle(batch, timer_due)
                    if timer_due:
                        next_timer = mono + cfg.timer_seconds
                if mono >= next_stats and self.stats is not None:
                    self.stats.write()
                    TRACE.flush()
                    next_stats = mono + cfg.stats_seconds
                if self._backoff:
                    await asyncio.wait([asyncio.ensure_future(self._stop.wait())], timeout=self._backoff)
            if not self.job.halted:
                await self.flush_pending()
        finally:
            await self.close()

    async def flush_pending(self) -> None:
        """Flush what the job holds outside a batch (:meth:`Job.drain`) and commit what
        :meth:`Job.to_commit` gives: what a stop does last (and the in-memory simulator between steps)."""
        async with self._lock:
            await self._settle(await self.job.drain(), None)

    async def _held_back(self) -> Mapping[TP, Sequence[Record]]:
        """The job has no room: fetch nothing new, but poll (the group keeps us); nothing is taken."""
        self._full = True
        self.consumer.pause(self.consumer.assignment())  # again each time: partitions assigned since
        self._seek_back(await self.consumer.getmany(self.config.batch_ms, self.config.max_records))
        return {}

    async def take(self, room: int | None = None) -> Mapping[TP, Sequence[Record]]:
        """One fetch, or with ``fill_seconds`` fetches until ``max_records`` (or the job's ``room``) or
        that long after the first record."""
        cfg = self.config
        limit = cfg.max_records if room is None else max(1, min(room, cfg.max_records))
        batch = await self.consumer.getmany(cfg.batch_ms, limit)
        # partitions revoked from here on: records of them taken so far are stale (a partition given
        # back is read again from its committed offset), so they are dropped, never those fetched after
        self._lost = set()
        last_taken, self._last_taken = self._last_taken, time.monotonic()
        if cfg.fill_seconds <= 0 or not batch:
            return batch
        merged = {tp: list(records) for tp, records in batch.items()}
        count = sum(map(len, merged.values()))
        deadline = time.monotonic() + cfg.fill_seconds
        if cfg.fill_from_last_take and last_taken is not None:
            deadline = min(deadline, last_taken + cfg.fill_seconds)
        empty = 0
        while count < limit and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            wait = max(1, int(left * 1000))
            if cfg.fill_idle_ms > 0:
                wait = min(wait, cfg.fill_idle_ms)
            more = await self.consumer.getmany(wait, limit - count)
            if self._lost:
                for tp in self._lost:
                    count -= len(merged.pop(tp, ()))
                self._lost = set()
            got = 0
            for tp, records in more.items():
                merged.setdefault(tp, []).extend(records)
                got += len(records)
            count += got
            empty = 0 if got else empty + 1
            if empty >= 2 and cfg.fill_idle_ms > 0:
                break  # nothing more within two idle waits: caught up
        self._last_taken = time.monotonic()
        return merged

    async def cycle(self, batch: Mapping[TP, Sequence[Record]], timer: bool = False, redo: bool = False) -> bool:
        """One cycle over one batch; False when its flush failed (nothing committed, seeked back)."""
        async with self._lock:
            t0 = time.perf_counter()
            # records of partitions revoked while this batch was fetched are not ours to process
            held = self.consumer.assignment()
            lost = self._lost
            batch = {tp: records for tp, records in batch.items() if records and tp in held and tp not in lost}
            now = self.clock()
            out = await self.job.process(batch, now) if batch else []
            t1 = time.perf_counter()
            if timer:
                out += await self.job.timer(held, now)
            t2 = time.perf_counter()
            try:
                ends = await self._flush(out)
            except Exception as exc:  # noqa: BLE001 - any failed flush: nothing is committed
                self._flush_failed(batch, exc)
                return False
            t3 = time.perf_counter()
            self.job.flushed(ends)
            taken = {tp: records[-1].offset + 1 for tp, records in batch.items()}
            offsets = {tp: o for tp, o in self.job.to_commit(taken).items() if tp in held}
            if self.config.commit_seconds > 0:
                offsets = self._defer(offsets, held)
            if offsets:
                try:
                    await self.consumer.commit(offsets)
                except CommitFailed as exc:
                    self._commit_failed(batch, exc, redo)
                    return False
                self.counters.commits += 1
                self.job.committed(offsets)
                await self.output.committed(offsets)
            self.counters.batches += 1
            records = sum(map(len, batch.values()))
            self.counters.records += records
            self.counters.messages += len(out)
            self._backoff = 0.0
            if TRACE.enabled:
                t4 = time.perf_counter()
                taking, took = self._took
                TRACE.line(
                    "cycle",
                    t=round(time.time() - (t4 - t0), 4),
                    take=round(took - taking, 4),
                    gap=round(t0 - took, 4),
                    proc=round(t1 - t0, 4),
                    timer=round(t2 - t1, 4) if timer else None,
                    flush=round(t3 - t2, 4),
                    commit=round(t4 - t3, 4),
                    n=records,
                    out=len(out),
                )
            return True

    def _defer(self, offsets: dict[TP, int], held: set[TP]) -> dict[TP, int]:
        """``commit_seconds``: these flushed offsets join the pending ones; all of them when a commit is due."""
        pending = self._pending
        pending.update(offsets)
        mono = time.monotonic()
        if not pending or mono < self._next_commit:
            return {}
        self._next_commit = mono + self.job.commit_period(self.config.commit_seconds)
        due = {tp: o for tp, o in pending.items() if tp in held}
        pending.clear()
        return due

    async def _flush(self, out: list[M]) -> dict[TP, int]:
        if not self.config.retry_in_place:
            return await self.output.flush(out)
        delay = self.config.min_backoff
        while True:
            try:
                ends = await self.output.flush(out)
                break
            except Exception as exc:
                self.counters.retries += 1
                if self._stop.is_set() and delay >= self.config.max_backoff:
                    raise  # stopping: give up (the job's durable intent, if any, redoes it at the next start)
                log.warning("flush failed (%s: %s); retrying the same outputs in %.1fs", type(exc).__name__, exc, delay)
                await self.hold(delay)
                delay = min(delay * 2, self.config.max_backoff)
        if self.paused:
            self.consumer.resume(self.consumer.assignment())
            self.paused = False
            log.info("flush succeeded again: fetching resumed")
        return ends

    async def hold(self, seconds: float) -> None:
        """Backpressure for ``seconds``: fetch nothing new, but keep polling so the group keeps us."""
        consumer = self.consumer
        consumer.pause(consumer.assignment())
        self.paused = True
        waited = 0.0
        while waited < seconds:
            records = await consumer.getmany(int(min(seconds - waited, 0.5) * 1000), self.config.max_records)
            self._seek_back(records)  # partitions assigned meanwhile are not paused yet: read them again later
            consumer.pause(consumer.assignment())
            waited += 0.5

    def _seek_back(self, records: Mapping[TP, Sequence[Record]]) -> None:
        for tp, messages in records.items():
            if messages:
                self.consumer.seek(tp, messages[0].offset)

    def _commit_failed(self, batch: Mapping[TP, Sequence[Record]], exc: Exception, redo: bool) -> None:
        self.counters.commit_failures += 1
        if self.config.redo_uncommitted and not redo:
            log.warning("offset commit failed (%s): redoing the batch from the committed offsets", exc)
            self.redo(self.job.redo_ranges(batch))
        else:
            log.warning("offset commit failed (%s); the records are read again if nobody commits past them", exc)

    def redo(self, ranges: Mapping[TP, tuple[int, int]]) -> None:
        """Before anything else, take exactly these offset ranges (first, last) again as one batch."""
        self._redo = dict(ranges)

    async def _take_again(self, wanted: dict[TP, tuple[int, int]]) -> None:
        """The batch of exactly ``wanted``, read again and run through a cycle (other partitions paused meanwhile)."""
        self._redo = None
        consumer = self.consumer
        deadline = time.monotonic() + self.config.redo_timeout
        while not set(wanted) <= consumer.assignment():
            if self._stop.is_set():
                return
            if time.monotonic() > deadline:
                log.error("partitions of the batch to redo are not assigned here; giving it up")
                self.counters.redos_abandoned += 1
                return
            self._seek_back(await consumer.getmany(200, self.config.max_records))
        log.info("re-reading %s", ", ".join(f"{t}[{p}]@{a}-{b}" for (t, p), (a, b) in sorted(wanted.items())))
        others = consumer.assignment() - set(wanted)
        consumer.pause(others)
        self._lost = set()
        batch: dict[TP, list[Record]] = {}
        try:
            for tp, (first, _last) in wanted.items():
                consumer.seek(tp, first)
            remaining = set(wanted)
            while remaining:
                if self._stop.is_set():
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"could not read the batch to redo again: missing {sorted(remaining)}")
                for tp, records in (await consumer.getmany(500, self.config.max_records)).items():
                    if tp not in remaining:
                        self._seek_back({tp: records})
                        continue
                    last = wanted[tp][1]
                    batch.setdefault(tp, []).extend(r for r in records if r.offset <= last)
                    if records and records[-1].offset >= last:
                        remaining.discard(tp)
            for tp, (_first, last) in wanted.items():
                consumer.seek(tp, last + 1)
        finally:
            consumer.resume(others)
        log.info("re-read %d records; processing them again", sum(map(len, batch.values())))
        self.redoing = True
        try:
            done = await self.cycle(batch, redo=True)
        finally:
            self.redoing = False
        if done:
            self.counters.redos += 1

    def _flush_failed(self, batch: Mapping[TP, Sequence[Record]], exc: Exception) -> None:
        self.counters.failed_flushes += 1
        self._backoff = min(self.config.max_backoff, max(self.config.min_backoff, self._backoff * 2))
        tps = set(batch)
        for tp, records in batch.items():
            self.consumer.seek(tp, records[0].offset)
        # the job's state of every held partition may hold effects of unsent writes (a timer
        # touches partitions without input): forget all of it, reload from the changelogs (after
        # the seeks: a job holding records of earlier batches seeks back further)
        self.job.reset(tps | self.consumer.assignment())
        log.warning(
            "flush failed (%s: %s): nothing committed; %d partitions seeked back, retrying in %.2fs",
            type(exc).__name__,
            exc,
            len(tps),
            self._backoff,
        )

    async def close(self) -> None:
        TRACE.flush()
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
        self.fail_commits = 0
        """The next this many commits raise :class:`CommitFailed` (the group moved the partitions)."""

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
        self.paused: set[TP] = set()
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
        self.paused &= set(tps)
        await self.listener.assigned(set(tps))

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TP, list[MemoryRecord]]:
        out: dict[TP, list[MemoryRecord]] = {}
        left = max_records
        for tp, position in sorted(self.positions.items()):
            if tp in self.paused:
                continue
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
        if self.broker.fail_commits:
            self.broker.fail_commits -= 1
            raise CommitFailed("the group was rebalanced")
        self.broker.committed.setdefault(self.group, {}).update(offsets)

    def seek(self, tp: TP, offset: int) -> None:
        self.positions[tp] = offset

    def pause(self, tps: Iterable[TP]) -> None:
        self.paused |= set(tps) & set(self.positions)

    def resume(self, tps: Iterable[TP]) -> None:
        self.paused -= set(tps)

    def assignment(self) -> set[TP]:
        return set(self.positions)

    async def consumed_to(self, tps: Iterable[TP]) -> dict[TP, int]:
        return {tp: self.positions[tp] for tp in tps}

    async def end_offsets(self, tps: Iterable[TP]) -> dict[TP, int]:
        return {tp: self.broker.end(tp) for tp in tps}

    async def committed_offsets(self, tps: Iterable[TP]) -> dict[TP, int]:
        committed = self.broker.committed.get(self.group, {})
        return {tp: committed.get(tp, 0) for tp in tps}

    async def committed(self, tp: TP) -> int | None:
        """The group's committed offset of ``tp`` (None: none yet), as the Kafka adapters give it."""
        return self.broker.committed.get(self.group, {}).get(tp)

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

    async def flush(self, out: Sequence[Message]) -> dict[TP, int]:
        return await self.send_all(out)

    async def committed(self, offsets: Mapping[TP, int]) -> None:
        return None

    async def stop(self) -> None:
        return None
