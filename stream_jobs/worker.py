"""The decision worker: ``SCOPEWATCH_WORKER_ENGINE`` picks how it runs (``aiokafka`` by default).

``aiokafka``: :class:`DecisionJob` on :class:`stream_jobs.runner.Runner` over
:class:`stream_jobs.kafka_adapter.KafkaConsumer` (one consumer subscribed to both stages' inputs,
the co-partitioning assignor, static membership by ``SCOPEWATCH_WORKER_SLOT``) and the worker's
:class:`~stream_jobs.decisions.BatchProducer`. One cycle takes a ``getmany`` batch, runs stage 1
on its session-keyed records and stage 2 on its route-keyed ones (facts first within each), sends
the forwards, evidence, findings and changelog writes as per-partition record batches, awaits
every acknowledgement and then commits the batch's offsets. Stage 2's clock advances in process on
the runner's timer (no tick messages through Kafka). Every assignment is checked; a worker whose
assignment is not co-partitioned judges nothing and exits 78.

``faust``: the faust-streaming app of :mod:`stream_jobs.app` (two agents, ``take_events``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, cast

from aiokafka.errors import KafkaError

from detections.live import LiveConfig, LiveCounters
from stream_jobs.assignor import CoPartitionedAssignor, by_topic, describe
from stream_jobs.decisions import (
    BatchProducer,
    PolicyFeed,
    StageRunner,
    build_stages,
    check_assignment,
    exit_worker,
    log_start,
    new_assignment,
    stage_groups,
    stats_path,
    worker_stats,
)
from stream_jobs.kafka_adapter import KafkaConsumer
from stream_jobs.metrics import remove_stale_worker_stats
from stream_jobs.runner import (
    TP,
    CommitFailed,
    Consumer,
    Job,
    Message,
    Producer,
    Record,
    Runner,
    RunnerConfig,
    StatsFile,
)
from stream_jobs.runtime.kafka_admin import create_topics
from stream_jobs.runtime.lifecycle import kafka_or_exit, service_logging, stop_on_signals
from stream_jobs.runtime.settings import Settings
from stream_jobs.trace import TRACE

log = logging.getLogger("scopewatch.stream")

GC_GEN0 = 20_000
"""The worker process's generation-0 threshold (Python's default: 700)."""


class Progress(Protocol):
    """How far the consumer has handed records over, and where the broker's partitions end."""

    async def consumed_to(self, tps: Iterable[TP]) -> dict[TP, int]: ...
    async def end_offsets(self, tps: Iterable[TP]) -> dict[TP, int]: ...
    async def committed_offsets(self, tps: Iterable[TP]) -> dict[TP, int]: ...


class CatchUp:
    """After an assignment, stage 2 holds finality until the worker has read what was already there.

    A worker that takes partitions over (the other one was killed, or a rebalance moved them) may
    find calls whose deadline passed while nobody owned them, and behind them in its inputs the
    facts and stage-1 updates that reached Kafka before that deadline. Finalizing first would
    publish a wrong final verdict and correct it a moment later. So every assignment arms a hold
    (stage 2 may correct verdicts but marks nothing final) released in two steps, checked on the
    timer: (1) every assigned input partition has been read up to its end offset when the hold was
    first checked (stage 1's backlog included, so its updates for stage 2 are on the broker: a
    cycle's outputs are acknowledged before the next cycle); (2) stage 2's inputs have been read up
    to their end offsets at the moment (1) held. Both targets are fixed offsets, so the hold ends
    under any load. Stage-1 partitions another worker holds are not waited for.
    """

    __slots__ = ("phase", "since", "target")

    def __init__(self, since: datetime | None) -> None:
        self.phase = 1
        self.target: dict[TP, int] | None = None
        self.since = since


class Frontier:
    """How far the facts of stage-1 partitions that *other* workers hold have reached this stage 2.

    Identity facts and calls pass through stage 1, and stage 1 forwards their effect to stage 2
    through Kafka. When another worker holds a stage-1 partition and falls behind (it was killed
    and its partitions wait for its session to time out, a rebalance paused it, it is overloaded),
    a fact that reached Kafka before a call's deadline may still sit in that worker's backlog at
    the deadline: finalizing then publishes a wrong final verdict and a late amendment, where
    replay has the fact. So stage 2 finalizes only calls whose deadline is at most the frontier,
    advanced on the timer in two steps per snapshot taken at time t: (1) the group's committed
    offsets of those stage-1 partitions reach their end offsets at t (commits follow the flush, so
    every forward of what came before t is on the broker); (2) this worker has read its stage-2
    inputs up to their end offsets at the moment (1) held. The frontier is then t. With every
    stage-1 partition held here (one worker) there is no frontier: the catch-up hold and this
    worker's own cycle order cover them.
    """

    MAX_PENDING = 32
    """Snapshots waiting for step (1); beyond this the oldest are dropped (a later snapshot needs
    more progress, so dropping one only delays the frontier)."""

    __slots__ = ("behind", "horizon_us", "pending1", "pending2", "steps", "warned_us")

    def __init__(self) -> None:
        self.horizon_us = 0  # nothing final before the first snapshot completes
        self.behind: list[TP] = []
        """The other workers' stage-1 partitions whose committed offset had not reached the latest end."""
        self.warned_us = 0
        self.steps = 0
        """Steps done (:meth:`advance`): ``behind`` says something once one is."""
        self.pending1: list[tuple[int, dict[TP, int]]] = []
        self.pending2: list[tuple[int, dict[TP, int]]] = []

    @staticmethod
    def _reached(pending: list[tuple[int, dict[TP, int]]], at: Mapping[TP, int]) -> int | None:
        """Index of the latest snapshot whose every end offset ``at`` has reached, or None."""
        found = None
        for i, (_t, ends) in enumerate(pending):
            if all(at.get(tp, 0) >= end for tp, end in ends.items()):
                found = i
        return found

    async def advance(self, now_us: int, others: list[TP], mine: list[TP], progress: Progress) -> int:
        """One step on the timer; returns the frontier (µs since the epoch)."""
        self.pending1.append((now_us, await progress.end_offsets(others)))
        del self.pending1[: -self.MAX_PENDING]
        done = await progress.committed_offsets(others)
        self.behind = [tp for tp, end in self.pending1[-1][1].items() if done.get(tp, 0) < end]
        self.steps += 1
        i = self._reached(self.pending1, done)
        if i is not None:
            t = self.pending1[i][0]
            del self.pending1[: i + 1]
            self.pending2.append((t, await progress.end_offsets(mine)))
        if self.pending2:
            j = self._reached(self.pending2, await progress.consumed_to(mine))
            if j is not None:
                self.horizon_us = self.pending2[j][0]
                del self.pending2[: j + 1]
        return self.horizon_us


DRIP_RATE = 1.5
"""Stage 2's horizon moves on by at most this many seconds of deadlines per second of the clock (more
than 1: it catches up with the frontier, which moves with the clock; a cycle of d seconds leaves the
next one 1.5 d of deadlines to finalize, ≈ 0.5 d of CPU at 5,000 calls/s on two workers, so long
cycles do not feed longer ones)..."""
DRIP_BEHIND_US = 5_000_000
"""... and stays at most this far (µs) behind the frontier's (a worker short of CPU: the finals wait,
but not without bound)."""
DRIP_AT_ONCE = 100
"""When at most this many calls not final have a deadline up to the frontier's horizon, stage 2 gets the
horizon at once: the drip spreads bursts of thousands of finals (5,000 calls/s), but it held every
final of a light load (1,000 calls/s: some 50 per frontier step and worker) up to 2/3 of a step longer,
and so every page (issue 16: p99 call -> page 16.3 s with two workers against 16 s). A hundred finals
take about 15 ms of a cycle."""

FRONTIER_STEP_SECONDS = 0.1
"""A frontier step starts at most this often (from every cycle, not only from the timer's: at the
timer's 0.25 s a step noted the time every 0.25 s and saw the other workers' commits, then its own
reads, a timer later, so the finals trailed their deadlines by 0.75 s)."""
FRONTIER_COMMIT_SECONDS = 0.1
"""While other workers hold stage-1 partitions, this worker commits its flushed offsets at least this
often (``worker_commit_seconds`` otherwise, 0.5 s by default): their frontiers move on with its commits,
so every final of theirs waited up to a whole commit period more."""


def drip(applied: int | None, target: int, elapsed_us: int, due: int | None = None) -> int:
    """The horizon to give stage 2 now: ``target`` (the frontier's) approached from ``applied`` (the last
    one given; None: a new frontier, taken as it is) at :data:`DRIP_RATE`, never more than
    :data:`DRIP_BEHIND_US` behind it, never beyond it; at once when ``due`` (the calls not final whose
    deadline is at most ``target``) is at most :data:`DRIP_AT_ONCE`."""
    if applied is None or applied >= target or (due is not None and due <= DRIP_AT_ONCE):
        return target
    return min(target, max(applied + int(DRIP_RATE * max(0, elapsed_us)), target - DRIP_BEHIND_US))


class DecisionJob(Job[Message]):
    """Both stages as one :class:`stream_jobs.runner.Job`."""

    def __init__(
        self,
        settings: Settings,
        stages: tuple[StageRunner, StageRunner],
        assignor: CoPartitionedAssignor,
        assignment: dict[str, Any],
    ) -> None:
        topics = settings.topics
        self.settings = settings
        self.stage1, self.stage2 = stages
        self.assignor = assignor
        self.assignment = assignment
        self.halted = False
        self._facts1, self._calls1 = topics.sessions, topics.tool_calls
        self._facts2, self._calls2, self._approvals = topics.grants, topics.calls_by_route, topics.approvals
        self._stage1_topics = {topics.sessions, topics.tool_calls}
        self._held: set[TP] = set()
        """What the last assignment gave us, less what was revoked since: what the timer may tick.
        (During a rebalance the consumer still names its old partitions: a tick then took a revoked
        partition's state back as ours; kept while another worker owned it, it was used again
        unread when the partition came back, and the calls that worker left open never became
        final.)"""
        self.progress: Progress | None = None
        """The consumer's progress, for the catch-up hold after each assignment (:class:`CatchUp`);
        None: no hold (stage 2 finalizes on the wall clock alone)."""
        self.catch_up: CatchUp | None = None
        self.frontier: Frontier | None = None
        """While other workers hold stage-1 partitions: how far their facts have reached stage 2."""
        self._applied_us: int | None = None
        """The horizon stage 2 was given last (at most the frontier's: :meth:`_drip`)."""
        self._drip_at_us = 0
        self._frontier_task: asyncio.Future[None] | None = None
        """The frontier's step in flight (its broker round trips run beside the cycles)."""
        self._step_tps: tuple[list[TP], list[TP]] | None = None
        """The other workers' stage-1 partitions and this worker's stage-2 inputs, as the last timer saw them."""
        self._step_at_us = 0
        """When the last frontier step started (clock µs): the next one :data:`FRONTIER_STEP_SECONDS` later."""
        self.partition_counts: Callable[[], Mapping[str, int] | None] = lambda: self.assignor.last_counts
        self._inflight: dict[TP, int] = {}
        """First offset of each partition's records in the cycle not flushed yet (their outputs are
        not on the broker: the catch-up hold does not count them as read)."""

    async def assigned(self, tps: set[TP]) -> None:
        self._held = set(tps)
        if not check_assignment(self.assignment, tps, self.assignor, self.settings):
            self.halted = True
            for stage in (self.stage1, self.stage2):
                stage.halted.set()
        if self.progress is not None and tps:
            self.catch_up = CatchUp(None)
            self.stage2.hold_finality(True)
        # a new frontier at the next timer cycle, if other workers hold stage-1 partitions (the
        # catch-up hold covers the time until then)
        self.frontier = None
        self._applied_us = None
        self.stage2.final_horizon(None)

    async def revoked(self, tps: set[TP]) -> None:
        self._held -= tps
        if self.catch_up is not None and self.catch_up.target is not None:
            self.catch_up.target = None  # measured over partitions we may not hold any more
        if tps:
            log.info("partitions revoked: %s", describe(by_topic(_Tp(t, p) for t, p in tps)))
        # the runner has finished (and committed) the batch in flight: forget the state, the next
        # owner (maybe us again) reads it back from the changelogs
        self.stage1.revoke({p for t, p in tps if t in self._stage1_topics})
        self.stage2.revoke({p for t, p in tps if t not in self._stage1_topics})

    async def process(self, batch: Mapping[TP, Sequence[Record]], now: datetime) -> list[Message]:
        if self.frontier is not None:
            self._drip(int(now.timestamp() * 1_000_000))
        facts1: list[Record] = []
        calls1: list[Record] = []
        facts2: list[Record] = []
        calls2: list[Record] = []
        lists = {
            self._facts1: facts1,
            self._calls1: calls1,
            self._facts2: facts2,
            self._approvals: facts2,  # approvals are stage-2 facts too: applied before the calls
            self._calls2: calls2,
        }
        inflight = self._inflight
        for tp, records in batch.items():
            lists[tp[0]].extend(records)
            if records and tp not in inflight:
                inflight[tp] = records[0].offset
        if facts1 or calls1:
            await self.stage1.process(facts1 + calls1, now)
        if facts2 or calls2:
            await self.stage2.process(facts2 + calls2, now)
        if self.frontier is not None:
            self._start_step(int(now.timestamp() * 1_000_000))
        return self.stage1.sender.take() + self.stage2.sender.take()

    def commit_period(self, configured: float) -> float:
        """At most :data:`FRONTIER_COMMIT_SECONDS` while other workers hold stage-1 partitions (this worker
        has a frontier, so they have one too, waiting for its commits)."""
        return min(configured, FRONTIER_COMMIT_SECONDS) if self.frontier is not None else configured

    async def timer(self, assignment: set[TP], now: datetime) -> list[Message]:
        t0 = time.perf_counter()
        if self.catch_up is not None:
            await self._check_caught_up(now)
        if self.progress is not None and hasattr(self.progress, "committed_offsets"):
            await self._advance_frontier(now)
        t1 = time.perf_counter()
        held = self._held
        await self.stage2.tick(sorted(p for t, p in assignment if t == self._calls2 and (t, p) in held), now)
        out = self.stage1.sender.take() + self.stage2.sender.take()
        if TRACE.enabled:
            applied = self._applied_us
            TRACE.line(
                "timer",
                lag=None if applied is None else round(now.timestamp() * 1000 - applied / 1000),
                t=round(time.time() - (time.perf_counter() - t0), 4),
                checks=round(t1 - t0, 4),
                tick=round(time.perf_counter() - t1, 4),
                out=len(out),
            )
        return out

    async def _check_caught_up(self, now: datetime) -> None:
        hold, progress = self.catch_up, self.progress
        assert hold is not None and progress is not None
        if hold.since is None:
            hold.since = now
        try:
            async with asyncio.timeout(5):  # a slow broker answer holds one timer cycle, not the worker
                await self._catch_up_step(hold, progress)
        except Exception as exc:  # noqa: BLE001 - the broker is away: keep holding, check again
            self.stage2.counters["catch_up_check_errors"] += 1
            log.debug("catch-up check failed (%s: %s); stage 2 holds finality", type(exc).__name__, exc)
            return
        if hold.phase != 3:
            return
        self.catch_up = None
        self.stage2.hold_finality(False)
        self.stage2.counters["catch_ups"] += 1
        log.info("caught up %.2fs after the assignment: stage 2 finalizes again", (now - hold.since).total_seconds())

    async def _advance_frontier(self, now: datetime) -> None:
        """Apply what the frontier's last step found and start the next one (:meth:`_frontier_step`).

        The step's broker round trips (end offsets twice, the group's committed offsets) run beside
        the cycles, not in them: awaited in the timer they held every call of the cycle for 25-100 ms
        four times a second with two workers. A step's result is applied here, at a later timer,
        so after the cycle that took the records it counted as read has processed them (a cycle
        processes what it took before its timer runs); the frontier only lags one tick more."""
        counts = self.partition_counts() or {}
        held = self._held
        others = sorted((t, p) for t in self._stage1_topics for p in range(counts.get(t, 0)) if (t, p) not in held)
        mine = sorted(tp for tp in held if tp[0] not in self._stage1_topics)
        if not others or not mine:
            if self.frontier is not None:
                self.frontier = None
                self._applied_us = None
                self._step_tps = None
                self.stage2.final_horizon(None)
            return
        now_us = int(now.timestamp() * 1_000_000)
        if self.frontier is None:
            self.frontier = Frontier()
            self._applied_us = None
            self._step_at_us = 0
        frontier = self.frontier
        horizon = frontier.horizon_us
        self._drip(now_us)
        self._step_tps = (others, mine)
        self._start_step(now_us)
        lag_us = max(0, now_us - horizon)
        self.stage2.counters["frontier_lag_ms"] = lag_us // 1000
        if (
            frontier.steps
            and lag_us > self.settings.grace_seconds * 1_000_000
            and now_us - frontier.warned_us > 60_000_000
        ):
            frontier.warned_us = now_us
            log.warning(
                "finals wait: stage 1 of other workers is %.0fs behind (partitions %s not committed up "
                "to their end); verdicts are still corrected",
                lag_us / 1e6,
                describe(by_topic(_Tp(t, p) for t, p in frontier.behind)) or "-",
            )

    def _drip(self, now_us: int) -> None:
        """Give stage 2 the frontier's horizon a little at a time (:func:`drip`), every cycle.

        The frontier moves in steps of a few hundred ms of deadlines (one per timer, when its broker
        answers come back); handed over at once, each step finalized thousands of calls in one cycle
        (120-900 ms at 5,000 calls/s with two workers) and every call of that cycle, and of the
        cycles behind it, waited. Any horizon below the frontier's is safe (it only finalizes less):
        the provisional verdicts go first, the finals follow at up to 1.5 times the clock's pace."""
        frontier = self.frontier
        if frontier is None:
            return
        target, due = frontier.horizon_us, None
        if self._applied_us is not None and self._applied_us < target:
            due = self.stage2.due_by(target, DRIP_AT_ONCE)  # few: all at once
        applied = drip(self._applied_us, target, now_us - self._drip_at_us, due)
        self._drip_at_us = now_us
        if applied != self._applied_us:
            self._applied_us = applied
            self.stage2.final_horizon(applied)

    def _start_step(self, now_us: int) -> None:
        """Start the frontier's next step (:meth:`_frontier_step`) unless one is in flight or the last
        one started less than :data:`FRONTIER_STEP_SECONDS` ago."""
        frontier, tps = self.frontier, self._step_tps
        if frontier is None or tps is None or now_us - self._step_at_us < FRONTIER_STEP_SECONDS * 1_000_000:
            return
        step = self._frontier_task
        if step is not None and not step.done():
            return
        self._step_at_us = now_us
        progress = cast(Progress, self.progress)
        self._frontier_task = asyncio.ensure_future(self._frontier_step(frontier, now_us, *tps, progress))

    async def _frontier_step(
        self, frontier: Frontier, now_us: int, others: list[TP], mine: list[TP], progress: Progress
    ) -> None:
        """One step of ``frontier`` (a task beside the cycles); a later timer applies its horizon."""
        try:
            async with asyncio.timeout(5):
                await frontier.advance(now_us, others, mine, progress)
        except Exception as exc:  # noqa: BLE001 - the broker is away: the frontier stays, checked again
            self.stage2.counters["frontier_check_errors"] += 1
            log.debug("frontier check failed (%s: %s); finals wait", type(exc).__name__, exc)

    def stop_frontier(self) -> None:
        """Cancel a frontier step in flight (the worker is stopping)."""
        if self._frontier_task is not None:
            self._frontier_task.cancel()
            self._frontier_task = None

    async def _catch_up_step(self, hold: CatchUp, progress: Progress) -> None:
        """Move ``hold`` on as far as the consumer's progress allows (phase 3: done)."""
        while hold.phase < 3:
            tps = sorted(
                self._held if hold.phase == 1 else (tp for tp in self._held if tp[0] not in self._stage1_topics)
            )
            if hold.target is None:
                hold.target = await progress.end_offsets(tps)
            at = await progress.consumed_to(tps)
            for tp, first in self._inflight.items():  # read, but their outputs are not flushed yet
                if tp in at:
                    at[tp] = min(at[tp], first)
            if any(at.get(tp, 0) < end for tp, end in hold.target.items()):
                return
            hold.phase, hold.target = hold.phase + 1, None

    def flushed(self, ends: dict[TP, int]) -> None:
        self._inflight.clear()
        self.stage1.settle(ends)
        self.stage2.settle(ends)

    def reset(self, tps: set[TP]) -> None:
        self._inflight.clear()
        self.stage1.drop({p for t, p in tps if t in self._stage1_topics})
        self.stage2.drop({p for t, p in tps if t not in self._stage1_topics})
        self.stage1.sender.take()
        self.stage2.sender.take()

    async def drain(self) -> list[Message]:
        """Whatever the stages emitted outside :meth:`process` and :meth:`timer` (nothing, in the
        worker's own loop): flushed before a stop commits."""
        return self.stage1.sender.take() + self.stage2.sender.take()

    def stats(self) -> dict[str, Any]:
        return {}


class _Tp:
    __slots__ = ("partition", "topic")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic, self.partition = topic, partition


class _CommitTolerant:
    """A failed commit is not fatal: the outputs are on the broker, and the next commit (or the next
    owner, reading from the last commit) covers the records again (at-least-once)."""

    def __init__(self, consumer: KafkaConsumer, counters: Counter[str]) -> None:
        self.inner = consumer
        self.counters = counters

    async def start(self, listener: Any) -> None:
        await self.inner.start(listener)

    async def getmany(self, timeout_ms: int, max_records: int) -> Mapping[TP, Sequence[Record]]:
        return await self.inner.getmany(timeout_ms, max_records)

    async def commit(self, offsets: Mapping[TP, int]) -> None:
        try:
            await self.inner.commit(offsets)
        except (KafkaError, CommitFailed) as exc:
            self.counters["commit_failures"] += 1
            log.warning(
                "offset commit failed (%s: %s); the records are read again if nobody commits past them",
                type(exc).__name__,
                exc,
            )

    def seek(self, tp: TP, offset: int) -> None:
        self.inner.seek(tp, offset)

    def pause(self, tps: Iterable[TP]) -> None:
        self.inner.pause(tps)

    def resume(self, tps: Iterable[TP]) -> None:
        self.inner.resume(tps)

    def assignment(self) -> set[TP]:
        return self.inner.assignment()

    async def consumed_to(self, tps: Iterable[TP]) -> dict[TP, int]:
        return await self.inner.consumed_to(tps)

    async def end_offsets(self, tps: Iterable[TP]) -> dict[TP, int]:
        return await self.inner.end_offsets(tps)

    async def committed_offsets(self, tps: Iterable[TP]) -> dict[TP, int]:
        return await self.inner.committed_offsets(tps)

    async def stop(self) -> None:
        await self.inner.stop()


def build_worker(
    settings: Settings,
    consumer: Consumer | None = None,
    producer: Producer | None = None,
    reader: Any = None,
    *,
    policies: PolicyFeed | None = None,
    live_counters: LiveCounters | None = None,
    config: LiveConfig | None = None,
) -> tuple[Runner[Message], DecisionJob, StatsFile, asyncio.Event]:
    """The aiokafka engine's runner (or the same job over other adapters: unit tests, with
    ``policies`` a :class:`~stream_jobs.decisions.MemoryPolicyFeed` or none); the event is set once
    the changelog topics exist (the caller sets it). ``config`` (default: the settings') and
    ``live_counters`` are the processors'."""
    counters: Counter[str] = Counter()
    live_counters = live_counters if live_counters is not None else LiveCounters()
    ready = asyncio.Event()
    batch_producer = BatchProducer(settings.kafka_bootstrap, counters)
    stage1, stage2, changelogs = build_stages(
        settings, batch_producer, counters, live_counters, ready, reader, feed=policies, config=config
    )
    slot = settings.worker_slot
    assignor = CoPartitionedAssignor(stage_groups(settings), slot=slot or "")
    assignment = new_assignment()
    job = DecisionJob(settings, (stage1, stage2), assignor, assignment)
    if consumer is not None and policies is None:
        # other adapters (the in-memory broker of unit tests): no policies feed from a real broker
        stage2.policies = None
    if consumer is None:
        topics = settings.topics
        kafka = KafkaConsumer(
            settings.kafka_bootstrap,
            settings.worker_group,
            [topics.tool_calls, topics.sessions, topics.calls_by_route, topics.grants, topics.approvals],
            assignor=assignor,
            instance_id=slot,
            session_timeout=settings.worker_session_timeout_seconds,
            fetch_min_bytes=settings.worker_fetch_min_bytes,
            fetch_max_wait_ms=settings.worker_fetch_wait_ms,
        )
        consumer = _CommitTolerant(kafka, counters)
    stats = StatsFile(
        stats_path(settings),
        lambda: worker_stats(settings, assignment, counters, live_counters, (stage1, stage2), "aiokafka"),
    )
    runner_config = RunnerConfig(
        max_records=settings.worker_batch_size,
        batch_ms=max(1, int(settings.worker_batch_seconds * 1000)),
        timer_seconds=settings.tick_seconds,
        stats_seconds=max(settings.tick_seconds, 1.0),
        commit_seconds=settings.worker_commit_seconds,
    )
    if hasattr(consumer, "consumed_to") and hasattr(consumer, "end_offsets"):
        job.progress = cast(Progress, consumer)
    runner = Runner(consumer, producer or batch_producer, job, runner_config, stats)
    runner.changelogs = changelogs  # type: ignore[attr-defined]
    runner.counters_ = counters  # type: ignore[attr-defined]
    return runner, job, stats, ready


async def _serve(settings: Settings) -> bool:
    runner, job, stats, ready = build_worker(settings)
    # Fewer, cheaper cyclic collections: a cycle of a few hundred calls allocates tens of thousands of
    # containers (gen 0 at 700 ran a collection every few calls), and what start-up and the state
    # loads leave alive is frozen out of the full collections (StageRunner.freeze_gc).
    gc.set_threshold(GC_GEN0, 20, 20)
    gc.freeze()
    for stage in (job.stage1, job.stage2):
        stage.freeze_gc = True
    changelogs = runner.changelogs  # type: ignore[attr-defined]
    stop_on_signals(runner.stop, settings.stop_seconds, "decision worker")
    try:
        await create_topics(
            settings.kafka_bootstrap,
            list(changelogs.values()),
            settings.partitions,
            configs={"cleanup.policy": "compact"},
        )
        ready.set()
        await runner.run()
    finally:
        job.stop_frontier()
        stats.remove()
        if job.stage2.policies is not None:
            await job.stage2.policies.stop()
    return job.halted


def run_aiokafka_worker(settings: Settings) -> None:
    service_logging(logging.WARNING)  # the libraries at WARNING, and rate-limited during an outage
    logging.getLogger("scopewatch").setLevel(logging.INFO)  # our lifecycle lines (start, assignment, stop)
    settings.home.mkdir(parents=True, exist_ok=True)
    kafka_or_exit(settings.kafka_bootstrap, "decision worker", settings.kafka_wait_seconds)
    log_start(settings, "aiokafka", remove_stale_worker_stats(settings.run_dir))
    exit_worker(asyncio.run(_serve(settings)))


def run_worker(settings: Settings) -> None:
    """Run one decision worker until it is stopped (SIGTERM/SIGINT), on the configured engine."""
    TRACE.configure(settings.trace_dir, settings.trace_role)
    if settings.worker_engine == "faust":
        from stream_jobs.app import run_faust_worker

        run_faust_worker(settings)
    else:
        run_aiokafka_worker(settings)
