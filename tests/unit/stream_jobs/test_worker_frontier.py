"""Stage 2 finalizes nothing a lagging stage-1 partition of *another* worker may still change.

Two workers split two partitions: C holds partition 0 of both stages, B partition 1. A call's
session is in stage-1 partition 0 (worker C); its delegation in stage-2 partition 1 (worker B), so
B decides it, and B learns of session facts only through C's forwards. C stops reading (killed,
its partitions wait for its session to time out) right after the call; within grace, before the
call's deadline, a fact arrives that the session had ended before the call. Replay says the call
was made in a session that had ended.

Without the frontier (``stream_jobs.worker.Frontier``), B finalized the call at its deadline on what
it had (``in_scope``), and the forward came late: a wrong final verdict and a late amendment. With
it, B waits until the group's committed offsets of C's stage-1 partitions reach where they ended,
then reads its own inputs up to their end, and only then finalizes: the final verdict equals replay.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from unit.stream_jobs.test_worker_catch_up import T0, _evidence, _publish, _until_idle

from schemas import key_for, parse_event
from schemas.topics import partition_for
from scopewatch.replay import replay
from stream_jobs.runner import MemoryBroker, MemoryConsumer, MemoryProducer, Runner
from stream_jobs.runtime.settings import Settings
from stream_jobs.state import MemoryChangelogReader
from stream_jobs.worker import (
    DRIP_AT_ONCE,
    FRONTIER_COMMIT_SECONDS,
    FRONTIER_STEP_SECONDS,
    Frontier,
    build_worker,
    drip,
)
from support.scenario import bound, ended, grant
from support.scenario import tool_call as call


def _settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, topic_prefix="f.", partitions=2, worker_group="f-decisions", grace_seconds=15)


def _worker(
    broker: MemoryBroker, settings: Settings, clock: list[Any], partition: int
) -> tuple[Runner[Any], MemoryConsumer, Any]:
    topics = settings.topics
    inputs = [topics.tool_calls, topics.sessions, topics.calls_by_route, topics.grants, topics.approvals]
    consumer = MemoryConsumer(broker, settings.worker_group, inputs)
    runner, job, stats, ready = build_worker(settings, consumer, MemoryProducer(broker), MemoryChangelogReader(broker))
    stats.path = None
    runner.config.batch_ms = 0
    runner.config.commit_seconds = 0  # commit at once: the other worker sees the progress next cycle
    runner.clock = lambda: clock[0]
    job.assignor.last_counts = dict.fromkeys(inputs, settings.partitions)
    ready.set()
    mine = {(t, partition) for t in inputs}

    async def start() -> None:
        consumer.listener = runner
        await consumer.rebalance(mine)

    consumer.start = lambda listener: start()  # type: ignore[method-assign,assignment,misc]
    return runner, consumer, job


def _story() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A session in stage-1 partition 0 whose delegation is in stage-2 partition 1."""
    for n in range(200):
        session, principal = f"s{n}", f"user{n}@acme.example"
        c = call("10:00:10", "c1", session, "fs", "read_file")
        g = grant("10:00:00", "g1", principal, "agent-1", ["fs/read_*"])
        if (
            partition_for(key_for(parse_event(c)).encode(), 2) == 0
            and partition_for(key_for(parse_event(g)).encode(), 2) == 1
        ):
            return [bound("10:00:00", session, principal, "agent-1"), g, c], [ended("10:00:05", session)]
    raise AssertionError("no session/principal pair splits across the partitions")


def test_a_call_waits_for_the_other_workers_stage_1_backlog(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "scopewatch.stream")
    settings = _settings(tmp_path)
    broker = MemoryBroker(2)
    clock = [T0]
    before, within_grace = _story()
    events = [parse_event(e) for e in before + within_grace]
    expected = {c.call_id: d.verdict for c, d in replay(enumerate(events)).decisions}
    assert expected["c1"] != "in_scope", expected

    async def main() -> None:
        runner_c, runner_b, _, job_b, _ = await _start_two(broker, settings, clock)
        _publish(broker, settings, before)
        for _ in range(3):  # C forwards the call to B's stage 2; B decides it (provisional)
            await _until_idle(runner_c)
            await _until_idle(runner_b)
            await runner_c.cycle({}, timer=True)
            await runner_b.cycle({}, timer=True)
        assert [(e.call_id, e.verdict, e.final) for e in _evidence(broker, settings)] == [("c1", "in_scope", False)]
        # C stops reading. 2 s after the call, within grace, the fact arrives that the session had
        # ended 5 s before it; it waits in C's backlog
        clock[0] = T0 + timedelta(seconds=2)
        _publish(broker, settings, within_grace)
        # B alone goes on past the call's deadline
        for s in range(3, 25):
            clock[0] = T0 + timedelta(seconds=s)
            await _until_idle(runner_b)
            await runner_b.cycle({}, timer=True)
        assert not any(e.final for e in _evidence(broker, settings)), "final while a fact sat in C's backlog"
        assert job_b.stage2.counters["frontier_lag_ms"] >= 20_000
        assert "finals wait: stage 1 of other workers" in caplog.text and "identity.sessions [0]" in caplog.text
        # C comes back (or its partitions' next owner reads them): the fact reaches B, then the final
        await _until_idle(runner_c)
        for s in range(25, 28):
            clock[0] = T0 + timedelta(seconds=s)
            await runner_c.cycle({}, timer=True)
            await _until_idle(runner_b)
            await runner_b.cycle({}, timer=True)

    asyncio.run(main())
    evidence = _evidence(broker, settings)
    finals = [e for e in evidence if e.final]
    assert [(e.call_id, e.verdict) for e in finals] == [("c1", expected["c1"])], [
        (e.version, e.verdict, e.final, e.late) for e in evidence
    ]
    assert not any(e.late for e in evidence), [(e.version, e.verdict, e.kind, e.late) for e in evidence]


def test_one_worker_holding_every_partition_has_no_frontier(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    broker = MemoryBroker(2)
    clock = [T0]

    async def main() -> None:
        topics = settings.topics
        inputs = [topics.tool_calls, topics.sessions, topics.calls_by_route, topics.grants, topics.approvals]
        consumer = MemoryConsumer(broker, settings.worker_group, inputs)
        runner, job, stats, ready = build_worker(
            settings, consumer, MemoryProducer(broker), MemoryChangelogReader(broker)
        )
        stats.path = None
        runner.clock = lambda: clock[0]
        job.assignor.last_counts = dict.fromkeys(inputs, settings.partitions)
        ready.set()
        await consumer.start(runner)
        _publish(broker, settings, _story()[0])
        await _until_idle(runner)
        for s in range(0, 20):
            clock[0] = T0 + timedelta(seconds=s)
            await runner.cycle({}, timer=True)
        assert job.frontier is None

    asyncio.run(main())
    assert [(e.verdict, e.final) for e in _evidence(broker, settings)][-1] == ("in_scope", True)


def test_the_frontier_takes_the_latest_snapshot_reached() -> None:
    f = Frontier()
    f.pending1 = [(1, {("a", 0): 5}), (2, {("a", 0): 7}), (3, {("a", 0): 9})]
    assert Frontier._reached(f.pending1, {("a", 0): 8}) == 1
    assert Frontier._reached(f.pending1, {("a", 0): 4}) is None


def test_a_worker_left_alone_finalizes_again(tmp_path: Path) -> None:
    """The other worker leaves: the survivor takes every partition, and the frontier it kept while
    they were split no longer bounds its finals (it once did: nothing became final again)."""
    settings = _settings(tmp_path)
    broker = MemoryBroker(2)
    clock = [T0]
    before, _ = _story()

    async def main() -> None:
        _, runner_b, consumer_b, job_b, _ = await _start_two(broker, settings, clock)
        for s in range(3):  # a frontier, behind the clock
            clock[0] = T0 + timedelta(seconds=s)
            await runner_b.cycle({}, timer=True)
        assert job_b.frontier is not None
        await consumer_b.rebalance({(t, p) for t in consumer_b.topics for p in range(2)})  # C left
        _publish(broker, settings, before)
        await _until_idle(runner_b)
        for s in range(3, 30):
            clock[0] = T0 + timedelta(seconds=s)
            await _until_idle(runner_b)
            await runner_b.cycle({}, timer=True)
        assert job_b.frontier is None

    asyncio.run(main())
    assert [(e.verdict, e.final) for e in _evidence(broker, settings)][-1] == ("in_scope", True)


class _SlowBroker:
    """The consumer's progress with broker round trips that take as long as the test says (a busy broker)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.answer = asyncio.Event()
        self.asked = 0

    async def _wait(self) -> None:
        self.asked += 1
        await self.answer.wait()

    async def consumed_to(self, tps: Any) -> dict[Any, int]:
        return dict(await self.inner.consumed_to(tps))

    async def end_offsets(self, tps: Any) -> dict[Any, int]:
        await self._wait()
        return dict(await self.inner.end_offsets(tps))

    async def committed_offsets(self, tps: Any) -> dict[Any, int]:
        await self._wait()
        return dict(await self.inner.committed_offsets(tps))


async def _start_two(
    broker: MemoryBroker, settings: Settings, clock: list[Any], *, slow: bool = False, catch_up: bool = False
) -> tuple[Runner[Any], Runner[Any], MemoryConsumer, Any, _SlowBroker | None]:
    """Worker C (partition 0) and worker B (partition 1), both started; ``slow``: B's progress goes
    through a :class:`_SlowBroker` that answers until the test clears it; ``catch_up``: B's timer cycle
    that ends the catch-up hold after the assignment has run."""
    runner_c, consumer_c, _ = _worker(broker, settings, clock, 0)
    runner_b, consumer_b, job_b = _worker(broker, settings, clock, 1)
    gate = None
    if slow:
        gate = job_b.progress = _SlowBroker(consumer_b)
    await consumer_c.start(runner_c)
    await consumer_b.start(runner_b)
    if gate is not None:
        gate.answer.set()
    if catch_up:
        await runner_b.cycle({}, timer=True)  # the catch-up hold after the assignment ends
    return runner_c, runner_b, consumer_b, job_b, gate


def test_the_frontier_s_broker_round_trips_do_not_hold_a_cycle(tmp_path: Path) -> None:
    """A timer cycle returns while the frontier's step waits for the broker (with two workers these
    round trips held every cycle's calls 25-100 ms, four times a second); the step's result bounds the
    finals from a later timer on, and the call becomes final as before."""
    settings = _settings(tmp_path)
    broker = MemoryBroker(2)
    clock = [T0]
    before, _ = _story()

    async def main() -> None:
        runner_c, runner_b, _, job_b, slow = await _start_two(broker, settings, clock, slow=True, catch_up=True)
        assert slow is not None
        assert job_b.catch_up is None
        job_b.frontier = None  # a new frontier, from here on with a broker that does not answer
        slow.answer.clear()
        _publish(broker, settings, before)
        for s in range(3):
            clock[0] = T0 + timedelta(seconds=s)
            await _until_idle(runner_c)
            await _until_idle(runner_b)
            await runner_c.cycle({}, timer=True)
            await asyncio.wait_for(runner_b.cycle({}, timer=True), 0.5)  # the broker has not answered
        assert slow.asked >= 1
        assert job_b.frontier is not None and job_b.frontier.horizon_us == 0
        assert [(e.call_id, e.final) for e in _evidence(broker, settings)] == [("c1", False)]
        slow.answer.set()  # the broker answers: the next steps complete beside the cycles
        for s in range(3, 30):
            clock[0] = T0 + timedelta(seconds=s)
            await _until_idle(runner_c)
            await runner_c.cycle({}, timer=True)
            await _until_idle(runner_b)
            await runner_b.cycle({}, timer=True)
        assert job_b.frontier is not None and job_b.frontier.horizon_us > 0
        job_b.stop_frontier()

    asyncio.run(main())
    assert [(e.call_id, e.verdict, e.final) for e in _evidence(broker, settings)][-1] == ("c1", "in_scope", True)


def test_drip_approaches_the_frontier_at_1_5_times_the_clock_and_at_most_5_s_behind() -> None:
    assert drip(None, 5_000_000, 0) == 5_000_000  # a new frontier: as it is
    assert drip(1_000_000, 1_500_000, 100_000) == 1_150_000
    assert drip(1_000_000, 1_100_000, 100_000) == 1_100_000  # never beyond it
    assert drip(1_000_000, 9_000_000, 100_000) == 4_000_000  # never more than DRIP_BEHIND_US behind
    assert drip(3_000_000, 3_000_000, 100_000) == 3_000_000
    # few calls due up to the frontier: all of it at once (issue 16)
    assert drip(1_000_000, 1_500_000, 100_000, due=DRIP_AT_ONCE) == 1_500_000
    assert drip(1_000_000, 1_500_000, 100_000, due=0) == 1_500_000
    assert drip(1_000_000, 1_500_000, 100_000, due=DRIP_AT_ONCE + 1) == 1_150_000


def test_a_frontier_step_reaches_stage_2_a_little_at_a_time(tmp_path: Path) -> None:
    """A frontier step moves the horizon on by some 100s of ms of deadlines (thousands of calls at 5,000/s):
    stage 2 gets it over the next cycles (every batch's and every timer's), ≤ 1.5 s of deadlines per
    second of the clock and ≤ 5 s behind, instead of in one timer cycle that finalized them
    all while the cycle's calls waited."""
    settings = _settings(tmp_path)
    broker = MemoryBroker(2)
    clock = [T0]

    async def main() -> None:
        _, runner_b, _, job_b, slow = await _start_two(broker, settings, clock, slow=True, catch_up=True)
        assert slow is not None
        slow.answer.clear()  # frontier steps from here on are the test's
        await runner_b.cycle({}, timer=True)
        frontier = job_b.frontier
        assert frontier is not None
        job_b.stage2.due_by = lambda limit_us, cap: cap + 1  # many calls due: the drip spreads them
        t0_us = int(T0.timestamp() * 1_000_000)
        frontier.horizon_us = t0_us - 1_000_000
        clock[0] = T0 + timedelta(milliseconds=50)
        await runner_b.cycle({}, timer=True)
        assert job_b.stage2._final_horizon == t0_us - 6_000_000  # from the new frontier's 0: 5 s behind at most
        frontier.horizon_us = t0_us - 5_700_000  # a step: 300 ms of deadlines more
        seen = []
        for ms in (90, 130, 170, 210, 250):
            clock[0] = T0 + timedelta(milliseconds=ms)
            await runner_b.cycle({}, timer=True)
            seen.append((job_b.stage2._final_horizon - t0_us) // 1000)
        assert seen == [-5940, -5880, -5820, -5760, -5700], seen
        job_b.stop_frontier()

    asyncio.run(main())


def test_a_frontier_step_with_few_calls_due_reaches_stage_2_at_once(tmp_path: Path) -> None:
    """At 1,000 calls/s a frontier step releases some 50 deadlines per worker: the drip held the last of
    them 2/3 of a step longer, and their pages with them (issue 16). With at most DRIP_AT_ONCE calls not
    final up to the frontier, stage 2 gets the frontier's horizon in the next cycle."""
    settings = _settings(tmp_path)
    broker = MemoryBroker(2)
    clock = [T0]
    before, _ = _story()

    async def main() -> None:
        runner_c, runner_b, _, job_b, slow = await _start_two(broker, settings, clock, slow=True, catch_up=True)
        assert slow is not None
        _publish(broker, settings, before)
        for _ in range(3):  # C forwards the call to B's stage 2: B owns it, not final
            await _until_idle(runner_c)
            await _until_idle(runner_b)
        slow.answer.clear()  # frontier steps from here on are the test's
        await runner_b.cycle({}, timer=True)
        frontier = job_b.frontier
        assert frontier is not None
        t0_us = int(T0.timestamp() * 1_000_000)
        deadline_us = t0_us + 15_000_000  # c1 reached stage 1 at T0 (the test's clock)
        assert job_b.stage2.due_by(deadline_us - 1, 100) == 0
        assert job_b.stage2.due_by(deadline_us, 100) == 1
        frontier.horizon_us = t0_us - 1_000_000
        clock[0] = T0 + timedelta(milliseconds=50)
        await runner_b.cycle({}, timer=True)
        assert job_b.stage2._final_horizon == t0_us - 1_000_000  # nothing due: at once
        frontier.horizon_us = deadline_us + 300_000  # a step: 300 ms of deadlines more, one call due
        clock[0] = T0 + timedelta(milliseconds=90)
        await runner_b.cycle({}, timer=True)
        assert job_b.stage2._final_horizon == deadline_us + 300_000
        job_b.stop_frontier()

    asyncio.run(main())


def test_frontier_steps_start_from_every_cycle_at_most_every_0_1_s(tmp_path: Path) -> None:
    """A step noted the time and read the other workers' commits only on the timer (every 0.25 s), and
    its own reads a timer later: finals trailed their deadlines by ~0.75 s with two workers (issue 16).
    Cycles with records start steps too, at most every FRONTIER_STEP_SECONDS."""
    settings = _settings(tmp_path)
    broker = MemoryBroker(2)
    clock = [T0]
    assert FRONTIER_STEP_SECONDS == 0.1

    async def main() -> None:
        _, runner_b, _, job_b, _ = await _start_two(broker, settings, clock)
        await runner_b.cycle({}, timer=True)  # the catch-up hold ends
        await runner_b.cycle({}, timer=True)  # a frontier, its first step started on the timer
        assert job_b.frontier is not None
        started: list[int] = []

        async def step(frontier: Any, now_us: int, *_: Any) -> None:
            started.append(now_us)

        await asyncio.sleep(0)
        job_b._frontier_step = step  # type: ignore[method-assign]
        t0_us = int(T0.timestamp() * 1_000_000)
        for ms in (50, 100, 150, 200, 250, 300):
            await job_b.process({}, T0 + timedelta(milliseconds=ms))  # a cycle's records (none here)
            await asyncio.sleep(0)  # the step runs beside the cycles
        assert [(t - t0_us) // 1000 for t in started] == [100, 200, 300]
        job_b.stop_frontier()

    asyncio.run(main())


def test_a_worker_with_a_frontier_commits_at_least_every_0_1_s(tmp_path: Path) -> None:
    """The other workers' frontiers move on with this worker's commits: with a frontier (other workers
    hold stage-1 partitions) it commits at most FRONTIER_COMMIT_SECONDS apart, not worker_commit_seconds
    (0.5 s), which held every final of theirs up to 0.5 s more (issue 16). Alone, as configured."""
    settings = _settings(tmp_path)
    broker = MemoryBroker(2)
    clock = [T0]
    assert FRONTIER_COMMIT_SECONDS == 0.1

    async def main() -> None:
        _, runner_b, consumer_b, job_b, _ = await _start_two(broker, settings, clock)
        assert job_b.commit_period(0.5) == 0.5  # no frontier yet
        await runner_b.cycle({}, timer=True)
        await runner_b.cycle({}, timer=True)
        assert job_b.frontier is not None
        assert job_b.commit_period(0.5) == FRONTIER_COMMIT_SECONDS
        assert job_b.commit_period(0.05) == 0.05
        await consumer_b.rebalance({(t, p) for t in consumer_b.topics for p in range(2)})  # C left
        await runner_b.cycle({}, timer=True)
        assert job_b.frontier is None and job_b.commit_period(0.5) == 0.5
        job_b.stop_frontier()

    asyncio.run(main())
